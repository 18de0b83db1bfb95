"""
The fleet's link to Redis (twisted_gateway/fleet/redis.py) against real redis-server and
redis-sentinel processes: commands and pub/sub, an outage and the return, an ACL user whose
password comes from a file (and a wrong one), TLS with a CA bundle (and a wrong CA), a
command timeout, and a Sentinel failover.  Each link runs in a child process with its own
reactor (tests/redis_env.py, LinkProcess) and is stopped at the end of its test: what stays
scheduled after stopService, and any unhandled error, fails the test.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from support import wait_for

CHANNEL = "gateway:test:changes"


def stopped_cleanly(link) -> None:
    """stopService left nothing scheduled and nothing was logged as unhandled or critical."""
    answer = link.stop()
    assert answer.get("stopped"), link.output()
    assert answer["pending"] == [], answer
    assert not [t for t in link.logs() if "Unhandled" in t or "Traceback" in t], link.output()
    assert not link.logs("critical"), link.output()


def error_lines(link) -> list[str]:
    return link.logs("error")


def test_commands_pubsub_and_clean_stop(redis_env) -> None:
    server = redis_env.server()
    link = redis_env.link(url=server.url)
    state = link.wait(lambda s: s["up"] and s["subscribed"], what="link up")
    assert state["redis_up"] == 1 and state["readiness"]["state"] == "up"
    assert link.call("subscribe", channel=CHANNEL)["ok"] is True
    assert link.execute("SET", "gateway:k", "v")["ok"] == "OK"
    assert link.execute("GET", "gateway:k")["ok"] == "v"
    assert link.call("execute", args=["EVAL", "return redis.call('INCRBY', KEYS[1], ARGV[1])", 1,
                                      "gateway:n", 5])["ok"] == 5
    refused = link.execute("NOSUCHCOMMAND")
    assert refused["error"] == "RedisCommandError" and "unknown command" in refused["message"]
    assert link.state()["errors"]["error"] == 1
    # A channel subscribed while the connection is up is subscribed at once.
    wait_for(lambda: server.cli("PUBSUB", "NUMSUB", CHANNEL).split()[-1] == "1", 5, what="SUBSCRIBE")
    assert link.execute("PUBLISH", CHANNEL, "hello")["ok"] == 1
    wait_for(lambda: link.count("message", channel=CHANNEL, text="hello") == 1, 5, what="message")
    # The database of the URL is SELECTed.
    other = redis_env.link(url=server.url.replace("/0", "/3"))
    other.wait(lambda s: s["up"], what="second link up")
    assert other.execute("SET", "gateway:db3", "x")["ok"] == "OK"
    assert server.cli("-n", "3", "GET", "gateway:db3") == "x"
    assert server.cli("GET", "gateway:db3") == ""
    stopped_cleanly(other)
    assert not error_lines(link)
    stopped_cleanly(link)


def test_outage_is_logged_once_and_the_return_resubscribes(redis_env) -> None:
    server = redis_env.server()
    link = redis_env.link(url=server.url)
    link.wait(lambda s: s["up"] and s["subscribed"], what="link up")
    link.call("subscribe", channel=CHANNEL)
    ups = link.count("up")

    server.stop()
    state = link.wait(lambda s: not s["up"], 5, what="link down")
    assert state["redis_up"] == 0 and state["disconnects"] == 1
    assert state["readiness"]["degraded"] is True
    assert link.count("down") == 1
    started = time.monotonic()
    failed = link.execute("GET", "gateway:k")
    assert failed["error"] == "RedisUnavailable"
    assert time.monotonic() - started < 1.0  # at once, not queued until the return
    # Several redial attempts later, still one line and one count for the whole outage.
    link.wait(lambda s: s["readiness"].get("down_for_seconds", 0) >= 4, 10, what="a long outage")
    lines = error_lines(link)
    assert len(lines) == 1, lines
    assert "unreachable" in lines[0] and "last known state" in lines[0]
    assert link.state()["disconnects"] == 1

    server.start()
    returned = time.monotonic()
    state = link.wait(lambda s: s["up"] and s["subscribed"], 10, what="link back")
    assert time.monotonic() - returned < 3.5  # the backoff is capped at 2 s (+20% jitter)
    assert state["redis_up"] == 1 and "degraded" not in state["readiness"]
    assert link.count("up") > ups
    assert len(link.logs("info", "restored after")) == 1
    # The channel was subscribed again on the new connection.
    server.cli("PUBLISH", CHANNEL, "after the return")
    wait_for(lambda: link.count("message", channel=CHANNEL, text="after the return") == 1, 5,
             what="message after the return")
    assert len(error_lines(link)) == 1
    stopped_cleanly(link)


def test_not_reached_at_start_is_logged_once_by_first_check(redis_env) -> None:
    server = redis_env.server()
    server.stop()
    link = redis_env.link(url=server.url, connect_timeout=0.5)
    link.wait(lambda s: "last_error" in s["readiness"], 5, what="a failed attempt")
    assert not error_lines(link)  # the grace period: a gateway starting beside Redis says nothing
    link.call("first_check")
    link.call("first_check")
    lines = error_lines(link)
    assert len(lines) == 1 and "not reached since start" in lines[0] and "refused" in lines[0], lines
    assert link.state()["disconnects"] == 1
    server.start()
    link.wait(lambda s: s["up"], 10, what="link up once Redis starts")
    assert link.logs("info", "restored after")
    stopped_cleanly(link)


def test_stop_while_redialling_leaves_nothing_behind(redis_env) -> None:
    server = redis_env.server()
    link = redis_env.link(url=server.url)
    link.wait(lambda s: s["up"], what="link up")
    server.stop()
    link.wait(lambda s: s["readiness"].get("down_for_seconds", 0) >= 1, 5, what="redialling")
    stopped_cleanly(link)


def write_secret(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text + "\n")
    os.chmod(path, 0o600)


def acl_auth_failures(server) -> int:
    """How many AUTH attempts the server refused (ACL LOG counts repeats in one entry)."""
    out = server.cli("ACL", "LOG").splitlines()
    total = 0
    for i, line in enumerate(out):
        if line == "count" and i + 1 < len(out):
            total += int(out[i + 1])
    return total


def test_acl_user_with_password_file(redis_env, tmp_path) -> None:
    server = redis_env.server(username="gw", password="s3cret-pass")
    secret = str(tmp_path / "redis-password")
    write_secret(secret, "s3cret-pass")
    link = redis_env.link(url=server.url, password_file=secret)
    link.wait(lambda s: s["up"] and s["subscribed"], what="link up as the ACL user")
    assert link.execute("SET", "gateway:k", "v")["ok"] == "OK"
    assert server.cli("ACL", "WHOAMI") == "gw"
    outside = link.execute("SET", "elsewhere", "v")
    assert outside["error"] == "RedisCommandError" and "NOPERM" in outside["message"]
    link.call("subscribe", channel=CHANNEL)
    wait_for(lambda: server.cli("PUBSUB", "NUMSUB", CHANNEL).split()[-1] == "1", 5, what="SUBSCRIBE")
    link.execute("PUBLISH", CHANNEL, "as gw")
    wait_for(lambda: link.count("message", text="as gw") == 1, 5, what="message")
    assert not error_lines(link)
    stopped_cleanly(link)


def test_wrong_password_is_logged_once_and_retried_until_fixed(redis_env, tmp_path) -> None:
    server = redis_env.server(username="gw", password="right")
    secret = str(tmp_path / "redis-password")
    write_secret(secret, "wrong")
    link = redis_env.link(url=server.url, password_file=secret)
    # Refused at once, said at once (no grace period for a refusal), and dialled again.
    wait_for(lambda: error_lines(link), 5, what="the refusal logged")
    wait_for(lambda: acl_auth_failures(server) >= 6, 15, what="repeated AUTH attempts")
    lines = error_lines(link)
    assert len(lines) == 1, lines
    assert "refused" in lines[0] and "WRONGPASS" in lines[0], lines
    state = link.state()
    assert not state["up"] and state["disconnects"] == 1
    assert "WRONGPASS" in state["readiness"]["last_error"]
    # Fixed in place: read again before the next attempt, no restart.
    write_secret(secret, "right")
    link.wait(lambda s: s["up"] and s["subscribed"], 10, what="link up with the fixed password")
    assert link.execute("GET", "gateway:k")["ok"] is None
    assert len(error_lines(link)) == 1
    stopped_cleanly(link)


def test_tls_with_a_ca_bundle(redis_env) -> None:
    server = redis_env.server(tls=True)
    assert server.url.startswith("rediss://")
    link = redis_env.link(url=server.url, tls_ca=redis_env.ca.cert_path)
    link.wait(lambda s: s["up"] and s["subscribed"], what="link up over TLS")
    assert link.execute("SET", "gateway:k", "over tls")["ok"] == "OK"
    assert server.cli("GET", "gateway:k") == "over tls"
    link.call("subscribe", channel=CHANNEL)
    wait_for(lambda: server.cli("PUBSUB", "NUMSUB", CHANNEL).split()[-1] == "1", 5, what="SUBSCRIBE")
    server.cli("PUBLISH", CHANNEL, "tls message")
    wait_for(lambda: link.count("message", text="tls message") == 1, 5, what="message")
    # The name checked is tls_server_name when set: one the certificate lacks is refused.
    wrong_name = redis_env.link(url=server.url, tls_ca=redis_env.ca.cert_path,
                                tls_server_name="redis.example.com")
    wait_for(lambda: error_lines(wrong_name), 10, what="a name mismatch refused")
    assert not wrong_name.state()["up"]
    stopped_cleanly(wrong_name)
    stopped_cleanly(link)


def test_tls_with_the_wrong_ca_is_refused_logged_counted_and_retried(redis_env, tmp_path) -> None:
    from twisted_gateway.tls.localca import LocalCA
    server = redis_env.server(tls=True)
    other_ca = LocalCA(str(tmp_path / "other-ca"))
    link = redis_env.link(url=server.url, tls_ca=other_ca.cert_path)
    wait_for(lambda: error_lines(link), 10, what="the refusal logged")
    attempts = lambda: server.log().count("Error accepting a client connection")  # noqa: E731
    wait_for(lambda: attempts() >= 6, 15, what="repeated TLS attempts")
    lines = error_lines(link)
    assert len(lines) == 1, lines
    assert "TLS" in lines[0] and "certificate verify failed" in lines[0], lines
    state = link.state()
    assert not state["up"] and state["disconnects"] == 1 and state["readiness"]["degraded"]
    assert link.execute("GET", "gateway:k")["error"] == "RedisUnavailable"
    assert link.proc.poll() is None
    # A plain redis:// URL against the TLS port is not a crash either.
    plain = redis_env.link(url=server.url.replace("rediss://", "redis://"), connect_timeout=0.5,
                           command_timeout=0.5)
    plain.wait(lambda s: "last_error" in s["readiness"], 10, what="a failed plain attempt")
    assert not plain.state()["up"]
    stopped_cleanly(plain)
    stopped_cleanly(link)


def test_command_timeout_drops_and_redials(redis_env) -> None:
    server = redis_env.server()
    link = redis_env.link(url=server.url, command_timeout=0.5)
    link.wait(lambda s: s["up"], what="link up")
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        answer = link.execute("GET", "gateway:k")
        assert answer["error"] == "TimeoutError", answer
        assert 0.4 < time.monotonic() - started < 2
        state = link.wait(lambda s: not s["up"], 5, what="link down after the timeout")
        assert state["errors"]["timeout"] == 1
        assert link.execute("GET", "gateway:k")["error"] == "RedisUnavailable"
        # A redial meanwhile connects (the kernel accepts) but SELECT gets no answer: not a
        # refusal, so no second line.
        link.wait(lambda s: "could not set dbid" in s["readiness"].get("last_error", ""), 10,
                  what="a redial timing out")
        assert len(error_lines(link)) == 1, error_lines(link)
    finally:
        server.proc.send_signal(signal.SIGCONT)
    link.wait(lambda s: s["up"] and s["subscribed"], 10, what="link back")
    assert len(error_lines(link)) == 1
    stopped_cleanly(link)


@pytest.fixture
def sentinel_group(redis_env):
    """A master, a replica and three sentinels watching them (quorum 2)."""
    master = redis_env.server()
    replica = redis_env.server(extra=["--replicaof", "127.0.0.1", str(master.port)])
    wait_for(lambda: "master_link_status:up" in replica.cli("INFO", "replication"), 10,
             what="replica in sync")
    sentinels = [redis_env.sentinel(master.port) for _ in range(3)]
    wait_for(lambda: all(s.cli("SENTINEL", "replicas", "mymaster").count(str(replica.port)) > 0
                         and s.cli("SENTINEL", "sentinels", "mymaster").count("127.0.0.1") >= 2
                         for s in sentinels), 20, what="sentinels know the replica and each other")
    return master, replica, sentinels


def test_sentinel_failover_is_followed(redis_env, sentinel_group) -> None:
    master, replica, sentinels = sentinel_group
    link = redis_env.link(sentinels=[s.address for s in sentinels], master_name="mymaster",
                          url="redis://127.0.0.1/2")
    state = link.wait(lambda s: s["up"] and s["subscribed"], 10, what="link up through Sentinel")
    assert state["readiness"]["master"] == f"127.0.0.1:{master.port}"
    link.call("subscribe", channel=CHANNEL)
    assert link.execute("SET", "gateway:before", "1")["ok"] == "OK"
    assert master.cli("-n", "2", "GET", "gateway:before") == "1"

    master.kill()
    killed = time.monotonic()
    link.wait(lambda s: not s["up"], 5, what="link down with the master")
    state = link.wait(lambda s: s["up"] and s["subscribed"], 30, what="link up at the promoted replica")
    took = time.monotonic() - killed
    assert state["readiness"]["master"] == f"127.0.0.1:{replica.port}"
    assert "role:master" in replica.cli("INFO", "replication")
    assert link.execute("SET", "gateway:after", "2")["ok"] == "OK"
    assert replica.cli("-n", "2", "GET", "gateway:after") == "2"
    replica.cli("PUBLISH", CHANNEL, "from the new master")
    wait_for(lambda: link.count("message", text="from the new master") == 1, 5, what="message")
    assert len(link.logs("warn", "Sentinel names")) == 1
    assert len(error_lines(link)) == 1, error_lines(link)
    print(f"sentinel failover followed {took:.1f}s after the master was killed")
    stopped_cleanly(link)
