"""
The TLS listener's protocol: peek at the ClientHello, decide the route (L{twisted_gateway.routing}),
then carry the decision out: terminate TLS with the route's context and hand the plaintext to
the route's handler, relay the TLS stream itself, or refuse.

Deciding before TLS starts (instead of in OpenSSL's servername callback) gives one place for
the handshake deadline and the ClientHello size bound, lets an unknown name be refused with a
single alert record without any TLS state, lets TLS pass through to a shard untouched, and
leaves room for routes that need an asynchronous step.  After the decision the protocol's
C{dataReceived} is replaced by the TLS engine's (or the splice's), so the relay path has no
extra Python call per chunk.  Each connection keeps the L{Runtime} it was accepted with.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from OpenSSL import SSL, crypto
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IDelayedCall, IHalfCloseableProtocol, IProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.server import Site
from zope.interface import implementer

from twisted_gateway import clienthello as ch
from twisted_gateway._compat import h2_send_control, http_channel
from twisted_gateway import metrics
from twisted_gateway.directory.model import Route
from twisted_gateway.http.auth import task_covered
from twisted_gateway.http.alpn import H2PortProtocol
from twisted_gateway.http.h1.connection import H1ProxyConnection
from twisted_gateway.http.h2.front import H2FrontConnection
from twisted_gateway.http.h2.h1bridge import H2Upstream
from twisted_gateway.interfaces import IStreamTransport
from twisted_gateway.limits import in_networks
from twisted_gateway.proxyheader import (
    ProxyHeaderError, ProxyHeaderReader, build_v2, looks_like_proxy_header,
)
from twisted_gateway.routing import (
    HTTP_ALPN, AcmeChallenge, Decision, GatewayApi, H2Route, HttpRoute, Refuse, SpliceRoute,
    TLSPassthrough, decide,
)
from twisted_gateway.runtime import Runtime
from twisted_gateway.splice import Splice, _ClientSide
from twisted_gateway.tls.connection import TLSServerConnection
from twisted_gateway.tls.contexts import ALPN_FOR_PROTOCOL, client_certificate_prefixes

_HTTP_ALPN = HTTP_ALPN
_BAD_REQUEST_HTTP = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\nContent-Length: 51\r\n\r\n"
    b"This port speaks TLS: use https:// with a SNI name\n"
)


Refused = tuple[float, str, "str | None", str, str]
"""One refusal as the ring keeps it: (unix time, client address, SNI name or None, reason, detail)."""


class ConnectionTracker:
    """
    The open front-door connections of one gateway process, whether it is draining, and its
    most recent refusals (a bounded ring the admin API shows: one tuple appended per refusal,
    the oldest dropped).
    """

    def __init__(self, refusals_kept: int = 256) -> None:
        self.connections: set[FrontDoor] = set()
        self.draining = False
        self.refusals: deque[Refused] = deque(maxlen=refusals_kept)
        self.refusals_recorded = 0

    def keep_refusals(self, count: int) -> None:
        """Keep the last C{count} refusals (those kept so far, up to that many, stay)."""
        self.refusals = deque(self.refusals, maxlen=count)

    def refused(self, when: float, client: str, sni: str | None, reason: str, detail: str = "") -> None:
        self.refusals.append((when, client, sni, reason, detail))
        self.refusals_recorded += 1


@implementer(IHalfCloseableProtocol)
class FrontDoor(Protocol):
    log = Logger()
    transport: IStreamTransport  # the TCP connection from the listener, never cleared

    def __init__(self, runtime: Runtime, tracker: ConnectionTracker) -> None:
        self.runtime = runtime
        self.tracker = tracker
        self.reactor = runtime.reactor
        self.outcome = "handshake_failed"
        self.server_name: str | None = None
        self.route: Route | None = None
        self.splice: Splice | None = None
        self._tls: TLSServerConnection | None = None
        self._reader: ch.ClientHelloReader | None = None
        self._timer: IDelayedCall | None = None
        self._timed_out = False
        self._closed = False
        self._admitted = False
        self._proxy_reader: ProxyHeaderReader | None = None
        self._client_address: IPv4Address | IPv6Address | None = None
        """The client's address when it came in a PROXY header, else None (the TCP peer)."""
        self._reader_bytes = b""
        self._passthrough: _ClientSide | None = None
        self.http_protocol: IProtocol | None = None

    # -- before TLS ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        metrics.CONNECTIONS_ACCEPTED_TLS.inc()
        metrics.CONNECTIONS_ACTIVE.inc()
        self._accepted = self.reactor.seconds()
        peer = self.transport.getPeer()
        self.client_host: str = getattr(peer, "host", "?")
        self.client_port: int = getattr(peer, "port", 0)
        self.tracker.connections.add(self)
        tls_config = self.runtime.config.tls
        self._reader = ch.ClientHelloReader(tls_config.max_client_hello_bytes)
        self._timer = self.reactor.callLater(tls_config.handshake_timeout, self._handshake_timed_out)
        self.transport.setTcpNoDelay(True)
        if self.tracker.draining:
            self._refuse_connection("draining")
            return
        admission = self.runtime.admission
        if admission.trusted_proxies and in_networks(self.client_host, admission.trusted_proxies):
            # A trusted balancer: the real client's address comes first, in a PROXY header.
            self._proxy_reader = ProxyHeaderReader()
        else:
            self._admit()

    def _admit(self) -> bool:
        why = self.runtime.admission.admit(self.client_host)
        if why is not None:
            self._refuse_connection(why)
            return False
        self._admitted = True
        return True

    def _refuse_connection(self, why: str) -> None:
        metrics.CONNECTIONS_REFUSED.labels(reason=why).inc()
        self.tracker.refused(self.reactor.seconds(), self.client_host, None, why)
        self.outcome = "refused"
        self.log.debug("refused connection from {client}: {why}", client=self._peer(), why=why)
        self._proxy_reader = None
        self._close_now()

    def dataReceived(self, data: bytes) -> None:
        if self._proxy_reader is not None:
            try:
                result = self._proxy_reader.feed(data)
            except ProxyHeaderError as e:
                self.log.info("invalid PROXY header from trusted {peer}: {error}", peer=self._peer(), error=str(e))
                self._refuse_connection("proxy_header")
                return
            if result is None:
                return
            self._proxy_reader = None
            address, data = result
            if address.host is not None:
                self.client_host, self.client_port = address.host, address.port or 0
                self._client_address = (IPv6Address if ":" in address.host else IPv4Address)(
                    "TCP", address.host, self.client_port)
            if not self._admit() or not data:
                return
        reader = self._reader
        if reader is None:
            return  # already refused; ignore what is still in flight
        hello = reader.feed(data)
        if hello is ch.NEED_MORE:
            return
        if isinstance(hello, ch.HelloError):
            self._reader_bytes = reader.buffered[:16]
            self._reader = None
            self._refuse_hello(hello)
            return
        assert isinstance(hello, ch.ClientHello)
        self._route(hello)

    def _refuse_hello(self, err: ch.HelloError) -> None:
        if err.reason == "not_tls" and looks_like_proxy_header(self._reader_bytes):
            # A PROXY header from a peer that is not a trusted balancer: refused, never parsed.
            self._refuse_connection("untrusted_proxy_header")
            return
        metrics.HANDSHAKE_FAILURES.labels(reason=err.reason).inc()
        self.log.debug("refused {peer}: {detail}", peer=self._peer(), detail=err.detail)
        if err.reason == "http_on_tls_port":
            self.transport.write(_BAD_REQUEST_HTTP)
        elif err.reason == "not_tls":
            self.transport.write(ch.alert_record(ch.ALERT_PROTOCOL_VERSION))
        else:
            self.transport.write(ch.alert_record(ch.ALERT_DECODE_ERROR))
        self._close_now()

    def _refuse_alert(self, reason: str, alert: int, detail: str = "") -> None:
        metrics.ROUTE_REFUSALS.labels(reason=reason).inc()
        self.tracker.refused(self.reactor.seconds(), self.client_host, self.server_name, reason, detail)
        self.outcome = "refused"
        self.log.debug("refused {peer} for {name}: {reason}", peer=self._peer(),
                       name=self.server_name, reason=reason)
        self.transport.write(ch.alert_record(alert))
        self._close_now()

    def _close_now(self) -> None:
        self._reader = None
        self._cancel_timer()
        self.transport.loseConnection()

    def _route(self, hello: ch.ClientHello) -> None:
        self.server_name = hello.server_name
        runtime = self.runtime
        decision = decide(hello, self.client_host, runtime.directory.current(), runtime.policy)
        self._carry_out(decision, hello)

    def _carry_out(self, decision: Decision, hello: ch.ClientHello) -> None:
        name = self.server_name or ""
        if isinstance(decision, Refuse):
            self._refuse(name, decision)
        elif isinstance(decision, AcmeChallenge):
            self._answer_tls_alpn_challenge(decision.context)
        elif isinstance(decision, GatewayApi):
            self.outcome = "api"
            self._start_tls(name, _HTTP_ALPN, self._http_protocol(self.runtime.api_site))
        elif isinstance(decision, HttpRoute):
            self.route = decision.route
            self.outcome = "http"
            self._start_tls(name, _HTTP_ALPN, self._http_port_protocol(decision.route, name))
        elif isinstance(decision, H2Route):
            self.route = decision.route
            self.outcome = "http"
            self._start_tls(name, _HTTP_ALPN, self._h2_port_protocol(decision.route, name))
        elif isinstance(decision, TLSPassthrough):
            self.route = decision.route
            self._pass_tls_through(decision)
        else:
            assert isinstance(decision, SpliceRoute)
            self.route = decision.route
            # tcp ports, and h2 clients of public h2 ports marked passthrough: the decrypted
            # stream goes to the shard's port as it is.
            self.outcome = "tcp" if decision.alpn == "tcp" else "http"
            self.splice = self._splice(decision.route, decision.send_proxy)
            self._start_tls(name, ALPN_FOR_PROTOCOL[decision.alpn], self.splice.client,
                            client_auth_task=decision.client_auth_task)

    def _splice(self, route: Route, send_proxy: bool, first: bytes = b"") -> Splice:
        preamble = b""
        if send_proxy:
            local = self.transport.getHost()
            preamble = build_v2(self.client_host, self.client_port, local.host, local.port)
        tcp = self.runtime.config.tcp
        splice = Splice(route, self.reactor, tcp.connect_timeout, tcp.idle_timeout, self._upstream_failed,
                        preamble=preamble + first)
        splice.connect()
        return splice

    def _pass_tls_through(self, decision: TLSPassthrough) -> None:
        """The shard terminates TLS: replay the ClientHello to it and relay both ways."""
        self.outcome = "tls_passthrough"
        reader, self._reader = self._reader, None
        assert reader is not None
        self._cancel_timer()  # the handshake is the shard's now; the splice's idle timeout holds
        splice = self._splice(decision.route, decision.send_proxy, first=reader.buffered)
        self.splice = splice
        self._passthrough = splice.client
        self.dataReceived = splice.client.dataReceived  # type: ignore[method-assign]  # on purpose (module docstring)
        splice.client.makeConnection(self.transport)

    def _refuse(self, name: str, refusal: Refuse) -> None:
        if not refusal.page:
            self._refuse_alert(refusal.reason, refusal.alert, refusal.detail)
            return
        # A client that speaks HTTP gets a page that says what was not found.
        metrics.ROUTE_REFUSALS.labels(reason=refusal.reason).inc()
        self.tracker.refused(self.reactor.seconds(), self.client_host, name, refusal.reason,
                             refusal.detail)
        self.outcome = "refused"
        self.log.debug("refused {peer} for {name}: {detail}", peer=self._peer(), name=name,
                       detail=refusal.detail)
        site = self.runtime.error_site(refusal.http_status, refusal.reason, refusal.detail)
        self._start_tls(name, _HTTP_ALPN, self._http_protocol(site))

    def _http_protocol(self, site: Site) -> IProtocol:
        """An HTTP channel for C{site} with the configured limits."""
        limits = self.runtime.config.limits
        site.timeOut = limits.http_idle_timeout
        proto = site.buildProtocol(self._client_address or self.transport.getPeer())
        channel = http_channel(proto)
        if channel is not None:
            channel.totalHeadersSize = limits.max_header_bytes
            channel.maxHeaders = limits.max_headers
        self.http_protocol = proto
        return proto

    def _chosen(self, proto: IProtocol) -> None:
        self.http_protocol = proto

    def _http_port_protocol(self, route: Route, name: str) -> H2PortProtocol:
        """An http/1.1 port: h2 clients stream by stream, HTTP/1.1 clients request by request,
        both to the shard's HTTP/1.1 listener through the pool."""
        http = self.runtime.http
        limits = self.runtime.config.limits
        return H2PortProtocol(
            lambda: H2FrontConnection(route, http, limits.max_header_bytes, limits.http_idle_timeout,
                                      server_name=name, pool=http.upstream),
            lambda upstream: H1ProxyConnection(route, http, name),
            None, self._chosen)

    def _h2_port_protocol(self, route: Route, name: str) -> H2PortProtocol:
        """An h2 port: h2 clients frame by frame to the shard's h2c listener; HTTP/1.1 clients
        request by request, each as a stream on one h2c connection."""
        http = self.runtime.http
        limits = self.runtime.config.limits
        return H2PortProtocol(
            lambda: H2FrontConnection(route, http, limits.max_header_bytes, limits.http_idle_timeout,
                                      server_name=name),
            lambda upstream: H1ProxyConnection(route, http, name, upstream=upstream),
            H2Upstream(self.reactor, http.connect_timeout), self._chosen)

    def drain(self) -> None:
        """The gateway is stopping: end HTTP keep-alive after the request in progress."""
        proto = self.http_protocol
        tls = self._tls
        if proto is None or tls is None or not tls.handshake_done:
            return
        if isinstance(proto, (H2FrontConnection, H1ProxyConnection)):
            proto.drain()
            return
        channel = http_channel(proto)
        if isinstance(channel, HTTPChannel):
            channel.persistent = False
            if not channel.requests:
                tls.loseConnection()
        elif channel is not None and hasattr(channel, "conn"):
            # h2: GOAWAY, so the client opens no new streams; close once none is left.
            channel.conn.close_connection()
            h2_send_control(channel)
            if not channel.streams:
                tls.loseConnection()

    def _upstream_failed(self, why: str) -> None:
        self.outcome = "upstream_failed"

    # -- TLS -----------------------------------------------------------------------------

    def _answer_tls_alpn_challenge(self, ctx: SSL.Context) -> None:
        """Complete a TLS-ALPN-01 validation handshake (RFC 8737 3) and close."""
        metrics.ACME_CHALLENGE_HANDSHAKES.inc()
        self.outcome = "acme_challenge"
        reader, self._reader = self._reader, None
        assert reader is not None
        tls = TLSServerConnection(self.transport, SSL.Connection(ctx, None), _CloseAfterHandshake(),
                                  self._handshake_completed, self._handshake_failed)
        self._tls = tls
        self.dataReceived = tls.raw_data_received  # type: ignore[method-assign]  # on purpose (module docstring)
        tls.start(reader.buffered)

    def _start_tls(self, name: str, protocols: tuple[bytes, ...], handler: IProtocol,
                   client_auth_task: str | None = None) -> None:
        acme = self.runtime.acme
        if acme is not None and acme.config.on_demand_wait > 0 and not acme.issued(name):
            from twisted_gateway.tls.acme.manager import wait_for_certificate
            acme.pair_for(name)  # may start an on-demand issuance
            waiting = wait_for_certificate(acme, name, acme.config.on_demand_wait, self.reactor)
            if waiting is not None:
                # Hold the handshake (the ClientHello stays buffered) until the certificate
                # arrives or the bound passes; then serve whatever is in force.
                self.transport.pauseProducing()

                def resume(_: object) -> None:
                    if self._closed:
                        return
                    self.transport.resumeProducing()
                    self._start_tls_now(name, protocols, handler, client_auth_task)
                waiting.addCallback(resume)
                return
        self._start_tls_now(name, protocols, handler, client_auth_task)

    def _start_tls_now(self, name: str, protocols: tuple[bytes, ...], handler: IProtocol,
                       client_auth_task: str | None = None) -> None:
        ctx = self.runtime.contexts.context_for(name, protocols, client_auth_task is not None)
        if ctx is None:
            self._refuse_alert("no_certificate", ch.ALERT_UNRECOGNIZED_NAME,
                               "no certificate for this name")
            return
        reader, self._reader = self._reader, None
        assert reader is not None
        conn = SSL.Connection(ctx, None)
        if client_auth_task is not None:
            conn.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                            self._client_certificate_check(client_auth_task))
        tls = TLSServerConnection(self.transport, conn, handler,
                                  self._handshake_completed, self._handshake_failed)
        tls.peer = self._client_address
        self._tls = tls
        self.dataReceived = tls.raw_data_received  # type: ignore[method-assign]  # on purpose (module docstring)
        tls.start(reader.buffered)

    def _client_certificate_check(
            self, task: str) -> Callable[[SSL.Connection, crypto.X509, int, int, int], bool]:
        def verify(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
            if not ok:
                metrics.AUTH_DECISIONS.labels(outcome="bad_client_certificate").inc()
                return False
            if depth > 0:
                return True
            prefixes = client_certificate_prefixes(cert.to_cryptography())
            allowed = task_covered(task, prefixes)
            metrics.AUTH_DECISIONS.labels(outcome="allowed" if allowed else "forbidden").inc()
            if not allowed:
                self.log.info("client certificate for {prefixes} does not cover task {task}",
                              prefixes=prefixes, task=task)
            return allowed
        return verify

    def _handshake_completed(self, tls: TLSServerConnection) -> None:
        self._cancel_timer()
        metrics.HANDSHAKE_SECONDS.observe(self.reactor.seconds() - self._accepted)

    def _handshake_failed(self, tls: TLSServerConnection, reason: str, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._timed_out:
            return  # counted as a timeout already
        metrics.HANDSHAKE_FAILURES.labels(reason=reason).inc()
        if self.outcome not in ("refused", "upstream_failed"):
            self.outcome = "handshake_failed"
        self.log.debug("TLS handshake with {peer} for {name} failed: {reason} {error}",
                       peer=self._peer(), name=self.server_name, reason=reason, error=exc or "")
        if self.splice is not None:
            self.splice.client_lost(Failure(ConnectionError(reason)))

    def _handshake_timed_out(self) -> None:
        self._timer = None
        metrics.HANDSHAKE_FAILURES.labels(reason="timeout").inc()
        self.outcome = "handshake_failed"
        self.log.debug("TLS handshake with {peer} timed out", peer=self._peer())
        self._timed_out = True
        if self.splice is not None:
            self.splice.client_lost(Failure(TimeoutError("handshake")))
        self.transport.abortConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    # -- connection end ----------------------------------------------------------------------

    def readConnectionLost(self) -> None:
        if self._passthrough is not None:
            self._passthrough.readConnectionLost()
        elif self._tls is not None:
            self._tls.raw_read_connection_lost()
        elif self._reader is not None:
            # The client went away mid-ClientHello.
            metrics.HANDSHAKE_FAILURES.labels(reason="client_closed").inc()
            self._close_now()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._closed = True
        self._cancel_timer()
        self.tracker.connections.discard(self)
        if self._admitted:
            self._admitted = False
            self.runtime.admission.release(self.client_host)
        if self._reader is not None:
            self._reader = None
            metrics.HANDSHAKE_FAILURES.labels(reason="client_closed").inc()
        metrics.CONNECTIONS_ACTIVE.dec()
        metrics.CONNECTIONS_CLOSED.labels(outcome=self.outcome).inc()
        if self._passthrough is not None:
            self._passthrough.connectionLost(reason)
        elif self._tls is not None:
            self._tls.raw_connection_lost(reason)
        if self.runtime.config.log.access_log:
            self._access_log()

    def _peer(self) -> str:
        return f"{self.client_host}:{self.client_port}"

    def _access_log(self) -> None:
        route = self.route
        splice = self.splice
        self.log.info(
            "access {client} sni={sni} outcome={outcome} shard={shard} port={port} "
            "up={bytes_up} down={bytes_down} duration={duration:.3f}",
            event_kind="access", client=self._peer(), sni=self.server_name, outcome=self.outcome,
            shard=route.shard.id if route else None, port=route.port.port if route else None,
            bytes_up=splice.bytes_up if splice else 0, bytes_down=splice.bytes_down if splice else 0,
            duration=self.reactor.seconds() - self._accepted)


class _CloseAfterHandshake(Protocol):
    """The handler of a TLS-ALPN-01 validation connection: the handshake is the answer."""

    transport: IStreamTransport

    def connectionMade(self) -> None:
        self.transport.loseConnection()


class FrontDoorFactory(Factory):
    """Builds front doors with the Runtime in force: a reload swaps L{runtime}, the one
    reference, and connections already open keep theirs."""

    protocol = FrontDoor
    noisy = False

    def __init__(self, runtime: Runtime, tracker: ConnectionTracker) -> None:
        self.runtime = runtime
        self.tracker = tracker

    def buildProtocol(self, addr: IAddress | None) -> FrontDoor:
        return FrontDoor(self.runtime, self.tracker)


__all__ = ["ConnectionTracker", "FrontDoor", "FrontDoorFactory"]
