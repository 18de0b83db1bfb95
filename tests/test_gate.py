"""
The one gate, seen from each front end, in memory: the same request gets the same answer (or
reaches the shard with the same forwarding fields) whether it comes over HTTP/1.1, over h2 to
an HTTP/1.1 shard, or over h2 to an h2c shard; upstream failures are answered alike; and each
front writes the same access-log line.  No sockets: StringTransports, a MemoryReactorClock, an
in-memory HTTP/1.1 upstream and an in-memory h2c shard.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any

import h2.config
import h2.connection
import h2.events
import jwt
import pytest
from twisted.internet import error as ierror
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from twisted_gateway.config import LimitsConfig
from twisted_gateway.directory.model import Route, Shard, ShardPort
from twisted_gateway.http.auth import TokenVerifier
from twisted_gateway.http.context import HTTPRouteContext
from twisted_gateway.http.h1.connection import H1ProxyConnection
from twisted_gateway.http.h2.front import H2FrontConnection

from test_h1 import RecordingUpstream

NAME = "web-80.gw.test"
PEER = "10.0.0.9"
SECRET = "gate-test-secret-of-at-least-32-bytes"
FRONTS = ["h1", "h2-to-h1", "h2-to-h2c"]


def token(prefixes: list[str]) -> str:
    now = int(time.time())
    return jwt.encode({"prefixes": prefixes, "iat": now, "exp": now + 300, "sub": "u"}, SECRET,
                      algorithm="HS256")


def context(limits: dict[str, Any] | None = None, trusted: tuple[str, ...] = (),
            signin_url: str | None = "https://console.example/signin") -> HTTPRouteContext:
    return HTTPRouteContext(MemoryReactorClock(), "gw.test", TokenVerifier(secret=SECRET), 5.0, 30.0,
                            signin_url, "gw", 60, limits=LimitsConfig(**(limits or {})),
                            trusted_proxies=trusted)


class Front:
    """One client connection through one front end to one shard, all in memory."""

    def __init__(self, kind: str, ctx: HTTPRouteContext, public: bool = True, shard_up: bool = True) -> None:
        self.kind, self.ctx, self.shard_up = kind, ctx, shard_up
        port = ShardPort(80, "h2" if kind == "h2-to-h2c" else "http/1.1", public)
        self.route = Route(Shard("s1", "tasks/web", "web", "127.0.0.1", (port,)), port)
        self.upstream = RecordingUpstream()
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", PEER, 4000))
        self.shard_transport: _ShardTransport | None = None
        self.shard_proto: Any = None
        self.shard_h2: Any = None
        self.shard_requests: list[tuple[int, list[tuple[bytes, bytes]]]] = []
        if kind == "h1":
            self.conn: Any = H1ProxyConnection(self.route, ctx, NAME, upstream=self.upstream)
        else:
            self.conn = H2FrontConnection(self.route, ctx, 16384, 120.0, server_name=NAME,
                                          pool=self.upstream if kind == "h2-to-h1" else None)
            self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                                 header_encoding=None))
            self.client.initiate_connection()
        self.conn.makeConnection(self.transport)
        if kind != "h1":
            self.conn.dataReceived(self.client.data_to_send())
        self.events: list[Any] = []

    # -- the client side ---------------------------------------------------------------------------

    def send(self, method: bytes, target: bytes, fields: list[tuple[bytes, bytes]], body: bytes = b"") -> None:
        if self.kind == "h1":
            lines = [method + b" " + target + b" HTTP/1.1", b"Host: " + NAME.encode()]
            lines += [name + b": " + value for name, value in fields]
            if body:
                lines.append(b"Content-Length: %d" % len(body))
            self.conn.dataReceived(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        else:
            headers = [(b":method", method), (b":scheme", b"https"), (b":authority", NAME.encode()),
                       (b":path", target)] + [(n.lower(), v) for n, v in fields]
            if body:
                headers.append((b"content-length", b"%d" % len(body)))
            self.client.send_headers(1, headers, end_stream=not body)
            if body:
                self.client.send_data(1, body, end_stream=True)
            self.conn.dataReceived(self.client.data_to_send())
        self._shard_side()

    def answer(self) -> tuple[int, dict[bytes, bytes], bytes]:
        """The status, fields (lower-cased names) and body the client got."""
        data = self.transport.value()
        if self.kind == "h1":
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            fields = {}
            for line in lines[1:]:
                name, _, value = line.partition(b": ")
                fields[name.lower()] = value
            return int(lines[0].split(b" ")[1]), fields, body
        self.transport.clear()
        self.events += self.client.receive_data(data)
        status, fields, body = 0, {}, b""
        for event in self.events:
            if isinstance(event, h2.events.ResponseReceived):
                fields = {n: v for n, v in event.headers if n[:1] != b":"}
                status = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                body += event.data
        return status, fields, body

    # -- the shard side ----------------------------------------------------------------------------

    def _shard_side(self) -> None:
        if self.kind != "h2-to-h2c" or not self.shard_up:
            return
        reactor = self.ctx.reactor
        if self.shard_proto is None and reactor.tcpClients:
            factory = reactor.tcpClients[-1][2]
            self.shard_factory = factory
            self.shard_proto = factory.buildProtocol(None)
            self.shard_transport = _ShardTransport()
            self.shard_proto.makeConnection(self.shard_transport)
            self.shard_h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False,
                                                                                   header_encoding=None))
            self.shard_h2.initiate_connection()
            self.shard_proto.dataReceived(self.shard_h2.data_to_send())
        if self.shard_transport is not None:
            data = self.shard_transport.value()
            self.shard_transport.clear()
            for event in self.shard_h2.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    self.shard_requests.append((event.stream_id, list(event.headers)))
            self.shard_proto.dataReceived(self.shard_h2.data_to_send())

    def shard_got(self) -> list[list[tuple[bytes, bytes]]]:
        """Each request's fields as the shard got them (lower-cased names, no pseudo-fields)."""
        if self.kind == "h2-to-h2c":
            return [[(n, v) for n, v in headers if n[:1] != b":"] for _, headers in self.shard_requests]
        return [[(n.lower(), v) for n, v in r["headers"]] for r in self.upstream.requests]

    def shard_answers(self, code: int, body: bytes) -> None:
        if self.kind == "h2-to-h2c":
            sid = self.shard_requests[0][0]
            self.shard_h2.send_headers(sid, [(b":status", b"%d" % code), (b"content-length", b"%d" % len(body))])
            self.shard_h2.send_data(sid, body, end_stream=True)
            self.shard_proto.dataReceived(self.shard_h2.data_to_send())
        else:
            self.upstream.answer(0, body, code)

    def shard_refuses(self) -> None:
        failure = Failure(ierror.ConnectionRefusedError())
        if self.kind == "h2-to-h2c":
            self.ctx.reactor.tcpClients[-1][2].clientConnectionFailed(None, failure)
        else:
            self.upstream.requests[0]["d"].errback(failure)


class _ShardTransport(StringTransport):
    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


def values(fields: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for n, v in fields if n == name]


# -- forwarding fields ---------------------------------------------------------------------------------

CLAIMS = [(b"X-Forwarded-For", b"6.6.6.6"), (b"Forwarded", b"for=6.6.6.6"), (b"X-Forwarded-Host", b"evil"),
          (b"X-Forwarded-Proto", b"http")]


@pytest.mark.parametrize("kind", FRONTS)
def test_an_untrusted_clients_forwarding_claims_are_replaced(kind: str) -> None:
    front = Front(kind, context())
    front.send(b"GET", b"/p?q=1", CLAIMS)
    [got] = front.shard_got()
    assert values(got, b"x-forwarded-for") == [PEER.encode()]
    assert values(got, b"forwarded") == [b"for=10.0.0.9;proto=https;host=" + NAME.encode()]
    assert values(got, b"x-forwarded-host") == [NAME.encode()]
    assert values(got, b"x-forwarded-proto") == [b"https"]


@pytest.mark.parametrize("kind", FRONTS)
def test_a_trusted_proxys_forwarding_claims_are_kept_and_appended_to(kind: str) -> None:
    front = Front(kind, context(trusted=("10.0.0.0/8",)))
    front.send(b"GET", b"/", CLAIMS)
    [got] = front.shard_got()
    assert values(got, b"x-forwarded-for") == [b"6.6.6.6, " + PEER.encode()]
    assert values(got, b"forwarded") == [b"for=6.6.6.6, for=10.0.0.9;proto=https;host=" + NAME.encode()]
    assert values(got, b"x-forwarded-host") == [NAME.encode()]


def test_a_claim_the_connection_field_names_is_dropped_even_from_a_trusted_proxy() -> None:
    front = Front("h1", context(trusted=("10.0.0.0/8",)))
    front.send(b"GET", b"/", [(b"Connection", b"X-Forwarded-For"), (b"X-Forwarded-For", b"6.6.6.6")])
    [got] = front.shard_got()
    assert values(got, b"x-forwarded-for") == [PEER.encode()]


# -- the token, the sign-in redirect, /auth-redirect ------------------------------------------------------

@pytest.mark.parametrize("kind", FRONTS)
def test_a_private_port_without_a_token_sends_a_browser_to_sign_in(kind: str) -> None:
    front = Front(kind, context(), public=False)
    front.send(b"GET", b"/page?x=1", [(b"Accept", b"text/html")])
    status, fields, _ = front.answer()
    assert status == 307 and front.shard_got() == []
    assert fields[b"location"] == (b"https://console.example/signin?orig_url="
                                   b"https%3A%2F%2Fweb-80.gw.test%2Fpage%3Fx%3D1")


@pytest.mark.parametrize("kind", FRONTS)
def test_a_private_port_without_a_token_answers_a_program_401(kind: str) -> None:
    front = Front(kind, context(), public=False)
    front.send(b"POST", b"/api", [(b"Accept", b"application/json")], b"{}")
    status, fields, body = front.answer()
    assert status == 401 and front.shard_got() == []
    assert fields[b"www-authenticate"].startswith(b'Bearer error="invalid_token"')
    assert json.loads(body)["error"] == "missing"


@pytest.mark.parametrize("kind", FRONTS)
def test_a_token_for_another_task_is_forbidden(kind: str) -> None:
    front = Front(kind, context(), public=False)
    front.send(b"GET", b"/", [(b"Authorization", b"Bearer " + token(["tasks/other"]).encode())])
    assert front.answer()[0] == 403 and front.shard_got() == []


@pytest.mark.parametrize("kind", FRONTS)
def test_a_good_token_passes_and_never_reaches_the_shard(kind: str) -> None:
    good = token(["tasks/"]).encode()
    front = Front(kind, context(), public=False)
    front.send(b"GET", b"/", [(b"Cookie", b"a=1; gw=" + good), (b"Accept", b"*/*")])
    [got] = front.shard_got()
    assert values(got, b"cookie") == [b"a=1"] and not values(got, b"authorization")


@pytest.mark.parametrize("kind", FRONTS)
def test_auth_redirect_sets_the_cookie_for_the_ports_task(kind: str) -> None:
    from urllib.parse import quote
    good = token(["tasks/"])
    front = Front(kind, context(), public=False)
    front.send(b"GET", b"/auth-redirect?token=" + good.encode() + b"&orig_url="
               + quote("https://web-80.gw.test/x", safe="").encode(), [])
    status, fields, _ = front.answer()
    assert status == 307 and fields[b"location"] == b"https://web-80.gw.test/x"
    assert fields[b"set-cookie"].startswith(b"gw=" + good.encode() + b"; Path=/")
    assert front.shard_got() == []


# -- rate limits and the declared body size --------------------------------------------------------------

class _Bucket:
    def __init__(self, wait: float) -> None:
        self.wait = wait
        self.enabled = True

    def take(self, key: str) -> float:
        return self.wait


@pytest.mark.parametrize("kind", FRONTS)
def test_a_client_over_its_rate_is_told_when_to_retry(kind: str) -> None:
    ctx = context()
    ctx.admission = lambda: SimpleNamespace(request_rate_ip=_Bucket(2.4), request_rate_token=_Bucket(0))
    front = Front(kind, ctx)
    front.send(b"GET", b"/", [(b"Accept", b"application/json")])
    status, fields, body = front.answer()
    assert status == 429 and fields[b"retry-after"] == b"3" and front.shard_got() == []
    assert json.loads(body) == {"error": "rate_limited", "message": "too many requests: retry in 2 s",
                                "status": 429}


@pytest.mark.parametrize("kind", FRONTS)
def test_a_declared_body_over_the_limit_is_413_before_the_shard(kind: str) -> None:
    front = Front(kind, context(limits={"max_body_bytes": 10}))
    front.send(b"POST", b"/", [(b"Accept", b"application/json")], b"x" * 11)
    status, _, body = front.answer()
    assert status == 413 and front.shard_got() == []
    assert json.loads(body)["message"] == "the request body is over 10 bytes"


def test_an_h2_port_limits_a_body_without_a_declared_length_too() -> None:
    """limits.max_body_bytes holds for h2 shards (gRPC client streams included)."""
    front = Front("h2-to-h2c", context(limits={"max_body_bytes": 10}))
    front.client.send_headers(1, [(b":method", b"POST"), (b":scheme", b"https"),
                                  (b":authority", NAME.encode()), (b":path", b"/up")])
    front.client.send_data(1, b"x" * 20, end_stream=True)
    front.conn.dataReceived(front.client.data_to_send())
    assert front.answer()[0] == 413


@pytest.mark.parametrize("kind", ["h1", "h2-to-h1"])
def test_a_body_growing_over_the_limit_is_413_and_its_request_is_let_go(kind: str) -> None:
    front = Front(kind, context(limits={"max_body_bytes": 10}))
    if kind == "h1":
        front.conn.dataReceived(b"POST /up HTTP/1.1\r\nHost: web-80.gw.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                                b"14\r\n" + b"x" * 20 + b"\r\n0\r\n\r\n")
    else:
        # Headers, DATA and END_STREAM in one read.
        front.client.send_headers(1, [(b":method", b"POST"), (b":scheme", b"https"),
                                      (b":authority", NAME.encode()), (b":path", b"/up")])
        front.client.send_data(1, b"x" * 20, end_stream=True)
        front.conn.dataReceived(front.client.data_to_send())
    assert front.answer()[0] == 413
    # One request reached the shard, and it was let go: never sent again without its body.
    [request] = front.upstream.requests
    assert request["d"].called and not request["done"]


# -- upstream failures, answers from the shard, the access log ------------------------------------------

@pytest.mark.parametrize("kind", FRONTS)
def test_a_shard_that_refuses_is_502_upstream_refused(kind: str) -> None:
    front = Front(kind, context(), shard_up=False)
    front.send(b"GET", b"/", [(b"Accept", b"application/json")])
    front.shard_refuses()
    status, _, body = front.answer()
    assert status == 502 and json.loads(body) == {
        "error": "upstream_refused", "message": "shard s1 refused the connection", "status": 502}


@pytest.mark.parametrize("kind", FRONTS)
def test_a_shard_that_does_not_answer_in_time_is_504(kind: str) -> None:
    ctx = context()
    front = Front(kind, ctx)
    front.send(b"GET", b"/", [(b"Accept", b"application/json")])
    ctx.reactor.advance(30.0)
    front._shard_side()
    status, _, body = front.answer()
    assert status == 504 and json.loads(body)["error"] == "upstream_timeout"


@pytest.mark.parametrize("kind", FRONTS)
def test_each_front_writes_the_same_access_log_line(kind: str) -> None:
    seen: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("event_kind") == "http_access":
            seen.append(event)
    globalLogPublisher.addObserver(observe)
    try:
        front = Front(kind, context())
        front.send(b"GET", b"/path?secret=1", [])
        front.shard_answers(200, b"hello")
        front._shard_side()
        status, _, body = front.answer()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert (status, body) == (200, b"hello")
    [event] = seen
    assert {k: event[k] for k in ("client", "method", "path", "status", "shard", "port", "bytes")} == {
        "client": PEER, "method": "GET", "path": "/path", "status": 200, "shard": "s1", "port": 80,
        "bytes": 5}
    assert event["duration"] >= 0
