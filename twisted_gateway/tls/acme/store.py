"""
Where ACME certificates, their keys and the ACME account live.

The disk store keeps one chain (``<name>.pem``) and one key (``<name>.key``, mode 0600) per
certificate under ``<state_dir>/acme/certificates``, written atomically, and the account key
under ``<state_dir>/acme/account-<ca>.pem``.  A file that no longer parses is reported, moved
aside and treated as missing, so the manager issues a replacement.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Iterable

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.logger import Logger
from zope.interface import Interface, implementer

from twisted_gateway.tls.contexts import CertificateError, load_pair
from twisted_gateway.tls.files import atomic_write, ensure_private_dir
from twisted_gateway.tls.localca import KeyPair


@attrs.frozen
class StoredCertificate:
    names: tuple[str, ...]
    pair: KeyPair

    @property
    def not_after(self) -> float:
        return self.pair.certificate.not_valid_after_utc.timestamp()

    @property
    def not_before(self) -> float:
        return self.pair.certificate.not_valid_before_utc.timestamp()


class ICertificateStore(Interface):
    def load_all(quarantine: bool = True) -> list[StoredCertificate]:
        """Every readable stored certificate; with C{quarantine}, unreadable ones are moved
        aside so that they are issued again."""

    def save(names: tuple[str, ...], chain_pem: bytes, key_pem: bytes, lease: Any = None) -> StoredCertificate:
        """Store a certificate for C{names} (the first is its file name).  C{lease}: the
        issuance lock's holding it was ordered under, for a store that fences saves (the
        fleet's refuses a save whose lock another gateway took since)."""

    def account_key(ca_url: str) -> bytes | None:
        """The PEM account key for a CA, if one exists."""

    def save_account_key(ca_url: str, key_pem: bytes) -> None:
        """Keep the account key for a CA."""


def file_stem(name: str) -> str:
    return name.replace("*", "_wildcard")


def cert_names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(str(n) for n in san.get_values_for_type(x509.DNSName))


@implementer(ICertificateStore)
class DiskCertificateStore:
    log = Logger()

    def __init__(self, state_dir: str) -> None:
        self.root = os.path.join(state_dir, "acme")
        self.cert_dir = os.path.join(self.root, "certificates")
        ensure_private_dir(self.root)
        ensure_private_dir(self.cert_dir)
        self.corrupted: list[str] = []

    def _paths(self, name: str) -> tuple[str, str]:
        stem = os.path.join(self.cert_dir, file_stem(name))
        return stem + ".pem", stem + ".key"

    def stamp(self) -> tuple[tuple[str, int], ...]:
        """Changes whenever a stored certificate or key is written (for processes that follow)."""
        out: list[tuple[str, int]] = []
        for entry in sorted(os.listdir(self.cert_dir)):
            if entry.endswith((".pem", ".key")):
                try:
                    out.append((entry, os.stat(os.path.join(self.cert_dir, entry)).st_mtime_ns))
                except FileNotFoundError:
                    pass
        return tuple(out)

    def load_all(self, quarantine: bool = True) -> list[StoredCertificate]:
        """
        Every stored certificate.  With C{quarantine}, one that does not load is moved aside to
        be replaced; a process that only follows the store passes False, because what it sees
        may be a certificate and key caught between the issuer's two writes.
        """
        out = []
        for entry in sorted(os.listdir(self.cert_dir)):
            if not entry.endswith(".pem"):
                continue
            cert_path = os.path.join(self.cert_dir, entry)
            key_path = cert_path[:-4] + ".key"
            try:
                pair = load_pair(cert_path, key_path)
            except CertificateError as e:
                if not quarantine:
                    continue
                self.log.error("stored certificate {path} is unusable and will be replaced: {error}",
                               path=cert_path, error=str(e))
                self.corrupted.append(entry[:-4].replace("_wildcard", "*"))
                for p in (cert_path, key_path):
                    if os.path.exists(p):
                        os.replace(p, p + ".corrupt")
                continue
            out.append(StoredCertificate(cert_names(pair.certificate) or (entry[:-4],), pair))
        return out

    def save(self, names: tuple[str, ...], chain_pem: bytes, key_pem: bytes,
             lease: Any = None) -> StoredCertificate:
        cert_path, key_path = self._paths(names[0])
        atomic_write(key_path, key_pem, mode=0o600)
        atomic_write(cert_path, chain_pem, mode=0o644)
        chain = tuple(x509.load_pem_x509_certificates(chain_pem))
        key = serialization.load_pem_private_key(key_pem, None)
        return StoredCertificate(names, KeyPair(chain, key))

    def _account_path(self, ca_url: str) -> str:
        return os.path.join(self.root, f"account-{hashlib.sha256(ca_url.encode()).hexdigest()[:16]}.pem")

    def account_key(self, ca_url: str) -> bytes | None:
        try:
            with open(self._account_path(ca_url), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def save_account_key(self, ca_url: str, key_pem: bytes) -> None:
        atomic_write(self._account_path(ca_url), key_pem, mode=0o600)


def summarize(stored: Iterable[StoredCertificate]) -> list[dict[str, str]]:
    """Rows for ``twistd gateway certs list``."""
    rows = []
    for s in stored:
        cert = s.pair.certificate
        rows.append({
            "names": ", ".join(s.names),
            "issuer": cert.issuer.rfc4514_string(),
            "not_after": cert.not_valid_after_utc.isoformat(),
        })
    return rows
