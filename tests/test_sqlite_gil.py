"""A broker runs with a short GIL switch interval, whatever its store: threads besides the
event loop run Python (the SQLite store's rows and pattern matching), and the loop takes
the GIL back once per callback; at the default 5 ms, many history readers made each loop
turn wait that long several times. It is set at start-up (``factory.run``), once for the
process, not by the store."""

from __future__ import annotations

import sys
from pathlib import Path

from broker.server.factory import SWITCH_INTERVAL, shorten_switch_interval
from broker.store.sqlite import SqliteStore


def test_start_up_shortens_the_switch_interval() -> None:
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)  # the interpreter's default
    try:
        shorten_switch_interval()
        assert sys.getswitchinterval() <= SWITCH_INTERVAL < 0.005
        sys.setswitchinterval(0.0001)  # shorter already (an embedding application's)
        shorten_switch_interval()
        assert sys.getswitchinterval() < 0.0002
    finally:
        sys.setswitchinterval(before)


async def test_opening_the_store_leaves_the_process_wide_setting_alone(tmp_path: Path) -> None:
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    store = SqliteStore(tmp_path / "broker.sqlite3", history=10)
    try:
        await store.open()
        assert sys.getswitchinterval() == 0.005
        await store.close()
    finally:
        sys.setswitchinterval(before)
