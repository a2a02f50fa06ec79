"""History in an SQLite database: the default, durable store."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import heapq
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn

from broker.core.model import Draft, Message, new_epoch, now_ms
from broker.core.topics import is_pattern, matches
from broker.errors import Unavailable
from broker.store.base import (
    LATEST_LIMIT,
    PAGE_BYTES,
    PAGE_SIZE,
    Pages,
    Replay,
    Store,
    Visible,
    chunks,
)
from broker.store.dedupe import KeyId, decode_seqs, encode_seqs, number
from broker.store.log import Batch, CommitLog, encode

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
# SQLite limits the number of bound parameters; stay well below it.
_CHUNK = 500

log = logging.getLogger("broker.store.sqlite")

#: ``PRAGMA application_id`` of every database this store creates ("brkr"): a file that
#: carries another one belongs to another program.
APPLICATION_ID = 0x62726B72
#: The tables every broker database has; a file without ``application_id`` (made before
#: it was set) is ours only when it has them and an epoch.
_OWN_TABLES = {"meta", "messages", "topics"}
#: Test-only: cap the database at this many pages (SQLite's max_page_count), so a test
#: meets "database or disk is full" without filling a real disk.
MAX_PAGES_ENV = "BROKER_TEST_SQLITE_MAX_PAGES"
#: Test-only: this machine's boot id, as if it had rebooted (a power loss) since the last
#: run of the broker.
BOOT_ID_ENV = "BROKER_TEST_BOOT_ID"
#: Seqs are reserved durably this many at a time (see _resume_sequence).
SEQ_RESERVE = 10_000
#: The commit log's batches not yet in SQLite are applied early when
#: they pass this many bytes, and publishes wait for the store (``append``) past the
#: second bound: the memory they take stays bounded when SQLite is slow.
_TAIL_APPLY_BYTES = 1 << 20
_TAIL_MAX_BYTES = 8 << 20
#: The WAL is checkpointed into the database once this much was applied, or after this
#: many fsync intervals (see _sync_sync).
_CHECKPOINT_BYTES = 4 << 20
_CHECKPOINT_INTERVALS = 10


def boot_id() -> str:
    """An id of this boot of the machine ("" where the system does not say)."""
    override = os.environ.get(BOOT_ID_ENV)
    if override:
        return override
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def describe(exc: BaseException) -> str:
    """The real cause of a storage error, for one log line: SQLite's message and code."""
    name = getattr(exc, "sqlite_errorname", None)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} (errno {exc.errno})"
    return f"{exc} ({name})" if name else str(exc)


def _row_message(row: tuple[Any, ...]) -> Message:
    return Message(row[0], row[1], bytes(row[2]), row[3], row[4], row[5])


class _SqlitePages(Pages):
    """A replay read from SQLite a page at a time, on the store's reader thread."""

    def __init__(
        self,
        store: SqliteStore,
        topics: dict[str, int],
        start: int,
        recovered: bool,
        upto: int,
        size: int,
        max_bytes: int,
    ) -> None:
        super().__init__(start, recovered)
        self._store = store
        self._topics = topics  # topic -> its trimmed mark when the replay began
        self._after = start
        self._upto = upto
        self._size = size
        self._max_bytes = max_bytes

    async def next(self) -> list[Message]:
        store = self._store
        while not self.gap and self._topics and self._after < self._upto:
            result: tuple[list[Message], int, bool] = await store._on(
                store._reader,
                store._page_sync,
                self._topics,
                self._after,
                self._upto,
                self._size,
                self._max_bytes,
            )
            page, scanned, gap = result
            self._after = scanned
            if gap:
                self.gap = True
            elif page:
                return page
        return []


class SqliteStore(Store):
    """History in an SQLite database (WAL): survives a crash of the broker and restarts.

    A batch counts as recorded once it is appended to the commit log
    (``broker.store.log``) with one ``write``; the fsync policy (docs/operations.md,
    "Durability and fsync") says what else. ``interval`` (the default): nothing else, so
    the append runs on the event loop's thread (``append_now``): the batch is in the
    operating system, which a ``kill -9`` of the broker cannot undo, and a power loss can
    cost the publishes of the last ``fsync_interval``, never the database's consistency.
    ``always``: the batch is appended the same way and counts once the store's fsync
    thread has fsynced the segment; publishes that arrive meanwhile form the next group
    commit.

    Either way a thread of its own, every ``fsync_interval`` seconds, rotates the log,
    fsyncs the finished segment, applies its batches to SQLite in one transaction, fsyncs
    and checkpoints the WAL, and removes the segment. Reads (their own thread and
    connection, so replay never waits for a commit) and retention apply the log first."""

    def __init__(
        self,
        path: Path,
        history: int = 1000,
        retention: float = 24 * 3600,
        *,
        fsync: str = "interval",
        fsync_interval: float = 1.0,
    ) -> None:
        super().__init__(history, retention)
        self.path = path
        self._path_name = str(path)
        if fsync not in ("interval", "always"):
            raise ValueError(f"unknown fsync policy {fsync!r}")
        #: Fsync before every commit counts (True), or every ``fsync_interval`` seconds.
        self.fsync_always = fsync == "always"
        self.fsync_interval = fsync_interval
        # Held by whoever writes through _wdb: the loop thread (append_now, which never
        # waits for it) or the writer thread (append, trim, close).
        self._write_lock = threading.Lock()
        self._cdb: sqlite3.Connection | None = None  # the fsync thread's checkpoints
        self._kdb: sqlite3.Connection | None = None  # the loop thread's key lookups
        self._wal_fd: int | None = None
        #: Seqs up to this one are durably reserved (see _resume_sequence).
        self._reserved = 0
        self._syncer: threading.Thread | None = None
        # The fsync thread waits on _syncing for: an fsync asked for (fsync = always:
        # _sync_asked records appended, _synced fsynced), an early apply, or the stop.
        self._syncing = threading.Condition()
        self._stop_syncer = False
        self._apply_due = False
        self._sync_asked = 0
        self._synced = 0
        self._sync_waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        # The commit log, and what it holds that SQLite does not yet:
        # messages, keys ((user, key) -> (seqs, ts)), reservation, bytes. _tail_lock makes
        # an append (log write + tail) and a rotation (new segment + taking the tail) one
        # step each; _apply_lock lets one thread at a time apply.
        self._log: CommitLog | None = None
        self._tail: list[Message] = []
        self._tail_keys: dict[KeyId, tuple[tuple[int, ...], int]] = {}
        self._tail_reserved = 0
        self._tail_bytes = 0
        #: Keys taken from the tail by an apply that has not committed yet: still live.
        self._applying_keys: dict[KeyId, tuple[tuple[int, ...], int]] = {}
        #: The highest seq SQLite holds (what reads see without applying the log first).
        self._applied_seq = 0
        self._tail_lock = threading.Lock()
        self._apply_lock = threading.Lock()
        # Bytes applied since the WAL was last checkpointed into the database, and when.
        self._uncheckpointed = 0
        self._checkpointed_at = time.monotonic()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="store-write")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="store-read")
        self._wdb: sqlite3.Connection | None = None
        self._rdb: sqlite3.Connection | None = None
        # topic -> number of retained messages, filled lazily; keeps trimming cheap.
        self._counts: dict[str, int] = {}
        # The exclusive lock on the data directory (a file descriptor), held while open.
        self._lock_fd: int | None = None
        # (st_dev, st_ino) of the database file when opened; why it is gone, once it is.
        self._file_id: tuple[int, int] | None = None
        self._lost: str | None = None
        # The cause of the storage failure going on (None: none) and publishes refused.
        self._failure: str | None = None
        self._refused = 0
        self._trim_failure: str | None = None

    async def _on(self, pool: ThreadPoolExecutor, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    def _connect(self, writer: bool = False) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
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

    def _lock_directory(self) -> None:
        """Take the exclusive lock on the data directory, or refuse to start: two brokers
        on one database would hand out the same seqs."""
        folder = self.path.parent
        fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise Unavailable(
                f"data directory {folder} is in use by another broker{pid}; "
                "stop it or choose another --data"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _unlock_directory(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _check_database(self, db: sqlite3.Connection) -> None:
        """Refuse a file another program made; stamp our application_id on a new one."""
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
            f"{self.path} is not a broker database (application_id {app_id:#x}, tables: "
            f"{found}); refusing to start: move it away or choose another --data"
        )

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_directory()
        try:
            self._open_database()
        except sqlite3.DatabaseError as exc:
            self._unlock_directory()
            raise Unavailable(
                f"cannot open {self.path}: {describe(exc)}; the file is corrupt or not an "
                "SQLite database: move it away or choose another --data"
            ) from None
        except BaseException:
            self._unlock_directory()
            raise
        self._file_id = self._identity()

    def _identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self._path_name)  # a str: a Path converts itself on every call
        except FileNotFoundError:
            return None
        return (st.st_dev, st.st_ino)

    def _check_file(self) -> None:
        """Refuse to acknowledge once the database file was deleted or replaced: what
        we write would go to a file nobody will ever open again."""
        if self._lost is None and self._identity() != self._file_id:
            self._lost = (
                f"the database file {self.path} was deleted or replaced while the broker ran; "
                "publishes are refused until it is restarted"
            )
        if self._lost is not None:
            raise Unavailable(self._lost)

    def _open_database(self) -> None:
        # Checked before _connect turns on WAL: a foreign file is left as it was.
        probe = sqlite3.connect(self.path, isolation_level=None)
        try:
            self._check_database(probe)
        finally:
            probe.close()
        db = self._wdb = self._connect(writer=True)
        if os.environ.get(MAX_PAGES_ENV):
            db.execute(f"PRAGMA max_page_count={int(os.environ[MAX_PAGES_ENV])}")
        db.executescript(_SCHEMA)
        row = db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
        if row is None:
            self.epoch = new_epoch()
            db.execute("INSERT INTO meta VALUES ('epoch', ?)", (self.epoch,))
        else:
            self.epoch = row[0]
        # The highest seq ever given: the newest message, or the newest one retention
        # removed (topics.trimmed); meta.last_seq is only in databases from before.
        stored = db.execute("SELECT value FROM meta WHERE key='last_seq'").fetchone()
        top = db.execute("SELECT max(seq) FROM messages").fetchone()[0]
        trimmed = db.execute("SELECT max(trimmed) FROM topics").fetchone()[0]
        self.last_seq = max(int(stored[0]) if stored else 0, top or 0, trimmed or 0)
        log_ = CommitLog(self.path.parent, f"{self.path.name}-log")
        recovered = self._recover_log(db, log_)
        self._resume_sequence(db)
        self._applied_seq = self.last_seq
        self._rdb = self._connect()
        self._cdb = self._connect()
        self._kdb = self._connect()
        # The schema script wrote to the WAL, so it exists, and lives as long as our
        # connections do.
        self._wal_fd = os.open(f"{self.path}-wal", os.O_RDONLY | os.O_CLOEXEC)
        # The "not shut down cleanly" mark, and what the commit log held, must survive a
        # crash before the log goes.
        os.fsync(self._wal_fd)
        log_.remove_upto(recovered)
        log_.start()
        self._log = log_

    def _recover_log(self, db: sqlite3.Connection, log_: CommitLog) -> int:
        """Apply what the commit log holds beyond SQLite (the broker was killed before its
        fsync thread applied it); returns the last segment read, to be removed once the
        WAL is durable (_open_database fsyncs it)."""
        batches, last_segment = log_.recover()
        messages = [m for b in batches for m in b.messages if m.seq > self.last_seq]
        keys = [k for b in batches for k in b.keys]
        reserved = max((b.reserved for b in batches), default=0)
        if messages or keys or reserved:
            row = db.execute("SELECT value FROM meta WHERE key='reserved'").fetchone()
            if row is not None and int(row[0]) >= reserved:
                reserved = 0
            self._commit_rows(db, messages, keys, reserved)
            if messages:
                self.last_seq = max(self.last_seq, messages[-1].seq)
            log.info(
                "applied %d messages from the commit log the last run left",
                len(messages),
                extra={"event": "commit_log_recovered"},
            )
        return last_segment

    def _resume_sequence(self, db: sqlite3.Connection) -> None:
        """Never give a seq twice, even after a power loss.

        With ``fsync = interval`` a power loss can take the last commits, and their seqs,
        which clients may have seen: giving those seqs to new messages would make a client
        that resumes with ``since`` skip them. So seqs are reserved durably ahead of use
        (``_append_log``) and, when the last run did not shut down cleanly and the machine
        has rebooted since (a power loss is possible), the sequence goes on after the
        reservation. A broker that was only killed (same boot) lost nothing: its WAL is
        in the OS, and the sequence goes on without a jump."""
        meta = dict(
            db.execute("SELECT key, value FROM meta WHERE key IN ('reserved', 'clean', 'boot')")
        )
        self._reserved = int(meta.get("reserved", 0))
        booted = boot_id()
        if meta.get("clean") == "0" and (not booted or meta.get("boot") != booted):
            if self._reserved > self.last_seq:
                log.warning(
                    "the last run did not shut down cleanly and the machine has restarted "
                    "since: seqs go on after %d, past any the last run may have given",
                    self._reserved,
                    extra={"event": "seq_resumed_after_reservation"},
                )
                self.last_seq = self._reserved
        db.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)", [("clean", "0"), ("boot", booted)]
        )

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._on(self._writer, self._open_sync)
        if self._log is not None:  # open: the fsync thread applies its log
            self._syncer = threading.Thread(target=self._sync_loop, name="store-fsync", daemon=True)
            self._syncer.start()

    def _sync_loop(self) -> None:
        """The fsync thread: fsync the log when asked (fsync = always), and apply it to
        SQLite every ``fsync_interval`` or sooner when its tail grows large. A thread of
        its own, so that the fsyncs keep their pace whatever the event loop does; and not
        a pool's, whose hand-off costs more than the fsync (see _await_fsync)."""
        # Below the event loop's priority: its fsyncs and SQLite work give way to the
        # loop's sends on a busy core (they are batch work; the loop is latency).
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        syncing = self._syncing
        next_apply = time.monotonic() + self.fsync_interval
        while True:
            with syncing:
                while (
                    not self._stop_syncer
                    and not self._apply_due
                    and self._sync_asked <= self._synced
                    and time.monotonic() < next_apply
                ):
                    syncing.wait(next_apply - time.monotonic())
                if self._stop_syncer:
                    return
                asked, due, self._apply_due = self._sync_asked, self._apply_due, False
            if asked > self._synced:
                self._fsync_log(asked)
            if due or time.monotonic() >= next_apply:
                next_apply = time.monotonic() + self.fsync_interval
                try:
                    self._apply_sync()
                except (sqlite3.Error, OSError) as exc:
                    # Publishes wait for the store from now on (append), and are refused
                    # while it still fails; what the log holds stays there.
                    self._failing(describe(exc), 0)

    def _fsync_log(self, asked: int) -> None:
        """fsync = always: make the records up to number ``asked`` durable and tell the
        event loop. Under the apply lock: an apply (on any thread) fsyncs the segment it
        rotates away from before it lets go, so the records are either there or in the
        current segment, which is the one fsynced here."""
        error: OSError | None = None
        try:
            assert self._log is not None
            with self._apply_lock:
                self._log.sync()
        except OSError as exc:
            error = exc
        else:
            self._synced = asked
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                self._loop.call_soon_threadsafe(self._fsynced, asked, error)

    def _fsynced(self, asked: int, error: OSError | None) -> None:
        """On the event loop: wake the appends that waited for the fsync of ``asked``."""
        waiters = self._sync_waiters
        while waiters and waiters[0][0] <= asked:
            _, waiter = waiters.popleft()
            if not waiter.done():
                if error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(error)

    async def _await_fsync(self) -> None:
        """fsync = always: wait until the fsync thread has fsynced every record appended
        so far. A dedicated thread woken through a condition costs ~130 µs of CPU per
        fsync here, a thread pool's round trip ~230 (measured pinned to one core)."""
        assert self._loop is not None
        with self._syncing:
            self._sync_asked += 1
            asked = self._sync_asked
            self._syncing.notify()
        waiter = self._loop.create_future()
        self._sync_waiters.append((asked, waiter))
        await waiter

    def _wake_syncer(self) -> None:
        """Ask the fsync thread to apply the log now (its tail is large)."""
        with self._syncing:
            self._apply_due = True
            self._syncing.notify()

    def _apply_sync(self) -> None:
        """Make every batch appended so far durable and move it into SQLite: rotate the
        log, fsync the finished segment, commit its batches in one transaction, fsync and
        checkpoint the WAL, then remove the segment. On failure the batches go back to
        the tail (and their segments stay) for the next attempt."""
        log_ = self._log
        if log_ is None:
            return
        with self._apply_lock:
            log_.prepare()  # the directory fsync, outside _tail_lock
            with self._tail_lock:
                idle = not self._tail and not self._tail_keys and not self._tail_reserved
                if not idle:
                    messages, self._tail = self._tail, []
                    keys, self._tail_keys = self._tail_keys, {}
                    reserved, self._tail_reserved = self._tail_reserved, 0
                    size, self._tail_bytes = self._tail_bytes, 0
                    self._applying_keys = keys
                    finished = log_.rotate()
            if idle:
                if self._uncheckpointed:
                    self._sync_sync()  # a checkpoint may be due by time
                return
            try:
                if finished is not None:
                    os.fdatasync(finished[1])
                rows = [(u, k, encode_seqs(seqs), ts) for (u, k), (seqs, ts) in keys.items()]
                with self._write_lock:
                    assert self._wdb is not None
                    self._commit_rows(self._wdb, messages, rows, reserved)
                if messages:
                    self._applied_seq = messages[-1].seq
                self._uncheckpointed += size
                self._sync_sync()
            except BaseException:
                with self._tail_lock:  # back in front of what came meanwhile, in order
                    self._tail[:0] = messages
                    self._tail_keys = {**keys, **self._tail_keys}
                    self._tail_reserved = max(reserved, self._tail_reserved)
                    self._tail_bytes += size
                    self._applying_keys = {}
                raise
            finally:
                if finished is not None:
                    os.close(finished[1])
            self._applying_keys = {}
            if finished is not None:
                log_.remove_upto(finished[0])

    def _sync_sync(self, checkpoint: bool = False) -> None:
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
            or self._uncheckpointed > _CHECKPOINT_BYTES
            or now - self._checkpointed_at > _CHECKPOINT_INTERVALS * self.fsync_interval
        ):
            return
        self._uncheckpointed = 0
        self._checkpointed_at = now
        if self._cdb is not None:
            # Under the write lock: with no commit landing meanwhile the checkpoint copies
            # the whole WAL, so the next commit starts it over from the beginning.
            with self._write_lock:
                row = self._cdb.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                if row is not None and row[1] > _WAL_TRUNCATE_FRAMES and row[1] == row[2]:
                    # Copied whole, yet long: a reader kept it from starting over. Empty it.
                    self._cdb.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def _close_sync(self, db: sqlite3.Connection | None) -> None:
        if db is not None:
            db.close()

    def _close_writer_sync(self) -> None:
        if self._log is not None:
            self._apply_sync()
        if self._wdb is not None:
            # A clean shutdown: the next start goes on from the last seq given, no jump.
            self._wdb.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                [("clean", "1"), ("reserved", str(self.last_seq))],
            )
            self._sync_sync(checkpoint=True)
        with self._write_lock:
            for db in (self._cdb, self._kdb, self._wdb):
                if db is not None:
                    db.close()
            self._cdb = self._kdb = self._wdb = None
            if self._wal_fd is not None:
                os.close(self._wal_fd)
                self._wal_fd = None
        if self._log is not None:
            self._log.close()
            self._log.remove_upto(1 << 62)  # all applied, and the WAL fsynced
            self._log = None

    async def close(self) -> None:
        if self._syncer is not None:
            with self._syncing:
                self._stop_syncer = True
                self._syncing.notify()
            await asyncio.to_thread(self._syncer.join, 30)
            self._syncer = None
        await self._on(self._reader, self._close_sync, self._rdb)
        await self._on(self._writer, self._close_writer_sync)
        self._writer.shutdown()
        self._reader.shutdown()
        self._unlock_directory()

    def _commit_rows(
        self,
        db: sqlite3.Connection,
        messages: list[Message],
        keys: list[tuple[str, str, str, int]],
        reserved: int,
    ) -> None:
        """In one transaction, rolled back whole on failure: insert messages (in seq
        order) and keys, apply the per-topic history bound, record a seq reservation (0:
        none)."""
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
        except BaseException:
            # SQLite may have rolled back already (a full disk): a second ROLLBACK would
            # fail with "cannot rollback" and hide the real cause.
            if db.in_transaction:
                db.execute("ROLLBACK")
            self._counts.clear()  # they counted rows that are not there
            raise

    def _append_log(self, drafts: list[Draft]) -> list[Message]:
        """Number a batch and append it to the commit log, on the event loop's thread:
        recorded once this returns (``interval``), or once the fsync thread has fsynced
        it (``always``, ``_await_fsync``)."""
        log_ = self._log
        assert log_ is not None
        self._check_file()
        now = now_ms()
        numbered = number(drafts, self.last_seq + 1, lambda u, k: self._live_key(u, k, now))
        messages = numbered.fresh
        if not messages:
            return numbered.results  # duplicates only: nothing to record
        last = messages[-1].seq
        # Seqs are reserved durably ahead of use (see _resume_sequence): the record that
        # crosses the reservation carries the next one and is fsynced before any ok.
        reserved = last + SEQ_RESERVE if last > self._reserved else 0
        record = encode(
            Batch(
                messages,
                [(u, k, encode_seqs(seqs), now) for (u, k), seqs in numbered.keys.items()],
                reserved,
            )
        )
        with self._tail_lock:
            log_.append(record)
            if reserved:
                log_.sync()
                self._tail_reserved = reserved
            self._tail += messages
            for kid, seqs in numbered.keys.items():
                self._tail_keys[kid] = (seqs, now)
            self._tail_bytes += len(record)
            size = self._tail_bytes
        self.last_seq = last
        if reserved:
            self._reserved = reserved
        if size > _TAIL_APPLY_BYTES:
            self._wake_syncer()
        return numbered.results

    def _live_key(self, user: str, key: str, now: int) -> tuple[int, ...] | None:
        """The seqs of ``user``'s publish with ``key`` within the dedupe window, wherever
        it is: the log's tail, a batch being applied, or SQLite."""
        kid = (user, key)
        oldest = now - self.dedupe_window * 1000
        for held in (self._tail_keys, self._applying_keys):
            hit = held.get(kid)
            if hit is not None and hit[1] >= oldest:
                return hit[0]
        assert self._kdb is not None
        return self._known_key(self._kdb, user, key, now)

    def _known_key(
        self, db: sqlite3.Connection, user: str, key: str, now: int
    ) -> tuple[int, ...] | None:
        row = db.execute(
            "SELECT seqs, ts FROM dedupe WHERE user=? AND key=?", (user, key)
        ).fetchone()
        if row is None or row[1] < now - self.dedupe_window * 1000:
            return None
        return decode_seqs(row[0])

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

    def append_now(self, drafts: list[Draft]) -> list[Message] | None:
        # With fsync always an ok waits for the fsync thread (append). So does a failing
        # store, or a tail SQLite has not caught up with.
        if self.fsync_always or self._failure is not None or self._tail_bytes > _TAIL_MAX_BYTES:
            return None
        try:
            return self._append_log(drafts)
        except (sqlite3.Error, OSError, Unavailable) as exc:
            self._append_failed(exc, len(drafts))

    async def append(self, drafts: list[Draft]) -> list[Message]:
        try:
            if self._failure is not None or self._tail_bytes > _TAIL_MAX_BYTES:
                # SQLite first takes what the log holds (or says why it cannot).
                await self._on(self._writer, self._apply_sync)
            result = self._append_log(drafts)
            if self.fsync_always:
                await self._await_fsync()
        except (sqlite3.Error, OSError, Unavailable) as exc:
            self._append_failed(exc, len(drafts))
        if self._failure is not None:
            log.warning(
                "store records publishes again (%d refused meanwhile; the cause was: %s)",
                self._refused,
                self._failure,
                extra={"event": "store_recovered"},
            )
            self._failure = None
        return result

    def _append_failed(self, exc: sqlite3.Error | OSError | Unavailable, refused: int) -> NoReturn:
        cause = exc.message if isinstance(exc, Unavailable) else describe(exc)
        self._failing(cause, refused)
        raise Unavailable("the store cannot record messages now; retry later") from None

    def _failing(self, cause: str, refused: int) -> None:
        """Log a storage failure once when it starts, not once per batch."""
        if self._failure is None:
            log.error(
                "store cannot record publishes: %s (%s); answering 'unavailable' until it can",
                cause,
                self.path,
                extra={"event": "store_failing"},
            )
            self._failure = cause
            self._refused = 0
        self._refused += refused

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

    async def _visible(self, upto: int) -> None:
        """Apply the commit log if SQLite does not hold every message up to ``upto`` yet.
        When it cannot (the store is failing), reads go on without the log's tail."""
        if self._applied_seq >= upto or self._log is None:
            return
        try:
            await self._on(self._writer, self._apply_sync)
        except (sqlite3.Error, OSError) as exc:
            self._failing(describe(exc), 0)

    async def read_since(self, pattern: str, since: int, upto: int) -> Replay:
        await self._visible(upto)
        result: Replay = await self._on(self._reader, self._read_since_sync, pattern, since, upto)
        return result

    async def read_last(self, pattern: str, n: int, upto: int) -> list[Message]:
        await self._visible(upto)
        result: list[Message] = await self._on(self._reader, self._read_last_sync, pattern, n, upto)
        return result

    def _latest_sync(self, pattern: str, upto: int, limit: int, visible: Visible) -> list[Message]:
        db = self._rdb
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

    async def latest(
        self, pattern: str, upto: int, limit: int = LATEST_LIMIT, visible: Visible = None
    ) -> list[Message]:
        await self._visible(upto)
        result: list[Message] = await self._on(
            self._reader, self._latest_sync, pattern, upto, limit, visible
        )
        return result

    async def replay(
        self,
        pattern: str,
        *,
        since: int | None = None,
        last: int | None = None,
        upto: int,
        page_size: int = PAGE_SIZE,
        page_bytes: int = PAGE_BYTES,
    ) -> Pages:
        await self._visible(upto)
        pages: Pages = await self._on(
            self._reader, self._replay_sync, pattern, since, last, upto, page_size, page_bytes
        )
        return pages

    def _replay_sync(
        self,
        pattern: str,
        since: int | None,
        last: int | None,
        upto: int,
        page_size: int,
        page_bytes: int,
    ) -> Pages:
        topics = dict(self._topics_sync(pattern))
        if since is not None:
            start, recovered = since, all(trimmed <= since for trimmed in topics.values())
        else:
            start, recovered = self._nth_latest_sync(list(topics), last or 0, upto), True
        return _SqlitePages(self, topics, start, recovered, upto, page_size, page_bytes)

    def _nth_latest_sync(self, topics: list[str], n: int, upto: int) -> int:
        """The seq after which the latest ``n`` messages (``seq <= upto``) of ``topics``
        begin; ``upto`` when there are none. Reads seqs only, lazily."""
        db = self._rdb
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
        self, topics: dict[str, int], after: int, upto: int, size: int, max_bytes: int
    ) -> tuple[list[Message], int, bool]:
        """One page of a replay: messages of ``topics`` with ``after < seq <= upto``, at
        most ``size`` of them and ``max_bytes`` of data; the seq read up to; and whether
        a message of the replay was removed before it could be read (a gap)."""
        db = self._rdb
        assert db is not None
        names = list(topics)
        if len(names) <= 2 * _CHUNK:
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
            # Many topics: walk the messages in seq order, keep those of these topics.
            rows = db.execute(
                "SELECT seq, topic, length(data) FROM messages WHERE seq>? AND seq<=? "
                "ORDER BY seq LIMIT ?",
                (after, upto, 4 * size),
            ).fetchall()
            found = [(seq, length) for seq, topic, length in rows if topic in topics]
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
        if len(names) <= 2 * _CHUNK:
            moved: list[tuple[str, int]] = []
            for chunk in chunks(names, _CHUNK):
                marks = ",".join("?" * len(chunk))
                moved += db.execute(
                    f"SELECT topic, trimmed FROM topics WHERE topic IN ({marks}) AND trimmed>?",
                    (*chunk, after),
                ).fetchall()
        else:
            moved = db.execute(
                "SELECT topic, trimmed FROM topics WHERE trimmed>?", (after,)
            ).fetchall()
        gap = any(trimmed > topics.get(topic, trimmed) for topic, trimmed in moved)
        if len(messages) < len(seqs):
            gap = True
        return messages, scanned, gap

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
        # Retention covers what the log holds too; but when SQLite cannot take the log (a
        # full disk), trimming is what frees the room for it.
        with contextlib.suppress(sqlite3.Error, OSError):
            self._apply_sync()
        with self._write_lock:
            return self._trim_locked(now)

    def _trim_locked(self, now: float) -> int:
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
            gone += self._trim_namespaces(db, now)
            for topic, top, _ in gone:
                db.execute("UPDATE topics SET trimmed=max(trimmed, ?) WHERE topic=?", (top, topic))
            db.execute("DELETE FROM dedupe WHERE ts<?", (int((now - self.dedupe_window) * 1000),))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        for topic, _, count in gone:
            if topic in self._counts:
                self._counts[topic] = max(0, self._counts[topic] - count)
        return sum(count for _, _, count in gone)

    def _trim_namespaces(self, db: sqlite3.Connection, now: float) -> list[tuple[str, int, int]]:
        """Retention of the namespaces that set a shorter one than the global: per topic
        of theirs, what is older goes; ``(topic, highest seq removed, count)`` each."""
        spaces = self.namespaces
        if not spaces.retentions:
            return []
        gone: list[tuple[str, int, int]] = []
        for (topic,) in db.execute("SELECT topic FROM topics").fetchall():
            retention = spaces.retention(topic, self.retention)
            if retention >= self.retention:
                continue
            cutoff = int((now - retention) * 1000)
            top, count = db.execute(
                "SELECT max(seq), count(*) FROM messages WHERE topic=? AND ts<?", (topic, cutoff)
            ).fetchone()
            if count:
                db.execute("DELETE FROM messages WHERE topic=? AND seq<=?", (topic, top))
                gone.append((topic, int(top), int(count)))
        return gone

    async def trim(self, now: float) -> int:
        if self._lost is None and self._file_id is not None and self._identity() != self._file_id:
            with contextlib.suppress(Unavailable):
                self._check_file()
            self._failing(self._lost or "", 0)  # noticed without waiting for a publish
        try:
            removed: int = await self._on(self._writer, self._trim_sync, now)
        except (sqlite3.Error, OSError) as exc:
            if self._trim_failure is None:
                self._trim_failure = describe(exc)
                log.warning(
                    "retention cannot remove old messages: %s (%s)",
                    self._trim_failure,
                    self.path,
                    extra={"event": "trim_failed"},
                )
            return 0
        self._trim_failure = None
        return removed
