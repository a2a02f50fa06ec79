"""History reads from SQLite: ``read_since``, ``read_last`` and replays a page at a time,
on reader threads with connections of their own, so that a replay never waits for a
commit. Reads see what SQLite holds: the store applies the commit log first.

Two readers, two lanes: reads of one topic (a client's ``sub`` with ``last`` on its own
topic, an inbox) take one, pattern reads (which may cover many topics) the other. A read
of one topic costs an index lookup; a pattern read can cost far more, and many of them
queued by other clients must not make a one-topic read wait its turn behind them. Each
connection has at most one read in flight (the server serves its requests one at a
time), so within a lane the readers take turns.

A replay of a pattern over more than ``_MANY`` topics (``#`` over 100,000 topics) is
known by its pattern, not by a list of its topics: it walks the messages in seq order and
keeps those its pattern matches, and remembers only what tells a gap (the topics trimmed
past its start). Its cost is what it reads, not how many topics exist: listing them for
each such replay held the GIL long enough to stall the event loop and the one-topic lane
(issue 27, row 6)."""

from __future__ import annotations

import asyncio
import heapq
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from broker.core.model import Message
from broker.core.topics import is_pattern, matches
from broker.store.base import Pages, Replay, Visible, chunks
from broker.store.sqlite.database import connect, floor

# SQLite limits the number of bound parameters; stay well below it.
_CHUNK = 500
# A replay over more topics than this walks the messages in seq order (``_Wide``).
_MANY = 2 * _CHUNK


class _Current(threading.local):
    """The connection of the reader thread this runs on."""

    db: sqlite3.Connection | None = None


_current = _Current()


def _with_db(db: sqlite3.Connection | None, fn: Any, *args: Any) -> Any:
    """On a reader thread: run ``fn`` with ``db`` as this thread's connection."""
    _current.db = db
    return fn(*args)


def _row_message(row: tuple[Any, ...]) -> Message:
    return Message(row[0], row[1], bytes(row[2]), row[3], row[4], row[5])


def _glob_level(level: str) -> str:
    """A topic level as GLOB text: ``+`` any text, the rest literal."""
    if level == "+":
        return "*"
    return "".join(f"[{c}]" if c in "*?[" else c for c in level)


def _candidates(pattern: str) -> tuple[str, tuple[str, ...]]:
    """A WHERE clause (and its parameters) on ``topics`` that holds every topic
    ``pattern`` matches and, in SQLite's C code, leaves out most of the others;
    ``matches`` decides (GLOB's ``*`` also crosses levels)."""
    levels = pattern.split("/")
    if pattern == "#":  # every topic but the '$' ones
        return "(topic<'$' OR topic>='%')", ()
    if levels[-1] == "#":
        glob = "/".join(_glob_level(level) for level in levels[:-1])
        where = "(topic GLOB ? OR topic GLOB ?)"
        params: tuple[str, ...] = (glob, glob + "/*")
    else:
        where, params = "topic GLOB ?", ("/".join(_glob_level(level) for level in levels),)
    first = levels[0]
    if first not in ("+", "#"):
        # Topics whose first level is `first`: `first` itself or `first/...` (the index).
        where += " AND (topic=? OR (topic>=? AND topic<?))"
        params += (first, first + "/", first + "0")
    return where, params


class _Wide:
    """The topics of a replay over more than ``_MANY`` of them, by its ``pattern``; what
    tells a gap: ``marks``, the topics already trimmed past the replay's start (their
    marks then), and ``rowid``, the highest of the topics rows when it began (a topic
    created since holds only messages past the replay)."""

    def __init__(self, pattern: str, marks: dict[str, int], rowid: int) -> None:
        self.pattern = pattern
        self.marks = marks
        self.rowid = rowid


class SqlitePages(Pages):
    """A replay read from SQLite a page at a time, on the reader thread."""

    def __init__(
        self,
        reads: Reads,
        topics: dict[str, int] | _Wide,
        start: int,
        recovered: bool,
        upto: int,
        size: int,
        max_bytes: int,
        floor_at_start: int = 0,
    ) -> None:
        super().__init__(start, recovered)
        self._reads = reads
        self._floor = floor_at_start
        # Topic -> its trimmed mark when the replay began; or the pattern of a wide one.
        self._topics = topics
        self._after = start
        self._upto = upto
        self._size = size
        self._max_bytes = max_bytes

    async def next(self) -> list[Message]:
        while not self.gap and self._topics and self._after < self._upto:
            page, scanned, gap = await self._reads.page(
                self._topics, self._after, self._upto, self._size, self._max_bytes, self._floor
            )
            self._after = scanned
            if gap:
                self.gap = True
            elif page:
                return page
        return []


class Reads:
    """The reader thread (a pool of one) and its connection: every method with ``_sync``
    runs there, the others on the event loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Lane -> its thread (a pool of one) and connection: True for one-topic reads.
        self._pools = {
            lane: ThreadPoolExecutor(1, thread_name_prefix=f"store-read-{name}")
            for lane, name in ((False, "patterns"), (True, "topic"))
        }
        self._dbs: dict[bool, sqlite3.Connection] = {}

    def connect(self) -> None:
        """Open the readers' connections (once the schema exists)."""
        self._dbs = {lane: connect(self.path) for lane in self._pools}

    @property
    def _db(self) -> sqlite3.Connection | None:
        """The connection of the thread this runs on (a reader's), else None."""
        return _current.db

    async def _on(self, one_topic: bool, fn: Any, *args: Any) -> Any:
        """Run ``fn`` on the lane for one-topic reads (``one_topic``) or patterns."""
        db = self._dbs.get(one_topic)
        return await asyncio.get_running_loop().run_in_executor(
            self._pools[one_topic], _with_db, db, fn, *args
        )

    async def close(self) -> None:
        """Close the connections on their threads, then the threads."""
        for lane, pool in self._pools.items():
            await self._on(lane, self._close_sync)
            pool.shutdown()

    def _close_sync(self) -> None:
        if self._db is not None:
            self._db.close()

    async def read_since(self, pattern: str, since: int, upto: int) -> Replay:
        """``Store.read_since`` on what SQLite holds."""
        result: Replay = await self._on(
            not is_pattern(pattern), self._read_since_sync, pattern, since, upto
        )
        return result

    async def read_last(self, pattern: str, n: int, upto: int) -> list[Message]:
        """``Store.read_last`` on what SQLite holds."""
        result: list[Message] = await self._on(
            not is_pattern(pattern), self._read_last_sync, pattern, n, upto
        )
        return result

    async def latest(self, pattern: str, upto: int, limit: int, visible: Visible) -> list[Message]:
        """``Store.latest`` on what SQLite holds."""
        result: list[Message] = await self._on(
            not is_pattern(pattern), self._latest_sync, pattern, upto, limit, visible
        )
        return result

    def _latest_sync(self, pattern: str, upto: int, limit: int, visible: Visible) -> list[Message]:
        db = self._db
        assert db is not None
        topics = [t for t, _ in self._topics_sync(pattern) if visible is None or visible(t)]
        seqs: list[int] = []
        for chunk in chunks(topics, _CHUNK):
            # Per topic, max(seq) over its (topic, seq) index: one lookup, not a scan.
            marks = ",".join("(?)" for _ in chunk)
            rows = db.execute(
                f"WITH t(topic) AS (VALUES {marks}) "
                "SELECT (SELECT max(seq) FROM messages WHERE topic=t.topic AND seq<=?) FROM t",
                (*chunk, upto),
            ).fetchall()
            seqs += [row[0] for row in rows if row[0] is not None]
        chosen = sorted(heapq.nlargest(limit, seqs))
        messages: list[Message] = []
        for part in chunks(chosen, _CHUNK):
            marks = ",".join("?" * len(part))
            rows = db.execute(
                f"SELECT * FROM messages WHERE seq IN ({marks}) ORDER BY seq", part
            ).fetchall()
            messages += [_row_message(r) for r in rows]
        return messages

    async def replay(
        self,
        pattern: str,
        since: int | None,
        last: int | None,
        upto: int,
        page_size: int,
        page_bytes: int,
    ) -> Pages:
        """``Store.replay`` on what SQLite holds."""
        pages: Pages = await self._on(
            not is_pattern(pattern),
            self._replay_sync,
            pattern,
            since,
            last,
            upto,
            page_size,
            page_bytes,
        )
        return pages

    async def page(
        self,
        topics: dict[str, int] | _Wide,
        after: int,
        upto: int,
        size: int,
        max_bytes: int,
        floor_at_start: int = 0,
    ) -> tuple[list[Message], int, bool]:
        """One page of a replay (see ``_page_sync``)."""
        result: tuple[list[Message], int, bool] = await self._on(
            isinstance(topics, dict) and len(topics) <= 1,
            self._page_sync,
            topics,
            after,
            upto,
            size,
            max_bytes,
            floor_at_start,
        )
        return result

    def _topics_sync(self, pattern: str, limit: int | None = None) -> list[tuple[str, int]]:
        """The topics ``pattern`` matches and their marks; ``limit``: stop past that many."""
        db = self._db
        assert db is not None
        if not is_pattern(pattern):
            return db.execute(
                "SELECT topic, trimmed FROM topics WHERE topic=?", (pattern,)
            ).fetchall()
        where, params = _candidates(pattern)
        cursor = db.execute(f"SELECT topic, trimmed FROM topics WHERE {where}", params)
        if pattern == "#":
            return cursor.fetchall() if limit is None else cursor.fetchmany(limit + 1)
        found: list[tuple[str, int]] = []
        for topic, trimmed in cursor:
            if matches(pattern, topic):
                found.append((topic, trimmed))
                if limit is not None and len(found) > limit:
                    break
        return found

    def _read_since_sync(self, pattern: str, since: int, upto: int) -> Replay:
        db = self._db
        assert db is not None
        topics = self._topics_sync(pattern)
        recovered = since >= floor(db) and all(trimmed <= since for _, trimmed in topics)
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
        db = self._db
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

    def _replay_sync(
        self,
        pattern: str,
        since: int | None,
        last: int | None,
        upto: int,
        page_size: int,
        page_bytes: int,
    ) -> Pages:
        db = self._db
        assert db is not None
        mark = floor(db)
        few = self._topics_sync(pattern, _MANY)
        if len(few) > _MANY:
            return self._wide_sync(pattern, since, last, upto, page_size, page_bytes, mark)
        topics = dict(few)
        if since is not None:
            recovered = since >= mark and all(t <= since for t in topics.values())
            start = since
        else:
            start, recovered = self._nth_latest_sync(list(topics), last or 0, upto), True
        return SqlitePages(self, topics, start, recovered, upto, page_size, page_bytes, mark)

    def _wide_sync(
        self,
        pattern: str,
        since: int | None,
        last: int | None,
        upto: int,
        page_size: int,
        page_bytes: int,
        mark: int,
    ) -> Pages:
        """``_replay_sync`` for a pattern over more than ``_MANY`` topics."""
        db = self._db
        assert db is not None
        start = since if since is not None else self._nth_latest_wide_sync(pattern, last, upto)
        # The topics trimmed past the start: the only marks a page compares (the others'
        # were at most the start, so any trim past where the replay is is a gap).
        marks = {
            topic: trimmed
            for topic, trimmed in db.execute(
                "SELECT topic, trimmed FROM topics WHERE trimmed>?", (start,)
            )
            if matches(pattern, topic)
        }
        recovered = since is None or (since >= mark and not marks)
        rowid = db.execute("SELECT max(rowid) FROM topics").fetchone()[0] or 0
        wide = _Wide(pattern, marks, rowid)
        return SqlitePages(self, wide, start, recovered, upto, page_size, page_bytes, mark)

    def _nth_latest_wide_sync(self, pattern: str, last: int | None, upto: int) -> int:
        """``_nth_latest_sync`` for a pattern over more than ``_MANY`` topics."""
        db = self._db
        assert db is not None
        n = last or 0
        if n <= 0:
            return upto
        if n <= _CHUNK:
            # Few messages wanted (`#` with last: 5): the newest messages in seq order,
            # kept when the pattern matches, find them in a few rows when its topics are
            # most of the history; a scan that finds too few falls back.
            rows = db.execute(
                "SELECT seq, topic FROM messages WHERE seq<=? ORDER BY seq DESC LIMIT ?",
                (upto, 20 * n),
            ).fetchall()
            hits = [seq for seq, topic in rows if matches(pattern, topic)]
            if len(hits) >= n:
                return int(hits[n - 1]) - 1
            if len(rows) < 20 * n:  # the whole history was read: fewer than n
                return int(hits[-1]) - 1 if hits else upto
        return self._nth_latest_sync([t for t, _ in self._topics_sync(pattern)], n, upto)

    def _nth_latest_sync(self, topics: list[str], n: int, upto: int) -> int:
        """The seq after which the latest ``n`` messages (``seq <= upto``) of ``topics``
        begin; ``upto`` when there are none. Reads seqs only, lazily."""
        db = self._db
        assert db is not None
        if n <= 0 or not topics:
            return upto
        n = min(n, 1 << 62)  # SQLite integers are 64-bit
        runs = []
        for chunk in chunks(topics, _CHUNK):
            marks = ",".join("?" * len(chunk))
            cursor = db.execute(
                f"SELECT seq FROM messages WHERE topic IN ({marks}) AND seq<=? "
                "ORDER BY seq DESC LIMIT ?",
                (*chunk, upto, n),
            )
            runs.append(row[0] for row in cursor)
        nth = None
        for i, seq in enumerate(heapq.merge(*runs, reverse=True)):
            nth = seq
            if i + 1 >= n:
                break
        return upto if nth is None else int(nth) - 1

    def _page_sync(
        self,
        topics: dict[str, int] | _Wide,
        after: int,
        upto: int,
        size: int,
        max_bytes: int,
        floor_at_start: int = 0,
    ) -> tuple[list[Message], int, bool]:
        """One page of a replay: messages of ``topics`` with ``after < seq <= upto``, at
        most ``size`` of them and ``max_bytes`` of data; the seq read up to; and whether
        a message of the replay was removed before it could be read (a gap)."""
        db = self._db
        assert db is not None
        if isinstance(topics, dict):
            names = list(topics)
            # Few topics: their (topic, seq) index finds the next messages.
            found: list[tuple[int, int]] = []
            for chunk in chunks(names, _CHUNK):
                marks = ",".join("?" * len(chunk))
                found += db.execute(
                    f"SELECT seq, length(data) FROM messages WHERE topic IN ({marks}) "
                    "AND seq>? AND seq<=? ORDER BY seq LIMIT ?",
                    (*chunk, after, upto, size),
                ).fetchall()
            found.sort()
            scanned = upto if len(found) < size else found[size - 1][0]
        else:
            # Many topics: walk the messages in seq order, keep those the pattern matches.
            pattern = topics.pattern
            rows = db.execute(
                "SELECT seq, topic, length(data) FROM messages WHERE seq>? AND seq<=? "
                "ORDER BY seq LIMIT ?",
                (after, upto, 4 * size),
            ).fetchall()
            found = [(seq, length) for seq, topic, length in rows if matches(pattern, topic)]
            scanned = upto if len(rows) < 4 * size else rows[-1][0]
        seqs: list[int] = []
        total = 0
        for seq, length in found[:size]:
            if seqs and total + length > max_bytes:
                break
            seqs.append(seq)
            total += length
        if len(seqs) < len(found):
            scanned = seqs[-1]
        messages: list[Message] = []
        if seqs:
            marks = ",".join("?" * len(seqs))
            rows = db.execute(
                f"SELECT * FROM messages WHERE seq IN ({marks}) ORDER BY seq", seqs
            ).fetchall()
            messages = [_row_message(r) for r in rows]
        # A message of the replay removed before it was read (retention, the per-topic
        # count) moved its topic's mark past `after` since the replay began.
        if isinstance(topics, dict):
            moved: list[tuple[str, int]] = []
            for chunk in chunks(list(topics), _CHUNK):
                marks = ",".join("?" * len(chunk))
                moved += db.execute(
                    f"SELECT topic, trimmed FROM topics WHERE topic IN ({marks}) AND trimmed>?",
                    (*chunk, after),
                ).fetchall()
            gap = any(trimmed > topics.get(topic, trimmed) for topic, trimmed in moved)
        else:
            gap = self._wide_moved_sync(topics, after)
        if len(messages) < len(seqs):
            gap = True
        # A topic emptied by retention meanwhile lost its row (and its mark) with it: the
        # floor moved past where the replay is.
        mark = floor(db)
        if mark > floor_at_start and mark > after:
            gap = True
        return messages, scanned, gap

    def _wide_moved_sync(self, wide: _Wide, after: int) -> bool:
        """Whether a topic of the wide replay ``wide`` was trimmed past ``after`` since it
        began (the gap test of ``_page_sync``)."""
        db = self._db
        assert db is not None
        moved = [
            (topic, trimmed, rowid)
            for topic, trimmed, rowid in db.execute(
                "SELECT topic, trimmed, rowid FROM topics WHERE trimmed>?", (after,)
            )
            if matches(wide.pattern, topic)
        ]
        # The other topics' marks were at most the start: a trim past `after` is a gap,
        # unless the topic is newer than the replay (its messages all come after it).
        # SQLite gives a new row the highest rowid plus one: a row past `wide.rowid` is
        # such a topic. (When every row from some rowid up was removed meanwhile, a new
        # topic may take a lower one and count as old: a gap too many, never one missed.)
        return any(
            trimmed > wide.marks[topic] if topic in wide.marks else rowid <= wide.rowid
            for topic, trimmed, rowid in moved
        )
