"""The SQLite database: its schema, its connections, and every statement that writes
(the commits of the commit log's batches, the history bound, retention, the durable
seq reservation, the WAL's fsync and checkpoints)."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

from broker.core.model import Message, new_epoch
from broker.core.namespaces import Namespaces
from broker.errors import Unavailable
from broker.store.dedupe import decode_seqs

SCHEMA = """
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
-- Retention by age searches by seq (see Database.first_kept); an index on ts cost a
-- third of every insert. Databases from before drop it.
DROP INDEX IF EXISTS messages_ts;
-- One row per topic with messages (or recently so): the highest seq removed by
-- retention. A topic that retention emptied loses its row; meta 'floor' (the highest
-- mark of such rows) answers for it.
CREATE TABLE IF NOT EXISTS topics (topic TEXT PRIMARY KEY, trimmed INTEGER NOT NULL);
-- A replay over many topics asks which were trimmed past where it is, at its start and
-- at each page: without this index, a scan of every topic each time.
CREATE INDEX IF NOT EXISTS topics_trimmed ON topics (trimmed);
-- Idempotency keys (section 8 of docs/protocol.md): the seqs of the first publish with
-- a key, written in the transaction of its messages; ts (ms) of that commit.
CREATE TABLE IF NOT EXISTS dedupe (
    user TEXT NOT NULL,
    key TEXT NOT NULL,
    seqs TEXT NOT NULL,
    ts INTEGER NOT NULL,
    PRIMARY KEY (user, key)
) WITHOUT ROWID;
"""

#: fsync = interval: a WAL of more frames (4 KiB pages) than this after a complete
#: checkpoint is truncated, so that it never only grows.
_WAL_TRUNCATE_FRAMES = 4096
#: The WAL is checkpointed into the database once this much was applied, or after this
#: many fsync intervals (see Database.sync).
_CHECKPOINT_BYTES = 4 << 20
_CHECKPOINT_INTERVALS = 10

log = logging.getLogger("broker.store.sqlite")

#: ``PRAGMA application_id`` of every database this store creates ("brkr"): a file that
#: carries another one belongs to another program.
APPLICATION_ID = 0x62726B72
#: The tables every broker database has; a file without ``application_id`` (made before
#: it was set) is ours only when it has them and an epoch.
_OWN_TABLES = {"meta", "messages", "topics"}


def connect(path: Path, writer: bool = False) -> sqlite3.Connection:
    """A connection in WAL mode, usable from the one thread that owns it."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode: a commit is written to the WAL, not fsynced. Only the fsync
    # thread commits (applying the commit log), and it fsyncs the WAL before the log
    # it applied is removed, and checkpoints it itself.
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=5000")
    if writer:
        db.execute("PRAGMA wal_autocheckpoint=0")
        # A WAL that grew (a burst, a long replay holding its snapshot) is cut back to
        # this size when it starts over.
        db.execute("PRAGMA journal_size_limit=67108864")
    return db


def check_database(path: Path) -> None:
    """Refuse a file another program made; stamp our application_id on a new one.
    Checked before ``connect`` turns on WAL: a foreign file is left as it was."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if app_id == APPLICATION_ID:
            return
        if app_id == 0 and not tables:
            db.execute(f"PRAGMA application_id={APPLICATION_ID}")
            return
        if app_id == 0 and _OWN_TABLES <= tables:
            if db.execute("SELECT 1 FROM meta WHERE key='epoch'").fetchone() is not None:
                db.execute(f"PRAGMA application_id={APPLICATION_ID}")
                return
        found = ", ".join(sorted(tables)[:5]) or "none"
        raise Unavailable(
            f"{path} is not a broker database (application_id {app_id:#x}, tables: "
            f"{found}); refusing to start: move it away or choose another --data"
        )
    finally:
        db.close()


def floor(db: sqlite3.Connection) -> int:
    """The highest trim mark of the topics whose rows retention removed (0: none): a
    ``since`` below it is not ``recovered`` for any pattern."""
    row = db.execute("SELECT value FROM meta WHERE key='floor'").fetchone()
    return 0 if row is None else int(row[0])


class Database:
    """The writing side of the database: the writer's connection (commits, retention),
    the checkpointer's, the event loop's key lookups, and the WAL's descriptor (fsync).
    Whoever writes through ``wdb`` or checkpoints holds ``write_lock``."""

    def __init__(
        self, path: Path, history: int, fsync_interval: float, max_pages: int | None = None
    ) -> None:
        self.path = path
        self.history = history
        #: Per-pattern history and retention (``Store.namespaces``).
        self.namespaces = Namespaces()
        self.fsync_interval = fsync_interval
        self.max_pages = max_pages
        self.write_lock = threading.Lock()
        self.wdb: sqlite3.Connection | None = None  # commits: the fsync or writer thread
        self._cdb: sqlite3.Connection | None = None  # checkpoints: whoever applies
        self._kdb: sqlite3.Connection | None = None  # the event loop's key lookups
        self._wal_fd: int | None = None
        # topic -> number of retained messages, filled lazily; keeps trimming cheap.
        self._counts: dict[str, int] = {}
        #: Bytes the database's pages in use take (pages less the free list), measured
        #: after each apply and each retention pass.
        self.used = 0
        #: Bytes applied since the WAL was last checkpointed into the database, and when.
        self.uncheckpointed = 0
        self._checkpointed_at = time.monotonic()

    def open(self) -> tuple[str, int]:
        """Open the writer's connection and the schema; returns the epoch and the highest
        seq SQLite knows was given."""
        db = self.wdb = connect(self.path, writer=True)
        if self.max_pages:
            db.execute(f"PRAGMA max_page_count={int(self.max_pages)}")
        db.executescript(SCHEMA)
        row = db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
        if row is None:
            epoch = new_epoch()
            db.execute("INSERT INTO meta VALUES ('epoch', ?)", (epoch,))
        else:
            epoch = row[0]
        # The highest seq ever given: the newest message, the newest one retention
        # removed (topics.trimmed), or meta.last_seq: where the sequence jumped (past a
        # reservation, or to a new epoch), and in databases from before.
        stored = db.execute("SELECT value FROM meta WHERE key='last_seq'").fetchone()
        top = db.execute("SELECT max(seq) FROM messages").fetchone()[0]
        trimmed = db.execute("SELECT max(trimmed) FROM topics").fetchone()[0]
        return epoch, max(int(stored[0]) if stored else 0, top or 0, trimmed or 0, floor(db))

    def reserved(self) -> int:
        """The seq reservation SQLite holds (0: none)."""
        assert self.wdb is not None
        row = self.wdb.execute("SELECT value FROM meta WHERE key='reserved'").fetchone()
        return 0 if row is None else int(row[0])

    def resume_sequence(self, last_seq: int, booted: str, torn: bool = False) -> tuple[int, int]:
        """Never give a seq twice, even after a power loss; returns the seq to go on from
        and the reservation held.

        With ``fsync = interval`` a power loss can take the last commits, and their seqs,
        which clients may have seen: giving those seqs to new messages would make a client
        that resumes with ``since`` skip them. So seqs are reserved durably ahead of use
        (the store's ``_append_log``) and, when the last run did not shut down cleanly and
        the machine has rebooted since (``booted``, a power loss is possible), or the
        commit log ends in a ``torn`` record (one happened), the sequence goes on after
        the reservation, recorded as the database's last seq. A broker that was only
        killed (same boot) lost nothing: its WAL is in the OS, and the sequence goes on
        without a jump."""
        db = self.wdb
        assert db is not None
        meta = self.meta()
        reserved = int(meta.get("reserved", 0))
        rebooted = meta.get("clean") == "0" and (not booted or meta.get("boot") != booted)
        if (rebooted or torn) and reserved > last_seq:
            log.warning(
                "the last run %s: seqs go on after %d, past any the last run may have given",
                "lost the end of its commit log"
                if torn
                else "did not shut down cleanly and the machine has restarted since",
                reserved,
                extra={"event": "seq_resumed_after_reservation"},
            )
            last_seq = reserved
            db.execute("INSERT OR REPLACE INTO meta VALUES ('last_seq', ?)", (str(last_seq),))
        db.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)", [("clean", "0"), ("boot", booted)]
        )
        return last_seq, reserved

    def meta(self) -> dict[str, str]:
        """The meta table's bookkeeping rows (epoch, clean, boot, reserved, last_seq,
        restored)."""
        assert self.wdb is not None
        return dict(self.wdb.execute("SELECT key, value FROM meta"))

    def take_restored(self) -> str | None:
        """What the marks of ``broker restore`` or ``broker backup`` say (a backup put in
        place, by the command or by hand), removed once read; None: no mark."""
        assert self.wdb is not None
        rows = dict(
            self.wdb.execute("SELECT key, value FROM meta WHERE key IN ('restored', 'backup')")
        )
        if not rows:
            return None
        self.wdb.execute("DELETE FROM meta WHERE key IN ('restored', 'backup')")
        if "restored" in rows:
            return f"restored from a backup: {rows['restored']}"
        return f"a backup put in place by hand ({rows['backup']})"

    def start_epoch(self, after: int) -> str:
        """A new epoch, whose seqs go on after ``after``; returns it."""
        assert self.wdb is not None
        epoch = new_epoch()
        self.wdb.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)",
            [("epoch", epoch), ("last_seq", str(after)), ("reserved", str(after))],
        )
        return epoch

    def open_rest(self) -> None:
        """Open the checkpointer's and the key lookups' connections and the WAL, and make
        the WAL durable: the "not shut down cleanly" mark, and what the commit log held,
        must survive a crash before the log goes."""
        self._cdb = connect(self.path)
        self._kdb = connect(self.path)
        # The schema script wrote to the WAL, so it exists, and lives as long as our
        # connections do.
        self._wal_fd = os.open(f"{self.path}-wal", os.O_RDONLY | os.O_CLOEXEC)
        os.fsync(self._wal_fd)

    def known_key(self, user: str, key: str, oldest: float) -> tuple[int, ...] | None:
        """On the event loop: the seqs SQLite holds for ``user``'s ``key``, if committed
        at ``oldest`` (ms) or later."""
        db = self._kdb
        assert db is not None
        row = db.execute(
            "SELECT seqs, ts FROM dedupe WHERE user=? AND key=?", (user, key)
        ).fetchone()
        if row is None or row[1] < oldest:
            return None
        return decode_seqs(row[0])

    def commit_rows(
        self,
        messages: list[Message],
        keys: list[tuple[str, str, str, int]],
        reserved: int,
    ) -> None:
        """In one transaction, rolled back whole on failure: insert messages (in seq
        order) and keys, apply the per-topic history bound, record a seq reservation (0:
        none). The caller holds ``write_lock`` (or is alone, at start)."""
        db = self.wdb
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            if keys:
                db.executemany("INSERT OR REPLACE INTO dedupe VALUES (?, ?, ?, ?)", keys)
            touched: dict[str, int] = {}
            for m in messages:
                touched[m.topic] = touched.get(m.topic, 0) + 1
            over = {t: n - self.history for t, n in touched.items() if n > self.history}
            if over:
                # A busy topic's batch holds more than its history keeps: the oldest of them
                # would be deleted in this same transaction, so they are never written; the
                # topic's mark records them as removed (what replays and last_seq read).
                kept: list[Message] = []
                removed: dict[str, int] = {}
                for m in messages:
                    left = over.get(m.topic, 0)
                    if left:
                        over[m.topic] = left - 1
                        removed[m.topic] = m.seq
                    else:
                        kept.append(m)
                messages = kept
                for topic, top in removed.items():
                    db.execute("INSERT OR IGNORE INTO topics VALUES (?, 0)", (topic,))
                    db.execute(
                        "UPDATE topics SET trimmed=max(trimmed, ?) WHERE topic=?", (top, topic)
                    )
                    touched[topic] = self.history
            db.executemany(
                "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)",
                [(m.seq, m.topic, m.payload, m.sender_id, m.sender_name, m.ts) for m in messages],
            )
            for topic, added in touched.items():
                self._trim_count(db, topic, added)
            if reserved:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('reserved', ?)", (str(reserved),))
            db.execute("COMMIT")
            self.measure()
        except BaseException:
            # SQLite may have rolled back already (a full disk): a second ROLLBACK would
            # fail with "cannot rollback" and hide the real cause.
            if db.in_transaction:
                db.execute("ROLLBACK")
            self._counts.clear()  # they counted rows that are not there
            raise

    def measure(self) -> int:
        """Bytes the database's pages in use take (``used``), measured now. The caller
        holds ``write_lock``."""
        db = self.wdb
        assert db is not None
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        size = db.execute("PRAGMA page_size").fetchone()[0]
        self.used = int((pages - free) * size)
        return self.used

    def _trim_count(self, db: sqlite3.Connection, topic: str, added: int) -> None:
        count = self._counts.get(topic)
        if count is None:
            db.execute("INSERT OR IGNORE INTO topics VALUES (?, 0)", (topic,))
            count = db.execute("SELECT count(*) FROM messages WHERE topic=?", (topic,)).fetchone()[
                0
            ]
        else:
            count += added
        history = self.namespaces.history(topic, self.history)
        if count > history:
            row = db.execute(
                "SELECT seq FROM messages WHERE topic=? ORDER BY seq DESC LIMIT 1 OFFSET ?",
                (topic, history),
            ).fetchone()
            if row is not None:
                db.execute("DELETE FROM messages WHERE topic=? AND seq<=?", (topic, row[0]))
                db.execute(
                    "UPDATE topics SET trimmed=max(trimmed, ?) WHERE topic=?", (row[0], topic)
                )
            count = history
        self._counts[topic] = count

    def sync(self, checkpoint: bool = False) -> None:
        """Make every commit so far durable (fsync the WAL); then checkpoint the WAL into
        the database when asked, or when it has taken ``_CHECKPOINT_BYTES`` or
        ``_CHECKPOINT_INTERVALS`` fsync intervals since the last time. A checkpoint
        writes and fsyncs database pages; done every second it made the disk's journal
        stall the event loop's sends now and then (fan-out at a fixed rate: max latency
        ~100 ms against ~20 with --memory)."""
        if self._wal_fd is not None:
            os.fsync(self._wal_fd)
        now = time.monotonic()
        if not (
            checkpoint
            or self.uncheckpointed > _CHECKPOINT_BYTES
            or now - self._checkpointed_at > _CHECKPOINT_INTERVALS * self.fsync_interval
        ):
            return
        self.uncheckpointed = 0
        self._checkpointed_at = now
        if self._cdb is not None:
            # Under the write lock: with no commit landing meanwhile the checkpoint copies
            # the whole WAL, so the next commit starts it over from the beginning.
            with self.write_lock:
                row = self._cdb.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                if row is not None and row[1] > _WAL_TRUNCATE_FRAMES and row[1] == row[2]:
                    # Copied whole, yet long: a reader kept it from starting over. Empty it.
                    self._cdb.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    @staticmethod
    def first_kept(db: sqlite3.Connection, cutoff: int) -> int:
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

    def trim(self, now: float, retention: float, dedupe_window: float) -> int:
        """Remove the messages older than ``retention`` seconds and the keys older than
        ``dedupe_window``; returns how many messages went."""
        with self.write_lock:
            db = self.wdb
            assert db is not None
            cutoff = int((now - retention) * 1000)
            db.execute("BEGIN IMMEDIATE")
            try:
                first_kept = self.first_kept(db, cutoff)
                gone = db.execute(
                    "SELECT topic, max(seq), count(*) FROM messages WHERE seq<? GROUP BY topic",
                    (first_kept,),
                ).fetchall()
                db.execute("DELETE FROM messages WHERE seq<?", (first_kept,))
                gone += self._trim_namespaces(db, now, retention)
                emptied = 0
                for topic, top, _ in gone:
                    left = db.execute(
                        "SELECT 1 FROM messages WHERE topic=? LIMIT 1", (topic,)
                    ).fetchone()
                    if left is None:
                        # No message left: the row goes (reads cost what lives, not
                        # what ever lived); the floor answers for its mark.
                        db.execute("DELETE FROM topics WHERE topic=?", (topic,))
                        emptied = max(emptied, top)
                    else:
                        db.execute(
                            "UPDATE topics SET trimmed=max(trimmed, ?) WHERE topic=?", (top, topic)
                        )
                if emptied > floor(db):
                    db.execute("INSERT OR REPLACE INTO meta VALUES ('floor', ?)", (str(emptied),))
                db.execute("DELETE FROM dedupe WHERE ts<?", (int((now - dedupe_window) * 1000),))
                db.execute("COMMIT")
                self.measure()
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            for topic, _, count in gone:
                if topic in self._counts:
                    left = self._counts[topic] - count
                    if left > 0:
                        self._counts[topic] = left
                    else:
                        del self._counts[topic]
            return sum(count for _, _, count in gone)

    def _trim_namespaces(
        self, db: sqlite3.Connection, now: float, retention: float
    ) -> list[tuple[str, int, int]]:
        """Retention of the namespaces that set a shorter one than the global: per topic
        of theirs, what is older goes; ``(topic, highest seq removed, count)`` each."""
        spaces = self.namespaces
        if not spaces.retentions:
            return []
        gone: list[tuple[str, int, int]] = []
        for (topic,) in db.execute("SELECT topic FROM topics").fetchall():
            own = spaces.retention(topic, retention)
            if own >= retention:
                continue
            cutoff = int((now - own) * 1000)
            top, count = db.execute(
                "SELECT max(seq), count(*) FROM messages WHERE topic=? AND ts<?", (topic, cutoff)
            ).fetchone()
            if count:
                db.execute("DELETE FROM messages WHERE topic=? AND seq<=?", (topic, top))
                gone.append((topic, int(top), int(count)))
        return gone

    def close(self, last_seq: int) -> None:
        """A clean shutdown: record it (the next start goes on from ``last_seq``, no
        jump), checkpoint, and close every connection of this side."""
        if self.wdb is not None:
            self.wdb.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                [("clean", "1"), ("reserved", str(last_seq))],
            )
            self.sync(checkpoint=True)
        with self.write_lock:
            for db in (self._cdb, self._kdb, self.wdb):
                if db is not None:
                    db.close()
            self._cdb = self._kdb = self.wdb = None
            if self._wal_fd is not None:
                os.close(self._wal_fd)
                self._wal_fd = None
