"""Topics and MQTT-style patterns: validation, matching, ACL coverage, inboxes, the index.

Pure functions and one data structure, no I/O. A topic is 1 to 255 bytes of UTF-8 split
into levels by ``/``; a pattern may use ``+`` (exactly one level) and ``#`` (the whole last
level, zero or more levels). Topics under ``user/<id>`` are that user's inbox.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

from broker.errors import BadRequest

MAX_TOPIC_BYTES = 255
INBOX_PREFIX = "user"

_FORBIDDEN_CHARS = frozenset(
    [chr(c) for c in range(0x20)] + [chr(0x7F)] + [chr(c) for c in range(0x80, 0xA0)]
)


def _check_text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a string")
    if not value:
        raise BadRequest(f"{what} must not be empty")
    if value.isascii() and value.isprintable():
        # The usual topic: one byte a character, all of them from space to '~' (none of
        # the forbidden ones), found by two scans in C instead of a set lookup a character.
        if len(value) > MAX_TOPIC_BYTES:
            raise BadRequest(f"{what} is longer than {MAX_TOPIC_BYTES} bytes")
        return value
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadRequest(f"{what} contains a lone surrogate") from None
    if size > MAX_TOPIC_BYTES:
        raise BadRequest(f"{what} is longer than {MAX_TOPIC_BYTES} bytes")
    if not _FORBIDDEN_CHARS.isdisjoint(value):
        raise BadRequest(f"{what} contains a control character")
    return value


def validate_topic(topic: object) -> str:
    """Return ``topic`` if it is a valid topic to publish to, else raise ``BadRequest``."""
    _check_text(topic, "topic")
    assert isinstance(topic, str)
    if "+" in topic or "#" in topic:
        raise BadRequest("a topic cannot contain '+' or '#' (publishing to a pattern?)")
    return topic


def validate_pattern(pattern: object) -> str:
    """Return ``pattern`` if it is a valid subscription pattern, else raise ``BadRequest``."""
    _check_text(pattern, "pattern")
    assert isinstance(pattern, str)
    levels = pattern.split("/")
    for i, level in enumerate(levels):
        if level in ("+", "#"):
            if level == "#" and i != len(levels) - 1:
                raise BadRequest("'#' must be the last level of a pattern")
        elif "+" in level or "#" in level:
            raise BadRequest("'+' and '#' must fill a whole level")
    return pattern


def is_pattern(pattern: str) -> bool:
    """True when ``pattern`` holds a wildcard level (it may match more than one topic)."""
    return any(level in ("+", "#") for level in pattern.split("/"))


def matches(pattern: str, topic: str) -> bool:
    """True when the (valid) ``pattern`` matches the (valid) ``topic``."""
    plevels = pattern.split("/")
    tlevels = topic.split("/")
    if topic.startswith("$") and plevels[0] in ("+", "#"):
        return False
    for i, p in enumerate(plevels):
        if p == "#":
            return True
        if i >= len(tlevels):
            return False
        if p != "+" and p != tlevels[i]:
            return False
    return len(plevels) == len(tlevels)


def covers(acl_pattern: str, pattern: str) -> bool:
    """True when every topic ``pattern`` can match is matched by ``acl_pattern``."""
    alevels = acl_pattern.split("/")
    plevels = pattern.split("/")
    if plevels[0].startswith("$") and alevels[0] in ("+", "#"):
        return False
    for i, a in enumerate(alevels):
        if a == "#":
            return True
        if i >= len(plevels):
            return False
        p = plevels[i]
        if p == "#":
            return False
        if a != "+" and a != p:
            return False
    return len(alevels) == len(plevels)


def inbox_owner(topic: str) -> str | None:
    """The user id whose inbox holds ``topic`` (``user/<id>`` or below), else None."""
    if not topic.startswith(INBOX_PREFIX + "/"):
        return None
    owner = topic.split("/", 2)[1]
    return owner or None


def pattern_inbox_owner(pattern: str) -> str | None:
    """The user id named literally by a pattern's inbox level (``user/42/#``), else None."""
    owner = inbox_owner(pattern)
    return None if owner in ("+", "#") else owner


T = TypeVar("T")


def _has_wildcard(levels: list[str]) -> bool:
    return "+" in levels or "#" in levels


class _Node(Generic[T]):
    __slots__ = ("below", "children", "hash", "here")

    def __init__(self) -> None:
        self.children: dict[str, _Node[T]] = {}
        # Subscribers whose pattern ends exactly at this node.
        self.here: set[T] = set()
        # Subscribers whose pattern ends with '#' right below this node.
        self.hash: set[T] = set()
        # Every subscriber with a pattern in this subtree, with how many: a walk skips a
        # subtree whose subscribers were all found already.
        self.below: dict[T, int] = {}


class TopicIndex(Generic[T]):
    """Map patterns to subscribers so that a publish finds its subscribers by walking the
    topic's levels, never by scanning every subscription.

    ``T`` is whatever identifies a subscriber (the server uses connections). A subscriber
    holds a pattern at most once; adding it again is a no-op.

    A walk never enters a subtree whose subscribers it has all found already, so patterns
    that overlap (``a/+/+``, ``a/a/+``, ``+/a/a``, ... held by one connection) cost one
    path, not one per pattern: the work of ``match`` grows with the subscribers it finds
    and the depth of the topic, not with how many patterns each of them holds. ``visits``
    counts the nodes entered, for tests and benchmarks.

    A topic that no wildcard pattern can match (none starts with its first level, ``+``
    or ``#``) skips the walk: its subscribers are one dict lookup.
    """

    def __init__(self) -> None:
        self._root: _Node[T] = _Node()
        self._count = 0
        self._patterns = 0
        # Exact pattern -> its node's ``here`` set (the same object), while non-empty.
        self._exact: dict[str, set[T]] = {}
        # First level of wildcard patterns ('+' and '#' included) -> how many are held.
        self._wild: dict[str, int] = {}
        #: Nodes entered by ``match`` and ``matching_patterns`` since the index was made.
        self.visits = 0

    def __len__(self) -> int:
        return self._count

    @property
    def pattern_count(self) -> int:
        """Distinct patterns with at least one subscriber (kept up to date, not counted)."""
        return self._patterns

    def add(self, pattern: str, subscriber: T) -> None:
        """Register ``subscriber`` for ``pattern``."""
        node = self._root
        path = [node]
        levels = pattern.split("/")
        for level in levels[:-1]:
            node = node.children.setdefault(level, _Node())
            path.append(node)
        last = levels[-1]
        if last == "#":
            bucket = node.hash
        else:
            node = node.children.setdefault(last, _Node())
            path.append(node)
            bucket = node.here
        if subscriber in bucket:
            return
        if not bucket:
            self._patterns += 1
            if bucket is node.here and not _has_wildcard(levels):
                self._exact[pattern] = bucket
        bucket.add(subscriber)
        self._count += 1
        if _has_wildcard(levels):
            wild = self._wild
            wild[levels[0]] = wild.get(levels[0], 0) + 1
        for step in path:
            below = step.below
            below[subscriber] = below.get(subscriber, 0) + 1

    def remove(self, pattern: str, subscriber: T) -> None:
        """Drop ``subscriber`` from ``pattern`` (no-op when absent); prune empty nodes."""
        levels = pattern.split("/")
        path: list[tuple[_Node[T], str]] = []
        node = self._root
        for level in levels[:-1]:
            child = node.children.get(level)
            if child is None:
                return
            path.append((node, level))
            node = child
        last = levels[-1]
        if last == "#":
            bucket = node.hash
        else:
            child = node.children.get(last)
            if child is None:
                return
            path.append((node, last))
            node = child
            bucket = node.here
        if subscriber not in bucket:
            return
        bucket.discard(subscriber)
        self._count -= 1
        if not bucket:
            self._patterns -= 1
            if self._exact.get(pattern) is bucket:
                del self._exact[pattern]
        if _has_wildcard(levels):
            wild = self._wild
            left = wild[levels[0]] - 1
            if left:
                wild[levels[0]] = left
            else:
                del wild[levels[0]]
        for step in [parent for parent, _ in path] + [node]:
            below = step.below
            left = below[subscriber] - 1
            if left:
                below[subscriber] = left
            else:
                del below[subscriber]
        while path and not (node.here or node.hash or node.children):
            parent, level = path.pop()
            del parent.children[level]
            node = parent

    def match(self, topic: str) -> set[T]:
        """The subscribers with at least one pattern matching ``topic`` (each once)."""
        roots = self._wild
        if not roots or not ("+" in roots or "#" in roots or topic.partition("/")[0] in roots):
            exact = self._exact.get(topic)
            # A copy: a delivery may close a connection, which unsubscribes it.
            return set(exact) if exact else set()
        found: set[T] = set()
        levels = topic.split("/")
        n = len(levels)
        dollar = topic.startswith("$")
        # Depth-first over (node, depth) pairs; MQTT topics are shallow, so a small
        # explicit stack beats recursion.
        stack: list[tuple[_Node[T], int]] = [(self._root, 0)]
        visits = 0
        while stack:
            node, depth = stack.pop()
            below = node.below
            if len(below) <= len(found) and found.issuperset(below):
                continue  # nobody new down there
            visits += 1
            wild = not (dollar and depth == 0)
            if node.hash and wild:
                found |= node.hash
            if depth == n:
                found |= node.here
                continue
            children = node.children
            if wild:
                plus = children.get("+")
                if plus is not None:
                    stack.append((plus, depth + 1))
            child = children.get(levels[depth])
            if child is not None:
                stack.append((child, depth + 1))
        self.visits += visits
        return found

    def matching_patterns(self, topic: str, subscriber: T) -> list[str]:
        """``subscriber``'s patterns that match ``topic``: a walk of its own paths only."""
        found: list[str] = []
        levels = topic.split("/")
        n = len(levels)
        dollar = topic.startswith("$")
        stack: list[tuple[_Node[T], int, str]] = [(self._root, 0, "")]
        visits = 0
        while stack:
            node, depth, prefix = stack.pop()
            if subscriber not in node.below:
                continue
            visits += 1
            wild = not (dollar and depth == 0)
            if wild and subscriber in node.hash:
                found.append(prefix + "#")
            if depth == n:
                if subscriber in node.here:
                    found.append(prefix[:-1])
                continue
            children = node.children
            for level in (levels[depth], "+") if wild else (levels[depth],):
                child = children.get(level)
                if child is not None:
                    stack.append((child, depth + 1, prefix + level + "/"))
        self.visits += visits
        return found

    def patterns(self) -> Iterator[tuple[str, set[T]]]:
        """Every pattern in the index with its subscribers (for tests; a full walk)."""

        def walk(node: _Node[T], prefix: list[str]) -> Iterator[tuple[str, set[T]]]:
            if node.hash:
                yield "/".join([*prefix, "#"]), node.hash
            for level, child in node.children.items():
                if child.here:
                    yield "/".join([*prefix, level]), child.here
                yield from walk(child, [*prefix, level])

        yield from walk(self._root, [])


def any_covers(acl: Iterable[str], pattern: str) -> bool:
    """True when one of the ``acl`` patterns covers ``pattern``."""
    return any(covers(a, pattern) for a in acl)
