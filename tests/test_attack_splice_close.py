"""
Attacks on commit 417d834: the splice closes a TCP side on the spot (twisted_gateway._compat
close_now / lose_write_now, TLSServerConnection.close_now) and pauses a side only once it sends
before the other side is there.

Everything runs over real sockets on a fresh EPollReactor (never installed, never run: driven
with runUntilCurrent + doIteration in loops bounded by a count and a deadline): the gateway side
is a real tcp.Port / tcp.Server, a real TLSServerConnection and a real Splice whose shard side
is a real tcp.Client from connectTCP.  The protocol on the accepted socket (L{Door}) does what
frontdoor.FrontDoor does for a splice route, without the routing (buffer the ClientHello record,
make and connect the Splice, start the TLS engine, feed it the socket's bytes, end-of-stream and
loss).  The peers are plain Python sockets: the shard a socket accepted from a listening socket,
the client a pyOpenSSL connection over memory BIOs whose records the test moves over a socket.

Each test asserts on the exact bytes each peer got, their order, how each direction ended
(close_notify, TCP FIN, reset) and that the gateway let go of every socket, each side's loss
coming back to the splice once, with nothing logged as an error.

Failing here (bugs found), the rest documents behaviour that holds:

- test_a_shard_reset_while_both_directions_are_held_back, test_a_client_reset_while_both_
  directions_are_held_back (also before 417d834): when one side is lost while the surviving
  side has it registered as a paused producer, Splice._finish does not unregister it (it
  unregisters only when both sides are still there); the survivor's doWrite, once its queue
  is written, resumes the dead producer instead of closing, and the survivor is left neither
  reading nor writing: no FIN to the peer, the socket never let go of, even after the peer
  closes.
- test_a_shard_that_closes_without_a_byte_before_the_handshake_ends (new in 417d834): a shard
  side is no longer paused at connect, so a shard's bare FIN is read before the client is
  there; _wire then resumes the shard side unconditionally, which starts reading the ended
  socket again, and the splice gets the shard's end (readConnectionLost) twice.
- test_close_now_inside_data_received_while_a_half_close_is_pending (latent in
  _compat.close_now, not reached through Splice): a transport with a plain
  loseWriteConnection() pending is registered for writing with an empty queue; close_now
  from inside its dataReceived closes it and the reactor's doWrite of the same poll event then
  runs on the closed transport (AttributeError, logged as an unhandled error).
"""

from __future__ import annotations

import collections
import fcntl
import os
import random
import socket
import struct
import tempfile
import termios
import time
from typing import Any, Callable

import pytest
from OpenSSL import SSL
from twisted.internet import error as terror
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_gateway import _compat
from twisted_gateway import splice as splice_module
from twisted_gateway.directory.model import Route, Shard, ShardPort
from twisted_gateway.splice import Splice
from twisted_gateway.tls import connection as tls_module
from twisted_gateway.tls.connection import TLSServerConnection
from twisted_gateway.tls.contexts import build_context
from twisted_gateway.tls.localca import LocalCA

pytestmark = pytest.mark.skipif(not _compat.CLOSE_NOW, reason="close_now falls back to loseConnection here")

NAME = "splice.test"


@pytest.fixture(scope="module")
def server_context() -> SSL.Context:
    """A context made as the gateway makes its own for a tcp route (no ALPN)."""
    ca = LocalCA(os.path.join(tempfile.mkdtemp(prefix="splice-attack-"), "ca"))
    return build_context(ca.issue((NAME,)), ())


class Paths(list):  # type: ignore[type-arg]
    """(call, transport type, done on the spot) per call; C{unsent}: for each close done on the
    spot, the bytes the kernel still had to send on that socket (TIOCOUTQ)."""
    unsent: list[tuple[str, int]]


def _kernel_unsent(t: Any) -> int:
    sock = getattr(t, "socket", None)
    if sock is None:
        return -1
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0])


@pytest.fixture
def close_paths(monkeypatch: pytest.MonkeyPatch) -> Paths:
    """Which close calls the splice and the TLS engine made, on what, and whether each was done
    on the spot (_compat._nothing_waits) or left to Twisted: observed only, then passed on."""
    seen = Paths()
    seen.unsent = []
    real_close, real_lose = _compat.close_now, _compat.lose_write_now

    def close_now(t: Any) -> None:
        now = _compat._nothing_waits(t)
        seen.append(("close_now", type(t).__name__, now))
        if now:
            seen.unsent.append((type(t).__name__, _kernel_unsent(t)))
        real_close(t)

    def lose_write_now(t: Any) -> None:
        seen.append(("lose_write_now", type(t).__name__,
                     _compat._nothing_waits(t) and not t._writeDisconnected))
        real_lose(t)

    for module in (splice_module, tls_module):
        monkeypatch.setattr(module, "close_now", close_now)
        monkeypatch.setattr(module, "lose_write_now", lose_write_now)
    return seen


# -- peers ----------------------------------------------------------------------------------------

class Peer:
    """A plain non-blocking socket: what is sent is queued and pushed as the socket takes it;
    what is read is kept (C{got}); C{eof} is "fin" or "rst" once the read side ended."""

    def __init__(self, sock: socket.socket, keep: bool = True) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self.out: collections.deque[memoryview] = collections.deque()
        self.queued = 0
        self.got = bytearray()
        self.keep = keep
        self.eof: str | None = None
        self.reading = True
        self.shut_when_sent = False
        self.shut = False
        self.closed = False
        self.send_error: str | None = None
        self.ready = True  # False until a deferred connect is made

    def send(self, data: bytes, shut: bool = False) -> None:
        if data:
            self.out.append(memoryview(data))
            self.queued += len(data)
        if shut:
            self.shut_when_sent = True
        self.pump_out()

    def pump_out(self) -> None:
        if self.closed or not self.ready:
            return
        while self.out:
            head = self.out[0]
            try:
                n = self.sock.send(head[:1 << 20])
            except BlockingIOError:
                return
            except OSError as e:  # the gateway has reset or closed this connection
                self.send_error = type(e).__name__
                self.out.clear()
                self.queued = 0
                return
            self.queued -= n
            if n == len(head):
                self.out.popleft()
            else:
                self.out[0] = head[n:]
        if self.shut_when_sent and not self.shut:
            self.shut = True
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def pump_in(self, limit: int = 8 << 20) -> bytes:
        if self.closed or self.eof or not self.reading:
            return b""
        chunks = []
        total = 0
        while total < limit:
            try:
                data = self.sock.recv(1 << 18)
            except BlockingIOError:
                break
            except ConnectionResetError:
                self.eof = "rst"
                break
            if not data:
                self.eof = "fin"
                break
            chunks.append(data)
            total += len(data)
        data = b"".join(chunks)
        if self.keep:
            self.got += data
        return data

    def reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()


class TLSClient:
    """A pyOpenSSL client over memory BIOs, its records moved over a plain socket (L{Peer}).
    C{plain} holds what it decrypted, C{ends} how the stream ended, in order ("close_notify",
    then "fin" or "rst"; a TLS error as ("tls_error", message))."""

    def __init__(self, port: int, rcvbuf: int | None = None, connect: bool = True) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock, self.port = sock, port
        self.peer = Peer(sock, keep=False)
        self.peer.ready = False
        self.started = False
        ctx = SSL.Context(SSL.TLS_METHOD)
        self.conn = SSL.Connection(ctx, None)
        self.conn.set_connect_state()
        self.conn.set_tlsext_host_name(NAME.encode())
        self.plain = bytearray()
        self.ends: list[Any] = []
        self.handshake_done = False
        self.auto_handshake = True
        try:
            self.conn.do_handshake()
        except SSL.WantReadError:
            pass
        self._flush()  # the ClientHello, sent once connected
        if connect:
            self.connect()

    def connect(self) -> None:
        """Connect; the ClientHello goes out at once."""
        self.sock.setblocking(True)
        self.sock.connect(("127.0.0.1", self.port))
        self.sock.setblocking(False)
        self.started = self.peer.ready = True
        self.peer.pump_out()

    def _flush(self) -> None:
        out = []
        while True:
            try:
                out.append(self.conn.bio_read(1 << 20))
            except SSL.WantReadError:
                break
        if out:
            self.peer.send(b"".join(out))

    def step(self) -> None:
        if not self.started:
            return
        self.peer.pump_out()
        data = self.peer.pump_in()
        if data:
            self.conn.bio_write(data)
        if not self.handshake_done and self.auto_handshake:
            try:
                self.conn.do_handshake()
                self.handshake_done = True
            except SSL.WantReadError:
                pass
            except SSL.Error as e:
                self._end(("tls_error", str(e)))
        if self.handshake_done and data:
            while True:
                try:
                    chunk = self.conn.recv(1 << 16)
                except SSL.WantReadError:
                    break
                except SSL.ZeroReturnError:
                    self._end("close_notify")
                    break
                except SSL.Error as e:
                    self._end(("tls_error", str(e)))
                    break
                self.plain += chunk
        self._flush()
        if self.peer.eof:
            self._end(self.peer.eof)

    def _end(self, what: Any) -> None:
        if what not in self.ends:
            self.ends.append(what)

    def send(self, data: bytes) -> None:
        self.conn.sendall(data)
        self._flush()

    def close_notify(self) -> None:
        try:
            self.conn.shutdown()
        except SSL.Error:
            pass
        self._flush()

    def tcp_half_close(self) -> None:
        """A TCP FIN without close_notify (a client that half-closes TCP directly)."""
        self.peer.send(b"", shut=True)


# -- the gateway side -------------------------------------------------------------------------------

class RecordingPoller:
    """The reactor's epoll object, the events of every poll kept (C{batches}).  With C{first}
    set, the events of those descriptors come first in the next batch, in that order (epoll
    may hand a batch over in any order; this picks one)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.batches: list[list[tuple[int, int]]] = []
        self.first: list[int] = []

    def poll(self, timeout: float = -1, maxevents: int = -1) -> list[tuple[int, int]]:
        events = self.real.poll(timeout, maxevents)
        if events and self.first:
            rank = {fd: i for i, fd in enumerate(self.first)}
            events = sorted(events, key=lambda e: rank.get(e[0], len(rank)))
            self.first = []
        if events:
            self.batches.append(list(events))
        return events

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class HeldConnector:
    def __init__(self, reactor: Any, args: tuple[Any, ...]) -> None:
        self.reactor, self.args = reactor, args
        self.real: Any = None
        self.stopped = False

    def release(self) -> None:
        if not self.stopped and self.real is None:
            host, port, factory, timeout, bind = self.args
            self.real = self.reactor.connectTCP(host, port, factory, timeout=timeout, bindAddress=bind)

    def stopConnecting(self) -> None:
        self.stopped = True
        if self.real is not None:
            self.real.stopConnecting()


class HeldConnects:
    """The reactor as a splice sees it, with its connectTCP held until the test releases it:
    a shard whose connect is slow, for as long as the test wants."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.held: list[HeldConnector] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def connectTCP(self, host: str, port: int, factory: Any, timeout: float = 30,
                   bindAddress: Any = None) -> HeldConnector:
        connector = HeldConnector(self._reactor, (host, port, factory, timeout, bindAddress))
        self.held.append(connector)
        return connector


@implementer(IHalfCloseableProtocol)
class Door(Protocol):
    """The accepted socket's protocol, as frontdoor.FrontDoor is for a splice route: the
    splice is made and connected once the ClientHello is in, then the TLS engine is started
    with it and takes over dataReceived."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.buffer = b""
        self.tls: TLSServerConnection | None = None
        self.splice: Splice | None = None
        self.lost: list[Failure] = []
        self.handshake_failures: list[str] = []
        self.upstream_failures: list[str] = []
        self.events: list[str] = []
        self.upstream: Any = None

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.gate.doors.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) < 5 or len(self.buffer) < 5 + struct.unpack(">H", self.buffer[3:5])[0]:
            return
        gate = self.gate
        sp = Splice(gate.route, gate.splice_reactor, 5.0, gate.idle, self.upstream_failures.append,
                    preamble=gate.preamble)
        self.splice = sp
        self._watch(sp)
        sp.connect()
        tls = TLSServerConnection(self.transport, SSL.Connection(gate.ctx, None), sp.client,
                                  lambda _: None, self._handshake_failed)
        self.tls = tls
        self.dataReceived = tls.raw_data_received  # type: ignore[method-assign]  # as FrontDoor does
        tls.start(self.buffer)

    def _watch(self, sp: Splice) -> None:
        """Record what reaches the splice (then pass it on unchanged)."""
        for name in ("client_eof", "upstream_eof", "client_lost", "upstream_lost", "upstream_connected"):
            real = getattr(sp, name)

            def wrapper(*args: Any, _real: Callable[..., None] = real, _name: str = name) -> None:
                self.events.append(_name)
                if _name == "upstream_connected":
                    self.upstream = args[0]
                    self.gate.upstreams.append(args[0])
                _real(*args)
            setattr(sp, name, wrapper)

    def _handshake_failed(self, tls: TLSServerConnection, reason: str, exc: Exception | None) -> None:
        self.handshake_failures.append(reason)
        assert self.splice is not None
        self.splice.client_lost(Failure(ConnectionError(reason)))

    def readConnectionLost(self) -> None:
        if self.tls is not None:
            self.tls.raw_read_connection_lost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost.append(reason)  # type: ignore[arg-type]
        if self.tls is not None:
            self.tls.raw_connection_lost(reason)


class _DoorFactory(Factory):
    noisy = False

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    def buildProtocol(self, addr: Any) -> Door:
        return Door(self.gate)


class Gate:
    """A fresh epoll reactor, a listener whose connections are spliced to C{shard_listener}."""

    def __init__(self, ctx: SSL.Context, *, idle: float = 60.0, hold_connect: bool = False,
                 preamble: bytes = b"", shard_port: int | None = None, lean: bool = False) -> None:
        self.ctx = ctx
        self.idle = idle
        self.preamble = preamble
        self.reactor = EPollReactor()
        if lean:
            assert _compat.lean_dispatch(self.reactor)
        self.poller = RecordingPoller(self.reactor._poller)
        self.reactor._poller = self.poller
        self.shard_listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.shard_listener.bind(("127.0.0.1", 0))
        self.shard_listener.listen(16)
        self.shard_listener.setblocking(False)
        port = shard_port or self.shard_listener.getsockname()[1]
        shard = Shard(id="s", task="t", hostname_label="db", address="127.0.0.1",
                      ports=(ShardPort(5432, "tcp", True, port),), primary=True)
        self.route = Route(shard, shard.ports[0])
        self.splice_reactor: Any = HeldConnects(self.reactor) if hold_connect else self.reactor
        self.doors: list[Door] = []
        self.upstreams: list[Any] = []
        self.clients: list[TLSClient] = []
        self.shards: list[Peer] = []
        self.others: list[Peer] = []
        self.auto_accept = True
        self.errors: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self._observe)
        self.port = self.reactor.listenTCP(0, _DoorFactory(self), interface="127.0.0.1")
        self.tls_port = self.port.getHost().port

    def _observe(self, event: dict[str, Any]) -> None:
        if event.get("isError") or event.get("log_failure") is not None or \
                event.get("log_level") in (LogLevel.error, LogLevel.critical):
            self.errors.append(event)

    # -- peers --

    def client(self, rcvbuf: int | None = None, connect: bool = True) -> TLSClient:
        c = TLSClient(self.tls_port, rcvbuf, connect)
        self.clients.append(c)
        return c

    def accept_shards(self) -> None:
        while self.auto_accept:
            try:
                sock, _ = self.shard_listener.accept()
            except BlockingIOError:
                return
            self.shards.append(Peer(sock))

    def pump(self) -> None:
        self.accept_shards()
        for c in self.clients:
            c.step()
        for s in self.shards + self.others:
            s.pump_out()
            s.pump_in()

    # -- driving --

    def iterate(self, timeout: float = 0.01) -> None:
        self.reactor.runUntilCurrent()
        self.reactor.doIteration(timeout)

    def run(self, cond: Callable[[], bool], what: str, iterations: int = 4000, seconds: float = 30.0) -> None:
        deadline = time.monotonic() + seconds
        for _ in range(iterations):
            self.pump()
            if cond():
                return
            if time.monotonic() > deadline:
                break
            self.iterate()
        self.pump()
        if not cond():
            raise AssertionError(f"timed out waiting for {what}; {self.describe()}")

    def settle(self, iterations: int = 20) -> None:
        for _ in range(iterations):
            self.pump()
            self.iterate(0.002)
        self.pump()

    def describe(self) -> str:
        parts = []
        for d in self.doors:
            sp = d.splice
            t = d.transport
            parts.append(
                f"door events={d.events} lost={len(d.lost)} tls_lost={getattr(d.tls, '_lost', None)} "
                f"tcp_connected={t.connected} disconnecting={t.disconnecting} "
                f"queue={len(t.dataBuffer) - t.offset + t._tempDataLen if hasattr(t, 'dataBuffer') else '?'} "
                f"producer={type(t.producer).__name__} producerPaused={t.producerPaused} "
                f"reading={t in self.reactor.getReaders()} writing={t in self.reactor.getWriters()}; "
                f"splice done={sp._done if sp else None}")
            u = d.upstream
            if u is not None:
                parts.append(
                    f"upstream connected={u.connected} disconnecting={u.disconnecting} "
                    f"queue={len(u.dataBuffer) - u.offset + u._tempDataLen} "
                    f"producer={type(u.producer).__name__} producerPaused={u.producerPaused} "
                    f"reading={u in self.reactor.getReaders()} writing={u in self.reactor.getWriters()}")
        for c in self.clients:
            parts.append(f"client plain={len(c.plain)} ends={c.ends} queued={c.peer.queued}")
        for s in self.shards:
            parts.append(f"shard got={len(s.got)} eof={s.eof} queued={s.queued}")
        return "; ".join(parts)

    # -- checks --

    def only_listener_left(self) -> bool:
        readers = set(self.reactor.getReaders()) - set(self.reactor._internalReaders)
        return readers == {self.port} and not self.reactor.getWriters()

    def check_clean(self, doors: list[Door] | None = None) -> None:
        """Every splice done; each side's loss came back to it once; every gateway socket
        let go of and unregistered; nothing logged as an error."""
        for d in doors if doors is not None else self.doors:
            assert d.splice is not None and d.splice._done, self.describe()
            assert len(d.lost) == 1, d.lost
            assert not hasattr(d.transport, "socket"), "the client's socket is still open"
            assert d.events.count("client_lost") <= 1 and d.events.count("upstream_lost") <= 1, d.events
            if d.upstream is not None:
                assert d.events.count("upstream_lost") == 1, d.events
                assert not hasattr(d.upstream, "socket"), "the shard's socket is still open"
        assert self.only_listener_left(), (self.reactor.getReaders(), self.reactor.getWriters())
        assert not self.errors, [e.get("log_format") or e for e in self.errors]

    def close(self) -> None:
        globalLogPublisher.removeObserver(self._observe)
        for call in self.reactor.getDelayedCalls():
            if call.active():
                call.cancel()
        for selectable in self.reactor.removeAll():
            sock = getattr(selectable, "socket", None)
            if sock is not None:
                sock.close()
        for t in [d.transport for d in self.doors] + self.upstreams:
            sock = getattr(t, "socket", None)
            if sock is not None:
                sock.close()
        for held in getattr(self.splice_reactor, "held", []):
            real = held.real
            if real is not None and getattr(real, "transport", None) is not None:
                sock = getattr(real.transport, "socket", None)
                if sock is not None:
                    sock.close()
        if hasattr(self.port, "socket"):
            self.port.socket.close()
        for p in [c.peer for c in self.clients] + self.shards + self.others:
            p.close()
        self.shard_listener.close()
        self.reactor.waker.connectionLost(None)
        self.poller.real.close()


@pytest.fixture
def gates(server_context: SSL.Context) -> Any:
    made: list[Gate] = []

    def make(**kw: Any) -> Gate:
        g = Gate(server_context, **kw)
        made.append(g)
        return g
    yield make
    for g in made:
        g.close()


def connected(g: Gate, client: TLSClient) -> Door:
    """Drive until the client's handshake is done and the shard has been accepted."""
    g.run(lambda: client.handshake_done and len(g.shards) >= len(g.clients)
          and g.doors and g.doors[-1].upstream is not None, "handshake and shard connection")
    g.run(lambda: g.doors[-1].splice is not None and g.doors[-1].splice.client_transport is not None,
          "the splice wired")
    return g.doors[-1]


def same(got: bytes | bytearray, want: bytes, what: str) -> None:
    if bytes(got) == want:
        return
    n = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    raise AssertionError(f"{what}: got {len(got)} bytes, want {len(want)}; first difference at {n}")


def blob(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


# -- the ordinary ends ------------------------------------------------------------------------------

@pytest.mark.parametrize("half_close", ["close_notify", "tcp_fin"])
def test_client_half_closes_then_reads_the_reply(gates: Any, close_paths: list[Any], half_close: str) -> None:
    g = gates()
    c = g.client()
    door = connected(g, c)
    shard = g.shards[0]
    c.send(b"request")
    g.run(lambda: bytes(shard.got) == b"request", "the request at the shard")
    c.close_notify() if half_close == "close_notify" else c.tcp_half_close()
    g.run(lambda: shard.eof is not None, "the client's half-close at the shard")
    assert shard.eof == "fin"
    assert door.events[-1] == "client_eof" and not door.splice._done
    shard.send(b"reply after the half-close", shut=True)
    g.run(lambda: len(c.ends) >= 2, "the reply and both ends at the client")
    assert bytes(c.plain) == b"reply after the half-close"
    assert c.ends == ["close_notify", "fin"]
    g.run(g.only_listener_left, "every socket let go of")
    g.check_clean()
    # the shard was half-closed on the spot, and both sides closed on the spot at the end
    assert ("lose_write_now", "Client", True) in close_paths
    assert ("close_now", "Client", True) in close_paths and ("close_now", "Server", True) in close_paths


@pytest.mark.parametrize("size", [64 * 1024, 1 << 20, 6 << 20])
@pytest.mark.parametrize("reader", ["late", "eager"])
def test_a_large_reply_and_the_shards_close_all_arrive(gates: Any, close_paths: list[Any], size: int,
                                                       reader: str) -> None:
    """The client half-closes, the shard answers with a large reply and closes at once (its last
    bytes and its FIN come together); a late client reads nothing until the splice is done or
    holds the shard back, so its socket queue is full when the splice ends."""
    g = gates()
    c = g.client(rcvbuf=32 * 1024)
    door = connected(g, c)
    shard = g.shards[0]
    c.send(b"GET everything")
    c.close_notify()
    g.run(lambda: shard.eof == "fin", "the request and its end at the shard")
    assert bytes(shard.got) == b"GET everything"
    reply = blob(size, size)
    if reader == "late":
        c.peer.reading = False
    shard.send(reply, shut=True)
    if reader == "late":
        g.run(lambda: door.splice._done or (door.upstream is not None and door.upstream.connected
                                            and door.upstream not in g.reactor.getReaders()),
              "the splice done or the shard held back")
        c.peer.reading = True
    g.run(lambda: len(c.ends) >= 2, "the whole reply at the client")
    same(c.plain, reply, "the reply")
    assert c.ends == ["close_notify", "fin"]
    assert door.splice.bytes_down == size
    if reader == "late" and size <= (1 << 20):
        # the splice ended before the client read a byte: the client's side was closed on the
        # spot (Twisted's queue empty) with the reply still in the kernel's send queue
        assert ("close_now", "Server", True) in close_paths
        assert dict(close_paths.unsent)["Server"] > 0, close_paths.unsent
    g.run(g.only_listener_left, "every socket let go of")
    g.check_clean()


# -- both ends at once ------------------------------------------------------------------------------

@pytest.mark.parametrize("first", ["client", "shard"])
@pytest.mark.parametrize("lean", [False, True], ids=["stock_dispatch", "lean_dispatch"])
def test_both_sides_close_in_one_epoll_batch(gates: Any, close_paths: list[Any], first: str, lean: bool) -> None:
    """The client's last bytes and close_notify and the shard's last bytes and FIN are read in
    one poll: the first event half-closes the other side, the second ends the splice and closes
    both on the spot, one of them inside its own readConnectionLost (or dataReceived)."""
    g = gates(lean=lean)
    c = g.client()
    door = connected(g, c)
    shard = g.shards[0]
    c.send(b"ping")
    g.run(lambda: bytes(shard.got) == b"ping", "ping at the shard")
    shard.send(b"pong")
    g.run(lambda: bytes(c.plain) == b"pong", "pong at the client")
    client_fd, shard_fd = door.transport.fileno(), door.upstream.fileno()

    def client_ends() -> None:
        c.send(b" last words")
        c.close_notify()
        c.peer.send(b"", shut=True)

    def shard_ends() -> None:
        shard.send(b" last reply", shut=True)

    for end in ((client_ends, shard_ends) if first == "client" else (shard_ends, client_ends)):
        end()
    want = [client_fd, shard_fd] if first == "client" else [shard_fd, client_fd]
    for _ in range(50):  # until both are ready at once: then one poll hands both over
        g.poller.first = want
        before = len(g.poller.batches)
        g.iterate(0.05)
        if len(g.poller.batches) > before:
            break
    batch = [fd for fd, _ in g.poller.batches[before]]
    assert [fd for fd in batch if fd in want] == want, (batch, want)
    g.run(lambda: shard.eof is not None and len(c.ends) >= 2, "both ends at both peers")
    assert bytes(shard.got) == b"ping last words" and shard.eof == "fin"
    assert bytes(c.plain) == b"pong last reply" and c.ends == ["close_notify", "fin"]
    g.run(g.only_listener_left, "every socket let go of")
    g.check_clean()


@pytest.mark.parametrize("first", ["client", "shard"])
@pytest.mark.parametrize("reader", ["late", "eager"])
def test_a_large_upload_reaches_the_shard_before_its_fin(gates: Any, close_paths: list[Any], first: str,
                                                          reader: str) -> None:
    """6 MiB up, then the client's close_notify: with the shard's side still writing, the
    half-close (client first) or the close (shard half-closed first) must come after the last
    byte."""
    g = gates()
    c = g.client()
    door = connected(g, c)
    shard = g.shards[0]
    if first == "shard":
        shard.send(b"shard done", shut=True)
        g.run(lambda: "close_notify" in c.ends, "the shard's half-close at the client")
    upload = blob(6 << 20, 6)
    if reader == "late":
        shard.reading = False
    c.send(upload)
    c.close_notify()
    if reader == "late":
        g.run(lambda: door.upstream.producerPaused and door.tls._paused, "the client held back by the shard")
        assert "client_eof" not in door.events
        shard.reading = True
    g.run(lambda: shard.eof is not None, "the upload's end at the shard")
    same(shard.got, upload, "the upload")
    assert shard.eof == "fin"
    if first == "client":
        assert not door.splice._done
        shard.send(b"shard done", shut=True)
    g.run(lambda: len(c.ends) >= 2, "the client's ends")
    assert bytes(c.plain) == b"shard done" and c.ends == ["close_notify", "fin"]
    g.run(g.only_listener_left, "every socket let go of")
    g.check_clean()


@pytest.mark.parametrize("wired", [True, False], ids=["shard_connected", "shard_connecting"])
def test_a_corrupt_record_from_the_client_ends_the_splice(gates: Any, close_paths: list[Any], wired: bool) -> None:
    """The TLS engine aborts the client's connection on a record that does not decrypt, and
    then tells its protocol nothing (raw_connection_lost returns early once the engine is
    lost): the splice ends through the producer link instead, the shard's side being the
    client's producer (stopProducing: loseConnection), at once or as soon as it connects."""
    g = gates(hold_connect=not wired)
    c = g.client()
    if wired:
        door = connected(g, c)
        shard = g.shards[0]
        c.send(b"fine")
        g.run(lambda: bytes(shard.got) == b"fine", "the first bytes at the shard")
    else:
        g.run(lambda: c.handshake_done and g.doors and g.doors[0].splice is not None
              and g.doors[0].splice.client_transport is not None, "the client's handshake")
        door = g.doors[0]
    c.peer.send(b"\x17\x03\x03\x00\x20" + b"\x55" * 32)  # application data that does not decrypt
    g.run(lambda: door.lost, "the client's connection aborted")
    assert door.tls._lost and c.ends and c.ends[-1] == "rst"
    if not wired:
        assert not door.splice._done, "the splice heard nothing"
        g.splice_reactor.held[0].release()
        g.run(lambda: g.shards, "the shard connected")
        shard = g.shards[0]
    g.run(lambda: shard.eof is not None, "the end at the shard", seconds=5)
    assert shard.eof == "fin" and bytes(shard.got) == (b"fine" if wired else b"")
    assert door.splice._done and "client_lost" not in door.events
    g.run(g.only_listener_left, "every socket let go of", seconds=5)
    g.check_clean()


# -- backpressure -----------------------------------------------------------------------------------

def test_a_slow_client_holds_the_shard_and_its_close_notify_does_not_end_the_splice_early(
        gates: Any, close_paths: list[Any]) -> None:
    """The shard sends far more than the client reads, then FIN; the client sends close_notify
    while still reading nothing: the shard is half-closed, the splice stays until the shard's
    bytes and FIN have gone through the paused producer, then all of it reaches the client."""
    g = gates()
    c = g.client(rcvbuf=32 * 1024)
    door = connected(g, c)
    shard = g.shards[0]
    c.peer.reading = False
    sent = bytearray()
    rng = random.Random(5)

    def top_up() -> bool:
        if shard.queued < (2 << 20) and len(sent) < (64 << 20):
            chunk = rng.randbytes(1 << 20)
            sent.extend(chunk)
            shard.send(chunk)
        server = door.transport
        return bool(server.producerPaused and door.upstream not in g.reactor.getReaders())
    g.run(top_up, "the shard held back by the slow client")
    shard.send(b"", shut=True)
    c.close_notify()
    g.run(lambda: shard.eof is not None, "the client's close_notify at the shard")
    assert shard.eof == "fin" and not door.splice._done and door.upstream.connected
    assert door.events.count("client_eof") == 1 and "upstream_eof" not in door.events
    c.peer.reading = True
    g.run(lambda: len(c.ends) >= 2, "everything at the client")
    same(c.plain, bytes(sent), "the shard's stream")
    assert c.ends == ["close_notify", "fin"]
    g.run(g.only_listener_left, "every socket let go of")
    g.check_clean()


# -- one side there before the other -----------------------------------------------------------------

@pytest.mark.parametrize("shard_fin", [False, True])
def test_a_shard_that_speaks_before_the_handshake_ends(gates: Any, close_paths: list[Any], shard_fin: bool) -> None:
    g = gates()
    c = g.client()
    c.auto_handshake = False  # the client sits on the server's flight: the handshake waits
    g.run(lambda: g.shards and g.doors and g.doors[0].upstream is not None, "the shard connected")
    door = g.doors[0]
    shard = g.shards[0]
    shard.send(b"220 greeting, ")
    g.run(lambda: door.splice._pending_down, "the greeting read")
    shard.send(b"second line, ")
    g.settle(10)
    shard.send(b"third line", shut=shard_fin)
    g.settle(10)
    assert door.splice._pending_down == [b"220 greeting, "], "at most one read is held"
    assert door.upstream not in g.reactor.getReaders() and door.upstream.connected
    assert "upstream_eof" not in door.events
    c.auto_handshake = True
    greeting = b"220 greeting, second line, third line"
    g.run(lambda: bytes(c.plain) == greeting and ("close_notify" in c.ends or not shard_fin),
          "the whole greeting at the client")
    if shard_fin:  # the shard's FIN is carried as close_notify and a TCP half-close
        g.run(lambda: c.ends == ["close_notify", "fin"], "the half-close at the client")
        assert not door.splice._done and door.transport.connected
    c.send(b"HELO")
    g.run(lambda: bytes(shard.got) == b"HELO", "the client's answer at the shard")
    c.close_notify()
    g.run(lambda: shard.eof is not None, "close_notify at the shard")
    if not shard_fin:
        shard.send(b" bye", shut=True)
    g.run(lambda: len(c.ends) >= 2, "the client's ends")
    assert bytes(c.plain) == greeting + (b"" if shard_fin else b" bye")
    assert c.ends == ["close_notify", "fin"] and shard.eof == "fin"
    g.run(g.only_listener_left, "every socket let go of")
    g.check_clean()


def test_a_shard_that_closes_without_a_byte_before_the_handshake_ends(gates: Any, close_paths: list[Any]) -> None:
    """The shard's FIN is read at once (the shard side is no longer paused at connect), before
    the client is there; the client then gets close_notify and a FIN, and can still send."""
    g = gates()
    c = g.client()
    c.auto_handshake = False
    g.run(lambda: g.shards and g.doors and g.doors[0].upstream is not None, "the shard connected")
    door = g.doors[0]
    shard = g.shards[0]
    shard.send(b"", shut=True)
    g.run(lambda: "upstream_eof" in door.events, "the shard's FIN read")
    c.auto_handshake = True
    g.run(lambda: c.ends == ["close_notify", "fin"], "the shard's end at the client")
    c.send(b"after the shard's FIN")
    g.run(lambda: bytes(shard.got) == b"after the shard's FIN", "the client's bytes at the shard")
    assert door.events.count("upstream_eof") == 1, (
        "the shard's end reached the splice twice: " + repr(door.events))
    c.close_notify()
    g.run(lambda: shard.eof is not None, "the client's end at the shard")
    g.run(g.only_listener_left, "every socket let go of")
    g.check_clean()


@pytest.mark.parametrize("ending", ["none", "close_notify", "tcp_fin", "close_notify_only"])
@pytest.mark.parametrize("preamble", [b"", b"PROXY-ish preamble|"], ids=["no_preamble", "preamble"])
def test_a_client_that_sends_several_reads_before_the_shard_connects(gates: Any, close_paths: list[Any],
                                                                     ending: str, preamble: bytes) -> None:
    g = gates(hold_connect=True, preamble=preamble)
    c = g.client()
    g.run(lambda: c.handshake_done and g.doors and g.doors[0].splice is not None
          and g.doors[0].splice.client_transport is not None, "the client's handshake")
    door = g.doors[0]
    sp = door.splice
    assert not door.tls._paused, "a client that has sent nothing is not paused"
    expected = b""
    if ending != "close_notify_only":
        c.send(b"one,")
        g.run(lambda: b"one," in sp._pending, "the first read held")
        assert door.tls._paused and door.transport not in g.reactor.getReaders()
        for word in (b"two,", b"three"):
            c.send(word)
            g.settle(8)
        expected = b"one,two,three"
    if ending in ("close_notify", "close_notify_only"):
        c.close_notify()
    elif ending == "tcp_fin":
        c.tcp_half_close()
    g.settle(8)
    assert sp._pending == ([preamble] if preamble else []) + ([b"one,"] if expected else []), \
        "at most one read is buffered"
    if ending == "close_notify_only":
        assert door.events == ["client_eof"], door.events
    g.splice_reactor.held[0].release()
    g.run(lambda: bytes(g.shards[0].got) == preamble + expected
          and (ending == "none" or g.shards[0].eof is not None)
          if g.shards else False, "everything at the shard, in order")
    shard = g.shards[0]
    if ending != "none":
        assert shard.eof == "fin"
    shard.send(b"ok", shut=True)
    g.run(lambda: bytes(c.plain) == b"ok" and "close_notify" in c.ends, "the answer at the client")
    if ending == "none":
        assert not sp._done
        c.close_notify()
        g.run(lambda: shard.eof is not None, "the client's end at the shard")
    g.run(lambda: len(c.ends) >= 2, "the client's ends")
    assert c.ends == ["close_notify", "fin"]
    assert bytes(shard.got) == preamble + expected
    g.run(g.only_listener_left, "every socket let go of")
    g.check_clean()


# -- resets mid-transfer ------------------------------------------------------------------------------

def test_a_client_reset_mid_download(gates: Any, close_paths: list[Any]) -> None:
    g = gates()
    c = g.client()
    door = connected(g, c)
    shard = g.shards[0]
    shard.send(blob(4 << 20, 1))
    g.run(lambda: len(c.plain) >= (1 << 20), "a first MiB at the client")
    c.peer.reset()
    g.run(lambda: shard.eof is not None or shard.send_error is not None, "the end at the shard")
    g.run(g.only_listener_left, "every socket let go of")
    g.check_clean()
    assert door.events.count("client_lost") == 1


def test_a_shard_reset_mid_download_reaches_the_client_with_every_byte_read(gates: Any, close_paths: list[Any]) -> None:
    g = gates()
    c = g.client()
    door = connected(g, c)
    shard = g.shards[0]
    reply = blob(4 << 20, 2)
    shard.send(reply)
    g.run(lambda: door.splice.bytes_down >= (1 << 20), "a first MiB through the splice")
    shard.reset()
    g.run(lambda: len(c.ends) >= 2, "the client's ends")
    read = door.splice.bytes_down
    same(c.plain, reply[:read], "what the splice read from the shard")
    assert c.ends == ["close_notify", "fin"]
    c.peer.close()  # the client had not ended its side: the gateway lingers until its FIN
    g.run(g.only_listener_left, "every socket let go of")
    g.check_clean()


def _hold_both_directions(g: Gate, c: TLSClient, door: Door, shard: Peer) -> tuple[bytearray, bytearray]:
    """Neither peer reads; each sends until the gateway holds each side back: the client's
    socket has more queued than its bufferSize (so it paused the shard's side) and the shard's
    has too (so it paused the client's), both with bytes waiting to be written."""
    c.peer.reading = False
    shard.reading = False
    down, up = bytearray(), bytearray()
    rng = random.Random(9)

    def top_up() -> bool:
        if shard.queued < (2 << 20) and len(down) < (64 << 20):
            chunk = rng.randbytes(1 << 20)
            down.extend(chunk)
            shard.send(chunk)
        if c.peer.queued < (2 << 20) and len(up) < (64 << 20):
            chunk = rng.randbytes(1 << 20)
            up.extend(chunk)
            c.send(chunk)
        server, client = door.transport, door.upstream
        writers = g.reactor.getWriters()
        return bool(server.producerPaused and client.producerPaused and server in writers and client in writers)
    g.run(top_up, "both directions held back")
    return down, up


def test_a_shard_reset_while_both_directions_are_held_back(gates: Any, close_paths: list[Any]) -> None:
    """The client reads slowly (the shard's side is paused) and uploads faster than the shard
    reads (the client's side is paused); the shard then resets.  The client must still get
    every byte the splice read, the close_notify, and then the end of the TCP connection."""
    g = gates()
    c = g.client(rcvbuf=32 * 1024)
    door = connected(g, c)
    shard = g.shards[0]
    down, _ = _hold_both_directions(g, c, door, shard)
    shard.reset()
    g.run(lambda: "upstream_lost" in door.events, "the shard's reset seen")
    c.peer.reading = True
    g.run(lambda: "close_notify" in c.ends, "everything and the close_notify at the client")
    same(c.plain, bytes(down[:door.splice.bytes_down]), "what the splice read from the shard")
    g.run(lambda: len(c.ends) >= 2, "the TCP end after the close_notify", seconds=5)
    assert c.ends == ["close_notify", "fin"]
    c.peer.close()  # the client still had bytes on their way: the gateway lingered, reading them
    g.run(g.only_listener_left, "every socket let go of", seconds=5)
    g.check_clean()


def test_a_client_reset_while_both_directions_are_held_back(gates: Any, close_paths: list[Any]) -> None:
    """As above, the client resets instead: the shard must still get every byte the splice
    took from the client, then a FIN."""
    g = gates()
    c = g.client(rcvbuf=32 * 1024)
    door = connected(g, c)
    shard = g.shards[0]
    _, up = _hold_both_directions(g, c, door, shard)
    c.peer.reset()
    g.run(lambda: "client_lost" in door.events, "the client's reset seen")
    taken = door.splice.bytes_up
    shard.reading = True
    g.run(lambda: len(shard.got) >= taken, "every byte the splice took at the shard")
    same(shard.got, bytes(up[:taken]), "what the splice took from the client")
    g.run(lambda: shard.eof is not None, "the end of the shard's connection", seconds=5)
    assert shard.eof == "fin"
    g.run(g.only_listener_left, "every socket let go of", seconds=5)
    g.check_clean()


# -- timers, failures, aborts --------------------------------------------------------------------------

def test_the_idle_timeout_closes_both_on_the_spot_and_a_second_finish_does_nothing(
        gates: Any, close_paths: list[Any]) -> None:
    g = gates(idle=0.2)
    c = g.client()
    door = connected(g, c)
    shard = g.shards[0]
    c.send(b"x")
    g.run(lambda: bytes(shard.got) == b"x", "x at the shard")
    g.run(lambda: door.splice._done, "the idle timeout", seconds=10)
    g.run(lambda: shard.eof is not None and len(c.ends) >= 2, "both ends", seconds=5)
    assert c.ends == ["close_notify", "fin"] and shard.eof == "fin"
    # An idle client (nothing of its unread, reading not paused) is closed on the spot, as the
    # shard is; one still sending would get a lingering close (the tests below).
    assert ("close_now", "Server", True) in close_paths and ("close_now", "Client", True) in close_paths
    assert door.events.count("client_lost") == 1
    door.splice._finish()
    door.splice._finish()
    door.tls.close_now()
    g.settle(5)
    g.check_clean()


def test_tls_close_now_twice(gates: Any, close_paths: list[Any]) -> None:
    g = gates()
    c = g.client()
    door = connected(g, c)
    shard = g.shards[0]
    shard.send(b"data before the close")
    g.run(lambda: bytes(c.plain) == b"data before the close", "the data at the client")
    door.tls.close_now()
    door.tls.close_now()
    assert door.events.count("client_lost") == 1 and door.splice._done  # idle: closed on the spot
    g.run(lambda: shard.eof is not None and len(c.ends) >= 2, "both ends")
    assert c.ends == ["close_notify", "fin"] and shard.eof == "fin"
    g.check_clean()


def test_tls_close_now_lingers_while_the_client_has_bytes_unread(gates: Any, close_paths: list[Any]) -> None:
    g = gates()
    c = g.client()
    door = connected(g, c)
    shard = g.shards[0]
    shard.send(b"data before the close")
    g.run(lambda: bytes(c.plain) == b"data before the close", "the data at the client")
    door.tls.pauseProducing()  # the gateway stopped reading; the client goes on sending
    c.send(b"unread" * 1000)
    g.settle(5)
    door.tls.close_now()
    door.tls.close_now()
    g.run(lambda: len(c.ends) >= 2, "the client's ends")
    assert c.ends == ["close_notify", "fin"] and bytes(c.plain) == b"data before the close"
    assert door.events.count("client_lost") == 0, "a client with bytes unread gets a lingering close"
    c.peer.close()
    g.run(lambda: door.events.count("client_lost") == 1 and door.splice._done, "the client's FIN ends it", seconds=5)
    g.run(lambda: shard.eof is not None, "the shard's end")
    assert shard.eof == "fin"
    g.check_clean()


def test_a_refused_shard_while_the_client_is_held(gates: Any, close_paths: list[Any]) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: refused
    g = gates(hold_connect=True, shard_port=port)
    c = g.client()
    g.run(lambda: c.handshake_done and g.doors and g.doors[0].splice is not None
          and g.doors[0].splice.client_transport is not None, "the client's handshake")
    door = g.doors[0]
    c.send(b"early")
    g.run(lambda: door.splice._pending == [b"early"], "early bytes held")
    g.splice_reactor.held[0].release()
    g.run(lambda: door.splice._done, "the refusal")
    assert door.upstream_failures == ["refused"] and door.splice.failure_reason == "refused"
    g.run(lambda: len(c.ends) >= 2, "the client's ends")
    assert c.ends == ["close_notify", "fin"] and bytes(c.plain) == b""
    c.peer.close()
    g.run(lambda: door.events.count("client_lost") == 1, "the client's FIN ends the linger", seconds=5)
    g.check_clean()


def test_the_client_resets_during_its_handshake_while_the_shard_greets(gates: Any, close_paths: list[Any]) -> None:
    g = gates()
    c = g.client()
    c.auto_handshake = False
    g.run(lambda: g.shards and g.doors and g.doors[0].upstream is not None, "the shard connected")
    door = g.doors[0]
    shard = g.shards[0]
    shard.send(b"greeting")
    g.run(lambda: door.splice._pending_down == [b"greeting"], "the greeting held")
    c.peer.reset()
    g.run(lambda: shard.eof is not None, "the end at the shard")
    assert shard.eof == "fin" and door.handshake_failures == ["client_closed"]
    assert door.events == ["upstream_connected", "client_lost", "upstream_lost"]
    assert ("close_now", "Client", True) in close_paths  # the paused shard side closed on the spot
    g.check_clean()


# -- descriptor reuse inside one poll -------------------------------------------------------------------

@pytest.mark.parametrize("lean", [False, True], ids=["stock_dispatch", "lean_dispatch"])
def test_a_descriptor_closed_on_the_spot_and_reused_within_the_same_poll(gates: Any, close_paths: list[Any],
                                                                         lean: bool) -> None:
    """One poll: the shard's FIN ends a splice whose client had sent close_notify, so the
    client's socket is closed on the spot; the listener's accept in the same poll gets that
    descriptor number back; then the client's own (now stale) event of that poll, its TCP FIN,
    is dispatched to the new connection.  The new connection must be unharmed."""
    g = gates(lean=lean)
    c1 = g.client()
    door1 = connected(g, c1)
    shard1 = g.shards[0]
    c1.close_notify()
    g.run(lambda: shard1.eof == "fin" and "client_eof" in door1.events, "the first client's close_notify")
    client_fd, shard_fd = door1.transport.fileno(), door1.upstream.fileno()
    assert client_fd < shard_fd
    c2 = g.client(connect=False)
    g.auto_accept = False
    filler: list[int] = []
    try:
        while True:  # take every free descriptor below the client's: the next one made is its number
            fd = os.open(os.devnull, os.O_RDONLY)
            if fd > client_fd:
                os.close(fd)
                break
            filler.append(fd)
        shard1.send(b"", shut=True)                  # the shard's FIN: ends the splice
        c2.connect()                                 # the listener's accept
        c1.peer.send(b"", shut=True)                 # the first client's TCP FIN: stale once closed
        g.poller.first = [shard_fd, g.port.fileno(), client_fd]
        before = len(g.poller.batches)
        g.iterate(0.05)
        batch = [fd for fd, _ in g.poller.batches[before]]
        assert batch[:3] == [shard_fd, g.port.fileno(), client_fd], batch
        door2 = g.doors[-1]
        assert door2 is not door1 and door2.transport.fileno() == client_fd, "the number was not reused"
    finally:
        for fd in filler:
            os.close(fd)
    g.auto_accept = True
    g.run(lambda: c2.handshake_done and len(g.shards) == 2 and door2.upstream is not None, "the second connection")
    shard2 = g.shards[1]
    c2.send(b"second")
    g.run(lambda: bytes(shard2.got) == b"second", "the second client's bytes")
    shard2.send(b"answer", shut=True)
    g.run(lambda: bytes(c2.plain) == b"answer" and "close_notify" in c2.ends, "the second answer")
    c2.close_notify()
    g.run(lambda: len(c2.ends) >= 2 and len(c1.ends) >= 2, "every end")
    assert c1.ends == ["close_notify", "fin"]
    g.run(g.only_listener_left, "every socket let go of")
    g.check_clean()


# -- close_now and lose_write_now on a real tcp.Server ------------------------------------------------

@implementer(IHalfCloseableProtocol)
class Ends(Protocol):
    """Records how its connection ended; optional hooks run inside its callbacks."""

    def __init__(self) -> None:
        self.data = b""
        self.lost: list[Failure] = []
        self.read_lost = 0
        self.write_lost = 0
        self.on_data: Callable[[Ends], None] | None = None
        self.on_read_lost: Callable[[Ends], None] | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.on_data is not None:
            self.on_data(self)

    def readConnectionLost(self) -> None:
        self.read_lost += 1
        if self.on_read_lost is not None:
            self.on_read_lost(self)

    def writeConnectionLost(self) -> None:
        self.write_lost += 1

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost.append(reason)


class TCPPair:
    """A real tcp.Server with an L{Ends} protocol on a fresh epoll reactor, a plain socket as
    its peer."""

    def __init__(self) -> None:
        self.reactor = EPollReactor()
        self.protocols: list[Ends] = []
        self.errors: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self._observe)
        factory = Factory()
        factory.noisy = False
        factory.buildProtocol = lambda addr: self._made()  # type: ignore[method-assign]
        self.port = self.reactor.listenTCP(0, factory, interface="127.0.0.1")
        sock = socket.create_connection(("127.0.0.1", self.port.getHost().port))
        self.peer = Peer(sock)
        self.run(lambda: self.protocols, "the accept")
        self.ends = self.protocols[0]
        self.transport = self.ends.transport

    def _made(self) -> Ends:
        e = Ends()
        self.protocols.append(e)
        return e

    def _observe(self, event: dict[str, Any]) -> None:
        if event.get("isError") or event.get("log_failure") is not None:
            self.errors.append(event)

    def run(self, cond: Callable[[], Any], what: str, iterations: int = 2000) -> None:
        for _ in range(iterations):
            self.peer.pump_out()
            self.peer.pump_in()
            if cond():
                return
            self.reactor.runUntilCurrent()
            self.reactor.doIteration(0.01)
        raise AssertionError(f"timed out waiting for {what}")

    def close(self) -> None:
        globalLogPublisher.removeObserver(self._observe)
        for call in self.reactor.getDelayedCalls():
            if call.active():
                call.cancel()
        for selectable in self.reactor.removeAll():
            sock = getattr(selectable, "socket", None)
            if sock is not None:
                sock.close()
        sock = getattr(self.transport, "socket", None)
        if sock is not None:
            sock.close()
        self.peer.close()
        self.reactor.waker.connectionLost(None)
        self.reactor._poller.close()


@pytest.fixture
def pair() -> Any:
    p = TCPPair()
    yield p
    p.close()


def test_close_now_twice(pair: TCPPair) -> None:
    _compat.close_now(pair.transport)
    assert len(pair.ends.lost) == 1 and pair.ends.lost[0].check(terror.ConnectionDone)
    _compat.close_now(pair.transport)
    pair.run(lambda: pair.peer.eof, "the end at the peer")
    assert pair.peer.eof == "fin" and len(pair.ends.lost) == 1
    assert pair.transport not in pair.reactor.getReaders() and pair.transport not in pair.reactor.getWriters()
    assert not pair.errors


def test_close_now_on_an_aborted_transport(pair: TCPPair) -> None:
    pair.transport.write(b"dropped by the abort")
    pair.transport.abortConnection()
    _compat.close_now(pair.transport)
    _compat.lose_write_now(pair.transport)
    assert not pair.ends.lost and not pair.ends.write_lost, "nothing on the spot after an abort"
    pair.run(lambda: pair.ends.lost and pair.peer.eof, "the abort")
    assert len(pair.ends.lost) == 1 and pair.ends.lost[0].check(terror.ConnectionAborted)
    assert pair.peer.eof == "rst" and bytes(pair.peer.got) == b""
    _compat.close_now(pair.transport)
    assert len(pair.ends.lost) == 1 and not pair.errors


def test_close_now_with_bytes_queued_writes_them_first(pair: TCPPair) -> None:
    pair.peer.reading = False
    data = blob(8 << 20, 3)
    _compat.write_now(pair.transport, data)
    assert pair.transport.dataBuffer or pair.transport._tempDataLen, "the socket took it all"
    _compat.close_now(pair.transport)
    assert not pair.ends.lost and pair.transport.disconnecting
    pair.peer.reading = True
    pair.run(lambda: pair.peer.eof, "the end at the peer")
    same(pair.peer.got, data, "the queued bytes")
    assert pair.peer.eof == "fin" and len(pair.ends.lost) == 1 and not pair.errors


def test_lose_write_now_then_read_then_close_now(pair: TCPPair) -> None:
    _compat.lose_write_now(pair.transport)
    assert pair.ends.write_lost == 1 and not pair.ends.lost
    pair.run(lambda: pair.peer.eof, "the FIN at the peer")
    pair.peer.send(b"still readable")
    pair.run(lambda: pair.ends.data == b"still readable", "the peer's bytes after the half-close")
    pair.peer.send(b"", shut=True)
    pair.run(lambda: pair.ends.read_lost, "the peer's FIN")
    _compat.close_now(pair.transport)
    assert len(pair.ends.lost) == 1 and pair.ends.write_lost == 1 and not pair.errors
    assert pair.ends.lost[0].check(terror.ConnectionDone)


@pytest.mark.parametrize("how", ["twisted", "lose_write_now"])
def test_a_second_half_close_ends_like_twisteds_own(how: str) -> None:
    """A second half-close once the first is done: Twisted's loseWriteConnection registers for
    writing again and its doWrite's empty send on the shut socket fails (EPIPE), which loses
    the connection; lose_write_now falls back to it and does the same (the splice and the TLS
    engine never half-close a side twice)."""
    p = TCPPair()
    try:
        half_close = p.transport.loseWriteConnection if how == "twisted" else (
            lambda: _compat.lose_write_now(p.transport))
        half_close()
        p.run(lambda: p.peer.eof, "the FIN at the peer")
        assert p.ends.write_lost == 1 and not p.ends.lost
        half_close()
        p.run(lambda: p.ends.lost, "the second half-close's end")
        assert p.ends.lost[0].check(terror.ConnectionLost) and p.ends.write_lost == 1
    finally:
        p.close()


def test_lose_write_now_with_bytes_queued_sends_them_before_the_fin(pair: TCPPair) -> None:
    pair.peer.reading = False
    data = blob(8 << 20, 4)
    _compat.write_now(pair.transport, data)
    _compat.lose_write_now(pair.transport)
    assert pair.ends.write_lost == 0, "half-closed before the queue was written"
    pair.peer.reading = True
    pair.run(lambda: pair.peer.eof, "the FIN at the peer")
    same(pair.peer.got, data, "the queued bytes")
    assert pair.ends.write_lost == 1 and not pair.ends.lost and not pair.errors


def test_close_now_inside_its_own_callbacks(pair: TCPPair) -> None:
    """Half-closed from inside dataReceived, closed from inside readConnectionLost: both on the
    spot, inside the reactor's own dispatch of that very descriptor."""
    pair.ends.on_data = lambda e: _compat.lose_write_now(e.transport)
    pair.ends.on_read_lost = lambda e: _compat.close_now(e.transport)
    pair.peer.send(b"ping")
    pair.run(lambda: pair.peer.eof, "the FIN at the peer")
    assert pair.ends.write_lost == 1 and not pair.ends.lost
    pair.peer.send(b"", shut=True)
    pair.run(lambda: pair.ends.lost, "the close")
    pair.reactor.doIteration(0.01)
    assert len(pair.ends.lost) == 1 and pair.ends.read_lost == 1 and not pair.errors
    assert pair.transport not in pair.reactor.getReaders() and pair.transport not in pair.reactor.getWriters()


def test_close_now_inside_data_received_while_a_half_close_is_pending(pair: TCPPair) -> None:
    """A transport asked for a plain loseWriteConnection() with nothing queued is registered for
    writing; in the next poll its read and write events come together, and close_now from
    inside dataReceived closes it before the reactor's doWrite runs on it."""
    pair.transport.loseWriteConnection()
    pair.ends.on_data = lambda e: _compat.close_now(e.transport)
    pair.peer.send(b"ping")
    pair.run(lambda: pair.ends.lost, "the close")
    pair.run(lambda: pair.peer.eof, "the end at the peer")
    assert len(pair.ends.lost) == 1
    assert not pair.errors, [e.get("log_failure") for e in pair.errors]


def test_a_lingering_close_ends_by_itself_when_the_client_never_closes(gates: Any, close_paths: list[Any]) -> None:
    """The shard ends first and the client keeps sending, never closing: what it sends is read
    and dropped, and the connection is cut once the linger (bounded by the idle timeout) is over."""
    g = gates(idle=0.3)
    c = g.client()
    door = connected(g, c)
    shard = g.shards[0]
    shard.send(b"last words")
    shard.close()
    g.run(lambda: len(c.ends) >= 2, "the client's ends")
    assert bytes(c.plain) == b"last words" and c.ends == ["close_notify", "fin"]
    for _ in range(20):
        c.send(b"more and more" * 100)  # read and dropped: nothing reaches anyone
        g.iterate()
    g.run(lambda: door.events.count("client_lost") == 1, "the linger's end", seconds=5)
    assert bytes(shard.got) == b""
    g.check_clean()
