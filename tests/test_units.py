"""Unit tests without sockets: configuration, error pages, the admin app and the splice."""

from __future__ import annotations

import json
import os

import pytest
from treq.testing import StubTreq
from twisted.internet.testing import MemoryReactorClock, StringTransport

from twisted_gateway import metrics
from twisted_gateway.admin import AdminApp
from twisted_gateway.config import ConfigError, load_config
from twisted_gateway.directory.model import Route, Shard, ShardPort
from twisted_gateway.http.errors import negotiate, render_error
from twisted_gateway.logs import redact
from twisted_gateway.splice import Splice

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- configuration -------------------------------------------------------------------------------

def write(tmp_path, text):
    p = tmp_path / "gateway.yaml"
    p.write_text(text)
    return str(p)


def test_defaults():
    c = load_config(None)
    assert (c.hostname, c.listen.tls, c.listen.plain) == ("localhost", "tcp:28318", "tcp:28317")
    assert c.tls.certificate is None and c.directory.file is None


def test_flags_override_file_and_paths_are_relative_to_the_file(tmp_path):
    path = write(tmp_path, "hostname: GW.Example.com.\ndirectory: {file: shards.yaml}\nlisten: {tls: 443}\n")
    c = load_config(path, {"listen.plain": "9000", "log.level": "debug"})
    assert c.hostname == "gw.example.com"
    assert c.directory.file == str(tmp_path / "shards.yaml")
    assert c.listen.tls == "tcp:443" and c.listen.plain == "tcp:9000"
    assert c.log.level == "debug"


@pytest.mark.parametrize("text, message", [
    ("tls: {handshake_timeot: 3}\n", "tls.handshake_timeot: unknown key"),
    ("tls: {handshake_timeout: -1}\n", "tls.handshake_timeout: expected a positive number, got -1"),
    ("hostname: 'bad name'\n", "hostname: 'bad name' is not a DNS name"),
    ("listen: {tls: nonsense}\n", "listen.tls: 'nonsense' is neither a port number"),
    ("log: {format: xml}\n", "log.format: expected one of text, json"),
    ("tls: {certificate: a.pem}\n", "tls.private_key: tls.certificate and tls.private_key must be set together"),
    ("tls: [1, 2]\n", "tls: expected a mapping"),
    ("- 1\n", "expected a mapping at the top level"),
    ("a: [\n", "line 2: not valid YAML"),
])
def test_config_errors_name_file_key_and_problem(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(path + ": ")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_example_configuration_in_etc_is_valid():
    c = load_config(os.path.join(REPO, "etc", "gateway.yaml"))
    assert c.directory.file == os.path.join(REPO, "etc", "shards.yaml")


# -- error pages and redaction ---------------------------------------------------------------------

def test_accept_negotiation():
    assert negotiate(None) == "text"
    assert negotiate("application/json") == "json"
    assert negotiate("text/html,application/xhtml+xml,*/*;q=0.8") == "html"
    assert negotiate("text/html;q=0.1, application/json") == "json"
    assert negotiate("image/png") == "text"
    content_type, body = render_error(404, "unknown_shard", "no <shard>", "text/html")
    assert content_type.startswith(b"text/html") and b"no &lt;shard&gt;" in body
    assert json.loads(render_error(503, "no_primary", "x", "application/json")[1]) == {
        "error": "no_primary", "message": "x", "status": 503}


def test_redaction():
    assert "abc.def" not in redact("Authorization: Bearer abc.def")
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.sig"
    assert jwt not in redact(f"token in {jwt} here")
    assert "s3cret" not in redact("cookie=s3cret; other")


# -- admin app --------------------------------------------------------------------------------------

def test_admin_app_readiness_and_metrics():
    state = {"ready": False}
    app = AdminApp(lambda: (state["ready"], {"reasons": [] if state["ready"] else ["not yet"]}))
    treq = StubTreq(app.resource())

    def get(path):
        response = treq.get(f"http://admin{path}")
        treq.flush()
        result = []
        response.addCallback(lambda r: r.content().addCallback(lambda body: result.append((r.code, body))))
        treq.flush()
        return result[0]
    assert get("/healthz") == (200, b"ok\n")
    code, body = get("/readyz")
    assert code == 503 and json.loads(body)["reasons"] == ["not yet"]
    state["ready"] = True
    assert get("/readyz")[0] == 200
    code, body = get("/metrics")
    assert code == 200 and b"gateway_connections_active" in body


# -- splice -------------------------------------------------------------------------------------

class HalfCloseTransport(StringTransport):
    def __init__(self):
        super().__init__()
        self.write_closed = False
        self.paused = False

    def loseWriteConnection(self):
        self.write_closed = True

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False


def _splice(reactor, idle=60.0):
    shard = Shard(id="s", task="t", hostname_label="db", address="127.0.0.1",
                  ports=(ShardPort(5432, "tcp", True, 15432),), primary=True)
    failures = []
    sp = Splice(Route(shard, shard.ports[0]), reactor, 5.0, idle, failures.append)
    sp.connect()
    return sp, failures


def _connect_upstream(reactor, sp):
    host, port, factory, timeout, _ = reactor.tcpClients[-1]
    assert (host, port, timeout) == ("127.0.0.1", 15432, 5.0)
    upstream = factory.buildProtocol(None)
    t = HalfCloseTransport()
    upstream.makeConnection(t)
    return upstream, t


def test_splice_buffers_until_upstream_then_relays_and_half_closes():
    reactor = MemoryReactorClock()
    sp, _ = _splice(reactor)
    client_t = HalfCloseTransport()
    sp.client.makeConnection(client_t)
    assert not client_t.paused, "a client that has sent nothing yet is not paused (a pause is two epoll_ctl)"
    sp.client.dataReceived(b"early")
    assert client_t.paused, "a client that sends before the shard answers is held: one read is buffered"
    upstream, up_t = _connect_upstream(reactor, sp)
    assert up_t.value() == b"early" and not client_t.paused
    assert client_t.producer is up_t and up_t.producer is client_t
    upstream.dataReceived(b"reply")
    assert client_t.value() == b"reply"
    # Client EOF half-closes the upstream; the upstream's reply still flows back.
    sp.client.readConnectionLost()
    assert up_t.write_closed and not up_t.disconnecting
    upstream.dataReceived(b"late reply")
    assert client_t.value() == b"replylate reply"
    upstream.readConnectionLost()
    assert client_t.write_closed
    assert client_t.disconnecting and up_t.disconnecting
    assert client_t.producer is None and up_t.producer is None, "each side let go of the other before closing"
    assert (sp.bytes_up, sp.bytes_down) == (5, 15)


def test_splice_holds_a_shard_that_speaks_before_the_client_is_ready():
    reactor = MemoryReactorClock()
    sp, _ = _splice(reactor)
    upstream, up_t = _connect_upstream(reactor, sp)
    assert not up_t.paused
    upstream.dataReceived(b"preface")  # an h2 server's SETTINGS, before the client's handshake ends
    assert up_t.paused, "the shard is held until the client is there: one read is buffered"
    client_t = HalfCloseTransport()
    sp.client.makeConnection(client_t)
    assert client_t.value() == b"preface" and not up_t.paused


def test_splice_upstream_refused_counts_and_reports():
    from twisted.internet.error import ConnectionRefusedError
    from twisted.python.failure import Failure
    reactor = MemoryReactorClock()
    before = metrics.UPSTREAM_CONNECT_FAILURES.labels(reason="refused")._value.get()
    sp, failures = _splice(reactor)
    factory = reactor.tcpClients[-1][2]
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    assert failures == ["refused"]
    assert metrics.UPSTREAM_CONNECT_FAILURES.labels(reason="refused")._value.get() == before + 1
    client_t = HalfCloseTransport()
    sp.client.makeConnection(client_t)
    assert client_t.disconnecting


def test_splice_idle_timeout():
    reactor = MemoryReactorClock()
    sp, _ = _splice(reactor, idle=10.0)
    client_t = HalfCloseTransport()
    sp.client.makeConnection(client_t)
    upstream, up_t = _connect_upstream(reactor, sp)
    for _ in range(8):
        reactor.advance(2.5)
        sp.client.dataReceived(b"x")  # activity keeps it open
    assert not client_t.disconnecting
    reactor.advance(2.5)
    reactor.advance(2.5)
    reactor.advance(2.5)
    reactor.advance(2.5)
    reactor.advance(2.5)
    assert client_t.disconnecting and up_t.disconnecting


# -- ACME pieces ----------------------------------------------------------------------------------

def test_tls_alpn_challenge_certificate_follows_rfc_8737():
    import hashlib
    from cryptography import x509
    from twisted_gateway.tls.acme.responders import ACME_IDENTIFIER_OID, tls_alpn_certificate
    cert, _ = tls_alpn_certificate("a-1.example.com", "token.thumbprint")
    ext = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    assert ext.critical
    assert ext.value.value == b"\x04\x20" + hashlib.sha256(b"token.thumbprint").digest()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a-1.example.com"]


def test_token_bucket_limits_and_refills():
    from twisted_gateway.limits import TokenBucket
    now = [0.0]
    bucket = TokenBucket(rate=6 / 60, burst=2, clock=lambda: now[0])
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    assert bucket.wait() == pytest.approx(10.0)
    now[0] += 10  # 6 per minute: one token per 10 s
    assert bucket.take() and not bucket.take()
    now[0] += 1000
    assert bucket.full(now[0]) and bucket.take() and bucket.take() and not bucket.take()


def test_rate_limiter_keeps_one_bucket_per_key_and_forgets_quiet_ones():
    from twisted_gateway.limits import RateLimiter
    now = [0.0]
    limiter = RateLimiter(rate=1.0, burst=2, clock=lambda: now[0], max_keys=2)
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, pytest.approx(1.0)]
    assert limiter.take("b") == 0.0
    now[0] += 0.5
    assert limiter.take("a") == pytest.approx(0.5)  # half a token back: half a second to go
    now[0] += 10  # both full again: a third key forgets them instead of growing the table
    assert limiter.take("c") == 0.0 and set(limiter._buckets) == {"c"}
    assert RateLimiter(0, 0, lambda: 0.0).take("x") == 0.0  # rate 0: off


def test_acme_on_demand_uses_the_shared_bucket_per_minute():
    from twisted.internet.task import Clock
    from twisted_gateway.limits import TokenBucket
    from twisted_gateway.tls.acme.manager import AcmeCertificateSource

    class Config:
        on_demand_rate = 6.0
        check_interval = 60.0
    clock = Clock()
    source = AcmeCertificateSource(clock, None, None, None, Config(), "gw.test", lambda name: True)
    assert isinstance(source._bucket, TokenBucket)
    assert source._bucket.rate == pytest.approx(0.1) and source._bucket.burst == 6.0


# -- timers: the directory and certificate pollers ---------------------------------------------

def _directory_file(path, label):
    import yaml
    with open(path, "w") as f:
        yaml.safe_dump({"shards": [{"id": label, "task": f"tasks/{label}", "hostname_label": label,
                                    "address": "127.0.0.1", "primary": True,
                                    "ports": [{"port": 9000, "public": True}]}]}, f)


def test_directory_poller_applies_a_new_interval_while_running(tmp_path):
    from twisted.internet.task import Clock
    from twisted_gateway.directory.file import FileDirectoryProvider
    from twisted_gateway.directory.interfaces import ShardDirectory
    path = str(tmp_path / "shards.yaml")
    _directory_file(path, "alpha")
    clock, directory = Clock(), ShardDirectory()
    provider = FileDirectoryProvider(path, directory, interval=60.0, clock=clock)
    stats = []
    real_stat = provider._stat
    provider._stat = lambda: stats.append(clock.seconds()) or real_stat()
    provider.startService()
    assert directory.loaded() and stats == [0.0]  # first check at once
    clock.advance(30)
    provider.interval = 1.0  # what a reload assigns: takes effect now, not after 60 s
    assert provider.interval == 1.0 and stats == [0.0, 30.0]
    clock.advance(1)
    clock.advance(1)
    assert stats == [0.0, 30.0, 31.0, 32.0]
    provider.set_interval(1.0)  # unchanged: no extra check
    assert stats == [0.0, 30.0, 31.0, 32.0]
    provider.stopService()
    assert not clock.getDelayedCalls()
    provider.set_interval(5.0)  # stopped: remembered for the next start
    provider.startService()
    clock.advance(5)
    assert stats[-2:] == [32.0, 37.0]
    provider.stopService()


def test_directory_poller_logs_an_unexpected_error_and_keeps_polling(tmp_path):
    from twisted.internet.task import Clock
    from twisted.logger import globalLogPublisher
    from twisted_gateway.directory.file import FileDirectoryProvider
    from twisted_gateway.directory.interfaces import ShardDirectory
    path = str(tmp_path / "shards.yaml")
    _directory_file(path, "alpha")
    clock, directory = Clock(), ShardDirectory()
    provider = FileDirectoryProvider(path, directory, interval=1.0, clock=clock)
    calls = []

    def broken_stat():
        calls.append(clock.seconds())
        if len(calls) == 2:
            raise RuntimeError("surprise")
        return None
    provider._stat = broken_stat
    failures = []
    observer = failures.append
    globalLogPublisher.addObserver(observer)
    try:
        provider.startService()
        clock.advance(1)
        clock.advance(1)
    finally:
        globalLogPublisher.removeObserver(observer)
        provider.stopService()
    assert calls == [0.0, 1.0, 2.0]
    assert any(e.get("log_failure") is not None and "surprise" in str(e["log_failure"].value)
               for e in failures)


def test_certificate_watcher_checks_on_its_interval_and_applies_a_new_one(tmp_path):
    from twisted.internet.task import Clock
    from twisted_gateway.tls.contexts import StaticFileSource
    from twisted_gateway.tls.localca import LocalCA
    ca = LocalCA(str(tmp_path / "ca"))
    cert, key = str(tmp_path / "gw.pem"), str(tmp_path / "gw.key")
    first = ca.write_leaf(("gw.test",), cert, key)
    clock = Clock()
    source = StaticFileSource(cert, key, interval=10.0, clock=clock)
    source.startService()
    assert source.pair.certificate == first.certificate
    second = ca.write_leaf(("gw.test", "other.test"), cert, key)
    clock.advance(9)
    assert source.pair.certificate == first.certificate
    clock.advance(1)
    assert source.pair.certificate == second.certificate
    source.set_interval(0.5)
    third = ca.write_leaf(("gw.test",), cert, key)
    clock.advance(0.5)
    assert source.interval == 0.5 and source.pair.certificate == third.certificate
    source.stopService()
    assert not clock.getDelayedCalls()


# -- Twisted's chatter ----------------------------------------------------------------------------

def test_observer_drops_twisted_factory_and_port_chatter_at_every_level():
    import io
    from twisted.internet import tcp
    from twisted.internet.protocol import Factory, Protocol
    from twisted.logger import Logger, globalLogPublisher
    from twisted.python import log as legacy
    from twisted_gateway.logs import is_twisted_chatter, make_observer
    out = io.StringIO()
    observer = make_observer("json", "debug", out)
    everything: list[dict] = []
    globalLogPublisher.addObserver(observer)
    globalLogPublisher.addObserver(everything.append)
    try:
        # Twisted's own lines, as its code writes them: a factory started and stopped, a real
        # port listening on 127.0.0.1 and closed.
        factory = Factory.forProtocol(Protocol)
        port = tcp.Port(0, factory, interface="127.0.0.1", reactor=MemoryReactorClock())
        port.startListening()
        number = port.getHost().port
        port.connectionLost(None)
        legacy.msg(f"Factory starting on {number} is not the whole line, so it stays")
        Logger(namespace="twisted_gateway.test").info("tls listener on 127.0.0.1:{port}", port=number)
    finally:
        globalLogPublisher.removeObserver(everything.append)
        globalLogPublisher.removeObserver(observer)
    # Twisted did say it all (starting/stopping factory, starting on, Port Closed)...
    assert sum(is_twisted_chatter(e) for e in everything) == 4
    # ...and the observer let through only the rest.
    messages = [json.loads(line)["message"] for line in out.getvalue().splitlines()]
    assert messages == [f"Factory starting on {number} is not the whole line, so it stays",
                        f"tls listener on 127.0.0.1:{number}"]


def test_disk_store_round_trip_and_corruption(tmp_path):
    from twisted_gateway.tls.acme.store import DiskCertificateStore
    from twisted_gateway.tls.localca import LocalCA
    ca = LocalCA(str(tmp_path / "ca"))
    store = DiskCertificateStore(str(tmp_path / "state"))
    pair = ca.issue(("*.gw.test", "gw.test"))
    from cryptography.hazmat.primitives import serialization
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in pair.chain)
    key = pair.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    store.save(("*.gw.test", "gw.test"), chain, key)
    key_file = tmp_path / "state" / "acme" / "certificates" / "_wildcard.gw.test.key"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    loaded = DiskCertificateStore(str(tmp_path / "state")).load_all()
    assert [s.names for s in loaded] == [("*.gw.test", "gw.test")]
    (tmp_path / "state" / "acme" / "certificates" / "_wildcard.gw.test.pem").write_text("junk")
    store2 = DiskCertificateStore(str(tmp_path / "state"))
    assert store2.load_all() == [] and store2.corrupted == ["*.gw.test"]


# -- h2 proxy flow control -----------------------------------------------------------------------

def test_h2_pipe_sends_within_windows_and_acknowledges_only_what_it_sent():
    import h2.config
    import h2.connection
    import h2.events

    from twisted_gateway.http.h2.flow import H2Peer, Pipe

    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    peer = H2Peer()
    peer.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    transport = StringTransport()
    peer.makeConnection(transport)
    peer.h2.initiate_connection()
    client.initiate_connection()
    client.send_headers(1, [(":method", "GET"), (":path", "/"), (":scheme", "https"),
                            (":authority", "x")], end_stream=True)
    peer.h2.receive_data(client.data_to_send())
    client.receive_data(peer.h2.data_to_send())

    consumed: list[int] = []
    peer.h2.send_headers(1, [(":status", "200")])
    pipe = Pipe(peer, 1, consumed.append)
    pipe.push(b"x" * 100_000, 100_010)  # ten bytes of padding
    peer.flush()
    # The client's default window is 65535: that much is sent and acknowledged, no more.
    assert sum(consumed) == 65535 and pipe.held == 100_000 - 65535
    received = [e for e in client.receive_data(transport.value()) if isinstance(e, h2.events.DataReceived)]
    assert sum(len(e.data) for e in received) == 65535
    transport.clear()

    # The socket is full: a window update alone sends nothing.
    peer.pauseProducing()
    client.acknowledge_received_data(65535, 1)
    for event in peer.h2.receive_data(client.data_to_send()):
        if isinstance(event, h2.events.WindowUpdated):
            peer.pump_stream(event.stream_id)
    assert sum(consumed) == 65535
    # Writable again: the rest goes, padding acknowledged with the last byte, then the end.
    peer.resumeProducing()
    pipe.finish()
    peer.flush()
    assert sum(consumed) == 100_010 and pipe.done and 1 not in peer.pipes
    events = client.receive_data(transport.value())
    assert sum(len(e.data) for e in events if isinstance(e, h2.events.DataReceived)) == 100_000 - 65535
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)


def test_h2_pipe_gives_back_the_window_of_what_it_drops():
    import h2.config
    import h2.connection

    from twisted_gateway.http.h2.flow import H2Peer, Pipe

    peer = H2Peer()
    peer.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    peer.makeConnection(StringTransport())
    peer.pauseProducing()
    consumed: list[int] = []
    pipe = Pipe(peer, 1, consumed.append)
    pipe.push(b"abc", 3)
    pipe.push(b"defg", 8)
    assert consumed == []
    pipe.abandon()  # the stream it was going to was reset
    assert consumed == [11] and pipe.done
    pipe.push(b"late", 4)
    assert consumed == [11, 4]


# -- ACME state shared by worker processes ---------------------------------------------------------

def test_issuer_lock_is_held_by_one_holder_until_released(tmp_path):
    from twisted_gateway.tls.acme.shared import IssuerLock
    first, second = IssuerLock(str(tmp_path)), IssuerLock(str(tmp_path))
    assert first.acquire() and first.held
    assert not second.acquire() and not second.held
    assert first.acquire()  # holding it is idempotent
    first.release()
    assert second.acquire()


def test_challenge_board_lets_another_process_answer(tmp_path):
    from OpenSSL import SSL

    from twisted_gateway.tls.acme.responders import HTTP01Responder, TLSALPN01Responder
    from twisted_gateway.tls.acme.shared import ChallengeBoard

    class Challenge:
        def encode(self, field):
            return "tok-123"
    issuer_http, other_http = HTTP01Responder(ChallengeBoard(str(tmp_path))), HTTP01Responder(ChallengeBoard(str(tmp_path)))
    issuer_http.present("a.test", Challenge(), "tok-123.thumb", None)
    assert other_http.answer("tok-123") == "tok-123.thumb"
    assert other_http.answer("../../etc/passwd") is None
    issuer_http.cleanup("a.test", Challenge(), "tok-123.thumb", None)
    assert other_http.answer("tok-123") is None

    issuer_alpn, other_alpn = TLSALPN01Responder(ChallengeBoard(str(tmp_path))), TLSALPN01Responder(ChallengeBoard(str(tmp_path)))
    assert other_alpn.context_for("b.test") is None
    issuer_alpn.present("b.test", None, "keyauth-1", None)
    ctx = other_alpn.context_for("b.test")
    assert isinstance(ctx, SSL.Context) and other_alpn.context_for("b.test") is ctx  # built once
    issuer_alpn.cleanup("b.test", None, "keyauth-1", None)
    assert other_alpn.context_for("b.test") is None

    board = ChallengeBoard(str(tmp_path))
    board.request("c-9000.test")
    board.request("*.wild.test")
    assert sorted(board.take_requests()) == ["*.wild.test", "c-9000.test"]
    assert board.take_requests() == []


def test_h2_replay_copies_are_bounded_per_stream_and_connection():
    from twisted_gateway.http.h2.stream import ShardStream
    from twisted_gateway.http.policy import RequestState

    class NoBodyLimit:
        def max_body(self, route):
            return 0

    class Front:
        replay_held = 0
        acked: list[int] = []
        ctx = NoBodyLimit()
        route = None

        def ack(self, stream_id, size):
            self.acked.append(size)
    front = Front()
    exchanges = [ShardStream(front, sid, RequestState(b"POST", b"/", b"x", "2", "?")) for sid in (1, 3, 5, 7, 9)]
    chunk = b"x" * 16384
    for exchange in exchanges:
        for _ in range(4):  # 64 KiB each: exactly the per-stream bound
            exchange.client_data(chunk, len(chunk))
    # Four streams fill the connection's 256 KiB; the fifth keeps no copy.
    assert [e.replay_data is not None for e in exchanges] == [True, True, True, True, False]
    assert front.replay_held == 256 * 1024
    exchanges[0].client_data(b"y", 1)  # one byte over its own bound: its copy goes
    assert exchanges[0].replay_data is None and front.replay_held == 192 * 1024
    exchanges[1]._drop_replay()
    exchanges[1]._drop_replay()  # twice is harmless
    assert front.replay_held == 128 * 1024


def test_count_request_binds_each_child_once_and_folds_unknown_methods():
    from twisted_gateway import metrics

    def value(route, code_class, method):
        return metrics.REGISTRY.get_sample_value(
            "gateway_http_requests_total", {"route": route, "code_class": code_class, "method": method}) or 0.0
    before = (value("proxy", "2xx", "GET"), value("api", "4xx", "other"), value("proxy", "5xx", "DELETE"))
    for method in (b"GET", "GET"):
        metrics.count_request("proxy", 200, method)
    for method in (b"BREW", "PROPFIND", b"\xff"):
        metrics.count_request("api", 404, method)
    metrics.count_request("proxy", 503, b"DELETE")
    after = (value("proxy", "2xx", "GET"), value("api", "4xx", "other"), value("proxy", "5xx", "DELETE"))
    assert [a - b for a, b in zip(after, before)] == [2, 3, 1]
    # Bounded: unknown methods share one child per route and class.
    assert sum(1 for key in metrics._REQUEST_CHILDREN if key[:2] == ("api", 4)) <= 2


def test_error_text_is_one_clean_line_for_nested_connection_failures():
    from twisted.internet.error import ConnectError, ConnectionDone, ConnectionRefusedError
    from twisted.python.failure import Failure
    from twisted.web.client import ResponseNeverReceived
    from twisted_gateway.logs import error_text
    inner = Failure(ConnectionDone())
    # An endpoint that failed every attempt puts the Failure's multi-line text in its message.
    nested = error_text(Failure(ConnectError(string=str(inner))))
    assert nested == "An error occurred while connecting: ConnectionDone: Connection was closed cleanly.."
    assert "Traceback" not in nested and "\n" not in nested
    listed = error_text(Failure(ConnectError(string=repr([inner]))))
    assert listed == "An error occurred while connecting: [ConnectionDone: Connection was closed cleanly.]."
    # An HTTP client's failure: its reasons, in their own words.
    assert error_text(Failure(ResponseNeverReceived([Failure(ConnectionRefusedError())]))) == \
        "Connection was refused by other side."
    assert error_text(Failure(ValueError("plain"))) == "plain"
    assert error_text(Failure(ValueError())) == "ValueError"
