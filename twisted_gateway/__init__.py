"""twisted-gateway: a TLS/SNI front door for shard containers."""

from __future__ import annotations

from typing import Any


def version() -> str:
    """The installed distribution's version (read on demand: importlib.metadata pulls in the
    email package, which a running gateway otherwise never needs)."""
    from importlib.metadata import PackageNotFoundError, version as _version
    try:
        return _version("twisted-gateway")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        return version()
    raise AttributeError(name)
