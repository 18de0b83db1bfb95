"""
The admin app (Klein) served on the plain port: liveness, readiness, Prometheus metrics and
HTTP-01 challenge answers.

One app serves every kind of process; what differs is where its answers come from, given to it
as callables: a single gateway process or a worker reports its own state and its own registry
(L{local_metrics}); the supervisor of several workers asks each worker and merges
(L{twisted_gateway.workers.Supervisor.readiness} and C{metrics}).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Union, cast

from klein import Klein
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.internet.defer import Deferred, maybeDeferred

from twisted_gateway import metrics, splice

Readiness = tuple[bool, dict[str, Any]]
"""Whether the process is ready, and the details /readyz shows (C{reasons} when it is not)."""

ReadinessSource = Callable[[], Union[Readiness, "Deferred[Readiness]"]]
MetricsSource = Callable[[], Union[bytes, "Deferred[bytes]"]]


def local_metrics() -> bytes:
    """This process's series, with live splices' byte counts brought up to date first."""
    splice.flush_metrics()
    return generate_latest(metrics.REGISTRY)


def answer_http01(responder: Any, request: Any, token: str) -> Union[bytes, "Deferred[bytes]"]:
    """The key authorization for an HTTP-01 C{token}, or 404 (RFC 8555 8.3).  A responder in a
    fleet may answer with a Deferred (the token asked of Redis): so does this."""
    answer = responder.answer(token) if responder is not None else None

    def render(found: str | None) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        if found is None:
            request.setResponseCode(404)
            return b"no such challenge\n"
        return found.encode("ascii")
    if isinstance(answer, Deferred):
        return answer.addCallback(render)
    return render(answer)


class AdminApp:
    """
    The plain port's routes.  C{readiness} and C{metrics} may answer at once or with a
    Deferred (the supervisor's come from its workers); C{http01} answers HTTP-01 challenges
    (None: every token is unknown).
    """

    app = Klein()

    def __init__(self, readiness: ReadinessSource, http01: Any = None,
                 metrics: MetricsSource = local_metrics) -> None:
        self.readiness = readiness
        self.http01 = http01
        self.metrics = metrics

    @app.route("/.well-known/acme-challenge/<string:token>", methods=["GET", "HEAD"])
    def acme_challenge(self, request: Any, token: str) -> Union[bytes, "Deferred[bytes]"]:
        return answer_http01(self.http01, request, token)

    @app.route("/healthz", methods=["GET", "HEAD"])
    def healthz(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"ok\n"

    @app.route("/readyz", methods=["GET", "HEAD"])
    def readyz(self, request: Any) -> Deferred[bytes]:
        def answer(result: Readiness) -> bytes:
            ready, detail = result
            request.setResponseCode(200 if ready else 503)
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"ready": ready, **detail}, sort_keys=True).encode() + b"\n"
        # maybeDeferred waits for a Deferred the source returns.
        return cast("Deferred[Readiness]", maybeDeferred(self.readiness)).addCallback(answer)

    @app.route("/metrics", methods=["GET"])
    def metrics_page(self, request: Any) -> Deferred[bytes]:
        def answer(body: bytes) -> bytes:
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
            return body
        return cast("Deferred[bytes]", maybeDeferred(self.metrics)).addCallback(answer)

    def resource(self) -> Any:
        return self.app.resource()
