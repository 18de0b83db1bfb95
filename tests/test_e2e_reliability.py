"""
End to end: slow and abusive clients, limits, graceful drain, hot reload, socket activation
and the PROXY protocol.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import time

import pytest

from support import REPO, Gateway, Upstream, shard, twistd_command, wait_for
from test_e2e_http import curl, token
from upstreams import RecordingHTTPServer

from twisted_gateway.proxyheader import build_v2
from twisted_gateway.tls.localca import LocalCA


def _echo_ok(gw, name="echo-9000.localhost") -> bool:
    return gw.echoes(name)


def test_slowloris_clients_are_cut_while_a_good_client_is_served(start_gateway, echo_upstream):
    gw = start_gateway([shard("e", "echo", 9000, echo_upstream.port)],
                       config={"tls": {"handshake_timeout": 1.5}})
    good = gw.connect("echo-9000.localhost")
    partial_hello = bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03])
    stalled = []
    for _ in range(200):
        s = socket.create_connection(("127.0.0.1", gw.tls_port), timeout=10)
        s.sendall(partial_hello)
        stalled.append(s)
    started = time.monotonic()
    # The good client is served throughout.
    while time.monotonic() - started < 1.0:
        good.sendall(b"alive")
        assert good.recv(10) == b"alive"
    for s in stalled:
        try:
            assert s.recv(10) == b""
        except ConnectionResetError:
            pass
        s.close()
    assert time.monotonic() - started < 8
    assert _echo_ok(gw)
    good.sendall(b"still")
    assert good.recv(10) == b"still"
    wait_for(lambda: gw.metric("gateway_tls_handshake_failures_total", reason="timeout") >= 200)
    good.close()


def test_per_ip_connection_limit_and_rates(start_gateway, echo_upstream):
    web = RecordingHTTPServer()
    try:
        gw = start_gateway([shard("e", "echo", 9000, echo_upstream.port),
                            shard("w", "web", 8080, web.port, protocol="http/1.1")],
                           config={"limits": {"max_connections_per_ip": 3, "request_rate_per_ip": 2,
                                              "request_burst": 2}})
        held = [gw.connect("echo-9000.localhost") for _ in range(3)]
        for h in held:
            h.sendall(b"x")
            assert h.recv(10) == b"x"
        # The fourth concurrent connection is closed before any TLS.
        with pytest.raises((ssl.SSLError, OSError)):
            with gw.connect("echo-9000.localhost", timeout=5) as extra:
                extra.sendall(b"x")
                assert extra.recv(10) == b"x"
        wait_for(lambda: gw.metric("gateway_connections_refused_total", reason="max_connections_per_ip") >= 1)
        for h in held:
            h.close()
        wait_for(lambda: _echo_ok(gw), what="a slot is free again")

        # HTTP requests beyond 2 per second (burst 2) get 429 with Retry-After.
        codes = []
        for _ in range(4):
            status, headers, _ = curl(gw, "web-8080.localhost", "/")
            codes.append(status)
            if status == 429:
                assert int(headers["retry-after"]) >= 1
        assert codes[:2] == [200, 200] and 429 in codes[2:]
        assert gw.metric("gateway_http_rate_limited_total", key="ip") >= 1
    finally:
        web.close()


def test_connection_rate_and_deny_list(start_gateway, echo_upstream):
    gw = start_gateway([shard("e", "echo", 9000, echo_upstream.port)],
                       config={"limits": {"connection_rate_per_ip": 1, "connection_burst_per_ip": 2}})
    results = [_echo_ok(gw) for _ in range(4)]
    assert results[:2] == [True, True] and False in results[2:]
    assert gw.metric("gateway_connections_refused_total", reason="rate_limited") >= 1

    second = os.path.join(gw.workdir, "second")
    os.makedirs(second)
    gw2 = Gateway(second, [shard("e", "echo", 9000, echo_upstream.port)],
                  config={"limits": {"deny": ["127.0.0.0/8", "::1/128"]}})
    try:
        assert not _echo_ok(gw2)
        assert gw2.metric("gateway_connections_refused_total", reason="denied_ip") >= 1
    finally:
        gw2.stop()


def test_per_port_allow_list(start_gateway, echo_upstream):
    gw = start_gateway([shard("e", "echo", 9000, echo_upstream.port, extra_ports=[
        {"port": 9001, "protocol": "tcp", "public": True, "upstream_port": echo_upstream.port,
         "allow": ["10.0.0.0/8"]}])])
    assert _echo_ok(gw, "echo-9000.localhost")
    assert not _echo_ok(gw, "echo-9001.localhost")
    assert gw.metric("gateway_route_refusals_total", reason="denied_ip") >= 1


def _source_handler(size: int):
    def handler(conn):
        block = bytes(range(256)) * 256
        sent = 0
        while sent < size:
            conn.sendall(block)
            sent += len(block)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)
    return handler


def test_sigterm_drains_a_transfer_and_refuses_new_connections(start_gateway):
    size = 50 * 1024 * 1024
    up = Upstream(_source_handler(size))
    try:
        gw = start_gateway([shard("s", "source", 7000, up.port)])
        tls = gw.connect("source-7000.localhost", timeout=30)
        digest = hashlib.sha256()
        received = 0
        signalled = False
        while received < size:
            chunk = tls.recv(65536)
            if not chunk:
                break
            received += len(chunk)
            digest.update(chunk)
            if not signalled and received >= 5 * 1024 * 1024:
                gw.proc.send_signal(signal.SIGTERM)
                signalled = True

                def refused() -> bool:
                    try:
                        socket.create_connection(("127.0.0.1", gw.tls_port), timeout=1).close()
                        return False
                    except ConnectionRefusedError:
                        return True
                wait_for(refused, timeout=5, what="new connections refused after SIGTERM")
            time.sleep(0.0005)  # a slow reader: the transfer outlives the signal
        assert received == size
        expected = hashlib.sha256()
        block = bytes(range(256)) * 256
        for _ in range(size // len(block)):
            expected.update(block)
        assert digest.hexdigest() == expected.hexdigest()
        tls.close()
        assert gw.proc.wait(30) == 0
        gw.wait_logged("drained: all connections finished")
    finally:
        up.close()


def test_sighup_reloads_directory_and_certificate_and_refuses_a_broken_config(start_gateway, echo_upstream, workdir):
    ca = LocalCA(os.path.join(workdir, "operator-ca"))
    cert, key = os.path.join(workdir, "wild.pem"), os.path.join(workdir, "wild-key.pem")
    ca.write_leaf(("*.gw.test", "gw.test"), cert, key)
    config = {"hostname": "gw.test", "tls": {"certificate": cert, "private_key": key, "reload_interval": 3600},
              "directory": {"poll_interval": 3600}}
    gw = start_gateway([shard("a", "alpha", 9000, echo_upstream.port)], config=config)
    ctx = ssl.create_default_context(cafile=ca.cert_path)

    def serial(name: str) -> int | None:
        try:
            with ctx.wrap_socket(socket.create_connection(("127.0.0.1", gw.tls_port), timeout=5),
                                 server_hostname=name) as t:
                from cryptography import x509
                return x509.load_der_x509_certificate(t.getpeercert(binary_form=True)).serial_number
        except OSError:
            return None
    first = serial("alpha-9000.gw.test")
    held = ctx.wrap_socket(socket.create_connection(("127.0.0.1", gw.tls_port), timeout=5),
                           server_hostname="alpha-9000.gw.test")
    held.sendall(b"one")
    assert held.recv(10) == b"one"

    gw.write_directory([shard("a", "alpha", 9000, echo_upstream.port),
                        shard("b", "beta", 9000, echo_upstream.port)])
    ca._cache.clear()
    ca.write_leaf(("*.gw.test", "gw.test"), cert, key)
    assert serial("beta-9000.gw.test") is None  # nothing is watched often enough to notice yet
    gw.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: serial("beta-9000.gw.test") not in (None, first), timeout=5, what="reloaded")
    held.sendall(b"two")
    assert held.recv(10) == b"two"
    assert gw.metric("gateway_config_reloads_total", outcome="success") >= 1

    # A broken configuration is refused; everything keeps working as before.
    with open(os.path.join(workdir, "gateway.yaml"), "w") as f:
        f.write("tls: {handshake_timeout: -5}\n")
    gw.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: gw.metric("gateway_config_reloads_total", outcome="failure") >= 1, timeout=5)
    gw.wait_logged("reload refused, the running configuration stays")
    assert serial("beta-9000.gw.test") is not None
    held.sendall(b"three")
    assert held.recv(10) == b"three"
    held.close()


class SocketLauncher:
    """What systemd's socket units do: hold the listening sockets and pass them (LISTEN_FDS)
    to each gateway process it starts, so a restart never closes them."""

    def __init__(self, workdir: str, directory: str) -> None:
        self.socks = []
        for _ in range(2):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", 0))
            s.listen(1024)
            self.socks.append(s)
        self.tls_port = self.socks[0].getsockname()[1]
        self.plain_port = self.socks[1].getsockname()[1]
        self.workdir = workdir
        self.directory = directory
        self.log = open(os.path.join(workdir, "launcher.log"), "ab")

    def spawn(self) -> subprocess.Popen:
        fds = [s.fileno() for s in self.socks]

        def child() -> None:
            import fcntl
            # Move the sockets out of the way first: they may already sit on 3 and 4.
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
            for target, fd in enumerate(high, start=3):
                os.dup2(fd, target)
                os.set_inheritable(target, True)
                os.close(fd)
            os.environ["LISTEN_FDS"] = "2"
            os.environ["LISTEN_FDNAMES"] = "tls:plain"  # FileDescriptorName= in the .socket unit
            os.environ["LISTEN_PID"] = str(os.getpid())
        os.environ["PYTHONPATH"] = REPO
        return subprocess.Popen(
            [twistd_command(), "-n", "--pidfile=", "gateway",
             "--tls-port", "systemd:domain=INET:name=tls", "--plain-port", "systemd:domain=INET:name=plain",
             "--directory", self.directory, "--state-dir", os.path.join(self.workdir, "state"),
             "--workers", "1"],
            # preexec_fn runs before the child closes other descriptors: keep 3 and 4 too.
            cwd=self.workdir, preexec_fn=child, pass_fds=sorted(set(fds) | {3, 4}), env=None,
            stdout=self.log, stderr=subprocess.STDOUT)

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.log.close()


def test_socket_activated_restart_refuses_no_connection(echo_upstream, workdir):
    import yaml
    directory = os.path.join(workdir, "shards.yaml")
    with open(directory, "w") as f:
        yaml.safe_dump({"shards": [shard("e", "echo", 9000, echo_upstream.port)]}, f)
    launcher = SocketLauncher(workdir, directory)
    first = launcher.spawn()
    second = None
    ca = os.path.join(workdir, "state", "local-ca.pem")
    try:
        wait_for(lambda: os.path.exists(ca), timeout=20)

        def one() -> bool:
            ctx = ssl.create_default_context(cafile=ca)
            with ctx.wrap_socket(socket.create_connection(("127.0.0.1", launcher.tls_port), timeout=10),
                                 server_hostname="echo-9000.localhost") as t:
                t.sendall(b"ping")
                return t.recv(10) == b"ping"
        wait_for(lambda: _try(one), timeout=20, what="first gateway serving")
        failures, successes = 0, 0
        # Restart: start the new process on the same sockets, then stop the old one.
        second = launcher.spawn()
        first.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while first.poll() is None and time.monotonic() < deadline:
            if _try(one):
                successes += 1
            else:
                failures += 1
        assert first.poll() == 0
        for _ in range(20):
            if _try(one):
                successes += 1
            else:
                failures += 1
        assert failures == 0, f"{failures} of {failures + successes} connections failed during the restart"
        assert successes > 20
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(20)
        launcher.close()


def _try(fn) -> bool:
    try:
        return fn()
    except (OSError, ssl.SSLError):
        return False


def _proxied_request(gw, header: bytes, name: str) -> bytes:
    raw = socket.create_connection(("127.0.0.1", gw.tls_port), timeout=10)
    raw.sendall(header)
    ctx = ssl.create_default_context(cafile=gw.ca_path)
    ctx.set_alpn_protocols(["http/1.1"])
    with ctx.wrap_socket(raw, server_hostname=name) as tls:
        tls.sendall(f"GET /who HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        out = b""
        while chunk := tls.recv(65536):
            out += chunk
    return out


def test_proxy_protocol_from_trusted_and_untrusted_balancers(start_gateway, workdir):
    web = RecordingHTTPServer()
    try:
        shards = [shard("w", "web", 8080, web.port, protocol="http/1.1")]
        gw = start_gateway(shards, config={"proxy_protocol": {"trusted": ["127.0.0.0/8"]}})
        name = "web-8080.localhost"
        out = _proxied_request(gw, b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 443\r\n", name)
        assert out.startswith(b"HTTP/1.1 200")
        assert web.seen[-1]["headers"]["x-forwarded-for"] == "203.0.113.7"
        out = _proxied_request(gw, build_v2("2001:db8::5", 40001, "::1", 443), name)
        assert out.startswith(b"HTTP/1.1 200")
        assert web.seen[-1]["headers"]["x-forwarded-for"] == "2001:db8::5"
        assert any(e.get("client") == "203.0.113.7:40000" for e in gw.events if e.get("event_kind") == "access")
        # A trusted balancer that sends no header is refused.
        with pytest.raises((ssl.SSLError, OSError)):
            _proxied_request(gw, b"", name)
        wait_for(lambda: gw.metric("gateway_connections_refused_total", reason="proxy_header") >= 1)

        # From a peer that is not trusted, the header is refused.
        os.makedirs(os.path.join(workdir, "second"))
        gw2 = Gateway(os.path.join(workdir, "second"), shards)
        try:
            with pytest.raises((ssl.SSLError, OSError)):
                _proxied_request(gw2, b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 443\r\n", name)
            wait_for(lambda: gw2.metric("gateway_connections_refused_total", reason="untrusted_proxy_header") >= 1)
        finally:
            gw2.stop()
    finally:
        web.close()


def test_logs_never_contain_tokens_or_cookies(start_gateway):
    web = RecordingHTTPServer()
    try:
        secret = "test-secret-0123456789-abcdefghijklmnop"
        gw = start_gateway([shard("p", "app", 8080, web.port, protocol="http/1.1", public=False,
                                  task="tasks/app")],
                           config={"auth": {"jwt_secret": secret}})
        good = token()
        bad = good[:-4] + "AAAA"
        for t in (good, bad):
            curl(gw, "app-8080.localhost", f"/x?token={t}", "-H", f"Authorization: Bearer {t}",
                 "-H", f"Cookie: __Host-gateway-token={t}; session=s3cr3tcookie")
        curl(gw, "app-8080.localhost", f"/auth-redirect?token={good}&orig_url=https%3A%2F%2Fevil.test%2F")
        gw.stop()
        text = json.dumps(gw.events)
        for t in (good, bad, "s3cr3tcookie", secret):
            assert t not in text
    finally:
        web.close()


def test_workers_share_the_listener_restart_and_drain(start_gateway, echo_upstream):
    gw = start_gateway([shard("e", "echo", 9000, echo_upstream.port)], workers=2)

    def workers() -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(gw.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]
    wait_for(lambda: len(workers()) == 2, timeout=20, what="two workers")
    for _ in range(40):
        assert _echo_ok(gw)
    # One /metrics adds up both workers.
    wait_for(lambda: gw.metric("gateway_connections_accepted_total", listener="tls") >= 40, timeout=10)
    assert gw.metric("gateway_workers") == 2
    # A worker that dies is replaced; the listener keeps serving meanwhile.
    os.kill(workers()[0], signal.SIGKILL)
    assert _echo_ok(gw)
    wait_for(lambda: gw.metric("gateway_worker_restarts_total") == 1 and len(workers()) == 2, timeout=20,
             what="worker restarted")
    wait_for(lambda: gw.http_get("/readyz")[0] == 200, timeout=20)
    assert _echo_ok(gw)
    # As systemd does by default (KillMode=control-group): SIGTERM to the supervisor and to
    # every worker at once. Workers then get it twice (again from the supervisor): a clean
    # drain all the same, and no crash in the logs (checked by the fixture).  The workers are
    # signalled first: signalled after the supervisor, one that had already drained and exited
    # could not be signalled at all.
    for pid in workers():
        os.kill(pid, signal.SIGTERM)
    gw.proc.send_signal(signal.SIGTERM)
    assert gw.proc.wait(40) == 0


def test_uvloop_reactor_reaches_every_worker(start_gateway, echo_upstream):
    pytest.importorskip("uvloop")
    gw = start_gateway([shard("e", "echo", 9000, echo_upstream.port)], workers=2, reactor="uvloop")

    def worker_commands() -> list[str]:
        out = subprocess.run(["pgrep", "-P", str(gw.proc.pid)], capture_output=True, text=True)
        commands = []
        for pid in out.stdout.split():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    commands.append(f.read().replace(b"\0", b" ").decode())
            except FileNotFoundError:
                pass
        return commands
    wait_for(lambda: len(worker_commands()) == 2, timeout=20, what="two workers")
    assert all(" -r uvloop " in command for command in worker_commands())
    gw.wait_logged("reactor class: twisted.internet.asyncioreactor.AsyncioSelectorReactor")
    for _ in range(20):
        assert _echo_ok(gw)
