"""
``--workers N``: a supervisor that owns the listening TLS socket, runs N gateway worker
processes that all accept on it, restarts a worker that dies, serves one admin endpoint whose
``/metrics`` merges every worker's series by their meaning (L{MetricsMerger}), and drains them
all on SIGTERM.

Each worker is an ordinary ``twistd -n gateway`` given the socket the way systemd would
(``LISTEN_FDS``, ``systemd:domain=...:name=tls``), a private admin socket (a UNIX socket in
the state directory) that only the supervisor reads, and its index in C{GATEWAY_WORKER}
(L{worker_index}) for its log lines.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from typing import Any, Hashable, Iterable, Mapping

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.endpoints import UNIXClientEndpoint, serverFromString
from twisted.internet.protocol import Factory, Protocol, ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.client import Agent, readBody
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import implementer

from twisted_gateway._compat import close_shared_listener
from twisted_gateway import logs, metrics
from twisted_gateway.admin import AdminApp, Readiness
from twisted_gateway.dashboard import views
from twisted_gateway.dashboard.views import IAdminViews
from twisted_gateway.reactors import reactor_args
from twisted_gateway.config import GatewayConfig
from twisted_gateway.tls.files import ensure_private_dir

WORKER_ENV = "GATEWAY_WORKER"
"""The environment variable that gives a worker process its index."""

_SCRAPE_TIMEOUT = 5.0


def worker_index() -> int | None:
    """This process's worker index when a supervisor started it, else None."""
    value = os.environ.get(WORKER_ENV, "")
    return int(value) if value.isdigit() else None


# -- merging the workers' expositions ---------------------------------------------------------

SeriesKey = tuple[str, tuple[tuple[str, str], ...]]
"""A sample's name and its sorted labels."""

_COUNTING = frozenset({"counter", "histogram", "summary"})


class MetricsMerger:
    """
    The supervisor's view of its workers' series, merged by meaning.

    Counters and histograms (every sample: _total, _bucket, _count, _sum) are added up and never
    decrease, even when a worker restarts: the merger keeps, per series, the last value seen
    from each worker incarnation (L{merge}) and, when an incarnation ends (L{retire}), adds its
    last values to a carried-over base.  What a worker counted after its last scrape and before
    it died is lost; nothing already shown is taken back.  Their _created series show the
    earliest value seen, so they stay put across restarts as the sums do.

    Gauges are merged by the rule L{metrics.GAUGE_MERGE} declares for them (sum, min or max),
    over the workers that answered this scrape.

    Per-route families (L{metrics.ROUTE_FAMILIES}) are capped again here: each worker keeps
    C{max_routes} pairs of its own, and the merged exposition shows at most C{max_routes} pairs
    (the first ones seen, for good) and folds the rest into the "other" series.
    """

    log = Logger()

    def __init__(self, rules: Mapping[str, metrics.Merge] | None = None,
                 max_routes: int | None = None) -> None:
        self.rules = metrics.GAUGE_MERGE if rules is None else rules
        self.max_routes = max_routes
        self._families: dict[str, tuple[str, str]] = {}
        """Every family ever seen, in first-seen order: name -> (type, documentation)."""
        self._keys: dict[str, dict[SeriesKey, None]] = {}
        """Per family, the counting series ever seen, in first-seen order (kept: a series
        only a dead incarnation had still shows its carried-over value)."""
        self._last: dict[Hashable, dict[SeriesKey, float]] = {}
        self._retired: set[Hashable] = set()
        self._base: dict[SeriesKey, float] = {}
        self._created: dict[SeriesKey, float] = {}
        self._routes: set[tuple[str, str]] = set()
        self._unruled: set[str] = set()

    def retire(self, incarnation: Hashable) -> None:
        """C{incarnation} (a worker process) ended: its last values become part of the base."""
        self._retired.add(incarnation)
        for key, value in self._last.pop(incarnation, {}).items():
            self._base[key] = self._base.get(key, 0.0) + value

    def merge(self, scrapes: Mapping[Any, str | None]) -> bytes:
        """
        One exposition from every live incarnation's, keyed by anything hashable that tells
        incarnations apart (C{None}: it did not answer this time, so
        its counters keep their last values and its gauges are left out).  An answer from an
        incarnation already retired is left out: its last values are in the base already.
        """
        from prometheus_client.parser import text_string_to_metric_families
        gauges: dict[str, dict[SeriesKey, list[float]]] = {}
        for incarnation, text in scrapes.items():
            if text is None or incarnation in self._retired:
                continue
            counted: dict[SeriesKey, float] = {}
            kinds: dict[str, str] = {}
            for family in text_string_to_metric_families(text):
                kind = kinds[family.name] = self._kind(family.name, family.type, kinds)
                if family.name not in self._families:
                    self._families[family.name] = (family.type, family.documentation)
                    self._keys[family.name] = {}
                keys = self._keys[family.name]
                for sample in family.samples:
                    key = self._key(family.name, sample.name, sample.labels)
                    if kind == "counting":
                        keys.setdefault(key)
                        # Added, not set: route pairs folded into "other" share one key.
                        counted[key] = counted.get(key, 0.0) + sample.value
                    elif kind == "created":
                        keys.setdefault(key)
                        self._created[key] = min(self._created.get(key, sample.value), sample.value)
                    else:
                        gauges.setdefault(family.name, {}).setdefault(key, []).append(sample.value)
            # The larger of this answer and the last one: two scrapes in flight at once (two
            # Prometheus servers) may come back in either order, and within one process a
            # counter only grows.
            last = self._last.setdefault(incarnation, {})
            for key, value in counted.items():
                if value > last.get(key, -1.0):
                    last[key] = value
        return self._render(gauges)

    def _kind(self, name: str, typ: str, kinds: Mapping[str, str]) -> str:
        if typ in _COUNTING:
            return "counting"
        # prometheus-client exports a counter's or histogram's _created samples as a gauge
        # family of their own, right after it.
        if name.endswith("_created") and kinds.get(name[:-len("_created")]) == "counting":
            return "created"
        return "gauge"

    def _key(self, family: str, name: str, labels: Mapping[str, str]) -> SeriesKey:
        stem = family[:-len("_created")] if family.endswith("_created") else family
        if self.max_routes is not None and stem in metrics.ROUTE_FAMILIES and "port" in labels:
            pair = (labels.get("label", ""), labels["port"])
            other = (metrics.OTHER_ROUTE, metrics.OTHER_ROUTE)
            # The first max_routes pairs keep their series for good, so that no merged series
            # ever moves into "other" (and reads as a fall).
            if pair != other and pair not in self._routes:
                if len(self._routes) < self.max_routes:
                    self._routes.add(pair)
                else:
                    labels = dict(labels, label=other[0], port=other[1])
        return (name, tuple(sorted(labels.items())))

    def _gauge(self, family: str, values: list[float]) -> float:
        rule = self.rules.get(family)
        if rule is None:
            if family not in self._unruled:
                self._unruled.add(family)
                self.log.warn("no merge rule for gauge {family} (metrics.GAUGE_MERGE): summed",
                              family=family)
            return sum(values)
        if rule.how == "min":
            return min(values)
        if rule.how == "max":
            return max(values)
        return sum(values)

    def _render(self, gauges: Mapping[str, Mapping[SeriesKey, list[float]]]) -> bytes:
        totals = dict(self._base)
        for counted in self._last.values():
            for key, value in counted.items():
                totals[key] = totals.get(key, 0.0) + value
        families = []
        for name, (typ, documentation) in self._families.items():
            family = Metric(name, documentation, typ)
            if name in gauges:
                for (sample, labels), values in gauges[name].items():
                    family.add_sample(sample, dict(labels), self._gauge(name, values))
            else:
                for key in self._keys[name]:
                    value = self._created[key] if key in self._created else totals.get(key, 0.0)
                    family.add_sample(key[0], dict(key[1]), value)
            families.append(family)
        return generate_latest(_Families(families))


class _Families:
    """Ready-made families in the shape prometheus-client's exposition reads (C{collect})."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def merge_metrics(texts: list[str], rules: Mapping[str, metrics.Merge] | None = None) -> bytes:
    """The expositions of several workers scraped once, merged by meaning (L{MetricsMerger})."""
    return MetricsMerger(rules).merge(dict(enumerate(texts)))


@implementer(IAgentEndpointFactory)
class _UnixEndpoints:
    def __init__(self, reactor: Any, paths: dict[bytes, str]) -> None:
        self.reactor = reactor
        self.paths = paths

    def endpointForURI(self, uri: Any) -> Any:
        return UNIXClientEndpoint(self.reactor, self.paths[uri.host], timeout=5)


class _Worker(ProcessProtocol):
    """One worker process: one incarnation of worker C{index} (a restart is a new _Worker)."""

    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.process: Any = None
        """The process transport, once spawned."""
        self.started = time.time()
        self.ended: Deferred[Any] = Deferred()

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value)
        self.supervisor.worker_ended(self, reason.value)


class _Placeholder(Factory):
    """The factory of the supervisor's TLS port, which never accepts (the workers do)."""

    protocol = Protocol
    noisy = False


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
        self.restarts_by_index: dict[int, int] = {}
        self.started = time.time()
        self.run_dir = os.path.join(config.state_dir, "workers")
        self.tls_port: Any = None
        self.merger = MetricsMerger(max_routes=config.metrics.max_routes)
        metrics.WORKERS.set_function(lambda: len(self.workers))

    def admin_socket(self, index: int) -> str:
        return os.path.join(self.run_dir, f"worker-{index}.sock")

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        ensure_private_dir(self.run_dir)
        results: list[Any] = []
        serverFromString(self.reactor, self.config.listen.tls).listen(_Placeholder()).addBoth(results.append)
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
        from twisted.internet.asyncioreactor import AsyncioSelectorReactor
        if isinstance(self.reactor, AsyncioSelectorReactor):
            from twisted.internet.process import reapAllProcesses
            self._reaper = LoopingCall(reapAllProcesses)
            self._reaper.clock = self.reactor
            self._reaper.start(0.5, now=False)

    def reload(self) -> None:
        """SIGHUP: every worker re-reads its configuration, directory and certificates."""
        for w in list(self.workers.values()):
            try:
                w.process.signalProcess("HUP")
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
        env = dict(os.environ, LISTEN_FDS="1", LISTEN_FDNAMES="tls", **{WORKER_ENV: str(index)})
        # LISTEN_PID must be the worker's own pid: a shell sets it and execs twistd in place.
        command = ["/bin/sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", *args]
        worker = _Worker(self, index)
        worker.process = self.reactor.spawnProcess(
            worker, command[0], command, env=env, childFDs={0: "w", 1: 1, 2: 2, 3: self.tls_port.fileno()})
        self.workers[index] = worker
        self.log.info("worker {worker} started (pid {pid})", worker=index, pid=worker.process.pid)

    def worker_ended(self, worker: _Worker, reason: Any) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        # Its counters as last scraped stay in the merged sums (they must never fall).
        self.merger.retire(worker)
        if self.stopping:
            return
        self.restarts += 1
        self.restarts_by_index[worker.index] = self.restarts_by_index.get(worker.index, 0) + 1
        metrics.WORKER_RESTARTS.inc()
        self.log.error("worker {worker} exited ({reason}); restarting", worker=worker.index,
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
            close_shared_listener(self.tls_port)
        waits = [w.ended for w in self.workers.values()]
        for w in list(self.workers.values()):
            try:
                w.process.signalProcess("TERM")
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.log.info("draining {count} workers", count=len(waits))
        d: Deferred[Any] = DeferredList(waits, consumeErrors=True) if waits else Deferred()
        if not waits:
            d.callback(None)

        from twisted_gateway.gateway import exit_cleanly_after_drain
        d.addCallback(lambda _: exit_cleanly_after_drain(self.reactor))
        return d

    # -- what the admin app shows ----------------------------------------------------------------

    def readiness(self) -> Deferred[Readiness]:
        """Ready when every worker is (and the supervisor is not stopping)."""
        def decide(results: list[tuple[_Worker, int, bytes]]) -> Readiness:
            ready = sum(1 for _, code, _ in results if code == 200)
            reasons = ["draining"] if self.stopping else []
            if ready < self.count:
                reasons.append(f"{ready} of {self.count} workers ready")
            detail: dict[str, Any] = {"reasons": reasons, "workers": len(results),
                                      "restarts": self.restarts}
            # What a worker reports as degraded (Redis lost, say) is the supervisor's too.
            degraded: set[str] = set()
            for _, code, body in results:
                try:
                    degraded.update(json.loads(body).get("degraded", []))
                except (ValueError, AttributeError, TypeError):
                    pass
            if degraded:
                detail["degraded"] = sorted(degraded)
            return (not reasons, detail)
        return self.fetch_all("/readyz").addCallback(decide)

    def metrics(self) -> Deferred[bytes]:
        """Every worker's series merged by meaning, then the supervisor's own."""
        def merge(results: list[tuple[_Worker, int, bytes]]) -> bytes:
            # The merger leaves out the answer of a worker that ended while it was asked.
            scrapes = {worker: body.decode() if code == 200 else None for worker, code, body in results}
            return self.merger.merge(scrapes) + generate_latest(metrics.SUPERVISOR_REGISTRY)
        return self.fetch_all("/metrics").addCallback(merge)

    def _agent(self) -> Agent:
        from twisted.web.client import HTTPConnectionPool
        paths = {f"worker{i}".encode(): self.admin_socket(i) for i in self.workers}
        pool = HTTPConnectionPool(self.reactor, persistent=False)
        return Agent.usingEndpointFactory(self.reactor, _UnixEndpoints(self.reactor, paths), pool=pool)

    def fetch_all(self, path: str) -> Deferred[list[tuple[_Worker, int, bytes]]]:
        """Ask every live worker for C{path}: a list of (worker, status, body), status 0 for a
        worker that did not answer within a few seconds."""
        agent = self._agent()

        def one(worker: _Worker) -> Deferred[tuple[_Worker, int, bytes]]:
            def read(r: IResponse) -> Deferred[tuple[_Worker, int, bytes]]:
                return readBody(r).addCallback(lambda body: (worker, r.code, body))
            d = agent.request(b"GET", f"http://worker{worker.index}{path}".encode()).addCallback(read)
            d.addTimeout(_SCRAPE_TIMEOUT, self.reactor)
            d.addErrback(lambda f: (worker, 0, f.getErrorMessage().encode()))
            return d
        return gatherResults([one(self.workers[i]) for i in sorted(self.workers)])


@implementer(IAdminViews)
class SupervisorViews:
    """The admin API of several workers: each view asked of every worker (their private admin
    sockets) and merged (L{twisted_gateway.dashboard.views}); a worker that does not answer is
    left out of that answer."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def _ask(self, view: str) -> Deferred[dict[int, dict[str, Any]]]:
        def parse(results: list[tuple[_Worker, int, bytes]]) -> dict[int, dict[str, Any]]:
            out = {}
            for worker, code, body in results:
                if code == 200:
                    try:
                        out[worker.index] = json.loads(body)
                    except ValueError:
                        pass
            return out
        return self.supervisor.fetch_all(f"/api/v1/{view}").addCallback(parse)

    def routes(self) -> Deferred[dict[str, Any]]:
        hostname = self.supervisor.config.hostname
        return self._ask("routes").addCallback(lambda a: views.merge_routes(a, hostname))

    def certificates(self) -> Deferred[dict[str, Any]]:
        return self._ask("certificates").addCallback(views.merge_certificates)

    def refusals(self) -> Deferred[dict[str, Any]]:
        kept = self.supervisor.config.admin.refusals_kept
        return self._ask("refusals").addCallback(lambda a: views.merge_refusals(a, kept))

    def providers(self) -> Deferred[dict[str, Any]]:
        return self._ask("providers").addCallback(views.merge_providers)

    def workers(self) -> Deferred[dict[str, Any]]:
        sup = self.supervisor

        def merge(answers: dict[int, dict[str, Any]]) -> dict[str, Any]:
            now = time.time()
            listed = []
            for index in range(sup.count):
                worker = sup.workers.get(index)
                own = (answers.get(index, {}).get("workers") or [{}])[0]
                listed.append({
                    "index": index, "pid": worker.process.pid if worker is not None else None,
                    "started": worker.started if worker is not None else None,
                    "uptime_seconds": round(now - worker.started, 3) if worker is not None else None,
                    "restarts": sup.restarts_by_index.get(index, 0),
                    "open_connections": own.get("open_connections"),
                    "draining": bool(own.get("draining", sup.stopping)), "answered": index in answers})
            return {"time": now, "supervisor": {
                "pid": os.getpid(), "started": sup.started,
                "uptime_seconds": round(now - sup.started, 3), "restarts": sup.restarts},
                "workers": listed}
        return self._ask("workers").addCallback(merge)


def make_supervisor_service(config: GatewayConfig, argv: list[str], count: int) -> MultiService:
    from twisted_gateway.gateway import ListenerService
    from twisted_gateway.http.errors import quiet_site
    if config.tls.certificate is None:
        # Create the local development CA once, here, so the workers all load the same one
        # instead of racing to create their own.
        from twisted_gateway.tls.localca import LocalCA
        ca = LocalCA(config.state_dir)
        Logger().info("local development CA: {path} (curl --cacert {path})",
                      path=os.path.abspath(ca.cert_path))
    supervisor = Supervisor(config, argv, count)
    http01 = None
    if config.acme.enabled:
        # The worker that issues publishes the answers in the state directory.
        from twisted_gateway.tls.acme.responders import HTTP01Responder
        from twisted_gateway.tls.acme.shared import ChallengeBoard
        http01 = HTTP01Responder(ChallengeBoard(config.state_dir))
    from twisted_gateway.dashboard.access import load_access
    app = AdminApp(supervisor.readiness, http01, metrics=supervisor.metrics,
                   views=SupervisorViews(supervisor), access=load_access(config.admin.token_file),
                   protect_metrics=config.admin.protect_metrics)
    root = logs.LoggingRoot(logs.make_observer(config.log.format, config.log.level))
    supervisor.setServiceParent(root)
    ListenerService("plain", supervisor.reactor, config.listen.plain, quiet_site(app.resource())).setServiceParent(root)
    return root
