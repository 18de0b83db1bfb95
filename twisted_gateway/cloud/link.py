"""
The gateway's HTTP client to the control plane (treq over a persistent connection pool,
HTTPS checked against C{cloud.ca_bundle} or the system's roots) and the retry delay both
/sync and /reports use.
"""

from __future__ import annotations

import random
import re
from typing import Any, Callable

from treq.client import HTTPClient
from twisted.internet import ssl
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

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


__all__ = ["auth_headers", "backoff", "describe", "http_client"]
