"""End to end: private tcp ports opened by TLS client certificates."""

from __future__ import annotations

import datetime
import os
import select
import subprocess
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from support import shard, wait_for, which


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(directory: str, name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
            .sign(key, hashes.SHA256()))
    path = os.path.join(directory, f"{name}.pem")
    with open(path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key, path


def make_client(directory: str, ca, cn: str, uris=()):
    ca_cert, ca_key, _ = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=1))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    base = os.path.join(directory, cn.replace("/", "_") + "-" + os.urandom(3).hex())
    with open(base + ".pem", "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(base + ".key", "wb") as f:
        f.write(_pem_key(key))
    return base + ".pem", base + ".key"


class Result:
    def __init__(self, stdout: bytes, stderr: bytes) -> None:
        self.stdout, self.stderr = stdout, stderr


def s_client_echo(gw, name, *args) -> Result:
    """Send a line through s_client; return what came back once it echoed or the peer closed."""
    proc = subprocess.Popen([which("openssl"), "s_client", "-quiet", "-connect", f"127.0.0.1:{gw.tls_port}",
                             "-servername", name, "-CAfile", gw.ca_path, *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write(b"ping\n")
    proc.stdin.flush()
    out = b""
    deadline = time.monotonic() + 20
    try:
        while not out.endswith(b"\n") and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.1)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                out += chunk
    finally:
        proc.kill()
        _, err = proc.communicate()
    return Result(out, err)


def test_private_tcp_port_with_client_certificates(start_gateway, echo_upstream, workdir):
    trusted = make_ca(workdir, "operators")
    other = make_ca(workdir, "strangers")
    gw = start_gateway([shard("p", "vault", 7000, echo_upstream.port, public=False, task="acme/vault")],
                       config={"tcp": {"client_ca": trusted[2]}})
    name = "vault-7000.localhost"

    good_cert, good_key = make_client(workdir, trusted, "acme/")
    out = s_client_echo(gw, name, "-cert", good_cert, "-key", good_key)
    assert out.stdout == b"ping\n", out.stderr

    uri_cert, uri_key = make_client(workdir, trusted, "someone", uris=["task-prefix:acme/va"])
    assert s_client_echo(gw, name, "-cert", uri_cert, "-key", uri_key).stdout == b"ping\n"

    out = s_client_echo(gw, name)
    assert out.stdout == b""
    assert b"alert" in out.stderr

    stranger_cert, stranger_key = make_client(workdir, other, "acme/")
    out = s_client_echo(gw, name, "-cert", stranger_cert, "-key", stranger_key)
    assert out.stdout == b""
    assert b"unknown ca" in out.stderr or b"alert" in out.stderr

    narrow_cert, narrow_key = make_client(workdir, trusted, "other/")
    out = s_client_echo(gw, name, "-cert", narrow_cert, "-key", narrow_key)
    assert out.stdout == b""
    wait_for(lambda: gw.metric("gateway_auth_decisions_total", outcome="forbidden") >= 1)
    assert gw.metric("gateway_auth_decisions_total", outcome="allowed") >= 2
