"""
UDP routes and QUIC routed by SNI: the gateway's datagram door.

``quic.py`` reads a client's Initial packets (sans-IO) up to its ClientHello, ``decide.py``
makes the routing decision as a pure function, ``relay.py`` relays the datagrams of each client
flow through a connected socket of its own, and ``service.py`` holds the listeners of one
gateway process.
"""
