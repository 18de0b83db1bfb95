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


def test_a_first_initial_with_a_short_connection_id_is_dropped():
    # RFC 9000 7.2: at least 8 bytes.  A 1-byte ID would also be looked up for every other
    # client's short-header datagram from a new address (a byte of theirs would match it).
    good, _ = hellos()
    with pytest.raises(quic.QuicDrop) as caught:
        quic.InitialReader().feed(initial(b"\x07", crypto_frame(0, good)))
    assert caught.value.reason == "not_quic"


# -- the door in the real gateway, with a plain UDP socket as the shard ---------------------------

SERVER_CID = bytes.fromhex("5e5e5e5e5e5e5e5e")


def server_initial(client_cid: bytes, payload_size: int = 900) -> bytes:
    """What a shard's Initial looks like to the gateway (it never decrypts it): a long header
    carrying the shard's own connection ID."""
    payload = os.urandom(payload_size)
    return (bytes([0xC0]) + quic.QUIC_V1.to_bytes(4, "big") + bytes([len(client_cid)]) + client_cid
            + bytes([len(SERVER_CID)]) + SERVER_CID + b"\x00" + varint(len(payload)) + payload)


def short_packet(cid: bytes = SERVER_CID, size: int = 60) -> bytes:
    return bytes([0x40]) + cid + os.urandom(size)


class FakeShard:
    """A UDP socket as the shard's QUIC port: what it received and from which gateway socket."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(5)
        self.port = self.sock.getsockname()[1]

    def recv(self) -> tuple[bytes, tuple[str, int]]:
        return self.sock.recvfrom(65536)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def fake_shard():
    s = FakeShard()
    yield s
    s.close()


def udp_socket(timeout: float = 5) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(timeout)
    return s


def drain(s: socket.socket, quiet: float = 0.3) -> list[bytes]:
    """Every datagram waiting on C{s}, until none came for C{quiet} seconds."""
    out = []
    s.settimeout(quiet)
    try:
        for _ in range(10000):  # bounded
            out.append(s.recv(65536))
    except socket.timeout:
        pass
    return out


def quic_gateway(start_gateway, fake_shard, **quic_settings):
    from test_quic_e2e import udp_port
    gw = start_gateway(shards=[shard("s-app", "app", 443, fake_shard.port, protocol="quic")],
                       config={"quic": quic_settings} if quic_settings else None)
    return gw, udp_port(gw)


def open_flow(port: int, fake_shard: FakeShard, client: socket.socket,
              validate: bool = True) -> tuple[str, int]:
    """A flow of C{client} through the gateway to the fake shard (its Initial routed by SNI,
    the shard's Initial back, and with C{validate} a short-header datagram naming the shard's
    connection ID); the gateway socket the shard sees for it."""
    good, _ = hellos()
    client.sendto(initial(DCID, crypto_frame(0, good)), ("127.0.0.1", port))
    first, upstream = fake_shard.recv()
    assert quic.parse_long_header(first).dcid == DCID
    fake_shard.sock.sendto(server_initial(b"\x11" * 8), upstream)
    assert quic.parse_long_header(client.recv(65536)).scid == SERVER_CID
    if validate:
        client.sendto(short_packet(), ("127.0.0.1", port))
        _, again = fake_shard.recv()
        assert again == upstream
    return upstream


def test_a_shard_flooding_an_address_that_never_answered_is_held_to_three_times(start_gateway, fake_shard):
    gw, port = quic_gateway(start_gateway, fake_shard)
    victim = udp_socket()
    try:
        upstream = open_flow(port, fake_shard, victim, validate=False)
        # One 1200-byte Initial "from the victim" (spoofed, as far as the gateway can tell):
        # the shard answers with 60 datagrams of 1 kB.
        for _ in range(60):
            fake_shard.sock.sendto(short_packet(size=1000), upstream)
        received = drain(victim)
        total = sum(map(len, received)) + len(server_initial(b"\x11" * 8))
        assert total <= 3 * quic.MIN_INITIAL_DATAGRAM, f"{total} bytes for one Initial of 1200"
        assert gw.metric("gateway_udp_dropped_total", listener="quic", reason="amplification_limit") >= 55
        # The client names the shard's connection ID: it reads the answers; no limit now.
        victim.sendto(short_packet(), ("127.0.0.1", port))
        assert fake_shard.recv()[1] == upstream
        for _ in range(20):
            fake_shard.sock.sendto(short_packet(size=1000), upstream)
        assert len(drain(victim)) == 20
    finally:
        victim.close()


def test_a_stranger_who_knows_the_connection_id_does_not_get_the_flows_answers(start_gateway, fake_shard):
    gw, port = quic_gateway(start_gateway, fake_shard)
    client, stranger = udp_socket(), udp_socket()
    try:
        upstream = open_flow(port, fake_shard, client)
        # The stranger (an observer of the client's datagrams) sends one naming the same ID.
        stranger.sendto(short_packet(), ("127.0.0.1", port))
        data, seen_from = fake_shard.recv()
        assert data.startswith(b"\x40" + SERVER_CID)
        # The shard sees it on another socket of the gateway: a new address, which a QUIC
        # server validates (PATH_CHALLENGE) before it moves the connection.  Before the fix the
        # gateway moved the flow to the stranger, who then got every answer.
        assert seen_from != upstream
        fake_shard.sock.sendto(short_packet(size=100), upstream)
        assert len(client.recv(65536)) == 1 + 8 + 100
        assert drain(stranger) == []
        # A path of its own gets the shard's answers on it (the shard's path validation).
        fake_shard.sock.sendto(short_packet(size=40), seen_from)
        assert len(stranger.recv(65536)) == 1 + 8 + 40
        assert drain(client) == []
        # And a flow has a few paths at most, however many strangers.
        others = [udp_socket() for _ in range(6)]
        try:
            for s in others:
                s.sendto(short_packet(), ("127.0.0.1", port))
            wait_for(lambda: gw.metric("gateway_udp_dropped_total", listener="quic",
                                       reason="too_many_paths") >= 4, 10, what="paths bounded")
        finally:
            for s in others:
                s.close()
    finally:
        client.close()
        stranger.close()


def test_a_flood_of_spoofed_initials_does_not_evict_an_established_flow(start_gateway, fake_shard):
    gw, port = quic_gateway(start_gateway, fake_shard, max_flows=3)
    client = udp_socket()
    flood = [udp_socket() for _ in range(10)]
    try:
        upstream = open_flow(port, fake_shard, client)
        good, _ = hellos()
        for i, s in enumerate(flood):
            s.sendto(initial(bytes([0x20 + i]) * 8, crypto_frame(0, good)), ("127.0.0.1", port))
            fake_shard.recv()
        wait_for(lambda: gw.metric("gateway_udp_sessions_closed_total", protocol="quic",
                                   reason="evicted") >= 8, 10, what="evictions")
        # The established flow is still there, on the same upstream socket.
        client.sendto(short_packet(), ("127.0.0.1", port))
        assert fake_shard.recv()[1] == upstream
        fake_shard.sock.sendto(short_packet(size=10), upstream)
        assert len(client.recv(65536)) == 1 + 8 + 10
    finally:
        client.close()
        for s in flood:
            s.close()


def test_the_pending_table_bound_holds_against_many_half_hellos(start_gateway, fake_shard):
    gw, port = quic_gateway(start_gateway, fake_shard, max_pending=5)
    good, _ = hellos()
    sockets = [udp_socket() for _ in range(20)]
    try:
        for i, s in enumerate(sockets):  # each sends half a ClientHello and never the rest
            s.sendto(initial(bytes([0x40 + i]) * 8, crypto_frame(0, good[:100])), ("127.0.0.1", port))
        wait_for(lambda: gw.metric("gateway_udp_dropped_total", listener="quic", reason="pending_full") == 15,
                 10, what="pending_full counted")
        assert gw.metric("gateway_quic_pending_flows") == 5
        wait_for(lambda: gw.metric("gateway_quic_pending_flows") == 0, 15, what="pending timed out")
        assert gw.metric("gateway_udp_dropped_total", listener="quic", reason="pending_timeout") == 5
    finally:
        for s in sockets:
            s.close()
