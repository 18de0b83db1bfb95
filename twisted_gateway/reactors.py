"""
``twistd -r uvloop gateway``: Twisted's asyncio reactor running on a uvloop event loop.

uvloop is optional (``pip install uvloop``; POSIX only).  docs/performance.md has what it
changes against the default epoll reactor.
"""

from __future__ import annotations

from typing import Any


def install() -> None:
    try:
        import uvloop
    except ImportError:
        raise SystemExit("twistd -r uvloop needs uvloop: pip install uvloop") from None
    from twisted.internet import asyncioreactor
    asyncioreactor.install(eventloop=uvloop.new_event_loop())


def reactor_args(reactor: Any) -> list[str]:
    """The twistd ``-r`` option that installs a reactor like C{reactor} (for worker processes)."""
    if type(reactor).__name__ != "AsyncioSelectorReactor":
        return []
    from twisted_gateway._compat import asyncio_event_loop
    loop = asyncio_event_loop(reactor)
    return ["-r", "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"]


__all__ = ["install", "reactor_args"]
