"""
A recording upstream for the HTTP attack corpus (tests/test_http_attacks.py).

L{RecordingUpstream} is a threaded raw TCP server on 127.0.0.1 that stands where a shard's
HTTP/1.1 port would be.  It keeps two views of what the gateway sent it:

 - the ground truth: every byte each accepted connection received (L{RecordingUpstream.connections});
 - its own reading of those bytes: a small, strict HTTP/1.1 request parser (request line, header
   fields, a body framed by Content-Length or chunked) splits them into L{Request}s
   (L{RecordingUpstream.requests}).  Whatever that parser cannot read is written down as an error
   of the connection (L{RecordingUpstream.errors}): the gateway must never send such bytes.

Each request it parsed completely is answered: by default ``200 OK`` with a small body naming
the request's number and target (and ``Content-Length``); or, per path prefix
(L{RecordingUpstream.route}), with raw response bytes given by the test (hostile responses), a
websocket ``101 Switching Protocols`` after which the connection echoes raw bytes
(L{SWITCH}), a close without an answer (L{CLOSE}), or no answer at all (L{SILENT}).
"""

from __future__ import annotations

import base64
import hashlib
import re
import socket
import threading
from typing import Any, Iterable

TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# A field value: visible characters, obs-text, SP and HTAB; no other control byte, no DEL.
FIELD_VALUE = re.compile(rb"[^\x00-\x08\x0a-\x1f\x7f]*\Z")
# A request target as the gateway may write it: printable ASCII, no space.
TARGET = re.compile(rb"[\x21-\x7e]+\Z")
VERSION = re.compile(rb"HTTP/1\.[01]\Z")
CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})(;[^\r\n]*)?\Z")

MAX_HEAD = 1 << 20

WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class ParseError(Exception):
    """Bytes the strict parser refuses: the gateway sent something a shard cannot read safely."""


class Reply:
    """Raw response bytes (one write, or several pieces), optionally closing afterwards."""

    def __init__(self, data: bytes | list[bytes], close: bool = False) -> None:
        self.pieces = [data] if isinstance(data, bytes) else list(data)
        self.close = close

    def __repr__(self) -> str:
        return f"Reply({b''.join(self.pieces)[:80]!r}..., close={self.close})"


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


SWITCH = _Sentinel("SWITCH")
"""Answer a websocket upgrade (Upgrade: websocket, Connection: upgrade) with 101 and echo raw
bytes from then on; a request without those fields gets the default answer."""
CLOSE = _Sentinel("CLOSE")
"""Close the connection without answering."""
SILENT = _Sentinel("SILENT")
"""Never answer (keep reading)."""


class Request:
    """One request as the recording upstream read it."""

    def __init__(self, index: int, connection: int, method: str, target: str, version: str,
                 headers: list[tuple[str, str]], framing: str) -> None:
        self.index = index              # 1-based, in arrival order across the upstream
        self.connection = connection    # index into RecordingUpstream.connections()
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers          # (name as sent, value without surrounding OWS), latin-1
        self.framing = framing          # "none", "length" or "chunked"
        self.body = b""                 # the decoded body (so far, while incomplete)
        self.trailers: list[tuple[str, str]] = []
        self.complete = False           # the whole body arrived
        self.error: str | None = None   # the head was read but its framing is refused
        self.early: int | None = None   # bytes already received beyond this request when answered
        self.answered = False
        self.raw = b""                  # this request's bytes as received (head, and body so far)

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def values(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for n, v in self.headers if n.lower() == lname]

    def header(self, name: str) -> str | None:
        values = self.values(name)
        return values[0] if values else None

    def names(self) -> set[str]:
        return {n.lower() for n, _ in self.headers}

    def describe(self, body_limit: int = 200) -> str:
        state = "complete" if self.complete else "INCOMPLETE"
        lines = [f"#{self.index} on connection {self.connection}: {self.method} {self.target} "
                 f"{self.version} [{self.framing}, {state}, {len(self.body)} body bytes"
                 f"{', early=' + str(self.early) if self.early else ''}]"
                 + (f" ERROR: {self.error}" if self.error else "")]
        lines += [f"    {n}: {v}" for n, v in self.headers]
        if self.body:
            body = self.body[:body_limit]
            lines.append(f"    body: {body!r}{'...' if len(self.body) > body_limit else ''}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<Request #{self.index} {self.method} {self.target} {self.framing}>"


class _Connection:
    def __init__(self, index: int, sock: socket.socket) -> None:
        self.index = index
        self.sock = sock
        self.raw = bytearray()
        self.tunnel = bytearray()
        self.requests: list[Request] = []
        self.errors: list[str] = []
        self.closed_by_peer = False   # the gateway closed (EOF or reset)
        self.closed_by_us = False
        self.done = threading.Event()


def _split_head(head: bytes) -> tuple[bytes, list[bytes]]:
    if b"\n" in head.replace(b"\r\n", b"") or b"\r" in head.replace(b"\r\n", b""):
        raise ParseError("bare CR or LF in the request head")
    lines = head.split(b"\r\n")
    return lines[0], lines[1:]


def _parse_fields(lines: Iterable[bytes], what: str) -> list[tuple[bytes, bytes]]:
    fields = []
    for line in lines:
        if not line:
            raise ParseError(f"empty {what} line")
        if line[:1] in (b" ", b"\t"):
            raise ParseError(f"obs-fold continuation line {line[:60]!r} in the {what}")
        name, sep, value = line.partition(b":")
        if not sep:
            raise ParseError(f"{what} line without a colon: {line[:60]!r}")
        if not TOKEN.match(name):
            raise ParseError(f"{what} field name {name[:60]!r} is not a token")
        value = value.strip(b" \t")
        if not FIELD_VALUE.match(value):
            raise ParseError(f"control byte in the value of {what} field {name.decode('latin-1')}")
        fields.append((name, value))
    return fields


def parse_request(buf: bytes) -> tuple[dict, int, bool] | None:
    """
    Parse one request at the start of C{buf}.  Returns None while the head is incomplete,
    else (fields, consumed, complete): C{fields} has the head's parts and the body read so far;
    C{consumed} is the length of the request when complete.  Raises L{ParseError} on anything a
    strict HTTP/1.1 server would refuse; the error carries the head parts when they were read
    (C{exc.fields}).
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise ParseError(f"request head larger than {MAX_HEAD} bytes")
        # A bare LF or CR in what arrived so far is already an error.
        probe = buf[:-1] if buf.endswith(b"\r") else buf
        if b"\n" in probe.replace(b"\r\n", b"") or b"\r" in probe.replace(b"\r\n", b""):
            raise ParseError("bare CR or LF in the request head")
        return None
    request_line, field_lines = _split_head(buf[:end])
    if not request_line:
        raise ParseError("empty line before the request line")
    parts = request_line.split(b" ")
    if len(parts) != 3:
        raise ParseError(f"request line is not three parts: {request_line[:120]!r}")
    method, target, version = parts
    if not TOKEN.match(method):
        raise ParseError(f"method {method[:40]!r} is not a token")
    if not TARGET.match(target):
        raise ParseError(f"request target {target[:120]!r} has a space, control or 8-bit byte")
    if not VERSION.match(version):
        raise ParseError(f"version {version[:20]!r} is not HTTP/1.0 or HTTP/1.1")
    fields = _parse_fields(field_lines, "header")
    parsed = {"method": method.decode(), "target": target.decode(), "version": version.decode(),
              "headers": [(n.decode("latin-1"), v.decode("latin-1")) for n, v in fields],
              "body": b"", "trailers": [], "framing": "none"}
    te = [v for n, v in fields if n.lower() == b"transfer-encoding"]
    cl = [v for n, v in fields if n.lower() == b"content-length"]
    pos = end + 4
    error = None
    if te and cl:
        error = "both Transfer-Encoding and Content-Length"
    elif len(te) > 1:
        error = f"{len(te)} Transfer-Encoding fields"
    elif te and te[0] != b"chunked":
        error = f"Transfer-Encoding {te[0]!r} is not exactly 'chunked'"
    elif len(cl) > 1:
        error = f"{len(cl)} Content-Length fields"
    elif cl and not cl[0].isdigit():
        error = f"Content-Length {cl[0]!r} is not digits"
    elif cl and cl[0] != str(int(cl[0])).encode():
        error = f"Content-Length {cl[0]!r} is not canonical"
    if error:
        exc = ParseError(error)
        exc.fields = parsed  # type: ignore[attr-defined]
        raise exc
    if cl:
        parsed["framing"] = "length"
        length = int(cl[0])
        parsed["body"] = buf[pos:pos + length]
        if len(buf) - pos >= length:
            return parsed, pos + length, True
        return parsed, len(buf), False
    if not te:
        return parsed, pos, True
    parsed["framing"] = "chunked"
    body = bytearray()
    while True:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            if len(buf) - pos > 1024:
                raise ParseError("chunk-size line longer than 1 KiB")
            parsed["body"] = bytes(body)
            return parsed, len(buf), False
        size_line = buf[pos:line_end]
        m = CHUNK_SIZE.match(size_line)
        if not m:
            exc = ParseError(f"invalid chunk-size line {size_line[:40]!r}")
            exc.fields = parsed  # type: ignore[attr-defined]
            raise exc
        size = int(m.group(1), 16)
        pos = line_end + 2
        if size == 0:
            # Trailer section, then the empty line.
            trailers = []
            while True:
                line_end = buf.find(b"\r\n", pos)
                if line_end < 0:
                    parsed["body"] = bytes(body)
                    return parsed, len(buf), False
                line = buf[pos:line_end]
                pos = line_end + 2
                if not line:
                    break
                trailers.append(line)
            parsed["trailers"] = [(n.decode("latin-1"), v.decode("latin-1"))
                                  for n, v in _parse_fields(trailers, "trailer")]
            parsed["body"] = bytes(body)
            return parsed, pos, True
        available = buf[pos:pos + size]
        body += available
        if len(available) < size:
            parsed["body"] = bytes(body)
            return parsed, len(buf), False
        pos += size
        if len(buf) - pos < 2:
            parsed["body"] = bytes(body)
            return parsed, len(buf), False
        if buf[pos:pos + 2] != b"\r\n":
            exc = ParseError(f"chunk data not followed by CRLF (got {buf[pos:pos + 10]!r})")
            exc.fields = parsed  # type: ignore[attr-defined]
            raise exc
        pos += 2


def default_answer(request: Request) -> bytes:
    body = f"upstream request {request.index} {request.method} {request.target}\n".encode()
    head = (f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            f"X-Upstream-Request: {request.index}\r\nX-Upstream-Connection: {request.connection}\r\n"
            f"\r\n").encode()
    return head if request.method == "HEAD" else head + body


def websocket_accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + WEBSOCKET_GUID).digest()).decode()


def is_websocket_upgrade(request: Request) -> bool:
    upgrade = [v.strip().lower() for v in request.values("upgrade")]
    connection = {t.strip().lower() for v in request.values("connection") for t in v.split(",")}
    return upgrade == ["websocket"] and "upgrade" in connection


class RecordingUpstream:
    """A raw TCP server on 127.0.0.1 that records and strictly parses what the gateway sends."""

    def __init__(self, name: str = "upstream") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._conns: list[_Connection] = []
        self._requests: list[Request] = []
        self._routes: dict[str, Any] = {}
        self.default: Any = None   # an action for paths without a route; None: default_answer
        self._closed = False
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self._threads: list[threading.Thread] = []
        accept = threading.Thread(target=self._accept, name=f"{name}-accept", daemon=True)
        accept.start()
        self._threads.append(accept)

    # -- configuration ---------------------------------------------------------------------------

    def route(self, prefix: str, action: Any) -> None:
        """Answer requests whose path starts with C{prefix} with C{action}: bytes or a L{Reply}
        (raw response), L{SWITCH}, L{CLOSE}, L{SILENT}, or a callable(request) returning one of
        those.  The longest matching prefix wins."""
        with self._lock:
            self._routes[prefix] = action

    def _action_for(self, request: Request) -> Any:
        with self._lock:
            matches = [p for p in self._routes if request.path.startswith(p)]
            action = self._routes[max(matches, key=len)] if matches else self.default
        if callable(action) and not isinstance(action, _Sentinel):
            action = action(request)
        return action

    # -- accessors -------------------------------------------------------------------------------

    def connections(self) -> list[bytes]:
        """Every byte each accepted connection received, in accept order."""
        with self._lock:
            return [bytes(c.raw) for c in self._conns]

    def connection_count(self) -> int:
        with self._lock:
            return len(self._conns)

    def requests(self, since: int = 0) -> list[Request]:
        """Requests whose head was parsed, in arrival order (C{since}: skip the first ones)."""
        with self._lock:
            return list(self._requests[since:])

    def request_count(self) -> int:
        with self._lock:
            return len(self._requests)

    def errors(self, since_connection: int = 0) -> list[tuple[int, str]]:
        """(connection index, problem) for bytes the strict parser refused, and for connections
        that ended inside a request head."""
        with self._lock:
            return [(c.index, e) for c in self._conns[since_connection:] for e in c.errors]

    def tunnel(self, connection: int) -> bytes:
        with self._lock:
            return bytes(self._conns[connection].tunnel)

    def closed_by_gateway(self, connection: int) -> bool:
        with self._lock:
            return self._conns[connection].closed_by_peer

    def connection_requests(self, connection: int) -> list[Request]:
        with self._lock:
            return list(self._conns[connection].requests)

    def mark(self) -> tuple[int, int]:
        """(requests, connections) so far, for L{since} and L{describe}."""
        with self._lock:
            return len(self._requests), len(self._conns)

    def since(self, mark: tuple[int, int]) -> list[Request]:
        return self.requests(mark[0])

    def describe(self, mark: tuple[int, int] = (0, 0), raw_limit: int = 600) -> str:
        """What reached this upstream since C{mark}, for failure messages."""
        with self._lock:
            requests = list(self._requests[mark[0]:])
            conns = [(c.index, bytes(c.raw), list(c.errors), c.closed_by_peer) for c in self._conns]
        out = [f"upstream {self.name!r} (port {self.port}): {len(requests)} request(s) since the mark"]
        out += ["  " + r.describe().replace("\n", "\n  ") for r in requests]
        touched = {r.connection for r in requests} | {i for i, *_ in conns[mark[1]:]}
        for index, raw, errors, closed in conns:
            if index in touched or (errors and index >= mark[1]):
                shown = raw[-raw_limit:]
                out.append(f"  connection {index}: {len(raw)} bytes received"
                           f"{' (closed by the gateway)' if closed else ''}"
                           f"{'; last ' + str(raw_limit) if len(raw) > raw_limit else ''}: {shown!r}")
                out += [f"    PARSE ERROR: {e}" for e in errors]
        return "\n".join(out)

    # -- serving ---------------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            try:
                sock, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                conn = _Connection(len(self._conns), sock)
                self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), name=f"{self.name}-{conn.index}",
                                 daemon=True)
            t.start()
            with self._lock:
                self._threads.append(t)

    def _register(self, conn: _Connection, fields: dict) -> Request:
        with self._lock:
            request = Request(len(self._requests) + 1, conn.index, fields["method"], fields["target"],
                              fields["version"], fields["headers"], fields["framing"])
            self._requests.append(request)
            conn.requests.append(request)
        return request

    def _send(self, conn: _Connection, data: bytes) -> bool:
        try:
            conn.sock.sendall(data)
            return True
        except OSError:
            return False

    def _close(self, conn: _Connection) -> None:
        conn.closed_by_us = True
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            conn.sock.close()
        except OSError:
            pass

    def _serve(self, conn: _Connection) -> None:
        buf = b""
        current: Request | None = None
        tunnel = False
        try:
            while True:
                try:
                    data = conn.sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    with self._lock:
                        conn.closed_by_peer = not conn.closed_by_us
                        if buf and current is None and not tunnel:
                            conn.errors.append(f"connection ended inside a request head: {buf[:200]!r}")
                    return
                with self._lock:
                    conn.raw += data
                    if tunnel:
                        conn.tunnel += data
                if tunnel:
                    if not self._send(conn, data):
                        return
                    continue
                buf += data
                while buf:
                    try:
                        result = parse_request(buf)
                    except ParseError as e:
                        fields = getattr(e, "fields", None)
                        with self._lock:
                            conn.errors.append(str(e))
                        if fields is not None:
                            request = current or self._register(conn, fields)
                            request.error = str(e)
                            request.body = fields["body"]
                            request.raw = buf
                        self._send(conn, b"HTTP/1.1 400 Bad Request\r\nContent-Length: 24\r\n"
                                         b"Connection: close\r\n\r\nrecorder: unparseable\r\n\r\n")
                        self._close(conn)
                        return
                    if result is None:
                        break
                    fields, consumed, complete = result
                    if current is None:
                        current = self._register(conn, fields)
                    current.body = fields["body"]
                    current.trailers = fields["trailers"]
                    current.raw = buf[:consumed]
                    if not complete:
                        break
                    request, current = current, None
                    buf = buf[consumed:]
                    request.complete = True
                    request.early = len(buf)
                    outcome = self._answer(conn, request)
                    if outcome == "close":
                        return
                    if outcome == "tunnel":
                        tunnel = True
                        if buf:
                            with self._lock:
                                conn.tunnel += buf
                            if not self._send(conn, buf):
                                return
                            buf = b""
                        break
        finally:
            conn.done.set()

    def _answer(self, conn: _Connection, request: Request) -> str:
        action = self._action_for(request)
        request.answered = True
        if action is SILENT:
            return "http"
        if action is CLOSE:
            self._close(conn)
            return "close"
        if action is SWITCH:
            if is_websocket_upgrade(request):
                key = request.header("sec-websocket-key") or ""
                head = ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        + (f"Sec-WebSocket-Accept: {websocket_accept(key)}\r\n" if key else "")
                        + "\r\n").encode()
                return "tunnel" if self._send(conn, head) else "close"
            action = None
        if action is None:
            action = Reply(default_answer(request))
        if isinstance(action, bytes):
            action = Reply(action)
        for piece in action.pieces:
            if not self._send(conn, piece):
                return "close"
        if action.close:
            self._close(conn)
            return "close"
        return "http"

    def close(self) -> None:
        self._closed = True
        try:
            # shutdown wakes the thread blocked in accept(); close alone does not on Linux.
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns)
            threads = list(self._threads)
        for c in conns:
            self._close(c)
        for t in threads:
            t.join(2)


__all__ = ["CLOSE", "ParseError", "Reply", "RecordingUpstream", "Request", "SILENT", "SWITCH",
           "default_answer", "is_websocket_upgrade", "parse_request", "websocket_accept"]
