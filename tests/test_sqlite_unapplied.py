"""``Unapplied``: the seq SQLite must hold before a read of one topic sees all of it."""

from __future__ import annotations

from broker.core.model import Message
from broker.store.sqlite import unapplied
from broker.store.sqlite.unapplied import Unapplied


def _msgs(*pairs: tuple[int, str]) -> list[Message]:
    return [Message(seq, topic, b"", "u", "u", 0) for seq, topic in pairs]


def test_a_topic_waits_only_for_its_own_messages() -> None:
    u = Unapplied()
    u.add(_msgs((1, "a"), (2, "b"), (3, "a")), applied=0)
    assert u.needed("a", upto=3, applied=0) == 3
    assert u.needed("b", upto=3, applied=0) == 2
    assert u.needed("c", upto=3, applied=0) == 0
    assert u.needed("a", upto=2, applied=0) == 2  # never past the read's upto


def test_generations_are_forgotten_once_applied() -> None:
    u = Unapplied()
    u.add(_msgs((1, "a")), applied=0)
    u.add(_msgs((2, "b")), applied=0)
    # SQLite holds seq 1 only: "b" (seq 2) is still needed, "a" is not.
    assert u.needed("a", upto=2, applied=1) <= 1
    assert u.needed("b", upto=2, applied=1) == 2
    u.add(_msgs((3, "c")), applied=1)
    assert u.needed("b", upto=3, applied=1) == 2
    # Everything applied: nothing is needed whatever was remembered.
    assert all(u.needed(t, upto=3, applied=3) <= 3 for t in "abc")
    u.add(_msgs((4, "d")), applied=3)
    assert u.needed("c", upto=4, applied=3) <= 3
    assert u.needed("d", upto=4, applied=3) == 4


def test_too_many_topics_are_forgotten_and_every_read_waits() -> None:
    u = Unapplied()
    many = _msgs(*((i, f"t/{i}") for i in range(1, unapplied.LIMIT + 3)))
    u.add(many, applied=0)
    top = many[-1].seq
    # The names are gone: a read of any topic waits for all of them to be applied.
    assert u.needed("other", upto=top, applied=0) == top
    assert u.needed("other", upto=top, applied=top) <= top
    u.add(_msgs((top + 1, "x")), applied=top)
    assert u.needed("other", upto=top + 1, applied=top) <= top
