"""``max_disk``: the SQLite store's total size bound. Past it publishes are refused with
``unavailable`` (logged once per episode), and they are taken again once retention frees
room."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from broker.core.model import Draft
from broker.errors import Unavailable
from broker.store.sqlite import SqliteStore

LIMIT = 1 << 20


def _draft(i: int) -> Draft:
    return Draft(f"t/{i % 50}", b'"' + b"x" * 4000 + b'"', "u", "u", int(time.time() * 1000))


async def _fill(store: SqliteStore, most: int) -> tuple[int, int]:
    """Append until refused ``most`` times in a row; (accepted, refused)."""
    accepted = refused = 0
    for i in range(5000):
        try:
            await store.append([_draft(i)])
            accepted += 1
            refused = 0
        except Unavailable:
            refused += 1
            if refused >= most:
                break
        await asyncio.sleep(0.001)  # the fsync thread applies meanwhile
    return accepted, refused


async def test_publishes_past_max_disk_are_refused_until_retention_frees_room(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "broker.sqlite3"
    store = SqliteStore(path, retention=60, fsync_interval=0.02, max_disk=LIMIT)
    await store.open()
    try:
        with caplog.at_level(logging.WARNING, logger="broker.store.sqlite"):
            accepted, refused = await _fill(store, 50)
        assert refused == 50 and 100 < accepted < 1000
        # The database stays near the bound (a commit log tail over it at most).
        assert path.stat().st_size < 3 * LIMIT
        failing = [r for r in caplog.records if "store cannot record publishes" in r.message]
        assert len(failing) == 1 and "max_disk" in failing[0].message
        # Retention removes everything (an hour later): room again.
        await store.trim(time.time() + 3600)
        await store.append([_draft(0)])
    finally:
        await store.close()
