"""
The reference control plane: what a gateway's cloud link talks to, small enough to read in
one sitting, used by the tests and the docs' demo (docs/cloud.md).

    twistd -n gateway-control-plane --state-dir cp --port ssl:8443:... \\
        --directory shards.yaml [--settings settings.yaml]
    twistd gateway-control-plane --state-dir cp mint-cloud-token --account acme --region local \\
        --analytics-index idx-1
    twistd gateway-control-plane --state-dir cp mint-user-token --subject alice --prefixes tasks/

It serves, over HTTPS (Klein):

- ``GET /sync`` (cloud token): the directory file and the settings file it watches, as one
  version (a number kept in its database, +1 whenever either file's content changes), long-
  polled: with ``If-None-Match`` naming the version in force it answers when a newer one is
  published or after ``wait`` seconds (304).  The files are passed on as they are: checking
  them is the gateway's job (a version that fails is refused there, the last good one stays).
  Unless ``--no-user-keys``, its own JWKS is delivered as ``settings.auth.jwks``, so user
  tokens it mints open private ports.
- ``POST /reports`` (cloud token): a gzipped batch, stored in SQLite once: a batch id seen
  before is acknowledged and ignored (the gateway delivers at least once).
- ``GET /jwks.json``: the public key its tokens are signed with (ES256).

The signing key (EC P-256) is ``state_dir/signing-key.pem``, made at the first start or the
first mint.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sqlite3
import sys
import time
from typing import Any

import jwt
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from klein import Klein
from twisted.application.service import MultiService
from twisted.application.strports import service as strport_service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.server import Site

from twisted_gateway.polling import PollingService, file_stamp
from twisted_gateway.tls.files import atomic_write, ensure_private_dir

MAX_BATCH_BYTES = 64 * 1024 * 1024
MAX_WAIT = 60.0


# -- keys and tokens ---------------------------------------------------------------------------------

def signing_key(state_dir: str) -> ec.EllipticCurvePrivateKey:
    """The control plane's signing key, made (0600) if there is none."""
    ensure_private_dir(state_dir)
    path = os.path.join(state_dir, "signing-key.pem")
    if not os.path.exists(path):
        key = ec.generate_private_key(ec.SECP256R1())
        atomic_write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    with open(path, "rb") as f:
        loaded = serialization.load_pem_private_key(f.read(), None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: expected an EC P-256 private key")
    return loaded


def key_id(key: ec.EllipticCurvePrivateKey) -> str:
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


def jwks_document(key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    return {"keys": [{**jwk, "kid": key_id(key), "alg": "ES256", "use": "sig"}]}


def mint_cloud_token(key: ec.EllipticCurvePrivateKey, account: str, region: str, analytics_index: str,
                     lifetime: float = 365 * 86400.0, audience: str = "twisted-gateway",
                     now: float | None = None) -> str:
    now = time.time() if now is None else now
    claims = {"account": account, "region": region, "analytics_index": analytics_index,
              "aud": audience, "iat": int(now), "exp": int(now + lifetime)}
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": key_id(key)})


def mint_user_token(key: ec.EllipticCurvePrivateKey, subject: str, prefixes: list[str],
                    lifetime: float = 3600.0, now: float | None = None) -> str:
    now = time.time() if now is None else now
    claims = {"sub": subject, "prefixes": prefixes, "iat": int(now), "exp": int(now + lifetime)}
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": key_id(key)})


# -- storage -----------------------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (version INTEGER PRIMARY KEY, digest TEXT NOT NULL,
                                     published_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS batches (batch_id TEXT PRIMARY KEY, account TEXT, analytics_index TEXT,
                                    gateway TEXT, worker INTEGER, records INTEGER NOT NULL,
                                    received_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS records (id INTEGER PRIMARY KEY AUTOINCREMENT, batch_id TEXT NOT NULL,
                                    record_id TEXT, seq INTEGER, kind TEXT, gateway TEXT,
                                    body TEXT NOT NULL);
"""


class Store:
    """The control plane's SQLite database: versions published, batches and records stored."""

    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    def version_for(self, digest: str, now: float) -> tuple[int, float]:
        """The version of the content with C{digest}: the latest one if unchanged, else a new one."""
        row = self.db.execute("SELECT version, digest, published_at FROM versions "
                              "ORDER BY version DESC LIMIT 1").fetchone()
        if row is not None and row[1] == digest:
            return int(row[0]), float(row[2])
        number = (int(row[0]) if row is not None else 0) + 1
        self.db.execute("INSERT INTO versions VALUES (?, ?, ?)", (number, digest, now))
        return number, now

    def store_batch(self, batch: dict[str, Any], now: float) -> bool:
        """Store a batch and its records in one transaction; False if its id was stored before."""
        records = batch["records"]
        self.db.execute("BEGIN IMMEDIATE")
        try:
            cursor = self.db.execute(
                "INSERT OR IGNORE INTO batches VALUES (?, ?, ?, ?, ?, ?, ?)",
                (batch["batch_id"], batch.get("account"), batch.get("analytics_index"),
                 batch.get("gateway"), batch.get("worker"), len(records), now))
            if cursor.rowcount == 1:
                self.db.executemany(
                    "INSERT INTO records (batch_id, record_id, seq, kind, gateway, body) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [(batch["batch_id"], r.get("id"), r.get("seq"), r.get("kind"), batch.get("gateway"),
                      json.dumps(r, sort_keys=True)) for r in records if isinstance(r, dict)])
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return cursor.rowcount == 1


# -- the published state -----------------------------------------------------------------------------

def _read_yaml(path: str | None) -> Any:
    if path is None:
        return None
    with open(path, "rb") as f:
        return yaml.safe_load(f)


class Published:
    """The /sync content: the watched files as one version, and the long polls waiting for the
    next one."""

    log = Logger()

    def __init__(self, store: Store, directory_path: str | None, settings_path: str | None,
                 user_keys: dict[str, Any] | None, reactor: Any) -> None:
        self.store = store
        self.directory_path = directory_path
        self.settings_path = settings_path
        self.user_keys = user_keys
        self.reactor = reactor
        self.version = 0
        self.published_at = 0.0
        self.document: dict[str, Any] = {}
        self.waiters: list[Deferred[None]] = []
        self._stamps: tuple[Any, ...] | None = None

    @property
    def etag(self) -> str:
        return f'"{self.version}"'

    def _stat(self) -> tuple[Any, ...]:
        return (file_stamp(self.directory_path), file_stamp(self.settings_path))

    def check(self) -> None:
        stamps = self._stat()
        if stamps == self._stamps:
            return
        self._stamps = stamps
        try:
            directory = _read_yaml(self.directory_path)
            settings = _read_yaml(self.settings_path)
        except (OSError, yaml.YAMLError) as e:
            self.log.error("not publishing: {error}", error=str(e).splitlines()[0])
            return
        if self.user_keys is not None:
            settings = dict(settings) if isinstance(settings, dict) else {}
            auth = dict(settings.get("auth") or {}) if isinstance(settings.get("auth"), dict) else {}
            if "jwks" not in auth and "public_key" not in auth:
                auth["jwks"] = self.user_keys
            settings["auth"] = auth
        content = {"directory": directory, "settings": settings}
        digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()
        version, published_at = self.store.version_for(digest, time.time())
        if version == self.version:
            return
        self.version, self.published_at = version, published_at
        self.document = {"version": version, "published_at": published_at, **content}
        self.log.info("published version {version}", version=version)
        waiters, self.waiters = self.waiters, []
        for d in waiters:
            d.callback(None)


# -- the HTTP API ------------------------------------------------------------------------------------

class ControlPlaneApp:
    app = Klein()
    log = Logger()

    def __init__(self, published: Published, store: Store, key: ec.EllipticCurvePrivateKey,
                 reactor: Any, audience: str = "twisted-gateway") -> None:
        self.published = published
        self.store = store
        self.key = key
        self.reactor = reactor
        self.audience = audience

    def _error(self, request: Any, code: int, message: str) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"error": message}).encode() + b"\n"

    def _token_problem(self, request: Any) -> str | None:
        value = (request.getHeader(b"authorization") or b"").decode("latin-1")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return "a cloud token is required (Authorization: Bearer ...)"
        try:
            jwt.decode(token.strip(), self.key.public_key(), algorithms=["ES256"], audience=self.audience,
                       options={"require": ["exp", "iat", "aud"]})
        except jwt.InvalidTokenError as e:
            return f"the cloud token is not accepted: {e}"
        return None

    @app.route("/jwks.json", methods=["GET"])
    def jwks(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(jwks_document(self.key)).encode()

    @app.route("/sync", methods=["GET"])
    def sync(self, request: Any) -> Any:
        problem = self._token_problem(request)
        if problem is not None:
            return self._error(request, 401, problem)
        try:
            wait = min(MAX_WAIT, max(0.0, float(request.args.get(b"wait", [b"0"])[0])))
        except ValueError:
            return self._error(request, 400, "wait: expected seconds")
        known = (request.getHeader(b"if-none-match") or b"").decode("latin-1").strip()
        if known != self.published.etag or wait == 0:
            return self._answer(request, known)
        changed: Deferred[None] = Deferred()
        self.published.waiters.append(changed)

        def waited() -> None:
            if not changed.called:
                changed.callback(None)
        timer: IDelayedCall = self.reactor.callLater(wait, waited)

        def gone(_: object) -> None:  # the gateway hung up (or the answer was written)
            if changed in self.published.waiters:
                self.published.waiters.remove(changed)
            if timer.active():
                timer.cancel()
        request.notifyFinish().addBoth(gone)
        changed.addCallback(lambda _: self._answer(request, known))
        return changed

    def _answer(self, request: Any, known: str) -> bytes:
        if known == self.published.etag:
            request.setResponseCode(304)
            request.setHeader(b"etag", self.published.etag.encode())
            return b""
        request.setHeader(b"etag", self.published.etag.encode())
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.published.document, default=str).encode()

    @app.route("/reports", methods=["POST"])
    def reports(self, request: Any) -> bytes:
        problem = self._token_problem(request)
        if problem is not None:
            return self._error(request, 401, problem)
        raw = request.content.read(MAX_BATCH_BYTES + 1)
        if len(raw) > MAX_BATCH_BYTES:
            return self._error(request, 413, "the batch is too large")
        try:
            if (request.getHeader(b"content-encoding") or b"").lower() == b"gzip":
                raw = gzip.decompress(raw)
            batch = json.loads(raw)
        except (OSError, ValueError, EOFError) as e:
            return self._error(request, 400, f"not a gzipped JSON batch ({e})")
        header_id = (request.getHeader(b"x-batch-id") or b"").decode("latin-1")
        if not isinstance(batch, dict) or not isinstance(batch.get("records"), list) \
                or not isinstance(batch.get("batch_id"), str) or batch["batch_id"] != header_id:
            return self._error(request, 400, "expected {batch_id, records: [...]} with the X-Batch-Id header's id")
        stored = self.store.store_batch(batch, time.time())
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"batch_id": header_id, "stored": len(batch["records"]) if stored else 0,
                           "duplicate": not stored}).encode()

    def resource(self) -> Any:
        return self.app.resource()


# -- twistd ------------------------------------------------------------------------------------------

class _MintOptions(usage.Options):
    def opt_lifetime(self, value: str) -> None:
        """Seconds the token is valid (negative: already expired)."""
        try:
            self["lifetime"] = float(value)
        except ValueError:
            raise usage.UsageError(f"--lifetime: expected seconds, got {value!r}") from None


class MintCloudTokenOptions(_MintOptions):
    optParameters = [["account", None, None, "Account id."], ["region", None, None, "Region."],
                     ["analytics-index", None, None, "Analytics index id."],
                     ["audience", None, "twisted-gateway", "The aud claim."]]

    def postOptions(self) -> None:
        self.setdefault("lifetime", 365 * 86400.0)
        for name in ("account", "region", "analytics-index"):
            if not self[name]:
                raise usage.UsageError(f"mint-cloud-token needs --{name}")


class MintUserTokenOptions(_MintOptions):
    optParameters = [["subject", None, None, "The sub claim."],
                     ["prefixes", None, "", "Task-name prefixes the holder may reach, comma-separated."]]

    def postOptions(self) -> None:
        self.setdefault("lifetime", 3600.0)
        if not self["subject"]:
            raise usage.UsageError("mint-user-token needs --subject")


class Options(usage.Options):
    synopsis = "[options] [mint-cloud-token ... | mint-user-token ...]"
    longdesc = ("The reference control plane of twisted-gateway's hybrid mode: /sync, /reports and "
                "/jwks.json over HTTPS (docs/cloud.md); or mint a token, print it and exit.")
    optParameters = [
        ["state-dir", None, "./control-plane", "Signing key and database (reports.sqlite) directory."],
        ["port", None, None, "Listener: a Twisted endpoint, e.g. ssl:8443:privateKey=key.pem:certKey=cert.pem."],
        ["directory", None, None, "Directory file (YAML or JSON) served by /sync, watched."],
        ["settings", None, None, "Settings file (YAML: auth, limits) served by /sync, watched."],
        ["poll-interval", None, "0.1", "Seconds between checks of the watched files."],
    ]
    optFlags = [["no-user-keys", None, "Do not deliver this control plane's JWKS as the user-token keys."]]
    subCommands = [["mint-cloud-token", None, MintCloudTokenOptions, "Print a new cloud token and exit."],
                   ["mint-user-token", None, MintUserTokenOptions, "Print a new user token and exit."]]

    def postOptions(self) -> None:
        if self.subCommand is not None:
            key = signing_key(self["state-dir"])
            sub = self.subOptions
            if self.subCommand == "mint-cloud-token":
                token = mint_cloud_token(key, sub["account"], sub["region"], sub["analytics-index"],
                                         sub["lifetime"], sub["audience"])
            else:
                token = mint_user_token(key, sub["subject"], [p for p in sub["prefixes"].split(",") if p],
                                        sub["lifetime"])
            sys.stdout.write(token + "\n")
            sys.stdout.flush()
            raise SystemExit(0)
        if not self["port"]:
            raise usage.UsageError("--port is required (an ssl: endpoint)")
        try:
            self["poll-interval"] = float(self["poll-interval"])
        except ValueError:
            raise usage.UsageError("--poll-interval: expected seconds") from None


def makeService(options: Options) -> MultiService:
    from twisted.internet import reactor
    state_dir = options["state-dir"]
    key = signing_key(state_dir)
    store = Store(os.path.join(state_dir, "reports.sqlite"))
    published = Published(store, options["directory"], options["settings"],
                          None if options["no-user-keys"] else jwks_document(key), reactor)
    published.check()
    root = MultiService()
    PollingService(options["poll-interval"], published.check, "the published files").setServiceParent(root)
    site = Site(ControlPlaneApp(published, store, key, reactor).resource())
    site.noisy = False
    strport_service(options["port"], site).setServiceParent(root)
    Logger().info("control plane: key {kid}, state in {state_dir}", kid=key_id(key), state_dir=state_dir)
    return root


__all__ = ["ControlPlaneApp", "Options", "Published", "Store", "jwks_document", "key_id", "makeService",
           "mint_cloud_token", "mint_user_token", "signing_key"]
