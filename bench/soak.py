#!/usr/bin/env python3
"""
Soak: tens of thousands of mixed connections against one gateway, then a health report.

    python3 bench/soak.py [--connections 20000] [--concurrency 64] [--out bench/results/soak.md]

The mix (round robin): good echo streams checked with SHA-256, unknown names, garbage instead
of a ClientHello, clients that reset mid-stream, stalled handshakes, and streams whose upstream
dies mid-stream. The report gives RSS at start and end, open file descriptors at start and
after the run (back to baseline?), error-level log lines from the gateway's own code, and how
many good streams came back intact. Talks to 127.0.0.1 only; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from common import free_port, loopback_shard, run_and_report, twistd, wait_ready  # noqa: E402


def tcp_server(handler) -> int:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)

    def accept() -> None:
        while True:
            conn, _ = sock.accept()
            threading.Thread(target=_guard, args=(handler, conn), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()
    return sock.getsockname()[1]


def _guard(handler, conn) -> None:
    try:
        handler(conn)
    except OSError:
        pass
    finally:
        conn.close()


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def dying(conn: socket.socket) -> None:
    """Echo 4 KiB, then die with a reset."""
    seen = 0
    while seen < 4096:
        data = conn.recv(4096 - seen)
        if not data:
            return
        conn.sendall(data)
        seen += len(data)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dir = tempfile.mkdtemp(prefix="gw-soak-")
        self.echo_port = tcp_server(echo)
        self.dying_port = tcp_server(dying)
        self.stats = {k: 0 for k in ("good_ok", "good_bad", "unknown", "garbage", "reset", "stalled",
                                     "upstream_died", "unexpected")}
        self.tls_port, self.admin_port = free_port(), free_port()
        import yaml
        with open(os.path.join(self.dir, "shards.yaml"), "w") as f:
            yaml.safe_dump({"shards": [loopback_shard("echo", 7, self.echo_port),
                                       loopback_shard("dying", 7, self.dying_port)]}, f)
        self.log_path = os.path.join(self.dir, "gateway.log")
        self.gw = subprocess.Popen(
            [twistd(), "-n", "--pidfile=", "gateway", "--workers", "1", "--log-format", "json", "--log-level", "info",
             "--tls-port", f"tcp:{self.tls_port}:interface=127.0.0.1:backlog=2048",
             "--plain-port", f"tcp:{self.admin_port}:interface=127.0.0.1",
             "--directory", os.path.join(self.dir, "shards.yaml"), "--state-dir", os.path.join(self.dir, "state"),
             "--config", self._config()],
            cwd=self.dir, env=dict(os.environ, PYTHONPATH=REPO), stdout=open(self.log_path, "w"),
            stderr=subprocess.STDOUT)
        wait_ready(self.admin_port)
        self.ctx = ssl.create_default_context(cafile=os.path.join(self.dir, "state", "local-ca.pem"))

    def _config(self) -> str:
        path = os.path.join(self.dir, "gateway.yaml")
        with open(path, "w") as f:
            f.write("tls: {handshake_timeout: 1}\nlimits: {max_connections_per_ip: 0}\nlog: {access_log: false}\n")
        return path

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    def rss(self) -> int:
        with open(f"/proc/{self.gw.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.gw.pid}/fd"))

    # -- clients ---------------------------------------------------------------------------

    async def good(self, i: int) -> None:
        payload = random.randbytes(random.randint(1, 65536))
        reader, writer = await asyncio.open_connection("127.0.0.1", self.tls_port, ssl=self.ctx,
                                                       server_hostname="echo-7.localhost")
        writer.write(payload)
        await writer.drain()
        got = await reader.readexactly(len(payload))
        writer.close()
        self.stats["good_ok" if hashlib.sha256(got).digest() == hashlib.sha256(payload).digest() else "good_bad"] += 1

    async def unknown(self, i: int) -> None:
        try:
            await asyncio.open_connection("127.0.0.1", self.tls_port, ssl=self.ctx,
                                          server_hostname=f"nobody-{i}.localhost")
            self.stats["unexpected"] += 1
        except ssl.SSLError:
            self.stats["unknown"] += 1

    async def garbage(self, i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.tls_port)
        writer.write(random.randbytes(random.randint(1, 2048)))
        await reader.read()
        writer.close()
        self.stats["garbage"] += 1

    async def reset(self, i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.tls_port, ssl=self.ctx,
                                                       server_hostname="echo-7.localhost")
        writer.write(random.randbytes(8192))
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        self.stats["reset"] += 1

    async def stalled(self, i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.tls_port)
        writer.write(bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01]))
        try:
            await asyncio.wait_for(reader.read(), 10)  # the gateway cuts it at the handshake timeout
        except ConnectionResetError:
            pass  # cut with a reset: the expected end of a stalled handshake
        writer.close()
        self.stats["stalled"] += 1

    async def upstream_dies(self, i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.tls_port, ssl=self.ctx,
                                                       server_hostname="dying-7.localhost")
        writer.write(random.randbytes(16384))
        try:
            await writer.drain()
            await asyncio.wait_for(reader.read(), 10)
        except (ConnectionError, ssl.SSLError):
            pass
        writer.close()
        self.stats["upstream_died"] += 1

    async def run_clients(self) -> None:
        kinds = [self.good, self.good, self.unknown, self.garbage, self.reset, self.good, self.stalled,
                 self.upstream_dies]
        semaphore = asyncio.Semaphore(self.args.concurrency)

        async def one(i: int) -> None:
            async with semaphore:
                try:
                    await asyncio.wait_for(kinds[i % len(kinds)](i), 30)
                except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ssl.SSLError):
                    self.stats["unexpected"] += 1
        await asyncio.gather(*(one(i) for i in range(self.args.connections)))

    def run(self) -> str:
        # Warm up (imports, caches) before taking the baseline.
        asyncio.run(self._warm())
        time.sleep(1)
        rss0, fds0 = self.rss(), self.fds()
        started = time.monotonic()
        asyncio.run(self.run_clients())
        elapsed = time.monotonic() - started
        deadline = time.monotonic() + 30
        while self.metric("gateway_connections_active") > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        rss1, fds1 = self.rss(), self.fds()
        self.gw.send_signal(signal.SIGTERM)
        code = self.gw.wait(60)
        errors = []
        with open(self.log_path) as f:
            for line in f:
                try:
                    event = json.loads(line)
                except ValueError:
                    errors.append(line.strip())
                    continue
                if event.get("level") in ("error", "critical"):
                    errors.append(event.get("message", ""))
        s = self.stats
        return "\n".join([
            f"Soak run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {self.args.connections} connections, "
            f"{self.args.concurrency} at a time, in {elapsed:.1f} s ({self.args.connections / elapsed:.0f}/s).",
            "",
            "| measure | value |",
            "| --- | --- |",
            f"| good streams intact (SHA-256) | {s['good_ok']} of {s['good_ok'] + s['good_bad']} |",
            f"| unknown names refused | {s['unknown']} |",
            f"| garbage connections closed | {s['garbage']} |",
            f"| client resets mid-stream | {s['reset']} |",
            f"| stalled handshakes cut | {s['stalled']} |",
            f"| upstream died mid-stream | {s['upstream_died']} |",
            f"| unexpected client-side outcomes | {s['unexpected']} |",
            f"| RSS start / end | {rss0 / 2**20:.1f} MiB / {rss1 / 2**20:.1f} MiB |",
            f"| open fds start / end | {fds0} / {fds1} |",
            f"| error-level log lines from the gateway | {len(errors)} |",
            f"| exit code after SIGTERM | {code} |",
        ]) + "\n" + ("".join(f"\n    {e[:200]}" for e in errors[:10]))

    async def _warm(self) -> None:
        for i in range(20):
            await self.good(i)

    def close(self) -> None:
        if self.gw.poll() is None:
            self.gw.kill()
            self.gw.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "soak.md"))
    args = parser.parse_args()
    run_and_report(lambda: Soak(args), args.out)


if __name__ == "__main__":
    main()
