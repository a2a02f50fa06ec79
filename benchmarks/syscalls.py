"""System calls per chat publish: a ``broker serve`` process under ``strace -f -c`` while
publishes arrive one at a time (each waits for the previous one's ack), in rooms of 5 over
real loopback sockets, so that every publish is its own commit: the kernel side of the
``chat`` scenario's cost, counted rather than timed (counts do not depend on how busy the
machine is).

    python benchmarks/syscalls.py                        # default store (fsync interval)
    python benchmarks/syscalls.py --memory

The broker measured is the one ``harness.py`` starts (``$PYTHONPATH``'s, else this
tree's; a copy made by ``compiled.py`` measures the compiled build). Needs ``strace``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import HOST, Broker  # noqa: E402
from loadgen import Stats, close_all, new_loop, open_many  # noqa: E402


def parse(table: str) -> dict[str, int]:
    """``strace -c``'s table as {syscall: calls}."""
    calls: dict[str, int] = {}
    for line in table.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0].replace(".", "").isdigit() and parts[-1] != "total":
            calls[parts[-1]] = int(parts[3])
    return calls


async def run(args: argparse.Namespace, broker: Broker) -> tuple[int, dict[str, int]]:
    stats = Stats()

    def room(i: int) -> str:
        return f"room/{i // args.room_size}"

    specs: list[dict[str, object]] = [
        {"token": broker.token(f"u{i}"), "topics": (room(i),), "pub_topics": (room(i),)}
        for i in range(args.connections)
    ]
    conns = await open_many("broker", stats, HOST, broker.port, specs)

    async def publish(n: int) -> None:
        for k in range(n):
            target = stats.acked + 1
            conns[k % len(conns)].publish_one()
            deadline = time.monotonic() + 5
            while stats.acked < target and time.monotonic() < deadline:
                await asyncio.sleep(0)
            await asyncio.sleep(args.gap)

    try:
        await publish(200)  # warm up
        with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
            tracer = subprocess.Popen(
                ["strace", "-f", "-c", "-o", out.name, "-p", str(broker.pid)],
                stderr=subprocess.DEVNULL,
            )
            await asyncio.sleep(1.0)  # attached to every thread
            published = stats.published
            await publish(args.publishes)
            published = stats.published - published
            await asyncio.sleep(0.2)
            tracer.send_signal(signal.SIGINT)
            tracer.wait(10)
            return published, parse(Path(out.name).read_text())
    finally:
        close_all(conns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", action="store_true", help="the memory store")
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--room-size", type=int, default=5)
    parser.add_argument("--publishes", type=int, default=1000)
    parser.add_argument("--gap", type=float, default=0.002, help="seconds between publishes")
    args = parser.parse_args()
    if shutil.which("strace") is None:
        raise SystemExit("needs strace")
    with Broker(["--memory"] if args.memory else []) as broker:
        loop = new_loop()
        try:
            published, calls = loop.run_until_complete(run(args, broker))
        finally:
            loop.close()
    total = sum(calls.values())
    print(f"{published} publishes, {total / published:.2f} system calls per publish")
    for name, n in sorted(calls.items(), key=lambda kv: -kv[1]):
        if n / published >= 0.01:
            print(f"  {name:<16} {n / published:6.2f}")


if __name__ == "__main__":
    main()
