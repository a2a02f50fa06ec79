"""Idempotency keys in a store: number a batch of drafts, skipping repeated keys.

A publish with a ``key`` is one or more drafts (a batch publish to several topics): the
first carries the key and ``group`` (how many drafts the publish has), the others
``group == 0``. The store numbers a journal batch in order; a keyed publish whose
``(user, key)`` the store already holds within its dedupe window, or that an earlier
publish of the same batch used, gets no seqs: it is answered with a ``Duplicate`` per
draft carrying the first publish's seqs. Keys are recorded in the same transaction (or
script) as the messages, so an acknowledged key survives what its messages survive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from broker.core.model import Draft, Message

#: (user id, key) of a keyed publish.
KeyId = tuple[str, str]


@dataclass
class Duplicate(Message):
    """A draft that was not published: its publish's key was already used. ``seqs``
    are the seqs of the first publish with that key."""

    seqs: tuple[int, ...] = field(default=(), compare=False)

    # Written out, as Message's is (broker.core.model); mypyc needs the subclass's too.
    def __init__(
        self,
        seq: int,
        topic: str,
        payload: bytes,
        sender_id: str,
        sender_name: str,
        ts: int,
        seqs: tuple[int, ...] = (),
    ) -> None:
        super().__init__(seq, topic, payload, sender_id, sender_name, ts)
        self.seqs = seqs


@dataclass
class Numbered:
    """One batch after numbering: what to answer per draft, what to record."""

    #: Per draft, in order: its new message, or a ``Duplicate``.
    results: list[Message]
    #: The new messages only, in seq order.
    fresh: list[Message]
    #: Keys to record with the messages: (user, key) -> seqs.
    keys: dict[KeyId, tuple[int, ...]]

    def __init__(
        self, results: list[Message], fresh: list[Message], keys: dict[KeyId, tuple[int, ...]]
    ) -> None:
        self.results = results
        self.fresh = fresh
        self.keys = keys


def number(
    drafts: list[Draft], first: int, known: Callable[[str, str], tuple[int, ...] | None]
) -> Numbered:
    """Give the drafts seqs from ``first`` on, in order, except those of a keyed publish
    whose key ``known(user, key)`` (the store's live keys) or this batch already holds."""
    if all(d.key is None for d in drafts):  # the common case: nothing to look up
        made = [d.to_message(first + i) for i, d in enumerate(drafts)]
        return Numbered(made, made, {})
    results: list[Message] = []
    fresh: list[Message] = []
    keys: dict[KeyId, tuple[int, ...]] = {}
    seq = first
    i, end = 0, len(drafts)
    while i < end:
        head = drafts[i]
        size = max(head.group, 1)
        group = drafts[i : i + size]
        if head.key is not None:
            kid = (head.sender_id, head.key)
            prior = keys.get(kid)
            if prior is None:
                prior = known(*kid)
            if prior is not None:
                results += [
                    Duplicate(
                        prior[0], d.topic, d.payload, d.sender_id, d.sender_name, d.ts, seqs=prior
                    )
                    for d in group
                ]
                i += size
                continue
        made = [d.to_message(seq + n) for n, d in enumerate(group)]
        seq += len(made)
        if head.key is not None:
            keys[(head.sender_id, head.key)] = tuple(m.seq for m in made)
        results += made
        fresh += made
        i += size
    return Numbered(results, fresh, keys)


def encode_seqs(seqs: tuple[int, ...]) -> str:
    """Seqs as stored with a key: ``"12,13,14"``."""
    return ",".join(map(str, seqs))


def decode_seqs(text: str | bytes) -> tuple[int, ...]:
    """The seqs of ``encode_seqs``."""
    if isinstance(text, bytes):
        text = text.decode()
    return tuple(int(s) for s in text.split(","))
