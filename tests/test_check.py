"""
``twistd -n gateway --check``: the real command, as an operator (or a deploy step) runs it.
It validates the configuration, the directory file and the certificates, prints a summary and
exits 0, or exits 2 with one sentence naming the problem; it never starts the gateway.
"""

from __future__ import annotations

import os
import socket
import subprocess

import yaml

from support import REPO, free_port, shard, twistd_command


def _check(workdir: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([twistd_command(), "-n", "--pidfile=", "gateway", "--check", *args],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=60)


def _write(path: str, doc: object) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    return path


def _certificate(workdir: str) -> tuple[str, str]:
    from twisted_gateway.tls.localca import LocalCA
    ca = LocalCA(os.path.join(workdir, "ca"))
    cert, key = os.path.join(workdir, "gw.pem"), os.path.join(workdir, "gw.key")
    ca.write_leaf(("*.gw.test", "gw.test"), cert, key)
    return cert, key


def _good_setup(workdir: str, tls_port: int) -> str:
    cert, key = _certificate(workdir)
    _write(os.path.join(workdir, "shards.yaml"), {"shards": [
        shard("a", "alpha", 9000, 1),
        shard("b", "beta", 8080, 2, protocol="http/1.1",
              extra_ports=[{"port": 8443, "protocol": "h2", "public": False}]),
    ]})
    with open(os.path.join(workdir, "secret"), "w") as f:
        f.write("s3cret-for-tests\n")
    return _write(os.path.join(workdir, "gateway.yaml"), {
        "hostname": "gw.test",
        "workers": 2,
        "state_dir": "state",
        "listen": {"tls": f"tcp:{tls_port}:interface=127.0.0.1", "plain": 0},
        "tls": {"certificate": "gw.pem", "private_key": "gw.key"},
        "directory": {"file": "shards.yaml"},
        "auth": {"jwt_secret_file": "secret", "issuer": "control-plane"},
    })


def test_check_prints_a_summary_and_starts_nothing(workdir):
    tls_port = free_port()
    config = _good_setup(workdir, tls_port)
    out = _check(workdir, "--config", config)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    lines = out.stdout.splitlines()
    assert lines[0].startswith("twisted-gateway ") and lines[0].endswith(
        f": the configuration is valid ({config})")
    rows = dict(line.strip().split(": ", 1) for line in lines[1:])
    rows = {label.rstrip(":").strip(): text.strip() for label, text in rows.items()}
    assert rows["hostname"] == "gw.test"
    assert rows["listeners"] == f"tls tcp:{tls_port}:interface=127.0.0.1, plain tcp:0"
    assert rows["workers"] == "2"
    assert rows["directory"] == (f"{os.path.join(workdir, 'shards.yaml')}: 2 shards; "
                                 "ports: 1 tcp, 1 http/1.1, 1 h2")
    assert rows["certificate"].startswith(f"{os.path.join(workdir, 'gw.pem')}: *.gw.test, gw.test; "
                                          "valid until 20")
    assert rows["acme"] == "off"
    assert rows["auth"] == (f"HS256 shared secret from {os.path.join(workdir, 'secret')}; "
                            "required issuer control-plane")
    # Nothing was started or created: no state directory, nothing listening.
    assert not os.path.exists(os.path.join(workdir, "state"))
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", tls_port)) != 0


def test_check_with_defaults_names_the_demo_shard_and_the_local_ca(workdir):
    out = _check(workdir, "--hostname", "gw.test", "--workers", "1")
    assert out.returncode == 0, out.stderr
    assert "the built-in demo shard" in out.stdout
    assert "local development CA" in out.stdout
    assert "auth:" in out.stdout and "none" in out.stdout
    assert not os.path.exists(os.path.join(workdir, "state"))


def test_check_refuses_a_broken_directory_naming_the_file_and_place(workdir):
    config = _good_setup(workdir, free_port())
    broken = shard("a", "alpha", 9000, 1, protocol="gopher")
    _write(os.path.join(workdir, "shards.yaml"), {"shards": [broken]})
    out = _check(workdir, "--config", config)
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"gateway: {os.path.join(workdir, 'shards.yaml')}: shards[0].ports[0]")
    assert "gopher" in lines[0]


def test_check_refuses_a_broken_configuration(workdir):
    config = _write(os.path.join(workdir, "gateway.yaml"), {"tls": {"handshake_timeout": "soon"}})
    out = _check(workdir, "--config", config)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip() == (f"gateway: {config}: tls.handshake_timeout: "
                                  "expected a positive number, got 'soon'")


def test_check_refuses_a_key_that_does_not_match_and_a_bad_listener(workdir):
    config = _good_setup(workdir, free_port())
    from twisted_gateway.tls.localca import LocalCA
    LocalCA(os.path.join(workdir, "ca")).write_leaf(
        ("other.test",), os.path.join(workdir, "other.pem"), os.path.join(workdir, "other.key"))
    out = _check(workdir, "--config", config, "--tls-private-key", os.path.join(workdir, "other.key"))
    assert out.returncode == 2 and out.stdout == ""
    assert "the key does not match the certificate" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = _check(workdir, "--config", config, "--plain-port", "carrier-pigeon:1")
    assert out.returncode == 2
    assert out.stderr.startswith("gateway: command line: --plain-port: 'carrier-pigeon:1' is not "
                                 "a usable endpoint description")


def test_check_names_redis_as_the_directory_and_refuses_a_password_in_the_url(workdir):
    done = _check(workdir, "--redis", "redis://gw@127.0.0.1:1/0", "--tls-port", "tcp:0", "--plain-port", "tcp:0")
    assert done.returncode == 0, done.stderr
    assert "Redis (redis.directory, keys gateway:directory:*)" in done.stdout
    done = _check(workdir, "--redis", "redis://gw:secret@127.0.0.1:1/0")
    assert done.returncode == 2
    assert "put the password in redis.password_file" in done.stderr
    assert "secret" not in done.stderr.replace("password_file", "")
