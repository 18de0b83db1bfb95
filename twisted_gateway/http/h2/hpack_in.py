"""
Huffman decoding of HPACK strings (RFC 7541 5.2) remembered per encoded string.

The hpack library decodes Huffman-coded strings in Python, nibble by nibble, for every field of
every block: a shard that does not index its responses (nginx sends ``date``, ``etag``,
``last-modified`` as literals each time) had each value decoded anew, ~5 % of the CPU of an h2
request to an h2 shard.  Decoding is a pure function of the bytes, so a bounded dictionary from
coded to decoded strings gives the same answers; malformed strings are never remembered (they
raise as before), and a peer that sends only new strings costs one dictionary miss each.
"""

from __future__ import annotations

from typing import Any

import hpack.hpack
import hpack.huffman_table

_LIMIT = 4096
"""Strings remembered; the dictionary starts again when full."""
_LONGEST = 128
"""Longer coded strings are decoded each time (they are rarely repeated)."""

_plain = hpack.huffman_table.decode_huffman
_decoded: dict[bytes, bytes] = {}


def decode_huffman(coded: Any) -> bytes:
    """hpack's C{decode_huffman}, remembered."""
    if not coded or len(coded) > _LONGEST:
        return _plain(coded)
    key = bytes(coded)
    value = _decoded.get(key)
    if value is None:
        value = _plain(key)
        if len(_decoded) >= _LIMIT:
            _decoded.clear()
        _decoded[key] = value
    return value


def install() -> bool:
    """Have hpack's decoder use L{decode_huffman}; False (nothing changed) if this hpack does
    not decode through the function this module knows."""
    if getattr(hpack.hpack, "decode_huffman", None) is _plain:
        hpack.hpack.decode_huffman = decode_huffman  # type: ignore[assignment]
        return True
    return getattr(hpack.hpack, "decode_huffman", None) is decode_huffman


__all__ = ["decode_huffman", "install"]
