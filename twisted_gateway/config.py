"""
The gateway's configuration: one YAML file, validated once at start into frozen attrs objects.

Every key is declared here with its type, default and check; docs/configuration.md documents
the same keys.  A problem is reported as one sentence naming the file, the dotted key and what
is wrong, e.g. ``etc/gateway.yaml: tls.handshake_timeout: expected a positive number, got 'x'``.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import attrs
import yaml

from twisted_gateway.names import is_valid_label, normalize_hostname


class ConfigError(ValueError):
    """A configuration problem; str() is the one-line message shown to the operator."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source, self.key, self.problem = source, key, problem
        super().__init__(f"{source}: {key}: {problem}" if key else f"{source}: {problem}")


# --- value checks: each returns the converted value or raises ValueError(problem) -------------

def positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"expected a positive number, got {value!r}")
    return float(value)


def positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return value


def optional_path(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a file path, got {value!r}")
    return value


def path(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a path, got {value!r}")
    return value


def optional_str(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


def optional_url(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith(("https://", "http://")):
        raise ValueError(f"expected an http(s) URL, got {value!r}")
    return value


def non_negative_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"expected a number >= 0, got {value!r}")
    return float(value)


def cookie_name(value: Any) -> str:
    import re
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", value):
        raise ValueError(f"expected a cookie name of letters, digits, '-' and '_', got {value!r}")
    return value


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def one_of(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return value
    return check


def hostname(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a DNS name, got {value!r}")
    name = normalize_hostname(value)
    if not name or not all(is_valid_label(part) for part in name.split(".")):
        raise ValueError(f"{value!r} is not a DNS name of lower-case labels")
    return name


def endpoint(value: Any) -> str:
    """A port number or a Twisted server endpoint description (tcp:PORT:interface=...)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value <= 65535:
            raise ValueError(f"port {value} out of range")
        return f"tcp:{value}"
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a port number or an endpoint description, got {value!r}")
    if value.isdigit():
        return endpoint(int(value))
    if ":" not in value:
        raise ValueError(f"{value!r} is neither a port number nor an endpoint description like tcp:28318")
    return value


def non_negative_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected an integer >= 0, got {value!r}")
    return value


def networks(value: Any) -> tuple[str, ...]:
    from twisted_gateway.limits import parse_networks
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of CIDR networks, got {value!r}")
    parse_networks(value)
    return tuple(value)


def _field(check: Callable[[Any], Any], default: Any, doc: str) -> Any:
    return attrs.field(default=default, metadata={"check": check, "doc": doc})


@attrs.frozen
class ListenConfig:
    tls: str = _field(endpoint, "tcp:28318", "TLS listener (port or endpoint description).")
    plain: str = _field(endpoint, "tcp:28317", "Plain listener for the admin app.")


@attrs.frozen
class AdminConfig:
    token_file: str | None = _field(optional_path, None, "File holding the admin token (one line); set, the dashboard (/) and the admin API (/api/v1/) answer only requests that carry it (Authorization: Bearer, or as a Basic password). Re-read when the file changes.")
    protect_metrics: bool = _field(boolean, False, "With admin.token_file: /metrics needs the token too (Prometheus: authorization.credentials_file). /healthz, /readyz and ACME HTTP-01 answers stay open.")
    refusals_kept: int = _field(positive_int, 256, "Recent refusals each gateway process keeps for /api/v1/refusals (a ring; a restart changes it).")


@attrs.frozen
class TLSConfig:
    certificate: str | None = _field(optional_path, None, "PEM chain for *.<hostname> and <hostname>.")
    private_key: str | None = _field(optional_path, None, "PEM private key of the certificate.")
    handshake_timeout: float = _field(positive_number, 10.0, "Seconds from accept to a finished handshake.")
    max_client_hello_bytes: int = _field(positive_int, 32768, "Largest ClientHello accepted.")
    reload_interval: float = _field(positive_number, 1.0, "Seconds between checks of the certificate files.")


@attrs.frozen
class DirectoryConfig:
    file: str | None = _field(optional_path, None, "Directory file; unset serves the built-in demo shard.")
    poll_interval: float = _field(positive_number, 0.5, "Seconds between checks of the directory file.")


@attrs.frozen
class TCPConfig:
    connect_timeout: float = _field(positive_number, 5.0, "Seconds to connect to a shard's port.")
    idle_timeout: float = _field(positive_number, 3600.0, "Seconds without bytes either way before a splice is closed.")
    client_ca: str | None = _field(optional_path, None, "PEM CA bundle for client certificates that open private tcp ports.")


@attrs.frozen
class HTTPConfig:
    response_timeout: float = _field(positive_number, 30.0, "Seconds for a shard to answer a proxied request (then 504).")
    pool_size: int = _field(positive_int, 64, "Idle keep-alive connections kept per shard port.")
    trusted_proxies: tuple[str, ...] = _field(
        networks, (), "Peers whose X-Forwarded-* and Forwarded fields are kept (and appended to); "
                      "from any other client they are replaced by the gateway's own.")


@attrs.frozen
class AuthConfig:
    jwt_secret: str | None = _field(optional_str, None, "HS256 shared secret for control-plane tokens.")
    jwt_secret_file: str | None = _field(optional_path, None, "File holding the HS256 secret.")
    jwt_public_key: str | None = _field(optional_path, None, "PEM public key file (RSA: RS256, EC P-256: ES256).")
    jwks_url: str | None = _field(optional_url, None, "JWKS URL of the control plane (RS256/ES256 keys by kid).")
    jwks_refresh: float = _field(positive_number, 300.0, "Seconds between JWKS refreshes.")
    issuer: str | None = _field(optional_str, None, "Required iss claim, if set.")
    audience: str | None = _field(optional_str, None, "Required aud claim, if set.")
    leeway: float = _field(non_negative_number, 30.0, "Seconds of clock skew allowed for exp/iat.")
    signin_url: str | None = _field(optional_url, None, "Control-plane sign-in URL browsers are redirected to.")
    cookie_name: str = _field(cookie_name, "__Host-gateway-token", "Cookie carrying the token for browsers.")
    cookie_max_age: int = _field(positive_int, 86400, "Max-Age of the auth cookie in seconds.")


@attrs.frozen
class APIConfig:
    cors_allowed_origin: str | None = _field(optional_url, None, "Origin allowed to call the API from a browser.")


def fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"expected a number between 0 and 1, got {value!r}")
    return float(value)


def name_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of DNS names, got {value!r}")
    return tuple(hostname(v) for v in value)


def host_port(value: Any) -> str:
    if not isinstance(value, str) or ":" not in value or not value.rsplit(":", 1)[1].isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return value


@attrs.frozen
class AcmeConfig:
    enabled: bool = _field(boolean, False, "Obtain certificates from an ACME CA.")
    ca_server: str = _field(optional_url, "https://acme-v02.api.letsencrypt.org/directory", "ACME directory URL.")
    email: str | None = _field(optional_str, None, "Account contact e-mail.")
    key_type: str = _field(one_of("ecdsa-p256", "rsa-2048"), "ecdsa-p256", "Certificate key type.")
    ca_bundle: str | None = _field(optional_path, None, "CA bundle to trust for the ACME server's HTTPS.")
    challenge: str = _field(one_of("http-01", "tls-alpn-01", "dns-01"), "tls-alpn-01", "Challenge for single names.")
    wildcard: bool = _field(boolean, False, "Obtain *.<hostname> + <hostname> through dns-01.")
    names: tuple[str, ...] = _field(name_list, (), "Extra names to keep certificates for.")
    on_demand: str = _field(one_of("off", "directory", "ask"), "off", "On-demand issuance policy.")
    ask_url: str | None = _field(optional_url, None, "URL asked (GET ?domain=NAME, 200 = yes) with on_demand: ask.")
    on_demand_rate: float = _field(positive_number, 10.0, "On-demand orders per minute, at most.")
    on_demand_wait: float = _field(non_negative_number, 0.0, "Seconds a handshake waits for an on-demand certificate.")
    renew_fraction: float = _field(fraction, 2 / 3, "Renew at this fraction of the lifetime.")
    check_interval: float = _field(positive_number, 60.0, "Seconds between renewal checks.")
    retry_initial: float = _field(positive_number, 60.0, "First retry delay after a failure (doubles).")
    retry_max: float = _field(positive_number, 3600.0, "Longest retry delay.")
    dns_provider: str = _field(one_of("rfc2136", "exec"), "rfc2136", "How dns-01 records are published.")
    dns_server: str = _field(host_port, "127.0.0.1:53", "RFC 2136 server (HOST:PORT).")
    dns_zone: str | None = _field(optional_str, None, "Zone the RFC 2136 updates go to.")
    tsig_name: str | None = _field(optional_str, None, "TSIG key name.")
    tsig_secret: str | None = _field(optional_str, None, "TSIG secret (base64).")
    tsig_algorithm: str = _field(one_of("hmac-sha256", "hmac-sha512", "hmac-sha1"), "hmac-sha256", "TSIG algorithm.")
    dns_exec: str | None = _field(optional_str, None, "Command run as: CMD present|cleanup RECORD VALUE.")
    dns_propagation_timeout: float = _field(positive_number, 60.0, "Seconds to wait for a TXT record to be visible.")




@attrs.frozen
class LimitsConfig:
    max_connections: int = _field(non_negative_int, 20000, "Concurrent TLS connections (0: no limit).")
    max_connections_per_ip: int = _field(non_negative_int, 512, "Concurrent TLS connections per client IP (0: no limit).")
    connection_rate_per_ip: float = _field(non_negative_number, 0.0, "New connections per second per client IP (0: off).")
    connection_burst_per_ip: float = _field(non_negative_number, 0.0, "Burst for connection_rate_per_ip (0: twice the rate).")
    request_rate_per_ip: float = _field(non_negative_number, 0.0, "HTTP requests per second per client IP (0: off).")
    request_rate_per_token: float = _field(non_negative_number, 0.0, "HTTP requests per second per token subject (0: off).")
    request_burst: float = _field(non_negative_number, 0.0, "Burst for the request rates (0: twice the rate).")
    allow: tuple[str, ...] = _field(networks, (), "If set, only these client networks may connect.")
    deny: tuple[str, ...] = _field(networks, (), "Client networks refused.")
    max_header_bytes: int = _field(positive_int, 16384, "Largest HTTP/1.1 request head.")
    max_headers: int = _field(positive_int, 100, "Most HTTP/1.1 request header fields.")
    http_idle_timeout: float = _field(positive_number, 120.0, "Seconds an idle HTTP connection is kept.")
    request_head_timeout: float = _field(positive_number, 10.0, "Seconds a client has to send a whole HTTP/1.1 request head, from its first byte (then 408).")
    body_min_rate: float = _field(non_negative_number, 1024.0, "Bytes per second a request body must average over body_rate_window while the gateway reads it (0: off; then 408).")
    body_rate_window: float = _field(positive_number, 10.0, "Seconds over which body_min_rate is measured.")
    max_body_bytes: int = _field(non_negative_int, 100 * 1024 * 1024, "Largest request body proxied to a shard (0: no limit; then 413); a directory port may set its own.")
    api_max_body_bytes: int = _field(positive_int, 1024 * 1024, "Largest request body the gateway's REST API reads (then 413).")
    h2_reset_rate: float = _field(positive_number, 10.0, "Streams per second an h2 client may reset before their response, sustained (then GOAWAY ENHANCE_YOUR_CALM).")
    h2_reset_burst: int = _field(positive_int, 100, "Burst allowed above h2_reset_rate.")
    h2_max_pending_control: int = _field(positive_int, 100, "PING and SETTINGS frames an h2 client may send while it does not read their acknowledgements (then GOAWAY ENHANCE_YOUR_CALM).")
    drain_timeout: float = _field(positive_number, 30.0, "Seconds open connections get to finish on SIGTERM.")


@attrs.frozen
class ProxyProtocolConfig:
    trusted: tuple[str, ...] = _field(networks, (), "Load balancers whose PROXY v1/v2 headers are accepted (and required).")


@attrs.frozen
class LogConfig:
    format: str = _field(one_of("text", "json"), "text", "Log line format.")
    level: str = _field(one_of("debug", "info", "warn", "error", "critical"), "info", "Lowest level logged.")
    access_log: bool = _field(boolean, True, "One line per closed connection.")


@attrs.frozen
class MetricsConfig:
    per_route: bool = _field(boolean, False, "Export per-route series (gateway_route_connections_total, "
                                             "gateway_route_bytes_total) by shard label and port.")
    max_routes: int = _field(positive_int, 1000, "Most (label, port) pairs with series of their own; "
                                                 "later pairs are counted under label and port \"other\".")


def redis_url(value: Any) -> str | None:
    if value is None:
        return None
    from urllib.parse import urlsplit
    if not isinstance(value, str) or not value.startswith(("redis://", "rediss://")):
        raise ValueError(f"expected a redis:// or rediss:// URL, got {value!r}")
    try:
        parts = urlsplit(value)
        parts.port
    except ValueError as e:
        raise ValueError(f"{value!r} is not a Redis URL ({e})") from None
    if not parts.hostname:
        raise ValueError(f"{value!r} names no host")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ValueError(f"the database in {value!r} must be a number, like redis://host:6379/0")
    if parts.password:
        raise ValueError("put the password in redis.password_file, not in the URL")
    return value


def host_ports(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of HOST:PORT, got {value!r}")
    return tuple(host_port(v) for v in value)


def key_prefix(value: Any) -> str:
    import re
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.:{}-]{1,64}", value):
        raise ValueError(f"expected up to 64 letters, digits and _.:{{}}-, got {value!r}")
    return value


@attrs.frozen
class RedisConfig:
    url: str | None = _field(redis_url, None, "redis://[user@]host:port/db (rediss:// for TLS); with sentinels, "
                                              "only its user, database and scheme are used.  Unset (and no "
                                              "sentinels): no Redis, the gateway is alone.")
    password_file: str | None = _field(optional_path, None, "File holding the Redis password (ACL user's or requirepass).")
    tls_ca: str | None = _field(optional_path, None, "PEM CA bundle the Redis server's certificate must chain to (implies TLS).")
    tls_server_name: str | None = _field(optional_str, None, "Name checked in the Redis server's certificate (default: the URL's host).")
    sentinels: tuple[str, ...] = _field(host_ports, (), "Sentinel addresses (HOST:PORT); the master is asked of them.")
    master_name: str = _field(optional_str, "mymaster", "The Sentinel master (service) name.")
    key_prefix: str = _field(key_prefix, "gateway:", "Prefix of every key and channel the fleet uses.")
    connect_timeout: float = _field(positive_number, 2.0, "Seconds to connect to Redis.")
    command_timeout: float = _field(positive_number, 2.0, "Seconds for Redis to answer a command (then the connection is dropped and redialled).")
    check_interval: float = _field(positive_number, 1.0, "Seconds between checks of the directory version (besides pub/sub notices).")
    directory: bool = _field(boolean, True, "Read the shard directory from Redis (when directory.file is unset).")
    acme: bool = _field(boolean, True, "Keep ACME certificates, account, challenges and the issuance lock in Redis.")
    acme_key_file: str | None = _field(optional_path, None, "Fernet key file that encrypts private keys kept in Redis (required with redis.acme and acme.enabled).")
    acme_lock_ttl: float = _field(positive_number, 60.0, "Seconds an ACME issuance lock lives unless its holder renews it (every third of it); a dead holder's lock expires after this.")
    limits: bool = _field(boolean, True, "Share the per-IP and per-token rate limits through Redis.")

    @property
    def enabled(self) -> bool:
        return self.url is not None or bool(self.sentinels)


def udp_listen(value: Any) -> str:
    """A UDP listener: a port number or ``udp:PORT[:interface=ADDRESS]`` (L{parse_udp_listen})."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = f"udp:{value}"
    if not isinstance(value, str):
        raise ValueError(f"expected a port number or udp:PORT[:interface=ADDRESS], got {value!r}")
    if value.isdigit():
        value = f"udp:{value}"
    parse_udp_listen(value)
    return value


def parse_udp_listen(description: str) -> tuple[int, str]:
    """``udp:PORT[:interface=ADDRESS]`` to (port, interface); an IPv6 address's colons are
    escaped as in Twisted's endpoint descriptions (``interface=\\:\\:1``) or not at all."""
    import ipaddress
    import re
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", description)]
    if parts[0] != "udp" or len(parts) < 2 or not parts[1].isdigit() or not 0 <= int(parts[1]) <= 65535:
        raise ValueError(f"{description!r} is not udp:PORT[:interface=ADDRESS] with a port from 0 to 65535")
    interface = ""
    rest = parts[2:]
    if rest and rest[0].startswith("interface=") and len(rest) > 1 and not rest[-1].startswith("interface="):
        rest = [":".join(rest)]  # an unescaped IPv6 address
    for option in rest:
        key, _, val = option.partition("=")
        if key != "interface" or not val:
            raise ValueError(f"{description!r}: unknown option {option!r} (only interface=ADDRESS)")
        try:
            ipaddress.ip_address(val)
        except ValueError:
            raise ValueError(f"{description!r}: interface {val!r} is not an IP address") from None
        interface = val
    return int(parts[1]), interface


@attrs.frozen
class UDPRoute:
    """One gateway UDP listener and the shard port (``<label>-<port>``, or the pinned
    ``<label>-<keyBegin>-<rclockBegin>-<port>``, as in SNI) its datagrams go to."""

    listen: str
    target: str


def udp_routes(value: Any) -> tuple[UDPRoute, ...]:
    from twisted_gateway.names import ShardName, parse_name
    if not isinstance(value, list):
        raise ValueError(f"expected a list of {{listen, target}} mappings, got {value!r}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or set(item) != {"listen", "target"}:
            raise ValueError(f"routes[{i}]: expected a mapping with exactly listen and target, got {item!r}")
        try:
            listen = udp_listen(item["listen"])
        except ValueError as e:
            raise ValueError(f"routes[{i}].listen: {e}") from None
        target = item["target"]
        if not isinstance(target, str) or not isinstance(parse_name(f"{target}.x", "x"), ShardName):
            raise ValueError(f"routes[{i}].target: expected <label>-<port> (a shard port, as in the "
                             f"TLS name), got {target!r}")
        out.append(UDPRoute(listen, target))
    fixed = [r.listen for r in out if parse_udp_listen(r.listen)[0] != 0]
    if len(set(fixed)) != len(fixed):
        raise ValueError("two routes have the same listen")
    return tuple(out)


def quic_listen(value: Any) -> str:
    if value is False:
        return "off"  # YAML reads a bare off as false
    if value in ("auto", "off"):
        return str(value)
    try:
        return udp_listen(value)
    except ValueError:
        raise ValueError(f"expected auto, off, a port number or udp:PORT[:interface=ADDRESS], "
                         f"got {value!r}") from None


def datagram_size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1200 <= value <= 65527:
        raise ValueError(f"expected a datagram size from 1200 to 65527 bytes, got {value!r}")
    return value


@attrs.frozen
class UDPConfig:
    routes: tuple[UDPRoute, ...] = _field(
        udp_routes, (), "UDP listeners, each relaying to one udp shard port: "
                        "[{listen: udp:5353:interface=10.0.0.5, target: dns-53}].")
    idle_timeout: float = _field(positive_number, 60.0, "Seconds without a datagram either way before a session ends.")
    max_sessions: int = _field(positive_int, 10000, "Sessions (client address and port) per UDP listener; "
                                                    "a new one evicts the longest idle.")
    max_datagram_bytes: int = _field(datagram_size, 8192, "Largest datagram relayed either way (larger: dropped).")


@attrs.frozen
class QUICConfig:
    listen: str = _field(quic_listen, "auto", "QUIC listener: auto (UDP on the TLS listener's address "
                                              "and port), off, or udp:PORT[:interface=ADDRESS].")
    idle_timeout: float = _field(positive_number, 60.0, "Seconds without a datagram either way before a flow ends.")
    max_flows: int = _field(positive_int, 10000, "Flows (client address and port) relayed at once; a new one "
                                                 "evicts the longest idle.")
    max_datagram_bytes: int = _field(datagram_size, 4096, "Largest datagram relayed either way (larger: dropped).")
    pending_datagrams: int = _field(positive_int, 8, "Datagrams buffered per client address while its "
                                                     "ClientHello is incomplete.")
    max_pending: int = _field(positive_int, 1000, "Client addresses whose ClientHello is incomplete, at most "
                                                  "(then new ones are dropped).")
    pending_timeout: float = _field(positive_number, 5.0, "Seconds a client has to complete its ClientHello.")


def https_url(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("https://") or len(value) <= len("https://"):
        raise ValueError(f"expected an https:// URL, got {value!r}")
    return value.rstrip("/")


def region_map(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise ValueError(f"expected a mapping of region names to https:// base URLs, got {value!r}")
    out = []
    for region, url in sorted(value.items()):
        try:
            out.append((region, https_url(url) or ""))
        except ValueError as e:
            raise ValueError(f"region {region!r}: {e}") from None
        if not out[-1][1]:
            raise ValueError(f"region {region!r}: expected an https:// URL, got None")
    return tuple(out)


@attrs.frozen
class CloudConfig:
    token_file: str | None = _field(optional_path, None, "File holding the cloud token (a JWT minted by the control plane); set, the gateway links to the control plane.")
    token_key: str | None = _field(optional_path, None, "The control plane's public key (PEM, RS256 or ES256) or JWKS file the cloud token is verified with; unset: the control plane's JWKS at <base URL>/jwks.json, fetched at start and kept in state_dir.")
    regions: tuple[tuple[str, str], ...] = _field(region_map, (), "Control-plane base URL of each region a cloud token may name: {eu: https://eu.cp.example.com}.")
    url: str | None = _field(https_url, None, "Control-plane base URL used whatever the token's region (an explicit override of cloud.regions).")
    ca_bundle: str | None = _field(optional_path, None, "PEM CA bundle the control plane's HTTPS certificate must chain to (default: the system's).")
    audience: str = _field(optional_str, "twisted-gateway", "The aud claim a cloud token must carry.")
    leeway: float = _field(non_negative_number, 30.0, "Seconds of clock skew allowed for the cloud token's exp and iat.")
    expiry_warning: float = _field(positive_number, 7 * 86400.0, "Seconds before the cloud token's expiry from which it is reported as expiring (log, /readyz).")
    directory: bool = _field(boolean, True, "Take the shard directory from the control plane's /sync (when directory.file is unset).")
    settings: bool = _field(boolean, True, "Apply the settings /sync delivers (user-token keys, sign-in URL, limits) over the configuration file's.")
    sync_wait: float = _field(positive_number, 25.0, "Seconds a /sync long poll may wait for a change before the control plane answers 304.")
    request_timeout: float = _field(positive_number, 10.0, "Seconds for the control plane to answer a request (beyond sync_wait for /sync).")
    retry_initial: float = _field(positive_number, 0.5, "First delay before retrying /sync or /reports after a failure (doubles, with jitter).")
    retry_max: float = _field(positive_number, 30.0, "Longest delay between retries.")
    reports: bool = _field(boolean, True, "Send one report record per proxied request and per TCP connection to /reports.")
    batch_records: int = _field(positive_int, 500, "Records per report batch, at most (a full batch is sent at once).")
    batch_interval: float = _field(positive_number, 1.0, "Seconds a record waits, at most, before its batch is sealed and sent.")
    spool_bytes: int = _field(positive_int, 64 * 1024 * 1024, "Bytes of compressed batches kept on disk while the control plane is away (per gateway process); beyond, the oldest are dropped.")
    flush_timeout: float = _field(non_negative_number, 5.0, "Seconds spent sending spooled batches on SIGTERM (what is left stays in the spool for the next start).")

    @property
    def enabled(self) -> bool:
        return self.token_file is not None


@attrs.frozen
class GatewayConfig:
    hostname: str = _field(hostname, "localhost", "The wildcard base name.")
    state_dir: str = _field(path, "./state", "Where the local CA and other state live (created 0700).")
    workers: int = _field(positive_int, max(1, os.cpu_count() or 1) if os.name == "posix" else 1,
                          "Worker processes sharing the TLS listener (POSIX; 1 on Windows).")
    listen: ListenConfig = attrs.field(factory=ListenConfig)
    admin: AdminConfig = attrs.field(factory=AdminConfig)
    tls: TLSConfig = attrs.field(factory=TLSConfig)
    directory: DirectoryConfig = attrs.field(factory=DirectoryConfig)
    tcp: TCPConfig = attrs.field(factory=TCPConfig)
    http: HTTPConfig = attrs.field(factory=HTTPConfig)
    auth: AuthConfig = attrs.field(factory=AuthConfig)
    api: APIConfig = attrs.field(factory=APIConfig)
    acme: AcmeConfig = attrs.field(factory=AcmeConfig)
    limits: LimitsConfig = attrs.field(factory=LimitsConfig)
    proxy_protocol: ProxyProtocolConfig = attrs.field(factory=ProxyProtocolConfig)
    log: LogConfig = attrs.field(factory=LogConfig)
    metrics: MetricsConfig = attrs.field(factory=MetricsConfig)
    redis: RedisConfig = attrs.field(factory=RedisConfig)
    udp: UDPConfig = attrs.field(factory=UDPConfig)
    quic: QUICConfig = attrs.field(factory=QUICConfig)
    cloud: CloudConfig = attrs.field(factory=CloudConfig)
    source: str = attrs.field(default="<defaults>", metadata={"internal": True})


_SECTIONS: dict[str, type] = {
    "listen": ListenConfig, "admin": AdminConfig, "tls": TLSConfig, "directory": DirectoryConfig,
    "tcp": TCPConfig, "http": HTTPConfig, "auth": AuthConfig, "api": APIConfig, "acme": AcmeConfig, "limits": LimitsConfig,
    "proxy_protocol": ProxyProtocolConfig, "log": LogConfig, "metrics": MetricsConfig,
    "redis": RedisConfig, "udp": UDPConfig, "quic": QUICConfig, "cloud": CloudConfig,
}


def _build(cls: type, doc: Any, source: str, prefix: str) -> Any:
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(source, prefix.rstrip(".") or "top level", "expected a mapping")
    known = {f.name: f for f in attrs.fields(cls) if not f.metadata.get("internal")}
    for key in doc:
        if key not in known:
            shown = key if isinstance(key, str) and key.isprintable() and len(key) < 64 else repr(key)[:80]
            raise ConfigError(source, f"{prefix}{shown}",
                              f"unknown key (known: {', '.join(sorted(known))})")
    values = {}
    for name, f in known.items():
        if name in _SECTIONS and cls is GatewayConfig:
            values[name] = _build(_SECTIONS[name], doc.get(name), source, f"{prefix}{name}.")
        elif name in doc:
            try:
                values[name] = f.metadata["check"](doc[name])
            except ValueError as e:
                raise ConfigError(source, f"{prefix}{name}", str(e)) from None
    return cls(**values)


def load_config(path_: str | None, overrides: dict[str, Any] | None = None) -> GatewayConfig:
    """Read C{path_} (or start from defaults) and apply C{overrides} ({"tls.certificate": ...})."""
    doc: dict[str, Any] = {}
    source = "<defaults>"
    if path_ is not None:
        source = path_
        try:
            with open(path_, "rb") as f:
                loaded = yaml.safe_load(f)
        except OSError as e:
            raise ConfigError(path_, "", f"cannot read: {e.strerror}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark is not None else ""
            raise ConfigError(path_, "", f"{where}not valid YAML ({getattr(e, 'problem', e)})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(path_, "", "expected a mapping at the top level")
        doc = loaded or {}
    config = _build(GatewayConfig, doc, source, "")
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.rpartition(".")
        where = f"--{dotted.replace('.', '-').replace('_', '-')}"
        cls = _SECTIONS[section] if section else GatewayConfig
        field = attrs.fields_dict(cls)[key]
        try:
            checked = field.metadata["check"](value)
        except ValueError as e:
            raise ConfigError("command line", where, str(e)) from None
        if section:
            config = attrs.evolve(config, **{section: attrs.evolve(getattr(config, section), **{key: checked})})
        else:
            config = attrs.evolve(config, **{key: checked})
    if (config.tls.certificate is None) != (config.tls.private_key is None):
        raise ConfigError(source, "tls.private_key" if config.tls.private_key is None else "tls.certificate",
                          "tls.certificate and tls.private_key must be set together")
    keys = [k for k in ("jwt_secret", "jwt_secret_file", "jwt_public_key", "jwks_url") if getattr(config.auth, k)]
    if len(keys) > 1:
        raise ConfigError(source, f"auth.{keys[1]}", f"set only one of auth.jwt_secret, "
                          f"auth.jwt_secret_file, auth.jwt_public_key and auth.jwks_url "
                          f"(also set: auth.{keys[0]})")
    acme = config.acme
    if acme.enabled and (acme.wildcard or acme.challenge == "dns-01"):
        if acme.dns_provider == "rfc2136" and not acme.dns_zone:
            raise ConfigError(source, "acme.dns_zone", "dns-01 through rfc2136 needs the zone to update")
        if acme.dns_provider == "exec" and not acme.dns_exec:
            raise ConfigError(source, "acme.dns_exec", "dns-01 through exec needs the command")
    if config.workers > 1 and os.name != "posix":
        raise ConfigError(source, "workers", "several worker processes need a POSIX system; use 1")
    if acme.on_demand == "ask" and not acme.ask_url:
        raise ConfigError(source, "acme.ask_url", "on_demand: ask needs acme.ask_url")
    redis = config.redis
    if redis.sentinels and (redis.tls_ca or (redis.url or "").startswith("rediss://")):
        raise ConfigError(source, "redis.sentinels", "TLS to a master found through Sentinel is not "
                          "supported; use sentinels without TLS, or TLS to one address")
    if redis.enabled and redis.acme and acme.enabled and not redis.acme_key_file:
        raise ConfigError(source, "redis.acme_key_file", "keeping ACME keys in Redis needs a Fernet key "
                          "file to encrypt them (or set redis.acme: false)")
    cloud = config.cloud
    if cloud.enabled and not cloud.regions and cloud.url is None:
        raise ConfigError(source, "cloud.regions", "a cloud token needs the control plane's base URL: "
                          "set cloud.regions (by the token's region) or cloud.url")
    if cloud.enabled and cloud.reports and not config.log.access_log:
        raise ConfigError(source, "cloud.reports", "report records are made from the access log's "
                          "events: keep log.access_log on, or set cloud.reports: false")
    if config.admin.protect_metrics and not config.admin.token_file:
        raise ConfigError(source, "admin.protect_metrics", "protecting /metrics needs admin.token_file")
    # Relative paths in the file are relative to the file's directory.
    if path_ is not None:
        base = os.path.dirname(os.path.abspath(path_))

        def rel(p: str | None) -> str | None:
            return None if p is None else os.path.join(base, p)
        fields_from_file = doc.get("tls") or {}
        if "certificate" in fields_from_file and "tls.certificate" not in (overrides or {}):
            config = attrs.evolve(config, tls=attrs.evolve(config.tls, certificate=rel(config.tls.certificate)))
        if "private_key" in fields_from_file and "tls.private_key" not in (overrides or {}):
            config = attrs.evolve(config, tls=attrs.evolve(config.tls, private_key=rel(config.tls.private_key)))
        if "file" in (doc.get("directory") or {}) and "directory.file" not in (overrides or {}):
            config = attrs.evolve(config, directory=attrs.evolve(config.directory, file=rel(config.directory.file)))
        if "token_file" in (doc.get("admin") or {}):
            config = attrs.evolve(config, admin=attrs.evolve(config.admin, token_file=rel(config.admin.token_file)))
        if "client_ca" in (doc.get("tcp") or {}):
            config = attrs.evolve(config, tcp=attrs.evolve(config.tcp, client_ca=rel(config.tcp.client_ca)))
        auth_doc = doc.get("auth") or {}
        for key in ("jwt_secret_file", "jwt_public_key"):
            if key in auth_doc:
                config = attrs.evolve(config, auth=attrs.evolve(config.auth, **{key: rel(getattr(config.auth, key))}))
        if "ca_bundle" in (doc.get("acme") or {}):
            config = attrs.evolve(config, acme=attrs.evolve(config.acme, ca_bundle=rel(config.acme.ca_bundle)))
        redis_doc = doc.get("redis") or {}
        for key in ("password_file", "tls_ca", "acme_key_file"):
            if key in redis_doc:
                config = attrs.evolve(config, redis=attrs.evolve(config.redis, **{key: rel(getattr(config.redis, key))}))
        cloud_doc = doc.get("cloud") or {}
        for key in ("token_file", "token_key", "ca_bundle"):
            if key in cloud_doc:
                config = attrs.evolve(config, cloud=attrs.evolve(config.cloud, **{key: rel(getattr(config.cloud, key))}))
        if "state_dir" in doc and "state_dir" not in (overrides or {}):
            config = attrs.evolve(config, state_dir=rel(config.state_dir))
    if config.admin.token_file is not None:
        from twisted_gateway.dashboard.access import AdminAccess
        try:
            AdminAccess(config.admin.token_file)
        except OSError as e:
            raise ConfigError(source, "admin.token_file", f"{config.admin.token_file}: cannot read: {e.strerror}") from None
        except ValueError as e:
            raise ConfigError(source, "admin.token_file", str(e)) from None
    return attrs.evolve(config, source=source)
