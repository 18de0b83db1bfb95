"""
The HTTP attack corpus, end to end: raw HTTP/1.1 bytes over TLS (SNI, ALPN http/1.1) and raw h2
frames (ALPN h2) sent through the real gateway to recording upstreams (tests/recording.py), with
assertions on what each upstream actually received (its bytes, read by a strict parser of its
own), not only on what the client saw.

It checks the HTTP framing contract of the hardened gateway: request smuggling (CL.TE, TE.CL,
TE.TE, two lengths, bare LF, obs-fold, chunk sizes), request-target and Host checks, hop-by-hop
and forwarding fields, pipelining, Expect, HTTP/1.0 keep-alive, head and body deadlines, body
limits, hostile shard responses and the keep-alive pool, upgrades and websocket tunnels, the h2 to
HTTP/1.1 translation (the h2 desync), h2 pseudo-header checks, rapid reset, control-frame floods,
the /auth-redirect open redirect, the API's early refusals, and that a rejected header's value is
never logged.

One gateway (one worker) serves most of the module; a second one with two workers runs the
tests parametrized over C{envs}.
"""

from __future__ import annotations

import base64
import json
import os
import re
import select
import shutil
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import quote

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import hyperframe.frame
import pytest

from recording import SWITCH, Reply, RecordingUpstream, Request, is_websocket_upgrade
from support import Gateway, shard, tempdir, wait_for
from test_e2e_http import SECRET, token

SIGNIN = "https://signin.example.test/login"
HOSTNAME = "localhost"
WEB = "web-8080.localhost"
OTHER = "other-8080.localhost"
APP = "app-8080.localhost"
BAD = "bad-8080.localhost"
SMALL = "small-8080.localhost"
NAMES = {"web": WEB, "other": OTHER, "app": APP, "bad": BAD, "small": SMALL}
SMALL_LIMIT = 1000
COOKIE = "__Host-gateway-token"
TIMEOUT = 4.0

CONFIG = {
    "auth": {"jwt_secret": SECRET, "signin_url": SIGNIN, "leeway": 0},
    "http": {"response_timeout": 3.0},
    "limits": {"request_head_timeout": 1.0, "body_min_rate": 1024, "body_rate_window": 1.0,
               "drain_timeout": 2.0},
}

HOP_BY_HOP = ("connection", "keep-alive", "te", "trailer", "upgrade", "http2-settings",
              "proxy-connection", "proxy-authorization", "expect")


# --- clients ------------------------------------------------------------------------------------

_open_clients: list[Any] = []


@pytest.fixture(autouse=True)
def _close_clients():
    yield
    while _open_clients:
        _open_clients.pop().close()


@dataclass
class Response:
    status: int
    reason: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    interim: list[int] = field(default_factory=list)

    def values(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name.lower()]

    def header(self, name: str) -> str | None:
        values = self.values(name)
        return values[0] if values else None

    def __str__(self) -> str:
        head = "\n".join(f"    {n}: {v}" for n, v in self.headers)
        return f"{self.version} {self.status} {self.reason} (interim {self.interim})\n{head}\n    body: {self.body[:300]!r}"


class H1:
    """A raw HTTP/1.1 client over TLS: sends bytes as given, reads responses strictly enough."""

    def __init__(self, gw: Gateway, name: str, timeout: float = TIMEOUT) -> None:
        self.sock = gw.connect(name, alpn=["http/1.1"], timeout=timeout)
        assert self.sock.selected_alpn_protocol() in ("http/1.1", None)
        self.buf = b""
        self.received = b""   # every byte read, for failure messages
        self.eof = False
        _open_clients.append(self)

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def _recv(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError from None
        except (OSError, ssl.SSLError):
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        self.received += data
        return True

    def _until(self, marker: bytes, deadline: float) -> bytes | None:
        while marker not in self.buf:
            if self.eof or not self._recv(deadline):
                return None
        head, _, self.buf = self.buf.partition(marker)
        return head

    def _exactly(self, n: int, deadline: float) -> bytes | None:
        while len(self.buf) < n:
            if self.eof or not self._recv(deadline):
                return None
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_exactly(self, n: int, timeout: float = TIMEOUT) -> bytes | None:
        try:
            return self._exactly(n, time.monotonic() + timeout)
        except TimeoutError:
            return None

    def read_response(self, method: str = "GET", timeout: float = TIMEOUT,
                      stop_at_interim: bool = False) -> Response | None:
        """The next response (1xx collected on the way), or None on EOF or timeout."""
        deadline = time.monotonic() + timeout
        interim: list[int] = []
        try:
            while True:
                head = self._until(b"\r\n\r\n", deadline)
                if head is None:
                    return None
                lines = head.decode("latin-1").split("\r\n")
                version, _, rest = lines[0].partition(" ")
                code, _, reason = rest.partition(" ")
                status = int(code)
                headers = []
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers.append((name.strip().lower(), value.strip()))
                response = Response(status, reason, version, headers, b"", interim)
                if 100 <= status < 200 and status != 101:
                    interim.append(status)
                    if stop_at_interim:
                        return response
                    continue
                if status == 101 or method == "HEAD" or status in (204, 304):
                    return response
                te = [t.strip().lower() for v in response.values("transfer-encoding") for t in v.split(",")]
                if te and te[-1] == "chunked":
                    body = b""
                    while True:
                        size_line = self._until(b"\r\n", deadline)
                        if size_line is None:
                            return None
                        size = int(size_line.split(b";")[0].strip(), 16)
                        if size == 0:
                            while True:
                                trailer = self._until(b"\r\n", deadline)
                                if not trailer:
                                    break
                            break
                        data = self._exactly(size + 2, deadline)
                        if data is None:
                            return None
                        body += data[:-2]
                    response.body = body
                elif response.values("content-length"):
                    data = self._exactly(int(response.values("content-length")[0]), deadline)
                    if data is None:
                        return None
                    response.body = data
                else:
                    while not self.eof and self._recv(deadline):
                        pass
                    response.body, self.buf = self.buf, b""
                return response
        except TimeoutError:
            return None

    def closed(self, timeout: float = TIMEOUT) -> bool:
        """Whether the gateway closes this connection within C{timeout} (data kept in buf)."""
        deadline = time.monotonic() + timeout
        try:
            while not self.eof:
                self._recv(deadline)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def h2_headers(method: str = "GET", path: str = "/", authority: str | None = WEB,
               extra: list[tuple[str, str]] | None = None, scheme: str = "https") -> list[tuple[bytes, bytes]]:
    out = [(b":method", method.encode("latin-1")), (b":path", path.encode("latin-1")),
           (b":scheme", scheme.encode())]
    if authority is not None:
        out.append((b":authority", authority.encode("latin-1")))
    out += [(n.encode("latin-1"), v.encode("latin-1")) for n, v in (extra or [])]
    return out


class H2:
    """An h2 client over TLS that validates nothing it sends (so it can send malformed requests)
    and records what happens to each stream."""

    def __init__(self, gw: Gateway, name: str, timeout: float = TIMEOUT) -> None:
        self.sock = gw.connect(name, alpn=["h2"], timeout=timeout)
        assert self.sock.selected_alpn_protocol() == "h2", "the gateway did not select ALPN h2"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False, validate_inbound_headers=False))
        self.conn.initiate_connection()
        self.streams: dict[int, dict] = {}
        self.terminated: h2.events.ConnectionTerminated | None = None
        self.closed = False
        self.send_failed: str | None = None
        self.error: str | None = None
        _open_clients.append(self)
        self.flush()

    def flush(self) -> bool:
        data = self.conn.data_to_send()
        if data and not self.closed and not self.send_failed:
            try:
                self.sock.sendall(data)
            except OSError as e:
                # What the gateway sent before it closed may still be read.
                self.send_failed = f"send failed: {e!r}"
                return False
        return not self.send_failed

    def request(self, headers: list[tuple[bytes, bytes]], data: tuple[bytes, ...] = (),
                end_stream: bool = True, trailers: list[tuple[bytes, bytes]] | None = None) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.streams[sid] = {"status": None, "headers": [], "body": b"", "ended": False, "reset": None}
        self.conn.send_headers(sid, headers, end_stream=end_stream and not data and trailers is None)
        for i, chunk in enumerate(data):
            last = i == len(data) - 1
            self.conn.send_data(sid, chunk, end_stream=last and end_stream and trailers is None)
        if trailers is not None:
            self.conn.send_headers(sid, trailers, end_stream=True)
        self.flush()
        return sid

    def _feed(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            self.closed, self.error = True, f"the gateway broke HTTP/2 (client-side): {e!r}"
            return
        for event in events:
            stream = self.streams.get(getattr(event, "stream_id", None) or 0)
            if isinstance(event, h2.events.ResponseReceived) and stream is not None:
                stream["headers"] = [(bytes(n), bytes(v)) for n, v in event.headers]
                stream["status"] = int(dict(stream["headers"]).get(b":status", b"0"))
            elif isinstance(event, h2.events.InformationalResponseReceived):
                pass
            elif isinstance(event, h2.events.DataReceived):
                if stream is not None:
                    stream["body"] += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded) and stream is not None:
                stream["ended"] = True
            elif isinstance(event, h2.events.StreamReset) and stream is not None:
                stream["reset"] = event.error_code
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.terminated = event
        self.flush()

    def pump(self, deadline: float) -> bool:
        """Read once (until C{deadline}); False once the connection is closed or time is up."""
        if self.closed:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return False
        except (OSError, ssl.SSLError) as e:
            self.closed, self.error = True, f"connection reset: {e}"
            return False
        if not data:
            self.closed = True
            return False
        self._feed(data)
        return True

    def poll(self) -> None:
        """Read whatever has arrived, without waiting."""
        for _ in range(1000):
            if self.closed:
                return
            if not self.sock.pending() and not select.select([self.sock], [], [], 0)[0]:
                return
            self.pump(time.monotonic() + 1)

    def wait(self, predicate: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            if not self.pump(deadline):
                return predicate()
        return True

    def finish(self, sid: int, timeout: float = TIMEOUT) -> dict:
        """Wait for stream C{sid} to end, be reset, or the connection to end; its record."""
        s = self.streams[sid]
        self.wait(lambda: s["ended"] or s["reset"] is not None or self.terminated is not None, timeout)
        return s

    def describe(self, sid: int) -> str:
        s = self.streams[sid]
        term = (f"GOAWAY {self.terminated.error_code!r} last_stream={self.terminated.last_stream_id}"
                if self.terminated else "no GOAWAY")
        return (f"stream {sid}: status={s['status']} reset={s['reset']!r} ended={s['ended']} "
                f"headers={s['headers']} body={s['body'][:200]!r}; {term}; closed={self.closed} "
                f"{self.error or ''} {self.send_failed or ''}")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# --- the environment: a gateway and its recording shards -----------------------------------------

class Env:
    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.workdir = tempdir()
        self.ups = {name: RecordingUpstream(name) for name in NAMES}
        self.token = token(exp_in=3600)
        self._barriers = 0
        small = shard("s1", "small", 8080, self.ups["small"].port, protocol="http/1.1")
        small["ports"][0]["max_body_bytes"] = SMALL_LIMIT
        shards = [
            shard("w1", "web", 8080, self.ups["web"].port, protocol="http/1.1"),
            shard("o1", "other", 8080, self.ups["other"].port, protocol="http/1.1"),
            shard("p1", "app", 8080, self.ups["app"].port, protocol="http/1.1", public=False,
                  task="tasks/app"),
            shard("b1", "bad", 8080, self.ups["bad"].port, protocol="http/1.1"),
            small,
        ]
        for name in ("web", "app"):
            self.ups[name].route("/ws/", SWITCH)
        for kind, raw in HOSTILE_RESPONSES.items():
            self.ups["bad"].route(f"/hostile/{kind}", Reply(raw))
        self.ups["bad"].route("/extra-bytes", Reply(EXTRA_BYTES_RESPONSE))
        self.ups["web"].route("/resp/hop", Reply(HOP_RESPONSE, close=True))
        self.ups["web"].route("/resp/chunked", Reply(CHUNKED_RESPONSE))
        try:
            self.gw = Gateway(self.workdir, shards, config=CONFIG, workers=workers)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        gw = getattr(self, "gw", None)
        if gw is not None:
            gw.stop()
        for up in self.ups.values():
            up.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # What reached the shards.

    def mark(self) -> dict[str, tuple[int, int]]:
        return {name: up.mark() for name, up in self.ups.items()}

    def new(self, mark: dict[str, tuple[int, int]]) -> dict[str, list[Request]]:
        """Requests each upstream received since C{mark}, barrier requests left out."""
        return {name: [r for r in up.since(mark[name]) if not r.path.startswith("/__barrier/")]
                for name, up in self.ups.items()}

    def new_errors(self, mark: dict[str, tuple[int, int]]) -> list[str]:
        out = []
        for name, up in self.ups.items():
            touched = {r.connection for r in up.since(mark[name])}
            out += [f"{name} connection {i}: {e}" for i, e in up.errors()
                    if i >= mark[name][1] or i in touched]
        return out

    def describe(self, mark: dict[str, tuple[int, int]]) -> str:
        parts = [up.describe(mark[name]) for name, up in self.ups.items()
                 if up.since(mark[name]) or any(i >= mark[name][1] for i, _ in up.errors())]
        return "What reached the shards:\n" + ("\n".join(parts) if parts else "  nothing")

    def barrier(self, upstream: str = "web") -> None:
        """A good request through C{upstream}'s name, answered: whatever the gateway was going
        to send the shards before it has been sent."""
        self._barriers += 1
        name = NAMES[upstream]
        auth = f"Authorization: Bearer {self.token}\r\n" if upstream == "app" else ""
        c = H1(self.gw, name)
        c.send(f"GET /__barrier/{self._barriers} HTTP/1.1\r\nHost: {name}\r\n{auth}\r\n".encode())
        response = c.read_response()
        c.close()
        assert response is not None and response.status == 200, \
            f"a plain barrier request through {name} failed: {response}"

    def assert_nothing_reached(self, mark: dict[str, tuple[int, int]], what: str,
                               upstream: str = "web") -> None:
        self.barrier(upstream)
        new = self.new(mark)
        errors = self.new_errors(mark)
        assert not any(new.values()) and not errors, \
            f"{what}: the request must never reach a shard, but it did.\n{self.describe(mark)}"

    def logged_text(self) -> str:
        return json.dumps(list(self.gw.events))


@pytest.fixture(scope="module")
def env1():
    env = Env(workers=1)
    yield env
    env.stop()


@pytest.fixture(scope="module")
def env2():
    env = Env(workers=2)
    yield env
    env.stop()


@pytest.fixture
def env(env1):
    return env1


@pytest.fixture(params=[1, 2], ids=["workers1", "workers2"])
def envs(request):
    return request.getfixturevalue(f"env{request.param}")


# --- what a shard may receive -------------------------------------------------------------------

def request_problems(req: Request, upstream: str) -> list[str]:
    """Everything wrong with a request as the shard received it, per the contract."""
    p = []
    if req.error:
        p.append(f"framing the shard cannot read: {req.error}")
    if req.version != "HTTP/1.1":
        p.append(f"request line version {req.version}, not HTTP/1.1")
    if not (req.target.startswith("/") or (req.target == "*" and req.method == "OPTIONS")):
        p.append(f"target {req.target!r} is not origin-form")
    hosts = req.values("host")
    if len(hosts) != 1:
        p.append(f"{len(hosts)} Host fields: {hosts}")
    elif hosts[0].lower().rsplit(":", 1)[0] != NAMES[upstream]:
        p.append(f"Host {hosts[0]!r} is not the shard's name {NAMES[upstream]}")
    cl, te = req.values("content-length"), req.values("transfer-encoding")
    if cl and te:
        p.append(f"both Content-Length {cl} and Transfer-Encoding {te}")
    if len(cl) > 1 or (cl and not (cl[0].isdigit() and cl[0] == str(int(cl[0])))):
        p.append(f"Content-Length not one canonical decimal: {cl}")
    if te and te != ["chunked"]:
        p.append(f"Transfer-Encoding not exactly one 'chunked': {te}")
    websocket = is_websocket_upgrade(req)
    for name in HOP_BY_HOP:
        values = req.values(name)
        if not values:
            continue
        if websocket and name == "connection" and [v.lower() for v in values] == ["upgrade"]:
            continue
        if websocket and name == "upgrade" and [v.lower() for v in values] == ["websocket"]:
            continue
        p.append(f"hop-by-hop field forwarded: {name}: {values}")
    if upstream == "app":
        if req.values("authorization"):
            p.append("Authorization forwarded to a private port's shard")
        if any(COOKIE + "=" in v for v in req.values("cookie")):
            p.append("the gateway's auth cookie forwarded to a private port's shard")
    xff = req.values("x-forwarded-for")
    if xff != ["127.0.0.1"]:
        p.append(f"X-Forwarded-For is not exactly the gateway's own ['127.0.0.1']: {xff}")
    forwarded = req.values("forwarded")
    if len(forwarded) != 1 or re.findall(r'for="?([^;,"]+)', forwarded[0], re.I) != ["127.0.0.1"]:
        p.append(f"Forwarded is not exactly the gateway's own (for=127.0.0.1): {forwarded}")
    if req.values("x-forwarded-proto") != ["https"]:
        p.append(f"X-Forwarded-Proto is not exactly ['https']: {req.values('x-forwarded-proto')}")
    xfh = req.values("x-forwarded-host")
    if len(xfh) > 1 or (xfh and xfh[0].lower().rsplit(":", 1)[0] != NAMES[upstream]):
        p.append(f"X-Forwarded-Host is not the gateway's own: {xfh}")
    return p


@dataclass
class Want:
    """A request a shard must receive: method, target, framing ("none", "length", "chunked";
    None: any valid framing), decoded body, and an extra check returning a problem or None."""

    method: str
    target: str
    framing: str | None = "none"
    body: bytes = b""
    check: Callable[[Request], str | None] | None = None

    def problems(self, req: Request) -> list[str]:
        p = []
        if (req.method, req.target) != (self.method, self.target):
            p.append(f"expected {self.method} {self.target}, got {req.method} {req.target}")
        if self.framing is not None and req.framing != self.framing:
            p.append(f"expected framing {self.framing}, got {req.framing}")
        if req.body != self.body:
            p.append(f"expected body {self.body[:100]!r}, got {req.body[:100]!r}")
        if not req.complete:
            p.append("the request never completed at the shard")
        if self.check is not None:
            problem = self.check(req)
            if problem:
                p.append(problem)
        return p


def assert_received(env: Env, mark: dict, upstream: str, wants: list[Want], what: str) -> list[Request]:
    new = env.new(mark)
    got = new[upstream]
    problems = []
    if len(got) != len(wants):
        problems.append(f"{upstream} received {len(got)} request(s), expected {len(wants)}")
    for want, req in zip(wants, got):
        problems += [f"request #{req.index}: {x}" for x in want.problems(req) + request_problems(req, upstream)]
    for name, reqs in new.items():
        if name != upstream and reqs:
            problems.append(f"{name} received {len(reqs)} request(s), expected none")
    problems += env.new_errors(mark)
    assert not problems, f"{what}:\n  " + "\n  ".join(problems) + "\n" + env.describe(mark)
    return got


def metric_total(gw: Gateway, name: str, **labels: str) -> float:
    """The sum of every series of C{name} whose labels include C{labels}."""
    status, text = gw.http_get("/metrics")
    if status != 200:
        return 0.0
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, _, value = line.rpartition(" ")
        if key.split("{", 1)[0] != name:
            continue
        if all(f'{k}="{v}"' in key for k, v in labels.items()):
            total += float(value)
    return total


def wait_metric(gw: Gateway, name: str, above: float, timeout: float = 3, **labels: str) -> float:
    try:
        return wait_for(lambda: metric_total(gw, name, **labels) > above, timeout,
                        what=f"{name}{labels} above {above}")
    except AssertionError:
        raise AssertionError(f"metric {name}{labels or ''} did not grow past {above} "
                             f"(now {metric_total(gw, name, **labels)})") from None


# --- hostile and odd shard responses --------------------------------------------------------------

HOSTILE_RESPONSES = {
    "two-content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
    "transfer-encoding-gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhello",
    "transfer-encoding-chunked-gzip":
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "bad-chunk-size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "chunk-size-overflow":
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\nhello\r\n0\r\n\r\n",
    "oversized-head": b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000)
                                                      for i in range(70)) + b"Content-Length: 5\r\n\r\nhello",
    "unasked-101": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nhello",
    "content-length-and-chunked":
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "content-length-plus": b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
    "bare-lf": b"HTTP/1.1 200 OK\nContent-Length: 5\n\nhello",
}

# A response with more bytes than its length: the rest is a second response nobody asked for.
EXTRA_BYTES_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
                        b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Smuggled: yes\r\n\r\nSMUGGLED")

HOP_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close, X-Internal\r\n"
                b"X-Internal: secret\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n"
                b"Trailer: X-Checksum\r\nUpgrade: foo\r\nX-Kept: yes\r\n\r\nhello")

CHUNKED_RESPONSE = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Kept: yes\r\n\r\n"
                    b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")


# --- the HTTP/1.1 request corpus ------------------------------------------------------------------

def http(*lines: str, body: bytes = b"") -> bytes:
    """A request from its lines (request line and fields, CRLF added) and body."""
    return "".join(line + "\r\n" for line in lines).encode("latin-1") + b"\r\n" + body


def field_is(name: str, expected: list[str]) -> Callable[[Request], str | None]:
    def check(req: Request) -> str | None:
        got = req.values(name)
        return None if got == expected else f"{name}: expected {expected}, got {got}"
    return check


def absent(*names: str) -> Callable[[Request], str | None]:
    def check(req: Request) -> str | None:
        present = [n for n in names if req.values(n)]
        return f"fields that must not reach the shard did: {present}" if present else None
    return check


def checks(*fns: Callable[[Request], str | None]) -> Callable[[Request], str | None]:
    def check(req: Request) -> str | None:
        problems = [p for p in (f(req) for f in fns) if p]
        return "; ".join(problems) or None
    return check


@dataclass
class Case:
    id: str
    raw: bytes
    statuses: tuple[int, ...]
    wants: list[Want] = field(default_factory=list)
    sni: str = WEB
    upstream: str = "web"
    method: str = "GET"


REFUSE = (400,)
REFUSE_TE = (400, 501)
H = f"Host: {WEB}"
CL5 = "Content-Length: 5"
TE = "Transfer-Encoding: chunked"
SMUGGLE = f"GET /smuggled HTTP/1.1\r\nHost: {WEB}\r\n\r\n".encode()
HELLO_CHUNKED = b"5\r\nhello\r\n0\r\n\r\n"


def accepted(id: str, raw: bytes, *wants: Want, statuses: tuple[int, ...] = (200,), **kw: Any) -> Case:
    return Case(id, raw, statuses, list(wants), **kw)


def refused(id: str, raw: bytes, statuses: tuple[int, ...] = REFUSE, **kw: Any) -> Case:
    return Case(id, raw, statuses, [], **kw)


CASES = [
    # Requests the gateway must pass on, in its own framing.
    accepted("get", http("GET /c/get?x=1 HTTP/1.1", H), Want("GET", "/c/get?x=1")),
    accepted("head", http("HEAD /c/head HTTP/1.1", H), Want("HEAD", "/c/head"), method="HEAD"),
    accepted("post-length", http("POST /c/post HTTP/1.1", H, CL5, body=b"hello"),
             Want("POST", "/c/post", "length", b"hello", field_is("content-length", ["5"]))),
    accepted("post-length-zero", http("POST /c/zero HTTP/1.1", H, "Content-Length: 0"),
             Want("POST", "/c/zero", "length", b"", field_is("content-length", ["0"]))),
    accepted("get-with-body", http("GET /c/getbody HTTP/1.1", H, CL5, body=b"hello"),
             Want("GET", "/c/getbody", "length", b"hello")),
    accepted("length-leading-zeros", http("POST /c/0005 HTTP/1.1", H, "Content-Length: 0005", body=b"hello"),
             Want("POST", "/c/0005", "length", b"hello", field_is("content-length", ["5"]))),
    accepted("length-tab-ows", http("POST /c/tabcl HTTP/1.1", H, "Content-Length:\t5", body=b"hello"),
             Want("POST", "/c/tabcl", "length", b"hello")),
    accepted("chunked", http("POST /c/chunked HTTP/1.1", H, TE, body=b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
             Want("POST", "/c/chunked", "chunked", b"hello world")),
    accepted("chunked-extension", http("POST /c/ext HTTP/1.1", H, TE, body=b"5;name=value\r\nhello\r\n0\r\n\r\n"),
             Want("POST", "/c/ext", "chunked", b"hello")),
    accepted("chunked-trailer", http("POST /c/trailer HTTP/1.1", H, TE,
                                     body=b"5\r\nhello\r\n0\r\nX-Checksum: 1\r\n\r\n"),
             Want("POST", "/c/trailer", "chunked", b"hello")),
    accepted("chunked-uppercase-hex", http("POST /c/hex HTTP/1.1", H, TE, body=b"A\r\n0123456789\r\n0\r\n\r\n"),
             Want("POST", "/c/hex", "chunked", b"0123456789")),
    accepted("absolute-form-ours", http(f"GET https://{WEB}/c/abs?q=1 HTTP/1.1", H),
             Want("GET", "/c/abs?q=1")),
    accepted("options-star", http("OPTIONS * HTTP/1.1", H), Want("OPTIONS", "*")),
    accepted("host-with-port", http("GET /c/hostport HTTP/1.1", f"Host: {WEB}:443"), Want("GET", "/c/hostport")),
    accepted("http10-without-host", http("GET /c/h10 HTTP/1.0"), Want("GET", "/c/h10")),
    accepted("obs-text-value", http("GET /c/latin HTTP/1.1", H, "X-Latin: caf\xe9"),
             Want("GET", "/c/latin", check=field_is("x-latin", ["caf\xe9"]))),
    # Connection and the fields it names, and the other hop-by-hop fields, stay here.
    accepted("connection-names-x-secret", http("GET /c/secret HTTP/1.1", H, "Connection: close, X-Secret",
                                               "X-Secret: 1"),
             Want("GET", "/c/secret", check=absent("x-secret", "connection"))),
    accepted("connection-names-content-length",
             http("POST /c/conn-cl HTTP/1.1", H, "Connection: Content-Length", CL5, body=b"hello"),
             Want("POST", "/c/conn-cl", "length", b"hello", field_is("content-length", ["5"]))),
    accepted("connection-names-host", http("GET /c/conn-host HTTP/1.1", H, "Connection: Host"),
             Want("GET", "/c/conn-host")),
    accepted("connection-names-x-forwarded-for",
             http("GET /c/conn-xff HTTP/1.1", H, "Connection: X-Forwarded-For", "X-Forwarded-For: 6.6.6.6"),
             Want("GET", "/c/conn-xff")),
    accepted("hop-by-hop-fields", http("GET /c/hop HTTP/1.1", H, "TE: trailers", "Keep-Alive: timeout=5",
                                       "Proxy-Connection: keep-alive", "Proxy-Authorization: Basic eDp5",
                                       "Trailer: X-Checksum", "HTTP2-Settings: AAMAAABkAAQAAP__"),
             Want("GET", "/c/hop")),
    accepted("upgrade-h2c", http("GET /c/h2c HTTP/1.1", H, "Connection: Upgrade, HTTP2-Settings",
                                 "Upgrade: h2c", "HTTP2-Settings: AAMAAABkAAQAAP__"),
             Want("GET", "/c/h2c")),
    accepted("upgrade-without-connection", http("GET /ws/no-connection HTTP/1.1", H, "Upgrade: websocket",
                                                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                                                "Sec-WebSocket-Version: 13"),
             Want("GET", "/ws/no-connection")),
    accepted("upgrade-unknown-protocol", http("GET /ws/foo HTTP/1.1", H, "Connection: Upgrade", "Upgrade: foo/1"),
             Want("GET", "/ws/foo")),
    accepted("forwarding-fields-replaced",
             http("GET /c/xff HTTP/1.1", H, "X-Forwarded-For: 6.6.6.6", "X-Forwarded-For: 7.7.7.7",
                  "Forwarded: for=6.6.6.6;proto=http", "X-Forwarded-Host: evil.example",
                  "X-Forwarded-Proto: http"),
             Want("GET", "/c/xff")),
    accepted("expect-is-not-forwarded-with-the-body-sent-anyway",
             http("POST /c/expect HTTP/1.1", H, "Expect: 100-continue", CL5, body=b"hello"),
             Want("POST", "/c/expect", "length", b"hello")),
    # Odd but harmless: either refused or passed on cleanly.
    accepted("te-tab-ows", http("POST /c/te-tab HTTP/1.1", H, "Transfer-Encoding:\tchunked", body=HELLO_CHUNKED),
             Want("POST", "/c/te-tab", "chunked", b"hello"), statuses=(200, 400, 501)),
    accepted("te-extra-space", http("POST /c/te-sp HTTP/1.1", H, "Transfer-Encoding:  chunked", body=HELLO_CHUNKED),
             Want("POST", "/c/te-sp", "chunked", b"hello"), statuses=(200, 400, 501)),
    accepted("te-uppercase", http("POST /c/te-uc HTTP/1.1", H, "Transfer-Encoding: Chunked", body=HELLO_CHUNKED),
             Want("POST", "/c/te-uc", "chunked", b"hello"), statuses=(200, 400, 501)),
    accepted("leading-empty-line", b"\r\n" + http("GET /c/lead HTTP/1.1", H), Want("GET", "/c/lead"),
             statuses=(200, 400)),
    accepted("double-space-request-line", http("GET  /c/dbl HTTP/1.1", H), Want("GET", "/c/dbl"),
             statuses=(200, 400)),
    accepted("http10-chunked", http("POST /c/h10te HTTP/1.0", H, TE, body=HELLO_CHUNKED),
             Want("POST", "/c/h10te", "chunked", b"hello"), statuses=(200, 400, 501)),
    accepted("absolute-form-http-scheme", http(f"GET http://{WEB}/c/abs-http HTTP/1.1", H),
             Want("GET", "/c/abs-http"), statuses=(200, 400, 421)),

    # Framing conflicts and malformed lengths: 400, nothing to the shard.
    refused("two-content-length", http("POST /c/x HTTP/1.1", H, CL5, "Content-Length: 6", body=b"hello!")),
    refused("two-content-length-same", http("POST /c/x HTTP/1.1", H, CL5, CL5, body=b"hello")),
    refused("content-length-list", http("POST /c/x HTTP/1.1", H, "Content-Length: 5, 5", body=b"hello")),
    refused("content-length-plus", http("POST /c/x HTTP/1.1", H, "Content-Length: +5", body=b"hello")),
    refused("content-length-minus", http("POST /c/x HTTP/1.1", H, "Content-Length: -1", body=b"hello")),
    refused("content-length-comma", http("POST /c/x HTTP/1.1", H, "Content-Length: 1,1", body=b"h")),
    refused("content-length-hex", http("POST /c/x HTTP/1.1", H, "Content-Length: 0x5", body=b"hello")),
    refused("content-length-inner-space", http("POST /c/x HTTP/1.1", H, "Content-Length: 5 5", body=b"hello")),
    refused("content-length-empty", http("POST /c/x HTTP/1.1", H, "Content-Length: ", body=b"hello")),
    refused("cl-te", http("POST /c/x HTTP/1.1", H, "Content-Length: 4", TE, body=b"0\r\n\r\n" + SMUGGLE)),
    refused("te-cl", http("POST /c/x HTTP/1.1", H, TE, "Content-Length: 4",
                          body=b"%x\r\n" % len(SMUGGLE) + SMUGGLE + b"\r\n0\r\n\r\n")),
    refused("cl-te-space-obfuscated", http("POST /c/x HTTP/1.1", H, CL5, "Transfer-Encoding:  chunked",
                                           body=HELLO_CHUNKED)),
    refused("cl-te-tab-obfuscated", http("POST /c/x HTTP/1.1", H, CL5, "Transfer-Encoding:\tchunked",
                                         body=HELLO_CHUNKED)),
    refused("te-xchunked", http("POST /c/x HTTP/1.1", H, "Transfer-Encoding: xchunked", body=HELLO_CHUNKED),
            REFUSE_TE),
    refused("te-chunked-gzip", http("POST /c/x HTTP/1.1", H, "Transfer-Encoding: chunked, gzip",
                                    body=HELLO_CHUNKED), REFUSE_TE),
    refused("te-gzip-chunked", http("POST /c/x HTTP/1.1", H, "Transfer-Encoding: gzip, chunked",
                                    body=HELLO_CHUNKED), REFUSE_TE),
    refused("te-two-fields", http("POST /c/x HTTP/1.1", H, TE, TE, body=HELLO_CHUNKED), REFUSE_TE),
    refused("te-identity", http("POST /c/x HTTP/1.1", H, "Transfer-Encoding: identity", CL5, body=b"hello"),
            REFUSE_TE),
    refused("te-trailing-comma", http("POST /c/x HTTP/1.1", H, "Transfer-Encoding: chunked,", body=HELLO_CHUNKED),
            REFUSE_TE),
    refused("te-vertical-tab", http("POST /c/x HTTP/1.1", H, "Transfer-Encoding: chunked\x0b", body=HELLO_CHUNKED),
            REFUSE_TE),
    refused("te-space-before-colon", http("POST /c/x HTTP/1.1", H, "Transfer-Encoding : chunked", CL5,
                                          body=b"hello")),
    refused("te-obs-fold", http("POST /c/x HTTP/1.1", H, "X-Pad: a", " Transfer-Encoding: chunked", CL5,
                                body=b"hello")),
    # Line endings, folding, bytes a field cannot hold.
    refused("bare-lf", f"GET /c/x HTTP/1.1\n{H}\n\n".encode()),
    refused("bare-lf-after-request-line", f"GET /c/x HTTP/1.1\n{H}\r\n\r\n".encode()),
    refused("bare-lf-in-fields", f"GET /c/x HTTP/1.1\r\n{H}\nX-A: b\r\n\r\n".encode()),
    refused("bare-cr-in-field", f"GET /c/x HTTP/1.1\r\n{H}\r\nX-A: b\rX-B: c\r\n\r\n".encode()),
    refused("obs-fold", http("GET /c/x HTTP/1.1", H, "X-A: a", " b")),
    refused("nul-in-value", http("GET /c/x HTTP/1.1", H, "X-A: a\x00b")),
    refused("control-in-value", http("GET /c/x HTTP/1.1", H, "X-A: a\x01b")),
    refused("del-in-value", http("GET /c/x HTTP/1.1", H, "X-A: a\x7fb")),
    refused("space-before-colon", http("GET /c/x HTTP/1.1", H, "X-A : b")),
    refused("empty-field-name", http("GET /c/x HTTP/1.1", H, ": b")),
    # Chunk sizes.
    refused("chunk-size-invalid", http("POST /c/x HTTP/1.1", H, TE, body=b"zz\r\nhello\r\n0\r\n\r\n")),
    refused("chunk-size-overflow", http("POST /c/x HTTP/1.1", H, TE, body=b"fffffffffffffffff\r\nhello\r\n0\r\n\r\n")),
    refused("chunk-size-overflow-wraps", http("POST /c/x HTTP/1.1", H, TE,
                                              body=b"10000000000000005\r\nhello\r\n0\r\n\r\n")),
    refused("chunk-size-negative", http("POST /c/x HTTP/1.1", H, TE, body=b"-5\r\nhello\r\n0\r\n\r\n")),
    refused("chunk-size-0x", http("POST /c/x HTTP/1.1", H, TE, body=b"0x5\r\nhello\r\n0\r\n\r\n")),
    refused("chunk-size-trailing-space", http("POST /c/x HTTP/1.1", H, TE, body=b"5 \r\nhello\r\n0\r\n\r\n")),
    refused("chunk-data-longer-than-size", http("POST /c/x HTTP/1.1", H, TE, body=b"5\r\nhello!!\r\n0\r\n\r\n")),
    refused("chunk-bare-lf", http("POST /c/x HTTP/1.1", H, TE, body=b"5\nhello\n0\n\n")),
    # Request lines.
    refused("http09-two-parts", b"GET /c/x\r\n\r\n"),
    refused("four-parts", http("GET /c/x HTTP/1.1 extra", H)),
    refused("method-not-a-token", http("G(T /c/x HTTP/1.1", H)),
    refused("method-with-nul", http("GE\x00T /c/x HTTP/1.1", H)),
    refused("target-not-origin-form", http("GET c/x HTTP/1.1", H)),
    refused("asterisk-without-options", http("GET * HTTP/1.1", H)),
    refused("authority-form-without-connect", http(f"GET {WEB}:443 HTTP/1.1", H)),
    refused("target-with-tab", http("GET /c/a\tb HTTP/1.1", H)),
    refused("target-with-control", http("GET /c/a\x01b HTTP/1.1", H)),
    refused("version-1.2", http("GET /c/x HTTP/1.2", H), (400, 505)),
    refused("version-2.0", http("GET /c/x HTTP/2.0", H), (400, 505)),
    refused("h2-preface-on-http1", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", (400, 505)),
    refused("connect", http(f"CONNECT {WEB}:443 HTTP/1.1", H), (405,)),
    # Host.
    refused("missing-host", http("GET /c/x HTTP/1.1")),
    refused("two-hosts-same", http("GET /c/x HTTP/1.1", H, H)),
    refused("two-hosts-different", http("GET /c/x HTTP/1.1", H, f"Host: {OTHER}")),
    refused("empty-host", http("GET /c/x HTTP/1.1", "Host: "), (400, 421)),
    refused("host-of-another-shard", http("GET /c/x HTTP/1.1", f"Host: {OTHER}"), (421,)),
    refused("host-of-another-shard-with-port", http("GET /c/x HTTP/1.1", f"Host: {OTHER}:443"), (421,)),
    refused("host-foreign", http("GET /c/x HTTP/1.1", "Host: evil.example"), (421,)),
    refused("host-gateway-itself", http("GET /c/x HTTP/1.1", f"Host: {HOSTNAME}"), (421,)),
    refused("http10-host-of-another-shard", http("GET /c/x HTTP/1.0", f"Host: {OTHER}"), (421,)),
    refused("absolute-form-another-shard", http(f"GET https://{OTHER}/c/x HTTP/1.1", H), (421, 400)),
    refused("absolute-form-foreign", http("GET https://evil.example/c/x HTTP/1.1", H), (421, 400)),
    refused("absolute-form-host-mismatch", http(f"GET https://{WEB}/c/x HTTP/1.1", f"Host: {OTHER}"), (421, 400)),
    # Size limits of the head.
    refused("header-too-large", http("GET /c/x HTTP/1.1", H, "X-Big: " + "a" * 17000), (431,)),
    refused("too-many-headers", http("GET /c/x HTTP/1.1", H, *(f"X-F{i}: v" for i in range(101))), (431,)),
]


def _check_case(env: Env, case: Case) -> None:
    mark = env.mark()
    c = H1(env.gw, case.sni)
    c.send(case.raw)
    response = c.read_response(case.method)
    assert response is not None, \
        f"{case.id}: no response from the gateway (expected {case.statuses})\n{env.describe(mark)}"
    assert response.status in case.statuses, \
        f"{case.id}: the client got {response.status}, expected one of {case.statuses}\n" \
        f"{response}\n{env.describe(mark)}"
    if response.status >= 400:
        if response.status in (400, 501):
            assert c.closed(2), f"{case.id}: the connection stayed open after {response.status}"
        env.assert_nothing_reached(mark, f"{case.id} (answered {response.status})", case.upstream)
        return
    got = assert_received(env, mark, case.upstream, case.wants, case.id)
    if case.method != "HEAD":
        assert f"upstream request {got[0].index} ".encode() in response.body, \
            f"{case.id}: the client got another request's response: {response}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_http1_request_corpus(envs, case):
    """Each request alone on a new connection: the status the client gets, and exactly what
    the shard receives (nothing at all when the request is refused)."""
    _check_case(envs, case)


def test_rejections_are_counted_by_reason(env):
    """gateway_http_rejected_total{reason} counts what the parser and framing checks refused."""
    gw = env.gw
    samples = [
        (http("POST /c/x HTTP/1.1", H, CL5, "Content-Length: 6", body=b"hello!"), ("bad_request", "bad_framing")),
        (http("GET /c/x HTTP/1.1", f"Host: {OTHER}"), ("misdirected",)),
        (http("GET /c/x HTTP/1.1", H, "X-Big: " + "a" * 17000), ("header_too_large",)),
        (http(f"CONNECT {WEB}:443 HTTP/1.1", H), ("method_not_allowed",)),
    ]
    for raw, reasons in samples:
        before = sum(metric_total(gw, "gateway_http_rejected_total", reason=r) for r in reasons)
        c = H1(gw, WEB)
        c.send(raw)
        response = c.read_response()
        c.close()
        try:
            wait_for(lambda: sum(metric_total(gw, "gateway_http_rejected_total", reason=r)
                                 for r in reasons) > before, 3)
        except AssertionError:
            raise AssertionError(
                f"gateway_http_rejected_total{{reason in {reasons}}} did not grow for {raw[:60]!r} "
                f"(answered {response and response.status}); series now: "
                f"{[line for line in gw.http_get('/metrics')[1].splitlines() if 'rejected' in line]}") from None
    mark = env.mark()
    c = H1(gw, SMALL)
    before = metric_total(gw, "gateway_http_rejected_total", reason="too_large")
    c.send(http("POST /c/x HTTP/1.1", f"Host: {SMALL}", f"Content-Length: {SMALL_LIMIT + 1}"))
    response = c.read_response()
    assert response is not None and response.status == 413, f"declared body over the port's limit: {response}"
    wait_metric(gw, "gateway_http_rejected_total", before, reason="too_large")
    env.assert_nothing_reached(mark, "a declared length over max_body_bytes", "small")


# --- pipelining and the keep-alive pool -----------------------------------------------------------

def test_pipelined_requests_are_answered_in_order(envs):
    env = envs
    mark = env.mark()
    c = H1(env.gw, WEB)
    c.send(http("GET /pipe/1 HTTP/1.1", H) + http("POST /pipe/2 HTTP/1.1", H, CL5, body=b"hello")
           + http("GET /pipe/3 HTTP/1.1", H))
    responses = [c.read_response() for _ in range(3)]
    seen = [r and (r.status, r.body) for r in responses]
    for i, r in enumerate(responses, 1):
        assert r is not None and r.status == 200 and f" /pipe/{i}\n".encode() in r.body, \
            f"response {i} of 3 pipelined requests: {seen}\n{env.describe(mark)}"
    assert_received(env, mark, "web", [Want("GET", "/pipe/1"), Want("POST", "/pipe/2", "length", b"hello"),
                                       Want("GET", "/pipe/3")], "three pipelined requests")


def test_pipelined_bad_request_ends_the_connection(envs):
    """A good request, a smuggling attempt and a third request in one write: the first is
    served, the second refused, the third never read."""
    env = envs
    mark = env.mark()
    c = H1(env.gw, WEB)
    c.send(http("GET /pipe-bad/1 HTTP/1.1", H)
           + http("POST /pipe-bad/2 HTTP/1.1", H, CL5, "Content-Length: 6", body=b"hello!")
           + http("GET /pipe-bad/3 HTTP/1.1", H))
    first, second = c.read_response(), c.read_response()
    assert first is not None and first.status == 200, f"first pipelined request: {first}\n{env.describe(mark)}"
    assert second is not None and second.status == 400, f"second (two lengths): {second}\n{env.describe(mark)}"
    assert c.closed(2), "the connection stayed open after the 400"
    env.barrier()
    assert_received(env, mark, "web", [Want("GET", "/pipe-bad/1")], "pipeline with a bad request in the middle")


def test_private_port_checks_every_pipelined_request(envs):
    env = envs
    mark = env.mark()
    c = H1(env.gw, APP)
    auth = f"Authorization: Bearer {env.token}"
    c.send(http("GET /priv/1 HTTP/1.1", f"Host: {APP}", auth, f"Cookie: a=1; {COOKIE}={env.token}")
           + http("GET /priv/2 HTTP/1.1", f"Host: {APP}")
           + http("GET /priv/3 HTTP/1.1", f"Host: {APP}", auth))
    first, second = c.read_response(), c.read_response()
    assert first is not None and first.status == 200, f"request with a token: {first}\n{env.describe(mark)}"
    assert second is not None and second.status == 401, \
        f"pipelined request without a token: {second}\n{env.describe(mark)}"
    third = c.read_response(timeout=2)
    wants = [Want("GET", "/priv/1", check=field_is("cookie", ["a=1"]))]
    if third is not None:
        assert third.status == 200 and b" /priv/3\n" in third.body, f"third request: {third}"
        wants.append(Want("GET", "/priv/3"))
    env.barrier("app")
    assert_received(env, mark, "app", wants, "private port, a pipelined request without a token")


# Payloads an attacker sends on their connection to leave bytes in a shard connection of the
# pool; each is (id, bytes).  Whatever the gateway answers, the victim that follows on another
# connection must get its own response, and the shard must see exactly the victim's request.
DESYNC_ATTACKS = [
    ("cl-te", http("POST /atk HTTP/1.1", H, "Content-Length: 40", TE,
                   body=b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nX-Ignore: x")),
    ("te-cl", http("POST /atk HTTP/1.1", H, TE, "Content-Length: 4",
                   body=b"%x\r\n" % len(SMUGGLE) + SMUGGLE + b"\r\n0\r\n\r\n")),
    ("two-content-length", http("POST /atk HTTP/1.1", H, "Content-Length: 0", "Content-Length: 44",
                                body=b"GET /smuggled HTTP/1.1\r\nX-Ignore: x")),
    ("te-obfuscated", http("POST /atk HTTP/1.1", H, "Content-Length: 4", "Transfer-Encoding: xchunked",
                           body=b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nX-Ignore: x")),
    ("chunked-then-prefix", http("POST /atk HTTP/1.1", H, TE, body=b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nX-Ignore: x")),
    ("length-then-prefix", http("POST /atk HTTP/1.1", H, "Content-Length: 4",
                                body=b"bodyGET /smuggled HTTP/1.1\r\nX-Ignore: x")),
    ("chunk-size-overflow", http("POST /atk HTTP/1.1", H, TE,
                                 body=b"10000000000000004\r\nbody\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nX-Ignore: x")),
    ("bare-lf-te", b"POST /atk HTTP/1.1\r\n" + H.encode() + b"\r\nTransfer-Encoding: chunked\n"
                   b"Content-Length: 4\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nX-Ignore: x"),
    ("obs-fold-te", http("POST /atk HTTP/1.1", H, "X-Pad: a", " Transfer-Encoding: chunked", "Content-Length: 4",
                         body=b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nX-Ignore: x")),
    ("h2-data-holding-a-request", None),
]


@pytest.mark.parametrize("attack", DESYNC_ATTACKS, ids=[a[0] for a in DESYNC_ATTACKS])
def test_cross_client_desync_through_the_pool(envs, attack):
    env = envs
    name, payload = attack
    mark = env.mark()
    if payload is None:
        attacker = H2(env.gw, WEB)
        sid = attacker.request(h2_headers("GET", "/atk"), (b"GET /smuggled HTTP/1.1\r\nX-Ignore: x",))
        attacker.finish(sid)
    else:
        attacker = H1(env.gw, WEB)
        attacker.send(payload)
        attacker.read_response(timeout=2)
    victims = []
    for i in range(2):
        victim = H1(env.gw, WEB)
        victim.send(http(f"GET /victim/{name}/{i} HTTP/1.1", H))
        victims.append(victim.read_response())
        victim.close()
    attacker.close()
    for i, response in enumerate(victims):
        assert response is not None and response.status == 200 and \
            f" GET /victim/{name}/{i}\n".encode() in response.body, \
            f"victim {i} after the {name} attack got: {response}\n{env.describe(mark)}"
    new = env.new(mark)
    problems = []
    victim_requests = [r for r in new["web"] if r.path.startswith("/victim/")]
    if [r.target for r in victim_requests] != [f"/victim/{name}/0", f"/victim/{name}/1"]:
        problems.append(f"the shard did not see exactly the victims' two requests: {victim_requests}")
    for r in new["web"]:
        if r.path not in ("/atk",) and not r.path.startswith("/victim/"):
            problems.append(f"the shard saw a request nobody sent through the gateway: {r!r}")
        if "smuggled" in r.target or any("smuggled" in v.lower() or n.lower() == "x-ignore" for n, v in r.headers):
            problems.append(f"smuggled bytes inside request #{r.index}")
        problems += [f"request #{r.index}: {p}" for p in request_problems(r, "web")]
    problems += env.new_errors(mark)
    assert not problems, f"{name}:\n  " + "\n  ".join(problems) + "\n" + env.describe(mark)


# --- Expect, HTTP/1.0 ----------------------------------------------------------------------------

def test_expect_100_continue_is_answered_by_the_gateway(env):
    mark = env.mark()
    c = H1(env.gw, WEB)
    c.send(http("POST /expect/public HTTP/1.1", H, "Expect: 100-continue", CL5))
    interim = c.read_response(stop_at_interim=True)
    assert interim is not None and interim.status == 100, \
        f"expected 100 Continue before the body was sent, got {interim}\n{env.describe(mark)}"
    c.send(b"hello")
    final = c.read_response()
    assert final is not None and final.status == 200, f"after the body: {final}\n{env.describe(mark)}"
    assert_received(env, mark, "web", [Want("POST", "/expect/public", "length", b"hello")],
                    "Expect: 100-continue on a public port")


def test_expect_100_continue_on_a_private_port_with_a_token(env):
    mark = env.mark()
    c = H1(env.gw, APP)
    c.send(http("POST /expect/token HTTP/1.1", f"Host: {APP}", f"Authorization: Bearer {env.token}",
                "Expect: 100-continue", CL5))
    interim = c.read_response(stop_at_interim=True)
    assert interim is not None and interim.status == 100, f"expected 100 Continue, got {interim}"
    c.send(b"hello")
    final = c.read_response()
    assert final is not None and final.status == 200, f"after the body: {final}\n{env.describe(mark)}"
    assert_received(env, mark, "app", [Want("POST", "/expect/token", "length", b"hello")],
                    "Expect: 100-continue on a private port with a token")


@pytest.mark.parametrize("body_sent", [False, True], ids=["waits-for-100", "body-sent-anyway"])
def test_expect_100_continue_refused_without_reading_the_body(env, body_sent):
    """No token on a private port: the final 401 at once, no 100, the body never read (a body
    holding a request with a valid token must not become a request), the connection closed."""
    mark = env.mark()
    smuggled = http("GET /expect/smuggled HTTP/1.1", f"Host: {APP}", f"Authorization: Bearer {env.token}")
    c = H1(env.gw, APP)
    c.send(http("POST /expect/refused HTTP/1.1", f"Host: {APP}", "Expect: 100-continue",
                f"Content-Length: {len(smuggled)}") + (smuggled if body_sent else b""))
    response = c.read_response()
    assert response is not None and response.status == 401 and 100 not in response.interim, \
        f"expected a 401 without 100 Continue, got {response}\n{env.describe(mark)}"
    assert c.read_response(timeout=1) is None, "a second response: the body was read as a request"
    assert c.closed(2), "the connection stayed open after the refused Expect request"
    env.assert_nothing_reached(mark, "Expect: 100-continue without a token", "app")


def test_http10_keep_alive_only_when_asked(env):
    mark = env.mark()
    c = H1(env.gw, WEB)
    c.send(http("GET /h10/a HTTP/1.0", H, "Connection: keep-alive"))
    first = c.read_response()
    assert first is not None and first.status == 200 and b" /h10/a\n" in first.body, f"first: {first}"
    # Without keep-alive: one response, then the connection closes; a pipelined request after
    # it is never read.
    c.send(http("GET /h10/b HTTP/1.0", H) + http("GET /h10/never HTTP/1.0", H))
    second = c.read_response()
    assert second is not None and second.status == 200 and b" /h10/b\n" in second.body, \
        f"a second request on an HTTP/1.0 keep-alive connection: {second} (eof={c.eof})"
    assert c.closed(3), "HTTP/1.0 without keep-alive stayed open"
    assert b"/h10/never" not in c.buf, f"the request after a non-keep-alive one was answered: {c.buf!r}"
    env.barrier()
    assert_received(env, mark, "web", [Want("GET", "/h10/a"), Want("GET", "/h10/b")], "HTTP/1.0 keep-alive")


# --- deadlines and body limits ------------------------------------------------------------------

def _trickle(c: H1, data: bytes, interval: float, chunk: int, limit: float) -> float:
    """Send C{data} C{chunk} bytes at a time, C{interval} apart, until the gateway answers or
    closes, or C{limit} seconds passed; the seconds it took."""
    started = time.monotonic()
    for i in range(0, len(data), chunk):
        if time.monotonic() - started > limit:
            break
        if not c.send(data[i:i + chunk]):
            break
        # The pause between pieces is the attack; it ends early when the gateway answers.
        if select.select([c.sock], [], [], interval)[0] or c.sock.pending():
            break
    return time.monotonic() - started


def test_request_head_trickled_past_the_deadline(env):
    """limits.request_head_timeout is 1 s here: a head sent a byte at a time gets 408 and a
    close about a second after its first byte, and never reaches the shard."""
    gw = env.gw
    mark = env.mark()
    before = metric_total(gw, "gateway_http_rejected_total", reason="head_timeout")
    c = H1(gw, WEB)
    head = http("GET /trickle/head HTTP/1.1", H, "X-Pad: " + "a" * 400)
    started = time.monotonic()
    spent = _trickle(c, head, 0.02, 1, 6)
    response = c.read_response(timeout=3)
    elapsed = time.monotonic() - started
    assert response is not None and response.status == 408, \
        f"a head trickled for {spent:.1f} s: expected 408, got {response}\n{env.describe(mark)}"
    assert elapsed < 3.5, f"408 only after {elapsed:.1f} s (the deadline is 1 s)"
    assert c.closed(2), "the connection stayed open after 408"
    env.assert_nothing_reached(mark, "a trickled head")
    wait_metric(gw, "gateway_http_rejected_total", before, reason="head_timeout")


def test_body_trickled_below_the_minimum_rate(env):
    """body_min_rate 1024 B/s over body_rate_window 1 s: a body at about 200 B/s gets 408 and a
    close; the shard request it started is never completed and its connection is closed."""
    gw = env.gw
    mark = env.mark()
    before = metric_total(gw, "gateway_http_rejected_total", reason="body_timeout")
    c = H1(gw, WEB)
    c.send(http("POST /trickle/body HTTP/1.1", H, "Content-Length: 100000"))
    spent = _trickle(c, b"x" * 100000, 0.1, 20, 8)
    response = c.read_response(timeout=3)
    assert response is not None and response.status == 408, \
        f"a body trickled for {spent:.1f} s at 200 B/s: expected 408, got {response}\n{env.describe(mark)}"
    assert spent < 5, f"408 only after {spent:.1f} s (window 1 s)"
    assert c.closed(2), "the connection stayed open after 408"
    wait_metric(gw, "gateway_http_rejected_total", before, reason="body_timeout")
    _assert_aborted_at_the_shard(env, mark, "web", "/trickle/body", 100000)


def _assert_aborted_at_the_shard(env: Env, mark: dict, upstream: str, path: str, limit: int) -> None:
    """A request the gateway gave up on mid-body: at the shard it is incomplete, holds at most
    C{limit} body bytes, and its connection was closed (never reused for another request)."""
    up = env.ups[upstream]
    reqs = [r for r in env.new(mark)[upstream] if r.path == path]
    assert len(reqs) <= 1, f"{path} reached the shard {len(reqs)} times\n{env.describe(mark)}"
    if not reqs:
        return
    req = reqs[0]
    assert not req.complete, \
        f"{path}: the shard received a complete request although the client never finished it\n{env.describe(mark)}"
    assert len(req.body) <= limit, f"{path}: {len(req.body)} body bytes reached the shard (limit {limit})"
    try:
        wait_for(lambda: up.closed_by_gateway(req.connection), 3)
    except AssertionError:
        raise AssertionError(f"{path}: the shard connection holding the unfinished request was not closed "
                             f"by the gateway\n{env.describe(mark)}") from None
    assert up.connection_requests(req.connection)[-1] is req, \
        f"{path}: the shard connection was reused after an unfinished request\n{env.describe(mark)}"


def test_declared_body_over_the_port_limit_is_refused_before_anything_is_sent(env):
    mark = env.mark()
    c = H1(env.gw, SMALL)
    c.send(http("POST /limit/declared HTTP/1.1", f"Host: {SMALL}", "Content-Length: 5000"))
    response = c.read_response()
    assert response is not None and response.status == 413, \
        f"Content-Length 5000 over the port's max_body_bytes {SMALL_LIMIT} (body not sent): {response}"
    env.assert_nothing_reached(mark, "a declared length over the limit", "small")


def test_body_at_the_port_limit_passes(env):
    mark = env.mark()
    c = H1(env.gw, SMALL)
    body = os.urandom(SMALL_LIMIT)
    c.send(http("POST /limit/exact HTTP/1.1", f"Host: {SMALL}", f"Content-Length: {SMALL_LIMIT}", body=body))
    response = c.read_response()
    assert response is not None and response.status == 200, f"a body of exactly the limit: {response}"
    assert_received(env, mark, "small", [Want("POST", "/limit/exact", "length", body)], "body at the limit")


def test_chunked_body_growing_over_the_port_limit_is_aborted(env):
    mark = env.mark()
    c = H1(env.gw, SMALL)
    c.send(http("POST /limit/chunked HTTP/1.1", f"Host: {SMALL}", TE) + b"258\r\n" + b"a" * 600 + b"\r\n")
    c.send(b"258\r\n" + b"b" * 600 + b"\r\n")
    response = c.read_response()
    assert response is not None and response.status == 413, \
        f"a chunked body growing to 1200 bytes over the port limit {SMALL_LIMIT}: {response}\n{env.describe(mark)}"
    _assert_aborted_at_the_shard(env, mark, "small", "/limit/chunked", SMALL_LIMIT)


# --- hostile shard responses ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(HOSTILE_RESPONSES), ids=list(HOSTILE_RESPONSES))
def test_hostile_shard_response(envs, kind):
    """A response the strict parser refuses: 502 upstream_bad_response for the client, that shard
    connection closed and never pooled; the next request goes on a new connection."""
    env = envs
    bad = env.ups["bad"]
    mark = env.mark()
    before = metric_total(env.gw, "gateway_upstream_bad_responses_total")
    c = H1(env.gw, BAD)
    c.send(http(f"GET /hostile/{kind} HTTP/1.1", f"Host: {BAD}", "Accept: application/json"))
    response = c.read_response()
    c.close()
    hostile = [r for r in env.new(mark)["bad"] if r.path == f"/hostile/{kind}"]
    assert len(hostile) == 1, f"the request reached the shard {len(hostile)} times\n{env.describe(mark)}"
    assert response is not None and response.status == 502 and b"upstream_bad_response" in response.body, \
        f"{kind}: expected 502 upstream_bad_response, the client got {response} " \
        f"(bytes received: {c.received[:400]!r})"
    conn = hostile[0].connection
    try:
        wait_for(lambda: bad.closed_by_gateway(conn), 3)
    except AssertionError:
        raise AssertionError(f"{kind}: the gateway kept the shard connection that sent a bad response "
                             f"open\n{env.describe(mark)}") from None
    c = H1(env.gw, BAD)
    c.send(http(f"GET /hostile-next/{kind} HTTP/1.1", f"Host: {BAD}"))
    following = c.read_response()
    assert following is not None and following.status == 200 and f" /hostile-next/{kind}\n".encode() in following.body, \
        f"{kind}: the request after the bad response got {following}\n{env.describe(mark)}"
    nxt = [r for r in env.new(mark)["bad"] if r.path.startswith("/hostile-next/")]
    assert len(nxt) == 1 and nxt[0].connection != conn, \
        f"{kind}: the next request must go on a new shard connection\n{env.describe(mark)}"
    assert bad.connection_requests(conn)[-1] is hostile[0], \
        f"{kind}: the shard connection that sent a bad response carried another request\n{env.describe(mark)}"
    wait_metric(env.gw, "gateway_upstream_bad_responses_total", before)


def test_response_bytes_beyond_its_length_never_reach_another_client(envs):
    env = envs
    mark = env.mark()
    c = H1(env.gw, BAD)
    c.send(http("GET /extra-bytes HTTP/1.1", f"Host: {BAD}"))
    first = c.read_response()
    c.close()
    assert first is not None and first.status in (200, 502), f"the response with extra bytes: {first}"
    if first.status == 200:
        assert first.body == b"hello", f"the client got more than the response's length: {first}"
    for i in range(3):
        c = H1(env.gw, BAD)
        c.send(http(f"GET /after-extra/{i} HTTP/1.1", f"Host: {BAD}"))
        response = c.read_response()
        c.close()
        assert response is not None and response.status == 200 and \
            f" /after-extra/{i}\n".encode() in response.body and response.header("x-smuggled") is None, \
            f"request {i} after a response with extra bytes got {response}\n{env.describe(mark)}"


def test_response_hop_by_hop_fields_removed_and_framing_the_gateways(env):
    c = H1(env.gw, WEB)
    c.send(http("GET /resp/hop HTTP/1.1", H))
    response = c.read_response()
    assert response is not None and response.status == 200 and response.body == b"hello", f"{response}"
    names = {n for n, _ in response.headers}
    leaked = names & {"x-internal", "keep-alive", "proxy-connection", "trailer", "upgrade"}
    assert not leaked, f"hop-by-hop response fields reached the client: {leaked}\n{response}"
    assert all("x-internal" not in v.lower() for v in response.values("connection")), f"{response}"
    assert response.header("x-kept") == "yes"
    assert len(response.values("content-length") + response.values("transfer-encoding")) == 1, f"{response}"


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
def test_chunked_shard_response_in_the_clients_framing(env, version):
    c = H1(env.gw, WEB)
    c.send(http(f"GET /resp/chunked {version}", H))
    response = c.read_response()
    assert response is not None and response.status == 200 and response.body == b"hello world", f"{response}"
    framing = response.values("content-length") + response.values("transfer-encoding")
    if version == "HTTP/1.0":
        assert not response.values("transfer-encoding"), f"chunked sent to an HTTP/1.0 client: {response}"
        assert c.closed(3), "close-delimited response to HTTP/1.0 did not close"
    else:
        assert len(framing) == 1, f"framing fields {framing}"


# --- upgrades and websocket tunnels -------------------------------------------------------------

def _ws_head(path: str, host: str, connection: str = "Upgrade", *extra: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return http(f"GET {path} HTTP/1.1", f"Host: {host}", f"Connection: {connection}", "Upgrade: websocket",
                f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13", *extra)


@pytest.mark.parametrize("connection", ["Upgrade", "keep-alive, Upgrade"])
def test_websocket_tunnel_only_after_101(envs, connection):
    """Bytes after the upgrade request wait for the shard's 101, then the connection is a
    tunnel both ways."""
    env = envs
    mark = env.mark()
    web = env.ups["web"]
    c = H1(env.gw, WEB)
    path = f"/ws/tunnel-{len(connection)}"
    c.send(_ws_head(path, WEB, connection) + b"EARLY-BYTES")
    response = c.read_response()
    assert response is not None and response.status == 101 and \
        (response.header("upgrade") or "").lower() == "websocket", f"expected 101: {response}\n{env.describe(mark)}"
    assert c.read_exactly(len(b"EARLY-BYTES")) == b"EARLY-BYTES", "bytes sent with the upgrade did not come back"
    c.send(b"\x81\x05later")
    assert c.read_exactly(7) == b"\x81\x05later", "the tunnel did not carry bytes both ways"
    got = assert_received(env, mark, "web", [Want("GET", path)], "websocket upgrade")
    req = got[0]
    assert req.values("connection") in (["Upgrade"], ["upgrade"]) and req.values("upgrade") == ["websocket"], \
        f"the upgrade reached the shard as: {req.describe()}"
    assert req.early == 0, \
        f"{req.early} bytes after the upgrade request reached the shard before its 101\n{env.describe(mark)}"
    wait_for(lambda: web.tunnel(req.connection) == b"EARLY-BYTES\x81\x05later", 3,
             what="the tunnel bytes at the shard")


@pytest.mark.parametrize("variant", [
    ("h2c", ["Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", "HTTP2-Settings: AAMAAABkAAQAAP__"]),
    ("websocket-without-connection", ["Upgrade: websocket", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                                      "Sec-WebSocket-Version: 13"]),
    ("unknown-protocol", ["Connection: Upgrade", "Upgrade: foo/1"]),
], ids=lambda v: v[0])
def test_non_websocket_upgrade_is_an_ordinary_request(env, variant):
    """Any Upgrade but a websocket one with Connection: upgrade is removed: the request is an
    ordinary one and the connection stays HTTP (next request read and checked as such)."""
    name, fields = variant
    mark = env.mark()
    c = H1(env.gw, WEB)
    c.send(http(f"GET /ws/ordinary-{name} HTTP/1.1", H, *fields))
    first = c.read_response()
    assert first is not None and first.status == 200, f"{name}: {first}\n{env.describe(mark)}"
    c.send(http(f"GET /after-upgrade/{name} HTTP/1.1", H))
    second = c.read_response()
    assert second is not None and second.status == 200 and f" /after-upgrade/{name}\n".encode() in second.body, \
        f"{name}: the next request on the connection: {second}\n{env.describe(mark)}"
    assert_received(env, mark, "web", [Want("GET", f"/ws/ordinary-{name}"), Want("GET", f"/after-upgrade/{name}")],
                    f"Upgrade {name}")


@pytest.mark.parametrize("pipelined", [False, True], ids=["sequential", "pipelined"])
@pytest.mark.parametrize("port", ["private", "public"])
def test_upgrade_the_shard_answers_200_leaves_every_check_on_the_next_request(envs, port, pipelined):
    """The shard answers a websocket upgrade with 200: relayed, the connection stays HTTP, and
    the next request is parsed and checked again: without a token on a private port it is
    refused and never reaches the shard."""
    env = envs
    name, upstream = (APP, "app") if port == "private" else (WEB, "web")
    mark = env.mark()
    auth = f"Authorization: Bearer {env.token}"
    tag = f"{port}-{int(pipelined)}"
    first_raw = _ws_head(f"/ws-refused/{tag}", name, "Upgrade", auth)
    second_raw = http(f"GET /after-refused-upgrade/{tag} HTTP/1.1", f"Host: {name}")
    c = H1(env.gw, name)
    c.send(first_raw + (second_raw if pipelined else b""))
    first = c.read_response()
    assert first is not None and first.status == 200, \
        f"the shard's 200 to the upgrade must be relayed: {first}\n{env.describe(mark)}"
    if not pipelined:
        c.send(second_raw)
    second = c.read_response()
    if port == "private":
        assert second is not None and second.status == 401, \
            f"the request after the refused upgrade, without a token: {second}\n{env.describe(mark)}"
        env.barrier("app")
        assert_received(env, mark, "app", [Want("GET", f"/ws-refused/{tag}")], "refused upgrade, then no token")
    else:
        assert second is not None and second.status == 200 and b"/after-refused-upgrade/" in second.body, \
            f"the request after the refused upgrade: {second}\n{env.describe(mark)}"
        got = assert_received(env, mark, "web", [Want("GET", f"/ws-refused/{tag}"),
                                                 Want("GET", f"/after-refused-upgrade/{tag}")],
                              "refused upgrade, then a request")
        assert not env.ups["web"].tunnel(got[0].connection), "bytes were tunnelled after a 200"


def test_upgrade_with_a_chunked_body(env):
    """An upgrade request with a chunked body: refused, or forwarded with its body framed (not
    spliced raw) before any tunnel."""
    mark = env.mark()
    c = H1(env.gw, WEB)
    c.send(_ws_head("/ws/chunked-body", WEB, "Upgrade", TE) + HELLO_CHUNKED + b"AFTER")
    response = c.read_response()
    assert response is not None, f"no answer\n{env.describe(mark)}"
    if response.status >= 400:
        env.assert_nothing_reached(mark, f"upgrade with a chunked body (answered {response.status})")
        return
    assert response.status == 101, f"{response}\n{env.describe(mark)}"
    got = assert_received(env, mark, "web", [Want("GET", "/ws/chunked-body", "chunked", b"hello")],
                          "upgrade with a chunked body")
    assert c.read_exactly(5) == b"AFTER"
    wait_for(lambda: env.ups["web"].tunnel(got[0].connection) == b"AFTER", 3, what="tunnel bytes")


# --- h2 clients of HTTP/1.1 shards -------------------------------------------------------------

@dataclass
class H2Case:
    id: str
    headers: list[tuple[bytes, bytes]]
    data: tuple[bytes, ...] = ()
    end_stream: bool = True
    trailers: list[tuple[bytes, bytes]] | None = None
    expect: Any = "served"          # "served", "refused", "either" (served or refused), or a status
    want: Want | None = None
    sni: str = WEB
    upstream: str = "web"
    check: Callable[[Env, dict], None] | None = None   # extra check of what reached the shards


def _no_smuggled_body_over(limit: int) -> Callable[[Env, dict], None]:
    def check(env: Env, mark: dict) -> None:
        for r in env.new(mark)["web"]:
            assert len(r.body) <= limit and "smuggled" not in r.target, \
                f"more body than its content-length, or a smuggled request, reached the shard\n{env.describe(mark)}"
            assert not request_problems(r, "web"), request_problems(r, "web")
        assert not env.new_errors(mark), env.describe(mark)
    return check


H2_CASES = [
    H2Case("get-without-body", h2_headers("GET", "/h2/get?x=1"), want=Want("GET", "/h2/get?x=1")),
    H2Case("post-with-content-length", h2_headers("POST", "/h2/cl", extra=[("content-length", "5")]),
           (b"hel", b"lo"), want=Want("POST", "/h2/cl", "length", b"hello", field_is("content-length", ["5"]))),
    H2Case("content-length-leading-zeros", h2_headers("POST", "/h2/cl0", extra=[("content-length", "0005")]),
           (b"hello",), expect="either",
           want=Want("POST", "/h2/cl0", "length", b"hello", field_is("content-length", ["5"]))),
    H2Case("post-without-content-length", h2_headers("POST", "/h2/nolen"), (b"hel", b"lo"),
           want=Want("POST", "/h2/nolen", "chunked", b"hello")),
    # The h2 -> HTTP/1.1 desync: a GET whose DATA holds another request.
    H2Case("get-with-data-holding-a-request", h2_headers("GET", "/h2/desync"), (SMUGGLE,),
           want=Want("GET", "/h2/desync", "chunked", SMUGGLE)),
    H2Case("get-with-data-holding-two-requests", h2_headers("GET", "/h2/desync2"), (SMUGGLE, SMUGGLE),
           want=Want("GET", "/h2/desync2", "chunked", SMUGGLE + SMUGGLE)),
    H2Case("end-stream-on-empty-data", h2_headers("POST", "/h2/empty"), (b"",),
           want=Want("POST", "/h2/empty", None, b"")),
    H2Case("end-stream-on-trailers", h2_headers("POST", "/h2/trailers-only"), (), trailers=[(b"x-t", b"1")],
           want=Want("POST", "/h2/trailers-only", None, b"")),
    H2Case("data-beyond-content-length", h2_headers("POST", "/h2/clx", extra=[("content-length", "5")]),
           (b"hello" + SMUGGLE,), expect="any", check=_no_smuggled_body_over(5)),
    H2Case("content-length-plus", h2_headers("POST", "/h2/clplus", extra=[("content-length", "+5")]),
           (b"hello",), expect="refused"),
    H2Case("te-trailers", h2_headers("GET", "/h2/te", extra=[("te", "trailers")]), want=Want("GET", "/h2/te")),
    H2Case("forwarding-fields-replaced", h2_headers("GET", "/h2/xff", extra=[
        ("x-forwarded-for", "6.6.6.6"), ("forwarded", "for=6.6.6.6"), ("x-forwarded-host", "evil.example"),
        ("x-forwarded-proto", "http")]), want=Want("GET", "/h2/xff")),
    H2Case("host-field-alone", h2_headers("GET", "/h2/host-only", authority=None, extra=[("host", WEB)]),
           want=Want("GET", "/h2/host-only")),
    H2Case("authority-with-port", h2_headers("GET", "/h2/port", authority=f"{WEB}:443"), want=Want("GET", "/h2/port")),
    H2Case("options-asterisk", h2_headers("OPTIONS", "*"), want=Want("OPTIONS", "*")),
    # Refused: a reset or a 4xx, never a request to any shard.
    H2Case("host-differs-from-authority", h2_headers("GET", "/h2/x", extra=[("host", OTHER)]), expect="refused"),
    H2Case("authority-of-another-shard", h2_headers("GET", "/h2/x", authority=OTHER), expect=421),
    H2Case("authority-foreign", h2_headers("GET", "/h2/x", authority="evil.example"), expect=421),
    H2Case("host-alone-of-another-shard", h2_headers("GET", "/h2/x", authority=None, extra=[("host", OTHER)]),
           expect=421),
    H2Case("path-with-space", h2_headers("GET", "/h2/a b"), expect="refused"),
    H2Case("path-with-tab", h2_headers("GET", "/h2/a\tb"), expect="refused"),
    H2Case("path-with-del", h2_headers("GET", "/h2/a\x7fb"), expect="refused"),
    H2Case("path-with-nul", h2_headers("GET", "/h2/a\x00b"), expect="refused"),
    H2Case("path-with-crlf", h2_headers("GET", "/h2/a\r\nX-Injected: 1"), expect="refused"),
    H2Case("path-with-request-smuggled", h2_headers("GET", "/h2/a HTTP/1.1\r\nHost: x\r\n\r\nGET /smuggled"),
           expect="refused"),
    H2Case("path-absolute-form", h2_headers("GET", f"https://{WEB}/h2/x"), expect="refused"),
    H2Case("path-without-slash", h2_headers("GET", "h2/x"), expect="refused"),
    H2Case("path-empty", h2_headers("GET", ""), expect="refused"),
    H2Case("asterisk-without-options", h2_headers("GET", "*"), expect="refused"),
    H2Case("method-with-space", h2_headers("GE T", "/h2/x"), expect="refused"),
    H2Case("method-with-separator", h2_headers("GET(", "/h2/x"), expect="refused"),
    H2Case("method-with-request-line", h2_headers("GET /smuggled HTTP/1.1\r\nX:", "/h2/x"), expect="refused"),
    H2Case("method-empty", h2_headers("", "/h2/x"), expect="refused"),
    H2Case("connect", h2_headers("CONNECT", "/h2/x"), expect="refused"),
    H2Case("connection-field", h2_headers("GET", "/h2/x", extra=[("connection", "keep-alive")]), expect="refused"),
    H2Case("transfer-encoding-field", h2_headers("POST", "/h2/x", extra=[("transfer-encoding", "chunked")]),
           (HELLO_CHUNKED,), expect="refused"),
    H2Case("upgrade-field", h2_headers("GET", "/h2/x", extra=[("upgrade", "websocket")]), expect="refused"),
    H2Case("te-not-trailers", h2_headers("GET", "/h2/x", extra=[("te", "gzip")]), expect="refused"),
    H2Case("field-value-with-crlf", h2_headers("GET", "/h2/x", extra=[("x-a", "a\r\nX-Injected: 1")]),
           expect="refused"),
    H2Case("declared-length-over-the-port-limit",
           h2_headers("POST", "/h2/limit", authority=SMALL, extra=[("content-length", "5000")]),
           (b"x" * 100,), end_stream=False, expect=413, sni=SMALL, upstream="small"),
]


@pytest.mark.parametrize("case", H2_CASES, ids=[c.id for c in H2_CASES])
def test_h2_request_to_an_http1_shard(envs, case):
    env = envs
    mark = env.mark()
    client = H2(env.gw, case.sni)
    sid = client.request(case.headers, case.data, case.end_stream, case.trailers)
    s = client.finish(sid)
    outcome = client.describe(sid)
    served = s["status"] is not None and s["status"] < 400
    if case.expect == "any":
        env.barrier(case.upstream)
        case.check(env, mark)
        return
    if case.expect == "served":
        assert served, f"{case.id}: expected the request to be served, got {outcome}\n{env.describe(mark)}"
    if isinstance(case.expect, int):
        assert s["status"] == case.expect, f"{case.id}: expected {case.expect}, got {outcome}\n{env.describe(mark)}"
    elif case.expect == "refused" or (case.expect == "either" and not served):
        assert not served and (s["status"] is None or 400 <= s["status"] < 500), \
            f"{case.id}: expected a stream reset or a 4xx, got {outcome}\n{env.describe(mark)}"
    if not served:
        env.assert_nothing_reached(mark, f"{case.id} ({outcome})", case.upstream)
        return
    assert s["status"] == 200 and s["ended"], f"{case.id}: {outcome}\n{env.describe(mark)}"
    got = assert_received(env, mark, case.upstream, [case.want], case.id)
    assert f"upstream request {got[0].index} ".encode() in s["body"], \
        f"{case.id}: the client got another request's response: {outcome}"


def test_h2_body_growing_over_the_port_limit_is_aborted(env):
    """An h2 body without content-length growing past the port's max_body_bytes: 413 (no
    response began), the shard request never completed."""
    mark = env.mark()
    client = H2(env.gw, SMALL)
    sid = client.request(h2_headers("POST", "/h2/limit-grows", authority=SMALL), (b"a" * 600,), end_stream=False)
    client.conn.send_data(sid, b"b" * 600)
    client.flush()
    s = client.finish(sid)
    assert s["status"] == 413, f"expected 413: {client.describe(sid)}\n{env.describe(mark)}"
    _assert_aborted_at_the_shard(env, mark, "small", "/h2/limit-grows", SMALL_LIMIT)


def test_h2_rapid_reset(env):
    """HEADERS + RST_STREAM pairs, two thousand per write: GOAWAY ENHANCE_YOUR_CALM and a close;
    the shard sees far fewer requests than were opened; a good client is served during and
    after; the gateway's memory stays bounded."""
    gw = env.gw
    mark = env.mark()
    rss_before = gw.rss_bytes()
    abuse_before = metric_total(gw, "gateway_h2_abuse_total", kind="rapid_reset")
    good = H2(gw, WEB)
    attacker = H2(gw, WEB)
    attacker.wait(lambda: attacker.conn.remote_settings.max_concurrent_streams is not None, 1)
    opened, good_results = 0, []
    deadline = time.monotonic() + 20
    sid = attacker.conn.get_next_available_stream_id()
    while opened < 10000 and time.monotonic() < deadline and not attacker.closed and attacker.terminated is None:
        for _ in range(2000):
            attacker.conn.send_headers(sid, h2_headers("GET", f"/rr/{sid}"), end_stream=True)
            attacker.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            sid += 2
            opened += 1
        if not attacker.flush():
            break
        # Whatever the gateway answers to this batch (a GOAWAY ends the attack).
        attacker.wait(lambda: attacker.terminated is not None or attacker.closed, 0.25)
        g = good.request(h2_headers("GET", f"/rr-good/{opened}"))
        good_results.append((opened, good.finish(g)["status"]))
    attacker.wait(lambda: attacker.closed, 5)
    term = attacker.terminated
    assert term is not None and term.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, \
        f"after {opened} HEADERS+RST_STREAM pairs: expected GOAWAY ENHANCE_YOUR_CALM, got " \
        f"{term!r}, closed={attacker.closed} {attacker.error or ''} {attacker.send_failed or ''}"
    assert attacker.closed, "the connection stayed open after the GOAWAY"
    g = good.request(h2_headers("GET", "/rr-good/after"))
    good_results.append(("after", good.finish(g)["status"]))
    fresh = H2(gw, WEB)
    f = fresh.request(h2_headers("GET", "/rr-good/fresh"))
    good_results.append(("fresh", fresh.finish(f)["status"]))
    assert all(status == 200 for _, status in good_results), f"the good client was not served: {good_results}"
    reached = [r for r in env.new(mark)["web"] if r.path.startswith("/rr/")]
    assert len(reached) <= 150 and len(reached) * 5 <= opened, \
        f"{len(reached)} of {opened} reset streams were opened on the shard"
    growth = gw.rss_bytes() - rss_before
    assert growth < 64 << 20, f"the gateway's RSS grew {growth >> 20} MiB"
    wait_metric(gw, "gateway_h2_abuse_total", abuse_before, kind="rapid_reset")


def test_h2_a_few_resets_are_not_abuse(env):
    client = H2(env.gw, WEB)
    for _ in range(20):
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_headers(sid, h2_headers("GET", f"/rr-few/{sid}"), end_stream=True)
        client.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    client.flush()
    sid = client.request(h2_headers("GET", "/rr-few/after"))
    s = client.finish(sid)
    assert s["status"] == 200 and client.terminated is None, \
        f"twenty resets (under the burst of 100) cut the connection: {client.describe(sid)}"


@pytest.mark.parametrize("frame", ["ping", "settings"])
def test_h2_control_frames_from_a_client_that_never_reads(env, frame):
    """PINGs (or SETTINGS) from a client with a tiny receive buffer that reads nothing: the
    gateway cannot write the acknowledgements; past limits.h2_max_pending_control it sends
    GOAWAY ENHANCE_YOUR_CALM and closes, and its memory stays bounded."""
    gw = env.gw
    rss_before = gw.rss_bytes()
    abuse_before = metric_total(gw, "gateway_h2_abuse_total", kind="control_flood")
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(3)
    raw.connect(("127.0.0.1", gw.tls_port))
    ctx = gw.client_context()
    ctx.set_alpn_protocols(["h2"])
    tls = ctx.wrap_socket(raw, server_hostname=WEB)
    try:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        conn.initiate_connection()
        tls.sendall(conn.data_to_send())
        if frame == "ping":
            batch = b"".join(hyperframe.frame.PingFrame(0, opaque_data=i.to_bytes(8, "big")).serialize()
                             for i in range(1000))
        else:
            batch = hyperframe.frame.SettingsFrame(0).serialize() * 1000
        # The gateway's kernel send buffer grows to 4 MiB (tcp_wmem) before its transport sees
        # backpressure: a million frames (17 MB of PINGs, 9 MB of SETTINGS) go well past it.
        sent, stopped = 0, "the bound of 1,000,000 frames"
        deadline = time.monotonic() + 20
        while sent < 1_000_000 and time.monotonic() < deadline:
            try:
                tls.sendall(batch)
            except socket.timeout:
                stopped = "sending blocked (the gateway stopped reading)"
                break
            except OSError as e:
                stopped = f"the gateway closed: {e!r}"
                break
            sent += 1000
        growth = gw.rss_bytes() - rss_before
        # Now read what the gateway wrote, to its end.
        terminated, ended, received = None, False, 0
        tls.settimeout(3)
        read_deadline = time.monotonic() + 10
        while time.monotonic() < read_deadline:
            try:
                data = tls.recv(1 << 20)
            except socket.timeout:
                break
            except (OSError, ssl.SSLError):
                ended = True
                break
            if not data:
                ended = True
                break
            received += len(data)
            try:
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ConnectionTerminated):
                        terminated = event
            except h2.exceptions.ProtocolError:
                pass
    finally:
        tls.close()
    calm = terminated is not None and terminated.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    counted = metric_total(gw, "gateway_h2_abuse_total", kind="control_flood") > abuse_before
    assert ended and (calm or counted), \
        f"{sent} {frame} frames sent ({stopped}), {received} bytes read back: connection ended={ended}, " \
        f"GOAWAY={terminated!r}, counted={counted}"
    assert growth < 64 << 20, f"the gateway's RSS grew {growth >> 20} MiB during the flood"
    wait_metric(gw, "gateway_h2_abuse_total", abuse_before, kind="control_flood")


# --- redirects and Location ---------------------------------------------------------------------

FOREIGN_ORIG_URLS = [
    ("backslash-userinfo", "https://evil.example\\@app-8080.localhost/"),
    ("backslash-host", "https:\\\\evil.example\\app-8080.localhost/"),
    ("userinfo-then-ours", "https://app-8080.localhost@evil.example/"),
    ("userinfo-on-ours", "https://user:pw@app-8080.localhost/"),
    ("scheme-relative", "//evil.example/"),
    ("http-scheme", "http://app-8080.localhost/"),
    ("suffix-trick", "https://app-8080.localhost.evil.example/"),
    ("not-a-subdomain", "https://evillocalhost/"),
    ("tab-in-host", "https://evil.example\t.app-8080.localhost/"),
    ("newline-in-host", "https://evil.example\n.app-8080.localhost/"),
    ("crlf-header-injection", "https://app-8080.localhost/\r\nSet-Cookie: injected=1"),
    ("space", "https://app-8080.localhost/ x"),
    ("nul", "https://app-8080.localhost/\x00"),
    ("del", "https://app-8080.localhost/\x7f"),
    ("javascript", "javascript:alert(1)//app-8080.localhost/"),
]


def _auth_redirect(env: Env, orig_url: str, tok: str | None = None, encode: bool = True) -> Response | None:
    value = quote(orig_url, safe="") if encode else orig_url
    c = H1(env.gw, APP)
    c.send(http(f"GET /auth-redirect?token={tok or env.token}&orig_url={value} HTTP/1.1", f"Host: {APP}"))
    return c.read_response()


def _clean_header_values(headers: list[tuple[Any, Any]]) -> list[str]:
    bad = []
    for n, v in headers:
        v = v.encode("latin-1") if isinstance(v, str) else v
        if re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", v):
            bad.append(f"{n!r}: {v!r}")
    return bad


@pytest.mark.parametrize("case", FOREIGN_ORIG_URLS, ids=[c[0] for c in FOREIGN_ORIG_URLS])
def test_auth_redirect_refuses_foreign_orig_url(env, case):
    _, orig = case
    mark = env.mark()
    response = _auth_redirect(env, orig)
    assert response is not None and 400 <= response.status < 500, \
        f"orig_url={orig!r}: expected a refusal, got {response}"
    assert response.header("set-cookie") is None, f"a cookie was set for orig_url={orig!r}: {response}"
    assert response.header("location") is None, f"redirected for orig_url={orig!r}: {response}"
    env.assert_nothing_reached(mark, "/auth-redirect", "app")


def test_auth_redirect_refuses_a_raw_backslash_orig_url(env):
    """The brief's own form, not percent-encoded in the request target."""
    response = _auth_redirect(env, f"https://evil.example\\@{APP}/", encode=False)
    assert response is not None and 400 <= response.status < 500 and response.header("location") is None \
        and response.header("set-cookie") is None, f"{response}"


def test_auth_redirect_accepts_our_url_and_checks_the_token_task(env):
    orig = f"https://{APP}:{env.gw.tls_port}/page?a=b"
    response = _auth_redirect(env, orig)
    assert response is not None and response.status == 307 and response.header("location") == orig, f"{response}"
    assert (response.header("set-cookie") or "").startswith(f"{COOKIE}={env.token}")
    other = token(prefixes=["other/"])
    response = _auth_redirect(env, orig, tok=other)
    assert response is not None and response.status == 403 and response.header("set-cookie") is None, \
        f"a token for another task: {response}"


H2_LOCATION_CASES = [
    ("auth-redirect-crlf", "/auth-redirect?token={token}&orig_url=" +
     quote("https://app-8080.localhost/\r\nSet-Cookie: injected=1", safe="")),
    ("auth-redirect-lf", "/auth-redirect?token={token}&orig_url=" + quote("https://app-8080.localhost/\nx", safe="")),
    ("auth-redirect-nul", "/auth-redirect?token={token}&orig_url=" + quote("https://app-8080.localhost/\x00", safe="")),
    ("signin-redirect-encoded-crlf", "/page%0D%0ASet-Cookie:%20injected=1"),
    ("signin-redirect-encoded-nul", "/page%00x"),
]


@pytest.mark.parametrize("case", H2_LOCATION_CASES, ids=[c[0] for c in H2_LOCATION_CASES])
def test_h2_location_never_holds_cr_lf_or_controls(env, case):
    _, path = case
    client = H2(env.gw, APP)
    sid = client.request(h2_headers("GET", path.replace("{token}", env.token), authority=APP,
                                    extra=[("accept", "text/html")]))
    s = client.finish(sid)
    assert s["status"] is not None or s["reset"] is not None, f"no answer: {client.describe(sid)}"
    bad = _clean_header_values(s["headers"])
    assert not bad, f"response fields with CR, LF or control bytes: {bad}"
    assert not any(n == b"set-cookie" and b"injected" in v for n, v in s["headers"]), client.describe(sid)
    if path.startswith("/auth-redirect"):
        assert s["status"] is not None and 400 <= s["status"] < 500 and \
            not any(n in (b"location", b"set-cookie") for n, _ in s["headers"]), \
            f"an orig_url with control characters must be refused: {client.describe(sid)}"


def test_http1_signin_redirect_location_is_clean(env):
    c = H1(env.gw, APP)
    c.send(http("GET /page%0D%0ASet-Cookie:%20injected=1 HTTP/1.1", f"Host: {APP}", "Accept: text/html"))
    response = c.read_response()
    assert response is not None, "no answer"
    assert not _clean_header_values(response.headers) and response.header("set-cookie") is None, f"{response}"


# --- the API: token and size before the body --------------------------------------------------

@pytest.mark.parametrize("with_token", [False, True], ids=["no-token", "token-too-large"])
def test_api_refuses_before_reading_the_body(env, with_token):
    c = H1(env.gw, HOSTNAME)
    auth = [f"Authorization: Bearer {env.token}"] if with_token else []
    c.send(http("POST /v1/shards/list HTTP/1.1", f"Host: {HOSTNAME}", "Content-Type: application/json",
                f"Content-Length: {4 << 20}", *auth))
    response = c.read_response()
    expected = 413 if with_token else 401
    assert response is not None and response.status == expected, \
        f"a 4 MiB API body never sent: expected {expected} at once, got {response}"
    assert c.closed(2), "the connection stayed open waiting for a body the gateway refused"


# --- logs -----------------------------------------------------------------------------------------

LOGGED_SECRET_CASES = [
    ("space-before-colon", lambda s: http("GET /c/x HTTP/1.1", H, f"Authorization : Basic {s}")),
    ("nul-in-value", lambda s: http("GET /c/x HTTP/1.1", H, f"Authorization: Basic {s}\x00")),
    ("del-in-value", lambda s: http("GET /c/x HTTP/1.1", H, f"X-Api-Key: {s}\x7f")),
    ("obs-fold", lambda s: http("GET /c/x HTTP/1.1", H, "X-Api-Key: a", f" {s}")),
    ("bare-lf", lambda s: f"GET /c/x HTTP/1.1\r\n{H}\r\nAuthorization: Basic {s}\nX: y\r\n\r\n".encode()),
    ("bad-content-length", lambda s: http("POST /c/x HTTP/1.1", H, f"Content-Length: {s}")),
    ("bad-transfer-encoding", lambda s: http("POST /c/x HTTP/1.1", H, f"Transfer-Encoding: {s}")),
    ("foreign-host", lambda s: http("GET /c/x HTTP/1.1", f"Host: {s}.example")),
]


@pytest.mark.parametrize("case", LOGGED_SECRET_CASES, ids=[c[0] for c in LOGGED_SECRET_CASES])
def test_rejected_header_value_is_never_logged(env, case):
    name, build = case
    secret = base64.b64encode(b"user:" + os.urandom(12).hex().encode()).decode().rstrip("=")
    c = H1(env.gw, WEB)
    c.send(build(secret))
    response = c.read_response()
    assert response is not None and response.status >= 400, f"{name}: {response}"
    c.close()
    # A request after it, whose access line shows the gateway's log is written past the refusal.
    before = len(env.gw.events)
    env.barrier()
    try:
        wait_for(lambda: any("/__barrier/" in str(e) for e in env.gw.events[before:]), 3)
    except AssertionError:
        pass
    leaked = [e for e in list(env.gw.events) if secret in json.dumps(e)]
    assert not leaked, f"{name}: the rejected value was logged: {leaked}"


# --- forwarding fields from a trusted proxy -----------------------------------------------------

def test_forwarding_fields_kept_from_a_trusted_proxy(start_gateway):
    up = RecordingUpstream("trusted")
    try:
        gw = start_gateway([shard("w1", "web", 8080, up.port, protocol="http/1.1")],
                           config={"http": {"trusted_proxies": ["127.0.0.1/32"]}})
        c = H1(gw, WEB)
        c.send(http("GET /trusted HTTP/1.1", H, "X-Forwarded-For: 6.6.6.6", "Forwarded: for=6.6.6.6"))
        response = c.read_response()
        assert response is not None and response.status == 200, f"{response}"
        req = up.requests()[-1]
        assert req.values("x-forwarded-for") == ["6.6.6.6, 127.0.0.1"], req.describe()
        assert len(req.values("forwarded")) == 1 and \
            re.findall(r'for="?([^;,"]+)', req.values("forwarded")[0]) == ["6.6.6.6", "127.0.0.1"], req.describe()
    finally:
        up.close()


# --- the whole module: what the shards received, and the gateway's health ------------------------

def test_every_request_the_shards_received_was_well_formed(envs):
    """Runs last: every request any shard received during the module, checked against the
    contract, and every byte read by the strict parser."""
    env = envs
    problems = []
    for name, up in env.ups.items():
        for req in up.requests():
            problems += [f"{name} #{req.index} {req.method} {req.target}: {p}" for p in request_problems(req, name)]
        problems += [f"{name} connection {i}: {e}" for i, e in up.errors()]
    assert not problems, f"{len(problems)} problem(s) in what the shards received:\n  " + "\n  ".join(problems[:200])


def test_the_gateway_logged_no_crash(envs):
    crashes = [e for e in list(envs.gw.events)
               if e.get("level") == "critical" or "Traceback" in str(e.get("message"))]
    assert not crashes, "the gateway logged a crash:\n" + "\n".join(str(e.get("message"))[:2000] for e in crashes[:5])


# --- the recording upstream's own parser --------------------------------------------------------

@pytest.mark.parametrize("raw, problem", [
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", None),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello", None),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", None),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello", "Content-Length"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 05\r\n\r\nhello", "canonical"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", "both"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", "chunked"),
    (b"GET / HTTP/1.1\nHost: a\r\n\r\n", "bare"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", "obs-fold"),
    (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", "three parts"),
    (b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", "empty line"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk-size"),
])
def test_the_recorders_parser_is_strict(raw, problem):
    from recording import ParseError, parse_request
    if problem is None:
        fields, consumed, complete = parse_request(raw)
        assert complete and consumed == len(raw)
    else:
        with pytest.raises(ParseError, match=problem):
            parse_request(raw)
