"""
One stream of an h2 client: what the h2 front asks of every stream and the state of its answer
(L{ClientStream}), and a stream of an ``h2`` port with the h2c stream to the shard it became
(L{ShardStream}): the request passed on frame by frame (headers, body, trailers) and the
response passed back the same way, each body through a L{twisted_gateway.http.h2.flow.Pipe} so
that flow control is end to end.  Until the shard answers, a copy of the request body is kept
(bounded) so that a stream the shard's GOAWAY shows it never processed can be sent again on a
new connection.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import h2.errors
import h2.exceptions
from twisted.internet import error as ierror
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

from twisted_gateway import metrics
from twisted_gateway.http.h2.flow import Pipe
from twisted_gateway.http.h2.shard import ShardConnection
from twisted_gateway.http.policy import RequestState, body_too_large, upstream_failed

if TYPE_CHECKING:
    from twisted_gateway.http.h2.front import H2FrontConnection

REPLAY_LIMIT = 64 * 1024
"""Request body bytes kept per stream until the shard answers, so that a request the shard's
GOAWAY shows it never processed can be sent again on a new connection."""
REPLAY_CONNECTION_LIMIT = 256 * 1024
"""The most such copies one client connection may hold in all (beyond it, bodies are not kept)."""


class ClientStream:
    """
    One stream of an h2 client connection, whatever the shard speaks: the request it carries
    (L{RequestState}), how far it and its answer have got, and the response timeout.
    """

    def __init__(self, front: H2FrontConnection, stream_id: int, request: RequestState) -> None:
        self.front = front
        self.client_id = stream_id
        self.request = request
        self.received = 0
        """Request body bytes taken from the client."""
        self.response_pipe: Pipe | None = None
        self.request_ended = False
        self.response_started = False
        self.response_ended = False
        self.finished = False
        self.timer: IDelayedCall | None = None

    def client_data(self, data: bytes, flow_length: int) -> None:
        """Body bytes of the request (C{flow_length} with padding, to acknowledge)."""
        raise NotImplementedError

    def client_ended(self, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        """The request ended, with C{trailers} if it had any."""
        raise NotImplementedError

    def client_reset(self) -> None:
        """The client reset the stream (or its connection is gone)."""
        raise NotImplementedError

    def _fail_before_response(self, failure: Failure, timed_out: bool) -> None:
        self.front.answer(self, upstream_failed(self.front.log, self.front.route, failure, timed_out))

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None

    def _release(self, outcome: str) -> None:
        """The stream is finished: give back what it holds (windows, the shard's side)."""

    def _done(self, outcome: str) -> None:
        if self.finished:
            return
        self.finished = True
        self._cancel_timer()
        self._release(outcome)
        self.front.exchange_done(self, outcome)


class ShardStream(ClientStream):
    """One client stream of an ``h2`` port and the shard stream it became."""

    def __init__(self, front: H2FrontConnection, stream_id: int, request: RequestState) -> None:
        super().__init__(front, stream_id, request)
        self.shard: ShardConnection | None = None
        self.shard_id: int | None = None
        self.request_pipe: Pipe | None = None
        self.held: list[tuple[bytes, int]] = []
        self.held_end: Any = None
        self.headers_only = False
        """The request was its headers alone (END_STREAM on HEADERS), sent to the shard so."""
        self.request_headers: list[tuple[bytes, bytes]] = []
        self.replay_data: list[bytes] | None = []
        """The body so far, while it fits in L{REPLAY_LIMIT} and no response has begun."""
        self.replay_size = 0
        self.received = 0
        self._skip_acks = 0
        self.end_marker: Any = None

    # -- from the client -------------------------------------------------------------------------

    def client_data(self, data: bytes, flow_length: int) -> None:
        self.received += len(data)
        limit = self.front.ctx.max_body(self.front.route)
        if limit and self.received > limit and not self.finished:
            # limits.max_body_bytes holds on h2 ports too (a gRPC client stream included: a
            # port whose calls stream without end sets its own max_body_bytes: 0).
            self.front.ack(self.client_id, flow_length)
            if self.response_started:
                self.front.reset(self.client_id, h2.errors.ErrorCodes.CANCEL)
                if self.response_pipe is not None:
                    self.response_pipe.abandon()
                self._cancel_shard()
                self._done("too_large")
            else:
                self._cancel_shard()
                self.front.answer(self, body_too_large(limit))
            return
        if self.replay_data is not None:
            if self.replay_size + len(data) > REPLAY_LIMIT or \
                    self.front.replay_held + len(data) > REPLAY_CONNECTION_LIMIT:
                self._drop_replay()
            else:
                self.replay_size += len(data)
                self.front.replay_held += len(data)
                self.replay_data.append(data)
        if self.request_pipe is not None:
            self.request_pipe.push(data, flow_length)
        elif self.finished:
            self.front.ack(self.client_id, flow_length)
        else:
            # Not yet acknowledged: the client's stream window bounds what is held here.
            self.held.append((data, flow_length))

    def client_ended(self, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        if self.request_ended:
            return
        self.request_ended = True
        self.end_marker = trailers if trailers is not None else True
        if self.request_pipe is not None:
            self.request_pipe.finish(trailers)
        elif not self.headers_only:
            self.held_end = self.end_marker
        if not self.finished and not self.response_started:
            # The response timeout runs from the end of the request: a long upload is not the
            # shard being slow.
            self.timer = self.front.reactor.callLater(self.front.ctx.response_timeout, self._timed_out)

    def client_reset(self) -> None:
        if self.response_pipe is not None:
            self.response_pipe.abandon()
        self._cancel_shard()
        self._done("client_reset")

    # -- from the shard ----------------------------------------------------------------------------

    def opened(self, shard: ShardConnection, stream_id: int) -> None:
        self.shard_id = stream_id
        if self.headers_only:
            return
        self.request_pipe = Pipe(shard, stream_id, self._request_consumed)
        held, self.held = self.held, []
        for data, flow_length in held:
            self.request_pipe.push(data, flow_length)
        if self.held_end is not None:
            self.request_pipe.finish(None if self.held_end is True else self.held_end)

    def _request_consumed(self, size: int) -> None:
        skip = min(self._skip_acks, size)
        self._skip_acks -= skip
        if size > skip:
            self.front.ack(self.client_id, size - skip)

    def _drop_replay(self) -> None:
        self.replay_data = None
        self.front.replay_held -= self.replay_size
        self.replay_size = 0

    def replay(self) -> bool:
        """The shard never processed this stream: send it again on a new connection."""
        if self.finished or self.response_started or self.replay_data is None:
            return False
        old, self.request_pipe = self.request_pipe, None
        if old is not None:
            # Part of the body went out (and was acknowledged to the client), part is still in
            # the pipe: let the pipe acknowledge the rest, then send all of it again from the
            # copy, without acknowledging it a second time.
            old.abandon()
            self.held = [(data, len(data)) for data in self.replay_data]
            self._skip_acks = sum(len(data) for data in self.replay_data)
            self.held_end = self.end_marker
        # (A stream that was still waiting for a slot has its body in self.held, unacknowledged.)
        shard = self.front.shard_connection()
        self.shard = shard
        shard.open(self, self.request_headers, end_stream=self.headers_only)
        return True

    def response(self, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        if self.finished:
            return
        self._cancel_timer()
        self.response_started = True
        for name, value in headers:
            if name == b":status":
                self.request.status = int(value)
                break
        metrics.UPSTREAM_RESPONSE_SECONDS.observe(time.monotonic() - self.request.started)
        metrics.count_request("proxy", self.request.status, self.request.method)
        self._drop_replay()  # the shard has it: never sent twice
        front = self.front
        try:
            # A response of headers alone (gRPC's trailers-only error) keeps its END_STREAM.
            front.h2.send_headers(self.client_id, headers, end_stream=ended)
        except h2.exceptions.ProtocolError:
            self.client_reset()
            return
        if ended:
            self.response_ended = True
            if not self.request_ended:
                front.after_response(self)
            self._done("ok")
            return
        assert self.shard is not None and self.shard_id is not None
        shard, shard_id = self.shard, self.shard_id
        self.response_pipe = Pipe(front, self.client_id, lambda size: shard.ack(shard_id, size))

    def data(self, data: bytes, flow_length: int) -> None:
        if self.response_pipe is None:
            assert self.shard is not None and self.shard_id is not None
            self.shard.ack(self.shard_id, flow_length)
            return
        self.request.sent += len(data)
        self.response_pipe.push(data, flow_length)

    def trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        self._end_response(headers)

    def ended(self) -> None:
        self._end_response(None)

    def _end_response(self, trailers: list[tuple[bytes, bytes]] | None) -> None:
        if self.response_ended or self.response_pipe is None:
            return
        self.response_ended = True
        self.response_pipe.finish(trailers)
        if not self.request_ended:
            # The shard answered in full before the request ended: tell the client to stop
            # sending (RFC 9113 8.1), once the response has gone out.
            self.front.after_response(self)
        self._done("ok")

    def failed(self, failure: Failure) -> None:
        if self.finished:
            return
        if self.response_started:
            # Mid-response: the client sees its stream reset, never a short body that looks whole.
            if self.response_pipe is not None:
                self.response_pipe.abandon()
            self.front.reset(self.client_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
            self._done("upstream_reset")
            return
        self._fail_before_response(failure, timed_out=False)

    def _timed_out(self) -> None:
        self.timer = None
        self._cancel_shard()
        self._fail_before_response(Failure(ierror.TimeoutError("response timeout")), timed_out=True)
        self.front.flush_both()

    # -- end -----------------------------------------------------------------------------------

    def _cancel_shard(self) -> None:
        if self.request_pipe is not None:
            self.request_pipe.abandon()
        if self.shard is not None and not self.response_ended:
            self.shard.cancel(self, self.shard_id)

    def _release(self, outcome: str) -> None:
        self._drop_replay()
        held, self.held = self.held, []
        for _, flow_length in held:
            self.front.ack(self.client_id, flow_length)


__all__ = ["REPLAY_CONNECTION_LIMIT", "REPLAY_LIMIT", "ClientStream", "ShardStream"]
