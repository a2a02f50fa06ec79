"""The commit policy (docs/operations.md, "Durability and fsync"): an ``ok`` is sent only
once its message is recorded, so ``kill -9`` of the broker loses nothing acknowledged,
with the default ``fsync = interval`` (recorded = written to the operating system) and
with ``fsync = always`` (recorded = fsynced). Real broker processes, killed for real."""

from __future__ import annotations

import asyncio
import sqlite3
import urllib.request
from typing import Any

import pytest

from tests.support import BrokerProcess, Peer, async_wait_for

pytestmark = pytest.mark.process

# With a one-hour interval nothing is fsynced while a test runs: what survives the kill
# survives because it was written to the OS before its ok.
MODES = {
    "default": (),
    "interval-1h": ("--fsync-interval", "1h"),
    "always": ("--fsync", "always"),
}


async def acked_before_kill(broker: BrokerProcess, n: int) -> dict[int, int]:
    """Pipeline ``n`` acknowledged publishes, ``kill -9`` the broker as soon as half are
    acknowledged (the rest still in flight), and return {n: seq} of the acknowledged."""
    pub = await Peer.open(broker.url, broker.token("p"))
    for i in range(n):
        await pub.send({"op": "pub", "topic": f"d/{i % 7}", "data": {"n": i}, "id": i})
    acked: dict[int, int] = {}
    while len(acked) < n // 2:
        frame = await pub.recv(timeout=10)
        assert frame["op"] == "ok", frame
        acked[frame["id"]] = frame["seq"]
    broker.kill()
    # Acks already on their way out before the kill count too: the broker sent them.
    try:
        while True:
            frame = await pub.recv(timeout=2)
            if frame["op"] == "ok":
                acked[frame["id"]] = frame["seq"]
    except Exception:  # the connection dies with the broker
        pass
    return acked


async def replayed(broker: BrokerProcess, count: int) -> dict[int, Any]:
    """Every retained message of d/#: {seq: data}, read after a restart."""
    sub = await Peer.open(broker.url, broker.token("s"))
    ok = await sub.request("sub", topic="d/#", since=0)
    assert ok["op"] == "ok", ok
    out: dict[int, Any] = {}
    while len(out) < count:
        frame = await sub.recv(timeout=10)
        assert frame["op"] == "msg", frame
        out[frame["seq"]] = frame["data"]
    await sub.ws.close()
    return out


@pytest.mark.parametrize("mode", list(MODES))
async def test_kill_9_mid_stream_loses_nothing_acknowledged(make_broker, mode: str) -> None:  # type: ignore[no-untyped-def]
    broker: BrokerProcess = make_broker(*MODES[mode])
    acked = await acked_before_kill(broker, 400)
    assert len(acked) >= 200
    broker.start()
    check = await Peer.open(broker.url, broker.token("c"))
    last = (await check.request("sub", topic="nothing"))["seq"]
    assert last >= max(acked.values())
    got = await replayed(broker, len(acked))
    for n, seq in acked.items():
        assert got.get(seq) == {"n": n}, (n, seq)
    # The counter goes on after the restart: no seq is handed out twice.
    ok = await check.request("pub", topic="d/0", data="after")
    assert ok["op"] == "ok" and ok["seq"] > last


async def test_seq_continues_when_retention_removed_every_message(make_broker) -> None:  # type: ignore[no-untyped-def]
    # history 0 keeps nothing: after a kill -9 the highest seq given out is known only
    # from what retention recorded as removed.
    broker: BrokerProcess = make_broker("--history", "0")
    pub = await Peer.open(broker.url, broker.token("p"))
    seqs = [(await pub.request("pub", topic=f"h/{i}", data=i))["seq"] for i in range(3)]
    broker.kill()
    broker.start()
    pub = await Peer.open(broker.url, broker.token("p"))
    ok = await pub.request("pub", topic="h/9", data="next")
    assert ok["seq"] == seqs[-1] + 1


async def _publish(broker: BrokerProcess, n: int, topic: str = "p") -> list[int]:
    pub = await Peer.open(broker.url, broker.token("p"))
    seqs = [(await pub.request("pub", topic=topic, data=i))["seq"] for i in range(n)]
    await pub.close()
    return seqs


async def test_no_seq_is_given_twice_after_a_power_loss(make_broker) -> None:  # type: ignore[no-untyped-def]
    # A power loss with fsync = interval can take the last commits; clients may have seen
    # their seqs. Simulated: kill -9, drop the newest rows as the lost WAL tail would,
    # and start as on a machine that rebooted (another boot id). No seq comes back.
    broker: BrokerProcess = make_broker()
    seqs = await _publish(broker, 5)
    broker.kill()
    with sqlite3.connect(broker.data / "broker.sqlite3") as db:
        db.execute("DELETE FROM messages WHERE seq > ?", (seqs[1],))
    # The commit log's unsynced tail is gone too; its first record stays: it carried the
    # seq reservation, and was fsynced before any of these publishes was acknowledged.
    segments = sorted(
        broker.data.glob("broker.sqlite3-log.*"), key=lambda p: int(p.suffix.lstrip("."))
    )
    first = segments[0].read_bytes()
    segments[0].write_bytes(first[: 8 + int.from_bytes(first[:4], "little")])
    for segment in segments[1:]:
        segment.write_bytes(b"")
    broker.env["BROKER_TEST_BOOT_ID"] = "after-a-reboot"
    broker.start()
    (after,) = await _publish(broker, 1)
    assert after > seqs[-1]
    assert "seq_resumed_after_reservation" in broker.log() or "restarted since" in broker.log()


async def test_a_clean_shutdown_or_a_mere_kill_continues_the_sequence(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker: BrokerProcess = make_broker()
    seqs = await _publish(broker, 3)
    assert broker.stop() == 0
    broker.env["BROKER_TEST_BOOT_ID"] = "after-a-reboot"
    broker.start()
    # Shut down cleanly before the reboot: nothing was lost, no jump.
    (after,) = await _publish(broker, 1)
    assert after == seqs[-1] + 1
    broker.kill()  # same boot as this run: the WAL is in the OS, nothing lost
    broker.start()
    (again,) = await _publish(broker, 1)
    assert again == after + 1


async def test_interval_fsync_checkpoints_the_wal_into_the_database(make_broker) -> None:  # type: ignore[no-untyped-def]
    # With fsync every 0.2 s the writer copies the WAL into the database file: a copy of
    # the database file alone (no -wal beside it) soon holds the acknowledged messages.
    broker: BrokerProcess = make_broker("--fsync-interval", "0.2s")
    pub = await Peer.open(broker.url, broker.token("p"))
    ok = await pub.request("pub", topic="d/1", data="synced")
    db_file = broker.data / "broker.sqlite3"
    copy = broker.home / "copy.sqlite3"

    def in_main_file() -> bool:
        copy.write_bytes(db_file.read_bytes())
        db = sqlite3.connect(copy)
        try:
            row = db.execute("SELECT data FROM messages WHERE seq=?", (ok["seq"],)).fetchone()
        except sqlite3.OperationalError:  # not even the schema is checkpointed yet
            return False
        finally:
            db.close()
        return row is not None and bytes(row[0]) == b'"synced"'

    await async_wait_for(lambda: in_main_file(), timeout=10, interval=0.1)


def test_fsync_interval_zero_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    broker = BrokerProcess(tmp_path, "--fsync-interval", "0")
    with pytest.raises(RuntimeError, match="fsync.interval"):
        broker.start()


async def test_fsync_always_acks_a_burst_in_order_in_group_commits(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker: BrokerProcess = make_broker("--fsync", "always")
    pub = await Peer.open(broker.url, broker.token("p"))
    for i in range(300):
        await pub.send({"op": "pub", "topic": "d/g", "data": i, "id": i})
    seqs = []
    for i in range(300):
        frame = await pub.recv(timeout=20)
        assert frame["op"] == "ok" and frame["id"] == i, frame
        seqs.append(frame["seq"])
    assert seqs == list(range(seqs[0], seqs[0] + 300))
    # Publishes that arrive during one fsync share the next: fewer commits than publishes.
    metrics = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"{broker.http_url}/metrics", timeout=5).read().decode()
    )
    commits = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("broker_store_commit_batch_size_count")
    )
    assert 1 <= commits < 300
