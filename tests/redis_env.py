"""
Real Debian ``redis-server`` and ``redis-sentinel`` processes for the fleet tests, on loopback
ports picked free, each in a directory of its own; every process started is stopped by
L{RedisEnv.close} (the C{redis_env} fixture calls it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

from support import free_port, stop_process, tempdir, wait_for, which


class RedisServer:
    """One redis-server; L{stop} and L{start} again keep its port (an outage and a return)."""

    def __init__(self, root: str, extra: list[str] | None = None, port: int | None = None,
                 password: str | None = None, tls_port: bool = False) -> None:
        self.port = port or free_port()
        self.dir = os.path.join(root, f"redis-{self.port}")
        os.makedirs(self.dir, exist_ok=True)
        self.extra = list(extra or [])
        self.password = password
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        args = [which("redis-server"), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", self.dir, "--logfile", os.path.join(self.dir, "redis.log")]
        if "--port" not in self.extra:
            args += ["--port", str(self.port)]
        self.proc = subprocess.Popen(args + self.extra, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for(lambda: self.ping(), 10, what=f"redis-server on {self.port}")

    def cli(self, *args: str, check: bool = True) -> str:
        cmd = [which("redis-cli"), "-h", "127.0.0.1", "-p", str(self.port)]
        if self.password is not None:
            cmd += ["--no-auth-warning", "-a", self.password]
        out = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=10)
        if check and out.returncode != 0:
            raise AssertionError(f"redis-cli {args}: {out.stderr}")
        return out.stdout.strip()

    def ping(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"redis-server exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return self.cli("PING", check=False) == "PONG"
        except subprocess.TimeoutExpired:
            return False

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log")) as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


class Sentinel:
    """One redis-sentinel watching C{master_name} at C{master_port}."""

    def __init__(self, root: str, master_port: int, master_name: str = "mymaster", quorum: int = 2) -> None:
        self.port = free_port()
        self.dir = os.path.join(root, f"sentinel-{self.port}")
        os.makedirs(self.dir, exist_ok=True)
        conf = os.path.join(self.dir, "sentinel.conf")
        with open(conf, "w") as f:
            f.write(f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
                    f"logfile {os.path.join(self.dir, 'sentinel.log')}\n"
                    f"sentinel monitor {master_name} 127.0.0.1 {master_port} {quorum}\n"
                    f"sentinel down-after-milliseconds {master_name} 1000\n"
                    f"sentinel failover-timeout {master_name} 5000\n"
                    f"sentinel parallel-syncs {master_name} 1\n")
        self.proc = subprocess.Popen([which("redis-sentinel"), conf], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        self.master_name = master_name
        wait_for(lambda: self.cli("PING") == "PONG", 10, what=f"redis-sentinel on {self.port}")

    def cli(self, *args: str) -> str:
        out = subprocess.run([which("redis-cli"), "-h", "127.0.0.1", "-p", str(self.port)] + list(args),
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip()

    def master_port(self) -> int | None:
        out = self.cli("SENTINEL", "get-master-addr-by-name", self.master_name).split()
        return int(out[1]) if len(out) == 2 else None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.proc)


class RedisEnv:
    """Every Redis process a test started."""

    def __init__(self) -> None:
        self.root = tempdir()
        self.servers: list[RedisServer] = []
        self.sentinels: list[Sentinel] = []

    def server(self, **kwargs: Any) -> RedisServer:
        s = RedisServer(self.root, **kwargs)
        self.servers.append(s)
        return s

    def sentinel(self, master_port: int, **kwargs: Any) -> Sentinel:
        s = Sentinel(self.root, master_port, **kwargs)
        self.sentinels.append(s)
        return s

    def close(self) -> None:
        for s in self.sentinels:
            s.stop()
        for r in self.servers:
            r.stop()
        shutil.rmtree(self.root, ignore_errors=True)
