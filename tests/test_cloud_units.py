"""
The hybrid link's pure parts and services without sockets: the cloud token's checks and its
region map, the retry delay, records, batching, the spool's bound, /sync versions and settings,
the /sync provider and the report sender against fake clients on a Clock, and the reference
control plane's app through treq's StubTreq.
"""

from __future__ import annotations

import gzip
import json
import os
import time
from typing import Any

import attrs
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from twisted_gateway import metrics
from twisted_gateway.cloud import controlplane
from twisted_gateway.cloud.link import backoff
from twisted_gateway.cloud.reports import (
    Batcher, ReportService, Spool, decode_batch, encode_batch, record_from_event, spool_path,
)
from twisted_gateway.cloud.sync import (
    SyncProvider, overlay, parse_settings, parse_version, read_sync_cache, write_sync_cache,
)
from twisted_gateway.cloud.token import (
    CloudIdentity, CloudTokenError, Credentials, base_url, expiry_state, key_set, load_credentials,
    verify_token,
)
from twisted_gateway.config import CloudConfig, ConfigError, GatewayConfig, load_config
from twisted_gateway.directory.interfaces import ShardDirectory

NOW = 1_800_000_000.0
KEY = ec.generate_private_key(ec.SECP256R1())
OTHER = ec.generate_private_key(ec.SECP256R1())


def token(key: Any = KEY, now: float = NOW, **claims: Any) -> str:
    body = {"account": "acme", "region": "eu", "analytics_index": "idx", "aud": "twisted-gateway",
            "iat": int(now), "exp": int(now + 3600), **claims}
    body = {k: v for k, v in body.items() if v is not None}
    return controlplane.jwt.encode(body, key, algorithm="ES256", headers={"kid": controlplane.key_id(key)})


def keys() -> dict:
    return key_set(json.dumps(controlplane.jwks_document(KEY)).encode())


def pem(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


# -- the token -------------------------------------------------------------------------------------

def test_key_set_reads_pem_keys_and_jwks():
    assert key_set(pem(KEY))[""][1] == "ES256"
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert key_set(pem(rsa_key))[""][1] == "RS256"
    assert list(keys()) == [controlplane.key_id(KEY)]
    for bad in (b"nonsense", b'{"keys": []}', pem(ec.generate_private_key(ec.SECP384R1()))):
        with pytest.raises(CloudTokenError):
            key_set(bad)


def test_a_good_token_gives_its_claims():
    checked = verify_token(token(), keys(), "twisted-gateway", 30, NOW, "t")
    assert (checked.account, checked.region, checked.analytics_index) == ("acme", "eu", "idx")
    assert checked.expires_at == NOW + 3600 and checked.key_id == controlplane.key_id(KEY)
    assert verify_token(token(), key_set(pem(KEY)), "twisted-gateway", 30, NOW, "t").account == "acme"


# Made when the test runs, not when it is collected: the keys are random, and pytest-xdist
# requires every worker to collect the same test ids.
BAD_TOKENS = {
    "other_key": (lambda: token(OTHER), "is signed with key"),
    "not_a_jwt": (lambda: "x.y.z", "is not a JWT"),
    "expired": (lambda: token(exp=int(NOW - 60)), "expired at 2027-01-15T07:59:00Z; mint a new one"),
    "audience": (lambda: token(aud="someone"), "is not a cloud token (its audience is not 'twisted-gateway')"),
    "no_index": (lambda: token(analytics_index=None), "lacks the 'analytics_index' claim"),
    "no_exp": (lambda: token(exp=None), "lacks the 'exp' claim"),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
def test_bad_tokens_are_refused_with_one_sentence(case):
    make, expected = BAD_TOKENS[case]
    raw = make()
    with pytest.raises(CloudTokenError) as e:
        verify_token(raw, keys(), "twisted-gateway", 30, NOW, "t")
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_a_tampered_token_fails_its_signature():
    header, payload, signature = token().split(".")
    forged = jwt.utils.base64url_encode(json.dumps({**jwt.decode(token(), options={"verify_signature": False}),
                                                    "account": "evil"}).encode()).decode()
    with pytest.raises(CloudTokenError, match="signature that does not verify"):
        verify_token(f"{header}.{forged}.{signature}", keys(), "twisted-gateway", 30, NOW, "t")
    # With one configured key, the kid is not even consulted.
    with pytest.raises(CloudTokenError, match="signature that does not verify"):
        verify_token(token(OTHER), key_set(pem(KEY)), "twisted-gateway", 30, NOW, "t")


def test_the_region_map_and_its_override():
    regions = {"eu": "https://eu.example", "us": "https://us.example"}
    assert base_url("eu", regions, None, "t") == "https://eu.example"
    assert base_url("us", regions, "https://override.example", "t") == "https://override.example"
    assert base_url("anything", {}, "https://override.example", "t") == "https://override.example"
    with pytest.raises(CloudTokenError, match=r"region 'mars', which is not in cloud.regions \(known: eu, us\)"):
        base_url("mars", regions, "https://override.example", "t")


def test_expiry_states():
    checked = verify_token(token(), keys(), "twisted-gateway", 30, NOW, "t")
    assert expiry_state(checked, NOW, 60) == "ok"
    assert expiry_state(checked, NOW + 3600 - 30, 60) == "expiring"
    assert expiry_state(checked, NOW + 3601, 60) == "expired"


def test_the_cloud_section_is_checked(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text("cloud:\n  token_file: tok\n")
    with pytest.raises(ConfigError, match="cloud.regions: a cloud token needs"):
        load_config(str(path))
    path.write_text("cloud:\n  token_file: tok\n  regions: {eu: http://plain.example}\n")
    with pytest.raises(ConfigError, match="expected an https:// URL"):
        load_config(str(path))
    path.write_text("cloud:\n  token_file: tok\n  url: https://cp.example/\n  ca_bundle: ca.pem\n")
    config = load_config(str(path))
    assert config.cloud.token_file == str(tmp_path / "tok") and config.cloud.ca_bundle == str(tmp_path / "ca.pem")
    assert config.cloud.url == "https://cp.example"
    path.write_text("cloud:\n  token_file: tok\n  url: https://cp.example\nlog:\n  access_log: false\n")
    with pytest.raises(ConfigError, match="cloud.reports: report records are made from the access log"):
        load_config(str(path))


def test_load_credentials_fetches_the_jwks_and_falls_back_to_its_copy(tmp_path):
    (tmp_path / "tok").write_text(token(now=time.time()))
    cloud = CloudConfig(token_file=str(tmp_path / "tok"), regions=(("eu", "https://eu.example"),))
    asked = []

    def fetch(url: str, ca: Any, timeout: float) -> bytes:
        asked.append(url)
        return json.dumps(controlplane.jwks_document(KEY)).encode()
    credentials = load_credentials(cloud, "gw.yaml", str(tmp_path), fetch=fetch)
    assert asked == ["https://eu.example/jwks.json"] and credentials.base_url == "https://eu.example"
    CloudIdentity(credentials, cloud, "gw.yaml", str(tmp_path), clock=Clock())  # keeps the JWKS

    def down(url: str, ca: Any, timeout: float) -> bytes:
        raise OSError("Connection refused")
    assert load_credentials(cloud, "gw.yaml", str(tmp_path), fetch=down).token.account == "acme"
    os.unlink(tmp_path / "cloud" / "jwks.json")
    with pytest.raises(ConfigError, match="could not be fetched \\(Connection refused\\) and no copy is kept"):
        load_credentials(cloud, "gw.yaml", str(tmp_path), fetch=down)
    with pytest.raises(ConfigError, match="cloud.token_file: cannot read .*missing: No such file"):
        load_credentials(attrs.evolve(cloud, token_file=str(tmp_path / "missing")), "gw.yaml", str(tmp_path))


def test_the_identity_reports_expiry_and_takes_a_new_token(tmp_path):
    clock = Clock()
    wall = [NOW]
    (tmp_path / "tok").write_text(token())
    cloud = CloudConfig(token_file=str(tmp_path / "tok"), regions=(("eu", "https://eu.example"),),
                        token_key=str(tmp_path / "key.pem"), expiry_warning=600)
    (tmp_path / "key.pem").write_bytes(pem(KEY))
    identity = CloudIdentity(load_credentials(cloud, "s", str(tmp_path), now=NOW), cloud, "s", str(tmp_path),
                             clock=clock, wall=lambda: wall[0])
    assert identity.readiness()["state"] == "ok"
    assert metrics.CLOUD_TOKEN_EXPIRY._value.get() == NOW + 3600
    wall[0] = NOW + 3200
    assert identity.readiness()["state"] == "expiring" and identity.readiness()["expires_in"] == 400
    (tmp_path / "tok").write_text(token(now=NOW + 3200))
    assert identity.reload(cloud, "s") is False  # expired by the real clock: load_credentials uses time.time()
    (tmp_path / "tok").write_text(token(now=time.time()))
    assert identity.reload(cloud, "s") is True
    (tmp_path / "tok").write_text("garbage")
    assert identity.reload(cloud, "s") is False and identity.token.account == "acme"


# -- retries, records, batches, the spool ---------------------------------------------------------------

def test_backoff_doubles_to_its_ceiling_with_jitter():
    assert [backoff(n, 0.5, 30, lambda a, b: b) for n in (1, 2, 3, 7, 8, 100)] == [0.5, 1, 2, 30, 30, 30]
    assert [backoff(n, 0.5, 30, lambda a, b: a) for n in (1, 7)] == [0.25, 15]


def test_records_copy_only_their_fields():
    event = {"event_kind": "http_access", "log_time": 5.0, "client": "10.0.0.1", "method": "GET",
             "path": "/a", "status": 200, "shard": "web", "port": 80, "bytes": 12, "duration": 0.1234567,
             "token": "secret", "authorization": "Bearer x", "cookie": "a=b"}
    assert record_from_event(event) == {"kind": "request", "time": 5.0, "client": "10.0.0.1", "method": "GET",
                                        "path": "/a", "status": 200, "shard": "web", "port": 80,
                                        "bytes_down": 12, "duration": 0.123457}
    assert record_from_event({"event_kind": "access", "outcome": "tcp", "log_time": 1})["kind"] == "connection"
    assert record_from_event({"event_kind": "listening"}) is None
    assert record_from_event({"log_format": "hello"}) is None


def test_batches_are_sealed_by_size_and_by_time():
    clock = Clock()
    sealed: list[list] = []
    batcher = Batcher(clock, 3, 1.0, sealed.append)
    for i in range(7):
        batcher.add({"n": i})
    assert [[r["n"] for r in b] for b in sealed] == [[0, 1, 2], [3, 4, 5]]
    clock.advance(0.9)
    assert len(sealed) == 2
    clock.advance(0.1)
    assert [r["n"] for r in sealed[2]] == [6]
    clock.advance(10)
    assert len(sealed) == 3  # nothing open: no empty batch
    data = encode_batch({"batch_id": "b"}, [{"n": 1}])
    assert decode_batch(data) == {"batch_id": "b", "records": [{"n": 1}]}


def test_the_spool_drops_the_oldest_when_full_and_keeps_order(tmp_path):
    spool = Spool(str(tmp_path / "spool"), 300)
    put = [spool.put(f"{i:032x}", 1, b"x" * 100, now_ns=1000 + i) for i in range(3)]
    assert [b.batch_id for b, _ in put] == [f"{i:032x}" for i in range(3)] and spool.size == 300
    batch, dropped = spool.put(f"{3:032x}", 1, b"x" * 150, now_ns=1)  # an earlier clock: still after
    assert [d.batch_id for d in dropped] == [f"{0:032x}", f"{1:032x}"]
    assert [b.batch_id for b in spool.batches] == [f"{2:032x}", f"{3:032x}"] and spool.size == 250
    # The batch in flight is never dropped under its sender.
    in_flight = spool.oldest()
    _, dropped = spool.put(f"{4:032x}", 1, b"x" * 150, keep=in_flight)
    assert [d.batch_id for d in dropped] == [f"{3:032x}"] and spool.oldest() == in_flight
    assert spool.put(f"{5:032x}", 1, b"x" * 301) == (None, [])  # larger than the whole spool
    again = Spool(str(tmp_path / "spool"), 300)  # a restart: the same batches, the same order
    assert [b.batch_id for b in again.batches] == [f"{2:032x}", f"{4:032x}"]
    assert again.read(again.oldest()) == b"x" * 100
    assert spool_path("s", None).endswith(os.path.join("cloud", "spool"))
    assert spool_path("s", 3).endswith("spool-worker-3")


# -- /sync versions and settings ---------------------------------------------------------------------------

SHARD = {"id": "web", "task": "t/web", "hostname_label": "web", "address": "127.0.0.1", "primary": True,
         "key_begin": 0, "rclock_begin": 0, "ports": [{"port": 80, "protocol": "http/1.1", "public": True}]}


def test_versions_are_checked_as_a_whole():
    version = parse_version({"version": 3, "published_at": 10, "directory": {"shards": [SHARD]},
                             "settings": {"limits": {"request_rate_per_ip": 5}}}, '"3"')
    assert version.version == 3 and len(version.snapshot) == 1 and version.checked.limits == {"request_rate_per_ip": 5.0}
    with pytest.raises(ValueError, match="protocol"):
        parse_version({"version": 4, "directory": {"shards": [{**SHARD, "ports": [{"port": 80, "protocol": "x"}]}]}}, None)
    with pytest.raises(ConfigError, match="settings.limits.request_rate_per_ip: expected a number"):
        parse_version({"version": 4, "settings": {"limits": {"request_rate_per_ip": "fast"}}}, None)
    with pytest.raises(ConfigError, match="settings.limits.nonsense: unknown key"):
        parse_settings({"limits": {"nonsense": 1}})
    with pytest.raises(ConfigError, match="settings.auth.jwks"):
        parse_settings({"auth": {"jwks": {"keys": []}}})
    with pytest.raises(ValueError, match="version"):
        parse_version({"version": "three"}, None)


def test_settings_lay_over_the_file_configuration():
    base = GatewayConfig()
    settings = parse_settings({"auth": {"jwks": controlplane.jwks_document(KEY), "signin_url": "https://in.example"},
                               "limits": {"max_connections": 7}})
    new = overlay(attrs.evolve(base, auth=attrs.evolve(base.auth, jwt_secret="s")), settings)
    assert new.limits.max_connections == 7 and new.auth.signin_url == "https://in.example"
    assert new.auth.jwt_secret is None and new.limits.max_headers == base.limits.max_headers


def test_the_cache_is_the_redis_layout_plus_etag_and_settings(tmp_path):
    from twisted_gateway.directory.redis import read_cache
    version = parse_version({"version": 9, "published_at": 1.5, "directory": {"shards": [SHARD]},
                             "settings": {"limits": {"max_headers": 50}}}, '"9"')
    path = str(tmp_path / "cache.json")
    write_sync_cache(path, version)
    assert read_cache(path)[0] == 9
    again = read_sync_cache(path)
    assert again == version and again.checked.limits == {"max_headers": 50}


# -- the provider and the sender against fake clients -------------------------------------------------------

class FakeResponse:
    def __init__(self, code: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.code = code
        self.body = body
        self.headers = Headers({k: [v] for k, v in (headers or {}).items()})

    def content(self) -> Deferred[bytes]:
        return succeed(self.body)

    @property
    def length(self) -> int:
        return len(self.body)

    def deliverBody(self, protocol: Any) -> None:
        from twisted.web.client import ResponseDone
        protocol.makeConnection(None)
        if self.body:
            protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))


class FakeClient:
    """Answers each request with the next of C{answers} (a response, an exception, or None:
    a Deferred the test fires), recording the requests."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict]] = []
        self.answers: list[Any] = []
        self.pending: list[Deferred[Any]] = []

    def _answer(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        self.requests.append((method, url, kwargs))
        answer = self.answers.pop(0) if self.answers else None
        if answer is None:
            d: Deferred[Any] = Deferred()
            self.pending.append(d)
            return d
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(answer)

    def get(self, url: str, **kwargs: Any) -> Deferred[Any]:
        return self._answer("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> Deferred[Any]:
        return self._answer("POST", url, **kwargs)


def identity(tmp_path: Any) -> CloudIdentity:
    checked = verify_token(token(now=time.time()), keys(), "twisted-gateway", 30, time.time(), "t")
    return CloudIdentity(Credentials(checked, "https://cp.example", keys(), None),
                         CloudConfig(token_file="t", url="https://cp.example"), "s", str(tmp_path), clock=Clock())


def sync_answer(version: int, shards: list, settings: dict | None = None) -> FakeResponse:
    return FakeResponse(200, json.dumps({"version": version, "published_at": time.time(),
                                         "directory": {"shards": shards}, "settings": settings}).encode(),
                        {"etag": f'"{version}"'})


def test_the_sync_provider_publishes_refuses_and_backs_off(tmp_path):
    clock, client, directory = Clock(), FakeClient(), ShardDirectory()
    settings_seen = []
    provider = SyncProvider(identity(tmp_path), directory, CloudConfig(retry_initial=1, retry_max=4),
                            str(tmp_path), clock, on_settings=lambda s, v: settings_seen.append((v, s)),
                            client=client, uniform=lambda a, b: b)
    client.answers = [sync_answer(1, [SHARD]), FakeResponse(304)]
    provider.startService()
    clock.advance(0)
    assert directory.loaded() and len(directory.current()) == 1 and provider.state == "up"
    assert [v for v, _ in settings_seen] == [1]
    first, second = client.requests[0][2], client.requests[1][2]
    assert first["params"] == {"wait": "0"} and b"If-None-Match" not in first["headers"]
    assert second["headers"][b"If-None-Match"] == [b'"1"'] and second["params"] == {"wait": "25"}
    assert first["headers"][b"Authorization"][0].startswith(b"Bearer ey")
    clock.advance(0)
    # A bad version: refused, the last good stays, and the next poll names the refused one.
    bad = dict(SHARD, ports=[{"port": 80, "protocol": "gopher"}])
    client.answers = [sync_answer(2, [bad])]
    client.pending.pop(0).callback(FakeResponse(304)) if client.pending else None
    clock.advance(0)
    assert len(directory.current()) == 1 and provider.applied.version == 1
    assert "version 2 refused" in provider.readiness()["problem"]
    # What /api/v1/providers shows of it.
    from twisted_gateway.directory.interfaces import IProviderStatus
    status = IProviderStatus(provider).status()
    assert (status["kind"], status["state"], status["version"], status["shards"]) == ("cloud", "error", 1, 1)
    assert status["source"].endswith("/sync") and "version 2 refused" in status["last_error"]
    clock.advance(0)
    assert client.requests[-1][2]["headers"][b"If-None-Match"] == [b'"2"']
    # The control plane goes away: retried after 1, 2, 4 seconds (then 4: the ceiling).
    for _ in range(4):
        client.answers.append(ConnectionRefusedError())
    client.pending.pop(0).callback(FakeResponse(304)) if client.pending else None
    clock.advance(0)
    count = len(client.requests)
    delays = []
    for _ in range(3):
        before = len(client.requests)
        waited = 0.0
        while len(client.requests) == before:
            clock.advance(0.5)
            waited += 0.5
        delays.append(waited)
    assert provider.state == "down" and delays == [1.0, 2.0, 4.0] and count > 3
    assert provider.status()["state"] in ("degraded", "error")
    provider.stopService()
    # A restart routes from the cache, before any answer.
    again = ShardDirectory()
    SyncProvider(identity(tmp_path), again, CloudConfig(), str(tmp_path), Clock(), client=FakeClient()).startService()
    assert again.loaded() and len(again.current()) == 1


def test_the_sender_sends_in_order_retries_and_drops_rejected_batches(tmp_path):
    clock, client = Clock(), FakeClient()
    service = ReportService(identity(tmp_path), CloudConfig(batch_records=2, batch_interval=1, retry_initial=1,
                                                            retry_max=1, flush_timeout=0),
                            str(tmp_path), clock, client=client, publisher=FakePublisher(), uniform=lambda a, b: b)
    service.startService()
    for i in range(4):
        service.observe({"event_kind": "http_access", "path": f"/{i}", "log_time": 1.0})
    # The first batch in flight, the second waiting in the spool.
    assert len(client.requests) == 1 and len(service.spool) == 2
    method, url, kwargs = client.requests[0]
    assert (method, url) == ("POST", "https://cp.example/reports")
    assert kwargs["headers"][b"Content-Encoding"] == [b"gzip"]
    body = json.loads(gzip.decompress(kwargs["data"]))
    assert kwargs["headers"][b"X-Batch-Id"] == [body["batch_id"].encode()]
    assert [r["path"] for r in body["records"]] == ["/0", "/1"] and body["account"] == "acme"
    client.pending.pop(0).errback(ConnectionRefusedError())
    assert len(client.requests) == 1 and service.readiness()["state"] == "down"
    clock.advance(1)
    assert json.loads(gzip.decompress(client.requests[1][2]["data"]))["batch_id"] == body["batch_id"]  # the same one
    client.pending.pop(0).callback(FakeResponse(200, b"{}"))
    assert len(service.spool) == 1
    client.pending.pop(0).callback(FakeResponse(400, b"bad"))
    assert len(service.spool) == 0
    assert [r["path"] for r in json.loads(gzip.decompress(client.requests[2][2]["data"]))["records"]] == ["/2", "/3"]
    # SIGTERM: the open batch goes to the spool.
    service.observe({"event_kind": "http_access", "path": "/4", "log_time": 1.0})
    client.answers = [ConnectionRefusedError()]
    service.stopService()
    assert len(Spool(service.spool.path, 10 ** 6)) == 1


class FakePublisher:
    def addObserver(self, observer: Any) -> None:
        pass

    def removeObserver(self, observer: Any) -> None:
        pass


# -- the reference control plane's app ------------------------------------------------------------------------

def test_the_control_plane_app_long_polls_and_stores_each_batch_once(tmp_path):
    from treq.testing import StubTreq
    clock = Clock()
    store = controlplane.Store(str(tmp_path / "db.sqlite"))
    directory = tmp_path / "shards.yaml"
    directory.write_text(json.dumps({"shards": [SHARD]}))
    published = controlplane.Published(store, str(directory), None, None, clock)
    published.check()
    app = controlplane.ControlPlaneApp(published, store, KEY, clock)
    stub = StubTreq(app.resource())
    auth = {"Authorization": f"Bearer {token(now=time.time())}"}

    def call(d: Deferred[Any]) -> Any:
        out: list[Any] = []
        d.addBoth(out.append)
        stub.flush()
        return out[0] if out else None
    answer = call(stub.get("https://cp/sync", headers=auth))
    assert answer.code == 200 and answer.headers.getRawHeaders("etag") == ['"1"']
    assert call(stub.get("https://cp/sync")).code == 401
    waiting = stub.get("https://cp/sync?wait=20", headers={**auth, "If-None-Match": '"1"'})
    got: list[Any] = []
    waiting.addBoth(got.append)
    stub.flush()
    assert not got
    directory.write_text(json.dumps({"shards": []}))
    os.utime(directory, ns=(time.time_ns() + 10 ** 9, time.time_ns() + 10 ** 9))
    published.check()
    stub.flush()
    assert got and got[0].code == 200 and got[0].headers.getRawHeaders("etag") == ['"2"']
    batch = {"batch_id": "b1", "records": [{"id": "g-1", "seq": 1, "kind": "request"}]}
    headers = {**auth, "X-Batch-Id": "b1", "Content-Encoding": "gzip"}
    for duplicate in (False, True):
        response = call(stub.post("https://cp/reports", data=gzip.compress(json.dumps(batch).encode()),
                                  headers=headers))
        assert response.code == 200
        assert json.loads(call(response.content()))["duplicate"] is duplicate
    assert store.db.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 1
    assert call(stub.post("https://cp/reports", data=b"junk", headers=headers)).code == 400
    jwks = json.loads(call(call(stub.get("https://cp/jwks.json")).content()))
    assert jwks["keys"][0]["kid"] == controlplane.key_id(KEY)
