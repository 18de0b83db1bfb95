"""
End to end with two workers: the supervisor's /metrics merges its workers' series by meaning
(one shard for a one-shard directory, the earliest certificate expiry, counters that do not fall
when a worker is killed and restarted), and the per-route series.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import ssl
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families

from support import shard, wait_for

_COUNTING_SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def write_certificate(directory: str, days: int) -> tuple[str, str, float]:
    """A self-signed certificate for localhost and *.localhost valid for C{days}: its paths and
    its notAfter as a Unix time."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    not_after = now + datetime.timedelta(days=days)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.DNSName("*.localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    # Written side by side and swapped in one rename each, so no worker reads a mixed pair.
    for path, data in ((key_path, key.private_bytes(serialization.Encoding.PEM,
                                                    serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption())),
                       (cert_path, cert.public_bytes(serialization.Encoding.PEM))):
        with open(path + ".new", "wb") as f:
            f.write(data)
        os.replace(path + ".new", path)
    return cert_path, key_path, not_after.timestamp()


def scrape(gw) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = gw.http_get("/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def worker_pids(gw) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(gw.proc.pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _echoes(tls: ssl.SSLSocket, payload: bytes) -> bool:
    """Send C{payload} and whether the same bytes come back before the connection ends."""
    tls.sendall(payload)
    got = b""
    while len(got) < len(payload):
        data = tls.recv(65536)
        if not data:
            break
        got += data
    return got == payload


def echo_without_verification(gw, name: str, payload: bytes = b"ping") -> bool:
    """One echo through the gateway (the certificate here is self-signed: not verified)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection(("127.0.0.1", gw.tls_port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname=name) as tls:
                return _echoes(tls, payload)
    except OSError:
        return False


def assert_no_counter_fell(before: dict, after: dict) -> None:
    fell = {key: (v, after.get(key)) for key, v in before.items()
            if key[0].endswith(_COUNTING_SUFFIXES) and after.get(key, -1.0) < v}
    assert not fell, f"counters fell: {fell}"
    moved = {key: (v, after.get(key)) for key, v in before.items()
             if key[0].endswith("_created") and after.get(key) != v}
    assert not moved, f"_created series moved: {moved}"


def test_two_workers_merge_by_meaning_and_counters_survive_a_restart(start_gateway, echo_upstream, workdir):
    cert, key, first_expiry = write_certificate(workdir, days=30)
    # The surviving worker checks its certificate files only once an hour, so after the swap
    # below the two workers serve different certificates.
    gw = start_gateway([shard("e", "echo", 9000, echo_upstream.port)], workers=2,
                       args=["--tls-certificate", cert, "--tls-private-key", key],
                       config={"tls": {"reload_interval": 3600}})
    wait_for(lambda: len(worker_pids(gw)) == 2, timeout=20, what="two workers")
    assert gw.metric("gateway_directory_shards") == 1
    assert gw.metric("gateway_certificate_not_after_timestamp_seconds", name="localhost") == first_expiry

    for _ in range(30):
        assert echo_without_verification(gw, "echo-9000.localhost")
    wait_for(lambda: gw.metric("gateway_connections_closed_total", outcome="tcp") >= 30, timeout=10,
             what="30 closed connections counted")
    before = scrape(gw)
    assert before[("gateway_connections_accepted_total", (("listener", "tls"),))] >= 30
    assert before[("gateway_tls_handshake_seconds_count", ())] >= 30

    # A later certificate, loaded only by the worker that starts next.
    write_certificate(workdir, days=60)
    victim = worker_pids(gw)[0]
    os.kill(victim, signal.SIGKILL)

    def restarted() -> bool:
        now = scrape(gw)
        # Checked at every scrape on the way, not only at the end.
        assert_no_counter_fell(before, now)
        pids = worker_pids(gw)
        return (now.get(("gateway_worker_restarts_total", ())) == 1 and len(pids) == 2
                and victim not in pids and now.get(("gateway_workers", ())) == 2)
    wait_for(restarted, timeout=20, what="the killed worker restarted")
    wait_for(lambda: gw.http_get("/readyz")[0] == 200, timeout=20, what="ready again")

    after = scrape(gw)
    assert_no_counter_fell(before, after)
    assert after[("gateway_directory_shards", ())] == 1
    # One worker serves the 30-day certificate, the new one the 60-day one: the earliest shows.
    assert after[("gateway_certificate_not_after_timestamp_seconds", (("name", "localhost"),))] == first_expiry
    # And the new worker counts on top of what the dead one counted.
    for _ in range(10):
        assert echo_without_verification(gw, "echo-9000.localhost")
    wait_for(lambda: gw.metric("gateway_connections_closed_total", outcome="tcp")
             >= before[("gateway_connections_closed_total", (("outcome", "tcp"),))] + 10,
             timeout=10, what="10 more closed connections counted")
    assert_no_counter_fell(before, scrape(gw))


def test_per_route_series_with_two_workers_are_capped(start_gateway, echo_upstream):
    labels = ("alpha", "beta", "gamma")
    gw = start_gateway([shard(label, label, 9000, echo_upstream.port) for label in labels], workers=2,
                       config={"metrics": {"per_route": True, "max_routes": 2}})
    wait_for(lambda: len(worker_pids(gw)) == 2, timeout=20, what="two workers")
    payload = b"x" * 1000
    for label in labels:
        for _ in range(4):
            assert _echo(gw, label, payload)

    def routes() -> dict[tuple[str, str], tuple[float, float, float]]:
        now = scrape(gw)
        out: dict[tuple[str, str], list[float]] = {}
        for (name, labels_), v in now.items():
            d = dict(labels_)
            if name == "gateway_route_connections_total":
                out.setdefault((d["label"], d["port"]), [0.0, 0.0, 0.0])[0] += v
            elif name == "gateway_route_bytes_total":
                index = 1 if d["direction"] == "upstream" else 2
                out.setdefault((d["label"], d["port"]), [0.0, 0.0, 0.0])[index] += v
        return {pair: tuple(values) for pair, values in out.items()}  # type: ignore[misc]

    def counted() -> bool:
        totals = [sum(v[i] for v in routes().values()) for i in range(3)]
        return totals == [12.0, 12000.0, 12000.0]
    wait_for(counted, timeout=10, what="every connection and byte counted per route")
    pairs = set(routes())
    assert ("other", "other") in pairs and len(pairs) == 3
    assert pairs - {("other", "other")} <= {(label, "9000") for label in labels}


def _echo(gw, label: str, payload: bytes) -> bool:
    with gw.connect(f"{label}-9000.localhost") as tls:
        return _echoes(tls, payload)
