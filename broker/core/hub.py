"""The hub: who is subscribed to what on this node, presence, and fan-out.

No sockets here: a subscriber is anything with an ``identity``, ``deliver(message)``,
``deliver_run(run)`` and ``send(frame)`` (the server's ``Session``). ``fanout`` finds
subscribers through the ``TopicIndex`` (never by scanning every subscription) and hands
each the same encoded frame; it never awaits.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from broker.core.auth import Identity
from broker.core.model import Draft, Message
from broker.core.protocol import encode_presence_event
from broker.core.topics import INBOX_PREFIX, TopicIndex, inbox_owner, is_pattern
from broker.errors import Forbidden

_INBOX = INBOX_PREFIX + "/"
# Topics a replay filter remembers at once (a replay's topics, usually a handful).
_FLOOR_CACHE = 4096

PresenceListener = Callable[[str, str, dict[str, str]], None]


class Subscriber(Protocol):
    """What the hub needs from a connection."""

    identity: Identity
    id: int

    def deliver(self, message: Message) -> None:
        """Queue a live message for this connection."""

    def deliver_run(self, run: Run) -> None:
        """Queue several live messages of one topic, in order: ``deliver`` for each."""

    def send(self, frame: bytes) -> None:
        """Queue a protocol frame (replies, presence events)."""


def _floor(sub: Subscription, topic: str) -> int:
    """The seq after which ``sub`` has delivered every message of ``topic``."""
    mark = sub.covered_from
    if sub.covered_topics:
        mark = min(mark, sub.covered_topics.get(topic, mark))
    return mark


class Run:
    """Consecutive committed messages of one topic, which go to the same connections: a
    connection takes them in one ``deliver_run`` call, so a busy topic's fan-out costs a
    call per connection per batch rather than per message. ``wires`` are the messages'
    frames and ``size`` their bytes, computed once for every connection."""

    __slots__ = ("messages", "size", "wires")

    def __init__(self, messages: list[Message]) -> None:
        self.messages = messages
        self.wires = [m.wire for m in messages]
        self.size = sum(map(len, self.wires))


@dataclass
class Subscription:
    """One pattern held by one connection."""

    pattern: str
    presence: bool = False
    #: Every matching message with a larger seq has reached the connection through this
    #: subscription (live or replay): used to skip duplicates when another one replays.
    covered_from: int = 0
    #: Per topic, a lower mark than ``covered_from``: a ``latest`` replay delivered each
    #: topic's latest message, so from it on that topic is covered (None: no such topic).
    covered_topics: dict[str, int] | None = None
    #: Counted in presence (join/leave, the ``presence`` op): not for an anonymous
    #: connection, nor on a topic whose namespace turns presence off.
    present: bool = True

    @property
    def exact(self) -> bool:
        return not is_pattern(self.pattern)


@dataclass(slots=True)
class _Present:
    """A user subscribed to a topic on this node: display name and connection count."""

    name: str
    connections: int = 1


class Hub:
    """Subscriptions of this node's connections, presence per topic, and fan-out."""

    def __init__(self, on_presence: PresenceListener | None = None) -> None:
        #: Called with ("join"|"leave", topic, user) when a user's first local
        #: subscription to a topic appears or their last one goes. By default the hub
        #: announces it to local watchers; a cluster first makes it cluster-wide.
        self.on_presence: PresenceListener = on_presence or self.announce
        self.index: TopicIndex[Subscriber] = TopicIndex()
        self.subscriptions: dict[Subscriber, dict[str, Subscription]] = {}
        #: The highest seq fanned out on this node.
        self.last_seq = 0
        # topic -> user id -> the user's name and connections subscribed to it
        self._present: dict[str, dict[str, _Present]] = {}
        # topic -> connections subscribed to exactly that topic with presence: true
        self._watchers: dict[str, set[Subscriber]] = {}
        self.delivered = 0
        #: Called with the seconds each ``fanout`` call took (metrics), when set.
        self.observe_fanout: Callable[[float], None] | None = None
        #: Called with (topic, user id) when a user present on a topic is renamed (a
        #: cluster rewrites its presence entry), when set.
        self.on_rename: Callable[[str, str], None] | None = None
        #: Distinct wildcard patterns one user's connections may hold together (None: no
        #: bound). A walk of the index costs up to the nodes of every wildcard pattern
        #: that follows the topic's levels, matching or not: this bounds one user's share
        #: of that, however many connections they open. Exact topics cost no walk.
        self.max_user_patterns: int | None = None
        # user id -> wildcard pattern -> connections of the user holding it
        self._user_patterns: dict[str, dict[str, int]] = {}

    # -- subscriptions ---------------------------------------------------------------

    def attach(self, conn: Subscriber) -> None:
        """Start tracking a connection (after authentication)."""
        self.subscriptions.setdefault(conn, {})

    def subscribe(self, conn: Subscriber, sub: Subscription) -> Subscription | None:
        """Add or replace ``conn``'s subscription to ``sub.pattern``; return the old one."""
        subs = self.subscriptions.setdefault(conn, {})
        old = subs.get(sub.pattern)
        exact = sub.exact
        if not exact and old is None:
            self._hold_pattern(conn.identity.id, sub.pattern)
        if old is not None:
            self._forget(conn, old, announce=False, release=False)
        subs[sub.pattern] = sub
        self.index.add(sub.pattern, conn)
        if exact:
            if sub.presence:
                self._watchers.setdefault(sub.pattern, set()).add(conn)
            # ``present`` follows from the connection and the topic: the same as old's.
            if old is None and sub.present:
                self._join(conn, sub.pattern)
        return old

    def unsubscribe(self, conn: Subscriber, pattern: str) -> bool:
        """Drop ``conn``'s subscription to ``pattern``; False when there was none."""
        sub = self.subscriptions.get(conn, {}).pop(pattern, None)
        if sub is None:
            return False
        self._forget(conn, sub, announce=True)
        return True

    def detach(self, conn: Subscriber, budget: int | None = None) -> bool:
        """Drop the subscriptions of a closed connection, at most ``budget`` of them
        (None: all); True once it holds none. A caller with a huge one calls again on
        later loop turns rather than stall every other connection."""
        subs = self.subscriptions.get(conn)
        if subs is None:
            return True
        left = len(subs) if budget is None else budget
        while subs and left > 0:
            _, sub = subs.popitem()
            self._forget(conn, sub, announce=True)
            left -= 1
        if subs:
            return False
        del self.subscriptions[conn]
        return True

    def _hold_pattern(self, user: str, pattern: str) -> None:
        """Count a connection of ``user`` holding wildcard ``pattern``; raise ``Forbidden``
        when it is a new pattern for the user past ``max_user_patterns``."""
        held = self._user_patterns.get(user)
        if held is None:
            held = self._user_patterns[user] = {}
        count = held.get(pattern, 0)
        limit = self.max_user_patterns
        if not count and limit is not None and len(held) >= limit:
            if not held:
                del self._user_patterns[user]
            raise Forbidden(f"wildcard pattern limit reached ({limit} per user)")
        held[pattern] = count + 1

    def _release_pattern(self, user: str, pattern: str) -> None:
        held = self._user_patterns.get(user)
        if held is None or pattern not in held:
            return
        left = held[pattern] - 1
        if left:
            held[pattern] = left
        else:
            del held[pattern]
            if not held:
                del self._user_patterns[user]

    def user_patterns(self, user: str) -> int:
        """Distinct wildcard patterns ``user``'s connections hold on this node."""
        return len(self._user_patterns.get(user, ()))

    def _forget(
        self, conn: Subscriber, sub: Subscription, announce: bool, release: bool = True
    ) -> None:
        self.index.remove(sub.pattern, conn)
        if not sub.exact:
            if release:
                self._release_pattern(conn.identity.id, sub.pattern)
            return
        watchers = self._watchers.get(sub.pattern)
        if watchers is not None:
            watchers.discard(conn)
            if not watchers:
                del self._watchers[sub.pattern]
        if announce and sub.present:
            self._leave(conn, sub.pattern)

    # -- presence --------------------------------------------------------------------

    def _join(self, conn: Subscriber, topic: str) -> None:
        users = self._present.setdefault(topic, {})
        ident = conn.identity
        entry = users.get(ident.id)
        if entry is None:
            users[ident.id] = _Present(ident.name)
            self.on_presence("join", topic, ident.user_json())
        else:
            entry.connections += 1

    def _leave(self, conn: Subscriber, topic: str) -> None:
        users = self._present.get(topic)
        ident = conn.identity
        if users is None or ident.id not in users:
            return
        entry = users[ident.id]
        entry.connections -= 1
        if entry.connections <= 0:
            del users[ident.id]
            if not users:
                del self._present[topic]
            self.on_presence("leave", topic, ident.user_json())

    def rename(self, conn: Subscriber, name: str) -> None:
        """``conn``'s user is now called ``name`` (a refreshed token): presence shows it."""
        for pattern, sub in self.subscriptions.get(conn, {}).items():
            if sub.exact:
                entry = self._present.get(pattern, {}).get(conn.identity.id)
                if entry is not None and entry.name != name:
                    entry.name = name
                    if self.on_rename is not None:
                        self.on_rename(pattern, conn.identity.id)

    def announce(self, op: str, topic: str, user: dict[str, str]) -> None:
        """Send a ``join``/``leave`` for ``user`` to this node's watchers of ``topic``
        (never to the user's own connections)."""
        watchers = self._watchers.get(topic)
        if not watchers:
            return
        frame = encode_presence_event(op, topic, user)
        for conn in watchers:
            if conn.identity.id != user["id"]:
                conn.send(frame)

    def presence(self, topic: str) -> list[dict[str, object]]:
        """Users subscribed to exactly ``topic`` on this node, with connection counts."""
        users = self._present.get(topic, {})
        return [
            {"id": uid, "name": entry.name, "connections": entry.connections}
            for uid, entry in sorted(users.items())
        ]

    # -- fan-out ---------------------------------------------------------------------

    def fanout(self, committed: list[tuple[Message, Draft]]) -> None:
        """Deliver committed messages, in seq order, to every matching connection."""
        started = time.perf_counter()
        match = self.index.match
        delivered = 0
        n = len(committed)
        i = 0
        while i < n:
            msg, draft = committed[i]
            i += 1
            if msg.seq <= self.last_seq:
                continue  # already fanned out (cluster redelivery)
            topic = msg.topic
            # The messages right after it on the same topic, in seq order, make one run.
            last = msg.seq
            j = i
            while j < n and committed[j][0].topic == topic and committed[j][0].seq > last:
                last = committed[j][0].seq
                j += 1
            if j > i:
                batch = [(msg, draft), *committed[i:j]]
                i = j
            else:
                batch = [(msg, draft)]
            self.last_seq = last
            targets = match(topic)
            if targets:
                owner = inbox_owner(topic) if topic.startswith(_INBOX) else None
                delivered += self._deliver(targets, batch, owner)
        self.delivered += delivered
        if self.observe_fanout is not None:
            self.observe_fanout(time.perf_counter() - started)

    @staticmethod
    def _deliver(
        targets: set[Subscriber],
        batch: list[tuple[Message, Draft]],
        owner: str | None,
    ) -> int:
        """Hand one topic's messages to ``targets`` (only the inbox owner's connections for
        an inbox), each but to the connection that published it (unless echoed); the
        number of deliveries."""
        delivered = 0
        if len(batch) == 1:
            msg, draft = batch[0]
            origin = 0 if draft.echo else draft.origin
            if owner is None:
                for conn in targets:
                    if conn.id != origin:
                        conn.deliver(msg)
                        delivered += 1
                return delivered
            for conn in targets:
                if conn.id != origin and conn.identity.id == owner:
                    conn.deliver(msg)
                    delivered += 1
            return delivered
        origins = [0 if draft.echo else draft.origin for _, draft in batch]
        senders = set(origins)
        run = Run([msg for msg, _ in batch])
        count = len(batch)
        for conn in targets:
            if owner is not None and conn.identity.id != owner:
                continue
            if conn.id not in senders:
                conn.deliver_run(run)
                delivered += count
                continue
            for (msg, _), origin in zip(batch, origins):  # its own messages are skipped
                if conn.id != origin:
                    conn.deliver(msg)
                    delivered += 1
        return delivered

    def replay_filter(self, conn: Subscriber, besides: str) -> Callable[[str, int], bool]:
        """A test for the messages a replay to ``conn``'s subscription ``besides`` should
        skip: ``covered(topic, seq)`` is True when ``conn`` already got message ``seq`` on
        ``topic`` through another of its subscriptions.

        Each topic costs one walk of ``conn``'s own paths in the index, the first time it
        is asked about; every later message on it is a dict lookup. This relies on the
        connection's subscriptions not changing during the replay (the server handles a
        connection's requests one at a time)."""
        subs = self.subscriptions.get(conn, {})
        floors: dict[str, int | None] = {}
        patterns = self.index.matching_patterns

        def covered(topic: str, seq: int) -> bool:
            try:
                floor = floors[topic]
            except KeyError:
                if len(floors) >= _FLOOR_CACHE:
                    floors.clear()
                marks = [
                    _floor(subs[p], topic)
                    for p in patterns(topic, conn)
                    if p != besides and p in subs
                ]
                floor = floors[topic] = min(marks) if marks else None
            return floor is not None and seq > floor

        return covered
