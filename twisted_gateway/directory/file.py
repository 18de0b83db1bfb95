"""
The file provider: a YAML or JSON directory document, watched for changes.

The file is polled (stat every C{interval} seconds, re-read when its size, mtime or inode
changes) rather than watched with inotify, so that it works the same on every platform and
with editors and config-management tools that replace the file by renaming.
"""

from __future__ import annotations

import time
from typing import Any

import yaml
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from twisted_gateway.polling import FileStamp, PollingService, file_stamp
from twisted_gateway.directory.interfaces import IProviderStatus, ShardDirectory
from twisted_gateway.directory.model import DirectoryError, DirectorySnapshot, parse_directory


def load_directory_file(path: str) -> DirectorySnapshot:
    """Read and validate a directory file; raise L{DirectoryError} naming the problem."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DirectoryError(f"cannot read: {e.strerror}") from None
    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise DirectoryError(f"{where}not valid YAML/JSON ({getattr(e, 'problem', e)})") from None
    return parse_directory(doc)


@implementer(IProviderStatus)
class FileDirectoryProvider(PollingService):
    """
    Polls one directory file (a TimerService calling L{check}, the first time when started).

    @ivar path: the file; a reload may point it elsewhere (the next check reads the new one).
    @ivar interval: seconds between checks; assigning it (or L{set_interval}) takes effect at
        once, also while running.
    """

    log = Logger()

    def __init__(self, path: str, directory: ShardDirectory, interval: float = 0.5,
                 clock: IReactorTime | None = None) -> None:
        super().__init__(interval, self.check, "the directory file")
        self.path = path
        self.directory = directory
        self.clock = clock
        self._stamp: tuple[int, int, int] | None = None
        self.last_change: float | None = None
        self.last_error: str | None = None

    def _stat(self) -> FileStamp | None:
        return file_stamp(self.path)

    def check(self, force: bool = False) -> None:
        """Read the file if it changed (or if C{force}) and publish it, or refuse it."""
        stamp = self._stat()
        if stamp == self._stamp and not force:
            return
        self._stamp = stamp
        try:
            snapshot = load_directory_file(self.path)
        except DirectoryError as e:
            self.last_error = str(e)
            self.directory.refuse(self.path, str(e))
            return
        self.last_error = None
        self.last_change = time.time()
        self.directory.publish(snapshot, self.path)

    def status(self) -> dict[str, Any]:
        """L{IProviderStatus}: C{error} while the file's last version was refused (the one
        before stays in force).  A file has no version: C{modified} is its mtime as last read."""
        return {"kind": "file", "source": self.path,
                "state": "error" if self.last_error else "ok", "version": None,
                "modified": self._stamp[0] / 1e9 if self._stamp else None,
                "last_change": self.last_change, "last_error": self.last_error,
                "lag_seconds": None, "shards": len(self.directory.current()),
                "poll_interval": self.interval}
