"""
The /sync provider: the shard directory and the settings the control plane owns, long-polled
with the cloud token.

    GET <base URL>/sync?wait=<cloud.sync_wait>
    Authorization: Bearer <cloud token>
    If-None-Match: "<version in force>"

    200  ETag: "<version>"
         {"version": N, "published_at": <unix time>,
          "directory": {"shards": [...]},             (a directory file's document)
          "settings": {"auth": {...}, "limits": {...}}}
    304  nothing changed within wait seconds (the next poll starts at once)

The control plane holds the request until its version differs from If-None-Match, so a change
reaches the gateway as soon as it is published.  A version is validated as a whole (the
directory with the same rules as a directory file, the settings with the configuration's
checks); one that fails is refused (logged, counted, C{/readyz} says so) and the last good one
stays, and the next poll names the refused version in If-None-Match so the control plane holds
it until a newer one exists.  The last version applied is kept on disk
(``state_dir/cloud/sync-cache.json``, the Redis provider's cache layout plus the ETag and the
settings), so a gateway started while the control plane is away routes with it.  Failures are
retried after L{backoff} with jitter (cloud.retry_initial doubling to cloud.retry_max).

Settings (every key optional; an absent key keeps the configuration file's value):

    auth:   jwks (a JWKS document) or public_key (PEM) for user tokens, signin_url, issuer,
            audience
    limits: any key of the configuration's limits section
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any, Callable, Mapping

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_gateway import metrics
from twisted_gateway.cloud.link import (ANSWER_MAX_BYTES, REQUEST_OPTIONS, SYNC_MAX_BYTES, auth_headers,
                                        backoff, describe, http_client, read_body)
from twisted_gateway.cloud.token import CloudIdentity
from twisted_gateway.config import AuthConfig, CloudConfig, ConfigError, GatewayConfig, LimitsConfig
from twisted_gateway.directory.interfaces import IProviderStatus, ShardDirectory
from twisted_gateway.directory.model import DirectoryError, DirectorySnapshot, parse_directory
from twisted_gateway.directory.redis import document_from_entries, entry_json, read_cache, write_cache
from twisted_gateway.http.auth import JWKSKeys, TokenVerifier
from twisted_gateway.tls.files import ensure_private_dir

CACHE = os.path.join("cloud", "sync-cache.json")
SOURCE = "control plane /sync"
AUTH_KEYS = ("jwks", "public_key", "signin_url", "issuer", "audience")


# -- settings: pure ----------------------------------------------------------------------------------

@attrs.frozen
class SyncSettings:
    """The settings of one /sync version, checked."""

    auth: Mapping[str, Any] = attrs.field(factory=dict)
    """AuthConfig keys (signin_url, issuer, audience) to lay over the file's."""
    limits: Mapping[str, Any] = attrs.field(factory=dict)
    jwks: Mapping[str, Any] | None = None
    public_key: bytes | None = None

    @property
    def owns_keys(self) -> bool:
        return self.jwks is not None or self.public_key is not None


def _checked(cls: type, doc: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise ConfigError(SOURCE, prefix.rstrip("."), "expected a mapping")
    fields = attrs.fields_dict(cls)
    out = {}
    for key, value in doc.items():
        if key not in fields:
            raise ConfigError(SOURCE, f"{prefix}{key}", "unknown key")
        try:
            out[key] = fields[key].metadata["check"](value)
        except ValueError as e:
            raise ConfigError(SOURCE, f"{prefix}{key}", str(e)) from None
    return out


def parse_settings(doc: Any, leeway: float = 30.0) -> SyncSettings:
    """Check a /sync version's settings; raise L{ConfigError} naming the key."""
    if doc is None:
        return SyncSettings()
    if not isinstance(doc, dict):
        raise ConfigError(SOURCE, "settings", "expected a mapping")
    unknown = sorted(set(doc) - {"auth", "limits"})
    if unknown:
        raise ConfigError(SOURCE, f"settings.{unknown[0]}", "unknown key (known: auth, limits)")
    limits = _checked(LimitsConfig, doc.get("limits") or {}, "settings.limits.")
    auth_doc = doc.get("auth") or {}
    if not isinstance(auth_doc, dict):
        raise ConfigError(SOURCE, "settings.auth", "expected a mapping")
    unknown = sorted(set(auth_doc) - set(AUTH_KEYS))
    if unknown:
        raise ConfigError(SOURCE, f"settings.auth.{unknown[0]}", f"unknown key (known: {', '.join(AUTH_KEYS)})")
    auth = _checked(AuthConfig, {k: v for k, v in auth_doc.items() if k in ("signin_url", "issuer", "audience")},
                    "settings.auth.")
    jwks, public_key = auth_doc.get("jwks"), auth_doc.get("public_key")
    if jwks is not None and public_key is not None:
        raise ConfigError(SOURCE, "settings.auth.public_key", "give jwks or public_key, not both")
    if jwks is not None and not isinstance(jwks, dict):
        raise ConfigError(SOURCE, "settings.auth.jwks", "expected a JWKS document ({\"keys\": [...]})")
    if public_key is not None and not isinstance(public_key, str):
        raise ConfigError(SOURCE, "settings.auth.public_key", "expected a PEM public key")
    settings = SyncSettings(auth, limits, jwks, public_key.encode() if public_key else None)
    settings_verifier(settings, AuthConfig(leeway=leeway), version=0)  # the keys must be usable
    return settings


class InlineJWKS(JWKSKeys):
    """User-token keys delivered by /sync: held, never fetched (the next version replaces them)."""

    def __init__(self, doc: Mapping[str, Any], version: int) -> None:
        super().__init__(f"{SOURCE} (version {version})", 3600.0)
        self._got_document(dict(doc))
        self._delivered = dict(self.keys)

    def startService(self) -> None:
        # Not the timer: the keys came with the version.  (The gateway's swap of key fetchers
        # hands the previous keys to a new fetcher; these are the ones in force.)
        Service.startService(self)
        self.keys, self.loaded = dict(self._delivered), True

    def stopService(self) -> None:
        Service.stopService(self)

    def fetch(self) -> None:
        return None


def settings_verifier(settings: SyncSettings, auth: AuthConfig, version: int) -> TokenVerifier | None:
    """The user-token verifier of C{settings} (None: they bring no keys); raise ConfigError."""
    issuer = settings.auth.get("issuer", auth.issuer)
    audience = settings.auth.get("audience", auth.audience)
    try:
        if settings.jwks is not None:
            return TokenVerifier(issuer=issuer, audience=audience, leeway=auth.leeway,
                                 jwks=InlineJWKS(settings.jwks, version))
        if settings.public_key is not None:
            return TokenVerifier(public_key_pem=settings.public_key, issuer=issuer,
                                 audience=audience, leeway=auth.leeway)
    except ValueError as e:
        key = "jwks" if settings.jwks is not None else "public_key"
        raise ConfigError(SOURCE, f"settings.auth.{key}", str(e)) from None
    return None


def overlay(config: GatewayConfig, settings: SyncSettings) -> GatewayConfig:
    """The configuration in force: the file's, with the control plane's settings over it."""
    auth = attrs.evolve(config.auth, **settings.auth)
    if settings.owns_keys:
        auth = attrs.evolve(auth, jwt_secret=None, jwt_secret_file=None, jwt_public_key=None, jwks_url=None)
    return attrs.evolve(config, auth=auth, limits=attrs.evolve(config.limits, **settings.limits))


# -- versions: pure ----------------------------------------------------------------------------------

@attrs.frozen
class SyncVersion:
    version: int
    etag: str
    published_at: float | None
    directory: Mapping[str, Any]
    settings: Mapping[str, Any] | None
    snapshot: DirectorySnapshot = attrs.field(eq=False, repr=False)
    checked: SyncSettings = attrs.field(eq=False, repr=False)


def parse_version(doc: Any, etag: str | None, leeway: float = 30.0) -> SyncVersion:
    """Check a 200 answer's document as a whole; raise L{DirectoryError} or L{ConfigError}."""
    if not isinstance(doc, dict):
        raise DirectoryError("the answer is not a JSON object")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise DirectoryError(f"version: expected an integer >= 0, got {version!r}")
    published = doc.get("published_at")
    directory = doc.get("directory")
    if directory is None:
        directory = {"shards": []}
    snapshot = parse_directory(directory)
    checked = parse_settings(doc.get("settings"), leeway)
    return SyncVersion(version, etag or f'"{version}"',
                       float(published) if isinstance(published, (int, float)) else None,
                       directory, doc.get("settings"), snapshot, checked)


def write_sync_cache(path: str, version: SyncVersion) -> None:
    """The Redis provider's cache layout (read back with its L{read_cache}) plus the ETag and
    the settings, written atomically."""
    entries = {s["id"]: entry_json(s) for s in version.directory.get("shards") or []}
    write_cache(path, version.version, version.published_at, entries,
                extra={"etag": version.etag, "settings": version.settings})


def read_sync_cache(path: str, leeway: float = 30.0) -> SyncVersion:
    """The cached version; raise L{DirectoryError}, L{ConfigError} or OSError if unusable."""
    number, entries = read_cache(path)
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    return parse_version({"version": number, "published_at": doc.get("updated"),
                          "directory": document_from_entries(entries),
                          "settings": doc.get("settings")}, doc.get("etag"), leeway)


# -- the provider --------------------------------------------------------------------------------------

@implementer(IProviderStatus)
class SyncProvider(Service):
    """
    Long-polls /sync and publishes each valid version: the directory into C{directory}, the
    settings to C{on_settings} (which may raise L{ConfigError} to refuse them).

    @ivar state: connecting (no answer yet), up, down (unreachable or an error) or refused
        (the control plane refuses the token).
    """

    log = Logger()

    def __init__(self, identity: CloudIdentity, directory: ShardDirectory | None, cloud: CloudConfig,
                 state_dir: str, reactor: Any,
                 on_settings: Callable[[SyncSettings, int], None] | None = None,
                 client: Any = None, wall: Callable[[], float] = time.time,
                 uniform: Callable[[float, float], float] = random.uniform) -> None:
        self.identity = identity
        self.directory = directory
        self.cloud = cloud
        self.cache_path = os.path.join(state_dir, CACHE)
        self.state_dir = state_dir
        self.reactor = reactor
        self.on_settings = on_settings
        self.wall = wall
        self.uniform = uniform
        self._client = client
        self._pool: Any = None
        self.applied: SyncVersion | None = None
        self.state = "connecting"
        self.problem: str | None = None
        self._refused_etag: str | None = None
        self._failures = 0
        self._answers = 0
        self._down_since: float | None = None
        self._request: Deferred[Any] | None = None
        self._next: IDelayedCall | None = None
        self.last_lag: float | None = None

    # -- lifecycle ----------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self._client is None:
            self._client, self._pool = http_client(self.reactor, self.cloud.ca_bundle)
        self._load_cache()
        metrics.CLOUD_SYNC_UP.set(0)
        self._poll()

    def stopService(self) -> Any:
        super().stopService()
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        if self._request is not None:
            self._request.cancel()
        if self._pool is not None:
            return self._pool.closeCachedConnections()
        return None

    def set_config(self, cloud: CloudConfig) -> None:
        """A reload: the intervals and the wait apply from the next request."""
        self.cloud = cloud

    def poll_now(self) -> None:
        """SIGHUP: a request at once if one is waiting for its retry delay."""
        if self.running and self._next is not None and self._next.active():
            self._next.reset(0)

    # -- the cache ----------------------------------------------------------------------------------

    def _load_cache(self) -> None:
        if self.applied is not None or not os.path.exists(self.cache_path):
            return
        try:
            version = read_sync_cache(self.cache_path, self.identity.cloud.leeway)
        except (OSError, ValueError) as e:  # DirectoryError and ConfigError are ValueErrors
            self.log.warn("cloud /sync cache {path} not used: {problem}", path=self.cache_path, problem=str(e))
            return
        self._apply(version, f"{SOURCE} cache (version {version.version})", live=False, cached=True)

    # -- polling ------------------------------------------------------------------------------------

    def _poll(self) -> None:
        self._next = None
        if not self.running:
            return
        etag = self._refused_etag or (self.applied.etag if self.applied is not None else None)
        headers = auth_headers(self.identity.token.raw, Accept="application/json")
        if etag is not None:
            headers[b"If-None-Match"] = [etag.encode("latin-1")]
        url = f"{self.identity.base_url}/sync"
        # Until an answer says the control plane is there (at start, after a failure), ask for
        # an answer at once: a long poll would leave the link's state unknown for its wait.
        wait = self.cloud.sync_wait if self.state == "up" else 0.0
        d = self._client.get(url, headers=headers, params={"wait": f"{wait:g}"},
                             timeout=wait + self.cloud.request_timeout, **REQUEST_OPTIONS)
        self._request = d
        d.addCallback(self._answered)
        d.addErrback(self._unreachable)
        d.addErrback(lambda f: self.log.failure("cloud /sync: handling an answer failed", f))

        def done(_: object) -> None:
            self._request = None
            if self.running and self._next is None:
                self._schedule(0.0)
        d.addBoth(done)

    def _schedule(self, delay: float) -> None:
        self._next = self.reactor.callLater(delay, self._poll)

    def _body(self, response: Any, limit: int) -> Deferred[bytes]:
        return read_body(self.reactor, response, limit, self.cloud.request_timeout, "cloud /sync")

    def _answered(self, response: Any) -> Any:
        code = response.code
        if code == 304:
            self._up()
            return self._body(response, ANSWER_MAX_BYTES)
        if code == 200:
            etags = response.headers.getRawHeaders(b"etag") or [b""]
            d = self._body(response, SYNC_MAX_BYTES)
            d.addCallback(lambda body: self._got(body, etags[0].decode("latin-1") or None))
            return d
        reason = "token_refused" if code in (401, 403) else "http_error"
        if 300 <= code < 400:
            location = (response.headers.getRawHeaders(b"location") or [b"?"])[0]
            d = self._body(response, ANSWER_MAX_BYTES)
            d.addCallback(lambda _: self._failed(reason, f"HTTP {code}: a redirect (to "
                                                         f"{location[:200].decode('latin-1')}), not followed"))
            return d
        d = self._body(response, ANSWER_MAX_BYTES)
        d.addCallback(lambda body: self._failed(reason, f"HTTP {code}: "
                                                        f"{body[:200].decode('utf-8', 'replace').strip()}"))
        return d

    def _unreachable(self, failure: Failure) -> None:
        if not self.running:
            return  # stopping: the poll in flight was cancelled
        self._failed("unreachable", describe(failure))

    def _got(self, body: bytes, etag: str | None) -> None:
        self._up()
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        try:
            version = parse_version(doc, etag, self.identity.cloud.leeway)
        except ValueError as e:  # DirectoryError, ConfigError
            number = doc.get("version") if isinstance(doc, dict) else None
            self._refuse(etag or f'"{number}"', number, str(e))
            return
        self._apply(version, f"{SOURCE} (version {version.version})", live=self._answers > 1)

    def _refuse(self, etag: str | None, number: Any, problem: str) -> None:
        metrics.CLOUD_SYNC_FAILURES.labels(reason="invalid").inc()
        self.problem = f"version {number} refused: {problem}"
        if self._refused_etag != etag:
            self._refused_etag = etag
            if self.directory is not None:
                self.directory.refuse(f"{SOURCE} (version {number})", problem)
            else:
                self.log.error("{source} version {number} refused, keeping the last good one: {problem}",
                               source=SOURCE, number=number, problem=problem)

    def _apply(self, version: SyncVersion, source: str, live: bool, cached: bool = False) -> None:
        if self.applied is not None and version == self.applied:
            self._refused_etag = None
            return
        if self.on_settings is not None and (self.applied is None or version.settings != self.applied.settings):
            try:
                self.on_settings(version.checked, version.version)
            except ValueError as e:  # ConfigError: the settings cannot be applied here
                self._refuse(version.etag, version.version, str(e))
                return
        self._refused_etag = None
        self.problem = None
        previous, self.applied = self.applied, version
        metrics.CLOUD_SYNC_VERSION.set(version.version)
        if self.directory is not None and (previous is None or version.directory != previous.directory
                                           or not self.directory.loaded()):
            self.directory.publish(version.snapshot, source)
        elif self.directory is None or previous is not None:
            self.log.info("{source}: settings applied", source=source)
        if live and version.published_at is not None:
            self.last_lag = max(0.0, self.wall() - version.published_at)
            metrics.CLOUD_SYNC_LAG.observe(self.last_lag)
        if cached:
            return
        try:
            ensure_private_dir(os.path.dirname(self.cache_path))
            write_sync_cache(self.cache_path, version)
        except OSError as e:
            self.log.warn("cloud /sync cache {path} not written: {error}", path=self.cache_path,
                          error=e.strerror)

    # -- link state ---------------------------------------------------------------------------------

    def _up(self) -> None:
        self._answers += 1
        self._failures = 0
        if self.state != "up":
            if self._down_since is not None:
                self.log.info("cloud /sync: the control plane answers again after {seconds:.1f}s",
                              seconds=self.reactor.seconds() - self._down_since)
            self._down_since = None
            self.state = "up"
            metrics.CLOUD_SYNC_UP.set(1)

    def _failed(self, reason: str, problem: str) -> None:
        metrics.CLOUD_SYNC_FAILURES.labels(reason=reason).inc()
        metrics.CLOUD_SYNC_UP.set(0)
        self._failures += 1
        new_state = "refused" if reason == "token_refused" else "down"
        if self.state != new_state:
            if self._down_since is None:
                self._down_since = self.reactor.seconds()
            version = self.applied.version if self.applied is not None else None
            self.log.error("cloud /sync: {what} ({problem}); serving the last good state "
                           "(version {version}) and retrying", what={
                               "unreachable": "the control plane is unreachable",
                               "http_error": "the control plane answered an error",
                               "token_refused": "the control plane refuses the cloud token"}[reason],
                           problem=problem, version=version)
        self.state = new_state
        self.problem = problem
        if self.running:
            self._schedule(backoff(self._failures, self.cloud.retry_initial, self.cloud.retry_max, self.uniform))

    def status(self) -> dict[str, Any]:
        """L{IProviderStatus}: C{degraded} while the control plane is away or refuses the token
        (the last good state stays), C{error} while its newest version is refused."""
        state = "ok" if self.state == "up" else "degraded"
        if self._refused_etag is not None:
            state = "error"
        applied = self.applied
        return {"kind": "cloud", "source": self.identity.base_url + "/sync", "state": state,
                "link": self.state, "version": applied.version if applied is not None else None,
                "last_change": applied.published_at if applied is not None else None,
                "lag_seconds": self.last_lag, "last_error": self.problem,
                "shards": len(self.directory.current()) if self.directory is not None else None}

    def readiness(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state,
                               "version": self.applied.version if self.applied is not None else None}
        if self.problem is not None:
            out["problem"] = self.problem
        return out


__all__ = ["SyncProvider", "SyncSettings", "SyncVersion", "overlay", "parse_settings", "parse_version",
           "read_sync_cache", "settings_verifier", "write_sync_cache"]
