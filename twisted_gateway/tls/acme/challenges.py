"""
ACME challenge types for certbot's ``acme`` library, and the DNS-01 responders.

``acme`` 5.x no longer ships TLS-ALPN-01, so it is registered here (RFC 8737); the validation
certificate and the responders the gateway answers itself live in L{responders}.
"""

from __future__ import annotations

import shlex
import subprocess
import time
from typing import Any

import josepy as jose
from acme import challenges
from twisted.logger import Logger
from zope.interface import implementer

from twisted_gateway.tls.acme.responders import IResponder


if "tls-alpn-01" not in challenges.Challenge.TYPES:
    @challenges.ChallengeResponse.register
    class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
        """ACME tls-alpn-01 challenge response (RFC 8737)."""

        typ = "tls-alpn-01"

    @challenges.Challenge.register
    class TLSALPN01(challenges.KeyAuthorizationChallenge):
        """ACME tls-alpn-01 challenge (RFC 8737)."""

        response_cls = TLSALPN01Response
        typ = response_cls.typ

        def validation(self, account_key: jose.JWK, **unused: Any) -> str:
            return self.key_authorization(account_key)

TLSALPN01_TYPE = challenges.Challenge.TYPES["tls-alpn-01"]


def _txt_name(name: str) -> str:
    # A wildcard's authorization is for the name below the "*." label (RFC 8555 7.1.3).
    return f"_acme-challenge.{name.removeprefix('*.')}."


@implementer(IResponder)
class RFC2136Responder:
    """DNS-01 through RFC 2136 dynamic updates signed with TSIG (dnspython)."""

    challenge_type = "dns-01"
    log = Logger()

    def __init__(self, server: str, port: int, zone: str, tsig_name: str | None,
                 tsig_secret: str | None, tsig_algorithm: str = "hmac-sha256", ttl: int = 60,
                 propagation_timeout: float = 30.0) -> None:
        self.server, self.port, self.zone, self.ttl = server, port, zone.rstrip(".") + ".", ttl
        self.propagation_timeout = propagation_timeout
        self.keyring = None
        self.algorithm = tsig_algorithm
        if tsig_name and tsig_secret:
            import dns.tsigkeyring
            self.keyring = dns.tsigkeyring.from_text({tsig_name: tsig_secret})

    def _update(self, action: str, record: str, value: str) -> None:
        import dns.query
        import dns.rcode
        import dns.update
        # dnspython reads keyalgorithm only with a keyring.
        update = dns.update.Update(self.zone, keyring=self.keyring, keyalgorithm=self.algorithm)
        if action == "add":
            update.add(record, self.ttl, "TXT", f'"{value}"')
        else:
            update.delete(record, "TXT", f'"{value}"')
        response = dns.query.tcp(update, self.server, port=self.port, timeout=10)
        if response.rcode() != dns.rcode.NOERROR:
            raise RuntimeError(f"DNS update of {record} refused: {dns.rcode.to_text(response.rcode())}")

    def _visible(self, record: str, value: str) -> bool:
        import dns.message
        import dns.query
        query = dns.message.make_query(record, "TXT")
        response = dns.query.tcp(query, self.server, port=self.port, timeout=5)
        for rrset in response.answer:
            for rdata in rrset:
                if b"".join(rdata.strings).decode() == value:
                    return True
        return False

    def present(self, name: str, challenge: Any, key_authorization: str, validation: Any) -> None:
        record = _txt_name(name)
        self._update("add", record, validation)
        deadline = time.monotonic() + self.propagation_timeout
        while not self._visible(record, validation):
            if time.monotonic() > deadline:
                raise RuntimeError(f"TXT {record} not visible on {self.server} after the update")
            time.sleep(0.1)

    def cleanup(self, name: str, challenge: Any, key_authorization: str, validation: Any) -> None:
        try:
            self._update("delete", _txt_name(name), validation)
        except Exception as e:  # noqa: BLE001 - cleanup must not mask the issuance result
            self.log.warn("DNS cleanup of {name} failed: {error}", name=name, error=str(e))


@implementer(IResponder)
class ExecResponder:
    """DNS-01 through an operator's command: ``COMMAND present|cleanup RECORD VALUE``."""

    challenge_type = "dns-01"

    def __init__(self, command: str, timeout: float = 120.0) -> None:
        self.command = shlex.split(command)
        self.timeout = timeout

    def _run(self, action: str, name: str, value: str) -> None:
        subprocess.run([*self.command, action, _txt_name(name), value], check=True,
                       timeout=self.timeout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def present(self, name: str, challenge: Any, key_authorization: str, validation: Any) -> None:
        self._run("present", name, validation)

    def cleanup(self, name: str, challenge: Any, key_authorization: str, validation: Any) -> None:
        self._run("cleanup", name, validation)
