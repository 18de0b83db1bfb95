"""
HTTP/2 flow control, shared by both ends of every h2 connection the gateway proxies: the
windows and settings the gateway offers, the peer base class that knows when its socket is
writable, and the pipe that moves one stream's body into a connection no faster than that
connection's windows and socket allow.

Flow control is end to end: body bytes are acknowledged to the side that sent them (opening its
window again) only once they have been passed into the other side's connection, and nothing is
passed on while that side's socket buffer is full.  So the gateway holds at most a window's
worth of a stream's body, however fast one side is and however slow the other.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

import h2
import h2.config
import h2.connection
import h2.errors
import h2.exceptions
import h2.settings
from hyperframe.frame import RstStreamFrame
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from twisted_gateway.fastwrite import write_now
from twisted_gateway.http.h2 import hpack_in
from twisted_gateway.http.h2.hpack_out import LiteralEncoder
from twisted_gateway.interfaces import IStreamTransport

_HUFFMAN_CACHED = hpack_in.install()

STREAM_WINDOW = 256 * 1024
"""The flow-control window the gateway gives each stream, on both sides."""
CONNECTION_WINDOW = 1024 * 1024
"""The flow-control window of a whole connection, on both sides."""
MAX_STREAMS = 100
"""Concurrent streams a client may open."""
DEFAULT_WINDOW = 65535
"""The window every HTTP/2 connection starts with (RFC 9113 6.9.2)."""

@implementer(IPushProducer)
class H2Peer(Protocol):
    """One HTTP/2 connection the gateway is an end of, client- or shard-facing."""

    h2: h2.connection.H2Connection
    transport: IStreamTransport | None  # None once the connection is lost
    write_paused = False
    partner: H2Peer | None = None

    def __init__(self) -> None:
        self.pipes: dict[int, Pipe] = {}
        """The bodies waiting to be sent into this connection, by stream."""
        self._holds = 0
        self._flush_due = False
        self._pumps_due: list[Pipe] = []

    def flush(self) -> None:
        if self._holds:
            # Inside a hold (L{hold}): one write when it is released, not one per event.
            self._flush_due = True
            return
        if self.transport is not None:
            data = self.h2.data_to_send()
            if data:
                write_now(self.transport, data)

    def hold(self) -> None:
        """
        Gather the frames of what follows into one write (one TLS record, one send) until the
        matching L{release}: a response whose head, body and end arrive in one upstream read
        went out as three records and three system calls, which were a quarter of the CPU of
        an h2 request to an HTTP/1.1 shard.
        """
        self._holds += 1

    def release(self) -> None:
        self._holds -= 1
        if self._holds:
            return
        # The bodies pushed meanwhile go out now, each with its END_STREAM on its last DATA
        # frame when its end is known by then (one frame, not an empty one after it).
        while self._pumps_due:
            due, self._pumps_due = self._pumps_due, []
            for pipe in due:
                pipe.pump_due = False
                pipe.pump()
        if self._flush_due:
            self._flush_due = False
            self.flush_later()

    def flush_later(self) -> None:
        """Write what h2 has prepared, or have it written with whatever else this pass of the
        reactor prepares for this connection (L{H2FrontConnection.flush_later})."""
        self.flush()

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


class Pipe:
    """
    The body of one stream on its way into an h2 connection (the sink), sent as the sink's
    flow-control windows allow and while its socket is writable.  Each byte is reported to
    C{consumed} once sent, so that the sender's window, not the gateway's memory, holds the
    backlog.
    """

    def __init__(self, sink: H2Peer, stream_id: int, consumed: Callable[[int], None]) -> None:
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
        self.pump_due = False
        """Waiting for the sink's L{H2Peer.release} to be pumped."""
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
        if sink._holds:
            if not self.pump_due:
                self.pump_due = True
                sink._pumps_due.append(self)
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
                    last = self.end is True and len(self.chunks) == 1
                    conn.send_data(sid, data, end_stream=last)
                    self.chunks.popleft()
                    self.held -= len(data)
                    self.consumed(len(data) + padding)
                    if last:
                        self._close()
                        return
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


def h2_config(client_side: bool) -> h2.config.H2Configuration:
    """
    Headers arriving from either side are validated (RFC 9113 8.2); what the gateway sends on
    is either those validated headers or its own, lowercase and well formed, so the outbound
    checks (a good part of h2's CPU per request) are skipped.

    The inbound checks are the gateway's own (L{twisted_gateway.http.h2.fields}: every check
    of h2's and the stricter ones an HTTP/1.1 hop needs), made by the h2 front in the one pass
    over a request's fields it makes anyway, and by the shard connection over each response and
    trailer section; h2's own inbound validation, a chain of generators over every field, was a
    tenth of the CPU of a request.  h2 still joins a request's cookie fields (RFC 9113 8.2.3).
    """
    return h2.config.H2Configuration(client_side=client_side, header_encoding=None,
                                     validate_outbound_headers=False, normalize_outbound_headers=False,
                                     validate_inbound_headers=False, normalize_inbound_headers=not client_side)


class GatewayH2Connection(h2.connection.H2Connection):
    """
    h2's connection without the trace line of every received frame: h2 formats each frame with
    C{repr} for its (no-op by default) trace logger before the call, a few per cent of the CPU
    of a proxied request (the rest is h2's own C{_receive_frame}, h2 4.x); and with its own
    cache of Huffman-decoded strings, current while it decodes (L{hpack_in}).
    """

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config)
        self._huffman = hpack_in.HuffmanCache()

    def receive_data(self, data: Any) -> list[Any]:
        # This connection's Huffman cache serves the blocks of this read only (hpack_in).
        hpack_in.current = self._huffman if _HUFFMAN_CACHED else None
        try:
            return super().receive_data(data)
        finally:
            hpack_in.current = None

    def _receive_frame(self, frame: Any) -> list[Any]:
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except h2.exceptions.StreamClosedError as e:
            # Closed by RST_STREAM: answer RST_STREAM; otherwise a connection error.
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = e.error_code
                self._prepare_for_sending([f])
                events = e._events
            else:
                raise
        except h2.exceptions.StreamIDTooLowError as e:
            # A stream already cleaned up, or implicitly closed by a higher stream id.
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = h2.errors.ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([f])
                events = []
            elif self._stream_is_closed_by_end(e.stream_id):
                raise h2.exceptions.StreamClosedError(e.stream_id) from e
            else:
                raise
        else:
            self._prepare_for_sending(frames)
        return events


# The override above is h2 4.x's method less its first line; another h2 keeps its own.
_H2_CONNECTION: Any = GatewayH2Connection if h2.__version__.startswith("4.") else h2.connection.H2Connection


def new_connection(client_side: bool, max_header_bytes: int) -> h2.connection.H2Connection:
    """An h2 connection as the gateway runs one (either side), its preface prepared."""
    conn: h2.connection.H2Connection = _H2_CONNECTION(h2_config(client_side=client_side))
    # Every block the gateway sends is encoded without the dynamic table (hpack_out).
    conn.encoder = LiteralEncoder()  # type: ignore[assignment]
    conn.local_settings = h2_settings(client_side, max_header_bytes)
    # Initial settings never go through h2's settings-acknowledged path, which is where it
    # would apply this limit to its HPACK decoder: apply it here.
    conn.decoder.max_header_list_size = max_header_bytes
    conn.initiate_connection()
    conn.increment_flow_control_window(CONNECTION_WINDOW - DEFAULT_WINDOW)
    return conn


def h2_settings(client: bool, max_header_bytes: int) -> h2.settings.Settings:
    """The settings the gateway announces, as the client of a shard or the server of a client."""
    values = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
              h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: max_header_bytes}
    if client:
        values[h2.settings.SettingCodes.ENABLE_PUSH] = 0
    else:
        values[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = MAX_STREAMS
    return h2.settings.Settings(client=client, initial_values=values)


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


def error_name(code: Any) -> str:
    """The name of an HTTP/2 error code (RFC 9113 7), or the number of an unknown one."""
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return str(code)


__all__ = ["CONNECTION_WINDOW", "DEFAULT_WINDOW", "GatewayH2Connection", "H2Peer", "MAX_STREAMS", "Pipe", "STREAM_WINDOW",
           "error_name", "h2_config", "h2_settings", "protocol_error_kind"]
