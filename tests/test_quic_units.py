"""
The QUIC Initial reader in memory: RFC 9001 Appendix A's and RFC 9369 Appendix A's published
test vectors (keys, header protection, the decrypted client Initial), first flights built by
aioquic's own packet builder (a ClientHello over two Initial packets, out of order, coalesced),
and every reason a datagram is dropped.
"""

from __future__ import annotations

import ssl

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from twisted_gateway.clienthello import NEED_MORE, ClientHello, HelloError
from twisted_gateway.udp import quic

DCID = bytes.fromhex("8394c8f03e515708")

# RFC 9001 Appendix A.2: the client Initial packet, protected, as published.
RFC9001_CLIENT_INITIAL = bytes.fromhex("""
    c000000001088394c8f03e5157080000 449e7b9aec34d1b1c98dd7689fb8ec11
    d242b123dc9bd8bab936b47d92ec356c 0bab7df5976d27cd449f63300099f399
    1c260ec4c60d17b31f8429157bb35a12 82a643a8d2262cad67500cadb8e7378c
    8eb7539ec4d4905fed1bee1fc8aafba1 7c750e2c7ace01e6005f80fcb7df6212
    30c83711b39343fa028cea7f7fb5ff89 eac2308249a02252155e2347b63d58c5
    457afd84d05dfffdb20392844ae81215 4682e9cf012f9021a6f0be17ddd0c208
    4dce25ff9b06cde535d0f920a2db1bf3 62c23e596d11a4f5a6cf3948838a3aec
    4e15daf8500a6ef69ec4e3feb6b1d98e 610ac8b7ec3faf6ad760b7bad1db4ba3
    485e8a94dc250ae3fdb41ed15fb6a8e5 eba0fc3dd60bc8e30c5c4287e53805db
    059ae0648db2f64264ed5e39be2e20d8 2df566da8dd5998ccabdae053060ae6c
    7b4378e846d29f37ed7b4ea9ec5d82e7 961b7f25a9323851f681d582363aa5f8
    9937f5a67258bf63ad6f1a0b1d96dbd4 faddfcefc5266ba6611722395c906556
    be52afe3f565636ad1b17d508b73d874 3eeb524be22b3dcbc2c7468d54119c74
    68449a13d8e3b95811a198f3491de3e7 fe942b330407abf82a4ed7c1b311663a
    c69890f4157015853d91e923037c227a 33cdd5ec281ca3f79c44546b9d90ca00
    f064c99e3dd97911d39fe9c5d0b23a22 9a234cb36186c4819e8b9c5927726632
    291d6a418211cc2962e20fe47feb3edf 330f2c603a9d48c0fcb5699dbfe58964
    25c5bac4aee82e57a85aaf4e2513e4f0 5796b07ba2ee47d80506f8d2c25e50fd
    14de71e6c418559302f939b0e1abd576 f279c4b2e0feb85c1f28ff18f58891ff
    ef132eef2fa09346aee33c28eb130ff2 8f5b766953334113211996d20011a198
    e3fc433f9f2541010ae17c1bf202580f 6047472fb36857fe843b19f5984009dd
    c324044e847a4f4a0ab34f719595de37 252d6235365e9b84392b061085349d73
    203a4a13e96f5432ec0fd4a1ee65accd d5e3904df54c1da510b0ff20dcc0c77f
    cb2c0e0eb605cb0504db87632cf3d8b4 dae6e705769d1de354270123cb11450e
    fc60ac47683d7b8d0f811365565fd98c 4c8eb936bcab8d069fc33bd801b03ade
    a2e1fbc5aa463d08ca19896d2bf59a07 1b851e6c239052172f296bfb5e724047
    90a2181014f3b94a4e97d117b4381303 68cc39dbb2d198065ae3986547926cd2
    162f40a29f0c3c8745c0f50fba3852e5 66d44575c29d39a03f0cda721984b6f4
    40591f355e12d439ff150aab7613499d bd49adabc8676eef023b15b65bfc5ca0
    6948109f23f350db82123535eb8a7433 bdabcb909271a6ecbcb58b936a88cd4e
    8f2e6ff5800175f113253d8fa9ca8885 c2f552e657dc603f252e1a8e308f76f0
    be79e2fb8f5d5fbbe2e30ecadd220723 c8c0aea8078cdfcb3868263ff8f09400
    54da48781893a7e49ad5aff4af300cd8 04a6b6279ab3ff3afb64491c85194aab
    760d58a606654f9f4400e8b38591356f bf6425aca26dc85244259ff2b19c41b9
    f96f3ca9ec1dde434da7d2d392b905dd f3d1f9af93d1af5950bd493f5aa731b4
    056df31bd267b6b90a079831aaf579be 0a39013137aac6d404f518cfd4684064
    7e78bfe706ca4cf5e9c5453e9f7cfd2b 8b4c8d169a44e55c88d4a9a7f9474241
    e221af44860018ab0856972e194cd934
""")
# RFC 9369 Appendix A.2: the same ClientHello in a QUIC v2 Initial.
RFC9369_CLIENT_INITIAL = bytes.fromhex("""
    d76b3343cf088394c8f03e5157080000449ea0c95e82ffe67b6abcdb4298b485
    dd04de806071bf03dceebfa162e75d6c96058bdbfb127cdfcbf903388e99ad04
    9f9a3dd4425ae4d0992cfff18ecf0fdb5a842d09747052f17ac2053d21f57c5d
    250f2c4f0e0202b70785b7946e992e58a59ac52dea6774d4f03b55545243cf1a
    12834e3f249a78d395e0d18f4d766004f1a2674802a747eaa901c3f10cda5500
    cb9122faa9f1df66c392079a1b40f0de1c6054196a11cbea40afb6ef5253cd68
    18f6625efce3b6def6ba7e4b37a40f7732e093daa7d52190935b8da58976ff33
    12ae50b187c1433c0f028edcc4c2838b6a9bfc226ca4b4530e7a4ccee1bfa2a3
    d396ae5a3fb512384b2fdd851f784a65e03f2c4fbe11a53c7777c023462239dd
    6f7521a3f6c7d5dd3ec9b3f233773d4b46d23cc375eb198c63301c21801f6520
    bcfb7966fc49b393f0061d974a2706df8c4a9449f11d7f3d2dcbb90c6b877045
    636e7c0c0fe4eb0f697545460c806910d2c355f1d253bc9d2452aaa549e27a1f
    ac7cf4ed77f322e8fa894b6a83810a34b361901751a6f5eb65a0326e07de7c12
    16ccce2d0193f958bb3850a833f7ae432b65bc5a53975c155aa4bcb4f7b2c4e5
    4df16efaf6ddea94e2c50b4cd1dfe06017e0e9d02900cffe1935e0491d77ffb4
    fdf85290fdd893d577b1131a610ef6a5c32b2ee0293617a37cbb08b847741c3b
    8017c25ca9052ca1079d8b78aebd47876d330a30f6a8c6d61dd1ab5589329de7
    14d19d61370f8149748c72f132f0fc99f34d766c6938597040d8f9e2bb522ff9
    9c63a344d6a2ae8aa8e51b7b90a4a806105fcbca31506c446151adfeceb51b91
    abfe43960977c87471cf9ad4074d30e10d6a7f03c63bd5d4317f68ff325ba3bd
    80bf4dc8b52a0ba031758022eb025cdd770b44d6d6cf0670f4e990b22347a7db
    848265e3e5eb72dfe8299ad7481a408322cac55786e52f633b2fb6b614eaed18
    d703dd84045a274ae8bfa73379661388d6991fe39b0d93debb41700b41f90a15
    c4d526250235ddcd6776fc77bc97e7a417ebcb31600d01e57f32162a8560cacc
    7e27a096d37a1a86952ec71bd89a3e9a30a2a26162984d7740f81193e8238e61
    f6b5b984d4d3dfa033c1bb7e4f0037febf406d91c0dccf32acf423cfa1e70710
    10d3f270121b493ce85054ef58bada42310138fe081adb04e2bd901f2f13458b
    3d6758158197107c14ebb193230cd1157380aa79cae1374a7c1e5bbcb80ee23e
    06ebfde206bfb0fcbc0edc4ebec309661bdd908d532eb0c6adc38b7ca7331dce
    8dfce39ab71e7c32d318d136b6100671a1ae6a6600e3899f31f0eed19e3417d1
    34b90c9058f8632c798d4490da4987307cba922d61c39805d072b589bd52fdf1
    e86215c2d54e6670e07383a27bbffb5addf47d66aa85a0c6f9f32e59d85a44dd
    5d3b22dc2be80919b490437ae4f36a0ae55edf1d0b5cb4e9a3ecabee93dfc6e3
    8d209d0fa6536d27a5d6fbb17641cde27525d61093f1b28072d111b2b4ae5f89
    d5974ee12e5cf7d5da4d6a31123041f33e61407e76cffcdcfd7e19ba58cf4b53
    6f4c4938ae79324dc402894b44faf8afbab35282ab659d13c93f70412e85cb19
    9a37ddec600545473cfb5a05e08d0b209973b2172b4d21fb69745a262ccde96b
    a18b2faa745b6fe189cf772a9f84cbfc
""")


# RFC 9001 A.2 / RFC 9369 A.2: the unprotected header (packet number 2 in four bytes) and the
# start of the payload, a CRYPTO frame of 241 bytes at offset 0.
V1_HEADER = bytes.fromhex("c300000001088394c8f03e5157080000449e00000002")
V2_HEADER = bytes.fromhex("d36b3343cf088394c8f03e5157080000449e00000002")
CRYPTO_FRAME_START = bytes.fromhex("060040f1010000ed0303ebf8fa56f129")


def test_rfc9001_a1_client_initial_keys():
    assert quic.client_initial_secret(DCID, quic.QUIC_V1).hex() == \
        "c00cf151ca5be075ed0ebfb5c80323c42d6b7db67881289af4008f1f6c357aea"
    keys = quic.initial_keys(DCID, quic.QUIC_V1)
    assert keys.key.hex() == "1f369613dd76d5467730efcbe3b1a22d"
    assert keys.iv.hex() == "fa044b2f42a3fd3b46fb255c"
    assert keys.hp.hex() == "9f50449e04a0e810283a1e9933adedd2"


def test_rfc9001_a2_header_protection_mask():
    keys = quic.initial_keys(DCID, quic.QUIC_V1)
    assert quic.header_protection_mask(keys.hp, bytes.fromhex("d1b1c98dd7689fb8ec11d242b123dc9b")).hex() \
        == "437b9aec36"


def test_rfc9369_a1_client_initial_keys():
    assert quic.client_initial_secret(DCID, quic.QUIC_V2).hex() == \
        "14ec9d6eb9fd7af83bf5a668bc17a7e283766aade7ecd0891f70f9ff7f4bf47b"
    keys = quic.initial_keys(DCID, quic.QUIC_V2)
    assert keys.key.hex() == "8b1a0bc121284290a29e0971b5cd045d"
    assert keys.iv.hex() == "91f73e2351d8fa91660e909f"
    assert keys.hp.hex() == "45b95e15235d6f45a6b19cbcb0294ba9"


@pytest.mark.parametrize("packet,version,header", [
    (RFC9001_CLIENT_INITIAL, quic.QUIC_V1, V1_HEADER),
    (RFC9369_CLIENT_INITIAL, quic.QUIC_V2, V2_HEADER),
])
def test_the_published_client_initial_decrypts_to_the_published_packet(packet, version, header):
    assert len(packet) == 1200
    parsed = quic.parse_long_header(packet)
    assert (parsed.version, parsed.dcid, parsed.scid, parsed.packet_type) == (version, DCID, b"", "initial")
    keys = quic.initial_keys(DCID, version)
    pn, plaintext = quic.decrypt_packet(packet, parsed, keys)
    assert pn == 2
    assert len(plaintext) == 1162 and plaintext.startswith(CRYPTO_FRAME_START)
    assert plaintext[245:] == bytes(1162 - 245)  # PADDING
    # Protected again with the same keys, it is the RFC's packet byte for byte.
    nonce = (int.from_bytes(keys.iv, "big") ^ pn).to_bytes(12, "big")
    sealed = AESGCM(keys.key).encrypt(nonce, plaintext, header)
    sample = sealed[:16]  # 4 bytes after the start of the 4-byte packet number
    mask = quic.header_protection_mask(keys.hp, sample)
    protected = bytearray(header + sealed)
    protected[0] ^= mask[0] & 0x0F
    for i in range(4):
        protected[len(header) - 4 + i] ^= mask[1 + i]
    assert bytes(protected) == packet
    hello = quic.InitialReader().feed(packet)
    assert hello == ClientHello(server_name="example.com", alpn=(b"alpn",), versions=(0x0304,))


def aioquic_first_flight(server_name: str, extra_alpn: list[str] | None = None) -> list[bytes]:
    aioquic = pytest.importorskip("aioquic")
    del aioquic
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection
    configuration = QuicConfiguration(is_client=True, alpn_protocols=["h3"] + (extra_alpn or []),
                                      server_name=server_name)
    configuration.verify_mode = ssl.CERT_NONE
    connection = QuicConnection(configuration=configuration)
    connection.connect(("127.0.0.1", 443), now=0.0)
    return [data for data, _ in connection.datagrams_to_send(now=0.0)]


BIG_ALPN = [f"x-protocol-{i}-" + "p" * 200 for i in range(8)]


def test_a_client_hello_over_two_initial_packets_in_order_and_out_of_order():
    flight = aioquic_first_flight("app-443.gw.test", BIG_ALPN)
    assert len(flight) >= 2
    reader = quic.InitialReader()
    for datagram in flight[:-1]:
        assert reader.feed(datagram) is NEED_MORE
    hello = reader.feed(flight[-1])
    assert isinstance(hello, ClientHello) and hello.server_name == "app-443.gw.test"
    assert hello.alpn[0] == b"h3" and len(hello.alpn) == 9
    backwards = quic.InitialReader()
    for datagram in reversed(flight[1:]):
        assert backwards.feed(datagram) is NEED_MORE
    again = backwards.feed(flight[0])
    assert isinstance(again, ClientHello) and again.server_name == "app-443.gw.test"


def test_retransmitted_initials_and_a_coalesced_handshake_packet_are_harmless():
    flight = aioquic_first_flight("app-443.gw.test", BIG_ALPN)
    reader = quic.InitialReader()
    assert reader.feed(flight[0]) is NEED_MORE
    assert reader.feed(flight[0]) is NEED_MORE  # the same datagram twice
    # A Handshake packet coalesced after the Initial is skipped by its length.
    handshake = bytes([0xE0]) + (1).to_bytes(4, "big") + bytes([len(reader.dcid)]) + reader.dcid + b"\x00" + \
        bytes([3]) + b"abc"
    hello = reader.feed(flight[-1] + handshake)
    assert isinstance(hello, ClientHello)


def test_a_client_hello_larger_than_the_bound_is_refused():
    flight = aioquic_first_flight("app-443.gw.test", BIG_ALPN)
    reader = quic.InitialReader(max_hello_bytes=1000)
    with pytest.raises(quic.QuicDrop) as caught:
        for datagram in flight:
            result = reader.feed(datagram)
            if isinstance(result, HelloError):
                raise quic.QuicDrop(result.reason, result.detail)
    assert caught.value.reason == "oversized_client_hello"


@pytest.mark.parametrize("mangle,reason", [
    (lambda d: d[:300], "truncated"),
    (lambda d: d[:6], "truncated"),
    (lambda d: d[:-1], "undersized_initial"),
    (lambda d: d[:20] + bytes([d[20] ^ 1]) + d[21:], "decrypt_failed"),
    (lambda d: d[:400] + bytes([d[400] ^ 1]) + d[401:], "decrypt_failed"),
    (lambda d: bytes([d[0] & 0x7F]) + d[1:], "not_initial"),  # a short header
    (lambda d: bytes([d[0] | 0x20]) + d[1:], "not_initial"),  # a Handshake packet (v1)
    (lambda d: d[:1] + b"\x1a\x2a\x3a\x4a" + d[5:], "unsupported_version"),
    (lambda d: bytes([d[0] & ~0x40 & 0xFF]) + d[1:], "not_quic"),  # the fixed bit clear
    (lambda d: d[:5] + b"\x40" + d[6:], "not_quic"),  # a 64-byte connection ID
])
def test_broken_initials_are_dropped_with_their_reason(mangle, reason):
    datagram = aioquic_first_flight("app-443.gw.test")[0]
    with pytest.raises(quic.QuicDrop) as caught:
        quic.InitialReader().feed(mangle(datagram))
    assert caught.value.reason == reason


def test_an_initial_in_a_small_datagram_is_dropped():
    # RFC 9000 14.1: only the datagram's size is wrong; the packet is the RFC's.
    packet = RFC9001_CLIENT_INITIAL
    header = quic.parse_long_header(packet)
    assert header.end == len(packet)
    with pytest.raises(quic.QuicDrop) as caught:
        quic.InitialReader().first_header(packet[:1100])
    assert caught.value.reason in ("undersized_initial", "truncated")


def test_version_negotiation_answers_with_the_versions_the_gateway_reads():
    datagram = aioquic_first_flight("app-443.gw.test")[0]
    unknown = datagram[:1] + b"\x1a\x2a\x3a\x4a" + datagram[5:]
    header = quic.parse_long_header(unknown)
    assert header.packet_type == "unknown"
    vn = quic.version_negotiation(header)
    parsed = quic.parse_long_header(vn)
    assert parsed.packet_type == "version_negotiation"
    assert (parsed.dcid, parsed.scid) == (header.scid, header.dcid)
    assert vn[parsed.pn_offset:] == (1).to_bytes(4, "big") + quic.QUIC_V2.to_bytes(4, "big")
    assert len(vn) < len(unknown)


def test_server_connection_ids_come_from_long_headers_only():
    initial = bytes([0xC0]) + (1).to_bytes(4, "big") + b"\x04abcd" + b"\x08" + b"S" * 8 + b"\x00\x02xy"
    assert quic.server_connection_ids(initial) == [b"S" * 8]
    assert quic.server_connection_ids(b"\x40" + b"S" * 8 + b"payload") == []
    assert quic.server_connection_ids(b"\xc0\x00") == []
