"""
What a connection sees: one frozen L{Runtime} built from a validated configuration.

The front door factory holds one reference to the Runtime in force; a reload builds a new one
and swaps that reference, so a connection keeps the Runtime it was accepted with from start to
end and nothing a connection reads changes under it.  Long-lived state that must survive a
reload (the directory handle, the certificate cache, the upstream pool, the admission counters,
the fleet's rate limits) is carried from one Runtime to the next; settings are never mutated
in place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import attrs

from twisted_gateway.config import GatewayConfig
from twisted_gateway.directory.interfaces import ShardDirectory
from twisted_gateway.directory.model import ShardPort
from twisted_gateway.http.auth import TokenVerifier
from twisted_gateway.http.errors import error_site
from twisted_gateway.http.context import HTTPRouteContext
from twisted_gateway.http.h1.pool import UpstreamPool
from twisted_gateway.limits import Admission, IPFilter, parse_networks
from twisted_gateway.routing import RoutingPolicy
from twisted_gateway.tls.contexts import ContextCache

if TYPE_CHECKING:
    from twisted.web.server import Site

    from twisted_gateway.fleet.limits import SharedLimits
    from twisted_gateway.fleet.redis import RedisLink
    from twisted_gateway.http.api import APISite
    from twisted_gateway.tls.acme.manager import AcmeCertificateSource
    from twisted_gateway.tls.acme.responders import TLSALPN01Responder


class PortFilters:
    """The allow/deny filter of each distinct shard-port list, parsed once (a bounded cache)."""

    def __init__(self) -> None:
        self._filters: dict[tuple[tuple[str, ...], tuple[str, ...]], IPFilter] = {}

    def __call__(self, port: ShardPort) -> IPFilter | None:
        if not port.allow and not port.deny:
            return None
        key = (port.allow, port.deny)
        found = self._filters.get(key)
        if found is None:
            if len(self._filters) > 4096:
                self._filters.clear()
            found = self._filters[key] = IPFilter(parse_networks(port.allow), parse_networks(port.deny))
        return found


@attrs.frozen
class Runtime:
    reactor: Any
    config: GatewayConfig
    directory: ShardDirectory
    """The handle whose C{current()} is the snapshot in force (providers publish into it)."""
    admission: Admission
    contexts: ContextCache
    http: HTTPRouteContext
    api_site: APISite
    tls_alpn: TLSALPN01Responder
    """The TLS-ALPN-01 responder."""
    acme: AcmeCertificateSource | None
    """The ACME certificate source, or None."""
    policy: RoutingPolicy
    port_filter: Callable[[ShardPort], IPFilter | None]
    verifier: TokenVerifier | None
    shared_limits: SharedLimits | None = None
    """The fleet's rate limits on Redis (carried across reloads, even while redis.limits is
    off, so that turning it on again finds the same buckets and loop), or None."""

    @property
    def hostname(self) -> str:
        return self.config.hostname

    def error_site(self, status: int, code: str, message: str) -> Site:
        return error_site(status, code, message)


def http_context(config: GatewayConfig, reactor: Any, verifier: TokenVerifier | None,
                 admission: Admission, pool: UpstreamPool | None = None) -> HTTPRouteContext:
    """The HTTP route settings of one Runtime (the upstream pool is shared across reloads)."""
    ctx = HTTPRouteContext(
        reactor, config.hostname, verifier, config.tcp.connect_timeout, config.http.response_timeout,
        config.auth.signin_url, config.auth.cookie_name, config.auth.cookie_max_age,
        config.http.pool_size, limits=config.limits, trusted_proxies=config.http.trusted_proxies,
        tunnel_idle_timeout=config.tcp.idle_timeout, upstream=pool)
    ctx.admission = lambda: admission
    ctx.access_log = config.log.access_log
    return ctx


def build_runtime(config: GatewayConfig, reactor: Any, *, directory: ShardDirectory,
                  contexts: ContextCache, verifier: TokenVerifier | None, api_site: APISite,
                  tls_alpn: TLSALPN01Responder, acme: AcmeCertificateSource | None,
                  previous: Runtime | None = None, redis: RedisLink | None = None) -> Runtime:
    """
    A Runtime for C{config}; with C{previous}, the state that outlives a reload is carried.
    With C{redis} (the fleet's link) and C{redis.limits} on, the rate limits are the fleet's.
    """
    counter = previous.admission.counter if previous is not None else None
    shared = previous.shared_limits if previous is not None else None
    if shared is None and redis is not None and config.redis.limits:
        from twisted_gateway.fleet.limits import SharedLimits  # only for a fleet (gateway.py)
        shared = SharedLimits(redis, reactor)
    admission = Admission(config.limits, config.proxy_protocol, reactor.seconds, counter=counter,
                          shared=shared if config.redis.limits else None)
    pool = previous.http.upstream if previous is not None else None
    if pool is not None:
        pool.connect_timeout = config.tcp.connect_timeout
        pool.max_idle = config.http.pool_size
    http = http_context(config, reactor, verifier, admission, pool)
    port_filter = previous.port_filter if previous is not None else PortFilters()
    policy = RoutingPolicy(hostname=config.hostname, client_ca=contexts.client_ca is not None,
                           port_filter=port_filter, acme_challenge=tls_alpn.context_for)
    return Runtime(reactor=reactor, config=config, directory=directory, admission=admission,
                   contexts=contexts, http=http, api_site=api_site, tls_alpn=tls_alpn, acme=acme,
                   policy=policy, port_filter=port_filter, verifier=verifier, shared_limits=shared)


__all__ = ["PortFilters", "Runtime", "build_runtime", "http_context"]
