"""
End to end: the read-only admin API on the plain port (/api/v1/*) against a running gateway
with a directory, a certificate file and refused names; the Redis provider's status (version,
lag, degraded while Redis is away); the supervisor of two workers merging
its workers' answers; the admin token required where configured and never logged.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import ssl
import subprocess
import urllib.error
import urllib.request

import pytest
from cryptography import x509
from openapi_spec_validator import validate

from support import REPO, shard, twistd_command, wait_for

from twisted_gateway.tls.localca import LocalCA

HOST = "gw.test"


def api(gw, path: str, token: str | None = None, basic: str | None = None) -> tuple[int, dict, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{gw.plain_port}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if basic is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(basic.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            body = r.read()
            return r.status, dict(r.headers), json.loads(body) if body.startswith(b"{") else {}
    except urllib.error.HTTPError as e:
        body = e.read()
        return e.code, dict(e.headers), json.loads(body) if body.startswith(b"{") else {}


@pytest.fixture
def certificate(workdir):
    """A certificate file for *.gw.test and gw.test from an operator's CA."""
    ca = LocalCA(os.path.join(workdir, "operator-ca"))
    cert, key = os.path.join(workdir, "wild.pem"), os.path.join(workdir, "wild-key.pem")
    ca.write_leaf((f"*.{HOST}", HOST), cert, key)
    with open(cert, "rb") as f:
        leaf = x509.load_pem_x509_certificates(f.read())[0]
    return ca, cert, key, leaf


def _args(certificate) -> list[str]:
    _, cert, key, _ = certificate
    return ["--hostname", HOST, "--tls-certificate", cert, "--tls-private-key", key]


def _echo(gw, ca: LocalCA, name: str, payload: bytes) -> None:
    ctx = ssl.create_default_context(cafile=ca.cert_path)
    with socket.create_connection(("127.0.0.1", gw.tls_port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            tls.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = tls.recv(65536)
                assert chunk
                got += chunk
            assert got == payload


def _refused(gw, ca: LocalCA, name: str) -> None:
    ctx = ssl.create_default_context(cafile=ca.cert_path)
    with socket.create_connection(("127.0.0.1", gw.tls_port), timeout=10) as raw:
        with pytest.raises(ssl.SSLError):
            ctx.wrap_socket(raw, server_hostname=name)


def _port(doc: dict, shard_id: str, number: int) -> dict:
    for s in doc["shards"]:
        if s["id"] == shard_id:
            for p in s["ports"]:
                if p["port"] == number:
                    return p
    raise AssertionError(f"{shard_id}:{number} not in {doc}")


def test_admin_api_answers(start_gateway, echo_upstream, certificate):
    ca, cert_path, _, leaf = certificate
    gw = start_gateway([shard("alpha-0", "alpha", 9000, echo_upstream.port),
                        shard("beta-0", "beta", 7000, echo_upstream.port)], args=_args(certificate))

    payloads = [b"a" * 1000, b"b" * 20000, b"c" * 3]
    for p in payloads:
        _echo(gw, ca, f"alpha-9000.{HOST}", p)
    _refused(gw, ca, f"nosuch-9000.{HOST}")
    _refused(gw, ca, f"alpha-1234.{HOST}")

    # Held open: counted as active until it closes.
    ctx = ssl.create_default_context(cafile=ca.cert_path)
    held = ctx.wrap_socket(socket.create_connection(("127.0.0.1", gw.tls_port), timeout=10),
                           server_hostname=f"beta-7000.{HOST}")
    held.sendall(b"hold")
    assert held.recv(10) == b"hold"
    code, _, routes = api(gw, "/api/v1/routes")
    assert code == 200
    alpha, beta = _port(routes, "alpha-0", 9000), _port(routes, "beta-0", 7000)
    sent = sum(len(p) for p in payloads)
    assert (alpha["connections"], alpha["bytes_up"], alpha["bytes_down"]) == (3, sent, sent)
    assert alpha["active_connections"] == 0
    assert alpha["name"] == f"alpha-9000.{HOST}" and alpha["target"] == f"127.0.0.1:{echo_upstream.port}"
    # The live splice's bytes are brought up to date when asked.
    assert (beta["active_connections"], beta["connections"], beta["bytes_up"], beta["bytes_down"]) == (1, 1, 4, 4)
    assert routes["directory"] == {"loaded": True, "shards": 2}
    assert routes["totals"]["connections"] == 4 and routes["totals"]["bytes_up"] == sent + 4
    held.close()
    wait_for(lambda: _port(api(gw, "/api/v1/routes")[2], "beta-0", 7000)["active_connections"] == 0,
             10, what="the held connection closed")

    code, _, refusals = api(gw, "/api/v1/refusals")
    assert code == 200 and refusals["recorded"] == 2
    newest, older = refusals["refusals"][:2]
    assert (newest["sni"], newest["reason"], newest["client"]) == (f"alpha-1234.{HOST}", "unknown_port", "127.0.0.1")
    assert (older["sni"], older["reason"], older["client"]) == (f"nosuch-9000.{HOST}", "unknown_shard", "127.0.0.1")
    assert "nosuch" in older["detail"] and newest["time"] >= older["time"]

    code, _, certs = api(gw, "/api/v1/certificates")
    assert code == 200
    [mine] = [c for c in certs["certificates"] if c["source"] == "file"]
    assert mine["names"] == [f"*.{HOST}", HOST] and mine["path"] == cert_path
    assert mine["not_after"] == leaf.not_valid_after_utc.isoformat()
    assert mine["not_after_timestamp"] == leaf.not_valid_after_utc.timestamp()
    assert mine["serial"] == format(leaf.serial_number, "x") and mine["issuer"].startswith("twisted-gateway local CA")

    code, _, workers = api(gw, "/api/v1/workers")
    assert code == 200 and workers["supervisor"] is None
    [me] = workers["workers"]
    assert me["pid"] == gw.proc.pid and me["restarts"] == 0 and me["uptime_seconds"] > 0

    code, _, providers = api(gw, "/api/v1/providers")
    [provider] = providers["providers"]
    assert provider["kind"] == "file" and provider["source"] == gw.directory_path
    assert provider["state"] == "ok" and provider["shards"] == 2 and provider["last_error"] is None
    # A broken directory file: refused, the last good directory stays, the provider says so.
    with open(gw.directory_path, "w") as f:
        f.write("shards: [oops")
    wait_for(lambda: api(gw, "/api/v1/providers")[2]["providers"][0]["state"] == "error", 10,
             what="the provider's error state")
    assert "YAML" in api(gw, "/api/v1/providers")[2]["providers"][0]["last_error"]

    code, _, doc = api(gw, "/api/v1/openapi.json")
    assert code == 200
    validate(doc)
    assert set(doc["paths"]) == {f"/api/v1/{v}" for v in ("routes", "certificates", "refusals", "workers",
                                                           "providers", "openapi.json")}
    assert api(gw, "/api/v1/nothing")[0] == 404


def test_supervisor_merges_its_workers(start_gateway, echo_upstream, certificate, workdir):
    ca, _, _, leaf = certificate
    token_file = os.path.join(workdir, "admin-token")
    with open(token_file, "w") as f:
        f.write("merge-token-7f3a\n")
    gw = start_gateway([shard("alpha-0", "alpha", 9000, echo_upstream.port)], args=_args(certificate),
                       config={"admin": {"token_file": token_file}}, workers=2)
    token = "merge-token-7f3a"
    code, _, workers = api(gw, "/api/v1/workers", token)
    assert code == 200 and workers["supervisor"]["pid"] == gw.proc.pid
    pids = [w["pid"] for w in workers["workers"]]
    assert len(set(pids)) == 2 and gw.proc.pid not in pids and all(w["answered"] for w in workers["workers"])

    # Each connection is accepted by whichever worker; the supervisor's counts add them up.
    for i in range(8):
        _echo(gw, ca, f"alpha-9000.{HOST}", b"x" * (100 + i))
    for i in range(4):
        _refused(gw, ca, f"ghost{i}-9000.{HOST}")
    code, _, routes = api(gw, "/api/v1/routes", token)
    alpha = _port(routes, "alpha-0", 9000)
    sent = sum(100 + i for i in range(8))
    assert (alpha["connections"], alpha["bytes_up"], alpha["bytes_down"]) == (8, sent, sent)
    assert routes["workers_answered"] == 2 and len(routes["shards"]) == 1

    code, _, refusals = api(gw, "/api/v1/refusals", token)
    assert refusals["recorded"] == 4
    assert sorted(r["sni"] for r in refusals["refusals"]) == [f"ghost{i}-9000.{HOST}" for i in range(4)]
    times = [r["time"] for r in refusals["refusals"]]
    assert times == sorted(times, reverse=True) and {r["worker"] for r in refusals["refusals"]} <= {0, 1}

    code, _, certs = api(gw, "/api/v1/certificates", token)
    files = [c for c in certs["certificates"] if c["source"] == "file"]
    assert len(files) == 1 and files[0]["not_after"] == leaf.not_valid_after_utc.isoformat()

    code, _, providers = api(gw, "/api/v1/providers", token)
    [provider] = providers["providers"]
    assert provider["kind"] == "file" and sorted(w["worker"] for w in provider["workers"]) == [0, 1]

    # A worker killed: restarted, and the restart is counted against its index.
    os.kill(pids[0], signal.SIGKILL)

    def restarted():
        doc = api(gw, "/api/v1/workers", token)[2]
        w0 = doc["workers"][0]
        return w0["restarts"] == 1 and w0["pid"] not in (None, pids[0]) and w0["answered"] and doc
    doc = wait_for(restarted, 30, interval=0.2, what="worker 0 restarted")
    assert doc["supervisor"]["restarts"] == 1 and doc["workers"][1]["restarts"] == 0
    assert api(gw, "/api/v1/routes")[0] == 401


def test_admin_token_required_and_never_logged(start_gateway, echo_upstream, workdir):
    token = "s3cret-admin-token-0d9e1c"
    token_file = os.path.join(workdir, "admin-token")
    with open(token_file, "w") as f:
        f.write(token + "\n")
    gw = start_gateway([shard("alpha-0", "alpha", 9000, echo_upstream.port)],
                       config={"admin": {"token_file": token_file}})
    for path in ("/api/v1/routes", "/api/v1/refusals", "/api/v1/openapi.json", "/", "/static/dashboard.js"):
        code, headers, _ = api(gw, path)
        assert code == 401, path
        assert "Bearer" in headers.get("WWW-Authenticate", "") and "no-store" in headers.get("Cache-Control", "")
        assert api(gw, path, "wrong-token")[0] == 401
        assert api(gw, path, token[:-1])[0] == 401
        assert api(gw, path, token)[0] == 200, path
    # A browser's Basic credentials: any user name, the token as password.
    assert api(gw, "/api/v1/workers", basic=f"operator:{token}")[0] == 200
    assert api(gw, "/api/v1/workers", basic="operator:guess")[0] == 401
    # Open for load balancers, Prometheus and the CA.
    for path in ("/healthz", "/readyz", "/metrics"):
        assert gw.http_get(path)[0] == 200, path
    assert gw.http_get("/.well-known/acme-challenge/abc")[0] == 404
    # A token in the query string is not a credential (and not logged either).
    assert api(gw, f"/api/v1/routes?token={token}")[0] == 401

    gw.wait_logged("admin request refused: GET /api/v1/routes from 127.0.0.1: wrong token")
    # Rotated: the file is read again, the old token stops working.
    with open(token_file, "w") as f:
        f.write("rotated-token-55\n")
    wait_for(lambda: api(gw, "/api/v1/routes", "rotated-token-55")[0] == 200, 5, what="rotated token")
    assert api(gw, "/api/v1/routes", token)[0] == 401
    gw.stop()
    everything = json.dumps(gw.events)
    assert token not in everything and "rotated-token-55" not in everything
    assert token[:12] not in everything


def test_admin_token_can_protect_metrics(start_gateway, echo_upstream, workdir):
    token_file = os.path.join(workdir, "admin-token")
    with open(token_file, "w") as f:
        f.write("metrics-token\n")
    gw = start_gateway([shard("alpha-0", "alpha", 9000, echo_upstream.port)],
                       config={"admin": {"token_file": token_file, "protect_metrics": True}})
    assert gw.http_get("/metrics")[0] == 401
    assert gw.http_get("/readyz")[0] == 200 and gw.http_get("/healthz")[0] == 200
    request = urllib.request.Request(f"http://127.0.0.1:{gw.plain_port}/metrics",
                                     headers={"Authorization": "Bearer metrics-token"})
    with urllib.request.urlopen(request, timeout=10) as r:
        assert r.status == 200 and b"gateway_connections_active" in r.read()


def test_redis_provider_status(start_gateway, echo_upstream, redis_env):
    server = redis_env.server()
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    put = subprocess.run([twistd_command(), "gateway", "--redis", server.url, "directory", "put",
                          json.dumps(shard("cache-0", "cache", 7, echo_upstream.port))],
                         env=env, capture_output=True, text=True, timeout=30)
    assert put.returncode == 0, put.stderr
    # demo=True: no --directory, so the directory comes from Redis.
    gw = start_gateway(demo=True, args=["--redis", server.url], wait_ready=False)
    wait_for(lambda: gw.http_get("/readyz")[0] == 200, 20, what="gateway ready")

    def provider():
        return api(gw, "/api/v1/providers")[2]["providers"][0]
    wait_for(lambda: provider()["version"] == 1, 10, what="version 1 in force")
    p = provider()
    assert (p["kind"], p["state"], p["shards"], p["link"]["state"]) == ("redis", "ok", 1, "up")
    assert p["source"] == p["link"]["target"]
    # A change written by the tool: in force within moments, with its lag measured.
    subprocess.run([twistd_command(), "gateway", "--redis", server.url, "directory", "put",
                    json.dumps(shard("cache-1", "cache2", 7, echo_upstream.port))],
                   env=env, capture_output=True, text=True, timeout=30, check=True)
    wait_for(lambda: provider()["version"] == 2, 10, what="version 2 in force")
    p = provider()
    assert p["shards"] == 2 and p["lag_seconds"] is not None and 0 <= p["lag_seconds"] < 5
    server.stop()
    wait_for(lambda: provider()["state"] == "degraded", 15, what="degraded while Redis is away")
    assert provider()["version"] == 2 and provider()["link"]["state"] == "down"
