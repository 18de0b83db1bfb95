"""
The admin token: an optional bearer token for the dashboard and the admin API (and, with
C{admin.protect_metrics}, for C{/metrics}).

The token is read from C{admin.token_file} and read again when that file changes, so it can be
rotated without a restart.  A request presents it as C{Authorization: Bearer <token>} (curl,
Prometheus) or as the password of HTTP Basic credentials with any user name (what a browser asks
for after a 401 with a Basic challenge).  The comparison takes the same time whatever the
presented value; the token and the presented value are never logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

from twisted.logger import Logger

REALM = "twisted-gateway admin"


class AdminAccess:
    """Checks requests against the token in C{path}."""

    log = Logger()

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._token = b""
        self._load()

    def _load(self) -> None:
        st = os.stat(self.path)
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        with open(self.path, "rb") as f:
            token = f.read().strip()
        if not token:
            raise ValueError(f"{self.path}: the admin token file is empty")
        self._token, self._stamp = token, stamp

    def token(self) -> bytes:
        """The token in force: the file's, re-read when it changed (the last good one if the
        file became unreadable or empty)."""
        try:
            self._load()
        except (OSError, ValueError) as e:
            self.log.warn("admin token file {path} not re-read, the token in force stays: {error}",
                          path=self.path, error=getattr(e, "strerror", None) or str(e))
        return self._token

    def check(self, authorization: bytes | None) -> str | None:
        """None when C{authorization} (the header's value) carries the token; else why not
        (C{missing}, C{malformed}, C{wrong}), a word that may be logged."""
        if not authorization:
            return "missing"
        scheme, _, value = authorization.strip().partition(b" ")
        scheme = scheme.lower()
        if scheme == b"bearer":
            presented = value.strip()
        elif scheme == b"basic":
            try:
                decoded = base64.b64decode(value.strip(), validate=True)
            except (binascii.Error, ValueError):
                return "malformed"
            presented = decoded.partition(b":")[2]
        else:
            return "malformed"
        # compare_digest: the time taken does not depend on where the values differ; of digests,
        # so that it does not depend on the token's length either.
        return None if hmac.compare_digest(hashlib.sha256(presented).digest(),
                                           hashlib.sha256(self.token()).digest()) else "wrong"


def load_access(token_file: str | None) -> AdminAccess | None:
    return AdminAccess(token_file) if token_file else None
