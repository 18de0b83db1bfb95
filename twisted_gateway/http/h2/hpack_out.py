"""
The HPACK encoding of every header block the gateway sends (RFC 7541), in place of the hpack
library's encoder on the gateway's h2 connections: each field is a static-table index when the
static table has it whole (``:method GET``, ``:status 200``), else a literal *without indexing*
(6.2.2), with the name's static index when it has one; no Huffman coding; the dynamic table is
never used.

Why: the library's encoder searched its dynamic table linearly for each field, added every new
value (a shard's ``date``, ``etag``, ``last-modified``), Huffman-coded it byte by byte in Python,
and was about a tenth of the CPU of a proxied request.  This encoder is a dictionary lookup per
field (a small cache per connection; credentials and cookies are never kept in it).  What it costs is bytes: ~100 more per response on the wire, inside one TLS record that
goes out anyway.  Since nothing is ever indexed, no value (a token, a cookie)
enters a compression context (the attacks of RFC 7541 7.1 have nothing to probe), and the peer's
dynamic table is cleared and kept at size 0 by a size update (6.3) at the start of the first
block and after each change of the peer's SETTINGS_HEADER_TABLE_SIZE (4.2).
"""

from __future__ import annotations

from typing import Iterable

from hpack.struct import NeverIndexedHeaderTuple
from hpack.table import HeaderTable

_STATIC_FIELDS: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAMES: dict[bytes, int] = {}
for _index, (_name, _value) in enumerate(HeaderTable.STATIC_TABLE, start=1):
    _STATIC_FIELDS.setdefault((_name, _value), _index)
    _STATIC_NAMES.setdefault(_name, _index)

_NEVER_INDEXED = frozenset({b"authorization", b"proxy-authorization"})
"""Credentials go out as never-indexed literals (6.2.3), so no later hop indexes them either;
so does every field that arrived never-indexed (hpack's NeverIndexedHeaderTuple), which an
intermediary must pass on in that representation (7.1.3)."""

_CACHE_LIMIT = 128
"""Encoded fields kept per connection (the fields its requests or responses repeat); the cache
starts again when full.  Per connection, and small: no peer can learn from timing whether
another connection sent a value, and a peer that sends only new values costs a miss each and
at most ~40 KiB (the dynamic table of hpack's encoder, which this replaces, is 4 KiB)."""
_CACHE_FIELD_LIMIT = 128
"""Longer fields (name and value) are encoded each time."""
_UNCACHED = _NEVER_INDEXED | {b"cookie", b"set-cookie"}
"""Fields whose values are secrets: encoded each time, never kept."""


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer (5.1) whose first byte carries C{first} in the bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(data: bytes) -> bytes:
    """A string literal without Huffman coding (5.2)."""
    return _integer(len(data), 7, 0) + data


def encode_field(name: bytes, value: bytes, never_indexed: bool = False) -> bytes:
    """One field's representation: a static index, or a literal without indexing (or, for
    credentials and C{never_indexed} fields, a never-indexed literal)."""
    never_indexed = never_indexed or name in _NEVER_INDEXED
    index = None if never_indexed else _STATIC_FIELDS.get((name, value))
    if index is not None:
        return bytes((0x80 | index,))  # 6.1 (every static index is below 127)
    first = 0x10 if never_indexed else 0x00  # 6.2.3 / 6.2.2
    name_index = _STATIC_NAMES.get(name)
    if name_index is not None:
        return _integer(name_index, 4, first) + _string(value)
    return bytes((first,)) + _string(name) + _string(value)


class LiteralEncoder:
    """What h2 asks of an encoder (C{encode}, C{header_table_size}), never indexing."""

    def __init__(self) -> None:
        self._size_update_due = True
        self._table_size = 4096
        self._cache: dict[tuple[bytes, bytes], bytes] = {}

    @property
    def header_table_size(self) -> int:
        return self._table_size

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        # The peer changed its table's limit: say (again) that the table the gateway uses is 0.
        self._table_size = value
        self._size_update_due = True

    def encode(self, headers: Iterable[tuple[bytes, bytes]], huffman: bool = True) -> bytes:
        cache = self._cache
        parts = []
        if self._size_update_due:
            self._size_update_due = False
            parts.append(b"\x20")  # dynamic table size update to 0 (6.3)
        for field in headers:
            name, value = field[0], field[1]
            if type(field) is NeverIndexedHeaderTuple:
                parts.append(encode_field(name, value, never_indexed=True))
                continue
            encoded = cache.get((name, value))
            if encoded is None:
                encoded = encode_field(name, value)
                if len(name) + len(value) <= _CACHE_FIELD_LIMIT and name not in _UNCACHED:
                    if len(cache) >= _CACHE_LIMIT:
                        cache.clear()
                    cache[(name, value)] = encoded
            parts.append(encoded)
        return b"".join(parts)


__all__ = ["LiteralEncoder", "encode_field"]
