"""
Real gateways (``twistd -n gateway``, one worker each, their own state directories) on the
two Redis set-ups an operator runs besides a plain one: Redis with an ACL user and TLS (the
password from redis.password_file, the server's certificate checked against redis.tls_ca),
and a master with a replica watched by three sentinels, whose master is killed: the gateways
keep routing from the directory they hold, follow the promoted replica, and a shard written
after the failover reaches both.  Shards are written with ``twistd gateway directory put``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from typing import Any

import pytest
import yaml

from support import REPO, Gateway, shard, tempdir, twistd_command, wait_for


def write_config(path: str, redis: dict) -> str:
    with open(path, "w") as f:
        yaml.safe_dump({"redis": redis}, f)
    return path


def directory_cli(config_path: str, *args: str, url: list[str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([twistd_command(), "gateway", "--config", config_path, *(url or []),
                           "directory", *args], env=env, capture_output=True, text=True, timeout=30)


class Gateways:
    """Gateways started by a test, stopped (and checked for crashes) at its end."""

    def __init__(self) -> None:
        self.root = tempdir()
        self.started: list[Gateway] = []

    def start(self, name: str, redis: dict, args: list[str] | None = None, ready: bool = True) -> Gateway:
        workdir = os.path.join(self.root, name)
        os.makedirs(workdir, exist_ok=True)
        # demo=True: no --directory flag, so the directory comes from Redis.
        gw = Gateway(workdir, demo=True, config={"redis": redis}, args=args, wait_ready=False)
        self.started.append(gw)
        if ready:
            wait_for(lambda: gw.http_get("/readyz")[0] == 200, 20, what=f"gateway {name} ready")
        return gw

    def close(self) -> None:
        for gw in self.started:
            gw.stop()
        crashes = [e for gw in self.started for e in gw.events
                   if e.get("level") == "critical" or "Traceback" in str(e.get("message"))
                   or "Unhandled" in str(e.get("message"))]
        shutil.rmtree(self.root, ignore_errors=True)
        assert not crashes, f"a gateway logged a crash: {crashes[:3]}"


@pytest.fixture
def gateways():
    g = Gateways()
    try:
        yield g
    finally:
        g.close()


def readiness(gw: Gateway) -> dict:
    status, body = gw.http_get("/readyz")
    assert status == 200, (status, body)
    return json.loads(body)


def redis_detail(gw: Gateway) -> dict:
    doc = readiness(gw)
    found = doc.get("redis") or doc.get("detail", {}).get("redis")
    assert found is not None, doc
    return found


def test_acl_password_file_and_tls(redis_env, gateways, echo_upstream, tmp_path) -> None:
    server = redis_env.server(tls=True, username="gateway-a", password="acl-secret")
    secret = tmp_path / "redis-password"
    secret.write_text("acl-secret\n")
    secret.chmod(0o600)
    url = f"rediss://gateway-a@127.0.0.1:{server.port}/0"
    redis = {"password_file": str(secret), "tls_ca": redis_env.ca.cert_path}
    config = write_config(str(tmp_path / "cli.yaml"), redis)

    gw = gateways.start("acl-tls", redis, args=["--redis", url])
    wait_for(lambda: gw.metric("gateway_redis_up") == 1, 10, what="gateway_redis_up 1\n" + gw.output())
    detail = redis_detail(gw)
    assert detail["state"] == "up" and detail["target"] == f"rediss://127.0.0.1:{server.port}/0", detail
    assert "redis" not in readiness(gw).get("degraded", [])
    # It is the ACL user that is connected, over TLS.
    clients = server.cli("CLIENT", "LIST")
    assert "user=gateway-a" in clients and "user=default" not in clients, clients

    out = directory_cli(config, "put", json.dumps(shard("tls-1", "secure", 7, echo_upstream.port)),
                        url=["--redis", url])
    assert (out.returncode, out.stderr) == (0, ""), out
    assert out.stdout.startswith("version ")
    wait_for(lambda: gw.echoes("secure-7.localhost"), 10, what="the shard routed\n" + gw.output())
    assert not [e for e in gw.events if e.get("level") == "error"], gw.output()

    # A gateway with the wrong password: refused, said once.
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-it\n")
    bad = gateways.start("acl-wrong", {**redis, "password_file": str(wrong)}, args=["--redis", url],
                         ready=False)
    bad.wait_logged("WRONGPASS", 10)
    assert bad.metric("gateway_redis_up") == 0
    # Unready only because it has no directory at all yet (nothing cached): Redis is "degraded".
    status, body = bad.http_get("/readyz")
    doc = json.loads(body)
    assert status == 503 and doc["reasons"] == ["shard directory not loaded"], body
    assert "redis" in doc["degraded"] and "WRONGPASS" in doc["redis"]["last_error"], body
    errors = [e["message"] for e in bad.events if e.get("level") == "error"]
    assert len(errors) == 1 and "refused" in errors[0], errors


class Routing:
    """Probes that every gateway routes C{name}, over and over from a thread, until stopped."""

    def __init__(self, gws: list[Gateway], name: str) -> None:
        self.gws = gws
        self.name = name
        self.probes = 0
        self.failures: list[tuple[int, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for i, gw in enumerate(self.gws):
                self.probes += 1
                if not gw.echoes(self.name):
                    self.failures.append((i, time.monotonic()))
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def test_sentinel_failover(redis_env, gateways, echo_upstream, tmp_path) -> None:
    master = redis_env.server()
    replica = redis_env.server(extra=["--replicaof", "127.0.0.1", str(master.port)])
    wait_for(lambda: "master_link_status:up" in replica.cli("INFO", "replication"), 10,
             what="replica in sync")
    sentinels = [redis_env.sentinel(master.port) for _ in range(3)]
    wait_for(lambda: all(str(replica.port) in s.cli("SENTINEL", "replicas", "mymaster")
                         and s.cli("SENTINEL", "sentinels", "mymaster").count("127.0.0.1") >= 2
                         for s in sentinels), 20, what="sentinels know the replica and each other")
    redis = {"sentinels": [s.address for s in sentinels], "master_name": "mymaster"}
    config = write_config(str(tmp_path / "cli.yaml"), redis)

    gws = [gateways.start(name, redis) for name in ("a", "b")]
    for gw in gws:
        wait_for(lambda: gw.metric("gateway_redis_up") == 1, 10, what="gateway_redis_up 1\n" + gw.output())
        assert redis_detail(gw)["master"] == f"127.0.0.1:{master.port}"
    out = directory_cli(config, "put", json.dumps(shard("before", "before", 7, echo_upstream.port)))
    assert out.returncode == 0, out
    for gw in gws:
        wait_for(lambda: gw.echoes("before-7.localhost"), 10, what="before routed\n" + gw.output())

    routing = Routing(gws, "before-7.localhost")
    try:
        master.kill()
        killed = time.monotonic()
        for gw in gws:
            wait_for(lambda: gw.metric("gateway_redis_up") == 0, 10, what="the loss seen\n" + gw.output())
            assert "redis" in readiness(gw).get("degraded", [])
        back = []
        for gw in gws:
            wait_for(lambda: gw.metric("gateway_redis_up") == 1, 30,
                     what="gateway_redis_up 1 at the promoted replica\n" + gw.output())
            back.append(time.monotonic() - killed)
        assert "role:master" in replica.cli("INFO", "replication")
        for gw in gws:
            assert redis_detail(gw)["master"] == f"127.0.0.1:{replica.port}"
            gw.wait_logged(f"Sentinel names 127.0.0.1:{replica.port} the master")
            gw.wait_logged("restored after")

        written = time.monotonic()
        out = directory_cli(config, "put", json.dumps(shard("after", "after", 7, echo_upstream.port)))
        assert out.returncode == 0, out
        propagated = []
        for gw in gws:
            wait_for(lambda: gw.echoes("after-7.localhost"), 10, what="after routed\n" + gw.output())
            propagated.append(time.monotonic() - written)
    finally:
        routing.stop()
    assert routing.probes > 10 and not routing.failures, (routing.probes, routing.failures)
    assert replica.cli("HEXISTS", "gateway:directory:shards", "after") == "1"
    for gw in gws:
        errors = [e["message"] for e in gw.events if e.get("level") == "error"]
        assert len(errors) == 1 and "unreachable" in errors[0], errors
    print(f"\nSentinel failover: gateway_redis_up back to 1 after {', '.join(f'{s:.1f}' for s in back)} s "
          f"from the master's SIGKILL; a shard written after it routed on both after "
          f"{max(propagated):.2f} s (from the start of `directory put`); "
          f"{routing.probes} probes of the existing shard during the failover, all routed")
