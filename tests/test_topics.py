"""Table-driven tests of the sans-I/O topic core: validation, matching, ACL coverage, index."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.core.topics import (
    TopicIndex,
    covers,
    inbox_owner,
    is_pattern,
    matches,
    pattern_inbox_owner,
    validate_pattern,
    validate_topic,
)
from broker.errors import BadRequest

from .support import overlapping_patterns

VALID_TOPICS = [
    "football",
    "scores/uk/premier",
    "a//b",
    "/",
    "a/",
    "$SYS/x",
    "é/ü",
    "x" * 255,
    "user/42",
]
INVALID_TOPICS = [
    ("", "empty"),
    ("x" * 256, "longer than 255"),
    ("é" * 128, "longer than 255"),  # 256 bytes
    ("a\x00b", "control"),
    ("a\nb", "control"),
    ("a\x7fb", "control"),
    ("a\x85b", "control"),  # C1
    ("a\ud800b", "surrogate"),
    ("a/+", "'+' or '#'"),
    ("a/#", "'+' or '#'"),
    ("a+b", "'+' or '#'"),
    (5, "string"),
    (None, "string"),
]


@pytest.mark.parametrize("topic", VALID_TOPICS)
def test_valid_topics(topic: str) -> None:
    assert validate_topic(topic) == topic


@pytest.mark.parametrize(("topic", "why"), INVALID_TOPICS)
def test_invalid_topics(topic: object, why: str) -> None:
    with pytest.raises(BadRequest, match=re.escape(why)):
        validate_topic(topic)


@pytest.mark.parametrize(
    "pattern", ["#", "+", "a/+/c", "a/#", "+/+", "a//+", "$SYS/#", "user/+/inbox"]
)
def test_valid_patterns(pattern: str) -> None:
    assert validate_pattern(pattern) == pattern


@pytest.mark.parametrize("pattern", ["a+b", "a/b#", "#/a", "a/#/b", "a/++", "", "a\x01"])
def test_invalid_patterns(pattern: str) -> None:
    with pytest.raises(BadRequest):
        validate_pattern(pattern)


MATCH_TABLE = [
    ("scores/+", "scores/uk", True),
    ("scores/+", "scores/uk/premier", False),
    ("scores/+", "scores", False),
    ("scores/#", "scores", True),
    ("scores/#", "scores/uk", True),
    ("scores/#", "scores/uk/premier", True),
    ("scores/#", "scoresx", False),
    ("#", "anything/at/all", True),
    ("+", "one", True),
    ("+", "one/two", False),
    ("+/+", "/x", True),
    ("a//b", "a//b", True),
    ("a/+/b", "a//b", True),
    ("football", "football", True),
    ("football", "Football", False),
    ("#", "$SYS/load", False),
    ("+/load", "$SYS/load", False),
    ("$SYS/#", "$SYS/load", True),
    ("$SYS/+", "$SYS/load", True),
    ("a/#", "a/", True),
    ("a/+", "a/", True),
]


@pytest.mark.parametrize(("pattern", "topic", "expected"), MATCH_TABLE)
def test_matches(pattern: str, topic: str, expected: bool) -> None:
    assert matches(pattern, topic) is expected


@pytest.mark.parametrize(("pattern", "topic", "expected"), MATCH_TABLE)
def test_index_agrees_with_matches(pattern: str, topic: str, expected: bool) -> None:
    index: TopicIndex[str] = TopicIndex()
    index.add(pattern, "s")
    assert (index.match(topic) == {"s"}) is expected


COVER_TABLE = [
    ("scores/#", "scores/+", True),
    ("scores/+", "scores/#", False),
    ("scores/#", "scores", True),
    ("scores/+", "scores", False),
    ("#", "anything/#", True),
    ("#", "$SYS/x", False),
    ("+", "a", True),
    ("+", "+", True),
    ("a", "+", False),
    ("a/+/c", "a/b/c", True),
    ("a/+/c", "a/+/c", True),
    ("a/+/c", "a/#", False),
    ("a/b", "a/b/c", False),
    ("a/b/c", "a/b", False),
    ("a/#", "a/+/+/#", True),
]


@pytest.mark.parametrize(("acl", "pattern", "expected"), COVER_TABLE)
def test_covers(acl: str, pattern: str, expected: bool) -> None:
    assert covers(acl, pattern) is expected


def test_inbox_owner() -> None:
    assert inbox_owner("user/42") == "42"
    assert inbox_owner("user/42/dm") == "42"
    assert inbox_owner("user") is None
    assert inbox_owner("users/42") is None
    assert inbox_owner("user/") is None
    assert pattern_inbox_owner("user/+") is None
    assert pattern_inbox_owner("user/#") is None
    assert pattern_inbox_owner("user/42/#") == "42"
    assert is_pattern("a/+") and is_pattern("#") and not is_pattern("a/b")


def test_index_add_remove_prunes() -> None:
    index: TopicIndex[str] = TopicIndex()
    index.add("a/b/c", "x")
    index.add("a/#", "y")
    index.add("a/+/c", "x")
    index.add("a/b/c", "x")  # duplicate: no-op
    assert len(index) == 3
    assert index.match("a/b/c") == {"x", "y"}
    index.remove("a/b/c", "x")
    assert index.match("a/b/c") == {"x", "y"}  # still through a/+/c
    index.remove("a/+/c", "x")
    index.remove("a/#", "y")
    index.remove("never/there", "z")
    assert len(index) == 0
    assert index.match("a/b/c") == set()
    assert index._root.children == {}  # empty nodes are pruned


level = st.sampled_from(["a", "b", "", "c"])
topic_st = st.lists(level, min_size=1, max_size=4).map("/".join)
pattern_st = st.lists(st.sampled_from(["a", "b", "", "+"]), min_size=1, max_size=4).flatmap(
    lambda levels: st.sampled_from(["/".join(levels), "/".join([*levels, "#"])])
)


@given(st.lists(pattern_st, min_size=1, max_size=8), topic_st)
def test_index_equals_brute_force(patterns: list[str], topic: str) -> None:
    index: TopicIndex[int] = TopicIndex()
    for i, p in enumerate(patterns):
        index.add(p, i)
    expected = {i for i, p in enumerate(patterns) if matches(p, topic)}
    assert index.match(topic) == expected


@given(pattern_st, pattern_st, topic_st)
def test_covers_is_sound(acl: str, pattern: str, topic: str) -> None:
    # If the ACL covers the pattern, no topic matched by the pattern escapes the ACL.
    if covers(acl, pattern) and matches(pattern, topic):
        assert matches(acl, topic)


def test_index_scales_without_scanning() -> None:
    # 10k exact subscriptions on distinct topics: a match touches only its own path.
    index: TopicIndex[int] = TopicIndex()
    for i in range(10_000):
        index.add(f"room/{i}", i)
    rng = random.Random(1)
    for _ in range(100):
        i = rng.randrange(10_000)
        assert index.match(f"room/{i}") == {i}


def test_index_exact_lookup_gives_way_to_patterns() -> None:
    # Exact topics skip the walk only while no wildcard pattern could match them.
    index: TopicIndex[str] = TopicIndex()
    index.add("room/1", "exact")
    index.add("room/1", "other")
    assert index.match("room/1") == {"exact", "other"}
    index.match("room/1").clear()  # the caller's copy, not the index's set
    assert index.match("room/1") == {"exact", "other"}
    for pattern in ("room/+", "room/#", "+/1", "#", "room/1/#"):
        index.add(pattern, "wild")
        assert index.match("room/1") == {"exact", "other", "wild"}, pattern
        assert index.match("room/2") == ({"wild"} if matches(pattern, "room/2") else set())
        index.remove(pattern, "wild")
        assert index.match("room/1") == {"exact", "other"}, pattern
        assert index.match("room/2") == set(), pattern
    index.add("lobby/+", "wild")  # another first level: room/1 is still a lookup
    assert index.match("room/1") == {"exact", "other"}
    assert index.match("lobby/x") == {"wild"}
    index.remove("room/1", "exact")
    index.remove("room/1", "other")
    assert index.match("room/1") == set()
    index.add("room/1", "again")  # a fresh node after pruning
    assert index.match("room/1") == {"again"}


@given(st.lists(st.tuples(st.booleans(), pattern_st, st.integers(0, 3)), max_size=24), topic_st)
def test_index_equals_brute_force_after_removals(
    ops: list[tuple[bool, str, int]], topic: str
) -> None:
    index: TopicIndex[int] = TopicIndex()
    held: set[tuple[str, int]] = set()
    for add, pattern, who in ops:
        if add:
            index.add(pattern, who)
            held.add((pattern, who))
        else:
            index.remove(pattern, who)
            held.discard((pattern, who))
        expected = {w for p, w in held if matches(p, topic)}
        assert index.match(topic) == expected
        assert len(index) == len(held)


# -- the index's cost: bounded by the subscribers found, not the patterns held ---------------


# -- the index, in process --------------------------------------------------------------


def test_overlapping_patterns_of_one_subscriber_cost_one_path() -> None:
    index: TopicIndex[str] = TopicIndex()
    for pattern in overlapping_patterns(14):
        index.add(pattern, "attacker")
    index.add("a/#", "victim")
    topic = "/".join(["a"] * 14)
    index.visits = 0
    assert index.match(topic) == {"attacker", "victim"}
    # A walk of every matching pattern would enter 2**15 nodes.
    assert index.visits <= 4 * 15, index.visits
    index.visits = 0
    assert index.match("a/b") == {"victim"}
    assert index.visits <= 8, index.visits


def test_visits_grow_with_subscribers_found_not_patterns_held() -> None:
    index: TopicIndex[int] = TopicIndex()
    for sub in range(50):
        for pattern in overlapping_patterns(8):
            index.add(pattern, sub)
    index.visits = 0
    assert index.match("a/a/a/a/a/a/a/a") == set(range(50))
    assert index.visits <= 2 * 9 + 9, index.visits  # the paths down, not 50 * 2**9


def test_pattern_count_is_kept_up_to_date() -> None:
    index: TopicIndex[int] = TopicIndex()
    for sub in (1, 2):
        for pattern in ("a", "a/+", "a/#", "b"):
            index.add(pattern, sub)
    assert index.pattern_count == 4 and len(index) == 8
    index.remove("a/#", 1)
    assert index.pattern_count == 4
    index.remove("a/#", 2)
    index.remove("a/#", 2)  # absent: no-op
    assert index.pattern_count == 3 and len(index) == 6
    assert index.pattern_count == len(list(index.patterns()))


def test_matching_patterns_walks_one_subscribers_paths() -> None:
    index: TopicIndex[int] = TopicIndex()
    mine = ["a/+", "a/#", "+/b", "#", "a/b", "x/y"]
    for pattern in mine:
        index.add(pattern, 1)
    for n in range(1000):
        index.add(f"a/{n}", 2)  # someone else's, under the same node
    found = index.matching_patterns("a/b", 1)
    assert sorted(found) == sorted(p for p in mine if matches(p, "a/b"))
    index.visits = 0
    index.matching_patterns("a/7", 1)
    assert index.visits <= 8, index.visits
    assert index.matching_patterns("$sys/b", 1) == []  # wildcards never match '$' topics
