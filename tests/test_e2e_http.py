"""
End to end: HTTP routes through the real gateway with curl, an h2 client, a websocket client,
and control-plane tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import subprocess
import time

import h2.config
import h2.connection
import h2.events
import h2.settings
import jwt
import pytest

from support import free_port, request_heads, shard, wait_for, which
from upstreams import H2CServer, RecordingHTTPServer, WebsocketEchoServer

SECRET = "test-secret-0123456789-abcdefghijklmnop"
SIGNIN = "https://signin.example.test/login"


def token(prefixes=("tasks/",), exp_in=300, key=SECRET, alg="HS256", **extra) -> str:
    now = int(time.time())
    claims = {"sub": "user-1", "iat": now, "exp": now + exp_in, "prefixes": list(prefixes), **extra}
    return jwt.encode(claims, key, algorithm=alg)


@pytest.fixture
def web():
    server = RecordingHTTPServer()
    yield server
    server.close()


@pytest.fixture
def http_gateway(start_gateway, web):
    dead = free_port()
    shards = [
        shard("w1", "web", 8080, web.port, protocol="http/1.1", public=True),
        shard("p1", "app", 8080, web.port, protocol="http/1.1", public=False, task="tasks/app"),
        shard("d1", "down", 8080, dead, protocol="http/1.1", public=True),
    ]
    return start_gateway(shards, config={
        "auth": {"jwt_secret": SECRET, "signin_url": SIGNIN, "leeway": 0},
        "http": {"response_timeout": 1.0},
    })


def curl(gw, name: str, path: str = "/", *args: str, timeout: float = 60) -> tuple[int, dict, bytes]:
    """(status, headers, body) of a curl request through the gateway."""
    cmd = [which("curl"), "-sS", "--cacert", gw.ca_path, "--resolve", f"{name}:{gw.tls_port}:127.0.0.1",
           "-D", "-", "-o", "-", *args, f"https://{name}:{gw.tls_port}{path}"]
    out = subprocess.run(cmd, capture_output=True, timeout=timeout)
    assert out.returncode == 0, out.stderr
    raw = out.stdout
    head, _, body = raw.partition(b"\r\n\r\n")
    while head.split(b" ")[1] == b"100":  # interim 100 Continue
        head, _, body = body.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


@pytest.mark.parametrize("version", ["--http1.1", "--http2"])
def test_public_port_status_headers_body(http_gateway, web, version):
    status, headers, body = curl(http_gateway, "web-8080.localhost", "/hello?x=1", version)
    assert status == 200
    assert headers["x-upstream"] == "recording"
    assert json.loads(body) == {"method": "GET", "path": "/hello?x=1"}
    seen = web.seen[-1]["headers"]
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "https"
    assert seen["x-forwarded-host"].startswith("web-8080.localhost")
    assert seen["forwarded"].startswith("for=127.0.0.1;proto=https;host=web-8080.localhost")


@pytest.mark.parametrize("version", ["--http1.1", "--http2"])
def test_100mib_download_and_chunked_upload(http_gateway, workdir, version):
    size = 100 * 1024 * 1024
    out_path = os.path.join(workdir, "download.bin")
    out = subprocess.run([which("curl"), "-sS", version, "--cacert", http_gateway.ca_path, "--resolve",
                          f"web-8080.localhost:{http_gateway.tls_port}:127.0.0.1", "-o", out_path,
                          f"https://web-8080.localhost:{http_gateway.tls_port}/big?size={size}"],
                         capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr
    expected = hashlib.sha256()
    block = bytes(range(256)) * 256
    for _ in range(size // len(block)):
        expected.update(block)
    with open(out_path, "rb") as f:
        got = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            got.update(chunk)
    assert got.hexdigest() == expected.hexdigest()

    upload = os.path.join(workdir, "upload.bin")
    with open(upload, "wb") as f:
        f.write(os.urandom(8 * 1024 * 1024))
    with open(upload, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    status, _, body = curl(http_gateway, "web-8080.localhost", "/echo", version,
                           "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{upload}")
    assert status == 201
    assert json.loads(body) == {"sha256": digest, "length": 8 * 1024 * 1024}


def test_private_port_authorization_matrix(http_gateway, web):
    gw = http_gateway
    name = "app-8080.localhost"
    assert curl(gw, name, "/x")[0] == 401
    assert curl(gw, name, "/x", "-H", "Authorization: Bearer not-a-jwt")[0] == 400
    status, headers, body = curl(gw, name, "/x", "-H", f"Authorization: Bearer {token(exp_in=-10)}",
                                 "-H", "Accept: application/json")
    assert status == 401 and json.loads(body)["error"] == "expired"
    assert curl(gw, name, "/x", "-H", f"Authorization: Bearer {token(key='wrong-secret-0123456789-abcdefghij')}")[0] == 401
    status, _, body = curl(gw, name, "/x", "-H", f"Authorization: Bearer {token(prefixes=['other/'])}",
                           "-H", "Accept: application/json")
    assert status == 403 and json.loads(body)["error"] == "forbidden"
    unsigned = jwt.encode({"iat": int(time.time()), "exp": int(time.time()) + 60,
                           "prefixes": ["tasks/"]}, None, algorithm="none")
    assert curl(gw, name, "/x", "-H", f"Authorization: Bearer {unsigned}")[0] == 401
    requests_before = len(web.seen)
    good = token()
    status, _, body = curl(gw, name, "/private", "-H", f"Authorization: Bearer {good}",
                           "-H", "Cookie: theme=dark; __Host-gateway-token=" + good)
    assert status == 200 and json.loads(body)["path"] == "/private"
    # Only the good request reached the upstream, without the token in any form.
    assert len(web.seen) == requests_before + 1
    seen = web.seen[-1]["headers"]
    assert "authorization" not in seen
    assert seen.get("cookie") == "theme=dark"
    # The cookie alone works too.
    assert curl(gw, name, "/c", "-H", f"Cookie: __Host-gateway-token={good}")[0] == 200
    wait_for(lambda: gw.metric("gateway_auth_decisions_total", outcome="forbidden") >= 1)
    assert gw.metric("gateway_auth_decisions_total", outcome="allowed") >= 2
    # No token nor cookie reached the logs.
    gw_text = json.dumps(gw.events)
    assert good not in gw_text


def test_browser_redirect_and_auth_redirect(http_gateway):
    gw = http_gateway
    name = "app-8080.localhost"
    status, headers, _ = curl(gw, name, "/page?a=b", "-H", "Accept: text/html")
    assert status == 307
    assert headers["location"].startswith(SIGNIN + "?orig_url=https%3A%2F%2Fapp-8080.localhost")
    orig = f"https://{name}:{gw.tls_port}/page?a=b"
    from urllib.parse import quote
    good = token()
    status, headers, _ = curl(gw, name, f"/auth-redirect?token={good}&orig_url={quote(orig, safe='')}")
    assert status == 307 and headers["location"] == orig
    cookie = headers["set-cookie"]
    assert cookie.startswith(f"__Host-gateway-token={good}")
    for attr in ("Secure", "HttpOnly", "SameSite=Lax", "Path=/"):
        assert attr in cookie
    foreign = quote("https://evil.example.com/", safe="")
    assert curl(gw, name, f"/auth-redirect?token={good}&orig_url={foreign}")[0] == 400
    assert curl(gw, name, f"/auth-redirect?token=garbage&orig_url={quote(orig, safe='')}")[0] == 400


def test_rs256_gateway_rejects_hs256_signed_with_public_key(start_gateway, web, workdir):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    pub_path = os.path.join(workdir, "cp.pub.pem")
    with open(pub_path, "wb") as f:
        f.write(public_pem)
    gw = start_gateway([shard("p1", "app", 8080, web.port, protocol="http/1.1", public=False,
                              task="tasks/app")],
                       config={"auth": {"jwt_public_key": pub_path}})
    name = "app-8080.localhost"
    assert curl(gw, name, "/", "-H", f"Authorization: Bearer {token(key=key, alg='RS256')}")[0] == 200
    import base64
    import hmac
    now = int(time.time())

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps({"iat": now, "exp": now + 60, "prefixes": ["tasks/"]}).encode())
    sig = b64(hmac.new(public_pem, header + b"." + payload, "sha256").digest())
    forged = (header + b"." + payload + b"." + sig).decode()
    assert curl(gw, name, "/", "-H", f"Authorization: Bearer {forged}")[0] == 401


def test_upstream_down_502_and_slow_504(http_gateway):
    started = time.monotonic()
    status, _, body = curl(http_gateway, "down-8080.localhost", "/", "-H", "Accept: application/json")
    assert status == 502 and json.loads(body)["error"] == "upstream_refused"
    assert time.monotonic() - started < 5
    started = time.monotonic()
    status, _, body = curl(http_gateway, "web-8080.localhost", "/slow?s=3", "-H", "Accept: application/json")
    assert status == 504 and json.loads(body)["error"] == "upstream_timeout"
    assert 0.9 < time.monotonic() - started < 2.9
    wait_for(lambda: http_gateway.metric("gateway_http_requests_total", code_class="5xx") >= 2)


@pytest.mark.parametrize("passthrough", [False, True])
def test_h2_port_with_trailers(start_gateway, passthrough):
    up = H2CServer()
    try:
        entry = shard("g1", "grpc", 50051, up.port, protocol="h2")
        entry["ports"][0]["passthrough"] = passthrough
        gw = start_gateway([entry])
        ctx = ssl.create_default_context(cafile=gw.ca_path)
        ctx.set_alpn_protocols(["h2"])
        with socket.create_connection(("127.0.0.1", gw.tls_port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="grpc-50051.localhost") as tls:
                assert tls.selected_alpn_protocol() == "h2"
                conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
                conn.initiate_connection()
                conn.send_headers(1, [(":method", "POST"), (":path", "/pkg.Service/Method"),
                                      (":scheme", "https"), (":authority", "grpc-50051.localhost"),
                                      ("content-type", "application/grpc"), ("te", "trailers")],
                                  end_stream=True)
                tls.sendall(conn.data_to_send())
                body, trailers, ended = b"", None, False
                while not ended:
                    data = tls.recv(65536)
                    assert data, "connection closed before the stream ended"
                    for event in conn.receive_data(data):
                        if isinstance(event, h2.events.DataReceived):
                            body += event.data
                            conn.acknowledge_received_data(len(event.data), event.stream_id)
                        elif isinstance(event, h2.events.TrailersReceived):
                            trailers = dict(event.headers)
                        elif isinstance(event, h2.events.StreamEnded):
                            ended = True
                    tls.sendall(conn.data_to_send())
        assert body == b"h2 upstream answered /pkg.Service/Method"
        assert trailers == {b"grpc-status": b"0", b"grpc-message": b"ok"}
        # Passed through, the streams reach the shard unparsed: no request was counted.
        counted = gw.metric("gateway_http_requests_total", route="proxy", code_class="2xx")
        assert counted == (0 if passthrough else 1)
    finally:
        up.close()


def test_websocket_echo(start_gateway):
    from websockets.sync.client import connect
    ws_server = WebsocketEchoServer()
    try:
        gw = start_gateway([shard("ws1", "chat", 8080, ws_server.port, protocol="http/1.1")])
        ctx = ssl.create_default_context(cafile=gw.ca_path)
        sock = socket.create_connection(("127.0.0.1", gw.tls_port), timeout=10)
        with connect("wss://chat-8080.localhost/socket", sock=sock, ssl=ctx,
                     server_hostname="chat-8080.localhost", open_timeout=10) as ws:
            for message in ["hello", "x" * 100000, b"\x00\x01binary"]:
                ws.send(message)
                assert ws.recv(timeout=10) == message
    finally:
        ws_server.close()


def test_jwks_keys_fetched_and_rotated(start_gateway, web):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from jwt.algorithms import ECAlgorithm, RSAAlgorithm

    k1 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    k2 = ec.generate_private_key(ec.SECP256R1())
    jwk1 = dict(json.loads(RSAAlgorithm.to_jwk(k1.public_key())), kid="k1", alg="RS256")
    jwk2 = dict(json.loads(ECAlgorithm.to_jwk(k2.public_key())), kid="k2", alg="ES256")
    document = {"keys": [jwk1]}

    class JWKS(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            body = json.dumps(document).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
    server = ThreadingHTTPServer(("127.0.0.1", 0), JWKS)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        gw = start_gateway([shard("p1", "app", 8080, web.port, protocol="http/1.1", public=False,
                                  task="tasks/app")],
                           config={"auth": {"jwks_url": f"http://127.0.0.1:{server.server_address[1]}/jwks",
                                            "jwks_refresh": 0.3}})
        now = int(time.time())
        claims = {"iat": now, "exp": now + 60, "prefixes": ["tasks/"]}
        t1 = jwt.encode(claims, k1, algorithm="RS256", headers={"kid": "k1"})
        t2 = jwt.encode(claims, k2, algorithm="ES256", headers={"kid": "k2"})
        name = "app-8080.localhost"
        assert curl(gw, name, "/", "-H", f"Authorization: Bearer {t1}")[0] == 200
        assert curl(gw, name, "/", "-H", f"Authorization: Bearer {t2}")[0] == 401
        document["keys"] = [jwk2]
        wait_for(lambda: curl(gw, name, "/", "-H", f"Authorization: Bearer {t2}")[0] == 200,
                 timeout=5, what="rotated key accepted")
        wait_for(lambda: curl(gw, name, "/", "-H", f"Authorization: Bearer {t1}")[0] == 401,
                 timeout=5, what="retired key refused")
        assert gw.metric("gateway_jwks_refreshes_total", outcome="success") >= 2
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("alpn", ["http/1.1", "h2"])
def test_upload_streams_to_the_shard_before_it_ends(http_gateway, web, alpn):
    """The shard sees the start of a body while the client is still sending it."""
    first = os.urandom(1024 * 1024)
    rest = os.urandom(512 * 1024)
    tls = http_gateway.connect("web-8080.localhost", alpn=[alpn])
    assert tls.selected_alpn_protocol() == alpn
    if alpn == "http/1.1":
        tls.sendall(b"POST /echo HTTP/1.1\r\nHost: web-8080.localhost\r\nTransfer-Encoding: chunked\r\n\r\n")
        tls.sendall(b"%x\r\n" % len(first) + first + b"\r\n")
        wait_for(lambda: web.body_bytes >= len(first), timeout=10, what="first MiB at the shard")
        tls.sendall(b"%x\r\n" % len(rest) + rest + b"\r\n0\r\n\r\n")
        response = b""
        while b"}" not in response:
            chunk = tls.recv(65536)
            assert chunk
            response += chunk
        head, _, body = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 201")
    else:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**24})
        conn.send_headers(1, [(":method", "POST"), (":path", "/echo"), (":scheme", "https"),
                              (":authority", "web-8080.localhost")])
        tls.sendall(conn.data_to_send())
        body, status, ended, sent_rest = b"", None, False, False
        pending = first
        while not ended:
            while pending and conn.local_flow_control_window(1) > 0:
                n = min(len(pending), conn.local_flow_control_window(1), conn.max_outbound_frame_size)
                conn.send_data(1, pending[:n])
                pending = pending[n:]
            tls.sendall(conn.data_to_send())
            if not pending and not sent_rest:
                wait_for(lambda: web.body_bytes >= len(first), timeout=10, what="first MiB at the shard")
                sent_rest, pending = True, rest
                continue
            if sent_rest and not pending and conn.streams[1].state_machine.state.name == "OPEN":
                conn.end_stream(1)
                tls.sendall(conn.data_to_send())
            tls.settimeout(10)
            data = tls.recv(65536)
            assert data
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = dict(event.headers)[b":status"]
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(len(event.data), 1)
                elif isinstance(event, h2.events.StreamEnded):
                    ended = True
            tls.sendall(conn.data_to_send())
        assert status == b"201"
    assert json.loads(body) == {"sha256": hashlib.sha256(first + rest).hexdigest(),
                                "length": len(first) + len(rest)}
    tls.close()


def _raw_http_upstream(responses):
    """An upstream answering successive requests on one connection from a list of raw replies
    (bytes, or lists of bytes sent with pauses); records connections and requests."""
    import socket as _socket
    import threading as _threading
    state = {"connections": 0, "requests": []}
    sock = _socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)

    def serve(conn):
        try:
            for head in request_heads(conn):
                state["requests"].append(head.split(b"\r\n")[0].decode())
                reply = responses[min(len(state["requests"]) - 1, len(responses) - 1)]
                for piece in (reply if isinstance(reply, list) else [reply]):
                    if piece is None:
                        conn.close()
                        return
                    conn.sendall(piece)
                    time.sleep(0.05)
        except OSError:
            pass

    def accept():
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            state["connections"] += 1
            _threading.Thread(target=serve, args=(conn,), daemon=True).start()
    _threading.Thread(target=accept, daemon=True).start()
    return sock, state


def test_chunked_streaming_head_204_reuse_and_truncation(start_gateway):
    chunked = [b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
               b"6\r\nevent1\r\n", b"6\r\nevent2\r\n", b"0\r\n\r\n"]
    replies = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst",
        chunked,
        b"HTTP/1.1 200 OK\r\nContent-Length: 12345\r\n\r\n",          # HEAD: no body follows
        b"HTTP/1.1 204 No Content\r\n\r\n",
        [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial", None],  # dies mid-body
    ]
    sock, state = _raw_http_upstream(replies)
    try:
        gw = start_gateway([shard("r", "raw", 8080, sock.getsockname()[1], protocol="http/1.1")])
        name = "raw-8080.localhost"
        assert curl(gw, name, "/1")[2] == b"first"
        status, headers, body = curl(gw, name, "/2")
        assert status == 200 and body == b"event1event2"
        status, headers, body = curl(gw, name, "/3", "-I")
        assert status == 200 and headers.get("content-length") == "12345"
        status, _, body = curl(gw, name, "/4")
        assert status == 204 and body == b""
        # Keep-alive reuse for the first three; a HEAD response retires its connection (a shard
        # that sends a body after it anyway must not answer the next client with it).
        assert state["requests"][:4] == ["GET /1 HTTP/1.1", "GET /2 HTTP/1.1", "HEAD /3 HTTP/1.1",
                                         "GET /4 HTTP/1.1"]
        assert state["connections"] == 2
        # A body cut short by the shard reaches the client as a truncated response, not a
        # complete one.
        out = subprocess.run([which("curl"), "-sS", "--http1.1", "--cacert", gw.ca_path, "--resolve",
                              f"{name}:{gw.tls_port}:127.0.0.1", f"https://{name}:{gw.tls_port}/5"],
                             capture_output=True, timeout=20)
        assert out.returncode != 0
    finally:
        sock.close()


def test_request_retried_once_when_a_kept_alive_connection_was_closed(start_gateway):
    replies = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst",
        [None],                                          # the shard drops the reused connection
        b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond",
    ]
    sock, state = _raw_http_upstream(replies)
    try:
        gw = start_gateway([shard("r", "raw", 8080, sock.getsockname()[1], protocol="http/1.1")])
        assert curl(gw, "raw-8080.localhost", "/1")[2] == b"first"
        status, _, body = curl(gw, "raw-8080.localhost", "/2")
        assert (status, body) == (200, b"second")
        assert state["connections"] == 2
        assert state["requests"] == ["GET /1 HTTP/1.1", "GET /2 HTTP/1.1", "GET /2 HTTP/1.1"]
    finally:
        sock.close()
