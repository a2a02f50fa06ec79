"""A node's link to Redis: the URL forms it accepts (one address, or Sentinel:
``redis+sentinel://host:26379[,host:port...]/service[/db]``), and an address that moves to
a new primary (a managed endpoint)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from broker.errors import ConfigError, Unavailable
from broker.store.redis.link import Link, check_url, describe, parse_sentinel_url

from .redis_procs import Forwarder, RedisProc, need_redis
from .support import ROOT, wait_for


def test_sentinel_url_parts() -> None:
    s = parse_sentinel_url("redis+sentinel://u:p%40ss@a:26380,b,[::1]:5/mymaster/3")
    assert s.sentinels == [("a", 26380), ("b", 26379), ("::1", 5)]
    assert (s.service, s.db, s.username, s.password, s.tls) == ("mymaster", 3, "u", "p@ss", False)
    assert parse_sentinel_url("rediss+sentinel://h/m").db == 0
    assert parse_sentinel_url("rediss+sentinel://h/m").tls


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("redis+sentinel://h:26379", "expected /service"),
        ("redis+sentinel://h:26379/m/x", "is not a number"),
        ("redis+sentinel://h:port/m", "is not host:port"),
        ("redis+sentinel://h,,g/m", "empty"),
        ("http://h/0", "is not a Redis URL"),
    ],
)
def test_bad_urls_say_what_is_wrong(url: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        check_url(url)


def test_logs_never_show_the_password() -> None:
    assert describe("redis://:secret@h:7000/2") == "redis h:7000/2"
    assert describe("redis+sentinel://:secret@s1:1,s2:2/ha/1") == "redis sentinel s1:1 (+1) ha/1"
    link = Link("redis+sentinel://:secret@s1:1/ha/0", 1.0)
    assert "secret" not in link.health.label


@pytest.mark.slow
def test_serve_accepts_sentinel_urls_and_refuses_others() -> None:
    run = [sys.executable, "-m", "broker.cli", "serve", "--print-config", "--redis"]
    ok = subprocess.run(
        [*run, "redis+sentinel://127.0.0.1:1/ha/0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [*run, "sentinel://h/ha"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert bad.returncode != 0 and "redis+sentinel://" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.slow
async def test_an_endpoint_that_moves_is_resolved_again(tmp_path: Path) -> None:
    """Connections still open to the old primary (now a replica) get READONLY: the link
    closes its pool, and the next command reaches the new primary through the endpoint."""
    need_redis()
    old = RedisProc(tmp_path / "a", "none").start()
    new = RedisProc(tmp_path / "b", "none", "--replicaof", "127.0.0.1", str(old.port)).start()
    endpoint = Forwarder(old.port).start()
    link = Link(endpoint.url, 1.0)
    try:
        assert await link.call("test", link.redis.set("k", "1"))
        wait_for(lambda: new.client().get("k") == b"1", 10)
        new.client().replicaof("NO", "ONE")
        endpoint.target = new.port
        old.client().replicaof("127.0.0.1", str(new.port))
        with pytest.raises(Unavailable, match="failing over"):
            await link.call("test", link.redis.set("k", "2"))
        assert await link.call("test", link.redis.set("k", "3"))
        assert new.client().get("k") == b"3"
        assert not link.health.down
    finally:
        await link.close()
        endpoint.close()
        old.kill()
        new.kill()
