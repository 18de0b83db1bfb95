"""
The file provider: a YAML or JSON directory document, watched for changes.

The file is polled (stat every C{interval} seconds, re-read when its size, mtime or inode
changes) rather than watched with inotify, so that it works the same on every platform and
with editors and config-management tools that replace the file by renaming.
"""

from __future__ import annotations

import os

import yaml
from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from twisted_gateway.directory.interfaces import ShardDirectory
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


class FileDirectoryProvider(Service):
    log = Logger()

    def __init__(self, path: str, directory: ShardDirectory, interval: float = 0.5,
                 clock=None) -> None:
        self.path = path
        self.directory = directory
        self.interval = interval
        self._stamp: tuple[int, int, int] | None = None
        self._loop = LoopingCall(self.check)
        if clock is not None:
            self._loop.clock = clock

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def check(self, force: bool = False) -> None:
        stamp = self._stat()
        if stamp == self._stamp and not force:
            return
        self._stamp = stamp
        try:
            snapshot = load_directory_file(self.path)
        except DirectoryError as e:
            self.directory.refuse(self.path, str(e))
            return
        self.directory.publish(snapshot, self.path)

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=True)

    def stopService(self) -> None:
        if self._loop.running:
            self._loop.stop()
        return super().stopService()
