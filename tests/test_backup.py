"""``broker backup FILE``: an online copy of the SQLite store, with everything acknowledged
before it started; never inside the data directory. Restoring it: test_restore.py."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from .support import ROOT, BrokerProcess, Peer, isolated_env, run_cli

# Each test runs `broker backup` and `broker serve` processes.
pytestmark = pytest.mark.slow


@pytest.mark.slow
async def test_backup_while_running_holds_every_acknowledged_message(tmp_path: Path) -> None:
    # A one-hour interval: the five messages are only in the commit log, not in SQLite.
    live = BrokerProcess(tmp_path / "live", "--fsync-interval", "1h").start()
    try:
        pub = await Peer.open(live.url, live.token("pub"))
        seqs = [
            (await pub.request("pub", topic="scores", data=f"goal {i}"))["seq"] for i in range(5)
        ]
        copy = tmp_path / "backup.sqlite3"
        result = run_cli(tmp_path / "live", "backup", str(copy), "--data", str(live.data))
        assert result.returncode == 0, result.stderr
        assert f"last seq {seqs[-1]}, 5 messages (5 from the commit log)" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1  # one line says what it did
        # The broker kept running and publishing through the backup.
        after = await pub.request("pub", topic="scores", data="after the backup")
        assert after["op"] == "ok" and after["seq"] == seqs[-1] + 1
        await pub.close()
        # A single self-contained file, no WAL needed beside it, marked as a backup.
        with sqlite3.connect(copy) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
            rows = db.execute("SELECT seq, data FROM messages ORDER BY seq").fetchall()
            assert rows == [(s, f'"goal {i}"'.encode()) for i, s in enumerate(seqs)]
            assert db.execute("SELECT value FROM meta WHERE key='backup'").fetchone()
    finally:
        live.kill()


@pytest.mark.slow
async def test_no_target_in_the_data_directory_and_no_replaced_lock_lets_a_second_broker_in(
    tmp_path: Path,
) -> None:
    live = BrokerProcess(tmp_path / "live").start()
    try:
        lock = live.data / "lock"
        refused = run_cli(
            tmp_path / "live", "backup", "--force", str(lock), "--data", str(live.data)
        )
        assert refused.returncode == 1 and "inside the data directory" in refused.stderr
        assert lock.read_text().strip() == str(live.proc.pid if live.proc else "")
        # Replaced by hand: the lock is the directory's, which no file replacement swaps.
        (tmp_path / "other").write_text("0\n")
        os.replace(tmp_path / "other", lock)
        second = BrokerProcess(tmp_path / "second", data=live.data)
        with pytest.raises(RuntimeError, match="in use by another broker"):
            second.start()
        pub = await Peer.open(live.url, live.token("pub"))
        assert (await pub.request("pub", topic="t", data=1))["op"] == "ok"
        await pub.close()
    finally:
        live.kill()


def test_backup_refuses_to_overwrite_and_reports_a_missing_store(tmp_path: Path) -> None:
    target = tmp_path / "exists.sqlite3"
    target.write_text("keep me")
    missing = run_cli(
        tmp_path, "backup", str(tmp_path / "out.sqlite3"), "--data", str(tmp_path / "none")
    )
    assert missing.returncode == 1
    assert "no store at" in missing.stderr and "Traceback" not in missing.stderr
    refused = run_cli(tmp_path, "backup", str(target), "--data", str(tmp_path / "none"))
    assert refused.returncode == 1 and "--force" in refused.stderr
    assert target.read_text() == "keep me"


def test_backup_reads_the_data_dir_from_the_environment(tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.mkdir()
    with sqlite3.connect(data / "broker.sqlite3") as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("CREATE TABLE messages (seq INTEGER PRIMARY KEY, topic TEXT)")
        db.execute("INSERT INTO meta VALUES ('epoch', 'e1')")
    result = subprocess.run(
        [sys.executable, "-m", "broker.cli", "backup", str(tmp_path / "out.sqlite3")],
        cwd=ROOT,
        env={**isolated_env(tmp_path), "BROKER_DATA": str(data)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "epoch e1, last seq 0, 0 messages" in result.stderr


@pytest.mark.slow
async def test_a_backup_under_load_holds_everything_acknowledged_before_it_started(
    tmp_path: Path,
) -> None:
    # A short interval: the log is applied and its segments removed while the backup runs.
    live = BrokerProcess(
        tmp_path / "live", "--fsync-interval", "20ms", "--history", "100000"
    ).start()
    try:
        pub = await Peer.open(live.url, live.token("pub"))
        stop = asyncio.Event()
        acked: list[int] = []

        async def publish() -> None:
            n = 0
            while not stop.is_set():
                acked.append((await pub.request("pub", topic=f"t/{n % 5}", data=n))["seq"])
                n += 1

        task = asyncio.get_running_loop().create_task(publish())
        while len(acked) < 200:
            await asyncio.sleep(0.01)
        before = max(acked)
        copy = tmp_path / "copy.sqlite3"
        result = await asyncio.to_thread(
            run_cli, tmp_path, "backup", str(copy), "--data", str(live.data)
        )
        stop.set()
        await asyncio.wait_for(task, 10)
        await pub.close()
        assert result.returncode == 0, result.stderr
        with sqlite3.connect(copy) as db:
            seqs = [row[0] for row in db.execute("SELECT seq FROM messages ORDER BY seq")]
        # Every message acknowledged before the backup started, and no gap after them.
        assert seqs == list(range(1, len(seqs) + 1)) and seqs[-1] >= before
    finally:
        live.kill()
