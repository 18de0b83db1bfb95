"""
QUIC routed by SNI without terminating it, end to end: aioquic's HTTP/3 client reaches aioquic
HTTP/3 servers through the real gateway (``twistd -n gateway``) on loopback.
"""

from __future__ import annotations

import glob
import hashlib
import os
import socket
import ssl
import threading

import pytest

from support import shard, wait_for

pytest.importorskip("aioquic")

import quic_env  # noqa: E402
from quic_env import H3Server, big_body, h3_get, make_certificates  # noqa: E402


def udp_port(gw, listener: str = "quic") -> int:
    return gw.udp_port(listener)


def quic_shard(id: str, label: str, server: H3Server, **port: object) -> dict:
    return shard(id, label, 443, server.port, protocol="quic", **port)


@pytest.fixture
def servers(workdir):
    certs = make_certificates(workdir, ["app-443.localhost", "other-443.localhost"])
    started = [H3Server(*certs["app-443.localhost"], "app"), H3Server(*certs["other-443.localhost"], "other")]
    yield certs, started
    for s in started:
        s.stop()


def client_initials(server_name: str, extra_alpn: list[str] | None = None) -> list[bytes]:
    """The datagrams of an aioquic client's first flight for C{server_name}, as it would send
    them (aioquic's own packet builder, no socket)."""
    from aioquic.h3.connection import H3_ALPN
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection
    configuration = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN + (extra_alpn or []),
                                      server_name=server_name)
    configuration.verify_mode = ssl.CERT_NONE
    connection = QuicConnection(configuration=configuration)
    connection.connect(("127.0.0.1", 9), now=0.0)
    return [data for data, _ in connection.datagrams_to_send(now=0.0)]


def test_h3_clients_reach_two_servers_by_sni_and_the_gateway_holds_no_key_of_theirs(start_gateway, servers):
    certs, (app, other) = servers
    gw = start_gateway(shards=[quic_shard("s-app", "app", app), quic_shard("s-other", "other", other)])
    port = udp_port(gw)
    assert port == gw.tls_port  # quic.listen: auto is the TLS port's number over UDP

    import json
    seen = {}
    for name in ("app-443.localhost", "other-443.localhost"):
        status, body = h3_get(port, name, "/who", certs["ca"])
        assert status == 200
        seen[name] = json.loads(body)
    assert seen["app-443.localhost"]["ident"] == "app"
    assert seen["other-443.localhost"]["ident"] == "other"
    for who in seen.values():
        # The server negotiated with the client itself: the ALPN it chose and the client's
        # own transport parameter (7.25 s idle timeout) reached it, and the client verified the
        # server's certificate against the test CA, whose keys only the servers hold.
        assert who["alpn"] == "h3"
        assert who["client_max_idle_timeout"] == 7.25
    # Nothing the gateway keeps or was given holds a key of theirs.
    keys = [open(certs[n][1], "rb").read() for n in ("app-443.localhost", "other-443.localhost")]
    key_bodies = [b"".join(k.splitlines()[1:-1]) for k in keys]
    for path in glob.glob(os.path.join(gw.workdir, "state", "**"), recursive=True) + [gw.directory_path]:
        if os.path.isfile(path):
            data = b"".join(open(path, "rb").read().splitlines())
            assert not any(body in data for body in key_bodies), path
    assert gw.metric("gateway_udp_sessions_total", protocol="quic", label="app", port="443") == 1
    assert gw.metric("gateway_udp_sessions_total", protocol="quic", label="other", port="443") == 1
    for direction in ("upstream", "downstream"):
        assert gw.metric("gateway_udp_datagrams_total", protocol="quic", label="app", port="443",
                         direction=direction) > 0
        assert gw.metric("gateway_udp_bytes_total", protocol="quic", label="app", port="443",
                         direction=direction) > 1200


def test_a_1_mib_response_arrives_intact(start_gateway, servers):
    certs, (app, _) = servers
    gw = start_gateway(shards=[quic_shard("s-app", "app", app)])
    status, body = h3_get(udp_port(gw), "app-443.localhost", "/big", certs["ca"], timeout=60)
    assert status == 200
    assert len(body) == quic_env.BIG_SIZE
    assert hashlib.sha256(body).digest() == hashlib.sha256(big_body()).digest()
    assert gw.metric("gateway_udp_bytes_total", protocol="quic", label="app", port="443",
                     direction="downstream") > quic_env.BIG_SIZE


def test_a_client_hello_over_two_initial_packets_still_routes(start_gateway, servers):
    certs, (app, _) = servers
    # Long ALPN names the server does not choose make the ClientHello larger than a datagram.
    extra = [f"x-padding-protocol-{i}-" + "p" * 180 for i in range(8)]
    first_flight = client_initials("app-443.localhost", extra)
    assert len(first_flight) >= 2 and all(len(d) >= 1200 for d in first_flight)
    gw = start_gateway(shards=[quic_shard("s-app", "app", app)])
    import json
    status, body = h3_get(udp_port(gw), "app-443.localhost", "/who", certs["ca"], extra_alpn=extra)
    assert status == 200 and json.loads(body)["ident"] == "app"
    assert gw.metric("gateway_udp_sessions_total", protocol="quic", label="app", port="443") == 1


def test_garbage_truncated_initials_and_unknown_names_are_dropped_and_counted(start_gateway, servers):
    certs, (app, _) = servers
    gw = start_gateway(shards=[quic_shard("s-app", "app", app)])
    port = udp_port(gw)
    result: dict = {}

    def download() -> None:
        try:
            result["response"] = h3_get(port, "app-443.localhost", "/big", certs["ca"], timeout=60)
        except Exception as e:  # noqa: BLE001 - reported below
            result["error"] = e
    thread = threading.Thread(target=download)
    thread.start()
    unknown_shard = client_initials("nobody-443.localhost")
    unknown_name = client_initials("www.example.com")
    good = client_initials("app-443.localhost")[0]
    attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for i in range(50):  # bounded
            attacker.sendto(os.urandom(1 + i * 20), ("127.0.0.1", port))  # garbage
            attacker.sendto(good[:300], ("127.0.0.1", port))  # a truncated Initial
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for d in unknown_shard:
                s.sendto(d, ("127.0.0.1", port))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for d in unknown_name:
                s.sendto(d, ("127.0.0.1", port))
        thread.join(90)
    finally:
        attacker.close()
    assert not thread.is_alive()
    assert "error" not in result, result
    status, body = result["response"]
    assert status == 200 and body == big_body()  # the established flow was undisturbed

    def counted() -> bool:
        return (gw.metric("gateway_udp_dropped_total", listener="quic", reason="unknown_shard") >= 1
                and gw.metric("gateway_udp_dropped_total", listener="quic", reason="unknown_name") >= 1
                and gw.metric("gateway_udp_dropped_total", listener="quic", reason="truncated") >= 1)
    wait_for(counted, 10, what="drops counted")
    garbage = sum(gw.metric("gateway_udp_dropped_total", listener="quic", reason=r)
                  for r in ("not_quic", "truncated", "not_initial", "unsupported_version",
                            "undersized_initial", "unknown_connection", "decrypt_failed", "too_large"))
    assert garbage >= 100  # every garbage and truncated datagram, none relayed
    assert gw.metric("gateway_udp_sessions_total", protocol="quic", label="app", port="443") == 1


def test_the_flow_table_bound_and_the_idle_timeout_hold(start_gateway, servers):
    certs, (app, _) = servers
    gw = start_gateway(shards=[quic_shard("s-app", "app", app)],
                       config={"quic": {"max_flows": 3, "idle_timeout": 1.0}})
    port = udp_port(gw)
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(5)]
    try:
        for s in sockets:
            for d in client_initials("app-443.localhost"):
                s.sendto(d, ("127.0.0.1", port))
            s.settimeout(5)
            s.recvfrom(65536)  # the server's answer came back through this client's flow
        wait_for(lambda: gw.metric("gateway_udp_sessions_closed_total", protocol="quic", reason="evicted") == 2,
                 10, what="two evictions")
        assert gw.metric("gateway_udp_sessions_active", listener="quic") <= 3
        wait_for(lambda: gw.metric("gateway_udp_sessions_active", listener="quic") == 0, 10,
                 what="idle flows ended")
        assert gw.metric("gateway_udp_sessions_closed_total", protocol="quic", reason="idle") == 3
    finally:
        for s in sockets:
            s.close()


QUIC_V2 = 0x6B3343CF


def test_quic_v2_version_negotiation_and_retry_from_the_shard_pass_through(start_gateway, workdir):
    import json
    names = ["v2-443.localhost", "vn-443.localhost", "retry-443.localhost"]
    certs = make_certificates(workdir, names)
    v2 = H3Server(*certs[names[0]], "v2", "v2")
    vn = H3Server(*certs[names[1]], "vn", "v1")  # a v2 client gets Version Negotiation from it
    retry = H3Server(*certs[names[2]], "retry", "retry")
    try:
        gw = start_gateway(shards=[quic_shard("s-v2", "v2", v2), quic_shard("s-vn", "vn", vn),
                                   quic_shard("s-retry", "retry", retry)])
        port = udp_port(gw)
        status, body = h3_get(port, names[0], "/who", certs["ca"], version=QUIC_V2)
        who = json.loads(body)
        assert status == 200 and (who["ident"], who["version"]) == ("v2", QUIC_V2)
        # The v2 Initial was routed; the shard's Version Negotiation went back on the flow and
        # the client's v1 Initial that followed, from the same address, reached the same shard.
        status, body = h3_get(port, names[1], "/who", certs["ca"], version=QUIC_V2)
        assert status == 200 and json.loads(body)["ident"] == "vn" and json.loads(body)["version"] == 1
        # The shard's Retry went back and the client's second Initial (a new destination
        # connection ID, the Retry's token) followed on the same flow.
        status, body = h3_get(port, names[2], "/who", certs["ca"])
        assert status == 200 and json.loads(body)["ident"] == "retry"
        for label in ("v2", "vn", "retry"):
            assert gw.metric("gateway_udp_sessions_total", protocol="quic", label=label, port="443") == 1
    finally:
        for server in (v2, vn, retry):
            server.stop()



def test_quic_auto_on_a_taken_udp_port_logs_and_the_gateway_still_starts(start_gateway):
    from support import free_port
    # The TLS port's number is taken over UDP by someone else: with quic.listen auto (the
    # default) the gateway starts and serves TLS, and says why QUIC is off.
    for _ in range(20):
        port = free_port()
        squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            squatter.bind(("127.0.0.1", port))
            break
        except OSError:
            squatter.close()
    try:
        gw = start_gateway(demo=True, args=["--tls-port", f"tcp:{port}:interface=127.0.0.1"])
        assert gw.tls_port == port
        gw.wait_logged("cannot listen for quic on udp 127.0.0.1:")
        assert gw.echoes("demo-7.localhost")
        assert not any(e.get("event_kind") == "listening_udp" for e in gw.events)
    finally:
        squatter.close()
