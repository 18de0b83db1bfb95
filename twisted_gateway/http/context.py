"""
The settings every proxied HTTP request needs, shared by all client connections of one Runtime
(a reload builds a new one): the gateway's hostname, the token verifier, timeouts, the sign-in
URL and auth cookie, the limits, the trusted proxies, and the HTTP/1.1 pool to the shards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from twisted_gateway.directory.model import Route
from twisted_gateway.http.auth import TokenVerifier
from twisted_gateway.http.h1.pool import UpstreamPool
from twisted_gateway.limits import in_networks, parse_networks

if TYPE_CHECKING:
    from twisted_gateway.config import LimitsConfig
    from twisted_gateway.limits import Admission


class HTTPRouteContext:
    """What every proxied request needs, shared by all connections of one gateway."""

    def __init__(self, reactor: Any, hostname: str, verifier: TokenVerifier | None,
                 connect_timeout: float, response_timeout: float, signin_url: str | None,
                 cookie_name: str, cookie_max_age: int, pool_size: int = 64,
                 limits: LimitsConfig | None = None, trusted_proxies: tuple[str, ...] = (),
                 tunnel_idle_timeout: float = 3600.0, upstream: UpstreamPool | None = None) -> None:
        from twisted_gateway.config import LimitsConfig
        self.reactor = reactor
        self.hostname = hostname
        self.verifier = verifier
        self.response_timeout = response_timeout
        self.connect_timeout = connect_timeout
        self.signin_url = signin_url
        self.cookie_name = cookie_name.encode()
        self.cookie_max_age = cookie_max_age
        self.limits = limits if limits is not None else LimitsConfig()
        self.trusted_networks = parse_networks(trusted_proxies)
        self.tunnel_idle_timeout = tunnel_idle_timeout
        # Set by the gateway: the admission state in force (rate limits), swapped on reload.
        self.admission: Callable[[], Admission] | None = None
        self.access_log = True
        self.upstream = upstream if upstream is not None else UpstreamPool(reactor, connect_timeout, pool_size)

    def trusted(self, client_ip: str) -> bool:
        return bool(self.trusted_networks) and in_networks(client_ip, self.trusted_networks)

    def max_body(self, route: Route) -> int:
        """The largest request body for C{route} (0: no limit)."""
        own = route.port.max_body_bytes
        return self.limits.max_body_bytes if own is None else own



__all__ = ["HTTPRouteContext"]
