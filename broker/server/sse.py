"""Server-sent event streams at ``GET /sse`` (section 11 of docs/protocol.md).

A stream is a plain HTTP response on a connection the server already counts, written as
messages arrive. It is served by a ``StreamSession``: a ``Session`` whose bytes are
events instead of WebSocket frames, so the hub fans out to it like to any connection (one
encoded event per message, shared by every stream) and the slow-consumer bound, the
replay's backpressure and the token's expiry are the WebSocket's own. Its patterns
replay together: one merge of every pattern's history in seq order, without duplicates.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from broker.core.hub import Run, Subscription
from broker.core.model import Message
from broker.core.sse import HEARTBEAT, HEARTBEAT_LINE, StreamRequest, ready_event
from broker.errors import CLOSE_SLOW_CONSUMER
from broker.server.session import Session
from broker.store.base import LATEST_LIMIT, Pages, Store

if TYPE_CHECKING:
    from broker.server.connection import Connection


class StreamLink:
    """What a ``Session`` needs of its connection, for a stream: the connection's
    transport and flow control, and an end that is a TCP close (there is no close frame)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.transport = conn.transport
        self.ended = False

    @property
    def is_open(self) -> bool:
        """The stream is being written."""
        return not self.ended and not self.conn.closed.done()

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        await self.conn.drain()

    def close(self, code: int, reason: str = "", timeout: float = 2.0) -> None:
        """End the stream: what is buffered goes out first, within ``timeout`` (at once for
        a slow consumer, whose buffer is dropped)."""
        if self.ended:
            return
        self.ended = True
        transport = self.transport
        if transport is None or self.conn.closed.done():
            return
        if code == CLOSE_SLOW_CONSUMER:
            self.conn.abort()
            return
        transport.close()
        self.conn.loop.call_later(timeout, self.conn.abort)


class StreamSession(Session):
    """A ``Session`` that writes server-sent events: each message is ``Message.event``."""

    __slots__ = ("epoch", "opened")

    epoch: str
    #: The ``ready`` event is written: comment lines may follow (the stream opens with it).
    opened: bool

    def send(self, frame: bytes) -> None:
        """Queue bytes of the stream as they are (already events or comment lines)."""
        self._queue(frame)

    def encode(self, message: Message) -> bytes:
        return message.event(self.epoch)

    def deliver(self, message: Message) -> None:
        if self.closing:
            return
        event = message.event(self.epoch)
        if self._held is not None:
            self._held.append(message)
            self._held_bytes += len(event)
            if self._held_bytes > self.max_queue:
                self.close(CLOSE_SLOW_CONSUMER, "slow consumer")
            return
        self._queue(event)

    def deliver_run(self, run: Run) -> None:
        if self.closing:
            return
        if self._held is not None or self.flusher.alone:
            for message in run.messages:
                self.deliver(message)
            return
        epoch = self.epoch
        events = [message.event(epoch) for message in run.messages]  # each encoded once
        pending = self._pending
        if not pending:
            self.flusher.mark(self)
        pending += events
        self._pending_bytes += sum(map(len, events))
        if self._pending_bytes + self._buffered > self.max_queue:
            self._check_queue()


class _Merge:
    """The pages of several replays merged in seq order, each seq once (an async iterator
    written out, not an async generator: mypyc compiles this module)."""

    def __init__(self, sources: list[Pages]) -> None:
        self.sources = sources
        self.pages: list[list[Message]] = [[] for _ in sources]
        self.heap: list[tuple[int, int, int]] = []  # (seq, source, index in its page)
        self.started = False
        self.last = -1

    def __aiter__(self) -> _Merge:
        return self

    async def _refill(self, i: int) -> None:
        page = await self.sources[i].next()
        self.pages[i] = page
        if page:
            heapq.heappush(self.heap, (page[0].seq, i, 0))

    async def __anext__(self) -> Message:
        if not self.started:
            self.started = True
            for i in range(len(self.sources)):
                await self._refill(i)
        heap, pages = self.heap, self.pages
        while heap:
            seq, i, j = heapq.heappop(heap)
            message = pages[i][j]
            if j + 1 < len(pages[i]):
                heapq.heappush(heap, (pages[i][j + 1].seq, i, j + 1))
            else:
                await self._refill(i)
            if seq != self.last:
                self.last = seq
                return message
        raise StopAsyncIteration


def _merge(sources: list[Pages]) -> AsyncIterator[Message]:
    return _Merge(sources)


async def read_replay(
    store: Store, ask: StreamRequest, upto: int, visible: Callable[[str], bool]
) -> tuple[AsyncIterator[Message] | list[Message], bool, list[Pages]]:
    """The messages a stream replays (up to ``upto``), its ``recovered`` flag and the
    pages read (their ``gap``): ``latest``, ``last`` or ``since`` over all its patterns."""
    patterns = ask.patterns
    if ask.latest:
        found: dict[int, Message] = {}
        for pattern in patterns:
            for msg in await store.latest(pattern, upto, visible=visible):
                found[msg.seq] = msg
        chosen = sorted(found)[-LATEST_LIMIT:]
        return [found[seq] for seq in chosen], True, []
    if ask.since is not None:
        since, recovered = ask.since, True
        if (ask.epoch is not None and ask.epoch != store.epoch) or since > upto:
            since, recovered = 0, False
        pages = [await store.replay(p, since=since, upto=upto) for p in patterns]
        return _merge(pages), recovered and all(p.recovered for p in pages), pages
    if ask.last is not None and ask.last > 0:
        pages = [await store.replay(p, last=ask.last, upto=upto) for p in patterns]
        if len(pages) == 1:
            return _merge(pages), True, pages
        # The latest N over all patterns are among each pattern's latest N: merge those and
        # keep the last N (a bound of N messages, the client's own ask).
        tail: collections.deque[Message] = collections.deque(maxlen=ask.last)
        async for msg in _merge(pages):
            if visible(msg.topic):
                tail.append(msg)
        return list(tail), True, pages
    return [], True, []


async def serve(
    session: StreamSession,
    ask: StreamRequest,
    store: Store,
    hub_subscribe: Callable[[StreamSession, Subscription], object],
    last_seq: Callable[[], int],
) -> None:
    """Subscribe ``session`` to the stream's patterns, write the ``ready`` event and the
    replay, then let live messages through (held back until then)."""
    session.hold()
    try:
        upto = last_seq()
        for pattern in ask.patterns:
            hub_subscribe(session, Subscription(pattern, covered_from=upto, present=False))
        visible = session.identity.may_receive
        messages, recovered, pages = await read_replay(store, ask, upto, visible)
        if session.closing:
            return
        session.send(ready_event(upto, store.epoch, recovered, not ask.replays))
        session.opened = True
        if isinstance(messages, list):
            await session.replay(m for m in messages if visible(m.topic))
        else:
            batch: list[Message] = []
            async for msg in messages:
                if session.closing:
                    return
                if visible(msg.topic):
                    batch.append(msg)
                if len(batch) >= 500:
                    await session.replay(batch)
                    batch = []
                    if not await session.drained():
                        return
            await session.replay(batch)
        if any(p.gap for p in pages) and not session.closing:
            # History moved on under the replay: the client resumes with Last-Event-ID.
            session.close(CLOSE_SLOW_CONSUMER, "history moved on during the replay")
    finally:
        session.release()


async def heartbeats(streams: Callable[[], list[StreamSession]], every: float = HEARTBEAT) -> None:
    """Write a comment line to every stream more often than every ``every`` seconds,
    forever: one timer for all streams (proxies close a response silent for too long)."""
    while True:
        await asyncio.sleep(every * 2 / 3)
        for session in streams():
            if session.opened and not session.closing:
                session.send(HEARTBEAT_LINE)
