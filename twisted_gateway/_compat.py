"""
The seam between twisted-gateway and the private or undocumented parts of Twisted, pyOpenSSL
and cryptography that it relies on.

Every such name the gateway uses is reached through this module and nowhere else.  Each is
probed once, when this module is imported, and recorded in L{NAMES} with what it is for and
what the gateway does without it.  Where a public way exists it is the fallback, so an upgrade
that drops a name costs speed or a refinement instead of a crash; where none exists the entry
says what stops working.  tests/test_compat.py checks every entry against the installed
libraries, with real objects, and fails naming the name and the library's version.

The probes are cheap and have no side effects: they look at code objects and build objects
over stand-ins, and never install a reactor, schedule a call or open a socket.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.web import http


# -- the registry ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PrivateName:
    """One private name of a library, as this installation has it."""

    name: str
    """Dotted, as in the library's source (C{twisted.web.http.HTTPChannel._command})."""
    libraries: tuple[str, ...]
    """The distributions whose versions decide it (C{"Twisted"}, C{"pyOpenSSL"}...)."""
    used_for: str
    without: str
    """What the gateway does when the name is gone (the fallback, or what stops working)."""
    present: bool

    def problem(self) -> str:
        """One sentence for an operator or a failing test."""
        versions = ", ".join(f"{lib} {library_version(lib)}" for lib in self.libraries)
        return (f"{self.name} is gone in {versions}: the gateway uses it for {self.used_for}; "
                f"without it {self.without}")


NAMES: dict[str, PrivateName] = {}
"""Every private name the gateway uses, by dotted name."""


@functools.lru_cache(maxsize=None)
def library_version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "(not installed)"


def missing() -> list[PrivateName]:
    """The names this installation lacks (each one's fallback is in force)."""
    return [entry for entry in NAMES.values() if not entry.present]


def _probe(name: str, libraries: tuple[str, ...], used_for: str, without: str,
           check: Callable[[], object]) -> bool:
    try:
        present = bool(check())
    except Exception:  # noqa: BLE001 - a probe that fails in any way means: do not rely on it
        present = False
    NAMES[name] = PrivateName(name, libraries, used_for, without, present)
    return present


def _mentions(function: Any, *names: str) -> bool:
    """Whether C{function}'s code reads or assigns every one of C{names} (an attribute name
    appears in C{co_names}): the cheap import-time sign that a library still uses them."""
    code = getattr(function, "__code__", None)
    return code is not None and all(n in code.co_names for n in names)


class _StandInReactor:
    """A reactor for probes: nothing is scheduled or registered, and the global reactor is not
    imported (importing it would install the default reactor before twistd's ``-r``)."""

    def seconds(self) -> float:
        return 0.0

    def callLater(self, delay: float, f: Callable[..., object], *args: object, **kw: object) -> None:
        return None

    def addReader(self, reader: object) -> None:
        return None

    def removeReader(self, reader: object) -> None:
        return None

    def addWriter(self, writer: object) -> None:
        return None

    def removeWriter(self, writer: object) -> None:
        return None


class _StandInSocket:
    def setblocking(self, flag: bool) -> None:
        return None

    def fileno(self) -> int:
        return -1


# -- TCP transports' write queue (fastwrite) ------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _tcp_connection() -> Any:
    # A tcp.Connection over a stand-in socket: FileDescriptor.__init__ sets the queue's
    # instance attributes, which the class alone does not show.
    return tcp.Connection(_StandInSocket(), None, _StandInReactor())  # type: ignore[arg-type]  # stand-ins


_WITHOUT_FAST_WRITE = ("every relayed write waits for the reactor's next pass (transport.write), "
                       "as in plain Twisted: correct, a little slower")
TCP_WRITE_QUEUE = all([
    _probe(f"twisted.internet.abstract.FileDescriptor.{attr}", ("Twisted",),
           "seeing that a TCP transport's write queue is empty, to send a relayed chunk at once "
           "(fastwrite.write_now)", _WITHOUT_FAST_WRITE,
           functools.partial(lambda a: hasattr(_tcp_connection(), a), attr))
    for attr in ("dataBuffer", "offset", "_tempDataLen", "_writeDisconnected")
] + [
    _probe("twisted.internet.tcp.Connection.socket", ("Twisted",),
           "sending a relayed chunk directly on a TCP transport's socket (fastwrite.write_now)",
           _WITHOUT_FAST_WRITE, lambda: hasattr(_tcp_connection(), "socket")),
    _probe("twisted.internet.tcp.Connection._aborting", ("Twisted",),
           "never sending a chunk on a connection already aborted (Twisted drops such writes)",
           _WITHOUT_FAST_WRITE,
           lambda: _tcp_connection()._aborting is False and _mentions(tcp.Connection.abortConnection, "_aborting")),
])
"""Whether L{write_now} may look into tcp.Server/tcp.Client write queues."""

_TCP = (tcp.Server, tcp.Client)


def _open_and_empty(transport: Any) -> bool:
    """A plain TCP connection, open (not closing, not aborted), with nothing in its write
    queue: where Twisted's C{doWrite} would send a new chunk first, or go on to a close."""
    return (type(transport) in _TCP and transport.connected and not transport.disconnecting
            and not transport._aborting and not transport._tempDataLen
            and transport.offset == len(transport.dataBuffer))


if TCP_WRITE_QUEUE:
    def write_now(transport: Any, data: bytes) -> None:
        """
        C{transport.write(data)}, but sent on the spot when C{transport} is a plain TCP
        connection with nothing queued (see L{twisted_gateway.fastwrite}).

        The conditions are exactly those under which Twisted's own C{doWrite} would send
        C{data} first; what the socket does not take is queued with C{transport.write}.
        """
        if _open_and_empty(transport) and not transport._writeDisconnected:
            try:
                sent = transport.socket.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = 0  # the queued write meets the same error and Twisted reports it
            if sent == len(data):
                return
            data = data[sent:]
        transport.write(data)
else:  # pragma: no cover - only with a Twisted that reorganised its write queue
    def write_now(transport: Any, data: bytes) -> None:
        """C{transport.write(data)}: this Twisted's write queue cannot be seen into."""
        transport.write(data)


def _file_descriptor_do_write() -> Any:
    from twisted.internet.abstract import FileDescriptor
    return FileDescriptor.doWrite


CLOSE_NOW = TCP_WRITE_QUEUE and all([
    _probe(f"twisted.internet.abstract.FileDescriptor.{attr}", ("Twisted",),
           "closing a TCP connection with nothing queued at once (close_now)",
           "such a close waits for the reactor's next pass (loseConnection), as in plain "
           "Twisted: two more epoll_ctl, a pass and a zero-byte send per close",
           functools.partial(lambda a: _mentions(_file_descriptor_do_write(), a), attr))
    for attr in ("producerPaused", "streamingProducer", "_postLoseConnection", "_writeDisconnecting",
                 "_closeWriteConnection")
])
"""Whether L{close_now} and L{lose_write_now} may close a TCP transport on the spot."""


def _nothing_waits(transport: Any) -> bool:
    """A plain TCP connection, open, with nothing queued and no producer waiting to be resumed:
    where Twisted's C{doWrite} would go straight on to a close it was asked for."""
    return (CLOSE_NOW and _open_and_empty(transport)
            and (transport.producer is None
                 or (transport.streamingProducer and not transport.producerPaused)))


def lose_write_now(transport: Any) -> None:
    """
    C{transport.loseWriteConnection()}, done on the spot (TCP FIN sent, the protocol's
    C{writeConnectionLost} called) when nothing is queued: what Twisted's C{doWrite} does on
    the reactor's next pass, without registering for writing first (L{close_now}).
    """
    if _nothing_waits(transport) and not transport._writeDisconnected:
        transport._writeDisconnecting = True
        transport._writeDisconnected = True
        transport._closeWriteConnection()
        return
    transport.loseWriteConnection()


def close_now(transport: Any) -> None:
    """
    C{transport.loseConnection()}, done on the spot when C{transport} is a plain TCP
    connection with nothing queued and no producer waiting to be resumed: what Twisted's own
    C{doWrite} would do on the reactor's next pass (find the queue empty and close), without
    registering for writing, waiting a pass and sending zero bytes first.  The transport's
    protocol gets C{connectionLost} before this returns, as Twisted's C{loseConnection} itself
    does for a connection whose write side is already shut.  Anything else is left to
    C{loseConnection}, which writes out what is queued before it closes.
    """
    if _nothing_waits(transport):
        transport.disconnecting = True
        transport.connectionLost(_CONNECTION_DONE)
        # An event for this connection may still be on its way in the reactor's current batch
        # (a read closed it, and the same event says it was writable: a half-close was
        # pending): as after abortConnection, such an event finds nothing to do.
        transport.doRead = transport.doWrite = _nothing
        return
    transport.loseConnection()


def _nothing() -> None:
    return None


def _connection_done() -> Any:
    from twisted.internet import main
    from twisted.python.failure import Failure
    return Failure(main.CONNECTION_DONE)  # type: ignore[no-untyped-call]  # Twisted stub


_CONNECTION_DONE = _connection_done()
"""The reason of every such close, made once (the reactor shares one the same way)."""


# -- pyOpenSSL memory BIOs (tls/connection.py) ------------------------------------------------------

_WITHOUT_BIO_SIZE = ("the TLS engine reads until WantReadError instead of asking how much is "
                     "buffered (about 3 µs more per relayed chunk)")
BIO_MEM_DATA: Any = None
"""C{BIO_get_mem_data(bio, BIO_POINTER)}: the bytes a memory BIO holds; None if unavailable."""
BIO_POINTER: Any = None


def _bind_bio_size() -> bool:
    global BIO_MEM_DATA, BIO_POINTER
    from OpenSSL._util import ffi, lib
    BIO_MEM_DATA = lib.BIO_get_mem_data
    BIO_POINTER = ffi.new("char**")
    return True


def _connection_init() -> Any:
    from OpenSSL import SSL
    return SSL.Connection.__init__


MEMORY_BIO_SIZES = all([
    _probe("OpenSSL._util.lib.BIO_get_mem_data", ("pyOpenSSL", "cryptography"),
           "the size of a TLS connection's memory BIOs without a failing read",
           _WITHOUT_BIO_SIZE, _bind_bio_size),
    _probe("OpenSSL.SSL.Connection._into_ssl", ("pyOpenSSL",),
           "the incoming memory BIO of a TLS connection (its size)", _WITHOUT_BIO_SIZE,
           lambda: _mentions(_connection_init(), "_into_ssl")),
    _probe("OpenSSL.SSL.Connection._from_ssl", ("pyOpenSSL",),
           "the outgoing memory BIO of a TLS connection (its size)", _WITHOUT_BIO_SIZE,
           lambda: _mentions(_connection_init(), "_from_ssl")),
])
"""Whether L{memory_bios} and L{BIO_MEM_DATA} can size a connection's memory BIOs."""


def memory_bios(connection: Any) -> tuple[Any, Any] | None:
    """The incoming and outgoing memory BIOs of a pyOpenSSL C{Connection} made with no socket,
    for L{BIO_MEM_DATA}; None when they cannot be reached."""
    if not MEMORY_BIO_SIZES:
        return None
    into = getattr(connection, "_into_ssl", None)
    out = getattr(connection, "_from_ssl", None)
    if into is None or out is None:
        return None
    return into, out


# -- pyOpenSSL's record calls without its wrappers (tls/connection.py) ------------------------------

_WITHOUT_RECORD_CALLS = ("the TLS engine calls pyOpenSSL's send, recv, bio_read and bio_write, each of "
                         "which wraps the OpenSSL call in buffer handling and an error check (about 1 µs "
                         "more per record each way)")


def _bind_record_calls() -> bool:
    global _SSL_WRITE, _SSL_READ, _SSL_PENDING, _BIO_READ, _BIO_WRITE, _FFI_BUFFER, _READ_BUFFER, _ALLOCATE, \
        _FROM_BUFFER
    from OpenSSL._util import ffi, lib
    _SSL_WRITE, _SSL_READ, _SSL_PENDING = lib.SSL_write, lib.SSL_read, lib.SSL_pending
    _BIO_READ, _BIO_WRITE = lib.BIO_read, lib.BIO_write
    _FFI_BUFFER = ffi.buffer
    _FROM_BUFFER = ffi.from_buffer
    _ALLOCATE = ffi.new_allocator(should_clear_after_alloc=False)
    _READ_BUFFER = _ALLOCATE("char[]", RECORD_BUFFER)
    return True


RECORD_BUFFER = 256 * 1024
"""The buffer the direct calls read into (the reactor thread's only: the bytes are copied out
before the next call), large enough for what the engine asks for at once."""

_SSL_WRITE: Any = None
_SSL_READ: Any = None
_SSL_PENDING: Any = None
_BIO_READ: Any = None
_BIO_WRITE: Any = None
_FFI_BUFFER: Any = None
_FROM_BUFFER: Any = None
_ALLOCATE: Any = None
_READ_BUFFER: Any = None

RECORD_CALLS = MEMORY_BIO_SIZES and all([
    _probe("OpenSSL._util.lib.SSL_write/SSL_read/SSL_pending/BIO_read/BIO_write", ("pyOpenSSL", "cryptography"),
           "reading and writing TLS records and memory BIOs without pyOpenSSL's per-call wrappers",
           _WITHOUT_RECORD_CALLS, _bind_record_calls),
    _probe("OpenSSL.SSL.Connection._ssl", ("pyOpenSSL",),
           "the OpenSSL object of a TLS connection, for the direct record calls", _WITHOUT_RECORD_CALLS,
           lambda: _mentions(_connection_init(), "_ssl")),
])
"""Whether L{record_calls} can give the TLS engine the direct calls."""


def _ssl_read(ssl: Any, size: int) -> bytes | None:
    """Up to C{size} (at most L{RECORD_BUFFER}) bytes of plaintext, or None when OpenSSL has
    none to give: the caller then asks pyOpenSSL's C{recv}, which says why (want-read,
    close_notify, an error) by raising as it always does."""
    n = _SSL_READ(ssl, _READ_BUFFER, min(size, RECORD_BUFFER))
    if n <= 0:
        return None
    data: bytes = _FFI_BUFFER(_READ_BUFFER, n)[:]
    return data


def _bio_take(bio: Any, size: int) -> bytes:
    """C{size} bytes (what the BIO holds, from C{BIO_MEM_DATA}) out of a memory BIO."""
    buffer = _READ_BUFFER if size <= RECORD_BUFFER else _ALLOCATE("char[]", size)
    n = _BIO_READ(bio, buffer, size)
    return _FFI_BUFFER(buffer, n)[:] if n > 0 else b""


class RecordCalls:
    """
    The OpenSSL calls of one connection's records, without pyOpenSSL's wrappers.  Each returns
    what OpenSSL did; anything but plain success (a write that took less than all, a read with
    nothing to give) is for the caller to redo through the pyOpenSSL C{Connection}, which then
    raises its usual exception: a failed OpenSSL call left the connection as it was (a write is
    retried with the same buffer, as OpenSSL requires), so nothing is lost or doubled.
    """

    __slots__ = ("ssl", "into", "out")

    def __init__(self, ssl: Any, into: Any, out: Any) -> None:
        self.ssl, self.into, self.out = ssl, into, out

    def write(self, data: bytes) -> int:
        """Write C{data} as records; how many bytes OpenSSL took (all, unless it failed: pyOpenSSL
        turns on partial writes, so a write of more than a record is taken a record at a time)."""
        ssl, size = self.ssl, len(data)
        done = _SSL_WRITE(ssl, data, size)
        if done == size or done <= 0:
            return int(done)
        with _FROM_BUFFER(data) as pointer:
            while done < size:
                n = _SSL_WRITE(ssl, pointer + done, size - done)
                if n <= 0:
                    break
                done += n
        return int(done)

    def read(self, size: int) -> bytes | None:
        return _ssl_read(self.ssl, size)

    def pending(self) -> int:
        return int(_SSL_PENDING(self.ssl))

    def bio_write(self, data: bytes) -> int:
        return int(_BIO_WRITE(self.into, data, len(data)))

    def bio_take(self, size: int) -> bytes:
        return _bio_take(self.out, size)


def record_calls(connection: Any) -> RecordCalls | None:
    """The direct record calls for a pyOpenSSL C{Connection} made with no socket; None when
    they cannot be reached (the engine then uses pyOpenSSL's methods)."""
    if not RECORD_CALLS:
        return None
    bios = memory_bios(connection)
    ssl = getattr(connection, "_ssl", None)
    if bios is None or ssl is None:
        return None
    return RecordCalls(ssl, bios[0], bios[1])


# -- the epoll reactor's dispatch (gateway.py) ----------------------------------------------------

_WITHOUT_LEAN_DISPATCH = ("each I/O event is dispatched through twisted.python.log's context "
                          "(callWithLogger), about 1-2 µs more per event")


def _epoll_reactor() -> Any:
    from twisted.internet.epollreactor import EPollReactor
    return EPollReactor


LEAN_DISPATCH = all([
    _probe(f"twisted.internet.epollreactor.EPollReactor.{attr}", ("Twisted",),
           "dispatching I/O events without twisted.python.log's per-event context (lean_dispatch)",
           _WITHOUT_LEAN_DISPATCH,
           functools.partial(lambda a: _mentions(_epoll_reactor().doPoll, a), attr))
    for attr in ("_poller", "_selectables", "_doReadOrWrite")
])
"""Whether L{lean_dispatch} can replace the epoll reactor's C{doPoll}."""


def lean_dispatch(reactor: Any) -> bool:
    """
    Make C{reactor} (Twisted's epoll reactor; any other is left alone) dispatch each I/O event
    straight to its C{_doReadOrWrite}, as its own C{doPoll} does, without wrapping every event
    in C{log.callWithLogger}: that pushes a logging context (the legacy C{system} key) around
    each event, which costs 1-2 µs per event and matters only to messages logged through
    C{twisted.python.log} (the gateway logs through C{twisted.logger}).  An exception that
    escapes the dispatch is logged as C{callWithLogger} logs it, with the selectable's prefix.
    Returns whether it did.
    """
    if not LEAN_DISPATCH or type(reactor) is not _epoll_reactor():
        return False
    import errno as _errno

    from twisted.python import log as _log

    def doPoll(timeout: float | None) -> None:
        if timeout is None:
            timeout = -1
        selectables = reactor._selectables
        try:
            events = reactor._poller.poll(timeout, len(selectables))
        except OSError as err:
            if err.errno == _errno.EINTR:
                return
            raise
        dispatch = reactor._doReadOrWrite
        get = selectables.get
        for fd, event in events:
            selectable = get(fd)
            if selectable is None:
                continue
            try:
                dispatch(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                try:
                    prefix = selectable.logPrefix()
                except KeyboardInterrupt:
                    raise
                except BaseException:  # noqa: BLE001 - as callWithLogger: a buggy logPrefix
                    prefix = "(buggy logPrefix method)"
                _log.err(system=prefix)  # type: ignore[no-untyped-call]  # twisted.python.log is untyped

    reactor.doPoll = reactor.doIteration = doPoll
    return True


# -- twisted.web HTTP/1.1 channel (http/api.py, frontdoor.py) --------------------------------------

HTTP11_REQUEST_LINE = all([
    _probe(f"twisted.web.http.HTTPChannel.{attr}", ("Twisted",),
           "the request line of an API request refused before its body is read (the answer's "
           "status-line version, HEAD, the method and path in metrics)",
           "such an answer is written as HTTP/1.1 to a POST of /",
           functools.partial(lambda a: _mentions(http.HTTPChannel.lineReceived, a), attr))
    for attr in ("_command", "_path", "_version")
])


def http11_request_line(channel: Any) -> tuple[bytes, bytes, bytes] | None:
    """
    The method, target and version of the request an C{HTTPChannel} is reading, known from its
    request line on; twisted.web tells the request only once the whole body is in
    (C{requestReceived}).  None when this Twisted does not keep them where expected.
    """
    if not HTTP11_REQUEST_LINE:
        return None
    try:
        return channel._command, channel._path, channel._version
    except AttributeError:
        return None


def _site_protocol() -> Any:
    from twisted.web import resource, server
    site: Any = server.Site  # twisted.web is untyped
    root: Any = resource.Resource
    return site(root(), reactor=_StandInReactor()).buildProtocol(None)


HTTP_CHANNEL = _probe(
    "twisted.web.http._GenericHTTPChannelProtocol._channel", ("Twisted",),
    "the HTTPChannel (or H2Connection) behind the protocol a twisted.web Site builds, to set "
    "limits.max_header_bytes and max_headers on it and to drain it",
    "the header limits stay twisted.web's own (16 KiB, 500 fields) and a drain waits for "
    "idle HTTP connections to time out",
    lambda: isinstance(getattr(_site_protocol(), "_channel", None), http.HTTPChannel))


def http_channel(protocol: Any) -> Any | None:
    """The channel behind C{protocol} (from C{Site.buildProtocol}): an C{HTTPChannel}, or
    twisted's C{H2Connection} once ALPN chose h2; None if it cannot be reached."""
    if not HTTP_CHANNEL:
        return None
    return getattr(protocol, "_channel", None)


# -- twisted.web's h2 connection (http/api.py, frontdoor.py) --------------------------------------

def _http2_module() -> Any:
    from twisted.web import _http2
    return _http2


_probe("twisted.web._http2", ("Twisted",),
       "twisted.web's h2 server (H2Connection, H2Stream), whose private parts follow",
       "the parts below fall back as they say", _http2_module)

H2_STREAM_CLEANUP = all([
    _probe("twisted.web._http2.H2Stream._conn", ("Twisted",),
           "the connection of a twisted.web h2 stream, to reset a refused API upload",
           "a refused h2 API upload is answered only once the client has sent its whole body "
           "(which is dropped as it comes)",
           lambda: _mentions(_http2_module().H2Stream.__init__, "_conn")),
    _probe("twisted.web._http2.H2Connection._streamCleanupCallbacks", ("Twisted",),
           "the moment twisted.web's h2 connection has sent a stream's last frame, to reset "
           "a refused API upload right after its answer",
           "a refused h2 API upload is answered only once the client has sent its whole body "
           "(which is dropped as it comes)",
           lambda: isinstance(_http2_module().H2Connection(reactor=_StandInReactor())
                              ._streamCleanupCallbacks, dict)),
])


def h2_stream_forgotten(stream: Any) -> tuple[Any, Deferred[Any]] | None:
    """
    For a twisted.web C{H2Stream}: its C{H2Connection} and the Deferred that connection fires
    when it forgets the stream (the response's last frame sent, H2Connection._requestDone);
    None when this Twisted offers no such hook or the stream is already forgotten.
    """
    if not H2_STREAM_CLEANUP:
        return None
    connection = getattr(stream, "_conn", None)
    callbacks = getattr(connection, "_streamCleanupCallbacks", None)
    stream_id = getattr(stream, "streamID", None)
    if connection is None or not isinstance(callbacks, dict) or stream_id not in callbacks:
        return None
    return connection, callbacks[stream_id]


H2_CONTROL_WRITER = _probe(
    "twisted.web._http2.H2Connection._tryToWriteControlData", ("Twisted",),
    "sending a GOAWAY on a twisted.web h2 connection being drained, through twisted's bounded "
    "buffer of control frames",
    "the GOAWAY is written to the transport directly (ahead of anything twisted still buffers)",
    lambda: callable(getattr(_http2_module().H2Connection, "_tryToWriteControlData", None)))


def h2_send_control(connection: Any) -> None:
    """Send what the h2 state machine of a twisted.web C{H2Connection} has queued (a GOAWAY
    after C{connection.conn.close_connection()}, for one)."""
    if H2_CONTROL_WRITER:
        connection._tryToWriteControlData()
        return
    data = connection.conn.data_to_send()
    if data and connection.transport is not None:
        connection.transport.write(data)


# -- listening sockets shared with worker processes (workers.py) ------------------------------------

SHARED_LISTENER_CLOSE = _probe(
    "twisted.internet.tcp.Port._shouldShutdown", ("Twisted",),
    "closing the supervisor's copy of the TLS listener without shutdown(), which would stop "
    "the socket every worker accepts on",
    "the supervisor closes its descriptor itself and leaves the Port object as it is",
    lambda: hasattr(tcp.Port, "_shouldShutdown") and _mentions(tcp._SocketCloser._closeSocket,
                                                              "_shouldShutdown"))


def close_shared_listener(port: Any) -> Any:
    """
    Stop C{port} (a tcp.Port whose socket other processes also accept on) in this process only:
    close its descriptor, never shutdown() the socket they share.  Returns what
    C{stopListening} returns, or None.
    """
    if SHARED_LISTENER_CLOSE:
        port._shouldShutdown = False  # Twisted's own choice for adopted sockets
        return port.stopListening()
    port.stopReading()
    port.socket.close()
    return None


# -- twistd's exit status after a signal (gateway.py) ---------------------------------------------

def _reactor_records_exit_signal() -> bool:
    from twisted.application.app import ApplicationRunner
    from twisted.internet.base import ReactorBase
    return hasattr(ReactorBase, "_exitSignal") and _mentions(ApplicationRunner.startReactor,
                                                             "_exitSignal")


EXIT_SIGNAL = _probe(
    "twisted.internet.base.ReactorBase._exitSignal", ("Twisted",),
    "letting a SIGTERM that ended in a completed drain exit 0 (twistd otherwise re-raises the "
    "signal against itself)",
    "such a stop exits with -15", _reactor_records_exit_signal)


def exit_signal(reactor: Any) -> int | None:
    """The signal that stopped C{reactor}, as twistd will re-raise it; None if none (or unknown)."""
    return getattr(reactor, "_exitSignal", None) if EXIT_SIGNAL else None


def forget_exit_signal(reactor: Any) -> None:
    """Make twistd exit normally although a signal stopped C{reactor}."""
    if EXIT_SIGNAL:
        reactor._exitSignal = None


# -- the asyncio reactor's event loop (reactors.py, workers.py) ------------------------------------

def _asyncio_reactor_init() -> Any:
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor
    return AsyncioSelectorReactor.__init__


ASYNCIO_LOOP = _probe(
    "twisted.internet.asyncioreactor.AsyncioSelectorReactor._asyncioEventloop", ("Twisted",),
    "knowing whether the asyncio reactor runs on uvloop (to start workers alike) and whether "
    "to watch for exited workers itself",
    "workers of a uvloop supervisor run asyncio's own loop, and the supervisor polls for "
    "exited workers on any asyncio reactor",
    lambda: _mentions(_asyncio_reactor_init(), "_asyncioEventloop"))


def asyncio_event_loop(reactor: Any) -> Any | None:
    """The asyncio event loop an C{AsyncioSelectorReactor} runs on; None for other reactors or
    when it cannot be reached."""
    if not ASYNCIO_LOOP:
        return None
    return getattr(reactor, "_asyncioEventloop", None)


# -- PROXY protocol parsers (proxyheader.py) --------------------------------------------------------

_V2_SIGNATURE = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"  # proxy-protocol.txt 2.2


def _haproxy_parsers() -> tuple[Any, Any, Any]:
    from twisted.protocols.haproxy._exceptions import InvalidProxyHeader as invalid
    from twisted.protocols.haproxy._v1parser import V1Parser as v1
    from twisted.protocols.haproxy._v2parser import V2Parser as v2
    return invalid, v1, v2


PROXY_PARSERS = _probe(
    "twisted.protocols.haproxy._v1parser/_v2parser/_exceptions", ("Twisted",),
    "parsing PROXY protocol v1 and v2 headers from trusted load balancers",
    "every PROXY header is refused as invalid, so a trusted load balancer's connections fail",
    lambda: _haproxy_parsers()[2].PREFIX == _V2_SIGNATURE)

if PROXY_PARSERS:
    InvalidProxyHeader, V1Parser, V2Parser = _haproxy_parsers()
else:  # pragma: no cover - only with a Twisted that moved its haproxy parsers
    class InvalidProxyHeader(Exception):  # type: ignore[no-redef]  # the fallback of the import above
        """A PROXY header that cannot be parsed here."""

    class _NoProxyParser:
        PREFIX = _V2_SIGNATURE

        @staticmethod
        def parse(line: bytes) -> Any:
            raise InvalidProxyHeader(NAMES["twisted.protocols.haproxy._v1parser/_v2parser/"
                                           "_exceptions"].problem())

    V1Parser = V2Parser = _NoProxyParser


__all__ = [
    "NAMES", "PrivateName", "missing", "library_version",
    "TCP_WRITE_QUEUE", "write_now", "CLOSE_NOW", "close_now", "lose_write_now",
    "MEMORY_BIO_SIZES", "BIO_MEM_DATA", "BIO_POINTER", "memory_bios",
    "RECORD_CALLS", "RecordCalls", "record_calls", "LEAN_DISPATCH", "lean_dispatch",
    "HTTP11_REQUEST_LINE", "http11_request_line", "HTTP_CHANNEL", "http_channel",
    "H2_STREAM_CLEANUP", "h2_stream_forgotten", "H2_CONTROL_WRITER", "h2_send_control",
    "SHARED_LISTENER_CLOSE", "close_shared_listener",
    "EXIT_SIGNAL", "exit_signal", "forget_exit_signal",
    "ASYNCIO_LOOP", "asyncio_event_loop",
    "PROXY_PARSERS", "InvalidProxyHeader", "V1Parser", "V2Parser",
]
