"""
TLS passthrough end to end: a tcp port marked ``tls_passthrough`` relays the TLS stream itself
to a shard that terminates TLS (``openssl s_server`` with a certificate of its own), so
``openssl s_client -verify_return_error`` sees the shard's certificate, and the shard's own
``acme-tls/1`` handshake reaches it.
"""

from __future__ import annotations

import datetime
import os
import socket
import ssl
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from support import free_port, shard, stop_process, wait_for, wait_for_listener, which

NAME = "vault-8200.localhost"


def _shard_certificate(workdir: str) -> tuple[str, str, str]:
    """A CA of the shard's own and a certificate for NAME: (ca.pem, cert.pem, key.pem)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shard's own CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NAME)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(NAME)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = tuple(os.path.join(workdir, n) for n in ("shard-ca.pem", "shard.pem", "shard-key.pem"))
    with open(paths[0], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths[1], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths[2], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return paths  # type: ignore[return-value]


@pytest.fixture
def tls_shard(workdir):
    ca, cert, key = _shard_certificate(workdir)
    port = free_port()
    proc = subprocess.Popen(
        [which("openssl"), "s_server", "-accept", f"127.0.0.1:{port}", "-cert", cert, "-key", key,
         "-alpn", "acme-tls/1,http/1.1", "-rev", "-naccept", "4"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_listener(port, "openssl s_server", proc)
        yield port, ca
    finally:
        stop_process(proc)


def _s_client(gw, ca: str, *extra: str, data: bytes = b"passthrough\n") -> str:
    out = subprocess.run(
        [which("openssl"), "s_client", "-connect", f"127.0.0.1:{gw.tls_port}", "-servername", NAME,
         "-CAfile", ca, "-verify_return_error", "-verify_hostname", NAME, *extra],
        input=data, capture_output=True, timeout=20)
    return out.stdout.decode(errors="replace") + out.stderr.decode(errors="replace")


def _passthrough_shard(port: int, **port_fields) -> dict:
    fields = {"port": 8200, "protocol": "tcp", "public": True, "upstream_port": port, "tls_passthrough": True}
    fields.update(port_fields)
    return dict(shard("v1", "vault", 8200, port), ports=[fields])


def test_the_shard_terminates_tls_and_its_own_certificate_verifies(start_gateway, tls_shard):
    port, ca = tls_shard
    gw = start_gateway([_passthrough_shard(port)])
    out = _s_client(gw, ca)
    assert "Verify return code: 0 (ok)" in out, out
    assert "shard's own CA" in out
    # s_server -rev answers each line reversed: the bytes went through both ways, decrypted
    # only by the shard (whose certificate Python's client verifies too).
    ctx = ssl.create_default_context(cafile=ca)
    with socket.create_connection(("127.0.0.1", gw.tls_port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=NAME) as tls:
        tls.sendall(b"passthrough\n")
        got = b""
        while b"\n" not in got:
            chunk = tls.recv(100)
            if not chunk:
                break
            got += chunk
    assert got == b"hguorhtssap\n"
    wait_for(lambda: gw.metric("gateway_connections_closed_total", outcome="tls_passthrough") >= 1,
             what="the passthrough connection counted")


def test_a_shards_own_acme_tls_alpn_handshake_reaches_it(start_gateway, tls_shard):
    port, ca = tls_shard
    gw = start_gateway([_passthrough_shard(port)])
    out = _s_client(gw, ca, "-alpn", "acme-tls/1")
    assert "ALPN protocol: acme-tls/1" in out, out
    assert "Verify return code: 0 (ok)" in out, out


@pytest.mark.parametrize("bad", [{"public": False}, {"protocol": "http/1.1"}, {"protocol": "h2"}])
def test_passthrough_is_refused_for_private_and_http_ports(workdir, bad):
    from twisted_gateway.directory.model import DirectoryError, parse_port
    with pytest.raises(DirectoryError, match="tls_passthrough"):
        parse_port({"port": 8200, "protocol": "tcp", "public": True, "tls_passthrough": True, **bad}, "p")
