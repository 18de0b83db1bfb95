"""
The HTTP/1.1 upstream (L{UpstreamPool}, an L{twisted_gateway.http.upstream.IUpstream}): idle
keep-alive connections to each shard address, reused only when the connection says its framing
state is clean (L{twisted_gateway.http.h1.client.UpstreamConnection.reusable}), and one retry
on a fresh connection for a request without a body that a reused connection lost before any
answer.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived
from zope.interface import implementer

from twisted_gateway.http.h1.client import UpstreamConnection, request_head
from twisted_gateway.http.upstream import IUpstream, IUpstreamResponse

_RETRYABLE = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
"""Methods whose request may be sent again when a reused connection lost it unanswered."""


class _Factory(ClientFactory):
    noisy = False

    def __init__(self, pool: UpstreamPool, key: tuple[str, int], connected: Deferred[UpstreamConnection]) -> None:
        self.pool, self.key, self.connected = pool, key, connected

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        return UpstreamConnection(self.pool, self.key, self._made)

    def _made(self, conn: UpstreamConnection) -> None:
        if not self.connected.called:
            self.connected.callback(conn)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.connected.called:
            self.connected.errback(reason)


@implementer(IUpstream)
class UpstreamPool:
    """Idle keep-alive connections per (address, port); new ones are made on demand."""

    tunnels = True
    """A websocket upgrade gets a connection of its own, handed over after a 101."""

    def __init__(self, reactor: Any, connect_timeout: float, max_idle: int = 64) -> None:
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self._idle: dict[tuple[str, int], list[UpstreamConnection]] = {}

    def request(self, address: str, port: int, method: bytes, path: bytes,
                headers: list[tuple[bytes, bytes]], body: Any = None,
                upgrade: bool = False) -> Deferred[IUpstreamResponse]:
        raw_head = request_head(method, path, headers, body)
        key = (address, port)
        # One Deferred per request, settled directly by the connection (send_then): the
        # Deferred chain this took before (the connection's own Deferred, a retry errback, two
        # callbacks) was a few per cent of the CPU of a proxied request.
        conn: UpstreamConnection | None = None
        connector: Any = None

        def cancel(_: Deferred[IUpstreamResponse]) -> None:
            if conn is not None:
                conn.abort()
            elif connector is not None:
                connector.stopConnecting()
        result: Deferred[IUpstreamResponse] = Deferred(cancel)

        def settle(outcome: Any) -> None:
            if not result.called:  # a cancelled request has been answered already
                if isinstance(outcome, Failure):
                    result.errback(outcome)
                else:
                    result.callback(outcome)

        def fresh() -> None:
            nonlocal conn, connector
            conn = None
            connected: Deferred[UpstreamConnection] = Deferred()
            connector = self.reactor.connectTCP(
                address, port, _Factory(self, key, connected), timeout=self.connect_timeout)
            connected.addCallbacks(send_fresh, settle)

        def send_fresh(made: UpstreamConnection) -> None:
            nonlocal conn
            conn = made
            made.send_then(method, raw_head, body, upgrade, settle)

        # An upgrade becomes a tunnel: it gets a connection of its own.
        reused = None if upgrade else self._take(key)
        if reused is None:
            fresh()
            return result
        conn = reused
        if body is None and method in _RETRYABLE:
            # A kept-alive connection the shard closed just as it was reused: the request
            # never got an answer and had no body, so it is safe to send it again once.
            def settle_or_retry(outcome: Any) -> None:
                if isinstance(outcome, Failure) and outcome.check(ResponseNeverReceived) and not result.called:
                    fresh()
                else:
                    settle(outcome)
            reused.send_then(method, raw_head, body, upgrade, settle_or_retry)
        else:
            reused.send_then(method, raw_head, body, upgrade, settle)
        return result

    def _take(self, key: tuple[str, int]) -> UpstreamConnection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.transport is not None and conn.reusable:
                return conn
        return None

    def release(self, conn: UpstreamConnection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) < self.max_idle:
            idle.append(conn)
        elif conn.transport is not None:
            conn.transport.loseConnection()

    def forget(self, conn: UpstreamConnection) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)



__all__ = ["UpstreamPool"]
