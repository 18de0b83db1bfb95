"""
The admin API and dashboard attacked: paths that might reach a view without the token, the
token compared without leaking its length, a worker that answers the supervisor with garbage.
"""

from __future__ import annotations

import hmac
import os
import socket

import pytest

from support import shard

from twisted_gateway.dashboard import views
from twisted_gateway.dashboard.access import AdminAccess

TOKEN = "adm1n-t0ken-for-the-attack-tests-7f"  # not 32 bytes: a digest's length


def raw(port: int, request: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, data


TRICKS = [
    b"GET //api/v1/routes HTTP/1.1",
    b"GET /api/v1/../api/v1/routes HTTP/1.1",
    b"GET /api/v1/./routes HTTP/1.1",
    b"GET /API/v1/routes HTTP/1.1",
    b"GET /api/v1/routes/ HTTP/1.1",
    b"GET /api/v1//routes HTTP/1.1",
    b"GET /api/v1/%72outes HTTP/1.1",
    b"GET /%61pi/v1/routes HTTP/1.1",
    b"GET /api%2fv1%2froutes HTTP/1.1",
    b"GET /api/v1/routes%00 HTTP/1.1",
    b"GET /api/v1/routes;x=1 HTTP/1.1",
    b"GET /api/v1/routes?token=" + TOKEN.encode() + b" HTTP/1.1",
    b"GET /api/v1/routes#x HTTP/1.1",
    b"GET /static/../api/v1/routes HTTP/1.1",
    b"GET /static/%2e%2e/api/v1/routes HTTP/1.1",
    b"GET http://127.0.0.1/api/v1/routes HTTP/1.1",
    b"HEAD /api/v1/routes HTTP/1.1",
    b"OPTIONS /api/v1/routes HTTP/1.1",
    b"OPTIONS * HTTP/1.1",
    b"POST /api/v1/routes HTTP/1.1",
    b"GET /api/v1/routes HTTP/1.0",
    b"GET /static/index.html HTTP/1.1",
    b"GET /static/dashboard.js HTTP/1.1",
]

BAD_CREDENTIALS = [
    b"",
    b"Authorization: Bearer\r\n",
    b"Authorization: Bearer \r\n",
    b"Authorization: bearer " + TOKEN[:-1].encode() + b"\r\n",
    b"Authorization: Bearer " + TOKEN.encode() + b"x\r\n",
    b"Authorization: Token " + TOKEN.encode() + b"\r\n",
    b"Authorization: Basic " + b"not base64!\r\n",
    b"Authorization: Basic OnNvbWV0aGluZw==\r\n",  # ":something"
    b"Authorization: Bearer wrong\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n",
    b"Cookie: token=" + TOKEN.encode() + b"\r\n",
    b"X-Admin-Token: " + TOKEN.encode() + b"\r\n",
]


@pytest.fixture
def protected(start_gateway, echo_upstream, workdir):
    path = os.path.join(workdir, "admin-token")
    with open(path, "w") as f:
        f.write(TOKEN + "\n")
    return start_gateway([shard("alpha-0", "alpha", 9000, echo_upstream.port)],
                         config={"admin": {"token_file": path}})


def test_no_path_trick_reaches_a_view_without_the_token(protected):
    gw = protected
    for line in TRICKS:
        for credentials in BAD_CREDENTIALS:
            status, data = raw(gw.plain_port, line + b"\r\nHost: 127.0.0.1\r\n" + credentials
                               + b"Connection: close\r\n\r\n")
            empty = data.endswith(b"Content-Length: 0\r\n\r\n")  # twisted.web's own OPTIONS *
            assert (status != 200 or empty) and b"alpha-0" not in data and b"<script" not in data, \
                (line, credentials, data[:300])
    # And with the token the API answers (the test talks to the right thing).
    status, data = raw(gw.plain_port, b"GET /api/v1/routes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                       + TOKEN.encode() + b"\r\nConnection: close\r\n\r\n")
    assert status == 200 and b"alpha-0" in data
    gw.stop()
    assert TOKEN not in gw.output() and TOKEN[:10] not in gw.output()


def test_an_error_page_does_not_echo_markup(protected):
    gw = protected
    for target in (b"/<img%20src=x%20onerror=alert(1)>", b"/%3Cscript%3Ealert(1)%3C/script%3E",
                   b"/static/<script>"):
        status, data = raw(gw.plain_port, b"GET " + target + b" HTTP/1.1\r\nHost: <script>alert(1)</script>\r\n"
                           b"Connection: close\r\n\r\n")
        assert status in (400, 401, 404) and b"<script" not in data.lower() and b"<img" not in data.lower()


def test_the_comparison_does_not_depend_on_the_presented_length(tmp_path, monkeypatch):
    path = tmp_path / "token"
    path.write_text(TOKEN)
    access = AdminAccess(str(path))
    seen: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((len(a), len(b)))
        return real(a, b)
    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert access.check(b"Bearer x") == "wrong"
    assert access.check(b"Bearer " + b"y" * 5000) == "wrong"
    assert access.check(b"Bearer " + TOKEN.encode()) is None
    # compare_digest leaks the lengths of what it compares: the token's must not show.
    assert len({pair for pair in seen}) == 1 and seen[0][0] != len(TOKEN)


# -- the supervisor's merges with a worker that answers garbage ------------------------------------

GOOD_ROUTES = {"directory": {"loaded": True, "shards": 1}, "totals": {"connections": 2},
               "shards": [{"id": "a", "ports": [{"port": 1, "protocol": "tcp", "connections": 2,
                                                  "active_connections": 0, "bytes_up": 1, "bytes_down": 1}]}]}
GARBAGE = [[], "x", 3, None, {"shards": "x"}, {"shards": [1]}, {"shards": [{"ports": []}]},
           {"shards": [{"id": "a", "ports": [{"port": "1"}]}]}, {"totals": {"connections": "many"}},
           {"totals": []}, {"directory": []}, {"directory": {"shards": "two"}},
           {"shards": [{"id": "a", "ports": [{"port": 1, "protocol": "tcp", "connections": "x"}]}]},
           {"certificates": "x"}, {"certificates": [1]}, {"certificates": [{"names": 5}]},
           {"refusals": [1]}, {"refusals": [{"time": "yesterday"}]}, {"recorded": "x"},
           {"providers": [1]}, {"providers": [{"kind": "file", "version": "v"}]}]


@pytest.mark.parametrize("garbage", GARBAGE, ids=range(len(GARBAGE)))
def test_a_worker_answering_garbage_is_left_out_of_the_merge(garbage):
    answers = {0: GOOD_ROUTES, 1: garbage, 2: GOOD_ROUTES}
    routes = views.merge_routes(answers, "gw")
    assert routes["shards"][0]["ports"][0]["connections"] == 4
    views.merge_certificates({0: {"certificates": []}, 1: garbage})
    refusals = views.merge_refusals({0: {"recorded": 1, "refusals": [{"time": 1.0, "sni": "x"}]}, 1: garbage}, 10)
    assert refusals["refusals"][0]["sni"] == "x"
    views.merge_providers({0: {"providers": [{"kind": "file", "source": "f", "state": "ok", "version": 3}]},
                           1: garbage})
