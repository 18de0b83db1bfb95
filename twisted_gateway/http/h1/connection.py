"""
HTTP/1.1 clients of shard ports (``http/1.1`` ports, and HTTP/1.1 clients of ``h2`` ports
through L{twisted_gateway.http.h2.h1bridge.H2Upstream}): one L{H1ProxyConnection} per client
connection, proxied request by request.

Requests are read with L{twisted_gateway.http.h1.parse} (httptools, strict), one at a time, and
each is checked by the gate (L{twisted_gateway.http.policy}) before anything reaches the shard.
The gateway owns the framing both ways: the shard gets one canonical Content-Length or chunked
framing computed from the parsed message, and never more body bytes than it declares; the client
gets the response with the gateway's framing, hop-by-hop fields removed.  A connection becomes a
tunnel only when the shard answers ``101 Switching Protocols`` to a websocket upgrade the gateway
forwarded; until then the client's next bytes wait, and any other answer leaves the connection
HTTP with every check applied to its next request.  The connection paces the client: pipelined
requests wait while a response is in progress or the client is not reading, and deadlines bound
a request head, a body's rate and an idle or stalled client.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, cast

from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_gateway import metrics
from twisted_gateway.directory.model import Route
from twisted_gateway.http.context import HTTPRouteContext
from twisted_gateway.http.errors import render_error
from twisted_gateway.http.framing import REASONS
from twisted_gateway.http.h1.exchange import H1Exchange
from twisted_gateway.http.h1.parse import END, RequestHead, RequestReader, Rejected, Stopped
from twisted_gateway.http.policy import Answer, access_log
from twisted_gateway.http.upstream import IUpstream
from twisted_gateway.interfaces import IStreamTransport
from twisted_gateway.splice import Splice, UpstreamSide

if TYPE_CHECKING:
    from twisted_gateway.tls.connection import TLSServerConnection


class Deadline:
    """
    A timer moved once or twice per request without a DelayedCall each time.

    Keep-alive connections arm the idle timer after every response and cancel it at the next
    request, and the response timer at every request's end; C{callLater} and C{cancel} for
    each cost more than the rest of the timer handling together.  Here one DelayedCall stays
    pending at or before the deadline: moving the deadline later only records it, clearing it
    only forgets it, and when the call fires early it is scheduled again for what is left.
    """

    __slots__ = ("_reactor", "_call", "_when", "_func")

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._call: IDelayedCall | None = None
        self._when: float | None = None
        self._func: Any = None

    @property
    def armed(self) -> bool:
        return self._when is not None

    def set(self, delay: float, func: Any) -> None:
        """Call C{func} C{delay} seconds from now, instead of whatever was set before."""
        when = self._reactor.seconds() + delay
        self._when, self._func = when, func
        call = self._call
        if call is None:
            self._call = self._reactor.callLater(delay, self._fire)
        elif call.getTime() > when:
            call.reset(delay)

    def clear(self) -> None:
        self._when = self._func = None

    def stop(self) -> None:
        """Clear, and let go of the pending call (the connection is gone)."""
        self._when = self._func = None
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _fire(self) -> None:
        self._call = None
        when = self._when
        if when is None:
            return
        left = when - self._reactor.seconds()
        if left > 1e-6:  # moved since this call was made: wait for the rest
            self._call = self._reactor.callLater(left, self._fire)
            return
        func = self._func
        self._when = self._func = None
        func()


@implementer(IHalfCloseableProtocol, IPushProducer)
class H1ProxyConnection(Protocol):
    """An HTTP/1.1 client connection to a shard port, proxied request by request."""

    log = Logger()
    transport: IStreamTransport | None  # the client's TLS connection; None once it is lost

    def __init__(self, route: Route, ctx: HTTPRouteContext, server_name: str, upstream: IUpstream | None = None,
                 websockets: bool = True) -> None:
        self.route = route
        self.ctx = ctx
        self.reactor = ctx.reactor
        self.server_name = server_name
        self.upstream: IUpstream = upstream if upstream is not None else ctx.upstream
        """Where requests go: the shared HTTP/1.1 pool, or an h2c bridge on an ``h2`` port."""
        self.websockets = websockets and self.upstream.tunnels
        limits = ctx.limits
        self.reader = RequestReader(server_name, limits.max_header_bytes, limits.max_headers)
        self.events: deque[Any] = deque()
        self.exchange: H1Exchange | None = None
        self.held: list[bytes] | None = None
        """Client bytes after a request that asked to switch protocols, until the shard answers."""
        self.draining = False
        self.closing = False
        self.read_closed = False
        self.write_paused = False
        self.relay_transport: IPushProducer | None = None
        """The response body's producer (the shard's socket), paused while the client is full."""
        self._stall: IDelayedCall | None = None
        self.client_ip = "?"
        self._pauses: set[str] = set()
        self._idle = Deadline(self.reactor)
        self.response_deadline = Deadline(self.reactor)
        """The response timer of the request in progress (L{H1Exchange.request_ended})."""
        self._head_timer: IDelayedCall | None = None
        self._rate_timer: IDelayedCall | None = None
        self._rate_mark = 0
        self._paused_in_window = False
        self.bytes_in_body = 0

    # -- connection ------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        metrics.count_route(self.route, connections=1)
        transport = self.transport
        assert transport is not None
        peer = transport.getPeer()
        self.client_ip = str(getattr(peer, "host", "?"))
        # The client's socket tells this connection when its buffer is full (IPushProducer):
        # the response in progress is paused at the shard, and no further pipelined request
        # is started until the client reads again.
        transport.registerProducer(self, True)
        self._arm_idle()

    # -- the client's write buffer (IPushProducer) -------------------------------------------

    def pauseProducing(self) -> None:
        self.write_paused = True
        if self.relay_transport is not None:
            self.relay_transport.pauseProducing()
        if self._stall is None:
            self._stall = self.reactor.callLater(self.ctx.limits.http_idle_timeout, self._stalled)

    def resumeProducing(self) -> None:
        self.write_paused = False
        if self._stall is not None and self._stall.active():
            self._stall.cancel()
        self._stall = None
        if self.relay_transport is not None:
            self.relay_transport.resumeProducing()
        if self.exchange is None and self.events and not self.closing:
            self._process()

    def stopProducing(self) -> None:
        pass

    def _stalled(self) -> None:
        """The client has read nothing for http_idle_timeout while a response waits."""
        self._stall = None
        self.log.info("client {client} stopped reading: closing", client=self.client_ip)
        exchange = self.exchange
        if exchange is not None and not exchange.finished:
            exchange.abandon_upstream()
            exchange.finish("client_stalled", keep_alive=False, abort=True)
        elif self.transport is not None:
            self.closing = True
            self.transport.abortConnection()

    def relay_started(self, transport: IPushProducer) -> None:
        self.relay_transport = transport
        if self.write_paused:
            transport.pauseProducing()

    def relay_stopped(self) -> None:
        self.relay_transport = None

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        if self.held is not None:
            self.held.append(data)
            if sum(map(len, self.held)) > 64 * 1024:
                self.pause("held")
            return
        events = self.reader.feed(data)
        if events or self.reader.in_head:
            # Only a request (or the start of one) counts as activity: empty lines between
            # requests (RFC 9112 2.2) do not hold the connection open.
            self._cancel_idle()
        self.events.extend(events)
        if self.reader.in_head and self._head_timer is None:
            self._head_timer = self.reactor.callLater(self.ctx.limits.request_head_timeout, self._head_timeout)
        self._process()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closing = True
        self._idle.stop()
        self.response_deadline.stop()
        for timer in (self._head_timer, self._rate_timer, self._stall):
            if timer is not None and timer.active():
                timer.cancel()
        exchange = self.exchange
        self.transport = None
        if exchange is not None and not exchange.finished:
            exchange.abandon_upstream()
            exchange.finish("client_gone", keep_alive=False)  # logged; nothing is left to write

    def readConnectionLost(self) -> None:
        """The client half-closed: answer what it sent whole, then close."""
        self.read_closed = True
        exchange = self.exchange
        if exchange is not None and not exchange.request_done and not exchange.finished:
            # It stopped in the middle of a request: that request will never be complete.
            exchange.abandon_upstream()
            exchange.finish("client_gone", keep_alive=False, abort=True)
            return
        if exchange is None and not self.events:
            self._close()

    def writeConnectionLost(self) -> None:
        self._close()

    def drain(self) -> None:
        """The gateway is stopping: end keep-alive after the request in progress."""
        self.draining = True
        if self.exchange is None and self.transport is not None:
            self.closing = True
            self.transport.loseConnection()

    # -- pausing the client ----------------------------------------------------------------------

    def pause(self, why: str) -> None:
        if not self._pauses and self.transport is not None:
            self.transport.pauseProducing()
        self._pauses.add(why)
        self._paused_in_window = True

    def resume(self, why: str) -> None:
        if why in self._pauses:
            self._pauses.discard(why)
            if not self._pauses and self.transport is not None:
                self.transport.resumeProducing()

    # -- events ----------------------------------------------------------------------------------

    def _process(self) -> None:
        events = self.events
        while events and not self.closing:
            event = events[0]
            exchange = self.exchange
            if isinstance(event, RequestHead):
                if exchange is not None or self.write_paused:
                    break  # pipelined: waits for the response in progress, and for the client to read
                events.popleft()
                self._cancel_head_timer()
                broken = self._rejected_ahead()
                if broken is not None:
                    # Its body is already known to be malformed: the shard never sees it.
                    while events and events[0] is not broken:
                        events.popleft()
                    continue
                self.exchange = exchange = H1Exchange(self, event)
                if event.body != "none":
                    self._start_rate_check()
                exchange.start()
            elif isinstance(event, bytes):
                events.popleft()
                if exchange is not None and not exchange.finished:
                    self.bytes_in_body += len(event)
                    exchange.body_data(event)
            elif event is END:
                events.popleft()
                self._stop_rate_check()
                if exchange is not None and not exchange.request_done:
                    exchange.request_ended()
            elif isinstance(event, Rejected):
                if exchange is not None and not exchange.request_done and not exchange.finished:
                    events.popleft()
                    exchange.broken(event)
                elif exchange is not None:
                    break  # answered once the response in progress is complete
                else:
                    events.popleft()
                    self._reject(event)
            elif isinstance(event, Stopped):
                events.popleft()
                if exchange is not None and exchange.head.body != "none":
                    # Never: a request with a body is read to its end before a switch. Bytes
                    # after it cannot be trusted to be anything.
                    self.log.error("protocol switch after a request with a body: closing")
                    self._close()
                    return
                self.held = [event.rest] if event.rest else []
        if events and isinstance(events[0], (RequestHead, Rejected)):
            self.pause("pipelined")
        if self.exchange is None and not self.events and not self.reader.in_head and not self._idle.armed \
                and not self.closing:
            self._arm_idle()

    def _rejected_ahead(self) -> Rejected | None:
        """The rejection already parsed within the request now starting, if any."""
        for event in self.events:
            if event is END or isinstance(event, (RequestHead, Stopped)):
                return None
            if isinstance(event, Rejected):
                return event
        return None

    def _reject(self, rejected: Rejected) -> None:
        self._cancel_head_timer()
        self.count_rejected(rejected)
        self.write_answer(Answer(rejected.status, (), (rejected.reason, rejected.message)), b"GET", None,
                          "1.1", keep_alive=False)
        self.log.info("refused a request from {client}: {reason} ({message})", client=self.client_ip,
                      reason=rejected.reason, message=rejected.message)
        self._close()

    def count_rejected(self, rejected: Rejected) -> None:
        metrics.HTTP_REJECTED.labels(reason=rejected.reason).inc()

    def exchange_done(self, exchange: H1Exchange, outcome: str, keep_alive: bool, abort: bool) -> None:
        self._access_log(exchange, outcome)
        if self.exchange is exchange:
            self.exchange = None
        self._stop_rate_check()
        if self.transport is None:
            return
        if abort:
            self.closing = True
            self.transport.abortConnection()
            return
        if not keep_alive or self.draining:
            self._close()
            return
        if self.held is not None:
            # The shard did not switch protocols: what the client sent next is HTTP again,
            # read by a new parser and checked like any request.
            held, self.held = self.held, None
            limits = self.ctx.limits
            self.reader = RequestReader(self.server_name, limits.max_header_bytes, limits.max_headers)
            self.resume("held")
            for chunk in held:
                self.events.extend(self.reader.feed(chunk))
        self.resume("pipelined")
        self._process()
        if self.exchange is None and not self.events and self.read_closed:
            self._close()
        elif self.exchange is None and not self.events:
            if self.reader.in_head and self._head_timer is None:
                self._head_timer = self.reactor.callLater(self.ctx.limits.request_head_timeout,
                                                          self._head_timeout)
            if not self._idle.armed:  # _process has armed it just now, unless a head has begun
                self._arm_idle()

    def become_tunnel(self, exchange: H1Exchange, response: Any) -> None:
        """After a 101: the client's connection and the shard's become one splice."""
        self._access_log(exchange, "upgraded")
        self.exchange = None
        self._stop_rate_check()
        self._cancel_idle()
        self.closing = True
        held, self.held = self.held or [], None
        # Only a TLS connection is handed over: the front door gives this protocol one.
        tls = cast("TLSServerConnection", self.transport)
        splice = Splice(self.route, self.reactor, self.ctx.connect_timeout, self.ctx.tunnel_idle_timeout,
                        preamble=b"".join(held), on_done=self._tunnel_done)
        splice.adopt()
        tls.unregisterProducer()  # this connection's producer role ends with it
        self.relay_transport = None
        tls.switch_protocol(splice.client)
        if self._pauses:
            self._pauses.clear()
            tls.resumeProducing()
        response.take_tunnel(UpstreamSide(splice))

    def _tunnel_done(self, splice: Splice) -> None:
        if self.ctx.access_log:
            self.log.info("tunnel {client} shard={shard} port={port} up={up} down={down}",
                          event_kind="http_tunnel", client=self.client_ip, shard=self.route.shard.id,
                          port=self.route.port.port, up=splice.bytes_up, down=splice.bytes_down)

    # -- answers ---------------------------------------------------------------------------------

    def write_answer(self, answer: Answer, method: bytes, accept: bytes | None, version: str,
                     keep_alive: bool) -> None:
        if self.transport is None:
            return
        metrics.count_request("proxy", answer.status, method)
        lines = [b"HTTP/1.1 %d %s" % (answer.status, REASONS.get(answer.status, b"Error"))]
        lines += [name + b": " + value for name, value in answer.headers]
        body = b""
        if answer.error is not None:
            metrics.HTTP_ERROR_PAGES.labels(code=str(answer.status)).inc()
            content_type, body = render_error(answer.status, answer.error[0], answer.error[1], accept)
            lines += [b"Content-Type: " + content_type, b"Cache-Control: no-store"]
        lines.append(b"Content-Length: %d" % len(body))
        if not keep_alive:
            lines.append(b"Connection: close")
        elif version != "1.1":
            lines.append(b"Connection: keep-alive")
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if method == b"HEAD" else body))

    def _close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.loseConnection()

    # -- timers ----------------------------------------------------------------------------------

    def _arm_idle(self) -> None:
        if self.closing:
            self._idle.clear()
        else:
            self._idle.set(self.ctx.limits.http_idle_timeout, self._idle_timeout)

    def _cancel_idle(self) -> None:
        self._idle.clear()

    def _idle_timeout(self) -> None:
        if self.exchange is None and not self.reader.in_head:
            self._close()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None and self._head_timer.active():
            self._head_timer.cancel()
        self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.exchange is None and not self.closing:
            self._reject(Rejected(408, "head_timeout", "the request head did not arrive in time"))

    def _start_rate_check(self) -> None:
        limits = self.ctx.limits
        if limits.body_min_rate and self._rate_timer is None:
            self._rate_mark = self.bytes_in_body
            self._paused_in_window = bool(self._pauses)
            self._rate_timer = self.reactor.callLater(limits.body_rate_window, self._check_rate)

    def _stop_rate_check(self) -> None:
        if self._rate_timer is not None and self._rate_timer.active():
            self._rate_timer.cancel()
        self._rate_timer = None

    def _check_rate(self) -> None:
        self._rate_timer = None
        limits = self.ctx.limits
        exchange = self.exchange
        if exchange is None or exchange.request_done or exchange.finished:
            return
        got = self.bytes_in_body - self._rate_mark
        if not self._paused_in_window and got < limits.body_min_rate * limits.body_rate_window:
            # A body trickled slower than the minimum rate while the gateway was reading it
            # (a slow shard pausing the client does not count against the client).
            metrics.HTTP_REJECTED.labels(reason="body_timeout").inc()
            self.log.info("request body from {client} too slow: {bytes} bytes in {window}s",
                          client=self.client_ip, bytes=got, window=limits.body_rate_window)
            exchange.abandon_upstream()
            exchange.answer(Answer(408, (), ("body_timeout", "the request body arrived too slowly")))
            return
        self._start_rate_check()

    def _access_log(self, exchange: H1Exchange, outcome: str) -> None:
        access_log(_ACCESS_LOG, self.ctx, self.route, exchange.request, outcome, exchange.received)


# The access line's logger: the namespace of H1ProxyConnection.log, without the new Logger that
# reading self.log makes (Logger is a descriptor) once per request.
_ACCESS_LOG = Logger(namespace=f"{H1ProxyConnection.__module__}.{H1ProxyConnection.__qualname__}")


__all__ = ["H1ProxyConnection"]
