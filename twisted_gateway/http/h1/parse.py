"""
HTTP/1.1 requests read from a client's decrypted stream, without I/O.

httptools (llhttp, the parser Node.js ships) does the byte-level work and is strict by default:
Content-Length with Transfer-Encoding, two Content-Length fields, bare LF, obs-fold, controls in
values and bad chunk sizes are all errors.  On top of it this module decides what a front door
must: bounds on the head, the one framing the gateway will trust (RFC 9112 6), the request
target's form (RFC 9112 3.2) and the Host against the name the client asked for in TLS.

L{RequestReader.feed} turns bytes into events: a L{RequestHead}, body chunks (C{bytes}),
L{END} when a request is complete, L{Rejected} when the stream cannot be trusted any further, and
L{Stopped} when the parser stops after a request asking to switch protocols (the bytes after it
are the client's next bytes, whatever they are).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Union

import attrs
import httptools

from twisted_gateway.http.framing import authority_host, is_token, visible_ascii

_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
_COMMON_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"})
"""Tokens, known without looking at their bytes again."""
# The fields check_head and the gate read, by lower-cased name; every other field is only
# carried along.  One dictionary lookup per field instead of a chain of comparisons.
_READ_FIELDS = {name: index for index, name in enumerate((
    b"host", b"content-length", b"transfer-encoding", b"connection", b"upgrade", b"expect",
    b"accept", b"authorization", b"cookie", b"x-forwarded-for", b"forwarded"))}
_HOST, _LENGTH, _CODING, _CONNECTION, _UPGRADE, _EXPECT, _ACCEPT, _AUTHORIZATION, _COOKIE, _XFF, _FORWARDED = \
    range(len(_READ_FIELDS))


class RequestHead(NamedTuple):
    """
    One request's head as the gateway acts on it.  A named tuple rather than a frozen attrs
    class: it is made once per request, and a frozen attrs class sets each of its sixteen
    fields through C{object.__setattr__} (measured: 1.5 % of the gateway's samples on W1).
    """

    method: bytes
    target: bytes
    """The request target in origin-form (absolute-form naming us is converted), or C{*}."""
    version: str
    """C{"1.1"} or C{"1.0"}."""
    fields: tuple[tuple[bytes, bytes], ...]
    """Header fields as received (name case kept), framing fields included."""
    host: bytes
    """The authority the request is for (the Host value, or the TLS name for HTTP/1.0)."""
    body: str
    """C{"none"}, C{"length"} or C{"chunked"}."""
    length: int | None
    """The declared length of a C{"length"} body."""
    keep_alive: bool
    expect_continue: bool
    upgrade: tuple[bytes, ...]
    """The lower-cased protocols of C{Upgrade} when C{Connection} names C{upgrade}, else ()."""
    connection: frozenset[bytes]
    """The lower-cased field names (and options) C{Connection} lists."""
    accept: bytes | None = None
    """The first C{Accept} value (for the format of the gateway's own error pages)."""
    authorization: bytes | None = None
    """The first C{Authorization} value."""
    cookies: tuple[bytes, ...] = ()
    """Every C{Cookie} value."""
    forwarded_for: tuple[bytes, ...] = ()
    forwarded: tuple[bytes, ...] = ()
    """The C{X-Forwarded-For} and C{Forwarded} values, but none that C{Connection} names (such a
    field is hop-by-hop, RFC 9110 7.6.1, and never forwarded)."""

    @property
    def path(self) -> bytes:
        return self.target.split(b"?", 1)[0]


@attrs.frozen
class Rejected:
    status: int
    reason: str
    """The metric reason (C{gateway_http_rejected_total})."""
    message: str
    """Said to the client; never contains a value the client sent."""


@attrs.frozen
class Stopped:
    rest: bytes


class _End:
    def __repr__(self) -> str:
        return "END"


END = _End()
Event = Union[RequestHead, bytes, _End, Rejected, Stopped]


def _bad(status: int, reason: str, message: str) -> Rejected:
    return Rejected(status, reason, message)


def _tokens(values: list[bytes]) -> list[bytes]:
    return [t.strip().lower() for v in values for t in v.split(b",") if t.strip()]


_HOSTS: dict[bytes, bytes | None] = {}


def _host_of(authority: bytes) -> bytes | None:
    """L{authority_host}, remembered for the few Host values a gateway sees again and again
    (bounded: values up to 260 bytes, and the table starts over once it holds 1024)."""
    try:
        return _HOSTS[authority]
    except KeyError:
        pass
    host = authority_host(authority)
    if len(authority) <= 260:  # a name of 253 bytes and a port: nothing longer is kept
        if len(_HOSTS) >= 1024:
            _HOSTS.clear()
        _HOSTS[authority] = host
    return host


def our_name(server_name: str) -> bytes:
    """The TLS name as L{check_head} compares hosts with it."""
    return server_name.lower().rstrip(".").encode()


def check_head(method: bytes, target: bytes, version: str, fields: list[tuple[bytes, bytes]],
               server_name: str, ours: bytes | None = None) -> RequestHead | Rejected:
    """
    The head of one request as the gateway will act on it, or why it is refused.  Pure: every
    rule here is unit-tested on bytes.  C{ours}: L{our_name} of C{server_name}, when the caller
    keeps it.
    """
    if version != "1.1" and version != "1.0":
        if version.startswith("0."):
            return _bad(400, "bad_request", "the request line is not METHOD target HTTP/1.x")
        return _bad(505, "bad_request", "only HTTP/1.1 and HTTP/1.0 are served")
    if method not in _COMMON_METHODS:
        if method == b"CONNECT":
            return _bad(405, "method_not_allowed", "CONNECT is not proxied to shards")
        if not is_token(method):
            return _bad(400, "bad_request", "the method is not a token")
    if not visible_ascii(target):
        return _bad(400, "bad_request", "the request target holds a space or control byte")
    if ours is None:
        ours = our_name(server_name)
    absolute_host: bytes | None = None
    host_value = ours
    if target == b"*":
        if method != b"OPTIONS":
            return _bad(400, "bad_request", "'*' is a request target for OPTIONS only")
    elif not target.startswith(b"/"):
        scheme, sep, rest = target.partition(b"://")
        if not sep or scheme.lower() not in (b"https", b"http"):
            return _bad(400, "bad_request", "the request target must be origin-form or absolute-form")
        authority, slash, path = rest.partition(b"/")
        authority, _, _ = authority.partition(b"?")
        absolute_host = authority_host(authority)
        if absolute_host != ours:
            return _bad(421, "misdirected", "the request target names another host")
        query = b"" if slash else rest[len(authority):]
        target = b"/" + path if slash else b"/" + query
        host_value = authority
    # One pass over the fields: the values of each field read here, by _READ_FIELDS index.
    read: list[list[bytes] | None] = [None] * len(_READ_FIELDS)
    slot_of = _READ_FIELDS.get
    for name, value in fields:
        slot = slot_of(name.lower())
        if slot is not None:
            values = read[slot]
            if values is None:
                read[slot] = [value]
            else:
                values.append(value)
    hosts = read[_HOST] or ()
    lengths = read[_LENGTH] or ()
    codings = read[_CODING] or ()
    connection = read[_CONNECTION] or []
    upgrade = read[_UPGRADE] or []
    expect = read[_EXPECT] or ()
    if len(hosts) > 1:
        return _bad(400, "bad_request", "a request carries one Host field")
    if hosts:
        host_value = hosts[0].strip()
        name_ = _host_of(host_value)
        if name_ is None:
            return _bad(400, "bad_request", "the Host field is not an authority")
        if name_ != ours:
            return _bad(421, "misdirected", "the Host field names another host than the TLS name")
    elif version == "1.1" and absolute_host is None:
        return _bad(400, "bad_request", "an HTTP/1.1 request needs a Host field")
    if codings:
        # RFC 9112 6.1: the gateway understands chunked alone; anything else (gzip, chunked,
        # an obfuscated spelling, two fields) is not a framing it will act on.
        if len(codings) != 1 or codings[0].strip().lower() != b"chunked":
            return _bad(501, "unsupported_coding", "the only transfer coding accepted is chunked")
        if version == "1.0":
            # RFC 9112 6.1: Transfer-Encoding in an HTTP/1.0 message means faulty framing.
            return _bad(400, "bad_framing", "an HTTP/1.0 request cannot be chunked")
        body, length = "chunked", None
    elif lengths:
        value = lengths[0].strip()
        if len(lengths) != 1 or not value.isdigit() or len(value) > 18:
            return _bad(400, "bad_framing", "Content-Length must be one decimal number")
        length = int(value)
        body = "length" if length else "none"
    else:
        body, length = "none", None
    conn_tokens = _tokens(connection) if connection else []
    if version == "1.1":
        keep_alive = b"close" not in conn_tokens
    else:
        keep_alive = b"keep-alive" in conn_tokens and b"close" not in conn_tokens
    upgrades = tuple(_tokens(upgrade)) if b"upgrade" in conn_tokens else ()
    if b"websocket" in upgrades and body != "none":
        # RFC 6455 4.1: the opening handshake is a GET without a body; one with a body is
        # not an upgrade the gateway would let the shard accept.
        return _bad(400, "bad_request", "a websocket upgrade request carries no body")
    named = frozenset(conn_tokens)
    forwarded_for = read[_XFF] or ()
    forwarded = read[_FORWARDED] or ()
    if named:
        if b"x-forwarded-for" in named:
            forwarded_for = ()
        if b"forwarded" in named:
            forwarded = ()
    accept = read[_ACCEPT]
    authorization = read[_AUTHORIZATION]
    cookies = read[_COOKIE]
    return RequestHead(
        method, target, version, tuple(fields), host_value, body, length, keep_alive,
        any(v.strip().lower() == b"100-continue" for v in expect) if expect else False,
        upgrades, named, accept[0] if accept else None, authorization[0] if authorization else None,
        tuple(cookies) if cookies else (), tuple(forwarded_for), tuple(forwarded))


def needs_length_field(method: bytes) -> bool:
    """Methods whose empty body is still announced with C{Content-Length: 0} (RFC 9110 8.6)."""
    return method in _BODY_METHODS


class _Abort(Exception):
    pass


class RequestReader:
    """
    Requests of one client connection, read one event at a time.  The reader parses ahead
    (pipelined requests queue up as events); the caller decides when to act on them and pauses
    the client while events are waiting.
    """

    def __init__(self, server_name: str, max_head_bytes: int, max_fields: int) -> None:
        self.server_name = server_name
        self._ours = our_name(server_name)
        self.max_head_bytes = max_head_bytes
        self.max_fields = max_fields
        self._parser: Any = httptools.HttpRequestParser(self)
        self._events: list[Event] = []
        self._in_head = False
        self._head_bytes = 0
        self._quiet = 0
        self._url = b""
        self._fields: list[tuple[bytes, bytes]] = []
        self._rejected: Rejected | None = None
        self._in_body = False
        self._upgrade_body: bytes | None = None
        self._synthetic = False
        self.done = False
        """Nothing more is parsed (a rejection, or a protocol switch was asked for)."""

    @property
    def in_head(self) -> bool:
        """A request head has begun and is not complete (for the head deadline)."""
        return self._in_head

    def feed(self, data: bytes) -> list[Event]:
        if self.done:
            return []
        events: list[Event] = []
        self._events = events
        while data and not self.done:
            if self._in_head or self._between_requests():
                # Feed no more than the head allowance, so that the head's size is bounded
                # exactly (httptools buffers a field until it is complete).
                allowance = self.max_head_bytes - self._head_bytes
                if allowance <= 0:
                    self._reject(_bad(431, "header_too_large", "the request head is too large"))
                    break
                if len(data) <= allowance:
                    part, data = data, b""  # the usual case: no copies
                else:
                    part, data = data[:allowance], data[allowance:]
                leftover = self._feed(part)
                if self._in_head:
                    self._head_bytes += len(part)
                if leftover:
                    data = leftover + data
            else:
                data = self._feed(data)
        return events

    def _between_requests(self) -> bool:
        return not self._in_head and not self._in_body

    def _feed(self, data: bytes) -> bytes:
        """Feed C{data}; return bytes still to be fed (after a switch to a new parser)."""
        before = len(self._events)
        leftover = b""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            rest = data[int(e.args[0]):]
            if self._upgrade_body is None:
                self.done = True
                self._events.append(Stopped(rest))
            else:
                self._read_upgrade_body()
                leftover = rest
            data = data[:int(e.args[0])]
        except httptools.HttpParserCallbackError:
            if self._rejected is not None:
                self._reject(self._rejected)
        except httptools.HttpParserError as e:
            self._reject(_parse_error(str(e)))
        if len(self._events) == before and not self.done:
            # No event: bytes of a field, a chunk header or a trailer still being collected.
            self._quiet += len(data)
            if self._quiet > self.max_head_bytes:
                self._reject(_bad(431, "header_too_large", "a header or trailer field is too large"))
        else:
            self._quiet = 0
        return leftover

    def _read_upgrade_body(self) -> None:
        """
        llhttp stops right after the head of a request asking to switch protocols, leaving its
        body unread.  Such a request (h2c and other upgrades the gateway never honours) is
        forwarded as an ordinary one, so its body must be read with its own framing: a new
        parser is given the same framing in a head of its own (not reported), then the rest.
        """
        framing = self._upgrade_body
        assert framing is not None  # called only when a head left its body unread
        self._upgrade_body = None
        self._parser = httptools.HttpRequestParser(self)
        self._synthetic = True
        self._parser.feed_data(b"PUT / HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n\r\n")

    def _reject(self, rejected: Rejected) -> None:
        if not self.done:
            self.done = True
            self._events.append(rejected)

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._synthetic:
            return
        self._in_head = True
        self._head_bytes = 0
        self._url = b""
        self._fields = []

    def on_url(self, url: bytes) -> None:
        if not self._synthetic:
            self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head or self._synthetic:
            return  # a trailer field: never forwarded (RFC 9110 6.5.1 lets a proxy drop them)
        self._fields.append((name, value))
        if len(self._fields) > self.max_fields:
            self._rejected = _bad(431, "header_too_large", "too many header fields")
            raise _Abort()

    def on_headers_complete(self) -> None:
        if self._synthetic:
            self._synthetic = False
            return
        self._in_head = False
        self._in_body = True
        self._head_bytes = 0
        parser = self._parser
        head = check_head(parser.get_method(), self._url, parser.get_http_version(),
                          self._fields, self.server_name, self._ours)
        if isinstance(head, Rejected):
            self._rejected = head
            raise _Abort()
        if parser.should_upgrade() and head.body != "none":
            # llhttp will stop after this head and leave the body unread (it decides on its own
            # reading of Connection and Upgrade, which an empty token list still satisfies).
            if head.body == "length":
                assert head.length is not None  # check_head gives a "length" body its length
                self._upgrade_body = b"Content-Length: %d" % head.length
            else:
                self._upgrade_body = b"Transfer-Encoding: chunked"
        self._events.append(head)

    def on_body(self, body: bytes) -> None:
        self._events.append(body)

    def on_message_complete(self) -> None:
        if self._upgrade_body is not None:
            return  # llhttp skipped the body: it is read by the next parser
        self._in_body = False
        self._events.append(END)


def _parse_error(message: str) -> Rejected:
    lowered = message.lower()
    if "content-length" in lowered or "chunk" in lowered:
        return _bad(400, "bad_framing", "the request's framing is malformed")
    if "transfer-encoding" in lowered:
        return _bad(501, "unsupported_coding", "the only transfer coding accepted is chunked")
    return _bad(400, "bad_request", "the request is malformed")


__all__ = ["END", "Event", "RequestHead", "RequestReader", "Rejected", "Stopped", "check_head",
           "needs_length_field", "our_name"]
