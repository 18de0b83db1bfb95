"""
A sans-IO reader of a QUIC client's first flight: its Initial packets, up to the ClientHello.

The gateway never terminates QUIC.  It only removes the Initial packets' protection, which
anyone can (the keys come from the client's destination connection ID and a published salt,
RFC 9001 5.2; QUIC v2's salt and labels are RFC 9369's), reassembles the CRYPTO frames into the
TLS ClientHello, which may span several Initial packets and datagrams, and hands it to the
same ClientHello parser the TLS port uses.  Everything else is relayed as the client sent it.

Every primitive comes from ``cryptography``: HKDF (HMAC-SHA256 for the extract step),
AES-128-GCM, and AES-ECB on one block for the header-protection mask (RFC 9001 5.4.3).

L{InitialReader.feed} takes one datagram and returns a L{ClientHello}, L{NEED_MORE} or a
L{HelloError}, or raises L{QuicDrop}: the only exception it raises on any input (the property
tests in tests/test_fuzz.py feed it arbitrary bytes).
"""

from __future__ import annotations

import os
import re

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from twisted_gateway import clienthello as ch
from twisted_gateway.clienthello import NEED_MORE, ClientHello, HelloError, NeedMore

QUIC_V1 = 0x00000001
QUIC_V2 = 0x6B3343CF
SUPPORTED_VERSIONS = (QUIC_V1, QUIC_V2)

MIN_INITIAL_DATAGRAM = 1200
"""RFC 9000 14.1: a client's datagram carrying an Initial packet is at least this long; a
server discards smaller ones."""

MAX_CID_LENGTH = 20
"""RFC 9000 17.2: connection IDs of versions 1 and 2 are at most 20 bytes."""

MIN_CLIENT_DCID = 8
"""RFC 9000 7.2: a client's first Initial names a destination connection ID of 8 bytes or more."""


@attrs.frozen
class _Version:
    salt: bytes
    key_label: bytes
    iv_label: bytes
    hp_label: bytes
    types: tuple[str, str, str, str]
    """Long-header packet types by their two type bits."""


_VERSIONS = {
    # RFC 9001 5.2
    QUIC_V1: _Version(bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a"),
                      b"quic key", b"quic iv", b"quic hp",
                      ("initial", "0rtt", "handshake", "retry")),
    # RFC 9369 3.3.1-3.3.2 (salt, labels) and 3.2 (the packet types are rotated)
    QUIC_V2: _Version(bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9"),
                      b"quicv2 key", b"quicv2 iv", b"quicv2 hp",
                      ("retry", "initial", "0rtt", "handshake")),
}


class QuicDrop(Exception):
    """The datagram is not one the gateway can route; C{reason} is a metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# -- keys ---------------------------------------------------------------------------------------

@attrs.frozen
class InitialKeys:
    key: bytes
    iv: bytes
    hp: bytes


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    """RFC 5869 2.2: HKDF-Extract is HMAC-Hash(salt, IKM)."""
    mac = hmac.HMAC(salt, hashes.SHA256())
    mac.update(ikm)
    return mac.finalize()


def hkdf_expand_label(secret: bytes, label: bytes, length: int) -> bytes:
    """RFC 8446 7.1 HKDF-Expand-Label with an empty context, as RFC 9001 5.1 uses it."""
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + b"\x00"
    return HKDFExpand(hashes.SHA256(), length, info).derive(secret)


def client_initial_secret(dcid: bytes, version: int) -> bytes:
    v = _VERSIONS[version]
    return hkdf_expand_label(hkdf_extract(v.salt, dcid), b"client in", 32)


def initial_keys(dcid: bytes, version: int) -> InitialKeys:
    """The client's Initial packet protection keys for the destination connection ID C{dcid}."""
    v = _VERSIONS[version]
    secret = client_initial_secret(dcid, version)
    return InitialKeys(hkdf_expand_label(secret, v.key_label, 16),
                       hkdf_expand_label(secret, v.iv_label, 12),
                       hkdf_expand_label(secret, v.hp_label, 16))


def header_protection_mask(hp: bytes, sample: bytes) -> bytes:
    """RFC 9001 5.4.3: AES-ECB of the 16-byte sample under the hp key; the first 5 bytes."""
    encryptor = Cipher(algorithms.AES(hp), modes.ECB()).encryptor()
    return (encryptor.update(sample) + encryptor.finalize())[:5]


# -- headers ------------------------------------------------------------------------------------

def read_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """RFC 9000 16: a variable-length integer at C{pos}; (value, position after it)."""
    if pos >= end:
        raise QuicDrop("truncated", "a variable-length integer runs past the packet")
    first = data[pos]
    size = 1 << (first >> 6)
    if pos + size > end:
        raise QuicDrop("truncated", "a variable-length integer runs past the packet")
    value = first & 0x3F
    for i in range(1, size):
        value = (value << 8) | data[pos + i]
    return value, pos + size


@attrs.frozen
class LongHeader:
    """One long-header packet of a datagram (RFC 9000 17.2)."""

    start: int
    """Where the packet starts in its datagram."""
    first: int
    version: int
    dcid: bytes
    scid: bytes
    packet_type: str
    """initial, 0rtt, handshake, retry, or version_negotiation (version 0)."""
    pn_offset: int
    """Where the (protected) packet number starts: initial, 0rtt and handshake packets."""
    end: int
    """Where the packet ends (the next coalesced packet starts there)."""


def parse_long_header(data: bytes, pos: int = 0) -> LongHeader:
    """The long header at C{pos}; raise L{QuicDrop} if there is none or it is cut short."""
    end = len(data)
    if pos + 7 > end:
        raise QuicDrop("truncated", "shorter than a long header")
    first = data[pos]
    if not first & 0x80:
        raise QuicDrop("not_initial", "a short-header packet")
    version = int.from_bytes(data[pos + 1:pos + 5], "big")
    dcid_len = data[pos + 5]
    p = pos + 6
    if version != 0 and dcid_len > MAX_CID_LENGTH:
        raise QuicDrop("not_quic", f"destination connection ID of {dcid_len} bytes")
    if p + dcid_len + 1 > end:
        raise QuicDrop("truncated", "connection IDs run past the datagram")
    dcid = data[p:p + dcid_len]
    p += dcid_len
    scid_len = data[p]
    p += 1
    if version != 0 and scid_len > MAX_CID_LENGTH:
        raise QuicDrop("not_quic", f"source connection ID of {scid_len} bytes")
    if p + scid_len > end:
        raise QuicDrop("truncated", "connection IDs run past the datagram")
    scid = data[p:p + scid_len]
    p += scid_len
    if version == 0:
        return LongHeader(pos, first, 0, dcid, scid, "version_negotiation", p, end)
    known = _VERSIONS.get(version)
    if known is None:
        # Only the invariants (RFC 8999) are known of other versions: no length to skip by.
        return LongHeader(pos, first, version, dcid, scid, "unknown", p, end)
    if not first & 0x40:
        raise QuicDrop("not_quic", "the fixed bit is clear")
    packet_type = known.types[(first >> 4) & 0x03]
    if packet_type == "retry":
        return LongHeader(pos, first, version, dcid, scid, packet_type, p, end)
    if packet_type == "initial":
        token_len, p = read_varint(data, p, end)
        if p + token_len > end:
            raise QuicDrop("truncated", "the token runs past the datagram")
        p += token_len
    length, p = read_varint(data, p, end)
    if p + length > end:
        raise QuicDrop("truncated", f"a packet of {length} bytes in {end - p} left of the datagram")
    return LongHeader(pos, first, version, dcid, scid, packet_type, p, p + length)


def long_header_packets(data: bytes) -> list[LongHeader]:
    """The coalesced long-header packets of a datagram, in order (a short-header packet, which
    can only come last, ends the list, and so do a Retry, Version Negotiation or unknown-version
    packet, which have no length)."""
    out: list[LongHeader] = []
    pos = 0
    while pos < len(data) and data[pos] & 0x80:
        header = parse_long_header(data, pos)
        out.append(header)
        if header.packet_type in ("retry", "version_negotiation", "unknown"):
            break
        pos = header.end
    return out


def server_connection_ids(data: bytes) -> list[bytes]:
    """The source connection IDs of a server's long-header packets in a datagram: the IDs the
    client will put in its later packets (a Retry's too).  [] for short headers or garbage."""
    try:
        return [h.scid for h in long_header_packets(data)
                if h.packet_type not in ("version_negotiation", "unknown") and h.scid]
    except QuicDrop:
        return []


def version_negotiation(header: LongHeader, versions: tuple[int, ...] = SUPPORTED_VERSIONS) -> bytes:
    """RFC 9000 17.2.1: the Version Negotiation packet answering C{header}'s client (its
    source connection ID as destination and the other way round)."""
    first = 0x80 | (os.urandom(1)[0] & 0x7F)
    return (bytes([first]) + b"\x00\x00\x00\x00" + bytes([len(header.scid)]) + header.scid
            + bytes([len(header.dcid)]) + header.dcid
            + b"".join(v.to_bytes(4, "big") for v in versions))


# -- packets ------------------------------------------------------------------------------------

def decode_packet_number(truncated: int, pn_nbits: int, largest: int) -> int:
    """RFC 9000 A.3."""
    expected = largest + 1
    win = 1 << pn_nbits
    hwin = win // 2
    mask = win - 1
    candidate = (expected & ~mask) | truncated
    if candidate <= expected - hwin and candidate < (1 << 62) - win:
        return candidate + win
    if candidate > expected + hwin and candidate >= win:
        return candidate - win
    return candidate


def decrypt_packet(data: bytes, header: LongHeader, keys: InitialKeys,
                   largest_pn: int = -1) -> tuple[int, bytes]:
    """Remove the header protection of the packet C{header} heads and decrypt its payload:
    (packet number, plaintext).  Raise L{QuicDrop} if it does not authenticate."""
    start, pn_offset = header.start, header.pn_offset
    sample_at = pn_offset + 4
    if sample_at + 16 > header.end:
        raise QuicDrop("truncated", "too short for a header protection sample")
    mask = header_protection_mask(keys.hp, data[sample_at:sample_at + 16])
    first = data[start] ^ (mask[0] & 0x0F)
    pn_len = (first & 0x03) + 1
    truncated = 0
    pn_bytes = bytearray(data[pn_offset:pn_offset + pn_len])
    for i in range(pn_len):
        pn_bytes[i] ^= mask[1 + i]
        truncated = (truncated << 8) | pn_bytes[i]
    pn = decode_packet_number(truncated, pn_len * 8, largest_pn)
    aad = bytes([first]) + data[start + 1:pn_offset] + bytes(pn_bytes)
    nonce = (int.from_bytes(keys.iv, "big") ^ pn).to_bytes(12, "big")
    try:
        plaintext = AESGCM(keys.key).decrypt(nonce, data[pn_offset + pn_len:header.end], aad)
    except InvalidTag:
        raise QuicDrop("decrypt_failed", "the Initial packet does not authenticate") from None
    return pn, plaintext


_NOT_PADDING = re.compile(rb"[^\x00]")


def crypto_frames(payload: bytes) -> list[tuple[int, bytes]]:
    """The CRYPTO frames of an Initial packet's plaintext, (offset, data) each.  Only the frames
    RFC 9000 12.4 allows in Initial packets may appear."""
    out: list[tuple[int, bytes]] = []
    pos, end = 0, len(payload)
    if end == 0:
        raise QuicDrop("bad_frames", "an Initial packet without frames")
    while pos < end:
        frame_type = payload[pos]
        if frame_type == 0x00:  # PADDING: skip the run at once
            found = _NOT_PADDING.search(payload, pos)
            pos = found.start() if found else end
            continue
        pos += 1
        if frame_type == 0x01:  # PING
            continue
        if frame_type in (0x02, 0x03):  # ACK
            _, pos = read_varint(payload, pos, end)  # largest acknowledged
            _, pos = read_varint(payload, pos, end)  # delay
            ranges, pos = read_varint(payload, pos, end)
            _, pos = read_varint(payload, pos, end)  # first range
            if ranges > end:
                raise QuicDrop("bad_frames", "more ACK ranges than bytes")
            for _ in range(2 * ranges + (3 if frame_type == 0x03 else 0)):
                _, pos = read_varint(payload, pos, end)
        elif frame_type == 0x06:  # CRYPTO
            offset, pos = read_varint(payload, pos, end)
            length, pos = read_varint(payload, pos, end)
            if pos + length > end:
                raise QuicDrop("bad_frames", "a CRYPTO frame runs past the packet")
            out.append((offset, payload[pos:pos + length]))
            pos += length
        elif frame_type == 0x1C:  # CONNECTION_CLOSE
            _, pos = read_varint(payload, pos, end)
            _, pos = read_varint(payload, pos, end)
            reason, pos = read_varint(payload, pos, end)
            if pos + reason > end:
                raise QuicDrop("bad_frames", "a CONNECTION_CLOSE reason runs past the packet")
            pos += reason
        else:
            raise QuicDrop("bad_frames", f"frame type 0x{frame_type:02x} in an Initial packet")
    return out


# -- the first flight ---------------------------------------------------------------------------

class InitialReader:
    """
    The client Initial packets of one new flow, fed datagram by datagram, until their CRYPTO
    frames hold a whole ClientHello.

    The first Initial fixes the version and the original destination connection ID (the key
    for every Initial until the server answers); the CRYPTO stream is kept by offset, so
    packets may arrive out of order or twice, and at most C{max_hello_bytes} of it are kept.
    Bytes received twice must be the same bytes (else L{QuicDrop} C{conflicting_crypto}).
    """

    def __init__(self, max_hello_bytes: int = ch.DEFAULT_MAX_HELLO_BYTES) -> None:
        self.max_hello_bytes = max_hello_bytes
        self.version: int | None = None
        self.dcid: bytes | None = None
        self.scid: bytes | None = None
        self._keys: InitialKeys | None = None
        self._largest_pn = -1
        self._stream = bytearray()
        """The CRYPTO stream from offset 0 to the highest byte received."""
        self._known = bytearray()
        """0xFF for each byte of C{_stream} received, 0x00 for a gap."""
        self._stored = 0

    def first_header(self, datagram: bytes) -> LongHeader:
        """The datagram's first packet header, checked to be a client Initial of a supported
        version in a datagram of the minimum size; raise L{QuicDrop} if it is not."""
        header = parse_long_header(datagram, 0)
        if header.packet_type == "unknown":
            raise QuicDrop("unsupported_version", f"version 0x{header.version:08x}")
        if header.packet_type != "initial":
            raise QuicDrop("not_initial", f"a {header.packet_type} packet opens the flow")
        if len(datagram) < MIN_INITIAL_DATAGRAM:
            raise QuicDrop("undersized_initial", f"an Initial in a datagram of {len(datagram)} bytes")
        if len(header.dcid) < MIN_CLIENT_DCID:
            # RFC 9000 7.2; and a short ID would find this flow for other clients' datagrams.
            raise QuicDrop("not_quic", f"a first Initial with a connection ID of {len(header.dcid)} bytes")
        return header

    def feed(self, datagram: bytes) -> ClientHello | HelloError | NeedMore:
        if self.version is None:
            first = self.first_header(datagram)
            self.version, self.dcid, self.scid = first.version, first.dcid, first.scid
            self._keys = initial_keys(first.dcid, first.version)
        assert self._keys is not None
        initials = 0
        for header in long_header_packets(datagram):
            if header.packet_type != "initial":
                continue  # 0-RTT or Handshake coalesced after it: relayed, never read
            if header.version != self.version or header.dcid != self.dcid:
                raise QuicDrop("not_initial", "an Initial of another connection")
            pn, plaintext = decrypt_packet(datagram, header, self._keys, self._largest_pn)
            self._largest_pn = max(self._largest_pn, pn)
            initials += 1
            for offset, data in crypto_frames(plaintext):
                self._add(offset, data)
        if not initials:
            raise QuicDrop("not_initial", "no Initial packet in the datagram")
        return self._hello()

    def _add(self, offset: int, data: bytes) -> None:
        if not data:
            return
        end = offset + len(data)
        if end > self.max_hello_bytes + 4:
            raise QuicDrop("oversized_client_hello",
                           f"CRYPTO data up to byte {end} exceeds {self.max_hello_bytes}")
        self._stored += len(data)
        if self._stored > 4 * (self.max_hello_bytes + 4):
            raise QuicDrop("oversized_client_hello", "too much CRYPTO data retransmitted")
        if end > len(self._stream):
            grow = end - len(self._stream)
            self._stream += bytes(grow)
            self._known += bytes(grow)
        # RFC 9000 2.2: data at an offset must not change when it is sent again.  A client whose
        # retransmission says something else (a second server name over the first) is refused:
        # the gateway would route by one ClientHello while the shard may read the other.
        known = self._known[offset:end]
        if known.count(0) != len(known):
            have = int.from_bytes(self._stream[offset:end], "big")
            if (have ^ int.from_bytes(data, "big")) & int.from_bytes(known, "big"):
                raise QuicDrop("conflicting_crypto",
                               f"CRYPTO data at {offset}-{end} differs from what was received before")
        self._stream[offset:end] = data
        self._known[offset:end] = b"\xff" * len(data)

    def _contiguous(self) -> bytes:
        gap = self._known.find(0)
        return bytes(self._stream if gap < 0 else self._stream[:gap])

    def _hello(self) -> ClientHello | HelloError | NeedMore:
        stream = self._contiguous()
        if len(stream) < 4:
            return NEED_MORE
        if stream[0] != ch.HANDSHAKE_CLIENT_HELLO:
            return HelloError("malformed_client_hello", f"handshake type {stream[0]} is not ClientHello")
        length = int.from_bytes(stream[1:4], "big")
        if length + 4 > self.max_hello_bytes:
            return HelloError("oversized_client_hello",
                              f"ClientHello of {length} bytes exceeds {self.max_hello_bytes}")
        if len(stream) < length + 4:
            return NEED_MORE
        message = stream[:length + 4]
        # The handshake message framed as TLS records, so that the TLS port's parser (and its
        # bounds and errors) reads it as it reads any ClientHello.
        records = b"".join(
            b"\x16\x03\x01" + len(chunk).to_bytes(2, "big") + chunk
            for chunk in (message[i:i + ch.MAX_RECORD_PAYLOAD]
                          for i in range(0, len(message), ch.MAX_RECORD_PAYLOAD)))
        return ch.ClientHelloReader(self.max_hello_bytes + 5).feed(records)


__all__ = ["InitialKeys", "InitialReader", "LongHeader", "MIN_INITIAL_DATAGRAM", "QUIC_V1", "QUIC_V2",
           "QuicDrop", "SUPPORTED_VERSIONS", "crypto_frames", "decrypt_packet", "header_protection_mask",
           "initial_keys", "long_header_packets", "parse_long_header", "server_connection_ids",
           "version_negotiation"]
