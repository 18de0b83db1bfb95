"""
Writes on the relay paths, sent at once when nothing is queued.

Twisted queues every C{transport.write} until the reactor's next pass: a writer registration
(C{epoll_ctl}), a wakeup, the send, and a deregistration, per chunk.  On the splice and TLS
paths most chunks go out whole into an empty socket buffer, so sending them directly saves
that round (measured in docs/performance.md).  Whatever the socket does not take, and every
write to a transport that is not a plain TCP connection with an empty queue, goes through
C{transport.write} as usual, so ordering, backpressure and error handling stay Twisted's.

Seeing that a TCP transport's queue is empty takes Twisted's private write-queue attributes,
so the function itself lives in L{twisted_gateway._compat} (which falls back to a plain
C{transport.write} should a Twisted release reorganise them); it is bound here under the
name the relay code imports, without a wrapper: this is called once per relayed chunk.
"""

from __future__ import annotations

from twisted_gateway._compat import write_now

__all__ = ["write_now"]
