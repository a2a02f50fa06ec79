"""The SQLite store's own safety, against real broker processes: one
broker per data directory, a full disk answered ``unavailable`` and logged once per
episode, foreign or corrupt files refused at start, a database deleted under a running
broker noticed before anything more is acknowledged (``--fsync always``) or within one
fsync interval.

The full disk is SQLite's own ``max_page_count`` (set through the test-only environment
variable ``BROKER_TEST_SQLITE_MAX_PAGES``): SQLite answers it exactly as it answers ENOSPC,
"database or disk is full" (SQLITE_FULL), and it needs no root or tmpfs.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from broker.server.factory import SQLITE_MAX_PAGES_ENV

from .support import BrokerProcess, Peer, isolated_env

pytestmark = pytest.mark.process


def run_second(first: BrokerProcess, home: Path) -> subprocess.CompletedProcess[str]:
    """Run another broker on ``first``'s data directory until it exits (bounded)."""
    second = BrokerProcess(home, data=first.data)
    return subprocess.run(
        second.command(),
        env=isolated_env(home),
        capture_output=True,
        text=True,
        timeout=30,
    )


def refused_at_start(home: Path, data: Path) -> subprocess.CompletedProcess[str]:
    proc = BrokerProcess(home, data=data)
    return subprocess.run(
        proc.command(), env=isolated_env(home), capture_output=True, text=True, timeout=30
    )


def one_clear_line(result: subprocess.CompletedProcess[str], *words: str) -> str:
    assert result.returncode != 0
    output = (result.stdout + result.stderr).strip()
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


async def publish(peer: Peer, topic: str, data: Any) -> dict[str, Any]:
    return await peer.request("pub", topic=topic, data=data)


async def test_a_second_broker_on_the_same_data_refuses_to_start(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    result = run_second(broker, tmp_path / "second")
    one_clear_line(result, "in use by another broker", str(broker.data))
    # The first one is untouched: it still acknowledges and numbers publishes in order.
    peer = await Peer.open(broker.url, broker.token("p"))
    first = await publish(peer, "t", 1)
    second = await publish(peer, "t", 2)
    assert first["op"] == second["op"] == "ok" and second["seq"] == first["seq"] + 1


async def test_the_lock_goes_with_the_broker(make_broker: Any, tmp_path: Path) -> None:
    data = tmp_path / "shared"
    first = make_broker(data=data)
    assert first.stop() == 0
    again = make_broker(data=data)  # starts: the lock was released with the process
    peer = await Peer.open(again.url, again.token("p"))
    assert (await publish(peer, "t", 1))["op"] == "ok"


def test_a_foreign_sqlite_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    db = sqlite3.connect(data / "broker.sqlite3")
    db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    db.execute("INSERT INTO invoices VALUES (1, 9.5)")
    db.commit()
    db.close()
    result = refused_at_start(tmp_path, data)
    one_clear_line(result, "not a broker database", "invoices")
    db = sqlite3.connect(data / "broker.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # not turned to WAL
    assert db.execute("SELECT name FROM sqlite_master").fetchall() == [("invoices",)]
    db.close()


def test_a_corrupt_file_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "broker.sqlite3").write_bytes(b"this is not a database\n" * 500)
    one_clear_line(refused_at_start(tmp_path, data), "corrupt or not an SQLite database")


async def test_full_disk_is_unavailable_and_logged_once_per_episode(
    make_broker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SQLITE_MAX_PAGES_ENV, "48")  # ~190 KiB of database
    # The default policy acknowledges from the commit log and applies it to SQLite every
    # fsync interval: the full database is met at the next apply, and publishes are
    # refused from then on.
    broker = make_broker("--retention", "2s", "--fsync-interval", "0.1s")
    peer = await Peer.open(broker.url, broker.token("p"))
    blob = "x" * 3000
    replies = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(replies) < 2000:
        replies.append(await publish(peer, "t", blob))
        if replies[-1].get("code") == "unavailable":
            break
        await asyncio.sleep(0.005)
    replies += [await publish(peer, "t", blob) for _ in range(3)]
    codes = [r.get("code", r["op"]) for r in replies]
    assert "ok" in codes and codes[-1] == "unavailable", codes
    first_refusal = codes.index("unavailable")
    assert set(codes[first_refusal:]) == {"unavailable"}
    log = broker.log()
    assert log.count("store cannot record publishes") == 1, log
    assert "database or disk is full" in log and "SQLITE_FULL" in log
    assert "Traceback" not in log and "cannot rollback" not in log
    # Retention frees the pages; the first publish that gets through ends the episode.
    deadline = time.monotonic() + 20
    reply = replies[-1]
    while reply["op"] != "ok" and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        reply = await publish(peer, "t", "small")
    assert reply["op"] == "ok", reply
    log = broker.log()
    assert log.count("store records publishes again") == 1, log
    assert log.count("store cannot record publishes") == 1
    assert "Traceback" not in log


async def refused_soon(peer: Peer) -> None:
    """Publish until one is refused as ``unavailable`` (bounded)."""
    deadline = time.monotonic() + 10
    reply = await publish(peer, "t", 0)
    while reply["op"] == "ok" and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        reply = await publish(peer, "t", 0)
    assert reply.get("code") == "unavailable", reply


def delete_database(broker: BrokerProcess) -> None:
    for name in ("broker.sqlite3", "broker.sqlite3-wal", "broker.sqlite3-shm"):
        (broker.data / name).unlink(missing_ok=True)


async def test_a_deleted_database_is_noticed_before_acknowledging(make_broker: Any) -> None:
    # --fsync always: nothing more is acknowledged once the file is gone.
    broker = make_broker("--fsync", "always")
    peer = await Peer.open(broker.url, broker.token("p"))
    assert (await publish(peer, "t", 1))["op"] == "ok"
    delete_database(broker)
    replies = [await publish(peer, "t", i) for i in range(5)]
    assert [r.get("code") for r in replies] == ["unavailable"] * 5, replies
    log = broker.log()
    assert log.count("was deleted or replaced") == 1, log
    assert "Traceback" not in log


async def test_a_deleted_database_is_noticed_within_the_fsync_interval(make_broker: Any) -> None:
    # The interval policy looks at the file once per interval (not per commit): what it
    # acknowledges meanwhile is what a crash in that interval would lose anyway.
    broker = make_broker("--fsync-interval", "0.5s")
    peer = await Peer.open(broker.url, broker.token("p"))
    assert (await publish(peer, "t", 1))["op"] == "ok"
    delete_database(broker)
    await refused_soon(peer)
    replies = [await publish(peer, "t", i) for i in range(3)]
    assert [r.get("code") for r in replies] == ["unavailable"] * 3, replies
    # Found by the file's check or by the interval's apply, whichever looks first.
    assert broker.log().count("store cannot record publishes") == 1, broker.log()


async def test_a_replaced_database_is_noticed(broker: BrokerProcess, tmp_path: Path) -> None:
    peer = await Peer.open(broker.url, broker.token("p"))
    assert (await publish(peer, "t", 1))["op"] == "ok"
    other = tmp_path / "other.sqlite3"
    sqlite3.connect(other).close()
    other.replace(broker.data / "broker.sqlite3")
    await refused_soon(peer)
    assert "was deleted or replaced" in broker.log()
