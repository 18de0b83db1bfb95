"""
The reload matrix over SIGHUP: every key documented as reloadable takes effect on the next
connection, a broken file changes nothing, and connections open across the reload (a splice and
an HTTP keep-alive connection) keep working on the settings they started with.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from support import shard, wait_for
from upstreams import RecordingHTTPServer

SECRET = "reload-matrix-secret"


class JWKSServer:
    """A JWKS document on 127.0.0.1 that counts its fetches."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, kid: str) -> None:
        self.fetches = 0
        doc = {"keys": [dict(json.loads(ECAlgorithm.to_jwk(key.public_key())), kid=kid, alg="ES256")]}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.fetches += 1
                body = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def web():
    server = RecordingHTTPServer()
    yield server
    server.close()


def reload(gw, workdir: str, config: dict) -> None:
    """Write the configuration file and SIGHUP; wait until the reload is counted."""
    before = gw.metric("gateway_config_reloads_total", outcome="success")
    with open(os.path.join(workdir, "gateway.yaml"), "w") as f:
        yaml.safe_dump(config, f)
    gw.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: gw.metric("gateway_config_reloads_total", outcome="success") > before, 10,
             what="the reload counted")


def read_head(tls: ssl.SSLSocket) -> bytes:
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = tls.recv(65536)
        assert chunk, f"connection closed after {got!r}"
        got += chunk
    return got


def read_response(tls: ssl.SSLSocket) -> bytes:
    """One whole response with a Content-Length (its head and body)."""
    head, _, body = read_head(tls).partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    while len(body) < length:
        chunk = tls.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return head


def keep_alive_request(tls: ssl.SSLSocket, name: str, path: str, extra: bytes = b"") -> tuple[int, bytes]:
    tls.sendall(b"GET %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (path.encode(), name.encode(), extra))
    head = read_response(tls)
    return int(head.split(b" ")[1]), head


def test_reloadable_keys_take_effect_and_open_connections_survive(start_gateway, workdir, web, echo_upstream):
    k1, k2 = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    first, second = JWKSServer(k1, "k1"), JWKSServer(k2, "k2")
    try:
        base = {"auth": {"jwks_url": first.url, "jwks_refresh": 0.5, "cookie_name": "gw-one",
                         "cookie_max_age": 600},
                "limits": {"max_body_bytes": 10}, "http": {"response_timeout": 30}}
        gw = start_gateway([shard("w", "web", 8080, web.port, protocol="http/1.1", public=False, task="tasks/web"),
                            shard("e", "echo", 9000, echo_upstream.port)], config=base)
        wait_for(lambda: gw.http_get("/readyz")[0] == 200, 10, what="ready with JWKS keys")
        now = int(time.time())
        claims = {"iat": now, "exp": now + 300, "prefixes": ["tasks/"]}
        t1 = jwt.encode(claims, k1, algorithm="ES256", headers={"kid": "k1"})
        t2 = jwt.encode(claims, k2, algorithm="ES256", headers={"kid": "k2"})
        name = "web-8080.localhost"
        auth1 = b"Authorization: Bearer " + t1.encode() + b"\r\n"

        # Connections opened before the reload.
        splice = gw.connect("echo-9000.localhost")
        splice.sendall(b"before")
        assert splice.recv(10) == b"before"
        kept = gw.connect(name, alpn=["http/1.1"])
        assert keep_alive_request(kept, name, "/1", auth1)[0] == 200

        # Reload: another JWKS URL (a rotated control plane), another cookie, a body limit.
        changed = {"auth": {"jwks_url": second.url, "jwks_refresh": 0.5, "cookie_name": "gw-two",
                            "cookie_max_age": 900},
                   "limits": {"max_body_bytes": 1000}, "http": {"response_timeout": 30}}
        fetched_before = second.fetches
        ready: list[int] = []
        stop = threading.Event()

        def watch_readiness() -> None:
            while not stop.is_set():
                ready.append(gw.http_get("/readyz")[0])
                time.sleep(0.02)  # a bounded sampling loop, not a wait for a condition
        watcher = threading.Thread(target=watch_readiness, daemon=True)
        watcher.start()
        reload(gw, workdir, changed)
        # The new key source is fetched, and keeps being refreshed.
        wait_for(lambda: second.fetches >= fetched_before + 2, 10, what="the new JWKS URL refreshed")
        stop.set()
        watcher.join(5)
        assert ready and all(code == 200 for code in ready), f"/readyz during the reload: {set(ready)}"

        fresh = gw.connect(name, alpn=["http/1.1"])
        assert keep_alive_request(fresh, name, "/2", b"Authorization: Bearer " + t2.encode() + b"\r\n")[0] == 200
        # The cookie settings apply at /auth-redirect.
        status, head = keep_alive_request(
            fresh, name, f"/auth-redirect?token={t2}&orig_url=https%3A%2F%2F{name}%2Fx")
        assert status == 307 and b"Set-Cookie: gw-two=" in head.replace(b"set-cookie", b"Set-Cookie")
        assert b"Max-Age=900" in head
        # The body limit applies to new requests.
        fresh.sendall(b"POST /3 HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\nContent-Length: 500\r\n\r\n"
                      % (name.encode(), t2.encode()) + b"x" * 500)
        assert read_response(fresh).startswith(b"HTTP/1.1 2")

        # What was open before the reload still works.
        splice.sendall(b"after")
        assert splice.recv(10) == b"after"
        assert keep_alive_request(kept, name, "/4", auth1)[0] in (200, 401)

        # A broken file changes nothing.
        with open(os.path.join(workdir, "gateway.yaml"), "w") as f:
            f.write("limits: {max_body_bytes: -1}\n")
        failures = gw.metric("gateway_config_reloads_total", outcome="failure")
        gw.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: gw.metric("gateway_config_reloads_total", outcome="failure") > failures, 10)
        assert keep_alive_request(fresh, name, "/5", b"Authorization: Bearer " + t2.encode() + b"\r\n")[0] == 200
        assert gw.http_get("/readyz")[0] == 200
        for sock in (splice, kept, fresh):
            sock.close()
    finally:
        first.close()
        second.close()


def test_new_poll_intervals_apply(start_gateway, workdir, echo_upstream):
    gw = start_gateway([shard("a", "alpha", 9000, echo_upstream.port)],
                       config={"directory": {"poll_interval": 3600}})
    reload(gw, workdir, {"directory": {"poll_interval": 0.2}})
    gw.write_directory([shard("a", "alpha", 9000, echo_upstream.port),
                        shard("b", "beta", 9000, echo_upstream.port)])
    # No SIGHUP this time: the file watcher now looks every 0.2 s.
    wait_for(lambda: gw.echoes("beta-9000.localhost"), 10, what="the directory change picked up by the new interval")


def test_a_keep_alive_connection_keeps_the_runtime_it_started_with(start_gateway, workdir, web):
    """Open connections keep their Runtime: a limit lowered by a reload applies to new ones."""
    gw = start_gateway([shard("w", "web", 8080, web.port, protocol="http/1.1")],
                       config={"limits": {"max_body_bytes": 1000}})
    name = "web-8080.localhost"
    old = gw.connect(name, alpn=["http/1.1"])
    assert keep_alive_request(old, name, "/warm")[0] == 200
    reload(gw, workdir, {"limits": {"max_body_bytes": 10}})
    new = gw.connect(name, alpn=["http/1.1"])
    for sock, expected in ((old, b"HTTP/1.1 2"), (new, b"HTTP/1.1 413")):
        sock.sendall(b"POST / HTTP/1.1\r\nHost: %s\r\nContent-Length: 100\r\n\r\n" % name.encode() + b"y" * 100)
        got = b""
        while b"\r\n\r\n" not in got:
            got += sock.recv(65536)
        assert got.startswith(expected), got[:120]
        sock.close()


def test_redis_connection_and_admin_keys_wait_for_a_restart(start_gateway, workdir, echo_upstream):
    from support import free_port
    token = os.path.join(workdir, "admin-token")
    with open(token, "w") as f:
        f.write("first-token\n")
    dead = f"redis://127.0.0.1:{free_port()}/0"
    base = {"redis": {"url": dead, "check_interval": 1.0}, "admin": {"token_file": token}}
    gw = start_gateway([shard("e", "echo", 9000, echo_upstream.port)], config=base)
    reload(gw, workdir, {"redis": {"url": f"redis://127.0.0.1:{free_port()}/1", "check_interval": 0.5},
                         "admin": {"token_file": token, "refusals_kept": 10}})
    gw.wait_logged("reload: redis (its connection), admin changed and take effect only after a restart")
    # The running link keeps its target; routing goes on.
    status, body = gw.http_get("/readyz")
    assert status == 200 and json.loads(body)["redis"]["target"] == dead
    assert gw.echoes("echo-9000.localhost")
