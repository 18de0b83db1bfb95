"""
The twistd-facing part: command-line options and makeService.

Command-line flags override the configuration file.  A bad flag or file stops start-up with one
line on stderr naming the file (or flag), the key and the problem, and exit code 2.
"""

from __future__ import annotations

import os
import sys
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
}


class CertsOptions(usage.Options):
    synopsis = "list"
    longdesc = "Show the certificates the gateway keeps: names, issuer and expiry."

    def parseArgs(self, action: str = "list") -> None:
        if action != "list":
            raise usage.UsageError(f"unknown certs action {action!r} (expected: list)")
        self["action"] = action


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
    ]

    subCommands = [["certs", None, CertsOptions, "Show stored certificates (certs list) and exit."]]

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
        except ConfigError as e:
            sys.stderr.write(f"gateway: {e}\n")
            sys.stderr.flush()
            raise SystemExit(2)
        if self.subCommand == "certs":
            print_certificates(self.config)
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
                          reload_from=(options["config"], options.overrides))
    except CertificateError as e:
        sys.stderr.write(f"gateway: {options.config.source}: {e}\n")
        sys.stderr.flush()
        raise SystemExit(2)
    return gateway.service()
