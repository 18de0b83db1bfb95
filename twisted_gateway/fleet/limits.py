"""
Rate limits shared by the fleet: one token bucket per limit and key (client IP, token subject)
in Redis, consulted without a round trip on the hot path.

Each gateway decides at once from a local copy of every bucket and reconciles it with the
fleet's bucket asynchronously.  Tokens spent locally are batched per key; every
L{SharedLimits.interval} (50 ms by default) one EVAL of L{BUCKET_SCRIPT} carries every key that
spent since the last call (up to L{SharedLimits.batch_keys} keys a call; a call is not sent
while the last one is out, so a slow Redis lengthens the interval).  In Redis, atomically,
the script refills each bucket by the server's clock (``TIME``), subtracts the tokens the
gateway spent, and returns the level left; the gateway sets its local bucket to that level,
less what it spent while the call was out.  A bucket may go below zero: what the fleet
overspent is a debt every gateway sees at its next call and waits out, so over time the fleet
admits exactly the configured rate.  A key nobody uses expires (PEXPIRE: the time its bucket
takes to refill, an absent bucket being a full one), so idle clients leave nothing behind.

Accuracy.  With G gateway processes (each worker process counts) sharing a limit of rate r and
burst b, sync interval S (50 ms) and t the time one script call takes (send to answer), over
any window of T seconds the fleet admits per key at most::

    b + r * T + (G - 1) * (b + r * (S + 2 * t))

that is one fleet-wide bucket plus, at worst, what each other gateway spends before it hears of
the others' spends: its bucket's level as it last heard it (at most b) and what refills while
its knowledge is old (a decision uses a level at most S + 2t old).  The worst case is a client
that reaches every gateway at once while its bucket is full (each gateway has a full bucket to
spend); under sustained load the level every gateway hears is near zero and the excess at most
(G - 1) * r * (S + 2t).  The excess is a debt in Redis that every gateway then sees and waits
out (refusing), so it does not accumulate, and over a long window the fleet admits the
configured rate.  One gateway alone (G = 1) admits exactly one bucket's worth.  A refusal's
Retry-After comes from the local level, the fleet's debt included.

When Redis cannot be consulted (the link is down), each gateway goes on alone from its local
buckets at the configured rate, and every such decision counts in
C{gateway_rate_limit_fallbacks_total}; so do spends whose reconciling call failed.  Spends made
while Redis was away are not reported when it returns (they were the local limit's); the next
spend after the return reconciles again.  The concurrent-connection caps
(C{limits.max_connections}, C{limits.max_connections_per_ip}) stay per gateway: a count of open
connections belongs to the process holding them, and a shared one would outlive a crashed
gateway.

Key layout: ``<prefix>limit:<limit>:<key>``, a hash ``{tokens, ts}`` (``ts`` in milliseconds of
the Redis server's clock), with ``<limit>`` one of ``connection_ip``, ``request_ip``,
``request_token``; keys longer than 128 characters, or not printable ASCII, are replaced by
``#`` and their SHA-256 (L{bucket_part}).
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_gateway import metrics
from twisted_gateway.fleet.redis import RedisLink, RedisUnavailable

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall


# KEYS: the buckets.  ARGV: three values per key, in order: rate (tokens per second), burst,
# tokens spent.  Returns the level of each bucket after the spend, as strings (a Lua number
# would come back truncated to an integer).  The level may be negative (the fleet's debt).
BUCKET_SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[3 * i - 2])
  local burst = tonumber(ARGV[3 * i - 1])
  local spent = tonumber(ARGV[3 * i])
  local state = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens = tonumber(state[1])
  local ts = tonumber(state[2])
  -- A state not written by this script (by hand, or corrupted): a non-number, NaN or an
  -- infinity would fail PEXPIRE (and with it every key of the call) or stick forever.
  if tokens == nil or ts == nil or tokens ~= tokens or ts ~= ts
     or tokens == math.huge or tokens == -math.huge or ts == math.huge or ts == -math.huge then
    tokens = burst
  else
    tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
  end
  tokens = tokens - spent
  redis.call('HSET', key, 'tokens', tokens, 'ts', now)
  redis.call('PEXPIRE', key, math.max(1, math.ceil((burst - tokens) * 1000 / rate)))
  out[i] = tostring(tokens)
end
return out
"""

LIMIT_NAMES = ("connection_ip", "request_ip", "request_token")

_PLAIN_KEY = re.compile(r"[!-~]{1,128}")


def bucket_part(key: str) -> str:
    """
    The C{<key>} of a bucket's Redis key: the client IP or token subject itself when it is 1 to
    128 printable ASCII characters (no space, no control character) not starting with ``#``;
    otherwise ``#`` and the SHA-256 of its UTF-8 bytes (a lone surrogate replaced), so that no
    key a client chooses names another client's bucket, and every key can be sent to Redis.
    """
    if _PLAIN_KEY.fullmatch(key) and not key.startswith("#"):
        return key
    return "#" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class _Bucket:
    """One key's local bucket: the fleet's level as last heard, refilled locally since."""

    __slots__ = ("limiter", "redis_key", "tokens", "stamp", "pending")

    def __init__(self, limiter: SharedRateLimiter, redis_key: str, now: float) -> None:
        self.limiter = limiter
        self.redis_key = redis_key
        self.tokens = limiter.burst
        self.stamp = now
        self.pending = 0
        """Tokens spent here and not yet sent to Redis."""

    def level(self, now: float) -> float:
        limiter = self.limiter
        self.tokens = min(limiter.burst, self.tokens + (now - self.stamp) * limiter.rate)
        self.stamp = now
        return self.tokens

    def full(self, now: float) -> bool:
        return self.pending == 0 and \
            self.tokens + (now - self.stamp) * self.limiter.rate >= self.limiter.burst


class SharedRateLimiter:
    """
    L{twisted_gateway.limits.RateLimiter}'s interface over the fleet's buckets of one limit
    (C{name}): L{take} decides at once from the local bucket; L{SharedLimits} reconciles.
    Made (and reconfigured on reload) by L{SharedLimits.limiter}.
    """

    def __init__(self, shared: SharedLimits, name: str, rate: float, burst: float,
                 max_keys: int = 100_000) -> None:
        self.shared = shared
        self.name = name
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.max_keys = max_keys
        self._buckets: dict[str, _Bucket] = {}
        self._fallbacks = metrics.RATE_LIMIT_FALLBACKS.labels(limit=name)

    def configure(self, rate: float, burst: float) -> None:
        """New settings (a reload): the buckets stay, the fleet's with them."""
        self.rate = rate
        self.burst = max(burst, 1.0)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, key: str) -> float:
        """0 if allowed, else the seconds until a token is available (for Retry-After)."""
        if self.rate <= 0:
            return 0.0
        now = self.shared.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._add(key, now)
        sharing = self.shared.link.up
        if not sharing:
            self._fallbacks.inc()
        level = bucket.level(now)
        if level >= 1:
            bucket.tokens -= 1
            if sharing:
                self.shared.spent(bucket)
            return 0.0
        return (1 - level) / self.rate

    def _add(self, key: str, now: float) -> _Bucket:
        if len(self._buckets) >= self.max_keys:
            # Forget full buckets (clients quiet for a while): they would start full anyway.
            for k in [k for k, b in self._buckets.items() if b.full(now)]:
                del self._buckets[k]
            if len(self._buckets) >= self.max_keys:
                self._buckets.clear()
        bucket = self._buckets[key] = _Bucket(self, self.shared.link.key("limit", self.name, bucket_part(key)), now)
        return bucket

    def __len__(self) -> int:
        return len(self._buckets)


class SharedLimits:
    """
    The fleet's rate limits on one L{RedisLink}: the L{SharedRateLimiter} of each limit and the
    loop that reconciles their buckets with Redis.  One per gateway process, carried across
    reloads (a reload must neither reset the fleet's buckets nor start a second loop).
    """

    log = Logger()

    def __init__(self, link: RedisLink, reactor: Any, interval: float = 0.05, batch_keys: int = 512,
                 max_unsent: int = 100_000) -> None:
        self.link = link
        self.reactor = reactor
        self.interval = interval
        self.batch_keys = batch_keys
        self.max_unsent = max_unsent
        """Most keys waiting for the next call (while one is out): beyond, spends stay local."""
        self.limiters: dict[str, SharedRateLimiter] = {}
        self._dirty: list[_Bucket] = []
        self._timer: IDelayedCall | None = None
        self._outstanding = 0
        self._failing = False
        self.calls = 0
        """Script calls sent (for tests and curiosity)."""
        link.on_down(self._link_down)

    def clock(self) -> float:
        return float(self.reactor.seconds())

    def limiter(self, name: str, rate: float, burst: float) -> SharedRateLimiter:
        """The limiter of C{name} with these settings (the same object across reloads)."""
        found = self.limiters.get(name)
        if found is None:
            found = self.limiters[name] = SharedRateLimiter(self, name, rate, burst)
        else:
            found.configure(rate, burst)
        return found

    # -- the reconciling loop -----------------------------------------------------------------

    def spent(self, bucket: _Bucket) -> None:
        """A token of C{bucket} was spent: report it with the next call."""
        if bucket.pending == 0:
            if len(self._dirty) >= self.max_unsent:
                # A flood of new keys while Redis is slow: memory stays bounded, this spend local.
                bucket.limiter._fallbacks.inc()
                return
            self._dirty.append(bucket)
        bucket.pending += 1
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is None and self._outstanding == 0 and self._dirty:
            self._timer = self.reactor.callLater(self.interval, self._flush)

    def _flush(self) -> None:
        self._timer = None
        if not self.link.up:
            self._link_down()
            return
        dirty, self._dirty = self._dirty, []
        for start in range(0, len(dirty), self.batch_keys):
            batch = dirty[start:start + self.batch_keys]
            keys = []
            args: list[Any] = []
            sent = []
            for bucket in batch:
                keys.append(bucket.redis_key)
                args += [repr(bucket.limiter.rate), repr(bucket.limiter.burst), bucket.pending]
                sent.append(bucket.pending)
                bucket.pending = 0
            self._outstanding += 1
            self.calls += 1
            d = self.link.eval(BUCKET_SCRIPT, keys, args)
            d.addCallbacks(self._settle, self._failed, callbackArgs=(batch,), errbackArgs=(batch, sent))
            d.addErrback(lambda f: self.log.failure("shared rate limits: handling an answer failed", f))

    def _settle(self, levels: Any, batch: list[_Bucket]) -> None:
        self._outstanding -= 1
        now = self.clock()
        for bucket, level in zip(batch, levels):
            # The fleet's level as Redis ran the script, less what was spent here since.
            value = level.decode() if isinstance(level, bytes) else str(level)
            bucket.tokens = min(bucket.limiter.burst, float(value)) - bucket.pending
            bucket.stamp = now
        if self._failing:
            self._failing = False
            self.log.info("shared rate limits: reconciling with Redis again")
        self._schedule()

    def _failed(self, failure: Failure, batch: list[_Bucket], sent: list[int]) -> None:
        self._outstanding -= 1
        # These decisions were made locally and never reached the fleet's buckets.
        for bucket, n in zip(batch, sent):
            bucket.limiter._fallbacks.inc(n)
        if failure.check(RedisUnavailable):
            pass  # the link is down: it says so once, and _link_down has run or will
        elif not self._failing:
            self._failing = True
            self.log.warn("shared rate limits: the bucket script failed ({error}); "
                          "decisions go on from the local buckets", error=failure.getErrorMessage())
        self._schedule()

    def _link_down(self) -> None:
        """Redis is away: the spends not yet sent stay local (the local limit's)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for bucket in self._dirty:
            bucket.pending = 0
        self._dirty = []


__all__ = ["BUCKET_SCRIPT", "LIMIT_NAMES", "bucket_part", "SharedLimits", "SharedRateLimiter"]
