"""The SNI name grammar and the directory's routing decisions, without sockets."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twisted_gateway.directory.file import load_directory_file
from twisted_gateway.directory.model import (
    DirectoryError, DirectorySnapshot, Refusal, Route, Shard, ShardPort, parse_directory,
    shard_to_dict,
)
from twisted_gateway.names import (
    GATEWAY_HOST, Foreign, RouteKey, ShardName, parse_name, shard_server_name,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H = "gw.example.com"


def test_gateway_host_and_foreign_names():
    assert parse_name(H, H) is GATEWAY_HOST
    assert isinstance(parse_name("example.com", H), Foreign)
    assert isinstance(parse_name("a.b-80.gw.example.com", H), Foreign)
    assert isinstance(parse_name("db.gw.example.com", H), Foreign)      # no -<port>
    assert isinstance(parse_name("db-0.gw.example.com", H), Foreign)    # port 0
    assert isinstance(parse_name("db-65536.gw.example.com", H), Foreign)
    assert isinstance(parse_name("xgw.example.com", H), Foreign)


def test_plain_and_pinned_readings():
    assert parse_name("db-5432.gw.example.com", H) == ShardName(
        "db-5432.gw.example.com", (RouteKey("db", 5432),))
    parsed = parse_name("my-db-10-3-5432.gw.example.com", H)
    assert isinstance(parsed, ShardName)
    assert parsed.candidates == (RouteKey("my-db", 5432, (10, 3)), RouteKey("my-db-10-3", 5432))


label = st.from_regex(r"[a-z][a-z0-9]{0,10}(-[a-z][a-z0-9]{0,5}){0,2}", fullmatch=True)


@given(label, st.integers(1, 65535), st.none() | st.tuples(st.integers(0, 10**9), st.integers(0, 10**9)))
def test_name_round_trip(lbl, port, pin):
    name = shard_server_name(lbl, port, H, pin)
    parsed = parse_name(name, H)
    assert isinstance(parsed, ShardName)
    assert parsed.candidates[0] == RouteKey(lbl, port, pin)


@given(st.text(max_size=80))
def test_parse_name_total(text):
    result = parse_name(text.lower(), H)
    assert result is GATEWAY_HOST or isinstance(result, (ShardName, Foreign))


def _shard(id, label="db", primary=True, ports=(ShardPort(5432, "tcp", True),), key=0, rclock=0, task=None):
    return Shard(id=id, task=task or f"t/{label}", hostname_label=label, address="127.0.0.1",
                 ports=ports, key_begin=key, rclock_begin=rclock, primary=primary)


def test_lookup_semantics():
    snap = DirectorySnapshot([
        _shard("p1"), _shard("p2"), _shard("r1", primary=False, key=100, rclock=5),
        _shard("n1", label="nopri", primary=False),
    ])
    picked = {snap.lookup(RouteKey("db", 5432)).shard.id for _ in range(200)}
    assert picked == {"p1", "p2"}
    assert snap.lookup(RouteKey("db", 5432, (100, 5))).shard.id == "r1"
    assert snap.lookup(RouteKey("db", 5432, (1, 1))) == Refusal(
        "unknown_shard", "no shard db with key 1 and rclock 1")
    assert snap.lookup(RouteKey("db", 80)).reason == "unknown_port"
    assert snap.lookup(RouteKey("db", 80, (100, 5))).reason == "unknown_port"
    assert snap.lookup(RouteKey("zz", 5432)).reason == "unknown_shard"
    assert snap.lookup(RouteKey("nopri", 5432)).reason == "no_primary"
    # HTTP clients get a status that matches the refusal.
    assert [Refusal(r, "").http_status for r in ("unknown_shard", "unknown_port", "no_primary",
                                                  "private_port", "denied_ip")] == [404, 404, 503, 403, 403]
    # resolve() prefers a reading that exists, and the most informative refusal.
    assert isinstance(snap.resolve([RouteKey("db", 5432, (9, 9)), RouteKey("db", 5432)]), Route)


def test_directory_validation_errors():
    good = {"id": "a", "task": "t", "hostname_label": "db", "address": "10.0.0.1",
            "ports": [{"port": 1, "protocol": "tcp", "public": True}]}
    assert len(parse_directory({"shards": [good]})) == 1
    cases = [
        ({"shards": [dict(good, extra=1)]}, "shards[0].extra: unknown key"),
        ({"shards": [dict(good, ports=[{"port": 70000}])]}, "shards[0].ports[0].port: expected an integer"),
        ({"shards": [dict(good, ports=[{"port": 1, "protocol": "sctp"}])]}, "shards[0].ports[0].protocol"),
        ({"shards": [dict(good, hostname_label="Bad_Label")]}, "shards[0].hostname_label"),
        ({"shards": [{k: v for k, v in good.items() if k != "task"}]}, "shards[0].task: missing"),
        ({"shards": [good, good]}, "shard id 'a' appears twice"),
        ({"shards": [good, dict(good, id="b", task="other")]}, "is used by tasks"),
        ({"shards": [dict(good, address="not an address!")]}, "shards[0].address"),
        ({"shards": [dict(good, ports=[{"port": 1, "protocol": "h2", "public": False, "passthrough": True}])]},
         "shards[0].ports[0].passthrough: only public h2 ports"),
        ({"shards": [dict(good, ports=[{"port": 1, "protocol": "tcp", "public": True, "passthrough": True}])]},
         "shards[0].ports[0].passthrough: only public h2 ports"),
        ({"shards": "x"}, "shards: expected a list"),
        ([], "top level"),
    ]
    for doc, message in cases:
        with pytest.raises(DirectoryError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_directory(doc)


def test_shard_dict_round_trip():
    s = _shard("x", ports=(ShardPort(80, "http/1.1", False, 8080), ShardPort(81, "h2", True, passthrough=True)))
    assert parse_directory({"shards": [shard_to_dict(s)]}).shards[0] == s


def test_example_directory_in_etc_is_valid():
    snap = load_directory_file(os.path.join(REPO, "etc", "shards.yaml"))
    assert snap.lookup(RouteKey("orders", 6379)).shard.id == "orders-0"
    assert snap.lookup(RouteKey("orders", 6379, (4096, 0))).port.target_port == 32768


def test_broken_yaml_names_the_line(tmp_path):
    p = tmp_path / "d.yaml"
    p.write_text("shards:\n  - id: [unclosed\n")
    with pytest.raises(DirectoryError, match="line"):
        load_directory_file(str(p))
