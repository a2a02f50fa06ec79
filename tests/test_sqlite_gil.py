"""An open SQLite store shortens the GIL switch interval: its threads run Python (rows,
pattern matching) while the event loop takes the GIL back once per callback, and at the
default 5 ms many history readers made each loop turn wait that long several times."""

from __future__ import annotations

import sys
from pathlib import Path

from broker.store.sqlite import SqliteStore
from broker.store.sqlite.store import SWITCH_INTERVAL


async def test_opening_the_store_shortens_the_switch_interval(tmp_path: Path) -> None:
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)  # the interpreter's default
    store = SqliteStore(tmp_path / "broker.sqlite3", history=10)
    try:
        await store.open()
        assert sys.getswitchinterval() <= SWITCH_INTERVAL < 0.005
        await store.close()
    finally:
        sys.setswitchinterval(before)
