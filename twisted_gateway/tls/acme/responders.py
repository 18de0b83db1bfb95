"""
The challenge responders the gateway answers itself (HTTP-01 on the plain port, TLS-ALPN-01 on
the TLS port) and the RFC 8737 validation certificate.  Free of certbot's acme library, so the
gateway can hold them whether or not ACME is enabled.

Responders are called from the issuing thread (present/cleanup) and read from the reactor
thread; they only replace whole dictionary entries, which the GIL makes atomic.

Their board is the local L{ChallengeBoard} (this machine's processes) or, in a fleet, the
L{RedisChallengeBoard}: then an HTTP-01 token missing here is asked of Redis (the answer is a
Deferred), and a TLS-ALPN-01 handshake, decided synchronously, is answered from the answers the
issuing gateway pushed before it let the CA validate; on a miss a Redis read starts so that the
CA's next attempt is answered.
"""

from __future__ import annotations

import datetime
import hashlib
from typing import Any, Union

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from zope.interface import Interface, implementer

from twisted_gateway.tls.acme import ACME_TLS_ALPN

ACME_IDENTIFIER_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")


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


HTTP01Answer = Union[str, None, "Deferred[str | None]"]


@implementer(IResponder)
class HTTP01Responder:
    """Answers ``/.well-known/acme-challenge/<token>`` on the plain port (the admin app)."""

    challenge_type = "http-01"
    log = Logger()

    def __init__(self, board: Any = None) -> None:
        self.tokens: dict[str, str] = {}
        self.board = board
        """A L{ChallengeBoard} shared with the other local processes, or None."""

    def present(self, name: str, challenge: Any, key_authorization: str, validation: Any) -> None:
        token = challenge.encode("token")
        self.tokens[token] = key_authorization
        if self.board is not None:
            self.board.publish("http-01", token, key_authorization)

    def cleanup(self, name: str, challenge: Any, key_authorization: str, validation: Any) -> None:
        token = challenge.encode("token")
        self.tokens.pop(token, None)
        if self.board is not None:
            self.board.withdraw("http-01", token)

    def answer(self, token: str) -> HTTP01Answer:
        """The key authorization for C{token}: ours, one another process or gateway published,
        or None; a Deferred when it has to be asked of the fleet's Redis."""
        found = self.tokens.get(token)
        if found is not None or self.board is None:
            return found
        found = self.board.read("http-01", token)
        if found is not None:
            self._answered_for_another(token)
            return found
        read_async = getattr(self.board, "read_async", None)
        if read_async is None:
            return None

        def got(value: str | None) -> str | None:
            if value is not None:
                self._answered_for_another(token)
            return value
        d: Deferred[str | None] = read_async("http-01", token)
        return d.addCallback(got)

    def _answered_for_another(self, token: str) -> None:
        self.log.info("HTTP-01 challenge {token} answered for another process or gateway "
                      "(from the shared board)", token=token)


@implementer(IResponder)
class TLSALPN01Responder:
    """Holds the validation context of each name with a pending TLS-ALPN-01 challenge."""

    challenge_type = "tls-alpn-01"

    def __init__(self, board: Any = None) -> None:
        self.contexts: dict[str, SSL.Context] = {}
        self.board = board
        """A L{ChallengeBoard} shared with the other local processes, or None."""
        self._from_board: dict[str, tuple[str, SSL.Context]] = {}

    def present(self, name: str, challenge: Any, key_authorization: str, validation: Any) -> None:
        self.contexts[name] = self._context(name, key_authorization)
        if self.board is not None:
            self.board.publish("tls-alpn-01", name, key_authorization)

    def _context(self, name: str, key_authorization: str) -> SSL.Context:
        cert, key = tls_alpn_certificate(name, key_authorization)
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.use_certificate(crypto.X509.from_cryptography(cert))
        ctx.use_privatekey(crypto.PKey.from_cryptography_key(key))

        def select(conn: SSL.Connection, offered: list[bytes]) -> bytes:
            # pyOpenSSL's no-overlap sentinel, whose type is private.
            return ACME_TLS_ALPN if ACME_TLS_ALPN in offered else SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]
        ctx.set_alpn_select_callback(select)
        return ctx

    def cleanup(self, name: str, challenge: Any, key_authorization: str, validation: Any) -> None:
        self.contexts.pop(name, None)
        if self.board is not None:
            self.board.withdraw("tls-alpn-01", name)

    def context_for(self, name: str) -> SSL.Context | None:
        """The validation context for C{name}: ours, or one another local process published
        (read only for connections offering acme-tls/1, which are rare)."""
        ctx = self.contexts.get(name)
        if ctx is not None or self.board is None:
            return ctx
        key_authorization = self.board.read("tls-alpn-01", name)
        if key_authorization is None:
            self._from_board.pop(name, None)
            prefetch = getattr(self.board, "prefetch", None)
            if prefetch is not None:
                prefetch("tls-alpn-01", name)  # the fleet's: for the CA's next attempt
            return None
        cached = self._from_board.get(name)
        if cached is None or cached[0] != key_authorization:
            cached = (key_authorization, self._context(name, key_authorization))
            self._from_board[name] = cached
        return cached[1]
