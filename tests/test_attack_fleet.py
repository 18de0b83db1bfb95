"""
The Redis fleet attacked the way a failing network or a confused operator would: forged or
flooding change notices, client-chosen rate-limit keys, corrupted bucket state, challenge
notices naming paths, a stored certificate whose key is not its certificate's.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import pytest
from cryptography.fernet import Fernet
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from test_fleet_limits import FakeLink as LimitsLink, run_script
from test_redis_acme import certificate, in_reactor, links, redis, started  # noqa: F401 - fixtures
from test_redis_directory import FakeLink, Recorder, entry, result

from twisted_gateway.directory import redis as rd
from twisted_gateway.fleet.limits import SharedLimits, bucket_part
from twisted_gateway.fleet.redis import RedisCommandError
from twisted_gateway.tls.acme.redis_store import RedisCertificateStore, RedisChallengeBoard
from twisted_gateway.tls.acme.shared import ChallengeBoard, _file_name


# -- the directory's notices -----------------------------------------------------------------------

class SlowLink(FakeLink):
    """Scripts answered only when the test pumps them (a slow Redis)."""

    def __init__(self) -> None:
        super().__init__()
        self.slow = False
        self.pending: list[tuple[Deferred[Any], tuple[Any, ...]]] = []

    def eval(self, script: str, keys: list[str], args: list[Any]) -> Deferred[Any]:
        if not self.slow:
            return super().eval(script, keys, args)
        d: Deferred[Any] = Deferred()
        self.pending.append((d, (script, keys, args)))
        return d

    def pump(self) -> None:
        d, call = self.pending.pop(0)
        super().eval(*call).chainDeferred(d)


def provider_on(link: FakeLink, tmp_path) -> tuple[Recorder, rd.RedisDirectoryProvider, rd.RedisDirectoryWriter]:
    directory = Recorder()
    provider = rd.RedisDirectoryProvider(link, directory, str(tmp_path / "cache.json"), 1.0, clock=Clock())
    return directory, provider, rd.RedisDirectoryWriter(link)


def test_a_flood_of_notices_ahead_of_redis_costs_one_read_at_a_time(tmp_path):
    link = SlowLink()
    directory, provider, writer = provider_on(link, tmp_path)
    link.up = True
    result(writer.put([entry("a")]))
    provider.startService()
    link.come_up()
    assert provider.version == 1
    link.evals.clear()
    link.slow = True
    for i in range(1000):  # forged, or a writer gone mad: versions Redis does not hold
        link.publish_raw(json.dumps({"version": 10 ** 6 + i, "at": 0, "ids": ["a"]}))
    for _ in range(1000):
        if not link.pending:
            break
        link.pump()
    assert not link.pending
    assert link.evals.count("read_all") <= 2, link.evals.count("read_all")
    assert ids_of(directory) == {"a"} and provider.version == 1
    # And the next real write is still applied.
    link.slow = False
    result(writer.put([entry("b")]))
    assert ids_of(directory) == {"a", "b"}


def test_notices_queued_behind_a_slow_read_do_not_wedge_the_provider(tmp_path):
    # Notices handled at once (already read) used to be DeferredLock waiters each: released
    # into one another recursively, a few hundred overflowed the stack and kept the lock held.
    link = SlowLink()
    directory, provider, writer = provider_on(link, tmp_path)
    link.up = True
    result(writer.put([entry("a")]))
    provider.startService()
    link.come_up()
    link.slow = True
    link.come_up()  # a reconnect: a full read, slow to answer
    for _ in range(3000):
        link.publish_raw('{"version": 1, "at": 0, "ids": ["a"]}')
    for _ in range(10):
        if not link.pending:
            break
        link.pump()
    assert not link.pending and not provider._lock.locked
    link.slow = False
    result(writer.put([entry("b")]))
    assert ids_of(directory) == {"a", "b"} and provider.version == 2


def ids_of(directory: Recorder) -> set[str]:
    return {s.id for s in directory.current().shards}


def test_a_notice_of_no_ids_for_a_version_redis_lacks_does_not_hide_the_real_write(tmp_path):
    link = FakeLink()
    directory, provider, writer = provider_on(link, tmp_path)
    provider.startService()
    link.come_up()
    link.publish_raw('{"version": 1, "at": 0, "ids": []}')  # forged: Redis is at 0
    result(writer.put([entry("a")]))  # the real version 1
    assert ids_of(directory) == {"a"} and provider.version == 1
    # The genuine empty write (rm of nothing reaches Redis only by hand) is still taken.
    result(writer._write(1, {}, []))
    assert provider.version == 2 and ids_of(directory) == {"a"}


@pytest.mark.parametrize("message", [
    "not json", "\x00\xff", "[1, 2]", '{"version": -5, "ids": ["a"]}', '{"version": 2.5, "ids": []}',
    '{"version": 2, "ids": [1, 2]}', '{"version": 2, "ids": "a"}', '{"version": 2, "at": NaN, "ids": ["zz"]}',
    '{"version": ' + "9" * 400 + ', "ids": ["a"]}', '{"version": 2, "at": 1e999, "ids": ["a"]}',
])
def test_malformed_or_absurd_notices_leave_the_directory_right(tmp_path, message):
    link = FakeLink()
    directory, provider, writer = provider_on(link, tmp_path)
    provider.startService()
    link.come_up()
    result(writer.put([entry("a")]))
    link.publish_raw(message)
    assert ids_of(directory) == {"a"} and provider.version == 1
    result(writer.put([entry("b")]))
    assert ids_of(directory) == {"a", "b"} and provider.version == 2


# -- rate-limit keys and bucket state --------------------------------------------------------------

def test_client_chosen_keys_cannot_name_another_bucket_and_can_always_be_sent():
    long_subject = "s" * 500
    digest = hashlib.sha256(long_subject.encode()).hexdigest()
    # A subject equal to another's digest does not share that subject's bucket.
    assert bucket_part(digest) == digest and bucket_part(long_subject) == "#" + digest
    for key in ("a b", "a\nb", "a\r\nDEL x", "", "#" + digest, "\udcff", "é", "x" * 10_000):
        part = bucket_part(key)
        assert part.startswith("#") and len(part) == 65, key
        part.encode("ascii")
    assert bucket_part("2001:db8::1") == "2001:db8::1" and bucket_part("192.0.2.1") == "192.0.2.1"


def test_a_key_not_utf8_does_not_stop_the_reconciling_loop():
    class EncodingLink(LimitsLink):
        def eval(self, script, keys, args):
            for k in keys:
                k.encode("utf-8")  # what txredisapi does before any Deferred exists
            return super().eval(script, keys, args)

    clock, link = Clock(), EncodingLink()
    shared = SharedLimits(link, clock)
    limiter = shared.limiter("request_token", 10.0, 10.0)
    limiter.take("\udcffsubject")
    clock.advance(0.05)
    [(keys, _, answer)] = link.calls
    answer.callback([b"9"])
    limiter.take("bob")
    clock.advance(0.05)
    assert len(link.calls) == 2


def test_a_command_that_cannot_be_encoded_fails_its_deferred(links):
    link = started(links())
    with pytest.raises(RedisCommandError, match="not sent"):
        in_reactor(link.execute, "GET", "t:\udcff")
    assert in_reactor(link.execute, "PING") in ("PONG", b"PONG")


@pytest.mark.parametrize("tokens,ts", [("-inf", "0"), ("nan", "0"), ("abc", "0"), ("1", "inf"),
                                       ("1", "-inf"), ("inf", "nan"), ("-1e400", "1")])
def test_corrupted_bucket_state_neither_fails_the_call_nor_sticks(redis_env, tokens, ts):
    server = redis_env.server()
    server.cli("HSET", "gateway:limit:request_ip:bad", "tokens", tokens, "ts", ts)
    levels = run_script(server, ["gateway:limit:request_ip:bad", "gateway:limit:request_ip:good"],
                        [1, 5, 1, 1, 5, 1])
    assert levels[1] == 4.0
    assert levels[0] == 4.0 or (-1e12 < levels[0] <= 5.0 and tokens == "1")
    assert int(server.cli("PTTL", "gateway:limit:request_ip:bad")) > 0


# -- ACME: challenge notices and stored certificates -----------------------------------------------

class BoardLink:
    up = False

    def key(self, *parts: str) -> str:
        return "t:" + ":".join(parts)

    def subscribe(self, channel: str, callback: Any) -> None:
        pass


def test_challenge_notices_cannot_write_outside_the_board(tmp_path):
    local = ChallengeBoard(str(tmp_path / "state"))
    board = RedisChallengeBoard(local, BoardLink(), None)
    outside = tmp_path / "pwned-a"
    for kind in ("../../../pwned", str(tmp_path / "pwned"), "http-01/../../x", "\udcff"):
        board._notice(json.dumps({"op": "put", "kind": kind, "key": "a", "value": "v"}))
    for key in ("../../x", "/etc/passwd", "..", "a/b", "\udcff", "*"):
        board._notice(json.dumps({"op": "put", "kind": "http-01", "key": key, "value": "tok.thumb"}))
    assert not outside.exists()
    written = sorted(os.listdir(local.dir))
    assert all("/" not in n and not n.startswith(".") for n in written)
    assert not any(os.path.exists(tmp_path / p) for p in ("x", "pwned"))
    # A malformed kind is still a plain name inside the directory, whoever calls.
    for kind in ("../x", "/abs", "\udcff"):
        assert "/" not in _file_name(kind, "k") and ".." not in _file_name(kind, "k")
    # A huge value, or flood of distinct keys: bounded, memory and files.
    board._notice(json.dumps({"op": "put", "kind": "http-01", "key": "big", "value": "x" * 10_000_000}))
    assert board.read("http-01", "big") is None
    import twisted_gateway.tls.acme.redis_store as store_module
    limit = store_module.MAX_PENDING_CHALLENGES
    store_module.MAX_PENDING_CHALLENGES = 50
    try:
        for i in range(500):
            board._notice(json.dumps({"op": "put", "kind": "tls-alpn-01", "key": f"n{i}.test", "value": "v"}))
    finally:
        store_module.MAX_PENDING_CHALLENGES = limit
    assert len(board._memory) <= 50 and len(os.listdir(local.dir)) <= 60


def test_a_stored_certificate_whose_key_is_not_its_own_is_refused(links, redis, tmp_path):
    link = started(links())
    fernet_key = Fernet.generate_key()
    key_file = tmp_path / "fernet.key"
    key_file.write_bytes(fernet_key + b"\n")
    store = in_reactor(RedisCertificateStore, link, reactor, str(tmp_path / "a"), str(key_file))
    chain_a, _ = certificate("mixed.example.test")
    _, key_b = certificate("other.example.test")
    for name, chain, key in (("mixed.example.test", chain_a.decode(), key_b),
                             ("garbage.example.test", "not a PEM", key_b)):
        redis.cli("HSET", f"t:acme:cert:{name}", "names", name, "chain", chain,
                  "key", Fernet(fernet_key).encrypt(key).decode(), "fence", "1")
        assert in_reactor(store.fetch, name) is None
        assert store.load_all() == []
