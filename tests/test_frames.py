"""The WebSocket frame codec (broker/core/frames.py), alone: encoding and the incremental
parser, with bytes cut anywhere, fragments, control frames, masks, close frames, size
bounds and permessage-deflate; and garbage, which must only ever raise ``FrameError``."""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core import frames
from broker.core.frames import (
    BINARY,
    CLOSE,
    CONT,
    PING,
    PONG,
    TEXT,
    Frame,
    FrameError,
    Parser,
    apply_mask,
    close_payload,
    encode,
    parse_close,
    text_frame,
)

MASK = b"\x01\x02\x03\x04"
FAST = settings(max_examples=60, deadline=None)


def feed_in_pieces(parser: Parser, stream: bytes, cuts: Iterable[int]) -> list[Frame]:
    """Everything ``parser`` yields when ``stream`` arrives cut at ``cuts``."""
    got: list[Frame] = []
    last = 0
    for cut in sorted({c for c in cuts if 0 < c < len(stream)} | {len(stream)}):
        got.extend(parser.feed(stream[last:cut]))
        last = cut
    return got


def error_of(parser: Parser, stream: bytes) -> FrameError:
    with pytest.raises(FrameError) as caught:
        list(parser.feed(stream))
    return caught.value


def reference_mask(data: bytes, mask: bytes) -> bytes:
    return bytes(b ^ mask[i % 4] for i, b in enumerate(data))


# -- encoding ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "head"),
    [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10), (70000, 10)],
)
def test_length_forms(size: int, head: int) -> None:
    payload = b"x" * size
    plain = encode(payload, BINARY)
    assert len(plain) == head + size and plain[0] == 0x82 and not plain[1] & 0x80
    assert text_frame(payload) == encode(payload, TEXT)
    masked = encode(payload, TEXT, mask=MASK)
    assert len(masked) == head + 4 + size and masked[1] & 0x80
    assert masked[head : head + 4] == MASK
    assert masked[head + 4 :] == reference_mask(payload, MASK)
    assert list(Parser(masked=True).feed(masked)) == [(TEXT, payload)]
    assert list(Parser(masked=False).feed(plain)) == [(BINARY, payload)]


@given(st.binary(max_size=300), st.binary(min_size=4, max_size=4))
@FAST
def test_apply_mask_is_xor_with_the_key_repeated(data: bytes, mask: bytes) -> None:
    assert apply_mask(data, mask) == reference_mask(data, mask)
    assert apply_mask(apply_mask(data, mask), mask) == data


def test_websockets_c_mask_gives_the_same_bytes() -> None:
    speedups = pytest.importorskip("websockets.speedups")
    data = os.urandom(1000)
    for n in (0, 1, 3, 4, 5, 125, 1000):
        assert speedups.apply_mask(data[:n], MASK) == apply_mask(data[:n], MASK)
    parser = Parser(masked=True, apply_mask=speedups.apply_mask)
    assert list(parser.feed(encode(data, BINARY, mask=MASK))) == [(BINARY, data)]


def test_close_payload_cuts_the_reason_at_a_character() -> None:
    payload = close_payload(1001, "é" * 100)
    assert len(payload) <= 125
    assert parse_close(payload) == (1001, "é" * 61)
    assert parse_close(close_payload(4001)) == (4001, "")
    assert parse_close(b"") == (frames.CLOSE_NO_STATUS, "")


# -- round trips ------------------------------------------------------------------------

messages_st = st.lists(
    st.tuples(st.sampled_from([TEXT, BINARY]), st.binary(max_size=70_000)), max_size=4
)
small_messages_st = st.lists(
    st.tuples(st.sampled_from([TEXT, BINARY]), st.binary(max_size=300)), min_size=1, max_size=6
)


@given(messages_st, st.lists(st.integers(0, 300_000), max_size=12), st.booleans())
@FAST
def test_messages_cut_anywhere_round_trip(
    messages: list[tuple[int, bytes]], cuts: list[int], masked: bool
) -> None:
    stream = b"".join(
        encode(payload, opcode, mask=os.urandom(4) if masked else None)
        for opcode, payload in messages
    )
    parser = Parser(masked=masked, max_size=1 << 20)
    assert feed_in_pieces(parser, stream, cuts) == messages
    assert parser.buffered == 0


@given(small_messages_st, st.lists(st.integers(0, 5000), max_size=40))
@FAST
def test_byte_at_a_time_and_random_cuts_agree(
    messages: list[tuple[int, bytes]], cuts: list[int]
) -> None:
    stream = b"".join(encode(p, op, mask=MASK) for op, p in messages)
    one_by_one = feed_in_pieces(Parser(masked=True), stream, range(len(stream)))
    assert one_by_one == feed_in_pieces(Parser(masked=True), stream, cuts) == messages


def fragment(
    opcode: int, payload: bytes, sizes: list[int], mask: bytes | None, controls: list[bytes]
) -> bytes:
    """``payload`` as a fragmented message (pieces of ``sizes``), a ping after each piece
    whose control payload is given."""
    pieces: list[bytes] = []
    rest = payload
    for size in sizes:
        pieces.append(rest[:size])
        rest = rest[size:]
    pieces.append(rest)
    out = []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        out.append(encode(piece, opcode if i == 0 else CONT, mask=mask, fin=last))
        if i < len(controls) and not last:
            out.append(encode(controls[i], PING, mask=mask))
    return b"".join(out)


@given(
    st.sampled_from([TEXT, BINARY]),
    st.binary(max_size=2000),
    st.lists(st.integers(0, 500), max_size=8),
    st.lists(st.binary(max_size=125), max_size=8),
    st.lists(st.integers(0, 5000), max_size=8),
)
@FAST
def test_fragments_are_joined_and_controls_come_between(
    opcode: int, payload: bytes, sizes: list[int], pings: list[bytes], cuts: list[int]
) -> None:
    stream = fragment(opcode, payload, sizes, MASK, pings) + encode(b"after", TEXT, mask=MASK)
    got = feed_in_pieces(Parser(masked=True), stream, cuts)
    controls = pings[: len(sizes)]
    # Each ping as it arrived, before the message that its fragments make up.
    assert got == [(PING, p) for p in controls] + [(opcode, payload), (TEXT, b"after")]


def test_control_frames_pass_through() -> None:
    parser = Parser(masked=False)
    stream = encode(b"p", PING) + encode(b"q", PONG) + encode(close_payload(1000, "bye"), CLOSE)
    assert list(parser.feed(stream)) == [(PING, b"p"), (PONG, b"q"), (CLOSE, b"\x03\xe8bye")]


# -- protocol errors --------------------------------------------------------------------


def frame_bytes(head1: int, payload: bytes = b"", mask: bytes | None = MASK) -> bytes:
    """A frame with an arbitrary first byte (flags and opcode)."""
    raw = encode(payload, 0, mask=mask)
    return bytes((head1,)) + raw[1:]


@pytest.mark.parametrize(
    ("stream", "reason"),
    [
        (frame_bytes(0x83), "reserved opcode"),
        (frame_bytes(0x8B), "reserved opcode"),
        (frame_bytes(0xC1), "reserved bits"),  # RSV1 without deflate
        (frame_bytes(0xA1), "reserved bits"),
        (frame_bytes(0x91), "reserved bits"),
        (frame_bytes(0x89 & 0x7F, b"x"), "fragmented control"),
        (frame_bytes(0x89, b"x" * 126), "over 125"),
        (frame_bytes(0x80, b"x"), "continuation frame without a message"),
        (frame_bytes(0x01, b"a") + frame_bytes(0x81, b"b"), "inside a fragmented"),
        (frame_bytes(0x01, b"a") + frame_bytes(0x02, b"b"), "inside a fragmented"),
        (frame_bytes(0x88, b"\x03"), "1-byte"),
        (frame_bytes(0x88, (999).to_bytes(2, "big")), "invalid close code"),
        (frame_bytes(0x88, (1005).to_bytes(2, "big")), "invalid close code"),
        (frame_bytes(0x88, (5000).to_bytes(2, "big")), "invalid close code"),
        (bytes((0x81, 0xFF)) + (1 << 63).to_bytes(8, "big"), "2^63"),
        (encode(b"{}", TEXT), "without a mask"),
    ],
)
def test_protocol_errors_close_1002(stream: bytes, reason: str) -> None:
    error = error_of(Parser(masked=True), stream)
    assert error.code == frames.CLOSE_PROTOCOL_ERROR and reason in error.reason


def test_a_client_rejects_a_masked_server_frame() -> None:
    error = error_of(Parser(masked=False), encode(b"x", TEXT, mask=MASK))
    assert error.code == 1002 and "masked server frame" in error.reason


def test_close_reason_not_utf8_is_1007() -> None:
    error = error_of(Parser(masked=True), frame_bytes(0x88, b"\x03\xe8\xff"))
    assert error.code == frames.CLOSE_INVALID_DATA


def test_frames_before_the_error_are_yielded_and_the_parser_stays_failed() -> None:
    parser = Parser(masked=True)
    got: list[Frame] = []
    with pytest.raises(FrameError):
        for frame in parser.feed(encode(b"ok", TEXT, mask=MASK) + frame_bytes(0x83)):
            got.append(frame)
    assert got == [(TEXT, b"ok")]
    with pytest.raises(FrameError):
        list(parser.feed(encode(b"more", TEXT, mask=MASK)))


# -- size bounds ------------------------------------------------------------------------


def test_a_frame_over_the_bound_is_refused_from_its_header() -> None:
    parser = Parser(masked=True, max_size=1000)
    assert list(parser.feed(encode(b"x" * 1000, BINARY, mask=MASK))) == [(BINARY, b"x" * 1000)]
    head = encode(b"x" * 1001, BINARY, mask=MASK)[:4]  # the payload never arrives
    error = error_of(parser, head)
    assert error.code == frames.CLOSE_TOO_BIG
    huge = bytes((0x82, 0xFF)) + (1 << 40).to_bytes(8, "big")
    assert error_of(Parser(masked=True, max_size=1000), huge).code == frames.CLOSE_TOO_BIG


@given(st.lists(st.integers(1, 400), min_size=2, max_size=10))
@FAST
def test_a_message_over_the_bound_is_refused_though_each_fragment_fits(
    sizes: list[int],
) -> None:
    limit = 400
    payload = b"y" * sum(sizes)
    stream = fragment(TEXT, payload, sizes[:-1], MASK, [])
    parser = Parser(masked=True, max_size=limit)
    if len(payload) <= limit:
        assert list(parser.feed(stream)) == [(TEXT, payload)]
    else:
        assert error_of(parser, stream).code == frames.CLOSE_TOO_BIG


# -- permessage-deflate -----------------------------------------------------------------


def deflated(payload: bytes, compressor: zlib._Compress, mask: bytes | None = MASK) -> bytes:
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert data.endswith(b"\x00\x00\xff\xff")
    frame = encode(data[:-4], TEXT, mask=mask)
    return bytes((frame[0] | 0x40,)) + frame[1:]


@given(st.lists(st.binary(max_size=3000), min_size=1, max_size=5))
@FAST
def test_deflated_messages_are_inflated_with_context_takeover(payloads: list[bytes]) -> None:
    compressor = zlib.compressobj(wbits=-15)
    stream = b"".join(deflated(p, compressor) for p in payloads) + encode(b"plain", TEXT, mask=MASK)
    parser = Parser(masked=True, max_size=1 << 16, deflate=True)
    assert list(parser.feed(stream)) == [(TEXT, p) for p in payloads] + [(TEXT, b"plain")]


def test_a_deflate_bomb_is_refused_at_the_bound() -> None:
    bomb = deflated(b"\0" * 1_000_000, zlib.compressobj(wbits=-15))
    assert len(bomb) < 2000
    error = error_of(Parser(masked=True, max_size=65536, deflate=True), bomb)
    assert error.code == frames.CLOSE_TOO_BIG


def test_bad_deflate_data_is_a_protocol_error() -> None:
    frame = encode(b"\xff\xff\xff\xff", TEXT, mask=MASK)
    stream = bytes((frame[0] | 0x40,)) + frame[1:]
    assert error_of(Parser(masked=True, deflate=True), stream).code == 1002


# -- garbage ----------------------------------------------------------------------------


@given(
    st.binary(max_size=600),
    st.lists(st.integers(0, 600), max_size=6),
    st.booleans(),
    st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_garbage_only_ever_raises_frame_error(
    data: bytes, cuts: list[int], masked: bool, deflate: bool
) -> None:
    parser = Parser(masked=masked, max_size=256, deflate=deflate)
    try:
        for opcode, payload in feed_in_pieces(parser, data, cuts):
            assert opcode in (TEXT, BINARY, CLOSE, PING, PONG)
            assert isinstance(payload, bytes) and len(payload) <= 256
    except FrameError as exc:
        assert exc.code in (1002, 1007, 1009)
