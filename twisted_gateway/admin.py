"""
The admin app (Klein) served on the plain port: liveness, readiness and Prometheus metrics.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from klein import Klein
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from twisted_gateway import metrics, splice


def answer_http01(responder: Any, request: Any, token: str) -> bytes:
    """The key authorization for an HTTP-01 C{token}, or 404 (RFC 8555 8.3)."""
    answer = responder.answer(token) if responder is not None else None
    request.setHeader(b"content-type", b"text/plain")
    if answer is None:
        request.setResponseCode(404)
        return b"no such challenge\n"
    return answer.encode("ascii")


class AdminApp:
    app = Klein()

    def __init__(self, readiness: Callable[[], tuple[bool, dict[str, Any]]], http01: Any = None) -> None:
        self.readiness = readiness
        self.http01 = http01

    @app.route("/.well-known/acme-challenge/<string:token>", methods=["GET", "HEAD"])
    def acme_challenge(self, request: Any, token: str) -> bytes:
        return answer_http01(self.http01, request, token)

    @app.route("/healthz", methods=["GET", "HEAD"])
    def healthz(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"ok\n"

    @app.route("/readyz", methods=["GET", "HEAD"])
    def readyz(self, request: Any) -> bytes:
        ready, detail = self.readiness()
        request.setResponseCode(200 if ready else 503)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"ready": ready, **detail}, sort_keys=True).encode() + b"\n"

    @app.route("/metrics", methods=["GET"])
    def metrics_page(self, request: Any) -> bytes:
        splice.flush_metrics()
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(metrics.REGISTRY)

    def resource(self) -> Any:
        return self.app.resource()
