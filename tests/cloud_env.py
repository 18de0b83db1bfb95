"""
The reference control plane (``twistd -n gateway-control-plane``) as a real process over HTTPS
on loopback, for the hybrid tests: its certificate from a LocalCA of its own, the directory and
settings files it watches, tokens minted with its signing key, and the records it stored read
from its SQLite database.  L{ControlPlane.stop} and L{ControlPlane.start} keep its port (an
outage and a return); the C{control_plane} fixture stops every one started.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from typing import Any

import yaml

from support import REPO, free_port, stop_process, twistd_command, wait_for_listener, write_atomically

from twisted_gateway.cloud.controlplane import mint_cloud_token, mint_user_token, signing_key
from twisted_gateway.tls.localca import LocalCA


class ControlPlane:
    def __init__(self, root: str, shards: list[dict] | None = None, settings: dict | None = None,
                 port: int | None = None, user_keys: bool = True) -> None:
        self.root = os.path.join(root, "control-plane")
        os.makedirs(self.root, exist_ok=True)
        self.state_dir = os.path.join(self.root, "state")
        self.ca = LocalCA(os.path.join(self.root, "ca"))
        self.ca_path = self.ca.cert_path
        self.cert = os.path.join(self.root, "cert.pem")
        self.key = os.path.join(self.root, "key.pem")
        self.ca.write_leaf(("localhost", "127.0.0.1"), self.cert, self.key)
        self.directory_path = os.path.join(self.root, "shards.yaml")
        self.settings_path = os.path.join(self.root, "settings.yaml")
        self.write_directory(shards or [])
        self.write_settings(settings or {})
        self.port = port or free_port()
        self.user_keys = user_keys
        self.log_path = os.path.join(self.root, "control-plane.log")
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [twistd_command(), "-n", "--pidfile=", "gateway-control-plane",
               "--state-dir", self.state_dir,
               "--port", f"ssl:{self.port}:interface=127.0.0.1:privateKey={self.key}:certKey={self.cert}",
               "--directory", self.directory_path, "--settings", self.settings_path]
        if not self.user_keys:
            cmd.append("--no-user-keys")
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for_listener(self.port, "the control plane", self.proc, output=self.output)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def output(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-5000:]

    def write_directory(self, shards: list[dict]) -> None:
        write_atomically(self.directory_path, yaml.safe_dump({"shards": shards}))

    def write_settings(self, settings: dict) -> None:
        write_atomically(self.settings_path, yaml.safe_dump(settings))

    # -- tokens --------------------------------------------------------------------------------------

    def cloud_token(self, account: str = "acme", region: str = "local", analytics_index: str = "idx-1",
                    lifetime: float = 30 * 86400.0) -> str:
        return mint_cloud_token(signing_key(self.state_dir), account, region, analytics_index, lifetime)

    def user_token(self, subject: str = "alice", prefixes: list[str] | None = None,
                   lifetime: float = 3600.0) -> str:
        return mint_user_token(signing_key(self.state_dir), subject, prefixes or ["tasks/"], lifetime)

    def gateway_config(self, workdir: str, token: str | None = None, **cloud: Any) -> dict:
        """A gateway configuration linked to this control plane (region ``local``)."""
        path = os.path.join(workdir, "cloud-token")
        with open(path, "w") as f:
            f.write(token if token is not None else self.cloud_token())
        return {"cloud": {"token_file": path, "regions": {"local": self.url}, "ca_bundle": self.ca_path,
                          "retry_initial": 0.1, "retry_max": 0.5, "batch_interval": 0.2, **cloud}}

    # -- what it stored -----------------------------------------------------------------------------

    def records(self, kind: str | None = None) -> list[dict]:
        """Every record stored, in the order stored."""
        path = os.path.join(self.state_dir, "reports.sqlite")
        if not os.path.exists(path):
            return []
        db = sqlite3.connect(path, timeout=10)
        try:
            rows = db.execute("SELECT body FROM records ORDER BY id").fetchall()
        except sqlite3.OperationalError:
            return []
        finally:
            db.close()
        out = [json.loads(r[0]) for r in rows]
        return [r for r in out if kind is None or r.get("kind") == kind]

    def batches(self) -> int:
        path = os.path.join(self.state_dir, "reports.sqlite")
        db = sqlite3.connect(path, timeout=10)
        try:
            return int(db.execute("SELECT COUNT(*) FROM batches").fetchone()[0])
        finally:
            db.close()
