"""
Distributed ACME for a fleet of gateways on one Redis: the certificate store, the per-name
issuance lock with a fencing token, and the challenge board, behind the same interfaces as
their single-machine counterparts (L{DiskCertificateStore}, L{IssuerLock}, L{ChallengeBoard}).

Key layout (``P`` is ``redis.key_prefix``, ``gateway:`` by default; ``NAME`` is a
certificate's first name, e.g. ``alpha-9000.example.com`` or ``*.example.com``)::

    P acme:cert:NAME          hash  names     space-separated names of the certificate
                                    chain     full chain, PEM
                                    key       private key PEM, Fernet-encrypted (text token)
                                    fence     fencing number of the lock that saved it
                                    saved_at  Unix time of the save
                                    saved_by  holder id (host:pid) of the gateway that saved it
    P acme:certs              hash  NAME -> fence of the stored version (the index resyncs read)
    P acme:lock:NAME          str   the holder's token (``host:pid:random``), PX redis.acme_lock_ttl
    P acme:fence:NAME         str   counter, INCR'd by every acquisition of the lock
    P acme:account:HASH       str   ACME account key PEM, Fernet-encrypted; HASH is the first 16
                                    hex digits of SHA-256(directory URL), as on disk
    P acme:keycheck           str   a known text, Fernet-encrypted: a gateway whose
                                    redis.acme_key_file does not decrypt it never writes keys
    P acme:challenge:KIND:KEY str   pending answer (KIND http-01: KEY token; tls-alpn-01: KEY
                                    the name; value: the key authorization), PX 10 minutes

    channel P acme:certificates     {"name": NAME, "fence": N} after every save
    channel P acme:challenges       {"op": "put"|"del", "kind": KIND, "key": KEY, "value": ...}

Every gateway keeps a local copy of each certificate in its state directory (the disk store),
so one restarted while Redis is down still serves them; a save is announced on the channel and
every gateway copies and installs it at once, and a resync (each time the link comes up, and
every L{RedisCertificateStore.resync_interval} seconds) catches what a lost notice missed.

Lock protocol, per certificate: acquire is ``SET lock token NX PX ttl`` and, in the same
script, ``INCR fence``: the fencing number of this acquisition.  The holder renews every ttl/3
with a compare-and-set script and releases with a compare-and-delete script (another token is
left alone).  Its save is one script that writes the certificate only if its fencing number is
not older than the fence counter (nobody acquired the lock since) nor than the stored
version's, so a holder that lost its lock (stalled past the ttl, and someone else took over)
cannot save over a newer certificate; one whose lock merely expired with nobody taking over
still saves.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid
from typing import Any, Callable

import attrs
from cryptography import x509
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import serialization
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import Logger
from twisted.python.threadable import isInIOThread
from zope.interface import implementer

from twisted_gateway import metrics
from twisted_gateway.tls.acme.shared import ChallengeBoard
from twisted_gateway.tls.acme.store import DiskCertificateStore, ICertificateStore, StoredCertificate
from twisted_gateway.tls.localca import KeyPair

Names = tuple[str, ...]

ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return 0
"""

RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: cert hash, index hash, fence counter.  ARGV: fence ('' for a save without a lock),
# names, chain, encrypted key, saved_at, saved_by, NAME.  Returns {1, fence} or {0, newer}.
SAVE = """
local fence
if ARGV[1] == '' then
  fence = redis.call('INCR', KEYS[3])
else
  fence = tonumber(ARGV[1])
  local latest = tonumber(redis.call('GET', KEYS[3]) or '0')
  if fence < latest then return {0, latest} end
end
local stored = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
if fence < stored then return {0, stored} end
redis.call('HSET', KEYS[1], 'names', ARGV[2], 'chain', ARGV[3], 'key', ARGV[4],
           'fence', tostring(fence), 'saved_at', ARGV[5], 'saved_by', ARGV[6])
redis.call('HSET', KEYS[2], ARGV[7], tostring(fence))
return {1, fence}
"""

KEYCHECK_TEXT = b"twisted-gateway acme key check"


class LeaseLost(Exception):
    """The certificate was not saved: another gateway took the name's lock since (the
    fencing number is older than the latest)."""


def holder_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def load_fernet(path: str) -> Fernet:
    """The Fernet key in C{path} (its first line: 32 url-safe base64 bytes, as
    C{Fernet.generate_key()} writes)."""
    with open(path, "rb") as f:
        data = f.read().strip().splitlines()
    if not data:
        raise ValueError(f"{path} is empty: expected a Fernet key (Fernet.generate_key())")
    return Fernet(data[0].strip())


def _from_thread(reactor: Any, f: Callable[..., Deferred[Any]], *args: Any) -> Any:
    """Run C{f} in the reactor thread and wait for its result (from the issuing thread)."""
    return blockingCallFromThread(reactor, f, *args)


# -- the lock ---------------------------------------------------------------------------------


@attrs.define
class Lease:
    """One holding of a name's lock: its token, its fencing number, whether it was lost."""

    names: Names
    token: str
    fence: int
    acquired_at: float
    renewed_at: float
    lost: bool = False
    released: bool = False
    _renewer: Any = None


class RedisIssuanceLock:
    """
    The fleet's per-certificate issuance lock (see the module docstring for the protocol).
    Every method runs in the reactor thread and answers with a Deferred.
    """

    log = Logger()
    per_name = True

    def __init__(self, link: Any, reactor: Any, ttl: float = 60.0) -> None:
        self.link = link
        self.reactor = reactor
        self.ttl = ttl
        self.holder = holder_id()

    def _keys(self, names: Names) -> tuple[str, str]:
        return self.link.key("acme", "lock", names[0]), self.link.key("acme", "fence", names[0])

    def acquire(self, names: Names) -> Deferred[Lease | None]:
        """A L{Lease} if the lock was free (it is then renewed until released), else None
        (busy, or Redis could not be asked)."""
        token = f"{self.holder}:{uuid.uuid4().hex}"
        d = self.link.eval(ACQUIRE, list(self._keys(names)), [token, str(int(self.ttl * 1000))])

        def answered(fence: Any) -> Lease | None:
            fence = int(fence or 0)
            if fence == 0:
                metrics.ACME_LOCK_EVENTS.labels(event="busy").inc()
                return None
            metrics.ACME_LOCK_EVENTS.labels(event="acquired").inc()
            now = self.reactor.seconds()
            lease = Lease(names, token, fence, now, now)
            self.log.info("ACME lock for {names} acquired (fencing number {fence})",
                          names=", ".join(names), fence=fence)
            renewer = LoopingCall(self._renew, lease)
            renewer.clock = self.reactor
            lease._renewer = renewer
            renewer.start(self.ttl / 3, now=False).addErrback(
                lambda f: self.log.failure("ACME lock renewal stopped", f))
            return lease

        def unavailable(failure: Any) -> None:
            metrics.ACME_LOCK_EVENTS.labels(event="unavailable").inc()
            self.log.debug("ACME lock for {names} not asked: {error}", names=", ".join(names),
                           error=failure.getErrorMessage())
            return None
        return d.addCallbacks(answered, unavailable)

    def _stop_renewing(self, lease: Lease) -> None:
        if lease._renewer is not None and lease._renewer.running:
            lease._renewer.stop()

    def _renew(self, lease: Lease) -> Deferred[None] | None:
        if lease.lost or lease.released:
            self._stop_renewing(lease)
            return None
        d = self.link.eval(RENEW, [self._keys(lease.names)[0]], [lease.token, str(int(self.ttl * 1000))])

        def answered(ok: Any) -> None:
            if int(ok or 0) == 1:
                lease.renewed_at = self.reactor.seconds()
                metrics.ACME_LOCK_EVENTS.labels(event="renewed").inc()
            else:
                self._lose(lease, "it expired or another gateway holds it now")

        def failed(failure: Any) -> None:
            metrics.ACME_LOCK_EVENTS.labels(event="unavailable").inc()
            if self.reactor.seconds() - lease.renewed_at >= self.ttl:
                self._lose(lease, f"not renewed for {self.ttl:.0f}s ({failure.getErrorMessage()})")
        return d.addCallbacks(answered, failed)

    def _lose(self, lease: Lease, why: str) -> None:
        if lease.lost:
            return
        lease.lost = True
        self._stop_renewing(lease)
        metrics.ACME_LOCK_EVENTS.labels(event="lost").inc()
        self.log.warn("ACME lock for {names} lost: {why}; this gateway's order will not be saved "
                      "over a newer one", names=", ".join(lease.names), why=why)

    def release(self, lease: Lease) -> Deferred[None]:
        """Give the lock back (only if this lease still holds it)."""
        if lease.released:
            return succeed(None)
        lease.released = True
        self._stop_renewing(lease)
        d = self.link.eval(RELEASE, [self._keys(lease.names)[0]], [lease.token])

        def answered(deleted: Any) -> None:
            if int(deleted or 0) == 1:
                metrics.ACME_LOCK_EVENTS.labels(event="released").inc()
        return d.addCallbacks(answered, lambda f: None)

    def hold_for(self, lease: Lease, seconds: float) -> Deferred[None]:
        """Keep the lock (without renewing it) for C{seconds}, then let it expire: after a
        failed order the fleet backs off together instead of each gateway trying in turn."""
        if lease.released:
            return succeed(None)
        lease.released = True
        self._stop_renewing(lease)
        d = self.link.eval(RENEW, [self._keys(lease.names)[0]],
                           [lease.token, str(max(1, int(seconds * 1000)))])
        return d.addCallbacks(lambda _: None, lambda f: None)


# -- the store --------------------------------------------------------------------------------


@implementer(ICertificateStore)
class RedisCertificateStore:
    """
    Certificates, keys and the ACME account in Redis (keys Fernet-encrypted), with a local copy
    in the state directory that L{load_all} and L{stamp} read.  Reads and writes from the issuing
    thread (L{save}, L{account_key}) wait for Redis in the reactor thread.
    """

    log = Logger()
    resync_interval = 15.0

    def __init__(self, link: Any, reactor: Any, state_dir: str, key_file: str | None = None,
                 fernet: Fernet | None = None) -> None:
        self.link = link
        self.reactor = reactor
        self.local = DiskCertificateStore(state_dir)
        if fernet is None:
            if key_file is None:
                raise ValueError("redis.acme_key_file is required to keep ACME keys in Redis")
            fernet = load_fernet(key_file)
        self.fernet = fernet
        self.holder = holder_id()
        self.key_ok: bool | None = None
        """Whether our key decrypts the fleet's (None: not known yet)."""
        self.decrypt_failures = 0
        self._listeners: list[Callable[[], None]] = []
        self._versions: dict[str, int] = {}
        self._undecryptable: dict[str, int] = {}
        self._resync: LoopingCall | None = None
        self._resyncing: Deferred[None] | None = None
        self.channel = link.key("acme", "certificates")
        link.subscribe(self.channel, self._notice)
        link.on_up(self._link_up)

    # -- keys ------------------------------------------------------------------------------

    def _cert_key(self, name: str) -> str:
        return self.link.key("acme", "cert", name)

    def _account_redis_key(self, ca_url: str) -> str:
        return self.link.key("acme", "account", hashlib.sha256(ca_url.encode()).hexdigest()[:16])

    # -- lifecycle (the manager starts and stops it) -----------------------------------------

    def start(self) -> None:
        if self._resync is None:
            self._resync = LoopingCall(self.resync)
            self._resync.clock = self.reactor
            self._resync.start(self.resync_interval, now=False).addErrback(
                lambda f: self.log.failure("ACME store resync stopped", f))

    def stop(self) -> None:
        if self._resync is not None and self._resync.running:
            self._resync.stop()
        self._resync = None

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call C{callback()} (reactor thread) whenever the local copy changed."""
        self._listeners.append(callback)

    def _changed(self) -> None:
        for callback in list(self._listeners):
            try:
                callback()
            except Exception:  # noqa: BLE001 - one listener's surprise must not stop the others
                self.log.failure("ACME store listener failed")

    @property
    def can_issue(self) -> bool:
        """Whether this gateway may write certificates to the fleet: its key file must decrypt
        what the fleet wrote (L{KEYCHECK_TEXT})."""
        return self.key_ok is True

    @property
    def corrupted(self) -> list[str]:
        return self.local.corrupted

    # -- ICertificateStore: the local copy ------------------------------------------------------

    def load_all(self, quarantine: bool = True) -> list[StoredCertificate]:
        # The fleet's copy is fetched by resync() once the link is up; a local file that does
        # not load is left for it to replace.
        return self.local.load_all(quarantine=False)

    def stamp(self) -> Any:
        return self.local.stamp()

    # -- saving (issuing thread) ------------------------------------------------------------------

    def save(self, names: Names, chain_pem: bytes, key_pem: bytes, lease: Any = None) -> StoredCertificate:
        """Write to Redis (fenced by C{lease}), then the local copy; raise L{LeaseLost} when a
        newer holder exists.  With Redis away the certificate is kept locally only (this
        gateway serves it; the fleet's copy wins at the next resync)."""
        if isInIOThread():
            raise RuntimeError("RedisCertificateStore.save is called from the issuing thread")
        try:
            fence = _from_thread(self.reactor, self._save_remote, names, chain_pem, key_pem, lease)
        except LeaseLost:
            raise
        except Exception as e:  # noqa: BLE001 - Redis away or failing: keep it here
            self.log.warn("certificate for {names} kept locally only, not shared with the fleet: {error}",
                          names=", ".join(names), error=str(e) or repr(e))
            fence = None
        stored = self.local.save(names, chain_pem, key_pem)
        if fence is not None:
            self._versions[names[0]] = fence
        return stored

    def _save_remote(self, names: Names, chain_pem: bytes, key_pem: bytes, lease: Any) -> Deferred[int]:
        if not self.can_issue:
            raise LeaseLost("redis.acme_key_file does not decrypt the fleet's keys; not saved")
        name = names[0]
        fence = "" if lease is None else str(lease.fence)
        args = [fence, " ".join(names), chain_pem.decode("ascii"),
                self.fernet.encrypt(key_pem).decode("ascii"), f"{time.time():.3f}", self.holder, name]
        d = self.link.eval(SAVE, [self._cert_key(name), self.link.key("acme", "certs"),
                                  self.link.key("acme", "fence", name)], args)

        def saved(reply: Any) -> Deferred[int]:
            ok, number = int(reply[0]), int(reply[1])
            if not ok:
                raise LeaseLost(f"certificate for {', '.join(names)} not saved: fencing number "
                                f"{fence} is older than {number} (another gateway took over)")
            self._versions[name] = number
            notice = json.dumps({"name": name, "fence": number})
            published = self.link.publish(self.channel, notice)
            return published.addBoth(lambda _: number)
        return d.addCallback(saved)

    # -- account key (issuing thread) -------------------------------------------------------------

    def account_key(self, ca_url: str) -> bytes | None:
        local = self.local.account_key(ca_url)
        if isInIOThread():
            return local
        try:
            token = _from_thread(self.reactor, self.link.execute, "GET", self._account_redis_key(ca_url))
        except Exception as e:  # noqa: BLE001 - Redis away: the local copy
            self.log.debug("ACME account key from the local copy: {error}", error=str(e))
            return local
        if token:
            pem = self._decrypt(str(token), "the ACME account key")
            if pem is None:
                return local
            if pem != local:
                self.local.save_account_key(ca_url, pem)
            return pem
        if local is not None and self.can_issue:
            self._put_account(ca_url, local)  # a gateway joining the fleet brings its account
        return local

    def save_account_key(self, ca_url: str, key_pem: bytes) -> None:
        self.local.save_account_key(ca_url, key_pem)
        if not isInIOThread() and self.can_issue:
            self._put_account(ca_url, key_pem)

    def _put_account(self, ca_url: str, key_pem: bytes) -> None:
        # NX: two gateways creating accounts at once keep the first in Redis; the other uses
        # its own (also registered) until its next start.
        try:
            _from_thread(self.reactor, self.link.execute, "SET", self._account_redis_key(ca_url),
                         self.fernet.encrypt(key_pem).decode("ascii"), "NX")
        except Exception as e:  # noqa: BLE001
            self.log.warn("ACME account key not shared with the fleet: {error}", error=str(e))

    # -- decryption -------------------------------------------------------------------------------

    def _decrypt(self, token: str, what: str) -> bytes | None:
        try:
            return self.fernet.decrypt(token.encode("ascii"))
        except (InvalidToken, ValueError):
            self.decrypt_failures += 1
            metrics.ACME_STORE_DECRYPT_FAILURES.inc()
            self.log.error("{what} in Redis does not decrypt with redis.acme_key_file (a key file "
                           "other than the fleet's?); treated as missing here", what=what)
            return None

    # -- following the fleet (reactor thread) -------------------------------------------------------

    def _link_up(self) -> None:
        self._check_key().addBoth(lambda _: self.resync())

    def _check_key(self) -> Deferred[None]:
        check_key = self.link.key("acme", "keycheck")
        d = self.link.execute("SET", check_key, self.fernet.encrypt(KEYCHECK_TEXT).decode("ascii"), "NX")
        d.addCallback(lambda _: self.link.execute("GET", check_key))

        def got(token: Any) -> None:
            try:
                ok = self.fernet.decrypt(str(token).encode("ascii")) == KEYCHECK_TEXT
            except (InvalidToken, ValueError):
                ok = False
            if not ok and self.key_ok is not False:
                self.decrypt_failures += 1
                metrics.ACME_STORE_DECRYPT_FAILURES.inc()
                self.log.error("redis.acme_key_file does not decrypt the fleet's ACME keys in Redis "
                               "(another key file?): this gateway serves its local copies and the "
                               "fallback, and neither issues nor writes to the fleet's store")
            self.key_ok = ok
        return d.addCallbacks(got, lambda f: None)

    def _notice(self, message: str) -> None:
        try:
            notice = json.loads(message)
            name, fence = str(notice["name"]), int(notice["fence"])
        except (ValueError, KeyError, TypeError):
            self.log.warn("unreadable ACME certificate notice: {message!r}", message=message[:200])
            return
        if self._versions.get(name) == fence:
            return  # our own save, or already copied
        self.fetch(name).addErrback(lambda f: self.log.warn(
            "certificate {name} not fetched after its notice: {error}", name=name, error=f.getErrorMessage()))

    def resync(self) -> Deferred[None]:
        """Copy every certificate whose version in Redis differs from the local copy's."""
        if self._resyncing is not None:
            return self._resyncing
        if not self.link.up:
            return succeed(None)
        if self.key_ok is None:
            self._check_key()  # the check at link-up did not get an answer: ask again
        d = self.link.execute("HGETALL", self.link.key("acme", "certs"))

        def listed(reply: Any) -> Deferred[Any]:
            items = _pairs(reply)
            fetches = [self.fetch(name, changed=False) for name, fence in items.items()
                       if self._versions.get(name) != int(fence)]
            from twisted.internet.defer import gatherResults
            return gatherResults(fetches, consumeErrors=True)

        def done(results: Any) -> None:
            self._resyncing = None
            if any(results or ()):
                self._changed()

        def failed(failure: Any) -> None:
            self._resyncing = None
            self.log.debug("ACME store resync failed: {error}", error=failure.getErrorMessage())
        d.addCallback(listed).addCallbacks(done, failed)
        self._resyncing = d
        return d

    def fetch(self, name: str, changed: bool = True) -> Deferred[StoredCertificate | None]:
        """Read C{name}'s certificate from Redis into the local copy; fires with it when it is
        usable, or None (absent, or its key does not decrypt)."""
        d = self.link.execute("HGETALL", self._cert_key(name))

        def got(reply: Any) -> StoredCertificate | None:
            fields = _pairs(reply)
            if "chain" not in fields or "key" not in fields:
                return None
            fence = int(fields.get("fence", "0"))
            chain_pem = fields["chain"].encode("ascii")
            names = tuple(fields.get("names", name).split()) or (name,)
            key_pem: bytes | None
            if self._undecryptable.get(name) == fence:
                return None  # already reported
            key_pem = self._decrypt(fields["key"], f"the private key of {name}")
            if key_pem is None:
                self._undecryptable[name] = fence
                return None
            self._undecryptable.pop(name, None)
            try:
                chain = tuple(x509.load_pem_x509_certificates(chain_pem))
                key = serialization.load_pem_private_key(key_pem, None)
            except ValueError as e:
                self.log.error("certificate {name} in Redis does not load: {error}", name=name, error=str(e))
                return None
            if not _key_matches(chain[0], key):
                self.log.error("certificate {name} in Redis: its private key is not the key of its "
                               "certificate; not used", name=name)
                return None
            stored = StoredCertificate(names, KeyPair(chain, key))
            if self._local_chain(name) != chain_pem:
                self.local.save(names, chain_pem, key_pem)
                self._versions[name] = fence
                if changed:
                    self._changed()
                return stored
            self._versions[name] = fence
            return stored
        return d.addCallback(got)

    def _local_chain(self, name: str) -> bytes | None:
        cert_path, _ = self.local._paths(name)
        try:
            with open(cert_path, "rb") as f:
                return f.read()
        except OSError:
            return None

    def stored_version(self, names: Names) -> Deferred[StoredCertificate | None]:
        """What the fleet holds for C{names} now (after taking its lock: is an order needed?).
        Fails with L{LeaseLost}-free errors only when Redis could not be asked."""
        d = self.link.execute("EXISTS", self._cert_key(names[0]))

        def exists(count: Any) -> Deferred[StoredCertificate | None]:
            if not int(count or 0):
                return succeed(None)
            return self.fetch(names[0])
        return d.addCallback(exists)

    def present_but_unreadable(self, names: Names) -> bool:
        """Whether the fleet holds a certificate for C{names} whose key we cannot decrypt (then
        this gateway must not order over it)."""
        return names[0] in self._undecryptable


def _key_matches(certificate: x509.Certificate, key: Any) -> bool:
    """Whether C{key} is the private key of C{certificate}'s public key."""
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        return bool(key.public_key().public_bytes(*spki) == certificate.public_key().public_bytes(*spki))
    except (AttributeError, ValueError, TypeError):
        return False


def _pairs(reply: Any) -> dict[str, str]:
    """An HGETALL reply (a flat list, or a dict from some txredisapi versions) as a dict."""
    if isinstance(reply, dict):
        return {_text(k): _text(v) for k, v in reply.items()}
    items = list(reply or [])
    return {_text(items[i]): _text(items[i + 1]) for i in range(0, len(items) - 1, 2)}


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# -- the challenge board ------------------------------------------------------------------------


CHALLENGE_KINDS = ("http-01", "tls-alpn-01")
# A key authorization is a token, a dot and a 43-character thumbprint; a token or a name is
# at most a few hundred characters.  Notices beyond these bounds are not answers.
MAX_CHALLENGE_KEY = 512
MAX_CHALLENGE_VALUE = 1024
# Pending answers pushed by peers held at once (each is also a file in the state directory).
MAX_PENDING_CHALLENGES = 10000


class RedisChallengeBoard:
    """
    The local L{ChallengeBoard} (files: the supervisor of ``--workers N`` answers from them)
    plus Redis, so that a validation reaching any gateway of the fleet is answered.

    L{publish} (issuing thread) writes the file, sets the Redis key with an expiry and announces
    it; it returns once Redis acknowledged the notice and a short settle passed (bounded), so
    that peers hold the answer in memory before the CA is told to validate.  Each gateway keeps
    the pushed answers in memory (and copies them into its own files, for its supervisor's
    plain port); L{read} is synchronous (memory, then files: the TLS-ALPN-01 handshake decision
    and HTTP-01); L{read_async} also asks Redis on a miss (HTTP-01 on the plain port);
    L{prefetch} starts such a read for a TLS-ALPN-01 handshake that missed, so the CA's next
    attempt is answered.
    """

    log = Logger()

    def __init__(self, local: ChallengeBoard, link: Any, reactor: Any, ttl: float = 600.0,
                 settle: float = 0.1) -> None:
        self.local = local
        self.link = link
        self.reactor = reactor
        self.ttl = ttl
        self.settle = settle
        self._memory: dict[tuple[str, str], tuple[str, float]] = {}
        self._missed: dict[tuple[str, str], float] = {}
        self.channel = link.key("acme", "challenges")
        link.subscribe(self.channel, self._notice)

    # the directory's state_dir-based attributes, for code that reads them
    @property
    def dir(self) -> str:
        return self.local.dir

    def _key(self, kind: str, key: str) -> str:
        return self.link.key("acme", "challenge", kind, key)

    # -- answers --------------------------------------------------------------------------------

    def publish(self, kind: str, key: str, value: str) -> None:
        self.local.publish(kind, key, value)
        self._memory[(kind, key)] = (value, time.time() + self.ttl)
        if isInIOThread():
            self._publish_remote(kind, key, value).addErrback(self._not_shared, kind, key)
            return
        try:
            _from_thread(self.reactor, self._publish_remote, kind, key, value)
        except Exception as e:  # noqa: BLE001 - the local processes can still answer
            self._not_shared(e, kind, key)
            return
        # Peers handle the notice as soon as Redis hands it to them: a short, bounded settle
        # before the CA is told to validate (this is the issuing thread, not the reactor).
        time.sleep(self.settle)

    def _not_shared(self, error: Any, kind: str, key: str) -> None:
        message = error.getErrorMessage() if hasattr(error, "getErrorMessage") else str(error)
        self.log.warn("{kind} challenge answer {key} not shared with the fleet (only this machine "
                      "answers it): {error}", kind=kind, key=key, error=message)

    def _publish_remote(self, kind: str, key: str, value: str) -> Deferred[Any]:
        d = self.link.execute("SET", self._key(kind, key), value, "PX", str(int(self.ttl * 1000)))
        notice = json.dumps({"op": "put", "kind": kind, "key": key, "value": value})
        return d.addCallback(lambda _: self.link.publish(self.channel, notice))

    def withdraw(self, kind: str, key: str) -> None:
        self.local.withdraw(kind, key)
        self._memory.pop((kind, key), None)

        def remote() -> Deferred[Any]:
            d = self.link.execute("DEL", self._key(kind, key))
            notice = json.dumps({"op": "del", "kind": kind, "key": key})
            return d.addCallback(lambda _: self.link.publish(self.channel, notice))
        if isInIOThread():
            remote().addErrback(lambda f: None)
            return
        try:
            _from_thread(self.reactor, remote)
        except Exception:  # noqa: BLE001 - it expires by itself
            pass

    def read(self, kind: str, key: str) -> str | None:
        held = self._memory.get((kind, key))
        if held is not None:
            if held[1] > time.time():
                return held[0]
            self._memory.pop((kind, key), None)
        return self.local.read(kind, key)

    def read_async(self, kind: str, key: str) -> Deferred[str | None]:
        found = self.read(kind, key)
        if found is not None or not self.link.up:
            return succeed(found)
        d = self.link.execute("GET", self._key(kind, key))

        def got(value: Any) -> str | None:
            if value is None:
                return None
            text = _text(value)
            self._memory[(kind, key)] = (text, time.time() + self.ttl)
            return text
        return d.addCallbacks(got, lambda f: None)

    def prefetch(self, kind: str, key: str) -> None:
        """Look C{key} up in Redis in the background (at most once a second per key)."""
        now = time.time()
        if self._missed.get((kind, key), 0) > now or not self.link.up:
            return
        if len(self._missed) > 10000:
            self._missed.clear()
        self._missed[(kind, key)] = now + 1.0
        self.read_async(kind, key)

    def _notice(self, message: str) -> None:
        try:
            notice = json.loads(message)
            op, kind, key = notice["op"], notice["kind"], notice["key"]
        except (ValueError, KeyError, TypeError):
            return
        if kind not in CHALLENGE_KINDS or not isinstance(key, str) or not 0 < len(key) <= MAX_CHALLENGE_KEY:
            self.log.warn("ignoring a challenge notice for {kind!r} {key!r}", kind=str(kind)[:40],
                          key=str(key)[:80])
            return
        if op == "put":
            value = notice.get("value")
            if not isinstance(value, str) or not 0 < len(value) <= MAX_CHALLENGE_VALUE:
                self.log.warn("ignoring a challenge notice for {kind} {key}: not a key authorization",
                              kind=kind, key=key[:80])
                return
            if self._memory.get((kind, key), ("",))[0] != value:
                if not self._room():
                    self.log.warn("ignoring a challenge notice for {kind} {key}: {n} answers pending",
                                  kind=kind, key=key[:80], n=len(self._memory))
                    return
                self._memory[(kind, key)] = (value, time.time() + self.ttl)
                self.local.publish(kind, key, value)  # this machine's other processes
        elif op == "del":
            if self._memory.pop((kind, key), None) is not None:
                self.local.withdraw(kind, key)

    def _room(self) -> bool:
        """Whether another pushed answer may be held (expired ones are forgotten first)."""
        if len(self._memory) < MAX_PENDING_CHALLENGES:
            return True
        now = time.time()
        for k in [k for k, (_, until) in self._memory.items() if until <= now]:
            del self._memory[k]
        return len(self._memory) < MAX_PENDING_CHALLENGES

    # -- on-demand requests between local processes: unchanged -------------------------------------

    def request(self, name: str) -> None:
        self.local.request(name)

    def take_requests(self, max_age: float = 600.0) -> list[str]:
        return self.local.take_requests(max_age)


__all__ = ["Lease", "LeaseLost", "RedisCertificateStore", "RedisChallengeBoard", "RedisIssuanceLock",
           "load_fernet"]
