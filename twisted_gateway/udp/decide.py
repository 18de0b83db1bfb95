"""
The routing decision of a new UDP session or QUIC flow, as pure functions over frozen state
(the directory snapshot and the L{DatagramPolicy}), as L{twisted_gateway.routing.decide} is for
TCP connections: L{decide_udp} for a UDP route's listener, whose target the configuration
names, and L{decide_quic} from the ClientHello of a client's Initial packets.

Both return a L{DatagramRoute} or a L{Drop}, whose reason is the metric label the datagram is
counted under; tests/test_udp_units.py covers every branch in memory.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import attrs

from twisted_gateway.clienthello import ClientHello
from twisted_gateway.directory.model import DirectorySnapshot, Refusal, Route, ShardPort
from twisted_gateway.limits import IPFilter, parse_networks
from twisted_gateway.names import Foreign, GatewayHost, ShardName, parse_name


@attrs.frozen
class DatagramPolicy:
    """What the decision needs besides the snapshot: fixed for one configuration."""

    hostname: str
    admission: Optional[IPFilter]
    """limits.allow and limits.deny, which hold for UDP and QUIC clients too; None if unset."""
    port_filter: Callable[[ShardPort], Optional[IPFilter]]


def port_filter(port: ShardPort) -> Optional[IPFilter]:
    """A directory port's allow and deny lists as a filter (None if it has neither)."""
    if not port.allow and not port.deny:
        return None
    return _filters(port.allow, port.deny)


_FILTERS: dict[tuple[tuple[str, ...], tuple[str, ...]], IPFilter] = {}


def _filters(allow: tuple[str, ...], deny: tuple[str, ...]) -> IPFilter:
    key = (allow, deny)
    found = _FILTERS.get(key)
    if found is None:
        if len(_FILTERS) > 10000:
            _FILTERS.clear()
        found = _FILTERS[key] = IPFilter(parse_networks(allow), parse_networks(deny))
    return found


def make_policy(hostname: str, allow: tuple[str, ...], deny: tuple[str, ...]) -> DatagramPolicy:
    admission = IPFilter(parse_networks(allow), parse_networks(deny)) if allow or deny else None
    return DatagramPolicy(hostname, admission, port_filter)


@attrs.frozen
class DatagramRoute:
    """Open a session to this shard port."""

    route: Route


@attrs.frozen
class Drop:
    """Drop the datagram (and count it under C{reason})."""

    reason: str
    detail: str


DatagramDecision = Union[DatagramRoute, Drop]


def _admit(route: Route, client_ip: str, policy: DatagramPolicy, protocol: str) -> DatagramDecision:
    port = route.port
    if port.protocol != protocol:
        return Drop("wrong_protocol", f"port {port.port} of {route.shard.hostname_label} is "
                                      f"{port.protocol}, not {protocol}")
    filter_ = policy.port_filter(port)
    if filter_ is not None and not filter_.permits(client_ip):
        return Drop("denied_ip", f"port {port.port} of {route.shard.hostname_label} does not admit {client_ip}")
    return DatagramRoute(route)


def decide_udp(target: ShardName, client_ip: str, snapshot: DirectorySnapshot,
               policy: DatagramPolicy) -> DatagramDecision:
    """A new client of a UDP route whose target is C{target}."""
    if policy.admission is not None and not policy.admission.permits(client_ip):
        return Drop("denied_ip", f"{client_ip} is refused by limits.allow/deny")
    result = snapshot.resolve(target.candidates, datagram=True)
    if isinstance(result, Refusal):
        return Drop(result.reason, result.detail)
    return _admit(result, client_ip, policy, "udp")


def decide_quic(hello: ClientHello, client_ip: str, snapshot: DirectorySnapshot,
                policy: DatagramPolicy) -> DatagramDecision:
    """A new QUIC flow whose Initial packets carried C{hello}."""
    if policy.admission is not None and not policy.admission.permits(client_ip):
        return Drop("denied_ip", f"{client_ip} is refused by limits.allow/deny")
    name = hello.server_name
    if name is None:
        return Drop("no_sni", "no server name")
    parsed = parse_name(name, policy.hostname)
    if isinstance(parsed, Foreign):
        return Drop("unknown_name", f"{name} is not served here")
    if isinstance(parsed, GatewayHost):
        # The gateway's own API is served over TLS on TCP only.
        return Drop("gateway_host", f"{name} is the gateway, which has no QUIC service")
    assert isinstance(parsed, ShardName)
    result = snapshot.resolve(parsed.candidates, datagram=True)
    if isinstance(result, Refusal):
        return Drop(result.reason, result.detail)
    return _admit(result, client_ip, policy, "quic")


__all__ = ["DatagramDecision", "DatagramPolicy", "DatagramRoute", "Drop", "decide_quic", "decide_udp",
           "make_policy", "port_filter"]
