"""
What the gateway decides about a proxied HTTP request before it reaches a shard, independent of
the HTTP version the client speaks: which token it carries, whether it may pass, where a browser
is sent to sign in, the ``/auth-redirect`` answer, the rate limits, and the forwarding headers.

The HTTP/1.1 route (twisted.web, L{twisted_gateway.http.proxy}) and the h2 route (frames,
L{twisted_gateway.http.h2proxy}) both use these, so a request is treated the same whichever way
it arrives.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable
from urllib.parse import parse_qs, quote

import attrs

from twisted_gateway import metrics
from twisted_gateway.http.auth import AuthDecision, bearer_token

# RFC 9110 7.6.1: connection-specific fields never forwarded.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
    b"te", b"trailer", b"transfer-encoding", b"upgrade",
})


@attrs.frozen
class Answer:
    """A response the gateway gives itself: a redirect, or an error rendered for the client."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...] = ()
    error: tuple[str, str] | None = None
    """(code, message) of an error body in the client's Accept format; None for an empty body."""


def cookie_value(cookies: Iterable[bytes], name: bytes) -> bytes | None:
    """The value of cookie C{name} in C{Cookie} header values (h2 may split them into several)."""
    prefix = name + b"="
    for header in cookies:
        for part in header.split(b";"):
            part = part.strip()
            if part.startswith(prefix):
                return part[len(prefix):]
    return None


def request_token(authorization: bytes | None, cookies: Iterable[bytes], cookie_name: bytes) -> str | None:
    """The bearer token of a request: the Authorization header first, then the auth cookie."""
    token = bearer_token(authorization)
    if token:
        return token
    value = cookie_value(cookies, cookie_name)
    return value.decode("latin-1") if value else None


def strip_cookie(value: bytes, cookie_name: bytes) -> bytes:
    """A Cookie header value without the gateway's auth cookie."""
    parts = [p.strip() for p in value.split(b";")]
    return b"; ".join(p for p in parts if p and not p.startswith(cookie_name + b"="))


def authorize(ctx: Any, token: str | None, task: str) -> AuthDecision:
    """Whether C{token} opens a private port of C{task} (C{ctx} is an C{HTTPRouteContext})."""
    if ctx.verifier is None:
        return AuthDecision("invalid", 403, "private ports need auth.* to be configured")
    return ctx.verifier.authorize(token, task)


def refusal(ctx: Any, decision: AuthDecision, method: bytes, wants_html: bool, original_url: str) -> Answer:
    """How to answer a request the token check refused (C{ctx} is an C{HTTPRouteContext})."""
    if method == b"GET" and wants_html and decision.status == 401 and ctx.signin_url:
        sep = "&" if "?" in ctx.signin_url else "?"
        location = f"{ctx.signin_url}{sep}orig_url={quote(original_url, safe='')}"
        return Answer(307, ((b"location", location.encode()), (b"cache-control", b"no-store")))
    headers: tuple[tuple[bytes, bytes], ...] = ()
    if decision.status == 401:
        headers = ((b"www-authenticate",
                    f'Bearer error="invalid_token", error_description="{decision.message}"'.encode()),)
    return Answer(decision.status, headers, (decision.outcome, decision.message))


def auth_redirect(ctx: Any, query: str) -> Answer:
    """
    ``GET /auth-redirect?token=...&orig_url=...``: the control plane sends a signed-in browser
    here; set the auth cookie and send it back to C{orig_url}, which must be ours.
    """
    args = parse_qs(query)
    token = (args.get("token") or [""])[0]
    orig_url = (args.get("orig_url") or [""])[0]
    if not orig_url or not ctx.url_is_ours(orig_url):
        return Answer(400, (), ("bad_orig_url", "orig_url must be an https URL under the gateway hostname"))
    if ctx.verifier is None:
        return Answer(403, (), ("invalid", "auth is not configured"))
    decision = ctx.verifier.verify(token) if token else AuthDecision("missing", 401, "no token")
    metrics.AUTH_DECISIONS.labels(outcome=decision.outcome).inc()
    if not decision.allowed:
        return Answer(decision.status, (), (decision.outcome, decision.message))
    cookie = (ctx.cookie_name + b"=" + token.encode() +
              b"; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=" + str(ctx.cookie_max_age).encode())
    return Answer(307, ((b"set-cookie", cookie), (b"location", orig_url.encode()),
                        (b"cache-control", b"no-store")))


def rate_limit_wait(ctx: Any, client_ip: str, decision: AuthDecision | None,
                    token: Callable[[], str | None]) -> float:
    """0, or the seconds until this client (IP, then token subject) may send again.  C{token}
    gives the request's token, asked for only when its claims name no subject."""
    admission = ctx.admission() if ctx.admission is not None else None
    if admission is None:
        return 0.0
    wait = admission.request_rate_ip.take(client_ip)
    if wait:
        metrics.HTTP_RATE_LIMITED.labels(key="ip").inc()
        return float(wait)
    if decision is not None and decision.claims is not None and admission.request_rate_token.enabled:
        subject = str(decision.claims.get("sub") or decision.claims.get("jti") or hash(token()))
        wait = admission.request_rate_token.take(subject)
        if wait:
            metrics.HTTP_RATE_LIMITED.labels(key="token").inc()
            return float(wait)
    return 0.0


def forwarding_headers(previous_for: list[bytes], previous_forwarded: list[bytes], client_ip: str,
                       host: bytes) -> list[tuple[bytes, bytes]]:
    """X-Forwarded-For (appended), X-Forwarded-Proto, X-Forwarded-Host and Forwarded (RFC 7239)."""
    for_value = f'"[{client_ip}]"' if ":" in client_ip else client_ip
    return [
        (b"x-forwarded-for", b", ".join(previous_for + [client_ip.encode()])),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", host),
        (b"forwarded", b", ".join(
            previous_forwarded + [f"for={for_value};proto=https;host={host.decode('latin-1')}".encode()])),
    ]


__all__ = ["Answer", "HOP_BY_HOP", "auth_redirect", "authorize", "cookie_value", "forwarding_headers",
           "rate_limit_wait", "refusal", "request_token", "strip_cookie"]
