"""
End to end: certificates from files (a wildcard for *.<hostname> plus <hostname>), hot reload,
refusal of a broken pair, and the TLS version floor.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess

from support import shard, wait_for, which

from twisted_gateway.tls.localca import LocalCA


def _write_wildcard(ca: LocalCA, directory: str, hostname: str) -> tuple[str, str]:
    cert, key = os.path.join(directory, "wild.pem"), os.path.join(directory, "wild-key.pem")
    ca.write_leaf((f"*.{hostname}", hostname), cert, key)
    return cert, key


def _served_serial(gw, name: str, cafile: str) -> int:
    ctx = ssl.create_default_context(cafile=cafile)
    with socket.create_connection(("127.0.0.1", gw.tls_port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            der = tls.getpeercert(binary_form=True)
    from cryptography import x509
    return x509.load_der_x509_certificate(der).serial_number


def test_static_wildcard_certificate_hot_reload(start_gateway, echo_upstream, workdir):
    ca = LocalCA(os.path.join(workdir, "operator-ca"))
    certdir = os.path.join(workdir, "certs")
    os.makedirs(certdir)
    cert, key = _write_wildcard(ca, certdir, "gw.test")
    gw = start_gateway([shard("a", "alpha", 9000, echo_upstream.port)],
                       args=["--hostname", "gw.test", "--tls-certificate", cert, "--tls-private-key", key],
                       config={"tls": {"reload_interval": 0.2}})
    first = _served_serial(gw, "alpha-9000.gw.test", ca.cert_path)
    assert gw.metric("gateway_certificate_not_after_timestamp_seconds", name="*.gw.test") > 0

    # s_client with hostname verification against the wildcard.
    out = subprocess.run([which("openssl"), "s_client", "-connect", f"127.0.0.1:{gw.tls_port}",
                          "-servername", "alpha-9000.gw.test", "-verify_hostname", "alpha-9000.gw.test",
                          "-CAfile", ca.cert_path, "-verify_return_error", "-tls1_2"],
                         input=b"", capture_output=True, timeout=20)
    assert b"Verify return code: 0 (ok)" in out.stdout, out.stdout + out.stderr

    ctx = ssl.create_default_context(cafile=ca.cert_path)
    held = ctx.wrap_socket(socket.create_connection(("127.0.0.1", gw.tls_port), timeout=5),
                           server_hostname="alpha-9000.gw.test")
    held.sendall(b"one")
    assert held.recv(10) == b"one"

    # Renewed files: new handshakes get the new certificate; the open connection survives.
    ca._cache.clear()
    _write_wildcard(ca, certdir, "gw.test")
    wait_for(lambda: _served_serial(gw, "alpha-9000.gw.test", ca.cert_path) != first, timeout=5,
             what="renewed certificate served")
    held.sendall(b"two")
    assert held.recv(10) == b"two"

    # A broken pair is refused; the previous certificate stays in force.
    current = _served_serial(gw, "alpha-9000.gw.test", ca.cert_path)
    with open(cert, "w") as f:
        f.write("not a certificate")
    wait_for(lambda: gw.metric("gateway_certificate_reloads_total", outcome="failure") >= 1, timeout=5)
    gw.wait_logged("certificate reload refused")
    assert _served_serial(gw, "alpha-9000.gw.test", ca.cert_path) == current
    held.close()


def test_tls_1_1_is_refused_and_counted(start_gateway, echo_upstream):
    gw = start_gateway([shard("a", "alpha", 9000, echo_upstream.port)])
    out = subprocess.run([which("openssl"), "s_client", "-connect", f"127.0.0.1:{gw.tls_port}",
                          "-servername", "alpha-9000.localhost", "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"],
                         input=b"", capture_output=True, timeout=20)
    assert out.returncode != 0
    wait_for(lambda: gw.metric("gateway_tls_handshake_failures_total", reason="tls_error") >= 1)
