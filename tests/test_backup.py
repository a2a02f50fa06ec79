"""``broker backup FILE``: an online copy of the SQLite store, restored and resumed from."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from .support import ROOT, BrokerProcess, Peer, isolated_env

# Each test runs `broker backup` and `broker serve` processes.
pytestmark = pytest.mark.slow


def backup(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``broker backup ARGS`` in a subprocess (its XDG dirs under ``home``)."""
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", "backup", *args],
        cwd=ROOT,
        env=isolated_env(home),
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_backup_while_running_restores_epoch_and_history(tmp_path: Path) -> None:
    live = BrokerProcess(tmp_path / "live").start()
    restored: BrokerProcess | None = None
    try:
        pub = await Peer.open(live.url, live.token("pub"))
        seqs = [
            (await pub.request("pub", topic="scores", data=f"goal {i}"))["seq"] for i in range(5)
        ]
        sub = await Peer.open(live.url, live.token("sub"))
        first = await sub.request("sub", topic="scores", last=0)
        epoch = first["epoch"]

        copy = tmp_path / "backup.sqlite3"
        result = backup(tmp_path / "live", str(copy), "--data", str(live.data))
        assert result.returncode == 0, result.stderr
        assert f"epoch {epoch}, last seq {seqs[-1]}, 5 messages" in result.stderr
        # The broker kept running and publishing through the backup.
        after = await pub.request("pub", topic="scores", data="after the backup")
        assert after["op"] == "ok" and after["seq"] == seqs[-1] + 1
        await pub.close()
        await sub.close()
        # A single self-contained file: no WAL needed beside it.
        with sqlite3.connect(copy) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"

        # Restore: a fresh data directory holding the copy, a new broker on it.
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        shutil.copy(copy, fresh / "broker.sqlite3")
        restored = BrokerProcess(tmp_path / "restored", data=fresh).start()
        client = await Peer.open(restored.url, restored.token("sub"))
        # A client that saw up to the second message resumes with since and epoch.
        ok = await client.request("sub", topic="scores", since=seqs[1], epoch=epoch)
        assert ok["op"] == "ok", ok
        assert ok["epoch"] == epoch and ok["recovered"] is True
        replayed = [await client.recv() for _ in range(3)]
        assert [(m["seq"], m["data"]) for m in replayed] == [
            (seqs[2], "goal 2"),
            (seqs[3], "goal 3"),
            (seqs[4], "goal 4"),
        ]
        await client.expect_nothing(0.2)
        # New publishes continue the sequence of the backup.
        next_pub = await client.request("pub", topic="scores", data="restored")
        assert next_pub["seq"] == seqs[-1] + 1
        await client.close()
    finally:
        live.kill()
        if restored is not None:
            restored.kill()


def test_backup_refuses_to_overwrite_and_reports_a_missing_store(tmp_path: Path) -> None:
    target = tmp_path / "exists.sqlite3"
    target.write_text("keep me")
    missing = backup(tmp_path, str(tmp_path / "out.sqlite3"), "--data", str(tmp_path / "none"))
    assert missing.returncode == 1
    assert "no store at" in missing.stderr and "Traceback" not in missing.stderr
    refused = backup(tmp_path, str(target), "--data", str(tmp_path / "none"))
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
