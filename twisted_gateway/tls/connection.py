"""
The server side of one TLS connection over a memory BIO, started from bytes already read.

Twisted's C{TLSMemoryBIOProtocol} cannot be used here for two reasons: it answers a peer's
close_notify by closing the whole connection, while a splice must carry it as a half-close
(TLS 1.3, RFC 8446 section 6.1, lets each side close its write direction on its own); and it
cannot be started from a ClientHello that the front door has already consumed.  This class
is a transport for the application protocol (splice, HTTP) and is fed raw bytes by the front
door.  Writes are encrypted and handed to the TCP transport at once, so that transport's
buffer and producer machinery give backpressure in both directions.
"""

from __future__ import annotations

import struct
from typing import Any, Callable, Iterable

try:
    import fcntl
    import termios
except ImportError:  # Windows: whether the client has bytes unread cannot be asked
    fcntl = termios = None  # type: ignore[assignment]

from OpenSSL import SSL
from twisted.internet.interfaces import (
    IConsumer, IHalfCloseableProtocol, IPushProducer, ISSLTransport, ITCPTransport,
)
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.python.failure import Failure

from twisted_gateway._compat import BIO_MEM_DATA as _mem_data
from twisted_gateway._compat import BIO_POINTER as _POINTER
from twisted_gateway._compat import close_now, lose_write_now, memory_bios, record_calls
from twisted_gateway.fastwrite import write_now
from twisted_gateway.interfaces import IStreamTransport
from zope.interface import implementer

# One TLS record carries at most 16 KiB of plaintext; SSL_read returns one record per call.
_RECV_SIZE = 64 * 1024

# _mem_data(bio, _POINTER): how many bytes a memory BIO holds, without the exception a failing
# read raises (which costs about 3 µs, several times per relayed chunk).  pyOpenSSL does not
# expose this publicly (see _compat); without it the engine reads until WantReadError.

# The most plaintext handed to the protocol in one call (several records).
_DELIVER_SIZE = 256 * 1024

# Ciphertext waiting in the outgoing BIO after a large write.
_BIO_READ_SIZE = 256 * 1024


@implementer(ITCPTransport, ISSLTransport, IConsumer, IPushProducer)
class TLSServerConnection:
    """
    @ivar protocol: the application protocol; connected (C{makeConnection}) only once the
        handshake has completed.
    """

    disconnecting = False
    connected = True
    peer: IPv4Address | IPv6Address | None = None
    """The client's address when it came in a PROXY header, else None (the TCP peer)."""

    def __init__(self, transport: IStreamTransport, connection: SSL.Connection, protocol: Any,
                 on_handshake: Callable[[TLSServerConnection], None],
                 on_failure: Callable[[TLSServerConnection, str, Exception | None], None]) -> None:
        self.transport = transport
        self._conn = connection
        self.protocol = protocol
        self._on_handshake = on_handshake
        self._on_failure = on_failure
        self.handshake_done = False
        self._pending: list[bytes] = []
        self._paused = False
        self._read_closed = False
        self._eof_pending = False
        self._write_closed = False
        self._lost = False
        self._discarding = False
        """Closing with a linger (L{close_now}): what the client still sends is read and dropped."""
        self._linger_call: Any = None
        self._half_closeable = IHalfCloseableProtocol.providedBy(protocol)
        bios = memory_bios(connection) if _mem_data is not None else None
        self._in_bio: Any = bios[0] if bios is not None else None
        self._out_bio: Any = bios[1] if bios is not None else None
        self._sized = bios is not None
        # OpenSSL's record calls without pyOpenSSL's wrappers (about 1 µs a record each way);
        # whatever they do not finish is redone through the Connection, which raises as usual.
        self._rec = record_calls(connection) if self._sized else None

    # -- fed by the front door -------------------------------------------------------------

    def start(self, initial: bytes) -> None:
        self._conn.set_accept_state()
        self.raw_data_received(initial)

    def raw_data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        rec = self._rec
        written = rec.bio_write(data) if rec is not None else 0
        if written != len(data):
            self._conn.bio_write(data[written:] if written > 0 else data)
        if not self.handshake_done:
            self._advance_handshake()
        elif not self._paused:
            self._drain()

    def raw_read_connection_lost(self) -> None:
        """The peer's TCP FIN: whatever is in the BIO is all there will be."""
        if not self.handshake_done:
            self._fail("client_closed", None)
            return
        if self._discarding:  # the end of a lingering close: nothing is left unread
            self.transport.loseConnection()
            return
        # EOF without close_notify: a truncation by the strict reading of TLS, but clients that
        # half-close TCP directly are common; carry it as end-of-stream once every byte still
        # buffered has been delivered (which waits while the application has paused us).
        self._eof_pending = True
        self._drain()

    def raw_connection_lost(self, reason: Failure | None) -> None:
        if self._lost:
            return
        self._lost = True
        self.connected = False
        if self._linger_call is not None and self._linger_call.active():
            self._linger_call.cancel()
        self._linger_call = None
        if not self.handshake_done:
            self._on_failure(self, "client_closed", None)
            return
        self.protocol.connectionLost(reason)

    # -- TLS engine ----------------------------------------------------------------------

    def _advance_handshake(self) -> None:
        try:
            self._conn.do_handshake()
        except SSL.WantReadError:
            self._flush()
            return
        except SSL.Error as e:
            self._flush()  # carries the alert OpenSSL generated
            self._fail("tls_error", e)
            return
        self.handshake_done = True
        self._flush()  # Finished / NewSessionTicket
        self._on_handshake(self)
        if self._lost:
            return
        self.protocol.makeConnection(self)
        pending, self._pending = self._pending, []
        for chunk in pending:
            self.write(chunk)
        if not self._paused:
            self._drain()

    def _fail(self, reason: str, error: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self.connected = False
        self._on_failure(self, reason, error)
        self.transport.loseConnection()

    def _drain(self) -> None:
        conn = self._conn
        rec = self._rec
        read = rec.read if rec is not None else None
        recv = conn.recv
        pending = rec.pending if rec is not None else conn.pending
        sized = self._sized
        while not self._paused and not self._read_closed and not self._lost:
            if sized and not _mem_data(self._in_bio, _POINTER) and not pending():
                break  # nothing buffered: skip the failing read
            # Every record already buffered is handed over in one call (up to _DELIVER_SIZE):
            # one socket read of a bulk upload holds some sixteen, and each call costs the
            # protocol a write (a system call, for a splice) of its own.
            chunks: list[bytes] = []
            size = 0
            ending: str | None = None
            while size < _DELIVER_SIZE:
                data = read(_RECV_SIZE) if read is not None else None
                try:
                    if data is None:  # nothing from the direct call: pyOpenSSL says why
                        data = recv(_RECV_SIZE)
                except SSL.WantReadError:
                    break
                except SSL.ZeroReturnError:
                    ending = "close_notify"
                    break
                except SSL.Error:
                    ending = "error"
                    break
                chunks.append(data)
                size += len(data)
                if sized and not _mem_data(self._in_bio, _POINTER) and not pending():
                    break
            if chunks:
                # Looked up per call: a protocol may hand the connection over (a websocket
                # upgrade switches from the HTTP channel to a splice).
                self.protocol.dataReceived(chunks[0] if len(chunks) == 1 else b"".join(chunks))
            if ending == "close_notify":
                # close_notify: the peer will send nothing more; it may still read.
                if self._lost or self._read_closed:
                    return
                self._read_closed = True
                self._flush()
                self._deliver_read_closed()
                return
            if ending == "error":
                self._flush()
                self._lost = True
                self.transport.abortConnection()
                return
            if not chunks or size < _DELIVER_SIZE:
                break
        self._flush()
        if self._eof_pending and not self._paused and not self._read_closed and not self._lost:
            self._read_closed = True
            self._deliver_read_closed()

    def _deliver_read_closed(self) -> None:
        if self._half_closeable:
            self.protocol.readConnectionLost()
        else:
            self.loseConnection()

    def _flush(self) -> None:
        if self._sized:
            waiting = _mem_data(self._out_bio, _POINTER)
            if waiting:
                rec = self._rec
                write_now(self.transport, rec.bio_take(waiting) if rec is not None else self._conn.bio_read(waiting))
            return
        bio_read = self._conn.bio_read
        out = []
        while True:
            try:
                out.append(bio_read(_BIO_READ_SIZE))
            except SSL.WantReadError:
                break
        if out:
            write_now(self.transport, out[0] if len(out) == 1 else b"".join(out))

    # -- ITransport for the application protocol -----------------------------------------

    def write(self, data: bytes) -> None:
        if not self.handshake_done:
            self._pending.append(data)
            return
        if self._write_closed or self._lost or not data:
            return
        rec = self._rec
        if rec is not None and type(data) is bytes:
            sent = rec.write(data)
            if sent == len(data):
                self._flush()
                return
            if sent > 0:
                data = data[sent:]
        send = self._conn.send
        view = memoryview(data).cast("B")  # counted in bytes, as send() counts what it took
        try:
            while view:
                sent = send(view)
                view = view[sent:]
        except SSL.Error:
            self._lost = True
            self.transport.abortConnection()
            return
        self._flush()

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseWriteConnection(self) -> None:
        """Send close_notify and shut the TCP write side; keep reading."""
        if self._write_closed or self._lost:
            return
        self._send_close_notify()
        lose_write_now(self.transport)

    def loseConnection(self) -> None:
        self._close(False)

    def close_now(self, linger: float = 30.0) -> None:
        """
        L{loseConnection} for a caller that touches nothing of the connection after closing
        it (the splice; the HTTP fronts keep C{loseConnection}).

        When the client may still be sending (L{_unread_input}), the close lingers: closing a
        socket whose peer's bytes are still unread in the kernel makes the close a reset,
        which throws away whatever of ours the client has not read yet (the tail of a relayed
        stream).  close_notify and a FIN go out after everything queued, what the client still
        sends is read and dropped, and the connection closes at the client's FIN, or is cut
        after C{linger} seconds.  Otherwise the TCP connection is closed on the spot if
        nothing is left queued on it (L{twisted_gateway._compat.close_now}), and the
        protocol's C{connectionLost} runs before this returns.
        """
        if self._unread_input():
            self._linger(linger)
        else:
            self._close(True)

    def _unread_input(self) -> bool:
        """Whether the client may have sent bytes the gateway has not read: it has not ended
        its side, and either reading was paused or the kernel holds bytes of its (FIONREAD)."""
        if self._read_closed or self._eof_pending or not self.handshake_done or self._lost:
            return False
        if self._paused:
            return True
        if fcntl is None:
            return False
        try:
            handle: Any = getattr(self.transport, "getHandle")()  # the TCP socket (ITCPTransport)
            raw = fcntl.ioctl(handle.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except (AttributeError, OSError, ValueError, TypeError):
            return False  # not a socket (a test's transport), or already closed
        return bool(struct.unpack("i", raw)[0])

    def _linger(self, linger: float) -> None:
        reactor = getattr(self.transport, "reactor", None)
        if self.disconnecting or self._lost or reactor is None:
            self._close(False)
            return
        self.disconnecting = True
        self._discarding = True
        self._send_close_notify()
        transport = self.transport
        lose_write_now(transport)
        self._paused = False
        transport.resumeProducing()
        self._linger_call = reactor.callLater(linger, self._linger_over)

    def _linger_over(self) -> None:
        self._linger_call = None
        if not self._lost:
            self.transport.abortConnection()

    def _close(self, now: bool) -> None:
        if self.disconnecting or self._lost:
            return
        self.disconnecting = True
        if not self.handshake_done:
            self.transport.abortConnection()
            return
        self._send_close_notify()
        if now:
            close_now(self.transport)
        else:
            self.transport.loseConnection()

    def abortConnection(self) -> None:
        self.disconnecting = True
        self.transport.abortConnection()

    def _send_close_notify(self) -> None:
        """close_notify, once: nothing more is written after it."""
        if not self._write_closed:
            self._write_closed = True
            try:
                self._conn.shutdown()
            except SSL.Error:
                pass
            self._flush()

    def switch_protocol(self, protocol: Any) -> None:
        """Hand the connection to another application protocol (after an HTTP upgrade)."""
        self.protocol = protocol
        self._half_closeable = IHalfCloseableProtocol.providedBy(protocol)
        protocol.makeConnection(self)

    def getPeer(self) -> IPv4Address | IPv6Address:
        # Asked once per HTTP request by twisted.web; the TCP transport makes a system call
        # and a new address object each time, so keep the first answer.
        if self.peer is None:
            self.peer = self.transport.getPeer()
        return self.peer

    def getHost(self) -> IPv4Address | IPv6Address:
        return self.transport.getHost()

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.transport.setTcpNoDelay(enabled)

    def getTcpNoDelay(self) -> bool:
        return self.transport.getTcpNoDelay()

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.transport.setTcpKeepAlive(enabled)

    def getTcpKeepAlive(self) -> bool:
        return self.transport.getTcpKeepAlive()

    def getHandle(self) -> SSL.Connection:
        return self._conn

    def getPeerCertificate(self) -> Any:
        return self._conn.get_peer_certificate()

    @property
    def negotiatedProtocol(self) -> bytes | None:
        proto = self._conn.get_alpn_proto_negotiated()
        return proto or None

    @property
    def server_name(self) -> str | None:
        name = self._conn.get_servername()
        return name.decode("ascii") if name else None

    # -- producer / consumer ---------------------------------------------------------------

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        self._paused = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if not self._paused:
            return
        self._paused = False
        self.transport.resumeProducing()
        if self.handshake_done and not self._lost:
            self._drain()

    def stopProducing(self) -> None:
        # The consumer this connection fed is gone (a splice's shard connection): the splice
        # ends, and the client may still be sending, so the close lingers (close_now).
        self.close_now()


__all__ = ["TLSServerConnection", "ConnectionDone", "ConnectionLost"]
