"""
The cloud token: a JWT the control plane signs (ES256 or RS256) that names the gateway's
account, its region and its analytics index.  The region chooses the control plane's base URL
(``cloud.regions``, or ``cloud.url`` whatever the region); the signature is checked against a
configured key (``cloud.token_key``: a PEM public key or a JWKS file) or against the control
plane's JWKS (``<base URL>/jwks.json``, fetched at start and kept in ``state_dir`` so that a
gateway restarted while the control plane is down still starts).

Claims: ``account`` (account id), ``region``, ``analytics_index`` (analytics index id),
``exp`` and ``iat`` (required), ``aud`` (``cloud.audience``: a user token of the same control
plane is not a cloud token).  Every refusal is one sentence; at start it stops the gateway with
exit code 2 (L{load_credentials} raises L{ConfigError}).

The pure parts (L{key_set}, L{verify_token}, L{base_url}, L{expiry_state}) take no I/O;
L{CloudIdentity} is the service that holds the token in force, reports its expiry (a gauge,
a log line, C{/readyz}) and takes a new token on SIGHUP.
"""

from __future__ import annotations

import datetime
import json
import os
import ssl
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Mapping

import attrs
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.application.internet import TimerService
from twisted.logger import Logger

from twisted_gateway import metrics
from twisted_gateway.config import CloudConfig, ConfigError
from twisted_gateway.tls.files import atomic_write, ensure_private_dir

KEY = "cloud.token_file"
CLAIMS = ("account", "region", "analytics_index")
JWKS_CACHE = os.path.join("cloud", "jwks.json")
"""The control plane's JWKS as last fetched, under state_dir."""


class CloudTokenError(ValueError):
    """A cloud token that cannot be used; str() is the sentence shown."""


@attrs.frozen
class CloudToken:
    raw: str = attrs.field(repr=False)
    account: str
    region: str
    analytics_index: str
    expires_at: float
    issued_at: float
    key_id: str | None


Keys = Mapping[str, tuple[Any, str]]
"""Verification keys by key id (C{""}: the one configured key), with their algorithm."""


# -- pure parts ------------------------------------------------------------------------------------

def key_set(data: bytes) -> dict[str, tuple[Any, str]]:
    """A PEM public key (RSA: RS256, EC P-256: ES256) or a JWKS document as keys by id."""
    text = data.strip()
    if text.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text)
        except ValueError as e:
            raise CloudTokenError(f"not a PEM public key ({e})") from None
        if isinstance(key, rsa.RSAPublicKey):
            return {"": (key, "RS256")}
        if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
            return {"": (key, "ES256")}
        raise CloudTokenError("the public key must be RSA (RS256) or EC P-256 (ES256)")
    try:
        doc = json.loads(text)
    except ValueError:
        raise CloudTokenError("neither a PEM public key nor a JWKS document") from None
    keys: dict[str, tuple[Any, str]] = {}
    for i, entry in enumerate(doc.get("keys", []) if isinstance(doc, dict) else []):
        if not isinstance(entry, dict):
            continue
        algorithm = entry.get("alg") or {"RSA": "RS256", "EC": "ES256"}.get(entry.get("kty", ""))
        if algorithm not in ("RS256", "ES256"):
            continue
        try:
            keys[str(entry.get("kid") or f"key-{i}")] = (jwt.PyJWK.from_dict(entry).key, algorithm)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, KeyError):
            continue
    if not keys:
        raise CloudTokenError("the JWKS holds no usable RS256 or ES256 key")
    return keys


def unverified_region(raw: str, where: str) -> str:
    """The region a token claims, read before its signature is checked (to find its control
    plane, whose keys check it)."""
    try:
        claims = jwt.decode(raw, options={"verify_signature": False})
    except jwt.DecodeError:
        raise CloudTokenError(f"the cloud token in {where} is not a JWT") from None
    region = claims.get("region")
    if not isinstance(region, str) or not region:
        raise CloudTokenError(f"the cloud token in {where} lacks the 'region' claim")
    return region


def base_url(region: str, regions: Mapping[str, str], override: str | None, where: str) -> str:
    """The control plane's base URL for C{region}: C{override} if set; a region missing from a
    non-empty map is refused either way (the token is for another deployment)."""
    if regions and region not in regions:
        raise CloudTokenError(f"the cloud token in {where} is for region {region!r}, which is not "
                              f"in cloud.regions (known: {', '.join(sorted(regions))})")
    if override is not None:
        return override
    return regions[region]


def _when(stamp: float) -> str:
    return datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def verify_token(raw: str, keys: Keys, audience: str, leeway: float, now: float,
                 where: str) -> CloudToken:
    """Check C{raw}'s signature, expiry, audience and claims; raise L{CloudTokenError}."""
    prefix = f"the cloud token in {where}"
    try:
        header = jwt.get_unverified_header(raw)
    except jwt.DecodeError:
        raise CloudTokenError(f"{prefix} is not a JWT") from None
    kid = header.get("kid")
    if "" in keys:
        key, algorithm = keys[""]
    elif isinstance(kid, str) and kid in keys:
        key, algorithm = keys[kid]
    elif kid is None and len(keys) == 1:
        key, algorithm = next(iter(keys.values()))
    else:
        raise CloudTokenError(f"{prefix} is signed with key {kid!r}, which the control plane's "
                              f"keys do not hold (known: {', '.join(sorted(keys))})")
    try:
        claims = jwt.decode(raw, key, algorithms=[algorithm], audience=audience, leeway=leeway,
                            options={"require": ["exp", "iat", "aud"], "verify_exp": False,
                                     "verify_iat": False})
    except jwt.InvalidSignatureError:
        raise CloudTokenError(f"{prefix} has a signature that does not verify with the control "
                              f"plane's key (tampered with, or minted by another control plane)") from None
    except jwt.InvalidAlgorithmError:
        raise CloudTokenError(f"{prefix} is not signed with {algorithm}, the algorithm of its key") from None
    except jwt.MissingRequiredClaimError as e:
        raise CloudTokenError(f"{prefix} lacks the {e.claim!r} claim") from None
    except jwt.InvalidAudienceError:
        raise CloudTokenError(f"{prefix} is not a cloud token (its audience is not {audience!r})") from None
    except jwt.InvalidTokenError as e:
        raise CloudTokenError(f"{prefix} is not valid ({e})") from None
    for claim in CLAIMS:
        if not isinstance(claims.get(claim), str) or not claims[claim]:
            raise CloudTokenError(f"{prefix} lacks the {claim!r} claim")
    exp = claims["exp"]
    if not isinstance(exp, (int, float)) or isinstance(exp, bool):
        raise CloudTokenError(f"{prefix} has an 'exp' claim that is not a time")
    iat = claims["iat"]
    if not isinstance(iat, (int, float)) or isinstance(iat, bool) or iat > now + leeway:
        raise CloudTokenError(f"{prefix} has an 'iat' claim that is not a time before now")
    if exp + leeway <= now:
        raise CloudTokenError(f"{prefix} expired at {_when(exp)}; mint a new one")
    return CloudToken(raw, claims["account"], claims["region"], claims["analytics_index"],
                      float(exp), float(claims["iat"]), kid if isinstance(kid, str) else None)


def expiry_state(token: CloudToken, now: float, warning: float) -> str:
    """ok, expiring (within C{warning} seconds) or expired."""
    left = token.expires_at - now
    if left <= 0:
        return "expired"
    return "expiring" if left <= warning else "ok"


# -- loading (start-up: blocking I/O before the reactor runs) ---------------------------------------

@attrs.frozen
class Credentials:
    token: CloudToken
    base_url: str
    keys: Keys = attrs.field(repr=False)
    jwks: bytes | None = attrs.field(repr=False)
    """The JWKS fetched from the control plane (to cache), if that is where the keys came from."""


def read_token_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read().strip()
    except OSError as e:
        raise CloudTokenError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise CloudTokenError(f"the cloud token in {path} is not a JWT") from None
    if not raw:
        raise CloudTokenError(f"{path} is empty (expected a cloud token)")
    return raw


def tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_bundle)


def fetch_jwks(url: str, ca_bundle: str | None, timeout: float) -> bytes:
    """GET the control plane's JWKS (blocking; start-up only). Raise OSError naming why not."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=tls_context(ca_bundle)) as r:
            return bytes(r.read(1024 * 1024))
    except urllib.error.HTTPError as e:
        raise OSError(f"HTTP {e.code}") from None
    except urllib.error.URLError as e:
        raise OSError(str(e.reason)) from None


def load_credentials(cloud: CloudConfig, source: str, state_dir: str, now: float | None = None,
                     fetch: Callable[[str, str | None, float], bytes] = fetch_jwks) -> Credentials:
    """Read, check and place the cloud token; raise L{ConfigError} (one sentence) if unusable."""
    assert cloud.token_file is not None
    where = cloud.token_file
    try:
        raw = read_token_file(where)
        regions = dict(cloud.regions)
        url = base_url(unverified_region(raw, where), regions, cloud.url, where)
        jwks: bytes | None = None
        if cloud.token_key is not None:
            try:
                with open(cloud.token_key, "rb") as f:
                    material = f.read()
            except OSError as e:
                raise ConfigError(source, "cloud.token_key", f"cannot read: {e.strerror}") from None
            try:
                keys: Keys = key_set(material)
            except CloudTokenError as e:
                raise ConfigError(source, "cloud.token_key", str(e)) from None
        else:
            jwks, keys = _control_plane_keys(url, cloud, state_dir, fetch)
        token = verify_token(raw, keys, cloud.audience, cloud.leeway,
                             time.time() if now is None else now, where)
    except CloudTokenError as e:
        raise ConfigError(source, KEY, str(e)) from None
    return Credentials(token, url, keys, jwks)


def _control_plane_keys(url: str, cloud: CloudConfig, state_dir: str,
                        fetch: Callable[[str, str | None, float], bytes]) -> tuple[bytes | None, Keys]:
    """The control plane's JWKS, fetched; if it cannot be reached, the copy cached at the last
    start (a gateway restarted while the control plane is down still starts)."""
    cache = os.path.join(state_dir, JWKS_CACHE)
    try:
        data = fetch(f"{url}/jwks.json", cloud.ca_bundle, cloud.request_timeout)
        return data, key_set(data)
    except (OSError, CloudTokenError) as e:
        problem = str(e)
    try:
        with open(cache, "rb") as f:
            return None, key_set(f.read())
    except (OSError, CloudTokenError):
        pass
    raise CloudTokenError(f"the cloud token cannot be checked: the control plane's keys at "
                          f"{url}/jwks.json could not be fetched ({problem}) and no copy is kept "
                          f"in {cache}")


def cache_jwks(state_dir: str, jwks: bytes) -> None:
    ensure_private_dir(os.path.join(state_dir, "cloud"))
    atomic_write(os.path.join(state_dir, JWKS_CACHE), jwks)


# -- the service -----------------------------------------------------------------------------------

class CloudIdentity(TimerService):
    """
    The cloud token in force and where its control plane is; checks the expiry every
    C{check_interval} seconds (gauge, a warning while expiring, an error once expired) and
    takes a new token on L{reload}.  /sync and /reports read L{token} and L{base_url} for
    every request, so a new token applies to the next one.
    """

    log = Logger()

    def __init__(self, credentials: Credentials, cloud: CloudConfig, source: str, state_dir: str,
                 clock: Any = None, wall: Callable[[], float] = time.time,
                 check_interval: float = 60.0) -> None:
        super().__init__(check_interval, self.check)
        if clock is not None:
            self.clock = clock
        self.credentials = credentials
        self.cloud = cloud
        self.source = source
        self.state_dir = state_dir
        self.wall = wall
        self._said: str | None = None
        if credentials.jwks is not None:
            try:
                cache_jwks(state_dir, credentials.jwks)
            except OSError as e:
                self.log.warn("cloud: the control plane's JWKS not kept in {state_dir}: {error}",
                              state_dir=state_dir, error=e.strerror)
        metrics.CLOUD_TOKEN_EXPIRY.set(credentials.token.expires_at)

    @property
    def token(self) -> CloudToken:
        return self.credentials.token

    @property
    def base_url(self) -> str:
        return self.credentials.base_url

    def state(self) -> str:
        return expiry_state(self.token, self.wall(), self.cloud.expiry_warning)

    def check(self) -> None:
        state = self.state()
        if state == self._said:
            return
        self._said = state
        token = self.token
        if state == "expiring":
            self.log.warn("cloud token for account {account} expires at {when} (in {hours:.1f} h): "
                          "mint a new one and SIGHUP the gateway", account=token.account,
                          when=_when(token.expires_at), hours=(token.expires_at - self.wall()) / 3600)
        elif state == "expired":
            self.log.error("cloud token for account {account} expired at {when}: the control plane "
                           "refuses it; the gateway serves its last known state until a new token "
                           "is given (SIGHUP)", account=token.account, when=_when(token.expires_at))

    def readiness(self) -> dict[str, Any]:
        token = self.token
        return {"account": token.account, "region": token.region,
                "analytics_index": token.analytics_index, "control_plane": self.base_url,
                "expires_at": _when(token.expires_at),
                "expires_in": round(token.expires_at - self.wall()), "state": self.state()}

    def reload(self, cloud: CloudConfig, source: str) -> bool:
        """SIGHUP: read the token file again; a token that fails its checks is refused (logged)
        and the one in force stays.  Keys come from cloud.token_key, else the control plane's
        JWKS as held (a token signed by a key the gateway does not hold yet needs a restart, or
        cloud.token_key)."""
        try:
            if cloud.token_key is not None:
                credentials = load_credentials(cloud, source, self.state_dir)
            else:
                where = cloud.token_file or ""
                raw = read_token_file(where)
                url = base_url(unverified_region(raw, where), dict(cloud.regions), cloud.url, where)
                keys = self.credentials.keys
                credentials = Credentials(verify_token(raw, keys, cloud.audience, cloud.leeway,
                                                       self.wall(), where), url, keys, None)
        except (ConfigError, CloudTokenError) as e:
            self.log.error("cloud token not reloaded, the one in force stays: {error}", error=str(e))
            return False
        changed = credentials.token.raw != self.token.raw or credentials.base_url != self.base_url
        self.credentials, self.cloud, self.source = credentials, cloud, source
        metrics.CLOUD_TOKEN_EXPIRY.set(credentials.token.expires_at)
        self._said = None
        self.check()
        if changed:
            self.log.info("cloud token reloaded: account {account}, region {region}, control plane "
                          "{url}, expires {when}", account=credentials.token.account,
                          region=credentials.token.region, url=credentials.base_url,
                          when=_when(credentials.token.expires_at))
        return True


__all__ = ["CloudIdentity", "CloudToken", "CloudTokenError", "Credentials", "base_url",
           "expiry_state", "key_set", "load_credentials", "verify_token"]
