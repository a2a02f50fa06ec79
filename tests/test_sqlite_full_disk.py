"""The SQLite store on a full disk (SQLite's ``max_page_count`` standing for it): refused
publishes leave no trace on disk, not an empty commit-log segment each."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from broker.core.model import Draft
from broker.errors import Unavailable
from broker.store.sqlite import SqliteStore


def _draft(i: int) -> Draft:
    return Draft("t", b'"' + b"x" * 3000 + b'"', "u", "u", int(time.time() * 1000) + i)


async def test_refused_publishes_leave_no_empty_segments(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "broker.sqlite3", max_pages=48, fsync_interval=0.05)
    await store.open()
    try:
        refused = 0
        for i in range(2000):
            try:
                await store.append([_draft(i)])
            except Unavailable:
                refused += 1
                if refused >= 200:
                    break
            await asyncio.sleep(0.002)  # the fsync thread applies (and fails) meanwhile
        assert refused >= 200
        segments = list(tmp_path.glob("broker.sqlite3-log.*"))
        # The segment holding what SQLite could not take, the current one, the next.
        assert len(segments) <= 4, sorted(p.name for p in segments)
    finally:
        with pytest.raises(Exception):  # noqa: B017 - closing applies the log: still full
            await store.close()
