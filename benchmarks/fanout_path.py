"""The server's own cost per delivery in a large fan-out, without the kernel: one
publisher and ``--subs`` subscribers of one topic on stand-in transports (as in
``hot_path.py``), the publisher sending ``--window`` acknowledged publishes per loop
turn, as the shared harness's saturating fan-out does. The figure is the Python path of
the ``fanout`` scenario: encode once, queue per subscriber, one flush per connection per
turn.

    python benchmarks/fanout_path.py                 # 1000 subscribers, memory store
    python benchmarks/fanout_path.py --store sqlite  # the default durable store
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

from hot_path import SECRET, masked, open_rooms  # noqa: E402

from broker.server.config import ServerConfig  # noqa: E402


async def main(args: argparse.Namespace) -> None:
    config = ServerConfig(
        secret=SECRET,
        memory=args.store == "memory",
        data=None if args.store == "memory" else Path(tempfile.mkdtemp(prefix="fanout-path-")),
        max_queue=1 << 30,
        ping_interval=0,
    )
    subs = args.subs
    # Everyone on room/0; the last connection publishes (not echoed, as in the harness).
    server, conns = await open_rooms(config, subs + 1, subs + 1)
    publisher = conns[-1]
    payload = {"seq": 0, "t": time.monotonic_ns(), "s": 0, "pad": "x" * 40}
    window = b"".join(
        masked({"op": "pub", "topic": "room/0", "id": n, "data": payload})
        for n in range(args.window)
    )
    deliveries = subs * args.window

    async def turn() -> None:
        publisher.data_received(window)
        for _ in range(3):  # the commit, the flush
            await asyncio.sleep(0)

    for _ in range(20):
        await turn()
    gc.collect()
    gc.freeze()
    per_delivery = []
    for _ in range(args.blocks):
        cpu0 = time.process_time()
        for _ in range(args.turns):
            await turn()
        per_delivery.append((time.process_time() - cpu0) / (args.turns * deliveries) * 1e9)
    best, median = min(per_delivery), statistics.median(per_delivery)
    print(
        f"{args.store}: {best:.0f} ns CPU per delivery (median of blocks {median:.0f}), "
        f"{subs} subscribers, {args.window} publishes per turn"
    )
    await server.store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=["memory", "sqlite"], default="memory")
    parser.add_argument("--subs", type=int, default=1000)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--blocks", type=int, default=15)
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(main(parser.parse_args()))
    else:
        uvloop.run(main(parser.parse_args()))
