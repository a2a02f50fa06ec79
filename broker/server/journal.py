"""Group commit: publishes that arrive while a batch is being written form the next batch.

At most one ``Store.append`` is in flight, so batches commit, and are fanned out, in seq
order. Each publish's callback runs after its message is recorded (with the message) or
refused (with the error); fire-and-forget publishes take the same path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from broker.core.model import Draft, Message
from broker.errors import BrokerError, Unavailable
from broker.store.base import Store
from broker.store.dedupe import Duplicate

log = logging.getLogger("broker.server.journal")

Done = Callable[[Message | None, BrokerError | None], None]
Committed = Callable[[list[tuple[Message, Draft]]], None]


class Journal:
    """Feeds publishes to the store in batches and hands committed messages on."""

    def __init__(self, store: Store, on_committed: Committed, max_batch: int = 2000) -> None:
        self.store = store
        self.on_committed = on_committed
        self.max_batch = max_batch
        self._pending: list[tuple[Draft, Done | None]] = []
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        #: Observers of (batch size, seconds) per commit, e.g. metrics.
        self.commit_observers: list[Callable[[int, float], None]] = []

    def submit(self, draft: Draft, done: Done | None = None) -> None:
        """Queue ``draft``; ``done`` is called once it is committed or refused."""
        if self._closed:
            if done is not None:
                done(None, Unavailable("the broker is shutting down"))
            return
        self._pending.append((draft, done))
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while self._pending:
                cut = self.max_batch
                pending = self._pending
                # The drafts of one publish (a batch to several topics) commit together.
                while cut < len(pending) and pending[cut][0].group == 0:
                    cut += 1
                batch = pending[:cut]
                del pending[:cut]
                await self._commit(batch)
        finally:
            self._task = None

    async def _commit(self, batch: list[tuple[Draft, Done | None]]) -> None:
        drafts = [d for d, _ in batch]
        started = time.perf_counter()
        try:
            messages = await self.store.append(drafts)
        except BrokerError as exc:
            self._refuse(batch, exc)
            return
        except Exception:
            log.exception("store append failed; refusing %d publishes", len(batch))
            self._refuse(batch, Unavailable("the store cannot take messages now"))
            return
        elapsed = time.perf_counter() - started
        for observe in self.commit_observers:
            observe(len(batch), elapsed)
        # Acks first: they are small and their latency is what publishers wait on; the
        # fan-out of a large batch to many subscribers would otherwise delay them.
        for (_, done), msg in zip(batch, messages):
            if done is not None:
                done(msg, None)
        committed = list(zip(messages, drafts))
        if any(type(msg) is Duplicate for msg in messages):
            # A repeated idempotency key: answered above, recorded nothing, sent nowhere.
            committed = [(msg, d) for msg, d in committed if type(msg) is not Duplicate]
        self.on_committed(committed)

    @staticmethod
    def _refuse(batch: list[tuple[Draft, Done | None]], exc: BrokerError) -> None:
        for _, done in batch:
            if done is not None:
                done(None, Unavailable(exc.message) if not isinstance(exc, Unavailable) else exc)

    @property
    def pending(self) -> int:
        """Publishes accepted but not yet committed."""
        return len(self._pending)

    async def close(self) -> None:
        """Refuse new publishes and wait until every accepted one is committed."""
        self._closed = True
        while self._task is not None:
            await asyncio.shield(self._task)
