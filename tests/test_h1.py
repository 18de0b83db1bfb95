"""
Unit tests of the HTTP/1.1 front end without sockets: the request reader and head checks over
bytes, the field rules, and L{H1ProxyConnection} over a StringTransport with a MemoryReactorClock
and an in-memory upstream that records what the shard would have been sent.
"""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.client import ResponseDone
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_gateway.config import LimitsConfig
from twisted_gateway.directory.model import Route, Shard, ShardPort
from twisted_gateway.http.context import HTTPRouteContext
from twisted_gateway.http.framing import (
    authority_host, client_fields_for_shard, forwarding_claims, h2_target_problem, response_fields_for_client,
)
from twisted_gateway.http.h1.connection import H1ProxyConnection
from twisted_gateway.http.h1.parse import END, RequestHead, RequestReader, Rejected, Stopped
from twisted_gateway.http.policy import forwarding_headers
from twisted_gateway.http.upstream import IUpstream, RawHeaders

NAME = "web-80.gw.test"


def events(*chunks: bytes, max_head: int = 16384, max_fields: int = 100) -> list:
    reader = RequestReader(NAME, max_head, max_fields)
    out: list = []
    for chunk in chunks:
        out += reader.feed(chunk)
    return out


def head_of(raw: bytes) -> RequestHead | Rejected:
    first = events(raw)[0]
    assert isinstance(first, (RequestHead, Rejected)), first
    return first


# -- the reader --------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, status, reason", [
    (b"POST / HTTP/1.1\r\nHost: web-80.gw.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "bad_framing"),
    (b"POST / HTTP/1.1\r\nHost: web-80.gw.test\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n", 400, "bad_framing"),
    (b"POST / HTTP/1.1\r\nHost: web-80.gw.test\r\nContent-Length: +4\r\n\r\n", 400, "bad_framing"),
    (b"POST / HTTP/1.1\r\nHost: web-80.gw.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501, "unsupported_coding"),
    (b"POST / HTTP/1.1\r\nHost: web-80.gw.test\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 501, "unsupported_coding"),
    (b"POST / HTTP/1.1\r\nHost: web-80.gw.test\r\nTransfer-Encoding: xchunked\r\n\r\n", 501, "unsupported_coding"),
    (b"POST / HTTP/1.1\r\nHost: web-80.gw.test\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 501, "unsupported_coding"),
    (b"GET / HTTP/1.1\nHost: web-80.gw.test\n\n", 400, "bad_request"),
    (b"GET / HTTP/1.1\r\nHost: web-80.gw.test\r\nX: a\r\n b\r\n\r\n", 400, "bad_request"),
    (b"GET / HTTP/1.1\r\nHost: web-80.gw.test\r\nX: a\x00b\r\n\r\n", 400, "bad_request"),
    (b"GET / HTTP/1.1\r\nHost : web-80.gw.test\r\n\r\n", 400, "bad_request"),
    (b"GET /a b HTTP/1.1\r\nHost: web-80.gw.test\r\n\r\n", 400, "bad_request"),
    (b"GET / HTTP/1.1\r\n\r\n", 400, "bad_request"),
    (b"GET / HTTP/1.1\r\nHost: web-80.gw.test\r\nHost: web-80.gw.test\r\n\r\n", 400, "bad_request"),
    (b"GET / HTTP/1.1\r\nHost: other-80.gw.test\r\n\r\n", 421, "misdirected"),
    (b"GET / HTTP/1.1\r\nHost: user@web-80.gw.test\r\n\r\n", 400, "bad_request"),
    (b"GET https://other-80.gw.test/ HTTP/1.1\r\nHost: web-80.gw.test\r\n\r\n", 421, "misdirected"),
    (b"GET ftp://web-80.gw.test/ HTTP/1.1\r\nHost: web-80.gw.test\r\n\r\n", 400, "bad_request"),
    (b"CONNECT web-80.gw.test:443 HTTP/1.1\r\nHost: web-80.gw.test\r\n\r\n", 405, "method_not_allowed"),
    (b"GET * HTTP/1.1\r\nHost: web-80.gw.test\r\n\r\n", 400, "bad_request"),
    (b"POST / HTTP/1.1\r\nHost: web-80.gw.test\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\n", 400, "bad_framing"),
    (b"POST / HTTP/1.1\r\nHost: web-80.gw.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "bad_framing"),
])
def test_the_reader_refuses_what_it_cannot_frame(raw, status, reason):
    got = [e for e in events(raw) if isinstance(e, Rejected)]
    assert got and (got[0].status, got[0].reason) == (status, reason)
    assert raw not in got[0].message.encode()


def test_lengths_are_canonical_and_absolute_form_becomes_origin_form():
    head = head_of(b"POST https://WEB-80.gw.test./a?b=1 HTTP/1.1\r\nHost: web-80.gw.test\r\n"
                   b"Content-Length: 0005\r\n\r\nhello")
    assert isinstance(head, RequestHead)
    assert (head.target, head.body, head.length) == (b"/a?b=1", "length", 5)


def test_pipelined_requests_are_read_in_order_with_bodies_bounded_by_their_framing():
    got = events(b"POST /1 HTTP/1.1\r\nHost: web-80.gw.test\r\nContent-Length: 3\r\n\r\nabcGET /2 HTTP/1.1\r\n"
                 b"Host: web-80.gw.test\r\n\r\n")
    assert [type(e).__name__ if not isinstance(e, bytes) else e for e in got] == [
        "RequestHead", b"abc", "_End", "RequestHead", "_End"]
    assert got[3].target == b"/2"


def test_chunked_body_trailers_are_dropped_and_extensions_ignored():
    got = events(b"POST / HTTP/1.1\r\nHost: web-80.gw.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"3;x=y\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n")
    assert got[0].body == "chunked" and got[1:] == [b"abc", END]


def test_head_size_is_bounded_exactly_even_when_trickled():
    assert events(b"GET / HTTP/1.1\r\nHost: web-80.gw.test\r\nX: " + b"a" * 200 + b"\r\n\r\n",
                  max_head=128)[-1].status == 431
    trickled = [b"GET / HTTP/1.1\r\nHost: web-80.gw.test\r\nX: "] + [b"a"] * 300
    assert events(*trickled, max_head=128)[-1].status == 431
    many = b"".join(b"X%d: 1\r\n" % i for i in range(20))
    assert events(b"GET / HTTP/1.1\r\nHost: web-80.gw.test\r\n" + many + b"\r\n", max_fields=10)[-1].status == 431


def test_a_huge_trailer_is_bounded():
    got = events(b"POST / HTTP/1.1\r\nHost: web-80.gw.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: ",
                 *([b"a" * 1000] * 40), max_head=16384)
    assert isinstance(got[-1], Rejected) and got[-1].status == 431


def test_an_upgrade_request_stops_the_reader_and_keeps_what_follows():
    got = events(b"GET /ws HTTP/1.1\r\nHost: web-80.gw.test\r\nConnection: Upgrade\r\n"
                 b"Upgrade: websocket\r\n\r\nGET /next HTTP/1.1\r\n")
    assert got[0].upgrade == (b"websocket",)
    assert got[-1] == Stopped(b"GET /next HTTP/1.1\r\n")


def test_keep_alive_rules_of_http10_and_http11():
    assert not head_of(b"GET / HTTP/1.0\r\n\r\n").keep_alive
    assert head_of(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive
    assert not head_of(b"GET / HTTP/1.1\r\nHost: web-80.gw.test\r\nConnection: close\r\n\r\n").keep_alive
    assert head_of(b"GET / HTTP/1.0\r\n\r\n").host == NAME.encode()


# -- field rules --------------------------------------------------------------------------------

def test_fields_for_the_shard_drop_hop_by_hop_framing_tokens_and_claims():
    fields = [(b"Host", b"web-80.gw.test"), (b"Connection", b"keep-alive, X-Secret"), (b"X-Secret", b"1"),
              (b"Keep-Alive", b"timeout=5"), (b"TE", b"trailers"), (b"Trailer", b"x"), (b"Upgrade", b"h2c"),
              (b"HTTP2-Settings", b"AAA"), (b"Proxy-Authorization", b"Basic x"), (b"Expect", b"100-continue"),
              (b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked"), (b"Authorization", b"Bearer t"),
              (b"Cookie", b"a=1; gw=tok"), (b"X-Forwarded-For", b"6.6.6.6"), (b"Forwarded", b"for=6.6.6.6"),
              (b"X-Forwarded-Host", b"evil"), (b"Accept", b"*/*")]
    own = forwarding_headers([], [], "10.1.1.1", b"web-80.gw.test")
    out = client_fields_for_shard(fields, b"web-80.gw.test", private=True, cookie_name=b"gw", forwarding=own)
    names = [n.lower() for n, _ in out]
    assert names.count(b"host") == 1 and out[0] == (b"Host", b"web-80.gw.test")
    for gone in (b"connection", b"x-secret", b"keep-alive", b"te", b"trailer", b"upgrade", b"http2-settings",
                 b"proxy-authorization", b"expect", b"content-length", b"transfer-encoding", b"authorization"):
        assert gone not in names, gone
    assert dict(out)[b"Cookie"] == b"a=1"
    assert dict(out)[b"x-forwarded-for"] == b"10.1.1.1"
    assert b"6.6.6.6" not in b"".join(v for _, v in out)
    # The client's own claims, which the gate keeps from a trusted proxy (tests/test_gate.py).
    assert forwarding_claims(fields, frozenset({b"keep-alive", b"x-secret"})) == ((b"6.6.6.6",), (b"for=6.6.6.6",))
    assert forwarding_claims(fields, frozenset({b"x-forwarded-for"})) == ((), (b"for=6.6.6.6",))
    trusted = client_fields_for_shard(fields, b"web-80.gw.test", private=False, cookie_name=b"gw", upgrade=True,
                                      forwarding=forwarding_headers([b"6.6.6.6"], [], "10.1.1.1", b"h", trusted=True))
    assert dict(trusted)[b"x-forwarded-for"] == b"6.6.6.6, 10.1.1.1"
    assert [v for n, v in trusted if n.lower() == b"x-forwarded-for"] == [b"6.6.6.6, 10.1.1.1"]
    assert (b"Upgrade", b"websocket") in trusted and (b"Connection", b"Upgrade") in trusted
    assert dict(trusted)[b"Authorization"] == b"Bearer t"  # public ports keep the client's own


def test_a_connection_field_cannot_name_away_the_gateways_own_fields():
    out = client_fields_for_shard([(b"Host", b"h"), (b"Connection", b"host, x-forwarded-for, cookie"),
                                   (b"Cookie", b"a=1")], b"h", private=False, cookie_name=b"gw",
                                  forwarding=forwarding_headers([], [], "1.2.3.4", b"h"))
    names = [n.lower() for n, _ in out]
    assert names.count(b"host") == 1 and b"x-forwarded-for" in names and b"cookie" in names


def test_response_fields_for_the_client_lose_hop_by_hop_and_framing():
    out = response_fields_for_client([(b"Content-Length", b"3"), (b"Connection", b"close, X-Internal"),
                                      (b"X-Internal", b"1"), (b"Transfer-Encoding", b"chunked"),
                                      (b"Set-Cookie", b"a=1"), (b"Keep-Alive", b"t=1")])
    assert out == [(b"Set-Cookie", b"a=1")]


@pytest.mark.parametrize("method, path, problem", [
    (b"GET", b"/ok?x=1", None), (b"OPTIONS", b"*", None), (b"GET", b"*", "'*' is a :path for OPTIONS only"),
    (b"GET", b"/a b", ":path holds a space, control or non-ASCII byte"), (b"GET", b"/a\tb", ":path holds a space, control or non-ASCII byte"),
    (b"GET", b"/a\x7f", ":path holds a space, control or non-ASCII byte"), (b"GET", b"http://x/", ":path is not origin-form"),
    (b"G ET", b"/", ":method is not a token"), (b"", b"/", ":method is not a token"),
])
def test_h2_request_lines_that_cannot_become_http11(method, path, problem):
    assert h2_target_problem(method, path) == problem


def test_authority_host():
    assert authority_host(b"WEB-80.gw.test.:443") == b"web-80.gw.test"
    assert authority_host(b"[::1]:80") == b"[::1]"
    assert authority_host(b"a@b") is None and authority_host(b"a:b:c") is None and authority_host(b"a b") is None


# -- the connection, in memory ------------------------------------------------------------------

class _Response:
    def __init__(self, code: int, fields: list[tuple[bytes, bytes]], body: bytes, length) -> None:
        self.code, self.phrase, self.length = code, b"OK", length
        self.headers = RawHeaders()
        for n, v in fields:
            self.headers.addRawHeader(n, v)
        self.body = body

    def deliverBody(self, protocol) -> None:
        protocol.makeConnection(StringTransport())
        if self.body:
            protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))


@implementer(IUpstream)
class RecordingUpstream:
    """Writes down each request the shard would get; answers when the test says so."""

    tunnels = True

    def __init__(self) -> None:
        self.requests: list[dict] = []

    def request(self, address, port, method, path, headers, body=None, upgrade=False) -> Deferred:
        record = {"method": method, "path": path, "headers": headers, "body": b"", "done": False,
                  "d": Deferred(), "upgrade": upgrade}
        self.requests.append(record)
        if body is not None:
            record["length"] = body.length

            class Sink:
                def write(self, data):
                    record["body"] += data
            finished = body.startProducing(Sink())
            finished.addCallback(lambda _: record.__setitem__("done", True))
        else:
            record["done"] = True
        return record["d"]

    def answer(self, i: int, body: bytes = b"ok", code: int = 200) -> None:
        self.requests[i]["d"].callback(_Response(code, [(b"Content-Length", b"%d" % len(body))], body, len(body)))


def connection(**limits):
    reactor = MemoryReactorClock()
    ctx = HTTPRouteContext(reactor, "gw.test", None, 5.0, 30.0, None, "gw", 60,
                           limits=LimitsConfig(**limits))
    upstream = RecordingUpstream()
    route = Route(Shard("s1", "tasks/web", "web", "127.0.0.1", (ShardPort(80, "http/1.1", True),)),
                  ShardPort(80, "http/1.1", True))
    conn = H1ProxyConnection(route, ctx, NAME, upstream=upstream, websockets=True)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.9", 4000))
    conn.makeConnection(transport)
    return conn, transport, upstream, reactor


def test_pipelined_requests_reach_the_shard_one_at_a_time_and_answers_keep_their_order():
    conn, transport, upstream, _ = connection()
    conn.dataReceived(b"GET /1 HTTP/1.1\r\nHost: web-80.gw.test\r\n\r\nGET /2 HTTP/1.1\r\nHost: web-80.gw.test\r\n\r\n")
    assert [r["path"] for r in upstream.requests] == [b"/1"]
    assert transport.producerState == "paused"  # the second waits, and so does the client
    upstream.answer(0, b"one")
    assert [r["path"] for r in upstream.requests] == [b"/1", b"/2"]
    upstream.answer(1, b"two")
    out = transport.value()
    assert out.index(b"one") < out.index(b"two") and out.count(b"HTTP/1.1 200") == 2


def test_expect_100_continue_is_answered_by_the_gateway_and_the_body_streams():
    conn, transport, upstream, _ = connection()
    conn.dataReceived(b"POST /u HTTP/1.1\r\nHost: web-80.gw.test\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    assert transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    conn.dataReceived(b"hello")
    req = upstream.requests[0]
    assert req["body"] == b"hello" and req["done"] and req["length"] == 5
    assert not any(n.lower() in (b"expect", b"content-length") for n, _ in req["headers"])


def test_a_head_trickled_past_the_deadline_gets_408_and_nothing_reaches_the_shard():
    conn, transport, upstream, reactor = connection(request_head_timeout=2.0)
    for byte in b"GET / HTTP/1.1\r\nHost: web":
        conn.dataReceived(bytes([byte]))
        reactor.advance(0.05)
    reactor.advance(2.0)
    assert transport.value().startswith(b"HTTP/1.1 408 ") and transport.disconnecting
    assert upstream.requests == []


def test_a_body_below_the_minimum_rate_gets_408_and_the_shard_request_is_abandoned():
    conn, transport, upstream, reactor = connection(body_min_rate=100.0, body_rate_window=1.0)
    conn.dataReceived(b"POST / HTTP/1.1\r\nHost: web-80.gw.test\r\nContent-Length: 1000\r\n\r\n")
    for _ in range(4):
        conn.dataReceived(b"x")
        reactor.advance(0.5)
    assert b"HTTP/1.1 408 " in transport.value() and transport.disconnecting
    assert upstream.requests[0]["d"].called  # cancelled


def test_a_declared_body_over_the_limit_gets_413_before_anything_is_sent():
    conn, transport, upstream, _ = connection(max_body_bytes=10)
    conn.dataReceived(b"POST / HTTP/1.1\r\nHost: web-80.gw.test\r\nContent-Length: 11\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 413 ") and upstream.requests == []


def test_a_chunked_body_growing_over_the_limit_is_cut_and_answered_413():
    conn, transport, upstream, _ = connection(max_body_bytes=10)
    conn.dataReceived(b"POST / HTTP/1.1\r\nHost: web-80.gw.test\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n")
    conn.dataReceived(b"8\r\n12345678\r\n")
    assert b"HTTP/1.1 413 " in transport.value() and transport.disconnecting
    assert len(upstream.requests[0]["body"]) <= 10


def test_an_upgrade_answered_200_leaves_the_connection_http_and_checks_the_next_request():
    conn, transport, upstream, _ = connection()
    conn.dataReceived(b"GET /ws HTTP/1.1\r\nHost: web-80.gw.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                      b"GET /next HTTP/1.1\r\nHost: other-80.gw.test\r\n\r\n")
    assert upstream.requests[0]["upgrade"] is True and len(upstream.requests) == 1
    upstream.answer(0, b"no upgrade here")
    # The bytes after the upgrade request were parsed as HTTP and refused: another host.
    assert len(upstream.requests) == 1
    assert b"HTTP/1.1 421 " in transport.value()


def test_h2c_upgrade_is_never_honoured():
    conn, transport, upstream, _ = connection()
    conn.dataReceived(b"GET / HTTP/1.1\r\nHost: web-80.gw.test\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                      b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
    req = upstream.requests[0]
    assert req["upgrade"] is False
    assert not any(n.lower() in (b"upgrade", b"http2-settings", b"connection") for n, _ in req["headers"])


def test_a_client_that_half_closes_after_its_requests_still_gets_every_answer():
    conn, transport, upstream, _ = connection()
    conn.dataReceived(b"GET /1 HTTP/1.1\r\nHost: web-80.gw.test\r\n\r\nGET /2 HTTP/1.1\r\nHost: web-80.gw.test\r\n\r\n")
    conn.readConnectionLost()
    assert not transport.disconnecting
    upstream.answer(0, b"one")
    assert not transport.disconnecting
    upstream.answer(1, b"two")
    assert transport.value().count(b"HTTP/1.1 200") == 2 and transport.disconnecting


def test_a_client_that_half_closes_mid_body_abandons_the_shard_request():
    conn, transport, upstream, _ = connection()
    conn.dataReceived(b"POST / HTTP/1.1\r\nHost: web-80.gw.test\r\nContent-Length: 10\r\n\r\nabc")
    conn.readConnectionLost()
    assert upstream.requests[0]["d"].called and not upstream.requests[0]["done"]


def test_the_body_of_an_upgrade_request_that_is_not_honoured_is_read_with_its_framing():
    got = events(b"POST / HTTP/1.1\r\nHost: web-80.gw.test\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /next HTTP/1.1\r\nHost: web-80.gw.test\r\n\r\n")
    assert got[0].body == "chunked" and got[1:3] == [b"hello", END]
    assert got[3].target == b"/next" and got[4] is END


def test_a_websocket_upgrade_with_a_body_and_chunked_http10_are_refused():
    assert head_of(b"GET / HTTP/1.1\r\nHost: web-80.gw.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                   b"Content-Length: 3\r\n\r\nabc").status == 400
    assert head_of(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n").reason == "bad_framing"
    assert head_of(b"GET /x\r\n\r\n").status == 400  # HTTP/0.9


def test_a_body_found_malformed_in_the_read_that_carried_its_head_never_reaches_the_shard():
    conn, transport, upstream, _ = connection()
    conn.dataReceived(b"POST / HTTP/1.1\r\nHost: web-80.gw.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    assert upstream.requests == [] and transport.value().startswith(b"HTTP/1.1 400 ")


# -- found by a red-team run -------------------------------------------------------------------

def test_an_empty_upgrade_token_list_cannot_turn_a_body_into_a_request():
    """llhttp stops after any Connection: upgrade + Upgrade head, even 'Upgrade: ,'."""
    conn, transport, upstream, _ = connection()
    smuggled = b"POST /store HTTP/1.1\r\nHost: web-80.gw.test\r\nContent-Length: 300\r\n\r\n"
    conn.dataReceived(b"POST /x HTTP/1.1\r\nHost: web-80.gw.test\r\nConnection: upgrade\r\nUpgrade: ,\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(smuggled) + smuggled)
    assert len(upstream.requests) == 1 and upstream.requests[0]["body"] == smuggled
    assert upstream.requests[0]["done"]
    upstream.answer(0)
    conn.dataReceived(b"GET /victim HTTP/1.1\r\nHost: web-80.gw.test\r\nCookie: s=secret\r\n\r\n")
    assert [r["path"] for r in upstream.requests] == [b"/x", b"/victim"]


def test_no_pipelined_request_starts_while_the_client_does_not_read():
    conn, transport, upstream, _ = connection()
    conn.dataReceived(b"GET /1 HTTP/1.1\r\nHost: web-80.gw.test\r\n\r\n" * 3)
    conn.pauseProducing()  # the client's socket buffer is full
    upstream.answer(0)
    assert len(upstream.requests) == 1
    conn.resumeProducing()
    assert len(upstream.requests) == 2


def test_a_client_that_stops_reading_is_cut_after_the_idle_timeout():
    conn, transport, upstream, reactor = connection(http_idle_timeout=5.0)
    conn.dataReceived(b"GET /big HTTP/1.1\r\nHost: web-80.gw.test\r\n\r\n")
    conn.pauseProducing()
    reactor.advance(5.0)
    assert upstream.requests[0]["d"].called  # the shard request is let go
    assert transport.disconnecting or transport.disconnected


def test_empty_lines_do_not_keep_a_connection_open():
    conn, transport, upstream, reactor = connection(http_idle_timeout=3.0)
    for _ in range(10):
        conn.dataReceived(b"\r\n")
        reactor.advance(1.0)
    assert transport.disconnecting


def test_an_answer_of_the_gateways_own_keeps_a_bodyless_request_alive():
    conn, transport, upstream, _ = connection()
    conn.dataReceived(b"GET /auth-redirect?orig_url=https%3A%2F%2Fevil.example%2F HTTP/1.1\r\nHost: web-80.gw.test\r\n\r\n"
                      b"GET /next HTTP/1.1\r\nHost: web-80.gw.test\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 400 ") and b"Connection: close" not in transport.value()
    assert not transport.disconnecting and [r["path"] for r in upstream.requests] == [b"/next"]
    upstream.answer(0)
    assert transport.value().count(b"HTTP/1.1 200 ") == 1 and not transport.disconnecting


def test_an_answer_of_the_gateways_own_still_closes_when_a_body_or_a_switch_is_unread():
    conn, transport, upstream, _ = connection(max_body_bytes=3)
    conn.dataReceived(b"POST / HTTP/1.1\r\nHost: web-80.gw.test\r\nContent-Length: 5\r\n\r\nhello")
    assert b"HTTP/1.1 413 " in transport.value() and b"Connection: close" in transport.value()
    assert transport.disconnecting
    conn, transport, upstream, _ = connection()
    conn.dataReceived(b"GET /auth-redirect HTTP/1.1\r\nHost: web-80.gw.test\r\nConnection: Upgrade\r\n"
                      b"Upgrade: websocket\r\n\r\nGET /next HTTP/1.1\r\n")
    assert b"HTTP/1.1 400 " in transport.value() and transport.disconnecting and upstream.requests == []


class _Pool:
    def release(self, conn):
        self.released = conn

    def forget(self, conn):
        pass


def upstream_connection(method: bytes = b"GET"):
    from twisted_gateway.http.h1.client import UpstreamConnection
    conn = UpstreamConnection(_Pool(), ("127.0.0.1", 80))
    transport = StringTransport()
    conn.makeConnection(transport)
    got: list = []
    conn.send(method, b"%s / HTTP/1.1\r\nHost: x\r\n\r\n" % method, None).addBoth(got.append)
    return conn, transport, got


def test_a_shards_endless_trailer_is_bounded():
    conn, transport, got = upstream_connection()
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: ")
    assert not transport.disconnecting
    for _ in range(20):
        conn.dataReceived(b"a" * 8192)
    assert transport.disconnecting  # cut at 64 KiB of one field, not held to the end


def test_an_interim_response_with_a_body_is_a_bad_response():
    from twisted_gateway.http.upstream import BadResponse
    conn, transport, got = upstream_connection()
    conn.dataReceived(b"HTTP/1.1 150 Odd\r\nContent-Length: 5\r\n\r\nEVIL!HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert isinstance(got[0], Failure) and got[0].check(BadResponse)


def test_head_after_early_hints_gets_its_final_response_and_never_pools():
    conn, transport, got = upstream_connection(b"HEAD")
    assert conn.busy
    conn.dataReceived(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
                      b"HTTP/1.1 200 OK\r\nContent-Length: 12345\r\n\r\n")
    assert got and got[0].code == 200 and got[0].headers.getRawHeaders(b"content-length") == [b"12345"]
    got[0].deliverBody(Protocol())
    assert not conn.reusable


@pytest.mark.parametrize("name, value", [(b"x-a", b"a\x01b"), (b"x-a", b"a\x7fb"), (b"x(a)", b"v"), (b'x"a', b"v")])
def test_h2_fields_an_http11_line_cannot_carry(name, value):
    from twisted_gateway.http.framing import h2_field_problem
    assert h2_field_problem(name, value) is not None
    assert h2_field_problem(b"x-ok", b"tab\tok") is None


# -- the one upstream interface -------------------------------------------------------------------

def test_both_upstreams_provide_the_upstream_interface():
    from zope.interface.verify import verifyClass, verifyObject

    from twisted_gateway.http.h1.client import UpstreamResponse
    from twisted_gateway.http.h1.pool import UpstreamPool
    from twisted_gateway.http.h2.h1bridge import H2Upstream, _UpstreamResponse
    from twisted_gateway.http.upstream import IUpstreamResponse
    reactor = MemoryReactorClock()
    assert verifyObject(IUpstream, UpstreamPool(reactor, 5.0))
    assert verifyObject(IUpstream, H2Upstream(reactor, 5.0))
    assert verifyObject(IUpstream, RecordingUpstream())  # the stand-in these tests use
    assert verifyClass(IUpstreamResponse, UpstreamResponse) and verifyClass(IUpstreamResponse, _UpstreamResponse)


def test_websockets_are_offered_only_through_an_upstream_that_tunnels():
    from twisted_gateway.http.h2.h1bridge import H2Upstream
    reactor = MemoryReactorClock()
    ctx = HTTPRouteContext(reactor, "gw.test", None, 5.0, 30.0, None, "gw", 60)
    port = ShardPort(80, "h2", True)
    route = Route(Shard("s1", "tasks/web", "web", "127.0.0.1", (port,)), port)
    assert H1ProxyConnection(route, ctx, NAME).websockets  # the pool
    h2c = H2Upstream(reactor, 5.0)
    assert not H1ProxyConnection(route, ctx, NAME, upstream=h2c).websockets
    failed: list = []
    h2c.request("127.0.0.1", 80, b"GET", b"/", [(b"Host", b"x")], upgrade=True).addErrback(failed.append)
    assert failed and reactor.tcpClients == []  # refused before any connection is made


def test_a_request_that_ends_without_a_status_is_logged_with_its_outcome():
    from twisted.logger import globalLogPublisher
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        conn, transport, upstream, _ = connection()
        conn.dataReceived(b"POST /x HTTP/1.1\r\nHost: web-80.gw.test\r\nContent-Length: 10\r\n\r\nabc")
        conn.readConnectionLost()
    finally:
        globalLogPublisher.removeObserver(seen.append)
    [line] = [e for e in seen if e.get("event_kind") == "http_access"]
    assert line["status"] == "client_gone"
