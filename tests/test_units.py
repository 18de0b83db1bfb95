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
    assert client_t.paused, "the client is held until the shard answers"
    sp.client.dataReceived(b"early")
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
    assert (sp.bytes_up, sp.bytes_down) == (5, 15)


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
    from twisted_gateway.tls.acme.manager import TokenBucket
    now = [0.0]
    bucket = TokenBucket(rate_per_minute=6, burst=2, clock=lambda: now[0])
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    now[0] += 10  # 6 per minute: one token per 10 s
    assert bucket.take() and not bucket.take()


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

    from twisted_gateway.http.h2proxy import _H2Peer, _Pipe

    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    peer = _H2Peer()
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
    pipe = _Pipe(peer, 1, consumed.append)
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

    from twisted_gateway.http.h2proxy import _H2Peer, _Pipe

    peer = _H2Peer()
    peer.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    peer.makeConnection(StringTransport())
    peer.pauseProducing()
    consumed: list[int] = []
    pipe = _Pipe(peer, 1, consumed.append)
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
    from twisted_gateway.http import h2proxy

    class Front:
        replay_held = 0
        acked: list[int] = []

        def ack(self, stream_id, size):
            self.acked.append(size)
    front = Front()
    exchanges = [h2proxy._Exchange(front, sid, b"POST", b"/", None, False) for sid in (1, 3, 5, 7, 9)]
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
