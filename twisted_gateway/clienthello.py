"""
A sans-IO reader for the first flight of a TLS client: the ClientHello.

The front door peeks at the ClientHello before any TLS state exists so that it can choose the
route (and with it the certificate and ALPN list) asynchronously, enforce a size bound, and
refuse unknown names with a single alert record.  This module only turns bytes into a
L{ClientHello} or an error; it performs no I/O and keeps no reference to a transport.

References: RFC 8446 section 5.1 (records) and 4.1.2 (ClientHello), RFC 6066 section 3
(server_name), RFC 7301 section 3.1 (application_layer_protocol_negotiation).
"""

from __future__ import annotations

import attrs

RECORD_HANDSHAKE = 0x16
HANDSHAKE_CLIENT_HELLO = 0x01
EXT_SERVER_NAME = 0x0000
EXT_ALPN = 0x0010
EXT_SUPPORTED_VERSIONS = 0x002B
NAME_TYPE_HOST_NAME = 0x00

# RFC 8446 5.1: a TLSPlaintext fragment is at most 2^14 bytes.
MAX_RECORD_PAYLOAD = 2**14
DEFAULT_MAX_HELLO_BYTES = 32 * 1024

_HTTP_METHOD_PREFIXES = (
    b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"OPTI", b"PATC", b"CONN", b"TRAC", b"PRI ",
)


@attrs.frozen
class ClientHello:
    """What the gateway needs from a ClientHello."""

    server_name: str | None
    """The SNI host_name, lower-cased and without a trailing dot, or None when absent."""
    alpn: tuple[bytes, ...]
    """The ALPN protocol names the client offered, in its order of preference."""
    versions: tuple[int, ...]
    """supported_versions if sent, else the legacy_version alone."""


@attrs.frozen
class HelloError:
    """Why the bytes cannot be a ClientHello."""

    reason: str
    """A metric-friendly reason: not_tls, http_on_tls_port, malformed_client_hello,
    oversized_client_hello, invalid_server_name."""
    detail: str


class NeedMore:
    """Marker: not enough bytes yet."""


NEED_MORE = NeedMore()


class _Malformed(Exception):
    pass


class ClientHelloReader:
    """
    Accumulate bytes until a complete ClientHello handshake message is available.

    C{feed(data)} returns L{NEED_MORE}, a L{ClientHello} or a L{HelloError}.  All bytes fed are
    kept in L{buffered} so that the TLS engine can be given the exact same flight afterwards.
    """

    def __init__(self, max_hello_bytes: int = DEFAULT_MAX_HELLO_BYTES) -> None:
        self._max = max_hello_bytes
        self._chunks: list[bytes] = []
        self._size = 0
        self._records_end = 0
        self._handshake = bytearray()

    @property
    def buffered(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks = [data]
        return data

    def feed(self, data: bytes) -> ClientHello | HelloError | NeedMore:
        self._chunks.append(data)
        self._size += len(data)
        raw = self.buffered
        if raw and raw[0] != RECORD_HANDSHAKE:
            if raw[:4] in _HTTP_METHOD_PREFIXES:
                return HelloError("http_on_tls_port", "plain HTTP request sent to the TLS port")
            return HelloError("not_tls", f"first byte 0x{raw[0]:02x} is not a TLS handshake record")
        # Reassemble handshake fragments from as many complete records as are present.
        while True:
            if len(raw) - self._records_end < 5:
                break
            header = raw[self._records_end:self._records_end + 5]
            content_type, major = header[0], header[1]
            length = int.from_bytes(header[3:5], "big")
            if content_type != RECORD_HANDSHAKE:
                return HelloError("malformed_client_hello",
                                  f"record type {content_type} before the ClientHello completed")
            if major != 3:
                return HelloError("not_tls", f"record version major {major} is not 3")
            if length == 0 or length > MAX_RECORD_PAYLOAD:
                return HelloError("malformed_client_hello", f"record length {length} out of range")
            end = self._records_end + 5 + length
            if len(raw) < end:
                break
            self._handshake += raw[self._records_end + 5:end]
            self._records_end = end
        if len(self._handshake) >= 4:
            if self._handshake[0] != HANDSHAKE_CLIENT_HELLO:
                return HelloError("malformed_client_hello",
                                  f"handshake type {self._handshake[0]} is not ClientHello")
            body_length = int.from_bytes(self._handshake[1:4], "big")
            if body_length + 4 > self._max:
                return HelloError("oversized_client_hello",
                                  f"ClientHello of {body_length} bytes exceeds {self._max}")
            if len(self._handshake) >= body_length + 4:
                try:
                    return parse_client_hello_body(bytes(self._handshake[4:4 + body_length]))
                except _Malformed as e:
                    return HelloError("malformed_client_hello", str(e))
        if self._size > self._max + 5 * (self._max // MAX_RECORD_PAYLOAD + 1):
            return HelloError("oversized_client_hello", f"more than {self._max} bytes without a ClientHello")
        return NEED_MORE


class _Cursor:
    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > self.end:
            raise _Malformed(f"truncated {what}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int, what: str) -> int:
        return int.from_bytes(self.take(n, what), "big")

    def vector(self, length_bytes: int, what: str) -> _Cursor:
        n = self.uint(length_bytes, f"{what} length")
        if self.pos + n > self.end:
            raise _Malformed(f"truncated {what}")
        sub = _Cursor(self.data, self.pos, self.pos + n)
        self.pos += n
        return sub

    @property
    def remaining(self) -> int:
        return self.end - self.pos


def parse_client_hello_body(body: bytes) -> ClientHello | HelloError:
    """Parse the body of a ClientHello handshake message (without its 4-byte header)."""
    c = _Cursor(body)
    legacy_version = c.uint(2, "legacy_version")
    c.take(32, "random")
    session_id = c.vector(1, "legacy_session_id")
    if session_id.remaining > 32:
        raise _Malformed("legacy_session_id longer than 32 bytes")
    suites = c.vector(2, "cipher_suites")
    if suites.remaining < 2 or suites.remaining % 2:
        raise _Malformed("cipher_suites length is not a positive even number")
    compression = c.vector(1, "legacy_compression_methods")
    if compression.remaining < 1:
        raise _Malformed("no compression methods")
    server_name: str | None = None
    alpn: tuple[bytes, ...] = ()
    versions: tuple[int, ...] = (legacy_version,)
    if c.remaining:
        extensions = c.vector(2, "extensions")
        if c.remaining:
            raise _Malformed("bytes after the extensions")
        seen: set[int] = set()
        while extensions.remaining:
            ext_type = extensions.uint(2, "extension type")
            ext = extensions.vector(2, "extension data")
            if ext_type in seen:
                # RFC 8446 4.2: at most one extension of each type.
                raise _Malformed(f"duplicate extension {ext_type}")
            seen.add(ext_type)
            if ext_type == EXT_SERVER_NAME:
                parsed = _parse_server_name(ext)
                if isinstance(parsed, HelloError):
                    return parsed
                server_name = parsed
            elif ext_type == EXT_ALPN:
                alpn = _parse_alpn(ext)
            elif ext_type == EXT_SUPPORTED_VERSIONS:
                vs = ext.vector(1, "supported_versions")
                if vs.remaining % 2:
                    raise _Malformed("odd supported_versions length")
                versions = tuple(vs.uint(2, "version") for _ in range(vs.remaining // 2))
    elif c.remaining:
        raise _Malformed("trailing bytes")
    return ClientHello(server_name=server_name, alpn=alpn, versions=versions)


_NAME_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-.ABCDEFGHIJKLMNOPQRSTUVWXYZ_")


def _parse_server_name(ext: _Cursor) -> str | None | HelloError:
    names = ext.vector(2, "server_name_list")
    host_name: str | None = None
    while names.remaining:
        name_type = names.uint(1, "name_type")
        name = names.vector(2, "host_name")
        raw = name.take(name.remaining, "host_name")
        if name_type == NAME_TYPE_HOST_NAME:
            if host_name is not None:
                # RFC 6066 3: at most one name of a given type.
                raise _Malformed("two host_name entries")
            if not raw or len(raw) > 253 + 1 or not set(raw) <= _NAME_CHARS:
                return HelloError("invalid_server_name", "server_name is not an ASCII host name")
            host_name = raw.decode("ascii").lower().rstrip(".")
            if not host_name:
                return HelloError("invalid_server_name", "server_name is empty")
    return host_name


def _parse_alpn(ext: _Cursor) -> tuple[bytes, ...]:
    protocols = ext.vector(2, "protocol_name_list")
    out = []
    while protocols.remaining:
        name = protocols.vector(1, "protocol_name")
        if name.remaining == 0:
            raise _Malformed("empty ALPN protocol name")
        out.append(name.take(name.remaining, "protocol_name"))
    return tuple(out)


def alert_record(description: int) -> bytes:
    """A plaintext fatal alert record (RFC 8446 6), sent before any TLS state exists."""
    return bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, description])


ALERT_HANDSHAKE_FAILURE = 40
ALERT_ACCESS_DENIED = 49
ALERT_DECODE_ERROR = 50
ALERT_PROTOCOL_VERSION = 70
ALERT_INTERNAL_ERROR = 80
ALERT_UNRECOGNIZED_NAME = 112
