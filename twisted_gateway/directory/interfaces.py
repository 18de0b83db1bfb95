"""
The seam between the front door and whatever fills the shard directory.

The front door only needs the current L{DirectorySnapshot} and to know whether one has been
loaded; providers (a watched file now, Redis and a control-plane sync later) only publish new
snapshots into a L{ShardDirectory}.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from twisted.logger import Logger
from zope.interface import Interface, implementer

from twisted_gateway import metrics
from twisted_gateway.directory.model import DirectorySnapshot


class IShardDirectory(Interface):
    def current() -> DirectorySnapshot:
        """The snapshot in force."""

    def loaded() -> bool:
        """Whether any provider has published a snapshot yet."""

    def subscribe(callback: Callable[[DirectorySnapshot], None]) -> None:
        """Call C{callback} with every new snapshot."""


class IProviderStatus(Interface):
    """A directory provider that can say how it is doing (the admin API's /api/v1/providers)."""

    def status() -> dict[str, Any]:
        """A JSON-ready dict with at least C{kind} (file, redis, cloud...), C{source} (what it
        reads: a path, a URL), C{state} (C{ok}: following its source; C{degraded}: serving its
        last good state while its source is away; C{error}: its last update was refused) and
        C{version} (what it has in force, None when the source has no versions); and, when
        known, C{last_change} (unix time of the last published update), C{lag_seconds} (from
        the source writing an update to it being in force), C{last_error} and anything else
        that helps (C{link} for a network source)."""


@implementer(IShardDirectory)
class ShardDirectory:
    """The gateway's directory: holds the snapshot in force and tells subscribers of changes."""

    log = Logger()

    def __init__(self) -> None:
        self._snapshot = DirectorySnapshot()
        self._loaded = False
        self._subscribers: list[Callable[[DirectorySnapshot], None]] = []

    def current(self) -> DirectorySnapshot:
        return self._snapshot

    def loaded(self) -> bool:
        return self._loaded

    def subscribe(self, callback: Callable[[DirectorySnapshot], None]) -> None:
        self._subscribers.append(callback)

    def publish(self, snapshot: DirectorySnapshot, source: str) -> None:
        self._snapshot = snapshot
        self._loaded = True
        metrics.DIRECTORY_SHARDS.set(len(snapshot))
        metrics.DIRECTORY_RELOADS.labels(outcome="success").inc()
        metrics.DIRECTORY_LAST_RELOAD.set(time.time())
        metrics.DIRECTORY_LAST_RELOAD_SUCCESS.set(1)
        self.log.info("directory loaded from {source}: {count} shards", source=source,
                      count=len(snapshot))
        for callback in self._subscribers:
            callback(snapshot)

    def refuse(self, source: str, problem: str) -> None:
        """Record a provider's failed update; the snapshot in force stays."""
        metrics.DIRECTORY_RELOADS.labels(outcome="failure").inc()
        metrics.DIRECTORY_LAST_RELOAD.set(time.time())
        metrics.DIRECTORY_LAST_RELOAD_SUCCESS.set(0)
        self.log.error("directory update from {source} refused, keeping the last good directory "
                       "({count} shards): {problem}", source=source, problem=problem,
                       count=len(self._snapshot))
