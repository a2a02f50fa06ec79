"""Which topics have messages that SQLite may not hold yet: a read of one topic waits for
the commit log to be applied only when that topic has some (plain code, no I/O).

A read needs SQLite to hold every message up to its ``upto``; before, a read of a quiet
topic waited for an apply (several fsyncs) whenever any other topic had been published to
since the last one (issue 27, row 6). The topics are remembered in two generations: the
newer one since the last rotation, the older one until SQLite holds all of it. Past
``LIMIT`` topics in a generation the names are forgotten and every read waits, as before,
until SQLite holds what was appended up to then: the memory stays bounded."""

from __future__ import annotations

from collections.abc import Iterable

from broker.core.model import Message

#: Most topics one generation remembers.
LIMIT = 10_000


class Unapplied:
    """The highest seq appended per topic, for the messages SQLite may not hold yet."""

    def __init__(self) -> None:
        self._new: dict[str, int] = {}
        self._old: dict[str, int] = {}
        self._old_top = 0  # every seq in _old is at most this
        self._top = 0  # the highest seq appended
        self._blind = 0  # the messages up to this seq have topics no longer remembered

    def add(self, messages: Iterable[Message], applied: int) -> None:
        """Messages appended to the commit log (on the event loop); SQLite holds the
        messages up to ``applied``."""
        self._rotate(applied)
        new = self._new
        for m in messages:
            new[m.topic] = m.seq
            self._top = m.seq
        if len(new) > LIMIT:
            self._blind = self._top
            self._new, self._old = {}, {}

    def needed(self, topic: str, upto: int, applied: int) -> int:
        """The seq SQLite must hold for a read of ``topic`` up to ``upto`` to see all of
        it (at most ``upto``), when SQLite holds the messages up to ``applied``."""
        self._rotate(applied)
        top = max(self._new.get(topic, 0), self._old.get(topic, 0), self._blind)
        return min(upto, top)

    def _rotate(self, applied: int) -> None:
        if applied >= self._old_top:
            # SQLite holds all the older generation: forget it; the newer one ages.
            self._old, self._new = self._new, {}
            self._old_top = self._top
