"""
The grammar of the names clients put in SNI, as pure functions.

Under the gateway's hostname ``H``:

- ``H`` itself is the gateway (its API);
- ``<label>-<port>.H`` is any primary shard whose hostname label is ``<label>`` exposing ``<port>``;
- ``<label>-<keyBegin>-<rclockBegin>-<port>.H`` pins the one shard whose key and rclock ranges start
  there.

A label may itself contain hyphens, so ``a-1-2-80`` is ambiguous: it is either the pinned name
(label ``a``) or the plain name (label ``a-1-2``).  L{parse_name} returns every reading, most
specific first, and the directory decides which one exists.
"""

from __future__ import annotations

import functools

import re

import attrs

_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_DECIMAL = re.compile(r"^(?:0|[1-9][0-9]{0,18})$")


@attrs.frozen
class GatewayHost:
    """The bare hostname: the gateway's own API."""


@attrs.frozen
class Foreign:
    """A name that is not ours."""

    reason: str


@attrs.frozen
class RouteKey:
    """One reading of a shard name."""

    label: str
    port: int
    pin: tuple[int, int] | None = None
    """(key_begin, rclock_begin) for the pinned form, else None."""


@attrs.frozen
class ShardName:
    """A name under the hostname, with its possible readings, most specific first."""

    name: str
    candidates: tuple[RouteKey, ...]


GATEWAY_HOST = GatewayHost()


def normalize_hostname(hostname: str) -> str:
    return hostname.strip().lower().rstrip(".")


@functools.lru_cache(maxsize=4096)
def parse_name(server_name: str, hostname: str) -> GatewayHost | ShardName | Foreign:
    """
    Classify C{server_name} (already lower-case, no trailing dot) relative to C{hostname}.
    Pure, and its answers are frozen: the names clients use again are classified once (a
    bounded cache, so names made up to fill it only cost their own parse).
    """
    if server_name == hostname:
        return GATEWAY_HOST
    suffix = "." + hostname
    if not server_name.endswith(suffix):
        return Foreign("not under the gateway hostname")
    left = server_name[: -len(suffix)]
    if "." in left:
        return Foreign("more than one label below the gateway hostname")
    if not _LABEL.match(left):
        return Foreign("not a valid DNS label")
    parts = left.split("-")
    if len(parts) < 2 or not _DECIMAL.match(parts[-1]):
        return Foreign("does not end in -<port>")
    port = int(parts[-1])
    if not 1 <= port <= 65535:
        return Foreign("port out of range")
    candidates = []
    if len(parts) >= 4 and _DECIMAL.match(parts[-2]) and _DECIMAL.match(parts[-3]):
        label = "-".join(parts[:-3])
        if _LABEL.match(label):
            candidates.append(RouteKey(label, port, (int(parts[-3]), int(parts[-2]))))
    label = "-".join(parts[:-1])
    if _LABEL.match(label):
        candidates.append(RouteKey(label, port))
    if not candidates:
        return Foreign("no valid shard label")
    return ShardName(server_name, tuple(candidates))


def shard_server_name(label: str, port: int, hostname: str,
                      pin: tuple[int, int] | None = None) -> str:
    """The inverse of L{parse_name}, for documentation, tests and the API."""
    if pin is None:
        return f"{label}-{port}.{hostname}"
    return f"{label}-{pin[0]}-{pin[1]}-{port}.{hostname}"


def is_valid_label(label: str) -> bool:
    return bool(_LABEL.match(label))
