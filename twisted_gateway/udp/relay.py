"""
The datagram relay: one L{Session} per client address and port, each with a connected upstream
UDP socket of its own, so the shard's replies come back on the socket that says which client
they are for, and the kernel drops datagrams from anyone but the shard.

L{UDPRouteDoor} is a UDP route's listener (its target fixed by the configuration);
L{QUICDoor} is the QUIC listener, which buffers a new client's datagrams until its Initial
packets hold a ClientHello (L{twisted_gateway.udp.quic.InitialReader}), routes by its SNI and
then relays every datagram of the flow as the client sent it.  Both keep their sessions in
least-recently-used order: the idle sweep ends those past the idle timeout from the front, and
a full table evicts the longest idle.
"""

from __future__ import annotations

import collections
import ipaddress
from typing import Any, Optional

import attrs
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from twisted_gateway import metrics
from twisted_gateway.clienthello import ClientHello, HelloError
from twisted_gateway.directory.interfaces import IShardDirectory
from twisted_gateway.directory.model import Route
from twisted_gateway.names import ShardName
from twisted_gateway.udp import quic
from twisted_gateway.udp.decide import DatagramPolicy, DatagramRoute, Drop, decide_quic, decide_udp

Address = tuple[str, int]

MAX_CIDS_PER_SESSION = 8
"""Connection IDs remembered per QUIC flow (the client's first and the server's, from its
long-header packets)."""

MAX_PATHS_PER_FLOW = 4
"""Client addresses one QUIC flow may be relayed for at once (its first and those it migrated
to, each with its own upstream socket)."""

AMPLIFICATION_FACTOR = 3
"""RFC 9000 8.1: until a client address is validated, at most three times the bytes received
from it are sent to it."""

MIN_LOOKUP_CID = 4
"""Shorter server connection IDs are not used to find a flow from a new address: a byte or two
would match other flows' datagrams."""


@attrs.frozen
class DatagramSettings:
    """The settings of one door, replaced as a whole on reload (open sessions keep going)."""

    idle_timeout: float = 60.0
    max_sessions: int = 10000
    max_datagram_bytes: int = 8192
    access_log: bool = True
    pending_datagrams: int = 8
    max_pending: int = 1000
    pending_timeout: float = 5.0
    max_hello_bytes: int = 32768


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class Session(DatagramProtocol):
    """The upstream side of one client flow: a UDP socket connected to the shard's port."""

    noisy = False

    def __init__(self, door: DatagramDoor, client: Address, route: Route, now: float) -> None:
        self.door = door
        self.client = client
        self.route = route
        self.series = metrics.datagram_route_series(door.protocol_name, route)
        self.started = now
        self.last = now
        self.port: Any = None
        self.queue: Optional[list[bytes]] = None
        """Datagrams held while the shard's host name resolves."""
        self.flow: Optional[Flow] = None
        """QUIC: the connection this client address is a path of."""
        self.validated = True
        """False while a QUIC client address has not shown it receives what it is sent (it
        has not named a connection ID only the shard's answers carry): the shard's datagrams to
        it are held to L{AMPLIFICATION_FACTOR} times what it sent."""
        self.up = self.down = self.up_bytes = self.down_bytes = 0
        self.closed = False

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.door.from_upstream(self, datagram)

    def connectionRefused(self) -> None:
        # ICMP port unreachable from the shard: the datagram was lost; the client retries.
        self.door.count_drop("upstream_refused")

    def send(self, datagram: bytes) -> None:
        if self.queue is not None:
            if len(self.queue) < self.door.settings.pending_datagrams:
                self.queue.append(datagram)
            else:
                self.door.count_drop("pending_full")
            return
        self.up += 1
        self.up_bytes += len(datagram)
        self.series.up.inc()
        self.series.up_bytes.inc(len(datagram))
        if self.port is None:
            return
        try:
            self.port.write(datagram)
        except OSError:
            self.door.count_drop("send_failed")

    def close(self) -> None:
        self.closed = True
        if self.port is not None:
            port, self.port = self.port, None
            port.stopListening()


class DatagramDoor(DatagramProtocol):
    """What a UDP route's listener and the QUIC listener share: the session table, its idle
    sweep and bound, and the relay of the shard's replies."""

    log = Logger()
    noisy = False
    protocol_name = "udp"

    def __init__(self, reactor: Any, name: str, directory: IShardDirectory,
                 settings: DatagramSettings, policy: DatagramPolicy) -> None:
        self.reactor = reactor
        self.name = name
        self.directory = directory
        self.settings = settings
        self.policy = policy
        self.sessions: collections.OrderedDict[Address, Session] = collections.OrderedDict()
        self.active = metrics.UDP_SESSIONS_ACTIVE.labels(listener=name)
        self._drops: dict[str, Any] = {}
        self._sweeper: Optional[LoopingCall] = None

    # -- life -----------------------------------------------------------------------------------

    def configure(self, settings: DatagramSettings, policy: DatagramPolicy) -> None:
        """A reload's settings: new sessions and the next sweep use them; open sessions stay."""
        interval_changed = settings.idle_timeout != self.settings.idle_timeout
        self.settings = settings
        self.policy = policy
        if interval_changed and self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
            self._start_sweeper()

    def _sweep_interval(self) -> float:
        return max(0.05, min(self.settings.idle_timeout / 4, 5.0,
                             self.settings.pending_timeout / 4))

    def _start_sweeper(self) -> None:
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = self.reactor
        self._sweeper.start(self._sweep_interval(), now=False)

    def startProtocol(self) -> None:
        self._start_sweeper()

    def stopProtocol(self) -> None:
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        self.close_all("stopped")

    def close_all(self, reason: str) -> None:
        for session in list(self.sessions.values()):
            self.close_session(session, reason)

    @property
    def udp(self) -> Any:
        """The listening port (the transport, typed for its write(datagram, address))."""
        return self.transport

    # -- counting -------------------------------------------------------------------------------

    def count_drop(self, reason: str, datagrams: int = 1) -> None:
        child = self._drops.get(reason)
        if child is None:
            child = self._drops[reason] = metrics.UDP_DROPPED.labels(listener=self.name, reason=reason)
        child.inc(datagrams)

    # -- datagrams ------------------------------------------------------------------------------

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        client = (addr[0], addr[1])
        if len(datagram) > self.settings.max_datagram_bytes:
            self.count_drop("too_large")
            return
        session = self.sessions.get(client)
        if session is not None:
            session.last = self.reactor.seconds()
            self.sessions.move_to_end(client)
            if not session.validated:
                self.check_validation(session, datagram)
            session.send(datagram)
            return
        self.new_client(datagram, client)

    def check_validation(self, session: Session, datagram: bytes) -> None:
        """QUIC: whether this datagram of an unvalidated client proves its address."""

    def new_client(self, datagram: bytes, client: Address) -> None:
        raise NotImplementedError

    def from_upstream(self, session: Session, datagram: bytes) -> None:
        if session.closed:
            return
        if len(datagram) > self.settings.max_datagram_bytes:
            self.count_drop("too_large")
            return
        session.last = self.reactor.seconds()
        if self.sessions.get(session.client) is session:
            self.sessions.move_to_end(session.client)
        session.down += 1
        session.down_bytes += len(datagram)
        session.series.down.inc()
        session.series.down_bytes.inc(len(datagram))
        try:
            self.udp.write(datagram, session.client)
        except OSError:
            self.count_drop("send_failed")

    # -- sessions -------------------------------------------------------------------------------

    def open_session(self, client: Address, route: Route) -> Optional[Session]:
        """A new session for C{client} to C{route}'s port (evicting the longest idle session if
        the table is full), or None if no upstream socket could be made."""
        while len(self.sessions) >= self.settings.max_sessions:
            self.close_session(self.eviction_victim(), "evicted")
        now = self.reactor.seconds()
        session = Session(self, client, route, now)
        host, port = route.shard.address, route.port.target_port
        bind = "::" if ":" in host else ""
        try:
            session.port = self.reactor.listenUDP(0, session, interface=bind,
                                                  maxPacketSize=self.settings.max_datagram_bytes + 1)
            if _is_ip(host):
                session.port.connect(host, port)
            else:
                session.queue = []
                self.reactor.resolve(host).addCallbacks(
                    lambda ip: self._resolved(session, ip, port),
                    lambda failure: self._unresolved(session, failure))
        except OSError as e:
            self.log.error("cannot open an upstream socket to {host}:{port}: {error}",
                           host=host, port=port, error=str(e))
            if session.port is not None:
                session.close()
            metrics.UDP_SESSIONS_CLOSED.labels(protocol=self.protocol_name, reason="upstream_error").inc()
            return None
        self.sessions[client] = session
        self.active.inc()
        session.series.sessions.inc()
        self.log.debug("{listener}: session {client} to {shard}:{port}", listener=self.name,
                       client=f"{client[0]}:{client[1]}", shard=route.shard.id, port=route.port.port)
        return session

    def _resolved(self, session: Session, ip: str, port: int) -> None:
        if session.closed:
            return
        queue, session.queue = session.queue or [], None
        try:
            session.port.connect(ip, port)
        except (OSError, ValueError):
            self.close_session(session, "upstream_error")
            return
        for datagram in queue:
            session.send(datagram)

    def _unresolved(self, session: Session, failure: Any) -> None:
        self.log.warn("{listener}: cannot resolve {host}: {error}", listener=self.name,
                      host=session.route.shard.address, error=failure.getErrorMessage())
        if not session.closed:
            self.close_session(session, "upstream_error")

    def close_session(self, session: Session, reason: str) -> None:
        if session.closed:
            return
        if self.sessions.get(session.client) is session:
            del self.sessions[session.client]
        session.close()
        self.forget(session)
        self.active.dec()
        metrics.UDP_SESSIONS_CLOSED.labels(protocol=self.protocol_name, reason=reason).inc()
        if self.settings.access_log:
            self.log.info(
                "{protocol} {client} {shard}:{port} {reason} up {up} datagrams {up_bytes} bytes, "
                "down {down} datagrams {down_bytes} bytes, {duration:.3f}s",
                protocol=self.protocol_name, client=f"{session.client[0]}:{session.client[1]}",
                shard=session.route.shard.id, port=session.route.port.port, reason=reason,
                up=session.up, up_bytes=session.up_bytes, down=session.down,
                down_bytes=session.down_bytes, duration=self.reactor.seconds() - session.started,
                event_kind="udp_access", listener=self.name)

    def eviction_victim(self) -> Session:
        """The session a full table ends for a new one: the longest idle."""
        return next(iter(self.sessions.values()))

    def forget(self, session: Session) -> None:
        """Drop what else refers to a closed session (QUIC: its connection IDs)."""

    def sweep(self) -> None:
        """End the sessions idle for longer than the idle timeout (the table is in
        least-recently-used order, so they are at its front)."""
        deadline = self.reactor.seconds() - self.settings.idle_timeout
        while self.sessions:
            _, oldest = next(iter(self.sessions.items()))
            if oldest.last > deadline:
                break
            self.close_session(oldest, "idle")


class UDPRouteDoor(DatagramDoor):
    """A UDP route's listener: every new client goes to the configured target."""

    def __init__(self, reactor: Any, target: ShardName, directory: IShardDirectory,
                 settings: DatagramSettings, policy: DatagramPolicy, name: str) -> None:
        super().__init__(reactor, name, directory, settings, policy)
        self.target = target

    def retarget(self, target: ShardName, name: str) -> None:
        """A reload points this listener elsewhere: new sessions go there, open ones stay."""
        self.active.dec(len(self.sessions))
        self.target, self.name = target, name
        self.active = metrics.UDP_SESSIONS_ACTIVE.labels(listener=name)
        self.active.inc(len(self.sessions))
        self._drops = {}

    def new_client(self, datagram: bytes, client: Address) -> None:
        decision = decide_udp(self.target, client[0], self.directory.current(), self.policy)
        if isinstance(decision, Drop):
            self.count_drop(decision.reason)
            return
        session = self.open_session(client, decision.route)
        if session is not None:
            session.send(datagram)


@attrs.define(eq=False)
class Flow:
    """One QUIC connection as the gateway knows it: its shard, the connection IDs it is known
    by, and its paths (a L{Session} per client address, each with an upstream socket of its
    own, so the shard sees a client that moved as a new address and validates it itself,
    RFC 9000 9)."""

    route: Route
    cids: list[bytes] = attrs.field(factory=list)
    server_cids: set[bytes] = attrs.field(factory=set)
    """The IDs the shard chose: a client naming one has seen the shard's answers."""
    paths: list[Session] = attrs.field(factory=list)

    def names_server_cid(self, datagram: bytes) -> bool:
        if not self.server_cids or len(datagram) < 2:
            return False
        if datagram[0] & 0x80:
            length = datagram[5] if len(datagram) > 5 else 0
            return datagram[6:6 + length] in self.server_cids
        return any(datagram.startswith(cid, 1) for cid in self.server_cids)


@attrs.define
class _Pending:
    """A new QUIC client whose ClientHello is not complete yet."""

    reader: quic.InitialReader
    started: float
    datagrams: list[bytes] = attrs.field(factory=list)


class QUICDoor(DatagramDoor):
    """The QUIC listener: a new client's flow is routed by the SNI of its Initial packets."""

    protocol_name = "quic"

    def __init__(self, reactor: Any, directory: IShardDirectory, settings: DatagramSettings,
                 policy: DatagramPolicy) -> None:
        super().__init__(reactor, "quic", directory, settings, policy)
        self.pending: collections.OrderedDict[Address, _Pending] = collections.OrderedDict()
        self.by_cid: dict[bytes, Flow] = {}
        self.cid_lengths: set[int] = set()
        self.unvalidated: collections.OrderedDict[Address, Session] = collections.OrderedDict()
        """The sessions whose client has not proven its address, oldest first: a full table
        ends these first, so a flood of spoofed Initials cannot push out established flows."""

    def _set_pending_gauge(self) -> None:
        metrics.QUIC_PENDING.set(len(self.pending))

    def new_client(self, datagram: bytes, client: Address) -> None:
        if not datagram:
            self.count_drop("not_quic")
            return
        pending = self.pending.get(client)
        if pending is not None:
            self._more(pending, datagram, client)
            return
        if not datagram[0] & 0x80:
            # A short header from an address without a flow: a client whose address changed
            # (a NAT rebinding) still names the server's connection ID.
            flow = self._flow_by_short_cid(datagram)
            if flow is None:
                self.count_drop("unknown_connection")
                return
            self._new_path(flow, client, datagram)
            return
        try:
            header = quic.parse_long_header(datagram)
        except quic.QuicDrop as e:
            self.count_drop(e.reason)
            return
        if header.version != 0 and header.dcid in self.by_cid:
            self._new_path(self.by_cid[header.dcid], client, datagram)
            return
        if header.packet_type == "unknown":
            if len(datagram) >= quic.MIN_INITIAL_DATAGRAM:
                # RFC 9000 6.1: answer a version the gateway cannot read with the ones it can;
                # smaller than the datagram that asked, so it amplifies nothing.
                self._write(quic.version_negotiation(header), client)
                metrics.QUIC_VERSION_NEGOTIATIONS.inc()
            self.count_drop("unsupported_version")
            return
        if len(self.pending) >= self.settings.max_pending:
            self.count_drop("pending_full")
            return
        pending = _Pending(quic.InitialReader(self.settings.max_hello_bytes), self.reactor.seconds())
        try:
            result = pending.reader.feed(datagram)
        except quic.QuicDrop as e:
            self.count_drop(e.reason)
            return
        pending.datagrams.append(datagram)
        self.pending[client] = pending
        self._set_pending_gauge()
        self._result(pending, result, client)

    def _more(self, pending: _Pending, datagram: bytes, client: Address) -> None:
        if len(pending.datagrams) >= self.settings.pending_datagrams:
            self.count_drop("pending_full")
            return
        try:
            result = pending.reader.feed(datagram)
        except quic.QuicDrop as e:
            if e.reason == "not_initial" and self._same_connection(pending, datagram):
                pending.datagrams.append(datagram)  # 0-RTT or the like: relayed once routed
            else:
                self.count_drop(e.reason)
            return
        pending.datagrams.append(datagram)
        self._result(pending, result, client)

    @staticmethod
    def _same_connection(pending: _Pending, datagram: bytes) -> bool:
        try:
            return quic.parse_long_header(datagram).dcid == pending.reader.dcid
        except quic.QuicDrop:
            return False

    def _result(self, pending: _Pending, result: Any, client: Address) -> None:
        if isinstance(result, ClientHello):
            del self.pending[client]
            self._set_pending_gauge()
            decision = decide_quic(result, client[0], self.directory.current(), self.policy)
            if isinstance(decision, Drop):
                self.log.debug("quic: {client} refused: {reason} ({detail})",
                               client=f"{client[0]}:{client[1]}", reason=decision.reason,
                               detail=decision.detail)
                self.count_drop(decision.reason, len(pending.datagrams))
                return
            assert isinstance(decision, DatagramRoute)
            session = self.open_session(client, decision.route)
            if session is None:
                return
            flow = Flow(decision.route)
            self._join(session, flow, validated=False)
            if pending.reader.dcid:
                self._remember_cid(flow, pending.reader.dcid)
            for datagram in pending.datagrams:
                session.send(datagram)
        elif isinstance(result, HelloError):
            del self.pending[client]
            self._set_pending_gauge()
            self.count_drop(result.reason, len(pending.datagrams))

    def _write(self, datagram: bytes, client: Address) -> None:
        try:
            self.udp.write(datagram, client)
        except OSError:
            self.count_drop("send_failed")

    # -- connection IDs -------------------------------------------------------------------------

    def _flow_by_short_cid(self, datagram: bytes) -> Optional[Flow]:
        for length in sorted(self.cid_lengths, reverse=True):
            flow = self.by_cid.get(datagram[1:1 + length])
            if flow is not None and len(datagram) > length:
                return flow
        return None

    def _join(self, session: Session, flow: Flow, validated: bool) -> None:
        session.flow = flow
        flow.paths.append(session)
        session.validated = validated
        if not validated:
            self.unvalidated[session.client] = session

    def _new_path(self, flow: Flow, client: Address, datagram: bytes) -> None:
        """A datagram naming a known flow's connection ID from an address the flow has no path
        for: a client that moved (a NAT rebinding, a new network), or anyone who learned the
        ID.  It gets a path of its own, with its own upstream socket: the shard sees a new
        address and validates it (RFC 9000 9.3) before it moves the connection there, and the
        flow's other paths, and where their replies go, are untouched."""
        live = [p for p in flow.paths if not p.closed]
        if len(live) >= MAX_PATHS_PER_FLOW:
            self.count_drop("too_many_paths")
            return
        session = self.open_session(client, flow.route)
        if session is None:
            return
        self.log.debug("quic: a flow of {old} is also seen from {new}",
                       old=", ".join(f"{p.client[0]}:{p.client[1]}" for p in live),
                       new=f"{client[0]}:{client[1]}")
        self._join(session, flow, validated=flow.names_server_cid(datagram))
        session.send(datagram)

    def check_validation(self, session: Session, datagram: bytes) -> None:
        if session.flow is not None and session.flow.names_server_cid(datagram):
            session.validated = True
            self.unvalidated.pop(session.client, None)

    def _remember_cid(self, flow: Flow, cid: bytes, server: bool = False) -> None:
        if server:
            flow.server_cids.add(cid)
        owner = self.by_cid.get(cid)
        if owner is not None or len(flow.cids) >= MAX_CIDS_PER_SESSION:
            return  # a shard cannot take over another flow's ID by announcing it
        if server and len(cid) < MIN_LOOKUP_CID:
            return
        flow.cids.append(cid)
        self.by_cid[cid] = flow
        self.cid_lengths.add(len(cid))

    def eviction_victim(self) -> Session:
        for session in self.unvalidated.values():
            return session
        return super().eviction_victim()

    def from_upstream(self, session: Session, datagram: bytes) -> None:
        if session.closed:
            return
        if datagram and datagram[0] & 0x80 and session.flow is not None:
            # The server's long headers carry the connection IDs its client will use.
            for cid in quic.server_connection_ids(datagram):
                self._remember_cid(session.flow, cid, server=True)
        if not session.validated and (session.down_bytes + len(datagram)
                                      > AMPLIFICATION_FACTOR * session.up_bytes):
            # A client address that never showed it reads the answers (a spoofed Initial):
            # the gateway does not become the shard's amplifier towards it.
            self.count_drop("amplification_limit")
            return
        super().from_upstream(session, datagram)

    def forget(self, session: Session) -> None:
        self.unvalidated.pop(session.client, None)
        flow = session.flow
        if flow is None:
            return
        if session in flow.paths:
            flow.paths.remove(session)
        if flow.paths:
            return
        for cid in flow.cids:
            if self.by_cid.get(cid) is flow:
                del self.by_cid[cid]
        if not self.by_cid:
            self.cid_lengths.clear()

    def sweep(self) -> None:
        super().sweep()
        deadline = self.reactor.seconds() - self.settings.pending_timeout
        while self.pending:
            client, oldest = next(iter(self.pending.items()))
            if oldest.started > deadline:
                break
            del self.pending[client]
            self.count_drop("pending_timeout", len(oldest.datagrams))
        self._set_pending_gauge()

    def stopProtocol(self) -> None:
        super().stopProtocol()
        self.pending.clear()
        self._set_pending_gauge()


__all__ = ["DatagramDoor", "DatagramSettings", "Flow", "QUICDoor", "Session", "UDPRouteDoor"]
