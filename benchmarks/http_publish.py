"""HTTP publishes per second and p99 next to WebSocket publishes, on the same broker run.

Starts a broker (benchmarks/harness.py; SQLite store by default) on a free loopback port. The HTTP
client keeps 16 requests in flight over 16 keep-alive connections (``POST /api/publish``,
each answered after the message is recorded); the WebSocket client keeps 16 acknowledged
``pub`` frames in flight on one connection. Both publish the same number of messages of
the same size, alternately, ``--runs`` times; the medians are printed, with the broker
process's CPU time per publish (user + system), which moves less than the rates when the
machine is shared.

The HTTP client speaks HTTP/1.1 through h11 (no hand-written parsing) over asyncio
streams, so that the client's own cost stays small next to the server's.

    python benchmarks/http_publish.py [--msgs 20000] [--concurrency 16] [--runs 3] [--memory] [--keyed]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path

import h11
import orjson
import psutil
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import Broker  # noqa: E402

PAYLOAD = {"home": 2, "away": 1, "minute": 67, "note": "x" * 40}


def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000


async def http_run(
    port: int, token: str, total: int, concurrency: int, keyed: bool
) -> tuple[float, float]:
    """Publishes/s and p99 ms over ``concurrency`` keep-alive connections."""
    latencies: list[float] = []
    per = total // concurrency

    async def worker(n: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = h11.Connection(h11.CLIENT)
        for _ in range(per):
            body: dict[str, object] = {"topic": f"bench/{n}", "data": PAYLOAD}
            if keyed:
                body["key"] = uuid.uuid4().hex
            raw = orjson.dumps(body)
            headers = [
                ("Host", "127.0.0.1"),
                ("Authorization", f"Bearer {token}"),
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(raw))),
            ]
            started = time.perf_counter()
            # One write per request, as HTTP clients do (separate small writes would meet
            # Nagle's algorithm and delayed ACKs, and measure those).
            out = conn.send(h11.Request(method="POST", target="/api/publish", headers=headers))
            out += conn.send(h11.Data(data=raw)) + conn.send(h11.EndOfMessage())
            writer.write(out)
            status = 0
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.EndOfMessage):
                    break
            latencies.append(time.perf_counter() - started)
            assert status == 200, status
            conn.start_next_cycle()
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    elapsed = time.perf_counter() - started
    return per * concurrency / elapsed, p99(latencies)


async def ws_run(
    url: str, token: str, total: int, concurrency: int, keyed: bool
) -> tuple[float, float]:
    """Acknowledged publishes/s and p99 ms with ``concurrency`` in flight on one WebSocket."""
    latencies: list[float] = []
    async with connect(
        url, additional_headers={"Authorization": f"Bearer {token}"}, max_size=None
    ) as ws:
        assert orjson.loads(await ws.recv())["op"] == "hello"
        sent: dict[int, float] = {}
        next_id = 0
        done = 0
        started = time.perf_counter()

        async def send_one() -> None:
            nonlocal next_id
            frame: dict[str, object] = {
                "op": "pub",
                "id": next_id,
                "topic": "bench/ws",
                "data": PAYLOAD,
            }
            if keyed:
                frame["key"] = uuid.uuid4().hex
            sent[next_id] = time.perf_counter()
            next_id += 1
            await ws.send(orjson.dumps(frame).decode())

        for _ in range(min(concurrency, total)):
            await send_one()
        while done < total:
            reply = orjson.loads(await ws.recv())
            if reply.get("op") != "ok":
                raise RuntimeError(reply)
            latencies.append(time.perf_counter() - sent.pop(reply["id"]))
            done += 1
            if next_id < total:
                await send_one()
        elapsed = time.perf_counter() - started
    return total / elapsed, p99(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--msgs", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--memory", action="store_true", help="memory store instead of SQLite")
    parser.add_argument(
        "--keyed", action="store_true", help="send an idempotency key with every publish"
    )
    args = parser.parse_args()
    extra = ["--memory"] if args.memory else []
    results: dict[str, list[tuple[float, float]]] = {"http": [], "websocket": []}
    cpu: dict[str, list[float]] = {"http": [], "websocket": []}
    split: dict[str, list[tuple[float, float]]] = {"http": [], "websocket": []}
    with Broker([*extra, "--max-queue", "64MiB"]) as broker:
        server = psutil.Process(broker.pid)
        port, url = broker.port, broker.url
        token = broker.token("bench")

        def server_cpu() -> tuple[float, float]:
            times = server.cpu_times()
            return float(times.user), float(times.system)

        for _ in range(args.runs):
            before = server_cpu()
            results["http"].append(
                asyncio.run(http_run(port, token, args.msgs, args.concurrency, args.keyed))
            )
            middle = server_cpu()
            results["websocket"].append(
                asyncio.run(ws_run(url, token, args.msgs, args.concurrency, args.keyed))
            )
            after = server_cpu()
            for name, start, end in (("http", before, middle), ("websocket", middle, after)):
                user, system = ((end[i] - start[i]) / args.msgs * 1e6 for i in (0, 1))
                cpu[name].append(user + system)
                split[name].append((user, system))
    store = "memory" if args.memory else "sqlite"
    keys = "on" if args.keyed else "off"
    print(
        f"store {store}, {args.msgs} publishes per run, {args.concurrency} in flight, keys {keys}"
    )
    print(
        f"{'transport':10} {'publishes/s':>12} {'p99 ms':>8} {'server CPU us/publish':>22}"
        f" {'user + system':>14}"
    )
    for name, runs in results.items():
        rate = statistics.median(r for r, _ in runs)
        tail = statistics.median(t for _, t in runs)
        user = statistics.median(u for u, _ in split[name])
        system = statistics.median(s for _, s in split[name])
        print(
            f"{name:10} {rate:>12,.0f} {tail:>8.2f} {statistics.median(cpu[name]):>22.0f}"
            f" {user:>7.0f} + {system:<4.0f}"
        )
    print(
        "server CPU per run, us/publish: "
        + ", ".join(f"{n} {' '.join(f'{c:.0f}' for c in cpu[n])}" for n in cpu)
    )


if __name__ == "__main__":
    main()
