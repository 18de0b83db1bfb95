"""
Helpers for end-to-end tests: the real gateway as a ``twistd -n gateway`` subprocess, small
loopback upstream servers, and polling with deadlines (tests never sleep to wait).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any, Callable

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
             what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def twistd_command() -> str:
    """The twistd script of the Python running the tests."""
    beside = os.path.join(os.path.dirname(sys.executable), "twistd")
    return beside if os.path.exists(beside) else which("twistd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_listener(port: int, what: str, proc: Any = None, timeout: float = 20,
                      output: Callable[[], str] = lambda: "") -> None:
    """Poll until something accepts on 127.0.0.1:C{port}; fail at once if C{proc} exits."""
    def up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"{what} exited:\n{output()}")
            return False
    wait_for(up, timeout, what=f"{what} listening")


def request_heads(conn: socket.socket):
    """Yield the head of each HTTP/1.1 request arriving on C{conn} (bodies are not read)."""
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
        head, buf = buf.split(b"\r\n\r\n", 1)
        yield head


def write_atomically(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def shard(id: str, label: str, port: int, upstream_port: int, protocol: str = "tcp",
          public: bool = True, primary: bool = True, task: str | None = None,
          key_begin: int = 0, rclock_begin: int = 0, extra_ports: list | None = None) -> dict:
    return {
        "id": id, "task": task or f"tasks/{label}", "hostname_label": label,
        "address": "127.0.0.1", "primary": primary, "key_begin": key_begin,
        "rclock_begin": rclock_begin, "labels": {"app": label},
        "ports": [{"port": port, "protocol": protocol, "public": public,
                   "upstream_port": upstream_port}] + (extra_ports or []),
    }


class Gateway:
    """A running ``twistd -n gateway`` with JSON logs collected from its stdout."""

    def __init__(self, workdir: str, shards: list[dict] | None = None, args: list[str] | None = None,
                 config: dict | None = None, demo: bool = False, wait_ready: bool = True,
                 workers: int = 1, command: list[str] | None = None, cwd: str | None = None,
                 start_timeout: float = 20, reactor: str | None = None) -> None:
        self.workdir = workdir
        self.state_dir = os.path.join(workdir, "state")
        self.directory_path = os.path.join(workdir, "shards.yaml")
        self.events: list[dict] = []
        self._lines: queue.Queue[str] = queue.Queue()
        if shards is not None:
            self.write_directory(shards)
        reactor_option = ["-r", reactor] if reactor else []
        cmd = (command or [twistd_command(), "-n", "--pidfile=", *reactor_option, "gateway"]) + [
               "--log-format", "json", "--log-level", "debug",
               "--tls-port", "tcp:0:interface=127.0.0.1",
               "--plain-port", "tcp:0:interface=127.0.0.1",
               "--state-dir", self.state_dir, "--workers", str(workers)]
        if not demo:
            cmd += ["--directory", self.directory_path]
        if config is not None:
            config_path = os.path.join(workdir, "gateway.yaml")
            with open(config_path, "w") as f:
                yaml.safe_dump(config, f)
            cmd += ["--config", config_path]
        cmd += args or []
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(cmd, cwd=cwd or workdir, env=env if command is None else None, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        listening = {}

        def bound() -> bool:
            for e in self.events:
                if e.get("event_kind") == "listening":
                    listening[e["listener"]] = e["port"]
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited with {self.proc.returncode}:\n{self.output()}")
            return len(listening) == 2
        wait_for(bound, start_timeout, what="gateway listeners")
        self.tls_port = listening["tls"]
        self.plain_port = listening["plain"]
        if wait_ready:
            wait_for(lambda: self.http_get("/readyz")[0] == 200, 10, what="gateway ready")

    @property
    def ca_path(self) -> str:
        return os.path.join(self.state_dir, "local-ca.pem")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
            try:
                self.events.append(json.loads(line))
            except ValueError:
                self.events.append({"message": line.rstrip("\n"), "level": "raw"})

    def output(self) -> str:
        return "\n".join(str(e.get("level")) + " " + str(e.get("message")) for e in self.events)

    def logged(self, text: str) -> bool:
        return any(text in str(e.get("message", "")) for e in list(self.events))

    def wait_logged(self, text: str, timeout: float = 5) -> None:
        """Poll for a log line: the gateway's output is read by a thread, so a line written just
        before an observable effect (a metric, an exit) may not have been read yet."""
        wait_for(lambda: self.logged(text), timeout, what=f"log line {text!r}\n" + self.output())

    def udp_port(self, listener: str) -> int:
        """The port a UDP listener (a udp route's target, or quic) was bound to, once logged."""
        def found():
            for e in list(self.events):
                if e.get("event_kind") == "listening_udp" and e.get("listener") == listener:
                    return e["port"]
            return None
        return wait_for(found, 10, what=f"udp listener {listener}")

    def write_directory(self, shards: list[dict]) -> None:
        write_atomically(self.directory_path, yaml.safe_dump({"shards": shards}))

    def http_get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.plain_port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return 0, ""

    def metric(self, series: str, **labels: str) -> float:
        name = series
        status, text = self.http_get("/metrics")
        assert status == 200
        want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
                       if labels else "")
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            if key == want or (labels and key.startswith(name + "{") and
                               all(f'{k}="{v}"' in key for k, v in labels.items())):
                return float(value)
        return 0.0

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_path)
        return ctx

    def connect(self, name: str, alpn: list[str] | None = None, timeout: float = 10) -> ssl.SSLSocket:
        ctx = self.client_context()
        if alpn:
            ctx.set_alpn_protocols(alpn)
        raw = socket.create_connection(("127.0.0.1", self.tls_port), timeout=timeout)
        return ctx.wrap_socket(raw, server_hostname=name)

    def echoes(self, name: str = "echo-9000.localhost") -> bool:
        """Whether a TLS connection to C{name} reaches an echo upstream and back."""
        try:
            with self.connect(name, timeout=5) as tls:
                tls.sendall(b"ping")
                return tls.recv(10) == b"ping"
        except OSError:
            return False

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        return self.proc.returncode


# --- upstream servers ---------------------------------------------------------------------------

class Upstream:
    """A threaded loopback TCP server; C{handler(conn)} runs per connection."""

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        self.connections: list[socket.socket] = []
        self.accepted = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.connections.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except OSError:
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def close(self) -> None:
        self._closed = True
        self.sock.close()
        for c in self.connections:
            try:
                c.close()
            except OSError:
                pass


def echo_handler(conn: socket.socket) -> None:
    """Echo everything; on EOF, shut the write side (carrying the half-close back)."""
    while True:
        data = conn.recv(262144)
        if not data:
            conn.shutdown(socket.SHUT_WR)
            return
        conn.sendall(data)


def reply_on_eof_handler(conn: socket.socket) -> None:
    """Read until EOF, then answer with the byte count and close."""
    total = 0
    while True:
        data = conn.recv(65536)
        if not data:
            break
        total += len(data)
    conn.sendall(f"received {total} bytes after EOF\n".encode())
    conn.shutdown(socket.SHUT_WR)


def sink_handler(conn: socket.socket) -> None:
    """Accept and never read until the peer goes away (used to test backpressure)."""
    conn.settimeout(None)
    try:
        while True:
            time.sleep(3600)
    except OSError:
        pass


def http_handler(conn: socket.socket) -> None:
    """A minimal HTTP/1.1 server answering each request with its method and path."""
    for head in request_heads(conn):
        request_line = head.split(b"\r\n")[0].decode()
        method, path, _ = request_line.split(" ", 2)
        body = f"upstream saw {method} {path}\n".encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Upstream: yes\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Terminate a helper process, killing it if it does not exit within C{timeout}."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def which(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise AssertionError(f"{tool} is not installed: run .ci/install")
    return path


def tempdir() -> str:
    return tempfile.mkdtemp(prefix="gw-test-")
