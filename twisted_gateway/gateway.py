"""
Wiring: one L{Gateway} holds the configuration, the directory, the certificate contexts and the
listeners, and builds the service tree that twistd runs.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred

from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from twisted_gateway import logs, metrics
from twisted_gateway._compat import exit_signal, forget_exit_signal, lean_dispatch
from twisted_gateway.config import ConfigError, load_config
from twisted_gateway.http.auth import verifier_from_config
from twisted_gateway.limits import Admission, parse_networks
from twisted_gateway.admin import AdminApp
from twisted_gateway.config import GatewayConfig
from twisted_gateway.directory.file import FileDirectoryProvider
from twisted_gateway.directory.interfaces import ShardDirectory
from twisted_gateway.frontdoor import ConnectionTracker, FrontDoorFactory
from twisted_gateway.http.auth import TokenVerifier
from twisted_gateway.http.context import HTTPRouteContext
from twisted_gateway.http.api import GatewayAPI, api_site, openapi_document
from twisted_gateway.http.errors import quiet_site
from twisted_gateway.runtime import build_runtime
from twisted_gateway.tls.contexts import ContextCache, LocalCASource, StaticFileSource, load_client_ca
from twisted_gateway.directory.model import Route
from twisted_gateway.names import GatewayHost, ShardName, parse_name
from twisted_gateway.tls.acme.responders import HTTP01Responder, TLSALPN01Responder
from twisted_gateway.tls.acme.shared import ChallengeBoard
from twisted_gateway.tls.files import ensure_private_dir
from twisted_gateway.tls.localca import LocalCA
from twisted_gateway.udp.service import DatagramService, runs_here
from twisted_gateway.workers import worker_index

if TYPE_CHECKING:
    from twisted_gateway.directory.redis import RedisDirectoryProvider
    from twisted_gateway.fleet.redis import RedisLink
    from twisted_gateway.cloud.reports import ReportService
    from twisted_gateway.cloud.sync import SyncProvider, SyncSettings
    from twisted_gateway.cloud.token import CloudIdentity, Credentials
    from twisted_gateway.tls.acme.manager import AcmeCertificateSource


class ListenerService(Service):
    """Listen on an endpoint description in privilegedStartService; record the bound address."""

    log = Logger()

    def __init__(self, name: str, reactor: Any, description: str, factory: Any,
                 announce: bool = True) -> None:
        self.setName(name)
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.announce = announce
        self.port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        endpoint = serverFromString(self.reactor, self.description)
        results: list[Any] = []
        endpoint.listen(self.factory).addBoth(results.append)
        if not results:
            raise RuntimeError(f"{self.name} listener {self.description} did not bind synchronously")
        if not hasattr(results[0], "getHost"):
            message = f"gateway: cannot listen for {self.name} on {self.description}: " \
                      f"{results[0].getErrorMessage()}"
            sys.stderr.write(message + "\n")
            raise SystemExit(1)
        self.port = results[0]
        if not self.announce:
            return  # a worker's: the supervisor announced the shared socket; the other is private
        host = self.port.getHost()
        if hasattr(host, "port"):
            self.log.info("{listener} listener on {host}:{port}", listener=self.name,
                          host=host.host, port=host.port, event_kind="listening")
        else:  # a UNIX socket
            path = host.name.decode() if isinstance(host.name, bytes) else str(host.name)
            self.log.info("{listener} listener on unix:{path}", listener=self.name, path=path,
                          event_kind="listening")

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


def install_stop_handler(reactor: Any) -> None:
    """
    SIGTERM stops the reactor (and so drains) once; a second SIGTERM while draining, as sent
    both by systemd to the whole control group and by a supervisor to its workers, is ignored
    instead of making Twisted try to stop a reactor that is already stopping.
    """
    state = {"stopping": False}

    def stop() -> None:
        Logger().info("SIGTERM: stopping")
        reactor.stop()

    def handler(signum: int, frame: Any) -> None:
        if state["stopping"]:
            return
        state["stopping"] = True
        reactor.callFromThread(stop)
    signal.signal(signal.SIGTERM, handler)


def exit_cleanly_after_drain(reactor: Any) -> None:
    """A SIGTERM that ends in a completed drain is a clean stop: exit 0 rather than let twistd
    re-raise the signal against itself (which exits with -15)."""
    if exit_signal(reactor) == getattr(signal, "SIGTERM", None):
        forget_exit_signal(reactor)


def release_startup_memory() -> None:
    """
    Start-up (imports, configuration, certificates) leaves freed memory in the C heap; collect
    garbage and hand the free pages back to the system (glibc's malloc_trim), so an idle worker
    holds only what it uses; then freeze what is left (L{gc.freeze}).
    """
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc (musl has no malloc_trim)
    # What start-up built (modules, configuration, contexts) lives as long as the process:
    # moved out of the collector's generations, so its passes no longer walk it (about 8 % of
    # the CPU per request on an HTTP route, measured, docs/performance.md).
    gc.freeze()


class GatewayService(logs.LoggingRoot):
    """
    The root service.  When parented to a twistd Application it installs the log observer; on
    start it installs the SIGHUP handler; on stop it drains open connections before the rest of
    the services stop.
    """

    def __init__(self, observer: Any, gateway: Gateway) -> None:
        super().__init__(observer)
        self.gateway = gateway

    def startService(self) -> None:
        super().startService()
        self.gateway.started()
        reactor = self.gateway.reactor
        if hasattr(signal, "SIGHUP"):  # POSIX only; on Windows reload by restarting the service
            signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(self.gateway.reload))
        # After the reactor has installed its own handlers, which would replace ours.
        reactor.callWhenRunning(install_stop_handler, reactor)
        reactor.callWhenRunning(release_startup_memory)
        # I/O events straight to their handlers, without twisted.python.log's context around
        # each one (the epoll reactor only; docs/performance.md has what it saves).
        lean_dispatch(reactor)

    def stopService(self) -> Any:
        d = self.gateway.drain()

        def drained(_: Any) -> Any:
            exit_cleanly_after_drain(self.gateway.reactor)
            return MultiService.stopService(self)
        d.addCallback(drained)
        return d



_REDIS_CONNECTION = ("url", "password_file", "tls_ca", "tls_server_name", "sentinels", "master_name",
                     "key_prefix", "connect_timeout", "command_timeout", "acme", "acme_key_file",
                     "acme_lock_ttl")


def _redis_connection(config: GatewayConfig) -> dict[str, Any]:
    """The redis keys the running link and the ACME store built on it keep until a restart;
    a reload changes check_interval and limits (and warns about directory, whose provider was
    chosen at start)."""
    return {key: getattr(config.redis, key) for key in _REDIS_CONNECTION}


class Gateway:
    log = Logger()

    def __init__(self, config: GatewayConfig, reactor: Any = None,
                 verifier: TokenVerifier | None = None,
                 reload_from: tuple[str | None, dict[str, Any]] | None = None,
                 cloud: Credentials | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.config = config
        self.reactor = reactor
        self.hostname = config.hostname
        self.directory = ShardDirectory()
        self.services: list[Service] = []
        self.reload_from = reload_from
        self.tracker = ConnectionTracker()
        self.static_source: StaticFileSource | None = None
        self.directory_provider: FileDirectoryProvider | None = None
        self.redis_directory: RedisDirectoryProvider | None = None
        ensure_private_dir(config.state_dir)
        # The fleet's link to Redis, when one is configured: the directory, the ACME store and
        # lock and the shared rate limits are built on it below.
        self.redis: RedisLink | None = None
        if config.redis.enabled:
            # Imported here: a gateway without Redis never loads the fleet's modules or
            # txredisapi (5 MiB of a worker's memory, measured).
            from twisted_gateway.fleet.redis import RedisLink
            self.redis = RedisLink(config.redis, reactor)
            self.services.append(self.redis)
            reactor.callLater(config.redis.connect_timeout + 1, self.redis.first_check)
        client_ca = load_client_ca(config.tcp.client_ca) if config.tcp.client_ca else None
        self.local_ca: LocalCA | None = None
        source: Any
        if config.tls.certificate is not None:
            assert config.tls.private_key is not None
            source = StaticFileSource(config.tls.certificate, config.tls.private_key,
                                      config.tls.reload_interval)
            self.static_source = source
            self.services.append(source)
        else:
            self.local_ca = LocalCA(config.state_dir)
            source = LocalCASource(self.local_ca, self.hostname)
        # With ACME on, challenge answers are also written to the state directory, so any
        # worker process (and the supervisor's plain port) can answer the CA's validation.
        board: Any = ChallengeBoard(config.state_dir) if config.acme.enabled else None
        if board is not None and self.redis is not None and config.redis.acme:
            # A fleet: answers are also published in Redis, so whichever gateway the CA reaches
            # answers (tls/acme/redis_store.py).
            from twisted_gateway.tls.acme.redis_store import RedisChallengeBoard
            board = RedisChallengeBoard(board, self.redis, reactor)
        self.http01 = HTTP01Responder(board)
        self.tls_alpn = TLSALPN01Responder(board)
        self.acme: AcmeCertificateSource | None = None
        if config.acme.enabled:
            self.acme = self._make_acme(source)
            self.services.append(self.acme)
            source = self.acme
        self.contexts = ContextCache(source, client_ca=client_ca)
        self.api = GatewayAPI(self.directory, verifier, self.hostname, config.api.cors_allowed_origin,
                              lambda: openapi_document(self.hostname))
        self.api_site = api_site(self.api, config.limits.api_max_body_bytes)
        self.runtime = build_runtime(config, reactor, directory=self.directory, contexts=self.contexts,
                                     verifier=verifier, api_site=self.api_site, tls_alpn=self.tls_alpn,
                                     acme=self.acme, redis=self.redis)
        self.tls_factory = FrontDoorFactory(self.runtime, self.tracker)
        self._make_cloud(cloud)
        if config.directory.file is not None:
            self.directory_provider = FileDirectoryProvider(
                config.directory.file, self.directory, config.directory.poll_interval)
            self.services.append(self.directory_provider)
        elif self.cloud_sync is not None and self.cloud_sync.directory is not None:
            pass  # the control plane's directory (/sync), added by _make_cloud
        elif self.redis is not None and config.redis.directory:
            from twisted_gateway.directory.redis import RedisDirectoryProvider
            self.redis_directory = RedisDirectoryProvider(
                self.redis, self.directory, os.path.join(config.state_dir, "directory-cache.json"),
                config.redis.check_interval, clock=reactor)
            self.services.append(self.redis_directory)
        else:
            from twisted_gateway.demo import DemoService
            self.services.append(DemoService(reactor, self.directory, self.hostname))
        # A supervised worker's listeners are the supervisor's socket and a private admin socket:
        # the supervisor announces what clients use.
        announce = worker_index() is None
        metrics.configure_routes(config.metrics.per_route, config.metrics.max_routes)
        self.tls_listener = ListenerService("tls", reactor, config.listen.tls, self.tls_factory,
                                            announce=announce)
        # The operator's view: the admin API and the dashboard (twisted_gateway/dashboard).  A
        # worker's admin socket is private to the supervisor (mode 0600), which checks the token.
        from twisted_gateway.dashboard.access import load_access
        from twisted_gateway.dashboard.views import LocalViews
        self.tracker.keep_refusals(config.admin.refusals_kept)
        self.admin_views = LocalViews(
            self.directory, self.hostname, self.tracker, [source],
            [p for p in (self.directory_provider, self.redis_directory, self.cloud_sync) if p is not None],
            index=worker_index())
        self.admin = AdminApp(self.readiness, self.http01, views=self.admin_views,
                              access=load_access(config.admin.token_file) if announce else None,
                              protect_metrics=config.admin.protect_metrics)
        self.plain_listener = ListenerService("plain", reactor, config.listen.plain,
                                              quiet_site(self.admin.resource()), announce=announce)
        self.verifier = verifier
        if verifier is not None and verifier.jwks is not None:
            self.services.append(verifier.jwks)
        self.services += [self.tls_listener, self.plain_listener]
        # UDP routes and QUIC: in a single process, or in worker 0 of several (udp/service.py).
        self.datagram = DatagramService(config, reactor, self.directory, self.tls_listener)
        if runs_here(worker_index()):
            self.services.append(self.datagram)

    def _make_cloud(self, credentials: Credentials | None) -> None:
        """The hybrid link (docs/cloud.md): the cloud token, /sync (the directory when no
        directory file is set, and the settings the control plane owns), /reports."""
        self.cloud_identity: CloudIdentity | None = None
        self.cloud_sync: SyncProvider | None = None
        self.cloud_reports: ReportService | None = None
        self.cloud_settings: SyncSettings | None = None
        self.file_config = self.config  # the configuration without the control plane's settings
        cloud = self.config.cloud
        if not cloud.enabled:
            return
        from twisted_gateway.cloud.reports import ReportService
        from twisted_gateway.cloud.sync import SyncProvider
        from twisted_gateway.cloud.token import CloudIdentity, load_credentials
        if credentials is None:
            credentials = load_credentials(cloud, self.config.source, self.config.state_dir)
        self.cloud_identity = CloudIdentity(credentials, cloud, self.config.source, self.config.state_dir,
                                            clock=self.reactor)
        self.services.append(self.cloud_identity)
        takes_directory = self.config.directory.file is None and cloud.directory
        if takes_directory or cloud.settings:
            self.cloud_sync = SyncProvider(
                self.cloud_identity, self.directory if takes_directory else None, cloud,
                self.config.state_dir, self.reactor,
                on_settings=self._apply_cloud_settings if cloud.settings else None)
            self.services.append(self.cloud_sync)
        if cloud.reports:
            self.cloud_reports = ReportService(self.cloud_identity, cloud, self.config.state_dir,
                                               self.reactor, worker=worker_index())
            self.services.append(self.cloud_reports)

    def _apply_cloud_settings(self, settings: SyncSettings, version: int) -> None:
        """A /sync version's settings over the file's configuration, applied as a reload is;
        raise ConfigError (or ValueError) to refuse the version."""
        from twisted_gateway.cloud.sync import SyncSettings, overlay, settings_verifier
        if settings == (self.cloud_settings or SyncSettings()):
            return
        new = overlay(self.file_config, settings)
        verifier = settings_verifier(settings, new.auth, version) if settings.owns_keys else \
            verifier_from_config(new.auth, new.source, self.reactor)
        Admission(new.limits, new.proxy_protocol, self.reactor.seconds)
        self.cloud_settings = settings
        self._apply(new, verifier)

    def _make_acme(self, fallback: Any) -> Any:
        # Imported here: certbot's acme library (and requests) cost memory nobody without ACME needs.
        from twisted_gateway.tls.acme.challenges import ExecResponder, RFC2136Responder
        from twisted_gateway.tls.acme.client import AcmeIssuer
        from twisted_gateway.tls.acme.manager import AcmeCertificateSource
        from twisted_gateway.tls.acme.shared import IssuerLock
        from twisted_gateway.tls.acme.store import DiskCertificateStore
        acme = self.config.acme
        store: Any
        lock: Any
        if self.redis is not None and self.config.redis.acme:
            # A fleet: certificates in Redis (keys encrypted, a local copy on disk), one order
            # per name for the fleet under a per-name lock.
            from twisted_gateway.tls.acme.redis_store import RedisCertificateStore, RedisIssuanceLock
            store = RedisCertificateStore(self.redis, self.reactor, self.config.state_dir,
                                          self.config.redis.acme_key_file)
            lock = RedisIssuanceLock(self.redis, self.reactor, ttl=self.config.redis.acme_lock_ttl)
        else:
            store = DiskCertificateStore(self.config.state_dir)
            lock = IssuerLock(self.config.state_dir)
        responders: dict[str, Any] = {"http-01": self.http01, "tls-alpn-01": self.tls_alpn}
        if acme.dns_provider == "exec" and acme.dns_exec:
            responders["dns-01"] = ExecResponder(acme.dns_exec, acme.dns_propagation_timeout)
        elif acme.dns_zone:
            host, _, port = acme.dns_server.rpartition(":")
            responders["dns-01"] = RFC2136Responder(
                host.strip("[]"), int(port), acme.dns_zone, acme.tsig_name, acme.tsig_secret,
                acme.tsig_algorithm, propagation_timeout=acme.dns_propagation_timeout)
        issuer = AcmeIssuer(acme.ca_server, acme.email, acme.key_type, acme.ca_bundle, store, responders)
        return AcmeCertificateSource(self.reactor, issuer, store, fallback, acme, self.hostname,
                                     self.name_is_routable, lock=lock,
                                     board=self.http01.board)

    def name_is_routable(self, name: str) -> bool:
        """Whether C{name} is the gateway's or resolves to a shard: the on-demand policy."""
        parsed = parse_name(name, self.hostname)
        if isinstance(parsed, GatewayHost):
            return True
        if isinstance(parsed, ShardName):
            return isinstance(self.directory.current().resolve(parsed.candidates), Route)
        return False

    @property
    def http(self) -> HTTPRouteContext:
        """The HTTP route settings in force (those of the current Runtime)."""
        return self.runtime.http

    @property
    def connections(self) -> set[Any]:
        return self.tracker.connections

    @property
    def draining(self) -> bool:
        return self.tracker.draining

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        reasons = []
        if self.draining:
            reasons.append("draining")
        if self.tls_listener.port is None:
            reasons.append("TLS listener not bound")
        if not self.directory.loaded():
            reasons.append("shard directory not loaded")
        if self.verifier is not None and self.verifier.jwks is not None and not self.verifier.jwks.loaded:
            reasons.append("JWKS keys not loaded")
        detail: dict[str, Any] = {"reasons": reasons, "shards": len(self.directory.current())}
        if self.redis_directory is not None:
            detail["directory_version"] = self.redis_directory.version
        if self.cloud_identity is not None:
            # Degraded, not unready: the last good state serves while the control plane is away.
            detail["cloud"] = {"token": self.cloud_identity.readiness()}
            degraded = detail["cloud"]["token"]["state"] != "ok"
            if self.cloud_sync is not None:
                detail["cloud"]["sync"] = self.cloud_sync.readiness()
                degraded = degraded or self.cloud_sync.state != "up"
            if self.cloud_reports is not None:
                detail["cloud"]["reports"] = self.cloud_reports.readiness()
            if degraded:
                detail["degraded"] = sorted(set(detail.get("degraded", [])) | {"cloud"})
        if self.acme is not None:
            # Reported, not fatal: the fallback certificate still serves those names.
            detail["certificates"] = self.acme.problems()
        if self.redis is not None:
            # Degraded, not unready: everything goes on from the last known state.
            detail["redis"] = self.redis.readiness()
            if not self.redis.up:
                detail["degraded"] = sorted(set(detail.get("degraded", [])) | {"redis"})
        return (not reasons, detail)

    def service(self) -> GatewayService:
        self.observer = logs.make_observer(self.config.log.format, self.config.log.level,
                                           worker=worker_index())
        root = GatewayService(self.observer, self)
        self.root = root
        for s in self.services:
            s.setServiceParent(root)
        return root

    # -- lifecycle ------------------------------------------------------------------------------

    def drain(self) -> Deferred[None]:
        """
        Stop accepting, let open connections finish for up to limits.drain_timeout seconds
        (HTTP keep-alive ends after the request in progress), then close what is left.
        /readyz answers 503 from the first moment.
        """
        self.tracker.draining = True
        deadline = self.reactor.seconds() + self.config.limits.drain_timeout
        count = len(self.connections)
        self.log.info("draining: stopped accepting, {count} connections open, waiting up to "
                      "{seconds:.0f}s", count=count, seconds=self.config.limits.drain_timeout)
        stopping = self.tls_listener.stopService()
        for conn in list(self.connections):
            conn.drain()
        done: Deferred[None] = Deferred()

        def check() -> None:
            if not self.connections:
                self.log.info("drained: all connections finished")
                done.callback(None)
                return
            if self.reactor.seconds() >= deadline:
                self.log.warn("drain deadline passed: closing {count} connections",
                              count=len(self.connections))
                for conn in list(self.connections):
                    conn.transport.abortConnection()
                done.callback(None)
                return
            for conn in list(self.connections):
                conn.drain()
            self.reactor.callLater(0.05, check)
        if isinstance(stopping, Deferred):
            stopping.addBoth(lambda _: check())
        else:
            check()
        return done

    def reload(self) -> None:
        """SIGHUP: re-read the configuration, the directory and the certificates."""
        self.log.info("SIGHUP: reloading")
        if self.reload_from is not None:
            path, overrides = self.reload_from
            try:
                new = load_config(path, overrides)
                verifier = verifier_from_config(new.auth, new.source, self.reactor)
                Admission(new.limits, new.proxy_protocol, self.reactor.seconds)
                file_config = new
                if self.cloud_settings is not None:  # the control plane's settings stay on top
                    from twisted_gateway.cloud.sync import overlay, settings_verifier
                    new = overlay(new, self.cloud_settings)
                    if self.cloud_settings.owns_keys:
                        applied = self.cloud_sync.applied if self.cloud_sync is not None else None
                        verifier = settings_verifier(self.cloud_settings, new.auth,
                                                     applied.version if applied is not None else 0)
                    Admission(new.limits, new.proxy_protocol, self.reactor.seconds)
            except (ConfigError, ValueError) as e:
                self.log.error("reload refused, the running configuration stays: {error}", error=str(e))
                metrics.CONFIG_RELOADS.labels(outcome="failure").inc()
                return
            self.file_config = file_config
            self._apply(new, verifier)
        if self.cloud_identity is not None:
            self.cloud_identity.reload(self.config.cloud, self.config.source)
            if self.cloud_sync is not None:
                self.cloud_sync.set_config(self.config.cloud)
                self.cloud_sync.poll_now()
            if self.cloud_reports is not None:
                self.cloud_reports.set_config(self.config.cloud)
        if self.directory_provider is not None:
            self.directory_provider.check(force=True)
        if self.redis_directory is not None:
            self.redis_directory.resync("check")
        if self.static_source is not None:
            self.static_source.reload()
        metrics.CONFIG_RELOADS.labels(outcome="success").inc()

    def _apply(self, new: GatewayConfig, verifier: TokenVerifier | None) -> None:
        old = self.config
        restart_only = [key for key, a, b in (
            ("listen.tls", old.listen.tls, new.listen.tls),
            ("listen.plain", old.listen.plain, new.listen.plain),
            ("hostname", old.hostname, new.hostname),
            ("state_dir", old.state_dir, new.state_dir),
            ("acme", old.acme, new.acme),
            ("tcp.client_ca", old.tcp.client_ca, new.tcp.client_ca),
            ("log.format", old.log.format, new.log.format),
            ("redis (its connection)", _redis_connection(old), _redis_connection(new)),
            ("admin", old.admin, new.admin),
        ) if a != b]
        if restart_only:
            self.log.warn("reload: {keys} changed and take effect only after a restart",
                          keys=", ".join(restart_only))
            # Keep the running values of those keys.
            new = attrs.evolve(new, listen=old.listen, hostname=old.hostname, state_dir=old.state_dir,
                               acme=old.acme, tcp=attrs.evolve(new.tcp, client_ca=old.tcp.client_ca),
                               log=attrs.evolve(new.log, format=old.log.format),
                               redis=attrs.evolve(new.redis, **_redis_connection(old)), admin=old.admin)
        self.config = new
        if self.directory_provider is not None and new.directory.file is not None:
            self.directory_provider.path = new.directory.file
            self.directory_provider.set_interval(new.directory.poll_interval)
        if self.redis_directory is not None:
            self.redis_directory.set_interval(new.redis.check_interval)
        if (new.directory.file is None) != (old.directory.file is None) or \
                new.redis.enabled != old.redis.enabled or new.redis.directory != old.redis.directory:
            self.log.warn("reload: the directory's source (directory.file, redis.directory) changed "
                          "and takes effect only after a restart")
        if self.static_source is not None and new.tls.certificate and new.tls.private_key:
            self.static_source.cert_path = new.tls.certificate
            self.static_source.key_path = new.tls.private_key
            self.static_source.set_interval(new.tls.reload_interval)
        self._replace_key_fetcher(verifier)
        self.verifier = verifier
        self.api.verifier = verifier
        self.api.cors_origin = new.api.cors_allowed_origin
        self.api_site.max_body_bytes = new.limits.api_max_body_bytes
        # The one reference new connections read; open ones keep the Runtime they started with.
        self.runtime = build_runtime(new, self.reactor, directory=self.directory, contexts=self.contexts,
                                     verifier=verifier, api_site=self.api_site, tls_alpn=self.tls_alpn,
                                     acme=self.acme, previous=self.runtime,
                                     redis=self.redis)
        self.tls_factory.runtime = self.runtime
        self.datagram.reconfigure(new)
        metrics.configure_routes(new.metrics.per_route, new.metrics.max_routes)
        logs.set_level(self.observer, new.log.level)
        self.log.info("configuration reloaded from {source}", source=new.source)

    def _replace_key_fetcher(self, verifier: TokenVerifier | None) -> None:
        """
        A reload's new verifier brings its own JWKS fetcher: start it in the service tree and
        stop the old one.  The new fetcher starts with the keys already fetched, which stay in
        force until its first answer replaces them (so /readyz stays 200 and tokens keep
        working across the change); the same URL and interval keeps the running fetcher itself.
        """
        old = self.verifier.jwks if self.verifier is not None else None
        new = verifier.jwks if verifier is not None else None
        if old is not None and new is not None:
            if old.url == new.url and old.refresh == new.refresh:
                assert verifier is not None
                verifier.jwks = old
                return
            new.keys, new.loaded = dict(old.keys), old.loaded
        if old is not None and old.parent is not None:
            old.disownServiceParent()
        if new is not None and getattr(self, "root", None) is not None:
            new.setServiceParent(self.root)

    def started(self) -> None:
        if self.local_ca is not None and worker_index() is None:  # else the supervisor said it
            self.log.info("local development CA: {path} (curl --cacert {path})",
                          path=os.path.abspath(self.local_ca.cert_path))
