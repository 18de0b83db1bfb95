"""Helpers shared by the benchmarks: ports, the gateway's twistd, running and reporting."""

from __future__ import annotations

import os
import socket
import sys
import time
import urllib.request
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20) -> None:
    """Poll until something accepts on 127.0.0.1:C{port}."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def wait_ready(admin_port: int, timeout: float = 30) -> None:
    """Poll the gateway's /readyz until it answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=2).status == 200:
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the gateway did not become ready")


def twistd() -> str:
    """The twistd script of the Python running the benchmark."""
    return os.path.join(os.path.dirname(sys.executable), "twistd")


def run_and_report(make: Callable[[], Any], out: str) -> None:
    """Build a runner, run it, always clean up, write its report to C{out} and print it."""
    runner = make()
    try:
        report = runner.run()
    finally:
        runner.close()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(report)
    print(report)


def loopback_shard(label: str, port: int, upstream_port: int, protocol: str = "tcp", **options: Any) -> dict:
    """A directory entry: one public port of a primary shard on 127.0.0.1, id and task after
    C{label}; C{options} are further port keys (e.g. passthrough=True)."""
    return {"id": label, "task": f"bench/{label}", "hostname_label": label, "address": "127.0.0.1",
            "primary": True, "ports": [{"port": port, "protocol": protocol, "public": True,
                                        "upstream_port": upstream_port, **options}]}
