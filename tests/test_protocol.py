"""Parsing client frames and encoding server frames, without sockets."""

from __future__ import annotations

import orjson
import pytest

from broker.core.model import Message, text_frame
from broker.core.protocol import (
    Auth,
    Presence,
    Pub,
    Stats,
    Sub,
    Unsub,
    encode_ack,
    encode_error,
    encode_ok,
    parse_request,
)
from broker.errors import BadRequest, Forbidden


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ({"op": "auth", "token": "t"}, Auth("t")),
        ({"op": "auth", "token": "t", "id": "a"}, Auth("t", "a")),
        ({"op": "sub", "id": 1, "topic": "a/+"}, Sub(1, "a/+")),
        (
            {"op": "sub", "id": 1, "topic": "a", "since": 5, "epoch": "e"},
            Sub(1, "a", since=5, epoch="e"),
        ),
        (
            {"op": "sub", "id": 1.5, "topic": "a", "last": 0, "presence": True},
            Sub(1.5, "a", last=0, presence=True),
        ),
        ({"op": "unsub", "id": "x", "topic": "#"}, Unsub("x", "#")),
        ({"op": "pub", "topic": "a", "data": {"b": [1, None]}}, Pub("a", b'{"b":[1,null]}')),
        (
            {"op": "pub", "topic": "a", "data": None, "id": 3, "echo": True},
            Pub("a", b"null", 3, True),
        ),
        ({"op": "presence", "id": 1, "topic": "room"}, Presence(1, "room")),
        ({"op": "stats", "id": 1, "extra": "ignored"}, Stats(1)),
    ],
)
def test_parse_valid(frame: dict[str, object], expected: object) -> None:
    assert parse_request(orjson.dumps(frame).decode()) == expected


@pytest.mark.parametrize(
    ("raw", "reason", "rid"),
    [
        (b'{"op":"pub"}', "binary", None),
        ("not json", "not valid JSON", None),
        ("[1,2]", "JSON object", None),
        ('{"id":1}', "no 'op'", 1),
        ('{"op":"fly","id":1}', "unknown op", 1),
        ('{"op":"sub","topic":"a"}', "requires an 'id'", None),
        ('{"op":"sub","id":null,"topic":"a"}', "'id' must be", None),
        ('{"op":"sub","id":true,"topic":"a"}', "'id' must be", None),
        ('{"op":"sub","id":[1],"topic":"a"}', "'id' must be", None),
        ('{"op":"sub","id":1,"topic":"a+b"}', "whole level", 1),
        ('{"op":"sub","id":1,"topic":"a","since":1,"last":1}', "together", 1),
        ('{"op":"sub","id":1,"topic":"a","since":-1}', "non-negative", 1),
        ('{"op":"sub","id":1,"topic":"a","last":1.5}', "non-negative", 1),
        ('{"op":"sub","id":1,"topic":"a","since":true}', "non-negative", 1),
        ('{"op":"sub","id":1,"topic":"a","epoch":5}', "'epoch'", 1),
        ('{"op":"sub","id":1,"topic":"a","presence":"yes"}', "boolean", 1),
        ('{"op":"pub","topic":"a"}', "requires 'data'", None),
        ('{"op":"pub","topic":"a/#","data":1,"id":2}', "'+' or '#'", 2),
        ('{"op":"pub","topic":"a","data":1,"echo":1}', "boolean", None),
        ('{"op":"presence","id":1,"topic":"a/+"}', "not a pattern", 1),
        ('{"op":"auth","token":5}', "token", None),
        ('{"op":"stats"}', "requires an 'id'", None),
    ],
)
def test_parse_invalid(raw: str | bytes, reason: str, rid: object) -> None:
    with pytest.raises(BadRequest) as info:
        parse_request(raw)
    assert reason in info.value.message
    assert info.value.request_id == rid


def test_message_frame_is_encoded_once_and_valid_json() -> None:
    msg = Message(7, "a/b", b'{"x":"\\u00e9"}', "42", 'Jo "J"', 123)
    assert msg.frame is msg.frame
    assert orjson.loads(msg.frame) == {
        "op": "msg",
        "topic": "a/b",
        "seq": 7,
        "data": {"x": "é"},
        "from": {"id": "42", "name": 'Jo "J"'},
        "ts": 123,
    }


@pytest.mark.parametrize(
    ("topic", "sender_id", "name"),
    [("a/b", "u1", "U"), ('q"\\\x01é/😀', 'i"d\n', "N\\a\u2028me"), ("t", "", "")],
)
@pytest.mark.parametrize("size", [0, 60, 123, 124, 125, 126, 65535, 65536])
def test_message_frame_is_orjsons_encoding(
    topic: str, sender_id: str, name: str, size: int
) -> None:
    """The frame put together from cached pieces is byte for byte orjson's encoding of the
    whole ``msg`` object, and the wire is that frame with its head, whichever comes first."""
    payload = b'"' + b"x" * size + b'"'
    for seq, ts in ((7, 1733000000000), (2**63 - 1, -5)):
        expected = orjson.dumps(
            {
                "op": "msg",
                "topic": topic,
                "seq": seq,
                "data": orjson.Fragment(payload),
                "from": {"id": sender_id, "name": name},
                "ts": ts,
            }
        )
        first = Message(seq, topic, payload, sender_id, name, ts)
        assert first.frame == expected and first.wire == text_frame(expected)
        wire_first = Message(seq, topic, payload, sender_id, name, ts)
        assert wire_first.wire == text_frame(expected) and wire_first.frame == expected
    renamed = Message(1, topic, payload, sender_id, name + "2", 0)  # the same sender renamed
    assert orjson.loads(renamed.frame)["from"] == {"id": sender_id, "name": name + "2"}


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_text_frame_header(size: int) -> None:
    from websockets.frames import Frame, Opcode
    from websockets.streams import StreamReader

    payload = b"x" * size
    reader = StreamReader()
    reader.feed_data(text_frame(payload))
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
        raise AssertionError("parser wanted more data")
    except StopIteration as done:
        frame = done.value
    assert frame.opcode is Opcode.TEXT and frame.fin and frame.data == payload


def test_error_and_ok_encoding() -> None:
    assert orjson.loads(encode_error(Forbidden("no", request_id="r"))) == {
        "op": "error",
        "code": "forbidden",
        "message": "no",
        "id": "r",
    }
    assert "id" not in orjson.loads(encode_error(BadRequest("bad")))
    assert orjson.loads(encode_ok(1, seq=3)) == {"op": "ok", "id": 1, "seq": 3}


_IDS = [0, 1, -1, 7, 2**63 - 1, -(2**63), 2**64 - 1, 1.5, 2.0, -0.0, "", "x", 'a"\\b\u00e9']


@pytest.mark.parametrize("request_id", _IDS)
@pytest.mark.parametrize("seq", [1, 42, 2**63 - 1])
def test_ack_is_the_ok_encoding(request_id: int | float | str, seq: int) -> None:
    # The publish ack's template gives the very bytes of the general encoder.
    assert encode_ack(request_id, seq) == encode_ok(request_id, seq=seq)


@pytest.mark.parametrize(
    "data",
    ["N", ["N"], {"a": "N"}, [1, [2, {"b": [3, "N"]}]], {"a": {"b": {"c": ["x", "N"]}}}],
)
def test_an_integer_beyond_64_bits_is_refused_at_any_depth(data: object) -> None:
    big = str(2**64)
    raw = orjson.dumps({"op": "pub", "topic": "t", "id": 1, "data": data}).decode()
    with pytest.raises(BadRequest, match="64 bits"):
        parse_request(raw.replace('"N"', big))
    # A float where the big integer was is a float, and 2**64 - 1 is exact: both pass.
    for fine in ("1.5", str(2**64 - 1), str(-(2**63))):
        parse_request(raw.replace('"N"', fine))
    with pytest.raises(BadRequest, match="64 bits"):
        parse_request(raw.replace('"N"', "1.5").replace('"id":1', f'"id":{big}'))
