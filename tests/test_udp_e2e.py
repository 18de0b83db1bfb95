"""
UDP routes end to end: dnspython through the real gateway (``twistd -n gateway``) to Debian's
knot DNS server and back, many clients at once, the session table's bound and idle timeout, the
datagram size limit, a port's allow/deny lists, and a reload that moves a route while its live
sessions stay where they were.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import threading

import dns.message
import dns.query
import dns.rdatatype
import pytest
import yaml

from support import shard, wait_for

ZONE = "udp.test"


def udp_port(gw, listener: str) -> int:
    return gw.udp_port(listener)


def udp_shard(id: str, label: str, port: int, upstream_port: int, **extra: object) -> dict:
    doc = shard(id, label, port, upstream_port, protocol="udp")
    doc["ports"][0].update(extra)
    return doc


def route(target: str) -> dict:
    return {"listen": "udp:0:interface=127.0.0.1", "target": target}


@pytest.fixture
def knot(workdir):
    if shutil.which("knotd") is None:
        pytest.skip("knotd is not installed (bash .ci/install)")
    from acme_env import Knot
    server = Knot(workdir, ZONE)
    yield server
    server.stop()


class UDPEcho:
    """A loopback UDP server answering every datagram with its tag and the datagram."""

    def __init__(self, tag: bytes) -> None:
        self.tag = tag
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.peers: set = set()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(65536)
            except OSError:
                return
            self.peers.add(addr)
            try:
                self.sock.sendto(self.tag + data, addr)
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echoes():
    made: list[UDPEcho] = []

    def make(tag: bytes) -> UDPEcho:
        e = UDPEcho(tag)
        made.append(e)
        return e
    yield make
    for e in made:
        e.close()


def ask(sock: socket.socket, port: int, payload: bytes, timeout: float = 5) -> bytes:
    sock.sendto(payload, ("127.0.0.1", port))
    sock.settimeout(timeout)
    return sock.recvfrom(65536)[0]


def test_a_dns_query_reaches_knot_through_a_udp_route_and_the_answer_comes_back(start_gateway, knot):
    gw = start_gateway(shards=[udp_shard("s-dns", "dns", 53, knot.port)],
                       config={"udp": {"routes": [route("dns-53")]}})
    port = udp_port(gw, "dns-53")
    answer = dns.query.udp(dns.message.make_query(f"www.{ZONE}", "A"), "127.0.0.1", port=port, timeout=5)
    assert [r.to_text() for rrset in answer.answer for r in rrset] == ["127.0.0.1"]
    assert gw.metric("gateway_udp_sessions_total", protocol="udp", label="dns", port="53") == 1
    assert gw.metric("gateway_udp_datagrams_total", protocol="udp", label="dns", port="53",
                     direction="upstream") == 1
    assert gw.metric("gateway_udp_datagrams_total", protocol="udp", label="dns", port="53",
                     direction="downstream") == 1
    assert gw.metric("gateway_udp_sessions_active", listener="dns-53") == 1


def test_1000_queries_from_20_client_sockets_are_all_answered_by_the_right_sessions(start_gateway, knot):
    gw = start_gateway(shards=[udp_shard("s-dns", "dns", 53, knot.port)],
                       config={"udp": {"routes": [route("dns-53")]}})
    port = udp_port(gw, "dns-53")
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(20)]
    answered = 0
    try:
        for round_ in range(50):  # 50 rounds of one query from each socket: 1,000 queries
            sent = {}
            for i, sock in enumerate(clients):
                query = dns.message.make_query(f"c{i}-r{round_}.{ZONE}", "A")
                sent[sock.fileno()] = (query, i)
                sock.sendto(query.to_wire(), ("127.0.0.1", port))
            waiting = set(sent)
            while waiting:
                ready, _, _ = select.select([s for s in clients if s.fileno() in waiting], [], [], 5)
                assert ready, f"round {round_}: {len(waiting)} queries unanswered"
                for sock in ready:
                    data = sock.recv(65536)
                    query, i = sent[sock.fileno()]
                    reply = dns.message.from_wire(data)
                    # The answer to this socket's own query: its id and its name, no other's.
                    assert reply.id == query.id
                    assert reply.question[0].name.to_text() == f"c{i}-r{round_}.{ZONE}."
                    assert reply.answer[0][0].to_text() == "127.0.0.1"
                    waiting.discard(sock.fileno())
                    answered += 1
    finally:
        for sock in clients:
            sock.close()
    assert answered == 1000
    assert gw.metric("gateway_udp_sessions_total", protocol="udp", label="dns", port="53") == 20
    for direction in ("upstream", "downstream"):
        assert gw.metric("gateway_udp_datagrams_total", protocol="udp", label="dns", port="53",
                         direction=direction) == 1000


def test_the_session_table_bound_and_the_idle_timeout_hold(start_gateway, echoes):
    echo = echoes(b"A:")
    gw = start_gateway(shards=[udp_shard("s-echo", "echo", 9, echo.port)],
                       config={"udp": {"routes": [route("echo-9")], "max_sessions": 3,
                                       "idle_timeout": 1.0}})
    port = udp_port(gw, "echo-9")
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(5)]
    try:
        for i, sock in enumerate(clients):
            assert ask(sock, port, b"hello %d" % i) == b"A:hello %d" % i
        assert gw.metric("gateway_udp_sessions_closed_total", protocol="udp", reason="evicted") == 2
        assert gw.metric("gateway_udp_sessions_active", listener="echo-9") == 3
        # The three newest sessions are the ones kept: their upstream sockets still answer.
        assert len(echo.peers) == 5
        wait_for(lambda: gw.metric("gateway_udp_sessions_active", listener="echo-9") == 0, 10,
                 what="idle sessions ended")
        assert gw.metric("gateway_udp_sessions_closed_total", protocol="udp", reason="idle") == 3
        # A client whose session ended idle gets a new one.
        assert ask(clients[0], port, b"again") == b"A:again"
        assert gw.metric("gateway_udp_sessions_total", protocol="udp", label="echo", port="9") == 6
    finally:
        for sock in clients:
            sock.close()


def test_oversized_datagrams_and_denied_clients_are_dropped_and_counted(start_gateway, echoes):
    echo = echoes(b"A:")
    gw = start_gateway(shards=[udp_shard("s-echo", "echo", 9, echo.port),
                               udp_shard("s-closed", "closed", 9, echo.port, deny=["127.0.0.0/8"])],
                       config={"udp": {"routes": [route("echo-9"), {"listen": "udp:0:interface=127.0.0.1",
                                                                     "target": "closed-9"}],
                                       "max_datagram_bytes": 1200}})
    port = udp_port(gw, "echo-9")
    closed = udp_port(gw, "closed-9")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"x" * 1201, ("127.0.0.1", port))
        sock.sendto(b"y" * 5, ("127.0.0.1", closed))
        assert ask(sock, port, b"z" * 1198) == b"A:" + b"z" * 1198  # 1,200 bytes each way
        # A datagram of the limit whose reply is larger: the reply is dropped.
        sock.sendto(b"w" * 1200, ("127.0.0.1", port))
        wait_for(lambda: gw.metric("gateway_udp_dropped_total", listener="echo-9", reason="too_large") == 2,
                 5, what="both oversized datagrams counted")
        assert ask(sock, port, b"after") == b"A:after"  # only the reply was lost
    wait_for(lambda: gw.metric("gateway_udp_dropped_total", listener="closed-9", reason="denied_ip") == 1,
             5, what="denied datagram counted")
    assert gw.metric("gateway_udp_sessions_total", protocol="udp", label="closed", port="9") == 0


def test_sighup_moves_a_route_while_its_live_sessions_stay(start_gateway, echoes, workdir):
    a, b = echoes(b"A:"), echoes(b"B:")
    gw = start_gateway(shards=[udp_shard("s-a", "alpha", 9, a.port), udp_shard("s-b", "beta", 9, b.port)],
                       config={"udp": {"routes": [{"listen": "udp:0:interface=127.0.0.1",
                                                   "target": "alpha-9"}]}})
    port = udp_port(gw, "alpha-9")
    live = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    later = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert ask(live, port, b"1") == b"A:1"
        # The same listener (the same listen description) now leads to beta.
        config_path = os.path.join(workdir, "gateway.yaml")
        with open(config_path, "w") as f:
            yaml.safe_dump({"udp": {"routes": [{"listen": "udp:0:interface=127.0.0.1",
                                                "target": "beta-9"}]}}, f)
        gw.proc.send_signal(signal.SIGHUP)
        gw.wait_logged("configuration reloaded")
        assert ask(live, port, b"2") == b"A:2"  # the live session keeps its shard
        assert ask(later, port, b"3") == b"B:3"  # a new client goes where the route now leads
        # A directory change that removes alpha leaves the live session on its socket too.
        gw.write_directory([udp_shard("s-b", "beta", 9, b.port)])
        wait_for(lambda: gw.metric("gateway_directory_shards") == 1, 10, what="directory reloaded")
        assert ask(live, port, b"4") == b"A:4"
        # Removing the route ends its sessions.
        with open(config_path, "w") as f:
            yaml.safe_dump({"udp": {"routes": []}}, f)
        gw.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: gw.metric("gateway_udp_sessions_closed_total", protocol="udp", reason="removed") == 2,
                 10, what="sessions of the removed route ended")
    finally:
        live.close()
        later.close()
