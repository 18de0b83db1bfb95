"""
End to end: three gateways, each with its own state directory and ports, one real
redis-server and Debian's pebble, all on loopback: one ACME order per name for the fleet, the
CA's validation answered by a gateway that did not place the order, a lock holder killed
mid-order, and Redis stopped.
"""

from __future__ import annotations

import os
import socket
import ssl

import pytest
from cryptography import x509
from cryptography.fernet import Fernet

from acme_env import HoldingProxy, Pebble
from support import Gateway, free_port, shard, wait_for


class Fleet:
    """Gateways on fixed ports (pebble must know where to validate), all stopped at the end."""

    def __init__(self, workdir: str, redis_url: str, pebble: Pebble, shards: list[dict],
                 lock_ttl: float, **acme) -> None:
        self.workdir = workdir
        self.shards = shards
        key_file = os.path.join(workdir, "fleet-fernet.key")
        with open(key_file, "wb") as f:
            f.write(Fernet.generate_key() + b"\n")
        self.config = {
            "acme": {"enabled": True, "ca_server": pebble.directory_url, "ca_bundle": pebble.ca_path,
                     "email": "ops@example.test", "challenge": "http-01", "check_interval": 0.5,
                     "retry_initial": 1.0, "retry_max": 4.0, **acme},
            "redis": {"url": redis_url, "acme_key_file": key_file, "acme_lock_ttl": lock_ttl},
        }
        self.ports: dict[str, tuple[int, int]] = {}
        self.gateways: dict[str, Gateway] = {}
        self.started: list[Gateway] = []

    def reserve(self, *names: str) -> None:
        for name in names:
            self.ports[name] = (free_port(), free_port())

    def start(self, name: str) -> Gateway:
        tls_port, plain_port = self.ports[name]
        workdir = os.path.join(self.workdir, name)
        os.makedirs(workdir, exist_ok=True)
        gw = Gateway(workdir, self.shards, config=self.config, args=[
            "--tls-port", f"tcp:{tls_port}:interface=127.0.0.1",
            "--plain-port", f"tcp:{plain_port}:interface=127.0.0.1"])
        self.gateways[name] = gw
        self.started.append(gw)
        return gw

    def stop(self) -> None:
        for gw in self.started:
            gw.stop()


@pytest.fixture
def fleet(workdir, redis_env):
    made: list[Fleet] = []
    pebbles: list[Pebble] = []

    def make(http_port: int, tls_port: int, shards: list[dict], lock_ttl: float = 10.0, **acme):
        pebble = Pebble(workdir, http_port=http_port, tls_port=tls_port)
        pebbles.append(pebble)
        redis = redis_env.server()
        f = Fleet(workdir, redis.url, pebble, shards, lock_ttl, **acme)
        f.pebble, f.redis = pebble, redis  # type: ignore[attr-defined]
        made.append(f)
        return f
    yield make
    for f in made:
        f.stop()
    for p in pebbles:
        p.stop()
    for f in made:
        for gw in f.started:
            crashes = [e for e in gw.events if e.get("level") == "critical" or "Traceback" in str(e.get("message"))]
            assert not crashes, "gateway logged a crash:\n" + gw.output()


def pebble_serial(gw: Gateway, name: str) -> int | None:
    """The serial of the certificate C{gw} serves for C{name}, if pebble issued it."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", gw.tls_port), timeout=10),
                             server_hostname=name) as tls:
            der = tls.getpeercert(binary_form=True)
    except OSError:
        return None
    cert = x509.load_der_x509_certificate(der)
    return cert.serial_number if "Pebble" in cert.issuer.rfc4514_string() else None


def same_serial_everywhere(gateways: list[Gateway], name: str) -> int | None:
    serials = {pebble_serial(gw, name) for gw in gateways}
    return serials.pop() if len(serials) == 1 and None not in serials else None


def ordered_by(gateways: dict[str, Gateway], name: str) -> list[str]:
    return [key for key, gw in gateways.items() if gw.logged(f"requesting a certificate for {name} ")]


def test_one_order_per_name_for_the_fleet_and_validation_answered_by_another_gateway(fleet, echo_upstream):
    shards = [shard("a", "alpha", 9000, echo_upstream.port), shard("b", "beta", 9000, echo_upstream.port),
              shard("o", "ondemand", 9000, echo_upstream.port)]
    ports = {name: (free_port(), free_port()) for name in ("a", "b", "c")}
    # pebble validates HTTP-01 on gateway b's plain port, whoever ordered.
    f = fleet(http_port=ports["b"][1], tls_port=ports["b"][0], shards=shards,
              names=["alpha-9000.localhost", "beta-9000.localhost"], on_demand="directory",
              on_demand_wait=30)
    f.ports = ports
    # b first: pebble's validations reach it from the first order on, whoever places it.
    gateways = [f.start(name) for name in ("b", "a", "c")]
    configured = ("alpha-9000.localhost", "beta-9000.localhost")
    serials = {}
    for name in configured:
        serials[name] = wait_for(lambda: same_serial_everywhere(gateways, name), 60,
                                 what=f"{name} served by all three")
    # An on-demand name first seen by gateway a: a orders it (the handshake waits), b answers
    # the CA's validation from the fleet's board.
    a, b, c = (f.gateways[n] for n in ("a", "b", "c"))
    on_demand = "ondemand-9000.localhost"
    assert wait_for(lambda: pebble_serial(a, on_demand), 60, what="on-demand certificate on a")
    serials[on_demand] = wait_for(lambda: same_serial_everywhere(gateways, on_demand), 10,
                                  what="on-demand certificate on all three")
    assert ordered_by(f.gateways, on_demand) == ["a"]
    b.wait_logged("answered for another process or gateway")
    # Every name was ordered once for the whole fleet: one gateway asked, pebble saw one order
    # (and issued one certificate) per name.
    for name in configured + (on_demand,):
        assert len(ordered_by(f.gateways, name)) == 1, (name, ordered_by(f.gateways, name))
    assert f.pebble.count("Added order") == 3
    successes = sum(gw.metric("gateway_acme_issuances_total", challenge="http-01", outcome="success")
                    for gw in gateways)
    assert successes == 3
    # The gateways that did not order a name installed it from the store's notice.
    for key, gw in f.gateways.items():
        for name in configured + (on_demand,):
            if ordered_by(f.gateways, name) != [key]:
                assert gw.logged(f"certificate for {name} picked up from the store"), (key, name)
    assert sum(gw.metric("gateway_acme_lock_events_total", event="acquired") for gw in gateways) >= 3
    assert len(set(serials.values())) == 3


def test_a_lock_holder_killed_mid_order_is_taken_over_after_its_lock_expires(fleet, echo_upstream):
    proxy = HoldingProxy()
    try:
        name = "kappa-9000.localhost"
        # pebble's validation is held (mid-order) until the test lets it through.
        f = fleet(http_port=proxy.port, tls_port=free_port(), shards=[shard("k", "kappa", 9000, echo_upstream.port)],
                  lock_ttl=3.0, names=[name])
        f.reserve("a", "b", "c")
        for key in ("a", "b", "c"):
            f.start(key)
        holder = wait_for(lambda: ordered_by(f.gateways, name), 30, what="an order placed")
        assert len(holder) == 1
        wait_for(lambda: proxy.accepted >= 1, 30, what="pebble validating (held)")
        f.gateways[holder[0]].proc.kill()
        f.gateways[holder[0]].proc.wait(10)
        survivors = [gw for key, gw in f.gateways.items() if key != holder[0]]
        proxy.release(survivors[0].plain_port)
        serial = wait_for(lambda: same_serial_everywhere(survivors, name), 60,
                          what="the order completed by a surviving gateway")
        takers = [key for key in ordered_by(f.gateways, name) if key != holder[0]]
        assert len(takers) == 1, takers
        taker = f.gateways[takers[0]]
        # It took the name's lock once the dead holder's expired: the next fencing number.
        assert taker.logged(f"ACME lock for {name} acquired (fencing number 2)")
        assert taker.metric("gateway_acme_issuances_total", challenge="http-01", outcome="success") == 1
        assert sum(gw.metric("gateway_acme_issuances_total", challenge="http-01", outcome="success")
                   for gw in survivors) == 1
        assert sum(gw.metric("gateway_acme_lock_events_total", event="busy") for gw in survivors) >= 1
        # Still the one certificate everywhere a moment later (no second order finished).
        assert same_serial_everywhere(survivors, name) == serial
    finally:
        proxy.close()


def test_redis_stopped_every_gateway_keeps_its_certificates_and_a_restart_serves_the_local_copy(fleet, echo_upstream):
    name = "gamma-9000.localhost"
    ports = {key: (free_port(), free_port()) for key in ("a", "b", "c")}
    f = fleet(http_port=ports["a"][1], tls_port=ports["a"][0],
              shards=[shard("g", "gamma", 9000, echo_upstream.port)], names=[name])
    f.ports = ports
    gateways = [f.start(key) for key in ("a", "b", "c")]
    serial = wait_for(lambda: same_serial_everywhere(gateways, name), 60, what="served by all three")
    f.redis.stop()
    for gw in gateways:
        wait_for(lambda: gw.metric("gateway_redis_up") == 0, 10, what="Redis seen down")
    assert same_serial_everywhere(gateways, name) == serial
    # Restarted while Redis is down: the local copy in its state directory.
    c = f.gateways["c"]
    c.stop()
    c2 = f.start("c")
    assert c2.metric("gateway_redis_up") == 0
    assert pebble_serial(c2, name) == serial
    status, body = c2.http_get("/readyz")
    assert status == 200 and "redis" in body
    orders = f.pebble.count("Added order")
    assert orders == 1


def test_tls_alpn01_validation_answered_by_a_gateway_that_did_not_order(fleet, echo_upstream):
    ports = {key: (free_port(), free_port()) for key in ("a", "b")}
    # pebble's TLS-ALPN-01 validations reach gateway b's TLS port; the name is first seen by a.
    f = fleet(http_port=ports["b"][1], tls_port=ports["b"][0],
              shards=[shard("t", "tango", 9000, echo_upstream.port)], challenge="tls-alpn-01",
              on_demand="directory", on_demand_wait=30)
    f.ports = ports
    b = f.start("b")
    a = f.start("a")
    name = "tango-9000.localhost"
    assert wait_for(lambda: pebble_serial(a, name), 60, what="on-demand certificate on a")
    wait_for(lambda: same_serial_everywhere([a, b], name), 10, what="served by both")
    assert ordered_by(f.gateways, name) == ["a"]
    # b answered the validation handshakes from the answer a pushed before the CA validated.
    assert b.metric("gateway_acme_tls_alpn_handshakes_total") >= 1
    assert a.metric("gateway_acme_tls_alpn_handshakes_total") == 0
    assert f.pebble.count("Added order") == 1
