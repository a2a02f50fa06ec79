"""The wire protocol as plain data: parse client frames into requests, encode server frames.

No I/O. ``parse_request`` validates one text frame and returns one of the request classes
below or raises ``BadRequest``; the ``encode_*`` functions build the exact bytes of server
frames. A published message is encoded once (``Message.frame``) and those same bytes go to
every subscriber.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

from broker.core.model import kept_bytes
from broker.core.topics import is_pattern, validate_pattern, validate_topic
from broker.errors import BadRequest, BrokerError

RequestId = int | float | str

_MISSING = object()

#: Largest ``since``/``last``: seqs are signed 64-bit integers in every store.
MAX_COUNT = 2**63 - 1
# The integers orjson reads exactly (int64 and uint64); a run of 19 digits may be past them.
_MIN_INT = -(2**63)
_MAX_INT = 2**64 - 1
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_DIGIT_RUN = b"0" * 19

#: Longest idempotency key, in characters (section 8 of docs/protocol.md).
MAX_KEY = 128


@dataclass(frozen=True)
class Auth:
    """``auth``: authenticate (first frame) or refresh the token."""

    #: None: no token, a request for an anonymous connection (section 10).
    token: str | None
    id: RequestId | None = None


@dataclass(frozen=True)
class Sub:
    """``sub``: subscribe to a topic or pattern, optionally replaying history."""

    id: RequestId
    topic: str
    since: int | None = None
    epoch: str | None = None
    last: int | None = None
    presence: bool = False
    #: Replay the latest retained message of each matching topic (section 9).
    latest: bool = False


@dataclass(frozen=True)
class Unsub:
    """``unsub``: drop the subscription to ``topic``."""

    id: RequestId
    topic: str


# Not frozen, and its ``__init__`` written out: one per publish, and mypyc compiles only
# such an ``__init__`` (a frozen dataclass's sets each field through object.__setattr__,
# ~8,000 instructions a publish). Nothing changes a request once parsed.
@dataclass(slots=True)
class Pub:
    """``pub``: publish ``data`` (already JSON-encoded, as bytes) to ``topic``."""

    topic: str
    data: bytes
    id: RequestId | None = None
    echo: bool = False
    key: str | None = None

    def __init__(
        self,
        topic: str,
        data: bytes,
        id: RequestId | None = None,
        echo: bool = False,
        key: str | None = None,
    ) -> None:
        self.topic = topic
        self.data = data
        self.id = id
        self.echo = echo
        self.key = key


@dataclass(frozen=True)
class Presence:
    """``presence``: who holds a subscription to exactly ``topic``."""

    id: RequestId
    topic: str


@dataclass(frozen=True)
class Stats:
    """``stats``: server-wide figures (admin only)."""

    id: RequestId


Request = Auth | Sub | Unsub | Pub | Presence | Stats


def _request_id(frame: dict[str, Any]) -> RequestId | None:
    rid = frame.get("id")
    if rid is None:
        if "id" in frame:
            raise BadRequest("'id' must be a number or a string")
        return None
    if isinstance(rid, bool) or not isinstance(rid, (int, float, str)):
        raise BadRequest("'id' must be a number or a string")
    return rid


def _require_id(rid: RequestId | None, op: str) -> RequestId:
    if rid is None:
        raise BadRequest(f"'{op}' requires an 'id'")
    return rid


def _optional_bool(frame: dict[str, Any], name: str) -> bool:
    value = frame.get(name, False)
    if not isinstance(value, bool):
        raise BadRequest(f"'{name}' must be a boolean")
    return value


def _optional_count(frame: dict[str, Any], name: str) -> int | None:
    value = frame.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise BadRequest(f"'{name}' must be a non-negative integer up to {MAX_COUNT}")
    return value


def check_exact_numbers(raw: str | bytes) -> None:
    """Raise ``BadRequest`` when the JSON text ``raw`` holds an integer beyond 64 bits.

    orjson reads such an integer as a float, which would change the number silently: it
    is refused instead (send it as a string). Only a text with a run of 19 digits or more
    is parsed again, exactly, to find out."""
    data = raw.encode() if isinstance(raw, str) else bytes(raw)
    # Every digit made a '0', then a plain substring search: a fraction of the cost of a
    # regular expression, on every frame.
    if _DIGIT_RUN not in data.translate(_DIGITS_TO_ZERO):
        return
    text = raw if isinstance(raw, str) else data.decode("utf-8", "replace")
    try:
        stack: list[Any] = [json.loads(text)]
    except (ValueError, RecursionError):
        raise BadRequest("frame is not valid JSON or nested too deeply") from None
    while stack:
        value = stack.pop()
        if type(value) is int and not _MIN_INT <= value <= _MAX_INT:
            raise BadRequest("integers beyond 64 bits are not supported; send them as strings")
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def _has_float(value: Any) -> bool:
    """Whether parsed JSON holds a float anywhere. A walk of the parsed value costs what
    its numbers, lists and objects cost; a scan of the text for long digit runs costs
    every byte (5 ms for a 60 KB string)."""
    if type(value) is float:
        return True
    if type(value) is not dict and type(value) is not list:
        return False
    # Only containers go on the stack: a scalar is looked at once, where it is found.
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        # Two loops, each over a declared type, which mypyc iterates without the generic
        # iterator protocol.
        if type(item) is dict:
            values: dict[str, Any] = item
            for child in values.values():
                kind = type(child)
                if kind is float:
                    return True
                if kind is dict or kind is list:
                    stack.append(child)
        else:
            items: list[Any] = item
            for child in items:
                kind = type(child)
                if kind is float:
                    return True
                if kind is dict or kind is list:
                    stack.append(child)
    return False


def parse_key(fields: dict[str, Any]) -> str | None:
    """The optional idempotency ``key`` of a ``pub`` frame or an HTTP publish body: a
    string of 1 to ``MAX_KEY`` characters (code points); any other value is refused."""
    if "key" not in fields:
        return None
    key = fields["key"]
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY:
        raise BadRequest(f"'key' must be a string of 1 to {MAX_KEY} characters")
    return key


def parse_request(raw: str | bytes) -> Request:
    """Parse one client frame (``bytes`` means a binary frame, which is refused)."""
    if type(raw) is not str and isinstance(raw, (bytes, bytearray, memoryview)):
        raise BadRequest("binary frames are not supported; send JSON text frames")
    try:
        frame = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("frame is not valid JSON") from None
    if not isinstance(frame, dict):
        raise BadRequest("frame must be a JSON object")
    if _has_float(frame):  # only then can an integer beyond 64 bits have been read
        check_exact_numbers(raw)
    rid = _request_id(frame)
    try:
        return _parse_op(frame, rid)
    except BadRequest as exc:
        exc.request_id = rid
        raise


def _parse_op(frame: dict[str, Any], rid: RequestId | None) -> Request:
    op = frame.get("op")
    if not isinstance(op, str):
        raise BadRequest("frame has no 'op'")
    if op == "pub":
        topic = validate_topic(frame.get("topic"))
        data = frame.get("data", _MISSING)
        if data is _MISSING:
            raise BadRequest("'pub' requires 'data'")
        return Pub(
            topic=topic,
            data=kept_bytes(orjson.dumps(data)),
            id=rid,
            echo=_optional_bool(frame, "echo"),
            key=parse_key(frame) if "key" in frame else None,
        )
    if op == "sub":
        rid = _require_id(rid, op)
        pattern = validate_pattern(frame.get("topic"))
        since = _optional_count(frame, "since")
        last = _optional_count(frame, "last")
        if since is not None and last is not None:
            raise BadRequest("'since' and 'last' cannot be used together")
        latest = _optional_bool(frame, "latest")
        if latest and (since is not None or last is not None):
            raise BadRequest("'latest' cannot be used with 'since' or 'last'")
        epoch = frame.get("epoch")
        if epoch is not None and not isinstance(epoch, str):
            raise BadRequest("'epoch' must be a string")
        return Sub(
            id=rid,
            topic=pattern,
            since=since,
            epoch=epoch,
            last=last,
            presence=_optional_bool(frame, "presence"),
            latest=latest,
        )
    if op == "unsub":
        return Unsub(id=_require_id(rid, op), topic=validate_pattern(frame.get("topic")))
    if op == "auth":
        token = frame.get("token")
        if token is not None and not isinstance(token, str):
            raise BadRequest("'token' must be a string (or absent, for an anonymous connection)")
        return Auth(token=token, id=rid)
    if op == "presence":
        rid = _require_id(rid, op)
        topic = validate_pattern(frame.get("topic"))
        if is_pattern(topic):
            raise BadRequest("presence takes a topic, not a pattern")
        return Presence(id=rid, topic=topic)
    if op == "stats":
        return Stats(id=_require_id(rid, op))
    raise BadRequest(f"unknown op {op!r}")


def encode_ok(request_id: RequestId, **fields: Any) -> bytes:
    """An ``ok`` reply to request ``request_id`` with its per-request fields."""
    return orjson.dumps({"op": "ok", "id": request_id, **fields})


def encode_ack(request_id: RequestId, seq: int) -> bytes:
    """The ``ok`` reply to a publish: the bytes of ``encode_ok(request_id, seq=seq)``."""
    # Every publish is acknowledged: an integer id (the usual kind, and within 64 bits as
    # parsed) is formatted into a template instead of building a dict for orjson; an
    # f-string, which mypyc compiles, where bytes' % is a generic call (3 times slower).
    if type(request_id) is int:
        return f'{{"op":"ok","id":{request_id},"seq":{seq}}}'.encode()
    return orjson.dumps({"op": "ok", "id": request_id, "seq": seq})


def encode_error(error: BrokerError) -> bytes:
    """The ``error`` frame for ``error`` (with ``id`` when the request had a valid one)."""
    frame: dict[str, Any] = {"op": "error", "code": error.code, "message": error.message}
    if error.request_id is not None:
        frame["id"] = error.request_id
    return orjson.dumps(frame)


def encode_hello(user: dict[str, str], server: str, anonymous: bool = False) -> bytes:
    """The ``hello`` frame sent after successful authentication (``anonymous: true`` for
    an anonymous connection, section 10)."""
    if anonymous:
        return orjson.dumps({"op": "hello", "user": user, "anonymous": True, "server": server})
    return orjson.dumps({"op": "hello", "user": user, "server": server})


def encode_presence_event(op: str, topic: str, user: dict[str, str]) -> bytes:
    """A ``join`` or ``leave`` frame."""
    return orjson.dumps({"op": op, "topic": topic, "user": user})


# -- client side: the same frames, encoded by clients ------------------------------------


def encode_request(request: Request) -> bytes:
    """The frame a client sends for ``request``: what ``parse_request`` reads back."""
    if isinstance(request, Pub):
        head: dict[str, Any] = {"op": "pub", "topic": request.topic}
        if request.id is not None:
            head["id"] = request.id
        if request.echo:
            head["echo"] = True
        if request.key is not None:
            head["key"] = request.key
        # ``data`` is already JSON: splice it in rather than decode and encode it again.
        return orjson.dumps(head)[:-1] + b',"data":' + request.data + b"}"
    if isinstance(request, Sub):
        sub: dict[str, Any] = {"op": "sub", "id": request.id, "topic": request.topic}
        if request.since is not None:
            sub["since"] = request.since
            if request.epoch is not None:
                sub["epoch"] = request.epoch
        if request.last is not None:
            sub["last"] = request.last
        if request.presence:
            sub["presence"] = True
        if request.latest:
            sub["latest"] = True
        return orjson.dumps(sub)
    if isinstance(request, Auth):
        auth: dict[str, Any] = {"op": "auth"}
        if request.token is not None:
            auth["token"] = request.token
        if request.id is not None:
            auth["id"] = request.id
        return orjson.dumps(auth)
    if isinstance(request, Unsub):
        return orjson.dumps({"op": "unsub", "id": request.id, "topic": request.topic})
    if isinstance(request, Presence):
        return orjson.dumps({"op": "presence", "id": request.id, "topic": request.topic})
    return orjson.dumps({"op": "stats", "id": request.id})


def parse_reply(raw: str | bytes) -> dict[str, Any]:
    """A server frame as a JSON object (``BadRequest`` when it is not one)."""
    try:
        frame = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("the broker sent a frame that is not JSON") from None
    if not isinstance(frame, dict):
        raise BadRequest("the broker sent a frame that is not a JSON object")
    return frame
