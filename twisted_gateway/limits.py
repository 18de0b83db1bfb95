"""
Admission control: concurrent connection limits, token-bucket rate limits and IP filters.

All are plain objects driven by the caller's clock, so they are cheap on the hot path and
testable without sockets.
"""

from __future__ import annotations

import ipaddress
import math
from typing import TYPE_CHECKING, Callable, Iterable, Protocol

if TYPE_CHECKING:
    from twisted_gateway.config import LimitsConfig, ProxyProtocolConfig
    from twisted_gateway.fleet.limits import SharedLimits

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """CIDR strings (or bare addresses) to networks; raise ValueError naming the bad one."""
    out = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(v, strict=False))
        except ValueError:
            raise ValueError(f"{v!r} is not an IP address or CIDR network") from None
    return tuple(out)


def _address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class IPFilter:
    """Deny wins; with an allow list, only listed addresses pass."""

    def __init__(self, allow: Iterable[Network] = (), deny: Iterable[Network] = ()) -> None:
        self.allow = tuple(allow)
        self.deny = tuple(deny)

    def __bool__(self) -> bool:
        return bool(self.allow or self.deny)

    def permits(self, ip: str) -> bool:
        addr = _address(ip)
        if addr is None:
            return not self.allow
        if any(addr in net for net in self.deny):
            return False
        return not self.allow or any(addr in net for net in self.allow)


def in_networks(ip: str, networks: Iterable[Network]) -> bool:
    addr = _address(ip)
    return addr is not None and any(addr in net for net in networks)


class TokenBucket:
    """
    Up to C{burst} tokens (at least one), refilled at C{rate} tokens per second of C{clock};
    full at first.  Spending is for the caller to count: L{take} spends one if there is one.
    """

    __slots__ = ("rate", "burst", "clock", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.clock = clock
        self.tokens = self.burst
        self.stamp = clock()

    def _refill(self, now: float) -> float:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return self.tokens

    def take(self) -> bool:
        """Spend one token if there is one."""
        if self._refill(self.clock()) >= 1:
            self.tokens -= 1
            return True
        return False

    def wait(self) -> float:
        """Seconds until the next token (0 if one is there), as of the last L{take}."""
        if self.tokens >= 1:
            return 0.0
        return (1 - self.tokens) / self.rate if self.rate > 0 else math.inf

    def full(self, now: float) -> bool:
        """Whether the bucket would be full at C{now} (it has not been used for a while)."""
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


class Limiter(Protocol):
    """What admission asks of a rate limit: L{RateLimiter}, or the fleet's
    L{twisted_gateway.fleet.limits.SharedRateLimiter}."""

    @property
    def enabled(self) -> bool: ...

    def take(self, key: str) -> float: ...


class RateLimiter:
    """One L{TokenBucket} per key (client IP or token subject), refilled at C{rate} per second."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float], max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: dict[str, TokenBucket] = {}

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, key: str) -> float:
        """0 if allowed, else the seconds until a token is available (for Retry-After)."""
        if self.rate <= 0:
            return 0.0
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._add(key)
        if bucket.take():
            return 0.0
        return bucket.wait()

    def _add(self, key: str) -> TokenBucket:
        if len(self._buckets) >= self.max_keys:
            # Forget full buckets (clients that have been quiet): they would start full anyway.
            now = self.clock()
            for k in [k for k, b in self._buckets.items() if b.full(now)]:
                del self._buckets[k]
            if len(self._buckets) >= self.max_keys:
                self._buckets.clear()
        bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, self.clock)
        return bucket


def retry_after_header(seconds: float) -> bytes:
    return str(max(1, math.ceil(seconds))).encode()


class ConnectionCounter:
    """Concurrent connections, globally and per client IP."""

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self.per_ip: dict[str, int] = {}

    def acquire(self, ip: str) -> str | None:
        """Count a connection in; return the refusal reason if it is over a limit."""
        if self.max_total and self.total >= self.max_total:
            return "max_connections"
        current = self.per_ip.get(ip, 0)
        if self.max_per_ip and current >= self.max_per_ip:
            return "max_connections_per_ip"
        self.total += 1
        self.per_ip[ip] = current + 1
        return None

    def release(self, ip: str) -> None:
        self.total -= 1
        left = self.per_ip.get(ip, 1) - 1
        if left <= 0:
            self.per_ip.pop(ip, None)
        else:
            self.per_ip[ip] = left


class Admission:
    """
    The gateway's admission state, rebuilt from configuration (the counters carry over).

    With C{shared} (the fleet's limits on Redis), the per-IP connection rate and the per-IP and
    per-token request rates are the fleet's buckets, which outlive the Admission; without, they
    are this process's own and start full.  The concurrent-connection caps are always this
    process's.
    """

    def __init__(self, limits: LimitsConfig, proxy_protocol: ProxyProtocolConfig, clock: Callable[[], float],
                 counter: ConnectionCounter | None = None, shared: SharedLimits | None = None) -> None:
        self.limits = limits
        self.filter = IPFilter(parse_networks(limits.allow), parse_networks(limits.deny))
        self.trusted_proxies = parse_networks(proxy_protocol.trusted)
        self.counter = counter or ConnectionCounter(0, 0)
        self.counter.max_total = limits.max_connections
        self.counter.max_per_ip = limits.max_connections_per_ip

        self.shared = shared

        def limiter(name: str, rate: float, burst: float) -> Limiter:
            if shared is not None and rate > 0:
                return shared.limiter(name, rate, burst or 2 * rate)
            return RateLimiter(rate, burst or 2 * rate, clock)
        self.connection_rate = limiter("connection_ip", limits.connection_rate_per_ip,
                                       limits.connection_burst_per_ip)
        self.request_rate_ip = limiter("request_ip", limits.request_rate_per_ip, limits.request_burst)
        self.request_rate_token = limiter("request_token", limits.request_rate_per_token, limits.request_burst)

    def admit(self, ip: str) -> str | None:
        """Count a new connection from C{ip} in, or return why it is refused."""
        if self.filter and not self.filter.permits(ip):
            return "denied_ip"
        if self.connection_rate.enabled and self.connection_rate.take(ip) > 0:
            return "rate_limited"
        return self.counter.acquire(ip)

    def release(self, ip: str) -> None:
        self.counter.release(ip)
