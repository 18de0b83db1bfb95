"""
Huffman decoding of HPACK strings (RFC 7541 5.2) remembered per connection.

The hpack library decodes Huffman-coded strings in Python, nibble by nibble, for every field of
every block: a peer that does not index its fields (nginx sends ``date``, ``etag``,
``last-modified`` as Huffman literals in every response) had each value decoded anew, ~10 % of
the CPU of an h2 request to an h2 shard.  Decoding is a pure function of the bytes, so a small
dictionary from coded to decoded strings gives the same answers.  It is one connection's own
(L{HuffmanCache}, made current by the connection around each C{receive_data}: the reactor runs
one at a time): a cache shared by every connection would let one client learn from timing what
another sent, and would keep every client's values, tokens included.  Malformed strings are
never remembered (they raise as before).
"""

from __future__ import annotations

from typing import Any

import hpack.hpack
import hpack.huffman_table

_LIMIT = 64
"""Strings remembered per connection; its cache starts again when full."""
_LONGEST = 64
"""Longer coded strings are decoded each time.  So a connection's cache holds ~16 KiB at most."""

_plain = hpack.huffman_table.decode_huffman


class HuffmanCache:
    """One connection's decoded strings."""

    __slots__ = ("decoded",)

    def __init__(self) -> None:
        self.decoded: dict[bytes, bytes] = {}


current: HuffmanCache | None = None
"""The cache of the connection whose bytes are being decoded; None: decode every string."""


def decode_huffman(coded: Any) -> bytes:
    """hpack's C{decode_huffman}, remembered in the L{current} connection's cache."""
    cache = current
    if cache is None or not coded or len(coded) > _LONGEST:
        return _plain(coded)
    key = bytes(coded)
    decoded = cache.decoded
    value = decoded.get(key)
    if value is None:
        value = _plain(key)
        if len(decoded) >= _LIMIT:
            decoded.clear()
        decoded[key] = value
    return value


def install() -> bool:
    """Have hpack's decoder use L{decode_huffman} (which is hpack's own unless a connection
    made its cache L{current}); False, nothing changed, if this hpack decodes otherwise."""
    if getattr(hpack.hpack, "decode_huffman", None) is _plain:
        hpack.hpack.decode_huffman = decode_huffman  # type: ignore[assignment]
        return True
    return getattr(hpack.hpack, "decode_huffman", None) is decode_huffman


__all__ = ["HuffmanCache", "decode_huffman", "install"]
