"""
The fleet's one link to Redis: a command connection and a pub/sub connection, each kept up by
a L{_Dialer} (exponential backoff with jitter, never giving up while the service runs), to a
plain address (``redis.url``, optionally TLS) or to the master that Sentinel names
(``redis.sentinels``), followed across a failover.

Everything built on it (the Redis directory, the ACME store and lock, the shared rate limits)
keeps working from its last known state while the link is down: L{RedisLink.execute} fails at
once with L{RedisUnavailable} instead of queueing, the outage is logged once (and its end once),
and C{gateway_redis_up} shows it.  Subsystems hear of the link coming (back) up through
L{RedisLink.on_up}, to resynchronise, and get their pub/sub messages through
L{RedisLink.subscribe}, whose channels are subscribed again on every new connection.

txredisapi supplies the protocol (RESP, AUTH with an ACL user, SELECT, pub/sub, reply
timeouts); the connecting is the link's own.  txredisapi's pool slots (a ClientService each)
stop redialling for good after a refused AUTH or SELECT, log every retry, and its Sentinel
endpoint dials the master without TLS and leaves a connection hanging, unready, when the
password is wrong; a dialer of our own avoids all four and knows why each attempt failed.

Redis Cluster is not supported: the fleet's keys (see docs/operations.md) are read together
by scripts and would need one hash slot, and txredisapi has no cluster client.
"""

from __future__ import annotations

import math
import os
import random
import time
from typing import Any, Callable, Sequence
from urllib.parse import unquote, urlsplit

import attrs
import txredisapi
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.application.service import Service
from twisted.internet import ssl
from twisted.internet.defer import CancelledError, Deferred, fail, gatherResults, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_gateway import metrics
from twisted_gateway.config import RedisConfig


class RedisUnavailable(Exception):
    """The command was not sent (or its connection was lost): there is no connection to Redis."""


class RedisCommandError(Exception):
    """Redis answered the command with an error (str(): Redis's message)."""


class NoMaster(ConnectError):
    """No sentinel named a healthy master (or none could be asked)."""


@attrs.frozen
class RedisTarget:
    """Where and how to connect, worked out once from L{RedisConfig}."""

    host: str
    port: int
    database: int
    username: str | None
    password: str | None
    tls: bool
    tls_ca: str | None
    tls_server_name: str | None
    sentinels: tuple[tuple[str, int], ...]
    master_name: str

    @property
    def description(self) -> str:
        if self.sentinels:
            return f"Sentinel master {self.master_name!r} (sentinels " + \
                   ", ".join(f"{h}:{p}" for h, p in self.sentinels) + f"), db {self.database}"
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/{self.database}"


def read_password(path: str | None) -> str | None:
    """The first line of C{path} (a secret file), or None."""
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    return lines[0] if lines else ""


def target_from_config(config: RedisConfig) -> RedisTarget:
    """Raise ValueError naming the problem (a password file that cannot be read, say)."""
    parts = urlsplit(config.url or "redis://127.0.0.1:6379/0")
    db = parts.path.strip("/")
    try:
        password = read_password(config.password_file)
    except OSError as e:
        raise ValueError(f"redis.password_file: cannot read {config.password_file}: {e.strerror}") from None

    def split(hostport: str) -> tuple[str, int]:
        host, _, port = hostport.rpartition(":")
        return host.strip("[]"), int(port)
    return RedisTarget(
        host=parts.hostname or "127.0.0.1", port=parts.port or 6379, database=int(db) if db else 0,
        username=unquote(parts.username) if parts.username else None, password=password,
        tls=parts.scheme == "rediss" or config.tls_ca is not None, tls_ca=config.tls_ca,
        tls_server_name=config.tls_server_name,
        sentinels=tuple(split(s) for s in config.sentinels), master_name=config.master_name)


def client_tls_options(target: RedisTarget, host: str | None = None) -> Any:
    """The TLS client options for a Redis server at C{host}: its certificate must chain to
    C{tls_ca} (or to the system's roots) and name C{tls_server_name} (or the host; an IP
    address is checked against the certificate's IP addresses)."""
    trust = None
    if target.tls_ca is not None:
        with open(target.tls_ca, "rb") as f:
            trust = ssl.trustRootFromCertificates(
                [ssl.Certificate.loadPEM(pem) for pem in _pem_blocks(f.read())])
    return ssl.optionsForClientTLS(target.tls_server_name or host or target.host, trustRoot=trust)


def _pem_blocks(data: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    return [block + marker for block in data.split(marker) if b"-----BEGIN CERTIFICATE-----" in block]


def retry_delay(attempt: int, initial: float, maximum: float) -> float:
    """Seconds before dialling again after C{attempt} failed attempts in a row: e-fold from
    C{initial} up to C{maximum}, times 0.8 to 1.2 at random so that a fleet does not redial
    in step."""
    return min(maximum, initial * math.e ** min(max(attempt - 1, 0), 50)) * random.uniform(0.8, 1.2)


def tls_refused(failure: Failure) -> bool:
    """Whether C{failure} is the TLS handshake refusing the server (its certificate, its name)
    or the server refusing us: the same every attempt, so it is said at once."""
    return bool(failure.check(SSL.Error, VerificationError))


def describe_failure(failure: Failure) -> str:
    """One line for an operator: why a connection attempt failed or a connection was lost."""
    if failure.check(VerificationError):
        return f"TLS: the server's certificate does not match the name checked ({failure.value})"
    if failure.check(SSL.Error):
        args = getattr(failure.value, "args", ())
        reasons = [r[2] for r in (args[0] if args and isinstance(args[0], list) else [])
                   if isinstance(r, tuple) and len(r) == 3 and r[2]]
        return "TLS: " + (", ".join(reasons) or failure.getErrorMessage())
    return failure.getErrorMessage()


# -- txredisapi's protocol and factory, connected by the link's dialers ---------------------------

class _LinkProtocol:
    """Mixed into a txredisapi protocol: its dialer hears of the loss (with its reason) before
    txredisapi fails the replies still awaited."""

    factory: Any

    def connectionLost(self, why: Failure) -> None:  # noqa: N802 - Twisted's name
        self.factory.dialer.lost(self, why)
        super().connectionLost(why)  # type: ignore[misc]


class _CommandProtocol(_LinkProtocol, txredisapi.RedisProtocol):  # type: ignore[misc]
    pass


class _SubscriberProtocol(_LinkProtocol, txredisapi.SubscriberProtocol):  # type: ignore[misc]
    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:  # noqa: N802
        self.factory.dialer.link._message(channel, message)


class _Factory(txredisapi.RedisFactory):  # type: ignore[misc]
    """A txredisapi factory for one dialer: its protocols do AUTH and SELECT; the factory
    hands each ready connection to the dialer instead of to a pool, and reports a refusal.
    (txredisapi's own logging of refusals is off: C{isLazy} False.)"""

    noisy = False

    def __init__(self, dialer: _Dialer, protocol: type, dbid: int | None, password: str | None,
                 username: str | None, reply_timeout: float) -> None:
        super().__init__(None, dbid, 1, False, txredisapi.ConnectionHandler, "utf-8", password,
                         reply_timeout, False, username)
        self.protocol = protocol
        self.dialer = dialer

    def addConnection(self, conn: Any) -> None:  # noqa: N802 - txredisapi's name
        # (called a reactor turn after AUTH and SELECT succeeded)
        if conn.connected:
            self.dialer.ready(conn)

    def connectionError(self, why: str) -> None:  # noqa: N802 - txredisapi's name
        # AUTH or SELECT was refused (or the connection was lost during them): txredisapi
        # closes the connection; the dialer dials again.
        self.dialer.refused(why)


# txredisapi's ConnectionError texts: AUTH or SELECT failed for want of an answer, which says
# nothing about the credentials (a hung server, a connection lost meanwhile).
_NOT_A_REFUSAL = ("Not received Redis response", "Lost connection", "Not connected")


class _Dialer:
    """
    One connection kept up: dial, and after a failed attempt or a lost connection wait
    (L{retry_delay}) and dial again, until stopped.  The link hears of each ready connection,
    each loss and each failed attempt with its reason.
    """

    def __init__(self, link: RedisLink, role: str, connect: Callable[[Any], Deferred[Any]],
                 protocol: type, dbid: int | None, password: str | None, username: str | None,
                 initial_delay: float, max_delay: float) -> None:
        self.link = link
        self.role = role
        self._connect = connect
        self.factory = _Factory(self, protocol, dbid, password, username, link.config.command_timeout)
        self.initial_delay = initial_delay
        self.max_delay = max_delay
        self.running = False
        self.failures = 0
        self.protocol: Any = None
        self.conn: Any = None  # the protocol once ready (AUTH, SELECT done)
        self._connecting: Deferred[Any] | None = None
        self._waiting: Any = None
        self._refusal: str | None = None  # why AUTH or SELECT failed, in this attempt
        self._refused = False  # whether Redis refused them (not merely failed to answer)
        self._lost_early: Any = None
        self.check_master = False  # through Sentinel: hand on masters only
        self.address: tuple[str, int] | None = None  # what was dialled (through Sentinel)

    def start(self) -> None:
        self.running = True
        self._dial()

    def _dial(self) -> None:
        self._waiting = None
        if not self.running:
            return
        self._refusal = None
        d = self._connecting = self._connect(self.factory)
        d.addCallbacks(self._connected, self._failed)

    def _connected(self, protocol: Any) -> None:
        self._connecting = None
        if protocol is self._lost_early:
            # lost before the endpoint said it was made: a failed attempt like any other
            self._lost_early = None
            self._retry()
            return
        self.protocol = protocol
        if not self.running:
            protocol.transport.abortConnection()

    def _failed(self, failure: Failure) -> None:
        self._connecting = None
        if not self.running:
            return
        self.link._attempt_failed(self, describe_failure(failure), definitive=tls_refused(failure))
        self._retry()

    def _retry(self) -> None:
        self.failures += 1
        if self.running:
            self._waiting = self.link.reactor.callLater(
                retry_delay(self.failures, self.initial_delay, self.max_delay), self._dial)

    def ready(self, conn: Any) -> None:
        if conn is not self.protocol:
            return
        if not self.running:
            conn.transport.abortConnection()
            return
        if self.check_master:
            # Sentinel may name a server that is not a master (yet, or any more): ROLE once
            # AUTH is done (before it, with the default user off, it would be refused).
            conn.execute_command("ROLE").addCallbacks(
                lambda role: self._role(conn, role), lambda _: self._role(conn, None))
            return
        self._hand_over(conn)

    def _role(self, conn: Any, role: Any) -> None:
        if conn is not self.protocol or not conn.connected:
            return
        # (a subscriber connection's reply is the last three elements: SubscriberProtocol)
        if isinstance(role, list) and role and role[0] == "master":
            self._hand_over(conn)
            return
        self.link._attempt_failed(self, f"{self.address_text} is not a master (yet)", definitive=False)
        conn.transport.loseConnection()

    def _hand_over(self, conn: Any) -> None:
        self.failures = 0
        self.conn = conn
        self.link._ready(self, conn)

    @property
    def address_text(self) -> str:
        return f"{self.address[0]}:{self.address[1]}" if self.address else "the server"

    def refused(self, why: str) -> None:
        # txredisapi's text: "Redis error: could not auth: <Redis's answer, or a timeout>"
        if self.protocol is not None and self.protocol.connected:
            self._refusal = why.replace("Redis error: ", "")
            self._refused = not any(transient in why for transient in _NOT_A_REFUSAL)

    def lost(self, protocol: Any, why: Failure) -> None:
        if protocol is not self.protocol:
            if self._connecting is not None:
                self._lost_early = protocol
            return
        self.protocol = None
        was_ready, self.conn = self.conn is not None, None
        if was_ready:
            self.link._lost(self, describe_failure(why))
        elif self.running:
            refusal = self._refusal
            self.link._attempt_failed(self, refusal or describe_failure(why),
                                      definitive=self._refused if refusal else tls_refused(why))
        self._retry()

    def stop(self) -> Deferred[None]:
        """Stop dialling and hang up; fires once the connection is closed."""
        self.running = False
        if self._waiting is not None and self._waiting.active():
            self._waiting.cancel()
        self._waiting = None
        if self._connecting is not None:
            self._connecting.cancel()
        if self.protocol is None:
            return succeed(None)
        done: Deferred[Any] = self.protocol.whenDisconnected()
        self.protocol.transport.loseConnection()
        return done.addCallback(lambda _: None)


# -- the link ---------------------------------------------------------------------------------------

class RedisLink(Service):
    """
    A service: started, it dials Redis and keeps dialling; stopped, it hangs up.

    @ivar up: whether the command connection is up now.
    @ivar subscribed: whether the pub/sub connection is up and subscribed to every channel.
    """

    log = Logger()
    name = "redis"
    # Redial a lost connection after about 0.2 s, e-folding up to 2 s while Redis stays away
    # (a connection attempt every 2 s is nothing for Redis; a gateway back 5 s late is long).
    initial_delay = 0.2
    max_delay = 2.0
    # Through Sentinel, ask again soon: a failover takes a few seconds, and asking the
    # sentinels is cheap.
    sentinel_max_delay = 1.0
    # A PING on both connections this often: a peer gone without a FIN (a host down, a
    # partition) is noticed within this plus redis.command_timeout.
    ping_interval = 5.0

    def __init__(self, config: RedisConfig, reactor: Any, target: RedisTarget | None = None) -> None:
        self.config = config
        self.reactor = reactor
        self.target = target or target_from_config(config)
        self.prefix = config.key_prefix
        self.up = False
        self.subscribed = False
        self.master: tuple[str, int] | None = None
        self.last_error: str | None = None
        self._down_since: float | None = time.time()
        self._outage_logged = False
        self._refusal_logged = False
        self._target_error: str | None = None
        self._on_up: list[Callable[[], None]] = []
        self._on_down: list[Callable[[], None]] = []
        self._channels: dict[str, list[Callable[[str], None]]] = {}
        self._command: _Dialer | None = None
        self._subscriber: _Dialer | None = None
        self._sentinels: list[_Dialer] = []
        self._pinger: LoopingCall | None = None
        metrics.REDIS_UP.set(0)

    # -- names --------------------------------------------------------------------------------

    def key(self, *parts: str) -> str:
        """The fleet's key or channel made of C{parts}: ``<prefix>part:part``."""
        return self.prefix + ":".join(parts)

    # -- lifecycle ----------------------------------------------------------------------------

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        super().startService()
        self.log.info("Redis: connecting to {target}", target=self.target.description)
        t = self.target
        sentinel = bool(t.sentinels)
        if sentinel:
            self._sentinels = [
                _Dialer(self, "sentinel", self._direct(host, port, tls=False), _CommandProtocol,
                        None, None, None, self.initial_delay, self.max_delay)
                for host, port in t.sentinels]
        connect = self._through_sentinel if sentinel else self._direct(t.host, t.port, t.tls)
        max_delay = self.sentinel_max_delay if sentinel else self.max_delay
        self._command = _Dialer(self, "command", connect, _CommandProtocol, t.database,
                                t.password, t.username, self.initial_delay, max_delay)
        self._subscriber = _Dialer(self, "subscriber", connect, _SubscriberProtocol, None,
                                   t.password, t.username, self.initial_delay, max_delay)
        self._command.check_master = self._subscriber.check_master = sentinel
        for dialer in self._dialers():
            dialer.start()
        self._pinger = LoopingCall(self._ping)
        self._pinger.clock = self.reactor
        self._pinger.start(self.ping_interval, now=False)

    def _dialers(self) -> list[_Dialer]:
        return self._sentinels + [d for d in (self._command, self._subscriber) if d is not None]

    def stopService(self) -> Deferred[None]:  # noqa: N802 - Twisted's name
        super().stopService()
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()
        self._pinger = None
        dialers = self._dialers()
        self._command = self._subscriber = None
        self._sentinels = []
        if self.up:
            self.up = False
            metrics.REDIS_UP.set(0)
        self.subscribed = False
        d = gatherResults([dialer.stop() for dialer in dialers], consumeErrors=True)
        d.addErrback(lambda _: None)
        return d.addCallback(lambda _: None)

    # -- connecting ---------------------------------------------------------------------------

    def _endpoint(self, host: str, port: int, tls: bool) -> Any:
        endpoint: Any = HostnameEndpoint(self.reactor, host, port, timeout=self.config.connect_timeout)
        if tls:
            endpoint = wrapClientTLS(client_tls_options(self.target, host), endpoint)
        return endpoint

    def _direct(self, host: str, port: int, tls: bool) -> Callable[[Any], Deferred[Any]]:
        def connect(factory: Any) -> Deferred[Any]:
            if factory.dialer.role != "sentinel":
                self._refresh_password(factory)
            try:
                endpoint = self._endpoint(host, port, tls)
            except Exception as e:  # noqa: BLE001 - an unreadable CA bundle: said, and retried
                return fail(ConnectError(string=f"TLS: {e}"))
            return endpoint.connect(factory)
        return connect

    def _through_sentinel(self, factory: Any) -> Deferred[Any]:
        """Ask the sentinels for the master, then dial it; a master that has changed since the
        last dial hangs up the connections still held to the old one."""
        self._refresh_password(factory)
        d = self._discover_master()

        def dial(address: tuple[str, int]) -> Deferred[Any]:
            if address != self.master:
                if self.master is not None:
                    self.log.warn("Redis: Sentinel names {host}:{port} the master of {name!r} "
                                  "(was {old_host}:{old_port})", host=address[0], port=address[1],
                                  name=self.target.master_name, old_host=self.master[0],
                                  old_port=self.master[1])
                self.master = address
                for dialer in (self._command, self._subscriber):
                    if dialer is not None and dialer.protocol is not None and dialer.protocol.connected \
                            and dialer.address != address:
                        dialer.protocol.transport.loseConnection()
            factory.dialer.address = address
            connecting: Deferred[Any] = self._endpoint(address[0], address[1], self.target.tls).connect(factory)
            return connecting
        return d.addCallback(dial)

    def _discover_master(self) -> Deferred[tuple[str, int]]:
        """The master's address as the first sentinel that answers with a healthy one says."""
        conns = [s.conn for s in self._sentinels if s.conn is not None and s.conn.connected]
        name = self.target.master_name
        if not conns:
            return fail(NoMaster(string="no sentinel reachable"))
        result: Deferred[tuple[str, int]] = Deferred(lambda d: None)
        pending = [len(conns)]
        unhealthy: list[str] = []

        def answer(masters: Any) -> None:
            state = masters.get(name) if isinstance(masters, dict) else None
            if state is None:
                unhealthy.append(f"no master {name!r} known")
            elif not state["is_master"] or state["is_sdown"] or state["is_odown"]:
                unhealthy.append(f"master {state.get('ip')}:{state.get('port')} {state.get('flags')}")
            elif not result.called:
                result.callback((str(state["ip"]), int(state["port"])))

        def done(_: Any) -> None:
            pending[0] -= 1
            if pending[0] == 0 and not result.called:
                why = "; ".join(sorted(set(unhealthy))) or "no sentinel answered"
                result.errback(NoMaster(string=f"Sentinel: {why}"))

        for conn in conns:
            conn.sentinel_masters().addCallbacks(answer, lambda _: None).addBoth(done)
        return result

    def _refresh_password(self, factory: Any) -> None:
        """Read redis.password_file again before each attempt: a fixed (or rotated) password is
        picked up without a restart."""
        if self.config.password_file is None:
            return
        try:
            password = read_password(self.config.password_file)
        except OSError as e:
            error = f"redis.password_file: cannot read {self.config.password_file}: {e.strerror}"
            if error != self._target_error:
                self._target_error = error
                self.log.error("Redis: {error}", error=error)
            return
        self._target_error = None
        factory.password = password
        self.target = attrs.evolve(self.target, password=password)

    def _ping(self) -> None:
        for dialer in (self._command, self._subscriber):
            if dialer is not None and dialer.conn is not None and dialer.conn.connected:
                # A reply timeout aborts the connection (txredisapi), and the dialer redials.
                dialer.conn.execute_command("PING").addErrback(lambda _: None)

    # -- what the dialers report ----------------------------------------------------------------

    def _ready(self, dialer: _Dialer, conn: Any) -> None:
        if dialer.role == "sentinel":
            return
        if dialer.role == "subscriber":
            channels = list(self._channels)
            if not channels:
                self._subscribed(conn)
                return
            d = conn.subscribe(channels)
            d.addCallbacks(lambda _: self._subscribed(conn), self._subscribe_failed)
            return
        self.up = True
        metrics.REDIS_UP.set(1)
        where = self.target.description
        if self.master is not None:
            where += f" at {self.master[0]}:{self.master[1]}"
        if self._outage_logged and self._down_since is not None:
            self.log.info("Redis: connection to {target} restored after {seconds:.1f}s",
                          target=where, seconds=time.time() - self._down_since)
        else:
            self.log.info("Redis: connected to {target}", target=where)
        self._outage_logged = self._refusal_logged = False
        self._down_since = None
        self.last_error = None
        self._announce_up()

    def _subscribed(self, conn: Any) -> None:
        if self._subscriber is None or self._subscriber.conn is not conn:
            return
        self.subscribed = True
        if self.up:
            self._announce_up()  # a subscriber back after the commands: notices may be lost

    def _subscribe_failed(self, failure: Failure) -> None:
        if not failure.check(txredisapi.ConnectionError):
            self.log.warn("Redis: SUBSCRIBE failed: {error}", error=failure.getErrorMessage())

    def _announce_up(self) -> None:
        for callback in list(self._on_up):
            try:
                callback()
            except Exception:  # noqa: BLE001 - one subsystem's surprise must not stop the others
                self.log.failure("Redis: a reconnect handler failed")

    def _lost(self, dialer: _Dialer, why: str) -> None:
        if dialer.role == "subscriber":
            self.subscribed = False
            return
        if dialer.role != "command" or not self.up:
            return
        self.up = False
        metrics.REDIS_UP.set(0)
        self._down_since = time.time()
        self.last_error = why
        if not self.running:
            return
        self._enter_outage(f"connection lost: {why}")
        for callback in list(self._on_down):
            try:
                callback()
            except Exception:  # noqa: BLE001
                self.log.failure("Redis: a disconnect handler failed")

    def _attempt_failed(self, dialer: _Dialer, why: str, definitive: bool) -> None:
        """A connection attempt failed: remembered (the outage's log line says it); a refusal
        (AUTH, SELECT, the server's certificate) is logged at once, once an outage."""
        if dialer.role == "sentinel" or not self.running:
            return
        self.last_error = why
        if definitive:
            if not self._refusal_logged:
                self._refusal_logged = True
                if self._outage_logged:
                    self.log.error("Redis: {target} refused the gateway: {why}; still redialling",
                                   target=self.target.description, why=why)
                else:
                    self._enter_outage(f"refused: {why}")

    def _enter_outage(self, why: str) -> None:
        """Count the outage and log it: once, however long it lasts."""
        if self._outage_logged:
            return
        self._outage_logged = True
        metrics.REDIS_DISCONNECTS.inc()
        self.log.error("Redis: {target} unreachable ({why}); routing, certificates and limits "
                       "go on from the last known state while the gateway redials",
                       target=self.target.description, why=why)

    def first_check(self) -> None:
        """Log the outage once if Redis was not reached at start (called after a grace period)."""
        if self.running and not self.up and not self._outage_logged:
            self._enter_outage(f"not reached since start: {self.last_error or 'no answer'}")

    # -- what subsystems use ----------------------------------------------------------------------

    def on_up(self, callback: Callable[[], None]) -> None:
        """Call C{callback} each time the link comes up, and again each time the pub/sub
        connection is (re)subscribed while it is up: notices may have been missed."""
        self._on_up.append(callback)

    def on_down(self, callback: Callable[[], None]) -> None:
        """Call C{callback} each time the command connection is lost."""
        self._on_down.append(callback)

    def subscribe(self, channel: str, callback: Callable[[str], None]) -> None:
        """Call C{callback(message)} for each message on C{channel} (a full key: see L{key})."""
        new = channel not in self._channels
        self._channels.setdefault(channel, []).append(callback)
        conn = self._subscriber.conn if self._subscriber is not None else None
        if new and conn is not None and conn.connected:
            conn.subscribe([channel]).addErrback(self._subscribe_failed)

    def _message(self, channel: Any, message: Any) -> None:
        channel = channel.decode() if isinstance(channel, bytes) else channel
        text = message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)
        for callback in self._channels.get(channel, ()):
            try:
                callback(text)
            except Exception:  # noqa: BLE001 - the next message must still be delivered
                self.log.failure("Redis: handling a message on {channel} failed", channel=channel)

    def execute(self, *args: Any) -> Deferred[Any]:
        """
        Run one command.  Fails with L{RedisUnavailable} at once while the link is down (and
        when the connection is lost before the answer), with txredisapi's TimeoutError after
        redis.command_timeout (the connection is then dropped and redialled), and with
        L{RedisCommandError} when Redis answers an error.
        """
        conn = self._command.conn if self._command is not None else None
        if not self.up or conn is None or not conn.connected:
            metrics.REDIS_COMMAND_ERRORS.labels(kind="unavailable").inc()
            return fail(RedisUnavailable(f"no connection to Redis ({self.target.description})"))
        try:
            d: Deferred[Any] = conn.execute_command(*args)
        except (UnicodeError, TypeError, ValueError, txredisapi.InvalidData, txredisapi.ConnectionError) as e:
            # txredisapi encodes the command before it returns a Deferred: a value that is not
            # UTF-8 (a lone surrogate from a client's token, say) raises here.  A caller's
            # errback must see it (a raise would skip the bookkeeping after the call).
            metrics.REDIS_COMMAND_ERRORS.labels(kind="error").inc()
            return fail(RedisCommandError(f"command not sent: {type(e).__name__}: {e}"))
        return d.addCallbacks(self._check_reply, self._count_failure, errbackArgs=(conn,))

    def eval(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Deferred[Any]:
        """EVAL C{script} over C{keys} with C{args} (Redis keeps the compiled script cached)."""
        return self.execute("EVAL", script, len(keys), *keys, *args)

    def publish(self, channel: str, message: str) -> Deferred[Any]:
        return self.execute("PUBLISH", channel, message)

    @staticmethod
    def _check_reply(reply: Any) -> Any:
        if isinstance(reply, txredisapi.ResponseError):
            metrics.REDIS_COMMAND_ERRORS.labels(kind="error").inc()
            raise RedisCommandError(str(reply))
        return reply

    def _count_failure(self, failure: Failure, conn: Any) -> Failure:
        if failure.check(txredisapi.ResponseError):
            metrics.REDIS_COMMAND_ERRORS.labels(kind="error").inc()
            message = failure.getErrorMessage()
            if message.startswith("READONLY") and self.target.sentinels and conn.connected:
                # The master was demoted under us (Sentinel normally hangs up its clients
                # then): dial again, through Sentinel, to the new one.
                conn.transport.loseConnection()
            return Failure(RedisCommandError(message))
        if failure.check(txredisapi.TimeoutError):
            metrics.REDIS_COMMAND_ERRORS.labels(kind="timeout").inc()
        elif failure.check(txredisapi.ConnectionError):
            metrics.REDIS_COMMAND_ERRORS.labels(kind="unavailable").inc()
            return Failure(RedisUnavailable(failure.getErrorMessage()))
        return failure

    def readiness(self) -> dict[str, Any]:
        """What /readyz shows of the link: never a reason to be unready, only degraded."""
        out: dict[str, Any] = {"state": "up" if self.up else "down", "target": self.target.description,
                               "subscriber": "up" if self.subscribed else "down"}
        if self.master is not None:
            out["master"] = f"{self.master[0]}:{self.master[1]}"
        if not self.up:
            out["degraded"] = True
            if self._down_since is not None:
                out["down_for_seconds"] = round(time.time() - self._down_since, 1)
            if self.last_error:
                out["last_error"] = self.last_error
        return out


def decode(value: Any) -> str | None:
    """A Redis reply (bytes, with convertNumbers off) as text."""
    if value is None:
        return None
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


__all__ = ["RedisCommandError", "RedisLink", "RedisTarget", "RedisUnavailable", "decode",
           "target_from_config"]
