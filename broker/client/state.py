"""What a client remembers across connections, with no I/O: subscriptions and seen seqs.

``ClientState`` is the sans-I/O half of ``broker.client.Client``: it decides which
``sub`` frames resume a new connection (``since`` = the last seq delivered for each
subscription, with its ``epoch``), which incoming messages are new (de-duplication by
seq), and when a resume lost messages (a ``Gap``). The asyncio shell only moves frames.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from broker.core.model import Message
from broker.core.protocol import Sub
from broker.core.topics import matches


@dataclass(frozen=True, slots=True)
class Gap:
    """Resuming ``pattern`` after a reconnect could not recover every missed message."""

    pattern: str
    since: int | None
    epoch: str | None
    new_epoch: str | None

    @property
    def epoch_changed(self) -> bool:
        """True when the broker's history started over (e.g. a memory broker restarted)."""
        return self.epoch is not None and self.epoch != self.new_epoch

    def describe(self) -> str:
        """One line for humans."""
        if self.epoch_changed:
            return (
                f"the broker's history started over (epoch {self.epoch} -> {self.new_epoch}); "
                f"messages on {self.pattern!r} may have been missed"
            )
        return (
            f"messages on {self.pattern!r} after seq {self.since} are no longer all in the "
            "broker's history; some were missed"
        )


@dataclass
class SubState:
    """One subscription as the client keeps it across connections."""

    pattern: str
    presence: bool
    #: Resume point: the highest seq delivered (or known covered) for this pattern.
    watermark: int | None = None
    epoch: str | None = None
    #: While a replay may still be arriving: the ``seq`` of the sub's ``ok``.
    replay_until: int | None = None
    #: A ``last`` replay that has not delivered anything yet is redone as is on resume.
    last: int | None = None
    #: A ``latest`` replay, redone as ``last`` is until a message past it arrives.
    latest: bool = False
    #: The broker answered: resume this subscription on every new connection.
    confirmed: bool = False

    def request(self, rid: int) -> Sub:
        """The ``sub`` that (re)starts this subscription where it left off."""
        since = self.watermark
        return Sub(
            id=rid,
            topic=self.pattern,
            since=since,
            epoch=self.epoch if since is not None else None,
            last=self.last if since is None else None,
            presence=self.presence,
            latest=self.latest and since is None and self.last is None,
        )


class ClientState:
    """Subscriptions, the history epoch and the seqs already delivered (a bounded window)."""

    def __init__(self, dedupe_window: int = 100_000) -> None:
        self.subs: dict[str, SubState] = {}
        #: The broker's history epoch, from the latest ``sub`` answer.
        self.epoch: str | None = None
        self._seen: set[int] = set()
        self._seen_order: deque[int] = deque()
        self._dedupe_window = dedupe_window

    def remember(self, seq: int) -> bool:
        """False when ``seq`` was already delivered."""
        if seq in self._seen:
            return False
        self._seen.add(seq)
        self._seen_order.append(seq)
        while len(self._seen_order) > self._dedupe_window:
            self._seen.discard(self._seen_order.popleft())
        return True

    def on_msg(self, frame: dict[str, Any]) -> Message | None:
        """Advance every matching subscription's resume point; the message if it is new."""
        seq = frame.get("seq")
        topic = frame.get("topic")
        if not isinstance(seq, int) or not isinstance(topic, str):
            return None
        for state in self.subs.values():
            if not state.confirmed:
                continue
            if state.replay_until is not None and seq > state.replay_until:
                # The first message past the sub's ok: its replay is complete.
                state.watermark = max(state.watermark or 0, state.replay_until)
                state.replay_until = None
                state.last = None
                state.latest = False
            if matches(state.pattern, topic):
                state.watermark = max(state.watermark or 0, seq)
                state.last = None
                state.latest = False
        if not self.remember(seq):
            return None
        return Message.from_json(frame)

    def note_epoch(self, epoch: str) -> None:
        """The broker named its history ``epoch``; a new one makes old seqs meaningless."""
        if self.epoch is not None and epoch != self.epoch:
            self._seen.clear()
            self._seen_order.clear()
        self.epoch = epoch

    def apply_sub_reply(
        self,
        state: SubState,
        since: int | None,
        epoch: str | None,
        reply: dict[str, Any],
        resumed: bool,
    ) -> Gap | None:
        """Update a subscription's resume point from its ``ok`` (``since``/``epoch`` as
        sent); the ``Gap`` when a resume could not recover everything."""
        new_epoch = str(reply.get("epoch", ""))
        seq = int(reply.get("seq", 0))
        recovered = bool(reply.get("recovered", True))
        self.note_epoch(new_epoch)
        state.epoch = new_epoch
        state.confirmed = True
        if since is None and state.last is None and not state.latest:
            state.watermark = max(state.watermark or 0, seq)  # live from here on
            return None
        state.replay_until = seq  # replayed messages follow, up to about ``seq``
        if recovered:
            return None
        if since is not None and (epoch != new_epoch or since > seq):
            # Another history, or since beyond it: the broker replays all it retains.
            state.watermark = 0
        return Gap(state.pattern, since, epoch, new_epoch) if resumed else None

    def refused(self, pattern: str) -> bool:
        """A ``sub`` for ``pattern`` was refused: True when it was a resumed one (dropped
        now, e.g. a new token's ACL no longer allows it)."""
        state = self.subs.get(pattern)
        if state is not None and state.confirmed:
            del self.subs[pattern]
            return True
        return False
