"""
Files that hold secrets: created with tight modes and replaced atomically, so that a crash
never leaves a half-written key or certificate behind.
"""

from __future__ import annotations

import os
import tempfile


def ensure_private_dir(path: str) -> None:
    """Create C{path} (and parents) with mode 0700 if it does not exist."""
    if not os.path.isdir(path):
        os.makedirs(path, mode=0o700, exist_ok=True)
        if hasattr(os, "chmod") and os.name == "posix":
            os.chmod(path, 0o700)


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write C{data} to C{path} via a temporary file in the same directory and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        if os.name == "posix":
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if os.name == "posix":
        try:
            dfd = os.open(directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
