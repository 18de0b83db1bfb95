"""
Every Prometheus series the gateway exports, in one place (documented in docs/metrics.md).

The series live in a registry of their own rather than prometheus-client's global one so that
the admin app exports exactly these.  Hot paths bind label values once (``.labels(...)``) and
keep the child, so that a relayed chunk costs one ``inc`` and no label lookup.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
    "alert was sent), handshake_failed, upstream_failed.",
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


def count_request(route: str, code: int, method: bytes | str) -> None:
    m = method.decode("ascii", "replace") if isinstance(method, bytes) else method
    HTTP_REQUESTS.labels(route=route, code_class=f"{code // 100}xx",
                         method=m if m in _METHODS else "other").inc()

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
