"""Unit tests of the Runtime: a reload builds a new frozen one and carries only long-lived state."""

from __future__ import annotations

import types

import attrs
import pytest
from twisted.internet.testing import MemoryReactorClock

from twisted_gateway.config import load_config
from twisted_gateway.directory.interfaces import ShardDirectory
from twisted_gateway.runtime import build_runtime


def runtime(config, previous=None, reactor=None):
    return build_runtime(
        config, reactor or MemoryReactorClock(), directory=ShardDirectory(),
        contexts=types.SimpleNamespace(client_ca=None), verifier=None, api_site=None,
        tls_alpn=types.SimpleNamespace(context_for=lambda name: None), acme=None, previous=previous)


def test_a_reload_builds_a_new_runtime_and_carries_only_long_lived_state(tmp_path):
    first = runtime(load_config(None, {"state_dir": str(tmp_path)}))
    changed = attrs.evolve(first.config,
                           http=attrs.evolve(first.config.http, pool_size=3, response_timeout=7.0),
                           auth=attrs.evolve(first.config.auth, cookie_name="gw-new", cookie_max_age=42),
                           limits=attrs.evolve(first.config.limits, max_body_bytes=5))
    second = runtime(changed, previous=first)
    # New settings, in new objects...
    assert second is not first and second.http is not first.http and second.admission is not first.admission
    assert (second.http.cookie_name, second.http.cookie_max_age, second.http.response_timeout) == (b"gw-new", 42, 7.0)
    assert second.http.limits.max_body_bytes == 5
    # ...the old Runtime (what open connections hold) unchanged...
    assert first.http.cookie_name == b"__Host-gateway-token" and first.http.limits.max_body_bytes == 100 * 1024 * 1024
    # ...and what must outlive a reload carried over: the pool (with its new size), the
    # connection counters and the port-filter cache.
    assert second.http.upstream is first.http.upstream and second.http.upstream.max_idle == 3
    assert second.admission.counter is first.admission.counter
    assert second.port_filter is first.port_filter and second.policy.port_filter is second.port_filter
    assert second.http.admission() is second.admission


def test_a_runtime_is_frozen(tmp_path):
    rt = runtime(load_config(None, {"state_dir": str(tmp_path)}))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        rt.config = rt.config  # type: ignore[misc]
