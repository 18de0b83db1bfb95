"""
A local development certificate authority, the gateway's embedded default.

With no certificate configured the gateway creates a CA in its state directory (kept across
restarts, key 0600) and issues leaf certificates from it.  Leaves are issued per name on first
use, because clients refuse a wildcard one label above a top-level name (``*.localhost``);
for hostnames with a dot the wildcard ``*.<hostname>`` is also written to disk for other tools.
Clients trust the CA with ``curl --cacert <state>/local-ca.pem``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections import OrderedDict

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from twisted_gateway.tls.files import atomic_write, ensure_private_dir

CA_CERT_FILE = "local-ca.pem"
CA_KEY_FILE = "local-ca-key.pem"
CA_LIFETIME = datetime.timedelta(days=3650)
LEAF_LIFETIME = datetime.timedelta(days=90)


@attrs.frozen
class KeyPair:
    """A certificate chain (leaf first) and its private key, as cryptography objects."""

    chain: tuple[x509.Certificate, ...]
    key: PrivateKeyTypes
    """EC P-256 when issued here; a configured or stored pair's key is whatever its file holds."""

    @property
    def certificate(self) -> x509.Certificate:
        return self.chain[0]


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san_entry(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


class LocalCA:
    """Loads or creates the CA in C{state_dir} and issues leaves for names."""

    def __init__(self, state_dir: str, cache_size: int = 4096) -> None:
        ensure_private_dir(state_dir)
        self.cert_path = os.path.join(state_dir, CA_CERT_FILE)
        self.key_path = os.path.join(state_dir, CA_KEY_FILE)
        self._cache: OrderedDict[tuple[str, ...], KeyPair] = OrderedDict()
        self._cache_size = cache_size
        self.created = False
        if os.path.exists(self.cert_path) and os.path.exists(self.key_path):
            with open(self.cert_path, "rb") as f:
                self.cert = x509.load_pem_x509_certificate(f.read())
            with open(self.key_path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            self.key = key
            if self.cert.not_valid_after_utc - _now() > datetime.timedelta(days=30):
                return
        self._create()

    def _create(self) -> None:
        self.key = _new_key()
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "twisted-gateway development CA"),
            x509.NameAttribute(NameOID.COMMON_NAME,
                               f"twisted-gateway local CA {os.urandom(4).hex()}"),
        ])
        now = _now()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )
        atomic_write(self.key_path, _key_pem(self.key), mode=0o600)
        atomic_write(self.cert_path, self.cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        self.created = True

    def issue(self, names: tuple[str, ...]) -> KeyPair:
        """A leaf for C{names} (first one is the subject), cached in memory."""
        cached = self._cache.get(names)
        if cached is not None and cached.certificate.not_valid_after_utc - _now() > datetime.timedelta(days=1):
            self._cache.move_to_end(names)
            return cached
        key = _new_key()
        now = _now()
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(min(now + LEAF_LIFETIME, self.cert.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName([_san_entry(n) for n in names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )
        pair = KeyPair((leaf, self.cert), key)
        self._cache[names] = pair
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return pair

    def write_leaf(self, names: tuple[str, ...], cert_path: str, key_path: str) -> KeyPair:
        pair = self.issue(names)
        atomic_write(key_path, _key_pem(pair.key), mode=0o600)
        atomic_write(cert_path, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in pair.chain),
                     mode=0o644)
        return pair
