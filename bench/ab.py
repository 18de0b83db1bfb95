#!/usr/bin/env python3
"""
A/B: gateways from several source trees beside one HAProxy, in turns, on one set of upstreams.

    git worktree add /somewhere/old <commit>
    python3 bench/ab.py --trees /somewhere/old . --work w1http --work w2 [--rounds 3] [--duration 5]

Sets up what bench/run.py sets up (nginx, the TCP source and sink, HAProxy, the same
certificate and routes, each proxy pinned to CPU 0 and the load on CPU 1), starts one gateway
per tree (each with PYTHONPATH set to its tree), then runs every workload against each gateway
and HAProxy in turn, round after round, and prints each proxy's CPU per operation (user and
system, from /proc/PID/stat) and the medians. Comparing trees within one run on one machine is
what separates a change from the machine's own drift, which moves a whole run by more than most
single changes (docs/performance.md).

Workloads: w1http, w1tcp (wrk, 50 keep-alive connections, 100 B), w2, w2r (a TLS handshake per
connection, full or resumed), w4http, w4h2 (h2load, 10 clients x 10 streams). Needs what
bench/run.py needs; every loop is bounded by --duration and talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run as bench  # noqa: E402  (bench/run.py)

WORKLOADS = {
    "w1http": lambda b, p: b.w1(p, "http"), "w1tcp": lambda b, p: b.w1(p, "tcp"),
    "w2": lambda b, p: b.w2(p, False), "w2r": lambda b, p: b.w2(p, True),
    "w4http": lambda b, p: b.w4(p, "http"), "w4h2": lambda b, p: b.w4(p, "h2"),
}


def _times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / bench.TICKS, int(fields[12]) / bench.TICKS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", nargs="+", required=True, help="source trees, one gateway each")
    parser.add_argument("--work", action="append", required=True, choices=sorted(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per workload and proxy")
    args = parser.parse_args()
    trees = [os.path.abspath(t) for t in args.trees]
    b = bench.Bench(argparse.Namespace(duration=args.duration, bulk_mib=64, reactor="epoll",
                                       profile=None, only=None))
    results: dict[tuple[str, str], list[float]] = {}
    try:
        b.start_upstreams()
        b.start_haproxy()
        gateways = {}
        for tree in trees:
            bench.REPO = tree  # start_gateway runs twistd with PYTHONPATH=REPO
            b.start_gateway()
            gateways[tree] = (b.gw, b.gw_port)
        time.sleep(1)
        for n in range(args.rounds):
            for work in args.work:
                for who in [*trees, "haproxy"]:
                    proxy = "haproxy" if who == "haproxy" else "gateway"
                    if proxy == "gateway":
                        b.gw, b.gw_port = gateways[who]
                    pid = b.pid_of(proxy)
                    user0, sys0 = _times(pid)
                    m = b.measure(proxy, lambda: WORKLOADS[work](b, proxy))
                    user1, sys1 = _times(pid)
                    ops = m["ops"]
                    per_op = m["proxy_cpu"] / ops * 1e6
                    results.setdefault((work, who), []).append(per_op)
                    print(f"round {n} {work} {who}: {m['value']:.0f} {m['unit']}, {per_op:.1f} µs/op "
                          f"(user {(user1 - user0) / ops * 1e6:.1f}, system {(sys1 - sys0) / ops * 1e6:.1f})",
                          flush=True)
        print("medians of CPU per operation:")
        for (work, who), values in results.items():
            print(f"  {work} {who}: {statistics.median(values):.1f} µs ({', '.join(f'{v:.1f}' for v in values)})")
    finally:
        b.close()


if __name__ == "__main__":
    main()
