"""
PROXY protocol (HAProxy's v1 text and v2 binary headers): an incremental reader that hands
complete headers to Twisted's own parsers, and a v2 header builder for upstreams.

Reference: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt (sections 2.1, 2.2).
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any, Callable

import attrs
from twisted_gateway._compat import InvalidProxyHeader, V1Parser, V2Parser

V2_SIGNATURE = V2Parser.PREFIX
V1_PREFIX = b"PROXY "
V1_MAX = 107          # section 2.1: the longest v1 line, CRLF included
V2_MAX = 16 + 216     # section 2.2: addresses plus a generous allowance for TLVs


@attrs.frozen
class ProxiedAddress:
    """The original client, or None for a LOCAL/UNKNOWN header (health checks)."""

    host: str | None
    port: int | None


class ProxyHeaderError(ValueError):
    pass


def looks_like_proxy_header(data: bytes) -> bool:
    """Whether a connection starts like a PROXY header (to refuse one from an untrusted peer)."""
    return data.startswith(b"PROXY") or data.startswith(V2_SIGNATURE[:4])


class ProxyHeaderReader:
    """C{feed(bytes)} returns None (need more) or (ProxiedAddress, remaining bytes)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> tuple[ProxiedAddress, bytes] | None:
        self._buffer += data
        buf = self._buffer
        if buf.startswith(V2_SIGNATURE[: len(buf)]) and len(buf) < 16:
            return None
        if buf.startswith(V2_SIGNATURE):
            size = 16 + struct.unpack("!H", buf[14:16])[0]
            if size > V2_MAX:
                raise ProxyHeaderError(f"v2 header of {size} bytes is too long")
            if len(buf) < size:
                return None
            return self._parse(V2Parser.parse, buf[:size], buf[size:])
        if V1_PREFIX.startswith(buf[:6]) or buf.startswith(V1_PREFIX):
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) >= V1_MAX:
                    raise ProxyHeaderError("v1 header without CRLF in 107 bytes")
                return None
            if end + 2 > V1_MAX:
                raise ProxyHeaderError("v1 header longer than 107 bytes")
            return self._parse(V1Parser.parse, buf[:end], buf[end + 2:])
        raise ProxyHeaderError("no PROXY protocol header")

    @staticmethod
    def _parse(parse: Callable[[bytes], Any], header: bytes, rest: bytes) -> tuple[ProxiedAddress, bytes]:
        try:
            info = parse(header)
        except (InvalidProxyHeader, ValueError, struct.error, IndexError) as e:
            raise ProxyHeaderError(f"invalid PROXY header ({type(e).__name__})") from None
        source = info.source
        if source is None:
            return ProxiedAddress(None, None), rest
        host = getattr(source, "host", None)
        try:
            host = str(ipaddress.ip_address(host)) if host else None  # canonical (compressed) form
        except ValueError:
            raise ProxyHeaderError("invalid source address in PROXY header") from None
        return ProxiedAddress(host, getattr(source, "port", None)), rest


def build_v2(src_host: str, src_port: int, dst_host: str, dst_port: int) -> bytes:
    """A PROXY v2 header (command PROXY, TCP) for the given addresses."""
    src, dst = ipaddress.ip_address(src_host), ipaddress.ip_address(dst_host)
    if src.version != dst.version:
        # Mixed families: express IPv4 as IPv4-mapped IPv6.
        src = ipaddress.IPv6Address(f"::ffff:{src}") if src.version == 4 else src
        dst = ipaddress.IPv6Address(f"::ffff:{dst}") if dst.version == 4 else dst
    if src.version == 4:
        family, body = 0x11, src.packed + dst.packed + struct.pack("!HH", src_port, dst_port)
    else:
        family, body = 0x21, src.packed + dst.packed + struct.pack("!HH", src_port, dst_port)
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body
