"""Shared fixtures: a running broker per test (memory or on-disk store), one redis-server
per session."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from .support import BrokerProcess, RedisServer


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    """A real broker on a free port with an on-disk store in ``tmp_path``."""
    proc = BrokerProcess(tmp_path).start()
    yield proc
    proc.kill()


@pytest.fixture
def make_broker(tmp_path: Path) -> Iterator[object]:
    """Factory for brokers with extra ``serve`` arguments: ``make_broker("--history", "5")``."""
    started: list[BrokerProcess] = []

    def factory(*args: str, **kw: object) -> BrokerProcess:
        home = kw.pop("home", None) or tmp_path / f"b{len(started)}"
        proc = BrokerProcess(home, *args, **kw).start()  # type: ignore[arg-type]
        started.append(proc)
        return proc

    yield factory
    for proc in started:
        proc.kill()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole session; skips without the binary (fails under
    CI=true). Tests flush it before use and restart it if an earlier test killed it."""
    if shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is required in CI")
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()
