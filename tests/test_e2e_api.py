"""End to end: the gateway's REST API on the bare hostname, with tokens, CORS and body limits."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest
from openapi_spec_validator import validate

from support import shard, which
from test_e2e_http import SECRET, token

MiB = 1024 * 1024


@pytest.fixture
def api_gateway(start_gateway, echo_upstream):
    shards = [
        shard("a1", "alpha", 9000, echo_upstream.port, task="acme/alpha"),
        shard("a2", "alpha", 9000, echo_upstream.port, task="acme/alpha", primary=False, key_begin=5),
        shard("b1", "beta", 9000, echo_upstream.port, task="acme/beta"),
        shard("z1", "zeta", 9000, echo_upstream.port, task="other/zeta"),
    ]
    return start_gateway(shards, config={"auth": {"jwt_secret": SECRET},
                                         "api": {"cors_allowed_origin": "https://console.example.test"}})


def call(gw, path, body=None, bearer=None, method=None, headers=()):
    cmd = [which("curl"), "-sS", "--cacert", gw.ca_path, "-w", "\n%{http_code}",
           f"https://localhost:{gw.tls_port}{path}"]
    if bearer:
        cmd += ["-H", f"Authorization: Bearer {bearer}"]
    if body is not None:
        cmd += ["-H", "Content-Type: application/json", "--data", json.dumps(body)]
    if method:
        cmd += ["-X", method]
    for h in headers:
        cmd += ["-H", h]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    text, _, code = out.stdout.rpartition("\n")
    return int(code), (json.loads(text) if text.strip() else None)


def test_list_with_good_foreign_and_missing_prefixes(api_gateway):
    gw = api_gateway
    acme = token(prefixes=["acme/"])
    code, doc = call(gw, "/v1/shards/list", {"include": {"task_prefix": "acme/"}}, acme)
    assert code == 200
    assert sorted(s["id"] for s in doc["shards"]) == ["a1", "a2", "b1"]
    assert doc["shards"][0]["names"]["9000"].endswith(".localhost")
    code, doc = call(gw, "/v1/shards/list", {"include": {"task": "acme/alpha"}, "exclude": {"app": "nothing"}}, acme)
    assert sorted(s["id"] for s in doc["shards"]) == ["a1", "a2"]
    code, doc = call(gw, "/v1/shards/list", {"include": {"task": "acme/alpha"}, "exclude": {"task": "acme/alpha"}}, acme)
    assert doc["shards"] == []
    # Foreign prefix: refused, not filtered silently.
    code, doc = call(gw, "/v1/shards/list", {"include": {"task_prefix": "other/"}}, acme)
    assert code == 403 and doc["error"] == "forbidden"
    # No authorizing label.
    code, doc = call(gw, "/v1/shards/list", {"include": {"app": "alpha"}}, acme)
    assert code == 400 and "authorizing label" in doc["message"]
    # A token with a narrower prefix sees only its share of a broader selector it may not ask for.
    narrow = token(prefixes=["acme/al"])
    assert call(gw, "/v1/shards/list", {"include": {"task_prefix": "acme/"}}, narrow)[0] == 403
    code, doc = call(gw, "/v1/shards/list", {"include": {"task_prefix": "acme/al"}}, narrow)
    assert sorted(s["id"] for s in doc["shards"]) == ["a1", "a2"]
    # Missing and bad tokens.
    assert call(gw, "/v1/shards/list", {"include": {"task": "acme/alpha"}})[0] == 401
    assert call(gw, "/v1/shards/list", {"include": {"task": "acme/alpha"}}, "x.y")[0] == 400
    assert call(gw, "/v1/shards/list", {"include": {"task": "acme/alpha"}}, token(exp_in=-60))[0] == 401
    assert call(gw, "/v1/shards/list", {"bogus": {}}, acme)[0] == 400


def test_stat(api_gateway):
    gw = api_gateway
    acme = token(prefixes=["acme/"])
    code, doc = call(gw, "/v1/shards/stat", {"id": "b1"}, acme)
    assert code == 200 and doc["shard"]["task"] == "acme/beta"
    assert call(gw, "/v1/shards/stat", {"id": "z1"}, acme)[0] == 404   # foreign: not revealed
    assert call(gw, "/v1/shards/stat", {"id": "nope"}, acme)[0] == 404
    assert call(gw, "/v1/shards/stat", {"id": "b1"})[0] == 401
    assert call(gw, "/v1/shards/stat", {"shard": "b1"}, acme)[0] == 400


def test_openapi_document_and_cors(api_gateway):
    gw = api_gateway
    code, doc = call(gw, "/v1/openapi.json")
    assert code == 200
    validate(doc)
    assert set(doc["paths"]) == {"/v1/shards/list", "/v1/shards/stat"}
    assert doc["paths"]["/v1/shards/list"]["post"]["operationId"] == "listShards"
    out = subprocess.run([which("curl"), "-sS", "-i", "--cacert", gw.ca_path, "-X", "OPTIONS",
                          "-H", "Origin: https://console.example.test",
                          "-H", "Access-Control-Request-Method: POST",
                          f"https://localhost:{gw.tls_port}/v1/shards/list"],
                         capture_output=True, text=True, timeout=20)
    head = out.stdout.lower()
    assert " 204" in head.splitlines()[0]
    assert "access-control-allow-origin: https://console.example.test" in head
    assert "authorization" in head
    out = subprocess.run([which("curl"), "-sS", "-i", "--cacert", gw.ca_path, "-X", "OPTIONS",
                          "-H", "Origin: https://evil.example.test",
                          f"https://localhost:{gw.tls_port}/v1/shards/list"],
                         capture_output=True, text=True, timeout=20)
    assert "access-control-allow-origin" not in out.stdout.lower()
    assert call(gw, "/v1/nothing")[0] == 404


# -- the body is read only after the head is judged ------------------------------------------------
# These need the gateway to serve the API with twisted_gateway.http.api.api_site (limits
# api_max_body_bytes, 1 MiB by default).

def _send_head(gw, head: bytes, timeout: float = 10):
    """A TLS connection to the API (HTTP/1.1) that has sent C{head} and nothing else."""
    tls = gw.connect("localhost", alpn=["http/1.1"], timeout=timeout)
    assert tls.selected_alpn_protocol() == "http/1.1"
    tls.sendall(head)
    return tls


def _read_until_closed(tls, timeout: float = 5) -> tuple[int, dict[str, str], dict | None, bytes]:
    """Status, fields, JSON body and raw bytes of the answer, read until the gateway closes
    the connection (failing if it neither answers nor closes within C{timeout})."""
    tls.settimeout(timeout)
    raw = b""
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, f"no complete answer and close: {raw!r}"
        try:
            chunk = tls.recv(65536)
        except socket.timeout:
            raise AssertionError(f"the gateway neither answered nor closed in {timeout}s: {raw!r}") from None
        if not chunk:
            break
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    if fields.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    else:
        assert len(body) == int(fields["content-length"])
    return status, fields, (json.loads(body) if body else None), raw


def _dechunk(data: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        out, data = out + data[:size], data[size + 2:]


def _post_head(length: int | None, bearer: str | None = None, extra: str = "") -> bytes:
    framing = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    auth = f"Authorization: Bearer {bearer}\r\n" if bearer else ""
    return (f"POST /v1/shards/list HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"{auth}{framing}{extra}\r\n").encode()


@pytest.mark.parametrize("extra", ["", "Expect: 100-continue\r\n"])
def test_unauthenticated_body_is_refused_from_the_head_without_being_read(api_gateway, extra):
    gw = api_gateway
    # Only the head of a 16 MiB request is sent: the answer comes without the body.
    started = time.monotonic()
    with _send_head(gw, _post_head(16 * MiB, extra=extra)) as tls:
        status, fields, doc, raw = _read_until_closed(tls)
    assert time.monotonic() - started < 5
    assert raw.startswith(b"HTTP/1.1 401 ")     # no 100 Continue before the refusal
    assert status == 401 and doc["error"] == "missing"
    assert fields["www-authenticate"].startswith("Bearer")
    assert fields["connection"] == "close" and fields["content-type"] == "application/json"
    # A bad token, and a chunked body, are refused the same way.
    with _send_head(gw, _post_head(16 * MiB, bearer=token(prefixes=["acme/"], key="another-secret-0123456789-abcdef"))) as tls:
        status, _, doc, _ = _read_until_closed(tls)
    assert status == 401 and doc["error"] == "bad_signature"
    with _send_head(gw, _post_head(None, bearer=token(prefixes=["acme/"], exp_in=-3600))) as tls:
        status, _, doc, _ = _read_until_closed(tls)
    assert status == 401 and doc["error"] == "expired"
    with _send_head(gw, _post_head(16 * MiB, bearer="x.y")) as tls:
        status, _, doc, _ = _read_until_closed(tls)
    assert status == 400 and doc["error"] == "malformed"
    # The gateway goes on serving.
    assert call(gw, "/v1/shards/list", {"include": {"task": "acme/alpha"}}, token(prefixes=["acme/"]))[0] == 200


def test_authenticated_declared_length_over_the_limit_is_refused_from_the_head(api_gateway):
    gw = api_gateway
    with _send_head(gw, _post_head(MiB + 1, bearer=token(prefixes=["acme/"]))) as tls:
        status, fields, doc, raw = _read_until_closed(tls)
    assert raw.startswith(b"HTTP/1.1 413 ")
    assert doc == {"error": "too_large", "message": "the request body exceeds 1 MiB"}
    assert fields["connection"] == "close"
    # At the limit the body is read (and here found not to be JSON).
    body = b" " * (MiB - 2) + b"{}"
    with _send_head(gw, _post_head(len(body), bearer=token(prefixes=["acme/"]), extra="Connection: close\r\n")) as tls:
        tls.sendall(body)
        status, _, doc, _ = _read_until_closed(tls, timeout=10)
    assert status == 400 and doc["error"] == "unauthorized_selector"


def test_chunked_body_over_the_limit_is_cut_off(api_gateway):
    gw = api_gateway
    piece = b"x" * 65536
    with _send_head(gw, _post_head(None, bearer=token(prefixes=["acme/"]))) as tls:
        for _ in range(MiB // len(piece)):
            tls.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        # Exactly the limit so far; one byte more, and then nothing (so that nothing the
        # gateway has not read is left when it closes: that would reset the connection).
        tls.sendall(b"1\r\nx\r\n")
        status, fields, doc, _ = _read_until_closed(tls)
    assert status == 413 and doc["error"] == "too_large" and fields["connection"] == "close"
    # A chunked body within the limit is read.
    body = json.dumps({"include": {"task": "acme/alpha"}}).encode()
    with _send_head(gw, _post_head(None, bearer=token(prefixes=["acme/"]), extra="Connection: close\r\n")) as tls:
        tls.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        status, _, doc, _ = _read_until_closed(tls)
    assert status == 200 and sorted(s["id"] for s in doc["shards"]) == ["a1", "a2"]


def _curl_upload(gw, workdir, size: int, bearer: str | None, extra: tuple[str, ...] = ()) -> tuple[int, dict, int]:
    """POST C{size} bytes over h2 with curl: status, JSON answer and the bytes curl sent."""
    path = os.path.join(workdir, f"body-{size}")
    with open(path, "wb") as f:
        f.truncate(size)
    cmd = [which("curl"), "-sS", "--http2", "--cacert", gw.ca_path, "-o", "-",
           "-w", "\n%{http_code} %{size_upload} %{http_version}", "-H", "Content-Type: application/json",
           "--data-binary", f"@{path}", *extra, f"https://localhost:{gw.tls_port}/v1/shards/list"]
    if bearer:
        cmd[1:1] = ["-H", f"Authorization: Bearer {bearer}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    text, _, tail = out.stdout.rpartition("\n")
    code, uploaded, version = tail.split(" ")
    assert version == "2"
    return int(code), json.loads(text), int(uploaded)


def test_h2_bodies_are_judged_before_they_are_read(api_gateway, workdir):
    gw = api_gateway
    started = time.monotonic()
    code, doc, uploaded = _curl_upload(gw, workdir, 16 * MiB, None)
    assert code == 401 and doc["error"] == "missing"
    # The stream is reset (NO_ERROR) after the answer: curl stops well before the 16 MiB.
    assert uploaded < 4 * MiB and time.monotonic() - started < 10
    code, doc, uploaded = _curl_upload(gw, workdir, 16 * MiB, token(prefixes=["acme/"]))
    assert code == 413 and doc["error"] == "too_large" and uploaded < 4 * MiB
    # Without a declared length (curl sends none with this field), the count stops it.
    code, doc, uploaded = _curl_upload(gw, workdir, 16 * MiB, token(prefixes=["acme/"]),
                                       ("-H", "Transfer-Encoding: chunked"))
    assert code == 413 and doc["error"] == "too_large" and uploaded < 4 * MiB
    # The connection and the gateway are fine afterwards.
    assert call(gw, "/v1/shards/stat", {"id": "b1"}, token(prefixes=["acme/"]))[0] == 200
