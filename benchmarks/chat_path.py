"""The server's own cost of one chat publish when publishes arrive one at a time, without
the kernel: an in-process broker (uvloop, as ``broker serve`` runs) whose connections
(rooms of 5) have stand-in transports that count bytes instead of writing them.

``hot_path.py`` feeds a whole round of publishes before the loop runs, so one commit and
one flush serve 500 publishes; a chat room at a few messages per second sees every
publish alone: its own loop turns, commit, ack and writes. This feeds one publish, lets
the loop run until it is acknowledged and delivered, and repeats: the Python path of one
publish, the part of the chat scenario's cost that is our code. Each figure is the best
(lowest) of several blocks, which on a shared machine is the least disturbed one.

    python benchmarks/chat_path.py                        # memory store
    python benchmarks/chat_path.py --store sqlite         # default store (fsync interval)
    python benchmarks/chat_path.py --store sqlite --fsync always
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hot_path import SECRET, CountingTransport, masked, open_rooms  # noqa: E402

from broker.server.config import ServerConfig  # noqa: E402


async def main(args: argparse.Namespace) -> None:
    extra = {"fsync": args.fsync} if args.fsync else {}
    config = ServerConfig(
        secret=SECRET,
        memory=args.store == "memory",
        data=None if args.store == "memory" else Path(tempfile.mkdtemp(prefix="chat-path-")),
        max_queue=1 << 30,
        ping_interval=0,
        **extra,  # type: ignore[arg-type]
    )
    server, conns = await open_rooms(config, args.connections, args.room_size)
    frames = [
        masked(
            {
                "op": "pub",
                "topic": f"room/{i // args.room_size}",
                "id": 2,
                "data": {"seq": i, "t": time.monotonic_ns(), "s": i, "pad": "x" * 40},
            }
        )
        for i in range(args.connections)
    ]
    loop = asyncio.get_running_loop()
    acked: list[asyncio.Future[None]] = []

    def watch(transport: CountingTransport) -> None:
        """Resolve the waiting future on the publisher's first write (its ack)."""
        write = transport.writelines

        def writelines(chunks: list[bytes]) -> None:
            write(chunks)
            if acked and not acked[0].done():
                acked[0].set_result(None)

        transport.writelines = writelines  # type: ignore[method-assign]

    for c in conns:
        watch(c.transport)  # type: ignore[arg-type]

    async def one(i: int) -> None:
        # The publisher's ack is written in the turn its deliveries are (or after them).
        fut = loop.create_future()
        acked[:] = [fut]
        conns[i % len(conns)].data_received(frames[i % len(conns)])
        await fut

    for i in range(2000):
        await one(i)
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    per_publish = []
    n = 0
    if args.profile:
        import cProfile
        import pstats

        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.publishes):
            await one(n)
            n += 1
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.profile)
    for _ in range(args.blocks):
        cpu0 = time.process_time()
        for _ in range(args.publishes):
            await one(n)
            n += 1
        per_publish.append((time.process_time() - cpu0) / args.publishes * 1e6)
    deliveries = args.room_size - 1
    best, median = min(per_publish), statistics.median(per_publish)
    label = args.store + (f" fsync={args.fsync}" if args.fsync else "")
    print(
        f"{label}: {best:.1f} µs CPU per publish (median of blocks {median:.1f}), "
        f"{best / deliveries:.1f} per delivery ({deliveries} deliveries + 1 ack per publish)"
    )
    await server.store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=["memory", "sqlite"], default="memory")
    parser.add_argument("--fsync", choices=["interval", "always"])
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--room-size", type=int, default=5)
    parser.add_argument("--publishes", type=int, default=400, help="per block")
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="print the N costliest functions of one block (cProfile)",
    )
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(main(parser.parse_args()))
    else:
        uvloop.run(main(parser.parse_args()))
