"""
Attacks on commit 7118521: the TLS engine's direct OpenSSL record calls
(twisted_gateway._compat.RecordCalls, the shared read buffer) and lean_dispatch for the epoll
reactor.

Most tests are differential: the same client behaviour is driven through the engine with the
direct calls and with pyOpenSSL's methods (C{engine._rec = None}), and everything observable
must be equal: the plaintext the application gets (and in how many calls), read-closed,
aborts and close, handshake failures, what the client decrypts from the wire, the alert it
gets, and the record layout of the wire (type and length of every record the engine sent).

Client records that pyOpenSSL will not send (a record over 16 KiB of plaintext, empty and
padding-only records, a KeyUpdate, a warning alert) are forged with the client's TLS 1.3
traffic secret, taken from the key log (RFC 8446 7.1-7.3, 5.2).

lean_dispatch is compared with the stock EPollReactor.doPoll on fresh reactors, never
installed or run; each is driven with doIteration(0) and closed at the end.
"""

from __future__ import annotations

import os
import random
import socket
import struct
from typing import Any, Callable

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from OpenSSL import SSL
from OpenSSL._util import lib as _lib
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from twisted_gateway import _compat
from twisted_gateway.tls.connection import TLSServerConnection
from twisted_gateway.tls.contexts import build_context
from twisted_gateway.tls.localca import LocalCA

from tls_memory import drain, leaf_context

pytestmark = pytest.mark.skipif(not _compat.RECORD_CALLS,
                                reason="the direct record calls are not available here")


@pytest.fixture(scope="module", params=["plain", "gateway"])
def server_context(request: Any, tmp_path_factory: pytest.TempPathFactory) -> SSL.Context:
    """A bare pyOpenSSL context, and one made as the gateway makes its own (tls/contexts.py:
    MODE_RELEASE_BUFFERS, OP_NO_RENEGOTIATION, its TLS 1.2 ciphers, an ALPN callback)."""
    folder = str(tmp_path_factory.mktemp("tls-attack"))
    if request.param == "gateway":
        ca = LocalCA(os.path.join(folder, "ca"))
        return build_context(ca.issue(("engine.test",)), (b"h2", b"http/1.1"))
    return leaf_context(folder, "engine.test")


# -- the application, the wire, the client ------------------------------------------------------

class Recorder(Protocol):
    """Records every event in order; optional hooks run inside dataReceived."""

    def __init__(self, on_data: Callable[[Recorder, bytes], None] | None = None) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.on_data = on_data

    @property
    def data(self) -> bytes:
        return b"".join(e[1] for e in self.events if e[0] == "data")

    @property
    def calls(self) -> int:
        return sum(1 for e in self.events if e[0] == "data")

    @property
    def read_closed(self) -> bool:
        return ("read_closed",) in self.events

    def dataReceived(self, data: bytes) -> None:
        assert type(data) is bytes, type(data)  # never a view of a shared buffer
        self.events.append(("data", data))
        if self.on_data is not None:
            self.on_data(self, data)

    def connectionLost(self, reason: Any = None) -> None:
        self.events.append(("lost",))


@implementer(IHalfCloseableProtocol)
class HalfCloseRecorder(Recorder):
    def readConnectionLost(self) -> None:
        self.events.append(("read_closed",))

    def writeConnectionLost(self) -> None:
        self.events.append(("write_closed",))


class Wire(StringTransport):
    """The client's TCP connection as the engine sees it."""

    write_closed = False
    aborted = False
    paused = 0

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.paused -= 1


def _hkdf_label(secret: bytes, label: bytes, length: int, algorithm: hashes.HashAlgorithm) -> bytes:
    full = b"tls13 " + label
    info = struct.pack(">H", length) + bytes([len(full)]) + full + b"\x00"
    return HKDFExpand(algorithm, length, info).derive(secret)


class Forger:
    """The client's TLS 1.3 record protection, outside OpenSSL (RFC 8446 5.2, 5.3, 7.3)."""

    def __init__(self, secret: bytes, cipher: str) -> None:
        self.algorithm: hashes.HashAlgorithm = hashes.SHA384() if cipher.endswith("SHA384") else hashes.SHA256()
        self.aead = ChaCha20Poly1305 if "CHACHA20" in cipher else AESGCM
        self.key_size = 16 if "AES_128" in cipher else 32
        self._install(secret)

    def _install(self, secret: bytes) -> None:
        self.secret = secret
        self.cipher = self.aead(_hkdf_label(secret, b"key", self.key_size, self.algorithm))
        self.iv = _hkdf_label(secret, b"iv", 12, self.algorithm)
        self.seq = 0

    def record(self, content: bytes, content_type: int | None = 23, padding: int = 0) -> bytes:
        inner = content + (bytes([content_type]) if content_type is not None else b"") + b"\x00" * padding
        header = b"\x17\x03\x03" + struct.pack(">H", len(inner) + 16)
        nonce = bytes(a ^ b for a, b in zip(self.iv, b"\x00" * 4 + struct.pack(">Q", self.seq)))
        self.seq += 1
        return header + self.cipher.encrypt(nonce, inner, header)

    def alert(self, level: int, description: int) -> bytes:
        return self.record(bytes([level, description]), 21)

    def key_update(self, requested: bool) -> bytes:
        record = self.record(b"\x18\x00\x00\x01" + bytes([1 if requested else 0]), 22)
        self._install(_hkdf_label(self.secret, b"traffic upd", self.algorithm.digest_size, self.algorithm))
        return record


def records(data: bytes) -> list[tuple[int, int]]:
    """The (type, length) of every TLS record in C{data}; a trailing fragment as (-1, its length)."""
    out = []
    i = 0
    while i + 5 <= len(data):
        length = struct.unpack(">H", data[i + 3:i + 5])[0]
        if i + 5 + length > len(data):
            break
        out.append((data[i], length))
        i += 5 + length
    if i < len(data):
        out.append((-1, len(data) - i))
    return out


class Pair:
    """The engine on one side, a pyOpenSSL client on the other, bytes moved by hand."""

    def __init__(self, ctx: SSL.Context, direct: bool, *, tls12: bool = False, half_close: bool = True,
                 on_data: Callable[[Recorder, bytes], None] | None = None,
                 before_finished: Callable[[Pair], None] | None = None,
                 finish: bool = True) -> None:
        self.wire = Wire()
        self.app: Recorder = (HalfCloseRecorder if half_close else Recorder)(on_data)
        self.failures: list[str] = []
        self.handshakes = 0
        self.engine = TLSServerConnection(self.wire, SSL.Connection(ctx, None), self.app,
                                          self._handshaken, lambda _, reason, __: self.failures.append(reason))
        if not direct:
            self.engine._rec = None
        assert (self.engine._rec is not None) == direct
        self.keylog: list[bytes] = []
        client_ctx = SSL.Context(SSL.TLS_METHOD)
        if tls12:
            client_ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
        client_ctx.set_keylog_callback(lambda _, line: self.keylog.append(line))
        client_ctx.set_alpn_protos([b"http/1.1"])
        self.client = SSL.Connection(client_ctx, None)
        self.client.set_connect_state()
        try:
            self.client.do_handshake()
        except SSL.WantReadError:
            pass
        self.engine.start(self.from_client())
        self.to_client()
        if before_finished is not None:
            before_finished(self)
        if finish:
            self.finish_handshake()

    def _handshaken(self, _: Any) -> None:
        self.handshakes += 1

    def finish_handshake(self) -> None:
        for _ in range(5):
            try:
                self.client.do_handshake()
                break
            except SSL.WantReadError:
                self.to_client()
        self.to_engine()
        assert self.engine.handshake_done
        self.to_client()
        self.client.do_handshake()  # TLS 1.2: the server's Finished
        self.wire_after_handshake = len(getattr(self, "sent", b""))

    def forger(self) -> Forger:
        line = next(line for line in self.keylog if line.startswith(b"CLIENT_TRAFFIC_SECRET_0 "))
        return Forger(bytes.fromhex(line.split()[2].decode()), self.client.get_cipher_name())

    def from_client(self) -> bytes:
        return drain(self.client)

    def to_client(self) -> None:
        data = self.wire.value()
        self.wire.clear()
        self.sent = getattr(self, "sent", b"") + data
        if data:
            self.client.bio_write(data)

    def to_engine(self) -> None:
        data = self.from_client()
        if data:
            self.engine.raw_data_received(data)

    def client_reads(self) -> tuple[bytes, str]:
        """What the client decrypts, and how its reading ends (the exception's name and reason)."""
        self.to_client()
        got = b""
        while True:
            try:
                got += self.client.recv(1 << 20)
            except SSL.WantReadError:
                return got, "WantReadError"
            except SSL.ZeroReturnError:
                return got, "ZeroReturnError"
            except SSL.Error as e:
                return got, f"{type(e).__name__}: {e}"

    def observed(self) -> dict[str, Any]:
        """Everything a differential test compares."""
        got, ending = self.client_reads()
        return {
            "events": [e if e[0] != "data" else ("data", len(e[1])) for e in self.app.events],
            "data": self.app.data,
            "failures": self.failures,
            "client_got": got,
            "client_ending": ending,
            "wire_records": records(self.sent[self.wire_after_handshake:])
            if hasattr(self, "wire_after_handshake") else records(self.sent),
            "aborted": self.wire.aborted,
            "disconnecting": self.wire.disconnecting,
            "write_closed": self.wire.write_closed,
            "read_closed": self.engine._read_closed,
            "lost": self.engine._lost,
        }


def differential(ctx: SSL.Context, scenario: Callable[[Pair], Any], **kw: Any) -> dict[str, Any]:
    """Run C{scenario} over both paths; assert they are observably the same; return one."""
    seen = []
    for direct in (True, False):
        pair = Pair(ctx, direct, **kw)
        scenario(pair)
        seen.append(pair.observed())
    direct_run, pyopenssl_run = seen
    for key in direct_run:
        assert direct_run[key] == pyopenssl_run[key], (key, direct_run[key], pyopenssl_run[key])
    return direct_run


def feed_split(engine: TLSServerConnection, data: bytes, rng: random.Random, pieces: int) -> None:
    cuts = sorted(rng.sample(range(1, len(data)), min(pieces - 1, len(data) - 1)))
    start = 0
    for cut in cuts + [len(data)]:
        engine.raw_data_received(data[start:cut])
        start = cut


# -- differential: what the client sends ------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_random_splits_of_many_records(server_context: SSL.Context, seed: int) -> None:
    rng = random.Random(seed)
    plaintext = [rng.randbytes(rng.choice([1, 17, 1000, 16384, 16385, 40000])) for _ in range(8)]
    pieces = rng.choice([2, 7, 50, 300])

    def scenario(pair: Pair) -> None:
        for chunk in plaintext:
            pair.client.sendall(chunk)
        feed_split(pair.engine, pair.from_client(), random.Random(seed), pieces)
        pair.engine.write(b"reply")

    seen = differential(server_context, scenario)
    assert seen["data"] == b"".join(plaintext)
    assert seen["client_got"] == b"reply"


def test_byte_by_byte(server_context: SSL.Context) -> None:
    def scenario(pair: Pair) -> None:
        pair.client.send(b"a" * 300)
        pair.client.send(b"b" * 5)
        for byte in pair.from_client():
            pair.engine.raw_data_received(bytes([byte]))
    seen = differential(server_context, scenario)
    assert seen["data"] == b"a" * 300 + b"b" * 5
    assert seen["events"] == [("data", 300), ("data", 5)]


def test_a_record_cut_midway_then_a_fin(server_context: SSL.Context) -> None:
    def scenario(pair: Pair) -> None:
        pair.client.send(b"whole")
        pair.client.send(b"cut short")
        stream = pair.from_client()
        pair.engine.raw_data_received(stream[:-7])
        pair.engine.raw_read_connection_lost()
    seen = differential(server_context, scenario)
    assert seen["data"] == b"whole"
    assert seen["events"] == [("data", 5), ("read_closed",)]


@pytest.mark.parametrize("garbage", [b"\x00" * 40, b"\x17\x03\x03\x00\x20" + b"\x55" * 32,
                                     b"\x16\x03\x01\x00\x04\x01\x00\x00\x00", b"GET / HTTP/1.1\r\n\r\n",
                                     b"\x17\x03\x03\xff\xff" + b"\x00" * 100])
def test_garbage_after_valid_records(server_context: SSL.Context, garbage: bytes) -> None:
    def scenario(pair: Pair) -> None:
        pair.client.send(b"valid one")
        pair.client.send(b"valid two")
        pair.engine.raw_data_received(pair.from_client() + garbage)
        pair.engine.write(b"after")  # the engine has aborted: written nowhere
    seen = differential(server_context, scenario)
    assert seen["data"] == b"valid onevalid two"
    assert seen["aborted"] and seen["lost"]
    assert seen["client_got"] == b"" and seen["client_ending"].startswith("Error")


@pytest.mark.parametrize("tls12", [False, True], ids=["tls13", "tls12"])
def test_records_after_close_notify_are_ignored(server_context: SSL.Context, tls12: bool) -> None:
    def scenario(pair: Pair) -> None:
        pair.client.send(b"before")
        pair.client.shutdown()
        stream = pair.from_client()
        # after the close_notify: a replayed piece of the first record, then garbage; nothing
        # after a close_notify is read (the forged-record test has validly sealed ones).
        pair.engine.raw_data_received(stream + stream[:30] + b"\x17\x03\x03\x00\x05hello")
        pair.engine.raw_data_received(b"\x17\x03\x03\x00\x05world")
        pair.engine.write(b"still writing")
    seen = differential(server_context, scenario, tls12=tls12)
    assert seen["data"] == b"before"
    assert seen["events"] == [("data", 6), ("read_closed",)]
    assert not seen["aborted"]
    assert seen["client_got"] == b"still writing"


def test_close_notify_then_forged_records(server_context: SSL.Context) -> None:
    def scenario(pair: Pair) -> None:
        forge = pair.forger()
        pair.engine.raw_data_received(forge.record(b"one") + forge.alert(1, 0) + forge.record(b"two"))
        pair.engine.raw_data_received(forge.record(b"three"))
    seen = differential(server_context, scenario)
    assert seen["data"] == b"one"
    assert seen["events"] == [("data", 3), ("read_closed",)]
    assert not seen["aborted"]


def test_close_notify_to_a_protocol_that_is_not_half_closeable(server_context: SSL.Context) -> None:
    def scenario(pair: Pair) -> None:
        pair.client.send(b"bye")
        pair.client.shutdown()
        pair.to_engine()
        pair.engine.write(b"too late")
    seen = differential(server_context, scenario, half_close=False)
    assert seen["data"] == b"bye"
    assert seen["disconnecting"] and not seen["aborted"]
    assert seen["client_got"] == b"" and seen["client_ending"] == "ZeroReturnError"


@pytest.mark.parametrize("level,description,outcome", [
    (2, 40, "abort"),        # fatal handshake_failure
    (2, 80, "abort"),        # fatal internal_error
    (1, 90, "ignored"),      # user_canceled, a warning TLS 1.3 lets pass
    (1, 42, "abort"),        # any other warning is fatal in TLS 1.3
    (2, 0, "read_closed"),   # close_notify, whatever its level
])
def test_an_alert_record(server_context: SSL.Context, level: int, description: int, outcome: str) -> None:
    def scenario(pair: Pair) -> None:
        forge = pair.forger()
        pair.engine.raw_data_received(forge.record(b"first") + forge.alert(level, description)
                                      + forge.record(b"second"))
        pair.engine.write(b"reply")
    seen = differential(server_context, scenario)
    if outcome == "abort":
        assert seen["data"] == b"first" and seen["aborted"] and seen["client_got"] == b""
    elif outcome == "ignored":
        assert seen["data"] == b"firstsecond" and not seen["aborted"] and seen["client_got"] == b"reply"
    else:
        assert seen["events"] == [("data", 5), ("read_closed",)] and seen["client_got"] == b"reply"


def test_a_tls12_alert_record(server_context: SSL.Context) -> None:
    def scenario(pair: Pair) -> None:
        pair.client.send(b"data")
        stream = pair.from_client()
        # a plaintext fatal alert in the middle of an encrypted TLS 1.2 stream
        pair.engine.raw_data_received(stream + b"\x15\x03\x03\x00\x02\x02\x28")
    seen = differential(server_context, scenario, tls12=True)
    assert seen["data"] == b"data" and seen["aborted"]


@pytest.mark.parametrize("size,padding,accepted", [
    (16384, 0, True),         # the most plaintext a record may carry
    (16385, 0, False),        # one byte over: record_overflow
    (100, 16384 - 100, True),  # content + padding exactly at the limit
    (100, 16385 - 100, True),  # padding past it: OpenSSL checks the content after removing
                               # the padding (RFC 8446 5.4 says to refuse it; both paths agree)
    (16384, 100, True),
    (40000, 0, False),
])
def test_a_record_over_16_kib_of_plaintext(server_context: SSL.Context, size: int, padding: int,
                                           accepted: bool) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)

    def scenario(pair: Pair) -> None:
        forge = pair.forger()
        pair.engine.raw_data_received(forge.record(b"ok") + forge.record(payload, padding=padding))
        pair.engine.write(b"reply")
    seen = differential(server_context, scenario)
    if accepted:
        assert seen["data"] == b"ok" + payload and not seen["aborted"]
        assert seen["client_got"] == b"reply"
    else:
        assert seen["data"] == b"ok" and seen["aborted"]
        assert "record overflow" in seen["client_ending"]


def test_a_ciphertext_longer_than_allowed(server_context: SSL.Context) -> None:
    def scenario(pair: Pair) -> None:
        pair.engine.raw_data_received(pair.forger().record(b"fine") + b"\x17\x03\x03\x41\x01" + b"\x00" * 0x4101)
    seen = differential(server_context, scenario)
    assert seen["data"] == b"fine" and seen["aborted"]


@pytest.mark.parametrize("count", [1, 5, 31, 40])
def test_empty_application_data_records(server_context: SSL.Context, count: int) -> None:
    def scenario(pair: Pair) -> None:
        forge = pair.forger()
        pair.engine.raw_data_received(b"".join(forge.record(b"") for _ in range(count)) + forge.record(b"after"))
        pair.engine.raw_data_received(forge.record(b""))
        pair.engine.raw_data_received(forge.record(b"end"))
    seen = differential(server_context, scenario)
    if count <= 31:  # OpenSSL takes up to 32 empty records in a row, then refuses
        assert seen["events"] == [("data", 5), ("data", 3)] and not seen["aborted"]
    else:
        assert seen["events"] == [] and seen["aborted"] and "unexpected message" in seen["client_ending"]


def test_a_padding_only_record(server_context: SSL.Context) -> None:
    def scenario(pair: Pair) -> None:
        forge = pair.forger()
        pair.engine.raw_data_received(forge.record(b"x") + forge.record(b"", content_type=None, padding=50))
    seen = differential(server_context, scenario)
    assert seen["data"] == b"x" and seen["aborted"]


@pytest.mark.parametrize("content_type", [20, 22, 24, 99])
def test_an_unexpected_inner_content_type(server_context: SSL.Context, content_type: int) -> None:
    def scenario(pair: Pair) -> None:
        forge = pair.forger()
        pair.engine.raw_data_received(forge.record(b"x") + forge.record(b"\x01", content_type=content_type)
                                      + forge.record(b"y"))
    seen = differential(server_context, scenario)
    assert seen["data"] == b"x" and seen["aborted"]


def test_a_plaintext_change_cipher_spec_after_the_handshake(server_context: SSL.Context) -> None:
    def scenario(pair: Pair) -> None:
        forge = pair.forger()
        pair.engine.raw_data_received(forge.record(b"x") + b"\x14\x03\x03\x00\x01\x01" + forge.record(b"y"))
    differential(server_context, scenario)


@pytest.mark.parametrize("requested", [True, False])
def test_a_key_update_from_the_client(server_context: SSL.Context, requested: bool) -> None:
    def scenario(pair: Pair) -> None:
        forge = pair.forger()
        pair.engine.raw_data_received(forge.record(b"old key ") + forge.key_update(requested)
                                      + forge.record(b"new key"))
        pair.engine.write(b"answer one")
        pair.engine.raw_data_received(forge.key_update(False) + forge.record(b" newer"))
        pair.engine.write(b" answer two")
    seen = differential(server_context, scenario)
    assert seen["data"] == b"old key new key newer"
    assert seen["client_got"] == b"answer one answer two" and not seen["aborted"]
    # a requested update is answered with the server's own KeyUpdate (4 + 1 + 1 + 16 bytes)
    assert seen["wire_records"] == ([(23, 22)] if requested else []) + [(23, 27), (23, 28)]


def test_a_key_update_cut_in_pieces(server_context: SSL.Context) -> None:
    def scenario(pair: Pair) -> None:
        forge = pair.forger()
        stream = forge.record(b"a") + forge.key_update(True) + forge.record(b"b" * 16000)
        feed_split(pair.engine, stream, random.Random(7), 40)
        pair.engine.write(b"ok")
    seen = differential(server_context, scenario)
    assert seen["data"] == b"a" + b"b" * 16000 and seen["client_got"] == b"ok"


def test_tls12_renegotiation_from_the_client(server_context: SSL.Context) -> None:
    def scenario(pair: Pair) -> None:
        pair.client.send(b"before")
        assert _lib.SSL_renegotiate(pair.client._ssl) == 1
        try:
            pair.client.do_handshake()
        except SSL.WantReadError:
            pass
        pair.to_engine()
        pair.engine.write(b"server data")
        pair.to_client()
        try:
            pair.client.do_handshake()
        except SSL.Error:
            pass
        pair.to_engine()
        try:
            pair.client.send(b"after")
        except SSL.Error:
            pass
        pair.to_engine()
    seen = differential(server_context, scenario, tls12=True)
    assert seen["data"].startswith(b"before")


@pytest.mark.parametrize("seed", range(20))
def test_random_mixed_operations(server_context: SSL.Context, seed: int) -> None:
    """A small fuzzer: forged client records (data, empty, padded, KeyUpdates), fed in random
    pieces, between engine writes of every buffer type, pauses and resumes; ended by a
    close_notify, a FIN, or garbage.  Both paths must agree on everything."""
    plan_rng = random.Random(seed)
    steps = []
    for _ in range(plan_rng.randrange(5, 25)):
        steps.append((plan_rng.choice(["data", "data", "empty", "padded", "update", "write", "write",
                                        "pause", "resume", "feed"]),
                      plan_rng.choice([0, 1, 100, 5000, 16384, 70000]), plan_rng.random()))
    ending = plan_rng.choice(["close_notify", "fin", "garbage", "none"])
    written: list[bytes] = []

    def scenario(pair: Pair) -> None:
        forge = pair.forger()
        pending = b""
        written.clear()
        rng = random.Random(seed + 1000)
        for kind, size, r in steps:
            if kind == "data":
                pending += forge.record(rng.randbytes(min(max(size, 1), 16384)))
            elif kind == "empty":
                pending += forge.record(b"")
            elif kind == "padded":
                pending += forge.record(rng.randbytes(min(size, 16000)), padding=int(r * 300))
            elif kind == "update":
                pending += forge.key_update(r < 0.5)
            elif kind == "write":
                chunk = rng.randbytes(size)
                written.append(chunk)
                pair.engine.write([bytes, bytearray, memoryview][int(r * 3)](chunk))
            elif kind == "pause":
                pair.engine.pauseProducing()
            elif kind == "resume":
                pair.engine.resumeProducing()
            elif kind == "feed" and pending:
                cut = int(r * len(pending))
                pair.engine.raw_data_received(pending[:cut] or pending)
                pending = pending[cut:] if cut else b""
        if ending == "close_notify":
            pending += forge.alert(1, 0)
        elif ending == "garbage":
            pending += b"\x17\x03\x03\x00\x10" + b"\x01" * 16
        if pending:
            pair.engine.raw_data_received(pending)
        if ending == "fin":
            pair.engine.raw_read_connection_lost()
        pair.engine.resumeProducing()
    seen = differential(server_context, scenario)
    if ending != "garbage":
        assert seen["client_got"] == b"".join(written)
        assert seen["read_closed"] == (ending in ("close_notify", "fin"))


# -- differential: what the engine writes ---------------------------------------------------

class BytesSubclass(bytes):
    pass


def test_writes_of_every_buffer_type_in_order(server_context: SSL.Context) -> None:
    pieces: list[Any] = [b"bytes ", bytearray(b"bytearray "), memoryview(b"memoryview "), b"",
                         BytesSubclass(b"subclass "), memoryview(b"xxsliced viewxx")[2:-2],
                         bytearray(b"big ") * 10000, b"end"]
    expected = b"".join(bytes(p) for p in pieces)

    def scenario(pair: Pair) -> None:
        for piece in pieces:
            pair.engine.write(piece)
        pair.engine.writeSequence([b"seq", bytearray(b"uence"), memoryview(b"!")])
    seen = differential(server_context, scenario)
    assert seen["client_got"] == expected + b"sequence!"


def test_several_mebibytes_of_writes(server_context: SSL.Context) -> None:
    rng = random.Random(1)
    chunks = [rng.randbytes(n) for n in (5 * 1024 * 1024, 1, _compat.RECORD_BUFFER, _compat.RECORD_BUFFER + 1,
                                         16384, 16385, 300000)]

    def scenario(pair: Pair) -> None:
        for i, chunk in enumerate(chunks):
            pair.engine.write(chunk if i % 2 == 0 else bytearray(chunk))
    seen = differential(server_context, scenario)
    assert seen["client_got"] == b"".join(chunks)


def test_writes_before_the_handshake_completes(server_context: SSL.Context) -> None:
    def early(pair: Pair) -> None:
        pair.engine.write(b"early ")
        pair.engine.write(bytearray(b"bytearray "))
        pair.engine.write(memoryview(b"view "))
        pair.engine.write(b"")
        pair.engine.write(b"x" * 70000)

    def scenario(pair: Pair) -> None:
        pair.engine.write(b" late")
    seen = differential(server_context, scenario, before_finished=early)
    assert seen["client_got"] == b"early bytearray view " + b"x" * 70000 + b" late"


def test_writes_after_lose_connection_and_abort(server_context: SSL.Context) -> None:
    def after_lose(pair: Pair) -> None:
        pair.engine.write(b"last")
        pair.engine.loseConnection()
        pair.engine.write(b"never")
        pair.engine.write(bytearray(b"never"))
    seen = differential(server_context, after_lose)
    assert seen["client_got"] == b"last" and seen["client_ending"] == "ZeroReturnError"

    def after_abort(pair: Pair) -> None:
        pair.engine.write(b"last")
        pair.engine.abortConnection()
        pair.engine.write(b"after abort")
    differential(server_context, after_abort)


def test_write_after_the_peer_closed_and_after_loss(server_context: SSL.Context) -> None:
    def scenario(pair: Pair) -> None:
        pair.client.shutdown()
        pair.to_engine()
        pair.engine.write(b"reply after close_notify")
        pair.engine.loseWriteConnection()
        pair.engine.write(b"never")
        pair.engine.raw_connection_lost(None)
        pair.engine.write(b"never")
    seen = differential(server_context, scenario)
    assert seen["client_got"] == b"reply after close_notify" and seen["client_ending"] == "ZeroReturnError"


# -- the fallback contract, by fault injection ----------------------------------------------
# "anything but plain success is redone through pyOpenSSL ... nothing is lost or doubled":
# each direct call is made to fail (or to do part of its work) the way OpenSSL may, and the
# engine must still deliver and send exactly what it would have.

def _failing_after(real: Callable[..., int], good_calls: int, result: int = -1) -> Callable[..., int]:
    calls = [0]

    def call(*args: Any) -> int:
        calls[0] += 1
        if calls[0] > good_calls:
            return result
        return real(*args)
    return call


@pytest.mark.parametrize("good_calls", [0, 1, 3, 40])
def test_ssl_write_failing_midway_loses_and_doubles_nothing(server_context: SSL.Context, good_calls: int,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    pair = Pair(server_context, True)
    data = random.Random(good_calls).randbytes(200000)
    monkeypatch.setattr(_compat, "_SSL_WRITE", _failing_after(_compat._SSL_WRITE, good_calls))
    pair.engine.write(data)
    pair.engine.write(b"tail")
    monkeypatch.undo()
    assert pair.client_reads() == (data + b"tail", "WantReadError")
    assert not pair.wire.aborted


@pytest.mark.parametrize("taken", [0, 1, -1, "half"])
def test_bio_write_taking_part_of_the_bytes(server_context: SSL.Context, taken: Any,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    pair = Pair(server_context, True)
    real = _compat._BIO_WRITE

    def partial(bio: Any, data: bytes, size: int) -> int:
        if taken == -1:
            return -1
        n = size // 2 if taken == "half" else min(taken, size)
        return real(bio, data[:n], n) if n else 0
    monkeypatch.setattr(_compat, "_BIO_WRITE", partial)
    upload = random.Random(5).randbytes(50000)
    pair.client.sendall(upload)
    stream = pair.from_client()
    for i in range(0, len(stream), 7000):
        pair.engine.raw_data_received(stream[i:i + 7000])
    monkeypatch.undo()
    assert pair.app.data == upload and not pair.wire.aborted


@pytest.mark.parametrize("pattern", ["never", "every_other"])
def test_ssl_read_giving_nothing(server_context: SSL.Context, pattern: str,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    pair = Pair(server_context, True)
    real = _compat._SSL_READ
    calls = [0]

    def read(ssl: Any, buffer: Any, size: int) -> int:
        calls[0] += 1
        if pattern == "never" or calls[0] % 2:
            return -1
        return real(ssl, buffer, size)
    monkeypatch.setattr(_compat, "_SSL_READ", read)
    upload = random.Random(6).randbytes(100000)
    pair.client.sendall(upload)
    pair.client.shutdown()
    pair.to_engine()
    monkeypatch.undo()
    assert pair.app.data == upload and pair.app.read_closed and not pair.wire.aborted


# -- the shared read buffer ---------------------------------------------------------------

def test_two_engines_interleaved_never_see_each_others_bytes(server_context: SSL.Context) -> None:
    a = Pair(server_context, True)
    b = Pair(server_context, True)
    rng = random.Random(3)
    sent_a, sent_b, wrote_a, wrote_b = [], [], [], []
    for round_ in range(30):
        for pair, sent, wrote, tag in ((a, sent_a, wrote_a, b"A"), (b, sent_b, wrote_b, b"B")):
            n = rng.choice([1, 100, 16384, 70000])
            chunk = tag * n
            pair.client.sendall(chunk)
            sent.append(chunk)
            stream = pair.from_client()
            cut = rng.randrange(1, len(stream))
            pair.engine.raw_data_received(stream[:cut])
            out = (tag.lower() + bytes([48 + round_ % 10])) * rng.choice([1, 9000, 140000])
            pair.engine.write(out)
            wrote.append(out)
            pair.engine.raw_data_received(stream[cut:])
    assert a.app.data == b"".join(sent_a) and set(a.app.data) == {ord("A")}
    assert b.app.data == b"".join(sent_b) and set(b.app.data) == {ord("B")}
    assert a.client_reads()[0] == b"".join(wrote_a)
    assert b.client_reads()[0] == b"".join(wrote_b)


def test_delivered_bytes_do_not_change_when_the_buffer_is_reused(server_context: SSL.Context) -> None:
    a = Pair(server_context, True)
    b = Pair(server_context, True)
    a.client.send(b"first from a")
    a.to_engine()
    kept = a.app.events[0][1]
    b.client.send(b"Z" * 16000)
    b.to_engine()
    b.engine.write(b"Y" * 200000)  # the outgoing BIO is taken through the same buffer
    assert kept == b"first from a"
    assert bytes(_compat._FFI_BUFFER(_compat._READ_BUFFER, 12)) != b"first from a"


def test_an_echo_and_a_cross_write_inside_data_received(server_context: SSL.Context) -> None:
    """The application writes (the outgoing BIO read through the shared buffer) while the engine
    is between two reads of incoming records; and writes to another engine (a splice)."""
    other = Pair(server_context, True)

    def echo(app: Recorder, data: bytes) -> None:
        engine.write(data.upper())
        other.engine.write(data[::-1])
        other.client.send(b"q" * 5000)
        other.to_engine()
    pair = Pair(server_context, True, on_data=echo)
    engine = pair.engine
    pair.engine.pauseProducing()
    rng = random.Random(9)
    upload = [rng.randbytes(n) for n in (10, 16384, 50000, 300000, 5)]
    for chunk in upload:
        pair.client.sendall(chunk)
    pair.to_engine()
    pair.engine.resumeProducing()
    assert pair.app.data == b"".join(upload)
    assert pair.client_reads()[0] == b"".join(upload).upper()
    assert other.client_reads()[0] == b"".join(c[::-1] for c in [e[1] for e in pair.app.events if e[0] == "data"])
    assert other.app.data == b"q" * 5000 * pair.app.calls


# -- pause and resume ----------------------------------------------------------------------

def test_pause_inside_data_received_with_records_and_close_notify_buffered(server_context: SSL.Context) -> None:
    def pause_each_time(app: Recorder, data: bytes) -> None:
        app.engine.pauseProducing()

    def scenario(pair: Pair) -> None:
        pair.app.engine = pair.engine
        pair.engine.pauseProducing()
        for n in (300000, 10, 600000, 7):
            pair.client.sendall(b"p" * n)
        pair.client.shutdown()
        pair.to_engine()
        assert pair.app.events == []
        for _ in range(10):
            pair.engine.resumeProducing()
        pair.engine.resumeProducing()  # not paused: nothing
    seen = differential(server_context, scenario, on_data=pause_each_time)
    assert seen["data"] == b"p" * (300000 + 10 + 600000 + 7)
    assert seen["events"][-1] == ("read_closed",)


def test_fin_while_paused_with_a_partial_record(server_context: SSL.Context) -> None:
    def scenario(pair: Pair) -> None:
        pair.engine.pauseProducing()
        pair.client.send(b"complete")
        pair.client.send(b"partial record")
        stream = pair.from_client()
        pair.engine.raw_data_received(stream[:-3])
        pair.engine.raw_read_connection_lost()
        assert pair.app.events == []
        pair.engine.resumeProducing()
        pair.engine.raw_read_connection_lost()  # a second FIN report changes nothing
    seen = differential(server_context, scenario)
    assert seen["events"] == [("data", 8), ("read_closed",)]


def test_fin_while_paused_after_close_notify(server_context: SSL.Context) -> None:
    def scenario(pair: Pair) -> None:
        pair.client.send(b"x")
        pair.client.shutdown()
        pair.engine.pauseProducing()
        pair.to_engine()
        pair.engine.raw_read_connection_lost()
        pair.engine.resumeProducing()
        pair.engine.raw_connection_lost(None)
    seen = differential(server_context, scenario)
    assert seen["events"] == [("data", 1), ("read_closed",), ("lost",)]


def test_connection_lost_while_paused_delivers_nothing_more(server_context: SSL.Context) -> None:
    def scenario(pair: Pair) -> None:
        pair.engine.pauseProducing()
        pair.client.send(b"never read")
        pair.to_engine()
        pair.engine.raw_connection_lost(None)
        pair.engine.resumeProducing()
    seen = differential(server_context, scenario)
    assert seen["events"] == [("lost",)]


# -- the handshake ------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(3))
def test_handshake_fed_in_random_pieces(server_context: SSL.Context, seed: int) -> None:
    seen = []
    for direct in (True, False):
        wire = Wire()
        app = HalfCloseRecorder()
        engine = TLSServerConnection(wire, SSL.Connection(server_context, None), app, lambda _: None,
                                     lambda *_: None)
        if not direct:
            engine._rec = None
        client = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
        client.set_connect_state()
        rng = random.Random(seed)
        engine._conn.set_accept_state()
        for _ in range(6):
            try:
                client.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                data = client.bio_read(1 << 20)
            except SSL.WantReadError:
                data = b""
            if engine.handshake_done and not data:
                break
            if data:
                feed_split(engine, data, rng, 20)
            if wire.value():
                client.bio_write(wire.value())
                wire.clear()
        client.send(b"hello")
        engine.raw_data_received(client.bio_read(1 << 20))
        seen.append((engine.handshake_done, app.data))
    assert seen[0] == seen[1] == (True, b"hello")


def test_a_corrupted_handshake_record(server_context: SSL.Context) -> None:
    for direct in (True, False):
        failures: list[str] = []
        wire = Wire()
        engine = TLSServerConnection(wire, SSL.Connection(server_context, None), HalfCloseRecorder(),
                                     lambda _: None, lambda _, reason, __: failures.append(reason))
        if not direct:
            engine._rec = None
        client = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
        client.set_connect_state()
        with pytest.raises(SSL.WantReadError):
            client.do_handshake()
        hello = bytearray(client.bio_read(1 << 20))
        hello[5] = 0x02  # a ServerHello where the ClientHello should be
        engine.start(bytes(hello))
        assert failures == ["tls_error"] and wire.disconnecting


# -- lean_dispatch ------------------------------------------------------------------------------

class _Events:
    """Fresh epoll reactors, stock and lean, and the sockets a test makes; all closed after."""

    def __init__(self) -> None:
        self.reactors: list[Any] = []
        self.sockets: list[socket.socket] = []

    def reactor(self, lean: bool) -> Any:
        from twisted.internet.epollreactor import EPollReactor
        reactor = EPollReactor()
        self.reactors.append(reactor)
        if lean:
            assert _compat.lean_dispatch(reactor)
        return reactor

    def pair(self) -> tuple[socket.socket, socket.socket]:
        a, b = socket.socketpair()
        self.sockets += [a, b]
        return a, b

    def close(self) -> None:
        for reactor in self.reactors:
            for selectable in list(reactor._selectables.values()):
                if selectable is not getattr(reactor, "waker", None):
                    reactor.removeReader(selectable)
                    reactor.removeWriter(selectable)
            waker = getattr(reactor, "waker", None)
            if waker is not None:
                reactor.removeReader(waker)
                waker.connectionLost(None)
            reactor._poller.close()
        for s in self.sockets:
            s.close()


@pytest.fixture
def events() -> Any:
    if not _compat.LEAN_DISPATCH:
        pytest.skip("lean_dispatch is not available here")
    made = _Events()
    yield made
    made.close()


def _selectable(reactor: Any, sock: socket.socket, name: str, log: list[Any],
                on_read: Callable[[], Any] | None = None, prefix: Callable[[], str] | None = None,
                on_lost: Callable[[Any], None] | None = None, fd: int | None = None) -> Any:
    from twisted.internet.abstract import FileDescriptor

    class Reader(FileDescriptor):
        def fileno(self) -> int:
            return sock.fileno() if fd is None else fd

        def doRead(self) -> Any:
            log.append((name, "read"))
            return on_read() if on_read is not None else None

        def connectionLost(self, reason: Any) -> None:
            log.append((name, "lost", reason.type.__name__))
            if on_lost is not None:
                on_lost(reason)

        def logPrefix(self) -> str:
            return prefix() if prefix is not None else name
    return Reader(reactor)


def _capture_log() -> tuple[list[dict[str, Any]], Callable[[], None]]:
    from twisted.python import log
    logged: list[dict[str, Any]] = []
    log.addObserver(logged.append)
    return logged, lambda: log.removeObserver(logged.append)


def _errors(logged: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e.get("system"), e["failure"].type.__name__) for e in logged if e.get("isError")]


@pytest.mark.parametrize("lean", [False, True], ids=["stock", "lean"])
def test_a_selectable_removed_by_an_earlier_event_in_the_same_batch(events: _Events, lean: bool) -> None:
    reactor = events.reactor(lean)
    log: list[Any] = []
    (a, a_peer), (b, b_peer) = events.pair(), events.pair()
    readers: dict[str, Any] = {}

    def first_removes_other() -> None:
        other = readers["b"] if log[0][0] == "a" else readers["a"]
        reactor.removeReader(other)
    readers["a"] = _selectable(reactor, a, "a", log, first_removes_other)
    readers["b"] = _selectable(reactor, b, "b", log, first_removes_other)
    reactor.addReader(readers["a"])
    reactor.addReader(readers["b"])
    a_peer.send(b"x")
    b_peer.send(b"y")
    reactor.doIteration(0)
    assert len(log) == 1 and log[0][1] == "read"


@pytest.mark.parametrize("lean", [False, True], ids=["stock", "lean"])
def test_an_fd_reused_by_a_new_selectable_in_the_same_batch(events: _Events, lean: bool) -> None:
    reactor = events.reactor(lean)
    log: list[Any] = []
    (a, a_peer), (b, b_peer), (c, c_peer) = events.pair(), events.pair(), events.pair()
    readers: dict[str, Any] = {}
    sockets = {"a": a, "b": b}

    def replace_other() -> None:
        if len(log) != 1:
            return
        other = "b" if log[0][0] == "a" else "a"
        number = sockets[other].fileno()
        reactor.removeReader(readers[other])
        os.dup2(c.fileno(), number)  # the descriptor number now names c's socket
        readers["c"] = _selectable(reactor, c, "c", log, fd=number)
        reactor.addReader(readers["c"])
    readers["a"] = _selectable(reactor, a, "a", log, replace_other)
    readers["b"] = _selectable(reactor, b, "b", log, replace_other)
    reactor.addReader(readers["a"])
    reactor.addReader(readers["b"])
    a_peer.send(b"x")
    b_peer.send(b"y")
    reactor.doIteration(0)
    # The stale event of the replaced selectable's number goes to whatever holds that number
    # now (Twisted's behaviour, kept): c, which has nothing to read.
    assert log[0][0] in ("a", "b") and log[1:] == [("c", "read")]
    reactor.removeReader(readers["c"])


def _dispatch_run(events: _Events, lean: bool, raise_in_read: BaseException | None,
                  raise_in_lost: BaseException | None, prefix: Callable[[], str] | None) -> tuple[Any, ...]:
    reactor = events.reactor(lean)
    log: list[Any] = []
    a, a_peer = events.pair()

    def read() -> None:
        a.recv(10)
        if raise_in_read is not None:
            raise raise_in_read

    def lost(_: Any) -> None:
        if raise_in_lost is not None:
            raise raise_in_lost
    reader = _selectable(reactor, a, "reader", log, read, prefix, lost)
    reactor.addReader(reader)
    a_peer.send(b"x")
    logged, stop = _capture_log()
    escaped = None
    try:
        reactor.doIteration(0)
    except BaseException as e:  # noqa: BLE001 - what escapes is what is compared
        escaped = type(e).__name__
    finally:
        stop()
    if reader in reactor._selectables.values():
        reactor.removeReader(reader)
    return log, _errors(logged), escaped


def test_an_exception_in_do_read_is_logged_once_and_disconnects(events: _Events) -> None:
    stock = _dispatch_run(events, False, RuntimeError("boom"), None, None)
    lean = _dispatch_run(events, True, RuntimeError("boom"), None, None)
    assert stock[0] == lean[0] == [("reader", "read"), ("reader", "lost", "RuntimeError")]
    assert stock[2] is lean[2] is None
    # The one difference: Twisted logs it inside _doReadOrWrite, under the context that
    # callWithLogger set (the selectable's prefix); without that context the system is '-'.
    # The gateway's observers (logs.py) never show the legacy system key, so nothing visible.
    assert stock[1] == [("reader", "RuntimeError")]
    assert lean[1] == [("-", "RuntimeError")]


def test_an_exception_escaping_the_dispatch_is_logged_with_the_prefix(events: _Events) -> None:
    stock = _dispatch_run(events, False, RuntimeError("boom"), ValueError("lost"), None)
    lean = _dispatch_run(events, True, RuntimeError("boom"), ValueError("lost"), None)
    assert stock[0] == lean[0]
    assert stock[1][-1] == lean[1][-1] == ("reader", "ValueError")
    assert stock[2] is lean[2] is None


def test_a_buggy_log_prefix(events: _Events) -> None:
    def buggy() -> str:
        raise AttributeError("no prefix")
    # a dispatch that succeeds: the stock loop logs the buggy logPrefix, the lean one never asks
    stock = _dispatch_run(events, False, None, None, buggy)
    lean = _dispatch_run(events, True, None, None, buggy)
    assert stock[0] == lean[0] == [("reader", "read")]
    assert stock[1] == [("(buggy logPrefix method)", "AttributeError")] and lean[1] == []
    # a dispatch that fails: both log its exception under "(buggy logPrefix method)"; the
    # lean loop does not log logPrefix's own exception
    stock = _dispatch_run(events, False, RuntimeError("boom"), ValueError("lost"), buggy)
    lean = _dispatch_run(events, True, RuntimeError("boom"), ValueError("lost"), buggy)
    assert stock[1] == [("(buggy logPrefix method)", "AttributeError"), ("(buggy logPrefix method)", "RuntimeError"),
                        ("(buggy logPrefix method)", "ValueError")]
    assert lean[1] == [("-", "RuntimeError"), ("(buggy logPrefix method)", "ValueError")]
    assert stock[2] is lean[2] is None


def test_keyboard_interrupt_escaping_the_dispatch_propagates(events: _Events) -> None:
    stock = _dispatch_run(events, False, RuntimeError("boom"), KeyboardInterrupt(), None)
    lean = _dispatch_run(events, True, RuntimeError("boom"), KeyboardInterrupt(), None)
    assert stock[2] == lean[2] == "KeyboardInterrupt"
    assert stock[0] == lean[0]


def test_system_exit_escaping_the_dispatch_is_logged_as_before(events: _Events) -> None:
    stock = _dispatch_run(events, False, RuntimeError("boom"), SystemExit(3), None)
    lean = _dispatch_run(events, True, RuntimeError("boom"), SystemExit(3), None)
    assert stock[2] is lean[2] is None
    assert stock[1][-1] == lean[1][-1] == ("reader", "SystemExit")


def test_keyboard_interrupt_from_log_prefix_propagates(events: _Events) -> None:
    """callWithLogger lets a KeyboardInterrupt out of logPrefix (its `except KeyboardInterrupt:
    raise`); lean_dispatch asks logPrefix only after a failed dispatch, inside `except
    BaseException`, and so swallows it: a Ctrl-C that lands in logPrefix is lost."""
    def interrupted() -> str:
        raise KeyboardInterrupt()
    stock = _dispatch_run(events, False, RuntimeError("boom"), ValueError("lost"), interrupted)
    lean = _dispatch_run(events, True, RuntimeError("boom"), ValueError("lost"), interrupted)
    assert stock[2] == "KeyboardInterrupt"
    assert lean[2] == "KeyboardInterrupt", lean


def test_doiteration_with_nothing_ready_and_lean_twice(events: _Events) -> None:
    reactor = events.reactor(True)
    assert _compat.lean_dispatch(reactor)  # a second time: the same loop, not one around another
    reactor.doIteration(0)
    log: list[Any] = []
    a, a_peer = events.pair()
    reader = _selectable(reactor, a, "r", log, lambda: a.recv(10) and None)
    reactor.addReader(reader)
    a_peer.send(b"x")
    reactor.doIteration(0)
    assert log == [("r", "read")]
    reactor.removeReader(reader)
