"""
Property tests and fuzzing (hypothesis): the directory loader, the PROXY header reader, and the
TLS front door itself fed arbitrary bytes through Twisted's in-memory transport.

CI runs a short budget; run longer by hand with
``HYPOTHESIS_PROFILE=long python -m pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import os
import struct

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from test_clienthello import real_client_hello
from twisted_gateway.config import load_config
from twisted_gateway.directory.model import DirectoryError, parse_directory, shard_to_dict
from twisted_gateway.gateway import Gateway
from twisted_gateway.proxyheader import ProxyHeaderError, ProxyHeaderReader, V2_SIGNATURE, build_v2

settings.register_profile("ci", max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=20000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=15), children, max_size=5),
    max_leaves=20)


@given(json_values)
def test_directory_loader_accepts_or_refuses_cleanly(doc):
    try:
        snapshot = parse_directory(doc)
    except DirectoryError as e:
        assert str(e) and "\n" not in str(e)
        return
    # Whatever was accepted round-trips.
    again = parse_directory({"shards": [shard_to_dict(s) for s in snapshot.shards]})
    assert again.shards == snapshot.shards


shard_docs = st.fixed_dictionaries({
    "id": st.text(min_size=1, max_size=8), "task": st.text(min_size=1, max_size=8),
    "hostname_label": st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True),
    "address": st.sampled_from(["127.0.0.1", "::1", "db.internal", "10.1.2.3"]),
    "primary": st.booleans(),
    "ports": st.lists(st.fixed_dictionaries({
        "port": st.integers(1, 65535), "protocol": st.sampled_from(["tcp", "http/1.1", "h2", "udp", "quic"]),
        "public": st.booleans()}), max_size=3),
})


@given(st.lists(shard_docs, max_size=6))
def test_directory_of_plausible_shards(docs):
    try:
        parse_directory(yaml.safe_load(yaml.safe_dump({"shards": docs})))
    except DirectoryError:
        pass


@given(st.binary(max_size=300), st.integers(1, 40))
def test_proxy_reader_never_crashes(data, step):
    reader = ProxyHeaderReader()
    for i in range(0, max(len(data), 1), step):
        try:
            result = reader.feed(data[i:i + step])
        except ProxyHeaderError:
            return
        if result is not None:
            return


@given(st.ip_addresses(), st.integers(0, 65535), st.integers(0, 65535), st.binary(max_size=50),
       st.integers(1, 30))
def test_proxy_v2_round_trip_in_pieces(address, sport, dport, rest, step):
    dst = "127.0.0.1" if address.version == 4 else "::1"
    header = build_v2(str(address), sport, dst, dport)
    reader = ProxyHeaderReader()
    data = header + rest
    result = None
    for i in range(0, len(data), step):
        result = reader.feed(data[i:i + step])
        if result is not None:
            break
    assert result is not None
    info, remaining = result
    assert info.host == str(address) and info.port == sport
    assert rest.startswith(remaining)  # what followed the header, as far as it was fed


def test_proxy_v1_and_oversized():
    info, rest = ProxyHeaderReader().feed(b"PROXY TCP4 192.0.2.1 198.51.100.1 5000 443\r\nhello")
    assert (info.host, info.port, rest) == ("192.0.2.1", 5000, b"hello")
    try:
        ProxyHeaderReader().feed(V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 60000))
    except ProxyHeaderError:
        pass
    else:
        raise AssertionError("an oversized v2 header was accepted")


_gateway = None


class TCPStringTransport(StringTransport):
    """StringTransport with the TCP options and half-close the front door uses."""

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def loseWriteConnection(self) -> None:
        pass


def _front_door():
    global _gateway
    if _gateway is None:
        import tempfile
        state = tempfile.mkdtemp(prefix="gw-fuzz-")
        config = load_config(None, {"state_dir": state})
        _gateway = Gateway(config, reactor=MemoryReactorClock())
        from twisted_gateway.directory.model import DirectorySnapshot, Shard, ShardPort
        _gateway.directory.publish(DirectorySnapshot([Shard(
            id="s", task="t", hostname_label="db", address="127.0.0.1", primary=True,
            ports=(ShardPort(5432, "tcp", True),))]), "fuzz")
    proto = _gateway.tls_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = TCPStringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
                                hostAddress=IPv4Address("TCP", "127.0.0.1", 28318))
    proto.makeConnection(transport)
    return proto, transport


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=2048), st.integers(1, 512))
def test_front_door_survives_arbitrary_bytes(data, step):
    """Any bytes: the front door answers or waits, never raises, and never leaks a connection."""
    proto, transport = _front_door()
    for i in range(0, len(data), step):
        if transport.disconnecting:
            break
        proto.dataReceived(data[i:i + step])
    proto.connectionLost(None)
    assert proto not in _gateway.connections


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_front_door_survives_mutated_client_hellos(data):
    raw = bytearray(real_client_hello("db-5432.localhost", [b"h2"]))
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    proto, transport = _front_door()
    proto.dataReceived(bytes(raw))
    proto.connectionLost(None)


# -- the QUIC Initial reader (twisted_gateway/udp/quic.py) --------------------------------------

def _quic_reader_survives(datagrams):
    from twisted_gateway.clienthello import ClientHello, HelloError, NeedMore
    from twisted_gateway.udp import quic
    reader = quic.InitialReader(max_hello_bytes=4096)
    for datagram in datagrams:
        try:
            result = reader.feed(datagram)
        except quic.QuicDrop as e:
            assert e.reason and "\n" not in e.reason
            continue
        assert isinstance(result, (ClientHello, HelloError, NeedMore))
        quic.server_connection_ids(datagram)


@given(st.lists(st.binary(max_size=1500), max_size=4))
def test_quic_initial_reader_raises_only_its_drop_on_arbitrary_bytes(datagrams):
    _quic_reader_survives(datagrams)


def _valid_initial() -> bytes:
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_quic_units import RFC9001_CLIENT_INITIAL
    return RFC9001_CLIENT_INITIAL


@given(st.lists(st.tuples(st.integers(0, 1199), st.integers(0, 255)), max_size=6),
       st.integers(0, 1200))
def test_quic_initial_reader_on_mangled_real_initials(flips, cut):
    data = bytearray(_valid_initial())
    for at, value in flips:
        data[at] = value
    _quic_reader_survives([bytes(data[:cut]), bytes(data)])
