"""
``--workers N``: a supervisor that owns the listening TLS socket, runs N gateway worker
processes that all accept on it, restarts a worker that dies, serves one admin endpoint whose
``/metrics`` adds up every worker's series, and drains them all on SIGTERM.

Each worker is an ordinary ``twistd -n gateway`` given the socket the way systemd would
(``LISTEN_FDS``, ``systemd:domain=...:name=tls``) and a private admin socket (a UNIX socket in
the state directory) that only the supervisor reads.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.endpoints import UNIXClientEndpoint, serverFromString
from twisted.internet.protocol import Factory, Protocol, ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.client import Agent, readBody
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from twisted_gateway import logs
from twisted_gateway.admin import answer_http01
from twisted_gateway.reactors import reactor_args
from twisted_gateway.config import GatewayConfig
from twisted_gateway.tls.files import ensure_private_dir

_TIMESTAMP_SUFFIXES = ("_timestamp_seconds", "_success", "_created")


def merge_metrics(texts: list[str]) -> str:
    """Add up Prometheus text expositions of several workers (counters, gauges and histogram
    buckets add; timestamps and success flags take the worst/most recent value)."""
    from prometheus_client.parser import text_string_to_metric_families
    families: dict[str, Any] = {}
    order: list[str] = []
    values: dict[tuple[str, tuple], float] = {}
    sample_order: dict[str, list[tuple[str, tuple]]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                families[family.name] = family
                order.append(family.name)
                sample_order[family.name] = []
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in values:
                    sample_order[family.name].append(key)
                    values[key] = sample.value
                elif sample.name.endswith(("_timestamp_seconds", "_created")):
                    values[key] = max(values[key], sample.value)
                elif sample.name.endswith("_success"):
                    values[key] = min(values[key], sample.value)
                else:
                    values[key] += sample.value
    lines = []
    for name in order:
        family = families[name]
        lines.append(f"# HELP {name} {family.documentation}")
        lines.append(f"# TYPE {name} {family.type}")
        for sample_name, labels in sample_order[name]:
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(f"{sample_name}{{{label_text}}} {values[(sample_name, labels)]!r}"
                         if labels else f"{sample_name} {values[(sample_name, labels)]!r}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


@implementer(IAgentEndpointFactory)
class _UnixEndpoints:
    def __init__(self, reactor: Any, paths: dict[bytes, str]) -> None:
        self.reactor = reactor
        self.paths = paths

    def endpointForURI(self, uri: Any) -> Any:
        return UNIXClientEndpoint(self.reactor, self.paths[uri.host], timeout=5)


class _Worker(ProcessProtocol):
    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.ended: Deferred = Deferred()

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value)
        self.supervisor.worker_ended(self, reason.value)


class Supervisor(Service):
    log = Logger()

    def __init__(self, config: GatewayConfig, argv: list[str], count: int, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.config = config
        self.argv = argv
        self.count = count
        self.reactor = reactor
        self.workers: dict[int, _Worker] = {}
        self.stopping = False
        self.restarts = 0
        self.run_dir = os.path.join(config.state_dir, "workers")
        self.tls_port: Any = None

    def admin_socket(self, index: int) -> str:
        return os.path.join(self.run_dir, f"worker-{index}.sock")

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        ensure_private_dir(self.run_dir)
        results: list[Any] = []
        serverFromString(self.reactor, self.config.listen.tls).listen(Factory.forProtocol(Protocol)).addBoth(results.append)
        if not results or not hasattr(results[0], "getHost"):
            error = results[0].getErrorMessage() if results else "did not bind"
            sys.stderr.write(f"gateway: cannot listen for tls on {self.config.listen.tls}: {error}\n")
            raise SystemExit(1)
        self.tls_port = results[0]
        self.tls_port.stopReading()  # the workers accept; the supervisor only holds the socket
        host = self.tls_port.getHost()
        self.family = "INET6" if self.tls_port.socket.family == socket.AF_INET6 else "INET"
        self.log.info("tls listener on {host}:{port}", listener="tls", host=host.host, port=host.port,
                      event_kind="listening")

    def startService(self) -> None:
        if self.tls_port is None:
            self.privilegedStartService()
        super().startService()
        for index in range(self.count):
            self.spawn(index)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))
        from twisted_gateway.gateway import install_stop_handler
        self.reactor.callWhenRunning(install_stop_handler, self.reactor)
        self.reactor.callWhenRunning(self._watch_children)

    def _watch_children(self) -> None:
        """
        On the asyncio reactor the event loop owns the signal wake-up descriptor (uvloop sets
        its own), so Twisted's SIGCHLD handler may never run and a worker's exit would go
        unnoticed: look for exited workers twice a second as well (a non-blocking waitpid per
        worker).
        """
        if getattr(self.reactor, "_asyncioEventloop", None) is not None:
            from twisted.internet.process import reapAllProcesses
            self._reaper = LoopingCall(reapAllProcesses)
            self._reaper.clock = self.reactor
            self._reaper.start(0.5, now=False)

    def reload(self) -> None:
        """SIGHUP: every worker re-reads its configuration, directory and certificates."""
        for w in list(self.workers.values()):
            try:
                w.transport.signalProcess("HUP")
            except Exception:  # noqa: BLE001 - a worker that just exited
                pass

    def spawn(self, index: int) -> None:
        sock_path = self.admin_socket(index)
        if os.path.exists(sock_path):
            os.unlink(sock_path)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        args = [twistd, "-n", "--pidfile=", *reactor_args(self.reactor), "gateway", *self.argv,
                "--workers", "1",
                "--tls-port", f"systemd:domain={self.family}:name=tls",
                "--plain-port", f"unix:{sock_path}:mode=600"]
        env = dict(os.environ, LISTEN_FDS="1", LISTEN_FDNAMES="tls")
        # LISTEN_PID must be the worker's own pid: a shell sets it and execs twistd in place.
        command = ["/bin/sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", *args]
        worker = _Worker(self, index)
        self.reactor.spawnProcess(worker, command[0], command, env=env,
                                  childFDs={0: "w", 1: 1, 2: 2, 3: self.tls_port.fileno()})
        self.workers[index] = worker
        self.log.info("worker {index} started (pid {pid})", index=index, pid=worker.transport.pid)

    def worker_ended(self, worker: _Worker, reason: Any) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self.stopping:
            return
        self.restarts += 1
        self.log.error("worker {index} exited ({reason}); restarting", index=worker.index,
                       reason=getattr(reason, "exitCode", reason))
        self.reactor.callLater(0.5, self._respawn, worker.index)

    def _respawn(self, index: int) -> None:
        if not self.stopping and index not in self.workers:
            self.spawn(index)

    def stopService(self) -> Any:
        self.stopping = True
        super().stopService()
        if self.tls_port is not None:
            # Close our copy: once the workers close theirs, new connections are refused.
            # Close, never shut down: shutdown() acts on the socket every worker shares and
            # would stop it listening under workers still accepting (their accept() then
            # fails with EINVAL). Twisted skips it for adopted sockets; this one is ours.
            self.tls_port._shouldShutdown = False
            self.tls_port.stopListening()
        waits = [w.ended for w in self.workers.values()]
        for w in list(self.workers.values()):
            try:
                w.transport.signalProcess("TERM")
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.log.info("draining {count} workers", count=len(waits))
        d = DeferredList(waits, consumeErrors=True) if waits else Deferred()
        if not waits:
            d.callback(None)

        from twisted_gateway.gateway import exit_cleanly_after_drain
        d.addCallback(lambda _: exit_cleanly_after_drain(self.reactor))
        return d

    # -- the aggregated admin app --------------------------------------------------------------

    def _agent(self) -> Agent:
        from twisted.web.client import HTTPConnectionPool
        paths = {f"worker{i}".encode(): self.admin_socket(i) for i in self.workers}
        pool = HTTPConnectionPool(self.reactor, persistent=False)
        pool._factory.noisy = False  # type: ignore[attr-defined]
        return Agent.usingEndpointFactory(self.reactor, _UnixEndpoints(self.reactor, paths), pool=pool)

    def fetch_all(self, path: str) -> Deferred:
        agent = self._agent()

        def one(index: int) -> Deferred:
            d = agent.request(b"GET", f"http://worker{index}{path}".encode())
            d.addCallback(lambda r: readBody(r).addCallback(lambda body: (r.code, body)))
            d.addErrback(lambda f: (0, f.getErrorMessage().encode()))
            return d
        return gatherResults([one(i) for i in sorted(self.workers)])


def make_supervisor_service(config: GatewayConfig, argv: list[str], count: int) -> MultiService:
    from twisted_gateway.gateway import ListenerService
    if config.tls.certificate is None:
        # Create the local development CA once, here, so the workers all load the same one
        # instead of racing to create their own.
        from twisted_gateway.tls.localca import LocalCA
        ca = LocalCA(config.state_dir)
        Logger().info("local development CA: {path} (curl --cacert {path})",
                      path=os.path.abspath(ca.cert_path))
    supervisor = Supervisor(config, argv, count)
    app = SupervisorAdmin(supervisor)
    root = logs.LoggingRoot(logs.make_observer(config.log.format, config.log.level))
    supervisor.setServiceParent(root)
    from twisted_gateway.http.errors import quiet_site
    ListenerService("plain", supervisor.reactor, config.listen.plain, quiet_site(app.resource())).setServiceParent(root)
    return root


class SupervisorAdmin:
    from klein import Klein
    app = Klein()

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.http01 = None
        if supervisor.config.acme.enabled:
            from twisted_gateway.tls.acme.responders import HTTP01Responder
            from twisted_gateway.tls.acme.shared import ChallengeBoard
            self.http01 = HTTP01Responder(ChallengeBoard(supervisor.config.state_dir))

    @app.route("/healthz", methods=["GET", "HEAD"])
    def healthz(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"ok\n"

    @app.route("/readyz", methods=["GET", "HEAD"])
    def readyz(self, request: Any) -> Any:
        import json
        expected = self.supervisor.count

        def decide(results: list[tuple[int, bytes]]) -> bytes:
            ready = [code == 200 for code, _ in results]
            ok = len(ready) == expected and all(ready) and not self.supervisor.stopping
            request.setResponseCode(200 if ok else 503)
            request.setHeader(b"content-type", b"application/json")
            reasons = [] if ok else [f"{sum(ready)} of {expected} workers ready"]
            return json.dumps({"ready": ok, "reasons": reasons, "workers": len(results),
                               "restarts": self.supervisor.restarts}).encode() + b"\n"
        return self.supervisor.fetch_all("/readyz").addCallback(decide)

    @app.route("/metrics", methods=["GET"])
    def metrics_page(self, request: Any) -> Any:
        def merge(results: list[tuple[int, bytes]]) -> bytes:
            texts = [body.decode() for code, body in results if code == 200]
            request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
            own = (f"# HELP gateway_workers Worker processes running.\n# TYPE gateway_workers gauge\n"
                   f"gateway_workers {len(self.supervisor.workers)}\n"
                   f"# HELP gateway_worker_restarts_total Workers restarted after exiting.\n"
                   f"# TYPE gateway_worker_restarts_total counter\n"
                   f"gateway_worker_restarts_total {self.supervisor.restarts}\n")
            return (merge_metrics(texts) + own).encode()
        return self.supervisor.fetch_all("/metrics").addCallback(merge)

    @app.route("/.well-known/acme-challenge/<string:token>", methods=["GET", "HEAD"])
    def acme(self, request: Any, token: str) -> bytes:
        # The worker that issues published the answer in the state directory.
        return answer_http01(self.http01, request, token)

    def resource(self) -> Any:
        return self.app.resource()
