"""Server-sent event streams as plain data (section 11 of docs/protocol.md): reading a
``GET /sse`` request's query and ``Last-Event-ID``, and the bytes of the stream.

No I/O. ``parse_stream`` turns the query into a ``StreamRequest`` or raises
``BadRequest``; a message's own event is ``Message.event`` (encoded once for every stream).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs

import orjson

from broker.core.protocol import MAX_COUNT
from broker.core.topics import validate_pattern
from broker.errors import BadRequest

#: Milliseconds a browser waits before it reconnects (the stream's ``retry:`` line).
RETRY_MS = 2000
#: Seconds between comment lines on a quiet stream (the contract: at most 15).
HEARTBEAT = 15.0
#: The comment line written to a quiet stream.
HEARTBEAT_LINE = b": keepalive\n\n"
#: Query parameters a stream reads; any other is ignored (forward compatibility).
_KNOWN = ("topic", "last", "since", "epoch", "latest", "token")


@dataclass(frozen=True)
class StreamRequest:
    """What a stream asks for: its patterns, at most one replay, and its token if any."""

    patterns: tuple[str, ...]
    since: int | None = None
    epoch: str | None = None
    last: int | None = None
    latest: bool = False
    token: str | None = None
    #: Resumed from a ``Last-Event-ID`` header (which wins over the query's replay).
    resumed: bool = False

    @property
    def replays(self) -> bool:
        """Whether the stream asks for any replay."""
        return self.since is not None or self.last is not None or self.latest


def _count(values: list[str], name: str) -> int | None:
    if not values:
        return None
    raw = values[-1]
    if not raw.isascii() or not raw.isdigit() or int(raw) > MAX_COUNT:
        raise BadRequest(f"{name!r} must be a non-negative integer up to {MAX_COUNT}")
    return int(raw)


def parse_last_event_id(value: str) -> tuple[str, int]:
    """``(epoch, seq)`` from a ``Last-Event-ID: <epoch>:<seq>`` header."""
    epoch, sep, seq = value.strip().rpartition(":")
    if not sep or not epoch or not seq.isascii() or not seq.isdigit() or int(seq) > MAX_COUNT:
        raise BadRequest("'Last-Event-ID' must be <epoch>:<seq>, as the stream's ids are")
    return epoch, int(seq)


def parse_stream(query: str, last_event_id: str | None, max_patterns: int) -> StreamRequest:
    """The stream a ``GET /sse?<query>`` asks for; ``BadRequest`` saying why not."""
    try:
        fields = parse_qs(query, keep_blank_values=True, errors="strict")
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the query string is not valid") from None
    for name in _KNOWN[1:]:
        if len(fields.get(name, ())) > 1:
            raise BadRequest(f"{name!r} is given more than once")
    raw_patterns = fields.get("topic", [])
    if not raw_patterns:
        raise BadRequest("give at least one 'topic' (a topic or pattern)")
    if len(raw_patterns) > max_patterns:
        raise BadRequest(f"at most {max_patterns} topics per stream")
    patterns = tuple(dict.fromkeys(validate_pattern(p) for p in raw_patterns))
    last = _count(fields.get("last", []), "last")
    since = _count(fields.get("since", []), "since")
    latest_raw = fields.get("latest", [None])[-1]
    if latest_raw not in (None, "true", "1", "false", "0"):
        raise BadRequest("'latest' must be true, false, 1 or 0")
    latest = latest_raw in ("true", "1")
    if sum((last is not None, since is not None, latest)) > 1:
        raise BadRequest("give at most one of 'last', 'since' and 'latest'")
    epoch = fields.get("epoch", [None])[-1]
    token = fields.get("token", [None])[-1] or None
    if last_event_id is not None and last_event_id.strip():
        # A browser reconnects to the same URL and adds the header: it wins.
        resumed_epoch, resumed_seq = parse_last_event_id(last_event_id)
        return StreamRequest(
            patterns, since=resumed_seq, epoch=resumed_epoch, token=token, resumed=True
        )
    return StreamRequest(patterns, since, epoch, last, latest, token)


def ready_event(seq: int, epoch: str, recovered: bool, with_id: bool) -> bytes:
    """The stream's opening: its ``retry:`` line and the ``ready`` event (with ``id:`` when
    the stream asked for no replay, so that it resumes from the moment it opened)."""
    data = orjson.dumps({"seq": seq, "epoch": epoch, "recovered": recovered})
    head = b"retry: %d\nevent: ready\n" % RETRY_MS
    if with_id:
        head += b"id: %s:%d\n" % (epoch.encode(), seq)
    return head + b"data: " + data + b"\n\n"
