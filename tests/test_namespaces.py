"""Namespaces (``[[namespace]]`` tables): reading and checking them, which one applies to a
topic, and their options at work in the stores and the server."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from broker.cli.main import cli
from broker.core.model import Draft
from broker.core.namespaces import (
    Namespace,
    Namespaces,
    can_match_inbox,
    overlap,
    parse_namespaces,
    render,
)
from broker.store.memory import MemoryStore
from broker.store.sqlite import SqliteStore

from .support import BrokerProcess, Peer, RedisServer, isolated_env


def parse(tables: list[dict[str, Any]], retention: float | None = None) -> tuple[Namespace, ...]:
    return parse_namespaces(tables, retention)


def test_a_namespace_reads_every_option() -> None:
    (space,) = parse(
        [
            {
                "pattern": "scores/#",
                "public": True,
                "history": 1,
                "retention": "7d",
                "presence": False,
            }
        ]
    )
    assert space == Namespace(
        "scores/#", public=True, history=1, retention=7 * 86400.0, presence=False
    )


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        ({"pattern": "a"}, "must be tables written [[namespace]]"),
        ([{"pattern": "a", "publik": True}], "unknown key 'publik'"),
        ([{"public": True}], "'pattern' is required"),
        ([{"pattern": "a/#/b"}], "pattern is not a valid pattern"),
        ([{"pattern": "a", "public": "yes"}], "public must be true or false"),
        ([{"pattern": "a", "history": -1}], "history must be a whole number"),
        ([{"pattern": "a", "retention": "soon"}], "'soon' is not a duration"),
        ([{"pattern": "a"}, {"pattern": "a", "history": 2}], "namespace 'a' is given twice"),
        ([{"pattern": "#", "public": True}], "it can match users' inboxes"),
        ([{"pattern": "+/#", "public": True}], "it can match users' inboxes"),
        ([{"pattern": "user/+", "public": True}], "it can match users' inboxes"),
        ([{"pattern": "user/alice", "public": True}], "it can match users' inboxes"),
        ([{"pattern": "$sys/#", "public": True}], "reserved"),
        (
            [{"pattern": "scores/secret"}, {"pattern": "scores/#", "public": True}],
            "earlier namespace 'scores/secret', not public",
        ),
    ],
)
def test_bad_namespaces_are_refused_with_one_line(tables: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse(tables)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_retention_longer_than_the_global_one_is_refused() -> None:
    with pytest.raises(ValueError, match="longer than the global retention"):
        parse([{"pattern": "a/#", "retention": "2d"}], retention=86400)
    assert parse([{"pattern": "a/#", "retention": "1h"}], retention=86400)[0].retention == 3600


def test_public_patterns_that_cannot_reach_an_inbox_or_a_reserved_topic() -> None:
    for pattern in ("scores/#", "+", "user", "user//x", "launch/+/t"):
        assert parse([{"pattern": pattern, "public": True}])[0].public
    assert not can_match_inbox("user")
    assert can_match_inbox("+/x")  # user/x is the inbox of user x


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/+", "a/b", True),
        ("a/#", "a", True),
        ("a/b", "a/c", False),
        ("a/+", "a/b/c", False),
        ("+/x", "$sys/x", False),
        ("#", "$sys", False),
        ("$sys/#", "$sys/x", True),
        ("a/+/c", "a/b/+", True),
    ],
)
def test_overlap(a: str, b: str, expected: bool) -> None:
    assert overlap(a, b) is expected
    assert overlap(b, a) is expected


def test_the_first_namespace_that_covers_a_topic_wins() -> None:
    spaces = Namespaces(
        parse(
            [
                {"pattern": "scores/live", "history": 1, "public": True},
                {"pattern": "scores/#", "history": 5, "public": True, "presence": False},
            ]
        )
    )
    assert spaces.history("scores/live", 1000) == 1
    assert spaces.history("scores/uk", 1000) == 5
    assert spaces.history("chat", 1000) == 1000
    assert not spaces.presence("scores/uk") and spaces.presence("chat")
    assert spaces.public == ("scores/live", "scores/#")
    assert spaces.is_public("scores/+") and not spaces.is_public("#")


def test_render_writes_the_tables_back() -> None:
    spaces = parse([{"pattern": "scores/#", "public": True, "retention": "7d"}, {"pattern": "x"}])
    assert render(spaces) == [
        "[[namespace]]",
        'pattern = "scores/#"',
        "public = true",
        'retention = "7d"',
        "[[namespace]]",
        'pattern = "x"',
    ]


def test_print_config_shows_the_namespaces(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    config.write_text(
        'history = 10\n[[namespace]]\npattern = "scores/#"\npublic = true\nhistory = 1\n'
    )
    result = CliRunner().invoke(
        cli, ["serve", "--config", str(config), "--print-config"], env=isolated_env(tmp_path)
    )
    assert result.exit_code == 0, result.output
    assert "[[namespace]]" in result.output
    assert 'pattern = "scores/#"\npublic = true\nhistory = 1' in result.output


def test_a_bad_namespace_stops_serve_with_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    config.write_text('[[namespace]]\npattern = "#"\npublic = true\n')
    result = CliRunner().invoke(cli, ["serve", "--config", str(config)], env=isolated_env(tmp_path))
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot be public" in lines[0], result.output


def drafts(topic: str, n: int, ts: int | None = None) -> list[Draft]:
    stamp = ts if ts is not None else int(time.time() * 1000)
    return [Draft(topic, b"%d" % i, "u", "u", stamp) for i in range(n)]


async def test_memory_store_keeps_each_namespace_s_history_and_retention() -> None:
    store = MemoryStore(history=100, retention=86400)
    store.namespaces = Namespaces(
        parse([{"pattern": "scores/#", "history": 1}, {"pattern": "news/#", "retention": "1h"}])
    )
    store.append_now(drafts("scores/a", 5) + drafts("chat", 5))
    old = int((time.time() - 7200) * 1000)
    store.append_now(drafts("news/x", 3, ts=old) + drafts("chat/old", 2, ts=old))
    assert [m.payload for m in await store.read_last("scores/a", 10, store.last_seq)] == [b"4"]
    assert len(await store.read_last("chat", 10, store.last_seq)) == 5
    assert await store.trim(time.time()) == 3
    assert await store.read_last("news/#", 10, store.last_seq) == []
    assert len(await store.read_last("chat/old", 10, store.last_seq)) == 2
    replay = await store.read_since("news/#", 0, store.last_seq)
    assert replay.recovered is False


async def test_sqlite_store_keeps_each_namespace_s_history_and_retention(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db.sqlite3", history=100, retention=86400)
    store.namespaces = Namespaces(
        parse([{"pattern": "scores/#", "history": 2}, {"pattern": "news/#", "retention": "1h"}])
    )
    await store.open()
    try:
        await store.append(drafts("scores/a", 5) + drafts("chat", 5))
        old = int((time.time() - 7200) * 1000)
        await store.append(drafts("news/x", 3, ts=old) + drafts("chat/old", 2, ts=old))
        await store.trim(time.time())
        last = await store.read_last("scores/a", 10, store.last_seq)
        assert [m.payload for m in last] == [b"3", b"4"]
        assert len(await store.read_last("chat", 10, store.last_seq)) == 5
        assert await store.read_last("news/#", 10, store.last_seq) == []
        assert len(await store.read_last("chat/old", 10, store.last_seq)) == 2
        assert (await store.read_since("news/#", 0, store.last_seq)).recovered is False
    finally:
        await store.close()


async def test_presence_off_in_a_namespace(make_broker: Any, tmp_path: Path) -> None:
    config = tmp_path / "ns.toml"
    config.write_text('[[namespace]]\npattern = "quiet/#"\npresence = false\n')
    broker: BrokerProcess = make_broker("--config", str(config))
    watcher = await Peer.open(broker.url, broker.token("w"))
    other = await Peer.open(broker.url, broker.token("o"))
    for topic in ("quiet/room", "loud/room"):
        assert (await watcher.request("sub", topic=topic, presence=True))["op"] == "ok"
        assert (await other.request("sub", topic=topic))["op"] == "ok"
    # The join on loud/room comes; none on quiet/room.
    frame = await watcher.recv()
    assert frame == {"op": "join", "topic": "loud/room", "user": {"id": "o", "name": "o"}}
    await watcher.expect_nothing()
    assert (await watcher.request("presence", topic="quiet/room"))["users"] == []
    loud = await watcher.request("presence", topic="loud/room")
    assert {u["id"] for u in loud["users"]} == {"w", "o"}
    await watcher.close()
    await other.close()


@pytest.mark.redis
async def test_redis_store_keeps_each_namespace_s_history_and_retention(
    redis_server: RedisServer,
) -> None:
    from broker.store.redis.store import RedisStore

    redis_server.ensure_running()
    redis_server.flush()
    store = RedisStore(redis_server.url, history=100, retention=86400)
    store.namespaces = Namespaces(
        parse([{"pattern": "scores/#", "history": 2}, {"pattern": "news/#", "retention": "1h"}])
    )
    await store.open()
    try:
        await store.append(drafts("scores/a", 5) + drafts("chat", 5))
        old = int((time.time() - 7200) * 1000)
        top = (await store.append(drafts("news/x", 3, ts=old) + drafts("chat/old", 2, ts=old)))[
            -1
        ].seq
        assert await store.trim(time.time()) == 3
        last = await store.read_last("scores/a", 10, top)
        assert [m.payload for m in last] == [b"3", b"4"]
        assert len(await store.read_last("chat", 10, top)) == 5
        assert await store.read_last("news/#", 10, top) == []
        assert len(await store.read_last("chat/old", 10, top)) == 2
        assert (await store.read_since("news/#", 0, top)).recovered is False
    finally:
        await store.close()
