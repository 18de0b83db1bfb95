"""
What the gateway's processes on one machine share about ACME, through the state directory:

- L{IssuerLock}: which process talks to the CA.  With ``--workers N`` every worker keeps the
  certificates, but only the holder of an exclusive lock on ``acme/issuer.lock`` issues and
  renews them; when it dies the kernel releases the lock and another worker takes over at its
  next check.
- L{ChallengeBoard}: pending challenge answers (HTTP-01 tokens, TLS-ALPN-01 key authorizations)
  written as files, so that whichever process the CA's validation request reaches can answer
  it, and on-demand requests from workers that do not hold the lock, for the one that does.

Files are written atomically with mode 0600 in a 0700 directory.
"""

from __future__ import annotations

import hashlib
import os
import re
import time

from twisted_gateway.tls.files import atomic_write, ensure_private_dir

try:
    import fcntl
except ImportError:  # Windows: one process only (workers: 1), so the lock is always ours
    fcntl = None  # type: ignore[assignment]  # checked before each use

_SAFE = re.compile(r"^[A-Za-z0-9_.*-]{1,253}$")


_KIND = re.compile(r"^[a-z0-9-]{1,32}$")


def _file_name(kind: str, key: str) -> str:
    """A file name inside the board's directory whatever C{kind} and C{key} hold (they may come
    from a peer's notice): never a separator, never ``..``, never absolute."""
    if not _KIND.match(kind):
        kind = "x" + hashlib.sha256(kind.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    if _SAFE.match(key) and not key.startswith("."):
        return f"{kind}-{key.replace('*', '_wildcard')}"
    return f"{kind}-{hashlib.sha256(key.encode('utf-8', 'surrogatepass')).hexdigest()}"


class IssuerLock:
    """An exclusive, non-blocking lock held for the life of the process once taken."""

    def __init__(self, state_dir: str) -> None:
        root = os.path.join(state_dir, "acme")
        ensure_private_dir(root)
        self.path = os.path.join(root, "issuer.lock")
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        """Take the lock if it is free; True while this process holds it."""
        if self._fd is not None:
            return True
        if fcntl is None:
            self._fd = -1
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None and fd >= 0:
            os.close(fd)  # closing the descriptor releases the flock


class ChallengeBoard:
    """Challenge answers and on-demand requests, as files every local process can read."""

    def __init__(self, state_dir: str) -> None:
        self.dir = os.path.join(state_dir, "acme", "challenges")
        self.requests_dir = os.path.join(state_dir, "acme", "requests")
        ensure_private_dir(self.dir)
        ensure_private_dir(self.requests_dir)

    # -- challenge answers ------------------------------------------------------------------------

    def publish(self, kind: str, key: str, value: str) -> None:
        atomic_write(os.path.join(self.dir, _file_name(kind, key)), value.encode(), mode=0o600)

    def withdraw(self, kind: str, key: str) -> None:
        try:
            os.remove(os.path.join(self.dir, _file_name(kind, key)))
        except FileNotFoundError:
            pass

    def read(self, kind: str, key: str) -> str | None:
        try:
            with open(os.path.join(self.dir, _file_name(kind, key)), "rb") as f:
                return f.read().decode()
        except (FileNotFoundError, UnicodeDecodeError):
            return None

    # -- on-demand requests -----------------------------------------------------------------------

    def request(self, name: str) -> None:
        """Ask the issuing process for a certificate for C{name} (already checked by the policy)."""
        atomic_write(os.path.join(self.requests_dir, _file_name("name", name)), name.encode(), mode=0o600)

    def take_requests(self, max_age: float = 600.0) -> list[str]:
        """The names asked for since the last call (stale requests are dropped)."""
        names = []
        now = time.time()
        for entry in sorted(os.listdir(self.requests_dir)):
            if entry.startswith("."):
                continue
            path = os.path.join(self.requests_dir, entry)
            try:
                with open(path, "rb") as f:
                    name = f.read().decode()
                fresh = now - os.stat(path).st_mtime < max_age
                os.remove(path)
            except (OSError, UnicodeDecodeError):
                continue
            if fresh and name:
                names.append(name)
        return names


__all__ = ["ChallengeBoard", "IssuerLock"]
