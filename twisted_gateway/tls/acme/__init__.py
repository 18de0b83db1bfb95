"""ACME (RFC 8555) certificates: challenges, the issuing flow, storage and renewal.

This package's modules import certbot's acme library, which is only loaded when ACME is
enabled; the constant below is what the front door needs either way.
"""

ACME_TLS_ALPN = b"acme-tls/1"
