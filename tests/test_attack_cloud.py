"""
The hybrid link attacked from the control plane's side (a bad, broken or hostile control plane,
or whoever answers in its place): answers that trickle or never end, a redirect to another
origin, a certificate from another CA; and what the reports may carry.  The control plane here
is a small HTTPS server in the test's thread that does what each test wants, and the gateway is
the real one.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import ssl
import threading
import time
from typing import Any, Callable

import pytest
from cryptography.hazmat.primitives import serialization

from support import Upstream, http_handler, shard, wait_for

from twisted_gateway.cloud.controlplane import mint_cloud_token, signing_key
from twisted_gateway.cloud.reports import record_from_event
from twisted_gateway.tls.localca import LocalCA

Handler = Callable[[http.server.BaseHTTPRequestHandler], None]


class FakeControlPlane:
    """An HTTPS server on loopback answering every request with C{handler}; C{requests} are
    (method, path, headers) as received."""

    def __init__(self, root: str, handler: Handler, tls: bool = True, ca: LocalCA | None = None) -> None:
        os.makedirs(root, exist_ok=True)
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.handler = handler
        owner = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests.append(("GET", self.path, {k.lower(): v for k, v in self.headers.items()}))
                owner.handler(self)

            do_POST = do_GET

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        if tls:
            self.ca = ca or LocalCA(os.path.join(root, "ca"))
            cert, key = os.path.join(root, "cert.pem"), os.path.join(root, "key.pem")
            self.ca.write_leaf(("localhost", "127.0.0.1"), cert, key)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def paths(self, prefix: str = "/sync") -> list[str]:
        return [p for _, p, _ in self.requests if p.startswith(prefix)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fakes():
    made: list[FakeControlPlane] = []

    def make(*args: Any, **kwargs: Any) -> FakeControlPlane:
        made.append(FakeControlPlane(*args, **kwargs))
        return made[-1]
    yield make
    for f in made:
        f.close()


@pytest.fixture
def http_upstream():
    up = Upstream(http_handler)
    yield up
    up.close()


def linked(start_gateway, workdir: str, cp: FakeControlPlane, ca_path: str, **cloud: Any):
    key = signing_key(os.path.join(workdir, "cp-keys"))
    token_path = os.path.join(workdir, "cloud-token")
    with open(token_path, "w") as f:
        f.write(mint_cloud_token(key, "acme", "local", "idx-1", 86400.0))
    key_path = os.path.join(workdir, "cp-public.pem")
    with open(key_path, "wb") as f:
        f.write(key.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo))
    config = {"cloud": {"token_file": token_path, "token_key": key_path, "regions": {"local": cp.url},
                        "ca_bundle": ca_path, "retry_initial": 0.1, "retry_max": 0.3, "request_timeout": 1,
                        "reports": False, **cloud}}
    return start_gateway(demo=True, config=config, wait_ready=False)


def directory_answer(upstream_port: int, version: int = 1) -> bytes:
    return json.dumps({"version": version, "published_at": time.time(), "directory": {
        "shards": [shard("web", "web", 80, upstream_port, protocol="http/1.1")]}}).encode()


def routes_web(gw) -> bool:
    try:
        with gw.connect("web-80.localhost", timeout=2) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: web-80.localhost\r\nConnection: close\r\n\r\n")
            return tls.recv(100).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def test_a_sync_answer_that_trickles_is_given_up_and_asked_again(fakes, start_gateway, workdir):
    def trickle(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", "100000")
        h.end_headers()
        try:
            for _ in range(100):  # a byte every 0.2 s: headers at once, the body never
                h.wfile.write(b" ")
                h.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass
    cp = fakes(os.path.join(workdir, "cp"), trickle)
    gw = linked(start_gateway, workdir, cp, cp.ca.cert_path)
    # Before the fix the first poll waited on the body for ever: no second request, ever.
    wait_for(lambda: len(cp.paths()) >= 3, 15, what="/sync asked again after a trickling body")
    assert gw.metric("gateway_cloud_sync_failures_total", reason="unreachable") >= 2
    assert gw.logged("took longer than 1s")


def test_a_sync_answer_without_end_is_cut_at_its_bound(fakes, start_gateway, workdir):
    written = []

    def endless(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.end_headers()  # HTTP/1.0, no length: the body runs until the connection closes
        total = 0
        chunk = b" " * 65536
        try:
            for _ in range(4096):  # 256 MiB at most
                h.wfile.write(chunk)
                total += len(chunk)
        except OSError:
            pass
        written.append(total)
    cp = fakes(os.path.join(workdir, "cp"), endless)
    gw = linked(start_gateway, workdir, cp, cp.ca.cert_path, request_timeout=30)
    wait_for(lambda: written, 60, what="the gateway to stop reading")
    assert written[0] < 40 * 1024 * 1024, f"{written[0]} bytes read of an endless answer"
    wait_for(lambda: gw.logged("larger than"), 10, what="the failure logged")
    assert gw.proc.poll() is None


def test_a_redirect_to_another_origin_is_not_followed(fakes, start_gateway, workdir, http_upstream):
    elsewhere = fakes(os.path.join(workdir, "elsewhere"), lambda h: (
        h.send_response(200), h.send_header("ETag", '"1"'), h.end_headers(),
        h.wfile.write(directory_answer(http_upstream.port))), tls=False)

    def redirect(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(307)
        h.send_header("Location", f"{elsewhere.url}/sync")
        h.send_header("Content-Length", "0")
        h.end_headers()
    cp = fakes(os.path.join(workdir, "cp"), redirect)
    gw = linked(start_gateway, workdir, cp, cp.ca.cert_path)
    wait_for(lambda: gw.metric("gateway_cloud_sync_failures_total", reason="http_error") >= 2, 15,
             what="the redirect counted as an error")
    assert all(h.get("authorization", "").startswith("Bearer ") for _, _, h in cp.requests)
    # Before the fix the gateway asked the other origin and routed by its directory.
    assert elsewhere.requests == []
    assert not routes_web(gw)
    assert gw.logged("not followed")


def test_a_control_plane_with_a_certificate_of_another_ca_gets_no_request(fakes, start_gateway, workdir):
    cp = fakes(os.path.join(workdir, "cp"), lambda h: (h.send_response(304), h.end_headers()))
    other = LocalCA(os.path.join(workdir, "other-ca"))
    gw = linked(start_gateway, workdir, cp, other.cert_path)
    wait_for(lambda: gw.metric("gateway_cloud_sync_failures_total", reason="unreachable") >= 2, 15,
             what="TLS refused")
    assert cp.requests == []  # the token was never sent


# -- what a report may carry -----------------------------------------------------------------------

@pytest.mark.parametrize("path,kept", [
    ("/a/b?token=s3cret&x=1", "/a/b"),
    ("/a/b#frag", "/a/b"),
    ("http://web-80.localhost/a?api_key=k", "http://web-80.localhost/a"),
    ("/plain", "/plain"),
])
def test_a_request_record_never_carries_the_query(path, kept):
    record = record_from_event({"event_kind": "http_access", "path": path, "method": "GET", "status": 200,
                                "log_time": 1.0})
    assert record is not None and record["path"] == kept


def test_no_query_string_reaches_the_control_plane(start_gateway, workdir, http_upstream):
    from cloud_env import ControlPlane
    from test_e2e_cloud import linked_gateway, request_once, routes, web
    cp = ControlPlane(workdir, shards=[web(http_upstream.port)])
    try:
        gw = linked_gateway(start_gateway, cp, workdir)
        wait_for(lambda: routes(gw, "web-80.localhost"), 10, what="routed")
        assert request_once(gw, "web-80.localhost", "/q/1?access_token=s3cret-value&page=2") == 200
        wait_for(lambda: any(r["path"].startswith("/q/") for r in cp.records("request")), 20,
                 what="the record")
        stored = json.dumps(cp.records())
        assert "s3cret-value" not in stored and "access_token" not in stored
        assert [r["path"] for r in cp.records("request") if r["path"].startswith("/q/")] == ["/q/1"]
    finally:
        cp.stop()


# -- the spool after a crash or a damaged disk -----------------------------------------------------

def spool_service(tmp_path):
    from test_cloud_units import FakeClient, FakePublisher, identity
    from twisted.internet.task import Clock

    from twisted_gateway.cloud.reports import ReportService
    from twisted_gateway.config import CloudConfig
    clock, client = Clock(), FakeClient()
    service = ReportService(identity(tmp_path), CloudConfig(batch_records=1, retry_initial=1, retry_max=1,
                                                            flush_timeout=0),
                            str(tmp_path), clock, client=client, publisher=FakePublisher(),
                            uniform=lambda a, b: b)
    return service, clock, client


@pytest.mark.parametrize("damage", [
    lambda good: good[:len(good) // 2],  # truncated gzip
    lambda good: b"garbage, not gzip at all",
    lambda good: __import__("gzip").compress(b"[1, 2, 3]"),  # gzip of something else
    lambda good: b"",
])
def test_a_damaged_spool_file_is_dropped_counted_and_does_not_block_the_others(tmp_path, damage):
    from test_cloud_units import FakeResponse

    from twisted_gateway import metrics
    from twisted_gateway.cloud.reports import Spool, encode_batch, spool_path
    spool = Spool(spool_path(str(tmp_path), None), 1 << 20)
    good = encode_batch({"batch_id": "b"}, [{"seq": 1}])
    spool.put("a" * 32, 5, damage(good), now_ns=1)
    spool.put("b" * 32, 1, good, now_ns=2)
    before = metrics.CLOUD_REPORTS_DROPPED_RECORDS.labels(reason="corrupt")._value.get()
    service, clock, client = spool_service(tmp_path)
    service.startService()
    # The control plane would answer 500 to the damaged one (it cannot read it), for ever:
    # before the fix it was sent, retried, and every batch behind it waited.
    clock.advance(0)
    assert len(client.requests) == 1
    assert client.requests[0][2]["headers"][b"X-Batch-Id"] == [b"b" * 32]
    assert metrics.CLOUD_REPORTS_DROPPED_RECORDS.labels(reason="corrupt")._value.get() == before + 5
    client.pending.pop(0).callback(FakeResponse(200, b"{}"))
    assert len(service.spool) == 0
    service.stopService()


def test_a_write_cut_short_by_sigkill_leaves_nothing_behind(tmp_path):
    from twisted_gateway.cloud.reports import Spool, spool_path
    path = spool_path(str(tmp_path), None)
    Spool(path, 1 << 20)
    partial = os.path.join(path, ".tmp-abc00000000000000000001.1." + "c" * 32 + ".json.gz")
    with open(partial, "wb") as f:
        f.write(b"\x1f\x8b half a batch")
    spool = Spool(path, 1 << 20)
    assert len(spool) == 0 and os.listdir(path) == []
