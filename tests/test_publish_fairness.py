"""Back-pressure shares the store's queue fairly: when many connections flood publishes,
those with more than a fair share waiting are paused, and a connection with a publish or
two in flight never is (in-process, fake connections)."""

from __future__ import annotations

from typing import Any, cast

from broker.server.backpressure import Backpressure


class FakeTransport:
    def __init__(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


class FakeConn:
    def __init__(self) -> None:
        self.transport = FakeTransport()


class FakeSession:
    """What back-pressure needs from a session."""

    def __init__(self) -> None:
        self.conn = FakeConn()
        self.closing = False
        self.backlog = None

    @property
    def reading(self) -> bool:
        return self.conn.transport.reading


def _bp() -> Backpressure:
    # Per connection and in bytes: far from reached here.
    return Backpressure(1000, 1 << 30, 1 << 40, max_waiting=200)


def test_floods_are_paused_past_their_share_and_a_calm_client_is_not() -> None:
    bp = _bp()
    floods = [FakeSession() for _ in range(32)]
    calm = FakeSession()
    accepted = {id(f): 0 for f in floods}
    # Each flooder sends as long as it is read; the calm client has one in flight.
    for _ in range(100):
        for f in floods:
            if f.reading:
                bp.accepted(cast(Any, f), 100)
                accepted[id(f)] += 1
    bp.accepted(cast(Any, calm), 100)
    assert calm.reading
    assert not any(f.reading for f in floods)
    # The queue stays near the global bound, not 32 x the per-connection one (1,000).
    assert bp.count <= 200 + 32
    assert max(accepted.values()) <= 200 // 32 + 2
    # Recorded, the floods go on once the queue is short again.
    for f in floods:
        for _ in range(accepted[id(f)]):
            bp.recorded(cast(Any, f), 100)
    bp.recorded(cast(Any, calm), 100)
    assert bp.count == 0
    assert all(f.reading for f in floods)


def test_one_connection_alone_keeps_its_own_bound() -> None:
    bp = _bp()
    one = FakeSession()
    for _ in range(999):
        bp.accepted(cast(Any, one), 10)
    # Past the global count but alone: paused (its share), resumed as it drains.
    assert not one.reading
    for _ in range(999):
        bp.recorded(cast(Any, one), 10)
    assert one.reading
