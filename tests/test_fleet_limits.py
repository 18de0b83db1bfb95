"""
The fleet's shared rate limits: the bucket script against a real redis-server (atomic refill and
spend, debt, expiry, many keys a call), and the local/shared reconciliation with a controlled
clock and a link whose answers the test gives.
"""

from __future__ import annotations

import subprocess
import types
from concurrent.futures import ThreadPoolExecutor

import attrs
import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from support import wait_for, which
from twisted_gateway import metrics
from twisted_gateway.config import load_config
from twisted_gateway.directory.interfaces import ShardDirectory
from twisted_gateway.fleet.limits import BUCKET_SCRIPT, SharedLimits
from twisted_gateway.fleet.redis import RedisCommandError, RedisUnavailable
from twisted_gateway.limits import Admission, RateLimiter
from twisted_gateway.runtime import build_runtime


def run_script(server, keys: list[str], args: list) -> list[float]:
    out = server.cli("EVAL", BUCKET_SCRIPT, str(len(keys)), *keys, *[str(a) for a in args])
    return [float(line) for line in out.splitlines()]


def redis_now_ms(server) -> int:
    seconds, micros = server.cli("TIME").split()
    return int(seconds) * 1000 + int(micros) // 1000


def fallbacks(limit: str) -> float:
    return metrics.REGISTRY.get_sample_value("gateway_rate_limit_fallbacks_total", {"limit": limit}) or 0.0


# -- the script, in a real redis-server ---------------------------------------------------------

def test_script_spends_from_a_full_bucket_and_expires_it_when_it_would_be_full(redis_env):
    server = redis_env.server()
    assert run_script(server, ["gateway:limit:request_ip:192.0.2.1"], [2.0, 5.0, 3]) == [2.0]
    state = dict(zip(*[iter(server.cli("HGETALL", "gateway:limit:request_ip:192.0.2.1").splitlines())] * 2))
    assert float(state["tokens"]) == 2.0 and abs(int(state["ts"]) - redis_now_ms(server)) < 5000
    # Three tokens short at two a second: full again (and gone) in 1.5 s.
    ttl = int(server.cli("PTTL", "gateway:limit:request_ip:192.0.2.1"))
    assert 1000 < ttl <= 1500
    # A fast bucket is gone in a few milliseconds: an absent key is a full bucket.
    assert run_script(server, ["gateway:limit:request_ip:192.0.2.2"], [100.0, 1.0, 1]) == [0.0]
    wait_for(lambda: server.cli("EXISTS", "gateway:limit:request_ip:192.0.2.2") == "0", 5,
             what="the refilled bucket to expire")


def test_script_refills_by_the_servers_clock_and_records_debt(redis_env):
    server = redis_env.server()
    key = "gateway:limit:request_ip:198.51.100.7"
    # Empty one second ago, two tokens a second, burst 5: two tokens now, one after the spend.
    server.cli("HSET", key, "tokens", "0", "ts", str(redis_now_ms(server) - 1000))
    [level] = run_script(server, [key], [2.0, 5.0, 1])
    assert 1.0 <= level < 1.2
    # Refill stops at the burst.
    server.cli("HSET", key, "tokens", "0", "ts", str(redis_now_ms(server) - 60_000))
    assert run_script(server, [key], [2.0, 5.0, 1]) == [4.0]
    # Overspending (gateways that decided from a stale level) leaves a debt, and the key lives
    # until the debt is paid and the bucket full again: (5 - -3) / 2 = 4 s.
    assert run_script(server, [key], [2.0, 5.0, 7])[0] == pytest.approx(-3.0, abs=0.1)
    assert 3500 < int(server.cli("PTTL", key)) <= 4000


def test_script_carries_many_keys_in_one_call_each_with_its_own_settings(redis_env):
    server = redis_env.server()
    keys = [f"gateway:limit:request_ip:10.0.{i // 256}.{i % 256}" for i in range(300)]
    args: list = []
    for i in range(300):
        args += [1.0 + i % 3, 10.0, 1 + i % 7]
    levels = run_script(server, keys, args)
    assert levels == [10.0 - (1 + i % 7) for i in range(300)]
    assert all(int(server.cli("PTTL", k)) > 0 for k in keys[::37])


def test_script_is_atomic_under_concurrent_callers(redis_env):
    server = redis_env.server()
    key = "gateway:limit:request_token:alice"

    def spend_one(_: int) -> float:
        out = subprocess.run([which("redis-cli"), "-p", str(server.port), "EVAL", BUCKET_SCRIPT, "1", key,
                              "0.000001", "100", "1"], capture_output=True, text=True, timeout=10)
        return float(out.stdout)
    with ThreadPoolExecutor(10) as pool:
        levels = list(pool.map(spend_one, range(30)))
    # Each caller saw its own level: no spend was lost or counted twice.
    assert sorted(round(v) for v in levels) == list(range(70, 100))


# -- reconciliation, with a clock and a link the test answers -----------------------------------

class FakeLink:
    """RedisLink's surface: calls are recorded and answered by the test."""

    def __init__(self) -> None:
        self.up = True
        self.calls: list[tuple[list[str], list, Deferred]] = []
        self._down: list = []

    def key(self, *parts: str) -> str:
        return "gateway:" + ":".join(parts)

    def on_down(self, callback) -> None:
        self._down.append(callback)

    def on_up(self, callback) -> None:
        pass

    def eval(self, script: str, keys, args) -> Deferred:
        if not self.up:
            return fail(RedisUnavailable("down"))
        d: Deferred = Deferred()
        self.calls.append((list(keys), list(args), d))
        return d

    def go_down(self) -> None:
        self.up = False
        for callback in self._down:
            callback()


def test_decisions_are_local_and_spends_go_to_redis_in_one_batched_call():
    clock, link = Clock(), FakeLink()
    shared = SharedLimits(link, clock, interval=0.05)
    by_ip = shared.limiter("request_ip", 1.0, 3.0)
    by_token = shared.limiter("request_token", 10.0, 20.0)
    # Decided at once, from a full local bucket, with no call yet.
    assert [by_ip.take("192.0.2.1") for _ in range(3)] == [0, 0, 0]
    assert by_ip.take("192.0.2.1") == pytest.approx(1.0)
    by_ip.take("192.0.2.2")
    by_token.take("alice")
    assert link.calls == []
    clock.advance(0.05)
    # One call for every key of every limit, each with its settings and its spends.
    [(keys, args, answer)] = link.calls
    assert keys == ["gateway:limit:request_ip:192.0.2.1", "gateway:limit:request_ip:192.0.2.2",
                    "gateway:limit:request_token:alice"]
    assert args == ["1.0", "3.0", 3, "1.0", "3.0", 1, "10.0", "20.0", 1]
    # No second call while one is out, however much is spent meanwhile.
    by_token.take("alice")
    clock.advance(1)
    assert len(link.calls) == 1
    # The fleet's levels: other gateways spent too.  192.0.2.2 is two tokens in debt; alice's
    # level (5) is less the token spent since the call left.
    answer.callback([b"0", b"-2", b"5"])
    assert by_ip.take("192.0.2.2") == pytest.approx(3.0)  # (1 - -2) / 1 s
    clock.advance(0.05)
    [_, (keys, args, _)] = link.calls
    assert keys == ["gateway:limit:request_token:alice"] and args[2] == 1
    assert by_token._buckets["alice"].level(clock.seconds()) == pytest.approx(4.0 + 0.05 * 10)


def test_a_quiet_gateway_makes_no_calls_and_a_reload_keeps_buckets_and_loop():
    clock, link = Clock(), FakeLink()
    shared = SharedLimits(link, clock)
    limiter = shared.limiter("connection_ip", 2.0, 4.0)
    assert clock.getDelayedCalls() == []
    limiter.take("192.0.2.9")
    assert len(clock.getDelayedCalls()) == 1
    # A reload: the same limiter, new settings, the bucket kept.
    assert shared.limiter("connection_ip", 5.0, 10.0) is limiter
    assert limiter.rate == 5.0 and "192.0.2.9" in limiter._buckets
    assert len(clock.getDelayedCalls()) == 1


def test_without_redis_the_local_limit_applies_and_every_decision_is_a_fallback():
    clock, link = Clock(), FakeLink()
    shared = SharedLimits(link, clock)
    limiter = shared.limiter("request_ip", 1.0, 2.0)
    limiter.take("192.0.2.1")
    before = fallbacks("request_ip")
    link.go_down()
    # The spend not yet sent stays local: no call, not now and not later.
    clock.advance(1)
    assert link.calls == []
    # One gateway alone at the configured rate: the bucket (1 left + 1 refilled) then 429s.
    assert [limiter.take("192.0.2.1") for _ in range(4)] == [0, 0, pytest.approx(1.0), pytest.approx(1.0)]
    assert fallbacks("request_ip") == before + 4
    assert link.calls == [] and clock.getDelayedCalls() == []
    # Back: sharing resumes with the next spend (those made while away are not reported).
    link.up = True
    clock.advance(1)
    assert limiter.take("192.0.2.1") == 0
    assert fallbacks("request_ip") == before + 4
    clock.advance(0.05)
    [(keys, args, _)] = link.calls
    assert args[2] == 1


def test_a_failed_call_counts_its_spends_as_fallbacks_and_the_loop_goes_on():
    clock, link = Clock(), FakeLink()
    shared = SharedLimits(link, clock)
    limiter = shared.limiter("request_token", 10.0, 10.0)
    for _ in range(3):
        limiter.take("bob")
    clock.advance(0.05)
    before = fallbacks("request_token")
    limiter.take("bob")
    link.calls[0][2].errback(RedisCommandError("OOM command not allowed"))
    assert fallbacks("request_token") == before + 3
    clock.advance(0.05)
    keys, args, answer = link.calls[1]
    assert args[2] == 1
    answer.callback([b"2"])
    assert limiter._buckets["bob"].level(clock.seconds()) == 2.0


def test_local_buckets_are_bounded():
    clock, link = Clock(), FakeLink()
    shared = SharedLimits(link, clock)
    limiter = shared.limiter("request_ip", 1000.0, 1.0)
    limiter.max_keys = 100
    for i in range(1000):
        limiter.take(f"10.1.{i // 256}.{i % 256}")
        clock.advance(0.01)
    assert len(limiter) <= 100
    # Keys waiting for a call (one is out, unanswered) are bounded too: beyond, spends stay local.
    shared = SharedLimits(link, clock, max_unsent=10)
    limiter = shared.limiter("request_ip", 1000.0, 1.0)
    limiter.take("10.2.0.0")
    clock.advance(0.05)  # the call that stays out
    before = fallbacks("request_ip")
    for i in range(20):
        limiter.take(f"10.2.1.{i}")
    assert len(shared._dirty) == 10 and fallbacks("request_ip") == before + 10
    # Long keys (token subjects) become digests in Redis.
    limiter.take("s" * 500)
    assert len(limiter._buckets["s" * 500].redis_key) == len("gateway:limit:request_ip:#") + 64


def test_admission_and_runtime_use_and_carry_the_shared_limits(tmp_path):
    clock, link = Clock(), FakeLink()
    config = load_config(None, {"state_dir": str(tmp_path), "limits.request_rate_per_ip": 2,
                                "limits.connection_rate_per_ip": 1})

    def runtime(config, previous=None, redis=None):
        return build_runtime(
            config, clock, directory=ShardDirectory(), contexts=types.SimpleNamespace(client_ca=None),
            verifier=None, api_site=None, tls_alpn=types.SimpleNamespace(context_for=lambda name: None),
            acme=None, previous=previous, redis=redis)
    first = runtime(config, redis=link)
    shared = first.shared_limits
    assert isinstance(shared, SharedLimits)
    assert first.admission.request_rate_ip is shared.limiters["request_ip"]
    assert first.admission.connection_rate is shared.limiters["connection_ip"]
    assert first.admission.connection_rate.burst == 2.0  # burst 0: twice the rate
    # A limit that is off stays a (disabled) local one.
    assert isinstance(first.admission.request_rate_token, RateLimiter)
    assert first.admission.admit("192.0.2.1") is None
    # The connection rate is the fleet's too, and falls back (counted) without Redis.
    before = fallbacks("connection_ip")
    link.up = False
    assert [first.admission.admit("192.0.2.1") for _ in range(2)] == [None, "rate_limited"]
    assert fallbacks("connection_ip") == before + 2
    link.up = True
    # A reload carries the shared limits (same buckets, one loop) with the new rate...
    faster = attrs.evolve(config, limits=attrs.evolve(config.limits, request_rate_per_ip=7))
    second = runtime(faster, previous=first, redis=link)
    assert second.shared_limits is shared and second.admission.request_rate_ip is shared.limiters["request_ip"]
    assert shared.limiters["request_ip"].rate == 7
    # ...and redis.limits off makes them local, keeping them for a later reload that turns it on.
    off = attrs.evolve(faster, redis=attrs.evolve(faster.redis, limits=False))
    third = runtime(off, previous=second, redis=link)
    assert isinstance(third.admission.request_rate_ip, RateLimiter) and third.shared_limits is shared
    assert runtime(faster, previous=third, redis=link).admission.request_rate_ip is shared.limiters["request_ip"]
    # Without a link, or with redis.limits off from the start: no shared limits at all.
    assert runtime(config).shared_limits is None
    assert runtime(off, redis=link).shared_limits is None
    assert isinstance(Admission(config.limits, config.proxy_protocol, clock.seconds).request_rate_ip, RateLimiter)


class CliLink(FakeLink):
    """A link that runs each call at once in a real redis-server (through redis-cli)."""

    def __init__(self, server) -> None:
        super().__init__()
        self.server = server

    def eval(self, script: str, keys, args) -> Deferred:
        return succeed(run_script(self.server, list(keys), list(args)))


def test_two_gateways_converge_on_the_fleets_bucket(redis_env):
    server = redis_env.server()
    clock = Clock()
    gateways = [SharedLimits(CliLink(server), clock).limiter("request_ip", 0.001, 10.0) for _ in range(2)]
    allowed = 0
    # A client alternating between two gateways: each has a full local bucket at first, so the
    # fleet admits at most one burst more than its one bucket (the documented bound, G = 2),
    # then the debt holds both back.
    for i in range(60):
        allowed += gateways[i % 2].take("203.0.113.5") == 0
        clock.advance(0.01)
    assert 10 <= allowed <= 10 + 10
    assert float(server.cli("HGET", "gateway:limit:request_ip:203.0.113.5", "tokens")) < 0.5
