"""
/reports: one record per proxied request and per TCP connection, batched, compressed, spooled
on disk and POSTed to the control plane in order, at least once (every batch has an id the
control plane stores once).

Records are made from the access-log events (``event_kind`` access, http_access, http_tunnel,
udp_access), read by a log observer: the front door and the HTTP fronts log exactly one such
event per connection and per request, after it ended, with its outcome, bytes and duration.
Only the fields listed in L{FIELDS} are copied: those events carry no tokens, cookies or query
strings, and nothing else an event may carry can reach a record.  (They are emitted only with
``log.access_log`` on, which the configuration therefore requires with ``cloud.reports``.)

A batch is sealed when it holds ``cloud.batch_records`` records or its first record is
``cloud.batch_interval`` seconds old; sealed, it is gzipped and written to the spool
(``state_dir/cloud/spool``, ``spool-worker-N`` for worker N) before it is sent, so a batch
lives on disk until the control plane acknowledges it.  The sender POSTs the oldest batch, one
at a time:

    POST <base URL>/reports
    Authorization: Bearer <cloud token>
    Content-Type: application/json
    Content-Encoding: gzip
    X-Batch-Id: <batch id>
    {"batch_id": ..., "gateway": ..., "worker": ..., "account": ..., "analytics_index": ...,
     "sealed_at": <unix time>, "records": [{"id": ..., "seq": ..., "kind": ..., ...}, ...]}

2xx removes it from the spool and sends the next; 400 and 413 (a batch the control plane can
never take) drop it, counted; anything else (no answer, 5xx, a refused token) is retried after
a backoff with jitter, the batches waiting in the spool in order.  The spool is bounded
(``cloud.spool_bytes``): a batch that does not fit makes room by dropping the oldest ones (not
the one in flight), each counted and logged.  On SIGTERM the open batch is sealed into the
spool and the sender gets up to ``cloud.flush_timeout`` seconds to empty it; what is left is
sent at the next start.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import time
import uuid
import zlib
from typing import Any, Callable, Iterable, Mapping, cast

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import ILogObserver, Logger, globalLogPublisher
from twisted.python.failure import Failure

from twisted_gateway import metrics
from twisted_gateway.cloud.link import (ANSWER_MAX_BYTES, REQUEST_OPTIONS, auth_headers, backoff, describe,
                                        http_client, read_body)
from twisted_gateway.cloud.token import CloudIdentity
from twisted_gateway.config import CloudConfig
from twisted_gateway.tls.files import atomic_write, ensure_private_dir

# event_kind -> (record kind, the event's fields copied, as record field names)
FIELDS: Mapping[str, tuple[str, Mapping[str, str]]] = {
    "http_access": ("request", {"client": "client", "method": "method", "path": "path",
                                "status": "status", "shard": "shard", "port": "port",
                                "bytes": "bytes_down", "duration": "duration"}),
    "access": ("connection", {"client": "client", "sni": "sni", "outcome": "outcome",
                              "shard": "shard", "port": "port", "bytes_up": "bytes_up",
                              "bytes_down": "bytes_down", "duration": "duration"}),
    "http_tunnel": ("tunnel", {"client": "client", "shard": "shard", "port": "port",
                               "up": "bytes_up", "down": "bytes_down"}),
    "udp_access": ("udp", {"protocol": "protocol", "client": "client", "shard": "shard",
                           "port": "port", "reason": "outcome", "up_bytes": "bytes_up",
                           "down_bytes": "bytes_down", "duration": "duration"}),
}


def record_from_event(event: Mapping[str, Any]) -> dict[str, Any] | None:
    """The report record of an access event (None for every other event): its kind, its time
    and the fields of L{FIELDS}, nothing else."""
    spec = FIELDS.get(event.get("event_kind"))  # type: ignore[arg-type]
    if spec is None:
        return None
    kind, fields = spec
    record: dict[str, Any] = {"kind": kind, "time": event.get("log_time", time.time())}
    for source, name in fields.items():
        value = event.get(source)
        if value is None or isinstance(value, (str, int, float, bool)):
            record[name] = round(value, 6) if isinstance(value, float) else value
    path = record.get("path")
    if isinstance(path, str):
        # The events' path has no query already; a query or fragment (where tokens and keys
        # ride) never reaches a record whatever an event may carry one day.
        record["path"] = path.split("?", 1)[0].split("#", 1)[0]
    return record


# -- batches -----------------------------------------------------------------------------------------

class Batcher:
    """Collects records; calls C{seal(records)} with C{size} of them, or with what it holds
    C{interval} seconds after the first record of a batch arrived."""

    def __init__(self, clock: IReactorTime, size: int, interval: float,
                 seal: Callable[[list[dict[str, Any]]], None]) -> None:
        self.clock = clock
        self.size = size
        self.interval = interval
        self._seal = seal
        self.records: list[dict[str, Any]] = []
        self._timer: IDelayedCall | None = None

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if len(self.records) >= self.size:
            self.flush()
        elif self._timer is None:
            self._timer = self.clock.callLater(self.interval, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """Seal what is held now (nothing: no batch)."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if self.records:
            records, self.records = self.records, []
            self._seal(records)


def encode_batch(header: Mapping[str, Any], records: list[dict[str, Any]]) -> bytes:
    return gzip.compress(json.dumps({**header, "records": records}, separators=(",", ":")).encode(),
                         compresslevel=6, mtime=0)


def decode_batch(data: bytes) -> dict[str, Any]:
    doc = json.loads(gzip.decompress(data))
    if not isinstance(doc, dict) or not isinstance(doc.get("records"), list):
        raise ValueError("not a report batch")
    return doc


# -- the spool ---------------------------------------------------------------------------------------

_NAME = re.compile(r"^(\d{20})\.(\d+)\.([0-9a-f]{32})\.json\.gz$")


@attrs.frozen(order=True)
class SpooledBatch:
    seq: int
    records: int = attrs.field(order=False)
    batch_id: str = attrs.field(order=False)
    size: int = attrs.field(order=False)

    @property
    def name(self) -> str:
        return f"{self.seq:020d}.{self.records}.{self.batch_id}.json.gz"


class Spool:
    """
    Batches on disk in one directory, oldest first, at most C{limit} bytes.  A file per batch
    (its name: sequence, record count, batch id), written atomically; sequences keep growing
    across restarts (the time in nanoseconds, or one more than the newest).
    """

    def __init__(self, path: str, limit: int) -> None:
        self.path = path
        self.limit = limit
        ensure_private_dir(path)
        self.batches: list[SpooledBatch] = []
        for name in os.listdir(path):
            found = _NAME.match(name)
            if found is None:
                if name.startswith(".tmp-"):
                    # A write cut short (a crash, SIGKILL): never renamed, so never a batch.
                    try:
                        os.unlink(os.path.join(path, name))
                    except OSError:
                        pass
                continue
            try:
                size = os.path.getsize(os.path.join(path, name))
            except OSError:
                continue
            self.batches.append(SpooledBatch(int(found.group(1)), int(found.group(2)), found.group(3), size))
        self.batches.sort()
        self._last = self.batches[-1].seq if self.batches else 0

    @property
    def size(self) -> int:
        """Bytes of the batches held."""
        return sum(b.size for b in self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def oldest(self) -> SpooledBatch | None:
        return self.batches[0] if self.batches else None

    def read(self, batch: SpooledBatch) -> bytes:
        with open(os.path.join(self.path, batch.name), "rb") as f:
            return f.read()

    def put(self, batch_id: str, records: int, data: bytes, keep: SpooledBatch | None = None,
            now_ns: int | None = None) -> tuple[SpooledBatch | None, list[SpooledBatch]]:
        """Add a batch; return it (None: larger than the whole spool, so not kept) and the
        batches dropped to make room, oldest first (never C{keep}, the one in flight)."""
        seq = max(now_ns if now_ns is not None else time.time_ns(), self._last + 1)
        batch = SpooledBatch(seq, records, batch_id, len(data))
        reserved = keep.size if keep is not None and keep in self.batches else 0
        if batch.size + reserved > self.limit:
            return None, []
        dropped = []
        total = self.size
        for old in list(self.batches):
            if total + batch.size <= self.limit:
                break
            if old == keep:
                continue
            self.remove(old)
            total -= old.size
            dropped.append(old)
        atomic_write(os.path.join(self.path, batch.name), data)
        self._last = seq
        self.batches.append(batch)
        return batch, dropped

    def remove(self, batch: SpooledBatch) -> None:
        if batch in self.batches:
            self.batches.remove(batch)
        try:
            os.unlink(os.path.join(self.path, batch.name))
        except FileNotFoundError:
            pass


def spool_path(state_dir: str, worker: int | None) -> str:
    """One spool per gateway process: a worker's own (its index survives its restarts)."""
    return os.path.join(state_dir, "cloud", "spool" if worker is None else f"spool-worker-{worker}")


# -- the service -------------------------------------------------------------------------------------

class ReportService(Service):
    """Makes records from access events, batches and spools them, and sends the spool in order."""

    log = Logger()

    def __init__(self, identity: CloudIdentity, cloud: CloudConfig, state_dir: str, reactor: Any,
                 worker: int | None = None, client: Any = None, publisher: Any = None,
                 uniform: Callable[[float, float], float] = random.uniform) -> None:
        self.identity = identity
        self.cloud = cloud
        self.reactor = reactor
        self.worker = worker
        self.instance = uuid.uuid4().hex[:12]
        self.spool = Spool(spool_path(state_dir, worker), cloud.spool_bytes)
        self.batcher = Batcher(reactor, cloud.batch_records, cloud.batch_interval, self._seal)
        self.uniform = uniform
        self._client = client
        self._pool: Any = None
        self._publisher = publisher if publisher is not None else globalLogPublisher
        self._seq = 0
        self._sending: SpooledBatch | None = None
        self._request: Deferred[Any] | None = None
        self._retry: IDelayedCall | None = None
        self._failures = 0
        self._down_since: float | None = None
        self._stopping = False
        self._gave_up = False
        self._drained: list[Deferred[None]] = []
        self._gauges()

    # -- lifecycle ----------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self._client is None:
            self._client, self._pool = http_client(self.reactor, self.cloud.ca_bundle)
        self._publisher.addObserver(cast(ILogObserver, self.observe))
        if len(self.spool):
            self.log.info("cloud reports: {batches} batches ({records} records) in the spool from "
                          "before, sending them first", batches=len(self.spool),
                          records=sum(b.records for b in self.spool.batches))
        self._send_next()

    def stopService(self) -> Deferred[None]:
        """Seal the open batch into the spool, then send for up to cloud.flush_timeout seconds
        (not at all while the control plane is failing); the rest waits in the spool."""
        super().stopService()
        self._publisher.removeObserver(cast(ILogObserver, self.observe))
        self._stopping = True
        self.batcher.flush()
        if not len(self.spool) or self._retry is not None or self.cloud.flush_timeout <= 0:
            return self._close()
        done: Deferred[None] = Deferred()
        self._drained.append(done)
        timer = self.reactor.callLater(self.cloud.flush_timeout, self._give_up)

        def finished(_: object) -> Deferred[None]:
            if timer.active():
                timer.cancel()
            return self._close()
        done.addCallback(finished)
        self._send_next()
        return done

    def _give_up(self) -> None:
        self._gave_up = True
        if self._request is not None:
            self._request.cancel()  # the batch stays in the spool; a duplicate later is dropped
        self._finish_drain()

    def _finish_drain(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        drained, self._drained = self._drained, []
        for d in drained:
            d.callback(None)

    def _close(self) -> Deferred[None]:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if len(self.spool):
            self.log.info("cloud reports: {batches} batches ({records} records) kept in the spool "
                          "{path} for the next start", batches=len(self.spool),
                          records=sum(b.records for b in self.spool.batches), path=self.spool.path)
        if self._pool is not None:
            d: Deferred[None] = self._pool.closeCachedConnections()
            return d
        return succeed(None)

    def set_config(self, cloud: CloudConfig) -> None:
        """A reload: batch sizes, intervals, the spool's bound and the retry delays."""
        self.cloud = cloud
        self.batcher.size, self.batcher.interval = cloud.batch_records, cloud.batch_interval
        self.spool.limit = cloud.spool_bytes

    # -- records ------------------------------------------------------------------------------------

    def observe(self, event: Mapping[str, Any]) -> None:
        """A log observer: never raises (a failing observer is removed by the publisher)."""
        try:
            record = record_from_event(event)
            if record is None or not self.running:
                return
            self._seq += 1
            record["id"] = f"{self.instance}-{self._seq}"
            record["seq"] = self._seq
            metrics.CLOUD_REPORT_RECORDS.labels(kind=record["kind"]).inc()
            self.batcher.add(record)
        except Exception:  # noqa: BLE001 - said once per failure, the gateway goes on
            self.reactor.callLater(0, self.log.failure, "cloud reports: making a record failed")

    def _seal(self, records: list[dict[str, Any]]) -> None:
        token = self.identity.token
        batch_id = uuid.uuid4().hex
        header = {"batch_id": batch_id, "gateway": self.instance, "worker": self.worker,
                  "account": token.account, "analytics_index": token.analytics_index,
                  "sealed_at": time.time()}
        data = encode_batch(header, records)
        try:
            batch, dropped = self.spool.put(batch_id, len(records), data, keep=self._sending)
        except OSError as e:
            # A spool that cannot be written (disk full): the records are lost; say so.
            self._dropped("spool_full", [SpooledBatch(0, len(records), batch_id, len(data))],
                          f"the spool cannot be written ({e.strerror})")
            return
        if batch is None:
            self._dropped("spool_full", [SpooledBatch(0, len(records), batch_id, len(data))],
                          f"the batch alone is larger than cloud.spool_bytes ({self.spool.limit})")
        if dropped:
            self._dropped("spool_full", dropped, f"the spool is full (cloud.spool_bytes {self.spool.limit})")
        self._gauges()
        if self._retry is None:
            self._send_next()

    def _dropped(self, reason: str, batches: Iterable[SpooledBatch], why: str) -> None:
        batches = list(batches)
        records = sum(b.records for b in batches)
        metrics.CLOUD_REPORTS_DROPPED.labels(reason=reason).inc(len(batches))
        metrics.CLOUD_REPORTS_DROPPED_RECORDS.labels(reason=reason).inc(records)
        self.log.warn("cloud reports: dropped {batches} batches ({records} records), oldest first: "
                      "{why}", batches=len(batches), records=records, why=why)

    def _gauges(self) -> None:
        metrics.CLOUD_REPORTS_SPOOLED.set(len(self.spool))
        metrics.CLOUD_REPORTS_SPOOL_BYTES.set(self.spool.size)

    # -- sending ------------------------------------------------------------------------------------

    def _send_next(self) -> None:
        self._retry = None
        if self._sending is not None or self._client is None:
            return
        batch = self.spool.oldest()
        if batch is None:
            if self._stopping:
                self._finish_drain()
            return
        if not self.running and not self._drained:
            return
        try:
            data = self.spool.read(batch)
        except OSError as e:
            self.spool.remove(batch)
            self._dropped("spool_full", [batch], f"its file cannot be read ({e.strerror})")
            self._gauges()
            self.reactor.callLater(0, self._send_next)
            return
        try:
            decode_batch(data)
        except (ValueError, EOFError, gzip.BadGzipFile, zlib.error) as e:
            # A file damaged on disk: the control plane can never take it, and any answer but
            # 400 would have it retried for ever ahead of every batch behind it.
            self.spool.remove(batch)
            self._dropped("corrupt", [batch], f"its file {batch.name} is not a gzipped batch ({e})")
            self._gauges()
            self.reactor.callLater(0, self._send_next)
            return
        self._sending = batch
        headers = auth_headers(self.identity.token.raw, Content_Type="application/json",
                               Content_Encoding="gzip", X_Batch_Id=batch.batch_id)
        d = self._client.post(f"{self.identity.base_url}/reports", data=data, headers=headers,
                              timeout=self.cloud.request_timeout, **REQUEST_OPTIONS)
        self._request = d
        d.addCallback(self._answered, batch)
        d.addErrback(self._unreachable)
        d.addErrback(lambda f: self.log.failure("cloud reports: handling an answer failed", f))

        def done(_: object) -> None:
            self._request = None
            self._sending = None
            if self._retry is None:
                self._send_next()
        d.addBoth(done)

    def _answered(self, response: Any, batch: SpooledBatch) -> Any:
        code = response.code
        d = read_body(self.reactor, response, ANSWER_MAX_BYTES, self.cloud.request_timeout, "cloud reports")
        if 200 <= code < 300:
            d.addCallback(lambda _: self._delivered(batch))
        elif code in (400, 413):
            def rejected(body: bytes) -> None:
                self.spool.remove(batch)
                self._gauges()
                self._dropped("rejected", [batch], f"the control plane refused batch {batch.batch_id} "
                              f"(HTTP {code}: {body[:200].decode('utf-8', 'replace').strip()})")
            d.addCallback(rejected)
        else:
            reason = "token_refused" if code in (401, 403) else "http_error"
            d.addCallback(lambda body: self._failed(
                reason, f"HTTP {code}: {body[:200].decode('utf-8', 'replace').strip()}"))
        return d

    def _delivered(self, batch: SpooledBatch) -> None:
        self.spool.remove(batch)
        self._gauges()
        metrics.CLOUD_REPORTS_SENT.inc()
        metrics.CLOUD_REPORTS_SENT_RECORDS.inc(batch.records)
        if self._down_since is not None:
            self.log.info("cloud reports: the control plane takes reports again after {seconds:.1f}s; "
                          "{batches} batches waiting in the spool", batches=len(self.spool),
                          seconds=self.reactor.seconds() - self._down_since)
        self._down_since = None
        self._failures = 0

    def _unreachable(self, failure: Failure) -> None:
        if self._gave_up:
            return  # cancelled at the end of the flush on SIGTERM: the batch stays in the spool
        self._failed("unreachable", describe(failure))

    def _failed(self, reason: str, problem: str) -> None:
        metrics.CLOUD_REPORTS_FAILURES.labels(reason=reason).inc()
        self._failures += 1
        if self._down_since is None:
            self._down_since = self.reactor.seconds()
            self.log.warn("cloud reports: sending failed ({problem}); batches wait in the spool "
                          "{path} and are retried", problem=problem, path=self.spool.path)
        if self._stopping:
            self._finish_drain()
            return
        delay = backoff(self._failures, self.cloud.retry_initial, self.cloud.retry_max, self.uniform)
        self._retry = self.reactor.callLater(delay, self._send_next)

    def readiness(self) -> dict[str, Any]:
        return {"state": "up" if self._down_since is None else "down",
                "spooled_batches": len(self.spool), "spool_bytes": self.spool.size,
                "open_records": len(self.batcher.records)}


__all__ = ["Batcher", "ReportService", "Spool", "SpooledBatch", "decode_batch", "encode_batch",
           "record_from_event", "spool_path"]
