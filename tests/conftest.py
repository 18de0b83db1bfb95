from __future__ import annotations

import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from support import Gateway, Upstream, echo_handler, tempdir  # noqa: E402


@pytest.fixture
def workdir():
    path = tempdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def echo_upstream():
    up = Upstream(echo_handler)
    yield up
    up.close()


@pytest.fixture
def start_gateway(workdir):
    started: list[Gateway] = []

    def start(*args, **kwargs) -> Gateway:
        gw = Gateway(workdir, *args, **kwargs)
        started.append(gw)
        return gw
    yield start
    for gw in started:
        gw.stop()
    for gw in started:
        # Whatever a test did, the gateway's own code must never have crashed.
        crashes = [e for e in gw.events if e.get("level") == "critical" or "Traceback" in str(e.get("message"))]
        assert not crashes, "gateway logged a crash:\n" + gw.output()


@pytest.fixture
def redis_env():
    """Real redis-server / redis-sentinel processes (tests/redis_env.py), all stopped after."""
    from redis_env import RedisEnv
    env = RedisEnv()
    yield env
    env.close()
