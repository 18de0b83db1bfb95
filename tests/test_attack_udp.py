"""
The datagram door attacked: QUIC Initial packets built here byte by byte (CRYPTO frames that
contradict each other, lengths that lie), a spoofed flood against established flows, a shard
that floods a client address that never proved it is there, and a stranger who knows a flow's
connection ID.  The reader is driven in memory; the door runs in the real gateway with plain
UDP sockets as the client, the attacker and the shard (so the test sees exactly what the shard
received, and from which of the gateway's sockets).
"""

from __future__ import annotations

import os
import socket
import ssl

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from support import shard, wait_for

from twisted_gateway.clienthello import NEED_MORE, ClientHello
from twisted_gateway.udp import quic


# -- building Initial packets ---------------------------------------------------------------------

def varint(value: int) -> bytes:
    if value < 0x40:
        return bytes([value])
    if value < 0x4000:
        return (0x4000 | value).to_bytes(2, "big")
    if value < 0x40000000:
        return (0x80000000 | value).to_bytes(4, "big")
    return (0xC000000000000000 | value).to_bytes(8, "big")


def crypto_frame(offset: int, data: bytes) -> bytes:
    return b"\x06" + varint(offset) + varint(len(data)) + data


def initial(dcid: bytes, frames: bytes, pn: int = 0, scid: bytes = b"\x11" * 8,
            size: int = quic.MIN_INITIAL_DATAGRAM) -> bytes:
    """A client Initial of QUIC v1 holding C{frames}, padded to C{size}, protected as a client
    protects it (RFC 9001 5)."""
    keys = quic.initial_keys(dcid, quic.QUIC_V1)
    start = (bytes([0xC3]) + quic.QUIC_V1.to_bytes(4, "big") + bytes([len(dcid)]) + dcid
             + bytes([len(scid)]) + scid + b"\x00")  # no token
    overhead = len(start) + 2 + 4 + 16
    plaintext = frames + bytes(max(0, size - overhead - len(frames)))
    header = start + (0x4000 | (4 + len(plaintext) + 16)).to_bytes(2, "big") + pn.to_bytes(4, "big")
    nonce = (int.from_bytes(keys.iv, "big") ^ pn).to_bytes(12, "big")
    sealed = AESGCM(keys.key).encrypt(nonce, plaintext, header)
    mask = quic.header_protection_mask(keys.hp, sealed[:16])
    out = bytearray(header + sealed)
    out[0] ^= mask[0] & 0x0F
    for i in range(4):
        out[len(header) - 4 + i] ^= mask[1 + i]
    return bytes(out)


def client_hello(server_name: str) -> bytes:
    """A real ClientHello handshake message for C{server_name} (aioquic's), out of its first
    Initial packet."""
    pytest.importorskip("aioquic")
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection
    configuration = QuicConfiguration(is_client=True, alpn_protocols=["h3"], server_name=server_name)
    configuration.verify_mode = ssl.CERT_NONE
    connection = QuicConnection(configuration=configuration)
    connection.connect(("127.0.0.1", 443), now=0.0)
    datagram = connection.datagrams_to_send(now=0.0)[0][0]
    header = quic.parse_long_header(datagram)
    _, plaintext = quic.decrypt_packet(datagram, header, quic.initial_keys(header.dcid, header.version))
    stream = bytearray()
    for offset, data in sorted(quic.crypto_frames(plaintext)):
        assert offset == len(stream)
        stream += data
    return bytes(stream)


DCID = bytes.fromhex("0102030405060708")
GOOD = "app-443.localhost"
EVIL = "evl-443.localhost"  # as long as GOOD: the same message but for the name


def hellos() -> tuple[bytes, bytes]:
    good = client_hello(GOOD)
    evil = good.replace(GOOD.encode(), EVIL.encode())
    assert evil != good and len(evil) == len(good)
    return good, evil


# -- the reader: CRYPTO data that contradicts itself ----------------------------------------------

def test_a_longer_retransmission_at_the_same_offset_cannot_change_the_name():
    good, evil = hellos()
    cut = good.index(GOOD.encode()) + len(GOOD) + 4  # the first packet holds the whole name
    reader = quic.InitialReader()
    assert reader.feed(initial(DCID, crypto_frame(0, good[:cut]), pn=0)) is NEED_MORE
    # Before the fix the longer chunk replaced the first one and the flow was routed by EVIL,
    # while a server that keeps the first bytes it saw reads GOOD.
    with pytest.raises(quic.QuicDrop) as caught:
        reader.feed(initial(DCID, crypto_frame(0, evil), pn=1))
    assert caught.value.reason == "conflicting_crypto"


def test_an_overlapping_frame_at_another_offset_cannot_change_the_name():
    good, evil = hellos()
    at = good.index(GOOD.encode())
    reader = quic.InitialReader()
    assert reader.feed(initial(DCID, crypto_frame(at, good[at:]), pn=0)) is NEED_MORE
    with pytest.raises(quic.QuicDrop) as caught:
        reader.feed(initial(DCID, crypto_frame(0, evil[:at + 2]), pn=1))
    assert caught.value.reason == "conflicting_crypto"


def test_true_retransmissions_and_overlaps_still_assemble():
    good, _ = hellos()
    reader = quic.InitialReader()
    assert reader.feed(initial(DCID, crypto_frame(100, good[100:]), pn=0)) is NEED_MORE
    assert reader.feed(initial(DCID, crypto_frame(50, good[50:150]), pn=1)) is NEED_MORE
    assert reader.feed(initial(DCID, crypto_frame(50, good[50:150]), pn=2)) is NEED_MORE
    hello = reader.feed(initial(DCID, crypto_frame(0, good[:120]), pn=3))
    assert isinstance(hello, ClientHello) and hello.server_name == GOOD


def test_one_byte_frames_far_apart_cost_little():
    # 1-byte CRYPTO frames all over the allowed range: bounded in memory and time.
    reader = quic.InitialReader()
    frames = b"".join(crypto_frame(offset, b"x") for offset in range(1, 32768, 97))
    assert len(frames) < 3900
    for pn in range(8):
        try:
            assert reader.feed(initial(DCID, frames, pn=pn, size=4000)) is NEED_MORE
        except quic.QuicDrop as e:
            assert e.reason == "oversized_client_hello"
            break


@pytest.mark.parametrize("frames,reason", [
    (b"\x06" + varint(0) + varint(5000) + b"abc", "bad_frames"),  # longer than the packet
    (b"\x06" + b"\xff" * 8 + varint(3) + b"abc", "oversized_client_hello"),  # offset 2**62 - 1
    (b"\x02" + varint(1) + varint(0) + b"\xbf\xff\xff\xff" + varint(0), "bad_frames"),  # 1e9 ACK ranges
])
def test_frames_whose_lengths_lie_are_dropped(frames, reason):
    with pytest.raises(quic.QuicDrop) as caught:
        quic.InitialReader().feed(initial(DCID, frames))
    assert caught.value.reason == reason


def test_a_packet_length_past_the_datagram_is_dropped():
    datagram = bytearray(initial(DCID, crypto_frame(0, b"\x01\x00\x00\x10")))
    at = 1 + 4 + 1 + len(DCID) + 1 + 8 + 1  # the Length field
    datagram[at:at + 2] = (0x4000 | 4000).to_bytes(2, "big")
    with pytest.raises(quic.QuicDrop) as caught:
        quic.InitialReader().feed(bytes(datagram))
    assert caught.value.reason == "truncated"
