"""
Which header fields cross the gateway, in each direction, and the checks that make an h2
request a well-formed HTTP/1.1 one (RFC 9110 7.6.1, RFC 9112 3, RFC 9113 8.2-8.3).  Pure
functions over name/value pairs, shared by every front end.
"""

from __future__ import annotations

import re
from typing import Iterable

from twisted_gateway.http.policy import header_value_ok, strip_cookie

# RFC 9110 7.6.1: connection-specific fields, never forwarded; with the framing fields the
# gateway computes itself and fields of protocols it never lets a client switch to.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
    b"te", b"trailer", b"transfer-encoding", b"upgrade", b"content-length", b"http2-settings",
})
REASONS = {100: b"Continue", 200: b"OK", 204: b"No Content", 307: b"Temporary Redirect",
           400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found",
           405: b"Method Not Allowed", 408: b"Request Timeout", 413: b"Content Too Large",
           421: b"Misdirected Request", 429: b"Too Many Requests", 431: b"Request Header Fields Too Large",
           500: b"Internal Server Error", 501: b"Not Implemented", 502: b"Bad Gateway",
           503: b"Service Unavailable", 504: b"Gateway Timeout", 505: b"HTTP Version Not Supported"}
"""The reason phrase the gateway writes on the status lines it writes itself."""
_FORWARDING = frozenset({b"x-forwarded-for", b"forwarded"})
_REPLACED = frozenset({b"x-forwarded-proto", b"x-forwarded-host", b"host", b"expect"})
# RFC 9110 5.6.2 tchar; the checks below run per request, so they are regular expressions (one
# C-level scan) rather than a Python loop over bytes.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# A space, a control byte, DEL or a byte over 0x7f: never in a request target or an authority.
_NOT_VISIBLE_ASCII = re.compile(rb"[\x00-\x20\x7f-\xff]")
# RFC 9112 4: a reason phrase is HTAB, SP, VCHAR and obs-text.
_PHRASE = re.compile(rb"[\t\x20-\x7e\x80-\xff]+")
# What a client's request never brings to the shard whatever its Connection field says: the
# hop-by-hop and framing fields, the fields the gateway writes itself, its own forwarding fields.
_NEVER_FROM_CLIENT = HOP_BY_HOP | _REPLACED | _FORWARDING


def _listed(value: bytes, into: set[bytes]) -> None:
    """Add the lower-cased tokens of a Connection field's value to C{into}."""
    for token in value.split(b","):
        token = token.strip()
        if token:
            into.add(token.lower())


def connection_named(fields: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """The hop-by-hop fields of a message: the fixed set and those its Connection field lists."""
    names = set(HOP_BY_HOP)
    for name, value in fields:
        if name.lower() == b"connection":
            _listed(value, names)
    return names


def client_fields_for_shard(fields: Iterable[tuple[bytes, bytes]], host: bytes, *, private: bool,
                            cookie_name: bytes, forwarding: Iterable[tuple[bytes, bytes]],
                            upgrade: bool = False) -> list[tuple[bytes, bytes]]:
    """
    The fields of a client's request as the shard gets them: Host first (the authority the
    gateway checked), no hop-by-hop or framing field, no token on private ports, the client's
    own forwarding fields replaced by C{forwarding} (the gate's, L{policy.gate}), and for a
    websocket upgrade the two fields that ask for it.  The framing field is added by the
    upstream.
    """
    fields = list(fields)
    named: set[bytes] = set()
    for name, value in fields:
        if name.lower() == b"connection":
            _listed(value, named)
    # Connection cannot name away what the gateway itself writes.
    named -= {b"cookie", b"authorization"} if not private else {b"cookie"}
    drop = _NEVER_FROM_CLIENT | named if named else _NEVER_FROM_CLIENT
    out: list[tuple[bytes, bytes]] = [(b"Host", host)]
    for name, value in fields:
        lname = name.lower()
        if lname in drop or lname.startswith(b"proxy-"):
            continue
        if lname == b"authorization" and private:
            continue  # the token never reaches the shard
        if lname == b"cookie":
            value = strip_cookie(value, cookie_name)
            if not value:
                continue
        out.append((name, value))
    out += forwarding
    if upgrade:
        out += [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
    return out


def forwarding_claims(fields: Iterable[tuple[bytes, bytes]],
                      named: frozenset[bytes]) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    """
    The X-Forwarded-For and Forwarded values of an HTTP/1.1 request, for the gate to keep from a
    trusted proxy; none that its Connection field names (C{named}), since such a field is
    hop-by-hop (RFC 9110 7.6.1) and never forwarded.
    """
    forwarded_for: list[bytes] = []
    forwarded: list[bytes] = []
    for name, value in fields:
        lname = name.lower()
        if lname in _FORWARDING and lname not in named:
            (forwarded_for if lname == b"x-forwarded-for" else forwarded).append(value)
    return tuple(forwarded_for), tuple(forwarded)


def response_fields_for_client(fields: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The shard's response fields without hop-by-hop and framing fields (the gateway frames)."""
    out: list[tuple[bytes, bytes]] = []
    named: set[bytes] | None = None
    for name, value in fields:
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"connection":
                if named is None:
                    named = set()
                _listed(value, named)
            continue
        out.append((name, value))
    if named:
        named -= HOP_BY_HOP  # "Connection: keep-alive" (the usual one) names nothing more
        if named:
            out = [(n, v) for n, v in out if n.lower() not in named]
    return out


def safe_phrase(phrase: bytes, default: bytes) -> bytes:
    """A reason phrase safe to write on a status line (RFC 9112 4: HTAB, SP, VCHAR, obs-text)."""
    if phrase and _PHRASE.fullmatch(phrase):
        return phrase
    return default


def is_token(value: bytes) -> bool:
    return _TOKEN.fullmatch(value) is not None


def visible_ascii(value: bytes) -> bool:
    """Whether C{value} has no space, control, DEL or non-ASCII byte (a request target's bytes)."""
    return _NOT_VISIBLE_ASCII.search(value) is None


def h2_target_problem(method: bytes, path: bytes) -> str | None:
    """Why an h2 request's :method/:path cannot become an HTTP/1.1 request line, or None."""
    if not is_token(method):
        return ":method is not a token"
    if method == b"CONNECT":
        return None  # answered by the gateway itself
    if path == b"*":
        return None if method == b"OPTIONS" else "'*' is a :path for OPTIONS only"
    if not path.startswith(b"/"):
        return ":path is not origin-form"
    if not visible_ascii(path):
        return ":path holds a space, control or non-ASCII byte"
    return None


def h2_field_problem(name: bytes, value: bytes) -> str | None:
    """Why an h2 field cannot be written on an HTTP/1.1 line (RFC 9110 5.1, 5.5), or None: the
    h2 library refuses only NUL, CR and LF, and an HTTP/1.1 shard would read the rest."""
    if not is_token(name):
        return "a field name is not a token"
    if not header_value_ok(value):
        return "a field value holds a control byte"
    return None


def authority_host(authority: bytes) -> bytes | None:
    """The host of C{host[:port]} (RFC 3986 3.2.2-3.2.3), lower-cased without a trailing dot;
    None when it is not an authority (userinfo, controls, a port that is not a number)."""
    if not authority or _NOT_VISIBLE_ASCII.search(authority) or b"@" in authority:
        return None
    if authority.startswith(b"["):
        end = authority.find(b"]")
        if end < 0:
            return None
        rest = authority[end + 1:]
        if rest and not (rest[:1] == b":" and rest[1:].isdigit()):
            return None
        return authority[:end + 1].lower()
    host, sep, port = authority.partition(b":")
    if not host or (sep and not port.isdigit()):
        return None
    return host.lower().rstrip(b".")


__all__ = ["HOP_BY_HOP", "REASONS", "authority_host", "client_fields_for_shard", "connection_named",
           "forwarding_claims", "h2_field_problem", "h2_target_problem", "is_token", "response_fields_for_client",
           "safe_phrase", "visible_ascii"]
