"""One connection's read is handled a slice at a time: a single read that brings hundreds
of publishes is spread over several event-loop turns (and store commits), so one flooding
client cannot make a turn, and every other client's publish in it, wait for all of them.
The publishes still all land, in the order sent."""

from __future__ import annotations

import re
import urllib.request

import orjson

from broker.core.frames import encode
from broker.server.app import _TURN_SLICE

from .support import BrokerProcess, Peer, raw_upgrade

#: A client's masking key of zeros: the frames carry the JSON as it is.
ZERO_KEY = bytes(4)

COUNT = 600


def _commit_batches(broker: BrokerProcess) -> dict[str, float]:
    """``broker_store_commit_batch_size`` buckets from /metrics: upper bound -> count."""
    with urllib.request.urlopen(f"{broker.http_url}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    found = re.findall(r'broker_store_commit_batch_size_bucket\{le="([^"]+)"\} (\S+)', text)
    return {le: float(n) for le, n in found}


async def test_a_read_of_hundreds_of_publishes_is_committed_in_slices(
    broker: BrokerProcess,
) -> None:
    sub = await Peer.open(broker.url, broker.token("reader"))
    assert (await sub.request("sub", topic="slices"))["op"] == "ok"
    _, writer = await raw_upgrade(broker.port, broker.token("flood"), timeout=10)
    # All in one write (~20 KB): the broker reads it in one or a few reads.
    frames = b"".join(
        encode(orjson.dumps({"op": "pub", "topic": "slices", "data": i}), mask=ZERO_KEY)
        for i in range(COUNT)
    )
    writer.write(frames)
    await writer.drain()
    got = []
    while len(got) < COUNT:
        frame = await sub.recv(timeout=10)
        if frame.get("op") == "msg":
            got.append(frame["data"])
    assert got == list(range(COUNT))
    buckets = _commit_batches(broker)
    # Every commit held at most one slice of that connection's publishes (the next
    # bucket above the slice counts them all).
    bound = min((le for le in buckets if float(le) >= _TURN_SLICE), key=float)
    assert buckets[bound] == buckets["+Inf"], buckets
    assert buckets["+Inf"] >= COUNT / _TURN_SLICE
    writer.close()
    await sub.close()
