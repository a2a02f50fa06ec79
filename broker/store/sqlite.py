"""History in an SQLite database: the default, durable store."""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from broker.core.model import Draft, Message, new_epoch
from broker.core.topics import is_pattern, matches
from broker.store.base import Replay, Store, chunks

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    data BLOB NOT NULL,
    sender_id TEXT NOT NULL,
    sender_name TEXT NOT NULL,
    ts INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_topic_seq ON messages (topic, seq);
-- Retention by age searches by seq (see SqliteStore._first_kept); an index on ts cost a
-- third of every insert. Databases from before drop it.
DROP INDEX IF EXISTS messages_ts;
-- One row per topic ever published to: the highest seq removed by retention.
CREATE TABLE IF NOT EXISTS topics (topic TEXT PRIMARY KEY, trimmed INTEGER NOT NULL);
"""

# SQLite limits the number of bound parameters; stay well below it.
_CHUNK = 500


def _row_message(row: tuple[Any, ...]) -> Message:
    return Message(row[0], row[1], bytes(row[2]), row[3], row[4], row[5])


class SqliteStore(Store):
    """History in an SQLite database (WAL, synchronous=FULL): survives crashes and
    restarts. One writer thread does all writes; reads use their own thread and
    connection, so replay never waits for a commit and nothing blocks the event loop."""

    def __init__(self, path: Path, history: int = 1000, retention: float = 24 * 3600) -> None:
        super().__init__(history, retention)
        self.path = path
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="store-write")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="store-read")
        self._wdb: sqlite3.Connection | None = None
        self._rdb: sqlite3.Connection | None = None
        # topic -> number of retained messages, filled lazily; keeps trimming cheap.
        self._counts: dict[str, int] = {}

    async def _on(self, pool: ThreadPoolExecutor, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=5000")
        return db

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = self._wdb = self._connect()
        db.executescript(_SCHEMA)
        row = db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
        if row is None:
            self.epoch = new_epoch()
            db.execute("INSERT INTO meta VALUES ('epoch', ?)", (self.epoch,))
        else:
            self.epoch = row[0]
        stored = db.execute("SELECT value FROM meta WHERE key='last_seq'").fetchone()
        top = db.execute("SELECT max(seq) FROM messages").fetchone()[0]
        self.last_seq = max(int(stored[0]) if stored else 0, top or 0)
        self._rdb = self._connect()

    async def open(self) -> None:
        await self._on(self._writer, self._open_sync)

    def _close_sync(self, db: sqlite3.Connection | None) -> None:
        if db is not None:
            db.close()

    async def close(self) -> None:
        await self._on(self._writer, self._close_sync, self._wdb)
        await self._on(self._reader, self._close_sync, self._rdb)
        self._writer.shutdown()
        self._reader.shutdown()

    def _append_sync(self, drafts: list[Draft]) -> list[Message]:
        db = self._wdb
        assert db is not None
        first = self.last_seq + 1
        msgs = [d.to_message(first + i) for i, d in enumerate(drafts)]
        last = first + len(drafts) - 1
        touched: dict[str, int] = {}
        for m in msgs:
            touched[m.topic] = touched.get(m.topic, 0) + 1
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)",
                [(m.seq, m.topic, m.data, m.sender_id, m.sender_name, m.ts) for m in msgs],
            )
            for topic, added in touched.items():
                self._trim_count(db, topic, added)
            db.execute("INSERT OR REPLACE INTO meta VALUES ('last_seq', ?)", (str(last),))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self._counts.clear()
            raise
        self.last_seq = last
        return msgs

    def _trim_count(self, db: sqlite3.Connection, topic: str, added: int) -> None:
        count = self._counts.get(topic)
        if count is None:
            db.execute("INSERT OR IGNORE INTO topics VALUES (?, 0)", (topic,))
            count = db.execute("SELECT count(*) FROM messages WHERE topic=?", (topic,)).fetchone()[
                0
            ]
        else:
            count += added
        if count > self.history:
            row = db.execute(
                "SELECT seq FROM messages WHERE topic=? ORDER BY seq DESC LIMIT 1 OFFSET ?",
                (topic, self.history),
            ).fetchone()
            if row is not None:
                db.execute("DELETE FROM messages WHERE topic=? AND seq<=?", (topic, row[0]))
                db.execute(
                    "UPDATE topics SET trimmed=max(trimmed, ?) WHERE topic=?", (row[0], topic)
                )
            count = self.history
        self._counts[topic] = count

    async def append(self, drafts: list[Draft]) -> list[Message]:
        result: list[Message] = await self._on(self._writer, self._append_sync, drafts)
        return result

    def _topics_sync(self, pattern: str) -> list[tuple[str, int]]:
        db = self._rdb
        assert db is not None
        if not is_pattern(pattern):
            return db.execute(
                "SELECT topic, trimmed FROM topics WHERE topic=?", (pattern,)
            ).fetchall()
        first = pattern.split("/", 1)[0]
        if first in ("+", "#"):
            rows = db.execute("SELECT topic, trimmed FROM topics").fetchall()
        else:
            # Topics whose first level is `first`: `first` itself or `first/...`.
            rows = db.execute(
                "SELECT topic, trimmed FROM topics WHERE topic=? OR (topic>=? AND topic<?)",
                (first, first + "/", first + "0"),
            ).fetchall()
        return [(t, trimmed) for t, trimmed in rows if matches(pattern, t)]

    def _read_since_sync(self, pattern: str, since: int, upto: int) -> Replay:
        db = self._rdb
        assert db is not None
        topics = self._topics_sync(pattern)
        recovered = all(trimmed <= since for _, trimmed in topics)
        rows: list[tuple[Any, ...]] = []
        for chunk in chunks([t for t, _ in topics], _CHUNK):
            marks = ",".join("?" * len(chunk))
            rows += db.execute(
                f"SELECT * FROM messages WHERE topic IN ({marks}) AND seq>? AND seq<=?",
                (*chunk, since, upto),
            ).fetchall()
        rows.sort(key=lambda r: r[0])
        return Replay([_row_message(r) for r in rows], recovered)

    def _read_last_sync(self, pattern: str, n: int, upto: int) -> list[Message]:
        db = self._rdb
        assert db is not None
        if n == 0:
            return []
        rows: list[tuple[Any, ...]] = []
        for chunk in chunks([t for t, _ in self._topics_sync(pattern)], _CHUNK):
            marks = ",".join("?" * len(chunk))
            rows += db.execute(
                f"SELECT * FROM messages WHERE topic IN ({marks}) AND seq<=? "
                "ORDER BY seq DESC LIMIT ?",
                (*chunk, upto, n),
            ).fetchall()
        rows.sort(key=lambda r: r[0])
        return [_row_message(r) for r in rows[-n:]]

    async def read_since(self, pattern: str, since: int, upto: int) -> Replay:
        result: Replay = await self._on(self._reader, self._read_since_sync, pattern, since, upto)
        return result

    async def read_last(self, pattern: str, n: int, upto: int) -> list[Message]:
        result: list[Message] = await self._on(self._reader, self._read_last_sync, pattern, n, upto)
        return result

    @staticmethod
    def _first_kept(db: sqlite3.Connection, cutoff: int) -> int:
        """The lowest seq from which every message is younger than ``cutoff`` (ms).

        Messages are stamped when published and numbered in that order, so ``ts`` grows
        with ``seq``: a binary search over seq (each step one primary-key lookup) finds
        the boundary. A wall clock stepped back only makes retention approximate there.
        """
        lo, hi = db.execute("SELECT min(seq), max(seq) + 1 FROM messages").fetchone()
        if lo is None:
            return 0
        while lo < hi:
            mid = (lo + hi) // 2
            row = db.execute(
                "SELECT seq, ts FROM messages WHERE seq>=? ORDER BY seq LIMIT 1", (mid,)
            ).fetchone()
            if row is None or row[1] >= cutoff:
                hi = mid
            else:
                lo = row[0] + 1
        return int(lo)

    def _trim_sync(self, now: float) -> int:
        db = self._wdb
        assert db is not None
        cutoff = int((now - self.retention) * 1000)
        db.execute("BEGIN IMMEDIATE")
        try:
            first_kept = self._first_kept(db, cutoff)
            gone = db.execute(
                "SELECT topic, max(seq), count(*) FROM messages WHERE seq<? GROUP BY topic",
                (first_kept,),
            ).fetchall()
            db.execute("DELETE FROM messages WHERE seq<?", (first_kept,))
            for topic, top, _ in gone:
                db.execute("UPDATE topics SET trimmed=max(trimmed, ?) WHERE topic=?", (top, topic))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        for topic, _, count in gone:
            if topic in self._counts:
                self._counts[topic] = max(0, self._counts[topic] - count)
        return sum(count for _, _, count in gone)

    async def trim(self, now: float) -> int:
        removed: int = await self._on(self._writer, self._trim_sync, now)
        return removed
