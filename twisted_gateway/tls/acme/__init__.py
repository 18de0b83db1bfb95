"""ACME (RFC 8555) certificates: challenges, the issuing flow, storage and renewal."""
