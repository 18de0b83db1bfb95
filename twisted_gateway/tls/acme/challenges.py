"""
ACME challenge types and the responders that answer them.

certbot's ``acme`` 5.x no longer ships TLS-ALPN-01, so it is registered here (RFC 8737): the
validation certificate holds exactly one SAN, the name being validated, and the critical
id-pe-acmeIdentifier extension (1.3.6.1.5.5.7.1.31) whose value is the DER OCTET STRING of
SHA-256(key authorization).

Responders are called from the issuing thread (present/cleanup) and read from the reactor
thread (the admin app for HTTP-01, the front door for TLS-ALPN-01); they only replace whole
dictionary entries, which the GIL makes atomic.
"""

from __future__ import annotations

import datetime
import hashlib
import shlex
import subprocess
import time
from typing import Any

import josepy as jose
from acme import challenges
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.logger import Logger
from zope.interface import Interface, implementer

ACME_IDENTIFIER_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
ACME_TLS_ALPN = b"acme-tls/1"


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

TLSALPN01 = challenges.Challenge.TYPES["tls-alpn-01"]


def tls_alpn_certificate(name: str, key_authorization: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The self-signed validation certificate for C{name} (RFC 8737 section 3)."""
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, b"\x04\x20" + digest), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


class IResponder(Interface):
    challenge_type: str

    def present(name: str, challenge: Any, key_authorization: str, validation: Any) -> None:
        """Make the challenge answerable for C{name} (called in the issuing thread)."""

    def cleanup(name: str, challenge: Any, key_authorization: str, validation: Any) -> None:
        """Withdraw it."""


@implementer(IResponder)
class HTTP01Responder:
    """Answers ``/.well-known/acme-challenge/<token>`` on the plain port (the admin app)."""

    challenge_type = "http-01"

    def __init__(self) -> None:
        self.tokens: dict[str, str] = {}

    def present(self, name: str, challenge: Any, key_authorization: str, validation: Any) -> None:
        self.tokens[challenge.encode("token")] = key_authorization

    def cleanup(self, name: str, challenge: Any, key_authorization: str, validation: Any) -> None:
        self.tokens.pop(challenge.encode("token"), None)

    def answer(self, token: str) -> str | None:
        return self.tokens.get(token)


@implementer(IResponder)
class TLSALPN01Responder:
    """Holds the validation context of each name with a pending TLS-ALPN-01 challenge."""

    challenge_type = "tls-alpn-01"

    def __init__(self) -> None:
        self.contexts: dict[str, SSL.Context] = {}

    def present(self, name: str, challenge: Any, key_authorization: str, validation: Any) -> None:
        cert, key = tls_alpn_certificate(name, key_authorization)
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.use_certificate(crypto.X509.from_cryptography(cert))
        ctx.use_privatekey(crypto.PKey.from_cryptography_key(key))

        def select(conn: SSL.Connection, offered: list[bytes]) -> bytes:
            return ACME_TLS_ALPN if ACME_TLS_ALPN in offered else SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]
        ctx.set_alpn_select_callback(select)
        self.contexts[name] = ctx

    def cleanup(self, name: str, challenge: Any, key_authorization: str, validation: Any) -> None:
        self.contexts.pop(name, None)

    def context_for(self, name: str) -> SSL.Context | None:
        return self.contexts.get(name)


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
        update = dns.update.Update(self.zone, keyring=self.keyring,
                                   keyalgorithm=self.algorithm if self.keyring else None)
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
