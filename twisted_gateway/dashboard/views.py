"""
What the admin API answers: L{LocalViews} for one gateway process (a worker, or a gateway with
one process), and the merges the supervisor of several workers applies to its workers' answers
(L{merge_routes}, L{merge_certificates}, L{merge_refusals}, L{merge_providers}).

Every answer is a JSON-ready dict, built when asked from state the process keeps anyway: the
directory snapshot, the open connections (L{ConnectionTracker}), the per-port counts
(L{metrics.LIVE_ROUTES}), the refusal ring (L{ConnectionTracker.refusals}), the certificate
sources' C{certificates()} and the providers' L{IProviderStatus}.  Nothing here runs per
connection.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any, Iterable, Mapping, Union

from twisted.internet.defer import Deferred
from zope.interface import Interface, implementer

from twisted_gateway import metrics, splice
from twisted_gateway.directory.interfaces import IProviderStatus, ShardDirectory
from twisted_gateway.names import shard_server_name

View = Union[dict[str, Any], "Deferred[dict[str, Any]]"]


class IAdminViews(Interface):
    """The answers of C{/api/v1/*}: a process's own, or the supervisor's merge of its workers'."""

    def routes() -> View:
        """The directory as routed, with per-port live connection and byte counts."""

    def certificates() -> View:
        """The certificates in force and what is known of their renewal."""

    def refusals() -> View:
        """The most recent refusals, newest first."""

    def workers() -> View:
        """The gateway's processes: pid, uptime, restarts."""

    def providers() -> View:
        """The directory's providers' state (L{IProviderStatus})."""


@implementer(IAdminViews)
class LocalViews:
    """
    One process's answers.

    @param certificate_sources: objects with a C{certificates() -> list[dict]} (the static file,
        the local CA, ACME), in the order the gateway asks them.
    @param providers: the directory's providers; those that provide L{IProviderStatus} are
        shown.
    """

    def __init__(self, directory: ShardDirectory, hostname: str, tracker: Any,
                 certificate_sources: Iterable[Any], providers: Iterable[Any],
                 index: int | None = None, clock: Any = time.time) -> None:
        self.directory = directory
        self.hostname = hostname
        self.tracker = tracker
        self.certificate_sources = list(certificate_sources)
        self.providers_ = [p for p in providers if IProviderStatus.providedBy(p)]
        self.index = index
        self.clock = clock
        self.started = clock()

    def routes(self) -> dict[str, Any]:
        splice.flush_metrics()  # live splices' bytes, up to now
        snapshot = self.directory.current()
        active: Counter[tuple[str, int, bool]] = Counter()
        for conn in list(self.tracker.connections):
            route = conn.route
            if route is not None:
                active[(route.shard.id, route.port.port, route.port.datagram)] += 1
        counts = metrics.LIVE_ROUTES.snapshot({s.id for s in snapshot.shards})
        shards = []
        totals = {"open_connections": len(self.tracker.connections), "connections": 0,
                  "bytes_up": 0, "bytes_down": 0}
        for shard in snapshot.shards:
            ports = []
            for p in shard.ports:
                key = (shard.id, p.port, p.datagram)
                entry: dict[str, Any] = {
                    "port": p.port, "protocol": p.protocol, "public": p.public,
                    "target": f"{shard.address}:{p.target_port}",
                    "name": shard_server_name(shard.hostname_label, p.port, self.hostname),
                    "pinned_name": shard_server_name(shard.hostname_label, p.port, self.hostname,
                                                     (shard.key_begin, shard.rclock_begin)),
                }
                if p.datagram:
                    # UDP and QUIC sessions are counted by the gateway_udp_* series, not here.
                    entry.update(active_connections=None, connections=None, bytes_up=None,
                                 bytes_down=None)
                else:
                    connections, up, down = counts.get(key, (0, 0, 0))
                    entry.update(active_connections=active.get(key, 0), connections=connections,
                                 bytes_up=up, bytes_down=down)
                    totals["connections"] += connections
                    totals["bytes_up"] += up
                    totals["bytes_down"] += down
                ports.append(entry)
            shards.append({"id": shard.id, "task": shard.task, "hostname_label": shard.hostname_label,
                           "address": shard.address, "primary": shard.primary,
                           "key_begin": shard.key_begin, "rclock_begin": shard.rclock_begin,
                           "labels": dict(shard.labels), "ports": ports})
        return {"time": self.clock(), "hostname": self.hostname,
                "directory": {"loaded": self.directory.loaded(), "shards": len(snapshot)},
                "shards": shards, "totals": totals}

    def certificates(self) -> dict[str, Any]:
        out: list[dict[str, Any]] = []
        for source in self.certificate_sources:
            describe = getattr(source, "certificates", None)
            if describe is not None:
                out.extend(describe())
        return {"time": self.clock(), "certificates": out}

    def refusals(self) -> dict[str, Any]:
        entries = [{"time": t, "client": client, "sni": sni, "reason": reason, "detail": detail}
                   for t, client, sni, reason, detail in reversed(self.tracker.refusals)]
        return {"time": self.clock(), "kept": self.tracker.refusals.maxlen,
                "recorded": self.tracker.refusals_recorded, "refusals": entries}

    def workers(self) -> dict[str, Any]:
        now = self.clock()
        return {"time": now, "supervisor": None, "workers": [{
            "index": self.index, "pid": os.getpid(), "started": self.started,
            "uptime_seconds": round(now - self.started, 3), "restarts": 0,
            "open_connections": len(self.tracker.connections),
            "draining": bool(self.tracker.draining), "answered": True}]}

    def providers(self) -> dict[str, Any]:
        return {"time": self.clock(), "providers": [p.status() for p in self.providers_]}


# -- the supervisor's merges ----------------------------------------------------------------------

Answers = Mapping[int, Mapping[str, Any]]
"""Each worker's answer to one view, by worker index (only the workers that answered)."""

_PORT_COUNTS = ("active_connections", "connections", "bytes_up", "bytes_down")


# A worker's answer is checked for the shape its merge reads before it is merged: one that
# answers something else (a crash half-way, another version) is left out, as one that did not
# answer is, instead of failing the whole answer.

def _number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _dicts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, dict) for v in value)


def _routes_shaped(answer: Any) -> bool:
    if not isinstance(answer, dict):
        return False
    directory, totals = answer.get("directory", {}), answer.get("totals", {})
    if not isinstance(directory, dict) or not isinstance(directory.get("shards", 0), int):
        return False
    if not isinstance(totals, dict) or not all(_number(v) for v in totals.values()):
        return False
    shards = answer.get("shards", [])
    if not _dicts(shards):
        return False
    for shard in shards:
        if not isinstance(shard.get("id"), str) or not _dicts(shard.get("ports", [])):
            return False
        for port in shard.get("ports", []):
            if (not isinstance(port.get("port"), int) or isinstance(port.get("port"), bool)
                    or not isinstance(port.get("protocol"), str)
                    or not all(_number(port.get(n)) for n in _PORT_COUNTS)):
                return False
    return True


def _certificates_shaped(answer: Any) -> bool:
    if not isinstance(answer, dict) or not _dicts(answer.get("certificates", [])):
        return False
    return all(isinstance(c.get("names", []), list) and all(isinstance(n, str) for n in c.get("names", []))
               and _number(c.get("not_after_timestamp")) and _number(c.get("failures"))
               for c in answer.get("certificates", []))


def _refusals_shaped(answer: Any) -> bool:
    return (isinstance(answer, dict) and isinstance(answer.get("recorded", 0), int)
            and _dicts(answer.get("refusals", []))
            and all(_number(e.get("time")) for e in answer.get("refusals", [])))


def _providers_shaped(answer: Any) -> bool:
    return isinstance(answer, dict) and _dicts(answer.get("providers", []))


def _shaped(answers: Answers, check: Any) -> dict[int, Mapping[str, Any]]:
    return {index: answer for index, answer in answers.items() if check(answer)}


def merge_routes(answers: Answers, hostname: str) -> dict[str, Any]:
    """The directory as the workers route it, with every port's counts added up over them."""
    answers = _shaped(answers, _routes_shaped)
    shards: dict[str, dict[str, Any]] = {}
    ports: dict[tuple[str, int, str], dict[str, Any]] = {}
    totals: Counter[str] = Counter()
    loaded, count = False, 0
    for _, answer in sorted(answers.items()):
        loaded = loaded or bool(answer.get("directory", {}).get("loaded"))
        count = max(count, int(answer.get("directory", {}).get("shards", 0)))
        for name, value in answer.get("totals", {}).items():
            totals[name] += value or 0
        for shard in answer.get("shards", []):
            mine = shards.get(shard["id"])
            if mine is None:
                mine = shards[shard["id"]] = {**shard, "ports": []}
            for port in shard.get("ports", []):
                key = (shard["id"], port["port"], port["protocol"])
                merged = ports.get(key)
                if merged is None:
                    merged = ports[key] = dict(port)
                    mine["ports"].append(merged)
                    continue
                for name in _PORT_COUNTS:
                    if merged.get(name) is not None and port.get(name) is not None:
                        merged[name] += port[name]
    return {"time": time.time(), "hostname": hostname,
            "directory": {"loaded": loaded, "shards": count}, "shards": list(shards.values()),
            "totals": dict(totals), "workers_answered": len(answers)}


def merge_certificates(answers: Answers) -> dict[str, Any]:
    """One entry per certificate (source and names): the one valid longest; the most failures."""
    answers = _shaped(answers, _certificates_shaped)
    merged: dict[tuple[str, tuple[str, ...]], dict[str, Any]] = {}
    for _, answer in sorted(answers.items()):
        for cert in answer.get("certificates", []):
            key = (cert.get("source", ""), tuple(cert.get("names", [])))
            have = merged.get(key)
            if have is None:
                merged[key] = dict(cert)
                continue
            failures = max(have.get("failures") or 0, cert.get("failures") or 0)
            if (cert.get("not_after_timestamp") or 0) > (have.get("not_after_timestamp") or 0):
                have = merged[key] = dict(cert)
            have["failures"] = failures
            if cert.get("last_error") and not have.get("last_error"):
                have["last_error"] = cert["last_error"]
    return {"time": time.time(), "certificates": list(merged.values())}


def merge_refusals(answers: Answers, kept: int) -> dict[str, Any]:
    """Every worker's recent refusals (each marked with its worker), newest first, C{kept} at
    most."""
    answers = _shaped(answers, _refusals_shaped)
    entries = [{**entry, "worker": index} for index, answer in answers.items()
               for entry in answer.get("refusals", [])]
    entries.sort(key=lambda e: e.get("time", 0), reverse=True)
    recorded = sum(int(a.get("recorded", 0)) for a in answers.values())
    return {"time": time.time(), "kept": kept, "recorded": recorded, "refusals": entries[:kept]}


_STATE_ORDER = {"ok": 0, "degraded": 1, "error": 2}


def merge_providers(answers: Answers) -> dict[str, Any]:
    """One entry per provider (kind and source): the worst state and the oldest version any
    worker reports, with each worker's own under C{workers}."""
    answers = _shaped(answers, _providers_shaped)
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for index, answer in sorted(answers.items()):
        for status in answer.get("providers", []):
            key = (str(status.get("kind")), str(status.get("source")))
            mine = {"worker": index, "state": status.get("state"), "version": status.get("version")}
            have = merged.get(key)
            if have is None:
                merged[key] = {**status, "workers": [mine]}
                continue
            have["workers"].append(mine)
            if _STATE_ORDER.get(str(status.get("state")), 2) > _STATE_ORDER.get(str(have.get("state")), 2):
                have.update({k: v for k, v in status.items() if k != "version"}, workers=have["workers"])
            versions = [v for v in (have.get("version"), status.get("version")) if v is not None]
            if versions and all(isinstance(v, (int, float)) for v in versions):
                have["version"] = min(versions)
    return {"time": time.time(), "providers": list(merged.values())}
