"""Random frames (hypothesis) against a real broker: every answer is a well-formed server
frame with a documented error code, and the connection still round-trips afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from broker.errors import ERROR_CODES

from .harness import Broker, BrokerThread
from .support import (
    SECRET_B,
    Peer,
    forge,
    http_get,
)


@pytest.fixture(scope="module")
def fuzz_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    server = BrokerThread(tmp_path_factory.mktemp("fuzz"), "--history", "50", memory=True).start()
    yield server
    server.close()


OPS = ["auth", "sub", "unsub", "pub", "presence", "stats"]
SERVER_OPS = {"hello", "ok", "error", "msg", "join", "leave"}
EXPECTED_ERROR_CODES = set(ERROR_CODES) - {"internal"}  # a fuzzed frame is never a server bug

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_value = st.recursive(
    json_leaf,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=10,
)
topic_like = st.one_of(
    st.sampled_from(
        [
            "a",
            "a/b",
            "a/+",
            "#",
            "+/#",
            "a//b",
            "",
            "/",
            "$SYS/x",
            "user/fuzz",
            "user/other/x",
            "a#",
            "a/#/b",
            "é/ü",
            "x" * 300,
        ]
    ),
    st.text(max_size=12),
    json_value,
)
ids = st.one_of(st.integers(), st.text(max_size=6), json_value)
counts = st.one_of(st.integers(min_value=-3, max_value=2**66), json_value)


def _sign(claims: dict[str, Any], key: bytes = SECRET_B) -> str:
    try:
        return forge({"alg": "HS256", "typ": "JWT"}, claims, key)
    except (TypeError, ValueError):
        return "unencodable"


claims_st = st.fixed_dictionaries(
    {},
    optional={
        "sub": st.one_of(st.sampled_from(["fuzz", "other", "", "a/b", "1"]), json_value),
        "id": json_value,
        "name": json_value,
        "exp": st.one_of(
            st.integers(min_value=-(2**40), max_value=2**80),
            st.floats(allow_nan=False, allow_infinity=False),
            json_value,
        ),
        "nbf": st.one_of(st.integers(min_value=-(2**40), max_value=2**80), json_value),
        "iat": json_value,
        "acl": st.one_of(
            json_value,
            st.fixed_dictionaries(
                {},
                optional={
                    "pub": st.lists(topic_like, max_size=3),
                    "sub": st.lists(topic_like, max_size=3),
                },
            ),
        ),
        "admin": json_value,
    },
)
tokens = st.one_of(
    st.builds(_sign, claims_st),  # correctly signed, random claims
    st.builds(_sign, claims_st, st.binary(max_size=8)),  # random claims, wrong key
    st.builds(
        lambda a, b, c: f"{a}.{b}.{c}",
        st.text(max_size=20),
        st.text(max_size=40),
        st.text(max_size=20),
    ),
    st.builds(
        lambda h, p: forge(h, p),
        st.dictionaries(st.text(max_size=5), json_value, max_size=3),
        claims_st,
    ),
    st.text(max_size=50),
    json_value,
)
op_frames = st.fixed_dictionaries(
    {"op": st.one_of(st.sampled_from(OPS), json_value)},
    optional={
        "id": ids,
        "topic": topic_like,
        "data": json_value,
        "since": counts,
        "last": counts,
        "epoch": json_value,
        "echo": json_value,
        "presence": json_value,
        "token": tokens,
    },
)
frames_st = st.lists(
    st.one_of(
        op_frames.map(lambda f: ("json", f)),
        st.fixed_dictionaries({"op": st.just("auth")}, optional={"id": ids, "token": tokens}).map(
            lambda f: ("json", f)
        ),
        json_value.map(lambda v: ("json", v)),
        st.text(max_size=60).map(lambda t: ("text", t)),
        st.binary(max_size=60).map(lambda b: ("bytes", b)),
    ),
    min_size=1,
    max_size=8,
)


def check_server_frame(raw: str | bytes) -> dict[str, Any]:
    assert isinstance(raw, str), "the server sent a binary frame"
    frame = orjson.loads(raw)
    assert isinstance(frame, dict) and frame.get("op") in SERVER_OPS, frame
    if frame["op"] == "error":
        assert frame["code"] in EXPECTED_ERROR_CODES, frame
        assert isinstance(frame["message"], str) and frame["message"], frame
    return frame


def wire(kind: str, value: Any) -> str | bytes:
    if kind == "json":
        return json.dumps(value)  # stdlib: ints beyond 64 bits too
    return value


async def fuzz_one(
    broker: Broker, frames: list[tuple[str, Any]], junk: bytes, header_token: Any = None
) -> None:
    # 1. An authenticated connection gets every frame, then a sentinel request.
    ws = await connect(
        broker.url,
        additional_headers={"Authorization": f"Bearer {broker.token('fuzz')}"},
        max_size=None,
    )
    assert check_server_frame(await ws.recv())["op"] == "hello"
    sent_auth = False
    for kind, value in frames:
        sent_auth |= kind == "json" and isinstance(value, dict) and value.get("op") == "auth"
        with contextlib.suppress(ConnectionClosed):
            await ws.send(wire(kind, value))
    with contextlib.suppress(ConnectionClosed):
        await ws.send(json.dumps({"op": "presence", "id": "sentinel", "topic": "sentinel"}))
    seen_codes: list[str] = []
    try:
        while True:
            frame = check_server_frame(await asyncio.wait_for(ws.recv(), 10))
            seen_codes.append(frame.get("code", frame["op"]))
            if frame.get("id") == "sentinel" and frame["op"] in ("ok", "error"):
                assert frame["op"] == "ok", frame
                break
    except ConnectionClosed:
        # Only a bad refresh closes (4001), or a refresh with a token about to expire (4003).
        assert sent_auth and ws.close_code in (4001, 4003), (ws.close_code, ws.close_reason)
        if ws.close_code == 4001:
            assert "unauthorized" in seen_codes, (ws.close_code, seen_codes)
    await ws.close()

    # 2. An unauthenticated connection gets the first frame: hello, or unauthorized + 4001.
    kind, value = frames[0]
    ws = await connect(broker.url, max_size=None)
    await ws.send(wire(kind, value))
    try:
        frame = check_server_frame(await asyncio.wait_for(ws.recv(), 10))
        if frame["op"] == "hello":
            assert isinstance(value, dict) and value.get("op") == "auth"
        else:
            assert (frame["op"], frame["code"]) == ("error", "unauthorized"), frame
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == 4001
    except ConnectionClosed:
        # A refused auth whose token expired in between is still "unauthorized"; any other
        # close without an error frame is wrong.
        raise AssertionError(f"closed {ws.close_code} without an error frame") from None
    await ws.close()

    # 3. A random token in the handshake header: 101 + hello, or 401 with a one-line reason.
    if isinstance(header_token, str) and header_token.isascii() and header_token.isprintable():
        try:
            ws = await connect(
                broker.url,
                additional_headers={"Authorization": f"Bearer {header_token}"},
                open_timeout=10,
            )
        except InvalidStatus as exc:
            assert exc.response.status_code == 401, exc.response
            assert (exc.response.body or b"").strip() and b"\n" not in (
                exc.response.body or b""
            ).strip()
        else:
            assert check_server_frame(await asyncio.wait_for(ws.recv(), 10))["op"] == "hello"
            await ws.close()

    # 4. Junk on the raw TCP port, before any handshake.
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
    writer.write(junk)
    with contextlib.suppress(ConnectionError):
        await writer.drain()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(reader.read(1024), 0.05)
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


@pytest.mark.slow
def test_fuzz_random_frames_then_round_trip(fuzz_broker: BrokerThread) -> None:
    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
    )
    @given(frames=frames_st, junk=st.binary(max_size=200), header_token=tokens)
    def fuzz(frames: list[tuple[str, Any]], junk: bytes, header_token: Any) -> None:
        asyncio.run(fuzz_one(fuzz_broker, frames, junk, header_token))
        assert fuzz_broker.running, fuzz_broker.log()[-3000:]

    fuzz()

    async def round_trip() -> None:
        reader = await Peer.open(fuzz_broker.url, fuzz_broker.token("reader"))
        assert (await reader.request("sub", topic="final/+"))["op"] == "ok"
        writer = await Peer.open_with_header(fuzz_broker.url, fuzz_broker.token("writer", "Writer"))
        assert (await writer.recv())["op"] == "hello"
        ok = await writer.request("pub", topic="final/check", data={"still": "alive"})
        msg = await reader.recv()
        assert msg["op"] == "msg" and msg["seq"] == ok["seq"]
        assert (msg["data"], msg["from"]) == (
            {"still": "alive"},
            {"id": "writer", "name": "Writer"},
        )

    asyncio.run(round_trip())
    assert fuzz_broker.running
    assert http_get(fuzz_broker.http_url + "/healthz") == (200, b"ok")
    log = fuzz_broker.log()
    assert "Traceback" not in log and "internal error" not in log, log[-5000:]
