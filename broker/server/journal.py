"""Group commit: the publishes of one event-loop turn, or those that arrive while a batch
is being written, form one batch.

A store that records on the calling thread (``Store.append_now``: memory, SQLite with the
default fsync policy) commits the turn's publishes at the end of that same turn, just
before the flusher writes: the acks and the deliveries go out in the turn the frames came
in, with no task, no thread hop and no extra loop wake-up. Other stores (or one that is
busy) are written by a task awaiting ``Store.append``. Either way at most one batch is in
flight, so batches commit, and are fanned out, in seq order. Each publish's callback runs
after its message is recorded (with the message) or refused (with the error);
fire-and-forget publishes take the same path.

A store that records large publishes slower than small ones (``separate_large``: SQLite,
whose bounded commit-log tail makes a large publish wait for SQLite to take the tail)
gets them in a lane of their own: a publish of ``LARGE_PUBLISH`` bytes or more, and what
its sender publishes while one waits, is committed by a task of its own, one at a time,
and the small publishes of everyone else go on meanwhile. A sender's publishes keep their
order; seq order is commit order (each commit numbers and fans out in one callback).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

from broker.core.model import Draft, Message
from broker.errors import BrokerError, Unavailable
from broker.server.session import Flusher
from broker.store.base import Store
from broker.store.dedupe import Duplicate

log = logging.getLogger("broker.server.journal")

Done = Callable[[Message | None, BrokerError | None], None]
Committed = Callable[[list[tuple[Message, Draft]]], None]

#: Bytes of data (all its topics together) from which a publish takes the large lane.
LARGE_PUBLISH = 256 << 10


class Journal:
    """Feeds publishes to the store in batches and hands committed messages on."""

    def __init__(
        self,
        store: Store,
        on_committed: Committed,
        max_batch: int = 2000,
        flusher: Flusher | None = None,
    ) -> None:
        self.store = store
        self.on_committed = on_committed
        self.max_batch = max_batch
        #: Commits at the end of this loop turn (``Flusher.defer``, so the acks and
        #: deliveries are written in the same pass); ``call_soon`` without a flusher.
        self.flusher = flusher
        self._pending: list[tuple[Draft, Done | None]] = []
        self._task: asyncio.Task[None] | None = None
        self._due = False  # a commit at the end of this turn is scheduled
        self._closed = False
        #: Observers of (batch size, seconds) per commit, e.g. metrics.
        self.commit_observers: list[Callable[[int, float], None]] = []
        #: Large publishes (and what their senders sent after them) wait here when the
        #: store separates them; committed by ``_large_task``, one publish at a time.
        self.separate_large: bool = getattr(store, "separate_large", False)
        self._large: list[tuple[Draft, Done | None]] = []
        self._large_senders: Counter[str] = Counter()  # drafts in that lane, per sender
        self._large_task: asyncio.Task[None] | None = None
        self._lane_large = False  # the lane of the publish being submitted

    def submit(self, draft: Draft, done: Done | None = None) -> None:
        """Queue ``draft``; ``done`` is called once it is committed or refused."""
        if self._closed:
            if done is not None:
                done(None, Unavailable("the broker is shutting down"))
            return
        if self.separate_large:
            if draft.group:  # the first draft of a publish chooses; the others follow
                self._lane_large = (
                    draft.group * len(draft.payload) >= LARGE_PUBLISH
                    or draft.sender_id in self._large_senders
                )
            if self._lane_large:
                self._large.append((draft, done))
                self._large_senders[draft.sender_id] += 1
                if self._large_task is None:
                    loop = asyncio.get_running_loop()
                    self._large_task = loop.create_task(self._run_large())
                return
        self._pending.append((draft, done))
        if self._task is None and not self._due:
            self._due = True
            if self.flusher is not None:
                self.flusher.defer(self._commit_now)
            else:
                asyncio.get_running_loop().call_soon(self._commit_now)

    def _cut(self) -> list[tuple[Draft, Done | None]]:
        """Take the next batch off the pending publishes."""
        cut = self.max_batch
        pending = self._pending
        # The drafts of one publish (a batch to several topics) commit together.
        while cut < len(pending) and pending[cut][0].group == 0:
            cut += 1
        batch = pending[:cut]
        del pending[:cut]
        return batch

    def _commit_now(self) -> None:
        """Commit this turn's publishes here if the store can record them on this thread,
        else hand them to a task."""
        self._due = False
        while self._pending and self._task is None:
            batch = self._cut()
            drafts = [d for d, _ in batch]
            started = time.perf_counter()
            try:
                messages = self.store.append_now(drafts)
            except Exception as exc:
                self._failed(batch, exc)
                continue
            if messages is None:  # not now (an fsync policy, a trim running): a task waits
                self._pending[:0] = batch
                self._task = asyncio.get_running_loop().create_task(self._run())
                return
            self._committed(batch, drafts, messages, started)

    async def _run(self) -> None:
        try:
            while self._pending:
                await self._commit(self._cut())
        finally:
            self._task = None

    async def _run_large(self) -> None:
        try:
            while self._large:
                end = 1  # one publish: its first draft and the drafts of its group
                while end < len(self._large) and self._large[end][0].group == 0:
                    end += 1
                batch = self._large[:end]
                del self._large[:end]
                try:
                    await self._commit(batch)
                finally:
                    for draft, _ in batch:
                        left = self._large_senders[draft.sender_id] - 1
                        if left > 0:
                            self._large_senders[draft.sender_id] = left
                        else:
                            del self._large_senders[draft.sender_id]
        finally:
            self._large_task = None

    async def _commit(self, batch: list[tuple[Draft, Done | None]]) -> None:
        drafts = [d for d, _ in batch]
        started = time.perf_counter()
        try:
            messages = await self.store.append(drafts)
        except Exception as exc:
            self._failed(batch, exc)
            return
        self._committed(batch, drafts, messages, started)

    def _failed(self, batch: list[tuple[Draft, Done | None]], exc: Exception) -> None:
        if isinstance(exc, BrokerError):
            self._refuse(batch, exc)
            return
        log.error("store append failed; refusing %d publishes", len(batch), exc_info=exc)
        self._refuse(batch, Unavailable("the store cannot take messages now"))

    def _committed(
        self,
        batch: list[tuple[Draft, Done | None]],
        drafts: list[Draft],
        messages: list[Message],
        started: float,
    ) -> None:
        elapsed = time.perf_counter() - started
        for observe in self.commit_observers:
            observe(len(batch), elapsed)
        # One publish not echoed to its sender gives each connection one frame at most (an
        # ack or the message): there is nothing to batch, so each is written at once.
        flusher = self.flusher if len(batch) == 1 and not drafts[0].echo else None
        if flusher is not None:
            flusher.alone = True
        try:
            # Acks first: they are small and their latency is what publishers wait on;
            # the fan-out of a large batch to many subscribers would otherwise delay them.
            if len(batch) == 1:  # a publish alone (a chat room's): no lists to zip
                done = batch[0][1]
                msg = messages[0]
                if done is not None:
                    done(msg, None)
                self.on_committed([] if type(msg) is Duplicate else [(msg, drafts[0])])
                return
            for (_, done), msg in zip(batch, messages):
                if done is not None:
                    done(msg, None)
            if Duplicate in map(type, messages):
                # A repeated idempotency key: answered above, recorded nothing, sent nowhere.
                committed = [(m, d) for m, d in zip(messages, drafts) if type(m) is not Duplicate]
            else:
                committed = list(zip(messages, drafts))
            self.on_committed(committed)
        finally:
            if flusher is not None:
                flusher.alone = False

    @staticmethod
    def _refuse(batch: list[tuple[Draft, Done | None]], exc: BrokerError) -> None:
        for _, done in batch:
            if done is not None:
                done(None, Unavailable(exc.message) if not isinstance(exc, Unavailable) else exc)

    @property
    def pending(self) -> int:
        """Publishes accepted but not yet committed."""
        return len(self._pending) + len(self._large)

    async def close(self) -> None:
        """Refuse new publishes and wait until every accepted one is committed."""
        self._closed = True
        while self._task is not None or self._pending or self._large_task is not None:
            if self._task is None and self._pending:
                self._commit_now()  # commits, or starts the task that will
            if self._task is not None:
                await asyncio.shield(self._task)
            elif self._large_task is not None:
                await asyncio.shield(self._large_task)
