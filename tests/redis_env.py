"""
Real Debian ``redis-server`` and ``redis-sentinel`` processes for the fleet tests, on loopback
ports picked free, each in a directory of its own; every process started is stopped by
L{RedisEnv.close} (the C{redis_env} fixture calls it).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
from typing import Any, Callable

from support import REPO, free_port, stop_process, tempdir, wait_for, which

from twisted_gateway.tls.localca import LocalCA


class RedisServer:
    """One redis-server; L{stop} and L{start} again keep its port (an outage and a return)."""

    def __init__(self, root: str, extra: list[str] | None = None, port: int | None = None,
                 password: str | None = None, username: str | None = None,
                 tls: LocalCA | None = None, wait: bool = True) -> None:
        """C{username} with C{password}: an ACL user limited to the fleet's keys and channels
        (``~gateway:* &gateway:* +@all``), the default user off.  C{tls}: TLS only (no plain
        port), with a certificate for 127.0.0.1 and localhost from that CA, clients not asked
        for one."""
        self.port = port or free_port()
        self.dir = os.path.join(root, f"redis-{self.port}")
        os.makedirs(self.dir, exist_ok=True)
        self.extra = list(extra or [])
        self.password = password
        self.username = username
        self.ca = tls
        if tls is not None:
            self.cert, self.key = os.path.join(self.dir, "cert.pem"), os.path.join(self.dir, "key.pem")
            tls.write_leaf(("localhost", "127.0.0.1"), self.cert, self.key)
        self.proc: subprocess.Popen | None = None
        self.start(wait=wait)

    def start(self, wait: bool = True) -> None:
        args = [which("redis-server"), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", self.dir, "--logfile", os.path.join(self.dir, "redis.log")]
        if self.ca is not None:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.cert,
                     "--tls-key-file", self.key, "--tls-ca-cert-file", self.ca.cert_path,
                     "--tls-auth-clients", "no"]
        elif "--port" not in self.extra:
            args += ["--port", str(self.port)]
        if self.username is not None:
            args += ["--user", "default", "off", "--user", self.username, "on", f">{self.password}",
                     "~gateway:*", "&gateway:*", "+@all"]
        elif self.password is not None:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args + self.extra, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        if wait:
            wait_for(lambda: self.ping(), 10, what=f"redis-server on {self.port}")

    def cli(self, *args: str, check: bool = True) -> str:
        cmd = [which("redis-cli"), "-h", "127.0.0.1", "-p", str(self.port)]
        if self.ca is not None:
            cmd += ["--tls", "--cacert", self.ca.cert_path]
        if self.username is not None:
            cmd += ["--user", self.username]
        if self.password is not None:
            cmd += ["--no-auth-warning", "--pass", self.password]
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
        user = f"{self.username}@" if self.username else ""
        return f"{'rediss' if self.ca else 'redis'}://{user}127.0.0.1:{self.port}/0"

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
        self._ca: LocalCA | None = None
        self.links: list[LinkProcess] = []

    @property
    def ca(self) -> LocalCA:
        """A CA for Redis servers' certificates (L{RedisServer} C{tls}), made on first use."""
        if self._ca is None:
            self._ca = LocalCA(os.path.join(self.root, "redis-ca"))
        return self._ca

    def server(self, **kwargs: Any) -> RedisServer:
        """A redis-server (see L{RedisServer}; C{tls=True}: with a certificate from L{ca})."""
        if kwargs.get("tls") is True:
            kwargs["tls"] = self.ca
        s = RedisServer(self.root, **kwargs)
        self.servers.append(s)
        return s

    def sentinel(self, master_port: int, **kwargs: Any) -> Sentinel:
        s = Sentinel(self.root, master_port, **kwargs)
        self.sentinels.append(s)
        return s

    def link(self, **config: Any) -> LinkProcess:
        """A RedisLink in a child process (L{LinkProcess}), stopped by L{close}."""
        link = LinkProcess(**config)
        self.links.append(link)
        return link

    def close(self) -> None:
        for link in self.links:
            link.close()
        for s in self.sentinels:
            s.stop()
        for r in self.servers:
            r.stop()
        shutil.rmtree(self.root, ignore_errors=True)


# -- a RedisLink in a process of its own ----------------------------------------------------------

class LinkProcess:
    """
    One L{twisted_gateway.fleet.redis.RedisLink} (C{config}: L{RedisConfig} fields) started in a
    child Python running its own reactor, driven over JSON lines: L{call} sends an operation
    and returns its answer; everything the child reports (its log events, on_up, on_down,
    pub/sub messages) collects in L{events}.
    """

    def __init__(self, **config: Any) -> None:
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--link", json.dumps(config)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env)
        self.events: list[dict] = []
        self._answers: queue.Queue[dict] = queue.Queue()
        self._next = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "raw", "text": line.rstrip("\n")}
            if "id" in event:
                self._answers.put(event)
            else:
                self.events.append(event)

    def call(self, op: str, timeout: float = 15, **args: Any) -> dict:
        """Run C{op} in the child: C{{"ok": value}} or C{{"error": class name, "message": ...}}."""
        self._next += 1
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"id": self._next, "op": op, **args}) + "\n")
        self.proc.stdin.flush()
        try:
            answer = self._answers.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no answer to {op} within {timeout}s:\n{self.output()}") from None
        assert answer["id"] == self._next, answer
        return answer

    def execute(self, *args: Any) -> dict:
        return self.call("execute", args=list(args))

    def state(self) -> dict:
        return self.call("state")["ok"]

    def wait(self, predicate: Callable[[dict], Any], timeout: float = 10, what: str = "state") -> dict:
        """Poll the child's state until C{predicate(state)} holds."""
        found: list[dict] = []

        def check() -> bool:
            found[:] = [self.state()]
            return bool(predicate(found[0]))
        wait_for(check, timeout, interval=0.05, what=f"{what} (last: {found[-1] if found else None})\n"
                 + self.output())
        return found[0]

    def logs(self, level: str | None = None, text: str = "") -> list[str]:
        return [e["text"] for e in list(self.events) if e.get("event") == "log"
                and (level is None or e["level"] == level) and text in e["text"]]

    def count(self, event: str, **fields: Any) -> int:
        return sum(1 for e in list(self.events) if e.get("event") == event
                   and all(e.get(k) == v for k, v in fields.items()))

    def output(self) -> str:
        return "\n".join(f"{e.get('level', e.get('event'))} {e.get('text', e)}" for e in list(self.events)[-60:])

    def stop(self) -> dict:
        """Stop the link's service, then the reactor: the answer says what stayed scheduled."""
        if self.proc.poll() is not None:
            return {}
        answer = self.call("stop")
        self.proc.wait(10)
        self._reader.join(5)
        return answer["ok"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.stop()
            except (AssertionError, OSError, subprocess.TimeoutExpired):
                pass
        stop_process(self.proc)


def _drive_link(config_json: str) -> None:
    """The child of L{LinkProcess}."""
    import gc
    import traceback

    from twisted.internet import reactor, stdio
    from twisted.internet.defer import maybeDeferred
    from twisted.logger import LogLevel, formatEvent, globalLogBeginner
    from twisted.protocols.basic import LineReceiver

    from twisted_gateway import metrics
    from twisted_gateway.config import RedisConfig
    from twisted_gateway.fleet.redis import RedisLink

    out = os.fdopen(os.dup(1), "w", buffering=1)

    def emit(obj: dict) -> None:
        out.write(json.dumps(obj, default=repr) + "\n")
        out.flush()

    def observe(event: dict) -> None:
        text = formatEvent(event)
        if event.get("log_failure") is not None:
            text += "\n" + event["log_failure"].getTraceback()
        emit({"event": "log", "level": event.get("log_level", LogLevel.info).name,
              "namespace": event.get("log_namespace"), "text": text})
    globalLogBeginner.beginLoggingTo([observe], redirectStandardIO=False)

    raw = json.loads(config_json)
    if "sentinels" in raw:
        raw["sentinels"] = tuple(raw["sentinels"])
    link = RedisLink(RedisConfig(**raw), reactor)
    link.on_up(lambda: emit({"event": "up"}))
    link.on_down(lambda: emit({"event": "down"}))

    def sample(name: str, **labels: str) -> float:
        return metrics.REGISTRY.get_sample_value(name, labels) or 0.0

    def state() -> dict:
        return {"up": link.up, "subscribed": link.subscribed, "readiness": link.readiness(),
                "redis_up": sample("gateway_redis_up"),
                "disconnects": sample("gateway_redis_disconnects_total"),
                "errors": {k: sample("gateway_redis_command_errors_total", kind=k)
                           for k in ("unavailable", "timeout", "error")}}

    def stop() -> Any:
        d = maybeDeferred(link.stopService)

        def stopped(_: Any) -> Any:
            gc.collect()  # an unhandled failure in a Deferred dropped now is logged now
            pending = [repr(c.func) for c in reactor.getDelayedCalls()]
            reactor.callLater(0.3, reactor.stop)
            return {"stopped": True, "pending": pending}
        return d.addCallback(stopped)

    class Commands(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:  # noqa: N802
            request = json.loads(line)
            op = request.pop("op")
            rid = request.pop("id")
            try:
                if op == "execute":
                    d = link.execute(*request["args"])
                elif op == "subscribe":
                    channel = request["channel"]
                    link.subscribe(channel, lambda text: emit({"event": "message", "channel": channel,
                                                               "text": text}))
                    d = maybeDeferred(lambda: True)
                elif op == "state":
                    d = maybeDeferred(state)
                elif op == "first_check":
                    d = maybeDeferred(link.first_check)
                elif op == "stop":
                    d = stop()
                else:
                    raise ValueError(op)
            except Exception as e:  # noqa: BLE001
                emit({"id": rid, "error": type(e).__name__, "message": traceback.format_exc()})
                return
            d.addCallbacks(lambda value: emit({"id": rid, "ok": value}),
                           lambda f: emit({"id": rid, "error": f.type.__name__, "message": f.getErrorMessage()}))

    stdio.StandardIO(Commands(), stdout=os.open(os.devnull, os.O_WRONLY))
    link.startService()
    reactor.run()
    gc.collect()
    emit({"event": "exit"})


if __name__ == "__main__" and sys.argv[1:2] == ["--link"]:
    _drive_link(sys.argv[2])
