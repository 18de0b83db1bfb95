"""
The compatibility seam (twisted_gateway/_compat.py) against the installed Twisted, pyOpenSSL
and cryptography: every private name the gateway relies on is still there and still behaves
as the gateway expects, and no module outside the seam reaches for one.

A failure names the private name and the library versions, and says what the gateway does
without it (the fallback that is then in force).
"""

from __future__ import annotations

import ast
import os
import signal
import socket
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport

from twisted_gateway import _compat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", sorted(_compat.NAMES))
def test_private_name_is_present(name: str) -> None:
    entry = _compat.NAMES[name]
    assert entry.present, entry.problem()


def _require(name: str) -> None:
    """Skip a behaviour test whose name is gone: test_private_name_is_present reports it."""
    if not _compat.NAMES[name].present:
        pytest.skip(_compat.NAMES[name].problem())


def _check(condition: bool, name: str, what: str) -> None:
    entry = _compat.NAMES[name]
    versions = ", ".join(f"{lib} {_compat.library_version(lib)}" for lib in entry.libraries)
    assert condition, (f"{name} is there in {versions} but has changed: {what}; the gateway "
                       f"uses it for {entry.used_for}")


# -- behaviour, with real objects -----------------------------------------------------------------

def test_write_now_sends_at_once_only_into_an_empty_tcp_queue() -> None:
    from twisted.internet import tcp
    from twisted.internet.protocol import Protocol
    name = "twisted.internet.abstract.FileDescriptor._tempDataLen"
    _require(name)
    a, b = socket.socketpair()
    try:
        transport = tcp.Server(a, Protocol(), ("127.0.0.1", 1), None, 0, MemoryReactorClock())
        b.settimeout(5)
        _compat.write_now(transport, b"first")
        _check(b.recv(100) == b"first", name, "an empty queue did not send at once")
        transport.write(b"queued")  # waits for the reactor, which is not running
        _check(transport._tempDataLen == len(b"queued"), name,
               "transport.write no longer counts what it queues in _tempDataLen")
        _compat.write_now(transport, b"after")
        b.settimeout(0.05)
        with pytest.raises(socket.timeout):
            b.recv(100)  # nothing jumped the queue
        transport.doWrite()  # what the reactor does once writable
        b.settimeout(5)
        _check(b.recv(100) == b"queuedafter", name, "the queue was not kept in order")
        _check(transport.offset == len(transport.dataBuffer) and not transport._tempDataLen,
               "twisted.internet.abstract.FileDescriptor.dataBuffer",
               "an emptied queue does not show as offset == len(dataBuffer)")
    finally:
        a.close()
        b.close()


def test_write_now_sends_nothing_on_an_aborted_connection() -> None:
    # Twisted drops what is written after abortConnection (its doWrite is gone); a direct send
    # must not slip it out either.
    from twisted.internet import tcp
    from twisted.internet.protocol import Protocol
    name = "twisted.internet.tcp.Connection._aborting"
    _require(name)
    a, b = socket.socketpair()
    try:
        transport = tcp.Server(a, Protocol(), ("127.0.0.1", 1), None, 0, MemoryReactorClock())
        transport.abortConnection()
        _compat.write_now(transport, b"after the abort")
        _compat.close_now(transport)
        b.settimeout(0.05)
        with pytest.raises(socket.timeout):
            b.recv(100)
    finally:
        a.close()
        b.close()


class _Ends(object):
    """A protocol that records how its TCP connection ended."""

    def __init__(self) -> None:
        self.lost: list[Any] = []
        self.write_lost = 0

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport

    def connectionLost(self, reason: Any) -> None:
        self.lost.append(reason)

    def writeConnectionLost(self) -> None:
        self.write_lost += 1

    def readConnectionLost(self) -> None:
        pass


def _tcp_pair() -> tuple[Any, Any, socket.socket, Any]:
    from twisted.internet import tcp
    from zope.interface import directlyProvides
    from twisted.internet.interfaces import IHalfCloseableProtocol
    a, b = socket.socketpair()
    reactor = MemoryReactorClock()
    ends = _Ends()
    directlyProvides(ends, IHalfCloseableProtocol)
    transport = tcp.Server(a, ends, ("127.0.0.1", 1), None, 0, reactor)  # type: ignore[arg-type]
    ends.makeConnection(transport)
    transport.startReading()
    return transport, ends, b, reactor


def test_close_now_closes_an_idle_tcp_connection_at_once_and_a_busy_one_after_its_queue() -> None:
    name = "twisted.internet.abstract.FileDescriptor._postLoseConnection"
    _require(name)
    transport, ends, peer, reactor = _tcp_pair()
    try:
        _compat.close_now(transport)
        _check(len(ends.lost) == 1 and not transport.connected, name,
               "an idle connection was not closed at once")
        _check(transport not in reactor.getReaders() and transport not in reactor.getWriters(), name,
               "a closed connection is still registered with the reactor")
        peer.settimeout(5)
        _check(peer.recv(10) == b"", name, "the peer did not see the connection end")
        _compat.close_now(transport)  # twice: nothing more happens
        assert len(ends.lost) == 1
    finally:
        peer.close()
    transport, ends, peer, reactor = _tcp_pair()
    try:
        transport.write(b"queued")  # waits for the reactor's next pass
        _compat.close_now(transport)
        _check(not ends.lost and transport.disconnecting, name,
               "a connection with bytes queued was closed before writing them")
        why = transport.doWrite()  # the reactor's pass: write, then say the connection is done
        if why:
            from twisted.python.failure import Failure
            transport.connectionLost(Failure(why))  # as the reactor's _disconnectSelectable does
        _check(len(ends.lost) == 1, name, "the queued connection did not close once written")
        peer.settimeout(5)
        _check(peer.recv(100) == b"queued", name, "the queued bytes were lost")
    finally:
        peer.close()


def test_lose_write_now_half_closes_at_once() -> None:
    name = "twisted.internet.abstract.FileDescriptor._closeWriteConnection"
    _require(name)
    transport, ends, peer, reactor = _tcp_pair()
    try:
        _compat.lose_write_now(transport)
        _check(ends.write_lost == 1 and transport.connected and not ends.lost, name,
               "the write side was not shut at once, or the connection was closed")
        peer.settimeout(5)
        _check(peer.recv(10) == b"", name, "the peer did not see the FIN")
        peer.send(b"still read")
        _check(transport not in reactor.getWriters(), name, "a half-close left the connection writing")
        _compat.lose_write_now(transport)  # twice: nothing more happens
        assert ends.write_lost == 1
    finally:
        peer.close()
        transport.connectionLost(_compat._CONNECTION_DONE)


def test_memory_bio_sizes() -> None:
    from OpenSSL import SSL
    name = "OpenSSL._util.lib.BIO_get_mem_data"
    _require(name)
    _require("OpenSSL.SSL.Connection._into_ssl")
    client = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    bios = _compat.memory_bios(client)
    _check(bios is not None, "OpenSSL.SSL.Connection._into_ssl", "memory_bios found no BIOs")
    assert bios is not None
    into, out = bios
    size = _compat.BIO_MEM_DATA
    _check(size(into, _compat.BIO_POINTER) == 0 and size(out, _compat.BIO_POINTER) == 0, name,
           "a new connection's BIOs do not read as empty")
    client.bio_write(b"12345")
    _check(size(into, _compat.BIO_POINTER) == 5, name, "the incoming BIO's size is wrong")
    client = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    bios = _compat.memory_bios(client)
    assert bios is not None
    out = bios[1]
    client.set_connect_state()
    with pytest.raises(SSL.WantReadError):
        client.do_handshake()  # the ClientHello goes into the outgoing BIO
    waiting = size(out, _compat.BIO_POINTER)
    _check(waiting > 0 and len(client.bio_read(waiting)) == waiting
           and size(out, _compat.BIO_POINTER) == 0, "OpenSSL.SSL.Connection._from_ssl",
           "the outgoing BIO's size does not match what bio_read returns")


def _tls_pair(folder: str) -> tuple[Any, Any]:
    """A server and a client pyOpenSSL connection on memory BIOs, handshaken."""
    from OpenSSL import SSL

    from tls_memory import leaf_context
    server = SSL.Connection(leaf_context(folder, "compat.test"), None)
    client = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    server.set_accept_state()
    client.set_connect_state()
    for _ in range(10):
        for side in (client, server):
            try:
                side.do_handshake()
            except SSL.WantReadError:
                pass
        _move(client, server)
        _move(server, client)
    return server, client


def _move(source: Any, sink: Any) -> None:
    from tls_memory import drain
    data = drain(source)
    if data:
        sink.bio_write(data)


def test_record_calls_read_and_write_records_as_pyopenssl_does(tmp_path: Any) -> None:
    from OpenSSL import SSL
    name = "OpenSSL._util.lib.SSL_write/SSL_read/SSL_pending/BIO_read/BIO_write"
    _require(name)
    _require("OpenSSL.SSL.Connection._ssl")
    server, client = _tls_pair(str(tmp_path))
    calls = _compat.record_calls(server)
    _check(calls is not None, "OpenSSL.SSL.Connection._ssl", "record_calls found no OpenSSL object")
    assert calls is not None
    _check(calls.read(100) is None, name, "a read with nothing buffered did not return None")
    with pytest.raises(SSL.WantReadError):
        server.recv(100)  # and pyOpenSSL, asked after it, says why as it always did
    client.send(b"hello" * 10)
    record = client.bio_read(1 << 20)
    _check(calls.bio_write(record) == len(record), name, "BIO_write did not take the whole record")
    _check(calls.read(7) == b"hellohe" and calls.pending() == 43, name,
           "SSL_read/SSL_pending do not read a record's plaintext piece by piece")
    _check(calls.read(1000) == b"llo" + b"hello" * 8, name, "the rest of the record was not read")
    client.send(b"y" * 100)
    calls.bio_write(client.bio_read(1 << 20))
    _check(calls.read(_compat.RECORD_BUFFER * 4) == b"y" * 100, name,
           "a read asking for more than the buffer holds was not bounded by it")
    big = os.urandom(300 * 1024)  # more than RECORD_BUFFER: the outgoing BIO is taken whole
    _check(calls.write(big) == len(big), name, "SSL_write did not take a whole large write")
    size = _compat.BIO_MEM_DATA(calls.out, _compat.BIO_POINTER)
    ciphertext = calls.bio_take(size)
    _check(len(ciphertext) == size > len(big), name, "bio_take did not empty the outgoing BIO")
    client.bio_write(ciphertext)
    got = b""
    while len(got) < len(big):
        got += client.recv(1 << 20)
    _check(got == big, name, "what the direct calls wrote did not decrypt to what was written")
    client.shutdown()
    calls.bio_write(client.bio_read(1 << 20))
    _check(calls.read(100) is None, name, "a close_notify did not end the direct read")
    with pytest.raises(SSL.ZeroReturnError):
        server.recv(100)  # pyOpenSSL, asked after it, reports the close_notify


def test_lean_dispatch_delivers_events_and_logs_what_escapes() -> None:
    from twisted.internet.abstract import FileDescriptor
    from twisted.python import log
    name = "twisted.internet.epollreactor.EPollReactor._doReadOrWrite"
    _require(name)
    from twisted.internet.epollreactor import EPollReactor
    reactor = EPollReactor()  # a reactor of its own: never installed, never run
    a, b = socket.socketpair()
    seen: list[bytes] = []
    logged: list[dict[str, Any]] = []

    class Reader(FileDescriptor):
        def fileno(self) -> int:
            return a.fileno()

        def doRead(self) -> None:
            data = a.recv(100)
            seen.append(data)
            if data == b"boom":
                raise RuntimeError("from doRead")

        def connectionLost(self, reason: Any) -> None:
            raise ValueError("from connectionLost")  # escapes _doReadOrWrite

        def logPrefix(self) -> str:
            return "TestReader"
    try:
        _check(_compat.lean_dispatch(reactor), name, "the epoll reactor was not taken")
        reader = Reader(reactor)
        reactor.addReader(reader)
        b.send(b"ping")
        reactor.doIteration(1)
        _check(seen == [b"ping"], name, "an event did not reach its selectable's doRead")
        log.addObserver(logged.append)
        try:
            b.send(b"boom")
            reactor.doIteration(1)
        finally:
            log.removeObserver(logged.append)
        errors = [e for e in logged if e.get("isError")]
        _check(bool(errors) and errors[-1].get("system") == "TestReader", name,
               "an exception that escaped the dispatch was not logged with the selectable's prefix")
        from twisted.internet.testing import MemoryReactor
        assert not _compat.lean_dispatch(MemoryReactor())  # only the epoll reactor is changed
    finally:
        reactor._poller.close()
        a.close()
        b.close()


def _http_channel(clock: Clock) -> tuple[Any, StringTransport]:
    from twisted.web.pages import notFound
    from twisted.web.server import Site
    site = Site(notFound(), reactor=clock)
    proto = site.buildProtocol(None)
    proto.callLater = clock.callLater
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def test_http11_request_line_is_known_before_the_body() -> None:
    from twisted.web import http
    name = "twisted.web.http.HTTPChannel._command"
    _require(name)
    channel = http.HTTPChannel()
    channel.callLater = Clock().callLater
    channel.makeConnection(StringTransport())
    channel.dataReceived(b"POST /v1/shards/list HTTP/1.1\r\nHost: gw.test\r\n"
                         b"Content-Length: 10\r\n\r\n")  # the body has not come yet
    _check(_compat.http11_request_line(channel) == (b"POST", b"/v1/shards/list", b"HTTP/1.1"),
           name, "the channel does not hold the request line while it reads the body")
    channel.connectionLost(None)


def test_site_protocol_channel_takes_the_header_limits() -> None:
    from twisted.web import http
    name = "twisted.web.http._GenericHTTPChannelProtocol._channel"
    _require(name)
    proto, transport = _http_channel(Clock())
    channel = _compat.http_channel(proto)
    _check(isinstance(channel, http.HTTPChannel), name, "it is not an HTTPChannel")
    channel.totalHeadersSize = 200
    channel.maxHeaders = 3
    four_fields = b"GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n"
    long_field = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"x" * 300 + b"\r\n\r\n"
    proto.dataReceived(four_fields)
    _check(transport.value().startswith(b"HTTP/1.1 400"), name,
           "maxHeaders set on the channel does not limit the request")
    proto, transport = _http_channel(Clock())
    _compat.http_channel(proto).totalHeadersSize = 200
    proto.dataReceived(long_field)
    _check(transport.value().startswith(b"HTTP/1.1 400"), name,
           "totalHeadersSize set on the channel does not limit the request")
    for request in (four_fields, long_field):  # the same requests within twisted's defaults
        proto, transport = _http_channel(Clock())
        proto.dataReceived(request)
        assert transport.value().startswith(b"HTTP/1.1 404")


def _h2_server(clock: Clock, made: list[Any]) -> tuple[Any, Any, StringTransport]:
    import h2.config
    import h2.connection
    from twisted.web import _http2
    from twisted.web.resource import Resource
    from twisted.web.server import Request, Site

    class Recording(Request):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)
    conn = _http2.H2Connection(reactor=clock)
    conn.site = Site(Resource(), reactor=clock)
    conn.requestFactory = Recording
    conn.callLater = clock.callLater
    transport = StringTransport()
    conn.makeConnection(transport)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, [(":method", "POST"), (":path", "/"), (":scheme", "https"),
                            (":authority", "gw.test")], end_stream=False)
    conn.dataReceived(client.data_to_send())
    clock.advance(0)
    return conn, client, transport


def test_h2_stream_forgotten_fires_once_the_answer_is_sent() -> None:
    name = "twisted.web._http2.H2Connection._streamCleanupCallbacks"
    _require(name)
    _require("twisted.web._http2.H2Stream._conn")
    clock, made = Clock(), []
    conn, client, transport = _h2_server(clock, made)
    stream = conn.streams[1]
    found = _compat.h2_stream_forgotten(stream)
    _check(found is not None and found[0] is conn, name, "no hook for stream 1")
    assert found is not None
    fired: list[Any] = []
    found[1].addCallback(fired.append)
    request = made[0]
    request.setResponseCode(401)
    request.write(b"no")
    request.finish()
    for _ in range(5):
        clock.advance(0)
    _check(len(fired) == 1 and 1 not in conn.streams, name,
           "the stream's cleanup Deferred did not fire when its answer was sent")
    conn.connectionLost(None)


def test_h2_send_control_writes_a_goaway() -> None:
    import h2.events
    name = "twisted.web._http2.H2Connection._tryToWriteControlData"
    _require(name)
    clock, made = Clock(), []
    conn, client, transport = _h2_server(clock, made)
    transport.clear()
    conn.conn.close_connection()
    _compat.h2_send_control(conn)
    events = client.receive_data(transport.value())
    _check(any(isinstance(e, h2.events.ConnectionTerminated) for e in events), name,
           "no GOAWAY reached the transport")
    conn.connectionLost(None)


def test_close_shared_listener_leaves_the_socket_listening_for_others() -> None:
    from twisted.internet import tcp
    from twisted.internet.protocol import Factory, Protocol
    name = "twisted.internet.tcp.Port._shouldShutdown"
    _require(name)
    reactor = MemoryReactorClock()
    port = tcp.Port(0, Factory.forProtocol(Protocol), interface="127.0.0.1", reactor=reactor)
    port.startListening()
    number = port.getHost().port
    other = socket.socket(fileno=os.dup(port.fileno()))  # as a worker process holds it
    try:
        _compat.close_shared_listener(port)
        reactor.advance(0)  # stopListening finishes on the next turn
        client = socket.create_connection(("127.0.0.1", number), timeout=5)
        other.settimeout(5)
        accepted, _ = other.accept()
        _check(accepted is not None, name, "the other holder could not accept")
        accepted.close()
        client.close()
    finally:
        other.close()


def test_exit_signal_is_the_reactors_record_of_sigterm() -> None:
    from twisted.internet.base import ReactorBase
    name = "twisted.internet.base.ReactorBase._exitSignal"
    _require(name)

    class Bare(ReactorBase):
        def installWaker(self) -> None:
            return None

        def wakeUp(self) -> None:
            return None
    reactor = Bare()
    assert _compat.exit_signal(reactor) is None
    reactor.sigTerm(signal.SIGTERM)
    _check(_compat.exit_signal(reactor) == signal.SIGTERM, name, "SIGTERM was not recorded")
    _compat.forget_exit_signal(reactor)
    _check(_compat.exit_signal(reactor) is None, name, "the record could not be cleared")


def test_asyncio_event_loop_of_the_asyncio_reactor() -> None:
    import asyncio
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor
    name = "twisted.internet.asyncioreactor.AsyncioSelectorReactor._asyncioEventloop"
    _require(name)
    loop = asyncio.new_event_loop()
    try:
        reactor = AsyncioSelectorReactor(eventloop=loop)
        _check(_compat.asyncio_event_loop(reactor) is loop, name, "it is not the given loop")
        assert _compat.asyncio_event_loop(MemoryReactorClock()) is None
    finally:
        loop.close()


def test_proxy_header_parsers() -> None:
    name = "twisted.protocols.haproxy._v1parser/_v2parser/_exceptions"
    _require(name)
    info = _compat.V1Parser.parse(b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 443")
    _check(info.source.host == "192.0.2.1" and info.source.port == 40000, name,
           "a v1 header did not parse")
    with pytest.raises(_compat.InvalidProxyHeader):
        _compat.V1Parser.parse(b"PROXY NONSENSE")


# -- nothing outside the seam reaches for a private name ------------------------------------------

_LIBRARIES = ("twisted", "OpenSSL", "cryptography")
# Private names that are also ordinary words of the gateway's own code, so they are only
# counted when read off objects of these libraries in _compat (where they live).
_AMBIGUOUS = {"_conn", "_channel", "_path", "_version", "socket", "offset"}
# Uses in modules whose owners have yet to switch them to _compat (issue 11); remove each
# entry with the change.  Anything not listed fails the test.
_WAITING_FOR_OWNERS: frozenset[tuple[str, str]] = frozenset()


def _private_attributes() -> set[str]:
    names = set()
    for dotted in _compat.NAMES:
        last = dotted.rsplit(".", 1)[-1]
        if last.startswith("_") and "/" not in last and last not in _AMBIGUOUS:
            names.add(last)
    return names | {"dataBuffer", "_factory", "_into_ssl", "_from_ssl", "_util"}


def _uses(path: str, private: set[str]) -> set[str]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[0] in _LIBRARIES and any(p.startswith("_") for p in parts[1:]):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] in _LIBRARIES and any(p.startswith("_") for p in parts[1:]):
                    found.add(alias.name)
        elif isinstance(node, ast.Attribute) and node.attr in private:
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.add(node.attr)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) > 1
              and isinstance(node.args[1], ast.Constant)
              and node.args[1].value in private | _AMBIGUOUS | {"_channel", "_conn"}):
            found.add(node.args[1].value)
    return found


def test_no_module_but_the_seam_uses_private_names() -> None:
    private = _private_attributes()
    found = set()
    package = os.path.join(REPO, "twisted_gateway")
    for folder, _, files in os.walk(package):
        for file in files:
            if not file.endswith(".py") or file == "_compat.py" and folder == package:
                continue
            path = os.path.join(folder, file)
            relative = os.path.relpath(path, REPO).replace(os.sep, "/")
            found |= {(relative, name) for name in _uses(path, private)}
    unexpected = sorted(found - _WAITING_FOR_OWNERS)
    assert not unexpected, ("private names of Twisted/pyOpenSSL/cryptography used outside "
                            f"twisted_gateway/_compat.py: {unexpected}; add them to _compat "
                            "(probe, fallback) and use them from there")
