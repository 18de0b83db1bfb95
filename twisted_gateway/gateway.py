"""
Wiring: one L{Gateway} holds the configuration, the directory, the certificate contexts and the
listeners, and builds the service tree that twistd runs.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.logger import ILogObserver, Logger

from twisted_gateway import logs
from twisted_gateway.admin import AdminApp
from twisted_gateway.config import GatewayConfig
from twisted_gateway.directory.file import FileDirectoryProvider
from twisted_gateway.directory.interfaces import ShardDirectory
from twisted_gateway.frontdoor import FrontDoorFactory
from twisted_gateway.http.auth import TokenVerifier
from twisted_gateway.http.proxy import HTTPRouteContext, proxy_site
from twisted_gateway.http.api import GatewayAPI, openapi_document
from twisted_gateway.http.errors import error_site, quiet_site
from twisted_gateway.tls.contexts import ContextCache, LocalCASource, StaticFileSource, load_client_ca
from twisted_gateway.directory.model import Route
from twisted_gateway.names import GatewayHost, ShardName, parse_name
from twisted_gateway.tls.acme.challenges import (
    ExecResponder, HTTP01Responder, RFC2136Responder, TLSALPN01Responder,
)
from twisted_gateway.tls.acme.client import AcmeIssuer
from twisted_gateway.tls.acme.manager import AcmeCertificateSource
from twisted_gateway.tls.acme.store import DiskCertificateStore
from twisted_gateway.tls.files import ensure_private_dir
from twisted_gateway.tls.localca import LocalCA


class ListenerService(Service):
    """Listen on an endpoint description in privilegedStartService; record the bound address."""

    log = Logger()

    def __init__(self, name: str, reactor: Any, description: str, factory: Any) -> None:
        self.name = name
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        endpoint = serverFromString(self.reactor, self.description)
        results: list[Any] = []
        endpoint.listen(self.factory).addBoth(results.append)
        if not results:
            raise RuntimeError(f"{self.name} listener {self.description} did not bind synchronously")
        if not hasattr(results[0], "getHost"):
            message = f"gateway: cannot listen for {self.name} on {self.description}: " \
                      f"{results[0].getErrorMessage()}"
            sys.stderr.write(message + "\n")
            raise SystemExit(1)
        self.port = results[0]
        host = self.port.getHost()
        self.log.info("{listener} listener on {host}:{port}", listener=self.name,
                      host=getattr(host, "host", "?"), port=getattr(host, "port", "?"),
                      event_kind="listening")

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


class GatewayService(MultiService):
    """The root service; when parented to a twistd Application it installs the log observer."""

    def __init__(self, observer: Any, on_start: Any = None) -> None:
        super().__init__()
        self.observer = observer
        self.on_start = on_start

    def startService(self) -> None:
        super().startService()
        if self.on_start is not None:
            self.on_start()

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        if hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.observer)


class Gateway:
    log = Logger()

    def __init__(self, config: GatewayConfig, reactor: Any = None,
                 verifier: TokenVerifier | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.config = config
        self.reactor = reactor
        self.hostname = config.hostname
        self.directory = ShardDirectory()
        self.services: list[Service] = []
        ensure_private_dir(config.state_dir)
        client_ca = load_client_ca(config.tcp.client_ca) if config.tcp.client_ca else None
        self.local_ca: LocalCA | None = None
        source: Any
        if config.tls.certificate is not None:
            assert config.tls.private_key is not None
            source = StaticFileSource(config.tls.certificate, config.tls.private_key,
                                      config.tls.reload_interval)
            self.services.append(source)
        else:
            self.local_ca = LocalCA(config.state_dir)
            source = LocalCASource(self.local_ca, self.hostname)
        self.http01 = HTTP01Responder()
        self.tls_alpn = TLSALPN01Responder()
        self.acme: AcmeCertificateSource | None = None
        if config.acme.enabled:
            self.acme = self._make_acme(source)
            self.services.append(self.acme)
            source = self.acme
        self.contexts = ContextCache(source, client_ca=client_ca)
        self.http = HTTPRouteContext(
            reactor, self.hostname, verifier, config.tcp.connect_timeout, config.http.response_timeout,
            config.auth.signin_url, config.auth.cookie_name, config.auth.cookie_max_age,
            config.http.pool_size)
        self.api = GatewayAPI(self.directory, verifier, self.hostname, config.api.cors_allowed_origin,
                              lambda: openapi_document(self.hostname))
        self.api_site = quiet_site(self.api.resource())
        if config.directory.file is not None:
            self.services.append(FileDirectoryProvider(
                config.directory.file, self.directory, config.directory.poll_interval))
        else:
            from twisted_gateway.demo import DemoService
            self.services.append(DemoService(reactor, self.directory, self.hostname))
        self.tls_listener = ListenerService("tls", reactor, config.listen.tls, FrontDoorFactory(self))
        self.admin = AdminApp(self.readiness, self.http01)
        self.plain_listener = ListenerService("plain", reactor, config.listen.plain,
                                              quiet_site(self.admin.resource()))
        self.verifier = verifier
        if verifier is not None and verifier.jwks is not None:
            self.services.append(verifier.jwks)
        self.services += [self.tls_listener, self.plain_listener]

    def _make_acme(self, fallback: Any) -> AcmeCertificateSource:
        acme = self.config.acme
        store = DiskCertificateStore(self.config.state_dir)
        responders: dict[str, Any] = {"http-01": self.http01, "tls-alpn-01": self.tls_alpn}
        if acme.dns_provider == "exec" and acme.dns_exec:
            responders["dns-01"] = ExecResponder(acme.dns_exec, acme.dns_propagation_timeout)
        elif acme.dns_zone:
            host, _, port = acme.dns_server.rpartition(":")
            responders["dns-01"] = RFC2136Responder(
                host.strip("[]"), int(port), acme.dns_zone, acme.tsig_name, acme.tsig_secret,
                acme.tsig_algorithm, propagation_timeout=acme.dns_propagation_timeout)
        issuer = AcmeIssuer(acme.ca_server, acme.email, acme.key_type, acme.ca_bundle, store, responders)
        return AcmeCertificateSource(self.reactor, issuer, store, fallback, acme, self.hostname,
                                     self.name_is_routable)

    def name_is_routable(self, name: str) -> bool:
        """Whether C{name} is the gateway's or resolves to a shard: the on-demand policy."""
        parsed = parse_name(name, self.hostname)
        if isinstance(parsed, GatewayHost):
            return True
        if isinstance(parsed, ShardName):
            return isinstance(self.directory.current().resolve(parsed.candidates), Route)
        return False

    def error_site(self, status: int, code: str, message: str) -> Any:
        return error_site(status, code, message)

    def proxy_site(self, route: Any) -> Any:
        return proxy_site(route, self.http)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        reasons = []
        if self.tls_listener.port is None:
            reasons.append("TLS listener not bound")
        if not self.directory.loaded():
            reasons.append("shard directory not loaded")
        if self.verifier is not None and self.verifier.jwks is not None and not self.verifier.jwks.loaded:
            reasons.append("JWKS keys not loaded")
        detail: dict[str, Any] = {"reasons": reasons, "shards": len(self.directory.current())}
        if self.acme is not None:
            # Reported, not fatal: the fallback certificate still serves those names.
            detail["certificates"] = self.acme.problems()
        return (not reasons, detail)

    def service(self) -> GatewayService:
        root = GatewayService(logs.make_observer(self.config.log.format, self.config.log.level),
                              self._announce)
        for s in self.services:
            s.setServiceParent(root)
        return root

    def _announce(self) -> None:
        if self.local_ca is not None:
            self.log.info("local development CA: {path} (curl --cacert {path})",
                          path=os.path.abspath(self.local_ca.cert_path))
