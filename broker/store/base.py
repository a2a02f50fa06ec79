"""Message history: the interface every store implements (memory, SQLite, Redis).

The interface is deliberately narrow so that a Redis store fits behind it too:

* ``append(drafts)`` assigns each draft the next broker-wide ``seq`` and records the batch
  durably before returning (the caller batches: see ``broker.server.journal``);
* ``read_since(pattern, since, upto)`` and ``read_last(pattern, n, upto)`` replay history;
  ``replay(pattern, since=/last=, upto)`` does the same a page at a time (``Pages``), so
  a replay holds one page in memory however much history it covers;
* ``latest(pattern, upto)`` reads the most recent message of each matching topic from a
  per-topic index (section 9 of docs/protocol.md);
* ``trim(now)`` applies the age limit (the per-topic count limit is applied on append).

Each store also knows its ``epoch`` (a name for this history, new when history starts
over) and ``last_seq`` (the highest seq it has assigned).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from broker.core.model import Draft, Message
from broker.core.namespaces import Namespaces


@dataclass(frozen=True)
class Replay:
    """History read for a ``sub`` with ``since``: the messages and whether nothing with
    a larger seq than ``since`` was lost to retention."""

    messages: list[Message]
    recovered: bool


T = TypeVar("T")


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """``items`` in consecutive slices of at most ``size`` (bound parameters, pipelines)."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


Deliver = Callable[[list[tuple[Message, Draft]]], None]
#: Which topics a reader may see (inbox privacy); None: every one.
Visible = Callable[[str], bool] | None
#: Most messages a ``latest`` replay holds (section 9 of docs/protocol.md).
LATEST_LIMIT = 1000

#: A replay page: at most this many messages, and this many bytes of data (one more
#: message when the first alone is larger).
PAGE_SIZE = 500
PAGE_BYTES = 1 << 20


class Pages(ABC):
    """A replay read from the store a page at a time, in increasing seq.

    ``start``: the replay holds the messages with ``seq > start`` (up to its ``upto``);
    ``recovered``: as in ``Replay``. ``next()`` returns the next page, ``[]`` at the end.
    When a message the replay should hold is removed (retention, the history bound)
    before it was read, the replay stops there with ``gap`` set: the client, told
    ``recovered`` already, must resume with ``since`` to learn of the loss.
    """

    def __init__(self, start: int, recovered: bool) -> None:
        self.start = start
        self.recovered = recovered
        self.gap = False

    @abstractmethod
    async def next(self) -> list[Message]:
        """The next page of messages (``[]``: the replay is over, or stopped at a gap)."""


class ListPages(Pages):
    """Pages over messages already read whole (stores that cannot read by page)."""

    def __init__(self, messages: list[Message], start: int, recovered: bool, size: int) -> None:
        super().__init__(start, recovered)
        self._messages = messages
        self._size = size

    async def next(self) -> list[Message]:
        page = self._messages[: self._size]
        del self._messages[: self._size]
        return page


class Store(ABC):
    """Where messages get their seq and live on for replay.

    A local store (memory, SQLite) is written by this node only: the journal fans out
    each batch after ``append``. A shared store (Redis) is written by every node of a
    cluster, so ``shared`` is True and ``follow`` feeds every node all committed
    messages, in seq order, from whichever node published them.
    """

    epoch: str = ""
    last_seq: int = 0
    shared: bool = False
    #: Seconds an idempotency key is remembered from its first publish (``--dedupe-window``).
    dedupe_window: float = 120.0
    #: Per-pattern options (``[[namespace]]``): a namespace's ``history`` replaces
    #: ``history`` for its topics, its ``retention`` (never longer) ``retention``.
    namespaces: Namespaces = Namespaces()

    def __init__(self, history: int = 1000, retention: float = 24 * 3600) -> None:
        self.history = history
        self.retention = retention

    async def open(self) -> None:
        """Load or create the history (epoch, seq counter)."""

    async def close(self) -> None:
        """Flush and release resources."""

    @abstractmethod
    async def append(self, drafts: list[Draft]) -> list[Message]:
        """Give each draft the next seq, record the batch durably, return the messages.

        A keyed publish (``Draft.key``) whose key its user already used within
        ``dedupe_window`` is not recorded: its drafts come back as ``Duplicate``
        (``broker.store.dedupe``), and a new key is recorded with its messages."""

    async def known_key(self, user: str, key: str) -> bool:
        """Whether ``user``'s idempotency ``key`` is recorded within ``dedupe_window`` (a
        publish with it would be answered as a duplicate)."""
        return False

    def append_now(self, drafts: list[Draft]) -> list[Message] | None:
        """``append`` done at once on the calling (event-loop) thread, for a store that
        records a batch faster than a hand-off to a thread costs; None: not now (this
        store, or its state, needs ``append``)."""
        return None

    @abstractmethod
    async def read_since(self, pattern: str, since: int, upto: int) -> Replay:
        """Retained messages with ``since < seq <= upto`` in topics matching ``pattern``."""

    @abstractmethod
    async def read_last(self, pattern: str, n: int, upto: int) -> list[Message]:
        """The latest ``n`` retained messages with ``seq <= upto`` matching ``pattern``."""

    @abstractmethod
    async def latest(
        self, pattern: str, upto: int, limit: int = LATEST_LIMIT, visible: Visible = None
    ) -> list[Message]:
        """The most recent retained message (``seq <= upto``) of each topic matching
        ``pattern`` (and ``visible``, when given), in increasing seq; only the ``limit``
        with the highest seqs. Read from a per-topic index, never by scanning messages."""

    @abstractmethod
    async def trim(self, now: float) -> int:
        """Remove messages older than the retention age; return how many went."""

    async def replay(
        self,
        pattern: str,
        *,
        since: int | None = None,
        last: int | None = None,
        upto: int,
        page_size: int = PAGE_SIZE,
        page_bytes: int = PAGE_BYTES,
    ) -> Pages:
        """The messages ``read_since(pattern, since, upto)`` (or ``read_last(pattern, last,
        upto)``) returns, to be read a page at a time. This default reads them whole;
        stores that can read a page at a time (memory, SQLite) do."""
        if since is not None:
            result = await self.read_since(pattern, since, upto)
            return ListPages(result.messages, since, result.recovered, page_size)
        messages = await self.read_last(pattern, last or 0, upto)
        return ListPages(messages, messages[0].seq - 1 if messages else upto, True, page_size)

    async def follow(self, deliver: Deliver, restart: Callable[[int], None]) -> None:
        """Shared stores: call ``deliver`` with every committed message in seq order,
        forever; call ``restart(last_seq)`` first when history started over (new
        epoch). Local stores never need it."""
        raise NotImplementedError
