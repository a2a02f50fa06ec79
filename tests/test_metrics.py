"""Metrics: ``GET /metrics`` and the ``stats`` op after a known workload, exact figures.

The workload runs against a real broker process; the Prometheus text is parsed with
``prometheus_client``'s own parser. Every frame the peers send and receive is tallied, so
the byte counters are checked exactly too.
"""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from broker.errors import ERROR_CODES
from broker.server.config import ServerConfig
from broker.server.factory import create_server
from broker.server.metrics import (
    ATTEMPT_RESULTS,
    LIMITS,
    FastHistogram,
    Metrics,
    TopTopics,
)

from .harness import Broker
from .support import Peer

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

GOOD_ORIGIN = "https://console.example"


def ws_frame_size(payload: bytes) -> int:
    """Bytes of an unmasked server frame carrying ``payload`` (RFC 6455 5.2)."""
    n = len(payload)
    return n + (2 if n < 126 else 4 if n < 65536 else 10)


class Tally:
    """Bytes the peers sent (payloads) and received (whole server frames)."""

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0


class CountingPeer(Peer):
    """A ``Peer`` that adds what it sends and receives to a ``Tally``."""

    tally: Tally

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        data = orjson.dumps(frame).decode() if isinstance(frame, dict) else frame
        self.tally.sent += len(data.encode() if isinstance(data, str) else data)
        await super().send(data)

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        self.tally.received += ws_frame_size(raw.encode() if isinstance(raw, str) else raw)
        frame = orjson.loads(raw)
        assert isinstance(frame, dict)
        return frame


def counting(tally: Tally) -> type[CountingPeer]:
    return type("Counted", (CountingPeer,), {"tally": tally})


def scrape(broker: Broker) -> tuple[str, str]:
    with urllib.request.urlopen(broker.http_url + "/metrics", timeout=5) as response:
        return response.headers["Content-Type"], response.read().decode()


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def test_metrics_and_stats_after_a_known_workload(
    make_broker: Callable[..., Broker],
) -> None:
    broker = make_broker("--rate-limit", "10", "--allowed-origin", GOOD_ORIGIN, memory=True)
    tally = Tally()
    P = counting(tally)

    # Refused attempts: a bad token on the handshake, a browser from another origin.
    with pytest.raises(InvalidStatus) as refused:
        await connect(
            broker.url, additional_headers={"Authorization": "Bearer garbage"}, open_timeout=5
        )
    assert refused.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as refused:
        await connect(broker.url, origin="https://evil.example", open_timeout=5)  # type: ignore[arg-type]
    assert refused.value.response.status_code == 403

    # Three subscribers: two on scores/uk, one on the pattern scores/#.
    subs = [await P.open(broker.url, broker.token(f"s{i}")) for i in range(3)]
    for peer, topic in zip(subs, ["scores/uk", "scores/uk", "scores/#"]):
        assert (await peer.request("sub", topic=topic))["op"] == "ok"

    # Eleven publishes sent at once at a limit of 10 per second: the eleventh is refused.
    pub = await P.open(broker.url, broker.token("pub"))
    topics = ["scores/uk"] * 7 + ["scores/fr"] * 3 + ["scores/uk"]
    for i, topic in enumerate(topics, 1):
        await pub.send({"op": "pub", "id": i, "topic": topic, "data": {"n": i}})
    replies = sorted([await pub.recv() for _ in topics], key=lambda r: r["id"])
    assert [r["op"] for r in replies] == ["ok"] * 10 + ["error"]  # the error comes first
    assert replies[-1]["code"] == "rate_limited"

    for peer, expected in zip(subs, [7, 7, 10]):
        got = [await peer.recv() for _ in range(expected)]
        assert all(m["op"] == "msg" for m in got)
        await peer.expect_nothing(0.1)

    admin = await P.open(broker.url, broker.token("root", admin=True), hello=True)
    stats = await admin.request("stats")
    assert stats["op"] == "ok"
    figures = {k: stats[k] for k in stats if k not in ("op", "id", "uptime", "epoch")}
    assert figures == {
        "connections": 5,
        "subscriptions": 3,
        "topics": 2,
        "messages_in": 10,
        "messages_out": 24,  # 7 x 3 on scores/uk, 3 x 1 on scores/fr
        "last_seq": 10,
        "pending_commits": 0,
        "bytes_in": tally.sent,  # the stats request itself included
        "bytes_out": figures["bytes_out"],  # checked against the scrape below
        "slow_consumer_closes": 0,
        "rate_limited": 1,
        "errors": {code: int(code == "rate_limited") for code in ERROR_CODES},
        "connection_attempts": {
            "accepted": 5,
            "unauthorized": 1,
            "forbidden_origin": 1,
            "over_capacity": 0,
            "shutting_down": 0,
            "abandoned": 0,
        },
        "top_topics": {"scores/uk": 7, "scores/fr": 3},
        "limit_hits": dict.fromkeys(LIMITS, 0),
        "max_connections": figures["max_connections"],  # from the descriptor limit
        "unauthenticated": 0,
        "anonymous": 0,
        "streams": 0,
    }
    assert figures["max_connections"] > 100
    assert list(stats["top_topics"]) == ["scores/uk", "scores/fr"]  # busiest first
    # Everything written before the stats reply has been read by the peers.
    assert figures["bytes_out"] == tally.received - ws_frame_size(orjson.dumps(stats))

    content_type, text = await asyncio.to_thread(scrape, broker)
    assert content_type == CONTENT_TYPE_LATEST
    m = parse(text)
    assert value(m, "broker_connections") == 5
    assert value(m, "broker_subscriptions") == 3
    assert value(m, "broker_topics") == 2
    assert value(m, "broker_messages_published_total") == 10
    assert value(m, "broker_messages_delivered_total") == 24
    assert value(m, "broker_rate_limited_publishes_total") == 1
    assert value(m, "broker_slow_consumer_closes_total") == 0
    assert value(m, "broker_received_bytes_total") == tally.sent
    assert value(m, "broker_sent_bytes_total") == tally.received
    for code in ERROR_CODES:
        assert value(m, "broker_errors_total", code=code) == (code == "rate_limited")
    attempts = {r: value(m, "broker_connection_attempts_total", result=r) for r in ATTEMPT_RESULTS}
    assert attempts == {
        "accepted": 5,
        "unauthorized": 1,
        "forbidden_origin": 1,
        "over_capacity": 0,
        "shutting_down": 0,
        "abandoned": 0,
    }
    assert value(m, "broker_publish_ack_seconds_count") == 10
    assert value(m, "broker_publish_ack_seconds_bucket", le="+Inf") == 10
    commits = value(m, "broker_store_commit_seconds_count")
    assert 1 <= commits <= 10
    assert value(m, "broker_store_commit_batch_size_sum") == 10
    assert value(m, "broker_store_commit_batch_size_count") == commits
    assert value(m, "broker_fanout_seconds_count") == commits
    assert value(m, "broker_redis_roundtrip_seconds_count") == 0
    assert value(m, "broker_last_seq") == 10
    # No topic or user id ever becomes a label.
    for _name, labels in m:
        for _label, label_value in labels:
            assert "scores" not in label_value and label_value not in (
                "s0",
                "s1",
                "s2",
                "pub",
                "root",
            )

    for peer in [*subs, pub, admin]:
        await peer.close()


async def test_slow_consumer_and_first_frame_refusals_are_counted(
    make_broker: Callable[..., Broker],
) -> None:
    broker = make_broker("--max-queue", "1KiB", memory=True)
    slow = await Peer.open(broker.url, broker.token("slow"))
    await slow.request("sub", topic="big")
    publisher = await Peer.open(broker.url, broker.token("pub"))
    assert (await publisher.request("pub", topic="big", data="x" * 4096))["op"] == "ok"
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await slow.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4008

    wrong = await Peer.open(broker.url)
    await wrong.send({"op": "auth", "token": "garbage"})
    assert (await wrong.recv())["code"] == "unauthorized"
    gone = await Peer.open(broker.url)  # closes without authenticating
    await gone.close()

    async def scraped() -> Samples:
        return parse((await asyncio.to_thread(scrape, broker))[1])

    deadline = time.monotonic() + 5
    m = await scraped()
    while value(m, "broker_connection_attempts_total", result="abandoned") != 1:
        assert time.monotonic() < deadline, "the abandoned connection was never counted"
        await asyncio.sleep(0.05)
        m = await scraped()
    assert value(m, "broker_slow_consumer_closes_total") == 1
    assert value(m, "broker_errors_total", code="unauthorized") == 1
    assert value(m, "broker_connection_attempts_total", result="unauthorized") == 1
    assert value(m, "broker_connection_attempts_total", result="abandoned") == 1
    assert value(m, "broker_connection_attempts_total", result="accepted") == 2
    assert value(m, "broker_connections") == 1


async def test_over_capacity_is_counted(make_broker: Callable[..., Broker]) -> None:
    broker = make_broker("--max-connections", "1", memory=True)
    first = await Peer.open(broker.url, broker.token("a"))
    with pytest.raises(InvalidStatus) as refused:
        await connect(broker.url, open_timeout=5)
    assert refused.value.response.status_code == 503
    await first.close()  # a scrape is a connection too: make room for it
    deadline = time.monotonic() + 10
    while True:
        try:
            m = parse((await asyncio.to_thread(scrape, broker))[1])
            break
        except urllib.error.HTTPError:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    assert value(m, "broker_connection_attempts_total", result="over_capacity") == 1


# -- in-process units ------------------------------------------------------------------


def test_each_server_has_its_own_registry() -> None:
    config = ServerConfig(secret="x" * 32, memory=True)
    a, b = create_server(config), create_server(config)
    a.metrics.rate_limited = 3
    assert a.metrics.registry is not b.metrics.registry
    assert value(parse(a.metrics.exposition().decode()), "broker_rate_limited_publishes_total") == 3
    assert value(parse(b.metrics.exposition().decode()), "broker_rate_limited_publishes_total") == 0
    assert not any(name.startswith("broker_") for name in REGISTRY._names_to_collectors)


def test_unknown_error_codes_count_as_internal() -> None:
    metrics = Metrics(dict, process=False)
    metrics.error("no_such_code")
    metrics.error("forbidden")
    assert metrics.errors["internal"] == 1 and metrics.errors["forbidden"] == 1
    assert set(metrics.errors) == set(ERROR_CODES)


def test_fast_histogram_exposition_is_cumulative() -> None:
    metrics = Metrics(dict, process=False)
    hist = metrics.redis_roundtrip_seconds
    for seconds in (0.00005, 0.00001, 0.0003, 0.0003, 0.02, 7.0):
        hist.observe(seconds)
    m = parse(metrics.exposition().decode())
    name = "broker_redis_roundtrip_seconds"
    assert value(m, name + "_bucket", le="0.0001") == 2  # 0.00005 and 0.00001
    assert value(m, name + "_bucket", le="0.0005") == 4
    assert value(m, name + "_bucket", le="0.025") == 5
    assert value(m, name + "_bucket", le="5.0") == 5
    assert value(m, name + "_bucket", le="+Inf") == 6
    assert value(m, name + "_count") == 6
    assert value(m, name + "_sum") == pytest.approx(7.02066)


def test_fast_histogram_bucket_edges_are_inclusive() -> None:
    hist = FastHistogram("x_seconds", "x", (0.1, 1.0))
    hist.observe(0.1)
    hist.observe(1.0)
    hist.observe(1.5)
    assert hist.counts == [1, 1, 1]


def test_top_topics_stay_bounded_and_keep_the_busiest() -> None:
    top = TopTopics(keep=10, limit=50)
    for _ in range(100):
        top.add("hot")
    for _ in range(30):
        top.add("warm")
    for i in range(10_000):
        top.add(f"once/{i}")
        assert len(top) <= 50
    assert top.top(2) == [("hot", 100), ("warm", 30)]
    with pytest.raises(ValueError):
        TopTopics(keep=10, limit=10)
