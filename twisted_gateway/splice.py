"""
The TCP relay between a client's decrypted stream and a shard's port.

Each side is registered as the other's streaming producer, so a side that stops reading pauses
the other side's socket and memory stays bounded by the transports' buffers.  End-of-stream is
carried as a half-close in each direction (TLS close_notify or TCP FIN in, FIN or close_notify
out) and the splice ends once both directions have ended or either side is lost; a side that
is lost has its peer closed only after the peer's buffered bytes are written.

Bytes are counted in plain integers on the hot path and added to the Prometheus counters when
a splice ends or when /metrics is scraped (L{flush_metrics}), to the per-route series as well
when metrics.per_route is on (L{metrics.count_route}).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import error
from twisted.internet.interfaces import IConnector, IDelayedCall, IHalfCloseableProtocol
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_gateway import metrics
from twisted_gateway.directory.model import Route
from twisted_gateway._compat import close_now, lose_write_now
from twisted_gateway.fastwrite import write_now
from twisted_gateway.interfaces import IStreamTransport

_ACTIVE: set[Splice] = set()
_SOCKET_BUFFER = 256 * 1024
_LINGER = 30.0
"""The longest a client that is still sending when the shard's side ends is given to read
what was relayed to it (TLSServerConnection.close_now)."""


def flush_metrics() -> None:
    """Move every live splice's byte counts into the Prometheus counters."""
    for splice in list(_ACTIVE):
        splice.flush_counts()


def _connect_failure_reason(reason: Failure) -> str:
    if reason.check(error.ConnectionRefusedError):
        return "refused"
    if reason.check(error.TimeoutError, error.TCPTimedOutError):
        return "timeout"
    if reason.check(error.DNSLookupError):
        return "dns"
    if reason.check(error.NoRouteError, error.ConnectError):
        return "unreachable"
    return "error"


@implementer(IHalfCloseableProtocol)
class _ClientSide(Protocol):
    """The application protocol on the client's TLS connection."""

    transport: IStreamTransport

    def __init__(self, splice: Splice) -> None:
        self.splice = splice

    def connectionMade(self) -> None:
        self.splice.client_connected(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.splice.from_client(data)

    def readConnectionLost(self) -> None:
        self.splice.client_eof()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: object = error.ConnectionDone()) -> None:
        self.splice.client_lost(reason)


@implementer(IHalfCloseableProtocol)
class UpstreamSide(Protocol):
    """The protocol on the shard's connection (also given to a shard connection that an HTTP
    upgrade turned into a tunnel)."""

    transport: IStreamTransport

    def __init__(self, splice: Splice) -> None:
        self.splice = splice

    def connectionMade(self) -> None:
        self.splice.upstream_connected(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.splice.from_upstream(data)

    def readConnectionLost(self) -> None:
        self.splice.upstream_eof()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: object = error.ConnectionDone()) -> None:
        self.splice.upstream_lost(reason)


class _UpstreamFactory(ClientFactory):
    noisy = False

    def __init__(self, splice: Splice) -> None:
        self.splice = splice

    def buildProtocol(self, addr: Any) -> UpstreamSide:
        return UpstreamSide(self.splice)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.splice.upstream_failed(reason)


class Splice:
    """One client connection relayed to one shard port."""

    log = Logger()

    def __init__(self, route: Route, reactor: Any, connect_timeout: float, idle_timeout: float,
                 on_upstream_failed: Callable[[str], None] | None = None,
                 preamble: bytes = b"", on_done: Callable[[Splice], None] | None = None) -> None:
        self.route = route
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.on_upstream_failed = on_upstream_failed
        self.client = _ClientSide(self)
        self.client_transport: IStreamTransport | None = None
        self.upstream_transport: IStreamTransport | None = None
        self._connector: IConnector | None = None
        # Bytes the upstream gets before anything from the client (a replayed HTTP request head).
        self._pending: list[bytes] = [preamble] if preamble else []
        self._pending_down: list[bytes] = []
        self._client_eof = False
        self._upstream_eof = False
        self._done = False
        self.bytes_up = 0
        self.bytes_down = 0
        self._flushed_up = 0
        self._flushed_down = 0
        self._idle_call: IDelayedCall | None = None
        self._idle_mark = (0, 0)
        self._last_active = 0.0
        self.failure_reason: str | None = None
        self._held_client = False
        self._held_upstream = False
        """Whether from_client / from_upstream paused that side until _wire."""
        self.on_done = on_done
        self._started = 0.0

    # -- lifecycle ----------------------------------------------------------------------------

    def connect(self) -> None:
        """Start connecting to the shard; may run while the client's handshake is in flight."""
        _ACTIVE.add(self)
        # A connection of the route's from here, whether or not the shard answers.  An adopted
        # splice (an HTTP upgrade's tunnel) is not: its HTTP front counts the connection.
        metrics.count_route(self.route, connections=1)
        self._started = self.reactor.seconds()
        self._connector = self.reactor.connectTCP(
            self.route.shard.address, self.route.port.target_port, _UpstreamFactory(self),
            timeout=self.connect_timeout)

    def adopt(self) -> None:
        """Relay over a shard connection made elsewhere (an HTTP upgrade's), given later
        through L{UpstreamSide}."""
        _ACTIVE.add(self)
        self._started = self.reactor.seconds()

    def client_connected(self, transport: IStreamTransport) -> None:
        self.client_transport = transport
        if self._done:
            transport.loseConnection()
            return
        if self.upstream_transport is not None:
            self._wire()
        # Otherwise the client is held once it sends before the shard has answered
        # (from_client): at most one read is buffered, and a client that waits costs no pause.

    def upstream_connected(self, transport: IStreamTransport) -> None:
        metrics.UPSTREAM_CONNECT_SECONDS.observe(self.reactor.seconds() - self._started)
        self._connector = None
        self.upstream_transport = transport
        if hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)
        if self._done:
            transport.loseConnection()
            return
        if self.client_transport is not None:
            self._wire()
        # Otherwise a shard that speaks first (an h2 server preface) is held once it does
        # (from_upstream) until the client's handshake is done; at most one read is buffered.

    def _wire(self) -> None:
        client, upstream = self.client_transport, self.upstream_transport
        assert client is not None and upstream is not None  # wired once both are connected
        # Larger socket reads for bulk streams (fewer reactor rounds per MiB); also the write
        # buffer size above which the other side is paused.
        for t in (upstream, getattr(client, "transport", None)):
            if t is not None and hasattr(t, "bufferSize"):
                t.bufferSize = _SOCKET_BUFFER
        client.registerProducer(upstream, True)
        upstream.registerProducer(client, True)
        pending, self._pending = self._pending, []
        for chunk in pending:
            upstream.write(chunk)
        pending, self._pending_down = self._pending_down, []
        for chunk in pending:
            client.write(chunk)
        if self._client_eof:
            upstream.loseWriteConnection()
        if self._upstream_eof:
            client.loseWriteConnection()
        # Only a side held back here is resumed: resuming one that was not paused would have
        # it read again, and a shard that already ended (its FIN read) would end twice.
        if self._held_client:
            self._held_client = False
            client.resumeProducing()
        if self._held_upstream:
            self._held_upstream = False
            upstream.resumeProducing()
        self._last_active = self.reactor.seconds()
        self._idle_call = self.reactor.callLater(self._idle_period(), self._check_idle)

    # -- data ----------------------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        self.bytes_up += len(data)
        if self.upstream_transport is None:
            self._pending.append(data)
            if self.client_transport is not None and not self._held_client:
                self._held_client = True
                self.client_transport.pauseProducing()  # until _wire
        else:
            write_now(self.upstream_transport, data)

    def from_upstream(self, data: bytes) -> None:
        self.bytes_down += len(data)
        if self.client_transport is None:
            self._pending_down.append(data)
            if self.upstream_transport is not None and not self._held_upstream:
                self._held_upstream = True
                self.upstream_transport.pauseProducing()  # until _wire
        else:
            write_now(self.client_transport, data)

    # -- end of stream -------------------------------------------------------------------------

    def client_eof(self) -> None:
        self._client_eof = True
        if self.upstream_transport is not None:
            lose_write_now(self.upstream_transport)
        self._maybe_finish()

    def upstream_eof(self) -> None:
        self._upstream_eof = True
        if self.client_transport is not None:
            self.client_transport.loseWriteConnection()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self._client_eof and self._upstream_eof:
            self._finish()

    def client_lost(self, reason: object) -> None:
        """The client's connection is gone; the splice ends the same way whatever C{reason} is."""
        self.client_transport = None
        if self._connector is not None:
            self._connector.stopConnecting()
            self._connector = None
        self._finish()

    def upstream_lost(self, reason: object) -> None:
        self.upstream_transport = None
        self._finish()

    def upstream_failed(self, reason: Failure) -> None:
        self._connector = None
        if self._done:
            return  # we cancelled it because the client left
        why = _connect_failure_reason(reason)
        self.failure_reason = why
        metrics.UPSTREAM_CONNECT_FAILURES.labels(reason=why).inc()
        self.log.warn("upstream {shard} {address}:{port} failed: {why} ({error})",
                      shard=self.route.shard.id, address=self.route.shard.address,
                      port=self.route.port.target_port, why=why,
                      error=reason.getErrorMessage())
        if self.on_upstream_failed is not None:
            self.on_upstream_failed(why)
        self._finish()

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            if self._idle_call is not None and self._idle_call.active():
                self._idle_call.cancel()
            self.flush_counts()
            _ACTIVE.discard(self)
            if self.on_done is not None:
                self.on_done(self)
        # A side with nothing buffered is closed on the spot (its connectionLost comes back
        # here, which finds the splice done); one with bytes buffered is closed once they are
        # written (loseConnection).
        client, upstream = self.client_transport, self.upstream_transport
        # Each side is the other's producer: let go first.  A side left with the other (or the
        # other's dead transport) as a paused producer never closes (Twisted's doWrite resumes
        # the producer instead of closing), and closing one side would otherwise have its
        # stopProducing close the other the slow way before we do.
        for side in (client, upstream):
            if side is not None:
                side.unregisterProducer()
        if client is not None:
            now = getattr(client, "close_now", None)
            if now is not None:
                now(min(self.idle_timeout, _LINGER))
            else:
                client.loseConnection()
        if upstream is not None:
            close_now(upstream)

    # -- idle timeout and counters -------------------------------------------------------------

    def _idle_period(self) -> float:
        return max(self.idle_timeout / 4, 0.05)

    def _check_idle(self) -> None:
        now = self.reactor.seconds()
        mark = (self.bytes_up, self.bytes_down)
        if mark != self._idle_mark:
            self._idle_mark = mark
            self._last_active = now
        elif now - self._last_active >= self.idle_timeout:
            self.log.info("closing idle splice to {shard} after {seconds:.0f}s",
                          shard=self.route.shard.id, seconds=now - self._last_active)
            self._idle_call = None
            self._finish()
            return
        self._idle_call = self.reactor.callLater(self._idle_period(), self._check_idle)

    def flush_counts(self) -> None:
        up, down = self.bytes_up - self._flushed_up, self.bytes_down - self._flushed_down
        if up:
            metrics.RELAYED_UPSTREAM.inc(up)
            self._flushed_up = self.bytes_up
        if down:
            metrics.RELAYED_DOWNSTREAM.inc(down)
            self._flushed_down = self.bytes_down
        if up or down:
            metrics.count_route(self.route, up, down)
