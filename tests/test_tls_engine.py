"""
The TLS engine (twisted_gateway/tls/connection.py) over memory BIOs, driven by a real pyOpenSSL
client: application data both ways in one record and in many, close_notify as a half-close, a
TCP FIN without close_notify, a corrupted record, and a write larger than the direct calls'
buffer.  Every test runs twice: with OpenSSL's record calls made directly (the engine's fast
path, twisted_gateway._compat.RecordCalls) and through pyOpenSSL's methods (its fallback), and
both must behave the same.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from OpenSSL import SSL
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from twisted_gateway import _compat
from twisted_gateway.tls.connection import TLSServerConnection
from tls_memory import drain, leaf_context


@pytest.fixture(scope="module")
def server_context(tmp_path_factory: pytest.TempPathFactory) -> SSL.Context:
    return leaf_context(str(tmp_path_factory.mktemp("tls-engine")), "engine.test")


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.chunks = 0
        self.read_closed = False
        self.lost: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self.chunks += 1

    def readConnectionLost(self) -> None:
        self.read_closed = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = reason


class Wire(StringTransport):
    """The client's TCP connection as the engine sees it; remembers a half-close."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class Pair:
    """The engine on one side, a pyOpenSSL client on the other, bytes moved by hand."""

    def __init__(self, ctx: SSL.Context, direct: bool) -> None:
        self.wire = Wire()
        self.app = Recorder()
        self.failures: list[str] = []
        self.engine = TLSServerConnection(self.wire, SSL.Connection(ctx, None), self.app,
                                          lambda _: None, lambda _, reason, __: self.failures.append(reason))
        if not direct:
            self.engine._rec = None
        assert (self.engine._rec is not None) == direct
        self.client = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
        self.client.set_connect_state()
        try:
            self.client.do_handshake()
        except SSL.WantReadError:
            pass
        self.engine.start(self._from_client())
        for _ in range(5):
            self._to_client()
            try:
                self.client.do_handshake()
                break
            except SSL.WantReadError:
                pass
        self.to_engine()
        assert self.engine.handshake_done

    def _from_client(self) -> bytes:
        return drain(self.client)

    def _to_client(self) -> None:
        data = self.wire.value()
        self.wire.clear()
        if data:
            self.client.bio_write(data)

    def to_engine(self) -> None:
        data = self._from_client()
        if data:
            self.engine.raw_data_received(data)

    def client_reads(self) -> bytes:
        self._to_client()
        got = b""
        while True:
            try:
                got += self.client.recv(1 << 20)
            except SSL.WantReadError:
                return got


both = pytest.mark.parametrize("direct", [True, False], ids=["direct", "pyopenssl"])


@both
def test_application_data_both_ways(server_context: SSL.Context, direct: bool) -> None:
    if direct and not _compat.RECORD_CALLS:
        pytest.skip("the direct record calls are not available here (tests/test_compat.py says why)")
    pair = Pair(server_context, direct)
    pair.client.send(b"GET / HTTP/1.1\r\n\r\n")
    pair.to_engine()
    assert pair.app.data == b"GET / HTTP/1.1\r\n\r\n"
    pair.engine.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert pair.client_reads() == b"HTTP/1.1 200 OK\r\n\r\n"


@both
def test_many_records_in_one_read_reach_the_protocol_in_one_call(server_context: SSL.Context,
                                                                  direct: bool) -> None:
    if direct and not _compat.RECORD_CALLS:
        pytest.skip("the direct record calls are not available here")
    pair = Pair(server_context, direct)
    upload = os.urandom(200 * 1024)  # thirteen records
    pair.client.sendall(upload)
    pair.to_engine()
    assert pair.app.data == upload
    assert pair.app.chunks == 1


@both
def test_a_write_larger_than_the_read_buffer_arrives_whole(server_context: SSL.Context, direct: bool) -> None:
    if direct and not _compat.RECORD_CALLS:
        pytest.skip("the direct record calls are not available here")
    pair = Pair(server_context, direct)
    download = os.urandom(_compat.RECORD_BUFFER * 2 + 12345)
    pair.engine.write(download)
    pair.engine.write(memoryview(b"tail"))  # a buffer that is not bytes takes pyOpenSSL's path
    assert pair.client_reads() == download + b"tail"


@both
def test_close_notify_is_a_half_close_and_the_engine_can_still_write(server_context: SSL.Context,
                                                                      direct: bool) -> None:
    if direct and not _compat.RECORD_CALLS:
        pytest.skip("the direct record calls are not available here")
    pair = Pair(server_context, direct)
    pair.client.send(b"last words")
    pair.client.shutdown()
    pair.to_engine()
    assert pair.app.data == b"last words" and pair.app.read_closed
    assert not pair.wire.disconnecting
    pair.engine.write(b"the reply")
    assert pair.client_reads() == b"the reply"
    pair.engine.loseWriteConnection()
    assert pair.wire.write_closed
    pair._to_client()
    with pytest.raises(SSL.ZeroReturnError):
        pair.client.recv(100)


@both
def test_a_fin_without_close_notify_ends_the_stream_after_the_buffered_bytes(server_context: SSL.Context,
                                                                             direct: bool) -> None:
    if direct and not _compat.RECORD_CALLS:
        pytest.skip("the direct record calls are not available here")
    pair = Pair(server_context, direct)
    pair.engine.pauseProducing()
    pair.client.send(b"buffered")
    pair.to_engine()
    pair.engine.raw_read_connection_lost()
    assert pair.app.data == b"" and not pair.app.read_closed  # paused: nothing delivered yet
    pair.engine.resumeProducing()
    assert pair.app.data == b"buffered" and pair.app.read_closed


@both
def test_a_corrupted_record_aborts_the_connection_and_delivers_nothing(server_context: SSL.Context,
                                                                        direct: bool) -> None:
    if direct and not _compat.RECORD_CALLS:
        pytest.skip("the direct record calls are not available here")
    pair = Pair(server_context, direct)
    pair.client.send(b"x" * 100)
    record = bytearray(pair._from_client())
    record[-5] ^= 0x55  # inside the tag: authentication fails
    pair.engine.raw_data_received(bytes(record))
    assert pair.app.data == b""
    assert pair.wire.disconnecting  # abortConnection
    pair.engine.write(b"after the abort")  # written nowhere, raises nothing
    assert b"after the abort" not in pair.wire.value()


@both
def test_a_memoryview_of_wide_items_is_written_byte_for_byte(server_context: SSL.Context, direct: bool) -> None:
    # A memoryview counts its length in items; what OpenSSL took is counted in bytes.
    import array
    if direct and not _compat.RECORD_CALLS:
        pytest.skip("the direct record calls are not available here")
    pair = Pair(server_context, direct)
    wide = array.array("H", range(20000))
    pair.engine.write(memoryview(wide))  # type: ignore[arg-type]  # any buffer, as transports take
    assert pair.client_reads() == wide.tobytes()
