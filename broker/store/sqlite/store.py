"""``SqliteStore``: the default, durable store, composed of the package's parts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn

from broker.core.model import Draft, Message, now_ms
from broker.core.namespaces import Namespaces
from broker.core.topics import is_pattern
from broker.core.units import format_size
from broker.errors import Unavailable
from broker.store.base import LATEST_LIMIT, PAGE_BYTES, PAGE_SIZE, Pages, Replay, Store, Visible
from broker.store.dedupe import encode_seqs, number
from broker.store.sqlite.commitlog import Batch, CommitLog, Recovery, encode
from broker.store.sqlite.database import Database, check_database
from broker.store.sqlite.files import (
    DirectoryLock,
    FileWatch,
    Mark,
    MarkFile,
    boot_id,
    describe,
)
from broker.store.sqlite.reads import Reads
from broker.store.sqlite.syncer import TAIL_MAX_BYTES, Syncer
from broker.store.sqlite.unapplied import Unapplied

log = logging.getLogger("broker.store.sqlite")

MiB = 1 << 20

#: Seqs are reserved durably this many at a time (see Database.resume_sequence).
SEQ_RESERVE = 10_000
#: Bytes a small batch may still add to the commit log's tail past TAIL_MAX_BYTES, so
#: that other clients' small publishes do not wait while a large one waits for SQLite
#: to take the tail (issue 27, row 10: 6 MB HTTP batches made everyone wait for it).
TAIL_SMALL_ROOM = 4 << 20
#: A batch of this many bytes of data or more is large (it waits at TAIL_MAX_BYTES).
SMALL_BATCH = 64 << 10


class SqliteStore(Store):
    """History in an SQLite database (WAL): survives a crash of the broker and restarts.

    A batch counts as recorded once it is appended to the commit log
    (``broker.store.sqlite.commitlog``) with one ``write``; the fsync policy
    (docs/operations.md, "Durability and fsync") says what else. ``interval`` (the
    default): nothing else, so the append runs on the event loop's thread
    (``append_now``): the batch is in the operating system, which a ``kill -9`` of the
    broker cannot undo, and a power loss can cost the publishes of the last
    ``fsync_interval``, never the database's consistency. ``always``: the batch is
    appended the same way and counts once the store's fsync thread has fsynced the
    segment; publishes that arrive meanwhile form the next group commit.

    Either way a thread of its own, every ``fsync_interval`` seconds, rotates the log,
    fsyncs the finished segment, applies its batches to SQLite in one transaction, fsyncs
    and checkpoints the WAL, and removes the segment. Reads (their own thread and
    connection, so replay never waits for a commit) and retention apply the log first.

    ``max_pages`` (tests only) caps the database at that many pages (SQLite's
    ``max_page_count``), so that a test meets "database or disk is full" without filling
    a disk; ``boot_id`` (tests only) stands for this machine's boot id, as if it had
    rebooted (a power loss) since the last run."""

    def __init__(
        self,
        path: Path,
        history: int = 1000,
        retention: float = 24 * 3600,
        *,
        fsync: str = "interval",
        fsync_interval: float = 1.0,
        max_pages: int | None = None,
        boot_id: str | None = None,
        max_disk: int | None = None,
    ) -> None:
        super().__init__(history, retention)
        self.path = path
        #: Bytes the database and the commit log's tail may take together (None: no
        #: bound); past it publishes are refused until retention frees room.
        self.max_disk = max_disk
        if fsync not in ("interval", "always"):
            raise ValueError(f"unknown fsync policy {fsync!r}")
        #: Fsync before every commit counts (True), or every ``fsync_interval`` seconds.
        self.fsync_always = fsync == "always"
        self.fsync_interval = fsync_interval
        self._boot_id = boot_id
        self._lock = DirectoryLock(path.parent)
        self._mark = MarkFile(path.with_name(f"{path.name}-mark"))
        self._seen = 0  # the mark's seq at open
        # Noticed before the next acknowledgement with ``always``, within an interval (the
        # loss that policy accepts) with ``interval``.
        self._file = FileWatch(path, every=0.0 if self.fsync_always else fsync_interval)
        self._db = Database(path, history, fsync_interval, max_pages)
        self._syncer = Syncer(self._db, fsync_interval, lambda cause: self._failing(cause, 0))
        self._reads = Reads(path)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="store-write")
        #: Seqs up to this one are durably reserved (see Database.resume_sequence).
        self._reserved = 0
        # The cause of the storage failure going on (None: none) and publishes refused.
        self._failure: str | None = None
        self._refused = 0
        self._trim_failure: str | None = None
        # The writer's apply that reads wait for (None: none running): one apply for all
        # the reads that need the commit log in SQLite, not one queued per read.
        self._applying: asyncio.Task[bool] | None = None
        # The topics of what the commit log holds that SQLite may not yet.
        self._unapplied = Unapplied()

    async def _write(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    # -- open and close (the writer thread) -------------------------------------------

    async def open(self) -> None:
        await self._write(self._open_sync)
        self._syncer.start(asyncio.get_running_loop())

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        try:
            self._open_database()
        except sqlite3.DatabaseError as exc:
            self._lock.release()
            raise Unavailable(
                f"cannot open {self.path}: {describe(exc)}; the file is corrupt or not an "
                "SQLite database: move it away or choose another --data"
            ) from None
        except BaseException:
            self._lock.release()
            raise
        self._file.remember()

    def _open_database(self) -> None:
        check_database(self.path)
        self.epoch, stored = self._db.open()
        log_ = CommitLog(self.path.parent, f"{self.path.name}-log")
        found = log_.recover()
        went_back = self._went_back(stored, found)
        if found.torn:
            log.warning(
                "the commit log ended in a torn record (a power loss during a write): "
                "dropped its %d bytes",
                found.torn,
                extra={"event": "commit_log_torn"},
            )
        self.last_seq = self._syncer.recover(found, stored)
        booted = self._boot_id or boot_id()
        self.last_seq, self._reserved = self._db.resume_sequence(
            self.last_seq, booted, torn=found.torn > 0
        )
        told = self._new_epoch(went_back, found) if went_back else None
        self._syncer.durable_reserved = self._reserved
        self._syncer.applied_seq = self.last_seq
        self._reads.connect()
        self._db.open_rest()
        self._db.measure()
        self._write_mark(self.last_seq)
        self._syncer.on_applied = self._write_mark
        for damage in found.damage:
            kept = log_.keep_aside(damage.path)
            log.error(
                "commit log segment %s is damaged: %d of its %d bytes, from byte %d, are "
                "unreadable; %d valid records before them and %d after were applied; the "
                "segment is kept as %s",
                damage.path.name,
                damage.damaged,
                damage.size,
                damage.bad_at,
                damage.before,
                damage.after,
                kept,
                extra={"event": "commit_log_damaged"},
            )
        if told is not None:
            told()
        log_.remove_upto(found.last_segment)
        log_.start()
        self._syncer.log = log_

    def _went_back(self, stored: int, found: Recovery) -> list[str]:
        """Why the history may be older than what clients saw (none: it is not): the
        database carries ``broker restore``'s mark; or it is not the one this directory's
        history mark describes (another file, another epoch, fewer seqs); or a
        reservation lies behind its last seq; or the commit log does not follow on from
        it, or is damaged."""
        why = []
        restored = self._db.take_restored()
        if restored is not None:
            why.append(restored)
        try:
            mark = self._mark.read()
        except ValueError as exc:
            why.append(str(exc))
            mark = None
        self._seen = 0 if mark is None else mark.seq
        if mark is not None and restored is None:
            if mark.epoch != self.epoch:
                why.append(
                    f"the database's epoch is {self.epoch} but this directory last ran "
                    f"epoch {mark.epoch}"
                )
            elif mark.inode != os.stat(self.path).st_ino:
                why.append("the database file was replaced (copied in or restored by hand)")
            elif mark.seq > stored:
                why.append(
                    f"the database holds seqs up to {stored} but seqs up to {mark.seq} were given"
                )
        meta = self._db.meta()
        reserved = int(meta.get("reserved", 0))
        if meta.get("clean") == "0" and 0 < reserved < stored:
            why.append(f"its seq reservation ({reserved}) lies behind its last seq ({stored})")
        first = next((m.seq for b in found.batches for m in b.messages if m.seq > stored), None)
        if first is not None and first != stored + 1 and not found.damage:
            why.append(f"the commit log goes on at seq {first} but the database ends at {stored}")
        if found.damage:
            why.append(f"{len(found.damage)} commit log segment(s) damaged")
        return why

    def _new_epoch(self, why: list[str], found: Recovery) -> Callable[[], None]:
        """Start a new epoch after every seq seen, so that every resume answers
        ``recovered: false`` and replays what is retained. Returns the one log line that
        says so, with the figures."""
        seen = [m.seq for b in found.batches for m in b.messages]
        seen += [b.reserved for b in found.batches]
        top = max([self.last_seq, self._seen, self._reserved, *seen])
        old, last = self.epoch, self.last_seq
        self.epoch = self._db.start_epoch(top)
        self.last_seq = self._reserved = top
        # Logged once the start is durable, after what it found is told.
        return lambda: log.warning(
            "history went back: %s; starting epoch %s after seq %d (epoch %s may have given "
            "seqs up to %d; the database holds up to %d): every resume answers "
            "recovered: false and replays what is retained",
            "; ".join(why),
            self.epoch,
            top,
            old,
            top,
            last,
            extra={"event": "history_went_back"},
        )

    def _write_mark(self, seq: int) -> None:
        """Record that SQLite durably holds seqs up to ``seq`` of this epoch (the fsync
        thread, after each apply; the writer at open)."""
        self._mark.write(Mark(self.epoch, seq, os.stat(self.path).st_ino))

    async def close(self) -> None:
        await self._syncer.stop()
        await self._reads.close()
        await self._write(self._close_sync)
        self._writer.shutdown()
        self._lock.release()

    def _close_sync(self) -> None:
        self._syncer.apply()
        self._db.close(self.last_seq)
        self._syncer.close_log()

    # -- appends (the event loop) -----------------------------------------------------

    def append_now(self, drafts: list[Draft]) -> list[Message] | None:
        # With fsync always an ok waits for the fsync thread (append). So does a failing
        # store, or a tail SQLite has not caught up with.
        tail = self._syncer.tail_bytes
        if (
            self.fsync_always
            or self._failure is not None
            or (
                tail > TAIL_MAX_BYTES
                and (tail > TAIL_MAX_BYTES + TAIL_SMALL_ROOM or _large(drafts))
            )
        ):
            return None
        try:
            return self._append_log(drafts)
        except (sqlite3.Error, OSError, Unavailable) as exc:
            self._append_failed(exc, len(drafts))

    @property
    def separate_large(self) -> bool:
        """Large publishes may wait in a lane of their own (``Journal``): with fsync
        ``interval`` each append numbers and records in one step on the event loop, so
        commits from two lanes cannot interleave."""
        return not self.fsync_always

    async def append(self, drafts: list[Draft]) -> list[Message]:
        try:
            if self._failure is not None or self._syncer.tail_bytes > TAIL_MAX_BYTES:
                # SQLite first takes what the log holds (or says why it cannot).
                await self._write(self._syncer.apply)
            result = self._append_log(drafts)
            if self.fsync_always:
                await self._syncer.await_fsync()
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

    def _append_log(self, drafts: list[Draft]) -> list[Message]:
        """Number a batch and append it to the commit log, on the event loop's thread:
        recorded once this returns (``interval``), or once the fsync thread has fsynced
        it (``always``, ``Syncer.await_fsync``)."""
        # While failing, look at the file before the first publish that would end the
        # episode, not an interval later.
        self._file.check(at_once=self._failure is not None)
        self._lock.check()
        if self.max_disk is not None and self._db.used + self._syncer.tail_bytes > self.max_disk:
            raise Unavailable(
                f"the store holds {self._db.used / MiB:.0f} MiB, its max_disk "
                f"({format_size(self.max_disk)}): publishes wait for retention to free room"
            )
        now = now_ms()
        numbered = number(drafts, self.last_seq + 1, lambda u, k: self._live_key(u, k, now))
        messages = numbered.fresh
        if not messages:
            return numbered.results  # duplicates only: nothing to record
        last = messages[-1].seq
        # Seqs are reserved durably ahead of use (see Database.resume_sequence). The next
        # reservation rides on the record that passes half of the current one, and the
        # fsync thread makes it durable meanwhile; only a record whose seqs pass the
        # durable reservation (the first after a start, or a burst faster than an fsync)
        # is fsynced here, on the loop, before any ok.
        reserved = 0
        if last > self._reserved - SEQ_RESERVE // 2:
            reserved = max(last, self._reserved) + SEQ_RESERVE
        record = encode(
            Batch(
                messages,
                [(u, k, encode_seqs(seqs), now) for (u, k), seqs in numbered.keys.items()],
                reserved,
            )
        )
        self._syncer.add(record, messages, numbered.keys, now, reserved, last)
        self._unapplied.add(messages, self._syncer.applied_seq)
        self.last_seq = last
        if reserved:
            self._reserved = reserved
        return numbered.results

    async def known_key(self, user: str, key: str) -> bool:
        # On the writer's thread, as append's own look-up: no disk on the event loop.
        return await self._write(self._live_key, user, key, now_ms()) is not None

    def _live_key(self, user: str, key: str, now: int) -> tuple[int, ...] | None:
        """The seqs of ``user``'s publish with ``key`` within the dedupe window, wherever
        it is: the log's tail, a batch being applied, or SQLite."""
        oldest = now - self.dedupe_window * 1000
        hit = self._syncer.live_key((user, key), oldest)
        if hit is not None:
            return hit
        return self._db.known_key(user, key, oldest)

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

    # -- reads (the reader thread, after the writer applied what they need) -----------

    async def _visible(self, upto: int, pattern: str = "#") -> None:
        """Apply the commit log if SQLite does not hold every message up to ``upto`` yet
        (of the topic ``pattern`` when it names one: a quiet topic's read does not wait
        for the others' messages). When it cannot (the store is failing), reads go on
        without the log's tail.

        Concurrent reads share one apply: each one queued its own behind the writer's
        commits (an apply fsyncs several times), and a one-topic read waited for the
        applies of 32 history readers (issue 27, row 6). An apply already running may
        have begun before ``upto`` was logged: then the next one, begun after, covers it."""
        if not is_pattern(pattern):
            upto = self._unapplied.needed(pattern, upto, self._syncer.applied_seq)
        for _ in range(2):
            if self._syncer.applied_seq >= upto or self._syncer.log is None:
                return
            fresh = self._applying is None
            if self._applying is None:
                self._applying = asyncio.ensure_future(self._apply_for_reads())
            if not await asyncio.shield(self._applying) or fresh:
                return

    async def _apply_for_reads(self) -> bool:
        """Apply the commit log on the writer thread; False when the store failed to."""
        try:
            await self._write(self._syncer.apply)
            return True
        except (sqlite3.Error, OSError) as exc:
            self._failing(describe(exc), 0)
            return False
        finally:
            self._applying = None

    async def read_since(self, pattern: str, since: int, upto: int) -> Replay:
        await self._visible(upto, pattern)
        return await self._reads.read_since(pattern, since, upto)

    async def read_last(self, pattern: str, n: int, upto: int) -> list[Message]:
        await self._visible(upto, pattern)
        return await self._reads.read_last(pattern, n, upto)

    async def latest(
        self, pattern: str, upto: int, limit: int = LATEST_LIMIT, visible: Visible = None
    ) -> list[Message]:
        await self._visible(upto, pattern)
        return await self._reads.latest(pattern, upto, limit, visible)

    @property
    def namespaces(self) -> Namespaces:
        """``Store.namespaces``: the writer applies their history and retention."""
        return self._db.namespaces

    @namespaces.setter
    def namespaces(self, value: Namespaces) -> None:
        self._db.namespaces = value

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
        await self._visible(upto, pattern)
        return await self._reads.replay(pattern, since, last, upto, page_size, page_bytes)

    # -- retention (the writer thread) ------------------------------------------------

    def _trim_sync(self, now: float) -> int:
        # Retention covers what the log holds too; but when SQLite cannot take the log (a
        # full disk), trimming is what frees the room for it.
        with contextlib.suppress(sqlite3.Error, OSError):
            self._syncer.apply()
        return self._db.trim(now, self.retention, self.dedupe_window)

    async def trim(self, now: float) -> int:
        lost = self._file.newly_lost()
        if lost is not None:
            self._failing(lost, 0)  # noticed without waiting for a publish
        try:
            removed: int = await self._write(self._trim_sync, now)
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


def _large(drafts: list[Draft]) -> bool:
    """``drafts`` hold SMALL_BATCH bytes of data or more."""
    size = 0
    for d in drafts:
        size += len(d.payload)
        if size >= SMALL_BATCH:
            return True
    return False
