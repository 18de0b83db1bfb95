"""
The built-in demo shard, served when no directory file is configured.

Two small services run inside the gateway process on loopback ports chosen by the kernel: a
TCP echo service exposed as port 7 and an HTTP "hello" page exposed as port 80 of the shard
``demo``, so that ``demo-7.<hostname>`` and ``demo-80.<hostname>`` work out of the box.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site

from twisted_gateway.directory.interfaces import ShardDirectory
from twisted_gateway.directory.model import DirectorySnapshot, Shard, ShardPort


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"Hello from the twisted-gateway demo shard!\n"


class DemoService(Service):
    log = Logger()

    def __init__(self, reactor: Any, directory: ShardDirectory, hostname: str) -> None:
        self.reactor = reactor
        self.directory = directory
        self.hostname = hostname
        self._ports: list[Any] = []

    def startService(self) -> None:
        super().startService()
        echo_factory = Factory.forProtocol(Echo)
        echo_factory.noisy = False
        echo_port = self.reactor.listenTCP(0, echo_factory, interface="127.0.0.1")
        site = Site(Hello())
        site.noisy = False
        site.log = lambda request: None  # type: ignore[method-assign]  # no access log line per request
        web_port = self.reactor.listenTCP(0, site, interface="127.0.0.1")
        self._ports = [echo_port, web_port]
        shard = Shard(
            id="demo-0", task="demo/demo", hostname_label="demo", address="127.0.0.1",
            labels={"app": "demo"}, primary=True,
            ports=(ShardPort(7, "tcp", True, echo_port.getHost().port),
                   ShardPort(80, "http/1.1", True, web_port.getHost().port)))
        self.directory.publish(DirectorySnapshot([shard]), "the built-in demo")
        self.log.warn("no directory file configured: serving the built-in demo shard as "
                      "demo-7.{hostname} (TCP echo) and demo-80.{hostname} (HTTP)",
                      hostname=self.hostname)

    def stopService(self) -> Any:
        super().stopService()
        for port in self._ports:
            port.stopListening()
        self._ports = []
