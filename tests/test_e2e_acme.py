"""
End to end: ACME certificates from Debian's pebble, validated against the real gateway.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import time

import pytest

from acme_env import Pebble
from support import REPO, free_port, shard, twistd_command, wait_for, which


def _acme_config(pebble: Pebble, **acme) -> dict:
    return {"acme": {"enabled": True, "ca_server": pebble.directory_url, "ca_bundle": pebble.ca_path,
                     "email": "ops@example.test", "check_interval": 0.5, "retry_initial": 1.0,
                     "retry_max": 4.0, **acme}}


def _fixed_ports() -> tuple[int, int]:
    return free_port(), free_port()


def _start(start_gateway, shards, tls_port, plain_port, config, hostname="localhost", **kw):
    return start_gateway(shards, config=config, args=[
        "--tls-port", f"tcp:{tls_port}:interface=127.0.0.1",
        "--plain-port", f"tcp:{plain_port}:interface=127.0.0.1", "--hostname", hostname], **kw)


def _verify(gw, name: str, root_pem: str, workdir: str) -> tuple[int, bytes]:
    root = os.path.join(workdir, f"root-{free_port()}.pem")
    with open(root, "w") as f:
        f.write(root_pem)
    out = subprocess.run([which("openssl"), "s_client", "-connect", f"127.0.0.1:{gw.tls_port}",
                          "-servername", name, "-verify_hostname", name, "-CAfile", root,
                          "-verify_return_error"], input=b"", capture_output=True, timeout=20)
    return out.returncode, out.stdout + out.stderr


def _issued(gw, name: str, root_pem: str, workdir: str) -> bool:
    code, output = _verify(gw, name, root_pem, workdir)
    return code == 0 and b"Verify return code: 0 (ok)" in output and b"Pebble" in output


@pytest.fixture
def pebble_factory(workdir):
    started: list[Pebble] = []

    def start(*args, **kwargs) -> Pebble:
        p = Pebble(workdir, *args, **kwargs)
        started.append(p)
        return p
    yield start
    for p in started:
        p.stop()


def test_http01_on_demand_issue_and_serve(start_gateway, pebble_factory, echo_upstream, workdir):
    tls_port, plain_port = _fixed_ports()
    pebble = pebble_factory(http_port=plain_port, tls_port=tls_port)
    gw = _start(start_gateway, [shard("a", "alpha", 9000, echo_upstream.port)], tls_port, plain_port,
                _acme_config(pebble, challenge="http-01", on_demand="directory", on_demand_wait=20))
    name = "alpha-9000.localhost"
    # The first handshake waits for the on-demand certificate, then gets it.
    wait_for(lambda: _issued(gw, name, pebble.root_pem(), workdir), timeout=60, what="certificate issued")
    assert gw.metric("gateway_acme_issuances_total", challenge="http-01", outcome="success") == 1
    assert gw.metric("gateway_certificate_not_after_timestamp_seconds", name=name) > time.time()
    # A name not in the directory never reaches pebble, however often it is tried.
    orders_before = pebble.count("order")
    for _ in range(5):
        assert not _issued(gw, "ghost-9000.localhost", pebble.root_pem(), workdir)
        # An HTTP client is answered with an error page, so the certificate lookup (and the
        # on-demand policy) runs for the unknown name too.
        out = subprocess.run([which("curl"), "-sk", "-o", "/dev/null", "-w", "%{http_code}", "--resolve",
                              f"ghost-9000.localhost:{gw.tls_port}:127.0.0.1",
                              f"https://ghost-9000.localhost:{gw.tls_port}/"],
                             capture_output=True, text=True, timeout=20)
        assert out.stdout == "404"
    assert pebble.count("order") == orders_before
    assert gw.metric("gateway_acme_on_demand_total", decision="not_in_directory") >= 1
    # The stored certificate is listed by the CLI.
    out = subprocess.run([twistd_command(), "-n", "--pidfile=", "gateway", "--state-dir", gw.state_dir,
                          "certs", "list"], capture_output=True, text=True, timeout=30,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0 and name in out.stdout and "Pebble" in out.stdout


def test_tls_alpn01_with_live_traffic_and_restart_issues_nothing(start_gateway, pebble_factory,
                                                                  echo_upstream, workdir):
    tls_port, plain_port = _fixed_ports()
    pebble = pebble_factory(http_port=plain_port, tls_port=tls_port)
    config = _acme_config(pebble, challenge="tls-alpn-01", names=["beta-9000.localhost"])
    gw = _start(start_gateway, [shard("b", "beta", 9000, echo_upstream.port)], tls_port, plain_port, config)
    # An ordinary connection is open and working throughout the validation on the same port.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    live = ctx.wrap_socket(socket.create_connection(("127.0.0.1", gw.tls_port), timeout=10),
                           server_hostname="beta-9000.localhost")
    live.sendall(b"before")
    assert live.recv(100) == b"before"
    wait_for(lambda: _issued(gw, "beta-9000.localhost", pebble.root_pem(), workdir), timeout=60,
             what="tls-alpn-01 certificate")
    live.sendall(b"after")
    assert live.recv(100) == b"after"
    live.close()
    assert gw.metric("gateway_acme_tls_alpn_handshakes_total") >= 1
    assert gw.metric("gateway_acme_issuances_total", challenge="tls-alpn-01", outcome="success") == 1
    gw.stop()

    # A restart with the stored certificate makes no ACME request at all.
    requests_before = len(pebble.log_lines)
    gw2 = _start(start_gateway, None, tls_port, plain_port, config)
    assert _issued(gw2, "beta-9000.localhost", pebble.root_pem(), workdir)
    assert gw2.metric("gateway_acme_issuances_total", challenge="tls-alpn-01", outcome="success") == 0
    assert len(pebble.log_lines) == requests_before


def test_acme_tls1_for_a_name_without_our_challenge_is_an_ordinary_connection(start_gateway, echo_upstream):
    gw = start_gateway([shard("b", "beta", 9000, echo_upstream.port)])
    ctx = ssl.create_default_context(cafile=gw.ca_path)
    ctx.set_alpn_protocols(["acme-tls/1"])
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", gw.tls_port), timeout=10),
                         server_hostname="beta-9000.localhost") as tls:
        assert tls.selected_alpn_protocol() is None
        tls.sendall(b"passthrough")
        assert tls.recv(100) == b"passthrough"


def test_renewal_and_corrupt_store(start_gateway, pebble_factory, echo_upstream, workdir):
    tls_port, plain_port = _fixed_ports()
    pebble = pebble_factory(http_port=plain_port, tls_port=tls_port, validity=9)
    config = _acme_config(pebble, challenge="http-01", names=["gamma-9000.localhost"])
    gw = _start(start_gateway, [shard("g", "gamma", 9000, echo_upstream.port)], tls_port, plain_port, config)

    def serial() -> int | None:
        try:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            with ctx.wrap_socket(socket.create_connection(("127.0.0.1", gw.tls_port), timeout=5),
                                 server_hostname="gamma-9000.localhost") as tls:
                from cryptography import x509
                cert = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
                return cert.serial_number if "Pebble" in cert.issuer.rfc4514_string() else None
        except OSError:
            return None
    first = wait_for(serial, timeout=60, what="first certificate")
    # 9 s lifetime, renewal at two thirds: a new certificate arrives on its own.
    wait_for(lambda: serial() not in (None, first), timeout=30, what="renewed certificate")
    assert gw.metric("gateway_acme_issuances_total", challenge="http-01", outcome="success") >= 2
    gw.stop()

    # Corrupt the stored certificate: detected at start, logged, replaced.
    cert_dir = os.path.join(gw.state_dir, "acme", "certificates")
    stored = [f for f in os.listdir(cert_dir) if f.endswith(".pem")]
    assert stored == ["gamma-9000.localhost.pem"]
    with open(os.path.join(cert_dir, stored[0]), "w") as f:
        f.write("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    gw2 = _start(start_gateway, None, tls_port, plain_port, config)
    gw2.wait_logged("is unusable and will be replaced")
    wait_for(lambda: gw2.metric("gateway_acme_issuances_total", challenge="http-01", outcome="success") >= 1,
             timeout=60, what="replacement issued\n" + gw2.output())
    wait_for(lambda: serial() is not None, timeout=10)
    key_path = os.path.join(cert_dir, "gamma-9000.localhost.key")
    assert oct(os.stat(key_path).st_mode & 0o777) == "0o600"


def test_pebble_down_at_start_then_back(start_gateway, pebble_factory, echo_upstream, workdir):
    tls_port, plain_port = _fixed_ports()
    # The CA's address and trust are known, but it is not running when the gateway starts.
    pebble = pebble_factory(http_port=plain_port, tls_port=tls_port, start=False)
    config = _acme_config(pebble, challenge="http-01", names=["delta-9000.localhost"],
                          retry_initial=0.5, retry_max=2.0)
    gw = _start(start_gateway, [shard("d", "delta", 9000, echo_upstream.port)], tls_port, plain_port, config)
    # Served with the fallback (the local CA) meanwhile.
    with gw.connect("delta-9000.localhost") as tls:
        tls.sendall(b"x")
        assert tls.recv(10) == b"x"
    wait_for(lambda: gw.metric("gateway_acme_issuances_total", challenge="http-01", outcome="failure") >= 3,
             timeout=20, what="failed attempts")
    started = time.monotonic()
    failures = gw.metric("gateway_acme_issuances_total", challenge="http-01", outcome="failure")
    status, body = gw.http_get("/readyz")
    assert status == 200 and '"missing": ["delta-9000.localhost"]' in body
    # Backoff: at most one attempt per retry_max (2 s, jittered down to 1 s) from now on.
    time_window = 3.0
    wait_for(lambda: time.monotonic() - started >= time_window, timeout=5)
    later = gw.metric("gateway_acme_issuances_total", challenge="http-01", outcome="failure")
    assert later - failures <= time_window / 1.0 + 1, "retries are not backing off"
    pebble.start()
    wait_for(lambda: _issued(gw, "delta-9000.localhost", pebble.root_pem(), workdir), timeout=30,
             what="issued once the CA is back")
    status, body = gw.http_get("/readyz")
    assert '"missing": []' in body


def test_dns01_wildcard_through_rfc2136(start_gateway, pebble_factory, echo_upstream, workdir):
    from acme_env import Knot
    knot = Knot(workdir, "gw.test")
    try:
        tls_port, plain_port = _fixed_ports()
        pebble = pebble_factory(http_port=plain_port, tls_port=tls_port, dns_server=f"127.0.0.1:{knot.port}")
        config = _acme_config(pebble, wildcard=True, dns_provider="rfc2136",
                              dns_server=f"127.0.0.1:{knot.port}", dns_zone="gw.test",
                              tsig_name=knot.tsig_name, tsig_secret=knot.tsig_secret,
                              dns_propagation_timeout=10)
        gw = _start(start_gateway, [shard("a", "alpha", 9000, echo_upstream.port),
                                    shard("b", "beta", 9100, echo_upstream.port)],
                    tls_port, plain_port, config, hostname="gw.test")
        wait_for(lambda: _issued(gw, "alpha-9000.gw.test", pebble.root_pem(), workdir), timeout=60,
                 what="wildcard certificate")
        assert _issued(gw, "beta-9100.gw.test", pebble.root_pem(), workdir)
        assert _issued(gw, "gw.test", pebble.root_pem(), workdir)
        assert gw.metric("gateway_acme_issuances_total", challenge="dns-01", outcome="success") == 1
        assert gw.metric("gateway_certificate_not_after_timestamp_seconds", name="*.gw.test") > time.time()
    finally:
        knot.stop()


def test_two_workers_issue_each_certificate_once_and_both_serve_it(start_gateway, pebble_factory,
                                                                    echo_upstream, workdir):
    tls_port, plain_port = _fixed_ports()
    pebble = pebble_factory(http_port=plain_port, tls_port=tls_port)
    config = _acme_config(pebble, challenge="http-01", names=["alpha-9000.localhost"],
                          on_demand="directory", on_demand_wait=30)
    gw = _start(start_gateway, [shard("a", "alpha", 9000, echo_upstream.port),
                                shard("b", "beta", 9000, echo_upstream.port)],
                tls_port, plain_port, config, workers=2)
    # A configured name (issued by whichever worker holds the issuer lock; pebble's HTTP-01
    # validation is answered by the supervisor from the shared challenge files) and an
    # on-demand name (first asked for on any worker).
    for name in ("alpha-9000.localhost", "beta-9000.localhost"):
        wait_for(lambda: _issued(gw, name, pebble.root_pem(), workdir), timeout=60, what=f"{name} issued")
    # Every worker serves both: the kernel spreads these connections over the two.
    for _ in range(8):
        assert _issued(gw, "alpha-9000.localhost", pebble.root_pem(), workdir)
        assert _issued(gw, "beta-9000.localhost", pebble.root_pem(), workdir)
    # The worker without the lock took both from the store the other one wrote.
    gw.wait_logged("certificate for alpha-9000.localhost picked up from the store")
    # One order per name for the whole gateway, not one per worker.
    assert gw.metric("gateway_acme_issuances_total", challenge="http-01", outcome="success") == 2
    assert gw.metric("gateway_workers") == 2
