"""
End to end: names without a route, broken or stalled handshakes, each refused within a bounded
time, counted, and without disturbing a concurrent good connection.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time

import pytest

from support import shard, wait_for, which

ALERT_UNRECOGNIZED_NAME = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 112])


@pytest.fixture
def gateway_with_good_connection(start_gateway, echo_upstream):
    shards = [
        shard("e1", "echo", 9000, echo_upstream.port),
        shard("p1", "nopri", 9001, echo_upstream.port, primary=False),
        shard("x1", "priv", 9002, echo_upstream.port, public=False),
    ]
    gw = start_gateway(shards, args=[], config={"tls": {"handshake_timeout": 1.0}})
    good = gw.connect("echo-9000.localhost")
    good.sendall(b"before")
    assert good.recv(100) == b"before"
    yield gw, good
    good.sendall(b"after")
    assert good.recv(100) == b"after", "a refusal disturbed a concurrent good connection"
    good.close()


def _s_client(gw, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([which("openssl"), "s_client", "-connect", f"127.0.0.1:{gw.tls_port}",
                           "-CAfile", gw.ca_path, *args], input=b"", capture_output=True,
                          timeout=20)


@pytest.mark.parametrize("name, reason", [
    ("nosuch-9000.localhost", "unknown_shard"),
    ("echo-1234.localhost", "unknown_port"),
    ("nopri-9001.localhost", "no_primary"),
    ("example.com", "unknown_name"),
])
def test_unrouted_names_get_unrecognized_name_alert(gateway_with_good_connection, name, reason):
    gw, _ = gateway_with_good_connection
    started = time.monotonic()
    out = _s_client(gw, "-servername", name)
    assert time.monotonic() - started < 10
    assert out.returncode != 0
    assert b"unrecognized name" in out.stderr or b"alert number 112" in out.stderr, out.stderr
    wait_for(lambda: gw.metric("gateway_route_refusals_total", reason=reason) >= 1,
             what=f"refusal {reason} counted")


def test_private_tcp_port_refused(gateway_with_good_connection):
    gw, _ = gateway_with_good_connection
    out = _s_client(gw, "-servername", "priv-9002.localhost")
    assert out.returncode != 0
    assert b"access denied" in out.stderr or b"alert number 49" in out.stderr, out.stderr
    wait_for(lambda: gw.metric("gateway_route_refusals_total", reason="private_port") >= 1)


def test_no_sni_refused(gateway_with_good_connection):
    gw, _ = gateway_with_good_connection
    out = _s_client(gw, "-noservername")
    assert out.returncode != 0
    assert b"unrecognized name" in out.stderr or b"alert number 112" in out.stderr
    wait_for(lambda: gw.metric("gateway_route_refusals_total", reason="no_sni") >= 1)


def test_http_client_gets_error_page_saying_what_was_not_found(gateway_with_good_connection):
    gw, _ = gateway_with_good_connection
    for accept, expected in [("application/json", '"error": "unknown_shard"'),
                             ("text/html", "<h1>404 Not Found</h1>"),
                             ("*/*", "no shard has the hostname label nosuch")]:
        out = subprocess.run([which("curl"), "-sS", "--cacert", gw.ca_path, "-H", f"Accept: {accept}",
                              "-w", "\n%{http_code}", "--resolve",
                              f"nosuch-9000.localhost:{gw.tls_port}:127.0.0.1",
                              f"https://nosuch-9000.localhost:{gw.tls_port}/"],
                             capture_output=True, text=True, timeout=20)
        body, _, code = out.stdout.rpartition("\n")
        assert code == "404", out
        assert expected in body
    out = subprocess.run([which("curl"), "-sS", "--http2", "--cacert", gw.ca_path, "-w", "\n%{http_code} %{http_version}",
                          "--resolve", f"nopri-9001.localhost:{gw.tls_port}:127.0.0.1",
                          f"https://nopri-9001.localhost:{gw.tls_port}/"],
                         capture_output=True, text=True, timeout=20)
    assert out.stdout.endswith("503 2"), out.stdout
    assert "no primary shard of nopri" in out.stdout


def test_garbage_and_plain_http_are_refused(gateway_with_good_connection):
    gw, _ = gateway_with_good_connection
    with socket.create_connection(("127.0.0.1", gw.tls_port), timeout=5) as s:
        s.sendall(b"\x00\x01garbage that is not TLS\r\n")
        reply = s.recv(100)
        assert reply == bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 70])  # protocol_version
        assert s.recv(100) == b""
    with socket.create_connection(("127.0.0.1", gw.tls_port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while chunk := s.recv(1000):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 400 Bad Request")
        assert b"This port speaks TLS" in reply
    with socket.create_connection(("127.0.0.1", gw.tls_port), timeout=5) as s:
        # A handshake record whose body is not a ClientHello.
        s.sendall(bytes([0x16, 0x03, 0x01, 0x00, 0x05, 0x02, 0x00, 0x00, 0x01, 0x00]))
        assert s.recv(100) == bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 50])  # decode_error
    wait_for(lambda: gw.metric("gateway_tls_handshake_failures_total", reason="not_tls") >= 1)
    wait_for(lambda: gw.metric("gateway_tls_handshake_failures_total", reason="http_on_tls_port") >= 1)
    wait_for(lambda: gw.metric("gateway_tls_handshake_failures_total", reason="malformed_client_hello") >= 1)


def test_stalled_handshakes_are_cut_at_the_timeout(gateway_with_good_connection):
    gw, good = gateway_with_good_connection
    stalled = []
    # Nothing at all, half a ClientHello, and a full ClientHello that never finishes.
    s1 = socket.create_connection(("127.0.0.1", gw.tls_port), timeout=10)
    s2 = socket.create_connection(("127.0.0.1", gw.tls_port), timeout=10)
    s2.sendall(bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01]))
    stalled += [s1, s2]
    started = time.monotonic()
    for s in stalled:
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
    elapsed = time.monotonic() - started
    assert elapsed < 5, f"stalled handshakes lived {elapsed:.1f}s with a 1s timeout"
    # The good connection kept working during the stall.
    good.sendall(b"during")
    assert good.recv(100) == b"during"
    wait_for(lambda: gw.metric("gateway_tls_handshake_failures_total", reason="timeout") >= 2)
    for s in stalled:
        s.close()


def test_unknown_name_counted_and_logged_without_errors(gateway_with_good_connection):
    gw, _ = gateway_with_good_connection
    ctx = ssl.create_default_context(cafile=gw.ca_path)
    with pytest.raises(ssl.SSLError) as info:
        with socket.create_connection(("127.0.0.1", gw.tls_port), timeout=5) as raw:
            ctx.wrap_socket(raw, server_hostname="ghost-1.localhost")
    assert "UNRECOGNIZED_NAME" in str(info.value).upper()
    assert not any(e.get("level") in ("error", "critical") for e in gw.events), gw.output()
