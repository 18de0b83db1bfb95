"""
End to end: ports declared ``h2`` through the real gateway, with a real gRPC server and client
(grpcio), nghttpd as an h2c file server, curl over HTTP/1.1 and h2, and a raw h2 client that
stops reading.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import time

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from support import free_port, shard, wait_for
from test_e2e_http import SECRET, curl, token
from upstreams import GrpcEchoServer, H2CServer, Nghttpd

grpc = pytest.importorskip("grpc")

BIG = 64 << 20


@pytest.fixture(scope="module")
def docroot(tmp_path_factory):
    path = tmp_path_factory.mktemp("htdocs")
    block = bytes(range(256)) * 4096
    with open(path / "big.bin", "wb") as f:
        for _ in range(BIG // len(block)):
            f.write(block)
    with open(path / "small.txt", "w") as f:
        f.write("small file\n")
    return str(path)


@pytest.fixture
def servers(docroot):
    rpc = GrpcEchoServer()
    files = Nghttpd(docroot)
    yield rpc, files
    rpc.close()
    files.close()


@pytest.fixture
def h2_gateway(start_gateway, servers):
    rpc, files = servers
    return start_gateway([
        shard("r1", "rpc", 50051, rpc.port, protocol="h2"),
        shard("r2", "secure", 50051, rpc.port, protocol="h2", public=False, task="tasks/secure"),
        shard("f1", "files", 8443, files.port, protocol="h2"),
        shard("d1", "down", 50051, free_port(), protocol="h2"),
    ], config={"auth": {"jwt_secret": SECRET, "leeway": 0}, "http": {"response_timeout": 1.0}})


def channel(gw, name: str):
    with open(gw.ca_path, "rb") as f:
        credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
    return grpc.secure_channel(f"127.0.0.1:{gw.tls_port}", credentials, options=[
        ("grpc.ssl_target_name_override", name), ("grpc.default_authority", name),
        ("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)])


def test_grpc_calls_of_every_kind_with_status_trailers(h2_gateway, servers):
    rpc, _ = servers
    with channel(h2_gateway, "rpc-50051.localhost") as ch:
        assert ch.unary_unary("/test.Echo/Unary")(b"hello", timeout=10) == b"echo:hello"
        assert rpc.metadata[-1]["x-forwarded-proto"] == "https"
        assert rpc.metadata[-1]["x-forwarded-for"] == "127.0.0.1"

        # The shard's own status travels in its trailers, untouched.
        with pytest.raises(grpc.RpcError) as failed:
            ch.unary_unary("/test.Echo/Fail")(b"widget", timeout=10)
        assert failed.value.code() == grpc.StatusCode.NOT_FOUND
        assert failed.value.details() == "no such thing: widget"

        # Server streaming: 48 MiB in 1 MiB messages, more than any window along the way.
        got = list(ch.unary_stream("/test.Echo/Stream")(b"48x1048576", timeout=60))
        assert [len(m) for m in got] == [1 << 20] * 48
        assert all(m == bytes([i % 256]) * (1 << 20) for i, m in enumerate(got))

        # Client streaming: 40 MiB up.
        messages = [os.urandom(1 << 20) for _ in range(40)]
        expected = hashlib.sha256(b"".join(messages)).hexdigest()
        answer = ch.stream_unary("/test.Echo/Upload")(iter(messages), timeout=60)
        assert answer == f"{40 << 20}:{expected}".encode()

        # Bidirectional.
        replies = list(ch.stream_stream("/test.Echo/Chat")(iter([b"abc", b"hello", b"x" * 100000]), timeout=10))
        assert replies == [b"cba", b"olleh", b"x" * 100000]
    assert h2_gateway.metric("gateway_http_requests_total", route="proxy", code_class="2xx") >= 5


def test_private_h2_port_checks_the_token_of_every_call(h2_gateway, servers):
    rpc, _ = servers
    with channel(h2_gateway, "secure-50051.localhost") as ch:
        call = ch.unary_unary("/test.Echo/Unary")
        with pytest.raises(grpc.RpcError) as missing:
            call(b"x", timeout=10)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "bearer token is required" in missing.value.details()
        with pytest.raises(grpc.RpcError) as expired:
            call(b"x", timeout=10, metadata=[("authorization", "Bearer " + token(["tasks/"], exp_in=-60))])
        assert expired.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as foreign:
            call(b"x", timeout=10, metadata=[("authorization", "Bearer " + token(["tasks/other"]))])
        assert foreign.value.code() == grpc.StatusCode.PERMISSION_DENIED
        calls_before = len(rpc.metadata)
        assert calls_before == 0 or all("authorization" not in m for m in rpc.metadata)
        secret = token(["tasks/sec"])
        good = [("authorization", "Bearer " + secret), ("x-custom", "kept")]
        assert call(b"in", timeout=10, metadata=good) == b"echo:in"
        # The token reaches neither the shard nor the gateway's log.
        assert not any(secret.split(".")[2] in str(event) for event in list(h2_gateway.events))
    # Only the authorized call reached the shard, without the token.
    assert len(rpc.metadata) == 1
    assert "authorization" not in rpc.metadata[0] and rpc.metadata[0]["x-custom"] == "kept"
    assert h2_gateway.metric("gateway_auth_decisions_total", outcome="forbidden") >= 1


def test_h2_port_failures_answer_in_the_clients_terms(h2_gateway):
    # gRPC clients read a gRPC status; others get the usual error page.
    with channel(h2_gateway, "down-50051.localhost") as ch:
        with pytest.raises(grpc.RpcError) as down:
            ch.unary_unary("/test.Echo/Unary")(b"x", timeout=10)
        assert down.value.code() == grpc.StatusCode.UNAVAILABLE
    with channel(h2_gateway, "rpc-50051.localhost") as ch:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as slow:
            ch.unary_unary("/test.Echo/Slow")(b"3", timeout=10)
        assert slow.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "did not answer within the timeout" in slow.value.details()
        assert time.monotonic() - started < 2.9
        # The connection is still good for the next call.
        assert ch.unary_unary("/test.Echo/Unary")(b"again", timeout=10) == b"echo:again"
    status, _, body = curl(h2_gateway, "down-50051.localhost", "/", "--http2", "-H", "Accept: application/json")
    assert status == 502 and json.loads(body)["error"] == "upstream_refused"
    status, _, body = curl(h2_gateway, "down-50051.localhost", "/", "--http1.1", "-H", "Accept: application/json")
    assert status == 502 and json.loads(body)["error"] == "upstream_refused"
    wait_for(lambda: h2_gateway.metric("gateway_upstream_connect_failures_total", reason="refused") >= 3)


@pytest.mark.parametrize("version", ["--http1.1", "--http2"])
def test_h2_port_serves_http1_and_h2_clients_large_bodies_both_ways(h2_gateway, docroot, version, workdir):
    status, headers, body = curl(h2_gateway, "files-8443.localhost", "/big.bin", version)
    assert status == 200 and len(body) == BIG
    with open(os.path.join(docroot, "big.bin"), "rb") as f:
        assert hashlib.sha256(body).hexdigest() == hashlib.sha256(f.read()).hexdigest()
    upload = os.path.join(workdir, "upload.bin")
    data = os.urandom(24 << 20)
    with open(upload, "wb") as f:
        f.write(data)
    # Chunked for HTTP/1.1 (no length known to the gateway), a plain stream for h2.
    args = [version, "-X", "POST", "--data-binary", f"@{upload}"]
    if version == "--http1.1":
        args += ["-H", "Transfer-Encoding: chunked"]
    status, _, echoed = curl(h2_gateway, "files-8443.localhost", "/small.txt", *args)
    assert status == 200
    assert hashlib.sha256(echoed).hexdigest() == hashlib.sha256(data).hexdigest()


def test_h2_client_that_stops_reading_holds_the_gateway_to_its_windows(h2_gateway):
    """A client that asks for 64 MiB and reads nothing: flow control, not memory, absorbs it."""
    baseline = h2_gateway.rss_bytes()
    ctx = ssl.create_default_context(cafile=h2_gateway.ca_path)
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", h2_gateway.tls_port), timeout=10) as raw:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        with ctx.wrap_socket(raw, server_hostname="files-8443.localhost") as tls:
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            # Huge windows: only the gateway's own backpressure can hold the shard back.
            conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
            conn.increment_flow_control_window(2**31 - 1 - 65535)
            conn.send_headers(1, [(":method", "GET"), (":path", "/big.bin"), (":scheme", "https"),
                                  (":authority", "files-8443.localhost")], end_stream=True)
            tls.sendall(conn.data_to_send())
            tls.recv(4096)  # the response has started
            # Watch the gateway until its memory has stopped growing for a second: it has
            # stopped reading from the shard.
            peak, settled_at = baseline, time.monotonic()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and time.monotonic() - settled_at < 1:
                rss = h2_gateway.rss_bytes()
                if rss > peak + (1 << 20):
                    peak, settled_at = rss, time.monotonic()
                time.sleep(0.05)
            assert peak - baseline < 24 << 20, f"RSS grew {(peak - baseline) >> 20} MiB"
            # Then read it all: nothing was lost while the gateway held back.
            total, ended = 0, False
            while not ended:
                data = tls.recv(1 << 20)
                assert data
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.DataReceived):
                        total += len(event.data)
                    elif isinstance(event, h2.events.StreamEnded):
                        ended = True
                tls.sendall(conn.data_to_send())
    assert total == BIG


def test_a_cancelled_call_is_reset_at_the_shard(h2_gateway, servers):
    """The client's RST_STREAM reaches the shard: a long server stream stops there too."""
    rpc, _ = servers
    with channel(h2_gateway, "rpc-50051.localhost") as ch:
        call = ch.unary_stream("/test.Echo/Stream")(b"100000x65536", timeout=60)
        for _ in range(3):
            next(call)
        call.cancel()
        wait_for(lambda: rpc.cut_short, timeout=10, what="the shard's stream ended early")
        # Flow control held the shard back: it got only windows ahead of what the client read
        # (the client's own window, the gateway's 256 KiB, socket buffers), not the whole stream.
        assert rpc.cut_short[0] < 2000
        # The connection carries on.
        assert ch.unary_unary("/test.Echo/Unary")(b"next", timeout=10) == b"echo:next"


@pytest.mark.parametrize("version", ["--http2", "--http1.1"])
def test_a_request_the_shard_never_processed_is_sent_again(start_gateway, version):
    """A shard that answers GOAWAY (last stream 0) to a new stream, as a server restarting or
    at gRPC's maximum connection age does: the gateway sends the request again on a new
    connection instead of failing it."""
    up = H2CServer(goaway_first=True)
    try:
        gw = start_gateway([shard("g1", "grpc", 50051, up.port, protocol="h2")])
        status, _, body = curl(gw, "grpc-50051.localhost", "/again", version)
        assert status == 200 and body.startswith(b"h2 upstream answered /again")
        assert up.connections == 2
        assert gw.metric("gateway_upstream_replays_total") == 1
        if version == "--http2":
            # With a body that fits the replay copy: sent again whole, acknowledged once.
            up.connections, up.goaway_first = 0, True
            gw.stop()
            gw = start_gateway([shard("g1", "grpc", 50051, up.port, protocol="h2")])
            payload = os.urandom(40000)
            path = os.path.join(gw.workdir, "payload.bin")
            with open(path, "wb") as f:
                f.write(payload)
            status, _, body = curl(gw, "grpc-50051.localhost", "/post", version, "--data-binary", f"@{path}")
            assert status == 200, body
            assert body.startswith(f"h2 upstream answered /post (40000 bytes, sha256 "
                                   f"{hashlib.sha256(payload).hexdigest()})".encode())
            assert gw.metric("gateway_upstream_replays_total") == 1
    finally:
        up.close()


def test_oversized_h2_headers_end_only_that_connection(h2_gateway):
    """A header block over limits.max_header_bytes (16 KiB by default): GOAWAY for that client,
    counted; others go on."""
    ctx = ssl.create_default_context(cafile=h2_gateway.ca_path)
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", h2_gateway.tls_port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="files-8443.localhost") as tls:
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            conn.send_headers(1, [(":method", "GET"), (":path", "/small.txt"), (":scheme", "https"),
                                  (":authority", "files-8443.localhost"), ("x-big", "a" * 20_000)],
                              end_stream=True)
            tls.sendall(conn.data_to_send())
            terminated = None
            while terminated is None:
                data = tls.recv(65536)
                if not data:
                    break
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ConnectionTerminated):
                        terminated = event
    assert terminated is not None and terminated.error_code != 0
    assert h2_gateway.metric("gateway_http2_protocol_errors_total", peer="client") == 1
    status, _, body = curl(h2_gateway, "files-8443.localhost", "/small.txt", "--http2")
    assert status == 200 and body == b"small file\n"
