"""
pyOpenSSL connections on memory BIOs for the TLS engine's tests: a server context with a leaf
of the local development CA, and what a connection has written out.
"""

from __future__ import annotations

import os

from OpenSSL import SSL

from twisted_gateway.tls.localca import LocalCA


def leaf_context(folder: str, name: str) -> SSL.Context:
    """A bare server context for C{name}, its certificate issued by a new local CA in C{folder}."""
    ca = LocalCA(os.path.join(folder, "ca"))
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    ca.write_leaf((name,), cert, key)
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.use_certificate_file(cert)
    ctx.use_privatekey_file(key)
    return ctx


def drain(connection: SSL.Connection) -> bytes:
    """Everything C{connection} has written into its outgoing memory BIO."""
    out = b""
    while True:
        try:
            out += connection.bio_read(1 << 20)
        except SSL.WantReadError:
            return out
