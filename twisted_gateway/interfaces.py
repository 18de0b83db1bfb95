"""
Interfaces shared across the gateway's protocols, for the type checker as much as for readers.
"""

from __future__ import annotations

from twisted.internet.interfaces import IConsumer, IPushProducer, ITCPTransport


class IStreamTransport(ITCPTransport, IConsumer, IPushProducer):
    """
    The transport every connection protocol here is given: a TCP connection from the reactor,
    or a L{twisted_gateway.tls.connection.TLSServerConnection} over one.  Both are TCP
    transports that are also the consumer a producer registers with and the push producer
    that pauses the peer, which is how backpressure is carried across a proxied connection.
    """


__all__ = ["IStreamTransport"]
