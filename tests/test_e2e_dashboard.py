"""
End to end: the dashboard in a real headless browser (Debian's chromium, over the DevTools
protocol).  The page loads with no console error and fetches nothing but the gateway's plain
port; it shows the shard ports, the certificate's expiry and a name refused by the test's
traffic; it updates after a new connection; a screenshot is kept as an artifact
(C{$TEST_ARTIFACTS}, or a directory in the system's temporary directory).
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import tempfile

import pytest
from cryptography import x509

from support import REPO, shard, wait_for

from twisted_gateway.tls.localca import LocalCA

HOST = "gw.test"
ARTIFACTS = os.environ.get("TEST_ARTIFACTS") or os.path.join(tempfile.gettempdir(), "twisted-gateway-artifacts")


@pytest.fixture
def browser():
    from browser import Browser
    b = Browser()
    yield b
    b.close()


def _cell(browser, shard_id: str, port: int, column: str):
    return browser.evaluate(
        f"(() => {{ const row = document.querySelector('#routes tr[data-shard=\"{shard_id}\"][data-port=\"{port}\"]');"
        f" return row ? row.querySelector('td.{column}').dataset.value : null; }})()")


def test_dashboard_in_headless_chromium(start_gateway, echo_upstream, workdir, browser):
    ca = LocalCA(os.path.join(workdir, "operator-ca"))
    cert, key = os.path.join(workdir, "wild.pem"), os.path.join(workdir, "wild-key.pem")
    ca.write_leaf((f"*.{HOST}", HOST), cert, key)
    with open(cert, "rb") as f:
        leaf = x509.load_pem_x509_certificates(f.read())[0]
    token = "dashboard-token-4b1f"
    token_file = os.path.join(workdir, "admin-token")
    with open(token_file, "w") as f:
        f.write(token + "\n")
    gw = start_gateway(
        [shard("alpha-0", "alpha", 9000, echo_upstream.port),
         shard("web-0", "web", 8080, echo_upstream.port, protocol="http/1.1"),
         shard("cache-0", "cache", 6379, echo_upstream.port)],
        args=["--hostname", HOST, "--tls-certificate", cert, "--tls-private-key", key],
        config={"admin": {"token_file": token_file}})
    ctx = ssl.create_default_context(cafile=ca.cert_path)

    def echo(payload: bytes) -> None:
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", gw.tls_port), timeout=10),
                             server_hostname=f"alpha-9000.{HOST}") as tls:
            tls.sendall(payload)
            assert tls.recv(100) == payload

    echo(b"first")
    with socket.create_connection(("127.0.0.1", gw.tls_port), timeout=10) as raw:
        with pytest.raises(ssl.SSLError):
            ctx.wrap_socket(raw, server_hostname=f"intruder-22.{HOST}")

    base = f"http://127.0.0.1:{gw.plain_port}"
    # The admin token, on every request the page makes.
    browser.call("Network.setExtraHTTPHeaders", headers={"Authorization": f"Bearer {token}"})
    browser.navigate(base + "/")
    wait_for(lambda: int(browser.evaluate("document.body.dataset.refreshes")) >= 1, 15,
             what="the dashboard's first refresh")

    ports = browser.evaluate("[...document.querySelectorAll('#routes tbody tr')].map(r => r.dataset.name)")
    assert sorted(ports) == sorted([f"alpha-9000.{HOST}", f"web-8080.{HOST}", f"cache-6379.{HOST}"])
    assert _cell(browser, "alpha-0", 9000, "connections") == "1"
    assert _cell(browser, "alpha-0", 9000, "up") == str(len(b"first"))

    expiry = browser.evaluate(
        f"document.querySelector('#certificates tr[data-names=\"*.{HOST} {HOST}\"] td.not-after').textContent")
    assert expiry == leaf.not_valid_after_utc.isoformat()
    assert browser.evaluate("document.getElementById('tile-expiry').textContent") == \
        leaf.not_valid_after_utc.date().isoformat()

    refused = browser.evaluate(
        "[...document.querySelectorAll('#refusals tbody tr')].map(r => [r.dataset.sni, r.querySelector('td.reason').textContent])")
    assert [f"intruder-22.{HOST}", "unknown_shard"] in refused

    # A new connection: the page shows it at its next refresh, without a reload.
    echo(b"second!")
    wait_for(lambda: _cell(browser, "alpha-0", 9000, "connections") == "2", 15, interval=0.2,
             what="the dashboard showing the new connection")
    assert _cell(browser, "alpha-0", 9000, "up") == str(len(b"first") + len(b"second!"))
    wait_for(lambda: browser.evaluate("document.querySelectorAll('#chart svg path').length") == 2, 15,
             interval=0.2, what="the chart's two lines")

    assert browser.errors() == []
    assert all(url.startswith(base + "/") or url.startswith("data:") for url in browser.requested_urls()), \
        browser.requested_urls()

    os.makedirs(ARTIFACTS, exist_ok=True)
    shot = os.path.join(ARTIFACTS, "dashboard.png")
    browser.screenshot(shot)
    with open(shot, "rb") as f:
        png = f.read()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
    shutil.copy(shot, os.path.join(workdir, "dashboard.png"))
    if os.environ.get("UPDATE_DOCS_SCREENSHOT"):
        shutil.copy(shot, os.path.join(REPO, "docs", "images", "dashboard.png"))

    # Without the token the page is refused (and a browser is asked for it).
    browser.call("Network.setExtraHTTPHeaders", headers={})
    assert gw.http_get("/")[0] == 401
