"""
A file poller on Twisted's TimerService whose interval can change while it runs (a reload's
new ``directory.poll_interval`` or ``tls.reload_interval``), and whose rounds never stop the
timer: a round that raises is logged and the next one comes as usual; and L{file_stamp}, what
the pollers compare to see that a file changed.
"""

from __future__ import annotations

import os

from typing import Callable

from twisted.application.internet import TimerService
from twisted.logger import Logger


class PollingService(TimerService):
    """Calls C{check} every C{interval} seconds, the first time when started."""

    log = Logger()

    def __init__(self, interval: float, check: Callable[[], object], what: str) -> None:
        super().__init__(interval, self._poll)
        self._check = check
        self._what = what

    @property
    def interval(self) -> float:
        return float(self.step)

    @interval.setter
    def interval(self, seconds: float) -> None:
        self.set_interval(seconds)

    def set_interval(self, seconds: float) -> None:
        """Check every C{seconds} from now on (a running timer restarts, checking at once)."""
        if seconds == self.step:
            return
        self.step = seconds
        if self.running:
            # TimerService reads its step only when it starts.  check() never returns a
            # Deferred, so the stop is complete when stopService returns.
            TimerService.stopService(self)
            TimerService.startService(self)

    def _poll(self) -> None:
        try:
            self._check()
        except Exception:  # noqa: BLE001 - logged; a TimerService whose call raises stops for good
            self.log.failure("checking {what} failed; trying again in {interval}s", what=self._what,
                             interval=self.step)


__all__ = ["PollingService"]


FileStamp = tuple[int, int, int]


def file_stamp(path: str | None) -> FileStamp | None:
    """What changes when a file is written or replaced (mtime, size, inode; a rename over it
    changes the inode even within one mtime tick), or None when it cannot be read."""
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)
