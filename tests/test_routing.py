"""Table-driven unit tests of routing.decide: every refusal reason and route kind, in memory."""

from __future__ import annotations

import pytest

from twisted_gateway import clienthello as ch
from twisted_gateway.directory.model import DirectorySnapshot, Shard, ShardPort
from twisted_gateway.limits import IPFilter, parse_networks
from twisted_gateway.routing import (
    AcmeChallenge, GatewayApi, H2Route, HttpRoute, Refuse, RoutingPolicy, SpliceRoute, TLSPassthrough, decide,
)
from twisted_gateway.runtime import PortFilters


def shard(label: str, ports: list[ShardPort], primary: bool = True, id_: str | None = None,
          key_begin: int = 0, rclock_begin: int = 0) -> Shard:
    return Shard(id=id_ or label, task=f"tasks/{label}", hostname_label=label, address="10.0.0.1",
                 ports=tuple(ports), primary=primary, key_begin=key_begin, rclock_begin=rclock_begin)


SNAPSHOT = DirectorySnapshot([
    shard("db", [ShardPort(5432, "tcp", True), ShardPort(5433, "tcp", False),
                 ShardPort(5434, "tcp", True, deny=("10.9.0.0/16",)),
                 ShardPort(5435, "tcp", True, send_proxy=True)]),
    shard("web", [ShardPort(80, "http/1.1", True), ShardPort(81, "http/1.1", False)]),
    shard("grpc", [ShardPort(50051, "h2", True), ShardPort(50052, "h2", True, passthrough=True)]),
    shard("vault", [ShardPort(8200, "tcp", True, tls_passthrough=True),
                    ShardPort(8201, "tcp", True, tls_passthrough=True, allow=("10.1.0.0/16",))]),
    shard("replica", [ShardPort(6379, "tcp", True)], primary=False, key_begin=5, rclock_begin=7),
])

CHALLENGE = object()


def policy(client_ca: bool = False) -> RoutingPolicy:
    return RoutingPolicy(hostname="gw.test", client_ca=client_ca, port_filter=PortFilters(),
                         acme_challenge=lambda name: CHALLENGE if name == "pending.gw.test" else None)


def hello(name: str | None, *alpn: bytes) -> ch.ClientHello:
    return ch.ClientHello(server_name=name, alpn=tuple(alpn), versions=(0x0304,))


@pytest.mark.parametrize("name, alpn, client, expected", [
    # refusals: (reason, alert, http status, page)
    (None, (), "1.2.3.4", ("no_sni", ch.ALERT_UNRECOGNIZED_NAME, 404, False)),
    ("db-5432.other.test", (b"http/1.1",), "1.2.3.4", ("unknown_name", ch.ALERT_UNRECOGNIZED_NAME, 404, False)),
    ("nope-80.gw.test", (), "1.2.3.4", ("unknown_shard", ch.ALERT_UNRECOGNIZED_NAME, 404, False)),
    ("nope-80.gw.test", (b"h2",), "1.2.3.4", ("unknown_shard", ch.ALERT_UNRECOGNIZED_NAME, 404, True)),
    ("db-9999.gw.test", (b"http/1.1",), "1.2.3.4", ("unknown_port", ch.ALERT_UNRECOGNIZED_NAME, 404, True)),
    ("replica-6379.gw.test", (), "1.2.3.4", ("no_primary", ch.ALERT_UNRECOGNIZED_NAME, 503, False)),
    ("db-5433.gw.test", (), "1.2.3.4", ("private_port", ch.ALERT_ACCESS_DENIED, 403, False)),
    ("db-5433.gw.test", (b"http/1.1",), "1.2.3.4", ("private_port", ch.ALERT_ACCESS_DENIED, 403, True)),
    ("db-5434.gw.test", (), "10.9.1.1", ("denied_ip", ch.ALERT_ACCESS_DENIED, 403, False)),
    ("db-5434.gw.test", (b"h2",), "10.9.1.1", ("denied_ip", ch.ALERT_ACCESS_DENIED, 403, True)),
    # a passthrough port never gets a page: the gateway holds no certificate role there
    ("vault-8201.gw.test", (b"h2",), "10.2.0.1", ("denied_ip", ch.ALERT_ACCESS_DENIED, 403, False)),
])
def test_refusals(name, alpn, client, expected):
    decision = decide(hello(name, *alpn), client, SNAPSHOT, policy())
    assert isinstance(decision, Refuse)
    assert (decision.reason, decision.alert, decision.http_status, decision.page) == expected


@pytest.mark.parametrize("name, alpn, kind, detail", [
    ("gw.test", (b"h2",), GatewayApi, None),
    ("web-80.gw.test", (b"h2", b"http/1.1"), HttpRoute, ("web", 80)),
    ("web-81.gw.test", (), HttpRoute, ("web", 81)),  # private http: the token is checked per request
    ("grpc-50051.gw.test", (b"h2",), H2Route, ("grpc", 50051)),
    ("grpc-50052.gw.test", (b"http/1.1",), H2Route, ("grpc", 50052)),  # passthrough is for h2 clients
    ("grpc-50052.gw.test", (b"h2",), SpliceRoute, ("grpc", 50052)),
    ("db-5432.gw.test", (), SpliceRoute, ("db", 5432)),
    ("replica-5-7-6379.gw.test", (), SpliceRoute, ("replica", 6379)),
    ("vault-8200.gw.test", (b"h2",), TLSPassthrough, ("vault", 8200)),
    ("vault-8201.gw.test", (), TLSPassthrough, ("vault", 8201)),
])
def test_routes(name, alpn, kind, detail):
    decision = decide(hello(name, *alpn), "10.1.2.3", SNAPSHOT, policy())
    assert isinstance(decision, kind), decision
    if detail is not None:
        route = decision.route  # type: ignore[union-attr]
        assert (route.shard.hostname_label, route.port.port) == detail


def test_a_private_tcp_port_with_a_client_ca_asks_for_a_certificate_of_the_task():
    decision = decide(hello("db-5433.gw.test"), "1.2.3.4", SNAPSHOT, policy(client_ca=True))
    assert isinstance(decision, SpliceRoute) and decision.client_auth_task == "tasks/db"
    public = decide(hello("db-5432.gw.test"), "1.2.3.4", SNAPSHOT, policy(client_ca=True))
    assert isinstance(public, SpliceRoute) and public.client_auth_task is None


def test_send_proxy_is_carried_by_the_decision():
    decision = decide(hello("db-5435.gw.test"), "1.2.3.4", SNAPSHOT, policy())
    assert isinstance(decision, SpliceRoute) and decision.send_proxy and decision.alpn == "tcp"


def test_acme_tls_alpn_is_answered_only_for_a_pending_challenge():
    assert decide(hello("pending.gw.test", b"acme-tls/1"), "1.2.3.4", SNAPSHOT, policy()) == AcmeChallenge(CHALLENGE)
    # A shard's own validation through a passthrough port reaches the shard.
    own = decide(hello("vault-8200.gw.test", b"acme-tls/1"), "1.2.3.4", SNAPSHOT, policy())
    assert isinstance(own, TLSPassthrough)


def test_port_filters_are_parsed_once_per_list():
    filters = PortFilters()
    port = ShardPort(1, "tcp", True, allow=("10.0.0.0/8",))
    assert filters(port) is filters(ShardPort(2, "tcp", True, allow=("10.0.0.0/8",)))
    assert filters(ShardPort(3, "tcp", True)) is None
    assert isinstance(filters(port), IPFilter) and filters(port).allow == parse_networks(["10.0.0.0/8"])
