"""One authenticated connection's state on the server, and its outgoing queue.

Everything a connection sends goes through ``Session.send``/``deliver``: frames are queued
and written to the socket once per event-loop turn (``Flusher``), as ready-made WebSocket
frames, so a fan-out to many connections costs one encode and no await per subscriber.
A connection whose unsent bytes pass ``max_queue`` is closed with 4008 (slow consumer)
and its queue dropped at once. While a subscription replays history, live messages are
held back and released after the replay, so replay and live never interleave.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from broker.core.auth import Identity
from broker.core.hub import Run
from broker.core.limits import TokenBucket
from broker.core.model import Message, text_frame
from broker.errors import CLOSE_SLOW_CONSUMER, CLOSE_TOKEN_EXPIRED

log = logging.getLogger("broker.server.session")

_ids = itertools.count(1)
# Replay writes this much, then waits for the socket to drain.
_REPLAY_CHUNK = 64 * 1024
# A replay yields the event loop after this many seconds of work, checked every
# _REPLAY_CHECK messages.
_REPLAY_SLICE = 0.005
_REPLAY_CHECK = 32


class Link(Protocol):
    """What a session needs of its connection (``broker.server.connection.Connection``)."""

    transport: asyncio.Transport | None

    @property
    def is_open(self) -> bool:
        """The WebSocket is open (handshake done, no close frame sent or received)."""

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""

    def close(self, code: int, reason: str = "", timeout: float = 2.0) -> None:
        """Start the closing handshake."""


class Flusher:
    """Writes every connection's queued frames once per event-loop turn.

    One callback per turn does it all: first what was deferred to the end of the turn
    (the journal's commit, whose acks and deliveries are queued then), then the writes.
    """

    def __init__(self) -> None:
        self._dirty: list[Session] = []
        self._deferred: list[Callable[[], None]] = []
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Bytes written to every connection's socket (metrics: broker_sent_bytes_total).
        self.bytes_out = 0
        #: Set while each frame sent is the only one its connection gets from the work at
        #: hand (the journal answering and fanning out a publish that came alone): a
        #: session with nothing queued writes such a frame at once, as a flush would.
        self.alone = False

    def mark(self, session: Session) -> None:
        """Write ``session``'s queue at the end of this turn."""
        if not self._scheduled:
            self._schedule()
        self._dirty.append(session)

    def defer(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` at the end of this turn, before the queued frames are written."""
        if not self._scheduled:
            self._schedule()
        self._deferred.append(callback)

    def _schedule(self) -> None:
        self._scheduled = True
        loop = self._loop
        if loop is None or loop.is_closed():
            # Looked up once: on Python 3.11 each get_running_loop() is a getpid() call.
            loop = self._loop = asyncio.get_running_loop()
        loop.call_soon(self._flush)

    def _flush(self) -> None:
        try:
            # A deferred callback queues frames; writing them never defers more, so two
            # passes do; the bound only guards against a callback that defers itself.
            for _ in range(4):
                if self._deferred:
                    deferred, self._deferred = self._deferred, []
                    for callback in deferred:
                        try:
                            callback()
                        except Exception:
                            log.exception("deferred callback %r failed", callback)
                dirty, self._dirty = self._dirty, []
                for session in dirty:
                    session.flush()
                if not self._deferred and not self._dirty:
                    break
        finally:
            self._scheduled = False
            if self._deferred or self._dirty:
                self._schedule()


class Session:
    """The server side of one authenticated WebSocket connection."""

    __slots__ = (
        "_buffered",
        "_expiry",
        "_held",
        "_held_bytes",
        "_pending",
        "_pending_bytes",
        "_replay_chunk",
        "backlog",
        "bucket",
        "closing",
        "conn",
        "flusher",
        "id",
        "identity",
        "max_queue",
        "on_close",
        "pipeline",
        "pipeline_done",
        "task",
    )

    def __init__(
        self,
        conn: Link,
        identity: Identity,
        *,
        flusher: Flusher,
        max_queue: int,
        rate_limit: float | None = None,
        on_close: Callable[[Session, int, str], None] | None = None,
    ) -> None:
        self.id = next(_ids)
        self.conn = conn
        self.identity = identity
        self.flusher = flusher
        self.max_queue = max_queue
        self.bucket = TokenBucket(rate_limit) if rate_limit else None
        self.on_close = on_close
        self.closing = False
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._buffered = 0
        #: The request running as a task (sub, presence, stats), if any, and the frames
        #: that arrived meanwhile: the server handles one connection's requests in order.
        self.task: asyncio.Task[None] | None = None
        self.backlog: deque[str | bytes] | None = None  # created when first needed
        #: Publishes waiting for the ``publish`` hook, in the order sent, each with the
        #: task asking it (None: no hook, waits only for those before it); and a future
        #: resolved when they are all done, for a request that waits behind them.
        self.pipeline: deque[tuple[Any, asyncio.Task[bytes | None] | None]] | None = None
        self.pipeline_done: asyncio.Future[None] | None = None
        self._held: list[Message] | None = None
        self._held_bytes = 0
        self._expiry: asyncio.TimerHandle | None = None
        self._replay_chunk = max(1, min(_REPLAY_CHUNK, max_queue // 2))
        if conn.transport is not None:
            conn.transport.set_write_buffer_limits(high=self._replay_chunk)

    def __repr__(self) -> str:
        return f"<Session {self.id} user={self.identity.id!r}>"

    # -- outgoing ----------------------------------------------------------------------

    def send(self, frame: bytes) -> None:
        """Queue a protocol frame (JSON bytes)."""
        self._queue(text_frame(frame))

    def encode(self, message: Message) -> bytes:
        """The bytes that carry ``message`` to this connection (a WebSocket frame)."""
        return message.wire

    def deliver(self, message: Message) -> None:
        """Queue a live message, or hold it while a replay is in progress."""
        if self.closing:
            return
        if self._held is not None:
            self._held.append(message)
            self._held_bytes += len(message.wire)
            if self._held_bytes > self.max_queue:
                self.close(CLOSE_SLOW_CONSUMER, "slow consumer")
            return
        self._queue(message.wire)

    def deliver_run(self, run: Run) -> None:
        """Queue several live messages of one topic at once (``deliver`` for each)."""
        if self.closing:
            return
        if self._held is not None or self.flusher.alone:
            for message in run.messages:
                self.deliver(message)
            return
        pending = self._pending
        if not pending:
            self.flusher.mark(self)
        pending += run.wires
        self._pending_bytes += run.size
        if self._pending_bytes + self._buffered > self.max_queue:
            self._check_queue()

    async def replay(self, messages: Iterable[Message], timeout: float = 30.0) -> None:
        """Send messages from history with backpressure: a replay may be far larger than
        the slow-consumer limit, so it waits for the socket to drain every chunk instead
        of queueing everything at once. A client that reads nothing for ``timeout``
        seconds is closed as a slow consumer."""
        # The socket pauses us above ``chunk`` buffered bytes (set in __init__), and we
        # queue at most ``chunk`` more: together never over max_queue, however small.
        chunk = self._replay_chunk
        loop = asyncio.get_running_loop()
        turn = loop.time()
        for count, message in enumerate(messages):
            if self.closing:
                return
            if not count % _REPLAY_CHECK and loop.time() - turn > _REPLAY_SLICE:
                self.flush()
                await asyncio.sleep(0)  # a long replay shares the loop with the others
                turn = loop.time()
            wire = self.encode(message)
            if self._pending and self._pending_bytes + len(wire) > chunk:
                self.flush()
                try:
                    await asyncio.wait_for(self.conn.drain(), timeout)
                except (TimeoutError, ConnectionError):
                    self.close(CLOSE_SLOW_CONSUMER, "slow consumer")
                    return
            self._queue(wire)

    async def drained(self, timeout: float = 30.0) -> bool:
        """Write what is queued and wait until the socket has taken it (below its
        high-water mark); False when the session is closing, or closed now as a slow
        consumer because the client read nothing for ``timeout`` seconds."""
        self.flush()
        try:
            await asyncio.wait_for(self.conn.drain(), timeout)
        except (TimeoutError, ConnectionError):
            self.close(CLOSE_SLOW_CONSUMER, "slow consumer")
        return not self.closing

    def hold(self) -> None:
        """Hold live messages back until ``release`` (during a replay)."""
        self._held = []
        self._held_bytes = 0

    def release(self) -> None:
        """Send the live messages held back, in order."""
        held, self._held = self._held, None
        self._held_bytes = 0
        for message in held or ():
            self.deliver(message)

    def _queue(self, data: bytes) -> None:
        if self.closing:
            return
        pending = self._pending
        if not pending:
            if self.flusher.alone:
                # Nothing to batch it with: skip the queue, the mark and the flush call.
                self._write(data)
                return
            self.flusher.mark(self)
        pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes + self._buffered > self.max_queue:
            self._check_queue()

    def _check_queue(self) -> None:
        """Close as a slow consumer if the queue and the socket's buffer are over
        ``max_queue``. The buffer only shrinks between flushes, so the figure read at the
        last flush is an upper bound: this re-reads it only when that says we may be over."""
        transport = self.conn.transport
        self._buffered = transport.get_write_buffer_size() if transport is not None else 0
        if self._pending_bytes + self._buffered > self.max_queue:
            self.close(CLOSE_SLOW_CONSUMER, "slow consumer")

    def flush(self) -> None:
        """Write the queued frames to the socket (called by the ``Flusher``)."""
        pending, self._pending = self._pending, []
        size, self._pending_bytes = self._pending_bytes, 0
        transport = self.conn.transport
        if self.closing or not pending or transport is None or not self.conn.is_open:
            return
        transport.writelines(pending)
        self._buffered = transport.get_write_buffer_size()
        self.flusher.bytes_out += size

    def _write(self, data: bytes) -> None:
        """Write one frame now, under the same slow-consumer rule as a queued one."""
        transport = self.conn.transport
        if transport is None or not self.conn.is_open:
            return  # what a flush would do with it
        size = len(data)
        if size + self._buffered > self.max_queue:
            self._buffered = transport.get_write_buffer_size()
            if size + self._buffered > self.max_queue:
                self.close(CLOSE_SLOW_CONSUMER, "slow consumer")
                return
        transport.writelines([data])
        self._buffered = transport.get_write_buffer_size()
        self.flusher.bytes_out += size

    # -- lifetime ----------------------------------------------------------------------

    def allow_publish(self) -> bool:
        """Take a token from the rate limiter (always True without a limit)."""
        return self.bucket is None or self.bucket.allow()

    def set_expiry(self, exp: float | None) -> None:
        """Close with 4003 when ``exp`` (Unix time) passes; None: never."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if exp is None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, exp - time.time())
        self._expiry = loop.call_at(
            loop.time() + delay, self.close, CLOSE_TOKEN_EXPIRED, "token expired"
        )

    def close(self, code: int, reason: str) -> None:
        """Stop sending, drop what is queued, and close the connection with ``code``."""
        if self.closing:
            return
        if code != CLOSE_SLOW_CONSUMER:
            self.flush()  # replies already queued (an error, an ok) go out before the close
        self.closing = True
        self._pending.clear()
        self._pending_bytes = 0
        self._held = None
        if self._expiry is not None:
            self._expiry.cancel()
        if self.on_close is not None:
            self.on_close(self, code, reason)
        # A consumer that does not read never takes the close frame either: free its
        # buffer soon rather than after a full closing-handshake timeout.
        self.conn.close(code, reason, timeout=1.0 if code == CLOSE_SLOW_CONSUMER else 2.0)
