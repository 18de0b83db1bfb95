"""
One HTTP/1.1 connection to a shard port (L{UpstreamConnection}), as the pool
(L{twisted_gateway.http.h1.pool}) uses it: a request sent with the gateway's own framing (one
canonical Content-Length, or chunked, never more body than declared) and its response read with
httptools' strict response parser.

A head or framing that breaks HTTP/1.1 (conflicting lengths, a transfer coding other than
chunked, a bad chunk size, an oversized head, a 101 that was not asked for) fails the request
with L{BadResponse}, and the connection says it may be reused only when its response ended
exactly where its framing said, the request body went out whole and both sides keep the
connection alive: a shard connection whose framing state is in doubt never carries another
client's request.

Bodies reach the caller the way Agent's C{deliverBody} gives them (an IProtocol with
C{makeConnection}, C{dataReceived}, C{connectionLost(ResponseDone | ResponseFailed)}), with
backpressure from the receiver to the shard's socket.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import httptools
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface import implementer

from twisted_gateway import metrics
from twisted_gateway.fastwrite import write_now
from twisted_gateway.http.h1.parse import needs_length_field
from twisted_gateway.http.upstream import BadResponse, IUpstreamResponse, RawHeaders
from twisted_gateway.interfaces import IStreamTransport

if TYPE_CHECKING:
    from twisted_gateway.http.h1.pool import UpstreamPool

MAX_HEAD = 64 * 1024
"""The largest response head read from a shard (and bound on a trailer or chunk line)."""

_DONE = Failure(ResponseDone("Response body fully received"))
"""The end of every complete body, made once: a Failure costs about 0.5 µs to make and its
C{check} as much again, per response.  No receiver changes it (it has no traceback to clean)."""


@implementer(IUpstreamResponse)
class UpstreamResponse:
    """A response read from a shard's HTTP/1.1 connection."""

    def __init__(self, conn: UpstreamConnection, code: int, phrase: bytes, headers: RawHeaders,
                 length: Any) -> None:
        self._conn = conn
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length

    def deliverBody(self, protocol: Any) -> None:
        self._conn.deliver_to(protocol)

    def take_tunnel(self, protocol: Any) -> None:
        """After a 101: the shard connection becomes C{protocol}'s transport (never pooled)."""
        self._conn.become(protocol)


class _TransportProxy:
    """Given to the body receiver: pause/resume reach the upstream socket."""

    def __init__(self, conn: UpstreamConnection) -> None:
        self._conn = conn

    def pauseProducing(self) -> None:
        if self._conn.transport is not None:
            self._conn.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self._conn.transport is not None:
            self._conn.transport.resumeProducing()

    def stopProducing(self) -> None:
        self._conn.abort()


class _BodyWriter:
    """The consumer a body producer writes to: chunk-encodes an unknown length, and never
    writes more than a declared one."""

    def __init__(self, conn: UpstreamConnection, length: Any) -> None:
        self.conn = conn
        self.chunked = length is UNKNOWN_LENGTH
        self.left = None if self.chunked else int(length)

    def write(self, data: bytes) -> None:
        transport = self.conn.transport
        if not data or transport is None:
            return
        if self.chunked:
            write_now(transport, b"%x\r\n%b\r\n" % (len(data), data))
            return
        assert self.left is not None
        if len(data) > self.left:
            # Never more than the framing declared: the shard would read the rest as a request.
            self.conn.log.error("request body longer than its declared length; closing the shard connection")
            self.conn.abort()
            return
        self.left -= len(data)
        write_now(transport, data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.conn.transport is not None:
            self.conn.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if self.conn.transport is not None:
            self.conn.transport.unregisterProducer()


class _Abort(Exception):
    pass


@implementer(IHalfCloseableProtocol)
class UpstreamConnection(Protocol):
    log = Logger()
    transport: IStreamTransport | None  # the shard's TCP connection; None once it is lost

    def __init__(self, pool: UpstreamPool, key: tuple[str, int], on_connected: Any = None) -> None:
        self.pool = pool
        self.key = key
        self.busy = False
        self._on_connected = on_connected
        self._body_pending = False
        self._tunnel: Any = None
        self._reset()

    @property
    def reusable(self) -> bool:
        """Idle, and nothing about its framing state in doubt."""
        return self._state == "idle" and self._keep_alive and not self.busy

    def connectionMade(self) -> None:
        # A head and the body after it are separate writes: not held back for an ACK (Nagle).
        if self.transport is not None and hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)
        callback, self._on_connected = self._on_connected, None
        if callback is not None:
            callback(self)

    def _reset(self) -> None:
        self._state = "idle"
        self._respond: Callable[[Any], None] | None = None
        """Called once with the response or a Failure (while a response is awaited)."""
        self._paused_unclaimed: bool | None = False
        """The socket is paused until a receiver takes the body (None: decide after this read)."""
        self._receiver: Any = None
        self._pending: list[bytes] = []
        self._done = False
        self._keep_alive = True
        self._method = b"GET"
        self._upgrade = False
        self._parser: Any = None
        self._head_bytes = 0
        self._head_buffer = b""
        self._headers = RawHeaders()
        self._phrase = b""
        self._code = 0
        self._length: Any = UNKNOWN_LENGTH
        self._ready: UpstreamResponse | None = None
        self._close_delimited = False
        self._events = 0
        self._quiet = 0

    # -- requests ------------------------------------------------------------------------------

    def send(self, method: bytes, head: bytes, body: Any, upgrade: bool = False) -> Deferred[IUpstreamResponse]:
        """Send a request; the Deferred fires with its response (cancelling it aborts)."""
        d: Deferred[IUpstreamResponse] = Deferred(lambda _: self.abort())

        def respond(outcome: Any) -> None:
            if not d.called:
                if isinstance(outcome, Failure):
                    d.errback(outcome)
                else:
                    d.callback(outcome)
        self.send_then(method, head, body, upgrade, respond)
        return d

    def send_then(self, method: bytes, head: bytes, body: Any, upgrade: bool,
                  respond: Callable[[Any], None]) -> None:
        """
        Send a request and call C{respond} once, with its response or a Failure: what L{send}
        does without a Deferred of its own (the pool settles its caller's Deferred directly;
        a Deferred and its callbacks per request were a few per cent of a proxied request).
        """
        self.busy = True
        self._reset()
        self._method = method
        self._upgrade = upgrade
        self._state = "head"
        self._parser = httptools.HttpResponseParser(self)
        self._respond = respond
        transport = self.transport
        assert transport is not None  # the pool sends only on a connected connection
        write_now(transport, head)
        if body is not None:
            writer = _BodyWriter(self, body.length)
            self._body_pending = True
            transport.registerProducer(body, True)
            finished = body.startProducing(writer)

            def body_done(_: Any) -> None:
                self._body_pending = False
                if self.transport is None:
                    return
                self.transport.unregisterProducer()
                if writer.chunked:
                    write_now(self.transport, b"0\r\n\r\n")
                elif writer.left:
                    self.abort()  # shorter than declared: the shard waits for the rest
            finished.addCallbacks(body_done, lambda f: self.abort())

    # -- response ------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel.dataReceived(data)
            return
        if self._state == "idle" or self._state == "done":
            # Bytes outside a response: the shard's framing is not what it said; never reuse.
            self._keep_alive = False
            if self._state == "idle" and self.transport is not None:
                self.transport.loseConnection()
            return
        if self._state == "head" and self._method == b"HEAD":
            self._head_of_head(data)
            return
        self._feed(data)

    def _head_of_head(self, data: bytes) -> None:
        # A response to HEAD has no body whatever its framing fields say (RFC 9110 9.3.2), which
        # the parser cannot know: hand it the head alone.
        self._head_buffer += data
        end = self._head_buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head_buffer) > MAX_HEAD:
                self._bad("head_too_large", "response head too large")
            return
        head, rest = self._head_buffer[:end + 4], self._head_buffer[end + 4:]
        self._head_buffer = b""
        self._feed(head)
        if self._state == "head" and self._parser is not None and rest:
            self._head_of_head(rest)  # that was an interim response (103 Early Hints): the final one follows
            return
        if self._state == "body":
            # A HEAD response never returns its connection to the pool: a shard that sends the
            # body anyway (a common bug) would have it read as the next client's response.
            self._keep_alive = False
            self._body_done()

    def _feed(self, data: bytes) -> None:
        if self._state == "head":
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                self._bad("head_too_large", "response head too large")
                return
        self._events = 0
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self._upgraded(data[int(e.args[0]):])
        except httptools.HttpParserCallbackError as e:
            if not isinstance(e.__context__, _Abort):
                self.log.failure("handling a shard response failed", Failure(e.__context__))
                self.abort()
        except httptools.HttpParserError as e:
            if self._state == "head" or self._ready is not None:
                self._bad("bad_head", f"malformed response: {e}")
            else:
                self._bad("bad_body", f"malformed response body: {e}")
        if not self._events and self._state == "body":
            # Bytes with no event: a trailer field or chunk extension still growing (httptools
            # collects a field whole, and joins it piece by piece): bounded like a head.
            self._quiet += len(data)
            if self._quiet > MAX_HEAD:
                self._bad("bad_body", "a trailer field or chunk line too large")
        else:
            self._quiet = 0
        # The response is handed on only once the whole read that carried its head parsed
        # cleanly: a head followed by a broken body in the same read is a 502, not a head
        # relayed and then a cut.
        ready, self._ready = self._ready, None
        if ready is not None and self._respond is not None:
            respond, self._respond = self._respond, None
            respond(ready)
        if self._paused_unclaimed is None:
            # Body bytes came with the head and nobody took them in this read: stop reading
            # until someone does (deliver_to).  Decided here, after the response was handed
            # on, so that the usual case (the body taken at once) costs no pause and resume
            # of the socket (two epoll_ctl calls per response).
            if self._receiver is None and self._pending and self.transport is not None:
                self._paused_unclaimed = True
                self.transport.pauseProducing()
            else:
                self._paused_unclaimed = False

    def _bad(self, reason: str, detail: str) -> None:
        metrics.UPSTREAM_BAD_RESPONSES.labels(reason=reason).inc()
        self.log.warn("shard {address}:{port} sent a bad response: {detail}", address=self.key[0],
                      port=self.key[1], detail=detail)
        failure = Failure(BadResponse(reason, detail))
        self._keep_alive = False
        self._ready = None
        if self._respond is not None:
            respond, self._respond = self._respond, None
            respond(failure)
        elif self._receiver is not None:
            receiver, self._receiver = self._receiver, None
            receiver.connectionLost(Failure(ResponseFailed([failure])))
        self.abort()

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self._state != "head":
            # A second response after the one asked for: never trust this connection again.
            self._keep_alive = False
            raise _Abort()

    def on_status(self, phrase: bytes) -> None:
        self._phrase += phrase

    def on_header(self, name: bytes, value: bytes) -> None:
        self._events += 1
        if self._state == "head":
            self._headers.pairs.append((name, value))  # indexed by name when first asked
        # Fields after the body are trailers: dropped (a proxy may, RFC 9110 6.5.1).

    def on_headers_complete(self) -> None:
        self._events += 1
        code = self._parser.get_status_code()
        if 100 <= code < 200 and code != 101:
            # An interim response (RFC 9110 15.2): the final one follows; nothing is relayed.
            # It has no body: one that declares a framing is not HTTP the gateway can follow.
            if self._headers.hasHeader(b"content-length") or self._headers.hasHeader(b"transfer-encoding"):
                self._bad("bad_framing", "an interim response with a body")
                raise _Abort()
            self._headers = RawHeaders()
            self._phrase = b""
            return
        headers = self._headers
        if code == 101:
            upgrade = b",".join(headers.getRawHeaders(b"upgrade", [])).lower()
            if not self._upgrade or b"websocket" not in upgrade:
                self._bad("unexpected_upgrade", "101 Switching Protocols the gateway did not ask for")
                raise _Abort()
            self._code = code
            return
        codings = headers.getRawHeaders(b"transfer-encoding")
        if codings is not None and (len(codings) != 1 or codings[0].strip().lower() != b"chunked"):
            self._bad("bad_framing", "Transfer-Encoding other than chunked")
            raise _Abort()
        self._keep_alive = bool(self._parser.should_keep_alive())
        length: Any
        if self._method == b"HEAD" or code in (204, 304):
            length = 0
        elif codings is not None:
            length = UNKNOWN_LENGTH
        elif headers.hasHeader(b"content-length"):
            length = int(headers.getRawHeaders(b"content-length")[0].strip())
        else:
            length = UNKNOWN_LENGTH
            self._close_delimited = True
            self._keep_alive = False
        self._code = code
        self._length = length
        self._state = "body"
        self._ready = UpstreamResponse(self, code, self._phrase, headers, length)

    def on_body(self, data: bytes) -> None:
        self._events += 1
        if self._state != "body":
            self._bad("bad_framing", "body bytes outside a response")
            raise _Abort()
        if self._receiver is None:
            self._pending.append(data)
            if not self._paused_unclaimed:
                self._paused_unclaimed = None  # decided at the end of this read (_feed)
        else:
            self._receiver.dataReceived(data)

    def on_message_complete(self) -> None:
        self._events += 1
        if self._state == "body":
            self._body_done()

    def _upgraded(self, rest: bytes) -> None:
        if self._code != 101 or self._respond is None:
            return
        self._state = "tunnel"
        self._keep_alive = False
        self._pending = [rest] if rest else []
        if self.transport is not None:
            self.transport.pauseProducing()  # until the front end takes the tunnel
        respond, self._respond = self._respond, None
        respond(UpstreamResponse(self, 101, self._phrase, self._headers, 0))

    def become(self, protocol: Any) -> None:
        self._tunnel = protocol
        self.pool.forget(self)
        protocol.makeConnection(self.transport)
        pending, self._pending = self._pending, []
        for chunk in pending:
            protocol.dataReceived(chunk)
        if self.transport is not None:
            self.transport.resumeProducing()

    def readConnectionLost(self) -> None:
        if self._tunnel is not None:
            self._tunnel.readConnectionLost()
        elif self.transport is not None:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def deliver_to(self, receiver: Any) -> None:
        self._receiver = receiver
        receiver.makeConnection(_TransportProxy(self))
        pending, self._pending = self._pending, []
        for chunk in pending:
            receiver.dataReceived(chunk)
        if self._paused_unclaimed:
            self._paused_unclaimed = False
            if self.transport is not None and not self._done:
                self.transport.resumeProducing()
        if self._done:
            self._finish_receiver(_DONE)

    def _body_done(self) -> None:
        self._done = True
        self._state = "done"
        if self._receiver is not None:
            self._finish_receiver(_DONE)

    def _finish_receiver(self, reason: Failure) -> None:
        receiver, self._receiver = self._receiver, None
        if self._keep_alive and not self._body_pending and self.transport is not None \
                and (reason is _DONE or isinstance(reason.value, ResponseDone)):
            self.busy = False
            self._state = "idle"
            self.transport.resumeProducing()
            self.pool.release(self)
        elif self.transport is not None:
            self.transport.loseConnection()
        if receiver is not None:
            receiver.connectionLost(reason)

    def abort(self) -> None:
        self._keep_alive = False
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.transport = None
        self.pool.forget(self)
        if self._tunnel is not None:
            tunnel, self._tunnel = self._tunnel, None
            tunnel.connectionLost(reason)
            return
        if self._respond is not None:
            respond, self._respond = self._respond, None
            respond(Failure(ResponseNeverReceived([reason])))
        elif self._state == "body":
            if self._close_delimited:
                self._body_done()
            else:
                failure = Failure(ResponseFailed([reason]))
                if self._receiver is not None:
                    receiver, self._receiver = self._receiver, None
                    receiver.connectionLost(failure)



def request_head(method: bytes, path: bytes, headers: list[tuple[bytes, bytes]], body: Any) -> bytes:
    """The request head with the gateway's framing: one canonical length, or chunked."""
    head = [method + b" " + path + b" HTTP/1.1"]
    head.extend(name + b": " + value for name, value in headers)
    if body is not None:
        if body.length is UNKNOWN_LENGTH:
            head.append(b"Transfer-Encoding: chunked")
        else:
            head.append(b"Content-Length: %d" % body.length)
    elif needs_length_field(method):
        head.append(b"Content-Length: 0")
    return b"\r\n".join(head) + b"\r\n\r\n"



__all__ = ["MAX_HEAD", "UpstreamConnection", "UpstreamResponse", "request_head"]
