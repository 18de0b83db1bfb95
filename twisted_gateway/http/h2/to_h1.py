"""
h2 clients of ``http/1.1`` shard ports: each client stream becomes one HTTP/1.1 request through
the keep-alive pool (L{twisted_gateway.http.h1.pool}).

The framing towards the shard is decided from the h2 message alone (RFC 9113 8.1): a request
whose stream ended with its headers, or before any DATA, has no body; one with a content-length
has exactly that Content-Length (the h2 library ends the connection if DATA disagrees with it);
one with DATA and no content-length, whatever its method, is sent chunked.  So DATA can never be
read by the shard as another request.  Flow control is end to end: client DATA is acknowledged
once written towards the shard while its socket takes it, and the response is sent into the
client's windows, pausing the shard's socket when they are full.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import h2.errors
import h2.exceptions
from twisted.internet import error as ierror
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from twisted_gateway import metrics
from twisted_gateway.http.body import ResponseRelay, StreamingBody, abandon
from twisted_gateway.http.framing import response_fields_for_client
from twisted_gateway.http.h2.flow import STREAM_WINDOW, Pipe
from twisted_gateway.http.h2.stream import ClientStream
from twisted_gateway.http.policy import RequestState, body_too_large
from twisted_gateway.http.upstream import IUpstream

if TYPE_CHECKING:
    from twisted_gateway.http.h2.front import H2FrontConnection


class _Relay(ResponseRelay):
    """The shard's response body into the client stream's pipe."""

    def __init__(self, exchange: H1StreamExchange) -> None:
        self.exchange = exchange
        self.paused = False

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport

    def dataReceived(self, data: bytes) -> None:
        pipe = self.exchange.response_pipe
        if self.done or pipe is None or not data:
            return
        self.exchange.request.sent += len(data)
        pipe.push(data, len(data))
        if pipe.held > STREAM_WINDOW and not self.paused:
            self.paused = True
            assert self.transport is not None  # given by makeConnection before any data
            self.transport.pauseProducing()
        self.exchange.front.flush()

    def consumed(self, size: int) -> None:
        pipe = self.exchange.response_pipe
        if self.paused and (pipe is None or pipe.held <= STREAM_WINDOW // 2):
            self.paused = False
            assert self.transport is not None  # paused through it in dataReceived
            self.transport.resumeProducing()

    def body_ended(self, complete: bool) -> None:
        self.exchange.body_ended(complete)


class H1StreamExchange(ClientStream):
    """One h2 client stream and the HTTP/1.1 request to the shard it became (never sent twice)."""

    def __init__(self, front: H2FrontConnection, stream_id: int, request: RequestState,
                 upstream: IUpstream) -> None:
        super().__init__(front, stream_id, request)
        self.upstream = upstream
        self.fields: list[tuple[bytes, bytes]] = []
        self.length: int | None = None
        self.begun = False
        self.early: list[tuple[bytes, int]] = []
        self.early_end = False
        self.body: StreamingBody | None = None
        self.body_paused = False
        self.unacked = 0
        self.received = 0
        self.deferred: Any = None
        self.relay: _Relay | None = None
        self.timed = False
        self.abandoned = False

    # -- from the client ---------------------------------------------------------------------------

    def begin(self, fields: list[tuple[bytes, bytes]], length: int | None, ended: bool) -> None:
        """The request passed the gate and was not reset in the read it came in: send it."""
        self.fields, self.length, self.begun = fields, length, True
        if ended:
            self._request_end()
            return
        early, self.early = self.early, []
        if length is not None or early:
            self._send_with_body()
            for data, flow_length in early:
                if self.finished:
                    self.front.ack(self.client_id, flow_length)  # refused (413): its window back
                else:
                    self._body_data(data, flow_length)
        # A body refused on the way (413) ends the exchange: the request is never sent again,
        # as a request without a body, in its place.
        if self.early_end and not self.finished:
            self._request_end()

    def client_data(self, data: bytes, flow_length: int) -> None:
        if self.finished:
            self.front.ack(self.client_id, flow_length)
            return
        if not self.begun:
            self.early.append((data, flow_length))
            return
        if self.deferred is None:
            self._send_with_body()
        self._body_data(data, flow_length)

    def client_ended(self, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        if self.request_ended:
            return
        self.request_ended = True
        if not self.begun:
            self.early_end = True
            return
        self._request_end()

    def client_reset(self) -> None:
        self._abandon()
        if self.response_pipe is not None:
            self.response_pipe.abandon()
        self._done("client_reset")

    def _send_with_body(self) -> None:
        self.body = StreamingBody(self.length, self._pause_body, self._resume_body)
        self._send(self.body)

    def _send(self, body: StreamingBody | None) -> None:
        route = self.front.route
        self.deferred = self.upstream.request(route.shard.address, route.port.target_port,
                                              self.request.method, self.request.target, self.fields, body)
        self.deferred.addCallbacks(self._got_response, self._failed)
        self.deferred.addErrback(lambda f: self.front.log.failure("proxying failed", f))

    def _body_data(self, data: bytes, flow_length: int) -> None:
        self.received += len(data)
        limit = self.front.ctx.max_body(self.front.route)
        if limit and self.received > limit:
            self.front.ack(self.client_id, flow_length)
            self._abandon()
            self.front.answer(self, body_too_large(limit))
            self.front.flush()
            return
        assert self.body is not None
        self.body.write(data)
        if self.body_paused:
            self.unacked += flow_length
        else:
            self.front.ack(self.client_id, flow_length)

    def _pause_body(self) -> None:
        self.body_paused = True

    def _resume_body(self) -> None:
        self.body_paused = False
        unacked, self.unacked = self.unacked, 0
        if unacked:
            self.front.ack(self.client_id, unacked)
            self.front.flush()

    def _request_end(self) -> None:
        if self.finished:
            return
        if self.deferred is None:
            self._send(None)
        elif self.body is not None:
            self.body.finish()
        if not self.finished and not self.response_started and self.timer is None:
            self.timer = self.front.reactor.callLater(self.front.ctx.response_timeout, self._timed_out)

    # -- from the shard --------------------------------------------------------------------------

    def _got_response(self, response: Any) -> None:
        # The head, and the body and end that came in the same shard read (delivered within
        # deliverBody), go to the client in one write.
        front = self.front
        front.hold()
        try:
            self._relay_response(response)
        finally:
            front.release()

    def _relay_response(self, response: Any) -> None:
        self._cancel_timer()
        front = self.front
        if self.finished or front.transport is None:
            response.deliverBody(Protocol())
            return
        code = response.code
        self.request.status = code
        self.response_started = True
        metrics.count_request("proxy", code, self.request.method)
        headers = [(b":status", b"%d" % code)]
        # response_fields_for_client drops every field h2 forbids too (RFC 9113 8.2.2).
        headers += [(name.lower(), value) for name, value in response_fields_for_client(response.headers.pairs)]
        head = self.request.method == b"HEAD"
        bodyless = head or code in (204, 304) or response.length == 0
        if isinstance(response.length, int) and not head and code not in (204, 304):
            headers.append((b"content-length", b"%d" % response.length))
        elif code != 204:
            # HEAD and 304 describe the body they would have had (RFC 9110 8.6).
            headers += [(b"content-length", v.strip()) for v in
                        response.headers.getRawHeaders(b"content-length", [])[:1] if v.strip().isdigit()]
        try:
            front.h2.send_headers(self.client_id, headers, end_stream=bodyless)
        except h2.exceptions.ProtocolError:
            response.deliverBody(Protocol())
            self.client_reset()
            return
        if bodyless:
            response.deliverBody(Protocol())
            self.response_ended = True
            if not self.request_ended:
                front.after_response(self)
            self._done("ok")
            front.flush()
            return
        self.relay = relay = _Relay(self)
        self.response_pipe = Pipe(front, self.client_id, relay.consumed)
        response.deliverBody(relay)
        front.flush()

    def body_ended(self, complete: bool) -> None:
        front = self.front
        if self.finished:
            return
        if not complete:
            # Mid-response: the client sees its stream reset, never a short body that looks whole.
            if self.response_pipe is not None:
                self.response_pipe.abandon()
            front.reset(self.client_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
            self._done("upstream_reset")
            front.flush()
            return
        self.response_ended = True
        if self.response_pipe is not None:
            self.response_pipe.finish()
        if not self.request_ended:
            front.after_response(self)
        self._done("ok")
        front.flush()

    def _failed(self, failure: Failure) -> None:
        self._cancel_timer()
        if self.finished or self.abandoned:
            return  # the gateway gave up on the shard itself
        if self.body is not None:
            self.body.discard()
        self._fail_before_response(failure, timed_out=self.timed)
        self.front.flush()

    def _timed_out(self) -> None:
        self.timer = None
        self.timed = True
        d = self.deferred
        if d is not None and not d.called:
            d.cancel()  # answered 504 by _failed
        if not self.finished:
            self._fail_before_response(Failure(ierror.TimeoutError("response timeout")), timed_out=True)
            self.front.flush()

    def _abandon(self) -> None:
        self.abandoned = True
        d, self.deferred = self.deferred, None
        abandon(self.body, self.relay, d)

    def _release(self, outcome: str) -> None:
        if outcome != "ok":
            self._abandon()
        early, self.early = self.early, []
        for _, flow_length in early:
            self.front.ack(self.client_id, flow_length)
        # Nothing more is asked of a finished exchange: drop what refers back to it (the relay,
        # its pipe, the body and the Deferred), so that reference counting frees it at once
        # instead of the cyclic collector later, which was a tenth of the CPU of a request.
        self.relay = None
        self.response_pipe = None
        self.body = None
        self.deferred = None


__all__ = ["H1StreamExchange"]
