"""
The reverse proxy for shard ports declared ``http/1.1`` (and for HTTP/1.1 clients of ``h2``
ports, see L{twisted_gateway.http.h2proxy}).

Clients speak HTTP/1.1 or h2 (twisted.web serves both, chosen by ALPN); the shard is spoken to
in HTTP/1.1 through a keep-alive connection pool (L{twisted_gateway.http.upstream}, keyed by shard address
and port).  Responses stream to the client with backpressure; private ports require a JWT (see
L{twisted_gateway.http.auth}); a websocket upgrade is forwarded and, once the shard answers,
the connection becomes a splice.
"""

from __future__ import annotations

import io
import time
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web._newclient import (
    RequestGenerationFailed, RequestTransmissionFailed, ResponseFailed, ResponseNeverReceived,
)
from twisted.web.client import FileBodyProducer
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.resource import Resource
from twisted.web.iweb import IBodyProducer
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from twisted_gateway import metrics
from twisted_gateway.directory.model import Route
from twisted_gateway.http.auth import AuthDecision, TokenVerifier
from twisted_gateway.http.errors import negotiate, quiet_site, write_error
from twisted_gateway.http.policy import (
    HOP_BY_HOP, Answer, auth_redirect, authorize, forwarding_headers, rate_limit_wait, refusal, request_token,
    strip_cookie,
)
from twisted_gateway.http.upstream import UpstreamPool
from twisted_gateway.limits import retry_after_header
from twisted_gateway.splice import Splice

_BODYLESS = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE"})


# Replaced by the gateway's own values (http/policy.py, forwarding_headers).
_REPLACED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"})


def _hop_by_hop(headers: Any) -> set[bytes]:
    names = set(HOP_BY_HOP)
    for value in headers.getRawHeaders(b"connection", []):
        names.update(v.strip().lower() for v in value.split(b",") if v.strip())
    return names


class HTTPRouteContext:
    """What every proxied request needs, shared by all connections of one gateway."""

    def __init__(self, reactor: Any, hostname: str, verifier: TokenVerifier | None,
                 connect_timeout: float, response_timeout: float, signin_url: str | None,
                 cookie_name: str, cookie_max_age: int, pool_size: int = 64) -> None:
        self.reactor = reactor
        self.hostname = hostname
        self.verifier = verifier
        self.response_timeout = response_timeout
        self.connect_timeout = connect_timeout
        self.signin_url = signin_url
        self.cookie_name = cookie_name.encode()
        self.cookie_max_age = cookie_max_age
        # Set by the gateway: the admission state in force (rate limits), swapped on reload.
        self.admission: Any = None
        self.access_log = True
        self.upstream = UpstreamPool(reactor, connect_timeout, pool_size)

    def token_of(self, request: Any) -> str | None:
        return request_token(request.getHeader(b"authorization"),
                             request.requestHeaders.getRawHeaders(b"cookie", []), self.cookie_name)

    def url_is_ours(self, url: str) -> bool:
        try:
            parts = urlsplit(url)
        except ValueError:
            return False
        host = (parts.hostname or "").lower()
        return parts.scheme == "https" and (host == self.hostname or host.endswith("." + self.hostname))


class _BodyForwarder(Protocol):
    """Streams an upstream response body to the client request, with backpressure."""

    def __init__(self, request: Any) -> None:
        self.request = request
        self.done = False

    def connectionMade(self) -> None:
        self.request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        if not self.done:
            self.request.write(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self.done:
            return
        self.done = True
        self.request.unregisterProducer()
        if reason.check(ResponseFailed, ierror.ConnectionLost) and not reason.check(http.PotentialDataLoss):
            # The shard broke off mid-body: abort so the client sees a truncated response, not
            # a complete one.
            self.request.channel.transport.abortConnection() if self.request.channel else None
            return
        self.request.finish()

    def stop(self) -> None:
        if not self.done and self.transport is not None:
            self.done = True
            self.transport.stopProducing()


class ProxyResource(Resource):
    isLeaf = True
    log = Logger()

    def __init__(self, route: Route, ctx: HTTPRouteContext, upstream: Any = None) -> None:
        super().__init__()
        self.route = route
        self.ctx = ctx
        # The shard is spoken to in HTTP/1.1 through the shared pool, or for h2 ports through
        # the client connection's own h2 upstream (L{twisted_gateway.http.h2proxy.H2Upstream}).
        self.upstream = upstream if upstream is not None else ctx.upstream
        self.websockets = upstream is None

    # -- entry ----------------------------------------------------------------------------------

    def start_stream(self, request: StreamingProxyRequest) -> StreamingBody | None:
        """
        Called with the first chunk of a request body: check the request and start forwarding
        it, so the body streams to the shard as it arrives.  Returns the body pipe, or None
        when the body should be kept for L{render} (refused or special requests).
        """
        if request.path == b"/auth-redirect" or (self.websockets and request.requestHeaders.hasHeader(b"upgrade")):
            return None
        decision = None
        if not self.route.port.public:
            decision = self._authorize(request)
            if not decision.allowed:
                request.refusal = decision
                return None
        wait = self._rate_limited(request, decision)
        if wait:
            request.rate_limited = wait
            return None
        channel = request.channel
        if isinstance(channel, http.HTTPChannel):
            pause, resume = channel.transport.pauseProducing, channel.transport.resumeProducing
        else:  # an h2 stream: pausing withholds its flow-control window
            pause, resume = channel.pauseProducing, channel.resumeProducing
        body = StreamingBody(request.declared_length, pause, resume)
        self._forward(request, body)
        return body

    def _access_log(self, request: Any, started: float) -> None:
        self.log.info(
            "access {client} {method} {path} -> {status} shard={shard} port={port} "
            "bytes={bytes} duration={duration:.3f}",
            event_kind="http_access", client=getattr(request.getClientAddress(), "host", "?"),
            method=request.method.decode("latin-1"), path=request.path.decode("latin-1"),
            status=request.code, shard=self.route.shard.id, port=self.route.port.port,
            bytes=request.sentLength, duration=time.monotonic() - started)

    def render(self, request: Any) -> Any:
        # render runs once the whole request has arrived.
        if self.ctx.access_log:
            started = time.monotonic()
            request.notifyFinish().addBoth(lambda _: self._access_log(request, started))
        streamed = getattr(request, "body", None)
        received = getattr(request, "received", None)
        if streamed is not None:
            # The whole body has been passed on: end it and let the response through.
            streamed.finish()
        if received is not None and not received.called:
            received.callback(None)
        if streamed is not None:
            return NOT_DONE_YET
        if request.path == b"/auth-redirect" and request.method == b"GET":
            return self._auth_redirect(request)
        refused = getattr(request, "refusal", None)
        if refused is not None:
            return self._refuse(request, refused)
        wait = getattr(request, "rate_limited", 0.0)
        if wait:
            return self._too_many(request, wait)
        decision = None
        if not self.route.port.public:
            decision = self._authorize(request)
            if not decision.allowed:
                return self._refuse(request, decision)
        wait = self._rate_limited(request, decision)
        if wait:
            return self._too_many(request, wait)
        if self.websockets and request.requestHeaders.hasHeader(b"upgrade") \
                and request.clientproto == b"HTTP/1.1" and isinstance(request.channel, http.HTTPChannel):
            return self._upgrade(request)
        return self._forward(request)

    def _finish_error(self, request: Any, status: int, code: str, message: str) -> bytes:
        metrics.count_request("proxy", status, request.method)
        return write_error(request, status, code, message)

    # -- authorization --------------------------------------------------------------------------

    def _authorize(self, request: Any) -> AuthDecision:
        return authorize(self.ctx, self.ctx.token_of(request), self.route.shard.task)

    def _refuse(self, request: Any, decision: AuthDecision) -> bytes:
        original = f"https://{request.getRequestHostname().decode()}" \
                   f"{self._port_suffix(request)}{request.uri.decode('latin-1')}"
        wants_html = negotiate(request.getHeader(b"accept")) == "html"
        return self._answer(request, refusal(self.ctx, decision, request.method, wants_html, original))

    def _answer(self, request: Any, answer: Answer) -> bytes:
        for name, value in answer.headers:
            request.setHeader(name, value)
        if answer.error is not None:
            return self._finish_error(request, answer.status, *answer.error)
        request.setResponseCode(answer.status)
        metrics.count_request("proxy", answer.status, request.method)
        return b""

    def _rate_limited(self, request: Any, decision: AuthDecision | None) -> float:
        """0, or the seconds until this client (IP, then token subject) may send again."""
        ip = getattr(request.getClientAddress(), "host", "?")
        return rate_limit_wait(self.ctx, ip, decision, lambda: self.ctx.token_of(request))

    def _too_many(self, request: Any, wait: float) -> bytes:
        request.setHeader(b"retry-after", retry_after_header(wait))
        return self._finish_error(request, 429, "rate_limited",
                                  f"too many requests: retry in {max(1, round(wait))} s")

    def _port_suffix(self, request: Any) -> str:
        port = request.getHost().port
        return "" if port == 443 else f":{port}"

    def _auth_redirect(self, request: Any) -> bytes:
        return self._answer(request, auth_redirect(self.ctx, request.uri.decode("latin-1").partition("?")[2]))

    # -- forwarding -------------------------------------------------------------------------------

    def _upstream_headers(self, request: Any) -> list[tuple[bytes, bytes]]:
        """The request's fields for the shard, as name/value pairs: hop-by-hop fields, Expect
        and (on private ports) the token removed, the forwarding fields replaced."""
        incoming: Headers = request.requestHeaders
        drop = _hop_by_hop(incoming) | _REPLACED
        # The gateway has read the whole body already (it answered any 100-continue itself).
        drop.add(b"expect")
        if not self.route.port.public:
            drop.add(b"authorization")
        out: list[tuple[bytes, bytes]] = []
        has_host = False
        for name, values in incoming.getAllRawHeaders():
            lname = name.lower()
            if lname in drop:
                continue
            if lname == b"cookie":
                values = [v for v in (strip_cookie(v, self.ctx.cookie_name) for v in values) if v]
            elif lname == b"host":
                has_host = True
            out.extend((name, value) for value in values)
        client = request.getClientAddress()
        client_ip = getattr(client, "host", "unknown")
        host = request.getHeader(b"host") or request.getRequestHostname()
        out += forwarding_headers(incoming.getRawHeaders(b"x-forwarded-for", []),
                                  incoming.getRawHeaders(b"forwarded", []), client_ip, host)
        if not has_host:
            out.append((b"Host", host))
        return out

    def _forward(self, request: Any, body: Any = None) -> Any:
        shard, port = self.route.shard, self.route.port
        if body is None:
            content = request.content
            content.seek(0, 2)
            length = content.tell()
            content.seek(0)
            if length or request.method not in _BODYLESS:
                body = FileBodyProducer(content)
        started = time.monotonic()
        d = self.upstream.request(shard.address, port.target_port, request.method, request.uri,
                                      self._upstream_headers(request), body)
        timed_out: list[bool] = []

        def time_out() -> None:
            timed_out.append(True)
            d.cancel()
        timers: list[Any] = []

        def start_timer(_: Any = None) -> None:
            # The response timeout runs from the end of the request: a long upload is not
            # the shard being slow.
            if not d.called:
                timers.append(self.ctx.reactor.callLater(self.ctx.response_timeout, time_out))
        received = getattr(request, "received", None)
        if isinstance(body, StreamingBody) and received is not None and not received.called:
            received.addCallback(start_timer)
        else:
            start_timer()

        def settled(result: Any) -> Any:
            for timer in timers:
                if timer.active():
                    timer.cancel()
            return result
        d.addBoth(settled)
        forwarder = _BodyForwarder(request)
        finished = request.notifyFinish()
        finished.addErrback(lambda _: (d.cancel(), forwarder.stop()))
        d.addCallbacks(self._got_response, self._upstream_error,
                       callbackArgs=(request, forwarder, started), errbackArgs=(request, timed_out))
        d.addErrback(lambda f: self.log.failure("proxying failed", f))
        return NOT_DONE_YET

    def _got_response(self, response: Any, request: Any, forwarder: _BodyForwarder, started: float) -> None:
        metrics.UPSTREAM_RESPONSE_SECONDS.observe(time.monotonic() - started)
        received = getattr(request, "received", None)
        if received is not None and not received.called:
            # The shard answered before the client finished sending: hold the response (the
            # shard's socket buffers it) until the request is complete, as HTTP/1.1 needs.
            received.addCallback(lambda _: self._got_response(response, request, forwarder, started))
            return
        if request._disconnected:
            response.deliverBody(Protocol())
            return
        request.setResponseCode(response.code, response.phrase)
        drop = _hop_by_hop(response.headers)
        for name, values in response.headers.getAllRawHeaders():
            if name.lower() not in drop and name.lower() not in (b"content-length",):
                request.responseHeaders.setRawHeaders(name, values)
        if response.length is not UNKNOWN_LENGTH and request.method != b"HEAD":
            request.setHeader(b"content-length", str(response.length).encode())
        elif request.method == b"HEAD" and response.headers.hasHeader(b"content-length"):
            request.responseHeaders.setRawHeaders(b"content-length", response.headers.getRawHeaders(b"content-length"))
        metrics.count_request("proxy", response.code, request.method)
        response.deliverBody(forwarder)

    def _upstream_error(self, failure: Failure, request: Any, timed_out: list[bool]) -> None:
        received = getattr(request, "received", None)
        if received is not None and not received.called:
            body = getattr(request, "body", None)
            if body is not None:
                body.discard()
            received.addCallback(lambda _: self._upstream_error(failure, request, timed_out))
            return
        if request._disconnected:
            return
        shard = self.route.shard
        if timed_out or failure.check(CancelledError, ierror.TimeoutError, ierror.TCPTimedOutError):
            status, code, message = 504, "upstream_timeout", \
                f"shard {shard.id} did not answer within the timeout"
            reason = "timeout"
        elif failure.check(ierror.ConnectionRefusedError):
            status, code, message = 502, "upstream_refused", f"shard {shard.id} refused the connection"
            reason = "refused"
        elif failure.check(ierror.ConnectError, ierror.DNSLookupError):
            status, code, message = 502, "upstream_unreachable", f"shard {shard.id} is unreachable"
            reason = "unreachable"
        elif failure.check(ResponseNeverReceived, RequestTransmissionFailed, RequestGenerationFailed,
                           ResponseFailed):
            status, code, message = 502, "upstream_reset", f"shard {shard.id} closed the connection"
            reason = "error"
        else:
            status, code, message = 502, "upstream_error", f"shard {shard.id} failed"
            reason = "error"
        if reason in ("timeout", "refused", "unreachable"):
            metrics.UPSTREAM_CONNECT_FAILURES.labels(reason=reason).inc()
        self.log.warn("proxy to {shard} {address}:{port} failed: {code} ({error})", shard=shard.id,
                      address=shard.address, port=self.route.port.target_port, code=code,
                      error=failure.getErrorMessage())
        body = self._finish_error(request, status, code, message)
        request.write(body)
        request.finish()

    # -- websocket ------------------------------------------------------------------------------

    def _upgrade(self, request: Any) -> Any:
        """Replay the upgrade request to the shard and turn the connection into a splice."""
        headers = self._upstream_headers(request)
        # Keep the upgrade negotiation itself.
        headers.append((b"Connection", b"Upgrade"))
        headers.extend((b"Upgrade", v) for v in request.requestHeaders.getRawHeaders(b"upgrade", []))
        head = [request.method + b" " + request.uri + b" HTTP/1.1"]
        head.extend(name + b": " + value for name, value in headers)
        preamble = b"\r\n".join(head) + b"\r\n\r\n"
        request.content.seek(0)
        preamble += request.content.read()
        channel = request.channel
        channel.setTimeout(None)
        tls = channel.transport  # the gateway's TLSServerConnection
        tls.unregisterProducer()
        splice = Splice(self.route, self.ctx.reactor, self.ctx.connect_timeout, 3600.0,
                        preamble=preamble)
        splice.connect()
        tls.switch_protocol(splice.client)
        metrics.count_request("proxy", 101, request.method)
        return NOT_DONE_YET


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


class StreamingProxyRequest(Request):
    """A twisted.web request whose body is streamed to the shard instead of spooled."""

    body: StreamingBody | None = None
    refusal: AuthDecision | None = None
    rate_limited: float = 0.0
    declared_length: int | None = None

    def __init__(self, resource: ProxyResource, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.proxy = resource

    def gotLength(self, length: int | None) -> None:
        self.declared_length = length
        self.content = io.BytesIO()
        self.received = Deferred()
        self._started = False

    def handleContentChunk(self, data: bytes) -> None:
        if not self._started:
            self._started = True
            self._learn_request_line()
            self.body = self.proxy.start_stream(self)
        if self.body is not None:
            self.body.write(data)
        elif self.refusal is None and not self.rate_limited:
            # Kept for render (an /auth-redirect or upgrade request): bounded like the API.
            if self.content.tell() < 1024 * 1024:
                self.content.write(data)

    def _learn_request_line(self) -> None:
        channel = self.channel
        if isinstance(channel, http.HTTPChannel):
            self.method, uri, self.clientproto = channel._command, channel._path, channel._version
        else:
            self.method, uri, self.clientproto = channel.command, channel.path, b"HTTP/2"
        self.uri = uri
        self.path = uri.split(b"?", 1)[0]


def proxy_site(route: Route, ctx: HTTPRouteContext, upstream: Any = None) -> Site:
    resource = ProxyResource(route, ctx, upstream)
    site = quiet_site(resource)
    site.requestFactory = lambda *args, **kwargs: StreamingProxyRequest(resource, *args, **kwargs)
    return site
