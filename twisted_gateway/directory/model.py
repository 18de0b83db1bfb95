"""
The shard directory's data: shards, their ports, and an immutable snapshot indexed for the
lookups the front door makes on every connection.

A snapshot is built once per change of the directory and never mutated, so a connection that
resolved its route keeps a consistent view while the directory moves on.
"""

from __future__ import annotations

import ipaddress
import random
import re
from typing import Any, Iterable, Mapping

import attrs

from twisted_gateway.names import RouteKey, is_valid_label

PROTOCOLS = ("tcp", "http/1.1", "h2", "udp", "quic")
DATAGRAM_PROTOCOLS = ("udp", "quic")
"""Ports carried over UDP: a ``udp`` port is published on a gateway UDP listener the
configuration maps to it (udp.routes), a ``quic`` port on the QUIC listener by the SNI of the
client's Initial.  Their numbers are a namespace of their own: a shard may expose 443 as
``h2`` (TCP) and 443 as ``quic`` (UDP)."""


class DirectoryError(ValueError):
    """A directory document is invalid; the message names the place and the problem."""


@attrs.frozen
class ShardPort:
    port: int
    protocol: str = "tcp"
    public: bool = False
    upstream_port: int | None = None
    """The port to connect to on the shard's address when it differs from the exposed port
    (a container port mapped to another host port)."""
    allow: tuple[str, ...] = ()
    """Client networks (CIDR) allowed on this port; empty: all."""
    deny: tuple[str, ...] = ()
    """Client networks refused on this port."""
    send_proxy: bool = False
    """Send a PROXY protocol v2 header with the client's address to the shard (tcp ports)."""
    passthrough: bool = False
    """Public h2 ports: splice h2 clients' streams to the shard unparsed instead of proxying
    them request by request (faster; no per-request headers, checks or metrics)."""
    tls_passthrough: bool = False
    """Public tcp ports: relay the TLS stream itself (ClientHello first) without terminating
    it; the shard holds its own certificate (and can answer its own TLS-ALPN-01)."""
    max_body_bytes: int | None = None
    """HTTP ports: the largest request body proxied (0: no limit); None: limits.max_body_bytes."""

    @property
    def target_port(self) -> int:
        return self.upstream_port if self.upstream_port is not None else self.port

    @property
    def datagram(self) -> bool:
        """Whether the port is carried over UDP (``udp`` and ``quic``)."""
        return self.protocol in DATAGRAM_PROTOCOLS


@attrs.frozen
class Shard:
    id: str
    task: str
    hostname_label: str
    address: str
    ports: tuple[ShardPort, ...]
    labels: Mapping[str, str] = attrs.field(factory=dict)
    key_begin: int = 0
    rclock_begin: int = 0
    primary: bool = False

    def port(self, number: int, datagram: bool = False) -> ShardPort | None:
        """The stream (TCP) port C{number}, or with C{datagram} the UDP one."""
        for p in self.ports:
            if p.port == number and p.datagram == datagram:
                return p
        return None


@attrs.frozen
class Route:
    """Where one connection goes."""

    shard: Shard
    port: ShardPort

    @property
    def protocol(self) -> str:
        return self.port.protocol


@attrs.frozen
class Refusal:
    """Why a name has no route."""

    reason: str
    """unknown_shard, unknown_port, no_primary."""
    detail: str

    @property
    def http_status(self) -> int:
        return {"no_primary": 503, "private_port": 403, "denied_ip": 403}.get(self.reason, 404)


class DirectorySnapshot:
    """An immutable, indexed view of the shards."""

    def __init__(self, shards: Iterable[Shard] = ()) -> None:
        self.shards: tuple[Shard, ...] = tuple(shards)
        by_label: dict[str, list[Shard]] = {}
        by_id: dict[str, Shard] = {}
        tasks_by_label: dict[str, str] = {}
        for s in self.shards:
            if s.id in by_id:
                raise DirectoryError(f"shard id {s.id!r} appears twice")
            by_id[s.id] = s
            owner = tasks_by_label.setdefault(s.hostname_label, s.task)
            if owner != s.task:
                raise DirectoryError(
                    f"hostname_label {s.hostname_label!r} is used by tasks {owner!r} and {s.task!r}")
            by_label.setdefault(s.hostname_label, []).append(s)
        self._by_id = by_id
        self._by_label = {k: tuple(v) for k, v in by_label.items()}
        self._pinned = {(s.hostname_label, s.key_begin, s.rclock_begin): s for s in self.shards}
        # (label, port) -> (primaries exposing it, any shard exposes it)
        self._ports: dict[tuple[str, int], tuple[tuple[Route, ...], bool]] = {}
        self._datagram_ports: dict[tuple[str, int], tuple[tuple[Route, ...], bool]] = {}
        for label, shards in self._by_label.items():
            for datagram, index in ((False, self._ports), (True, self._datagram_ports)):
                exposed: dict[int, list[Route]] = {}
                for s in shards:
                    for p in s.ports:
                        if p.datagram != datagram:
                            continue
                        routes = exposed.setdefault(p.port, [])
                        if s.primary:
                            routes.append(Route(s, p))
                for number, routes in exposed.items():
                    index[(label, number)] = (tuple(routes), True)

    def __len__(self) -> int:
        return len(self.shards)

    def has_label(self, label: str) -> bool:
        return label in self._by_label

    def shard(self, shard_id: str) -> Shard | None:
        return self._by_id.get(shard_id)

    def lookup(self, key: RouteKey, choose: Any = random.choice, datagram: bool = False) -> Route | Refusal:
        """The route of one reading of a name: to a stream port (tcp, http/1.1, h2), or with
        C{datagram} to a UDP one (udp, quic)."""
        if key.pin is not None:
            pinned = self._pinned.get((key.label, key.pin[0], key.pin[1]))
            if pinned is None:
                return Refusal("unknown_shard",
                               f"no shard {key.label} with key {key.pin[0]} and rclock {key.pin[1]}")
            port = pinned.port(key.port, datagram)
            if port is None:
                return Refusal("unknown_port", f"shard {pinned.id} does not expose port {key.port}")
            return Route(pinned, port)
        if key.label not in self._by_label:
            return Refusal("unknown_shard", f"no shard has the hostname label {key.label}")
        entry = (self._datagram_ports if datagram else self._ports).get((key.label, key.port))
        if entry is None:
            return Refusal("unknown_port", f"no shard of {key.label} exposes port {key.port}")
        primaries = entry[0]
        if not primaries:
            return Refusal("no_primary", f"no primary shard of {key.label} is available for port {key.port}")
        if len(primaries) == 1:
            return primaries[0]
        return choose(primaries)

    def resolve(self, candidates: Iterable[RouteKey], datagram: bool = False) -> Route | Refusal:
        """Look up the most specific reading of a name whose label or pin exists."""
        refusal: Refusal | None = None
        for key in candidates:
            result = self.lookup(key, datagram=datagram)
            if isinstance(result, Route):
                return result
            if refusal is None or (refusal.reason == "unknown_shard" and result.reason != "unknown_shard"):
                refusal = result
        assert refusal is not None
        return refusal


# --- parsing a directory document -------------------------------------------------------------

_SHARD_KEYS = {"id", "task", "hostname_label", "address", "ports", "labels", "key_begin",
               "rclock_begin", "primary"}
_PORT_KEYS = {"port", "protocol", "public", "upstream_port", "allow", "deny", "send_proxy", "passthrough",
              "max_body_bytes", "tls_passthrough"}


def _key(name: Any) -> str:
    """A key as it may appear in a message: plain if it is a plain word, else quoted (so a
    hostile document cannot put newlines or control characters in a log line)."""
    text = str(name)
    return text if re.fullmatch(r"[A-Za-z0-9_./-]{1,64}", text) else repr(text)[:80]


def _fail(where: str, problem: str) -> DirectoryError:
    return DirectoryError(f"{where}: {problem}")


def _int(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(where, f"expected an integer from {low} to {high}, got {value!r}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(where, f"expected a non-empty string, got {value!r}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(where, f"expected true or false, got {value!r}")
    return value


def parse_port(doc: Any, where: str) -> ShardPort:
    if not isinstance(doc, dict):
        raise _fail(where, "expected a mapping with port, protocol and public")
    unknown = set(doc) - _PORT_KEYS
    if unknown:
        raise _fail(f"{where}.{_key(sorted(map(str, unknown))[0])}", "unknown key")
    if "port" not in doc:
        raise _fail(f"{where}.port", "missing")
    protocol = doc.get("protocol", "tcp")
    if protocol not in PROTOCOLS:
        raise _fail(f"{where}.protocol", f"expected one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    upstream = doc.get("upstream_port")
    passthrough = _bool(doc.get("passthrough", False), f"{where}.passthrough")
    if passthrough and (protocol != "h2" or not doc.get("public", False)):
        raise _fail(f"{where}.passthrough", "only public h2 ports can be passed through "
                                            "(private ports check a token on every request)")
    tls_passthrough = _bool(doc.get("tls_passthrough", False), f"{where}.tls_passthrough")
    if tls_passthrough and (protocol != "tcp" or not doc.get("public", False)):
        raise _fail(f"{where}.tls_passthrough", "only public tcp ports can pass TLS through "
                                                "(the gateway cannot check a client it does not terminate)")
    if protocol in DATAGRAM_PROTOCOLS:
        if not doc.get("public", False):
            raise _fail(f"{where}.public", f"{protocol} ports must be public: true (the gateway "
                                           f"relays their datagrams and cannot check a token)")
        for key in ("send_proxy", "max_body_bytes"):
            if doc.get(key) not in (None, False):
                raise _fail(f"{where}.{key}", f"does not apply to {protocol} ports")
    return ShardPort(
        port=_int(doc["port"], f"{where}.port", 1, 65535),
        protocol=protocol,
        public=_bool(doc.get("public", False), f"{where}.public"),
        upstream_port=None if upstream is None else _int(upstream, f"{where}.upstream_port", 1, 65535),
        allow=_networks(doc.get("allow", []), f"{where}.allow"),
        deny=_networks(doc.get("deny", []), f"{where}.deny"),
        send_proxy=_bool(doc.get("send_proxy", False), f"{where}.send_proxy"),
        passthrough=passthrough,
        tls_passthrough=tls_passthrough,
        max_body_bytes=None if doc.get("max_body_bytes") is None else
        _int(doc["max_body_bytes"], f"{where}.max_body_bytes", 0, 2 ** 62),
    )


def _networks(value: Any, where: str) -> tuple[str, ...]:
    from twisted_gateway.limits import parse_networks
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(where, "expected a list of CIDR networks")
    try:
        parse_networks(value)
    except ValueError as e:
        raise _fail(where, str(e)) from None
    return tuple(value)


def parse_shard(doc: Any, where: str) -> Shard:
    if not isinstance(doc, dict):
        raise _fail(where, "expected a mapping")
    unknown = set(doc) - _SHARD_KEYS
    if unknown:
        raise _fail(f"{where}.{_key(sorted(map(str, unknown))[0])}", "unknown key")
    for required in ("id", "task", "hostname_label", "address", "ports"):
        if required not in doc:
            raise _fail(f"{where}.{required}", "missing")
    label = _str(doc["hostname_label"], f"{where}.hostname_label")
    if not is_valid_label(label):
        raise _fail(f"{where}.hostname_label", f"{label!r} is not a lower-case DNS label")
    address = _str(doc["address"], f"{where}.address")
    if address.startswith("[") and address.endswith("]"):
        address = address[1:-1]
    try:
        ipaddress.ip_address(address)
    except ValueError:
        if not all(is_valid_label(part) for part in address.lower().split(".")):
            raise _fail(f"{where}.address", f"{address!r} is neither an IP address nor a host name") from None
    ports_doc = doc["ports"]
    if not isinstance(ports_doc, list):
        raise _fail(f"{where}.ports", "expected a list")
    ports = tuple(parse_port(p, f"{where}.ports[{i}]") for i, p in enumerate(ports_doc))
    if len({(p.port, p.datagram) for p in ports}) != len(ports):
        raise _fail(f"{where}.ports", "a port number appears twice (among the TCP ports or "
                                      "among the udp and quic ports)")
    labels = doc.get("labels", {}) or {}
    if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise _fail(f"{where}.labels", "expected a mapping of strings to strings")
    return Shard(
        id=_str(doc["id"], f"{where}.id"),
        task=_str(doc["task"], f"{where}.task"),
        hostname_label=label,
        address=address,
        ports=ports,
        labels=dict(labels),
        key_begin=_int(doc.get("key_begin", 0), f"{where}.key_begin", 0, 2**63 - 1),
        rclock_begin=_int(doc.get("rclock_begin", 0), f"{where}.rclock_begin", 0, 2**63 - 1),
        primary=_bool(doc.get("primary", False), f"{where}.primary"),
    )


def parse_directory(doc: Any) -> DirectorySnapshot:
    """Validate a parsed YAML/JSON directory document (``{"shards": [...]}``)."""
    if doc is None:
        doc = {"shards": []}
    if not isinstance(doc, dict):
        raise DirectoryError("top level: expected a mapping with a 'shards' list")
    unknown = set(doc) - {"shards"}
    if unknown:
        raise DirectoryError(f"{_key(sorted(map(str, unknown))[0])}: unknown key")
    shards = doc.get("shards") or []
    if not isinstance(shards, list):
        raise DirectoryError("shards: expected a list")
    return DirectorySnapshot(parse_shard(s, f"shards[{i}]") for i, s in enumerate(shards))


def shard_to_dict(shard: Shard) -> dict[str, Any]:
    """The document form of a shard (the inverse of L{parse_shard})."""
    return {
        "id": shard.id, "task": shard.task, "hostname_label": shard.hostname_label,
        "address": shard.address, "labels": dict(shard.labels), "key_begin": shard.key_begin,
        "rclock_begin": shard.rclock_begin, "primary": shard.primary,
        "ports": [
            {"port": p.port, "protocol": p.protocol, "public": p.public,
             **({"upstream_port": p.upstream_port} if p.upstream_port is not None else {}),
             **({"allow": list(p.allow)} if p.allow else {}),
             **({"deny": list(p.deny)} if p.deny else {}),
             **({"send_proxy": True} if p.send_proxy else {}),
             **({"passthrough": True} if p.passthrough else {}),
             **({"tls_passthrough": True} if p.tls_passthrough else {}),
             **({"max_body_bytes": p.max_body_bytes} if p.max_body_bytes is not None else {})}
            for p in shard.ports
        ],
    }
