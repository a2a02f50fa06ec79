"""Cluster mode under faults, judged by the history checker (tests/checker.py): publishers
with idempotency keys and resuming subscribers run while a node or Redis is killed,
restarted older, paused or made to refuse writes. Every acknowledged message reaches every
subscriber exactly once in seq order, or the subscriber hears ``recovered: false``; no
(epoch, seq) names two messages. Each test prints the checker's figures (``pytest -n 0 -s``);
docs/operations.md ("Faults and what they cost") gives them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .checker import Checker, History
from .redis_procs import Forwarder, Node, RedisProc, Sentinels, need_redis
from .support import free_port, wait_for

# Faults injected into redis-server processes (kills, snapshots, replicas).
pytestmark = [pytest.mark.redis, pytest.mark.slow]

#: Enough history that no acknowledged message of a run is trimmed by the count limit.
HISTORY = ("--history", "100000")

Cluster = Callable[..., tuple[RedisProc, list[Node]]]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """``cluster(n, persistence, *redis_args)``: a redis-server and n nodes on it."""
    need_redis()
    made: list[Any] = []

    def factory(n: int = 1, persistence: str = "none", *extra: str) -> tuple[RedisProc, list[Node]]:
        server = RedisProc(tmp_path / "redis", persistence, *extra).start()
        made.append(server)
        nodes = [Node(tmp_path / f"n{i}", server.url, *HISTORY) for i in range(n)]
        made.extend(nodes)
        for node in nodes:
            node.start()
        return server, nodes

    yield factory
    for proc in reversed(made):
        proc.kill()


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[Sentinels]:
    """A started primary + replica + three sentinels, stopped after the test."""
    need_redis()
    topology = Sentinels(tmp_path / "ha")
    try:
        yield topology.start()
    finally:
        topology.stop()


def report(name: str, history: History) -> dict[str, Any]:
    figures = history.figures()
    print(f"\n{name}: {figures}")
    return figures


async def run_with_fault(
    urls: list[str], token: Callable[[str], str], fault: Callable[[], Any], *, after: int = 150
) -> History:
    """Publish 100 messages, inject ``fault`` (blocking calls run off the event loop),
    publish ``after`` more, then finish and check."""
    checker = Checker(urls, token)
    async with checker.running(publishers=2, subscribers=2):
        await checker.wait_acks(100)
        await asyncio.get_running_loop().run_in_executor(None, fault)
        await checker.wait_acks(100 + after, timeout=30)
    history = await checker.finish()
    history.check()
    return history


async def test_a_node_killed(cluster: Cluster) -> None:
    server, (a, b) = cluster(2)
    history = await run_with_fault([a.url, b.url], a.token, a.kill)
    figures = report("cluster node kill -9", history)
    assert figures["epochs"] == 1 and figures["lost"] == 0
    assert figures["resumes"] > 2  # the clients of the killed node resumed on the other


@pytest.mark.slow
@pytest.mark.parametrize("persistence", ["rdb", "aof"])
async def test_redis_killed(cluster: Cluster, persistence: str) -> None:
    """kill -9 with snapshots every second, or with AOF fsynced every second: Redis comes
    back with up to about a second less than it acknowledged; a new epoch (also when it
    happened to keep everything: another server process, no node can tell), nothing
    reused, live subscribers go on, resuming ones hear recovered: false."""
    extra = ("--save", "1 1") if persistence == "rdb" else ()
    server, (node,) = cluster(1, persistence, *extra)

    def crash() -> None:
        if persistence == "rdb":  # a snapshot of some of what was acknowledged
            client = server.client()
            first = client.lastsave()
            wait_for(lambda: client.lastsave() != first, 5, 0.05)
        time.sleep(0.5)
        server.restart()

    history = await run_with_fault([node.url], node.token, crash)
    figures = report(f"redis kill -9 ({persistence})", history)
    assert figures["epochs"] == 2 and figures["recovered_false"] >= 2
    if figures["gone_from_history"]:
        assert "history went back" in node.log()
    else:  # Redis had every acknowledged write this time
        assert "another Redis server serves the history" in node.log()


async def test_redis_restarted_from_an_older_snapshot(cluster: Cluster) -> None:
    server, (a, b) = cluster(2, "rdb")

    def back_in_time() -> None:
        server.save()
        time.sleep(0.3)  # acknowledged after the snapshot: these go
        server.restart()

    history = await run_with_fault([a.url, b.url], a.token, back_in_time)
    figures = report("redis restarted from an older snapshot", history)
    assert figures["epochs"] == 2 and figures["gone_from_history"] > 0
    assert (a.log() + b.log()).count("history went back") == 1


@pytest.mark.slow
async def test_redis_paused(cluster: Cluster) -> None:
    """SIGSTOP for 5 s: publishes are refused (unavailable) or wait, then everything goes
    on in the same epoch and nothing is lost."""
    server, (a, b) = cluster(2)

    def pause() -> None:
        server.pause()
        time.sleep(5)
        server.resume()

    history = await run_with_fault([a.url, b.url], a.token, pause)
    figures = report("redis SIGSTOP 5 s", history)
    assert figures["epochs"] == 1 and figures["lost"] == 0
    assert figures["longest_wait"] >= 4


@pytest.mark.parametrize(
    "refusal", ["maxmemory", pytest.param("min-replicas", marks=pytest.mark.slow)]
)
async def test_redis_refusing_writes(cluster: Cluster, refusal: str) -> None:
    """Out of memory (noeviction) or too few replicas for min-replicas-to-write for 2 s:
    publishes get unavailable, nothing acknowledged is lost, same epoch."""
    server, (node,) = cluster(1)
    setting = {"maxmemory": ("maxmemory", "1"), "min-replicas": ("min-replicas-to-write", "1")}
    name, value = setting[refusal]

    def refuse() -> None:
        client = server.client()
        before = client.config_get(name)[name]
        client.config_set(name, value)
        time.sleep(2)
        client.config_set(name, before)

    history = await run_with_fault([node.url], node.token, refuse)
    figures = report(f"redis refusing writes ({refusal})", history)
    assert figures["epochs"] == 1 and figures["lost"] == 0
    assert figures["failed_attempts"].get("unavailable", 0) > 0


@pytest.mark.slow
@pytest.mark.parametrize("wait", [0, 1])
async def test_sentinel_failover(sentinels: Sentinels, tmp_path: Path, wait: int) -> None:
    """The primary killed mid-stream; Sentinel promotes the replica and the nodes follow
    it. With redis_wait 1 every acknowledged publish was on the replica: nothing
    acknowledged is lost, but publishes are refused until a replica is back (here: the
    old primary, restarted). Without, what the replica had not received is lost. Either
    way the nodes start a new epoch on the promoted replica (another server: they cannot
    tell what it lacks) instead of handing lost seqs out again."""
    args = (*HISTORY, "--redis-wait", str(wait)) if wait else HISTORY
    nodes = [Node(tmp_path / f"n{i}", sentinels.url, *args).start() for i in range(2)]
    try:
        old = sentinels.primary.port

        def kill_primary() -> None:
            sentinels.primary.kill()
            wait_for(lambda: sentinels.primary_port() not in (None, old), 20, 0.1)
            if wait:
                # WAIT 1 needs a replica: until the old primary is back as a replica of
                # the new one, publishes are refused.
                new = sentinels.primary_port()
                sentinels.primary.extra = ["--replicaof", "127.0.0.1", str(new)]
                sentinels.primary.start()

        history = await run_with_fault(
            [n.url for n in nodes], nodes[0].token, kill_primary, after=100
        )
        figures = report(f"sentinel failover, redis_wait {wait}", history)
        if wait:
            assert figures["lost"] == 0
        assert figures["epochs"] == 2
        logs = "".join(n.log() for n in nodes)
        assert logs.count("history went back") + logs.count("another Redis server") == 1
    finally:
        for node in nodes:
            node.kill()


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[tuple[RedisProc, RedisProc, Forwarder]]:
    """A primary, its replica, and a managed endpoint (``Forwarder``) on the primary."""
    need_redis()
    primary = RedisProc(tmp_path / "primary", "none").start()
    replica = RedisProc(tmp_path / "replica", "none", "--replicaof", "127.0.0.1", str(primary.port))
    replica.start()
    in_sync = lambda: replica.client().info("replication")["master_link_status"] == "up"  # noqa: E731
    wait_for(in_sync, 10)
    forwarder = Forwarder(primary.port).start()
    try:
        yield primary, replica, forwarder
    finally:
        forwarder.close()
        primary.kill()
        replica.kill()


def offsets_equal(primary: RedisProc, replica: RedisProc) -> bool:
    ours = primary.client().info("replication")["master_repl_offset"]
    return bool(replica.client().info("replication")["master_repl_offset"] == ours)


@pytest.mark.slow
async def test_managed_endpoint_switchover(
    endpoint: tuple[RedisProc, RedisProc, Forwarder], tmp_path: Path
) -> None:
    """A planned failover behind an endpoint that moves: writes paused, the replica caught
    up and promoted, the endpoint moved, the old primary demoted. Connections still on the
    old primary get READONLY; the node drops them and reconnects to the endpoint.
    Nothing is lost; a new epoch all the same (another server serves the history, and no
    node can prove it has everything), so resuming clients replay what is retained."""
    primary, replica, forwarder = endpoint
    nodes = [Node(tmp_path / f"n{i}", forwarder.url, *HISTORY).start() for i in range(2)]
    try:

        def switchover() -> None:
            old = primary.client()
            old.client_pause(5000, all=False)
            wait_for(lambda: offsets_equal(primary, replica), 5, 0.01)
            replica.client().replicaof("NO", "ONE")
            forwarder.target = replica.port
            old.replicaof("127.0.0.1", str(replica.port))
            old.client_unpause()

        history = await run_with_fault([n.url for n in nodes], nodes[0].token, switchover)
        figures = report("managed endpoint switchover", history)
        assert figures["epochs"] == 2 and figures["lost"] == 0
        assert figures["gone_from_history"] == 0
    finally:
        for node in nodes:
            node.kill()


@pytest.mark.parametrize("wait", [0, pytest.param(1, marks=pytest.mark.slow)])
async def test_failover_to_a_lagging_replica(
    endpoint: tuple[RedisProc, RedisProc, Forwarder], tmp_path: Path, wait: int
) -> None:
    """The primary dies while its replica lags (here: cut off for 0.5 s), the replica is
    promoted and the endpoint moves to it. Without redis_wait what it had not received is
    gone from history, and the nodes start a new epoch instead of handing those seqs out
    again. With redis_wait 1 nothing acknowledged is gone: publishes were refused while
    the replica was cut off, and again until the old primary is back as a replica."""
    primary, replica, forwarder = endpoint
    args = (*HISTORY, "--redis-wait", "1") if wait else HISTORY
    nodes = [Node(tmp_path / f"n{i}", forwarder.url, *args).start() for i in range(2)]
    try:

        def failover() -> None:
            # Cut the replica off (as a partition does: pointed at an address where no
            # one answers, it keeps its data), so that it lags by 0.5 s of publishes.
            replica.client().replicaof("127.0.0.1", str(free_port()))
            time.sleep(0.5)
            primary.kill()
            replica.client().replicaof("NO", "ONE")
            forwarder.target = replica.port
            if wait:
                primary.extra = ["--replicaof", "127.0.0.1", str(replica.port)]
                primary.start()

        history = await run_with_fault([n.url for n in nodes], nodes[0].token, failover)
        figures = report(f"failover to a lagging replica, redis_wait {wait}", history)
        logs = "".join(n.log() for n in nodes)
        # One new epoch, logged once: "history went back" when a node had seen more than
        # the replica holds, "another Redis server" when none had.
        assert figures["epochs"] == 2
        assert logs.count("history went back") + logs.count("another Redis server") == 1
        if wait:
            assert figures["gone_from_history"] == 0
        else:
            assert figures["gone_from_history"] > 0
    finally:
        for node in nodes:
            node.kill()
