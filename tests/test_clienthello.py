"""The sans-IO ClientHello reader, fed real ClientHellos from OpenSSL and hostile bytes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL

from twisted_gateway import clienthello as ch


def real_client_hello(server_name: str | None = "db-5432.example.com",
                      alpn: list[bytes] | None = None) -> bytes:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if alpn:
        ctx.set_alpn_protos(alpn)
    conn = SSL.Connection(ctx, None)
    if server_name:
        conn.set_tlsext_host_name(server_name.encode())
    conn.set_connect_state()
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        pass
    return conn.bio_read(65536)


def test_reads_sni_and_alpn_from_a_real_hello():
    hello = ch.ClientHelloReader().feed(real_client_hello("Shop-80.Example.COM.", [b"h2", b"http/1.1"]))
    assert isinstance(hello, ch.ClientHello)
    assert hello.server_name == "shop-80.example.com"
    assert hello.alpn == (b"h2", b"http/1.1")
    assert 0x0304 in hello.versions


def test_no_sni():
    hello = ch.ClientHelloReader().feed(real_client_hello(None))
    assert isinstance(hello, ch.ClientHello)
    assert hello.server_name is None and hello.alpn == ()


def test_byte_by_byte_needs_more_until_complete_and_buffers_everything():
    raw = real_client_hello()
    reader = ch.ClientHelloReader()
    for i in range(len(raw) - 1):
        assert reader.feed(raw[i:i + 1]) is ch.NEED_MORE
    result = reader.feed(raw[-1:])
    assert isinstance(result, ch.ClientHello)
    assert reader.buffered == raw


def test_hello_fragmented_across_records():
    raw = real_client_hello()
    body = raw[5:]
    records = b""
    for i in range(0, len(body), 100):
        frag = body[i:i + 100]
        records += bytes([0x16, 0x03, 0x01]) + len(frag).to_bytes(2, "big") + frag
    result = ch.ClientHelloReader().feed(records)
    assert isinstance(result, ch.ClientHello)
    assert result.server_name == "db-5432.example.com"


def test_not_tls_and_http():
    assert ch.ClientHelloReader().feed(b"\x00hello").reason == "not_tls"
    assert ch.ClientHelloReader().feed(b"GET / HTTP/1.1\r\n").reason == "http_on_tls_port"
    assert ch.ClientHelloReader().feed(b"\x16\x02\x00\x00\x01x").reason == "not_tls"


def test_wrong_handshake_type_and_bad_lengths():
    assert ch.ClientHelloReader().feed(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00").reason == "malformed_client_hello"
    assert ch.ClientHelloReader().feed(b"\x16\x03\x01\x00\x00").reason == "malformed_client_hello"
    assert ch.ClientHelloReader().feed(b"\x16\x03\x01\x50\x00").reason == "malformed_client_hello"


def test_oversized_hello_refused_early():
    reader = ch.ClientHelloReader(max_hello_bytes=1024)
    # Declares a 100 KB ClientHello: refused as soon as the header is seen.
    result = reader.feed(b"\x16\x03\x01\x00\x04\x01\x01\x86\xa0")
    assert isinstance(result, ch.HelloError) and result.reason == "oversized_client_hello"


def test_truncated_body_is_malformed():
    raw = real_client_hello()
    body = raw[5:]
    # Claim the handshake is complete but cut the extensions short.
    short = body[:4] + body[4:60]
    short = bytes([1]) + (len(short) - 4).to_bytes(3, "big") + short[4:]
    record = bytes([0x16, 0x03, 0x01]) + len(short).to_bytes(2, "big") + short
    result = ch.ClientHelloReader().feed(record)
    assert isinstance(result, ch.HelloError) and result.reason == "malformed_client_hello"


def test_non_ascii_server_name_refused():
    raw = bytearray(real_client_hello("abc-80.example.com"))
    at = raw.index(b"abc-80")
    raw[at] = 0xC3
    result = ch.ClientHelloReader().feed(bytes(raw))
    assert isinstance(result, ch.HelloError) and result.reason == "invalid_server_name"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096), st.integers(min_value=1, max_value=64))
def test_arbitrary_bytes_never_raise(data, step):
    reader = ch.ClientHelloReader(max_hello_bytes=2048)
    for i in range(0, len(data), step):
        result = reader.feed(data[i:i + step])
        if result is not ch.NEED_MORE:
            assert isinstance(result, (ch.ClientHello, ch.HelloError))
            break


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_real_hellos_never_raise(data):
    raw = bytearray(real_client_hello("x-1.example.com", [b"h2"]))
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    result = ch.ClientHelloReader().feed(bytes(raw))
    assert result is ch.NEED_MORE or isinstance(result, (ch.ClientHello, ch.HelloError))


def test_alert_record():
    assert ch.alert_record(ch.ALERT_UNRECOGNIZED_NAME) == b"\x15\x03\x03\x00\x02\x02\x70"
