"""
Writes on the relay paths, sent at once when nothing is queued.

Twisted queues every C{transport.write} until the reactor's next pass: a writer registration
(C{epoll_ctl}), a wakeup, the send, and a deregistration, per chunk.  On the splice and TLS
paths most chunks go out whole into an empty socket buffer, so sending them directly saves
that round (measured in docs/performance.md).  Whatever the socket does not take, and every
write to a transport that is not a plain TCP connection with an empty queue, goes through
C{transport.write} as usual, so ordering, backpressure and error handling stay Twisted's.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

_TCP = (tcp.Server, tcp.Client)


def write_now(transport: Any, data: bytes) -> None:
    if (type(transport) in _TCP and transport.connected and not transport.disconnecting
            and not transport._tempDataLen and transport.offset == len(transport.dataBuffer)
            and not transport._writeDisconnected):
        try:
            sent = transport.socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            sent = 0  # the queued write meets the same error and Twisted reports it
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


__all__ = ["write_now"]
