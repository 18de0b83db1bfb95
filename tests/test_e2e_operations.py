"""
End to end: directory hot reload, the admin app, configuration errors, the built-in demo.
"""

from __future__ import annotations

import json
import os
import subprocess

from support import REPO, shard, twistd_command, wait_for, which


def _can_route(gw, name: str) -> bool:
    return gw.echoes(name)


def test_directory_hot_reload(start_gateway, echo_upstream):
    gw = start_gateway([shard("a1", "alpha", 9000, echo_upstream.port)])
    assert _can_route(gw, "alpha-9000.localhost")
    assert not _can_route(gw, "beta-9000.localhost")

    # An open connection to a shard that gets edited keeps working.
    held = gw.connect("alpha-9000.localhost")
    held.sendall(b"one")
    assert held.recv(10) == b"one"

    gw.write_directory([
        shard("a1", "alpha", 9000, echo_upstream.port, extra_ports=[
            {"port": 9100, "protocol": "tcp", "public": True, "upstream_port": echo_upstream.port}]),
        shard("b1", "beta", 9000, echo_upstream.port),
    ])
    wait_for(lambda: _can_route(gw, "beta-9000.localhost"), timeout=2.5, what="new shard routable")
    assert _can_route(gw, "alpha-9100.localhost")
    held.sendall(b"two")
    assert held.recv(10) == b"two"

    # A broken edit is refused, logged, counted, and the last good directory stays.
    with open(gw.directory_path, "w") as f:
        f.write("shards:\n  - id: broken\n    ports: [{port: 70000}]\n")
    wait_for(lambda: gw.logged("directory update from"), timeout=2.5, what="refusal logged")
    gw.wait_logged("refused, keeping the last good directory")
    assert gw.metric("gateway_directory_reloads_total", outcome="failure") >= 1
    assert gw.metric("gateway_directory_last_reload_success") == 0
    assert _can_route(gw, "beta-9000.localhost")
    assert gw.metric("gateway_directory_shards") == 2
    held.sendall(b"three")
    assert held.recv(10) == b"three"
    held.close()


def test_pinned_name_reaches_the_one_shard(start_gateway):
    from support import Upstream

    def tagged(tag: bytes):
        def handler(conn):
            conn.recv(100)
            conn.sendall(tag)
        return handler
    a, b = Upstream(tagged(b"A")), Upstream(tagged(b"B"))
    try:
        gw = start_gateway([
            shard("s-a", "db", 5432, a.port, key_begin=0, rclock_begin=0, primary=True),
            shard("s-b", "db", 5432, b.port, key_begin=100, rclock_begin=7, primary=False),
        ])
        for name, tag in [("db-100-7-5432.localhost", b"B"), ("db-0-0-5432.localhost", b"A"),
                          ("db-5432.localhost", b"A")]:
            with gw.connect(name) as tls:
                tls.sendall(b"?")
                assert tls.recv(10) == tag, name
    finally:
        a.close()
        b.close()


def test_admin_endpoints_and_metrics(start_gateway, echo_upstream):
    gw = start_gateway([shard("a1", "alpha", 9000, echo_upstream.port)])
    assert gw.http_get("/healthz") == (200, "ok\n")
    status, body = gw.http_get("/readyz")
    assert status == 200 and json.loads(body)["ready"] is True
    with gw.connect("alpha-9000.localhost") as tls:
        tls.sendall(b"12345")
        assert tls.recv(10) == b"12345"
        # Live byte counters are visible while the connection is open.
        assert gw.metric("gateway_relayed_bytes_total", direction="upstream") >= 5
        assert gw.metric("gateway_connections_active") >= 1
    wait_for(lambda: gw.metric("gateway_connections_closed_total", outcome="tcp") >= 1)
    assert gw.metric("gateway_connections_accepted_total", listener="tls") >= 1
    assert gw.metric("gateway_upstream_connect_seconds_count") >= 1
    assert gw.metric("gateway_directory_shards") == 1
    assert gw.metric("gateway_certificate_not_after_timestamp_seconds") == 0  # local CA: per name
    status, _ = gw.http_get("/nope")
    assert status == 404


def test_readyz_is_503_until_the_directory_loads(start_gateway, echo_upstream):
    gw = start_gateway(None, wait_ready=False)
    status, body = gw.http_get("/readyz")
    assert status == 503
    assert json.loads(body)["reasons"] == ["shard directory not loaded"]
    gw.write_directory([shard("a1", "alpha", 9000, echo_upstream.port)])
    wait_for(lambda: gw.http_get("/readyz")[0] == 200, timeout=2.5, what="ready after the file appears")


def _run_gateway_expecting_exit(workdir: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([twistd_command(), "-n", "--pidfile=", "gateway", *args], cwd=workdir,
                          env=env, capture_output=True, text=True, timeout=60)


def test_config_bad_key_and_bad_value_exit_2_with_one_line(workdir):
    path = os.path.join(workdir, "gateway.yaml")
    with open(path, "w") as f:
        f.write("tls:\n  handshake_timeot: 3\n")
    out = _run_gateway_expecting_exit(workdir, "--config", path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "gateway.yaml" in lines[0] and "tls.handshake_timeot" in lines[0] and "unknown key" in lines[0]

    with open(path, "w") as f:
        f.write("tls:\n  handshake_timeout: soon\n")
    out = _run_gateway_expecting_exit(workdir, "--config", path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "tls.handshake_timeout" in lines[0] and "expected a positive number" in lines[0]

    out = _run_gateway_expecting_exit(workdir, "--log-format", "xml")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "gateway: command line: --log-format: expected one of text, json, got 'xml'"]


def test_builtin_demo_shard(start_gateway):
    gw = start_gateway(demo=True)
    with gw.connect("demo-7.localhost") as tls:
        tls.sendall(b"echo me")
        assert tls.recv(100) == b"echo me"
    out = subprocess.run([which("curl"), "-sS", "--cacert", gw.ca_path, "--resolve",
                          f"demo-80.localhost:{gw.tls_port}:127.0.0.1",
                          f"https://demo-80.localhost:{gw.tls_port}/"],
                         capture_output=True, text=True, timeout=20)
    assert out.stdout == "Hello from the twisted-gateway demo shard!\n", out.stderr
