"""
The application protocol of a TLS connection to an HTTP port, chosen by ALPN once the handshake
is done: h2 clients get the h2 front, HTTP/1.1 clients the HTTP/1.1 front.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_gateway.http.h2.h1bridge import H2Upstream
from twisted_gateway.interfaces import IStreamTransport


@implementer(IHalfCloseableProtocol)
class H2PortProtocol(Protocol):
    """
    The application protocol of a TLS connection to an ``http/1.1`` or ``h2`` port: once the
    handshake has chosen, h2 clients get C{make_h2()} (the h2 front) and HTTP/1.1 clients
    C{make_h1(upstream)} (the HTTP/1.1 front).  On an ``h2`` port C{upstream} is the
    connection's L{H2Upstream}, whose shard connection closes with the client's; on an
    ``http/1.1`` port it is None (the shared pool serves).
    """

    transport: IStreamTransport  # the client's TLS connection

    def __init__(self, make_h2: Callable[[], Protocol],
                 make_h1: Callable[[H2Upstream | None], Protocol], upstream: H2Upstream | None,
                 chosen: Callable[[Any], None]) -> None:
        self._make_h2, self._make_h1, self._upstream, self._chosen = make_h2, make_h1, upstream, chosen
        self.inner: Any = None

    def makeConnection(self, transport: Any) -> None:
        if transport.negotiatedProtocol == b"h2":
            self.inner = self._make_h2()
        else:
            self.inner = self._make_h1(self._upstream)
        self._chosen(self.inner)
        self.transport = transport
        self.inner.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self.inner.dataReceived(data)

    def readConnectionLost(self) -> None:
        # An HTTP/1.1 client may half-close after its last request and still read the answer.
        if IHalfCloseableProtocol.providedBy(self.inner):
            self.inner.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        if IHalfCloseableProtocol.providedBy(self.inner):
            self.inner.writeConnectionLost()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._upstream is not None:
            self._upstream.close()
        if self.inner is not None:
            self.inner.connectionLost(reason)


__all__ = ["H2PortProtocol"]
