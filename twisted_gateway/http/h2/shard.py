"""
The gateway's h2c connection to one shard port (HTTP/2 over cleartext with prior knowledge, the
way gRPC servers listen): streams opened for listeners as the shard's concurrency allows, the
shard's answers handed to each stream's listener, and the shard's GOAWAY, after which the
streams it never processed are sent again on a new connection when they can be (RFC 9113 8.7).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Protocol as TypingProtocol

import h2.errors
import h2.events
import h2.exceptions
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_gateway import metrics
from twisted_gateway.http.h2.fields import response_problem, trailers_problem
from twisted_gateway.http.h2.flow import (
    H2Peer, error_name, new_connection, protocol_error_kind,
)


class ShardError(Exception):
    """The shard reset a stream, or went away before it was processed."""


class ShardListener(TypingProtocol):
    """What a stream opened on a L{ShardConnection} is told of the shard's answer."""

    def opened(self, shard: ShardConnection, stream_id: int) -> None:
        """The request's headers went out on C{stream_id}."""

    def response(self, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        """The response headers (C{ended}: the stream ended with them)."""

    def data(self, data: bytes, flow_length: int) -> None:
        """Body bytes; C{flow_length} (with padding) is what to acknowledge once passed on."""

    def trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        """The response's trailers, which end it."""

    def ended(self) -> None:
        """The response ended without trailers."""

    def failed(self, failure: Failure) -> None:
        """The shard reset the stream or the connection was lost."""

    def replay(self) -> bool:
        """The shard never processed the stream (GOAWAY): whether it was opened again elsewhere."""


class ShardConnection(H2Peer):
    """
    An h2c (prior knowledge) connection to one shard port.  Streams are opened for listeners
    (an h2 client's stream, L{twisted_gateway.http.h2.stream.ShardStream}, or an HTTP/1.1
    client's request, L{twisted_gateway.http.h2.h1bridge}), which receive the shard's answer
    (L{ShardListener}).
    """

    log = Logger()

    def __init__(self, reactor: Any, address: str, port: int, connect_timeout: float,
                 on_lost: Callable[[ShardConnection], None]) -> None:
        super().__init__()
        self.address, self.port = address, port
        self.on_lost = on_lost
        self.listeners: dict[int, ShardListener] = {}
        self.waiting: deque[tuple[ShardListener, list[tuple[bytes, bytes]], bool]] = deque()
        self.state = "connecting"
        self.going_away = False
        self._connector = reactor.connectTCP(address, port, _ShardFactory(self), timeout=connect_timeout)

    # -- connection ------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.h2 = new_connection(client_side=True, max_header_bytes=64 * 1024)
        assert self.transport is not None
        self.transport.setTcpNoDelay(True)
        self.transport.registerProducer(self, True)
        self.state = "open"
        self._open_waiting()
        self.flush_both()  # the client's held body bytes were acknowledged too

    def connect_failed(self, reason: Failure) -> None:
        self.state = "closed"
        self._fail_everyone(reason)
        self.on_lost(self)

    def connectionLost(self, reason: Failure | None = None) -> None:
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

    def open(self, listener: ShardListener, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        self.waiting.append((listener, headers, end_stream))
        if self.state == "open":
            self._open_waiting()

    def cancel(self, listener: ShardListener, stream_id: int | None) -> None:
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
        # What this read passes to the client goes out in one write, each response's body
        # with its END_STREAM (H2Peer.hold).
        partner = self.partner
        if partner is None:
            self._received(data)
            return
        partner.hold()
        try:
            self._received(data)
        finally:
            partner.release()
        self.flush()  # the windows the bodies pumped at the release opened again

    def _received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            metrics.HTTP2_PROTOCOL_ERRORS.labels(peer="shard").inc()
            self.log.warn("shard {address}:{port} broke HTTP/2: {error}", address=self.address,
                          port=self.port, error=protocol_error_kind(e))
            self.flush()
            assert self.transport is not None  # it is connected while it reads
            self.transport.loseConnection()
            return
        for event in events:
            listener = self.listeners.get(getattr(event, "stream_id", 0) or 0)
            if isinstance(event, h2.events.ResponseReceived):
                if listener is not None:
                    problem = response_problem(event.headers)
                    if problem is None:
                        listener.response(event.headers, event.stream_ended is not None)
                    else:
                        self._malformed(event.stream_id, listener, problem)
            elif isinstance(event, h2.events.DataReceived):
                if listener is not None:
                    listener.data(event.data, event.flow_controlled_length)
                else:
                    self.ack(event.stream_id, event.flow_controlled_length)
            elif isinstance(event, h2.events.TrailersReceived):
                if listener is not None:
                    problem = trailers_problem(event.headers)
                    if problem is None:
                        listener.trailers(event.headers)
                    else:
                        self._malformed(event.stream_id, listener, problem)
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
                        f"the shard reset the stream ({error_name(event.error_code)})")))
            elif isinstance(event, h2.events.WindowUpdated):
                self.pump_stream(event.stream_id)
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                self.pump_all()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._goaway(event.last_stream_id or 0)
        if self.state == "open":
            self._open_waiting()
        self.flush_both()

    def _malformed(self, stream_id: int, listener: ShardListener, problem: str) -> None:
        """
        A response or trailers that break RFC 9113 8.2-8.3 (checked here: flow.h2_config): a
        stream error (8.1.1), never relayed; the client gets 502 or, mid-response, a reset.
        """
        metrics.UPSTREAM_BAD_RESPONSES.labels(reason="bad_head").inc()
        self.log.warn("shard {address}:{port} sent a malformed h2 response: {problem}", address=self.address,
                      port=self.port, problem=problem)
        del self.listeners[stream_id]
        pipe = self.pipes.get(stream_id)
        if pipe is not None:
            pipe.abandon()
        try:
            self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
        except h2.exceptions.ProtocolError:
            pass
        listener.failed(Failure(ShardError(f"malformed response from the shard ({problem})")))

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



__all__ = ["ShardConnection", "ShardError", "ShardListener"]
