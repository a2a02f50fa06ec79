"""The data model every layer shares: a publish before and after it gets its ``seq``.

``Draft`` is a publish the server accepted; a store turns it into a ``Message`` with the
next broker-wide ``seq`` (``Draft.to_message``). A ``Message`` is encoded once: ``frame``
is its ``msg`` JSON and ``wire`` the whole WebSocket frame, the same bytes for every
subscriber. ``merge_by_seq`` merges runs of messages read per topic into one seq order.
"""

from __future__ import annotations

import heapq
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import orjson


# Not frozen: a frozen dataclass's __init__ sets each field through object.__setattr__,
# several microseconds per publish; nothing changes a draft once made.
@dataclass(slots=True)
class Draft:
    """A publish accepted by the server but not yet given a seq."""

    topic: str
    data: bytes
    sender_id: str
    sender_name: str
    ts: int
    # Not stored: the id of the local session that published it (0: none on this node)
    # and whether that session wants its own copy.
    origin: int = field(default=0, compare=False)
    echo: bool = False
    # An idempotency key (section 8 of docs/protocol.md), on the first draft of a keyed
    # publish; ``group`` is how many drafts that publish has (a batch to several topics),
    # 0 on the others, which the journal never separates from their first.
    key: str | None = None
    group: int = 1

    def to_message(self, seq: int) -> Message:
        """This draft recorded as message ``seq``."""
        return Message(seq, self.topic, self.data, self.sender_id, self.sender_name, self.ts)


@dataclass
class Message:
    """A published message as stored and delivered. ``data`` is its JSON encoding."""

    seq: int
    topic: str
    data: bytes
    sender_id: str
    sender_name: str
    ts: int
    _frame: bytes | None = field(default=None, repr=False, compare=False)
    _wire: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def frame(self) -> bytes:
        """The ``msg`` frame for this message, encoded once and shared by all deliveries."""
        if self._frame is None:
            # One orjson call; Fragment puts the already-encoded data in as it is.
            self._frame = orjson.dumps(
                {
                    "op": "msg",
                    "topic": self.topic,
                    "seq": self.seq,
                    "data": orjson.Fragment(self.data),
                    "from": {"id": self.sender_id, "name": self.sender_name},
                    "ts": self.ts,
                }
            )
        return self._frame

    @property
    def wire(self) -> bytes:
        """The whole WebSocket text frame carrying ``frame``, ready to write to a socket."""
        if self._wire is None:
            self._wire = text_frame(self.frame)
        return self._wire


def text_frame(payload: bytes) -> bytes:
    """An unmasked, final WebSocket text frame (RFC 6455 5.2) holding ``payload``.

    Server frames are never masked, so one encoded frame can be written byte for byte to
    every subscriber: this is what makes fan-out cost one encode per message.
    """
    n = len(payload)
    if n < 126:
        header = bytes((0x81, n))
    elif n < 65536:
        header = bytes((0x81, 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x81, 127)) + n.to_bytes(8, "big")
    return header + payload


def _seq(message: Message) -> int:
    return message.seq


def merge_by_seq(runs: Iterable[Iterable[Message]]) -> Iterator[Message]:
    """Merge runs of messages, each already in seq order, into one seq order."""
    return heapq.merge(*runs, key=_seq)


def new_epoch() -> str:
    """A fresh, unique epoch name."""
    return uuid.uuid4().hex[:16]


def now_ms() -> int:
    """Wall-clock time in integer milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000
