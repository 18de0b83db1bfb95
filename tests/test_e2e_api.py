"""End to end: the gateway's REST API on the bare hostname, with tokens and CORS."""

from __future__ import annotations

import json
import subprocess

import pytest
from openapi_spec_validator import validate

from support import shard, which
from test_e2e_http import SECRET, token


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
