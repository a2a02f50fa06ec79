"""Shared fixtures: a running broker per test, in this process (``broker``,
``make_broker``) or as a ``broker serve`` process where the process is what is tested
(``broker_process``, ``make_broker_process``); one redis-server per session."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import BrokerThread
from .support import BrokerProcess, RedisServer


def _host(request: pytest.FixtureRequest) -> type[BrokerThread] | type[BrokerProcess]:
    """``BrokerProcess`` for tests marked ``process``, ``BrokerThread`` for the others."""
    return BrokerProcess if request.node.get_closest_marker("process") else BrokerThread


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the test item, for fixtures to see a failure."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def _show_logs_if_failed(request: pytest.FixtureRequest, servers: list[Any]) -> None:
    """After a failed test, print the end of each broker's log: shown in the failure's
    report (its "Captured stdout teardown"), since the log goes with the test's files."""
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        for server in servers:
            print(f"--- the end of the log of the broker on port {server.port} ---")
            print(server.log()[-6000:])


@pytest.fixture
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """A broker on a free port with an on-disk store in ``tmp_path``: in this process
    (``BrokerThread``), or a ``broker serve`` process for tests marked ``process``."""
    server = _host(request)(tmp_path).start()
    yield server
    _show_logs_if_failed(request, [server])
    server.close()


@pytest.fixture
def make_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Factory for brokers with extra ``serve`` arguments, hosted as ``broker`` is:
    ``make_broker("--history", "5", memory=True)``."""
    host = _host(request)
    started: list[BrokerThread | BrokerProcess] = []

    def factory(*args: str, home: Path | None = None, **kw: Any) -> Any:
        server = host(home or tmp_path / f"b{len(started)}", *args, **kw)
        started.append(server)
        return server.start()

    yield factory
    _show_logs_if_failed(request, started)
    for server in started:
        server.close()


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: two workers per core, at most 8. Most of a test's time is spent waiting
    on sockets, processes and polls, so twice the cores keeps them busy; more only adds
    start-up and contention (measured: 4 workers on 2 cores, 7 min 35 s -> under 3 min)."""
    return max(2, min(8, 2 * (os.cpu_count() or 1)))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs a process or a browser is slow by nature: marked so, for
    ``-m "not slow"`` to run the core, stores, protocol and in-process server tests."""
    for item in items:
        if item.get_closest_marker("process") or item.get_closest_marker("browser"):
            item.add_marker(pytest.mark.slow)


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
