"""
Debian's pebble (a test ACME server) and pebble-challtestsrv (a DNS server that answers every
name with 127.0.0.1) started on loopback for the certificate tests.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import threading
import urllib.request

from support import Upstream, free_port, stop_process, wait_for_listener, which

from twisted_gateway.tls.localca import LocalCA


class Pebble:
    def __init__(self, workdir: str, http_port: int, tls_port: int, dns_server: str | None = None,
                 validity: int | None = None, env: dict | None = None, start: bool = True) -> None:
        self.dir = os.path.join(workdir, f"pebble-{free_port()}")
        os.makedirs(self.dir)
        ca = LocalCA(os.path.join(self.dir, "ca"))
        self.ca_path = ca.cert_path
        cert, key = os.path.join(self.dir, "cert.pem"), os.path.join(self.dir, "key.pem")
        ca.write_leaf(("localhost", "127.0.0.1"), cert, key)
        self.port = free_port()
        self.management_port = free_port()
        self.log_lines: list[str] = []
        self.dns = None
        self.proc = None
        config = {"pebble": {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": cert, "privateKey": key,
            "httpPort": http_port, "tlsPort": tls_port,
            "ocspResponderURL": "", "externalAccountBindingRequired": False,
        }}
        if validity is not None:
            config["pebble"]["certificateValidityPeriod"] = validity
        self.config_path = os.path.join(self.dir, "pebble.json")
        with open(self.config_path, "w") as f:
            json.dump(config, f)
        self._dns_server = dns_server
        self._env = env or {}
        if start:
            self.start()

    def start(self) -> None:
        dns_server = self._dns_server
        if dns_server is None:
            self.dns = ChallTestSrv()
            dns_server = f"127.0.0.1:{self.dns.dns_port}"
        cmd = [which("pebble"), "-config", self.config_path, "-strict=false", "-dnsserver", dns_server]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0",
                     PEBBLE_AUTHZREUSE="0", **self._env))
        threading.Thread(target=self._read, daemon=True).start()
        wait_for_listener(self.port, "pebble", self.proc, output=lambda: "".join(self.log_lines))

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log_lines.append(line)

    def root_pem(self) -> str:
        """The root that signs issued certificates (regenerated at every pebble start)."""
        ctx = ssl.create_default_context(cafile=self.ca_path)
        with urllib.request.urlopen(f"https://127.0.0.1:{self.management_port}/roots/0",
                                    context=ctx, timeout=10) as r:
            return r.read().decode()

    def count(self, text: str) -> int:
        return sum(text in line for line in list(self.log_lines))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc)
        if self.dns is not None:
            self.dns.stop()


class ChallTestSrv:
    def __init__(self) -> None:
        self.dns_port = free_port()
        self.management_port = free_port()
        self.proc = subprocess.Popen(
            [which("pebble-challtestsrv"), "-defaultIPv6", "", "-defaultIPv4", "127.0.0.1",
             "-dns01", f"127.0.0.1:{self.dns_port}", "-management", f"127.0.0.1:{self.management_port}",
             "-http01", "", "-https01", "", "-tlsalpn01", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_listener(self.management_port, "challtestsrv", self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Knot:
    """Debian's knotd serving one zone on loopback and accepting TSIG-signed RFC 2136 updates."""

    def __init__(self, workdir: str, zone: str) -> None:
        import base64
        self.dir = os.path.join(workdir, f"knot-{free_port()}")
        os.makedirs(os.path.join(self.dir, "db"))
        self.port = free_port()
        self.zone = zone
        self.tsig_name = "acme-key"
        self.tsig_secret = base64.b64encode(os.urandom(32)).decode()
        with open(os.path.join(self.dir, "knot.conf"), "w") as f:
            f.write(f"""server:
    rundir: {self.dir}
    listen: 127.0.0.1@{self.port}
database:
    storage: {self.dir}/db
key:
  - id: {self.tsig_name}
    algorithm: hmac-sha256
    secret: {self.tsig_secret}
acl:
  - id: update_acl
    key: {self.tsig_name}
    action: update
zone:
  - domain: {zone}
    storage: {self.dir}
    file: zone.db
    acl: update_acl
    zonefile-sync: -1
    journal-content: changes
""")
        with open(os.path.join(self.dir, "zone.db"), "w") as f:
            f.write(f"""$ORIGIN {zone}.
$TTL 60
@ SOA ns.{zone}. admin.{zone}. 1 60 60 3600 60
@ NS ns.{zone}.
ns A 127.0.0.1
@ A 127.0.0.1
* A 127.0.0.1
""")
        self.proc = subprocess.Popen([which("knotd"), "-c", os.path.join(self.dir, "knot.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_listener(self.port, "knotd", self.proc)

    def stop(self) -> None:
        stop_process(self.proc)


class HoldingProxy:
    """
    A loopback TCP port (pebble's httpPort or tlsPort) that holds every connection until
    L{release} names the port to relay it to: a CA's validation kept waiting mid-order, for as
    long as a test needs.  The port is the suite's threaded server (L{support.Upstream}).
    """

    def __init__(self) -> None:
        self.target: int | None = None
        self._released = threading.Event()
        self._upstreams: list = []
        self._server = Upstream(self._relay)
        self.port = self._server.port

    @property
    def accepted(self) -> int:
        return self._server.accepted

    def release(self, target_port: int) -> None:
        self.target = target_port
        self._released.set()

    def _relay(self, conn) -> None:
        import socket
        if not self._released.wait(120) or self.target is None:
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target), timeout=10)
        except OSError:
            return
        self._upstreams.append(upstream)

        def pipe(src, dst) -> None:
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    dst.sendall(data)
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        back = threading.Thread(target=pipe, args=(upstream, conn), daemon=True)
        back.start()
        pipe(conn, upstream)
        back.join(120)  # the server closes conn when this returns: after the reply is through

    def close(self) -> None:
        self._released.set()
        self._server.close()
        for s in self._upstreams:
            try:
                s.close()
            except OSError:
                pass
