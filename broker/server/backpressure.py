"""Back-pressure on publishers: what waits for the store is bounded, per connection and
in all.

A publish is accepted when its frame is parsed and recorded when the store has it (the
journal's group commit). Nothing else bounds the publishes in between: a client sending
fire-and-forget publishes faster than the disk takes them would pile them up in memory
without end. So each connection's publishes waiting for the store are counted (number and
bytes); past its bound, or past the bound on bytes waiting for all connections together,
the server stops reading that connection's socket (``transport.pause_reading``) until
enough of them are recorded. TCP flow control then slows the client down; nothing is
refused. A publisher that waits for its acks never meets the bound.

The publishes waiting for the store are one queue, in arrival order: a well-behaved
client's publish waits behind everything the others have piled up. So there is also a
bound on how many wait in all (``max_waiting``, about one journal batch): past it, every
connection with more than its fair share waiting (``max_waiting`` divided by the
connections with publishes waiting) is paused too, and a connection with one publish in
flight never is. Many flooding connections together
then keep the queue, and the wait of everyone else's publishes, short.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from broker.core.model import Draft, Message
from broker.errors import BrokerError

if TYPE_CHECKING:
    from broker.server.session import Link

Done = Callable[[Message | None, BrokerError | None], None]

#: Publishes waiting for the store, all connections together, past which connections
#: with more than their fair share waiting are paused: about one journal batch.
MAX_WAITING = 2000

log = logging.getLogger("broker.server.backpressure")


class Session(Protocol):
    """What back-pressure needs of a session (``broker.server.session.Session``); a
    protocol, so that the compiled build takes any object that has these."""

    conn: Link
    closing: bool
    backlog: deque[str | bytes] | None


class Backpressure:
    """Counts publishes waiting for the store and pauses reading the connections that
    send them past the bounds; resumes them at half the bounds (hysteresis, so a paused
    connection is not woken for a single frame)."""

    def __init__(
        self,
        max_count: int,
        max_bytes: int,
        max_total: int,
        backlog_pause: int = 64,
        max_waiting: int = MAX_WAITING,
    ) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.max_total = max_total
        self.backlog_pause = backlog_pause  # app.py pauses a connection for its backlog too
        self.max_waiting = max_waiting
        #: Bytes of publishes accepted and not yet recorded (or refused), in all.
        self.total = 0
        #: Publishes accepted and not yet recorded, in all.
        self.count = 0
        #: Times a connection was paused, and how many of those for the global bound.
        self.pauses = 0
        self.global_pauses = 0
        self._waiting: dict[Session, list[int]] = {}  # session -> [count, bytes]
        self._paused: set[Session] = set()
        self._over_total = False
        # At least half of max_waiting wait: a connection paused for its share waits.
        self._crowded = False

    @property
    def over_total(self) -> bool:
        """Past the global bound: new publishes that cannot be paused are refused."""
        return self.total >= self.max_total

    def wrap(self, session: Session | None, draft: Draft, done: Done) -> Done:
        """Count ``draft`` as waiting for the store until ``done`` is called for it."""
        size = len(draft.payload) + len(draft.topic)
        self.accepted(session, size)

        def recorded(msg: Message | None, error: BrokerError | None) -> None:
            self.recorded(session, size)
            done(msg, error)

        return recorded

    def accepted(self, session: Session | None, size: int) -> None:
        """A publish of ``size`` bytes from ``session`` (None: HTTP) now waits for the store."""
        self.total += size
        self.count += 1
        if self.total >= self.max_total and not self._over_total:
            self._over_total = True
            log.warning(
                "%d bytes of publishes wait for the store (bound %d): pausing publishers",
                self.total,
                self.max_total,
                extra={"event": "store_backlog_full"},
            )
        if session is None:
            return
        waiting = self._waiting.get(session)
        if waiting is None:
            waiting = self._waiting[session] = [0, 0]
        waiting[0] += 1
        waiting[1] += size
        if (
            waiting[0] >= self.max_count
            or waiting[1] >= self.max_bytes
            or self._over_total
            or (self.count >= self.max_waiting and waiting[0] > self._fair_share())
        ):
            # Checked whether paused already or not: the request backlog (app.py) may
            # have resumed reading meanwhile.
            transport = session.conn.transport
            if transport is not None and not session.closing and transport.is_reading():
                transport.pause_reading()
                if session not in self._paused:
                    self._paused.add(session)
                    self.pauses += 1
                    if self._over_total:
                        self.global_pauses += 1

    def recorded(self, session: Session | None, size: int) -> None:
        """That publish is recorded or refused: it no longer waits."""
        self.total -= size
        self.count -= 1
        crowded = self.count >= self.max_waiting // 2
        if session is not None:
            waiting = self._waiting.get(session)
            if waiting is not None:
                waiting[0] -= 1
                waiting[1] -= size
                if waiting[0] <= 0:
                    del self._waiting[session]
        if self._over_total and self.total <= self.max_total // 2:
            self._over_total = False
            log.warning(
                "publishes waiting for the store back under %d bytes: resuming publishers",
                self.max_total // 2,
                extra={"event": "store_backlog_ok"},
            )
            for paused in list(self._paused):
                self._maybe_resume(paused)
        elif self._crowded and not crowded:
            # The queue is short again: those paused for their share may go on.
            for paused in list(self._paused):
                self._maybe_resume(paused)
        elif session is not None and session in self._paused:
            self._maybe_resume(session)
        self._crowded = crowded

    def _fair_share(self) -> int:
        """Publishes one connection may have waiting while the queue is long."""
        return max(1, self.max_waiting // max(1, len(self._waiting)))

    def _maybe_resume(self, session: Session) -> None:
        if session.closing:
            self._paused.discard(session)
            return
        if self._over_total:
            return
        count, size = self._waiting.get(session, (0, 0))
        if count > self.max_count // 2 or size > self.max_bytes // 2:
            return
        if self.count >= self.max_waiting // 2 and count > self._fair_share() // 2:
            return
        self._paused.discard(session)
        transport = session.conn.transport
        # A connection also paused for its backlog of requests (app.py) is resumed there.
        backlog = session.backlog
        if transport is not None and (backlog is None or len(backlog) < self.backlog_pause):
            transport.resume_reading()

    def forget(self, session: Session) -> None:
        """``session`` closed: it will not be resumed (its publishes still count)."""
        self._paused.discard(session)
