"""Shared fixtures: a running broker per test (memory or on-disk store)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .support import BrokerProcess


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
