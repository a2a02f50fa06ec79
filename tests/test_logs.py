"""Logs: ``--log-format json`` lines from a real broker carry event, conn and user, and
never a token or a message payload."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from broker.server.logs import REDACTED, JsonFormatter, RedactTokens, setup_logging

from .support import BrokerProcess, Peer, async_wait_for

pytestmark = pytest.mark.process

PAYLOAD = "payload-marker-7f3a9c"


def json_lines(broker: BrokerProcess) -> list[dict[str, Any]]:
    lines = [line for line in broker.log().splitlines() if line.strip()]
    entries = [orjson.loads(line) for line in lines]  # every line is one JSON object
    for entry in entries:
        assert isinstance(entry, dict)
        assert {"ts", "level", "logger", "msg"} <= entry.keys(), entry
    return entries


def events(entries: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in entries if e.get("event") == name]


def disconnected(broker: BrokerProcess) -> set[str]:
    """Users whose disconnect the running broker has logged so far (a line being written
    is skipped)."""
    users = set()
    for line in broker.log().splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            entry = orjson.loads(line)
            if isinstance(entry, dict) and entry.get("event") == "disconnect":
                users.add(str(entry.get("user")))
    return users


async def closed_with(peer: Peer) -> int | None:
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await peer.recv(timeout=10)
    return closed.value.rcvd.code if closed.value.rcvd is not None else None


async def test_json_logs_have_events_ids_and_no_secrets(
    make_broker: Callable[..., BrokerProcess],
) -> None:
    broker = make_broker("--log-format", "json", "--max-queue", "1KiB", memory=True)
    tokens: list[str] = []

    def token(user: str, **kw: Any) -> str:
        tokens.append(broker.token(user, user.title(), **kw))
        return tokens[-1]

    alice = await Peer.open(broker.url, token("alice"))
    await alice.request("sub", topic="chat/room")
    bob = await Peer.open_with_header(broker.url, token("bob"))
    assert (await bob.recv())["op"] == "hello"
    assert (await bob.request("pub", topic="chat/room", data={"text": PAYLOAD}))["op"] == "ok"
    assert (await alice.recv())["data"] == {"text": PAYLOAD}

    # Refused: a forged token on the handshake, an expired one as the first frame.
    forged = jwt.encode({"sub": "mallory"}, "not-the-secret-" * 3, algorithm="HS256")
    tokens.append(forged)
    with pytest.raises(InvalidStatus):
        await connect(
            broker.url, additional_headers={"Authorization": f"Bearer {forged}"}, open_timeout=5
        )
    late = await Peer.open(broker.url)
    await late.send({"op": "auth", "token": token("late", ttl=-60)})
    assert (await late.recv())["code"] == "unauthorized"

    # Closed by the broker: an expiring token (4003) and a slow consumer (4008).
    carol = await Peer.open(broker.url, token("carol", ttl=2))
    dave = await Peer.open(broker.url, token("dave"))
    await dave.request("sub", topic="big")
    assert (await bob.request("pub", topic="big", data=PAYLOAD * 100))["op"] == "ok"
    assert await closed_with(dave) == 4008
    assert await closed_with(carol) == 4003

    await alice.close()
    await bob.close()
    # Their closes (1000) are logged before the shutdown would close them (1001).
    await async_wait_for(lambda: {"alice", "bob"} <= disconnected(broker), 5)
    assert broker.stop() == 0

    text = broker.log()
    for secret in tokens:
        assert secret not in text
    assert "eyJ" not in text  # nothing token-shaped at all
    assert PAYLOAD not in text

    entries = json_lines(broker)
    assert events(entries, "listening") and events(entries, "stopped")

    connects = {e["user"]: e for e in events(entries, "connect")}
    assert set(connects) == {"alice", "bob", "carol", "dave"}
    for entry in connects.values():
        assert isinstance(entry["conn"], int) and entry["peer"].startswith("127.0.0.1:")
    assert len({e["conn"] for e in connects.values()}) == 4

    disconnects = {e["user"]: e for e in events(entries, "disconnect")}
    assert set(disconnects) == {"alice", "bob", "carol", "dave"}
    for user, entry in disconnects.items():
        assert entry["conn"] == connects[user]["conn"]
    assert disconnects["alice"]["code"] == 1000

    [expired] = events(entries, "token_expired")
    assert expired["user"] == "carol" and expired["conn"] == connects["carol"]["conn"]
    assert expired["code"] == 4003
    [slow] = events(entries, "slow_consumer")
    assert slow["user"] == "dave" and slow["conn"] == connects["dave"]["conn"]
    assert slow["code"] == 4008 and slow["level"] == "warning"

    refused = events(entries, "refused")
    assert len(refused) == 2
    for entry in refused:
        assert entry["result"] == "unauthorized" and entry["peer"].startswith("127.0.0.1:")
        assert "user" not in entry and "conn" not in entry
    assert "invalid signature" in refused[0]["msg"] and "expired" in refused[1]["msg"]


async def test_refused_origin_is_logged(make_broker: Callable[..., BrokerProcess]) -> None:
    broker = make_broker(
        "--log-format", "json", "--allowed-origin", "https://ok.example", memory=True
    )
    with pytest.raises(InvalidStatus):
        await connect(broker.url, origin="https://evil.example", open_timeout=5)  # type: ignore[arg-type]
    broker.stop()
    [entry] = events(json_lines(broker), "refused")
    assert entry["result"] == "forbidden_origin"


# -- formatter units -------------------------------------------------------------------


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactTokens())
    logger = logging.getLogger("test.logs.captured")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def test_json_formatter_puts_extra_fields_at_top_level(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured
    logger.info(
        "connect %s", 7, extra={"peer": "1.2.3.4:5", "user": "u1", "conn": 7, "event": "connect"}
    )
    entry = orjson.loads(stream.getvalue())
    assert list(entry) == ["ts", "level", "logger", "msg", "event", "conn", "user", "peer"]
    assert entry["msg"] == "connect 7" and entry["level"] == "info"
    assert entry["ts"].endswith("Z")


def test_token_shaped_text_is_redacted(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    token = jwt.encode({"sub": "1"}, "k" * 32, algorithm="HS256")
    logger.warning("header was %s", f"Bearer {token}")
    try:
        raise ValueError(f"bad {token}")
    except ValueError:
        logger.exception("failed")
    text = stream.getvalue()
    assert token not in text and text.count(REDACTED) == 2
    assert all(orjson.loads(line) for line in text.splitlines())


def test_rich_format_off_a_terminal_is_one_plain_line(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("info", "rich")
        logging.getLogger("broker").info("hello " + "x" * 300, extra={"event": "e"})
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].rstrip().endswith("x" * 300) and "INFO" in lines[0]
