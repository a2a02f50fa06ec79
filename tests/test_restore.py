"""``broker restore FILE``: the documented recipe (docs/operations.md, "Backup and
restore") with real processes, and what restore refuses. After a restore the broker
begins a new epoch above every seq it gave: seqs given after the backup are never given
again under the epoch clients saw, and resuming clients replay what the backup holds."""

from __future__ import annotations

import contextlib
import os
import pty
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broker.core.model import Draft
from broker.store.sqlite import SqliteStore

from .support import ROOT, BrokerProcess, Peer, isolated_env, run_cli


def recipe() -> list[str]:
    """The commands of the restore recipe in docs/operations.md, in order."""
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text[text.index("To restore a backup") :]
    block = section[section.index("```sh") : section.index("```\n", section.index("```sh") + 5)]
    commands = [c for c in block.splitlines()[1:] if c and not c.startswith(("#", " "))]
    return [re.sub(r"^sudo (-u broker )?", "", c).split(" \\")[0] for c in commands]


@pytest.mark.slow
async def test_the_documented_recipe_restores_an_older_backup_in_a_new_epoch(
    tmp_path: Path,
) -> None:
    # The recipe this test follows, step by step.
    assert recipe() == [
        "systemctl stop broker",
        "/opt/broker/venv/bin/broker restore --data /var/lib/broker",
        "systemctl start broker",
    ]
    home = tmp_path / "home"
    broker = BrokerProcess(home).start()
    try:
        pub = await Peer.open(broker.url, broker.token("pub"))
        a = [(await pub.request("pub", topic="t", data=f"a{i}"))["seq"] for i in range(5)]
        backup = tmp_path / "backup.sqlite3"
        made = run_cli(home, "backup", str(backup), "--data", str(broker.data))
        assert made.returncode == 0, made.stderr
        b = [(await pub.request("pub", topic="t", data=f"b{i}"))["seq"] for i in range(5)]
        assert a + b == list(range(1, 11))
        sub = await Peer.open(broker.url, broker.token("sub"))
        epoch = (await sub.request("sub", topic="t", last=0))["epoch"]
        await pub.close()
        await sub.close()

        assert broker.stop(signal.SIGTERM) == 0  # 1. stop the broker
        restored = run_cli(home, "restore", "--data", str(broker.data), str(backup))  # 2.
        assert restored.returncode == 0, restored.stderr
        [line] = restored.stderr.strip().splitlines()
        assert "last seq 5, 5 messages" in line and "the next start begins a new epoch" in line
        [aside] = broker.data.glob("replaced-*")
        assert (aside / "broker.sqlite3").is_file()  # the replaced history is kept
        broker.start()  # 3. start it

        assert "history went back" in broker.log()
        client = await Peer.open(broker.url, broker.token("sub"))
        ok = await client.request("sub", topic="t", since=10, epoch=epoch)
        assert ok["op"] == "ok" and ok["epoch"] != epoch and ok["recovered"] is False
        replayed = [await client.recv() for _ in range(5)]
        assert [(m["seq"], m["data"]) for m in replayed] == [(s, f"a{s - 1}") for s in a]
        # b0..b4's seqs are never given again, under any epoch.
        pub = await Peer.open(broker.url, broker.token("pub"))
        c = await pub.request("pub", topic="t", data="c0")
        assert c["op"] == "ok" and c["seq"] > 10
        live = await client.recv()
        assert live["seq"] == c["seq"] and live["data"] == "c0"
        await client.close()
        await pub.close()
    finally:
        broker.kill()


@pytest.mark.slow
async def test_restore_refuses_while_a_broker_holds_the_data_directory(tmp_path: Path) -> None:
    home = tmp_path / "home"
    broker = BrokerProcess(home).start()
    try:
        pub = await Peer.open(broker.url, broker.token("pub"))
        await pub.request("pub", topic="t", data=1)
        await pub.close()
        backup = tmp_path / "backup.sqlite3"
        assert run_cli(home, "backup", str(backup), "--data", str(broker.data)).returncode == 0
        refused = run_cli(home, "restore", "--data", str(broker.data), str(backup))
        assert refused.returncode == 1
        assert "in use by another broker" in refused.stderr and "restore refused" in refused.stderr
        assert "Traceback" not in refused.stderr
        assert not list(broker.data.glob("replaced-*"))
    finally:
        broker.kill()


@pytest.mark.slow
def test_restore_refuses_a_file_that_is_not_a_sound_broker_database(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "broker.sqlite3").write_bytes(b"")  # whatever is there must stay
    text = tmp_path / "notes.txt"
    text.write_text("not a database at all " * 200)
    other = tmp_path / "other.sqlite3"
    with sqlite3.connect(other) as db:
        db.execute("PRAGMA application_id=1234")
        db.execute("CREATE TABLE t (x)")
    corrupt = tmp_path / "corrupt.sqlite3"
    with sqlite3.connect(corrupt) as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("CREATE TABLE messages (seq INTEGER PRIMARY KEY, topic TEXT, data BLOB)")
        db.execute("CREATE INDEX m_topic ON messages (topic)")
        db.execute("INSERT INTO meta VALUES ('epoch', 'e')")
        db.executemany(
            "INSERT INTO messages VALUES (?, 't', ?)", [(i, b"x" * 500) for i in range(1, 300)]
        )
    raw = bytearray(corrupt.read_bytes())
    for page in (3, 4, 5):  # the headers of some b-tree pages scrambled
        raw[4096 * page : 4096 * page + 12] = b"\xff" * 12
    corrupt.write_bytes(bytes(raw))
    for bad, says in (
        (text, "not an SQLite database"),
        (other, "another program's database"),
        (corrupt, "corrupt"),
    ):
        refused = run_cli(tmp_path, "restore", "--data", str(data), str(bad))
        assert refused.returncode == 1, refused.stderr
        assert "restore refused" in refused.stderr and says in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
    assert sorted(p.name for p in data.iterdir()) == ["broker.sqlite3"]


def on_a_terminal(home: Path, *args: str) -> tuple[int, str]:
    """``broker ARGS`` with a pseudo-terminal as its output: exit code and all it wrote."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", *args],
        cwd=ROOT,
        env={**isolated_env(home), "TERM": "xterm", "COLUMNS": "100"},
        stdin=slave,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    out = b""
    with contextlib.suppress(OSError):  # EIO once the child is gone
        while chunk := os.read(master, 65536):
            out += chunk
    os.close(master)
    return proc.wait(timeout=60), out.decode(errors="replace")


@pytest.mark.slow
async def test_backup_and_restore_show_progress_on_a_terminal(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    store = SqliteStore(data / "broker.sqlite3", history=10_000, fsync_interval=3600)
    await store.open()
    blob = b'"' + b"x" * 4000 + b'"'
    for _ in range(4):  # about 16 MB: several steps of the copy
        drafts = [Draft(f"t/{i % 4}", blob, "u", "U", int(time.time() * 1000)) for i in range(1000)]
        if store.append_now(drafts) is None:
            await store.append(drafts)
    await store.close()
    copy = tmp_path / "copy.sqlite3"
    code, out = on_a_terminal(tmp_path, "backup", str(copy), "--data", str(data))
    assert code == 0, out
    assert "backing up" in out and "100%" in out
    assert out.rstrip().splitlines()[-1].endswith("bytes")  # then one line says what it did
    code, out = on_a_terminal(tmp_path, "restore", str(copy), "--data", str(data))
    assert code == 0, out
    assert "restoring" in out and "100%" in out
    assert out.rstrip().splitlines()[-1].endswith("the next start begins a new epoch")
