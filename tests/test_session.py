"""broker.server.session: Session's queue and Flusher on a fake transport, in-process.

The fake transport records what is written and reports a write buffer that grows when its
peer does not read; nothing here opens a socket.
"""

from __future__ import annotations

import asyncio
import itertools

from broker.core.auth import Identity
from broker.core.hub import Hub, Run, Subscription
from broker.core.model import Draft, Message, text_frame
from broker.errors import CLOSE_SLOW_CONSUMER, CLOSE_UNAUTHORIZED
from broker.server.journal import Journal
from broker.server.session import Flusher, Session
from broker.store.memory import MemoryStore

_seqs = itertools.count(1)


class FakeTransport:
    """The part of ``asyncio.Transport`` a session uses. With ``reads`` False the peer
    reads nothing, so everything written stays in the write buffer."""

    def __init__(self, reads: bool = True) -> None:
        self.reads = reads
        self.writes: list[list[bytes]] = []  # one entry per write/writelines call
        self.buffered = 0
        self.high_water: int | None = None
        self.paused = False

    def write(self, data: bytes) -> None:
        self.writelines([data])

    def writelines(self, chunks: list[bytes]) -> None:
        chunks = list(chunks)
        self.writes.append(chunks)
        if not self.reads:
            self.buffered += sum(map(len, chunks))

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high_water = high

    def pause_reading(self) -> None:
        self.paused = True

    def written(self) -> list[bytes]:
        return [chunk for call in self.writes for chunk in call]


class FakeLink:
    """A connection as the session sees it (``broker.server.session.Link``)."""

    def __init__(self, transport: FakeTransport) -> None:
        self.transport: FakeTransport | None = transport
        self.closed: tuple[int, str, float] | None = None
        self.drained = asyncio.Event()
        self.drains = 0

    @property
    def is_open(self) -> bool:
        return self.closed is None

    async def drain(self) -> None:
        self.drains += 1
        await self.drained.wait()
        assert self.transport is not None
        self.transport.buffered = 0  # the peer read everything

    def close(self, code: int, reason: str = "", timeout: float = 2.0) -> None:
        self.closed = (code, reason, timeout)


def message(topic: str = "t", size: int = 10) -> Message:
    draft = Draft(
        topic=topic, payload=b'"' + b"x" * size + b'"', sender_id="p", sender_name="p", ts=0
    )
    return draft.to_message(next(_seqs))


def make(
    *, max_queue: int = 1 << 20, reads: bool = True, flusher: Flusher | None = None
) -> tuple[Session, FakeLink, list[tuple[int, str]]]:
    closes: list[tuple[int, str]] = []
    link = FakeLink(FakeTransport(reads))
    session = Session(
        link,  # type: ignore[arg-type]
        Identity(id="u", name="u"),
        flusher=flusher or Flusher(),
        max_queue=max_queue,
        on_close=lambda _s, code, reason: closes.append((code, reason)),
    )
    return session, link, closes


def transport(link: FakeLink) -> FakeTransport:
    assert link.transport is not None
    return link.transport


async def turn() -> None:
    """Let the event loop run the callbacks already scheduled (one turn)."""
    await asyncio.sleep(0)


async def test_frames_are_queued_and_written_once_per_loop_turn() -> None:
    session, link, _ = make()
    t = transport(link)
    session.send(b'{"op":"ok","id":1}')
    m = message()
    session.deliver(m)
    assert t.writes == []  # nothing written synchronously
    await turn()
    assert t.writes == [[text_frame(b'{"op":"ok","id":1}'), m.wire]]
    assert session.flusher.bytes_out == sum(map(len, t.writes[0]))
    await turn()
    assert len(t.writes) == 1  # nothing new queued: no empty write
    session.send(b'{"op":"ok","id":2}')
    await turn()
    assert len(t.writes) == 2 and t.writes[1] == [text_frame(b'{"op":"ok","id":2}')]


async def test_one_flush_serves_every_session_in_that_turn() -> None:
    flusher = Flusher()
    sessions = [make(flusher=flusher) for _ in range(3)]
    loop = asyncio.get_running_loop()
    scheduled = 0
    original = loop.call_soon

    def counting_call_soon(*args, **kw):  # type: ignore[no-untyped-def]
        nonlocal scheduled
        scheduled += 1
        return original(*args, **kw)

    loop.call_soon = counting_call_soon  # type: ignore[method-assign,assignment]
    try:
        m = message()
        for session, _, _ in sessions:
            session.deliver(m)
            session.deliver(m)
        assert scheduled == 1
        assert len(flusher._dirty) == 3  # each session once, however many frames it queued
    finally:
        del loop.call_soon
    await turn()
    for _, link, _ in sessions:
        assert transport(link).writes == [[m.wire, m.wire]]
    assert flusher.bytes_out == 6 * len(m.wire)


async def test_slow_consumer_is_closed_past_max_queue_and_its_queue_dropped() -> None:
    m = message(size=200)
    size = len(m.wire)
    session, link, closes = make(max_queue=5 * size, reads=False)
    t = transport(link)
    for _ in range(3):
        session.deliver(m)
    await turn()
    assert len(t.written()) == 3 and t.buffered == 3 * size  # the peer reads nothing
    session.deliver(m)
    session.deliver(m)  # 3 buffered + 2 queued = exactly max_queue: still fine
    assert closes == []
    session.deliver(m)  # one frame over
    assert closes == [(CLOSE_SLOW_CONSUMER, "slow consumer")]
    assert link.closed == (CLOSE_SLOW_CONSUMER, "slow consumer", 1.0)
    assert session.closing
    assert session._pending == [] and session._pending_bytes == 0  # memory freed at once
    await turn()
    assert len(t.written()) == 3  # the queued frames were dropped, not written
    session.deliver(m)
    session.send(b"{}")
    await turn()
    assert len(t.written()) == 3  # nothing more once closing


async def test_queue_alone_over_max_queue_closes_too() -> None:
    session, link, closes = make(max_queue=1000)
    session.send(b'"' + b"y" * 2000 + b'"')
    assert closes == [(CLOSE_SLOW_CONSUMER, "slow consumer")]
    await turn()
    assert transport(link).writes == []


async def test_other_closes_flush_queued_replies_first() -> None:
    session, link, closes = make()
    session.send(b'{"op":"error","code":"unauthorized"}')
    session.close(CLOSE_UNAUTHORIZED, "bad token")
    assert transport(link).written() == [text_frame(b'{"op":"error","code":"unauthorized"}')]
    assert closes == [(CLOSE_UNAUTHORIZED, "bad token")]
    assert link.closed == (CLOSE_UNAUTHORIZED, "bad token", 2.0)
    session.close(CLOSE_SLOW_CONSUMER, "again")
    assert len(closes) == 1  # closing twice is a no-op


async def test_live_messages_are_held_during_a_replay_then_released_in_order() -> None:
    session, link, _ = make()
    t = transport(link)
    history = [message() for _ in range(3)]
    live = [message() for _ in range(2)]
    session.hold()
    session.deliver(live[0])
    await session.replay(history)
    session.deliver(live[1])  # still held: the replay's ok has not been released yet
    session.send(b'{"op":"ok","id":7}')
    await turn()
    assert t.written() == [*(m.wire for m in history), text_frame(b'{"op":"ok","id":7}')]
    session.release()
    await turn()
    assert t.written()[4:] == [m.wire for m in live]
    session.deliver(message())  # not held any more
    await turn()
    assert len(t.written()) == 7


async def test_a_run_is_queued_whole_behind_what_was_queued_and_written_in_one_flush() -> None:
    session, link, closes = make()
    session.send(b'{"op":"ok","id":1}')
    run = Run([message() for _ in range(3)])
    session.deliver_run(run)
    session.deliver_run(Run([message()]))
    assert transport(link).writes == []
    await turn()
    [written] = transport(link).writes
    assert written[0] == text_frame(b'{"op":"ok","id":1}')
    assert written[1:4] == run.wires and len(written) == 5
    assert session.flusher.bytes_out == sum(map(len, written))
    assert closes == []


async def test_a_run_during_a_replay_is_held_and_released_in_order() -> None:
    session, link, _ = make()
    session.hold()
    run = Run([message() for _ in range(3)])
    session.deliver_run(run)
    await turn()
    assert transport(link).writes == []
    session.release()
    await turn()
    assert transport(link).written() == run.wires


async def test_a_run_over_max_queue_closes_as_slow_consumer() -> None:
    run = Run([message(size=100) for _ in range(4)])
    session, link, closes = make(max_queue=3 * len(run.wires[0]))
    session.deliver_run(run)
    assert closes == [(CLOSE_SLOW_CONSUMER, "slow consumer")]
    await turn()
    assert transport(link).writes == []


async def test_held_messages_over_max_queue_close_as_slow_consumer() -> None:
    m = message(size=100)
    session, link, closes = make(max_queue=3 * len(m.wire))
    session.hold()
    for _ in range(4):
        session.deliver(m)
    assert closes == [(CLOSE_SLOW_CONSUMER, "slow consumer")]
    session.release()
    await turn()
    assert transport(link).writes == []


async def test_a_replay_larger_than_max_queue_waits_for_the_socket_to_drain() -> None:
    m = message(size=100)
    session, link, closes = make(max_queue=4 * len(m.wire), reads=False)
    t = transport(link)
    assert t.high_water == 2 * len(m.wire)  # the session asks to be paused at half
    replay = asyncio.create_task(session.replay([m] * 20, timeout=5))
    for _ in range(100):  # bounded: each pass is one loop turn
        await turn()
        if link.drains and not link.drained.is_set():
            link.drained.set()  # the peer reads what was written
            await turn()
            link.drained.clear()
        if replay.done():
            break
    assert replay.done() and replay.exception() is None
    assert closes == []
    session.flush()
    assert len(t.written()) == 20
    assert link.drains >= 5  # it waited, rather than queue 20 frames at once


async def test_a_replay_to_a_peer_that_never_reads_closes_on_timeout() -> None:
    m = message(size=100)
    session, link, closes = make(max_queue=4 * len(m.wire), reads=False)
    await asyncio.wait_for(session.replay([m] * 20, timeout=0.05), 2)
    assert closes == [(CLOSE_SLOW_CONSUMER, "slow consumer")]
    assert len(transport(link).written()) <= 4


async def test_a_frame_sent_alone_is_written_at_once_behind_anything_queued() -> None:
    flusher = Flusher()
    (quiet, quiet_link, _), (busy, busy_link, _) = make(flusher=flusher), make(flusher=flusher)
    busy.send(b'{"op":"ok","id":1}')  # queued before: the next frame must not pass it
    m = message()
    flusher.alone = True
    quiet.deliver(m)
    busy.deliver(m)
    flusher.alone = False
    assert transport(quiet_link).writes == [[m.wire]]  # written, not queued
    assert flusher.bytes_out == len(m.wire)
    assert transport(busy_link).writes == []
    await turn()
    assert transport(busy_link).writes == [[text_frame(b'{"op":"ok","id":1}'), m.wire]]
    assert transport(quiet_link).writes == [[m.wire]]  # no empty flush either


async def test_a_frame_sent_alone_over_max_queue_closes_as_slow_consumer() -> None:
    flusher = Flusher()
    first, second = message(), message()
    session, link, closes = make(max_queue=len(first.wire) + 10, reads=False, flusher=flusher)
    flusher.alone = True
    session.deliver(first)
    session.deliver(second)  # nothing queued, but the first is still in the socket
    flusher.alone = False
    assert closes == [(CLOSE_SLOW_CONSUMER, "slow consumer")]
    assert len(transport(link).writes) == 1


async def test_the_journal_writes_a_lone_publish_at_once_and_batches_the_rest() -> None:
    flusher = Flusher()
    hub = Hub()
    store = MemoryStore()
    journal = Journal(store, hub.fanout, flusher=flusher)
    made = [make(flusher=flusher) for _ in range(3)]
    for session, _, _ in made:
        hub.attach(session)
        hub.subscribe(session, Subscription("room"))
    publisher = made[0][0]

    def publish(echo: bool = False) -> None:
        draft = Draft("room", b"1", "u", "u", 0, origin=publisher.id, echo=echo)
        journal.submit(draft, lambda m, e: publisher.send(b"ack"))

    publish()
    await turn()  # one publish: an ack to its sender, the message to the others
    assert [len(transport(link).writes) for _, link, _ in made] == [1, 1, 1]
    assert flusher.alone is False
    for _, link, _ in made:
        transport(link).writes.clear()
    publish()
    publish()
    publish(echo=True)
    await turn()  # three in one turn: still one write per connection
    assert [[len(w) for w in transport(link).writes] for _, link, _ in made] == [[4], [3], [3]]
    for _, link, _ in made:
        transport(link).writes.clear()
    publish(echo=True)  # the sender gets its ack and its copy: one write for both
    await turn()
    assert [[len(w) for w in transport(link).writes] for _, link, _ in made] == [[2], [1], [1]]
    await store.close()
