"""
The gate: what the gateway decides about a proxied HTTP request before it reaches a shard,
independent of the HTTP version the client speaks, and how it answers when the shard does not.

L{gate} takes the request as a L{RequestState} (read by the front end from an HTTP/1.1 head or
an h2 HEADERS frame) and either answers it itself (an L{Answer}: the ``/auth-redirect``
answer, a refused token or the sign-in redirect, a rate limit, a declared body over the limit)
or admits it (L{Admitted}, with the forwarding fields the gateway writes, believing the
client's own only from a trusted proxy).  L{upstream_failed} is the answer for a request the
shard did not answer, L{body_too_large} for a body that grew over the limit, and L{access_log}
the one access-log line of every request.

The HTTP/1.1 front (L{twisted_gateway.http.h1.exchange}) and the h2 front
(L{twisted_gateway.http.h2.front}) both use these, so a request is treated the same whichever
way it arrives.
"""

from __future__ import annotations

import functools
import hashlib
import re
import time
from typing import TYPE_CHECKING, Callable, Iterable
from urllib.parse import parse_qs, quote

import attrs
from twisted.internet import error as ierror
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from twisted_gateway import metrics
from twisted_gateway.logs import error_text
from twisted_gateway.directory.model import Route
from twisted_gateway.http.auth import AuthDecision, bearer_token
from twisted_gateway.http.errors import negotiate
from twisted_gateway.http.upstream import BadResponse
from twisted_gateway.limits import Network, in_networks, parse_networks, retry_after_header

if TYPE_CHECKING:
    from twisted_gateway.http.context import HTTPRouteContext


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


def authorize(ctx: HTTPRouteContext, token: str | None, task: str) -> AuthDecision:
    """Whether C{token} opens a private port of C{task} (C{ctx} is an C{HTTPRouteContext})."""
    if ctx.verifier is None:
        return AuthDecision("invalid", 403, "private ports need auth.* to be configured")
    return ctx.verifier.authorize(token, task)


def header_value_ok(value: bytes) -> bool:
    """
    Whether C{value} may be sent as a field value: no control character but horizontal tab.

    RFC 9110 section 5.5: a field value is visible characters, spaces and tabs (bytes over
    0x7f are obs-text, tolerated); CR, LF and NUL in particular must never be sent, since CR LF
    would end the field and let the rest of the value be read as another field or as the body
    (response splitting).  DEL (0x7f) is not a visible character either.
    """
    return not any((b < 0x20 and b != 0x09) or b == 0x7F for b in value)


# Longest orig_url taken: what the gateway sends to sign in is a URL of its own (RFC 9110
# section 4.1 recommends supporting 8000 octets in a request target); anything longer is not one.
MAX_REDIRECT_URL = 8192

# WHATWG URL standard, "forbidden host code point" and "forbidden domain code point" (host
# parsing, step 7) are all excluded by accepting only LDH labels (RFC 1035 section 2.3.1 /
# RFC 5890 section 2.3.1); a label may start with a digit (RFC 1123 section 2.1).
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# WHATWG URL standard, "ends in a number checker": such a host is parsed as IPv4.
_ENDS_IN_NUMBER = re.compile(r"(?:[0-9]+|0[xX][0-9a-fA-F]*)")
# A token put in the auth cookie: JWS compact serialization is base64url parts joined by dots
# (RFC 7515 section 7.1), all of them RFC 6265 section 4.1.1 cookie-octets.
_COOKIE_SAFE_TOKEN = re.compile(r"[A-Za-z0-9_.-]+")
# WHATWG URL standard, percent-encode sets (section 1.3), as far as they concern what is left
# after refusing controls, spaces and non-ASCII: the query set (for special URLs, with "'"),
# the path set (the query set with "?", "`", "{", "}") and the fragment set.
_QUERY_ENCODE = frozenset('"#<>\'')
_PATH_ENCODE = frozenset('"#<>?`{}')
_FRAGMENT_ENCODE = frozenset('"<>`')
_SINGLE_DOT = frozenset({".", "%2e"})
_DOUBLE_DOT = frozenset({"..", ".%2e", "%2e.", "%2e%2e"})


def redirect_target(url: str, hostname: str) -> str | None:
    """
    The C{Location} to send a browser to for the ``/auth-redirect`` C{orig_url} C{url}, or None
    when C{url} is not an https URL under C{hostname} (that name or a subdomain) as a browser
    reads it.

    The reading follows the WHATWG URL standard's basic URL parser (what browsers use for a
    C{Location}), not RFC 3986: Python's C{urlsplit} reads ``https://evil.example\\@gw.test/``
    as host ``gw.test``, a browser as host ``evil.example`` with path ``/@gw.test/``.  Where
    the standard repairs a URL (stripping tabs and newlines, skipping extra slashes, decoding
    the host) this refuses instead.  The value returned is rebuilt from the parts checked and
    serialized as the parser would (dot segments resolved, the same characters
    percent-encoded), so what the browser follows is what was checked.
    """
    if not url or len(url) > MAX_REDIRECT_URL:
        return None
    # WHATWG "basic URL parser" strips leading and trailing C0 controls and spaces, and removes
    # every ASCII tab and newline from the input, silently: refuse those, and every other
    # control, space, DEL and non-ASCII character (percent-encoded, they are fine).
    if not all(0x21 <= ord(c) <= 0x7E for c in url):
        return None
    # The fragment starts at the first "#", the query at the first "?" before it (the scheme,
    # authority and path states all end at either).  The query and fragment are kept as
    # written, percent-encoded as the query and fragment states do.
    end = min((i for i in (url.find("?"), url.find("#")) if i >= 0), default=len(url))
    head, rest = url[:end], url[end:]
    # In the authority and path states of a special scheme (https is one), a backslash is read
    # as "/" (a validation error, but it is how the URL is read); in the query and fragment it
    # stays itself.
    head = head.replace("\\", "/")
    # The scheme state lowercases the scheme.  Exactly two slashes must follow: the "special
    # authority ignore slashes state" would skip any number of slashes (and with an https base
    # URL, "https:/x" is read as a path relative to the base), so any other count is refused.
    if head[:8].lower() != "https://" or head[8:9] == "/":
        return None
    authority, slash, path = head[8:].partition("/")
    path = slash + path
    # Authority state: an "@" makes what precedes it userinfo (the last "@" wins); no URL of
    # ours carries userinfo.
    if "@" in authority:
        return None
    host, colon, port_text = authority.partition(":")
    # Host parsing percent-decodes the host (so "%2e" would be a dot) and turns a host in "[]"
    # into an IPv6 address: neither is ever a name under ours.  IDNA processing (UTS 46, as the
    # standard's "domain to ASCII" does) lowercases ASCII.
    host = host.lower()
    labels = host.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        return None  # also an empty host, an empty label, a trailing dot, "%", "[", ":"
    wanted = hostname.lower()
    if host != wanted:
        if not host.endswith("." + wanted):
            return None
        # A host whose last label is a number is read as an IPv4 address, not a name.
        if _ENDS_IN_NUMBER.fullmatch(labels[-1]):
            return None
    port = ""
    if colon:
        # Port state: ASCII digits only, at most 65535; an empty port is valid there but is
        # refused here.  Port 0 is no port a browser connects to.
        if not port_text.isdigit() or len(port_text) > 5:  # (only ASCII is left by now)
            return None
        number = int(port_text)
        if not 1 <= number <= 65535:
            return None
        # The default port of https is dropped by the parser (URL serializing omits it).
        port = "" if number == 443 else f":{number}"
    # rest is empty, or "?query", "?query#fragment" or "#fragment" (a "?" in the fragment is
    # part of it).
    before_fragment, hash_sign, fragment = rest.partition("#")
    target = f"https://{host}{port}{_path(path)}"
    if before_fragment:
        target += "?" + _encode(before_fragment[1:], _QUERY_ENCODE)
    if hash_sign:
        target += "#" + _encode(fragment, _FRAGMENT_ENCODE)
    return target if header_value_ok(target.encode("ascii")) else None


def _encode(text: str, encode: frozenset[str]) -> str:
    return "".join(f"%{ord(c):02X}" if c in encode else c for c in text)


def _path(path: str) -> str:
    """A special URL's path (backslashes already slashes) as the WHATWG path state leaves it:
    "." and ".." segments (also percent-encoded) resolved, the path set percent-encoded, and
    an empty path "/"."""
    segments: list[str] = []
    parts = path.split("/")[1:] if path else [""]
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        lowered = part.lower()
        if lowered in _DOUBLE_DOT:
            if segments:
                segments.pop()
            if last:
                segments.append("")
        elif lowered in _SINGLE_DOT:
            if last:
                segments.append("")
        else:
            segments.append(_encode(part, _PATH_ENCODE))
    return "/" + "/".join(segments)


def _quoted_string(text: str) -> str:
    """C{text} as an RFC 9110 section 5.6.4 quoted-string ('"' and '\\' as quoted-pairs)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _refused(decision: AuthDecision) -> Answer:
    """The error answer for a refused token: a challenge for 401 (RFC 6750 section 3)."""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    if decision.status == 401:
        challenge = f"Bearer error=\"invalid_token\", error_description={_quoted_string(decision.message)}"
        value = challenge.encode()
        if not header_value_ok(value):
            # The message may quote something the client sent (a key id): never let it add a line.
            value = b'Bearer error="invalid_token"'
        headers = ((b"www-authenticate", value),)
    return Answer(decision.status, headers, (decision.outcome, decision.message))


def refusal(ctx: HTTPRouteContext, decision: AuthDecision, method: bytes, wants_html: bool, original_url: str) -> Answer:
    """How to answer a request the token check refused (C{ctx} is an C{HTTPRouteContext})."""
    if method == b"GET" and wants_html and decision.status == 401 and ctx.signin_url:
        sep = "&" if "?" in ctx.signin_url else "?"
        # quote(safe="") leaves only unreserved characters of orig_url (RFC 3986 section 2.3);
        # the guard covers the configured sign-in URL too.
        location = f"{ctx.signin_url}{sep}orig_url={quote(original_url, safe='')}".encode()
        if header_value_ok(location):
            return Answer(307, ((b"location", location), (b"cache-control", b"no-store")))
    return _refused(decision)


def auth_redirect(ctx: HTTPRouteContext, query: str, task: str | None = None) -> Answer:
    """
    ``GET /auth-redirect?token=...&orig_url=...``: the control plane sends a signed-in browser
    here; set the auth cookie and send it back to C{orig_url}, which must be an https URL under
    the gateway hostname as a browser reads it (L{redirect_target}).

    With C{task}, the token must open that task (the private port the cookie is for), else the
    answer is the refusal and no cookie is set; without it, any valid token is taken.
    C{ctx} is an C{HTTPRouteContext} (C{hostname}, C{verifier}, C{cookie_name},
    C{cookie_max_age}).
    """
    args = parse_qs(query)
    token = (args.get("token") or [""])[0]
    orig_url = (args.get("orig_url") or [""])[0]
    location = redirect_target(orig_url, ctx.hostname)
    if location is None:
        return Answer(400, (), ("bad_orig_url", "orig_url must be an https URL under the gateway hostname"))
    if ctx.verifier is None:
        return Answer(403, (), ("invalid", "auth is not configured"))
    if task is not None:
        decision = ctx.verifier.authorize(token or None, task)  # counts the decision itself
    else:
        decision = ctx.verifier.verify(token) if token else AuthDecision("missing", 401, "no token")
        metrics.AUTH_DECISIONS.labels(outcome=decision.outcome).inc()
    if not decision.allowed:
        return _refused(decision)
    cookie = (ctx.cookie_name + b"=" + token.encode() +
              b"; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=" + str(ctx.cookie_max_age).encode())
    if not _COOKIE_SAFE_TOKEN.fullmatch(token) or not header_value_ok(cookie):
        # A verified token is a JWS, so this does not happen; if it did, a ";" or a newline
        # would add cookie attributes or fields.
        return Answer(400, (), ("malformed", "the token cannot be set as a cookie"))
    # redirect_target has checked the value with header_value_ok.
    return Answer(307, ((b"set-cookie", cookie), (b"location", location.encode("ascii")),
                        (b"cache-control", b"no-store")))


def rate_limit_wait(ctx: HTTPRouteContext, client_ip: str, decision: AuthDecision | None,
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
        # A token without sub or jti is keyed by its digest: the same in every gateway process
        # (hash() is salted per process), so a fleet's shared limit sees one key.
        subject = str(decision.claims.get("sub") or decision.claims.get("jti") or
                      hashlib.sha256((token() or "").encode()).hexdigest()[:32])
        wait = admission.request_rate_token.take(subject)
        if wait:
            metrics.HTTP_RATE_LIMITED.labels(key="token").inc()
            return float(wait)
    return 0.0


@functools.lru_cache(maxsize=32)
def _networks(values: tuple[str | Network, ...]) -> tuple[Network, ...]:
    # Parsed once per configured tuple (configuration objects are frozen, so a reload that
    # changes http.trusted_proxies brings a new tuple).
    return parse_networks(str(v) for v in values)


def trusted_peer(ip: str, networks: Iterable[str | Network]) -> bool:
    """
    Whether the peer C{ip} is one of C{networks} (CIDR strings such as
    C{http.trusted_proxies}, or parsed networks), whose forwarding fields are believed.
    Matching is L{twisted_gateway.limits.in_networks}': an IPv4-mapped IPv6 peer is its IPv4
    address, a zone index is ignored, and something that is not an address matches nothing.
    Raise ValueError for a value that is not a network (configuration checks this first).
    """
    values = networks if isinstance(networks, tuple) else tuple(networks)
    return bool(values) and in_networks(ip, _networks(values))


def forwarding_headers(previous_for: list[bytes], previous_forwarded: list[bytes], client_ip: str,
                       host: bytes, trusted: bool = False) -> list[tuple[bytes, bytes]]:
    """
    X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host and Forwarded (RFC 7239).

    The client's own X-Forwarded-For and Forwarded values (C{previous_for},
    C{previous_forwarded}) are kept, and appended to, only when C{trusted} (the peer is a proxy
    of ours, L{trusted_peer}); from anyone else they are what the client chose to claim, so
    they are dropped and the gateway's values replace them (RFC 7239 section 8.1: a proxy must
    not pass on a Forwarded value it cannot trust as if it could).
    """
    for_value = f'"[{client_ip}]"' if ":" in client_ip else client_ip
    kept_for = list(previous_for) if trusted else []
    kept_forwarded = list(previous_forwarded) if trusted else []
    return [
        (b"x-forwarded-for", b", ".join(kept_for + [client_ip.encode()])),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", host),
        (b"forwarded", b", ".join(
            kept_forwarded + [f"for={for_value};proto=https;host={host.decode('latin-1')}".encode()])),
    ]


# -- the gate -------------------------------------------------------------------------------------

@attrs.define
class RequestState:
    """
    One proxied request as the gate and the access log see it, whichever front end read it;
    the front end fills in the answer's C{status} and the body bytes C{sent} as they happen.
    """

    method: bytes
    target: bytes
    """The request target in origin-form (query included), or C{*}."""
    authority: bytes
    """The authority the request is for (the front end checked it against the TLS name)."""
    version: str
    """C{"1.0"} or C{"1.1"} (HTTP/1.1 clients), C{"2"} (h2 clients)."""
    client_ip: str
    token: str | None = None
    """The bearer token (the Authorization field, else the auth cookie); read on private ports only."""
    accept: bytes | None = None
    declared_length: int | None = None
    """The body length the request declared, if it did."""
    grpc: bool = False
    forwarded_for: tuple[bytes, ...] = ()
    forwarded: tuple[bytes, ...] = ()
    """The client's own X-Forwarded-For and Forwarded values (believed from a trusted proxy only)."""
    started: float = attrs.field(factory=time.monotonic)
    status: int = 0
    """The status of the answer, once there is one."""
    sent: int = 0
    """Response body bytes passed to the client."""

    @property
    def path(self) -> bytes:
        return self.target.split(b"?", 1)[0]

    @property
    def query(self) -> str:
        return self.target.decode("latin-1").partition("?")[2]


@attrs.frozen
class Admitted:
    """The gate let the request through: it goes to the shard with these forwarding fields."""

    forwarding: tuple[tuple[bytes, bytes], ...]


def gate(ctx: HTTPRouteContext, route: Route, request: RequestState) -> Answer | Admitted:
    """
    Whether C{request} for C{route} may reach the shard, in order: ``/auth-redirect`` (answered
    by the gateway), the token on a private port (refused, or a browser sent to sign in), the
    rate limits (by client IP, then by token subject), the declared body size.  What the front
    end checked first (the form of the request, its authority) is not repeated here.
    """
    if request.method == b"GET" and request.path == b"/auth-redirect":
        return auth_redirect(ctx, request.query, route.shard.task)
    decision: AuthDecision | None = None
    if not route.port.public:
        decision = authorize(ctx, request.token, route.shard.task)
        if not decision.allowed:
            original = f"https://{request.authority.decode('latin-1')}{request.target.decode('latin-1')}"
            return refusal(ctx, decision, request.method, negotiate(request.accept) == "html", original)
    wait = rate_limit_wait(ctx, request.client_ip, decision, lambda: request.token)
    if wait:
        return Answer(429, ((b"retry-after", retry_after_header(wait)),),
                      ("rate_limited", f"too many requests: retry in {max(1, round(wait))} s"))
    limit = ctx.max_body(route)
    if limit and request.declared_length is not None and request.declared_length > limit:
        return body_too_large(limit)
    trusted = ctx.trusted(request.client_ip)
    if not (trusted and (request.forwarded_for or request.forwarded)) and len(request.authority) <= 260:
        # The gateway's own hop only: the same fields for every request of this client and host
        # (remembered for hosts of a usual length only, so the table stays small).
        return _own_hop(request.client_ip, request.authority)
    forwarding = forwarding_headers(list(request.forwarded_for), list(request.forwarded), request.client_ip,
                                    request.authority, trusted=trusted)
    return Admitted(tuple(forwarding))


@functools.lru_cache(maxsize=1024)
def _own_hop(client_ip: str, host: bytes) -> Admitted:
    return Admitted(tuple(forwarding_headers([], [], client_ip, host)))


def body_too_large(limit: int) -> Answer:
    """The answer to a body over C{limit} bytes, declared or grown (counted)."""
    metrics.HTTP_REJECTED.labels(reason="too_large").inc()
    return Answer(413, (), ("too_large", f"the request body is over {limit} bytes"))


def _failure_kind(failure: Failure, shard_id: str, timed_out: bool) -> tuple[int, str, str, str]:
    """(status, error code, message, metric reason) for a request the shard did not answer."""
    if timed_out or failure.check(ierror.TimeoutError, ierror.TCPTimedOutError):
        return 504, "upstream_timeout", f"shard {shard_id} did not answer within the timeout", "timeout"
    if failure.check(ierror.ConnectionRefusedError):
        return 502, "upstream_refused", f"shard {shard_id} refused the connection", "refused"
    if failure.check(ierror.ConnectError, ierror.DNSLookupError):
        return 502, "upstream_unreachable", f"shard {shard_id} is unreachable", "unreachable"
    if failure.check(BadResponse):
        return 502, "upstream_bad_response", f"shard {shard_id} sent a malformed response", "bad_response"
    return 502, "upstream_reset", f"shard {shard_id} closed the connection", "error"


def upstream_failed(log: Logger, route: Route, failure: Failure, timed_out: bool) -> Answer:
    """The answer for a request the shard of C{route} did not answer (counted, and logged with
    C{log}): 504 after the response timeout, else 502 saying what went wrong."""
    status, code, message, reason = _failure_kind(failure, route.shard.id, timed_out)
    if reason in ("timeout", "refused", "unreachable"):
        metrics.UPSTREAM_CONNECT_FAILURES.labels(reason=reason).inc()
    log.warn("proxy to {shard} {address}:{port} failed: {code} ({error})", shard=route.shard.id,
             address=route.shard.address, port=route.port.target_port, code=code,
             error=error_text(failure))
    return Answer(status, (), (code, message))


def access_log(log: Logger, ctx: HTTPRouteContext, route: Route, request: RequestState, outcome: str,
               received: int = 0) -> None:
    """The access-log line of a finished request (C{outcome} stands in for a status it never got),
    and its bytes in the per-route series (C{received}: request body bytes taken from the client)."""
    metrics.count_route(route, up=received, down=request.sent)
    if not ctx.access_log:
        return
    # The event Logger.info would emit, handed to the logger's observer directly: Logger.emit
    # first checks the level against every LogLevel constant it builds a list of, which cost
    # more than the rest of emitting (2.1 against 0.5 us per line, measured).
    log.observer({
        "event_kind": "http_access", "client": request.client_ip, "method": request.method.decode("latin-1"),
        "path": request.path.decode("latin-1"), "status": request.status or outcome, "shard": route.shard.id,
        "port": route.port.port, "bytes": request.sent, "duration": time.monotonic() - request.started,
        "log_logger": log, "log_level": LogLevel.info, "log_namespace": log.namespace, "log_source": log.source,
        "log_format": _ACCESS_FORMAT, "log_time": time.time(),
    })


_ACCESS_FORMAT = ("access {client} {method} {path} -> {status} shard={shard} port={port} "
                  "bytes={bytes} duration={duration:.3f}")


__all__ = ["Admitted", "Answer", "MAX_REDIRECT_URL", "RequestState", "access_log", "auth_redirect", "authorize",
           "body_too_large", "cookie_value", "forwarding_headers", "gate", "header_value_ok", "rate_limit_wait",
           "redirect_target", "refusal", "request_token", "strip_cookie", "trusted_peer", "upstream_failed"]
