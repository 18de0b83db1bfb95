"""
HTTP/1.1 clients of ``h2`` ports: the HTTP/1.1 front (L{twisted_gateway.http.h1.connection})
with L{H2Upstream} as its upstream, so that each request becomes a stream on one h2c connection
to the shard, opened at the client's first request and closed with its connection.  HTTP/1.1
responses cannot carry the shard's trailers, so those are dropped.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface import implementer

from twisted_gateway.http.h2.flow import STREAM_WINDOW, Pipe
from twisted_gateway.http.h2.shard import ShardConnection
from twisted_gateway.http.upstream import IUpstream, IUpstreamResponse, RawHeaders


@implementer(IUpstreamResponse)
class _UpstreamResponse:
    """The shard's response on a stream, as the HTTP/1.1 front reads a response."""

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
        self.pipe: Pipe | None = None
        self.result: Deferred[IUpstreamResponse] = Deferred(lambda d: self.cancel())
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
        self.pipe = Pipe(shard, stream_id, self._consumed)
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


@implementer(IUpstream)
class H2Upstream:
    """
    The shard side of an HTTP/1.1 client connection to an ``h2`` port: its requests become
    streams on one h2c connection, closed with the client's connection (L{close}).
    """

    tunnels = False
    """Websockets over h2 (RFC 8441 extended CONNECT) are not offered."""

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.shard: ShardConnection | None = None

    def request(self, address: str, port: int, method: bytes, path: bytes,
                headers: list[tuple[bytes, bytes]], body: Any = None,
                upgrade: bool = False) -> Deferred[IUpstreamResponse]:
        if upgrade:
            return fail(ValueError("an h2c shard connection cannot carry a websocket upgrade"))
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



__all__ = ["H2Upstream"]
