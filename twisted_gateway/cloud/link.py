"""
The gateway's HTTP client to the control plane (treq over a persistent connection pool,
HTTPS checked against C{cloud.ca_bundle} or the system's roots) and the retry delay both
/sync and /reports use.
"""

from __future__ import annotations

import random
import re
from typing import Any, Callable, cast

from treq.client import HTTPClient
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss

SYNC_MAX_BYTES = 32 * 1024 * 1024
"""The largest /sync answer read (a directory of some 100,000 shards); a larger one is a failure."""

ANSWER_MAX_BYTES = 64 * 1024
"""The largest other answer read (errors, /reports acknowledgements)."""

_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def backoff(failures: int, initial: float, maximum: float,
            uniform: Callable[[float, float], float] = random.uniform) -> float:
    """The delay before the next try after C{failures} failures in a row (1 or more): doubling
    from C{initial} up to C{maximum}, each drawn from its upper half (so a fleet that lost the
    control plane together does not come back in step)."""
    ceiling = min(maximum, initial * 2 ** min(max(failures - 1, 0), 32))
    return uniform(ceiling / 2, ceiling)


def http_client(reactor: Any, ca_bundle: str | None) -> tuple[HTTPClient, HTTPConnectionPool]:
    """A treq client whose HTTPS trusts C{ca_bundle} (a PEM file of one or more CA
    certificates), or the platform's roots when None, and its pool (to close at stop)."""
    policy: Any
    if ca_bundle is None:
        policy = BrowserLikePolicyForHTTPS()
    else:
        with open(ca_bundle, "rb") as f:
            blocks = _PEM_BLOCK.findall(f.read())
        if not blocks:
            raise ValueError(f"{ca_bundle}: no PEM certificate in it")
        roots = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(b) for b in blocks])
        policy = BrowserLikePolicyForHTTPS(trustRoot=roots)
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 2
    pool.retryAutomatically = False  # a POST that may have arrived is retried by its owner
    return HTTPClient(Agent(reactor, contextFactory=policy, pool=pool)), pool


REQUEST_OPTIONS: dict[str, Any] = {"allow_redirects": False, "unbuffered": True}
"""How every request to the control plane is made: a redirect is an error, never followed (a
directory or the cloud token must not come from or go to another origin), and the body is read
with L{read_body}'s bounds."""


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    pass


class _Body(Protocol):
    def __init__(self, finished: Deferred[bytes], limit: int, what: str) -> None:
        self.finished: Deferred[bytes] | None = finished
        self.limit = limit
        self.what = what
        self.chunks: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.finished is None:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.fail(BodyTooLarge(f"{self.what}: the answer is larger than {self.limit} bytes"))
            return
        self.chunks.append(data)

    def fail(self, error: Exception) -> None:
        finished, self.finished = self.finished, None
        self.chunks = []
        if self.transport is not None:
            cast(Any, self.transport).stopProducing()  # the connection is closed, never reused
        if finished is not None:
            finished.errback(Failure(error))

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        finished, self.finished = self.finished, None
        if finished is None:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            finished.callback(b"".join(self.chunks))
        else:
            finished.errback(reason)


def read_body(reactor: Any, response: Any, limit: int, timeout: float, what: str) -> Deferred[bytes]:
    """The body of C{response}, at most C{limit} bytes within C{timeout} seconds (else a failure,
    L{BodyTooLarge} or L{BodyTimeout}, and the connection closed): treq's own timeout ends when
    the headers arrive, so a peer trickling its body, or sending one without end, would hold the
    request (and the memory) for ever."""
    finished: Deferred[bytes] = Deferred()
    length = getattr(response, "length", None)
    body = _Body(finished, limit, what)
    if isinstance(length, int) and length > limit:
        response.deliverBody(body)
        body.fail(BodyTooLarge(f"{what}: an answer of {length} bytes (at most {limit})"))
        return finished
    timer = reactor.callLater(timeout, lambda: body.fail(
        BodyTimeout(f"{what}: the answer's body took longer than {timeout:g}s")))

    def done(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        return result
    finished.addBoth(done)
    response.deliverBody(body)
    return finished


def describe(failure: Failure) -> str:
    """A request's failure in a few words: the reasons inside twisted.web's wrappers
    (ResponseNeverReceived, ResponseFailed, RequestTransmissionFailed) rather than their repr."""
    reasons = getattr(failure.value, "reasons", None)
    if reasons:
        return "; ".join(describe(r) for r in reasons)
    return failure.getErrorMessage() or type(failure.value).__name__


def auth_headers(token: str, **extra: str) -> dict[bytes, list[bytes]]:
    headers = {b"Authorization": [b"Bearer " + token.encode("ascii")]}
    for name, value in extra.items():
        headers[name.replace("_", "-").encode("ascii")] = [value.encode("latin-1")]
    return headers


__all__ = ["ANSWER_MAX_BYTES", "BodyTimeout", "BodyTooLarge", "REQUEST_OPTIONS", "SYNC_MAX_BYTES",
           "auth_headers", "backoff", "describe", "http_client", "read_body"]
