#!/usr/bin/env python3
"""
twisted-gateway beside HAProxy, in one run, on this machine.

    python3 bench/run.py [--duration 10] [--bulk-mib 1024] [--out bench/results/latest.md]

Starts nginx (a 100-byte and a 1 MiB body, HTTP/1.1 and h2c), a raw TCP source/sink, HAProxy
configured for the same job (TLS termination with the same certificate, SNI routing to the
same upstreams) and the gateway; pins each proxy to CPU 0 and every load generator and upstream
to CPU 1; then runs each workload against the gateway and HAProxy in turn:

- W1  HTTPS keep-alive GET of 100 bytes, 50 connections (wrk): through a tcp route and through
      an http/1.1 route; requests/s and p99.
- W2  a new connection and full TLS handshake per request (no resumption), W2r with session
      resumption: connections/s and proxy CPU microseconds per connection.
- W3  1 GiB through a tcp route, upload and download (openssl s_client): MB/s.
- W4  h2 GET 100 bytes, 10 clients x 10 streams (h2load): h2 clients of an http/1.1 route (each
      stream one HTTP/1.1 request through the pool; HAProxy: mode http to the same nginx), and
      of an h2 route, proxied request by request (HAProxy: mode http, h2 to the h2c upstream);
      W4p through a passthrough h2 route (HAProxy: mode tcp).
- idle and peak RSS of each proxy.

Names resolve through a private /etc/hosts bound in a mount namespace (unshare), so load
generators that resolve the SNI name themselves (wrk, h2load) work without touching the
machine. Needs root (for unshare) and Debian's haproxy, nginx-light, wrk, nghttp2-client.
Every loop is bounded by --duration or a byte count and talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from common import free_port, loopback_shard, run_and_report, twistd, wait_port, wait_ready  # noqa: E402
sys.path.insert(0, REPO)

from twisted_gateway.tls.localca import LocalCA  # noqa: E402

HOSTNAME = "bench.test"
NAMES = {"tcp": f"nginx-80.{HOSTNAME}", "http": f"web-8080.{HOSTNAME}", "h2": f"h2-8081.{HOSTNAME}",
         "h2p": f"h2p-8082.{HOSTNAME}",
         "bulk_up": f"sink-9000.{HOSTNAME}", "bulk_down": f"source-9001.{HOSTNAME}"}
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dir = tempfile.mkdtemp(prefix="gw-bench-")
        self.procs: list[subprocess.Popen] = []
        self.hosts = os.path.join(self.dir, "hosts")
        with open(self.hosts, "w") as f:
            f.write("127.0.0.1 localhost\n" + "".join(f"127.0.0.1 {n}\n" for n in NAMES.values()))
        ca = LocalCA(os.path.join(self.dir, "ca"))
        self.ca = ca.cert_path
        self.cert, self.key = os.path.join(self.dir, "cert.pem"), os.path.join(self.dir, "key.pem")
        ca.write_leaf((f"*.{HOSTNAME}", HOSTNAME), self.cert, self.key)
        self.combined = os.path.join(self.dir, "haproxy.pem")
        with open(self.combined, "wb") as out:
            for p in (self.cert, self.key):
                with open(p, "rb") as f:
                    out.write(f.read())

    # -- processes --------------------------------------------------------------------------

    def spawn(self, cmd: list[str], cpu: int, **kw) -> subprocess.Popen:
        p = subprocess.Popen(["taskset", "-c", str(cpu), *cmd], **kw)
        self.procs.append(p)
        return p

    def start_upstreams(self) -> None:
        self.nginx_port, self.nginx_h2c = free_port(), free_port()
        root = os.path.join(self.dir, "www")
        os.makedirs(root)
        with open(os.path.join(root, "100b"), "wb") as f:
            f.write(b"x" * 99 + b"\n")
        with open(os.path.join(root, "1m"), "wb") as f:
            f.write(os.urandom(1 << 20))
        conf = os.path.join(self.dir, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""worker_processes 1;
daemon off;
pid {self.dir}/nginx.pid;
error_log {self.dir}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    server {{ listen 127.0.0.1:{self.nginx_port}; root {root}; }}
    server {{ listen 127.0.0.1:{self.nginx_h2c} http2; root {root}; }}
}}
""")
        self.spawn(["nginx", "-c", conf, "-p", self.dir], 1, stderr=subprocess.DEVNULL)
        self.sink_port, self.source_port = free_port(), free_port()
        self.spawn([sys.executable, os.path.join(HERE, "upstream.py"), str(self.sink_port),
                    str(self.source_port), str(self.args.bulk_mib << 20)], 1)
        for p in (self.nginx_port, self.nginx_h2c, self.sink_port, self.source_port):
            wait_port(p)

    def start_gateway(self) -> None:
        import yaml
        self.gw_port, self.gw_admin = free_port(), free_port()
        shards = [
            loopback_shard("nginx", 80, self.nginx_port),
            loopback_shard("web", 8080, self.nginx_port, "http/1.1"),
            loopback_shard("h2", 8081, self.nginx_h2c, "h2"),
            loopback_shard("h2p", 8082, self.nginx_h2c, "h2", passthrough=True),
            loopback_shard("sink", 9000, self.sink_port),
            loopback_shard("source", 9001, self.source_port),
        ]
        directory = os.path.join(self.dir, "shards.yaml")
        with open(directory, "w") as f:
            yaml.safe_dump({"shards": shards}, f)
        config = os.path.join(self.dir, "gateway.yaml")
        with open(config, "w") as f:
            yaml.safe_dump({"hostname": HOSTNAME, "state_dir": os.path.join(self.dir, "state"),
                            "listen": {"tls": f"tcp:{self.gw_port}:interface=127.0.0.1:backlog=4096",
                                       "plain": f"tcp:{self.gw_admin}:interface=127.0.0.1"},
                            "tls": {"certificate": self.cert, "private_key": self.key},
                            "directory": {"file": directory},
                            "limits": {"max_connections_per_ip": 0, "max_connections": 0},
                            "log": {"level": "warn", "access_log": False}}, f)
        env = dict(os.environ, PYTHONPATH=REPO)
        reactor = [] if self.args.reactor == "epoll" else ["-r", self.args.reactor]
        self.gw = self.spawn([twistd(), "-n", "--pidfile=", *reactor, "gateway", "--workers", "1", "--config", config], 0,
                             env=env, stdout=open(os.path.join(self.dir, "gateway.log"), "w"),
                             stderr=subprocess.STDOUT)
        wait_ready(self.gw_admin)

    def start_haproxy(self) -> None:
        self.hp_tcp, self.hp_http = free_port(), free_port()
        conf = os.path.join(self.dir, "haproxy.cfg")
        with open(conf, "w") as f:
            f.write(f"""global
    maxconn 8000
    nbthread 1
    tune.ssl.default-dh-param 2048
defaults
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend tls_tcp
    mode tcp
    bind 127.0.0.1:{self.hp_tcp} ssl crt {self.combined} alpn h2,http/1.1
    use_backend nginx if {{ ssl_fc_sni -i {NAMES['tcp']} }}
    use_backend h2c if {{ ssl_fc_sni -i {NAMES['h2p']} }}
    use_backend sink if {{ ssl_fc_sni -i {NAMES['bulk_up']} }}
    use_backend source if {{ ssl_fc_sni -i {NAMES['bulk_down']} }}
frontend tls_http
    mode http
    bind 127.0.0.1:{self.hp_http} ssl crt {self.combined} alpn h2,http/1.1
    use_backend web if {{ ssl_fc_sni -i {NAMES['http']} }}
    use_backend h2proxy if {{ ssl_fc_sni -i {NAMES['h2']} }}
backend nginx
    mode tcp
    server n 127.0.0.1:{self.nginx_port}
backend h2c
    mode tcp
    server n 127.0.0.1:{self.nginx_h2c}
backend sink
    mode tcp
    server s 127.0.0.1:{self.sink_port}
backend source
    mode tcp
    server s 127.0.0.1:{self.source_port}
backend h2proxy
    mode http
    option forwardfor
    server n 127.0.0.1:{self.nginx_h2c} proto h2
backend web
    mode http
    http-reuse always
    option forwardfor
    server n 127.0.0.1:{self.nginx_port}
""")
        self.hp = self.spawn(["haproxy", "-db", "-f", conf], 0, stdout=subprocess.DEVNULL,
                             stderr=open(os.path.join(self.dir, "haproxy.log"), "w"))
        wait_port(self.hp_tcp)
        wait_port(self.hp_http)

    def port_of(self, proxy: str, route: str) -> int:
        if proxy == "gateway":
            return self.gw_port
        return self.hp_http if route in ("http", "h2") else self.hp_tcp

    def pid_of(self, proxy: str) -> int:
        return self.gw.pid if proxy == "gateway" else self.hp.pid

    def loadgen(self, cmd: list[str], timeout: float) -> tuple[str, float, float]:
        """Run a load generator on CPU 1 inside a namespace with our /etc/hosts.
        Returns (output, wall seconds, its CPU seconds)."""
        wrapped = ["unshare", "--mount", "sh", "-c",
                   f"mount --bind {self.hosts} /etc/hosts && exec taskset -c 1 " + " ".join(cmd)]
        started = time.monotonic()
        before = os.times()
        out = subprocess.run(wrapped, capture_output=True, text=True, timeout=timeout)
        after = os.times()
        wall = time.monotonic() - started
        cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
        return out.stdout + out.stderr, wall, cpu

    def measure(self, proxy: str, fn) -> dict:
        pid = self.pid_of(proxy)
        cpu0 = cpu_seconds(pid)
        result = fn()
        result["proxy_cpu"] = cpu_seconds(pid) - cpu0
        result["loadgen_busy"] = result.get("loadgen_cpu", 0) / max(result.get("wall", 1), 1e-9)
        return result

    # -- workloads ------------------------------------------------------------------------------

    def w1(self, proxy: str, route: str) -> dict:
        name = NAMES[route]
        url = f"https://{name}:{self.port_of(proxy, route)}/100b"
        out, wall, cpu = self.loadgen(["wrk", "-t1", "-c50", f"-d{self.args.duration}s", "--latency", url],
                                      self.args.duration + 60)
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        total = int(re.search(r"(\d+) requests in", out).group(1))
        p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
        p99_ms = float(p99.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[p99.group(2)]
        return {"value": rps, "unit": "req/s", "p99_ms": p99_ms, "ops": total, "wall": wall, "loadgen_cpu": cpu}

    def w2(self, proxy: str, resume: bool) -> dict:
        script = os.path.join(HERE, "handshakes.py")
        port = self.port_of(proxy, "tcp")
        out, wall, cpu = self.loadgen([sys.executable, script, NAMES["tcp"], str(port), self.ca,
                                       str(self.args.duration), "1" if resume else "0"],
                                      self.args.duration + 60)
        doc = json.loads(out.strip().splitlines()[-1])
        return {"value": doc["connections"] / doc["seconds"], "unit": "conn/s", "ops": doc["connections"],
                "resumed": doc["resumed"], "wall": wall, "loadgen_cpu": cpu}

    def w3(self, proxy: str, direction: str) -> dict:
        size = self.args.bulk_mib << 20
        name = NAMES["bulk_up"] if direction == "upload" else NAMES["bulk_down"]
        out, wall, cpu = self.loadgen([sys.executable, os.path.join(HERE, "bulk.py"), direction, name,
                                       str(self.port_of(proxy, "tcp")), self.ca, str(size)], 600)
        lines = out.strip().splitlines()
        if not lines or not lines[-1].startswith("{"):
            raise RuntimeError(f"W3 {direction} through {proxy} failed: {out.strip()[-200:]}")
        doc = json.loads(lines[-1])
        return {"value": size / doc["seconds"] / 1e6, "unit": "MB/s", "ops": size / 2**20, "wall": wall,
                "loadgen_cpu": cpu}

    def w4(self, proxy: str, route: str) -> dict:
        port = self.port_of(proxy, route)
        url = f"https://{NAMES[route]}:{port}/100b"
        out, wall, cpu = self.loadgen(["h2load", "-c", "10", "-m", "10", "-D", str(self.args.duration),
                                       url], self.args.duration + 60)
        rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
        done = int(re.search(r"requests: \d+ total, \d+ started, (\d+) done", out).group(1))
        return {"value": rps, "unit": "req/s", "ops": done, "wall": wall, "loadgen_cpu": cpu}

    # -- run ------------------------------------------------------------------------------------

    def run(self) -> str:
        self.start_upstreams()
        self.start_haproxy()
        self.start_gateway()
        time.sleep(1)  # let both settle before reading idle memory
        idle = {p: rss(self.pid_of(p)) for p in ("gateway", "haproxy")}
        rows = []
        workloads = [
            ("W1 tcp route, 100 B keep-alive", lambda p: self.w1(p, "tcp"), "higher"),
            ("W1 http/1.1 route, 100 B keep-alive", lambda p: self.w1(p, "http"), "higher"),
            ("W2 full handshake per connection", lambda p: self.w2(p, False), "higher"),
            ("W2r resumed handshake per connection", lambda p: self.w2(p, True), "higher"),
            (f"W3 upload {self.args.bulk_mib} MiB", lambda p: self.w3(p, "upload"), "higher"),
            (f"W3 download {self.args.bulk_mib} MiB", lambda p: self.w3(p, "download"), "higher"),
            ("W4 h2 clients of an http/1.1 route, 100 B, 10x10 streams", lambda p: self.w4(p, "http"), "higher"),
            ("W4 h2 clients of an h2 route (gRPC shards), 100 B, 10x10 streams", lambda p: self.w4(p, "h2"), "higher"),
            ("W4p h2 passthrough route, 100 B, 10x10 streams", lambda p: self.w4(p, "h2p"), "higher"),
        ]
        for title, fn, _ in workloads:
            if self.args.only and not any(title.startswith(o) for o in self.args.only):
                continue
            results = {}
            for proxy in ("gateway", "haproxy"):  # interleaved, one workload at a time
                profiler = None
                if proxy == "gateway" and self.args.profile:
                    os.makedirs(self.args.profile, exist_ok=True)
                    out = os.path.join(self.args.profile, re.sub(r"[^A-Za-z0-9]+", "-", title) + ".txt")
                    profiler = subprocess.Popen(["py-spy", "record", "--pid", str(self.gw.pid), "--format", "raw",
                                                 "--rate", "200", "--output", out],
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    time.sleep(0.5)
                try:
                    results[proxy] = self.measure(proxy, lambda: fn(proxy))
                except Exception as e:  # noqa: BLE001 - report the failure in the table
                    results[proxy] = {"error": str(e)}
                if profiler is not None:
                    profiler.send_signal(signal.SIGINT)
                    profiler.wait(60)
            rows.append((title, results))
            print(f"{title}: " + ", ".join(f"{k}={v.get('value', v.get('error'))}" for k, v in results.items()),
                  file=sys.stderr)
        peak = {p: rss(self.pid_of(p), "VmHWM") for p in ("gateway", "haproxy")}
        return self.report(rows, idle, peak)

    def report(self, rows, idle, peak) -> str:
        versions = {
            "python": sys.version.split()[0],
            "haproxy": subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.split("\n")[0],
            "openssl": ssl.OPENSSL_VERSION,
        }
        lines = [
            f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()} CPUs "
            f"({_cpu_model()}); proxies pinned to CPU 0, load generators and upstreams to CPU 1.",
            f"Versions: Python {versions['python']}; {versions['haproxy']}; {versions['openssl']}. "
            f"Gateway reactor: {self.args.reactor}.",
            "",
            "| workload | gateway | HAProxy | ratio | gateway CPU µs/op | HAProxy CPU µs/op | notes |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for title, res in rows:
            g, h = res.get("gateway", {}), res.get("haproxy", {})
            if "error" in g or "error" in h:
                lines.append(f"| {title} | {g.get('value', g.get('error'))} | {h.get('value', h.get('error'))} | | | | failed |")
                continue
            notes = []
            for who, r in (("gateway", g), ("HAProxy", h)):
                # A proxy that did not use its whole core was held back by something else
                # (other processes on the machine, the load generator): its ratio says less
                # than its CPU per operation then.
                busy = r["proxy_cpu"] / max(r.get("wall", 1), 1e-9)
                if busy < 0.85 and r.get("unit") == "req/s":
                    notes.append(f"{who} used {busy:.0%} of its core")
                if r["loadgen_busy"] > 0.9:
                    notes.append(f"load generator saturated during {who} run ({r['loadgen_busy']:.0%} of CPU 1)")
                if r.get("p99_ms") is not None:
                    notes.append(f"{who} p99 {r['p99_ms']:.2f} ms")
            ratio = g["value"] / h["value"] if h["value"] else float("nan")
            lines.append(
                f"| {title} | {g['value']:.0f} {g['unit']} | {h['value']:.0f} {h['unit']} | {ratio:.2f} | "
                f"{1e6 * g['proxy_cpu'] / max(g['ops'], 1):.1f} | {1e6 * h['proxy_cpu'] / max(h['ops'], 1):.1f} | "
                f"{'; '.join(notes)} |")
        lines += [
            "",
            f"Idle RSS: gateway {idle['gateway'] / 2**20:.1f} MiB, HAProxy {idle['haproxy'] / 2**20:.1f} MiB. "
            f"Peak RSS: gateway {peak['gateway'] / 2**20:.1f} MiB, HAProxy {peak['haproxy'] / 2**20:.1f} MiB "
            f"(ratio {peak['gateway'] / max(peak['haproxy'], 1):.2f}).",
            "",
            "For W3 the CPU columns are µs per MiB moved; elsewhere per request or connection.",
        ]
        return "\n".join(lines) + "\n"

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds per timed workload")
    parser.add_argument("--bulk-mib", type=int, default=1024, help="MiB moved each way in W3")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "latest.md"))
    parser.add_argument("--only", action="append", help="run only workloads whose title starts with this (e.g. W1)")
    parser.add_argument("--reactor", choices=("epoll", "asyncio", "uvloop"), default="epoll",
                        help="the gateway's reactor (uvloop needs: pip install uvloop)")
    parser.add_argument("--profile", help="record py-spy profiles of the gateway (raw stacks) into this folder")
    args = parser.parse_args()
    for tool in ("haproxy", "nginx", "wrk", "h2load", "taskset", "unshare", "openssl"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is missing: apt-get install -y haproxy nginx-light wrk nghttp2-client util-linux openssl")
    run_and_report(lambda: Bench(args), args.out)


if __name__ == "__main__":
    main()
