"""
A lean HTTP/1.1 client for talking to shard ports, with a keep-alive pool per shard address.

Twisted's Agent builds a dozen objects and Deferred chains per request; on the proxy's hot path
that was most of the gateway's CPU (see docs/performance.md).  This client does one thing:
write a request head (and stream a body producer), parse the response head, and hand the body
to the same IProtocol-style receiver Agent's ``deliverBody`` uses, with backpressure.  Bodies
are decoded with twisted.web.http's own transfer decoders.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web._newclient import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.iweb import UNKNOWN_LENGTH

from twisted_gateway.fastwrite import write_now

MAX_HEAD = 64 * 1024
_RETRYABLE = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


class RawHeaders:
    """
    Response header fields as the shard sent them, by lowercase name: the part of twisted.web's
    C{Headers} the proxy reads, without its per-call name encoding and sanitizing (values are
    sanitized where they are written, by twisted.web's response headers).
    """

    __slots__ = ("_fields",)

    def __init__(self) -> None:
        self._fields: dict[bytes, list[bytes]] = {}

    def addRawHeader(self, name: bytes, value: bytes) -> None:
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


class _ChunkedBodyWriter:
    """The consumer a streaming body producer writes to; chunk-encodes when the length is unknown."""

    def __init__(self, transport: Any, chunked: bool) -> None:
        self.transport = transport
        self.chunked = chunked

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self.chunked:
            write_now(self.transport, b"%x\r\n%b\r\n" % (len(data), data))
        else:
            write_now(self.transport, data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()


class _UpstreamConnection(Protocol):
    def __init__(self, pool: UpstreamPool, key: tuple[str, int], on_connected: Any = None) -> None:
        self.pool = pool
        self.key = key
        self.busy = False
        self._on_connected = on_connected
        self._body_pending = False
        self._reset()

    def connectionMade(self) -> None:
        callback, self._on_connected = self._on_connected, None
        if callback is not None:
            callback(self)

    def _reset(self) -> None:
        self._head = b""
        self._state = "idle"
        self._response_d: Deferred | None = None
        self._receiver: Any = None
        self._pending: list[bytes] = []
        self._done = False
        self._decoder: Any = None
        self._keep_alive = True
        self._method = b"GET"

    # -- requests ------------------------------------------------------------------------------

    def send(self, method: bytes, head: bytes, body: Any) -> Deferred:
        self.busy = True
        self._reset()
        self._method = method
        self._state = "head"
        self._response_d = Deferred(lambda d: self.abort())
        write_now(self.transport, head)
        if body is not None:
            writer = _ChunkedBodyWriter(self.transport, body.length is UNKNOWN_LENGTH)
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
            finished.addCallbacks(body_done, lambda f: self.abort())
        return self._response_d

    # -- response ------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._state == "head":
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > MAX_HEAD:
                    self._fail(ResponseFailed([Failure(ValueError("response head too large"))]))
                return
            head, rest = self._head[:end], self._head[end + 4:]
            self._head = b""
            if not self._parse_head(head):
                return
            if rest:
                self.dataReceived(rest)
        elif self._state == "body":
            self._decoder.dataReceived(data)
        elif self._state == "idle" and data:
            # Bytes from an idle upstream: it is not speaking HTTP correctly; drop it.
            self._keep_alive = False
            self.transport.loseConnection()

    def _parse_head(self, head: bytes) -> bool:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        try:
            version, code = parts[0], int(parts[1])
        except (IndexError, ValueError):
            self._fail(ResponseFailed([Failure(ValueError(f"bad status line {lines[0][:80]!r}"))]))
            return False
        phrase = parts[2] if len(parts) > 2 else b""
        headers = RawHeaders()
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                self._fail(ResponseFailed([Failure(ValueError("bad header line"))]))
                return False
            headers.addRawHeader(name, value.strip())
        if 100 <= code < 200:
            return True  # an interim response (100 Continue): the real one follows
        connection = b",".join(headers.getRawHeaders(b"connection", [])).lower()
        self._keep_alive = version == b"HTTP/1.1" and b"close" not in connection
        if self._method == b"HEAD" or code in (204, 304):
            length: Any = 0
        elif b"chunked" in b",".join(headers.getRawHeaders(b"transfer-encoding", [])).lower():
            length = UNKNOWN_LENGTH
            self._decoder = http._ChunkedTransferDecoder(self._body_data, self._body_done)
        elif headers.hasHeader(b"content-length"):
            try:
                length = int(headers.getRawHeaders(b"content-length")[0])
            except ValueError:
                self._fail(ResponseFailed([Failure(ValueError("bad content-length"))]))
                return False
        else:
            length = UNKNOWN_LENGTH
            self._keep_alive = False  # delimited by the connection's end
            self._decoder = _UntilClose(self._body_data)
        if self._decoder is None:
            self._decoder = http._IdentityTransferDecoder(length, self._body_data, self._body_done)
        self._state = "body"
        d, self._response_d = self._response_d, None
        assert d is not None
        d.callback(UpstreamResponse(self, code, phrase, headers, length))
        if length == 0:
            self._body_done(b"")
        return True

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

    def _body_data(self, data: bytes) -> None:
        if self._receiver is None:
            self._pending.append(data)
            self.transport.pauseProducing()
        else:
            self._receiver.dataReceived(data)

    def _body_done(self, rest: bytes) -> None:
        self._done = True
        self._state = "done"
        if rest:
            self._keep_alive = False  # pipelined garbage after the body
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

    def _fail(self, failure: Any) -> None:
        self._keep_alive = False
        if self._response_d is not None:
            d, self._response_d = self._response_d, None
            d.errback(failure)
        if self.transport is not None:
            self.transport.loseConnection()

    def abort(self) -> None:
        self._keep_alive = False
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        transport_gone = self.transport
        self.transport = None
        self.pool.forget(self)
        if self._response_d is not None:
            d, self._response_d = self._response_d, None
            d.errback(Failure(ResponseNeverReceived([reason])))
        elif self._state == "body":
            if isinstance(self._decoder, _UntilClose):
                self._done = True
                self._state = "done"
                if self._receiver is not None:
                    self._finish_receiver(Failure(ResponseDone()))
            else:
                failure = Failure(ResponseFailed([reason]))
                if self._receiver is not None:
                    receiver, self._receiver = self._receiver, None
                    receiver.connectionLost(failure)
        del transport_gone


class _UntilClose:
    def __init__(self, data_callback: Any) -> None:
        self.dataReceived = data_callback


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


class UpstreamPool:
    """Idle keep-alive connections per (address, port); new ones are made on demand."""

    def __init__(self, reactor: Any, connect_timeout: float, max_idle: int = 64) -> None:
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self._idle: dict[tuple[str, int], list[_UpstreamConnection]] = {}

    def request(self, address: str, port: int, method: bytes, path: bytes,
                headers: list[tuple[bytes, bytes]], body: Any = None) -> Deferred:
        """Send a request (C{headers}: the fields to send, as name/value pairs) to the shard."""
        head = [method + b" " + path + b" HTTP/1.1"]
        head.extend(name + b": " + value for name, value in headers)
        if body is not None:
            if body.length is UNKNOWN_LENGTH:
                head.append(b"Transfer-Encoding: chunked")
            else:
                head.append(b"Content-Length: %d" % body.length)
        elif method not in (b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE"):
            head.append(b"Content-Length: 0")
        raw_head = b"\r\n".join(head) + b"\r\n\r\n"
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
            return conn.send(method, raw_head, body)

        def fresh() -> None:
            state.pop("conn", None)
            connected: Deferred = Deferred()
            state["connector"] = self.reactor.connectTCP(
                address, port, _Factory(self, key, connected), timeout=self.connect_timeout)
            connected.addCallbacks(lambda conn: send_on(conn).addBoth(settle), settle)

        reused = self._take(key)
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
            if conn.transport is not None:
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


__all__ = ["RawHeaders", "UpstreamPool", "UpstreamResponse"]
