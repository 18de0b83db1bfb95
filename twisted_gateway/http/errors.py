"""
Error answers the gateway writes itself, in the format the client's ``Accept`` asks for:
JSON (``{"error": code, "message": ...}``), an HTML page, or plain text.
"""

from __future__ import annotations

import html
import json
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Site

from twisted_gateway import metrics

_REASONS = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            429: "Too Many Requests", 502: "Bad Gateway", 503: "Service Unavailable",
            504: "Gateway Timeout"}


def negotiate(accept: str | bytes | None) -> str:
    """Pick json, html or text from an Accept header (highest q wins, then the first; default text)."""
    if not accept:
        return "text"
    if isinstance(accept, bytes):
        accept = accept.decode("latin-1")
    best = ("text", -1.0)
    for index, item in enumerate(accept.split(",")):
        parts = [p.strip() for p in item.split(";")]
        media = parts[0].lower()
        q = 1.0
        for param in parts[1:]:
            if param.startswith("q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0
        kind = ("json" if media == "application/json" or media.endswith("+json") else
                "html" if media in ("text/html", "application/xhtml+xml") else
                "text" if media in ("text/plain", "text/*", "*/*") else None)
        # Higher q wins; among equal q the earlier entry wins.
        if kind and q > 0 and q > best[1]:
            best = (kind, q)
    return best[0]


def render_error(status: int, code: str, message: str, accept: str | bytes | None) -> tuple[bytes, bytes]:
    """(content type, body) for an error."""
    fmt = negotiate(accept)
    title = f"{status} {_REASONS.get(status, 'Error')}"
    if fmt == "json":
        return (b"application/json",
                json.dumps({"error": code, "message": message, "status": status}).encode() + b"\n")
    if fmt == "html":
        page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
                f"</head><body><h1>{html.escape(title)}</h1><p>{html.escape(message)}</p>"
                f"<p><small>twisted-gateway ({html.escape(code)})</small></p></body></html>\n")
        return b"text/html; charset=utf-8", page.encode()
    return b"text/plain; charset=utf-8", f"{title}: {message} ({code})\n".encode()


def write_error(request: Any, status: int, code: str, message: str) -> bytes:
    """Set the status and headers on a twisted.web request and return the body."""
    content_type, body = render_error(status, code, message, request.getHeader("accept"))
    request.setResponseCode(status)
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"cache-control", b"no-store")
    metrics.HTTP_ERROR_PAGES.labels(code=str(status)).inc()
    return body


class ErrorResource(Resource):
    """Answers every request with one error."""

    isLeaf = True

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__()
        self.status, self.code, self.message = status, code, message

    def render(self, request: Any) -> bytes:
        return write_error(request, self.status, self.code, self.message)


def quiet_site(resource: Resource) -> Site:
    """A Site that neither logs each request through twisted.web nor shows tracebacks."""
    site = Site(resource)
    site.displayTracebacks = False
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]  # no access log line per request
    return site


def error_site(status: int, code: str, message: str) -> Site:
    return quiet_site(ErrorResource(status, code, message))
