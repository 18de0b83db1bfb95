"""
The checks of the header fields the gateway receives over h2, made by the gateway itself in
one pass rather than by the h2 library's inbound validation, a chain of generators over every
field that was a tenth of the CPU of a proxied request (L{twisted_gateway.http.h2.flow.h2_config}).

They are h2's checks (RFC 9113 8.2.1: a field name is lower case, with no byte below 0x21,
above 0x7e or a colon; a value has no NUL, CR or LF and does not begin or end with whitespace;
8.2.2: no connection-specific field; 8.3: the pseudo-fields of a request or a response, each
once, before every other field), narrowed to what an HTTP/1.1 hop may carry (RFC 9110 5.1,
5.5: a name is a token, a value has no control byte but tab), with one regular expression each.
"""

from __future__ import annotations

import re

field_name_ok = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+\Z").match
field_value_ok = re.compile(rb"(?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?\Z").match
origin_path_ok = re.compile(rb"/[\x21-\x7e]*\Z").match
"""An origin-form :path without space, control or non-ASCII bytes (the common case of
L{twisted_gateway.http.framing.h2_target_problem}, which decides every other)."""
_status_ok = re.compile(rb"[1-5][0-9][0-9]\Z").match

COMMON_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"})
REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})
CONNECTION_FIELDS = frozenset({b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"})
"""Fields an h2 message must not carry (RFC 9113 8.2.2); C{te} only as C{trailers}, in a request."""


def _regular_fields_problem(fields: list[tuple[bytes, bytes]], pseudo: str) -> str | None:
    """Why fields that must all be regular ones (no pseudo-field: C{pseudo} says why one is
    wrong here) are malformed, or None."""
    for name, value in fields:
        if name[:1] == b":":
            return pseudo
        if field_name_ok(name) is None or field_value_ok(value) is None:
            return "a field name or value h2 forbids"
        if name in CONNECTION_FIELDS or name == b"te":
            return "a connection-specific field"
    return None


def trailers_problem(trailers: list[tuple[bytes, bytes]]) -> str | None:
    """Why a trailer section is malformed (RFC 9113 8.1, 8.2), or None."""
    return _regular_fields_problem(trailers, "a pseudo-field in trailers")


def response_problem(headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why a response's header section is malformed (RFC 9113 8.2, 8.3.2), or None."""
    if not headers or headers[0][0] != b":status" or _status_ok(headers[0][1]) is None:
        return "no :status first, or one that is not three digits"
    return _regular_fields_problem(headers[1:], "a repeated or unknown pseudo-field")


__all__ = ["COMMON_METHODS", "CONNECTION_FIELDS", "REQUEST_PSEUDO", "field_name_ok", "field_value_ok",
           "origin_path_ok", "response_problem", "trailers_problem"]
