"""
Keeps ACME certificates: which names are managed, when to issue and renew them, on-demand
issuance for shard names, and the fallback while a certificate is missing.

Safety against the known failures of peers: an on-demand name must pass the policy (the name
resolves to a shard in the directory, or an ``ask`` URL says yes) before any ACME request; a
global rate limit and a per-name exponential backoff with jitter bound how often the CA is
asked; certificates are stored and loaded at start, so a restart (or a crash loop) issues
nothing while stored certificates are valid.

With several worker processes (``--workers N``) each keeps every certificate, but only the one
holding the L{IssuerLock} talks to the CA; the others follow the store on disk, answer
challenges the issuer published on the L{ChallengeBoard}, and pass on-demand names that passed
their policy to the issuer as requests.

In a fleet on Redis the lock is per certificate (L{RedisIssuanceLock}, C{per_name}): every
gateway decides what is missing or due, and the one that takes a name's lock orders it (after
checking, under the lock, that no other gateway stored a fresh one meanwhile); a gateway that
finds the lock busy waits for the store's notice.  So each name is ordered once for the fleet,
and every gateway installs what any of them stored.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any, Callable, cast
from urllib.parse import quote

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredSemaphore, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from twisted_gateway import metrics
from twisted_gateway.limits import TokenBucket
from twisted_gateway.tls.acme.client import AcmeIssuer, IssuanceError
from twisted_gateway.tls.acme.redis_store import LeaseLost
from twisted_gateway.tls.acme.store import ICertificateStore, StoredCertificate
from twisted_gateway.tls.contexts import ICertificateSource
from twisted_gateway.tls.localca import KeyPair

Names = tuple[str, ...]


@implementer(ICertificateSource)
class AcmeCertificateSource(MultiService):
    """
    Two timers run under it (TimerService children, started once the store is loaded): the
    issue-and-renew L{check} every C{acme.check_interval} seconds, and, with several worker
    processes, L{sync_store} every C{sync_interval} seconds.  Both run at once when started;
    an unexpected error in either is logged and the timer keeps going.
    """

    log = Logger()

    def __init__(self, reactor: Any, issuer: AcmeIssuer, store: ICertificateStore,
                 fallback: ICertificateSource, config: Any, hostname: str,
                 name_allowed: Callable[[str], bool], threadpool: Any = None,
                 lock: Any = None, board: Any = None, sync_interval: float = 1.0) -> None:
        super().__init__()
        self.reactor = reactor
        self.issuer = issuer
        self.store = store
        self.fallback = fallback
        self.config = config
        self.hostname = hostname
        self.name_allowed = name_allowed
        self._threadpool = threadpool
        self._certs: dict[str, StoredCertificate] = {}
        self._managed: dict[Names, str] = {}
        self._in_flight: dict[Names, Deferred[None]] = {}
        self._failures: dict[Names, int] = {}
        self._next_attempt: dict[Names, float] = {}
        self._renew_at: dict[Names, float] = {}
        self._last_error: dict[Names, tuple[float, str]] = {}  # the admin API's certificates()
        self._denied: dict[str, float] = {}
        self._semaphore = DeferredSemaphore(2)
        # acme.on_demand_rate is per minute; the burst lets a minute's worth through at once.
        self._bucket = TokenBucket(config.on_demand_rate / 60.0, max(1.0, config.on_demand_rate),
                                   reactor.seconds)
        self.lock = lock
        """An L{IssuerLock} (only its holder issues), a per-name lock (C{per_name}: the fleet's),
        or None when this process is alone."""
        self.per_name = bool(getattr(lock, "per_name", False))
        self._leases: dict[Names, Any] = {}
        self._watched: set[Deferred[Any]] = set()
        self._account_lock = threading.Lock()
        self.board = board
        self._store_stamp: Any = None
        self._waiters: dict[str, list[Deferred[None]]] = {}
        self._timers = [self._timer(config.check_interval, self.check, "renewal check")]
        if lock is not None:
            self._timers.append(self._timer(sync_interval, self.sync_store, "store sync"))
        for timer in self._timers:
            timer.setServiceParent(self)
        add_listener = getattr(store, "add_listener", None)
        if add_listener is not None:
            add_listener(self.sync_store)  # a certificate another gateway stored: install it now

    def _timer(self, interval: float, work: Callable[[], object], what: str) -> TimerService:
        def guarded() -> None:
            # TimerService stops for good when its call raises; a surprise in one round
            # (a store file half-written by another process, say) must not end renewals.
            try:
                work()
            except Exception:  # noqa: BLE001 - logged, and the next round runs
                self.log.failure("ACME {what} failed; trying again in {interval}s",
                                 what=what, interval=interval)
        timer = TimerService(interval, guarded)
        timer.clock = self.reactor
        return timer

    def may_issue(self) -> bool:
        """Whether this process is the one that talks to the CA (taking the lock if it is free).
        With per-name locks every gateway may, one name at a time, once its store can write."""
        if self.per_name:
            return bool(getattr(self.store, "can_issue", True))
        return self.lock is None or self.lock.acquire()

    # -- ICertificateSource -------------------------------------------------------------------

    def _lookup(self, name: str) -> StoredCertificate | None:
        stored = self._certs.get(name)
        if stored is None and "." in name:
            stored = self._certs.get("*." + name.split(".", 1)[1])
        if stored is not None and stored.not_after <= time.time():
            return None
        return stored

    def pair_for(self, name: str) -> KeyPair | None:
        stored = self._lookup(name)
        if stored is not None:
            return stored.pair
        self._maybe_on_demand(name)
        return self.fallback.pair_for(name)

    def pending(self, name: str) -> Deferred[None] | None:
        """A Deferred that fires when an issuance covering C{name} ends, if one is running
        here or was requested from the issuing process."""
        for names, d in self._in_flight.items():
            if name in names:
                waiter: Deferred[None] = Deferred()
                if self.per_name:
                    self._watched.add(d)  # kept waiting if the lock turns out busy

                def release(result: object) -> object:
                    waiter.callback(None)
                    return result  # the issuance's own result goes on unchanged
                d.addBoth(release)
                return waiter
        if name in self._waiters:
            waiter = Deferred()
            self._waiters[name].append(waiter)
            return waiter
        return None

    # -- lifecycle ------------------------------------------------------------------------------

    def startService(self) -> None:
        # Only the issuing process moves an unreadable certificate aside (another process
        # may be between writing a certificate and its key).
        # (The fleet's store replaces a bad local copy itself.)
        quarantine = False if self.per_name else self.may_issue()
        for stored in self.store.load_all(quarantine=quarantine):
            self._install(stored)
            self._managed.setdefault(stored.names, self._challenge_for(stored.names))
        if self.config.wildcard:
            self._managed.setdefault((f"*.{self.hostname}", self.hostname), "dns-01")
        for name in self.config.names:
            self._managed.setdefault((name,), self.config.challenge)
        for name in getattr(self.store, "corrupted", []):
            # A stored certificate that no longer parses is replaced.
            if not any(names[0] == name for names in self._managed):
                self._managed[(name,)] = self._challenge_for((name,))
        self._store_stamp = self._stamp()
        start = getattr(self.store, "start", None)
        if start is not None:
            start()  # the fleet store's periodic resync
        super().startService()  # the timers: a renewal check now

    def stopService(self) -> Any:
        stopped = super().stopService()  # the timers
        stop = getattr(self.store, "stop", None)
        if stop is not None:
            stop()
        if self.per_name:
            for lease in list(self._leases.values()):
                self.lock.release(lease)  # another gateway may take over at once
        elif self.lock is not None:
            self.lock.release()  # another worker may take over at once
        return stopped

    # -- following the store (several processes) -------------------------------------------------

    def _stamp(self) -> Any:
        stamp = getattr(self.store, "stamp", None)
        return stamp() if stamp is not None else None

    def sync_store(self) -> None:
        """Install what another process stored since the last look (cheap when nothing changed)."""
        stamp = self._stamp()
        if stamp is None or stamp == self._store_stamp:
            return
        self._store_stamp = stamp
        for stored in self.store.load_all(quarantine=False):
            current = self._certs.get(stored.names[0])
            if current is None or current.pair.certificate != stored.pair.certificate:
                self._install(stored)
                self.log.info("certificate for {names} picked up from the store, valid until {not_after}",
                              names=", ".join(stored.names),
                              not_after=stored.pair.certificate.not_valid_after_utc.isoformat())
            self._managed.setdefault(stored.names, self._challenge_for(stored.names))

    def _challenge_for(self, names: Names) -> str:
        return "dns-01" if any(n.startswith("*.") for n in names) else self.config.challenge

    # -- decisions ------------------------------------------------------------------------------

    def check(self) -> None:
        """Issue what is missing and renew what is due (respecting each name's backoff)."""
        if not self.may_issue():
            return  # another process issues; sync_store picks up its certificates
        if self.lock is not None:
            self.sync_store()  # what a previous issuer stored
        if self.board is not None:
            for name in self.board.take_requests():
                if (name,) not in self._managed and self._lookup(name) is None and \
                        (self.config.on_demand == "ask" or self.name_allowed(name)):
                    self._managed[(name,)] = self.config.challenge
        now = self.reactor.seconds()
        for names, challenge in list(self._managed.items()):
            if names in self._in_flight or now < self._next_attempt.get(names, 0):
                continue
            stored = self._certs.get(names[0])
            if stored is None or time.time() >= self._renew_at.get(names, 0):
                self._issue(names, challenge, "renewal" if stored is not None else "missing")

    def _maybe_on_demand(self, name: str) -> None:
        mode = self.config.on_demand
        if mode == "off" or (name,) in self._managed or (name,) in self._in_flight:
            return
        now = self.reactor.seconds()
        if self._denied.get(name, 0) > now:
            return
        if mode == "directory":
            if not self.name_allowed(name):
                self._deny(name, "not_in_directory")
                return
            self._admit(name)
        else:
            self._ask(name)

    def _deny(self, name: str, why: str) -> None:
        metrics.ACME_ON_DEMAND.labels(decision=why).inc()
        # Remember the refusal briefly so a flood of one name costs one decision.
        self._denied[name] = self.reactor.seconds() + 60
        if len(self._denied) > 10000:
            self._denied.clear()

    def _admit(self, name: str) -> None:
        if not self._bucket.take():
            metrics.ACME_ON_DEMAND.labels(decision="rate_limited").inc()
            return
        metrics.ACME_ON_DEMAND.labels(decision="allowed").inc()
        self._managed[(name,)] = self.config.challenge
        if self.may_issue():
            self._issue((name,), self.config.challenge, "on_demand")
        elif self.board is not None:
            # The issuing process takes it from here; this one waits for the store.
            self.board.request(name)
            self._waiters.setdefault(name, [])

    def _ask(self, name: str) -> None:
        import treq
        self._denied[name] = self.reactor.seconds() + 5  # one question in flight per name
        url = self.config.ask_url + ("&" if "?" in self.config.ask_url else "?") + "domain=" + quote(name)
        d = treq.get(url, timeout=5)

        def answered(response: Any) -> None:
            if response.code == 200:
                self._denied.pop(name, None)
                self._admit(name)
            else:
                self._deny(name, "denied_by_ask")
        d.addCallbacks(answered, lambda f: self._deny(name, "ask_failed"))

    # -- issuance -------------------------------------------------------------------------------

    def _issue(self, names: Names, challenge: str, reason: str) -> Deferred[None]:
        if names in self._in_flight:
            return self._in_flight[names]
        if not self.per_name:
            return self._order(names, challenge, reason, None)
        # The fleet: take the name's lock first; the Deferred covers the attempt and the order.
        in_flight: Deferred[None] = Deferred()
        self._in_flight[names] = in_flight

        def settle() -> None:
            self._watched.discard(in_flight)
            if self._in_flight.get(names) is in_flight:
                del self._in_flight[names]
            if not in_flight.called:
                in_flight.callback(None)

        def locked(lease: Any) -> Any:
            if lease is None:
                # Another gateway orders it (or Redis could not be asked): wait for the store's
                # notice; the next check tries again, so a dead holder's name is taken over
                # once its lock expires.
                del self._in_flight[names]
                waiting = self._waiters.setdefault(names[0], [])
                if in_flight in self._watched:  # a handshake waits: until the certificate comes
                    self._watched.discard(in_flight)
                    waiting.append(in_flight)
                else:
                    in_flight.callback(None)
                return None
            self._leases[names] = lease
            d = cast(Any, self.store).stored_version(names)
            d.addCallback(decide, lease)

            def unknown(failure: Any) -> None:
                self._let_go(names, lease)
                settle()
            d.addErrback(unknown)
            return None

        def decide(stored: StoredCertificate | None, lease: Any) -> None:
            # Under the lock: has another gateway stored a current certificate meanwhile?
            if stored is not None:
                current = self._certs.get(names[0])
                if current is None or current.pair.certificate != stored.pair.certificate:
                    self._install(stored)
                    self.log.info("certificate for {names} picked up from the store, valid until "
                                  "{not_after}", names=", ".join(names),
                                  not_after=stored.pair.certificate.not_valid_after_utc.isoformat())
            unreadable = getattr(self.store, "present_but_unreadable", lambda n: False)(names)
            if unreadable or (stored is not None and time.time() < self._due(stored)):
                if unreadable:
                    self.log.error("certificate for {names} is in the fleet's store but its key does "
                                   "not decrypt here: not ordering over it", names=", ".join(names))
                self._let_go(names, lease)
                settle()
                return
            order = self._order(names, challenge, reason, lease)

            def ordered(ok: bool) -> None:
                if ok:
                    self._let_go(names, lease)
                else:
                    # The fleet backs off together: the lock stays until this gateway's retry.
                    self._let_go(names, lease, hold=self._next_attempt.get(names, 0) - self.reactor.seconds())
                settle()
            order.addCallback(ordered)

        self.lock.acquire(names).addCallback(locked)
        return in_flight

    def _let_go(self, names: Names, lease: Any, hold: float = 0.0) -> None:
        self._leases.pop(names, None)
        if hold > 0 and not getattr(lease, "lost", False):
            self.lock.hold_for(lease, hold)
        else:
            self.lock.release(lease)

    def _due(self, stored: StoredCertificate) -> float:
        lifetime = stored.not_after - stored.not_before
        return stored.not_before + lifetime * self.config.renew_fraction

    def _order(self, names: Names, challenge: str, reason: str, lease: Any) -> Deferred[Any]:
        """Run one order in the thread pool; fires True once stored and installed, False when
        it failed (logged, counted, backed off)."""
        started = self.reactor.seconds()
        self.log.info("requesting a certificate for {names} ({reason}, {challenge})",
                      names=", ".join(names), reason=reason, challenge=challenge)

        def run() -> tuple[StoredCertificate, float | None]:
            with self._account_lock:
                # Two first orders at once would each create an account, and one would answer
                # its challenges with the other's key: the account is set up once, here.
                self.issuer.client()
            chain, key = self.issuer.issue(names, challenge)
            if lease is None:
                stored = self.store.save(names, chain, key)
            else:  # fenced: refused when another gateway took the lock since
                stored = self.store.save(names, chain, key, lease=lease)
            ari = None
            try:
                if self.issuer.has_renewal_info():
                    when = self.issuer.renewal_time(chain)
                    ari = when.timestamp() if when is not None else None
            except Exception as e:  # noqa: BLE001 - ARI is advice; the lifetime rule still applies
                self.log.warn("renewal info for {names} unavailable: {error}", names=", ".join(names), error=str(e))
            return stored, ari

        def in_thread() -> Deferred[tuple[StoredCertificate, float | None]]:
            if self._threadpool is not None:
                return deferToThreadPool(self.reactor, self._threadpool, run)
            return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), run)

        d = self._semaphore.run(in_thread)
        # What the callbacks added after issued or failed (below) see: True or False.
        in_flight = cast("Deferred[Any]", d)
        if lease is None:
            self._in_flight[names] = in_flight

        def issued(result: tuple[StoredCertificate, float | None]) -> bool:
            stored, ari = result
            elapsed = self.reactor.seconds() - started
            metrics.ACME_ISSUANCES.labels(challenge=challenge, outcome="success").inc()
            metrics.ACME_ISSUE_SECONDS.observe(elapsed)
            self._failures.pop(names, None)
            self._next_attempt.pop(names, None)
            self._install(stored, ari)
            self.log.info("certificate for {names} issued in {elapsed:.2f}s, valid until {not_after}",
                          names=", ".join(names), elapsed=elapsed,
                          not_after=stored.pair.certificate.not_valid_after_utc.isoformat())
            return True

        def failed(failure: Any) -> bool:
            metrics.ACME_ISSUANCES.labels(challenge=challenge, outcome="failure").inc()
            count = self._failures.get(names, 0) + 1
            self._failures[names] = count
            delay = min(self.config.retry_max, self.config.retry_initial * 2 ** (count - 1))
            delay *= random.uniform(0.5, 1.0)  # jitter: instances do not retry in step
            self._next_attempt[names] = self.reactor.seconds() + delay
            error = failure.getErrorMessage() if failure.check(IssuanceError, LeaseLost) else repr(failure.value)
            self._last_error[names] = (time.time(), error)
            self.log.warn("certificate for {names} failed (attempt {count}), retrying in {delay:.0f}s: "
                          "{error}", names=", ".join(names), count=count, delay=delay, error=error)
            return False

        def settled(result: object) -> object:
            if self._in_flight.get(names) is in_flight:
                del self._in_flight[names]
            return result
        d.addCallbacks(issued, failed)
        in_flight.addBoth(settled)
        return in_flight

    def _install(self, stored: StoredCertificate, ari: float | None = None) -> None:
        for name in stored.names:
            self._certs[name] = stored
            metrics.CERTIFICATE_NOT_AFTER.labels(name=name).set(stored.not_after)
            for waiter in self._waiters.pop(name, []):
                waiter.callback(None)
        lifetime = stored.not_after - stored.not_before
        # The CA's suggested window (ARI, RFC 9773) wins when offered; else a fixed fraction.
        self._renew_at[stored.names] = ari if ari is not None else \
            stored.not_before + lifetime * self.config.renew_fraction

    # -- reporting ------------------------------------------------------------------------------

    def problems(self) -> dict[str, list[str]]:
        missing, expired = [], []
        now = time.time()
        for names in self._managed:
            stored = self._certs.get(names[0])
            if stored is None:
                missing.append(names[0])
            elif stored.not_after <= now:
                expired.append(names[0])
        return {"missing": sorted(missing), "expired": sorted(expired)}

    def issued(self, name: str) -> bool:
        return self._lookup(name) is not None

    def certificates(self) -> list[dict[str, Any]]:
        """The admin API's view: each certificate in force (managed or on demand) and each
        managed one still missing, with its next renewal, failed attempts since its last
        success, the last error and the next attempt (unix times); then the fallback's."""
        from twisted_gateway.tls.contexts import describe_certificate
        out: list[dict[str, Any]] = []
        seen: set[Names] = set()

        def progress(names: Names) -> dict[str, Any]:
            failures = self._failures.get(names, 0)
            when, error = self._last_error.get(names, (None, None))
            return {"renew_at": self._renew_at.get(names), "failures": failures,
                    "last_error": error if failures else None,
                    "last_error_time": when if failures else None,
                    "next_attempt": self._next_attempt.get(names) if failures else None}
        for stored in list(self._certs.values()):
            if stored.names not in seen:
                seen.add(stored.names)
                out.append(describe_certificate(stored.pair.certificate, "acme",
                                                **progress(stored.names)))
        for names in self._managed:
            if names not in seen and names[0] not in self._certs:
                out.append({"names": list(names), "source": "acme", "missing": True,
                            "not_after": None, "not_after_timestamp": None, **progress(names)})
        describe = getattr(self.fallback, "certificates", None)
        return out + (describe() if describe is not None else [])


def wait_for_certificate(source: Any, name: str, bound: float, reactor: Any) -> Deferred[None] | None:
    """A Deferred firing when an issuance for C{name} ends or C{bound} seconds pass."""
    if bound <= 0 or not isinstance(source, AcmeCertificateSource):
        return None
    pending = source.pending(name)
    if pending is None:
        return None
    done: Deferred[None] = Deferred()

    def expired() -> None:
        if not done.called:
            done.callback(None)
    timer = reactor.callLater(bound, expired)

    def finished(_: Any) -> None:
        if timer.active():
            timer.cancel()
        if not done.called:
            done.callback(None)
    pending.addBoth(finished)
    return done


__all__ = ["AcmeCertificateSource", "wait_for_certificate", "succeed"]
