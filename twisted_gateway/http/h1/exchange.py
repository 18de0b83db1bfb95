"""
One request of an HTTP/1.1 client connection and its answer (L{H1Exchange}): the gate, the
request sent to the upstream with its body streamed as it arrives, the response relayed with the
gateway's framing (L{_ResponseRelay}), the switch to a tunnel after a ``101`` to a websocket
upgrade the gateway forwarded, and the answers the gateway gives itself.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH

from twisted_gateway import metrics
from twisted_gateway.http.body import ResponseRelay, StreamingBody, abandon
from twisted_gateway.http.framing import (
    REASONS, client_fields_for_shard, response_fields_for_client, safe_phrase,
)
from twisted_gateway.http.h1.parse import RequestHead, Rejected
from twisted_gateway.http.policy import (
    Answer, RequestState, body_too_large, gate, request_token, upstream_failed,
)

if TYPE_CHECKING:
    from twisted_gateway.http.h1.connection import H1ProxyConnection
    from twisted_gateway.http.upstream import IUpstreamResponse


class _ResponseRelay(ResponseRelay):
    """
    Streams the shard's response body to the client with the gateway's framing.

    The response head waits in C{head} until the first body bytes (or the body's end) so that
    both go to the client in one write: one TLS record and one send instead of two for the
    common small response whose body came in the read that carried its head.  What is still
    unwritten when the upstream has handed over what it had is written at once
    (L{flush_head}), so a head never waits for a body that is still on its way.
    """

    def __init__(self, exchange: H1Exchange, chunked: bool, head: bytes) -> None:
        self.exchange = exchange
        self.chunked = chunked
        self.head: bytes | None = head

    def flush_head(self) -> None:
        head, self.head = self.head, None
        if head is not None and not self.exchange.finished:
            client = self.exchange.conn.transport
            if client is not None:
                client.write(head)

    def makeConnection(self, transport: Any) -> None:
        # The shard's socket is paused while the client's is full (see H1ProxyConnection's
        # producer methods, which pass the signal on).
        self.transport = transport
        self.exchange.conn.relay_started(transport)

    def dataReceived(self, data: bytes) -> None:
        if self.done or not data:
            return
        client = self.exchange.conn.transport
        if client is None:
            return
        self.exchange.request.sent += len(data)
        framed = b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data
        head = self.head
        if head is not None:
            self.head = None
            framed = head + framed
        client.write(framed)

    def body_ended(self, complete: bool) -> None:
        client = self.exchange.conn.transport
        self.exchange.conn.relay_stopped()
        if not complete:
            # The shard broke off mid-body: the client sees a cut connection, never a short
            # body that looks whole.
            self.flush_head()
            self.exchange.finish("upstream_reset", keep_alive=False, abort=True)
            return
        if client is not None:
            head, self.head = self.head, None
            if self.chunked:
                client.write(b"0\r\n\r\n" if head is None else head + b"0\r\n\r\n")
            elif head is not None:
                client.write(head)
        self.exchange.finish("ok")


class H1Exchange:
    """One request of a client connection and its answer."""

    def __init__(self, conn: H1ProxyConnection, head: RequestHead) -> None:
        self.conn = conn
        self.head = head
        self.request = _request_state(head, conn.client_ip, not conn.route.port.public, conn.ctx.cookie_name)
        self.body: StreamingBody | None = None
        self.received = 0
        self.request_done = False
        self.response_started = False
        self.finished = False
        self.upgrade = False
        self.keep_alive = head.keep_alive
        self.deferred: Deferred[IUpstreamResponse] | None = None
        self.relay: _ResponseRelay | None = None
        self.timer_set = False
        """Whether this request's response timer runs (the connection's L{response_deadline})."""
        self.timed_out = False
        self.abandoned = False

    # -- the gate ------------------------------------------------------------------------------

    def start(self) -> None:
        conn, head, ctx, route = self.conn, self.head, self.conn.ctx, self.conn.route
        verdict = gate(ctx, route, self.request)
        if isinstance(verdict, Answer):
            self.answer(verdict)
            return
        self.upgrade = (conn.websockets and head.method == b"GET" and b"websocket" in head.upgrade
                        and head.version == "1.1")
        fields = client_fields_for_shard(
            head.fields, head.host, private=not route.port.public, cookie_name=ctx.cookie_name,
            forwarding=verdict.forwarding, upgrade=self.upgrade)
        if head.body != "none":
            self.body = StreamingBody(head.length, lambda: conn.pause("body"), lambda: conn.resume("body"))
            if head.expect_continue:
                # The request passed the gate: let the client send its body (RFC 9110 10.1.1).
                assert conn.transport is not None  # started from the connection's dataReceived
                conn.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        shard, port = route.shard, route.port
        d = conn.upstream.request(shard.address, port.target_port, head.method, head.target, fields,
                                  self.body, upgrade=self.upgrade)
        self.deferred = d
        d.addBoth(self._settled)
        if self.body is None:
            self.request_ended()

    def _settled(self, outcome: Any) -> None:
        """The upstream's answer: a response, or a Failure.  One callback, not a callback, an
        errback and a logging errback after them (each costs a turn of the Deferred's loop)."""
        try:
            if isinstance(outcome, Failure):
                self._upstream_failed(outcome)
            else:
                self._got_response(outcome)
        except Exception:
            self.conn.log.failure("proxying failed")

    # -- the request body ----------------------------------------------------------------------

    def body_data(self, data: bytes) -> None:
        self.received += len(data)
        limit = self.conn.ctx.max_body(self.conn.route)
        if limit and self.received > limit:
            self.abandon_upstream()
            self.answer(body_too_large(limit))
            return
        if self.body is not None:
            self.body.write(data)

    def request_ended(self) -> None:
        self.request_done = True
        if self.body is not None:
            self.body.finish()
        if not self.response_started and not self.finished and not self.timer_set:
            # The response timeout runs from the end of the request: a long upload is not the
            # shard being slow.
            self.timer_set = True
            self.conn.response_deadline.set(self.conn.ctx.response_timeout, self._time_out)

    def broken(self, rejected: Rejected) -> None:
        """The body's framing broke mid-request: the shard request is abandoned."""
        self.abandon_upstream()
        self.conn.count_rejected(rejected)
        self.answer(Answer(rejected.status, (), (rejected.reason, rejected.message)))

    def abandon_upstream(self) -> None:
        self.keep_alive = False
        self.abandoned = True
        d, self.deferred = self.deferred, None
        abandon(self.body, self.relay, d)

    def _time_out(self) -> None:
        self.timer_set = False
        self.timed_out = True
        d = self.deferred
        if d is not None and not d.called:
            d.cancel()

    # -- the response --------------------------------------------------------------------------

    def _got_response(self, response: Any) -> None:
        self._cancel_timer()
        conn = self.conn
        if self.finished or conn.transport is None:
            response.deliverBody(Protocol())
            return
        metrics.UPSTREAM_RESPONSE_SECONDS.observe(time.monotonic() - self.request.started)
        code = response.code
        self.request.status = code
        self.response_started = True
        metrics.count_request("proxy", code, self.head.method)
        if code == 101:
            self._tunnel(response)
            return
        client_11 = self.head.version == "1.1"
        lines = [_status_line(code, response.phrase)]
        fields = response_fields_for_client(response.headers.pairs)
        bodyless = self.head.method == b"HEAD" or code in (204, 304)
        chunked = False
        if bodyless:
            if code != 204:
                lines += [b"Content-Length: " + v.strip() for v in
                          response.headers.getRawHeaders(b"content-length", [])[:1] if v.strip().isdigit()]
        elif response.length is not UNKNOWN_LENGTH:
            lines.append(b"Content-Length: %d" % response.length)
        elif client_11:
            chunked = True
            lines.append(b"Transfer-Encoding: chunked")
        else:
            self.keep_alive = False  # HTTP/1.0: the end of the body is the end of the connection
        if not self.request_done:
            self.keep_alive = False  # the rest of the request body will not be read
        if conn.draining:
            self.keep_alive = False
        if not self.keep_alive:
            lines.append(b"Connection: close")
        elif not client_11:
            lines.append(b"Connection: keep-alive")
        lines += [name + b": " + value for name, value in fields]
        self.relay = relay = _ResponseRelay(self, chunked, b"\r\n".join(lines) + b"\r\n\r\n")
        response.deliverBody(relay)
        # The body bytes that came with the head went out with it; if none did, the head goes now.
        relay.flush_head()

    def _tunnel(self, response: Any) -> None:
        """The shard switched to the websocket protocol the gateway asked for."""
        conn = self.conn
        lines = [b"HTTP/1.1 101 Switching Protocols", b"Connection: Upgrade", b"Upgrade: websocket"]
        lines += [name + b": " + value for name, value in response_fields_for_client(response.headers.pairs)]
        tls = conn.transport
        assert tls is not None  # _got_response saw it connected
        tls.write(b"\r\n".join(lines) + b"\r\n\r\n")
        self.finished = True
        metrics.HTTP_TUNNELS.inc()
        conn.become_tunnel(self, response)

    def _upstream_failed(self, failure: Failure) -> None:
        self._cancel_timer()
        if self.finished or self.abandoned:
            return  # the gateway gave up on the shard itself, and answers the client so
        answer = upstream_failed(self.conn.log, self.conn.route, failure, self.timed_out)
        if self.body is not None:
            self.body.discard()
        if self.response_started:
            self.finish("upstream_reset", keep_alive=False, abort=True)
            return
        self.answer(answer)

    def answer(self, answer: Answer) -> None:
        """Answer without the shard: a refusal, a redirect, a rejection or an upstream failure."""
        if self.finished or self.conn.transport is None:
            return
        if self.response_started:
            self.finish("error", keep_alive=False, abort=True)
            return
        self.response_started = True
        self.request.status = answer.status
        if not self.request_done and not self._read_whole():
            self.keep_alive = False  # its body is not read: the connection cannot carry another
        self.conn.write_answer(answer, self.request.method, self.request.accept, self.request.version,
                               self.keep_alive)
        self.finish("answered")

    def _read_whole(self) -> bool:
        """Whether the request was read whole with its head: it has no body, and the reader did
        not stop after it (a protocol switch, or a rejection, leaves what follows unread)."""
        return self.head.body == "none" and not self.conn.reader.done

    def _cancel_timer(self) -> None:
        if self.timer_set:
            self.timer_set = False
            self.conn.response_deadline.clear()

    def finish(self, outcome: str, keep_alive: bool = True, abort: bool = False) -> None:
        if self.finished:
            return
        self.finished = True
        self._cancel_timer()
        if self.body is not None and not self.request_done:
            self.body.discard()
        # The relay refers back to this exchange: without it, an exchange and everything it
        # holds (head, state, Deferred, relay) would wait for the cyclic collector instead of
        # being freed by reference counting when its connection lets go of it.
        self.relay = None
        self.deferred = None
        self.conn.exchange_done(self, outcome, self.keep_alive and keep_alive, abort)


_STATUS_LINES: dict[tuple[int, bytes], bytes] = {}


def _status_line(code: int, phrase: bytes) -> bytes:
    """The status line for a shard's status and reason phrase (a safe one: L{safe_phrase}),
    remembered for the few pairs shards send (bounded: phrases up to 64 bytes, and the table
    starts over at 256)."""
    key = (code, phrase)
    line = _STATUS_LINES.get(key)
    if line is None:
        line = b"HTTP/1.1 %d %s" % (code, safe_phrase(phrase, REASONS.get(code, b"")))
        if len(phrase) <= 64:  # a shard's long phrases are not kept
            if len(_STATUS_LINES) >= 256:
                _STATUS_LINES.clear()
            _STATUS_LINES[key] = line
    return line


def _request_state(head: RequestHead, client_ip: str, private: bool, cookie_name: bytes) -> RequestState:
    """What the gate and the access log need of C{head} (read by L{check_head} in its one pass
    over the fields: the first Accept and Authorization, every Cookie, the forwarding claims)."""
    return RequestState(
        head.method, head.target, head.host, head.version, client_ip,
        request_token(head.authorization, head.cookies, cookie_name) if private else None,
        head.accept, head.length, False, head.forwarded_for, head.forwarded)


__all__ = ["H1Exchange"]
