"""
Every Prometheus series the gateway exports, in one place (documented in docs/metrics.md), and
how the supervisor of several workers merges each one (L{GAUGE_MERGE}).

The series live in a registry of their own rather than prometheus-client's global one so that
the admin app exports exactly these.  Hot paths bind label values once (``.labels(...)``) and
keep the child, so that a relayed chunk costs one ``inc`` and no label lookup.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from twisted_gateway.directory.model import Route

REGISTRY = CollectorRegistry(auto_describe=True)

CONNECTIONS_ACCEPTED = Counter(
    "gateway_connections_accepted_total",
    "Connections accepted on a listener.",
    ["listener"], registry=REGISTRY)
CONNECTIONS_ACCEPTED_TLS = CONNECTIONS_ACCEPTED.labels(listener="tls")

CONNECTIONS_CLOSED = Counter(
    "gateway_connections_closed_total",
    "Connections closed on the TLS listener, by what the connection turned out to be: tcp, "
    "http (a shard's HTTP port), api (the gateway hostname), refused (no route, an error page or "
    "alert was sent), handshake_failed, upstream_failed, tls_passthrough (relayed without "
    "terminating TLS).",
    ["outcome"], registry=REGISTRY)

CONNECTIONS_ACTIVE = Gauge(
    "gateway_connections_active",
    "Connections open on the TLS listener.",
    registry=REGISTRY)

ROUTE_REFUSALS = Counter(
    "gateway_route_refusals_total",
    "Connections refused because their name has no route, by reason: no_sni, unknown_name, "
    "unknown_shard, unknown_port, no_primary, private_port.",
    ["reason"], registry=REGISTRY)

HANDSHAKE_FAILURES = Counter(
    "gateway_tls_handshake_failures_total",
    "TLS handshakes that did not complete, by reason: timeout, not_tls, http_on_tls_port, "
    "malformed_client_hello, oversized_client_hello, invalid_server_name, client_closed, tls_error.",
    ["reason"], registry=REGISTRY)

HANDSHAKE_SECONDS = Histogram(
    "gateway_tls_handshake_seconds",
    "Time from accepting a connection to a completed TLS handshake.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY)

RELAYED_BYTES = Counter(
    "gateway_relayed_bytes_total",
    "Bytes relayed between clients and shard upstreams, by direction: upstream (client to "
    "shard) or downstream (shard to client).",
    ["direction"], registry=REGISTRY)
RELAYED_UPSTREAM = RELAYED_BYTES.labels(direction="upstream")
RELAYED_DOWNSTREAM = RELAYED_BYTES.labels(direction="downstream")

UPSTREAM_CONNECT_SECONDS = Histogram(
    "gateway_upstream_connect_seconds",
    "Time to establish the TCP connection to a shard's port (successful connects only).",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY)

UPSTREAM_CONNECT_FAILURES = Counter(
    "gateway_upstream_connect_failures_total",
    "Failed connections to a shard's port, by reason: refused, timeout, unreachable, dns, error.",
    ["reason"], registry=REGISTRY)

DIRECTORY_SHARDS = Gauge(
    "gateway_directory_shards",
    "Shards in the directory in force.",
    registry=REGISTRY)

DIRECTORY_RELOADS = Counter(
    "gateway_directory_reloads_total",
    "Directory updates, by outcome: success or failure (the last good directory stays in force).",
    ["outcome"], registry=REGISTRY)

DIRECTORY_LAST_RELOAD = Gauge(
    "gateway_directory_last_reload_timestamp_seconds",
    "Unix time of the last directory update attempt.",
    registry=REGISTRY)

DIRECTORY_LAST_RELOAD_SUCCESS = Gauge(
    "gateway_directory_last_reload_success",
    "1 if the last directory update attempt succeeded, else 0.",
    registry=REGISTRY)

CERTIFICATE_NOT_AFTER = Gauge(
    "gateway_certificate_not_after_timestamp_seconds",
    "Expiry (notAfter, Unix time) of each certificate in use, by the name it serves.",
    ["name"], registry=REGISTRY)

CERTIFICATE_RELOADS = Counter(
    "gateway_certificate_reloads_total",
    "Certificate file (re)loads, by outcome: success or failure (the previous pair stays).",
    ["outcome"], registry=REGISTRY)

HTTP_ERROR_PAGES = Counter(
    "gateway_http_error_responses_total",
    "HTTP error responses the gateway itself produced, by status code.",
    ["code"], registry=REGISTRY)

HTTP_REQUESTS = Counter(
    "gateway_http_requests_total",
    "HTTP requests answered, by route (proxy: a shard's HTTP port; api: the gateway hostname), "
    "status class (2xx..5xx) and method (GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, other).",
    ["route", "code_class", "method"], registry=REGISTRY)

UPSTREAM_RESPONSE_SECONDS = Histogram(
    "gateway_upstream_response_seconds",
    "Time from sending a proxied request to receiving the shard's response headers.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY)

AUTH_DECISIONS = Counter(
    "gateway_auth_decisions_total",
    "Authorization decisions for private HTTP ports and the API, by outcome: allowed, missing, "
    "malformed, expired, bad_signature, invalid, forbidden.",
    ["outcome"], registry=REGISTRY)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_METHOD_KEYS = _METHODS | frozenset(m.encode() for m in _METHODS)


_REQUEST_CHILDREN: dict[tuple[str, int, bytes | str], Counter] = {}


def count_request(route: str, code: int, method: bytes | str) -> None:
    """One answered request.  The series' child is bound once per route, status class and
    method as given (a label lookup costs more than the increment); the keys are bounded: two
    routes, ten classes, and methods outside the counted seven are keyed as other."""
    key = (route, code // 100, method if method in _METHOD_KEYS else "other")
    child = _REQUEST_CHILDREN.get(key)
    if child is None:
        m = method.decode("ascii", "replace") if isinstance(method, bytes) else method
        child = _REQUEST_CHILDREN[key] = HTTP_REQUESTS.labels(
            route=route, code_class=f"{key[1]}xx", method=m if m in _METHODS else "other")
    child.inc()

UPSTREAM_REPLAYS = Counter(
    "gateway_upstream_replays_total",
    "h2 requests sent again on a new connection because the shard's GOAWAY showed it never processed them.",
    registry=REGISTRY)

HTTP2_PROTOCOL_ERRORS = Counter(
    "gateway_http2_protocol_errors_total",
    "HTTP/2 connections on h2 ports ended because a peer broke the protocol, by peer: client or shard.",
    ["peer"], registry=REGISTRY)

JWKS_REFRESHES = Counter(
    "gateway_jwks_refreshes_total",
    "Fetches of the control plane's JWKS document, by outcome: success or failure (known keys stay).",
    ["outcome"], registry=REGISTRY)

ACME_ISSUANCES = Counter(
    "gateway_acme_issuances_total",
    "ACME orders, by challenge type (http-01, tls-alpn-01, dns-01) and outcome (success, failure).",
    ["challenge", "outcome"], registry=REGISTRY)

ACME_ISSUE_SECONDS = Histogram(
    "gateway_acme_issue_seconds",
    "Time to obtain a certificate (successful orders).",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
    registry=REGISTRY)

ACME_ON_DEMAND = Counter(
    "gateway_acme_on_demand_total",
    "On-demand issuance decisions for names seen in handshakes: allowed, not_in_directory, "
    "denied_by_ask, ask_failed, rate_limited.",
    ["decision"], registry=REGISTRY)

ACME_CHALLENGE_HANDSHAKES = Counter(
    "gateway_acme_tls_alpn_handshakes_total",
    "TLS-ALPN-01 validation handshakes answered with a challenge certificate.",
    registry=REGISTRY)

CONNECTIONS_REFUSED = Counter(
    "gateway_connections_refused_total",
    "Connections refused before any TLS, by reason: max_connections, max_connections_per_ip, "
    "rate_limited, denied_ip, draining, proxy_header (missing or invalid from a trusted balancer), "
    "untrusted_proxy_header.",
    ["reason"], registry=REGISTRY)

HTTP_RATE_LIMITED = Counter(
    "gateway_http_rate_limited_total",
    "HTTP requests answered 429, by key: ip or token.",
    ["key"], registry=REGISTRY)

CONFIG_RELOADS = Counter(
    "gateway_config_reloads_total",
    "SIGHUP reloads, by outcome: success or failure (the running configuration stays).",
    ["outcome"], registry=REGISTRY)

HTTP_REJECTED = Counter(
    "gateway_http_rejected_total",
    "HTTP requests the gateway refused before they reached a shard because of their form, by "
    "reason: bad_request, bad_framing, unsupported_coding, misdirected, too_large, "
    "header_too_large, head_timeout, body_timeout, method_not_allowed.",
    ["reason"], registry=REGISTRY)

UPSTREAM_BAD_RESPONSES = Counter(
    "gateway_upstream_bad_responses_total",
    "Shard responses refused (502) because their head or framing broke HTTP/1.1, by reason: "
    "bad_head, bad_framing, head_too_large, unexpected_upgrade, bad_body.",
    ["reason"], registry=REGISTRY)

H2_ABUSE = Counter(
    "gateway_h2_abuse_total",
    "h2 client connections ended with GOAWAY ENHANCE_YOUR_CALM, by kind: rapid_reset "
    "(streams reset faster than limits.h2_reset_rate) or control_flood (PING/SETTINGS "
    "unacknowledged past limits.h2_max_pending_control).",
    ["kind"], registry=REGISTRY)

HTTP_TUNNELS = Counter(
    "gateway_http_tunnels_total",
    "Websocket tunnels opened after a shard's 101 Switching Protocols.",
    registry=REGISTRY)


ROUTE_CONNECTIONS = Counter(
    "gateway_route_connections_total",
    "Connections routed to a shard port, by the shard's hostname label and the port "
    "(metrics.per_route; pairs past metrics.max_routes are counted under label and port \"other\").",
    ["label", "port"], registry=REGISTRY)

ROUTE_BYTES = Counter(
    "gateway_route_bytes_total",
    "Bytes relayed to and from a shard port, by the shard's hostname label, the port and "
    "direction: upstream (client to shard) or downstream (shard to client) (metrics.per_route; "
    "pairs past metrics.max_routes are counted under label and port \"other\").",
    ["label", "port", "direction"], registry=REGISTRY)

OTHER_ROUTE = "other"
"""The label and port values of the overflow series: never a port number, so the pair can
never be a real route's."""

ROUTE_FAMILIES = frozenset({"gateway_route_connections", "gateway_route_bytes"})
"""Families labelled by route, whose (label, port) pairs the supervisor caps as well."""


class _RouteSeries:
    """One route's bound children: counting costs an ``inc`` each, no label lookup."""

    __slots__ = ("connections", "up", "down")

    def __init__(self, label: str, port: str) -> None:
        self.connections = ROUTE_CONNECTIONS.labels(label=label, port=port)
        self.up = ROUTE_BYTES.labels(label=label, port=port, direction="upstream")
        self.down = ROUTE_BYTES.labels(label=label, port=port, direction="downstream")


class RouteCounts:
    """The per-route series of this process: off by default, and at most C{max_routes}
    (label, port) pairs with series of their own, the first ones counted; later pairs share
    the C{other} series, so a scan over many names cannot grow the exposition (or the
    process) without bound."""

    def __init__(self, enabled: bool = False, max_routes: int = 1000) -> None:
        self.enabled = enabled
        self.max_routes = max_routes
        self._series: dict[tuple[str, int], _RouteSeries] = {}
        self._other: _RouteSeries | None = None

    def configure(self, enabled: bool, max_routes: int) -> None:
        """Pairs already counted keep their series (a counter that vanished would read as a
        reset to zero); a lower cap applies to new pairs only."""
        self.enabled = enabled
        self.max_routes = max_routes

    def count(self, route: Route, up: int = 0, down: int = 0, connections: int = 0) -> None:
        if not self.enabled:
            return
        key = (route.shard.hostname_label, route.port.port)
        series = self._series.get(key)
        if series is None:
            if len(self._series) < self.max_routes:
                series = self._series[key] = _RouteSeries(key[0], str(key[1]))
            else:
                if self._other is None:
                    self._other = _RouteSeries(OTHER_ROUTE, OTHER_ROUTE)
                series = self._other
        if connections:
            series.connections.inc(connections)
        if up:
            series.up.inc(up)
        if down:
            series.down.inc(down)


ROUTES = RouteCounts()


def configure_routes(enabled: bool, max_routes: int) -> None:
    """Apply metrics.per_route and metrics.max_routes (at start and on every reload)."""
    ROUTES.configure(enabled, max_routes)


def count_route(route: Route, up: int = 0, down: int = 0, connections: int = 0) -> None:
    """Count C{connections} and the bytes relayed each way (C{up}: client to shard, C{down}:
    shard to client) for C{route}; nothing unless metrics.per_route is on.  The splice calls it
    for the connections it relays; the HTTP fronts call it once per client connection and
    with each exchange's bytes.  The admin API's per-port counts (L{LIVE_ROUTES}) are kept
    whatever metrics.per_route says."""
    ROUTES.count(route, up, down, connections)
    LIVE_ROUTES.count(route, up, down, connections)


# -- the fleet: Redis ---------------------------------------------------------------------------

REDIS_UP = Gauge(
    "gateway_redis_up",
    "1 while the connection to Redis (the Sentinel-discovered master, with sentinels) is up; "
    "0 while the gateway runs on its last known state.",
    registry=REGISTRY)

REDIS_DISCONNECTS = Counter(
    "gateway_redis_disconnects_total",
    "Times the connection to Redis was lost (or could not be made) after being up or at start.",
    registry=REGISTRY)

REDIS_COMMAND_ERRORS = Counter(
    "gateway_redis_command_errors_total",
    "Redis commands that failed, by kind: unavailable (no connection, not sent), timeout "
    "(no answer within redis.command_timeout), error (Redis answered an error).",
    ["kind"], registry=REGISTRY)

REDIS_DIRECTORY_RESYNCS = Counter(
    "gateway_redis_directory_resyncs_total",
    "Whole reads of the shard directory from Redis, by reason: start, reconnect, version_gap "
    "(a change notice was missed), check (the periodic version check found a newer version).",
    ["reason"], registry=REGISTRY)

REDIS_DIRECTORY_VERSION = Gauge(
    "gateway_redis_directory_version",
    "The version of the Redis shard directory this gateway routes with.",
    registry=REGISTRY)

REDIS_DIRECTORY_LAG = Histogram(
    "gateway_redis_directory_propagation_seconds",
    "Time from a directory write in Redis (the writer's clock) to this gateway routing with it.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY)

ACME_LOCK_EVENTS = Counter(
    "gateway_acme_lock_events_total",
    "The fleet's per-name ACME issuance lock, by event: acquired, busy (another gateway holds "
    "it), renewed, lost (expired or taken over while this gateway held it), released, "
    "unavailable (Redis could not be asked).",
    ["event"], registry=REGISTRY)

ACME_STORE_DECRYPT_FAILURES = Counter(
    "gateway_acme_store_decrypt_failures_total",
    "Keys in the fleet's ACME store (or its key check) that redis.acme_key_file does not decrypt: "
    "this gateway's key file is not the fleet's.",
    registry=REGISTRY)

RATE_LIMIT_FALLBACKS = Counter(
    "gateway_rate_limit_fallbacks_total",
    "Rate-limit decisions made with the local limits because the shared (Redis) ones could not "
    "be consulted, by limit: connection_ip, request_ip, request_token.",
    ["limit"], registry=REGISTRY)


# -- UDP routes and QUIC ----------------------------------------------------------------------

UDP_DATAGRAMS = Counter(
    "gateway_udp_datagrams_total",
    "Datagrams relayed on UDP routes and QUIC flows, by protocol (udp, quic), the shard's "
    "hostname label, the port and direction: upstream (client to shard) or downstream (shard "
    "to client) (pairs past metrics.max_routes are counted under label and port \"other\").",
    ["protocol", "label", "port", "direction"], registry=REGISTRY)

UDP_BYTES = Counter(
    "gateway_udp_bytes_total",
    "Bytes (UDP payload) relayed on UDP routes and QUIC flows, by protocol, label, port and "
    "direction, as gateway_udp_datagrams_total.",
    ["protocol", "label", "port", "direction"], registry=REGISTRY)

UDP_SESSIONS = Counter(
    "gateway_udp_sessions_total",
    "Sessions opened (a client address and port with its own upstream socket), by protocol "
    "(udp, quic), label and port.",
    ["protocol", "label", "port"], registry=REGISTRY)

UDP_SESSIONS_CLOSED = Counter(
    "gateway_udp_sessions_closed_total",
    "Sessions ended, by protocol and reason: idle (udp.idle_timeout or quic.idle_timeout), "
    "evicted (the table was full: udp.max_sessions, quic.max_flows), removed (its UDP route was "
    "removed by a reload), stopped (the gateway stopped), upstream_error (the upstream socket "
    "could not be used).",
    ["protocol", "reason"], registry=REGISTRY)

UDP_SESSIONS_ACTIVE = Gauge(
    "gateway_udp_sessions_active",
    "Sessions open, by listener: a UDP route's target (<label>-<port>) or quic.",
    ["listener"], registry=REGISTRY)

UDP_DROPPED = Counter(
    "gateway_udp_dropped_total",
    "Datagrams dropped, by listener (a UDP route's target, or quic) and reason: too_large, "
    "denied_ip, unknown_shard, unknown_port, no_primary, wrong_protocol, upstream_refused, "
    "send_failed; and for QUIC not_quic, truncated, not_initial, unsupported_version, "
    "undersized_initial, decrypt_failed, bad_frames, malformed_client_hello, "
    "oversized_client_hello, invalid_server_name, no_sni, unknown_name, gateway_host, "
    "pending_full, pending_timeout, unknown_connection.",
    ["listener", "reason"], registry=REGISTRY)

QUIC_PENDING = Gauge(
    "gateway_quic_pending_flows",
    "Client addresses whose QUIC ClientHello is still incomplete (their datagrams buffered).",
    registry=REGISTRY)

QUIC_VERSION_NEGOTIATIONS = Counter(
    "gateway_quic_version_negotiations_total",
    "Version Negotiation packets the gateway sent to clients whose first Initial named a QUIC "
    "version it cannot read (it reads versions 1 and 2).",
    registry=REGISTRY)

ROUTE_FAMILIES = ROUTE_FAMILIES | {"gateway_udp_datagrams", "gateway_udp_bytes", "gateway_udp_sessions"}


class DatagramRouteSeries:
    """One UDP or QUIC route's bound children."""

    __slots__ = ("sessions", "up", "down", "up_bytes", "down_bytes")

    def __init__(self, protocol: str, label: str, port: str) -> None:
        self.sessions = UDP_SESSIONS.labels(protocol=protocol, label=label, port=port)
        self.up = UDP_DATAGRAMS.labels(protocol=protocol, label=label, port=port, direction="upstream")
        self.down = UDP_DATAGRAMS.labels(protocol=protocol, label=label, port=port, direction="downstream")
        self.up_bytes = UDP_BYTES.labels(protocol=protocol, label=label, port=port, direction="upstream")
        self.down_bytes = UDP_BYTES.labels(protocol=protocol, label=label, port=port, direction="downstream")


_DATAGRAM_SERIES: dict[tuple[str, str, int], DatagramRouteSeries] = {}


def datagram_route_series(protocol: str, route: Route) -> DatagramRouteSeries:
    """The series of C{route}'s UDP or QUIC sessions: its own for the first metrics.max_routes
    (protocol, label, port) triples, then the shared "other" ones."""
    key = (protocol, route.shard.hostname_label, route.port.port)
    series = _DATAGRAM_SERIES.get(key)
    if series is None:
        if len(_DATAGRAM_SERIES) < ROUTES.max_routes:
            series = _DATAGRAM_SERIES[key] = DatagramRouteSeries(protocol, key[1], str(key[2]))
        else:
            other = (protocol, OTHER_ROUTE, -1)
            series = _DATAGRAM_SERIES.get(other)
            if series is None:
                series = _DATAGRAM_SERIES[other] = DatagramRouteSeries(protocol, OTHER_ROUTE, OTHER_ROUTE)
    return series


# -- the hybrid control plane (docs/cloud.md) ------------------------------------------------------

CLOUD_TOKEN_EXPIRY = Gauge(
    "gateway_cloud_token_expiry_timestamp_seconds",
    "When the cloud token in force expires (its exp claim, unix time).",
    registry=REGISTRY)

CLOUD_SYNC_UP = Gauge(
    "gateway_cloud_sync_up",
    "1 while the last /sync request was answered (200 or 304); 0 while the gateway serves its "
    "last good state (the control plane unreachable, an error, or the token refused).",
    registry=REGISTRY)

CLOUD_SYNC_VERSION = Gauge(
    "gateway_cloud_sync_version",
    "The /sync version (directory and settings) in force, 0 before the first.",
    registry=REGISTRY)

CLOUD_SYNC_LAG = Histogram(
    "gateway_cloud_sync_lag_seconds",
    "Time from the control plane publishing a /sync version (its clock) to this gateway "
    "applying it.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY)

CLOUD_SYNC_FAILURES = Counter(
    "gateway_cloud_sync_failures_total",
    "/sync requests or versions that failed, by reason: unreachable (no connection or no answer "
    "in time), http_error (an answer other than 200 or 304), token_refused (401 or 403), invalid "
    "(a version whose directory or settings failed validation: refused, the last good stays).",
    ["reason"], registry=REGISTRY)

CLOUD_REPORT_RECORDS = Counter(
    "gateway_cloud_report_records_total",
    "Report records made, by kind: request (a proxied HTTP request), connection (a TCP/TLS "
    "connection), tunnel (a websocket or CONNECT tunnel), udp (a UDP session).",
    ["kind"], registry=REGISTRY)

CLOUD_REPORTS_SENT = Counter(
    "gateway_cloud_reports_sent_total",
    "Report batches the control plane acknowledged (duplicates it already had included).",
    registry=REGISTRY)

CLOUD_REPORTS_SENT_RECORDS = Counter(
    "gateway_cloud_reports_sent_records_total",
    "Records in the batches the control plane acknowledged.",
    registry=REGISTRY)

CLOUD_REPORTS_FAILURES = Counter(
    "gateway_cloud_reports_failures_total",
    "/reports attempts that failed and will be retried, by reason: unreachable, http_error, "
    "token_refused.",
    ["reason"], registry=REGISTRY)

CLOUD_REPORTS_SPOOLED = Gauge(
    "gateway_cloud_reports_spooled_batches",
    "Report batches in the on-disk spool, waiting to be sent.",
    registry=REGISTRY)

CLOUD_REPORTS_SPOOL_BYTES = Gauge(
    "gateway_cloud_reports_spool_bytes",
    "Bytes (compressed) of the batches in the on-disk spool (at most cloud.spool_bytes).",
    registry=REGISTRY)

CLOUD_REPORTS_DROPPED = Counter(
    "gateway_cloud_reports_dropped_total",
    "Report batches dropped, by reason: spool_full (the oldest, to make room), rejected (the "
    "control plane answered 400 or 413: the batch can never be accepted).",
    ["reason"], registry=REGISTRY)

CLOUD_REPORTS_DROPPED_RECORDS = Counter(
    "gateway_cloud_reports_dropped_records_total",
    "Records in the dropped batches, by reason (as gateway_cloud_reports_dropped_total).",
    ["reason"], registry=REGISTRY)


# -- merging several workers' series ------------------------------------------------------------

@dataclass(frozen=True)
class Merge:
    """How the supervisor makes one value of a gauge out of its workers' values."""

    how: Literal["sum", "min", "max"]
    meaning: str


GAUGE_MERGE: dict[str, Merge] = {
    "gateway_connections_active": Merge(
        "sum", "each open connection is in exactly one worker"),
    "gateway_directory_shards": Merge(
        "max", "every worker reads the same directory, so they differ only for one poll "
               "interval after an edit; a worker that restarted while the file is broken has "
               "no directory (0) and must not hide the one the others route with"),
    "gateway_directory_last_reload_timestamp_seconds": Merge(
        "max", "the last update attempt any worker made"),
    "gateway_directory_last_reload_success": Merge(
        "min", "0 while any worker's last update attempt failed"),
    "gateway_certificate_not_after_timestamp_seconds": Merge(
        "min", "per name, the earliest expiry still served by some worker (one that has not "
               "reloaded a renewed certificate yet serves the old one)"),
    "gateway_redis_up": Merge(
        "min", "0 while any worker has lost Redis (each worker keeps its own connection)"),
    "gateway_redis_directory_version": Merge(
        "min", "the oldest directory version any worker still routes with"),
    "gateway_udp_sessions_active": Merge(
        "sum", "each session is in exactly one process (with workers, UDP and QUIC run in worker 0)"),
    "gateway_quic_pending_flows": Merge(
        "sum", "each pending flow is in exactly one process"),
    "gateway_cloud_token_expiry_timestamp_seconds": Merge(
        "min", "the earliest expiry any worker still holds (one not yet reloaded)"),
    "gateway_cloud_sync_up": Merge(
        "min", "0 while any worker's /sync link is down (each worker polls on its own)"),
    "gateway_cloud_sync_version": Merge(
        "min", "the oldest /sync version any worker still serves"),
    "gateway_cloud_reports_spooled_batches": Merge(
        "sum", "each worker has a spool of its own"),
    "gateway_cloud_reports_spool_bytes": Merge(
        "sum", "each worker has a spool of its own"),
}
"""The merge rule of every gauge in L{REGISTRY}, by family name: a new gauge must declare one
(tests/test_metrics_merge.py fails otherwise).  Counters and histograms need none: their
samples (_total, _bucket, _count, _sum) are added up and never decrease across a worker's
restart, and their _created series take the earliest value seen."""


# -- the supervisor's own series ------------------------------------------------------------------

SUPERVISOR_REGISTRY = CollectorRegistry(auto_describe=True)

WORKERS = Gauge(
    "gateway_workers",
    "Worker processes running.",
    registry=SUPERVISOR_REGISTRY)

WORKER_RESTARTS = Counter(
    "gateway_worker_restarts_total",
    "Workers restarted after exiting.",
    registry=SUPERVISOR_REGISTRY)


# -- the admin API's per-port counts (twisted_gateway/dashboard) ---------------------------------

class LivePortCounts:
    """
    Connections and bytes per shard port (shard id, port number, datagram) since the process
    started, in plain integers, for C{/api/v1/routes}: kept whether or not metrics.per_route
    exports them, at a dict lookup per count (a splice counts at its start and when its bytes
    are flushed, an HTTP front per connection and per exchange).  At most C{max_ports} ports;
    ports of shards that left the directory are forgotten when the view is asked.
    """

    def __init__(self, max_ports: int = 100_000) -> None:
        self.max_ports = max_ports
        self._counts: dict[tuple[str, int, bool], list[int]] = {}

    def count(self, route: Route, up: int = 0, down: int = 0, connections: int = 0) -> None:
        key = (route.shard.id, route.port.port, route.port.datagram)
        entry = self._counts.get(key)
        if entry is None:
            if len(self._counts) >= self.max_ports:
                return
            entry = self._counts[key] = [0, 0, 0]
        entry[0] += connections
        entry[1] += up
        entry[2] += down

    def snapshot(self, shard_ids: set[str]) -> dict[tuple[str, int, bool], tuple[int, int, int]]:
        """(connections, bytes up, bytes down) by port, for the shards in C{shard_ids}; the
        others' counts are dropped."""
        for key in [k for k in self._counts if k[0] not in shard_ids]:
            del self._counts[key]
        return {key: (c, u, d) for key, (c, u, d) in self._counts.items()}


LIVE_ROUTES = LivePortCounts()
