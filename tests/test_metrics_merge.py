"""
Unit tests of how the supervisor merges its workers' metrics (workers.MetricsMerger over text
expositions), of the per-route series (metrics.RouteCounts and the splice's counting), of the
metrics configuration section and of the one admin app with sources that answer later.
"""

from __future__ import annotations

import json

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport

from twisted_gateway import metrics
from twisted_gateway.admin import AdminApp
from twisted_gateway.config import ConfigError, load_config
from twisted_gateway.directory.model import Route, Shard, ShardPort
from twisted_gateway.splice import Splice
from twisted_gateway.workers import MetricsMerger, merge_metrics


# -- expositions as a worker writes them -----------------------------------------------------------

def counter(name: str, value: float, created: float = 1000.0, **labels: str) -> str:
    label_text = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
    return (f"# HELP {name}_total A counter.\n# TYPE {name}_total counter\n"
            f"{name}_total{label_text} {value}\n"
            f"# HELP {name}_created A counter.\n# TYPE {name}_created gauge\n"
            f"{name}_created{label_text} {created}\n")


def gauge(name: str, *samples: tuple[dict[str, str], float]) -> str:
    lines = [f"# HELP {name} A gauge.", f"# TYPE {name} gauge"]
    for labels, value in samples:
        label_text = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
        lines.append(f"{name}{label_text} {value}")
    return "\n".join(lines) + "\n"


def histogram(name: str, observations: list[float], created: float = 1000.0) -> str:
    bounds = ["0.1", "1.0", "+Inf"]
    lines = [f"# HELP {name} A histogram.", f"# TYPE {name} histogram"]
    for le in bounds:
        count = sum(1 for o in observations if le == "+Inf" or o <= float(le))
        lines.append(f'{name}_bucket{{le="{le}"}} {float(count)}')
    lines += [f"{name}_count {float(len(observations))}", f"{name}_sum {float(sum(observations))}",
              f"# HELP {name}_created A histogram.", f"# TYPE {name}_created gauge",
              f"{name}_created {created}"]
    return "\n".join(lines) + "\n"


def worker(accepted: float = 0, shards: float = 1, active: float = 0, reload_at: float = 500.0,
           success: float = 1, not_after: dict[str, float] | None = None,
           handshakes: list[float] | None = None, created: float = 1000.0) -> str:
    return "".join([
        counter("gateway_connections_accepted", accepted, created, listener="tls"),
        gauge("gateway_connections_active", ({}, active)),
        histogram("gateway_tls_handshake_seconds", handshakes or [], created),
        gauge("gateway_directory_shards", ({}, shards)),
        gauge("gateway_directory_last_reload_timestamp_seconds", ({}, reload_at)),
        gauge("gateway_directory_last_reload_success", ({}, success)),
        gauge("gateway_certificate_not_after_timestamp_seconds",
              *[({"name": n}, v) for n, v in (not_after or {}).items()]),
    ])


def samples(exposition: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition by (name, labels); parsing it also proves it well formed."""
    out = {}
    for family in text_string_to_metric_families(exposition.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(exposition: bytes, series: str, **labels: str) -> float | None:
    return samples(exposition).get((series, tuple(sorted(labels.items()))))


# -- every gauge declares its rule ---------------------------------------------------------------

def test_every_gauge_declares_a_merge_rule():
    gauges = {family.name for family in metrics.REGISTRY.collect() if family.type == "gauge"}
    missing = gauges - set(metrics.GAUGE_MERGE)
    assert not missing, f"gauges without a merge rule in metrics.GAUGE_MERGE: {sorted(missing)}"
    stale = set(metrics.GAUGE_MERGE) - gauges
    assert not stale, f"merge rules for gauges that do not exist: {sorted(stale)}"
    assert all(rule.how in ("sum", "min", "max") and rule.meaning for rule in metrics.GAUGE_MERGE.values())


def test_every_family_survives_a_merge_of_the_real_registry():
    text = generate_latest(metrics.REGISTRY).decode()
    merged = merge_metrics([text, text])
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {f.name for f in text_string_to_metric_families(merged.decode())} == names


# -- gauges by meaning ---------------------------------------------------------------------------

def test_one_shard_directory_with_two_workers_reads_one():
    merged = merge_metrics([worker(shards=1), worker(shards=1)])
    assert value(merged, "gateway_directory_shards") == 1


def test_shards_take_the_largest_directory_in_force():
    # A worker restarted while the file is broken has no directory: it must not hide the
    # directory the other routes with.
    merged = merge_metrics([worker(shards=3, reload_at=500), worker(shards=0, reload_at=900, success=0)])
    assert value(merged, "gateway_directory_shards") == 3
    assert value(merged, "gateway_directory_last_reload_timestamp_seconds") == 900
    assert value(merged, "gateway_directory_last_reload_success") == 0


def test_certificate_expiry_is_the_earliest_per_name():
    merged = merge_metrics([worker(not_after={"a.example": 2000, "b.example": 5000}),
                            worker(not_after={"a.example": 3000})])
    assert value(merged, "gateway_certificate_not_after_timestamp_seconds", name="a.example") == 2000
    assert value(merged, "gateway_certificate_not_after_timestamp_seconds", name="b.example") == 5000


def test_active_connections_and_counters_add_up():
    merged = merge_metrics([worker(accepted=10, active=2, handshakes=[0.05, 0.5]),
                            worker(accepted=5, active=3, handshakes=[2.0])])
    assert value(merged, "gateway_connections_active") == 5
    assert value(merged, "gateway_connections_accepted_total", listener="tls") == 15
    assert value(merged, "gateway_tls_handshake_seconds_bucket", le="0.1") == 1
    assert value(merged, "gateway_tls_handshake_seconds_bucket", le="1.0") == 2
    assert value(merged, "gateway_tls_handshake_seconds_bucket", le="+Inf") == 3
    assert value(merged, "gateway_tls_handshake_seconds_count") == 3
    assert value(merged, "gateway_tls_handshake_seconds_sum") == pytest.approx(2.55)


def test_a_gauge_without_a_rule_is_summed_and_reported_once():
    merger = MetricsMerger(rules={})
    logged = []
    merger.log = type(merger.log)(observer=logged.append)
    text = gauge("gateway_new_thing", ({}, 2))
    merger.merge({1: text, 2: text})
    out = merger.merge({1: text, 2: text})
    assert value(out, "gateway_new_thing") == 4
    assert len(logged) == 1 and logged[0]["family"] == "gateway_new_thing"


# -- counters across restarts ----------------------------------------------------------------------

def test_counters_never_fall_when_a_worker_restarts():
    merger = MetricsMerger()
    a, b = object(), object()
    first = merger.merge({a: worker(accepted=10, handshakes=[0.05], created=1000),
                          b: worker(accepted=5, created=1001)
                          + counter("gateway_route_refusals", 2, 1001, reason="no_sni")})
    assert value(first, "gateway_connections_accepted_total", listener="tls") == 15
    # b dies; its replacement starts from zero and has never refused anything.
    merger.retire(b)
    b2 = object()
    second = merger.merge({a: worker(accepted=11, handshakes=[0.05], created=1000),
                           b2: worker(accepted=1, created=2000)})
    assert value(second, "gateway_connections_accepted_total", listener="tls") == 17
    assert value(second, "gateway_route_refusals_total", reason="no_sni") == 2
    assert value(second, "gateway_tls_handshake_seconds_count") == 1
    # The sums still start where they started.
    assert value(second, "gateway_connections_accepted_created", listener="tls") == 1000
    before, after = samples(first), samples(second)
    for key, v in before.items():
        if key[0].endswith(("_total", "_bucket", "_count", "_sum")):
            assert after[key] >= v, key


def test_a_worker_that_does_not_answer_keeps_its_counters_and_loses_its_gauges():
    merger = MetricsMerger()
    a, b = object(), object()
    merger.merge({a: worker(accepted=10, active=4), b: worker(accepted=5, active=1)})
    out = merger.merge({a: None, b: worker(accepted=6, active=1)})
    assert value(out, "gateway_connections_accepted_total", listener="tls") == 16
    assert value(out, "gateway_connections_active") == 1


def test_answers_in_either_order_never_take_a_counter_back():
    # Two scrapes in flight at once (two Prometheus servers): the older answer may come last.
    merger = MetricsMerger()
    a = object()
    newer = merger.merge({a: worker(accepted=9)})
    older = merger.merge({a: worker(accepted=7)})
    assert value(newer, "gateway_connections_accepted_total", listener="tls") == 9
    assert value(older, "gateway_connections_accepted_total", listener="tls") == 9


def test_a_late_answer_from_a_retired_worker_is_left_out():
    merger = MetricsMerger()
    a, b = object(), object()
    merger.merge({a: worker(accepted=4, active=1), b: worker(accepted=1, active=1)})
    merger.retire(a)
    out = merger.merge({a: worker(accepted=6, active=1), b: worker(accepted=1, active=1)})
    assert value(out, "gateway_connections_accepted_total", listener="tls") == 5
    assert value(out, "gateway_connections_active") == 1


def test_retiring_twice_or_a_worker_never_scraped_adds_nothing():
    merger = MetricsMerger()
    a = object()
    merger.merge({a: worker(accepted=3)})
    merger.retire(a)
    merger.retire(a)
    merger.retire(object())
    out = merger.merge({object(): worker(accepted=1)})
    assert value(out, "gateway_connections_accepted_total", listener="tls") == 4


# -- per-route series ------------------------------------------------------------------------------

def route_sample(label: str, port: str, connections: float, up: float, down: float) -> str:
    pair = f'label="{label}",port="{port}"'
    return (
        "# HELP gateway_route_connections_total Routes.\n# TYPE gateway_route_connections_total counter\n"
        f"gateway_route_connections_total{{{pair}}} {connections}\n"
        "# HELP gateway_route_bytes_total Bytes.\n# TYPE gateway_route_bytes_total counter\n"
        f'gateway_route_bytes_total{{{pair},direction="upstream"}} {up}\n'
        f'gateway_route_bytes_total{{{pair},direction="downstream"}} {down}\n')


def test_the_merger_caps_route_pairs_and_folds_the_rest_into_other():
    merger = MetricsMerger(max_routes=2)
    a, b = object(), object()
    merger.merge({a: route_sample("alpha", "80", 1, 10, 100) + route_sample("beta", "80", 1, 10, 100),
                  b: route_sample("gamma", "80", 1, 10, 100) + route_sample("other", "other", 4, 40, 400)})
    out = merger.merge({a: route_sample("alpha", "80", 2, 20, 200) + route_sample("beta", "80", 1, 10, 100),
                        b: route_sample("gamma", "80", 3, 30, 300) + route_sample("other", "other", 4, 40, 400)
                        + route_sample("delta", "81", 1, 1, 1)})
    pairs = {(dict(k[1])["label"], dict(k[1])["port"]) for k in samples(out)
             if k[0] == "gateway_route_connections_total"}
    assert pairs == {("alpha", "80"), ("beta", "80"), ("other", "other")}
    assert value(out, "gateway_route_connections_total", label="alpha", port="80") == 2
    assert value(out, "gateway_route_connections_total", label="other", port="other") == 3 + 4 + 1
    assert value(out, "gateway_route_bytes_total", label="other", port="other", direction="upstream") == 71


def _route(label: str, port: int = 9000) -> Route:
    shard = Shard(id=f"s-{label}", task="t", hostname_label=label, address="127.0.0.1",
                  ports=(ShardPort(port, "tcp", True, 15432),), primary=True)
    return Route(shard, shard.ports[0])


def _route_value(label: str, port: str, direction: str | None = None) -> float:
    if direction is None:
        return metrics.REGISTRY.get_sample_value(
            "gateway_route_connections_total", {"label": label, "port": port}) or 0.0
    return metrics.REGISTRY.get_sample_value(
        "gateway_route_bytes_total", {"label": label, "port": port, "direction": direction}) or 0.0


def test_route_counts_are_off_by_default_and_capped():
    off = metrics.RouteCounts()
    off.count(_route("rc-off"), 5, 5, 1)
    assert _route_value("rc-off", "9000") == 0
    counts = metrics.RouteCounts(enabled=True, max_routes=2)
    other_before = _route_value("other", "other")
    for label in ("rc-a", "rc-b", "rc-c", "rc-d"):
        counts.count(_route(label), up=3, down=7, connections=1)
    counts.count(_route("rc-a"), up=1)
    assert _route_value("rc-a", "9000") == 1 and _route_value("rc-a", "9000", "upstream") == 4
    assert _route_value("rc-b", "9000", "downstream") == 7
    assert _route_value("rc-c", "9000") == 0 and _route_value("rc-d", "9000") == 0
    assert _route_value("other", "other") == other_before + 2


@pytest.fixture
def per_route():
    saved = (metrics.ROUTES.enabled, metrics.ROUTES.max_routes)
    metrics.configure_routes(True, 1000)
    yield
    metrics.configure_routes(*saved)


class _Transport(StringTransport):
    def loseWriteConnection(self) -> None:
        pass


def test_the_splice_counts_its_route(per_route):
    reactor = MemoryReactorClock()
    route = _route("splice-route", 5432)
    sp = Splice(route, reactor, 5.0, 60.0)
    sp.connect()
    assert _route_value("splice-route", "5432") == 1
    sp.client.makeConnection(_Transport())
    upstream = reactor.tcpClients[-1][2].buildProtocol(None)
    upstream.makeConnection(_Transport())
    sp.client.dataReceived(b"hello")
    upstream.dataReceived(b"hi")
    # A scrape brings live splices up to date ...
    from twisted_gateway.splice import flush_metrics
    flush_metrics()
    assert _route_value("splice-route", "5432", "upstream") == 5
    # ... and the end adds only what came since.
    upstream.dataReceived(b"there")
    sp.client.readConnectionLost()
    upstream.readConnectionLost()
    assert _route_value("splice-route", "5432", "upstream") == 5
    assert _route_value("splice-route", "5432", "downstream") == 7
    assert _route_value("splice-route", "5432") == 1


# -- configuration ---------------------------------------------------------------------------------

def test_metrics_configuration(tmp_path):
    assert (load_config(None).metrics.per_route, load_config(None).metrics.max_routes) == (False, 1000)
    path = tmp_path / "gateway.yaml"
    path.write_text("metrics:\n  per_route: true\n  max_routes: 50\n")
    c = load_config(str(path))
    assert (c.metrics.per_route, c.metrics.max_routes) == (True, 50)
    path.write_text("metrics:\n  max_routes: 0\n")
    with pytest.raises(ConfigError, match="metrics.max_routes: expected a positive integer"):
        load_config(str(path))
    path.write_text("metrics:\n  per_rout: true\n")
    with pytest.raises(ConfigError, match="metrics.per_rout: unknown key"):
        load_config(str(path))


# -- one admin app, sources that answer later --------------------------------------------------------

def _get(app: AdminApp, path: str) -> tuple[int, bytes, bytes]:
    treq = StubTreq(app.resource())
    response = treq.get(f"http://admin{path}")
    treq.flush()
    result = []
    response.addCallback(lambda r: r.content().addCallback(
        lambda body: result.append((r.code, r.headers.getRawHeaders(b"content-type")[0], body))))
    treq.flush()
    return result[0]


def test_the_admin_app_takes_sources_that_answer_later():
    readiness: Deferred = Deferred()
    app = AdminApp(lambda: readiness, metrics=lambda: succeed(b"gateway_workers 2.0\n"))
    treq = StubTreq(app.resource())
    response = treq.get("http://admin/readyz")
    treq.flush()
    got = []
    response.addCallback(lambda r: r.content().addCallback(lambda body: got.append((r.code, body))))
    treq.flush()
    assert got == []  # still asking the workers
    readiness.callback((False, {"reasons": ["1 of 2 workers ready"], "workers": 2}))
    treq.flush()
    assert got[0][0] == 503 and json.loads(got[0][1])["reasons"] == ["1 of 2 workers ready"]
    code, content_type, body = _get(app, "/metrics")
    assert (code, body) == (200, b"gateway_workers 2.0\n") and content_type.startswith(b"text/plain")
    assert _get(app, "/healthz")[::2] == (200, b"ok\n")
    assert _get(app, "/.well-known/acme-challenge/x")[0] == 404
