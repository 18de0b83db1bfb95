"""
The routing decision: what the front door does with a connection, from its ClientHello and the
client's address, as a pure function over frozen state (the directory snapshot and the policy).

L{decide} returns one of the explicit decision types below; the front door only carries the
decision out.  Every branch is unit-tested in memory (tests/test_routing.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Union

import attrs

from twisted_gateway import clienthello as ch
from twisted_gateway.directory.model import DirectorySnapshot, Refusal, Route, ShardPort
from twisted_gateway.limits import IPFilter
from twisted_gateway.names import Foreign, GatewayHost, ShardName, parse_name
from twisted_gateway.tls.acme import ACME_TLS_ALPN

if TYPE_CHECKING:
    from OpenSSL import SSL

HTTP_ALPN = (b"h2", b"http/1.1")


@attrs.frozen
class RoutingPolicy:
    """What the decision needs besides the snapshot: fixed for one Runtime."""

    hostname: str
    client_ca: bool
    """Whether tcp.client_ca is set (a client certificate can open a private tcp port)."""
    port_filter: Callable[[ShardPort], Optional[IPFilter]]
    acme_challenge: Callable[[str], Optional[SSL.Context]]
    """The TLS context answering a pending TLS-ALPN-01 challenge for a name, or None."""


@attrs.frozen
class Refuse:
    """Refuse the connection: with a TLS alert, or (C{page}) an HTTP error page after TLS."""

    reason: str
    detail: str
    alert: int
    http_status: int
    page: bool


@attrs.frozen
class AcmeChallenge:
    """Answer the CA's TLS-ALPN-01 validation handshake with this context (RFC 8737 3)."""

    context: SSL.Context


@attrs.frozen
class GatewayApi:
    """The bare hostname: the gateway's own REST API."""


@attrs.frozen
class HttpRoute:
    """An ``http/1.1`` shard port: proxied request by request."""

    route: Route


@attrs.frozen
class H2Route:
    """An ``h2`` shard port: proxied stream by stream (HTTP/1.1 clients request by request)."""

    route: Route


@attrs.frozen
class SpliceRoute:
    """Terminate TLS and relay the decrypted stream (tcp ports; h2 clients of passthrough h2
    ports)."""

    route: Route
    alpn: str
    """The port protocol whose ALPN list the TLS context offers."""
    client_auth_task: Optional[str]
    """A private tcp port: the task a client certificate must cover."""
    send_proxy: bool


@attrs.frozen
class TLSPassthrough:
    """Relay the TLS stream itself, ClientHello first: the shard terminates TLS."""

    route: Route
    send_proxy: bool


Decision = Union[Refuse, AcmeChallenge, GatewayApi, HttpRoute, H2Route, SpliceRoute, TLSPassthrough]


def decide(hello: ch.ClientHello, client_ip: str, snapshot: DirectorySnapshot,
           policy: RoutingPolicy) -> Decision:
    """The one routing decision of a connection."""
    name = hello.server_name
    offered_http = any(p in HTTP_ALPN for p in hello.alpn)
    if name is None:
        return Refuse("no_sni", "no server name", ch.ALERT_UNRECOGNIZED_NAME, 404, False)
    if ACME_TLS_ALPN in hello.alpn:
        challenge = policy.acme_challenge(name)
        if challenge is not None:
            return AcmeChallenge(challenge)
        # No challenge of ours is pending for this name: an ordinary connection, so that a
        # shard's own TLS-ALPN-01 validation is never intercepted.
    parsed = parse_name(name, policy.hostname)
    if isinstance(parsed, Foreign):
        return Refuse("unknown_name", f"{name} is not served here", ch.ALERT_UNRECOGNIZED_NAME, 404, False)
    if isinstance(parsed, GatewayHost):
        return GatewayApi()
    assert isinstance(parsed, ShardName)
    result = snapshot.resolve(parsed.candidates)
    if isinstance(result, Refusal):
        return Refuse(result.reason, result.detail, ch.ALERT_UNRECOGNIZED_NAME, result.http_status, offered_http)
    route = result
    port = route.port
    label = route.shard.hostname_label
    port_filter = policy.port_filter(port)
    if port_filter is not None and not port_filter.permits(client_ip):
        return Refuse("denied_ip", f"port {port.port} of {label} does not admit {client_ip}",
                      ch.ALERT_ACCESS_DENIED, 403, offered_http and not port.tls_passthrough)
    if port.tls_passthrough:
        return TLSPassthrough(route, port.send_proxy)
    if port.protocol == "http/1.1":
        return HttpRoute(route)
    if port.protocol == "h2" and not (port.passthrough and b"h2" in hello.alpn):
        return H2Route(route)
    client_auth_task = None
    if not port.public:
        if not policy.client_ca:
            # Private tcp ports without tcp.client_ca have no way in.
            return Refuse("private_port", f"port {port.port} of {label} is private",
                          ch.ALERT_ACCESS_DENIED, 403, offered_http)
        client_auth_task = route.shard.task
    return SpliceRoute(route, port.protocol, client_auth_task, port.send_proxy)


__all__ = ["AcmeChallenge", "Decision", "GatewayApi", "H2Route", "HTTP_ALPN", "HttpRoute", "Refuse",
           "RoutingPolicy", "SpliceRoute", "TLSPassthrough", "decide"]
