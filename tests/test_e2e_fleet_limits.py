"""
End to end: two gateways on one real redis-server share a per-IP request limit.  Requests sent
alternately to both from 127.0.0.1 are admitted within the documented accuracy of one
fleet-wide limit (twisted_gateway/fleet/limits.py), well below what two separate limits would
admit; with Redis stopped each gateway applies the limit alone and counts its fallbacks; with
Redis back the fleet shares again.
"""

from __future__ import annotations

import http.client
import shutil
import threading
import time

import pytest

from support import Gateway, Upstream, request_heads, shard, tempdir, wait_for

RATE = 10.0   # requests per second per client IP, fleet-wide
BURST = 5.0
SYNC = 0.05   # SharedLimits.interval
CALL = 0.2    # a generous time for one script call (send to answer), for the bound
GATEWAYS = 2
NAME = "web-8080.localhost"


def fleet_bound(seconds: float) -> float:
    """The most the fleet may admit per key in C{seconds} (the module's documented bound),
    plus one token for the edges of the measured window."""
    return BURST + RATE * seconds + (GATEWAYS - 1) * (BURST + RATE * (SYNC + 2 * CALL)) + 1


class CountingUpstream:
    """An HTTP/1.1 shard that answers 200 to everything and counts the requests it received."""

    def __init__(self) -> None:
        self.received = 0
        self._lock = threading.Lock()
        self.server = Upstream(self._handle)
        self.port = self.server.port

    def _handle(self, conn) -> None:
        for _ in request_heads(conn):
            with self._lock:
                self.received += 1
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")

    def close(self) -> None:
        self.server.close()


class Client:
    """Keep-alive HTTPS requests to one gateway (SNI and Host: the shard's name)."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.conn: http.client.HTTPSConnection | None = None

    def get(self) -> int:
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPSConnection(NAME, self.gw.tls_port, timeout=10)
                self.conn.sock = self.gw.connect(NAME)
            try:
                self.conn.request("GET", "/", headers={"Host": NAME})
                response = self.conn.getresponse()
                response.read()
                if response.will_close:
                    self.close()
                return response.status
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def send_alternately(clients: list[Client], seconds: float, per_second: float = 200) -> tuple[list[dict[int, int]], float]:
    """Requests to each client in turn, C{per_second} (paced, so the load is bounded) for
    C{seconds}: per client, the count of each status; and the seconds from the first request to
    the last answer."""
    counts: list[dict[int, int]] = [{} for _ in clients]
    started = time.monotonic()
    for i in range(int(seconds * per_second)):
        # Pacing, not waiting for a condition: the next request's slot.
        ahead = started + i / per_second - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
        status = clients[i % len(clients)].get()
        counts[i % len(clients)][status] = counts[i % len(clients)].get(status, 0) + 1
    return counts, time.monotonic() - started


@pytest.fixture
def fleet(redis_env):
    """Two gateways, each with its own work and state directory, on one Redis."""
    server = redis_env.server()
    upstream = CountingUpstream()
    dirs = [tempdir() for _ in range(GATEWAYS)]
    gateways: list[Gateway] = []
    try:
        for d in dirs:
            gateways.append(Gateway(
                d, [shard("w", "web", 8080, upstream.port, protocol="http/1.1")],
                config={"limits": {"request_rate_per_ip": RATE, "request_burst": BURST},
                        "redis": {"url": server.url}}))
        for gw in gateways:
            wait_for(lambda: gw.metric("gateway_redis_up") == 1, 10, what="the gateway's link to Redis")
        yield server, upstream, gateways
    finally:
        for gw in gateways:
            gw.stop()
        upstream.close()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def test_a_per_ip_request_limit_is_shared_by_two_gateways(fleet):
    server, upstream, gateways = fleet
    clients = [Client(gw) for gw in gateways]
    try:
        # -- shared: one fleet-wide limit ------------------------------------------------------
        counts, seconds = send_alternately(clients, 3.0)
        allowed = sum(c.get(200, 0) for c in counts)
        sent = sum(sum(c.values()) for c in counts)
        assert set().union(*counts) <= {200, 429}
        print(f"shared: {allowed} of {sent} allowed in {seconds:.2f}s; one limit: "
              f"{BURST + RATE * seconds:.1f}, bound {fleet_bound(seconds):.1f}, "
              f"two separate limits: {2 * (BURST + RATE * seconds):.1f}")
        assert sent > 4 * fleet_bound(seconds)  # the client pressed well beyond the limit
        assert BURST + RATE * seconds * 0.8 <= allowed <= fleet_bound(seconds)
        assert allowed < 0.7 * GATEWAYS * (BURST + RATE * seconds)
        assert all(c.get(200, 0) and c.get(429, 0) for c in counts)  # both gateways shared the work
        wait_for(lambda: upstream.received == allowed, 5, what="the upstream to count every 200")
        assert server.cli("EXISTS", "gateway:limit:request_ip:127.0.0.1") == "1"
        assert all(gw.metric("gateway_rate_limit_fallbacks_total", limit="request_ip") == 0 for gw in gateways)

        # -- Redis stopped: each gateway alone at the configured rate --------------------------
        server.stop()
        for gw in gateways:
            wait_for(lambda: gw.metric("gateway_redis_up") == 0, 10, what="the gateway to see Redis go")
        before = upstream.received
        counts, seconds = send_alternately(clients, 3.0)
        allowed_each = [c.get(200, 0) for c in counts]
        print(f"Redis down: {allowed_each} allowed of {[sum(c.values()) for c in counts]} in {seconds:.2f}s "
              f"(one gateway's limit: {BURST + RATE * seconds:.1f}); fallbacks counted: "
              f"{[gw.metric('gateway_rate_limit_fallbacks_total', limit='request_ip') for gw in gateways]}")
        assert set().union(*counts) <= {200, 429}  # still answered
        for c, gw in zip(counts, gateways):
            assert c.get(429, 0) > 0
            assert RATE * seconds * 0.7 <= c.get(200, 0) <= BURST + RATE * seconds + 1
            # Every decision was a fallback (and so were spends still on their way as Redis went).
            assert gw.metric("gateway_rate_limit_fallbacks_total", limit="request_ip") >= sum(c.values())
        # Together they admit more than one fleet-wide limit would: the limit is per gateway now.
        assert sum(allowed_each) > fleet_bound(seconds)
        wait_for(lambda: upstream.received - before == sum(allowed_each), 5, what="the upstream's count")

        # -- Redis back: shared again ----------------------------------------------------------
        server.start()
        for gw in gateways:
            wait_for(lambda: gw.metric("gateway_redis_up") == 1, 20, what="the gateway to reconnect")
        fallbacks = [gw.metric("gateway_rate_limit_fallbacks_total", limit="request_ip") for gw in gateways]
        before = upstream.received
        counts, seconds = send_alternately(clients, 3.0)
        allowed = sum(c.get(200, 0) for c in counts)
        print(f"Redis back: {allowed} allowed in {seconds:.2f}s, bound {fleet_bound(seconds):.1f}")
        # (Two separate limits would admit at least RATE * seconds each, even from empty buckets.)
        assert fleet_bound(seconds) < 0.8 * GATEWAYS * RATE * seconds
        assert BURST + RATE * seconds * 0.8 <= allowed <= fleet_bound(seconds)
        assert server.cli("EXISTS", "gateway:limit:request_ip:127.0.0.1") == "1"
        assert [gw.metric("gateway_rate_limit_fallbacks_total", limit="request_ip") for gw in gateways] == fallbacks
        wait_for(lambda: upstream.received - before == allowed, 5, what="the upstream's count")
    finally:
        for c in clients:
            c.close()
