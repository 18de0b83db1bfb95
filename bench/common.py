"""Helpers shared by the benchmarks: ports, the gateway's twistd, running and reporting."""

from __future__ import annotations

import os
import socket
import sys
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
