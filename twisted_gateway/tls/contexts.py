"""
Certificate sources and the per-route OpenSSL contexts built from them.

The front door knows the SNI name and the route's protocol before TLS starts, so it asks
L{ContextCache.context_for} for a context holding the right certificate and offering the
right ALPN protocols; nothing is decided inside OpenSSL's callbacks except the ALPN pick.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterable, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import Interface, implementer

from twisted_gateway.polling import FileStamp, PollingService, file_stamp
from twisted_gateway import metrics
from twisted_gateway.tls.localca import KeyPair, LocalCA

# TLS 1.2 suites with forward secrecy and AEAD only; TLS 1.3 suites are OpenSSL's defaults.
TLS12_CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

ALPN_FOR_PROTOCOL: dict[str, tuple[bytes, ...]] = {
    "tcp": (),
    "http/1.1": (b"http/1.1",),
    "h2": (b"h2",),
}


class CertificateError(ValueError):
    pass


class ICertificateSource(Interface):
    def pair_for(name: str) -> KeyPair | None:
        """The certificate chain and key to present for C{name}, or None."""


def load_pair(cert_path: str, key_path: str) -> KeyPair:
    """Load a PEM chain and key; raise L{CertificateError} with a readable reason."""
    try:
        with open(cert_path, "rb") as f:
            chain = tuple(x509.load_pem_x509_certificates(f.read()))
    except OSError as e:
        raise CertificateError(f"{cert_path}: cannot read: {e.strerror}") from None
    except ValueError as e:
        raise CertificateError(f"{cert_path}: not a PEM certificate chain ({e})") from None
    try:
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
    except OSError as e:
        raise CertificateError(f"{key_path}: cannot read: {e.strerror}") from None
    except (ValueError, TypeError) as e:
        raise CertificateError(f"{key_path}: not an unencrypted PEM private key ({e})") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if chain[0].public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise CertificateError(f"{key_path}: the key does not match the certificate in {cert_path}")
    return KeyPair(chain, key)


def certificate_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        # A commonName's value is a string (only bit-string attributes are bytes).
        return [cast(str, a.value) for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    return [str(n) for n in san.get_values_for_type(x509.DNSName)] + [
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)]


def describe_certificate(cert: x509.Certificate, source: str, **extra: Any) -> dict[str, Any]:
    """A certificate as the admin API shows it (C{source}: file, local_ca, acme), with
    C{extra} fields of its source's (path, renew_at, failures...)."""
    def common_name(name: x509.Name) -> str:
        values = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return str(values[0].value) if values else name.rfc4514_string()
    return {"names": certificate_names(cert), "subject": common_name(cert.subject),
            "issuer": common_name(cert.issuer), "serial": format(cert.serial_number, "x"),
            "not_before": cert.not_valid_before_utc.isoformat(),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "not_after_timestamp": cert.not_valid_after_utc.timestamp(),
            "source": source, **extra}


def _record_expiry(pair: KeyPair) -> None:
    not_after = pair.certificate.not_valid_after_utc.timestamp()
    for name in certificate_names(pair.certificate):
        metrics.CERTIFICATE_NOT_AFTER.labels(name=name).set(not_after)


@implementer(ICertificateSource)
class StaticFileSource(PollingService):
    """
    One certificate chain and key from files, re-read when either file changes (a
    TimerService calling L{check}; the first check, when started, finds the files as loaded
    unless they changed since).

    @ivar cert_path: the chain's file; a reload may point it elsewhere (then call L{reload}).
    @ivar key_path: the key's file, likewise.
    @ivar interval: seconds between checks; assigning it (or L{set_interval}) takes effect at
        once, also while running.
    """

    log = Logger()

    def __init__(self, cert_path: str, key_path: str, interval: float = 1.0,
                 clock: IReactorTime | None = None) -> None:
        super().__init__(interval, self.check, "the certificate files")
        self.clock = clock
        self.cert_path = cert_path
        self.key_path = key_path
        self.pair = load_pair(cert_path, key_path)
        _record_expiry(self.pair)
        self._stamp = self._stat()

    def _stat(self) -> tuple[FileStamp | None, ...]:
        return (file_stamp(self.cert_path), file_stamp(self.key_path))

    def check(self) -> bool:
        """Reload if the files changed; return whether a new pair is in force."""
        stamp = self._stat()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        return self.reload()

    def reload(self) -> bool:
        try:
            pair = load_pair(self.cert_path, self.key_path)
        except CertificateError as e:
            self.log.error("certificate reload refused, the previous certificate stays: {problem}",
                           problem=str(e))
            metrics.CERTIFICATE_RELOADS.labels(outcome="failure").inc()
            return False
        self.pair = pair
        _record_expiry(pair)
        metrics.CERTIFICATE_RELOADS.labels(outcome="success").inc()
        self.log.info("certificate reloaded from {path}: {names}, valid until {not_after}",
                      path=self.cert_path, names=", ".join(certificate_names(pair.certificate)),
                      not_after=pair.certificate.not_valid_after_utc.isoformat())
        return True

    def pair_for(self, name: str) -> KeyPair | None:
        return self.pair

    def certificates(self) -> list[dict[str, Any]]:
        """The admin API's view: the pair in force and the file it came from."""
        return [describe_certificate(self.pair.certificate, "file", path=self.cert_path)]


@implementer(ICertificateSource)
class LocalCASource:
    """Leaves from the local development CA, one per name, issued on first use."""

    def __init__(self, ca: LocalCA, hostname: str, max_shown: int = 1000) -> None:
        self.ca = ca
        self.hostname = hostname
        self._issued: dict[str, KeyPair] = {}
        self._max_shown = max_shown

    def pair_for(self, name: str) -> KeyPair | None:
        if name == self.hostname and name == "localhost":
            pair = self.ca.issue(("localhost", "127.0.0.1", "::1"))
        else:
            pair = self.ca.issue((name,))
        if name in self._issued or len(self._issued) < self._max_shown:
            self._issued[name] = pair  # what the admin API shows, at one dict store
        return pair

    def certificates(self) -> list[dict[str, Any]]:
        """The admin API's view: the CA itself and the leaves issued for names so far (the
        first C{max_shown} names)."""
        out = [describe_certificate(self.ca.cert, "local_ca", path=self.ca.cert_path, ca=True)]
        seen: set[int] = set()
        for pair in list(self._issued.values()):
            if id(pair) not in seen:
                seen.add(id(pair))
                out.append(describe_certificate(pair.certificate, "local_ca"))
        return out


def load_client_ca(path: str) -> list[x509.Certificate]:
    """The CA certificates that may issue client certificates; raise L{CertificateError}."""
    try:
        with open(path, "rb") as f:
            return x509.load_pem_x509_certificates(f.read())
    except OSError as e:
        raise CertificateError(f"{path}: cannot read: {e.strerror}") from None
    except ValueError as e:
        raise CertificateError(f"{path}: not a PEM certificate bundle ({e})") from None


def client_certificate_prefixes(cert: x509.Certificate) -> list[str]:
    """
    The task-name prefixes a client certificate grants: its subject CN, its SAN DNS names and
    its SAN URIs of the form C{task-prefix:<prefix>}.
    """
    out = [str(a.value) for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return out
    out += [str(n) for n in san.get_values_for_type(x509.DNSName)]
    out += [u[len("task-prefix:"):] for u in san.get_values_for_type(x509.UniformResourceIdentifier)
            if u.startswith("task-prefix:")]
    return [p for p in out if p]


def build_context(pair: KeyPair, protocols: Iterable[bytes],
                  client_ca: list[x509.Certificate] | None = None) -> SSL.Context:
    """An OpenSSL server context presenting C{pair} and selecting from C{protocols}; with
    C{client_ca}, it asks for a client certificate issued by one of those CAs."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION
                    | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_SINGLE_ECDH_USE)
    ctx.set_cipher_list(TLS12_CIPHERS)
    ctx.use_certificate(crypto.X509.from_cryptography(pair.chain[0]))
    for extra in pair.chain[1:]:
        ctx.add_extra_chain_cert(crypto.X509.from_cryptography(extra))
    # A key of a type pyOpenSSL cannot take (DH, X25519...) raises TypeError here.
    ctx.use_privatekey(crypto.PKey.from_cryptography_key(pair.key))  # type: ignore[arg-type]
    ctx.check_privatekey()
    ctx.set_session_id(b"twisted-gateway")
    if client_ca:
        store = ctx.get_cert_store()
        assert store is not None
        for ca in client_ca:
            store.add_cert(crypto.X509.from_cryptography(ca))
        ctx.set_client_ca_list([crypto.X509.from_cryptography(ca).get_subject() for ca in client_ca])
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda *args: bool(args[-1]))
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    preference = tuple(protocols)
    if preference:
        def select(conn: SSL.Connection, offered: list[bytes]) -> bytes:
            for p in preference:
                if p in offered:
                    return p
            return SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]  # pyOpenSSL's sentinel, of a private type
        ctx.set_alpn_select_callback(select)
    return ctx


class ContextCache:
    """Contexts by (certificate pair, ALPN list); a bounded LRU for per-name local-CA pairs."""

    def __init__(self, source: ICertificateSource, max_entries: int = 4096,
                 client_ca: list[x509.Certificate] | None = None) -> None:
        self.source = source
        self.client_ca = client_ca
        self._contexts: OrderedDict[tuple[int, tuple[bytes, ...], bool], tuple[KeyPair, SSL.Context]] = OrderedDict()
        self._max = max_entries

    def context_for(self, name: str, protocols: tuple[bytes, ...],
                    client_auth: bool = False) -> SSL.Context | None:
        pair = self.source.pair_for(name)
        if pair is None:
            return None
        key = (id(pair), protocols, client_auth)
        entry = self._contexts.get(key)
        if entry is not None and entry[0] is pair:
            self._contexts.move_to_end(key)
            return entry[1]
        ctx = build_context(pair, protocols, self.client_ca if client_auth else None)
        self._contexts[key] = (pair, ctx)
        if len(self._contexts) > self._max:
            self._contexts.popitem(last=False)
        return ctx
