"""The data model every layer shares: a publish before and after it gets its ``seq``.

``Draft`` is a publish the server accepted; a store turns it into a ``Message`` with the
next broker-wide ``seq`` (``Draft.to_message``). ``Message`` is the one message type of
server and client: ``payload`` is its data as JSON bytes, ``data`` the decoded value. The
server encodes it once: ``frame`` is its ``msg`` JSON and ``wire`` the whole WebSocket
frame, the same bytes for every subscriber; a client builds it from a ``msg`` frame
(``Message.from_json``). ``merge_by_seq`` merges per-topic runs into one seq order.
"""

from __future__ import annotations

import heapq
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import orjson

# The server's text frame, from the one frame codec (re-exported for the server).
from broker.core.frames import text_frame as text_frame
from broker.core.frames import text_head


# Not frozen: a frozen dataclass's __init__ sets each field through object.__setattr__,
# several microseconds per publish; nothing changes a draft once made. The per-publish
# classes write their ``__init__`` out (the dataclass keeps it): mypyc compiles that one,
# while the one ``dataclass`` makes stays interpreted, ~3,000 instructions per object.
@dataclass(slots=True)
class Draft:
    """A publish accepted by the server but not yet given a seq."""

    topic: str
    payload: bytes  # the data, JSON-encoded
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

    def __init__(
        self,
        topic: str,
        payload: bytes,
        sender_id: str,
        sender_name: str,
        ts: int,
        origin: int = 0,
        echo: bool = False,
        key: str | None = None,
        group: int = 1,
    ) -> None:
        self.topic = topic
        self.payload = payload
        self.sender_id = sender_id
        self.sender_name = sender_name
        self.ts = ts
        self.origin = origin
        self.echo = echo
        self.key = key
        self.group = group

    def to_message(self, seq: int) -> Message:
        """This draft recorded as message ``seq``."""
        return Message(seq, self.topic, self.payload, self.sender_id, self.sender_name, self.ts)


@dataclass(frozen=True, slots=True)
class User:
    """A user as the broker names it: ``id`` (a string) and display ``name``."""

    id: str
    name: str

    @classmethod
    def from_json(cls, raw: Any) -> User:
        """Build from the protocol's ``{"id", "name"}`` object (tolerant of odd input)."""
        if not isinstance(raw, dict):
            return cls(id="", name="")
        uid = str(raw.get("id", ""))
        return cls(id=uid, name=str(raw.get("name", uid)))


_UNDECODED: Any = object()

# A ``msg`` frame is put together from these and the JSON of its topic and sender, which
# orjson encodes once per topic and sender (kept in bounded caches, emptied when full):
# the same bytes as orjson's encoding of the whole object, at a third of the cost.
# (Final: mypyc makes them constants rather than look each up in the module's dict.)
_MSG_TOPIC: Final = b'{"op":"msg","topic":'
_MSG_SEQ: Final = b',"seq":'
_MSG_DATA: Final = b',"data":'
_MSG_FROM: Final = b',"from":'
_MSG_TS: Final = b',"ts":'
_MSG_END: Final = b"}"
_MSG_FIXED: Final = sum(map(len, (_MSG_TOPIC, _MSG_SEQ, _MSG_DATA, _MSG_FROM, _MSG_TS, _MSG_END)))
_JSON_CACHE = 1024  # entries of each cache: ~150 KiB at most
_topics_json: dict[str, bytes] = {}
_senders_json: dict[str, tuple[str, bytes]] = {}


def _topic_json(topic: str) -> bytes:
    encoded = _topics_json.get(topic)
    if encoded is None:
        if len(_topics_json) >= _JSON_CACHE:
            _topics_json.clear()
        encoded = _topics_json[topic] = kept_bytes(orjson.dumps(topic))
    return encoded


def _sender_json(sender_id: str, name: str) -> bytes:
    """The ``from`` object of a message from ``sender_id`` called ``name``, as JSON."""
    cached = _senders_json.get(sender_id)
    if cached is not None and cached[0] == name:
        return cached[1]
    if len(_senders_json) >= _JSON_CACHE:
        _senders_json.clear()
    encoded = kept_bytes(orjson.dumps({"id": sender_id, "name": name}))
    _senders_json[sender_id] = (name, encoded)
    return encoded


@dataclass
class Message:
    """A published message: ``topic``, broker-wide ``seq``, ``data``, ``sender``, ``ts``.

    ``payload`` is the data as JSON bytes (what the stores keep and the server sends);
    ``data`` is the decoded value, decoded once when first asked for."""

    seq: int
    topic: str
    payload: bytes
    sender_id: str
    sender_name: str
    ts: int
    _frame: bytes | None = field(default=None, repr=False, compare=False)
    _wire: bytes | None = field(default=None, repr=False, compare=False)
    _event: bytes | None = field(default=None, repr=False, compare=False)
    _data: Any = field(default=_UNDECODED, repr=False, compare=False)

    def __init__(
        self,
        seq: int,
        topic: str,
        payload: bytes,
        sender_id: str,
        sender_name: str,
        ts: int,
        _frame: bytes | None = None,
        _wire: bytes | None = None,
        _event: bytes | None = None,
        _data: Any = _UNDECODED,
    ) -> None:
        self.seq = seq
        self.topic = topic
        self.payload = payload
        self.sender_id = sender_id
        self.sender_name = sender_name
        self.ts = ts
        self._frame = _frame
        self._wire = _wire
        self._event = _event
        self._data = _data

    @classmethod
    def from_json(cls, frame: dict[str, Any]) -> Message | None:
        """The message in a ``msg`` frame as a client parsed it (None if malformed)."""
        seq, topic, ts = frame.get("seq"), frame.get("topic"), frame.get("ts")
        if not isinstance(seq, int) or not isinstance(topic, str):
            return None
        sender = User.from_json(frame.get("from"))
        data = frame.get("data")
        return cls(
            seq,
            topic,
            orjson.dumps(data),
            sender.id,
            sender.name,
            int(ts) if isinstance(ts, (int, float)) else 0,
            _data=data,
        )

    @property
    def data(self) -> Any:
        """The published JSON value, decoded."""
        if self._data is _UNDECODED:
            self._data = orjson.loads(self.payload)
        return self._data

    @property
    def sender(self) -> User:
        """Who published it, as the broker stamped it from their token."""
        return User(self.sender_id, self.sender_name)

    @property
    def time(self) -> datetime:
        """The broker's receive time as an aware UTC ``datetime``."""
        return datetime.fromtimestamp(self.ts / 1000, tz=UTC)

    def to_json(self) -> dict[str, Any]:
        """The message as the protocol's ``msg`` object (without ``op``)."""
        return {
            "topic": self.topic,
            "seq": self.seq,
            "data": self.data,
            "from": {"id": self.sender_id, "name": self.sender_name},
            "ts": self.ts,
        }

    def _encode(self, framed: bool) -> bytes:
        """The ``msg`` frame, after its WebSocket head when ``framed``: one join, into a
        new object of its own size (no ``kept_bytes`` copy needed)."""
        topic = _topic_json(self.topic)
        sender = _sender_json(self.sender_id, self.sender_name)
        seq = str(self.seq).encode()
        ts = str(self.ts).encode()
        payload = self.payload
        head = b""
        if framed:
            n = _MSG_FIXED + len(topic) + len(sender) + len(seq) + len(ts) + len(payload)
            head = text_head(n)
        return b"".join(
            (head, _MSG_TOPIC, topic, _MSG_SEQ, seq, _MSG_DATA, payload, _MSG_FROM, sender,
             _MSG_TS, ts, _MSG_END)
        )  # fmt: skip

    @property
    def frame(self) -> bytes:
        """The ``msg`` frame for this message, encoded once and shared by all deliveries."""
        if self._frame is None:
            wire = self._wire
            if wire is None:
                self._frame = self._encode(False)
            else:  # the wire's payload, after its 2-, 4- or 10-byte head
                self._frame = wire[2 if wire[1] < 126 else 4 if wire[1] == 126 else 10 :]
        return self._frame

    @property
    def wire(self) -> bytes:
        """The whole WebSocket text frame carrying ``frame``, ready to write to a socket."""
        if self._wire is None:
            # A live message is encoded straight into its wire frame, and ``frame`` is
            # kept only if asked for.
            frame = self._frame
            self._wire = self._encode(True) if frame is None else text_frame(frame)
        return self._wire

    @property
    def body(self) -> bytes:
        """The message as the fields of its ``msg`` frame without ``op`` (the HTTP
        history's messages, a server-sent event's data): one line of JSON."""
        return b"{" + self.frame[len(b'{"op":"msg",') :]

    def event(self, epoch: str) -> bytes:
        """The server-sent event carrying this message (section 11 of docs/protocol.md):
        ``id: <epoch>:<seq>`` and ``data:`` its body, encoded once for every stream. A
        message's epoch never changes, so the first one asked for is kept."""
        if self._event is None:
            self._event = b"id: %s:%d\ndata: %s\n\n" % (epoch.encode(), self.seq, self.body)
        return self._event


def kept_bytes(encoded: bytes) -> bytes:
    """``encoded`` in a block of its own size, for bytes that are kept (history, cached
    frames): orjson's output sits in a block of about 4 KiB whatever its length, so a
    million tiny messages would hold 4 GB."""
    return bytes(memoryview(encoded))


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
