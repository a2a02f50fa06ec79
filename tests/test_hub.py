"""broker.core.hub.Hub in-process: subscriptions, presence and fan-out, with fake
subscribers (no sockets, no event loop)."""

from __future__ import annotations

import itertools

import orjson
import pytest

from broker.core.auth import Identity
from broker.core.hub import Hub, Run, Subscription
from broker.core.model import Draft, Message

_ids = itertools.count(1)
_seqs = itertools.count(1)


class FakeSubscriber:
    """A connection as the hub sees it: records what it is handed."""

    def __init__(self, user: str, name: str | None = None) -> None:
        self.id = next(_ids)
        self.identity = Identity(id=user, name=name or user)
        self.messages: list[Message] = []
        self.frames: list[dict[str, object]] = []
        self.runs: list[list[int]] = []  # the seqs of each deliver_run call

    def deliver(self, message: Message) -> None:
        self.messages.append(message)

    def deliver_run(self, run: Run) -> None:
        self.messages += run.messages
        self.runs.append([m.seq for m in run.messages])

    def send(self, frame: bytes) -> None:
        self.frames.append(orjson.loads(frame))

    def seqs(self) -> list[int]:
        return [m.seq for m in self.messages]


Event = tuple[str, str, dict[str, str]]


@pytest.fixture
def events() -> list[Event]:
    return []


@pytest.fixture
def hub(events: list[Event]) -> Hub:
    """A hub that records presence changes and still announces them to local watchers."""
    hub = Hub()

    def listener(op: str, topic: str, user: dict[str, str]) -> None:
        events.append((op, topic, user))
        hub.announce(op, topic, user)

    hub.on_presence = listener
    return hub


def committed(
    topic: str, sender: FakeSubscriber | None = None, echo: bool = False
) -> tuple[Message, Draft]:
    """One committed message on ``topic`` from ``sender`` (the server when None)."""
    who = sender.identity if sender is not None else Identity(id="server", name="server")
    draft = Draft(
        topic=topic,
        payload=b'"x"',
        sender_id=who.id,
        sender_name=who.name,
        ts=0,
        origin=sender.id if sender is not None else 0,
        echo=echo,
    )
    return draft.to_message(next(_seqs)), draft


def publish(
    hub: Hub, topic: str, sender: FakeSubscriber | None = None, *, echo: bool = False
) -> Message:
    """Fan out one committed message on ``topic`` from ``sender``; return it."""
    message, draft = committed(topic, sender, echo)
    hub.fanout([(message, draft)])
    return message


def sub(hub: Hub, conn: FakeSubscriber, pattern: str, presence: bool = False) -> None:
    hub.attach(conn)
    hub.subscribe(conn, Subscription(pattern, presence=presence))


# -- subscriptions ---------------------------------------------------------------------


def test_subscribe_then_fanout_reaches_matching_patterns_only(hub: Hub) -> None:
    exact, plus, hash_, other = (FakeSubscriber(u) for u in "abcd")
    sub(hub, exact, "scores/uk")
    sub(hub, plus, "scores/+")
    sub(hub, hash_, "scores/#")
    sub(hub, other, "news/#")
    m = publish(hub, "scores/uk")
    assert exact.seqs() == plus.seqs() == hash_.seqs() == [m.seq]
    assert other.seqs() == []
    assert hub.delivered == 3


def test_overlapping_subscriptions_deliver_once(hub: Hub) -> None:
    conn = FakeSubscriber("a")
    for pattern in ("t/x", "t/+", "t/#", "#"):
        sub(hub, conn, pattern)
    m = publish(hub, "t/x")
    assert conn.seqs() == [m.seq]
    assert hub.delivered == 1


def test_replacing_a_subscription_returns_the_old_one_and_keeps_one_entry(
    hub: Hub, events: list[Event]
) -> None:
    conn = FakeSubscriber("a")
    first = Subscription("room")
    hub.attach(conn)
    assert hub.subscribe(conn, first) is None
    assert hub.subscribe(conn, Subscription("room", presence=True)) is first
    assert list(hub.subscriptions[conn]) == ["room"]
    # Replacing is not leaving and joining again.
    assert [e[0] for e in events] == ["join"]
    assert hub.presence("room") == [{"id": "a", "name": "a", "connections": 1}]
    publish(hub, "room")
    assert len(conn.messages) == 1


def test_unsubscribe_stops_delivery(hub: Hub) -> None:
    conn = FakeSubscriber("a")
    sub(hub, conn, "t/+")
    assert hub.unsubscribe(conn, "t/+") is True
    assert hub.unsubscribe(conn, "t/+") is False  # not subscribed any more
    assert hub.unsubscribe(conn, "never") is False
    publish(hub, "t/1")
    assert conn.messages == [] and hub.delivered == 0


def test_detach_drops_everything_within_a_budget(hub: Hub, events: list[Event]) -> None:
    conn = FakeSubscriber("a")
    topics = [f"t/{i}" for i in range(5)]
    for topic in topics:
        sub(hub, conn, topic)
    assert hub.detach(conn, budget=2) is False
    assert len(hub.subscriptions[conn]) == 3
    assert hub.detach(conn, budget=2) is False
    assert hub.detach(conn, budget=2) is True
    assert conn not in hub.subscriptions
    assert sorted(t for op, t, _ in events if op == "leave") == topics
    assert all(hub.presence(t) == [] for t in topics)
    publish(hub, "t/0")
    assert conn.messages == []
    assert hub.detach(conn) is True  # a second detach is harmless


# -- presence --------------------------------------------------------------------------


def test_presence_is_per_user_not_per_connection(hub: Hub, events: list[Event]) -> None:
    tab1, tab2 = FakeSubscriber("u", "Ann"), FakeSubscriber("u", "Ann")
    sub(hub, tab1, "room")
    sub(hub, tab2, "room")
    assert events == [("join", "room", {"id": "u", "name": "Ann"})]
    assert hub.presence("room") == [{"id": "u", "name": "Ann", "connections": 2}]
    hub.unsubscribe(tab1, "room")
    assert len(events) == 1  # one tab left: still present
    assert hub.presence("room") == [{"id": "u", "name": "Ann", "connections": 1}]
    hub.detach(tab2)
    assert events[1:] == [("leave", "room", {"id": "u", "name": "Ann"})]
    assert hub.presence("room") == []


def test_patterns_do_not_make_a_user_present(hub: Hub, events: list[Event]) -> None:
    conn = FakeSubscriber("a")
    sub(hub, conn, "room/+")
    sub(hub, conn, "#")
    assert events == []
    assert hub.presence("room/1") == []


def test_watchers_hear_joins_and_leaves_of_others_only(hub: Hub) -> None:
    watcher = FakeSubscriber("w")
    sub(hub, watcher, "room", presence=True)
    assert watcher.frames == []  # not told about its own join
    plain = FakeSubscriber("p")
    sub(hub, plain, "room")  # no presence: true, so never told
    other = FakeSubscriber("o", "Olga")
    sub(hub, other, "room")
    hub.unsubscribe(other, "room")
    assert watcher.frames == [
        {"op": "join", "topic": "room", "user": {"id": "p", "name": "p"}},
        {"op": "join", "topic": "room", "user": {"id": "o", "name": "Olga"}},
        {"op": "leave", "topic": "room", "user": {"id": "o", "name": "Olga"}},
    ]
    assert plain.frames == []
    # A second connection of the watcher's own user is not announced to it either.
    sub(hub, FakeSubscriber("w"), "room")
    assert len(watcher.frames) == 3


def test_rename_shows_in_presence(hub: Hub) -> None:
    conn = FakeSubscriber("a", "Old")
    sub(hub, conn, "room")
    hub.rename(conn, "New")
    assert hub.presence("room") == [{"id": "a", "name": "New", "connections": 1}]


# -- fan-out rules ---------------------------------------------------------------------


def test_publisher_gets_its_own_message_only_with_echo(hub: Hub) -> None:
    publisher, reader = FakeSubscriber("a"), FakeSubscriber("b")
    sub(hub, publisher, "t")
    sub(hub, reader, "t")
    quiet = publish(hub, "t", publisher)
    loud = publish(hub, "t", publisher, echo=True)
    assert publisher.seqs() == [loud.seq]
    assert reader.seqs() == [quiet.seq, loud.seq]
    assert hub.delivered == 3


def test_echo_is_per_connection_not_per_user(hub: Hub) -> None:
    publisher, same_user = FakeSubscriber("a"), FakeSubscriber("a")
    sub(hub, publisher, "t")
    sub(hub, same_user, "t")
    m = publish(hub, "t", publisher)
    assert publisher.seqs() == [] and same_user.seqs() == [m.seq]


def test_inbox_reaches_only_its_owner_whatever_the_pattern(hub: Hub) -> None:
    owner, snoop_hash, snoop_plus = (
        FakeSubscriber("bob"),
        FakeSubscriber("eve"),
        FakeSubscriber("mal"),
    )
    sub(hub, owner, "user/bob/#")
    sub(hub, snoop_hash, "#")
    sub(hub, snoop_plus, "user/+/+")
    sender = FakeSubscriber("alice")
    m = publish(hub, "user/bob/dm", sender)
    assert owner.seqs() == [m.seq]
    assert snoop_hash.seqs() == [] and snoop_plus.seqs() == []
    assert hub.delivered == 1
    # Ordinary topics still reach the wildcard subscribers.
    n = publish(hub, "users/bob", sender)
    assert snoop_hash.seqs() == [n.seq]


def test_fanout_skips_seqs_already_fanned_out(hub: Hub) -> None:
    conn = FakeSubscriber("a")
    sub(hub, conn, "t")
    draft = Draft(topic="t", payload=b"1", sender_id="s", sender_name="s", ts=0)
    first, second = draft.to_message(1_000_001), draft.to_message(1_000_002)
    hub.fanout([(first, draft), (second, draft)])
    hub.fanout([(first, draft), (second, draft)])  # a cluster redelivery
    assert conn.seqs() == [1_000_001, 1_000_002]
    assert hub.last_seq == 1_000_002 and hub.delivered == 2


def test_delivered_counts_every_subscriber_handed_a_message(hub: Hub) -> None:
    readers = [FakeSubscriber(f"r{i}") for i in range(7)]
    for reader in readers:
        sub(hub, reader, "wide/#")
    for _ in range(3):
        publish(hub, "wide/open")
    publish(hub, "nobody/listens")
    assert hub.delivered == 21
    assert all(len(r.messages) == 3 for r in readers)


def test_fanout_reports_its_duration(hub: Hub) -> None:
    seen: list[float] = []
    hub.observe_fanout = seen.append
    sub(hub, FakeSubscriber("a"), "t")
    publish(hub, "t")
    assert len(seen) == 1 and 0 <= seen[0] < 1


def test_a_batch_on_one_topic_reaches_each_subscriber_in_one_call_in_seq_order(
    hub: Hub,
) -> None:
    t_only, everything = FakeSubscriber("a"), FakeSubscriber("b")
    sub(hub, t_only, "t")
    sub(hub, everything, "#")
    batch = [committed(topic) for topic in ("t", "t", "u", "t", "t", "t")]
    seqs = [m.seq for m, _ in batch]
    hub.fanout(batch)
    # Consecutive messages of a topic are one run; another topic in between ends it.
    assert t_only.runs == [seqs[0:2], seqs[3:6]]
    assert t_only.seqs() == seqs[0:2] + seqs[3:6]
    assert everything.seqs() == seqs  # u alone came through deliver, in its place
    assert everything.runs == [seqs[0:2], seqs[3:6]]
    assert hub.delivered == 5 + 6
    assert hub.last_seq == seqs[-1]


def test_a_run_skips_each_connection_its_own_messages_unless_echoed(hub: Hub) -> None:
    alice, bob, watcher = FakeSubscriber("alice"), FakeSubscriber("bob"), FakeSubscriber("w")
    for conn in (alice, bob, watcher):
        sub(hub, conn, "room")
    batch = [
        committed("room", alice),
        committed("room", bob),
        committed("room", alice, echo=True),
        committed("room"),
    ]
    seqs = [m.seq for m, _ in batch]
    hub.fanout(batch)
    assert alice.seqs() == [seqs[1], seqs[2], seqs[3]]
    assert bob.seqs() == [seqs[0], seqs[2], seqs[3]]
    assert watcher.seqs() == seqs and watcher.runs == [seqs]
    assert hub.delivered == 3 + 3 + 4


def test_a_run_on_an_inbox_reaches_only_its_owner(hub: Hub) -> None:
    bob1, bob2, snoop = FakeSubscriber("bob"), FakeSubscriber("bob"), FakeSubscriber("eve")
    sub(hub, bob1, "user/bob")
    sub(hub, bob2, "user/+")
    sub(hub, snoop, "#")
    alice = FakeSubscriber("alice")
    batch = [committed("user/bob", alice), committed("user/bob", alice), committed("user/bob")]
    seqs = [m.seq for m, _ in batch]
    hub.fanout(batch)
    assert bob1.seqs() == seqs and bob2.seqs() == seqs
    assert snoop.seqs() == []
    assert hub.delivered == 6


def test_a_run_never_takes_a_message_already_fanned_out(hub: Hub) -> None:
    """A cluster may hand over a batch with an older seq after a newer one: the older
    one is skipped, not delivered inside the newer one's run."""
    conn = FakeSubscriber("a")
    sub(hub, conn, "t")
    first, second, third = committed("t"), committed("t"), committed("t")  # seqs ascending
    hub.fanout([second])
    hub.fanout([third, second, first])
    assert conn.seqs() == [second[0].seq, third[0].seq]
    assert hub.last_seq == third[0].seq


# -- cost: close in slices, de-duplication by lookup ----------------------------------------


class Conn:
    """A connection as the hub sees it; what it is sent does not matter here."""

    def __init__(self, cid: int, user: str) -> None:
        self.id = cid
        self.identity = Identity(id=user, name=user)

    def deliver(self, message: object) -> None:
        pass

    def deliver_run(self, run: object) -> None:
        pass

    def send(self, frame: bytes) -> None:
        pass


def test_detach_in_slices_leaves_others_and_announces_every_leave() -> None:
    leaves: list[str] = []
    hub = Hub(on_presence=lambda op, topic, user: leaves.append(topic) if op == "leave" else None)
    big, other = Conn(1, "big"), Conn(2, "other")
    for n in range(5000):
        hub.subscribe(big, Subscription(f"t/{n}"))
    hub.subscribe(other, Subscription("t/1"))
    rounds = 0
    while not hub.detach(big, 2000):
        rounds += 1
        assert len(hub.index) == 5001 - 2000 * rounds  # a slice at a time
    assert rounds == 2 and len(hub.index) == 1
    assert sorted(leaves) == sorted(f"t/{n}" for n in range(5000))
    assert hub.index.match("t/1") == {other} and big not in hub.subscriptions
    assert hub.index.pattern_count == 1


def test_replay_filter_looks_up_a_topic_once() -> None:
    hub = Hub()
    conn = Conn(1, "u")
    for n in range(1000):
        hub.subscribe(conn, Subscription(f"t/{n}", covered_from=100))
    hub.subscribe(conn, Subscription("a/+", covered_from=50))
    hub.subscribe(conn, Subscription("a/#", covered_from=0))
    covered = hub.replay_filter(conn, besides="a/#")
    hub.index.visits = 0
    assert [covered("a/x", seq) for seq in (10, 50, 51, 500)] == [False, False, True, True]
    first = hub.index.visits
    assert first <= 8, first  # the connection's own paths, not its 1,002 subscriptions
    assert not covered("b/x", 10**6)
    for seq in range(1000):
        covered("a/x", seq)
    assert hub.index.visits <= first + 8  # a/x was looked up once
