"""
The UDP listeners of one gateway process: one per UDP route (udp.routes) and the QUIC listener
(quic.listen), bound in privilegedStartService and changed in place by a reload.

A reload keeps every listener whose address is unchanged, with its open sessions: only new
sessions see the new target or settings.  A route removed from the configuration is stopped
(its sessions end, counted as ``removed``); a new one is bound.

With several workers only worker 0 runs these (L{runs_here}): a UDP socket cannot be shared
for accept the way the TLS listener is, and one process keeps every flow's client address and
connection IDs in one table.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from twisted.application.service import Service
from twisted.logger import Logger

from twisted_gateway.config import GatewayConfig, parse_udp_listen
from twisted_gateway.directory.interfaces import IShardDirectory
from twisted_gateway.names import ShardName, parse_name
from twisted_gateway.udp.decide import DatagramPolicy, make_policy
from twisted_gateway.udp.relay import DatagramDoor, DatagramSettings, QUICDoor, UDPRouteDoor


def runs_here(worker: Optional[int]) -> bool:
    """Whether this process holds the UDP listeners: a single process, or worker 0."""
    return worker is None or worker == 0


def udp_settings(config: GatewayConfig) -> DatagramSettings:
    udp = config.udp
    return DatagramSettings(idle_timeout=udp.idle_timeout, max_sessions=udp.max_sessions,
                            max_datagram_bytes=udp.max_datagram_bytes,
                            access_log=config.log.access_log)


def quic_settings(config: GatewayConfig) -> DatagramSettings:
    q = config.quic
    return DatagramSettings(idle_timeout=q.idle_timeout, max_sessions=q.max_flows,
                            max_datagram_bytes=q.max_datagram_bytes, access_log=config.log.access_log,
                            pending_datagrams=q.pending_datagrams, max_pending=q.max_pending,
                            pending_timeout=q.pending_timeout,
                            max_hello_bytes=config.tls.max_client_hello_bytes)


def policy_of(config: GatewayConfig) -> DatagramPolicy:
    return make_policy(config.hostname, config.limits.allow, config.limits.deny)


def target_name(target: str, hostname: str) -> ShardName:
    parsed = parse_name(f"{target}.{hostname}", hostname)
    assert isinstance(parsed, ShardName)  # checked when the configuration was loaded
    return parsed


class DatagramService(Service):
    log = Logger()

    def __init__(self, config: GatewayConfig, reactor: Any, directory: IShardDirectory,
                 tls_listener: Any) -> None:
        self.setName("udp")
        self.config = config
        self.reactor = reactor
        self.directory = directory
        self.tls_listener = tls_listener
        self.routes: dict[tuple[str, int], tuple[UDPRouteDoor, Any]] = {}
        """(listen description, its ordinal among equal ones) -> (door, port): routes on port 0
        may share a description, and are told apart by their order."""
        self.quic: Optional[tuple[QUICDoor, Any, str]] = None
        """(door, port, the address it was bound for)"""
        self.bound = False

    # -- binding --------------------------------------------------------------------------------

    def _bind(self, door: DatagramDoor, port: int, interface: str, what: str, fatal: bool) -> Any:
        try:
            listening = self.reactor.listenUDP(port, door, interface=interface,
                                               maxPacketSize=door.settings.max_datagram_bytes + 1)
        except Exception as e:  # noqa: BLE001 - CannotListenError and OSError alike
            message = f"gateway: cannot listen for {what} on udp {interface or '*'}:{port}: {e}"
            if fatal:
                sys.stderr.write(message + "\n")
                raise SystemExit(1)
            self.log.error("{message}", message=message)
            return None
        host = listening.getHost()
        self.log.info("{listener} listener on udp {host}:{port}", listener=door.name, host=host.host,
                      port=host.port, event_kind="listening_udp")
        return listening

    def _quic_address(self, config: GatewayConfig) -> Optional[tuple[int, str]]:
        listen = config.quic.listen
        if listen == "off":
            return None
        if listen != "auto":
            return parse_udp_listen(listen)
        port = getattr(self.tls_listener, "port", None)
        host = port.getHost() if port is not None else None
        if host is None or not hasattr(host, "port"):
            self.log.warn("quic.listen: auto needs a TLS listener on an IP port; QUIC is off")
            return None
        interface = host.host if host.host not in ("0.0.0.0", "::") else ("::" if host.host == "::" else "")
        return host.port, interface

    @staticmethod
    def _keyed(config: GatewayConfig) -> dict[tuple[str, int], str]:
        """Each route's key (L{routes}) and target."""
        seen: dict[str, int] = {}
        out = {}
        for r in config.udp.routes:
            n = seen[r.listen] = seen.get(r.listen, -1) + 1
            out[(r.listen, n)] = r.target
        return out

    def _bind_route(self, config: GatewayConfig, key: tuple[str, int], target: str, fatal: bool) -> None:
        port, interface = parse_udp_listen(key[0])
        door = UDPRouteDoor(self.reactor, target_name(target, config.hostname), self.directory,
                            udp_settings(config), policy_of(config), name=target)
        listening = self._bind(door, port, interface, f"udp route {target}", fatal)
        if listening is not None:
            self.routes[key] = (door, listening)

    def _bind_quic(self, config: GatewayConfig, fatal: bool) -> None:
        address = self._quic_address(config)
        if address is None:
            return
        door = QUICDoor(self.reactor, self.directory, quic_settings(config), policy_of(config))
        # QUIC on the TLS port's number is a default nobody asked for: the UDP port being taken
        # is an error in the log, not a gateway that does not start.  An explicit listen is fatal.
        fatal = fatal and config.quic.listen != "auto"
        listening = self._bind(door, address[0], address[1], "quic", fatal)
        if listening is not None:
            self.quic = (door, listening, f"{address[1]}:{address[0]}")

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._start()

    def _start(self) -> None:
        if self.bound:
            return
        self.bound = True
        for key, target in self._keyed(self.config).items():
            self._bind_route(self.config, key, target, fatal=True)
        self._bind_quic(self.config, fatal=True)

    def startService(self) -> None:
        self._start()
        super().startService()

    def stopService(self) -> Any:
        super().stopService()
        for door, port in self.routes.values():
            port.stopListening()
        self.routes.clear()
        if self.quic is not None:
            self.quic[1].stopListening()
            self.quic = None
        self.bound = False
        return None

    # -- reload ---------------------------------------------------------------------------------

    def reconfigure(self, config: GatewayConfig) -> None:
        """Apply a reloaded configuration (see the module's docstring)."""
        self.config = config
        if not self.bound:
            return
        wanted = self._keyed(config)
        for key in [k for k in self.routes if k not in wanted]:
            door, port = self.routes.pop(key)
            door.close_all("removed")
            port.stopListening()
            self.log.info("udp route {target} on {listen} removed", target=door.name, listen=key[0])
        for key, target in wanted.items():
            entry = self.routes.get(key)
            if entry is None:
                self._bind_route(config, key, target, fatal=False)
                continue
            door = entry[0]
            if door.name != target:
                # The same listener now leads elsewhere: open sessions keep their shard.
                door.retarget(target_name(target, config.hostname), target)
            door.configure(udp_settings(config), policy_of(config))
        address = self._quic_address(config)
        where = None if address is None else f"{address[1]}:{address[0]}"
        if self.quic is not None and self.quic[2] != where:
            door_q, port_q, _ = self.quic
            port_q.stopListening()
            self.quic = None
        if self.quic is None:
            if where is not None:
                self._bind_quic(config, fatal=False)
        else:
            self.quic[0].configure(quic_settings(config), policy_of(config))


__all__ = ["DatagramService", "runs_here"]
