"""
UDP routes and QUIC in memory: the directory's udp and quic ports, the udp and quic
configuration sections, and every branch of the datagram routing decision (udp/decide.py).
"""

from __future__ import annotations

import pytest

from twisted_gateway.clienthello import ClientHello
from twisted_gateway.config import ConfigError, load_config, parse_udp_listen
from twisted_gateway.directory.model import DirectoryError, parse_directory
from twisted_gateway.names import parse_name
from twisted_gateway.udp.decide import DatagramRoute, Drop, decide_quic, decide_udp, make_policy

HOST = "gw.test"


def snapshot():
    return parse_directory({"shards": [
        {"id": "web-1", "task": "t/web", "hostname_label": "web", "address": "10.0.0.1", "primary": True,
         "ports": [{"port": 443, "protocol": "h2", "public": True},
                   {"port": 443, "protocol": "quic", "public": True, "upstream_port": 8443},
                   {"port": 53, "protocol": "udp", "public": True, "deny": ["192.0.2.0/24"]}]},
        {"id": "web-2", "task": "t/web", "hostname_label": "web", "address": "10.0.0.2", "primary": False,
         "key_begin": 5, "rclock_begin": 6,
         "ports": [{"port": 443, "protocol": "quic", "public": True}]},
        {"id": "db-1", "task": "t/db", "hostname_label": "db", "address": "10.0.0.3", "primary": False,
         "ports": [{"port": 53, "protocol": "udp", "public": True}]},
    ]})


def hello(name):
    return ClientHello(server_name=name, alpn=(b"h3",), versions=(0x0304,))


POLICY = make_policy(HOST, (), ("203.0.113.0/24",))


def quic_decision(name, ip="127.0.0.1"):
    return decide_quic(hello(name), ip, snapshot(), POLICY)


def udp_decision(target, ip="127.0.0.1"):
    return decide_udp(parse_name(f"{target}.{HOST}", HOST), ip, snapshot(), POLICY)


def test_a_shard_exposes_the_same_number_over_tcp_and_quic():
    snap = snapshot()
    shard = snap.shard("web-1")
    assert shard.port(443).protocol == "h2"
    assert shard.port(443, datagram=True).protocol == "quic"
    # The TLS port's routing never sees a udp port.
    assert snap.resolve(parse_name(f"web-53.{HOST}", HOST).candidates).reason == "unknown_port"


def test_quic_routes_by_sni_to_the_quic_port():
    decision = quic_decision(f"web-443.{HOST}")
    assert isinstance(decision, DatagramRoute)
    assert decision.route.shard.id == "web-1" and decision.route.port.target_port == 8443
    pinned = quic_decision(f"web-5-6-443.{HOST}")
    assert isinstance(pinned, DatagramRoute) and pinned.route.shard.id == "web-2"


@pytest.mark.parametrize("name,reason", [
    (None, "no_sni"),
    ("www.example.com", "unknown_name"),
    (HOST, "gateway_host"),
    (f"nobody-443.{HOST}", "unknown_shard"),
    (f"web-444.{HOST}", "unknown_port"),
    (f"db-53.{HOST}", "no_primary"),
    (f"web-53.{HOST}", "wrong_protocol"),
])
def test_quic_drops_with_a_reason(name, reason):
    decision = quic_decision(name)
    assert isinstance(decision, Drop) and decision.reason == reason


def test_udp_routes_and_their_filters():
    decision = udp_decision("web-53")
    assert isinstance(decision, DatagramRoute) and decision.route.port.protocol == "udp"
    assert udp_decision("web-53", "192.0.2.7").reason == "denied_ip"  # the port's deny list
    assert udp_decision("web-53", "203.0.113.9").reason == "denied_ip"  # limits.deny
    assert quic_decision(f"web-443.{HOST}", "203.0.113.9").reason == "denied_ip"
    assert udp_decision("web-443").reason == "wrong_protocol"  # a quic port has no UDP route
    assert udp_decision("db-53").reason == "no_primary"
    assert udp_decision("nobody-53").reason == "unknown_shard"


@pytest.mark.parametrize("port,problem", [
    ({"port": 53, "protocol": "udp"}, "must be public"),
    ({"port": 53, "protocol": "udp", "public": True, "send_proxy": True}, "does not apply"),
    ({"port": 53, "protocol": "quic", "public": True, "max_body_bytes": 10}, "does not apply"),
])
def test_the_directory_refuses_what_a_datagram_port_cannot_do(port, problem):
    with pytest.raises(DirectoryError, match=problem):
        parse_directory({"shards": [{"id": "a", "task": "t", "hostname_label": "a", "address": "10.0.0.1",
                                     "ports": [port]}]})


def test_a_udp_port_number_may_appear_once_among_udp_and_quic():
    with pytest.raises(DirectoryError, match="appears twice"):
        parse_directory({"shards": [{"id": "a", "task": "t", "hostname_label": "a", "address": "10.0.0.1",
                                     "ports": [{"port": 53, "protocol": "udp", "public": True},
                                               {"port": 53, "protocol": "quic", "public": True}]}]})


def write(tmp_path, text):
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return str(path)


def test_udp_and_quic_configuration(tmp_path):
    config = load_config(write(tmp_path, """
udp:
  routes:
    - {listen: "udp:5353:interface=127.0.0.1", target: dns-53}
    - {listen: 5354, target: dns-1-2-53}
  idle_timeout: 5
quic:
  listen: off
"""))
    assert [(r.listen, r.target) for r in config.udp.routes] == [
        ("udp:5353:interface=127.0.0.1", "dns-53"), ("udp:5354", "dns-1-2-53")]
    assert config.udp.idle_timeout == 5.0 and config.quic.listen == "off"
    assert load_config(None).quic.listen == "auto"
    assert parse_udp_listen("udp:443:interface=\\:\\:1") == (443, "::1")


@pytest.mark.parametrize("text,key", [
    ("udp: {routes: [{listen: 'tcp:53', target: dns-53}]}", "udp.routes"),
    ("udp: {routes: [{listen: 53, target: dns}]}", "udp.routes"),
    ("udp: {routes: [{listen: 53, target: dns-53}, {listen: 53, target: x-1}]}", "udp.routes"),
    ("udp: {routes: [{listen: 53}]}", "udp.routes"),
    ("udp: {max_datagram_bytes: 100}", "udp.max_datagram_bytes"),
    ("quic: {listen: 'udp:x'}", "quic.listen"),
    ("quic: {max_flows: 0}", "quic.max_flows"),
])
def test_bad_udp_and_quic_settings_are_refused_naming_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert caught.value.key == key
