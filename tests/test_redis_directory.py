"""
The Redis directory: its pure parts (notices, documents, deltas, the cache), the provider's
state machine against an in-memory stand-in for Redis and the link (synchronous Deferreds, a
Clock for the version check), and the command-line tool against a real redis-server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Callable

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from support import REPO, shard, twistd_command
from twisted_gateway.directory import redis as rd
from twisted_gateway.directory.interfaces import ShardDirectory
from twisted_gateway.directory.model import DirectoryError
from twisted_gateway.fleet.redis import RedisCommandError, RedisUnavailable


def entry(id: str, label: str | None = None, port: int = 7, upstream_port: int = 9000) -> dict:
    return shard(id, label or id, port, upstream_port)


def js(e: dict) -> str:
    return rd.entry_json(e)


# -- pure parts -------------------------------------------------------------------------------

def test_parse_notice():
    n = rd.parse_notice('{"version": 7, "at": 1700000000.25, "ids": ["a", "b"]}')
    assert n == rd.Notice(7, 1700000000.25, ("a", "b"))
    assert rd.parse_notice('{"version": 8, "at": 1, "ids": null}').ids is None
    for bad in ("nope", "[]", '{"ids": []}', '{"version": "3"}', '{"version": true}',
                '{"version": 3, "ids": [1]}', '{"version": 3, "ids": "a"}'):
        with pytest.raises(ValueError):
            rd.parse_notice(bad)


def test_apply_delta_puts_replaces_and_removes():
    before = {"a": "1", "b": "2"}
    assert rd.apply_delta(before, {"b": "3", "c": "4", "a": None}) == {"b": "3", "c": "4"}
    assert rd.apply_delta(before, {"gone": None}) == before
    assert before == {"a": "1", "b": "2"}  # not mutated


def test_document_from_entries_is_ordered_by_id_and_checks_each_entry():
    doc = rd.document_from_entries({"b": js(entry("b")), "a": js(entry("a"))})
    assert [s["id"] for s in doc["shards"]] == ["a", "b"]
    with pytest.raises(DirectoryError, match="shard 'x': not JSON"):
        rd.document_from_entries({"x": "{nope"})
    with pytest.raises(DirectoryError, match="shard 'x': its entry says id 'y'"):
        rd.document_from_entries({"x": js(entry("y"))})
    with pytest.raises(DirectoryError, match="expected a mapping"):
        rd.document_from_entries({"x": "[1]"})


def test_snapshot_problems_name_the_shard_by_id():
    bad = dict(entry("web-2"), ports=[{"port": "x"}])
    with pytest.raises(DirectoryError, match=r"^shards\['web-2'\]\.ports\[0\]\.port"):
        rd.snapshot_from_entries({"web-1": js(entry("web-1")), "web-2": js(bad)})
    snapshot = rd.snapshot_from_entries({"web-1": js(entry("web-1"))})
    assert len(snapshot) == 1 and snapshot.shard("web-1") is not None


def test_entries_from_input_accepts_an_entry_a_list_or_a_document():
    one = entry("a")
    assert rd.entries_from_input(one) == [one]
    assert rd.entries_from_input([one, entry("b")]) == [one, entry("b")]
    assert rd.entries_from_input({"shards": [one]}) == [one]
    for bad in (None, [], "a", [{"task": "t"}], {"shards": "x"}, [one, one]):
        with pytest.raises(DirectoryError):
            rd.entries_from_input(bad)


def test_load_input_reads_inline_json_and_yaml_files(tmp_path):
    path = tmp_path / "one.yaml"
    path.write_text("id: a\ntask: t\n")
    assert rd.load_input(str(path)) == {"id": "a", "task": "t"}
    assert rd.load_input('{"id": "b"}') == {"id": "b"}
    with pytest.raises(DirectoryError, match="cannot read"):
        rd.load_input(str(tmp_path / "missing.json"))
    with pytest.raises(DirectoryError, match="not valid JSON/YAML"):
        rd.load_input("{nope: [")


def test_cache_round_trip_and_refusals(tmp_path):
    path = str(tmp_path / "directory-cache.json")
    entries = {"a": js(entry("a")), "b": js(entry("b"))}
    rd.write_cache(path, 12, 1700000000.5, entries)
    assert rd.read_cache(path) == (12, entries)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    with open(path, "w") as f:
        f.write("{}")
    with pytest.raises(DirectoryError, match="no version"):
        rd.read_cache(path)
    with open(path, "w") as f:
        f.write("{nope")
    with pytest.raises(DirectoryError, match="not JSON"):
        rd.read_cache(path)


# -- an in-memory Redis and link ----------------------------------------------------------------

class FakeLink:
    """
    What the provider and the writer use of a RedisLink, over a dict; the scripts are
    recognised by identity and carried out as the Lua would.  Notices are delivered at once,
    or held (C{hold_notices}) to be delivered, reordered or lost by the test.
    """

    prefix = "gateway:"

    def __init__(self) -> None:
        self.hash: dict[str, str] = {}
        self.version: int | None = None
        self.updated: str | None = None
        self.up = False
        self._ups: list[Callable[[], None]] = []
        self.channels: dict[str, list[Callable[[str], None]]] = {}
        self.hold_notices = False
        self.held: list[str] = []
        self.evals: list[str] = []
        self.before_write: Callable[[], None] | None = None

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def on_up(self, callback: Callable[[], None]) -> None:
        self._ups.append(callback)

    def subscribe(self, channel: str, callback: Callable[[str], None]) -> None:
        self.channels.setdefault(channel, []).append(callback)

    def come_up(self) -> None:
        self.up = True
        for cb in list(self._ups):
            cb()

    def publish_raw(self, message: str) -> None:
        for cb in self.channels.get(self.key("directory", "changes"), []):
            cb(message)

    def deliver(self) -> None:
        held, self.held = self.held, []
        for message in held:
            self.publish_raw(message)

    def execute(self, *args: Any) -> Deferred[Any]:
        if not self.up:
            return fail(RedisUnavailable("down"))
        assert args == ("GET", self.key("directory", "version")), args
        return succeed(None if self.version is None else str(self.version))

    def eval(self, script: str, keys: list[str], args: list[Any]) -> Deferred[Any]:
        if not self.up:
            return fail(RedisUnavailable("down"))
        name = {rd.READ_ALL: "read_all", rd.READ_SOME: "read_some", rd.WRITE: "write",
                rd.IMPORT: "import"}[script]
        self.evals.append(name)
        version = None if self.version is None else str(self.version)
        if name == "read_all":
            flat = [x for k, v in self.hash.items() for x in (k, v)]
            return succeed([version, self.updated, flat])
        if name == "read_some":
            return succeed([version, [self.hash.get(i) for i in args]])
        if name == "write":
            if self.before_write is not None:
                hook, self.before_write = self.before_write, None
                hook()
            expected, now, channel, ids_json, nput = args[:5]
            if expected != "" and int(expected) != (self.version or 0):
                return fail(RedisCommandError(f"CONFLICT the directory changed (now {self.version})"))
            rest = list(args[5:])
            for i in range(int(nput)):
                self.hash[rest[2 * i]] = rest[2 * i + 1]
            for shard_id in rest[2 * int(nput):]:
                self.hash.pop(shard_id, None)
            ids = ids_json
        else:
            now, channel = args[:2]
            self.hash = {args[i]: args[i + 1] for i in range(2, len(args), 2)}
            ids = "null"
        self.version = (self.version or 0) + 1
        self.updated = now
        self._notify(f'{{"version": {self.version}, "at": {now}, "ids": {ids}}}')
        return succeed(self.version)

    def _notify(self, message: str) -> None:
        if self.hold_notices:
            self.held.append(message)
        else:
            self.publish_raw(message)


def result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


class Recorder(ShardDirectory):
    def __init__(self) -> None:
        super().__init__()
        self.published: list[tuple[str, set[str]]] = []
        self.refused: list[tuple[str, str]] = []

    def publish(self, snapshot: Any, source: str) -> None:
        super().publish(snapshot, source)
        self.published.append((source, {s.id for s in snapshot.shards}))

    def refuse(self, source: str, problem: str) -> None:
        super().refuse(source, problem)
        self.refused.append((source, problem))


@pytest.fixture
def fleet(tmp_path):
    link = FakeLink()
    directory = Recorder()
    clock = Clock()
    cache = str(tmp_path / "directory-cache.json")
    provider = rd.RedisDirectoryProvider(link, directory, cache, 1.0, clock=clock)
    writer = rd.RedisDirectoryWriter(link)
    return link, directory, clock, cache, provider, writer


def ids(directory: Recorder) -> set[str]:
    return {s.id for s in directory.current().shards}


# -- the provider ---------------------------------------------------------------------------------

def test_start_reads_everything_then_applies_deltas(fleet):
    link, directory, clock, cache, provider, writer = fleet
    link.up = True
    assert result(writer.put([entry("a")])) == 1
    link.up = False
    provider.startService()
    assert not directory.loaded()
    link.come_up()
    assert ids(directory) == {"a"} and provider.version == 1
    assert directory.published[-1][0] == "Redis (version 1)"
    link.evals.clear()
    assert result(writer.put([entry("b"), entry("c")])) == 2
    assert result(writer.remove(["a"])) == 3
    assert ids(directory) == {"b", "c"} and provider.applied_version == 3
    # Each write: the writer's read and write, and the gateway's fetch of just those ids.
    assert link.evals == ["read_all", "write", "read_some"] * 2
    assert rd.read_cache(cache) == (3, {"b": js(entry("b")), "c": js(entry("c"))})


def test_link_up_again_reads_once_per_call_and_changes_nothing_when_nothing_changed(fleet):
    link, directory, clock, cache, provider, writer = fleet
    provider.startService()
    link.come_up()
    assert directory.loaded() and len(directory.current()) == 0
    published = len(directory.published)
    link.come_up()  # the subscriber connection up after the command connection: again
    assert link.evals.count("read_all") == 2
    assert len(directory.published) == published


def test_a_gap_in_the_notices_reads_everything(fleet):
    link, directory, clock, cache, provider, writer = fleet
    provider.startService()
    link.come_up()
    link.hold_notices = True
    result(writer.put([entry("a")]))
    result(writer.put([entry("b")]))
    link.held.pop(0)  # the notice of version 1 is lost
    link.evals.clear()
    link.deliver()
    assert link.evals == ["read_all"] and ids(directory) == {"a", "b"} and provider.version == 2


def test_a_notice_behind_the_version_fetched_reads_everything(fleet):
    link, directory, clock, cache, provider, writer = fleet
    provider.startService()
    link.come_up()
    link.hold_notices = True
    result(writer.put([entry("a")]))
    result(writer.put([entry("b")]))
    link.evals.clear()
    link.deliver()  # version 1's notice, but Redis is at 2 already: then 2's, already read
    assert link.evals == ["read_some", "read_all"]
    assert ids(directory) == {"a", "b"} and provider.version == 2


def test_the_version_check_catches_a_lost_notice(fleet):
    link, directory, clock, cache, provider, writer = fleet
    provider.startService()
    link.come_up()
    link.hold_notices = True
    result(writer.put([entry("a")]))
    link.held.clear()  # lost
    assert ids(directory) == set()
    clock.advance(1.0)
    assert ids(directory) == {"a"}
    link.evals.clear()
    clock.advance(1.0)  # nothing new: a GET, no read
    assert link.evals == []


def test_the_version_check_waits_for_a_notice_on_its_way(fleet):
    link, directory, clock, cache, provider, writer = fleet
    provider.startService()
    link.come_up()
    # A notice received while another operation holds the lock counts as on its way.
    lock = provider._lock
    result(lock.acquire())
    result(writer.put([entry("a")]))
    clock.advance(1.0)
    assert not provider._full_read_queued
    lock.release()
    assert ids(directory) == {"a"} and link.evals.count("read_all") == 2  # the writer's + start


def test_a_bad_version_is_refused_whole_and_the_last_good_stays(fleet):
    link, directory, clock, cache, provider, writer = fleet
    provider.startService()
    link.come_up()
    result(writer.put([entry("a")]))
    # Written by hand, past the writer's validation: a second shard with a bad port.
    link.hash["bad"] = js(dict(entry("bad"), ports=[{"port": 0}]))
    link.version += 1
    link.publish_raw(json.dumps({"version": link.version, "at": 1.0, "ids": ["bad"]}))
    assert ids(directory) == {"a"} and provider.applied_version == 1 and provider.version == 2
    assert len(directory.refused) == 1
    assert "shards['bad'].ports[0].port" in directory.refused[0][1]
    clock.advance(1.0)
    clock.advance(1.0)  # the check sees nothing newer than what was read: no second refusal
    assert len(directory.refused) == 1
    # The writer refuses to build on it, naming it; removing it makes the directory good again.
    with pytest.raises(DirectoryError, match="shards\\['bad'\\]"):
        result(writer.put([entry("b")]))
    assert link.version == 2
    assert result(writer.remove(["bad"])) == 3
    assert ids(directory) == {"a"} and provider.applied_version == 3
    assert rd.read_cache(cache)[0] == 3


def test_two_tasks_claiming_one_label_are_refused(fleet):
    link, directory, clock, cache, provider, writer = fleet
    provider.startService()
    link.come_up()
    result(writer.put([entry("a", label="same")]))
    with pytest.raises(DirectoryError, match="hostname_label 'same' is used by tasks"):
        result(writer.put([dict(entry("b", label="same"), task="tasks/other")]))
    assert link.version == 1


def test_a_notice_of_many_ids_is_followed_by_a_full_read(fleet):
    link, directory, clock, cache, provider, writer = fleet
    provider.startService()
    link.come_up()
    link.evals.clear()
    result(writer.put([entry(f"s{i}") for i in range(rd.MAX_DELTA + 1)]))
    assert link.evals == ["read_all", "write", "read_all"]
    assert len(directory.current()) == rd.MAX_DELTA + 1


def test_a_version_key_written_by_hand_that_is_no_number_keeps_the_directory(fleet):
    link, directory, clock, cache, provider, writer = fleet
    provider.startService()
    link.come_up()
    result(writer.put([entry("a")]))
    link.version = "garbage"  # type: ignore[assignment]
    events: list[dict] = []
    from twisted.logger import globalLogPublisher
    globalLogPublisher.addObserver(events.append)
    try:
        clock.advance(1.0)
        link.come_up()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert ids(directory) == {"a"}
    failed = [e for e in events if "failed, the directory in force stays" in e.get("log_format", "")]
    assert len(failed) == 2 and not [e for e in events if e.get("log_failure")]


def test_a_malformed_notice_is_ignored(fleet):
    link, directory, clock, cache, provider, writer = fleet
    provider.startService()
    link.come_up()
    link.publish_raw("hello")
    assert provider.version == 0 and not directory.refused


def test_import_replaces_everything(fleet):
    link, directory, clock, cache, provider, writer = fleet
    provider.startService()
    link.come_up()
    result(writer.put([entry("a"), entry("b")]))
    assert result(writer.import_document({"shards": [entry("c")]})) == 2
    assert ids(directory) == {"c"}
    assert result(writer.export()) == {"shards": [entry("c")]}
    with pytest.raises(DirectoryError):
        result(writer.import_document({"shards": [{"id": "x"}]}))
    assert link.version == 2


def test_the_writer_retries_when_another_writer_got_in_between(fleet):
    link, directory, clock, cache, provider, writer = fleet
    link.up = True
    result(writer.put([entry("a")]))
    link.before_write = lambda: result(rd.RedisDirectoryWriter(link).put([entry("z")]))
    assert result(writer.put([entry("b")])) == 3
    assert set(link.hash) == {"a", "b", "z"}
    with pytest.raises(DirectoryError, match="no shard 'nope'"):
        result(writer.remove(["a", "nope"]))


def test_the_cache_routes_before_redis_answers_and_redis_replaces_it(fleet):
    link, directory, clock, cache, provider, writer = fleet
    rd.write_cache(cache, 5, 1.0, {"old": js(entry("old"))})
    provider.startService()
    assert ids(directory) == {"old"} and directory.published[0][0] == "redis cache (version 5)"
    clock.advance(1.0)  # the check with the link down: nothing
    assert ids(directory) == {"old"}
    link.up = True
    result(writer.import_document({"shards": [entry("a")]}))
    link.version = 6
    link.come_up()
    assert ids(directory) == {"a"} and provider.applied_version == 6


def test_a_redis_that_lost_its_data_does_not_empty_the_directory(fleet):
    link, directory, clock, cache, provider, writer = fleet
    rd.write_cache(cache, 9, 1.0, {"a": js(entry("a"))})
    provider.startService()
    link.come_up()  # an empty Redis: no version key
    assert ids(directory) == {"a"} and not directory.refused and provider.version == 0
    clock.advance(1.0)
    assert link.evals.count("read_all") == 1  # no read again and again
    result(writer.put([entry("b")]))  # version 1: Redis is the source of truth again
    assert ids(directory) == {"b"} and provider.applied_version == 1


def test_an_unreadable_cache_is_ignored(fleet):
    link, directory, clock, cache, provider, writer = fleet
    with open(cache, "w") as f:
        f.write("{nope")
    provider.startService()
    assert not directory.loaded()
    link.come_up()
    assert directory.loaded()


# -- the command-line tool against a real redis-server ----------------------------------------------

def cli(*args: str, url: str | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    flags = ["--redis", url] if url else []
    return subprocess.run([twistd_command(), "gateway", *flags, "directory", *args], env=env,
                          capture_output=True, text=True, timeout=30, input=stdin)


def test_cli_put_list_rm_export_import(redis_env, tmp_path):
    server = redis_env.server()
    one = tmp_path / "one.yaml"
    one.write_text(json.dumps(entry("web-1", label="web")))
    out = cli("put", str(one), url=server.url)
    assert (out.returncode, out.stdout, out.stderr) == (0, "version 1\n", "")
    out = cli("put", json.dumps([entry("db-1", label="db"), entry("api-1", label="api")]), url=server.url)
    assert out.stdout == "version 2\n"
    assert server.cli("GET", "gateway:directory:version") == "2"
    assert json.loads(server.cli("HGET", "gateway:directory:shards", "db-1"))["hostname_label"] == "db"
    listing = cli("list", url=server.url).stdout.splitlines()
    assert listing[0].startswith("version 2, updated ") and listing[0].endswith(", 3 shards")
    assert [line.split()[0] for line in listing[1:]] == ["ID", "api-1", "db-1", "web-1"]
    assert cli("rm", "db-1", "api-1", url=server.url).stdout == "version 3\n"
    exported = tmp_path / "export.json"
    exported.write_text(cli("export", url=server.url).stdout)
    assert json.loads(exported.read_text()) == {"shards": [entry("web-1", label="web")]}
    # The export is a directory file: --check accepts it, import takes it back.
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    check = subprocess.run([twistd_command(), "gateway", "--check", "--directory", str(exported)],
                           env=env, capture_output=True, text=True, timeout=30, cwd=str(tmp_path))
    assert check.returncode == 0, check.stderr
    cli("put", json.dumps(entry("x-1", label="x")), url=server.url)
    assert cli("import", str(exported), url=server.url).stdout == "version 5\n"
    assert server.cli("HKEYS", "gateway:directory:shards") == "web-1"
    assert cli("put", "-", url=server.url, stdin=json.dumps(entry("y-1", label="y"))).returncode == 0


def test_cli_refuses_with_one_line_and_exit_2(redis_env, tmp_path):
    server = redis_env.server()
    cli("put", json.dumps(entry("web-1", label="web")), url=server.url)
    cases = [
        (("put", json.dumps(dict(entry("bad"), ports=[{"port": 70000}]))), server.url,
         "shards['bad'].ports[0].port"),
        (("put", json.dumps(dict(entry("web-2", label="web"), task="other"))), server.url,
         "hostname_label 'web' is used by tasks"),
        (("put", str(tmp_path / "missing.json")), server.url, "cannot read"),
        (("rm", "nope"), server.url, "no shard 'nope'"),
        (("import", json.dumps({"shards": [{"id": "x"}]})), server.url, "shards[0]"),
        (("put", "[]"), server.url, "expected a shard entry"),
        # Checked before dialling: the same answer with Redis away.
        (("put", json.dumps(dict(entry("bad"), ports=[{"port": 0}]))), "redis://127.0.0.1:1/0",
         "shards['bad'].ports[0].port"),
        (("list",), None, "no Redis configured"),
        (("list",), "redis://127.0.0.1:1/0", "Redis unreachable"),
    ]
    for args, url, text in cases:
        out = cli(*args, url=url)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert len(out.stderr.splitlines()) == 1 and text in out.stderr, (args, out.stderr)
        assert out.stderr.startswith("gateway: directory")
    assert server.cli("GET", "gateway:directory:version") == "1"
    usage = cli("frobnicate", url=server.url)
    assert usage.returncode != 0 and "unknown directory action" in usage.stdout + usage.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
