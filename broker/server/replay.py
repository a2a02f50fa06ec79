"""Serving a ``sub``: the subscription limit, the replay from history, and the rules that
keep replay and live messages without gap or duplicate (docs/protocol.md, "Delivery,
order and history").

Live messages for the connection are held back from its ``ok`` until the replay is sent
(``Session.hold``/``release``); a replay skips what the connection already received
through another subscription (``Hub.replay_filter``) and what an older subscription to
the same pattern covered; the history is read a page at a time, the next page once the
socket has drained the last.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from broker.core.auth import Identity
from broker.core.hub import Hub, Subscription
from broker.core.namespaces import Namespaces
from broker.core.protocol import Sub, encode_ok
from broker.errors import CLOSE_SLOW_CONSUMER, BrokerError, Forbidden, Unavailable
from broker.server.connection import CLOSE_INTERNAL
from broker.server.session import Session
from broker.store.base import PAGE_SIZE, ListPages, Pages, Store, Visible

log = logging.getLogger("broker")


class Subscriptions:
    """Serves ``sub`` requests for one server: its hub, its store, its limit."""

    def __init__(
        self,
        hub: Hub,
        store: Store,
        max_subscriptions: int,
        limit_reached: Callable[[str, str], None],
        namespaces: Namespaces | None = None,
    ) -> None:
        self.namespaces = namespaces or Namespaces()
        self.hub = hub
        self.store = store
        self.max_subscriptions = max_subscriptions
        #: Called with (limit, who) when a connection reaches its subscription limit.
        self.limit_reached = limit_reached
        #: Asks the application (the ``subscribe`` hook) after the ACL, when set.
        self.check: Callable[[Identity, str], Awaitable[None]] | None = None

    async def subscribe(self, session: Session, frame: Sub) -> None:
        """Serve a ``sub``: check it, subscribe, answer ``ok``, then replay its history
        with live messages held back meanwhile."""
        ident = session.identity
        ident.check_subscribe(frame.topic)
        if self.check is not None:
            await self.check(ident, frame.topic)
        subs = self.hub.subscriptions.get(session, {})
        limit = self.max_subscriptions
        if frame.topic not in subs and len(subs) >= limit:
            self.limit_reached("subscriptions", f"user={ident.id}")
            raise Forbidden(f"subscription limit reached ({limit} per connection)")
        if (
            self.store.shared
            and frame.since is not None
            and frame.epoch in (None, self.store.epoch)
        ):
            # In a cluster the client may have seen `since` on a node a few ms ahead.
            await self.catch_up(frame.since)
        session.hold()
        try:
            upto = self.hub.last_seq
            present = not ident.anonymous and self.namespaces.presence(frame.topic)
            sub = Subscription(frame.topic, frame.presence, covered_from=upto, present=present)
            old = self.hub.subscribe(session, sub)
            try:
                pages, recovered = await self._read_history(frame, sub, upto, ident.may_receive)
            except Exception as exc:
                # Undo: a refused sub must not keep receiving live messages.
                if old is not None:
                    self.hub.subscribe(session, old)
                else:
                    self.hub.unsubscribe(session, frame.topic)
                if isinstance(exc, BrokerError):
                    raise
                log.warning("history read failed: %s", exc, extra={"event": "store_error"})
                raise Unavailable("history cannot be read now; retry later") from None
            if session.closing:
                return
            session.send(encode_ok(frame.id, seq=upto, epoch=self.store.epoch, recovered=recovered))
            if pages is not None:
                await self._replay(session, frame.topic, old, pages)
            if old is not None:
                sub.covered_from = min(sub.covered_from, old.covered_from)
        finally:
            session.release()

    async def _replay(
        self, session: Session, pattern: str, old: Subscription | None, pages: Pages
    ) -> None:
        """Send a replay page by page: the next page is read from the store only once the
        socket has drained the last, so a replay holds one page whatever the history."""
        ident = session.identity
        covered = self.hub.replay_filter(session, pattern)
        while not session.closing:
            try:
                page = await pages.next()
            except Exception as exc:
                log.warning(
                    "history read failed during a replay: %s", exc, extra={"event": "store_error"}
                )
                session.close(CLOSE_INTERNAL, "history cannot be read now")
                return
            if not page:
                break
            await session.replay(
                msg
                for msg in page
                if ident.may_receive(msg.topic)
                and not (old is not None and msg.seq > old.covered_from)
                and not covered(msg.topic, msg.seq)
            )
            if not await session.drained():
                return
        if pages.gap and not session.closing:
            # Retention removed messages of this replay before they were sent: the client
            # resumes with `since` and learns of the loss from `recovered: false`.
            session.close(CLOSE_SLOW_CONSUMER, "history moved on during the replay")

    async def _read_history(
        self, frame: Sub, sub: Subscription, upto: int, visible: Visible = None
    ) -> tuple[Pages | None, bool]:
        """The replay of a ``sub`` (up to ``upto``, None: none) and its ``recovered`` flag;
        sets how far back the subscription covers; ``visible``: the topics the connection
        may receive."""
        if frame.since is not None:
            since, recovered = frame.since, True
            if (frame.epoch is not None and frame.epoch != self.store.epoch) or since > upto:
                since, recovered = 0, False
            pages = await self.store.replay(frame.topic, since=since, upto=upto)
            sub.covered_from = since
            return pages, recovered and pages.recovered
        if frame.last is not None:
            pages = await self.store.replay(frame.topic, last=frame.last, upto=upto)
            sub.covered_from = min(upto, pages.start)
            return pages, True
        if frame.latest:
            # Scattered messages, one per topic: the subscription covers only what is live.
            found = await self.store.latest(frame.topic, upto, visible=visible)
            sub.covered_topics = {m.topic: m.seq - 1 for m in found}
            return ListPages(list(found), upto, True, PAGE_SIZE), True
        return None, True

    async def catch_up(self, seq: int, timeout: float = 1.0) -> None:
        """Wait (briefly) until this node has fanned out ``seq``."""
        deadline = time.monotonic() + timeout
        while self.hub.last_seq < seq and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
