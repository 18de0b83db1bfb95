"""
The reverse proxy for HTTP/1.1 clients of shard ports (``http/1.1`` ports, and HTTP/1.1 clients
of ``h2`` ports through L{twisted_gateway.http.h2proxy.H2Upstream}).

Requests are read with L{twisted_gateway.http.h1parse} (httptools, strict), one at a time, and
each is checked by the gate (L{twisted_gateway.http.policy}) before anything reaches the shard.
The gateway owns the framing both ways: the shard gets one canonical Content-Length or chunked
framing computed from the parsed message, and never more body bytes than it declares; the client
gets the response with the gateway's framing, hop-by-hop fields removed.  A connection becomes a
tunnel only when the shard answers ``101 Switching Protocols`` to a websocket upgrade the gateway
forwarded; until then the client's next bytes wait, and any other answer leaves the connection
HTTP with every check applied to its next request.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from twisted_gateway import metrics
from twisted_gateway.directory.model import Route
from twisted_gateway.http.auth import AuthDecision, TokenVerifier
from twisted_gateway.http.errors import negotiate, render_error
from twisted_gateway.http.framing import client_fields_for_shard, response_fields_for_client, safe_phrase
from twisted_gateway.http.h1parse import END, RequestHead, RequestReader, Rejected, Stopped
from twisted_gateway.http.policy import (
    Answer, auth_redirect, authorize, rate_limit_wait, refusal, request_token,
)
from twisted_gateway.http.upstream import UpstreamPool, upstream_failure_answer
from twisted_gateway.limits import in_networks, parse_networks, retry_after_header
from twisted_gateway.splice import Splice, UpstreamSide

_REASONS = {100: b"Continue", 200: b"OK", 204: b"No Content", 307: b"Temporary Redirect",
            400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found",
            405: b"Method Not Allowed", 408: b"Request Timeout", 413: b"Content Too Large",
            421: b"Misdirected Request", 429: b"Too Many Requests", 431: b"Request Header Fields Too Large",
            500: b"Internal Server Error", 501: b"Not Implemented", 502: b"Bad Gateway",
            503: b"Service Unavailable", 504: b"Gateway Timeout", 505: b"HTTP Version Not Supported"}


class HTTPRouteContext:
    """What every proxied request needs, shared by all connections of one gateway."""

    def __init__(self, reactor: Any, hostname: str, verifier: TokenVerifier | None,
                 connect_timeout: float, response_timeout: float, signin_url: str | None,
                 cookie_name: str, cookie_max_age: int, pool_size: int = 64,
                 limits: Any = None, trusted_proxies: tuple[str, ...] = (),
                 tunnel_idle_timeout: float = 3600.0, upstream: UpstreamPool | None = None) -> None:
        from twisted_gateway.config import LimitsConfig
        self.reactor = reactor
        self.hostname = hostname
        self.verifier = verifier
        self.response_timeout = response_timeout
        self.connect_timeout = connect_timeout
        self.signin_url = signin_url
        self.cookie_name = cookie_name.encode()
        self.cookie_max_age = cookie_max_age
        self.limits = limits if limits is not None else LimitsConfig()
        self.trusted_networks = parse_networks(trusted_proxies)
        self.tunnel_idle_timeout = tunnel_idle_timeout
        # Set by the gateway: the admission state in force (rate limits), swapped on reload.
        self.admission: Any = None
        self.access_log = True
        self.upstream = upstream if upstream is not None else UpstreamPool(reactor, connect_timeout, pool_size)

    def trusted(self, client_ip: str) -> bool:
        return bool(self.trusted_networks) and in_networks(client_ip, self.trusted_networks)

    def max_body(self, route: Route) -> int:
        """The largest request body for C{route} (0: no limit)."""
        own = route.port.max_body_bytes
        return self.limits.max_body_bytes if own is None else own


@implementer(IBodyProducer)
class StreamingBody:
    """
    A request body passed to the shard as it arrives.  Until the upstream connection takes it
    (startProducing), at most C{_HOLD} bytes are held and the client is paused beyond that;
    afterwards the upstream transport's flow control pauses the client directly.
    """

    _HOLD = 256 * 1024

    def __init__(self, length: int | None, pause: Any, resume: Any) -> None:
        self.length = UNKNOWN_LENGTH if length is None else length
        self._pause, self._resume = pause, resume
        self._consumer: Any = None
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._paused = False
        self._finished = False
        self._discarding = False
        self._done: Deferred | None = None

    def write(self, data: bytes) -> None:
        if self._discarding:
            return
        if self._consumer is not None:
            self._consumer.write(data)
            return
        self._held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes > self._HOLD and not self._paused:
            self._paused = True
            self._pause()

    def finish(self) -> None:
        self._finished = True
        if self._done is not None and not self._done.called:
            self._done.callback(None)

    def discard(self) -> None:
        """The shard is gone: swallow the rest of the body."""
        self._discarding = True
        self._held = []
        if self._paused:
            self._paused = False
            self._resume()

    def startProducing(self, consumer: Any) -> Deferred:
        self._consumer = consumer
        held, self._held = self._held, []
        for chunk in held:
            consumer.write(chunk)
        self._held_bytes = 0
        if self._paused:
            self._paused = False
            self._resume()
        self._done = Deferred()
        if self._finished:
            self._done.callback(None)
        return self._done

    def pauseProducing(self) -> None:
        if not self._paused:
            self._paused = True
            self._pause()

    def resumeProducing(self) -> None:
        if self._paused:
            self._paused = False
            self._resume()

    def stopProducing(self) -> None:
        # The upstream request was abandoned; its Deferred must not fire afterwards.
        self.discard()
        self._consumer = None


class _ResponseRelay(Protocol):
    """Streams the shard's response body to the client with the gateway's framing."""

    def __init__(self, exchange: _Exchange, chunked: bool) -> None:
        self.exchange = exchange
        self.chunked = chunked
        self.done = False

    def makeConnection(self, transport: Any) -> None:
        # The shard's socket is paused while the client's is full (see H1ProxyConnection's
        # producer methods, which pass the signal on).
        self.transport = transport
        self.exchange.conn.relay_started(transport)

    def dataReceived(self, data: bytes) -> None:
        if self.done or not data:
            return
        client = self.exchange.conn.transport
        if client is None:
            return
        self.exchange.sent += len(data)
        client.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.done:
            return
        self.done = True
        client = self.exchange.conn.transport
        self.exchange.conn.relay_stopped()
        if reason is not None and not reason.check(ResponseDone):
            # The shard broke off mid-body: the client sees a cut connection, never a short
            # body that looks whole.
            self.exchange.finish("upstream_reset", keep_alive=False, abort=True)
            return
        if self.chunked and client is not None:
            client.write(b"0\r\n\r\n")
        self.exchange.finish("ok")

    def stop(self) -> None:
        if not self.done:
            self.done = True
            if self.transport is not None:
                self.transport.stopProducing()


class _Exchange:
    """One request of a client connection and its answer."""

    def __init__(self, conn: H1ProxyConnection, head: RequestHead) -> None:
        self.conn = conn
        self.head = head
        self.started = time.monotonic()
        self.body: StreamingBody | None = None
        self.received = 0
        self.request_done = False
        self.response_started = False
        self.finished = False
        self.upgrade = False
        self.status = 0
        self.sent = 0
        self.keep_alive = head.keep_alive
        self.deferred: Deferred | None = None
        self.relay: _ResponseRelay | None = None
        self.timer: Any = None
        self.timed_out = False
        self.abandoned = False
        self.client_ip = conn.client_ip

    # -- the gate ------------------------------------------------------------------------------

    def start(self) -> None:
        conn, head, ctx, route = self.conn, self.head, self.conn.ctx, self.conn.route
        if head.path == b"/auth-redirect" and head.method == b"GET":
            query = head.target.decode("latin-1").partition("?")[2]
            self.answer(auth_redirect(ctx, query, route.shard.task))
            return
        decision: AuthDecision | None = None
        token = None
        if not route.port.public:
            token = request_token(self._field(b"authorization"), self._fields(b"cookie"), ctx.cookie_name)
            decision = authorize(ctx, token, route.shard.task)
            if not decision.allowed:
                original = f"https://{head.host.decode('latin-1')}{head.target.decode('latin-1')}"
                wants_html = negotiate(self._field(b"accept")) == "html"
                self.answer(refusal(ctx, decision, head.method, wants_html, original))
                return
        wait = rate_limit_wait(ctx, self.client_ip, decision, lambda: token)
        if wait:
            self.answer(Answer(429, ((b"retry-after", retry_after_header(wait)),),
                               ("rate_limited", f"too many requests: retry in {max(1, round(wait))} s")))
            return
        limit = ctx.max_body(route)
        if limit and head.length is not None and head.length > limit:
            metrics.HTTP_REJECTED.labels(reason="too_large").inc()
            self.answer(Answer(413, (), ("too_large", f"the request body is over {limit} bytes")))
            return
        self.upgrade = (conn.websockets and head.method == b"GET" and b"websocket" in head.upgrade
                        and head.version == "1.1")
        fields = client_fields_for_shard(
            head.fields, head.host, private=not route.port.public, cookie_name=ctx.cookie_name,
            client_ip=self.client_ip, trusted=ctx.trusted(self.client_ip), upgrade=self.upgrade)
        if head.body != "none":
            self.body = StreamingBody(head.length, lambda: conn.pause("body"), lambda: conn.resume("body"))
            if head.expect_continue:
                # The request passed the gate: let the client send its body (RFC 9110 10.1.1).
                conn.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        shard, port = route.shard, route.port
        d = conn.upstream.request(shard.address, port.target_port, head.method, head.target, fields,
                                  self.body, upgrade=self.upgrade)
        self.deferred = d
        d.addCallbacks(self._got_response, self._upstream_failed)
        d.addErrback(lambda f: conn.log.failure("proxying failed", f))
        if self.body is None:
            self.request_ended()

    def _field(self, name: bytes) -> bytes | None:
        for n, v in self.head.fields:
            if n.lower() == name:
                return v
        return None

    def _fields(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.head.fields if n.lower() == name]

    # -- the request body ----------------------------------------------------------------------

    def body_data(self, data: bytes) -> None:
        self.received += len(data)
        limit = self.conn.ctx.max_body(self.conn.route)
        if limit and self.received > limit:
            metrics.HTTP_REJECTED.labels(reason="too_large").inc()
            self.abandon_upstream()
            self.answer(Answer(413, (), ("too_large", f"the request body is over {limit} bytes")))
            return
        if self.body is not None:
            self.body.write(data)

    def request_ended(self) -> None:
        self.request_done = True
        if self.body is not None:
            self.body.finish()
        if not self.response_started and not self.finished and self.timer is None:
            # The response timeout runs from the end of the request: a long upload is not the
            # shard being slow.
            self.timer = self.conn.reactor.callLater(self.conn.ctx.response_timeout, self._time_out)

    def broken(self, rejected: Rejected) -> None:
        """The body's framing broke mid-request: the shard request is abandoned."""
        self.abandon_upstream()
        self.conn.count_rejected(rejected)
        self.answer(Answer(rejected.status, (), (rejected.reason, rejected.message)))

    def abandon_upstream(self) -> None:
        self.keep_alive = False
        self.abandoned = True
        if self.body is not None:
            self.body.discard()
        if self.relay is not None:
            self.relay.stop()
        d, self.deferred = self.deferred, None
        if d is not None and not d.called:
            d.cancel()

    def _time_out(self) -> None:
        self.timer = None
        self.timed_out = True
        d = self.deferred
        if d is not None and not d.called:
            d.cancel()

    # -- the response --------------------------------------------------------------------------

    def _got_response(self, response: Any) -> None:
        self._cancel_timer()
        conn = self.conn
        if self.finished or conn.transport is None:
            response.deliverBody(Protocol())
            return
        metrics.UPSTREAM_RESPONSE_SECONDS.observe(time.monotonic() - self.started)
        code = response.code
        self.status = code
        self.response_started = True
        metrics.count_request("proxy", code, self.head.method)
        if code == 101:
            self._tunnel(response)
            return
        client_11 = self.head.version == "1.1"
        lines = [b"HTTP/1.1 %d %s" % (code, safe_phrase(response.phrase, _REASONS.get(code, b"")))]
        fields = response_fields_for_client(response.headers.pairs)
        bodyless = self.head.method == b"HEAD" or code in (204, 304)
        chunked = False
        if bodyless:
            if code != 204:
                lines += [b"Content-Length: " + v.strip() for v in
                          response.headers.getRawHeaders(b"content-length", [])[:1] if v.strip().isdigit()]
        elif response.length is not UNKNOWN_LENGTH:
            lines.append(b"Content-Length: %d" % response.length)
        elif client_11:
            chunked = True
            lines.append(b"Transfer-Encoding: chunked")
        else:
            self.keep_alive = False  # HTTP/1.0: the end of the body is the end of the connection
        if not self.request_done:
            self.keep_alive = False  # the rest of the request body will not be read
        if conn.draining:
            self.keep_alive = False
        if not self.keep_alive:
            lines.append(b"Connection: close")
        elif not client_11:
            lines.append(b"Connection: keep-alive")
        lines += [name + b": " + value for name, value in fields]
        conn.transport.write(b"\r\n".join(lines) + b"\r\n\r\n")
        self.relay = _ResponseRelay(self, chunked)
        response.deliverBody(self.relay)

    def _tunnel(self, response: Any) -> None:
        """The shard switched to the websocket protocol the gateway asked for."""
        conn = self.conn
        lines = [b"HTTP/1.1 101 Switching Protocols", b"Connection: Upgrade", b"Upgrade: websocket"]
        lines += [name + b": " + value for name, value in response_fields_for_client(response.headers.pairs)]
        tls = conn.transport
        tls.write(b"\r\n".join(lines) + b"\r\n\r\n")
        self.finished = True
        metrics.HTTP_TUNNELS.inc()
        conn.become_tunnel(self, response)

    def _upstream_failed(self, failure: Failure) -> None:
        self._cancel_timer()
        if self.finished or self.abandoned:
            return  # the gateway gave up on the shard itself, and answers the client so
        route = self.conn.route
        status, code, message, reason = upstream_failure_answer(failure, route.shard.id, self.timed_out)
        if reason in ("timeout", "refused", "unreachable"):
            metrics.UPSTREAM_CONNECT_FAILURES.labels(reason=reason).inc()
        self.conn.log.warn("proxy to {shard} {address}:{port} failed: {code} ({error})", shard=route.shard.id,
                           address=route.shard.address, port=route.port.target_port, code=code,
                           error=failure.getErrorMessage())
        if self.body is not None:
            self.body.discard()
        if self.response_started:
            self.finish("upstream_reset", keep_alive=False, abort=True)
            return
        self.answer(Answer(status, (), (code, message)))

    def answer(self, answer: Answer) -> None:
        """Answer without the shard: a refusal, a redirect, a rejection or an upstream failure."""
        if self.finished or self.conn.transport is None:
            return
        if self.response_started:
            self.finish("error", keep_alive=False, abort=True)
            return
        self.response_started = True
        self.status = answer.status
        if not self.request_done:
            self.keep_alive = False  # its body is not read: the connection cannot carry another
        self.conn.write_answer(answer, self.head.method, self._field(b"accept"), self.head.version,
                               self.keep_alive)
        self.finish("answered")

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None

    def finish(self, outcome: str, keep_alive: bool = True, abort: bool = False) -> None:
        if self.finished:
            return
        self.finished = True
        self._cancel_timer()
        if self.body is not None and not self.request_done:
            self.body.discard()
        self.conn.exchange_done(self, self.keep_alive and keep_alive, abort)


@implementer(IHalfCloseableProtocol)
class H1ProxyConnection(Protocol):
    """An HTTP/1.1 client connection to a shard port, proxied request by request."""

    log = Logger()

    def __init__(self, route: Route, ctx: HTTPRouteContext, server_name: str, upstream: Any = None,
                 websockets: bool = True) -> None:
        self.route = route
        self.ctx = ctx
        self.reactor = ctx.reactor
        self.server_name = server_name
        self.upstream = upstream if upstream is not None else ctx.upstream
        self.websockets = websockets and upstream is None
        limits = ctx.limits
        self.reader = RequestReader(server_name, limits.max_header_bytes, limits.max_headers)
        self.events: deque[Any] = deque()
        self.exchange: _Exchange | None = None
        self.held: list[bytes] | None = None
        """Client bytes after a request that asked to switch protocols, until the shard answers."""
        self.draining = False
        self.closing = False
        self.read_closed = False
        self.write_paused = False
        self.relay_transport: Any = None
        self._stall: Any = None
        self.client_ip = "?"
        self._pauses: set[str] = set()
        self._idle: Any = None
        self._head_timer: Any = None
        self._rate_timer: Any = None
        self._rate_mark = 0
        self._paused_in_window = False
        self.bytes_in_body = 0

    # -- connection ------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.client_ip = str(getattr(peer, "host", "?"))
        # The client's socket tells this connection when its buffer is full (IPushProducer):
        # the response in progress is paused at the shard, and no further pipelined request
        # is started until the client reads again.
        self.transport.registerProducer(self, True)
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

    def relay_started(self, transport: Any) -> None:
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

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closing = True
        for timer in (self._idle, self._head_timer, self._rate_timer, self._stall):
            if timer is not None and timer.active():
                timer.cancel()
        exchange, self.exchange = self.exchange, None
        if exchange is not None and not exchange.finished:
            exchange.finished = True
            exchange._cancel_timer()
            exchange.abandon_upstream()
            self._access_log(exchange, "client_gone")
        self.transport = None

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
                self.exchange = exchange = _Exchange(self, event)
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
        if self.exchange is None and not self.events and not self.reader.in_head and self._idle is None \
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

    def exchange_done(self, exchange: _Exchange, keep_alive: bool, abort: bool) -> None:
        self._access_log(exchange, "ok")
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
            self._arm_idle()

    def become_tunnel(self, exchange: _Exchange, response: Any) -> None:
        """After a 101: the client's connection and the shard's become one splice."""
        self._access_log(exchange, "upgraded")
        self.exchange = None
        self._stop_rate_check()
        self._cancel_idle()
        self.closing = True
        held, self.held = self.held or [], None
        tls = self.transport
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
        lines = [b"HTTP/1.1 %d %s" % (answer.status, _REASONS.get(answer.status, b"Error"))]
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
        self._cancel_idle()
        if not self.closing:
            self._idle = self.reactor.callLater(self.ctx.limits.http_idle_timeout, self._idle_timeout)

    def _cancel_idle(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None

    def _idle_timeout(self) -> None:
        self._idle = None
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

    def _access_log(self, exchange: _Exchange, outcome: str) -> None:
        if not self.ctx.access_log:
            return
        head = exchange.head
        self.log.info(
            "access {client} {method} {path} -> {status} shard={shard} port={port} "
            "bytes={bytes} duration={duration:.3f}",
            event_kind="http_access", client=self.client_ip, method=head.method.decode("latin-1"),
            path=head.path.decode("latin-1"), status=exchange.status or outcome,
            shard=self.route.shard.id, port=self.route.port.port, bytes=exchange.sent,
            duration=time.monotonic() - exchange.started)


__all__ = ["H1ProxyConnection", "HTTPRouteContext", "StreamingBody"]
