"""
The packages: the RPM and the Linux and Windows ZIPs are built by their scripts, installed
offline from their bundled wheels, and the installed gateway serves a TLS route.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

import pytest

from support import REPO, Gateway, shard, which

VERSION = next(line.split("=", 1)[1].strip() for line in open(os.path.join(REPO, "setup.cfg"))
               if line.startswith("version"))


@pytest.fixture(scope="module")
def dist():
    out = tempfile.mkdtemp(prefix="gw-dist-")
    env = dict(os.environ, OUT=out, PYTHON=sys.executable)
    for script in ("packaging/rpm/build.sh", "packaging/zip/build.sh"):
        result = subprocess.run(["bash", os.path.join(REPO, script)], env=env, capture_output=True,
                                text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
    yield out
    shutil.rmtree(out, ignore_errors=True)


def _serves_tls_route(workdir: str, command: list[str], upstream, cwd: str | None = None) -> None:
    # The ZIP launcher creates its environment on first start: allow for that.
    gw = Gateway(workdir, [shard("e", "echo", 9000, upstream.port)], command=command, cwd=cwd,
                 start_timeout=600)
    try:
        with gw.connect("echo-9000.localhost") as tls:
            tls.sendall(b"from the package")
            assert tls.recv(100) == b"from the package"
    finally:
        gw.stop()


def test_rpm_contents_offline_install_and_serve(dist, echo_upstream, workdir):
    rpm = os.path.join(dist, f"twisted-gateway-{VERSION}-1.x86_64.rpm")
    listing = subprocess.run([which("rpm"), "-qpl", rpm], capture_output=True, text=True, check=True).stdout.split()
    for expected in ("/etc/twisted-gateway/gateway.yaml", "/opt/twisted-gateway/libexec/create-venv",
                     "/usr/lib/systemd/system/twisted-gateway.service",
                     "/usr/lib/systemd/system/twisted-gateway.socket", "/var/lib/twisted-gateway"):
        assert expected in listing
    assert any(p.startswith(f"/opt/twisted-gateway/wheels/twisted_gateway-{VERSION}") for p in listing)
    config_files = subprocess.run([which("rpm"), "-qpc", rpm], capture_output=True, text=True).stdout.split()
    assert "/etc/twisted-gateway/gateway.yaml" in config_files
    scripts = subprocess.run([which("rpm"), "-qp", "--scripts", rpm], capture_output=True, text=True).stdout
    assert "useradd" in scripts and "create-venv" in scripts and "systemctl" in scripts

    root = os.path.join(workdir, "root")
    os.makedirs(root)
    rpm2cpio = subprocess.Popen([which("rpm2cpio"), rpm], stdout=subprocess.PIPE)
    subprocess.run([which("cpio"), "-idm", "--quiet"], stdin=rpm2cpio.stdout, cwd=root, check=True)
    rpm2cpio.wait()
    prefix = os.path.join(root, "opt", "twisted-gateway")
    # Offline: pip is given no index at all, only the bundled wheels.
    subprocess.run(["sh", os.path.join(prefix, "libexec", "create-venv"), prefix], check=True,
                   env=dict(os.environ, PYTHON=sys.executable, PIP_NO_INDEX="1"), timeout=600)
    twistd = os.path.join(prefix, "venv", "bin", "twistd")
    version = subprocess.run([twistd, "gateway", "--version"], capture_output=True, text=True, cwd=workdir)
    assert version.stdout.strip() == f"twisted-gateway {VERSION}"
    run = os.path.join(workdir, "run")
    os.makedirs(run)
    _serves_tls_route(run, [twistd, "-n", "--pidfile=", "gateway"], echo_upstream)


def test_linux_zip_launcher_builds_env_offline_and_serves(dist, echo_upstream, workdir):
    archive = os.path.join(dist, f"twisted-gateway-{VERSION}-linux-x86_64.zip")
    with zipfile.ZipFile(archive) as z:
        z.extractall(workdir)
    root = os.path.join(workdir, f"twisted-gateway-{VERSION}")
    launcher = os.path.join(root, "bin", "gateway")
    os.chmod(launcher, 0o755)
    run = os.path.join(workdir, "run")
    os.makedirs(run)
    env_python = dict(os.environ, PYTHON=sys.executable, PIP_NO_INDEX="1")
    old = dict(os.environ)
    os.environ.update(env_python)
    try:
        _serves_tls_route(run, [launcher], echo_upstream)
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert os.path.exists(os.path.join(root, "venv", "bin", "twistd"))


def test_windows_zip_has_every_wheel_and_launchers(dist, workdir):
    archive = os.path.join(dist, f"twisted-gateway-{VERSION}-windows-amd64.zip")
    base = f"twisted-gateway-{VERSION}/"
    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
        z.extractall(workdir)
    for expected in ("bin/gateway.cmd", "bin/gateway.ps1", "bin/install-service.ps1", "etc/gateway.yaml",
                     "etc/shards.yaml"):
        assert base + expected in names
    wheels = [n for n in names if n.endswith(".whl")]
    assert wheels
    for wheel in wheels:
        tag = wheel.rsplit("-", 1)[1]
        assert tag in ("any.whl", "win_amd64.whl"), wheel
    # The compiled dependencies come as Windows builds.
    for binary in ("cryptography", "zope_interface", "cffi", "pyyaml"):
        assert any(binary in w and w.endswith("win_amd64.whl") for w in wheels), binary
    target = os.path.join(workdir, "target")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--find-links",
         os.path.join(workdir, base, "wheels"), "--platform", "win_amd64", "--python-version", "3.11",
         "--implementation", "cp", "--only-binary=:all:", "--target", target, "twisted-gateway"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Would install" in result.stdout and "twisted-gateway" in result.stdout
