"""twisted-gateway: a TLS/SNI front door for shard containers."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("twisted-gateway")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
