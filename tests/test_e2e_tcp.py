"""
End to end: the real gateway (twistd -n gateway) relaying TLS clients to TCP upstreams.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import subprocess
import time

import pytest
from OpenSSL import SSL

from support import (
    Upstream, free_port, http_handler, reply_on_eof_handler, shard, sink_handler, wait_for,
    wait_for_listener, which,
)


def s_client(gw, name: str, *extra: str) -> list[str]:
    return [which("openssl"), "s_client", "-connect", f"127.0.0.1:{gw.tls_port}",
            "-servername", name, "-CAfile", gw.ca_path, "-verify_return_error", *extra]


def s_client_echo(gw, name: str, source: str, received: str, size: int, timeout: float) -> None:
    """Feed C{source} to s_client and wait until C{size} bytes came back into C{received}."""
    with open(source, "rb") as stdin, open(received, "wb") as stdout:
        # -quiet implies -ign_eof: s_client keeps reading after its stdin ends.
        proc = subprocess.Popen(s_client(gw, name, "-quiet"),
                                stdin=stdin, stdout=stdout, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: os.path.getsize(received) >= size or proc.poll() is not None,
                     timeout=timeout, interval=0.05, what=f"{size} bytes echoed")
        finally:
            proc.kill()
            proc.wait()


def test_s_client_round_trip_and_100mib_sha256(start_gateway, echo_upstream, workdir):
    gw = start_gateway([shard("s1", "echo", 9000, echo_upstream.port)])
    small = os.path.join(workdir, "small.txt")
    with open(small, "wb") as f:
        f.write(b"hello gateway\n")
    echoed = os.path.join(workdir, "small.out")
    s_client_echo(gw, "echo-9000.localhost", small, echoed, 14, 30)
    with open(echoed, "rb") as f:
        assert f.read() == b"hello gateway\n"

    # 100 MiB through s_client, checked with SHA-256.
    size = 100 * 1024 * 1024
    source = os.path.join(workdir, "source.bin")
    digest = hashlib.sha256()
    with open(source, "wb") as f:
        block = os.urandom(1024 * 1024)
        for i in range(100):
            chunk = block[i:] + block[:i]
            f.write(chunk)
            digest.update(chunk)
    received = os.path.join(workdir, "received.bin")
    s_client_echo(gw, "echo-9000.localhost", source, received, size, 240)
    assert os.path.getsize(received) == size
    got = hashlib.sha256()
    with open(received, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            got.update(chunk)
    assert got.hexdigest() == digest.hexdigest()
    assert gw.metric("gateway_relayed_bytes_total", direction="upstream") >= size


@pytest.fixture
def redis_server():
    port = free_port()
    proc = subprocess.Popen([which("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_listener(port, "redis-server", proc)
    yield port
    proc.terminate()
    proc.wait(10)


def test_redis_cli_ping_through_gateway(start_gateway, redis_server):
    gw = start_gateway([shard("r1", "cache", 6379, redis_server)])
    out = subprocess.run([which("redis-cli"), "-h", "127.0.0.1", "-p", str(gw.tls_port), "--tls",
                          "--sni", "cache-6379.localhost", "--cacert", gw.ca_path, "PING"],
                         capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "PONG", out.stderr
    out = subprocess.run([which("redis-cli"), "-h", "127.0.0.1", "-p", str(gw.tls_port), "--tls",
                          "--sni", "cache-6379.localhost", "--cacert", gw.ca_path,
                          "SET", "greeting", "hi"], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "OK"


def test_curl_to_public_http_port(start_gateway):
    web = Upstream(http_handler)
    try:
        gw = start_gateway([shard("w1", "web", 8080, web.port, protocol="http/1.1")])
        out = subprocess.run([which("curl"), "-sS", "--cacert", gw.ca_path, "--resolve",
                              f"web-8080.localhost:{gw.tls_port}:127.0.0.1",
                              f"https://web-8080.localhost:{gw.tls_port}/some/path"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout == "upstream saw GET /some/path\n"
    finally:
        web.close()


def _pyopenssl_client(gw, name: str) -> tuple[socket.socket, SSL.Connection]:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.load_verify_locations(gw.ca_path)
    ctx.set_verify(SSL.VERIFY_PEER, lambda *a: a[-1])
    sock = socket.create_connection(("127.0.0.1", gw.tls_port), timeout=10)
    # pyOpenSSL needs a blocking socket; SO_RCVTIMEO/SO_SNDTIMEO bound every call instead.
    sock.settimeout(None)
    bound = struct.pack("ll", 20, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, bound)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, bound)
    conn = SSL.Connection(ctx, sock)
    conn.set_tlsext_host_name(name.encode())
    conn.set_connect_state()
    conn.do_handshake()
    return sock, conn


def test_half_close_carries_eof_and_reply_still_arrives(start_gateway):
    up = Upstream(reply_on_eof_handler)
    try:
        gw = start_gateway([shard("h1", "half", 7000, up.port)])
        sock, conn = _pyopenssl_client(gw, "half-7000.localhost")
        conn.sendall(b"x" * 100000)
        conn.shutdown()  # close_notify: our write side is done
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while True:
            try:
                data = conn.recv(65536)
            except SSL.ZeroReturnError:
                break
            except SSL.SysCallError:
                break
            if not data:
                break
            reply += data
        assert reply == b"received 100000 bytes after EOF\n"
        sock.close()
    finally:
        up.close()


def test_backpressure_bounds_memory(start_gateway):
    up = Upstream(sink_handler)
    try:
        gw = start_gateway([shard("b1", "sink", 7001, up.port)])
        before = gw.rss_bytes()
        tls = gw.connect("sink-7001.localhost")
        tls.setblocking(False)
        chunk = os.urandom(1 << 20)
        target = 1 << 30
        sent = 0
        last_progress = time.monotonic()
        deadline = time.monotonic() + 120
        while sent < target and time.monotonic() < deadline:
            try:
                sent += tls.send(chunk)
                last_progress = time.monotonic()
            except (ssl_want_errors()):
                if time.monotonic() - last_progress > 3:
                    break  # the gateway stopped reading: backpressure reached the client
                time.sleep(0.01)
        growth = gw.rss_bytes() - before
        assert sent < target, "the gateway accepted 1 GiB from a client whose upstream reads nothing"
        assert growth < 64 * 1024 * 1024, f"RSS grew by {growth / 2**20:.1f} MiB"
        tls.close()
    finally:
        up.close()


def ssl_want_errors():
    import ssl
    return (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError)


def test_upstream_refused_closes_client_and_counts(start_gateway):
    dead_port = free_port()
    gw = start_gateway([shard("d1", "dead", 7002, dead_port)])
    tls = gw.connect("dead-7002.localhost")
    tls.settimeout(10)
    assert tls.recv(100) == b""
    wait_for(lambda: gw.metric("gateway_upstream_connect_failures_total", reason="refused") >= 1,
             what="refused upstream counted")
    wait_for(lambda: gw.metric("gateway_connections_closed_total", outcome="upstream_failed") >= 1,
             what="upstream_failed outcome counted")
    assert not any(e.get("level") in ("error", "critical") for e in gw.events), gw.output()
    assert not gw.logged("Traceback")


def _slow_count_until_eof(conn):
    """Read slowly (so the gateway has to hold the client back), count until EOF, answer."""
    total = 0
    while True:
        data = conn.recv(65536)
        if not data:
            break
        total += len(data)
        time.sleep(0.002)
    conn.sendall(f"{total}\n".encode())
    conn.shutdown(socket.SHUT_WR)


def test_eof_after_backpressure_loses_no_bytes(start_gateway):
    """A client that half-closes while the gateway is holding it back (the upstream reads
    slowly): every byte sent before the FIN still reaches the upstream, then the EOF."""
    up = Upstream(_slow_count_until_eof)
    try:
        gw = start_gateway([shard("c", "count", 7003, up.port)])
        tls = gw.connect("count-7003.localhost", timeout=60)
        size = 24 * 1024 * 1024
        block = os.urandom(1 << 20)
        for _ in range(size // len(block)):
            tls.sendall(block)
        half = socket.socket(fileno=os.dup(tls.fileno()))
        half.shutdown(socket.SHUT_WR)  # TCP FIN, no close_notify
        half.close()
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = tls.recv(100)
            assert chunk, "connection closed before the upstream answered"
            reply += chunk
        assert int(reply) == size
        tls.close()
    finally:
        up.close()
