"""The commit log at run time: its tail (what it holds that SQLite does not yet) and the
fsync thread that makes it durable and applies it to SQLite (see ``Syncer``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable

from broker.core.model import Message
from broker.store.dedupe import KeyId, encode_seqs
from broker.store.sqlite.commitlog import CommitLog, Recovery
from broker.store.sqlite.database import Database
from broker.store.sqlite.files import describe

#: The commit log's batches not yet in SQLite are applied early when
#: they pass this many bytes, and publishes wait for the store (``append``) past the
#: second bound: the memory they take stays bounded when SQLite is slow.
TAIL_APPLY_BYTES = 1 << 20
TAIL_MAX_BYTES = 8 << 20

log = logging.getLogger("broker.store.sqlite")


class Syncer:
    """The commit log, its tail, and the fsync thread.

    The event loop appends (``add``) and, with ``fsync = always``, waits for the fsync
    thread (``await_fsync``). The fsync thread, every ``fsync_interval`` seconds or
    sooner when the tail passes ``TAIL_APPLY_BYTES``, applies the tail (``apply``); the
    writer thread applies too, when a read or a failing store needs it now.

    ``tail_lock`` makes an append (log write + tail) and a rotation (new segment + taking
    the tail) one step each; ``apply_lock`` lets one thread at a time apply (or fsync
    the current segment). Apply failures go to ``on_failure`` (the store's
    ``_failing``), from whichever thread met them."""

    def __init__(
        self, database: Database, fsync_interval: float, on_failure: Callable[[str], None]
    ) -> None:
        self._db = database
        self.fsync_interval = fsync_interval
        self._on_failure = on_failure
        self.log: CommitLog | None = None  # None until open, and after close
        # The tail: messages, keys ((user, key) -> (seqs, ts)), reservation, bytes.
        self._tail: list[Message] = []
        self._tail_keys: dict[KeyId, tuple[tuple[int, ...], int]] = {}
        self._tail_reserved = 0
        self.tail_bytes = 0
        #: Seqs up to this one are reserved in a record known to be fsynced; a record
        #: carrying seqs past it is fsynced by ``add`` itself. ``_reserving``: the highest
        #: reservation appended, durable or not.
        self.durable_reserved = 0
        self._reserving = 0
        #: How many records ``add`` fsynced on the event loop (tests read it).
        self.loop_fsyncs = 0
        #: Keys taken from the tail by an apply that has not committed yet: still live.
        self._applying_keys: dict[KeyId, tuple[tuple[int, ...], int]] = {}
        #: The highest seq SQLite holds (what reads see without applying the log first).
        self.applied_seq = 0
        self._tail_lock = threading.Lock()
        self._apply_lock = threading.Lock()
        self._fsync_thread: threading.Thread | None = None
        # The fsync thread waits on _syncing for: an fsync asked for (fsync = always:
        # _sync_asked records appended, _synced fsynced), an early apply, or the stop.
        self._syncing = threading.Condition()
        self._stop = False
        self._apply_due = False
        self._sync_asked = 0
        self._synced = 0
        self._sync_waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Told the highest seq SQLite holds durably after each apply that added some
        #: (the store keeps the history mark with it).
        self.on_applied: Callable[[int], None] | None = None

    def recover(self, found: Recovery, last_seq: int) -> int:
        """At open, before anything else: apply what the commit log holds beyond SQLite
        (the broker was killed before its fsync thread applied it); ``found`` is what
        ``CommitLog.recover`` read. Returns the highest seq given."""
        messages = [m for b in found.batches for m in b.messages if m.seq > last_seq]
        keys = [k for b in found.batches for k in b.keys]
        reserved = max((b.reserved for b in found.batches), default=0)
        if messages or keys or reserved:
            if self._db.reserved() >= reserved:
                reserved = 0
            self._db.commit_rows(messages, keys, reserved)
            if messages:
                last_seq = max(last_seq, messages[-1].seq)
            log.info(
                "applied %d messages from the commit log the last run left",
                len(messages),
                extra={"event": "commit_log_recovered"},
            )
        return last_seq

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the fsync thread (once the log is open); ``loop`` is told of fsyncs."""
        self._loop = loop
        if self.log is not None:
            self._fsync_thread = threading.Thread(target=self._run, name="store-fsync", daemon=True)
            self._fsync_thread.start()

    async def stop(self) -> None:
        """Stop the fsync thread (what the tail holds stays for ``apply``)."""
        if self._fsync_thread is not None:
            with self._syncing:
                self._stop = True
                self._syncing.notify()
            await asyncio.to_thread(self._fsync_thread.join, 30)
            self._fsync_thread = None

    def close_log(self) -> None:
        """Close the log and remove its segments: all applied, and the WAL fsynced."""
        if self.log is not None:
            self.log.close()
            self.log.remove_upto(1 << 62)
            self.log = None

    def add(
        self,
        record: bytes,
        messages: list[Message],
        keys: dict[KeyId, tuple[int, ...]],
        now: int,
        reserved: int,
        last: int,
    ) -> int:
        """On the event loop: append ``record`` (its ``messages`` up to seq ``last``,
        ``keys`` at ``now``, a reservation or 0) to the log and the tail; the tail's bytes
        after it. A new reservation is made durable by the fsync thread, soon; a record
        whose seqs pass the durable reservation is fsynced before this returns."""
        log_ = self.log
        assert log_ is not None
        with self._tail_lock:
            log_.append(record)
            if reserved:
                self._tail_reserved = reserved
                self._reserving = max(self._reserving, reserved)
            if last > self.durable_reserved:
                log_.sync()
                self.loop_fsyncs += 1
                self.durable_reserved = self._reserving
            elif reserved:
                with self._syncing:
                    self._sync_asked += 1
                    self._syncing.notify()
            self._tail += messages
            for kid, seqs in keys.items():
                self._tail_keys[kid] = (seqs, now)
            self.tail_bytes += len(record)
            size = self.tail_bytes
        if size > TAIL_APPLY_BYTES:
            self._wake()
        return size

    def live_key(self, kid: KeyId, oldest: float) -> tuple[int, ...] | None:
        """On the event loop: the seqs of the key ``kid`` if the tail or a batch being
        applied holds it, committed at ``oldest`` (ms) or later."""
        for held in (self._tail_keys, self._applying_keys):
            hit = held.get(kid)
            if hit is not None and hit[1] >= oldest:
                return hit[0]
        return None

    async def await_fsync(self) -> None:
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

    def _wake(self) -> None:
        """Ask the fsync thread to apply the log now (its tail is large)."""
        with self._syncing:
            self._apply_due = True
            self._syncing.notify()

    def _run(self) -> None:
        """The fsync thread: fsync the log when asked (fsync = always, or a new seq
        reservation), and apply it to SQLite every ``fsync_interval`` or sooner when its
        tail grows large. A thread of
        its own, so that the fsyncs keep their pace whatever the event loop does; and not
        a pool's, whose hand-off costs more than the fsync (see await_fsync)."""
        # Below the event loop's priority: its fsyncs and SQLite work give way to the
        # loop's sends on a busy core (they are batch work; the loop is latency).
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        syncing = self._syncing
        next_apply = time.monotonic() + self.fsync_interval
        while True:
            with syncing:
                while (
                    not self._stop
                    and not self._apply_due
                    and self._sync_asked <= self._synced
                    and time.monotonic() < next_apply
                ):
                    syncing.wait(next_apply - time.monotonic())
                if self._stop:
                    return
                asked, due, self._apply_due = self._sync_asked, self._apply_due, False
            if asked > self._synced:
                self._fsync_log(asked)
            if due or time.monotonic() >= next_apply:
                next_apply = time.monotonic() + self.fsync_interval
                try:
                    self.apply()
                except (sqlite3.Error, OSError) as exc:
                    # Publishes wait for the store from now on (append), and are refused
                    # while it still fails; what the log holds stays there.
                    self._on_failure(describe(exc))

    def _fsync_log(self, asked: int) -> None:
        """Make the records up to number ``asked`` durable (fsync = always, or a new
        seq reservation) and tell the event loop. Under the apply lock: an apply (on any
        thread) fsyncs the segment it rotates away from before it lets go, so the records
        are either there or in the current segment, which is the one fsynced here."""
        error: OSError | None = None
        reserving = self._reserving  # appended before this fsync starts: covered by it
        try:
            assert self.log is not None
            with self._apply_lock:
                self.log.sync()
        except OSError as exc:
            error = exc
        else:
            self._synced = asked
            # A race with add's own fsync can only leave this lower: one more fsync there.
            self.durable_reserved = max(self.durable_reserved, reserving)
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

    def apply(self) -> None:
        """Make every batch appended so far durable and move it into SQLite: rotate the
        log, fsync the finished segment, commit its batches in one transaction, fsync and
        checkpoint the WAL, then remove the segment. On failure the batches go back to
        the tail (and their segments stay) for the next attempt. Any thread but the
        event loop's."""
        log_ = self.log
        if log_ is None:
            return
        database = self._db
        with self._apply_lock:
            log_.prepare()  # the directory fsync, outside _tail_lock
            with self._tail_lock:
                idle = not self._tail and not self._tail_keys and not self._tail_reserved
                if not idle:
                    messages, self._tail = self._tail, []
                    keys, self._tail_keys = self._tail_keys, {}
                    reserved, self._tail_reserved = self._tail_reserved, 0
                    size, self.tail_bytes = self.tail_bytes, 0
                    self._applying_keys = keys
                    number, written = log_.current
                    # An empty current segment (the tail is in segments an earlier
                    # attempt left, say on a full disk) is kept rather than rotated: a
                    # failing store must not leave one more empty file per attempt.
                    finished = log_.rotate() if written else None
                    applied_upto = finished[0] if finished is not None else number - 1
            if idle:
                if database.uncheckpointed:
                    database.sync()  # a checkpoint may be due by time
                return
            try:
                if finished is not None:
                    os.fdatasync(finished[1])
                rows = [(u, k, encode_seqs(seqs), ts) for (u, k), (seqs, ts) in keys.items()]
                with database.write_lock:
                    database.commit_rows(messages, rows, reserved)
                if messages:
                    self.applied_seq = messages[-1].seq
                database.uncheckpointed += size
                database.sync()
            except BaseException:
                with self._tail_lock:  # back in front of what came meanwhile, in order
                    self._tail[:0] = messages
                    self._tail_keys = {**keys, **self._tail_keys}
                    self._tail_reserved = max(reserved, self._tail_reserved)
                    self.tail_bytes += size
                    self._applying_keys = {}
                raise
            finally:
                if finished is not None:
                    os.close(finished[1])
            self._applying_keys = {}
            log_.remove_upto(applied_upto)
            if messages and self.on_applied is not None:
                try:  # under the apply lock: one writer of the mark at a time, in order
                    self.on_applied(messages[-1].seq)
                except OSError as exc:
                    self._on_failure(describe(exc))
