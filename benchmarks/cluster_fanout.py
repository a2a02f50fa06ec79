"""Fan-out of one topic to many subscribers: one node vs two vs three on one Redis.

Starts a throwaway redis-server (no persistence) on a free port and, for each node count,
that many ``broker serve --redis`` nodes (plus a ``--memory`` node without Redis as a
baseline). SUBSCRIBERS connections subscribe to one topic, spread round-robin over the
nodes; one publisher on the first node publishes MSGS messages (acknowledged, WINDOW in
flight). Prints deliveries per second (SUBSCRIBERS x MSGS over the time from the first
publish to the last delivery) and the CPU seconds each process used.

The subscribers are the client's lean link (``broker.client.link``: an asyncio Protocol
on the core's frame codec; messages counted, not decoded) so that the measuring process
costs far less per delivery than a node. Brokers, ports and tokens come from
``benchmarks/harness.py``.

    python benchmarks/cluster_fanout.py [--subscribers 1000] [--msgs 1000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
from harness import Broker, free_port, wait_port

from broker.client.link import Link

SECRET = "bench-secret-0123456789-abcdefghijklmnop"
TOPIC = "fan"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Counter:
    """A subscriber that counts ``msg`` messages without decoding them."""

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.count = 0
        self.target = 0
        self.done = done
        self.ready = asyncio.get_running_loop().create_future()
        self.link: Link | None = None

    async def open(self, url: str, token: str) -> None:
        self.link = await Link.open(url, {"Authorization": f"Bearer {token}"}, self.received)

    def received(self, payload: bytes) -> None:
        if payload[7:10] == b"msg":  # {"op":"msg",...
            self.count += 1
            if self.target and self.count >= self.target and not self.done.done():
                self.done.set_result(None)
        elif not self.ready.done() and payload[7:9] == b"ok":
            self.ready.set_result(None)


async def measure(
    brokers: list[Broker], subscribers: int, msgs: int, window: int, mark: Callable[[], None]
) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    counters: list[Counter] = []
    for i in range(subscribers):
        broker = brokers[i % len(brokers)]
        counter = Counter(loop.create_future())
        await counter.open(broker.url, broker.token(f"s{i}"))
        assert counter.link is not None
        counter.link.send([orjson.dumps({"op": "sub", "id": 1, "topic": TOPIC})])
        counters.append(counter)
    await asyncio.wait_for(asyncio.gather(*(c.ready for c in counters)), 60)
    for c in counters:
        c.target = msgs
    hello = loop.create_future()
    all_acked = loop.create_future()
    sem = asyncio.Semaphore(window)
    acked = 0

    def answered(payload: bytes) -> None:
        nonlocal acked
        if not hello.done():
            hello.set_result(None)
        elif payload[7:9] == b"ok":
            acked += 1
            sem.release()
            if acked == msgs:
                all_acked.set_result(None)

    token = brokers[0].token("pub")
    pub = await Link.open(brokers[0].url, {"Authorization": f"Bearer {token}"}, answered)
    await asyncio.wait_for(hello, 30)
    payload = orjson.dumps({"op": "pub", "topic": TOPIC, "data": {"n": 0, "pad": "x" * 64}})

    mark()  # CPU counted from here: the fan-out only, not the connection setup
    started = time.perf_counter()
    for i in range(msgs):
        await asyncio.wait_for(sem.acquire(), 60)
        pub.send([payload.replace(b'"pub",', b'"pub","id":%d,' % i, 1)])
    await asyncio.wait_for(all_acked, 60)
    acks_done = time.perf_counter() - started
    await asyncio.wait_for(asyncio.gather(*(c.done for c in counters)), 120)
    elapsed = time.perf_counter() - started
    if os.environ.get("BENCH_DEBUG"):
        print(f"  acks after {acks_done:.2f}s, all delivered after {elapsed:.2f}s")
    await pub.close()
    for c in counters:
        if c.link is not None and c.link.transport is not None:
            c.link.transport.close()
    return subscribers * msgs / elapsed, msgs / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--msgs", type=int, default=1000)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--nodes", default="0,1,2,3", help="node counts to try (0: --memory, no Redis)"
    )
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is needed")
    home = Path(tempfile.mkdtemp(prefix="cluster-bench-"))
    rport = free_port()
    redis_proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(rport),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        cwd=home,
    )
    wait_port(rport, redis_proc, "redis-server")
    print(
        f"{os.cpu_count()} CPUs; {args.subscribers} subscribers on one topic, {args.msgs} messages per run"
    )
    print(
        f"{'nodes':>14} {'deliveries/s':>13} {'min':>9} {'max':>9} {'pubs/s':>8}"
        "   CPU s (last run): nodes / redis / bench"
    )
    try:
        for count in (int(x) for x in args.nodes.split(",")):
            rates: list[float] = []
            pubs: list[float] = []
            cpu = ""
            for _ in range(args.runs):
                subprocess.run(
                    ["redis-cli", "-p", str(rport), "flushall"],
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
                store = ["--memory"] if count == 0 else ["--redis", f"redis://127.0.0.1:{rport}/0"]
                brokers = [
                    Broker([*store, "--log-format", "json"], workdir=home / f"n{k}", secret=SECRET)
                    for k in range(max(count, 1))
                ]
                before: list[float] = []
                pids: list[int] = []

                def mark(pids: list[int] = pids, before: list[float] = before) -> None:
                    before[:] = [cpu_seconds(pid) for pid in pids]
                    before.append(time.process_time())

                try:
                    pids += [b.start().pid for b in brokers] + [redis_proc.pid]
                    rate, pub_rate = asyncio.run(
                        measure(brokers, args.subscribers, args.msgs, args.window, mark)
                    )
                    rates.append(rate)
                    pubs.append(pub_rate)
                    used = [cpu_seconds(pid) - b for pid, b in zip(pids, before)]
                    cpu = (
                        f"{sum(used[:-1]):.2f} / {used[-1]:.2f} / "
                        f"{time.process_time() - before[-1]:.2f}"
                    )
                finally:
                    for b in brokers:
                        b.kill()
            label = "1 (--memory)" if count == 0 else f"{count} (redis)"
            print(
                f"{label:>14} {statistics.median(rates):>13,.0f} {min(rates):>9,.0f} {max(rates):>9,.0f}"
                f" {statistics.median(pubs):>8,.0f}   {cpu}"
            )
    finally:
        redis_proc.kill()
        redis_proc.wait()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
