"""
The HTTP/1.1 client the gateway speaks to shard ports with: a keep-alive pool per shard address.

Requests go out with the gateway's own framing (one canonical Content-Length, or chunked).
Responses are read with httptools' strict response parser; a head or framing that breaks
HTTP/1.1 (conflicting lengths, a transfer coding other than chunked, a bad chunk size, an
oversized head, a 101 that was not asked for) fails the request with L{BadResponse}, and a
connection is returned to the pool only when its response ended exactly where its framing said,
the request body went out whole and both sides keep the connection alive.  Anything else closes
it: a shard connection whose framing state is in doubt never carries another client's request.

Bodies reach the caller the way Agent's C{deliverBody} gives them (an IProtocol with
C{makeConnection}, C{dataReceived}, C{connectionLost(ResponseDone | ResponseFailed)}), with
backpressure from the receiver to the shard's socket.
"""

from __future__ import annotations

from typing import Any

import httptools
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface import Interface, implementer

from twisted_gateway import metrics
from twisted_gateway.fastwrite import write_now

MAX_HEAD = 64 * 1024
_RETRYABLE = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})


class IUpstream(Interface):
    """Where a front end sends a proxied request: an HTTP/1.1 pool or an h2c connection."""

    def request(address: str, port: int, method: bytes, path: bytes,  # type: ignore[misc]
                headers: list[tuple[bytes, bytes]], body: Any = None, upgrade: bool = False) -> Deferred:
        """
        Send a request whose C{headers} carry no framing field (the upstream adds its own from
        C{body}: None for no body, else an IBodyProducer whose C{length} is a number or
        UNKNOWN_LENGTH).  Fires with a response (C{code}, C{phrase}, C{headers}, C{length},
        C{deliverBody}); errbacks with ConnectError, ResponseNeverReceived or L{BadResponse}.
        """


class BadResponse(Exception):
    """The shard's response broke HTTP/1.1; C{reason} is the metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class RawHeaders:
    """Response header fields as the shard sent them, by lowercase name, in order."""

    __slots__ = ("_fields", "pairs")

    def __init__(self) -> None:
        self._fields: dict[bytes, list[bytes]] = {}
        self.pairs: list[tuple[bytes, bytes]] = []

    def addRawHeader(self, name: bytes, value: bytes) -> None:
        self.pairs.append((name, value))
        name = name.lower()
        values = self._fields.get(name)
        if values is None:
            self._fields[name] = [value]
        else:
            values.append(value)

    def getRawHeaders(self, name: bytes, default: Any = None) -> Any:
        return self._fields.get(name.lower(), default)

    def hasHeader(self, name: bytes) -> bool:
        return name.lower() in self._fields

    def getAllRawHeaders(self) -> Any:
        return self._fields.items()


class UpstreamResponse:
    """What the proxy needs of a response (the subset of Agent's IResponse it uses)."""

    def __init__(self, conn: _UpstreamConnection, code: int, phrase: bytes, headers: RawHeaders,
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

    def __init__(self, conn: _UpstreamConnection) -> None:
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

    def __init__(self, conn: _UpstreamConnection, length: Any) -> None:
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
class _UpstreamConnection(Protocol):
    log = Logger()

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
        callback, self._on_connected = self._on_connected, None
        if callback is not None:
            callback(self)

    def _reset(self) -> None:
        self._state = "idle"
        self._response_d: Deferred | None = None
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

    def send(self, method: bytes, head: bytes, body: Any, upgrade: bool = False) -> Deferred:
        self.busy = True
        self._reset()
        self._method = method
        self._upgrade = upgrade
        self._state = "head"
        self._parser = httptools.HttpResponseParser(self)
        self._response_d = Deferred(lambda d: self.abort())
        write_now(self.transport, head)
        if body is not None:
            writer = _BodyWriter(self, body.length)
            self._body_pending = True
            self.transport.registerProducer(body, True)
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
        return self._response_d

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
        if ready is not None and self._response_d is not None:
            d, self._response_d = self._response_d, None
            d.callback(ready)

    def _bad(self, reason: str, detail: str) -> None:
        metrics.UPSTREAM_BAD_RESPONSES.labels(reason=reason).inc()
        self.log.warn("shard {address}:{port} sent a bad response: {detail}", address=self.key[0],
                      port=self.key[1], detail=detail)
        failure = Failure(BadResponse(reason, detail))
        self._keep_alive = False
        self._ready = None
        if self._response_d is not None:
            d, self._response_d = self._response_d, None
            d.errback(failure)
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
            self._headers.addRawHeader(name, value)
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
            if self.transport is not None:
                self.transport.pauseProducing()
        else:
            self._receiver.dataReceived(data)

    def on_message_complete(self) -> None:
        self._events += 1
        if self._state == "body":
            self._body_done()

    def _upgraded(self, rest: bytes) -> None:
        if self._code != 101 or self._response_d is None:
            return
        self._state = "tunnel"
        self._keep_alive = False
        self._pending = [rest] if rest else []
        if self.transport is not None:
            self.transport.pauseProducing()  # until the front end takes the tunnel
        d, self._response_d = self._response_d, None
        d.callback(UpstreamResponse(self, 101, self._phrase, self._headers, 0))

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
        if self._done:
            self._finish_receiver(Failure(ResponseDone()))
        elif self.transport is not None:
            self.transport.resumeProducing()

    def _body_done(self) -> None:
        self._done = True
        self._state = "done"
        if self._receiver is not None:
            self._finish_receiver(Failure(ResponseDone()))

    def _finish_receiver(self, reason: Failure) -> None:
        receiver, self._receiver = self._receiver, None
        if self._keep_alive and not self._body_pending and self.transport is not None \
                and reason.check(ResponseDone):
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

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.transport = None
        self.pool.forget(self)
        if self._tunnel is not None:
            tunnel, self._tunnel = self._tunnel, None
            tunnel.connectionLost(reason)
            return
        if self._response_d is not None:
            d, self._response_d = self._response_d, None
            d.errback(Failure(ResponseNeverReceived([reason])))
        elif self._state == "body":
            if self._close_delimited:
                self._body_done()
            else:
                failure = Failure(ResponseFailed([reason]))
                if self._receiver is not None:
                    receiver, self._receiver = self._receiver, None
                    receiver.connectionLost(failure)


class _Factory(ClientFactory):
    noisy = False

    def __init__(self, pool: UpstreamPool, key: tuple[str, int], connected: Deferred) -> None:
        self.pool, self.key, self.connected = pool, key, connected

    def buildProtocol(self, addr: Any) -> _UpstreamConnection:
        return _UpstreamConnection(self.pool, self.key, self._made)

    def _made(self, conn: _UpstreamConnection) -> None:
        if not self.connected.called:
            self.connected.callback(conn)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.connected.called:
            self.connected.errback(reason)


def upstream_failure_answer(failure: Failure, shard_id: str, timed_out: bool) -> tuple[int, str, str, str]:
    """(status, error code, message, metric reason) for a request the shard did not answer."""
    if timed_out or failure.check(ierror.TimeoutError, ierror.TCPTimedOutError):
        return 504, "upstream_timeout", f"shard {shard_id} did not answer within the timeout", "timeout"
    if failure.check(ierror.ConnectionRefusedError):
        return 502, "upstream_refused", f"shard {shard_id} refused the connection", "refused"
    if failure.check(ierror.ConnectError, ierror.DNSLookupError):
        return 502, "upstream_unreachable", f"shard {shard_id} is unreachable", "unreachable"
    if failure.check(BadResponse):
        return 502, "upstream_bad_response", f"shard {shard_id} sent a malformed response", "bad_response"
    return 502, "upstream_reset", f"shard {shard_id} closed the connection", "error"


def request_head(method: bytes, path: bytes, headers: list[tuple[bytes, bytes]], body: Any) -> bytes:
    """The request head with the gateway's framing: one canonical length, or chunked."""
    head = [method + b" " + path + b" HTTP/1.1"]
    head.extend(name + b": " + value for name, value in headers)
    if body is not None:
        if body.length is UNKNOWN_LENGTH:
            head.append(b"Transfer-Encoding: chunked")
        else:
            head.append(b"Content-Length: %d" % body.length)
    elif method in _BODY_METHODS:
        head.append(b"Content-Length: 0")
    return b"\r\n".join(head) + b"\r\n\r\n"


@implementer(IUpstream)
class UpstreamPool:
    """Idle keep-alive connections per (address, port); new ones are made on demand."""

    def __init__(self, reactor: Any, connect_timeout: float, max_idle: int = 64) -> None:
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self._idle: dict[tuple[str, int], list[_UpstreamConnection]] = {}

    def request(self, address: str, port: int, method: bytes, path: bytes,
                headers: list[tuple[bytes, bytes]], body: Any = None, upgrade: bool = False) -> Deferred:
        raw_head = request_head(method, path, headers, body)
        key = (address, port)
        state: dict[str, Any] = {}

        def cancel(_: Deferred) -> None:
            conn = state.get("conn")
            if conn is not None:
                conn.abort()
            elif "connector" in state:
                state["connector"].stopConnecting()
        result: Deferred = Deferred(cancel)

        def settle(outcome: Any) -> None:
            if not result.called:  # a cancelled request has been answered already
                if isinstance(outcome, Failure):
                    result.errback(outcome)
                else:
                    result.callback(outcome)

        def send_on(conn: _UpstreamConnection) -> Deferred:
            state["conn"] = conn
            return conn.send(method, raw_head, body, upgrade)

        def fresh() -> None:
            state.pop("conn", None)
            connected: Deferred = Deferred()
            state["connector"] = self.reactor.connectTCP(
                address, port, _Factory(self, key, connected), timeout=self.connect_timeout)
            connected.addCallbacks(lambda conn: send_on(conn).addBoth(settle), settle)

        # An upgrade becomes a tunnel: it gets a connection of its own.
        reused = None if upgrade else self._take(key)
        if reused is None:
            fresh()
            return result
        attempt = send_on(reused)
        if body is None and method in _RETRYABLE:
            # A kept-alive connection the shard closed just as it was reused: the request
            # never got an answer and had no body, so it is safe to send it again once.
            def retry(failure: Failure) -> Any:
                if failure.check(ResponseNeverReceived) and not result.called:
                    fresh()
                    return None
                return failure
            attempt.addErrback(retry)
            attempt.addCallback(lambda outcome: None if outcome is None else settle(outcome))
            attempt.addErrback(settle)
        else:
            attempt.addBoth(settle)
        return result

    def _take(self, key: tuple[str, int]) -> _UpstreamConnection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.transport is not None and conn.reusable:
                return conn
        return None

    def release(self, conn: _UpstreamConnection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) < self.max_idle:
            idle.append(conn)
        elif conn.transport is not None:
            conn.transport.loseConnection()

    def forget(self, conn: _UpstreamConnection) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)


__all__ = ["BadResponse", "IUpstream", "RawHeaders", "UpstreamPool", "UpstreamResponse", "request_head",
           "upstream_failure_answer"]
