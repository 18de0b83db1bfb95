"""
The admin app (Klein) served on the plain port: liveness, readiness, Prometheus metrics,
HTTP-01 challenge answers, and the operator's view: the read-only admin API under C{/api/v1/}
and the dashboard at C{/} (L{twisted_gateway.dashboard}), behind the admin token when one is
configured.

One app serves every kind of process; what differs is where its answers come from, given to it
as callables: a single gateway process or a worker reports its own state and its own registry
(L{local_metrics}); the supervisor of several workers asks each worker and merges
(L{twisted_gateway.workers.Supervisor.readiness} and C{metrics}).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, Callable, Union, cast

from klein import Klein
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.internet.defer import Deferred, maybeDeferred

from twisted.logger import Logger

from twisted_gateway import metrics, splice
from twisted_gateway.dashboard.access import REALM, AdminAccess
from twisted_gateway.dashboard.openapi import admin_openapi_document

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


_STATIC = {"dashboard.js": b"text/javascript; charset=utf-8", "dashboard.css": b"text/css; charset=utf-8",
           "index.html": b"text/html; charset=utf-8"}
_STATIC_CACHE: dict[str, bytes] = {}
_VIEWS = ("routes", "certificates", "refusals", "workers", "providers")
# The page and its script come from this origin only; it fetches nothing from anywhere else.
_PAGE_POLICY = (b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


def static_file(name: str) -> bytes:
    """One of the dashboard's files, from the package's data (read once)."""
    body = _STATIC_CACHE.get(name)
    if body is None:
        body = _STATIC_CACHE[name] = (
            resources.files("twisted_gateway.dashboard") / "static" / name).read_bytes()
    return body


class AdminApp:
    """
    The plain port's routes.  C{readiness} and C{metrics} may answer at once or with a
    Deferred (the supervisor's come from its workers); C{http01} answers HTTP-01 challenges
    (None: every token is unknown); C{views} answers the admin API (an
    L{twisted_gateway.dashboard.views.IAdminViews}; None: no admin API and no dashboard);
    C{access}, when given, is the token the dashboard and the admin API (and with
    C{protect_metrics}, /metrics) require.
    """

    app = Klein()
    log = Logger()

    def __init__(self, readiness: ReadinessSource, http01: Any = None,
                 metrics: MetricsSource = local_metrics, views: Any = None,
                 access: AdminAccess | None = None, protect_metrics: bool = False) -> None:
        self.readiness = readiness
        self.http01 = http01
        self.metrics = metrics
        self.views = views
        self.access = access
        self.protect_metrics = protect_metrics and access is not None

    def _refused(self, request: Any, json_answer: bool) -> bytes | None:
        """None when the request may go on; else the 401 answer.  Neither the token nor what
        the client presented is ever logged (only the path, without its query, and why)."""
        if self.access is None:
            return None
        presented = request.requestHeaders.getRawHeaders(b"authorization") or []
        # Two Authorization fields are ambiguous (which one would another hop have read?).
        why = self.access.check(presented[0] if presented else None) if len(presented) <= 1 else "malformed"
        if why is None:
            return None
        client = getattr(request.getClientAddress(), "host", "?")
        path = request.path.decode("utf-8", "replace")[:200]
        self.log.info("admin request refused: {method} {path} from {client}: {why} token",
                      method=request.method.decode("ascii", "replace"), path=path, client=client,
                      why=why, event_kind="admin_refused")
        request.setResponseCode(401)
        request.setHeader(b"cache-control", b"no-store")
        # Bearer for API clients; Basic so that a browser asks for it (the token as password).
        request.responseHeaders.setRawHeaders(b"www-authenticate", [
            f'Bearer realm="{REALM}"'.encode(), f'Basic realm="{REALM}", charset="UTF-8"'.encode()])
        if json_answer:
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"error": "unauthorized",
                               "message": "the admin token is required (Authorization: Bearer)"}).encode() + b"\n"
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"the admin token is required: give it as the password (any user name)\n"

    # -- the dashboard and the admin API --------------------------------------------------------

    @app.route("/", methods=["GET", "HEAD"])
    def dashboard(self, request: Any) -> bytes:
        return self._static(request, "index.html")

    @app.route("/static/<string:name>", methods=["GET", "HEAD"])
    def dashboard_file(self, request: Any, name: str) -> bytes:
        return self._static(request, name)

    def _static(self, request: Any, name: str) -> bytes:
        refused = self._refused(request, json_answer=False)
        if refused is not None:
            return refused
        if self.views is None or name not in _STATIC:
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"not found\n"
        request.setHeader(b"content-type", _STATIC[name])
        request.setHeader(b"content-security-policy", _PAGE_POLICY)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"cache-control", b"no-cache")
        return static_file(name)

    @app.route("/api/v1/<string:view>", methods=["GET", "HEAD"])
    def admin_api(self, request: Any, view: str) -> Union[bytes, "Deferred[bytes]"]:
        refused = self._refused(request, json_answer=True)
        if refused is not None:
            return refused
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        if self.views is not None and view == "openapi.json":
            return json.dumps(admin_openapi_document(), sort_keys=True).encode() + b"\n"
        if self.views is None or view not in _VIEWS:
            request.setResponseCode(404)
            return json.dumps({"error": "not_found", "message": "the admin API has no such view"}).encode() + b"\n"

        def answer(doc: Any) -> bytes:
            return json.dumps(doc, sort_keys=True).encode() + b"\n"
        return maybeDeferred(getattr(self.views, view)).addCallback(answer)

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
    def metrics_page(self, request: Any) -> Union[bytes, "Deferred[bytes]"]:
        if self.protect_metrics:
            refused = self._refused(request, json_answer=False)
            if refused is not None:
                return refused

        def answer(body: bytes) -> bytes:
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
            return body
        return cast("Deferred[bytes]", maybeDeferred(self.metrics)).addCallback(answer)

    def resource(self) -> Any:
        return self.app.resource()
