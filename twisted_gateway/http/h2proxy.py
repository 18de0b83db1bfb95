"""
The reverse proxy for shard ports declared ``h2``.

The shard is spoken to in HTTP/2 over cleartext with prior knowledge (h2c), the way gRPC
servers listen.  Each client connection gets its own connection to the shard, opened at its
first request and closed with it.

- A client that negotiates ``h2`` is proxied frame by frame (L{H2FrontConnection}): each of its
  streams becomes a stream to the shard, with the request checked first (token, rate limits)
  exactly as on ``http/1.1`` ports.  Headers, bodies and trailers pass both ways, so gRPC works
  end to end, including streaming calls and the ``grpc-status`` trailers.  A stream reset on one
  side resets the other.
- A client that negotiates ``http/1.1`` goes through the ordinary HTTP/1.1 route
  (L{twisted_gateway.http.proxy}) with L{H2Upstream} in place of the HTTP/1.1 pool.  HTTP/1.1
  responses cannot carry the shard's trailers through twisted.web, so those are dropped.

Flow control is end to end: body bytes are acknowledged to the side that sent them (opening its
window again) only once they have been passed into the other side's connection, and nothing is
passed on while that side's socket buffer is full.  So the gateway holds at most a window's
worth of a stream's body, however fast one side is and however slow the other.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.iweb import UNKNOWN_LENGTH

from twisted_gateway import metrics
from twisted_gateway.fastwrite import write_now
from twisted_gateway.directory.model import Route
from twisted_gateway.http.errors import negotiate, render_error
from twisted_gateway.http.framing import authority_host, h2_field_problem, h2_target_problem
from twisted_gateway.http.upstream import RawHeaders, upstream_failure_answer
from twisted_gateway.http.policy import (
    Answer, auth_redirect, authorize, forwarding_headers, rate_limit_wait, refusal, request_token,
    strip_cookie,
)
from twisted_gateway.limits import retry_after_header

STREAM_WINDOW = 256 * 1024
"""The flow-control window the gateway gives each stream, on both sides."""
CONNECTION_WINDOW = 1024 * 1024
"""The flow-control window of a whole connection, on both sides."""
MAX_STREAMS = 100
"""Concurrent streams a client may open."""
REPLAY_LIMIT = 64 * 1024
"""Request body bytes kept per stream until the shard answers, so that a request the shard's
GOAWAY shows it never processed can be sent again on a new connection."""
REPLAY_CONNECTION_LIMIT = 256 * 1024
"""The most such copies one client connection may hold in all (beyond it, bodies are not kept)."""
_DEFAULT_WINDOW = 65535

# gRPC status codes (grpc/doc/statuscodes.md) for the errors the gateway answers itself.
_GRPC_STATUS = {400: 13, 401: 16, 403: 7, 404: 12, 429: 8, 502: 14, 503: 14, 504: 4}


class ShardError(Exception):
    """The shard reset a stream, or went away before it was processed."""


class _H2Peer(Protocol):
    """One HTTP/2 connection the gateway is an end of, client- or shard-facing."""

    h2: h2.connection.H2Connection
    write_paused = False
    partner: _H2Peer | None = None

    def __init__(self) -> None:
        self.pipes: dict[int, _Pipe] = {}
        """The bodies waiting to be sent into this connection, by stream."""

    def flush(self) -> None:
        if self.transport is not None:
            data = self.h2.data_to_send()
            if data:
                write_now(self.transport, data)

    def flush_both(self) -> None:
        self.flush()
        if self.partner is not None:
            self.partner.flush()

    def pump_all(self) -> None:
        for pipe in list(self.pipes.values()):
            pipe.pump()

    def pump_stream(self, stream_id: int) -> None:
        if stream_id == 0:
            self.pump_all()
        else:
            pipe = self.pipes.get(stream_id)
            if pipe is not None:
                pipe.pump()

    # The transport calls these when its write buffer fills and drains (IPushProducer).
    def pauseProducing(self) -> None:
        self.write_paused = True

    def resumeProducing(self) -> None:
        self.write_paused = False
        self.pump_all()
        self.flush_both()

    def stopProducing(self) -> None:
        pass

    def ack(self, stream_id: int, size: int) -> None:
        """Open the window of C{stream_id} again by C{size} body bytes it sent us."""
        if size and self.transport is not None:
            try:
                self.h2.acknowledge_received_data(size, stream_id)
            except h2.exceptions.ProtocolError:
                pass  # the connection is closing


class _Pipe:
    """
    The body of one stream on its way into an h2 connection (the sink), sent as the sink's
    flow-control windows allow and while its socket is writable.  Each byte is reported to
    C{consumed} once sent, so that the sender's window, not the gateway's memory, holds the
    backlog.
    """

    def __init__(self, sink: _H2Peer, stream_id: int, consumed: Callable[[int], None]) -> None:
        self.sink = sink
        self.stream_id = stream_id
        self.consumed = consumed
        self.on_done: Callable[[], None] | None = None
        """Called once the stream's end has been sent (or it was abandoned)."""
        self.chunks: deque[list[Any]] = deque()
        self.end: Any = None
        """None while open; True to end the stream; a header list to end it with trailers."""
        self.done = False
        self.held = 0
        sink.pipes[stream_id] = self

    def push(self, data: bytes, flow_length: int) -> None:
        if self.done:
            self.consumed(flow_length)
            return
        # Padding counts against the window too; it is acknowledged with the chunk's last byte.
        self.chunks.append([data, flow_length - len(data)])
        self.held += len(data)
        self.pump()

    def finish(self, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        if self.end is None:
            self.end = trailers if trailers is not None else True
        self.pump()

    def pump(self) -> None:
        sink = self.sink
        if self.done or sink.write_paused or sink.transport is None:
            return
        conn = sink.h2
        sid = self.stream_id
        try:
            while self.chunks:
                data, padding = self.chunks[0]
                window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if window <= 0:
                    return
                if len(data) <= window:
                    conn.send_data(sid, data)
                    self.chunks.popleft()
                    self.held -= len(data)
                    self.consumed(len(data) + padding)
                else:
                    conn.send_data(sid, data[:window])
                    self.chunks[0][0] = data[window:]
                    self.held -= window
                    self.consumed(window)
            if self.end is not None:
                if self.end is True:
                    conn.end_stream(sid)
                else:
                    conn.send_headers(sid, self.end, end_stream=True)
                self._close()
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.abandon()

    def abandon(self) -> None:
        """The sink stream is gone: give back the window of what is held, and drop it."""
        if self.done:
            return
        held = sum(len(data) + padding for data, padding in self.chunks)
        self.chunks.clear()
        self.held = 0
        self._close()
        if held:
            self.consumed(held)

    def _close(self) -> None:
        self.done = True
        if self.sink.pipes.get(self.stream_id) is self:
            del self.sink.pipes[self.stream_id]
        if self.on_done is not None:
            on_done, self.on_done = self.on_done, None
            on_done()


def _h2_config(client_side: bool) -> h2.config.H2Configuration:
    """
    Headers arriving from either side are validated (RFC 9113 8.2); what the gateway sends on
    is either those validated headers or its own, lowercase and well formed, so the outbound
    checks (a good part of h2's CPU per request) are skipped.
    """
    return h2.config.H2Configuration(client_side=client_side, header_encoding=None,
                                     validate_outbound_headers=False, normalize_outbound_headers=False,
                                     validate_inbound_headers=True, normalize_inbound_headers=True)


def _h2_settings(client: bool, max_header_bytes: int) -> h2.settings.Settings:
    values = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
              h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: max_header_bytes}
    if client:
        values[h2.settings.SettingCodes.ENABLE_PUSH] = 0
    else:
        values[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = MAX_STREAMS
    return h2.settings.Settings(client=client, initial_values=values)


class ShardConnection(_H2Peer):
    """
    An h2c (prior knowledge) connection to one shard port.  Streams are opened for listeners
    (an L{_Exchange} or an L{_UpstreamStream}), which receive the shard's answer:
    C{opened(shard, stream_id)}, C{response(headers, ended)}, C{data(data, flow_length)},
    C{trailers(headers)}, C{ended()}, C{failed(failure)}.
    """

    log = Logger()

    def __init__(self, reactor: Any, address: str, port: int, connect_timeout: float,
                 on_lost: Callable[[ShardConnection], None]) -> None:
        super().__init__()
        self.address, self.port = address, port
        self.on_lost = on_lost
        self.listeners: dict[int, Any] = {}
        self.waiting: deque[tuple[Any, list[tuple[bytes, bytes]], bool]] = deque()
        self.state = "connecting"
        self.going_away = False
        self._connector = reactor.connectTCP(address, port, _ShardFactory(self), timeout=connect_timeout)

    # -- connection ------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.h2 = h2.connection.H2Connection(_h2_config(client_side=True))
        self.h2.local_settings = _h2_settings(True, 64 * 1024)
        self.h2.decoder.max_header_list_size = 64 * 1024
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - _DEFAULT_WINDOW)
        self.transport.setTcpNoDelay(True)
        self.transport.registerProducer(self, True)
        self.state = "open"
        self._open_waiting()
        self.flush_both()  # the client's held body bytes were acknowledged too

    def connect_failed(self, reason: Failure) -> None:
        self.state = "closed"
        self._fail_everyone(reason)
        self.on_lost(self)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.state = "closed"
        self.transport = None
        for pipe in list(self.pipes.values()):
            pipe.abandon()
        self._fail_everyone(Failure(ShardError(f"the shard closed the connection ({reason.getErrorMessage()})"
                                               if reason is not None else "the shard closed the connection")))
        self.on_lost(self)

    def _fail_everyone(self, reason: Failure) -> None:
        listeners = [listener for listener, _, _ in self.waiting] + list(self.listeners.values())
        self.waiting.clear()
        self.listeners.clear()
        for listener in listeners:
            listener.failed(reason)

    def close(self) -> None:
        """The client connection is gone: nothing more will be asked of the shard."""
        self.waiting.clear()
        self.listeners.clear()
        if self.state == "connecting":
            self.state = "closed"
            self._connector.disconnect()
        elif self.transport is not None:
            try:
                self.h2.close_connection()
                self.flush()
            except h2.exceptions.ProtocolError:
                pass
            self.transport.loseConnection()

    @property
    def usable(self) -> bool:
        return self.state in ("connecting", "open") and not self.going_away

    # -- streams ---------------------------------------------------------------------------------

    def open(self, listener: Any, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        self.waiting.append((listener, headers, end_stream))
        if self.state == "open":
            self._open_waiting()

    def cancel(self, listener: Any, stream_id: int | None) -> None:
        """The listener no longer wants its stream: reset it, or never open it."""
        if stream_id is None:
            self.waiting = deque(w for w in self.waiting if w[0] is not listener)
            return
        self.listeners.pop(stream_id, None)
        pipe = self.pipes.get(stream_id)
        if pipe is not None:
            pipe.abandon()
        if self.transport is not None:
            try:
                self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
            except h2.exceptions.ProtocolError:
                pass
            self._open_waiting()

    def _open_waiting(self) -> None:
        limit = self.h2.remote_settings.max_concurrent_streams
        # len(listeners), not h2's open_outbound_streams, which walks every stream each call.
        while self.waiting and len(self.listeners) < limit:
            listener, headers, end_stream = self.waiting.popleft()
            stream_id = self.h2.get_next_available_stream_id()
            try:
                self.h2.send_headers(stream_id, headers, end_stream=end_stream)
            except h2.exceptions.ProtocolError as e:
                listener.failed(Failure(ShardError(f"request not sendable: {e}")))
                continue
            self.listeners[stream_id] = listener
            listener.opened(self, stream_id)

    def dataReceived(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            metrics.HTTP2_PROTOCOL_ERRORS.labels(peer="shard").inc()
            self.log.warn("shard {address}:{port} broke HTTP/2: {error}", address=self.address,
                          port=self.port, error=protocol_error_kind(e))
            self.flush()
            self.transport.loseConnection()
            return
        for event in events:
            listener = self.listeners.get(getattr(event, "stream_id", 0) or 0)
            if isinstance(event, h2.events.ResponseReceived):
                if listener is not None:
                    listener.response(event.headers, event.stream_ended is not None)
            elif isinstance(event, h2.events.DataReceived):
                if listener is not None:
                    listener.data(event.data, event.flow_controlled_length)
                else:
                    self.ack(event.stream_id, event.flow_controlled_length)
            elif isinstance(event, h2.events.TrailersReceived):
                if listener is not None:
                    listener.trailers(event.headers)
            elif isinstance(event, h2.events.StreamEnded):
                if listener is not None:
                    del self.listeners[event.stream_id]
                    listener.ended()
            elif isinstance(event, h2.events.StreamReset):
                pipe = self.pipes.get(event.stream_id)
                if pipe is not None:
                    pipe.abandon()
                if listener is not None:
                    del self.listeners[event.stream_id]
                    listener.failed(Failure(ShardError(
                        f"the shard reset the stream ({_error_name(event.error_code)})")))
            elif isinstance(event, h2.events.WindowUpdated):
                self.pump_stream(event.stream_id)
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                self.pump_all()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._goaway(event.last_stream_id or 0)
        if self.state == "open":
            self._open_waiting()
        self.flush_both()

    def _goaway(self, last_stream_id: int) -> None:
        """
        The shard is closing (a restart, or gRPC's max connection age).  The streams it says it
        never processed are sent again on a new connection when their listener still has
        everything it sent (L{REPLAY_LIMIT}); otherwise they fail.  The rest may finish here.
        """
        self.going_away = True
        unprocessed = [self.listeners.pop(sid) for sid in sorted(self.listeners) if sid > last_stream_id]
        unprocessed += [listener for listener, _, _ in self.waiting]
        self.waiting.clear()
        failure = Failure(ShardError("the shard closed the connection (GOAWAY) before the request"))
        for listener in unprocessed:
            if listener.replay():
                metrics.UPSTREAM_REPLAYS.inc()
            else:
                listener.failed(failure)
        if not self.listeners and self.transport is not None:
            self.transport.loseConnection()


class _ShardFactory(ClientFactory):
    noisy = False

    def __init__(self, conn: ShardConnection) -> None:
        self.conn = conn

    def buildProtocol(self, addr: Any) -> ShardConnection:
        return self.conn

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if self.conn.state == "connecting":
            self.conn.connect_failed(reason)


def _error_name(code: Any) -> str:
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return str(code)


# -- h2 clients ---------------------------------------------------------------------------------

class _Exchange:
    """One client stream and the shard stream it became."""

    def __init__(self, front: H2FrontConnection, stream_id: int, method: bytes, path: bytes,
                 accept: bytes | None, grpc: bool) -> None:
        self.front = front
        self.client_id = stream_id
        self.method, self.path, self.accept, self.grpc = method, path, accept, grpc
        self.shard: ShardConnection | None = None
        self.shard_id: int | None = None
        self.request_pipe: _Pipe | None = None
        self.response_pipe: _Pipe | None = None
        self.held: list[tuple[bytes, int]] = []
        self.held_end: Any = None
        self.headers_only = False
        """The request was its headers alone (END_STREAM on HEADERS), sent to the shard so."""
        self.request_headers: list[tuple[bytes, bytes]] = []
        self.replay_data: list[bytes] | None = []
        """The body so far, while it fits in L{REPLAY_LIMIT} and no response has begun."""
        self.replay_size = 0
        self._skip_acks = 0
        self.end_marker: Any = None
        self.request_ended = False
        self.response_started = False
        self.response_ended = False
        self.finished = False
        self.status = 0
        self.sent = 0
        self.started = time.monotonic()
        self.timer: Any = None

    # -- from the client -------------------------------------------------------------------------

    def client_data(self, data: bytes, flow_length: int) -> None:
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
        self.request_pipe = _Pipe(shard, stream_id, self._request_consumed)
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
        shard = self.front._shard()
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
                self.status = int(value)
                break
        metrics.UPSTREAM_RESPONSE_SECONDS.observe(time.monotonic() - self.started)
        metrics.count_request("proxy", self.status, self.method)
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
        self.response_pipe = _Pipe(front, self.client_id, lambda size: shard.ack(shard_id, size))

    def data(self, data: bytes, flow_length: int) -> None:
        if self.response_pipe is None:
            assert self.shard is not None and self.shard_id is not None
            self.shard.ack(self.shard_id, flow_length)
            return
        self.sent += len(data)
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

    def _fail_before_response(self, failure: Failure, timed_out: bool) -> None:
        route = self.front.route
        status, code, message, reason = upstream_failure_answer(failure, route.shard.id, timed_out)
        if reason in ("timeout", "refused", "unreachable"):
            metrics.UPSTREAM_CONNECT_FAILURES.labels(reason=reason).inc()
        self.front.log.warn("proxy to {shard} {address}:{port} failed: {code} ({error})",
                            shard=route.shard.id, address=route.shard.address,
                            port=route.port.target_port, code=code, error=failure.getErrorMessage())
        self.front.answer(self, Answer(status, (), (code, message)))

    # -- end -----------------------------------------------------------------------------------

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None

    def _cancel_shard(self) -> None:
        if self.request_pipe is not None:
            self.request_pipe.abandon()
        if self.shard is not None and not self.response_ended:
            self.shard.cancel(self, self.shard_id)

    def _done(self, outcome: str) -> None:
        if self.finished:
            return
        self.finished = True
        self._cancel_timer()
        self._drop_replay()
        held, self.held = self.held, []
        for _, flow_length in held:
            self.front.ack(self.client_id, flow_length)
        self.front.exchange_done(self, outcome)


class H2FrontConnection(_H2Peer):
    """An h2 client connection to an ``h2`` shard port, proxied stream by stream."""

    log = Logger()

    def __init__(self, route: Route, ctx: Any, max_header_bytes: int, idle_timeout: float,
                 server_name: str | None = None, pool: Any = None) -> None:
        super().__init__()
        self.route = route
        self.ctx = ctx
        self.reactor = ctx.reactor
        self.max_header_bytes = max_header_bytes
        self.idle_timeout = idle_timeout
        self.server_name = (server_name or "").lower().rstrip(".").encode()
        self.pool = pool
        """The HTTP/1.1 pool for an ``http/1.1`` port; None: the shard speaks h2c."""
        limits = ctx.limits
        self.reset_rate = float(limits.h2_reset_rate)
        self.reset_burst = float(limits.h2_reset_burst)
        self.reset_tokens = self.reset_burst
        self.reset_stamp = self.reactor.seconds()
        self.max_pending_control = limits.h2_max_pending_control
        self.pending_control = 0
        self.to_open: list[tuple[_Exchange, Callable[[], None]]] = []
        self.exchanges: dict[int, _Exchange] = {}
        self.shard: ShardConnection | None = None
        self.shards: set[ShardConnection] = set()
        self.replay_held = 0
        """Bytes of request bodies kept for replay, over all streams (L{REPLAY_CONNECTION_LIMIT})."""
        self.closing = False
        self._idle: Any = None
        self._stall: Any = None
        self.lost = False

    # -- connection ------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.h2 = h2.connection.H2Connection(_h2_config(client_side=False))
        self.h2.local_settings = _h2_settings(False, self.max_header_bytes)
        # Initial settings never go through h2's settings-acknowledged path, which is where it
        # would apply this limit to its HPACK decoder: apply it here.
        self.h2.decoder.max_header_list_size = self.max_header_bytes
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - _DEFAULT_WINDOW)
        self.transport.registerProducer(self, True)
        self.flush()
        self._arm_idle()

    def dataReceived(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            metrics.HTTP2_PROTOCOL_ERRORS.labels(peer="client").inc()
            self.log.info("h2 client {client} broke the protocol: {error}", client=self._client_ip(),
                          error=protocol_error_kind(e))
            self.flush()  # the GOAWAY h2 prepared
            self.transport.loseConnection()
            return
        for event in events:
            if self.transport is None:
                return
            if isinstance(event, h2.events.RequestReceived):
                self._request(event.stream_id, event.headers, event.stream_ended is not None)
            elif isinstance(event, h2.events.DataReceived):
                exchange = self.exchanges.get(event.stream_id)
                if exchange is not None:
                    exchange.client_data(event.data, event.flow_controlled_length)
                else:
                    self.ack(event.stream_id, event.flow_controlled_length)
            elif isinstance(event, h2.events.StreamEnded):
                exchange = self.exchanges.get(event.stream_id)
                if exchange is not None:
                    exchange.client_ended()
            elif isinstance(event, h2.events.TrailersReceived):
                exchange = self.exchanges.get(event.stream_id)
                if exchange is not None:
                    exchange.client_ended(list(event.headers))
            elif isinstance(event, h2.events.StreamReset):
                exchange = self.exchanges.get(event.stream_id)
                if exchange is not None:
                    premature = not exchange.response_ended
                    exchange.client_reset()
                    if premature and not self._take_reset():
                        self._calm_down("rapid_reset")
                        return
            elif isinstance(event, h2.events.WindowUpdated):
                self.pump_stream(event.stream_id)
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                self.pump_all()
                if not self._count_control():
                    return
            elif isinstance(event, h2.events.PingReceived):
                if not self._count_control():
                    return
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.closing = True
                if not self.exchanges:
                    self.transport.loseConnection()
        # Streams are opened towards the shard only after the whole read was handled, so a
        # stream the client reset in the same read never reaches the shard (CVE-2023-44487).
        to_open, self.to_open = self.to_open, []
        for exchange, open_ in to_open:
            if not exchange.finished:
                open_()
        self.flush_both()

    def _take_reset(self) -> bool:
        """Spend one reset of the client's budget (a token bucket); False when none is left."""
        now = self.reactor.seconds()
        self.reset_tokens = min(self.reset_burst, self.reset_tokens + (now - self.reset_stamp) * self.reset_rate)
        self.reset_stamp = now
        if self.reset_tokens < 1:
            return False
        self.reset_tokens -= 1
        return True

    def _count_control(self) -> bool:
        """A PING or SETTINGS that h2 acknowledges: bounded while the client reads nothing."""
        if not self.write_paused:
            return True
        self.pending_control += 1
        if self.pending_control > self.max_pending_control:
            self._calm_down("control_flood")
            return False
        return True

    def _calm_down(self, kind: str) -> None:
        """GOAWAY ENHANCE_YOUR_CALM and close: the client abuses the protocol."""
        metrics.H2_ABUSE.labels(kind=kind).inc()
        self.log.info("h2 client {client} closed: {kind}", client=self._client_ip(), kind=kind)
        self.to_open = []
        try:
            self.h2.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
            self.flush()
        except h2.exceptions.ProtocolError:
            pass
        if kind == "control_flood":
            self.transport.abortConnection()  # it does not read: nothing more would go out
        else:
            self.transport.loseConnection()
        for exchange in list(self.exchanges.values()):
            exchange.client_reset()

    def resumeProducing(self) -> None:
        self.pending_control = 0
        if self._stall is not None and self._stall.active():
            self._stall.cancel()
        self._stall = None
        super().resumeProducing()

    def pauseProducing(self) -> None:
        super().pauseProducing()
        if self._stall is None and self.transport is not None:
            self._stall = self.reactor.callLater(self.idle_timeout, self._stalled)

    def _stalled(self) -> None:
        """The client has read nothing for limits.http_idle_timeout: let its streams go."""
        self._stall = None
        if self.transport is not None:
            self.log.info("h2 client {client} stopped reading: closing", client=self._client_ip())
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = True
        self._cancel_idle()
        if self._stall is not None and self._stall.active():
            self._stall.cancel()
        for exchange in list(self.exchanges.values()):
            exchange.client_reset()
        for shard in list(self.shards):
            shard.close()
        self.shards.clear()
        self.shard = None
        self.transport = None

    def drain(self) -> None:
        """The gateway is stopping: GOAWAY, then close once the open streams have finished."""
        if self.transport is None or self.closing:
            return
        self.closing = True
        self.h2.close_connection()
        self.flush()
        if not self.exchanges:
            self.transport.loseConnection()

    def _arm_idle(self) -> None:
        self._cancel_idle()
        if self.idle_timeout and not self.exchanges and not self.lost:
            self._idle = self.reactor.callLater(self.idle_timeout, self.drain)

    def _cancel_idle(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None

    # -- requests ----------------------------------------------------------------------------------

    def _request(self, stream_id: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        self._cancel_idle()
        private = not self.route.port.public
        pseudo: dict[bytes, bytes] = {}
        regular: list[tuple[bytes, bytes]] = []
        authorization = accept = content_type = content_length = None
        hosts: list[bytes] = []
        cookies: list[bytes] = []
        forwarded_for: list[bytes] = []
        forwarded: list[bytes] = []
        problem: str | None = None
        for name, value in headers:
            if name[:1] == b":":
                pseudo[name] = value
                continue
            if problem is None:
                problem = h2_field_problem(name, value)
            if name == b"authorization":
                authorization = value
                if private:
                    continue  # the token never reaches the shard
            elif name == b"cookie":
                cookies.append(value)
                if private:
                    value = strip_cookie(value, self.ctx.cookie_name)
                    if not value:
                        continue
            elif name == b"accept":
                accept = value
            elif name == b"content-type":
                content_type = value
            elif name == b"x-forwarded-for":
                forwarded_for.append(value)
                continue
            elif name == b"forwarded":
                forwarded.append(value)
                continue
            elif name == b"host":
                hosts.append(value)
                continue
            elif name in (b"x-forwarded-proto", b"x-forwarded-host", b"http2-settings") or name.startswith(b"proxy-"):
                continue
            elif name == b"expect" and self.pool is not None:
                continue
            elif name == b"content-length":
                content_length = value
                if self.pool is not None:
                    continue  # the HTTP/1.1 upstream writes its own framing
            elif name in (b"te", b"trailer") and self.pool is not None:
                continue  # hop-by-hop on an HTTP/1.1 hop ("te: trailers" means nothing there)
            regular.append((name, value))
        method = pseudo.get(b":method", b"GET")
        path = pseudo.get(b":path", b"/")
        authority = pseudo.get(b":authority", b"")
        problem = problem or h2_target_problem(method, path)
        if problem is None and pseudo.get(b":scheme", b"https") not in (b"https", b"http"):
            problem = ":scheme is not https"
        if problem is None and len(hosts) > 1:
            problem = "more than one host field"
        if problem is None and hosts and authority and hosts[0] != authority:
            problem = "host differs from :authority"
        if problem is not None:
            # RFC 9113 8.1.1: a malformed request is a stream error, never a request upstream.
            metrics.HTTP_REJECTED.labels(reason="bad_request").inc()
            self.log.info("h2 request from {client} refused: {problem}", client=self._client_ip(), problem=problem)
            self.reset(stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            if not self.exchanges:
                self._arm_idle()  # a refused stream is no activity
            return
        authority = authority or (hosts[0] if hosts else b"")
        exchange_class = _Exchange if self.pool is None else _h1_exchange_class()
        exchange = exchange_class(self, stream_id, method, path, accept,
                                  grpc=(content_type or b"").startswith(b"application/grpc"))
        self.exchanges[stream_id] = exchange
        host = authority_host(authority)
        if host is None or (self.server_name and host != self.server_name):
            metrics.HTTP_REJECTED.labels(reason="misdirected" if host else "bad_request").inc()
            self.answer(exchange, Answer(421 if host else 400, (), (
                "misdirected" if host else "bad_request",
                ":authority names another host than the TLS name" if host else "no valid :authority")))
            return
        if method == b"CONNECT":
            self.answer(exchange, Answer(405, ((b"allow", b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),),
                                         ("method_not_allowed", "CONNECT is not proxied to shards")))
            return
        if method == b"GET" and path.split(b"?", 1)[0] == b"/auth-redirect":
            self.answer(exchange, auth_redirect(self.ctx, path.decode("latin-1").partition("?")[2],
                                                self.route.shard.task))
            return
        decision = None
        token = None
        if private:
            token = request_token(authorization, cookies, self.ctx.cookie_name)
            decision = authorize(self.ctx, token, self.route.shard.task)
            if not decision.allowed:
                original = f"https://{authority.decode('latin-1')}{path.decode('latin-1')}"
                wants_html = negotiate(accept) == "html"
                self.answer(exchange, refusal(self.ctx, decision, method, wants_html, original))
                return
        client_ip = self._client_ip()
        wait = rate_limit_wait(self.ctx, client_ip, decision, lambda: token)
        if wait:
            self.answer(exchange, Answer(429, ((b"retry-after", retry_after_header(wait)),),
                                         ("rate_limited", f"too many requests: retry in {max(1, round(wait))} s")))
            return
        limit = self.ctx.max_body(self.route)
        declared = int(content_length) if content_length is not None and content_length.isdigit() else None
        if limit and declared is not None and declared > limit:
            metrics.HTTP_REJECTED.labels(reason="too_large").inc()
            self.answer(exchange, Answer(413, (), ("too_large", f"the request body is over {limit} bytes")))
            return
        trusted = self.ctx.trusted(client_ip)
        forwarding = forwarding_headers(forwarded_for, forwarded, client_ip, authority, trusted=trusted)
        if self.pool is not None:
            fields = [(b"host", authority)] + regular + forwarding
            opener: Callable[[], None] = lambda: exchange.begin(fields, declared, ended)  # type: ignore[attr-defined]
            self.to_open.append((exchange, opener))
            return
        out = [(b":method", method), (b":scheme", pseudo.get(b":scheme", b"https")),
               (b":authority", authority), (b":path", path)]
        out += regular
        out += forwarding
        exchange.headers_only = ended
        exchange.request_headers = out

        def open_on_shard() -> None:
            shard = self._shard()
            exchange.shard = shard
            shard.open(exchange, out, end_stream=ended)
        self.to_open.append((exchange, open_on_shard))

    def _client_ip(self) -> str:
        peer = self.transport.getPeer() if self.transport is not None else None
        return str(getattr(peer, "host", "?"))

    def _shard(self) -> ShardConnection:
        """The connection new streams go to (a new one once the last is going away)."""
        if self.shard is None or not self.shard.usable:
            route = self.route
            self.shard = ShardConnection(self.reactor, route.shard.address, route.port.target_port,
                                         self.ctx.connect_timeout, self._shard_lost)
            self.shard.partner = self
            self.shards.add(self.shard)
        return self.shard

    def _shard_lost(self, shard: ShardConnection) -> None:
        self.shards.discard(shard)
        if self.shard is shard:
            self.shard = None
        if self.transport is not None:
            self.flush()

    def flush_both(self) -> None:
        # Besides the current shard connection, one that is going away may still be finishing
        # streams, and acknowledgements for those are due too.
        self.flush()
        for shard in list(self.shards):
            shard.flush()

    # -- answers -----------------------------------------------------------------------------------

    def answer(self, exchange: _Exchange, answer: Answer) -> None:
        """Answer a stream without the shard: a refusal, a redirect or an upstream failure."""
        if exchange.finished or self.transport is None:
            return
        exchange.response_started = True
        exchange.status = answer.status
        metrics.count_request("proxy", answer.status, exchange.method)
        sid = exchange.client_id
        # No field value the gateway writes holds CR, LF or another control byte.
        headers = [(b":status", str(answer.status).encode())] + [
            (name, value) for name, value in answer.headers if _value_ok(value)]
        body = b""
        if exchange.grpc and answer.error is not None:
            # A gRPC client reads the outcome from grpc-status, in a trailers-only response.
            code, message = answer.error
            headers = [(b":status", b"200"), (b"content-type", b"application/grpc"),
                       (b"grpc-status", str(_GRPC_STATUS.get(answer.status, 2)).encode()),
                       (b"grpc-message", _grpc_message(f"{message} ({code})"))]
        elif answer.error is not None:
            metrics.HTTP_ERROR_PAGES.labels(code=str(answer.status)).inc()
            content_type, body = render_error(answer.status, answer.error[0], answer.error[1], exchange.accept)
            headers += [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                        (b"cache-control", b"no-store")]
        else:
            headers.append((b"content-length", b"0"))
        try:
            self.h2.send_headers(sid, headers, end_stream=not body)
            if body:
                pipe = _Pipe(self, sid, lambda size: None)
                pipe.push(body, len(body))
                pipe.finish()
        except h2.exceptions.ProtocolError:
            pass
        exchange.response_ended = True
        if not exchange.request_ended:
            self.after_response(exchange)
        exchange._done("answered")

    def reset(self, stream_id: int, code: Any) -> None:
        if self.transport is None:
            return
        try:
            self.h2.reset_stream(stream_id, code)
        except h2.exceptions.ProtocolError:
            pass

    def after_response(self, exchange: _Exchange) -> None:
        """The response is complete but the client is still sending: stop it (NO_ERROR)."""
        sid = exchange.client_id
        pipe = self.pipes.get(sid)
        if pipe is None:
            self.reset(sid, h2.errors.ErrorCodes.NO_ERROR)
        else:
            pipe.on_done = lambda: self.reset(sid, h2.errors.ErrorCodes.NO_ERROR)

    def exchange_done(self, exchange: _Exchange, outcome: str) -> None:
        self.exchanges.pop(exchange.client_id, None)
        if self.ctx.access_log:
            self.log.info(
                "access {client} {method} {path} -> {status} shard={shard} port={port} "
                "bytes={bytes} duration={duration:.3f}",
                event_kind="http_access", client=self._client_ip(), method=exchange.method.decode("latin-1"),
                path=exchange.path.split(b"?", 1)[0].decode("latin-1"), status=exchange.status or outcome,
                shard=self.route.shard.id, port=self.route.port.port, bytes=exchange.sent,
                duration=time.monotonic() - exchange.started)
        if not self.exchanges:
            if self.closing and self.transport is not None:
                self.flush()
                if not self.pipes:
                    self.transport.loseConnection()
            else:
                self._arm_idle()


def protocol_error_kind(error: Exception) -> str:
    """What went wrong, without the peer's bytes: h2's messages quote header values (a
    credential in a malformed field would reach the log)."""
    name = type(error).__name__
    text = str(error)
    # h2 quotes the offending value after the description (e.g. "... whitespace b'...'").
    for cut in (" b'", ' b"', ": ", " ("):
        if cut in text:
            text = text.split(cut, 1)[0]
    return f"{name}: {text[:80]}" if text else name


def _value_ok(value: bytes) -> bool:
    return all(c >= 0x20 or c == 0x09 for c in value) and 0x7F not in value


def _h1_exchange_class() -> Any:
    from twisted_gateway.http.h2toh1 import H1StreamExchange  # it builds on this module
    return H1StreamExchange


def _grpc_message(text: str) -> bytes:
    """Percent-encode a grpc-message value (gRPC over HTTP/2, "Responses")."""
    out = bytearray()
    for byte in text.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


@implementer(IHalfCloseableProtocol)
class H2PortProtocol(Protocol):
    """
    The application protocol of a TLS connection to an ``h2`` port: once the handshake has
    chosen, h2 clients get an L{H2FrontConnection} and HTTP/1.1 clients the HTTP/1.1 route
    over L{H2Upstream}, whose shard connection closes with the client's.
    """

    def __init__(self, make_h2: Callable[[], Protocol],
                 make_h1: Callable[[H2Upstream | None], Protocol], upstream: H2Upstream | None,
                 chosen: Callable[[Any], None]) -> None:
        self._make_h2, self._make_h1, self._upstream, self._chosen = make_h2, make_h1, upstream, chosen
        self.inner: Any = None

    def makeConnection(self, transport: Any) -> None:
        if transport.negotiatedProtocol == b"h2":
            self.inner = self._make_h2()
        else:
            self.inner = self._make_h1(self._upstream)
        self._chosen(self.inner)
        self.transport = transport
        self.inner.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self.inner.dataReceived(data)

    def readConnectionLost(self) -> None:
        # An HTTP/1.1 client may half-close after its last request and still read the answer.
        if IHalfCloseableProtocol.providedBy(self.inner):
            self.inner.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        if IHalfCloseableProtocol.providedBy(self.inner):
            self.inner.writeConnectionLost()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._upstream is not None:
            self._upstream.close()
        if self.inner is not None:
            self.inner.connectionLost(reason)


# -- HTTP/1.1 clients -------------------------------------------------------------------------------

class _UpstreamResponse:
    """What the HTTP/1.1 route needs of a response (as L{twisted_gateway.http.upstream} gives)."""

    def __init__(self, stream: _UpstreamStream, code: int, headers: RawHeaders, length: Any) -> None:
        self._stream = stream
        self.code = code
        self.phrase = b""
        self.headers = headers
        self.length = length

    def deliverBody(self, protocol: Any) -> None:
        self._stream.deliver_to(protocol)


class _UpstreamStream:
    """One HTTP/1.1 client request as a stream to the shard; fires C{result} with the response."""

    # Body bytes held for the shard before the client is paused.
    _HOLD = STREAM_WINDOW

    def __init__(self, shard: ShardConnection, body: Any,
                 reopen: Callable[[_UpstreamStream], ShardConnection] | None = None) -> None:
        self.shard = shard
        self.body = body
        self._reopen = reopen
        self.stream_id: int | None = None
        self.pipe: _Pipe | None = None
        self.result: Deferred = Deferred(lambda d: self.cancel())
        self.receiver: Any = None
        self.pending: list[bytes] = []
        self.unacked = 0
        self.paused = False
        self.body_paused = False
        self.complete = False
        self.broken: Failure | None = None
        """Why the stream failed after its response began, while no receiver was attached."""
        self.body_done = body is None

    # The body producer writes here (IConsumer).
    def write(self, data: bytes) -> None:
        if self.pipe is None or not data:
            return
        self.pipe.push(data, len(data))
        self.shard.flush()
        if self.pipe.held > self._HOLD and not self.body_paused:
            self.body_paused = True
            self.body.pauseProducing()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def _consumed(self, size: int) -> None:
        if self.body_paused and self.pipe is not None and self.pipe.held <= self._HOLD // 2:
            self.body_paused = False
            self.body.resumeProducing()

    def replay(self) -> bool:
        """The shard never processed this stream: a request without a body is sent again."""
        if self.body is not None or self.result.called or self._reopen is None:
            return False
        self.stream_id = None
        self.shard = self._reopen(self)
        return True

    def opened(self, shard: ShardConnection, stream_id: int) -> None:
        self.stream_id = stream_id
        if self.body is None:
            return
        self.pipe = _Pipe(shard, stream_id, self._consumed)
        finished = self.body.startProducing(self)

        def body_done(_: Any) -> None:
            self.body_done = True
            if self.pipe is not None:
                self.pipe.finish()
                shard.flush()
        finished.addCallbacks(body_done, lambda f: self.cancel())
        shard.flush()

    def response(self, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        code = 502
        out = RawHeaders()
        length: Any = UNKNOWN_LENGTH
        for name, value in headers:
            if name == b":status":
                code = int(value)
            elif name[:1] != b":":
                out.addRawHeader(name, value)
                if name == b"content-length":
                    try:
                        length = int(value)
                    except ValueError:
                        pass
        if not self.result.called:
            self.result.callback(_UpstreamResponse(self, code, out, length))

    def deliver_to(self, receiver: Any) -> None:
        self.receiver = receiver
        receiver.makeConnection(_StreamTransport(self))
        pending, self.pending = self.pending, []
        for chunk in pending:
            receiver.dataReceived(chunk)
        if self.complete:
            self._finish(Failure(ResponseDone()))
        elif self.broken is not None:
            self._finish(Failure(ResponseFailed([self.broken])))

    def data(self, data: bytes, flow_length: int) -> None:
        if self.receiver is None:
            self.pending.append(data)
            self.unacked += flow_length
            return
        self.receiver.dataReceived(data)
        if self.paused:
            self.unacked += flow_length
        else:
            self._ack(flow_length)

    def _ack(self, size: int) -> None:
        if self.stream_id is not None:
            self.shard.ack(self.stream_id, size)
            self.shard.flush()

    def trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        pass  # twisted.web cannot send trailers on an HTTP/1.1 response

    def ended(self) -> None:
        self.complete = True
        if self.receiver is not None:
            self._finish(Failure(ResponseDone()))

    def failed(self, failure: Failure) -> None:
        if self.pipe is not None:
            self.pipe.abandon()
        if not self.result.called:
            if failure.check(ierror.ConnectError, ierror.TimeoutError, ierror.DNSLookupError):
                self.result.errback(failure)
            else:
                self.result.errback(Failure(ResponseNeverReceived([failure])))
        elif self.receiver is not None:
            self._finish(Failure(ResponseFailed([failure])))
        else:
            self.broken = failure

    def _finish(self, reason: Failure) -> None:
        receiver, self.receiver = self.receiver, None
        if receiver is not None:
            receiver.connectionLost(reason)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        unacked, self.unacked = self.unacked, 0
        self._ack(unacked)

    def cancel(self) -> None:
        if self.body is not None and not self.body_done:
            self.body.stopProducing()
        if not self.complete:
            self.shard.cancel(self, self.stream_id)
            self.shard.flush()


class _StreamTransport:
    def __init__(self, stream: _UpstreamStream) -> None:
        self._stream = stream

    def pauseProducing(self) -> None:
        self._stream.pause()

    def resumeProducing(self) -> None:
        self._stream.resume()

    def stopProducing(self) -> None:
        self._stream.cancel()


class H2Upstream:
    """
    The shard side of an HTTP/1.1 client connection to an ``h2`` port: its requests become
    streams on one h2c connection (the C{request} of L{twisted_gateway.http.upstream.UpstreamPool}).
    """

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.shard: ShardConnection | None = None

    def request(self, address: str, port: int, method: bytes, path: bytes,
                headers: list[tuple[bytes, bytes]], body: Any = None, upgrade: bool = False) -> Deferred:
        shard = self._connection(address, port)
        authority = b""
        fields = []
        for name, value in headers:
            lname = name.lower()
            if lname == b"host":
                authority = authority or value
            elif lname not in (b"content-length", b"transfer-encoding"):
                fields.append((lname, value))
        out = [(b":method", method), (b":scheme", b"https"), (b":authority", authority), (b":path", path)]
        out += fields
        if body is not None and body.length is not UNKNOWN_LENGTH:
            out.append((b"content-length", str(body.length).encode()))
        def reopen(stream: _UpstreamStream) -> ShardConnection:
            again = self._connection(address, port)
            again.open(stream, out, end_stream=True)
            return again
        stream = _UpstreamStream(shard, body, reopen)
        shard.open(stream, out, end_stream=body is None)
        shard.flush()
        return stream.result

    def _connection(self, address: str, port: int) -> ShardConnection:
        shard = self.shard
        if shard is None or not shard.usable:
            shard = self.shard = ShardConnection(self.reactor, address, port, self.connect_timeout, self._lost)
        return shard

    def _lost(self, shard: ShardConnection) -> None:
        if self.shard is shard:
            self.shard = None

    def close(self) -> None:
        if self.shard is not None:
            self.shard.close()
            self.shard = None


__all__ = ["H2FrontConnection", "H2PortProtocol", "H2Upstream", "ShardConnection", "ShardError"]
