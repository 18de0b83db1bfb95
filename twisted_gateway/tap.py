"""
The twistd-facing part: command-line options and makeService.

Command-line flags override the configuration file.  A bad flag or file stops start-up with one
line on stderr naming the file (or flag), the key and the problem, and exit code 2.  Three
modes print and exit while the options are parsed, so twistd never builds a service: ``certs
list``, ``directory put|rm|list|import|export`` (the shard directory in Redis) and ``--check``
(validate the configuration, the directory file and the certificates, and print a summary).
"""

from __future__ import annotations

import datetime
import os
import sys
from collections import Counter
from typing import Any

from twisted.python import usage

from twisted_gateway import version
from twisted_gateway.config import ConfigError, GatewayConfig, load_config
from twisted_gateway.http.auth import verifier_from_config

_FLAG_TO_KEY = {
    "hostname": "hostname",
    "tls-port": "listen.tls",
    "plain-port": "listen.plain",
    "tls-certificate": "tls.certificate",
    "tls-private-key": "tls.private_key",
    "directory": "directory.file",
    "state-dir": "state_dir",
    "log-format": "log.format",
    "log-level": "log.level",
    "workers": "workers",
    "redis": "redis.url",
}


class CertsOptions(usage.Options):
    synopsis = "list"
    longdesc = "Show the certificates the gateway keeps: names, issuer and expiry."

    def parseArgs(self, action: str = "list") -> None:
        if action != "list":
            raise usage.UsageError(f"unknown certs action {action!r} (expected: list)")
        self["action"] = action


class DirectoryOptions(usage.Options):
    synopsis = "put FILE-OR-JSON | rm ID [ID...] | list | import FILE | export"
    longdesc = ("Read or change the fleet's shard directory in Redis (redis.url or --redis): "
                "put adds or replaces shard entries (one entry, a list of entries or a directory "
                "document; a file, inline JSON, or - for stdin), rm removes shards by id, list "
                "shows them, import replaces the whole directory with a directory file, export "
                "prints it as a directory document.  The resulting directory is validated "
                "before anything is written; a change prints the new version.  Exit code 0, "
                "or 2 with the problem on stderr.")

    def parseArgs(self, action: str = "", *args: str) -> None:
        from twisted_gateway.directory.redis import ACTIONS
        if action not in ACTIONS:
            raise usage.UsageError(f"unknown directory action {action!r} (expected: "
                                   f"{', '.join(ACTIONS)})")
        wanted = {"put": (1, 1), "rm": (1, None), "list": (0, 0), "import": (1, 1), "export": (0, 0)}
        low, high = wanted[action]
        if len(args) < low or (high is not None and len(args) > high):
            raise usage.UsageError(f"directory {action}: usage: directory " + {
                "put": "put FILE-OR-JSON", "rm": "rm ID [ID...]", "list": "list",
                "import": "import FILE", "export": "export"}[action])
        self["action"] = action
        self["args"] = list(args)


def run_directory_command(config: GatewayConfig, action: str, args: list[str]) -> None:
    """Run one ``directory`` action under the reactor and exit (0, or 2 with one line on stderr)."""
    from twisted.internet.task import react
    from twisted_gateway.directory.redis import CommandFailed, run_command

    def main(reactor: Any) -> Any:
        def failed(failure: Any) -> None:
            failure.trap(CommandFailed)
            sys.stdout.flush()
            sys.stderr.write(f"gateway: {failure.value}\n")
            sys.stderr.flush()
            raise SystemExit(2)
        return run_command(reactor, config, action, args).addErrback(failed)
    react(main)


def print_certificates(config: GatewayConfig, out: Any = None) -> None:
    from twisted_gateway.tls.acme.store import DiskCertificateStore, StoredCertificate, summarize
    from twisted_gateway.tls.contexts import CertificateError, certificate_names, load_pair
    out = out or sys.stdout
    stored = DiskCertificateStore(config.state_dir).load_all() if os.path.isdir(config.state_dir) else []
    rows = [dict(row, source="acme") for row in summarize(stored)]
    if config.tls.certificate and config.tls.private_key:
        try:
            pair = load_pair(config.tls.certificate, config.tls.private_key)
            rows += [dict(row, source="file") for row in summarize(
                [StoredCertificate(tuple(certificate_names(pair.certificate)), pair)])]
        except CertificateError as e:
            rows.append({"names": "?", "issuer": str(e), "not_after": "?", "source": "file"})
    if not rows:
        out.write("no certificates stored\n")
        return
    width = max(len(r["names"]) for r in rows)
    out.write(f"{'NAMES':<{width}}  {'SOURCE':<6}  {'NOT AFTER':<25}  ISSUER\n")
    for r in rows:
        out.write(f"{r['names']:<{width}}  {r['source']:<6}  {r['not_after']:<25}  {r['issuer']}\n")


class CheckFailed(Exception):
    """A problem found by L{check_configuration}; str() is the one sentence shown."""


def _listener_problem(config: GatewayConfig, overrides: dict[str, Any], key: str) -> None:
    """Raise L{CheckFailed} if listen.<key> is not an endpoint description Twisted can build."""
    description = getattr(config.listen, key)
    if description.startswith("systemd:"):
        return  # its descriptors exist only when systemd (or the supervisor) starts the gateway
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    try:
        serverFromString(reactor, description)
    except (ValueError, TypeError, KeyError) as e:
        where = (f"command line: --{key}-port" if f"listen.{key}" in overrides
                 else f"{config.source}: listen.{key}")
        raise CheckFailed(f"{where}: {description!r} is not a usable endpoint description "
                          f"({e or type(e).__name__})") from None


def _auth_summary(config: GatewayConfig, verifier: Any) -> str:
    auth = config.auth
    if verifier is None:
        return "none (private HTTP ports and the REST API refuse every request)"
    if auth.jwks_url:
        mode = f"JWKS {auth.jwks_url} (RS256/ES256), refreshed every {auth.jwks_refresh:g}s"
    elif auth.jwt_public_key:
        mode = f"{verifier.algorithms[0]} public key {auth.jwt_public_key}"
    elif auth.jwt_secret_file:
        mode = f"HS256 shared secret from {auth.jwt_secret_file}"
    else:
        mode = "HS256 shared secret (auth.jwt_secret)"
    claims = [f"{name} {value}" for name, value in (("issuer", auth.issuer), ("audience", auth.audience))
              if value]
    return mode + (f"; required {', '.join(claims)}" if claims else "")


def check_configuration(config: GatewayConfig, verifier: Any,
                        overrides: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """
    What ``--check`` does beyond loading the configuration: build the listeners' endpoints,
    read and validate the directory file, load the certificate and key (and the client CA
    bundle), without creating, binding or writing anything.  Returns the summary as
    (label, text) rows; raises L{CheckFailed} with one sentence on the first problem.
    """
    from twisted_gateway.directory.file import load_directory_file
    from twisted_gateway.directory.model import PROTOCOLS, DirectoryError
    from twisted_gateway.tls.contexts import (
        CertificateError, certificate_names, load_client_ca, load_pair,
    )
    from twisted_gateway.tls.localca import CA_CERT_FILE
    rows = [("hostname", config.hostname)]
    for key in ("tls", "plain"):
        _listener_problem(config, overrides or {}, key)
    rows.append(("listeners", f"tls {config.listen.tls}, plain {config.listen.plain}"))
    rows.append(("workers", str(config.workers)))

    if config.directory.file is None and config.cloud.enabled and config.cloud.directory:
        # Not asked: the gateway routes from the control plane's /sync (or its cache).
        rows.append(("directory", "the control plane's /sync (cloud.directory)"))
    elif config.directory.file is None and config.redis.enabled and config.redis.directory:
        # Not dialled: --check reads files only; the gateway routes from Redis (or its cache).
        rows.append(("directory", f"Redis (redis.directory, keys {config.redis.key_prefix}directory:*)"))
    elif config.directory.file is None:
        rows.append(("directory", "none: the built-in demo shard (echo-9000)"))
    else:
        try:
            snapshot = load_directory_file(config.directory.file)
        except DirectoryError as e:
            raise CheckFailed(f"{config.directory.file}: {e}") from None
        by_protocol = Counter(p.protocol for shard in snapshot.shards for p in shard.ports)
        ports = ", ".join(f"{by_protocol[p]} {p}" for p in PROTOCOLS if by_protocol[p]) or "none"
        shards = f"{len(snapshot)} shard" + ("" if len(snapshot) == 1 else "s")
        rows.append(("directory", f"{config.directory.file}: {shards}; ports: {ports}"))

    try:
        if config.tls.certificate and config.tls.private_key:
            pair = load_pair(config.tls.certificate, config.tls.private_key)
            cert = pair.certificate
            not_after = cert.not_valid_after_utc
            expired = " (EXPIRED)" if not_after <= datetime.datetime.now(datetime.timezone.utc) else ""
            rows.append(("certificate", f"{config.tls.certificate}: "
                                        f"{', '.join(certificate_names(cert))}; valid until "
                                        f"{not_after.isoformat()}{expired}"))
        else:
            rows.append(("certificate", "local development CA "
                                        f"({os.path.join(config.state_dir, CA_CERT_FILE)})"))
        if config.tcp.client_ca:
            cas = load_client_ca(config.tcp.client_ca)
            rows.append(("client CA", f"{config.tcp.client_ca}: {len(cas)} certificates"))
    except CertificateError as e:
        raise CheckFailed(str(e)) from None

    acme = config.acme
    if acme.enabled:
        text = f"on: {acme.challenge} from {acme.ca_server}"
        if acme.wildcard:
            text += f", wildcard *.{config.hostname} through dns-01"
        if acme.on_demand != "off":
            text += f", on demand ({acme.on_demand})"
        rows.append(("acme", text))
    else:
        rows.append(("acme", "off"))
    rows.append(("auth", _auth_summary(config, verifier)))
    return rows


def print_check(config: GatewayConfig, rows: list[tuple[str, str]], out: Any = None) -> None:
    out = out or sys.stdout
    source = "defaults and flags" if config.source == "<defaults>" else config.source
    out.write(f"twisted-gateway {version()}: the configuration is valid ({source})\n")
    width = max(len(label) for label, _ in rows) + 1
    for label, text in rows:
        out.write(f"  {label + ':':<{width}} {text}\n")
    out.flush()


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("Run twisted-gateway: a TLS front door that routes <label>-<port>.<hostname> "
                "to shard containers. Flags override the configuration file; see "
                "docs/configuration.md for every key.")

    optParameters = [
        ["config", "c", None, "YAML configuration file."],
        ["hostname", None, None, "Gateway hostname; shards are <label>-<port>.<hostname> [default: localhost]."],
        ["tls-port", None, None, "TLS listener: a port number or a Twisted endpoint description "
                                 "(e.g. tcp6:28318:interface=\\:\\:) [default: 28318]."],
        ["plain-port", None, None, "Plain listener for the admin app (/healthz, /readyz, /metrics) "
                                   "[default: 28317]."],
        ["tls-certificate", None, None, "PEM certificate chain for *.<hostname> and <hostname>; "
                                        "unset uses the local development CA."],
        ["tls-private-key", None, None, "PEM private key of --tls-certificate."],
        ["directory", None, None, "Shard directory file (YAML or JSON), watched for changes; "
                                  "unset serves the built-in demo shard."],
        ["state-dir", None, None, "State directory (local CA, certificates) [default: ./state]."],
        ["log-format", None, None, "Log format: text or json [default: text]."],
        ["log-level", None, None, "Lowest level logged: debug, info, warn, error, critical [default: info]."],
        ["workers", None, None, "Worker processes sharing the TLS listener, supervised and restarted "
                                "[default: the number of CPUs]."],
        ["redis", None, None, "Redis URL (redis://[user@]host:port/db, rediss:// for TLS) the fleet "
                              "shares; sets redis.url."],
    ]

    optFlags = [
        ["check", None, "Validate the configuration, the directory file and the certificates, "
                        "print a summary and exit (0: valid; 2: the problem on stderr); nothing "
                        "is started."],
    ]

    subCommands = [["certs", None, CertsOptions, "Show stored certificates (certs list) and exit."],
                   ["directory", None, DirectoryOptions,
                    "Read or change the shard directory in Redis (put, rm, list, import, export) and exit."]]

    def opt_version(self) -> None:
        """Show the version and exit."""
        print(f"twisted-gateway {version()}")
        sys.exit(0)

    def postOptions(self) -> None:
        overrides: dict[str, Any] = {key: self[flag] for flag, key in _FLAG_TO_KEY.items()
                                     if self[flag] is not None}
        if "workers" in overrides:
            try:
                overrides["workers"] = int(overrides["workers"])
            except ValueError:
                sys.stderr.write(f"gateway: command line: --workers: expected a positive integer, "
                                 f"got {overrides['workers']!r}\n")
                raise SystemExit(2)
        self.overrides = overrides
        try:
            self.config: GatewayConfig = load_config(self["config"], overrides)
            self.verifier = verifier_from_config(self.config.auth, self.config.source)
            self.cloud: Any = None
            if self.config.cloud.enabled and self.subCommand is None:
                # A missing, tampered, expired or unknown-region cloud token stops start-up here.
                from twisted_gateway.cloud.token import load_credentials
                self.cloud = load_credentials(self.config.cloud, self.config.source, self.config.state_dir)
        except ConfigError as e:
            sys.stderr.write(f"gateway: {e}\n")
            sys.stderr.flush()
            raise SystemExit(2)
        if self["check"]:
            try:
                rows = check_configuration(self.config, self.verifier, overrides)
                if self.cloud is not None:
                    token = self.cloud.token
                    expires = datetime.datetime.fromtimestamp(token.expires_at, datetime.timezone.utc)
                    rows.append(("cloud", f"account {token.account}, region {token.region} "
                                          f"({self.cloud.base_url}), analytics index "
                                          f"{token.analytics_index}; token valid until {expires.isoformat()}"))
            except CheckFailed as e:
                sys.stderr.write(f"gateway: {e}\n")
                sys.stderr.flush()
                raise SystemExit(2)
            print_check(self.config, rows)
            raise SystemExit(0)
        if self.subCommand == "certs":
            print_certificates(self.config)
            raise SystemExit(0)
        if self.subCommand == "directory":
            run_directory_command(self.config, self.subOptions["action"], self.subOptions["args"])
            raise SystemExit(0)


def worker_argv(options: Options) -> list[str]:
    """The flags a worker process gets: everything but the listeners and the worker count."""
    argv = ["--config", options["config"]] if options["config"] else []
    for flag in _FLAG_TO_KEY:
        if flag not in ("tls-port", "plain-port", "workers") and options[flag] is not None:
            argv += [f"--{flag}", str(options[flag])]
    return argv


def makeService(options: Options) -> Any:
    if options.config.workers > 1:
        from twisted_gateway.workers import make_supervisor_service
        return make_supervisor_service(options.config, worker_argv(options), options.config.workers)
    from twisted_gateway.gateway import Gateway
    from twisted_gateway.tls.contexts import CertificateError
    try:
        gateway = Gateway(options.config, verifier=options.verifier,
                          reload_from=(options["config"], options.overrides), cloud=options.cloud)
    except CertificateError as e:
        sys.stderr.write(f"gateway: {options.config.source}: {e}\n")
        sys.stderr.flush()
        raise SystemExit(2)
    return gateway.service()
