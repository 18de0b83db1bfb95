"""
The Redis provider: the fleet's shard directory kept in Redis, followed by every gateway
through change notices and a version check, and written by ``twistd gateway directory``.

Key layout (``<prefix>`` is ``redis.key_prefix``, ``gateway:`` by default)::

    <prefix>directory:shards    HASH  shard id -> JSON of one shard entry (the schema of one
                                      entry of a directory file's ``shards`` list)
    <prefix>directory:version   STRING integer, +1 on every write (absent: 0, never written)
    <prefix>directory:updated   STRING the writer's unix time (seconds, float) of the last write
    <prefix>directory:changes   pub/sub channel; one notice per write:
                                {"version": N, "at": <unix time>, "ids": ["id", ...]}
                                ("ids": null after an import, which replaces every entry)

Every write is one Lua script (EVAL): it changes the hash, INCRs the version, sets ``updated``
and PUBLISHes the notice, so a reader never sees a version without its entries nor misses a
notice of a write it cannot read.  ``put`` and ``rm`` carry the version their validation read
and are refused (then retried on a fresh read) when another writer got in between; ``import``
replaces the whole hash.

A gateway reads the whole directory (version and HGETALL in one script, so they agree) when
it starts and every time the link comes (back) up; on a notice of exactly the next version it
fetches just the changed entries and the version in one script (another version: a full
read); on a notice further ahead (a lost notice) it reads everything; and every
``redis.check_interval`` seconds it GETs the version and reads everything if Redis is ahead
of it and no notice is on its way: the safety net for a lost notice.

The rule for bad data: a version whose document fails validation (one bad entry, or two
entries claiming the same name) is refused as a whole, logged and counted, and the last good
directory stays in force; the next version is validated again as a whole.  Routing with the
rest of a bad version would mean a fleet routing with a directory nobody wrote; the writer
validates the whole resulting document before it writes, so bad data reaches Redis only
written by hand.

A version lower than the one in force means Redis lost the directory (a restart without
persistence, a FLUSHALL, a stale replica promoted).  When Redis holds no directory at all
(no version key) the gateway keeps the one in force and says so (``directory import`` of an
export, or of a gateway's cache, restores it); otherwise Redis is the source of truth and its
directory is used, with a warning.

The last directory applied is cached on disk (JSON with its version, written atomically); a
gateway starting while Redis is away routes with it, and Redis, once reached, replaces it.
"""

from __future__ import annotations

import collections
import json
import os
import re
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import attrs
import txredisapi
import yaml
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer
from twisted.python.failure import Failure

from twisted_gateway import metrics
from twisted_gateway.directory.interfaces import IProviderStatus, ShardDirectory
from twisted_gateway.directory.model import DirectoryError, DirectorySnapshot, parse_directory
from twisted_gateway.fleet.redis import RedisCommandError, RedisUnavailable
from twisted_gateway.polling import PollingService
from twisted_gateway.tls.files import atomic_write

# -- the scripts ---------------------------------------------------------------------------------

# KEYS: shards, version, updated.  Returns {version or false, updated or false, {field, value, ...}}.
READ_ALL = """
return {redis.call('GET', KEYS[2]), redis.call('GET', KEYS[3]), redis.call('HGETALL', KEYS[1])}
"""

# KEYS: shards, version.  ARGV: the ids.  Returns {version or false, {value or false, ...}}.
READ_SOME = """
return {redis.call('GET', KEYS[2]), redis.call('HMGET', KEYS[1], unpack(ARGV))}
"""

# KEYS: shards, version, updated.  ARGV: expected version ('' for any), now, channel, the ids
# as a JSON list, the number of entries put, then id, json for each, then the ids removed.
WRITE = """
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
if ARGV[1] ~= '' and tonumber(ARGV[1]) ~= current then
  return redis.error_reply('CONFLICT the directory changed meanwhile (now version ' .. current .. ')')
end
local i = 6
for n = 1, tonumber(ARGV[5]) do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  i = i + 2
end
while i <= #ARGV do
  redis.call('HDEL', KEYS[1], ARGV[i])
  i = i + 1
end
local version = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[3], ARGV[2])
redis.call('PUBLISH', ARGV[3], '{"version": ' .. version .. ', "at": ' .. ARGV[2] .. ', "ids": ' .. ARGV[4] .. '}')
return version
"""

# KEYS: shards, version, updated.  ARGV: now, channel, then id, json for each entry.
IMPORT = """
redis.call('DEL', KEYS[1])
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
local version = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[3], ARGV[1])
redis.call('PUBLISH', ARGV[2], '{"version": ' .. version .. ', "at": ' .. ARGV[1] .. ', "ids": null}')
return version
"""


# Above this many ids a notice is followed by a full read: Lua's unpack() takes at most a few
# thousand arguments, and one HGETALL is then about as cheap.
MAX_DELTA = 1000

# Notices waiting for the one being handled; beyond, they are dropped for one full read.
MAX_QUEUED_NOTICES = 1000


@attrs.frozen
class DirectoryKeys:
    shards: str
    version: str
    updated: str
    changes: str

    @classmethod
    def of(cls, link: Any) -> DirectoryKeys:
        return cls(*(link.key("directory", part) for part in ("shards", "version", "updated", "changes")))


# -- pure parts: notices, documents, deltas ----------------------------------------------------

@attrs.frozen
class Notice:
    """One change notice: the version written, the writer's time, the ids changed (None: all)."""

    version: int
    at: float | None
    ids: tuple[str, ...] | None


def parse_notice(text: str) -> Notice:
    """Raise ValueError on a message that is not a change notice."""
    doc = json.loads(text)
    if not isinstance(doc, dict) or not isinstance(doc.get("version"), int) or isinstance(doc["version"], bool):
        raise ValueError("expected {\"version\": N, ...}")
    at = doc.get("at")
    ids = doc.get("ids")
    if ids is not None and not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
        raise ValueError("ids: expected a list of shard ids or null")
    return Notice(doc["version"], float(at) if isinstance(at, (int, float)) else None,
                  tuple(ids) if ids is not None else None)


def parse_version(value: Any) -> int:
    """A version key's value (absent: 0)."""
    if value is None or value is False:
        return 0
    return int(value)


def parse_time(value: Any) -> float | None:
    """The ``updated`` key's value (absent, or not a time: None)."""
    try:
        return float(value) if value is not None and value is not False else None
    except ValueError:
        return None


def pairs(flat: Sequence[Any]) -> dict[str, str]:
    """An HGETALL reply as a dict."""
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


def apply_delta(entries: Mapping[str, str], changes: Mapping[str, str | None]) -> dict[str, str]:
    """The entries after a write: C{changes} maps each id changed to its JSON (None: removed)."""
    out = dict(entries)
    for shard_id, value in changes.items():
        if value is None:
            out.pop(shard_id, None)
        else:
            out[shard_id] = value
    return out


def document_from_entries(entries: Mapping[str, str]) -> dict[str, Any]:
    """
    The directory document (``{"shards": [...]}``, ordered by id) of the hash's entries;
    raise L{DirectoryError} naming the shard whose JSON is not an entry of its own id.
    """
    shards = []
    for shard_id in sorted(entries):
        try:
            entry = json.loads(entries[shard_id])
        except ValueError as e:
            raise DirectoryError(f"shard {shard_id!r}: not JSON ({e})") from None
        if not isinstance(entry, dict):
            raise DirectoryError(f"shard {shard_id!r}: expected a mapping")
        if entry.get("id") != shard_id:
            raise DirectoryError(f"shard {shard_id!r}: its entry says id {entry.get('id')!r}")
        shards.append(entry)
    return {"shards": shards}


_INDEX = re.compile(r"^shards\[(\d+)\]")


def snapshot_from_entries(entries: Mapping[str, str]) -> DirectorySnapshot:
    """Validate the whole directory the entries make; problems name the shard by its id
    (``shards['web-1'].ports[0].port: ...``), not by its place in the document."""
    doc = document_from_entries(entries)
    try:
        return parse_directory(doc)
    except DirectoryError as e:
        message = str(e)
        found = _INDEX.match(message)
        if found is not None and int(found.group(1)) < len(doc["shards"]):
            message = f"shards[{doc['shards'][int(found.group(1))]['id']!r}]" + message[found.end():]
        raise DirectoryError(message) from None


def entries_from_input(doc: Any) -> list[dict[str, Any]]:
    """
    What ``directory put`` was given: one shard entry, a list of entries, or a directory
    document (``{"shards": [...]}``).  Raise L{DirectoryError} if it is none of these.
    """
    if isinstance(doc, dict) and "shards" in doc and "id" not in doc:
        doc = doc["shards"]
    if isinstance(doc, dict):
        doc = [doc]
    if not isinstance(doc, list) or not doc:
        raise DirectoryError("expected a shard entry, a list of entries or {\"shards\": [...]}")
    for i, entry in enumerate(doc):
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not entry["id"]:
            raise DirectoryError(f"entry {i + 1}: expected a mapping with an 'id'")
    ids = [e["id"] for e in doc]
    if len(set(ids)) != len(ids):
        raise DirectoryError(f"shard id {next(i for i in ids if ids.count(i) > 1)!r} given twice")
    return doc


def load_input(text_or_path: str) -> Any:
    """Inline JSON (starting with { or [), ``-`` (stdin), or a JSON/YAML file's content."""
    if text_or_path.lstrip().startswith(("{", "[")):
        raw = text_or_path
    elif text_or_path == "-":
        raw = sys.stdin.read()
    else:
        try:
            with open(text_or_path, encoding="utf-8") as f:
                raw = f.read()
        except OSError as e:
            raise DirectoryError(f"{text_or_path}: cannot read: {e.strerror}") from None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise DirectoryError(f"not valid JSON/YAML ({getattr(e, 'problem', e)})") from None


def entry_json(entry: Mapping[str, Any]) -> str:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"))


# -- the cache -----------------------------------------------------------------------------------

def write_cache(path: str, version: int, updated: float | None, entries: Mapping[str, str],
                extra: Mapping[str, Any] | None = None) -> None:
    """Write the directory in force atomically: a reader sees the old file or the new one.
    C{extra} keys (another provider's: the /sync ETag and settings) are kept beside it."""
    doc = {**(extra or {}), "version": version, "updated": updated,
           "directory": document_from_entries(entries)}
    # A temporary file of its own for each writer (several worker processes share the state
    # directory), fsynced, then renamed over the cache.
    atomic_write(path, json.dumps(doc, sort_keys=True).encode())


def read_cache(path: str) -> tuple[int, dict[str, str]]:
    """The cached version and entries; raise L{DirectoryError} (or OSError) if unusable."""
    with open(path, encoding="utf-8") as f:
        try:
            doc = json.load(f)
        except ValueError as e:
            raise DirectoryError(f"not JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("version"), int):
        raise DirectoryError("not a directory cache (no version)")
    shards = (doc.get("directory") or {}).get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and isinstance(s.get("id"), str)
                                               for s in shards):
        raise DirectoryError("not a directory cache (no shards list)")
    return doc["version"], {s["id"]: entry_json(s) for s in shards}


# -- the gateway's side ----------------------------------------------------------------------------

@implementer(IProviderStatus)
class RedisDirectoryProvider(Service):
    """
    Follows the Redis directory and publishes each valid version into C{directory}.

    @ivar version: the version of the entries last read from Redis (valid or not); None before
        the first read.
    @ivar applied_version: the version of the directory in force (from Redis or the cache).
    """

    log = Logger()

    def __init__(self, link: Any, directory: ShardDirectory, cache_path: str, check_interval: float,
                 clock: IReactorTime | None = None) -> None:
        self.link = link
        self.directory = directory
        self.cache_path = cache_path
        self.keys = DirectoryKeys.of(link)
        self.version: int | None = None
        self.applied_version: int | None = None
        self._entries: dict[str, str] = {}
        self._applied_entries: dict[str, str] | None = None
        self._refused_version: int | None = None
        self._lock = DeferredLock()
        self._full_read_queued = False
        self._notices_pending = 0  # notices received and not handled yet
        self._notices: collections.deque[tuple[int, Notice]] = collections.deque()
        self._draining = False
        self._notice_seq = 0  # notices received so far
        self._covered_seq = 0  # notices received before the last full read started
        self._checking = False
        self.last_change: float | None = None
        self.last_lag: float | None = None
        self._poller = PollingService(check_interval, self.check, "the Redis directory version")
        if clock is not None:
            self._poller.clock = clock
        link.on_up(self._link_up)
        link.subscribe(self.keys.changes, self._notice)

    def set_interval(self, seconds: float) -> None:
        self._poller.set_interval(seconds)

    def startService(self) -> None:
        super().startService()
        self._load_cache()
        self._poller.startService()
        if self.link.up:
            self._link_up()

    def stopService(self) -> Any:
        super().stopService()
        return self._poller.stopService()

    def status(self) -> dict[str, Any]:
        """L{IProviderStatus}: C{degraded} while the link is down (the directory in force stays),
        C{error} while Redis holds a version that was refused."""
        link = self.link.readiness()
        state = "ok"
        if self._refused_version is not None:
            state = "error"
        elif not self.link.up:
            state = "degraded"
        return {"kind": "redis", "source": link.get("target"), "state": state,
                "version": self.applied_version, "read_version": self.version,
                "refused_version": self._refused_version, "last_change": self.last_change,
                "lag_seconds": self.last_lag, "last_error": link.get("last_error"),
                "shards": len(self.directory.current()), "link": link}

    # -- the cache --------------------------------------------------------------------------------

    def _load_cache(self) -> None:
        if self.applied_version is not None or not os.path.exists(self.cache_path):
            return
        try:
            version, entries = read_cache(self.cache_path)
            snapshot = snapshot_from_entries(entries)
        except (OSError, DirectoryError) as e:
            self.log.warn("directory cache {path} not used: {problem}", path=self.cache_path,
                          problem=str(e))
            return
        self.applied_version, self._applied_entries = version, entries
        metrics.REDIS_DIRECTORY_VERSION.set(version)
        self.directory.publish(snapshot, f"redis cache (version {version})")

    # -- events -----------------------------------------------------------------------------------

    def _link_up(self) -> None:
        """The link came (back) up: notices may have been missed, read everything."""
        if not self.running:
            return
        self.resync("start" if self.version is None else "reconnect")

    def _notice(self, text: str) -> None:
        try:
            notice = parse_notice(text)
        except ValueError as e:
            self.log.warn("Redis directory: ignoring a malformed change notice ({problem}): {text}",
                          problem=str(e), text=text[:200])
            return
        if self._full_read_queued:
            # A full read is waiting to start: it reads everything this notice announced (a
            # flood of notices then costs one read, not one each).
            return
        if len(self._notices) >= MAX_QUEUED_NOTICES:
            # A flood while Redis is slow: one full read covers every notice dropped.
            self._notices.clear()
            self.resync("version_gap")
            return
        self._notice_seq += 1
        self._notices.append((self._notice_seq, notice))
        self._notices_pending += 1
        if not self._draining:
            self._drain()

    @inlineCallbacks
    def _drain(self) -> Any:
        """Handle the queued notices one after the other.  A loop, not one lock waiter each:
        notices handled at once (already read) would otherwise release the lock into the next
        waiter recursively, and a few hundred queued behind a slow read overflow the stack and
        leave the lock held for good."""
        self._draining = True
        try:
            while self._notices:
                seq, notice = self._notices.popleft()
                try:
                    if seq > self._covered_seq:  # else a full read started after it came
                        yield self._lock.run(self._handle_notice, seq, notice)
                except Exception:  # noqa: BLE001 - logged and counted by _failed
                    self._failed(Failure(), "applying a change notice")
                finally:
                    self._notices_pending -= 1
        finally:
            self._draining = False

    def resync(self, reason: str | None) -> None:
        """Read the whole directory (once, however often asked before the read starts)."""
        if self._full_read_queued:
            return
        self._full_read_queued = True
        self._guarded(self._full_read, reason)

    def check(self) -> None:
        """The periodic version check: the safety net for a lost notice."""
        if not self.link.up or self._checking or self._full_read_queued:
            return
        self._checking = True
        d = self.link.execute("GET", self.keys.version)

        def compare(value: Any) -> None:
            remote = parse_version(value)
            if self.version is None:
                self.resync("start")  # the first read failed (a timeout, say): again
            elif remote < self.version or (remote > self.version and not self._notices_pending):
                self.resync("check")

        d.addCallback(compare)
        d.addErrback(self._failed, "checking the version")
        d.addBoth(self._checked)

    def _checked(self, _: object) -> None:
        self._checking = False

    # -- the work, one operation at a time --------------------------------------------------------

    def _guarded(self, work: Callable[..., Deferred[None]], *args: Any) -> None:
        d = self._lock.run(work, *args)
        d.addErrback(self._failed, getattr(work, "__name__", "reading"))

    def _failed(self, failure: Failure, what: str) -> None:
        if failure.check(RedisUnavailable):
            # While the link is down nothing changes; the next on_up reads everything.
            self.log.debug("Redis directory: {what} skipped: {error}", what=what,
                           error=failure.getErrorMessage())
        elif failure.check(RedisCommandError, txredisapi.TimeoutError, txredisapi.ConnectionError,
                           ValueError):
            # A slow or failing Redis, or keys not written by the tool (a version that is not a
            # number): the directory in force stays; the version check or the next on_up retries.
            self.log.error("Redis directory: {what} failed, the directory in force stays: {error}",
                           what=what, error=f"{type(failure.value).__name__}: {failure.getErrorMessage()}")
        else:
            self.log.failure("Redis directory: {what} failed", failure, what=what)

    @inlineCallbacks
    def _full_read(self, reason: str | None) -> Any:
        self._full_read_queued = False
        self._covered_seq = self._notice_seq  # what they announced, this read sees
        reply = yield self.link.eval(READ_ALL, [self.keys.shards, self.keys.version, self.keys.updated], [])
        version = parse_version(reply[0])
        updated = parse_time(reply[1])
        entries = pairs(reply[2] or [])
        if reason is not None:
            metrics.REDIS_DIRECTORY_RESYNCS.labels(reason=reason).inc()
        if version == 0 and not entries and self.applied_version:
            if self.version != 0:
                self.log.error("Redis holds no shard directory (no version key: Redis lost its data?); "
                               "keeping the directory in force (version {version}); "
                               "'directory import' restores one", version=self.applied_version)
            self.version, self._entries = 0, {}
            return
        if self.applied_version is not None and version < self.applied_version:
            self.log.warn("the Redis directory went back from version {old} to {new} (Redis lost or "
                          "replaced its data?); using Redis's directory", old=self.applied_version,
                          new=version)
        self.version, self._entries = version, entries
        self._apply(version, updated if reason != "start" else None)

    @inlineCallbacks
    def _handle_notice(self, seq: int, notice: Notice) -> Any:
        if seq <= self._covered_seq:
            return  # a full read started after this notice came
        if self.version is None or notice.version <= self.version:
            return  # before the first read (which will include it), or already read
        if notice.version > self.version + 1:
            # Queued, not read here: the notices queued behind this one then cost nothing more
            # (a flood of notices ahead of Redis, forged or not, is one read at a time).
            self.resync("version_gap")
            return
        if notice.ids is None or len(notice.ids) > MAX_DELTA:
            # An import (every entry changed), or more ids than one script call takes.
            self.resync(None)
            return
        ids = list(dict.fromkeys(notice.ids))
        if not ids:
            # Nothing to fetch, but the version is taken from Redis, not from the notice: a
            # notice naming a version Redis does not hold would make the real write of that
            # version look already read (and the version check agree with it).
            fetched = parse_version((yield self.link.execute("GET", self.keys.version)))
            if fetched != notice.version:
                self.resync("version_gap")
                return
            self.version = notice.version
            return
        reply = yield self.link.eval(READ_SOME, [self.keys.shards, self.keys.version], ids)
        fetched = parse_version(reply[0])
        if fetched != notice.version:
            # Written again since the notice: these entries are of another version.
            self.resync("version_gap")
            return
        values = reply[1] or []
        changes = {i: (str(v) if v not in (None, False) else None) for i, v in zip(ids, values)}
        self.version = notice.version
        self._entries = apply_delta(self._entries, changes)
        self._apply(notice.version, notice.at)

    def _apply(self, version: int, written_at: float | None) -> None:
        """Publish the entries read (version C{version}) if valid; refuse them if not."""
        if version == self.applied_version and self._entries == self._applied_entries:
            self._refused_version = None
            return  # a reconnect's read (or the cache's version): nothing new to route with
        try:
            snapshot = snapshot_from_entries(self._entries)
        except DirectoryError as e:
            if self._refused_version != version:
                self._refused_version = version
                self.directory.refuse(f"Redis (version {version})", str(e))
            return
        self._refused_version = None
        self.applied_version, self._applied_entries = version, self._entries
        metrics.REDIS_DIRECTORY_VERSION.set(version)
        self.directory.publish(snapshot, f"Redis (version {version})")
        self.last_change = time.time()
        if written_at is not None:
            self.last_lag = max(0.0, time.time() - written_at)
            metrics.REDIS_DIRECTORY_LAG.observe(self.last_lag)
        try:
            write_cache(self.cache_path, version, written_at, self._entries)
        except OSError as e:
            self.log.warn("directory cache {path} not written: {error}", path=self.cache_path,
                          error=e.strerror)


# -- the writer's side (the command-line tool) ------------------------------------------------------

class DirectoryConflict(Exception):
    """Another writer changed the directory between this writer's read and write."""


class RedisDirectoryWriter:
    """Reads and writes the directory in Redis through a L{RedisLink}-like C{link}."""

    attempts = 5

    def __init__(self, link: Any, clock: Callable[[], float] = time.time) -> None:
        self.link = link
        self.keys = DirectoryKeys.of(link)
        self.clock = clock

    def _all_keys(self) -> list[str]:
        return [self.keys.shards, self.keys.version, self.keys.updated]

    @inlineCallbacks
    def read(self) -> Any:
        """Fire with (version, updated or None, {id: JSON})."""
        reply = yield self.link.eval(READ_ALL, self._all_keys(), [])
        updated = parse_time(reply[1])
        return parse_version(reply[0]), updated, pairs(reply[2] or [])

    @inlineCallbacks
    def _write(self, expected: int, put: Mapping[str, str], remove: Iterable[str]) -> Any:
        remove = list(remove)
        ids = sorted(set(put) | set(remove))
        args: list[Any] = [str(expected), repr(self.clock()), self.keys.changes, json.dumps(ids), len(put)]
        for shard_id, value in put.items():
            args += [shard_id, value]
        args += remove
        try:
            version = yield self.link.eval(WRITE, self._all_keys(), args)
        except RedisCommandError as e:
            if str(e).startswith("CONFLICT"):
                raise DirectoryConflict(str(e)) from None
            raise
        return int(version)

    @inlineCallbacks
    def _change(self, plan: Callable[[dict[str, str]], tuple[dict[str, str], list[str]]]) -> Any:
        """Read, plan the change, validate the result, write it if nobody wrote meanwhile."""
        for attempt in range(self.attempts):
            version, _, entries = yield self.read()
            put, remove = plan(entries)
            snapshot_from_entries(apply_delta(entries, {**put, **{i: None for i in remove}}))
            try:
                new_version = yield self._write(version, put, remove)
            except DirectoryConflict:
                if attempt == self.attempts - 1:
                    raise
                continue
            return new_version

    def put(self, entries: Sequence[Mapping[str, Any]]) -> Deferred[int]:
        """Add or replace shard entries; fire with the new version.  Fails with
        L{DirectoryError} if the resulting directory is invalid (nothing is written)."""
        values = {str(e["id"]): entry_json(e) for e in entries}
        return self._change(lambda current: (values, []))

    def remove(self, ids: Sequence[str]) -> Deferred[int]:
        def plan(current: dict[str, str]) -> tuple[dict[str, str], list[str]]:
            missing = [i for i in ids if i not in current]
            if missing:
                raise DirectoryError("no shard " + ", ".join(repr(i) for i in missing) + " in the directory")
            return {}, list(ids)
        return self._change(plan)

    @inlineCallbacks
    def import_document(self, doc: Any) -> Any:
        """Replace the whole directory with a directory document; fire with the new version."""
        parse_directory(doc)  # the file's own messages (shards[i]) for a file being imported
        shards = (doc or {}).get("shards") or []
        entries = {s["id"]: entry_json(s) for s in shards}
        args: list[Any] = [repr(self.clock()), self.keys.changes]
        for shard_id, value in entries.items():
            args += [shard_id, value]
        version = yield self.link.eval(IMPORT, self._all_keys(), args)
        return int(version)

    @inlineCallbacks
    def export(self) -> Any:
        """Fire with the directory document (loadable as a directory file, importable)."""
        _, _, entries = yield self.read()
        return document_from_entries(entries)


# -- the command-line tool ----------------------------------------------------------------------------

class CommandFailed(Exception):
    """str(): the one line the tool prints on stderr before exiting with 2."""


ACTIONS = ("put", "rm", "list", "import", "export")


@inlineCallbacks
def run_command(reactor: Any, config: Any, action: str, args: Sequence[str],
                out: Any = None) -> Any:
    """
    ``twistd gateway directory ACTION ARGS``: connect to the configured Redis, do it, print
    the result on C{out}; fail with L{CommandFailed} on any problem.
    """
    from twisted_gateway.fleet.redis import RedisLink
    out = out or sys.stdout
    if not config.redis.enabled:
        raise CommandFailed("directory: no Redis configured (set redis.url in --config, or --redis URL)")
    # Validate the input before dialling: a bad file is reported the same with Redis away.
    payload: Any = None
    if action == "put":
        payload = _wrap(entries_from_input, _input(args))
        _wrap(snapshot_from_entries, {e["id"]: entry_json(e) for e in payload})
    elif action == "import":
        payload = _input(args)
        _wrap(parse_directory, payload)
    try:
        link = RedisLink(config.redis, reactor)
    except ValueError as e:
        raise CommandFailed(str(e)) from None
    link.startService()
    try:
        yield _wait_up(reactor, link, config.redis.connect_timeout + 0.5)
        writer = RedisDirectoryWriter(link)
        if action == "put":
            version = yield writer.put(payload)
            out.write(f"version {version}\n")
        elif action == "rm":
            version = yield writer.remove(list(args))
            out.write(f"version {version}\n")
        elif action == "import":
            version = yield writer.import_document(payload)
            out.write(f"version {version}\n")
        elif action == "export":
            doc = yield writer.export()
            out.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        else:
            version, updated, entries = yield writer.read()
            _print_list(out, version, updated, entries)
    except CommandFailed:
        raise
    except DirectoryError as e:
        raise CommandFailed(f"directory {action}: {e}") from None
    except DirectoryConflict as e:
        raise CommandFailed(f"directory {action}: other writers kept changing the directory: {e}") from None
    except (RedisUnavailable, RedisCommandError) as e:
        raise CommandFailed(f"directory {action}: Redis: {e}") from None
    except Exception as e:  # noqa: BLE001 - a timeout or a lost connection: one line, not a traceback
        raise CommandFailed(f"directory {action}: Redis: {type(e).__name__}: {e}") from None
    finally:
        out.flush()
        yield link.stopService()


def _input(args: Sequence[str]) -> Any:
    if len(args) != 1:
        raise CommandFailed("expected one FILE (or inline JSON, or - for stdin)")
    return _wrap(load_input, args[0])


def _wrap(function: Callable[[Any], Any], value: Any) -> Any:
    try:
        return function(value)
    except DirectoryError as e:
        raise CommandFailed(f"directory: {e}") from None


def _wait_up(reactor: Any, link: Any, timeout: float) -> Deferred[None]:
    """Fire once the link is up; fail with L{CommandFailed} after C{timeout} seconds."""
    d: Deferred[None] = Deferred()

    def up() -> None:
        if not d.called:
            timer.cancel()
            d.callback(None)

    def late() -> None:
        if not d.called:
            d.errback(CommandFailed(f"directory: Redis unreachable ({link.target.description})"))

    timer = reactor.callLater(timeout, late)
    link.on_up(up)
    if link.up:
        up()
    return d


def _print_list(out: Any, version: int, updated: float | None, entries: Mapping[str, str]) -> None:
    when = (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(updated)) if updated is not None else "never")
    out.write(f"version {version}, updated {when}, {len(entries)} shard{'' if len(entries) == 1 else 's'}\n")
    rows = []
    for shard_id in sorted(entries):
        try:
            e = json.loads(entries[shard_id])
            ports = ",".join(f"{p.get('port')}/{p.get('protocol', 'tcp')}" for p in e.get("ports") or [])
            rows.append((shard_id, str(e.get("hostname_label")), str(e.get("address")), ports))
        except (ValueError, AttributeError, TypeError):
            rows.append((shard_id, "?", "?", "(not a valid entry)"))
    if rows:
        widths = [max(len(r[i]) for r in rows + [("ID", "LABEL", "ADDRESS", "PORTS")]) for i in range(3)]
        for r in [("ID", "LABEL", "ADDRESS", "PORTS")] + rows:
            out.write(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}\n")


__all__ = ["ACTIONS", "CommandFailed", "DirectoryKeys", "Notice", "RedisDirectoryProvider",
           "RedisDirectoryWriter", "apply_delta", "document_from_entries", "entries_from_input",
           "parse_notice", "read_cache", "run_command", "snapshot_from_entries", "write_cache"]
