"""
The fleet's one link to Redis: a command connection and a pub/sub connection, kept up with
jittered exponential backoff by txredisapi, through a plain address (``redis.url``, optionally
TLS) or the master that Sentinel names (``redis.sentinels``), followed across a failover.

Everything built on it (the Redis directory, the ACME store and lock, the shared rate limits)
keeps working from its last known state while the link is down: L{RedisLink.execute} fails at
once with L{RedisUnavailable} instead of queueing, the outage is logged once (and its end once),
and C{gateway_redis_up} shows it.  Subsystems hear of the link coming (back) up through
L{RedisLink.on_up}, to resynchronise, and get their pub/sub messages through
L{RedisLink.subscribe}, whose channels are subscribed again on every new connection.

Redis Cluster is not supported: the fleet's keys (see docs/operations.md) are read together
by scripts and would need one hash slot, and txredisapi has no cluster client.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence
from urllib.parse import unquote, urlsplit

import attrs
import txredisapi
from twisted.application.service import Service
from twisted.internet import ssl
from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_gateway import metrics
from twisted_gateway.config import RedisConfig


class RedisUnavailable(Exception):
    """The command was not sent: there is no connection to Redis."""


class RedisCommandError(Exception):
    """Redis answered the command with an error (str(): Redis's message)."""


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
        return f.read().splitlines()[0] if os.path.getsize(path) else ""


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


def client_tls_options(target: RedisTarget) -> Any:
    """The TLS client options for a Redis server: its certificate must chain to C{tls_ca}
    (or to the system's roots) and name C{tls_server_name} (or the host)."""
    trust = None
    if target.tls_ca is not None:
        with open(target.tls_ca, "rb") as f:
            trust = ssl.trustRootFromCertificates(
                [ssl.Certificate.loadPEM(pem) for pem in _pem_blocks(f.read())])
    return ssl.optionsForClientTLS(target.tls_server_name or target.host, trustRoot=trust)


def _pem_blocks(data: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    return [block + marker for block in data.split(marker) if b"-----BEGIN CERTIFICATE-----" in block]


# -- txredisapi factories that tell the link when a connection comes and goes --------------------

class _Notifying:
    """Mixed into a txredisapi factory: its L{link} hears of every ready and lost connection."""

    link: RedisLink
    role: str
    # Redial after 1 s, then e-fold up to 5 s, with txredisapi's jitter (12%), so that a fleet
    # does not redial in step.
    initialDelay = 1.0
    maxDelay = 5.0

    def addConnection(self, conn: Any) -> None:
        super().addConnection(conn)  # type: ignore[misc]
        if conn in self.pool:  # type: ignore[attr-defined]  # (not added when it died at once)
            self.link._connection_ready(self.role, conn)

    def delConnection(self, conn: Any) -> None:
        super().delConnection(conn)  # type: ignore[misc]
        self.link._connection_lost(self.role, conn)

    def connectionError(self, why: str) -> None:
        # AUTH or SELECT refused: txredisapi stops redialling; the link says why and retries.
        self.link._refused(self.role, why)
        super().connectionError(why)  # type: ignore[misc]


class _Subscriber(txredisapi.SubscriberProtocol):  # type: ignore[misc]
    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.factory.link._message(channel, message)


class _CommandFactory(_Notifying, txredisapi.RedisFactory):  # type: ignore[misc]
    pass


class _SubscriberFactory(_Notifying, txredisapi.RedisFactory):  # type: ignore[misc]
    protocol = _Subscriber


class _SentinelSubscriber(txredisapi.SentinelRedisProtocol, _Subscriber):  # type: ignore[misc]
    pass


class _SentinelCommandFactory(_Notifying, txredisapi.SentinelConnectionFactory):  # type: ignore[misc]
    pass


class _SentinelSubscriberFactory(_Notifying, txredisapi.SentinelConnectionFactory):  # type: ignore[misc]
    protocol = _SentinelSubscriber


class RedisLink(Service):
    """
    A service: started, it dials Redis and keeps dialling; stopped, it hangs up.

    @ivar up: whether the command connection is up now.
    """

    log = Logger()
    name = "redis"

    def __init__(self, config: RedisConfig, reactor: Any, target: RedisTarget | None = None) -> None:
        self.config = config
        self.reactor = reactor
        self.target = target or target_from_config(config)
        self.prefix = config.key_prefix
        self.up = False
        self.subscribed = False
        self._down_since: float | None = time.time()
        self._outage_logged = False
        self._on_up: list[Callable[[], None]] = []
        self._on_down: list[Callable[[], None]] = []
        self._channels: dict[str, list[Callable[[str], None]]] = {}
        self._factories: list[Any] = []
        self._sentinel: Any = None
        self._command: Any = None
        self._retry: Any = None
        metrics.REDIS_UP.set(0)

    # -- names --------------------------------------------------------------------------------

    def key(self, *parts: str) -> str:
        """The fleet's key or channel made of C{parts}: ``<prefix>part:part``."""
        return self.prefix + ":".join(parts)

    # -- lifecycle ----------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.log.info("Redis: connecting to {target}", target=self.target.description)
        self._dial()

    def _kwargs(self) -> dict[str, Any]:
        return {"password": self.target.password, "username": self.target.username,
                "replyTimeout": self.config.command_timeout, "convertNumbers": False}

    def _dial(self) -> None:
        t = self.target
        if t.sentinels:
            if self._sentinel is None:
                self._sentinel = txredisapi.Sentinel(list(t.sentinels))
                self._sentinel.discovery_timeout = self.config.connect_timeout
            command = self._sentinel.master_for(
                t.master_name, factory_class=_SentinelCommandFactory, dbid=t.database, **self._kwargs())
            subscriber = self._sentinel.master_for(
                t.master_name, factory_class=_SentinelSubscriberFactory, dbid=None, **self._kwargs())
            factories = [command._factory, subscriber._factory]
            for factory, role in zip(factories, ("command", "subscriber")):
                self._adopt(factory, role)
        else:
            command_factory = _CommandFactory(None, t.database, 1, True, txredisapi.ConnectionHandler,
                                              **self._kwargs())
            subscriber_factory = _SubscriberFactory(None, None, 1, True, txredisapi.ConnectionHandler,
                                                    **self._kwargs())
            for factory, role in ((command_factory, "command"), (subscriber_factory, "subscriber")):
                self._adopt(factory, role)
                factory.startConnecting(self._endpoint())
            command = command_factory.handler
        self._command = command

    def _adopt(self, factory: Any, role: str) -> None:
        factory.link = self
        factory.role = role
        self._factories.append(factory)

    def _endpoint(self) -> Any:
        t = self.target
        endpoint: Any = HostnameEndpoint(self.reactor, t.host, t.port, timeout=self.config.connect_timeout)
        if t.tls:
            endpoint = wrapClientTLS(client_tls_options(t), endpoint)
        return endpoint

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        factories, self._factories = self._factories, []
        done = [f.disconnect() for f in factories]
        if self._sentinel is not None:
            done.append(self._sentinel.disconnect())
            self._sentinel = None
        d = gatherResults(done, consumeErrors=True)
        d.addErrback(lambda _: None)
        return d.addCallback(lambda _: None)

    # -- connection events (from the factories) ------------------------------------------------

    def _connection_ready(self, role: str, conn: Any) -> None:
        if role == "subscriber":
            channels = list(self._channels)
            if channels:
                d = conn.subscribe(channels)
                d.addErrback(lambda f: self.log.warn("Redis: SUBSCRIBE failed: {error}",
                                                     error=f.getErrorMessage()))
            self.subscribed = True
            if self.up:
                self._announce_up()  # a subscriber back after the commands: notices may be lost
            return
        self.up = True
        metrics.REDIS_UP.set(1)
        if self._outage_logged and self._down_since is not None:
            self.log.info("Redis: connection to {target} restored after {seconds:.1f}s",
                          target=self.target.description, seconds=time.time() - self._down_since)
        else:
            self.log.info("Redis: connected to {target}", target=self.target.description)
        self._outage_logged = False
        self._down_since = None
        self._announce_up()

    def _announce_up(self) -> None:
        for callback in list(self._on_up):
            try:
                callback()
            except Exception:  # noqa: BLE001 - one subsystem's surprise must not stop the others
                self.log.failure("Redis: a reconnect handler failed")

    def _connection_lost(self, role: str, conn: Any) -> None:
        if role == "subscriber":
            self.subscribed = False
            return
        if not self.up:
            return
        self.up = False
        metrics.REDIS_UP.set(0)
        self._down_since = time.time()
        self._note_outage("connection lost")
        for callback in list(self._on_down):
            callback()

    def _note_outage(self, why: str) -> None:
        metrics.REDIS_DISCONNECTS.inc()
        if not self._outage_logged:
            self._outage_logged = True
            self.log.error("Redis: {target} unreachable ({why}); routing, certificates and limits "
                           "go on from the last known state while the gateway redials",
                           target=self.target.description, why=why)

    def _refused(self, role: str, why: str) -> None:
        if self._outage_logged and not self.up:
            return
        self.up = False
        metrics.REDIS_UP.set(0)
        self._down_since = self._down_since or time.time()
        self._note_outage(why)
        # txredisapi stops redialling after a refused AUTH or SELECT; dial again later (the
        # password file may be fixed, or the ACL user created).
        if self.running and (self._retry is None or not self._retry.active()):
            self._retry = self.reactor.callLater(5.0, self._redial)

    def _redial(self) -> None:
        if not self.running or self.up:
            return
        for f in self._factories:
            f.disconnect()
        self._factories = []
        try:
            self.target = target_from_config(self.config)  # a fixed password file is read again
        except ValueError as e:
            self.log.error("Redis: {error}", error=str(e))
        self._dial()

    def first_check(self) -> None:
        """Log the outage once if Redis was not reached at start (called after a grace period)."""
        if not self.up and not self._outage_logged:
            self._note_outage("not reached since start")

    # -- what subsystems use ----------------------------------------------------------------------

    def on_up(self, callback: Callable[[], None]) -> None:
        """Call C{callback} each time the link comes up (and the subscriber connection with it)."""
        self._on_up.append(callback)

    def on_down(self, callback: Callable[[], None]) -> None:
        self._on_down.append(callback)

    def subscribe(self, channel: str, callback: Callable[[str], None]) -> None:
        """Call C{callback(message)} for each message on C{channel} (a full key: see L{key})."""
        self._channels.setdefault(channel, []).append(callback)
        for factory in self._factories:
            if factory.role == "subscriber":
                for conn in factory.pool:
                    conn.subscribe([channel])

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
        Run one command.  Fails with L{RedisUnavailable} at once while the link is down, with
        txredisapi's TimeoutError after redis.command_timeout, and with L{RedisCommandError}
        when Redis answers an error.
        """
        if not self.up or self._command is None:
            metrics.REDIS_COMMAND_ERRORS.labels(kind="unavailable").inc()
            return fail(RedisUnavailable(f"no connection to Redis ({self.target.description})"))
        d: Deferred[Any] = self._command.execute_command(*args)
        return d.addCallbacks(self._check_reply, self._count_failure)

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

    @staticmethod
    def _count_failure(failure: Failure) -> Failure:
        if failure.check(txredisapi.ResponseError):
            metrics.REDIS_COMMAND_ERRORS.labels(kind="error").inc()
            return Failure(RedisCommandError(failure.getErrorMessage()))
        if failure.check(txredisapi.TimeoutError):
            metrics.REDIS_COMMAND_ERRORS.labels(kind="timeout").inc()
        elif failure.check(txredisapi.ConnectionError):
            metrics.REDIS_COMMAND_ERRORS.labels(kind="unavailable").inc()
            return Failure(RedisUnavailable(failure.getErrorMessage()))
        return failure

    def readiness(self) -> dict[str, Any]:
        """What /readyz shows of the link: never a reason to be unready, only degraded."""
        out: dict[str, Any] = {"state": "up" if self.up else "down", "target": self.target.description}
        if not self.up:
            out["degraded"] = True
            if self._down_since is not None:
                out["down_for_seconds"] = round(time.time() - self._down_since, 1)
        return out


def decode(value: Any) -> str | None:
    """A Redis reply (bytes, with convertNumbers off) as text."""
    if value is None:
        return None
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


__all__ = ["RedisCommandError", "RedisLink", "RedisTarget", "RedisUnavailable", "decode",
           "target_from_config"]
