"""The per-user wildcard-pattern budget: one user's connections together hold a bounded
number of distinct wildcard patterns, so a publish's walk of the index stays bounded
however many connections they open (in-process, fake subscribers)."""

from __future__ import annotations

import itertools

import pytest

from broker.core.auth import Identity
from broker.core.hub import Hub, Run, Subscription
from broker.core.model import Message
from broker.errors import Forbidden

_ids = itertools.count(1)


class Sub:
    """A connection as the hub sees it."""

    def __init__(self, user: str) -> None:
        self.id = next(_ids)
        self.identity = Identity(id=user, name=user)

    def deliver(self, message: Message) -> None:
        pass

    def deliver_run(self, run: Run) -> None:
        pass

    def send(self, frame: bytes) -> None:
        pass


def _pattern(i: int) -> str:
    """The i-th of the 65,536 patterns ``{a,+}^16/b``."""
    return "/".join("+" if i >> b & 1 else "a" for b in range(16)) + "/b"


def test_the_budget_counts_distinct_patterns_over_all_of_a_users_connections() -> None:
    hub = Hub()
    hub.max_user_patterns = 3
    a, b, other = Sub("u"), Sub("u"), Sub("v")
    for p in ("x/+", "y/+", "z/#"):
        hub.subscribe(a, Subscription(p))
    # The same patterns on another connection of the user are free; a new one is not.
    hub.subscribe(b, Subscription("x/+"))
    with pytest.raises(Forbidden, match="3 per user"):
        hub.subscribe(b, Subscription("w/+"))
    # Exact topics cost no walk and are not counted; another user has a budget of its own.
    hub.subscribe(b, Subscription("w/1"))
    hub.subscribe(other, Subscription("w/+"))
    # Subscribing again to a held pattern (a new 'last', say) is a replacement.
    hub.subscribe(a, Subscription("x/+"))
    assert hub.user_patterns("u") == 3
    hub.unsubscribe(a, "y/+")
    hub.subscribe(b, Subscription("w/+"))
    # x/+ is still held by b after a lets go of it; closing both frees everything.
    hub.unsubscribe(a, "x/+")
    assert hub.user_patterns("u") == 3
    hub.detach(a)
    hub.detach(b)
    assert hub.user_patterns("u") == 0


def test_many_connections_of_one_user_cannot_grow_the_walk() -> None:
    hub = Hub()
    hub.max_user_patterns = 1000
    refused = 0
    for c in range(66):  # 66 connections x 1,000 patterns each, as issue 27's row 1
        conn = Sub("evil")
        for i in range(c * 1000, (c + 1) * 1000):
            try:
                hub.subscribe(conn, Subscription(_pattern(i % 65_536)))
            except Forbidden:
                refused += 1
    assert hub.user_patterns("evil") == 1000 and refused > 64_000
    before = hub.index.visits
    hub.index.match("/".join(["a"] * 17))
    hub.index.match("/".join(["a"] * 16 + ["x"]))
    # Unbounded, the two walks visited 131,071 nodes each.
    assert hub.index.visits - before < 2 * 20_000
