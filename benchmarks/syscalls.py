"""System calls per chat publish: a ``broker serve`` process under ``strace -f -c`` while
publishes arrive one at a time (each waits for the previous one's ack), in rooms of 5 over
real loopback sockets, so that every publish is its own commit: the kernel side of the
``chat`` scenario's cost, counted rather than timed (counts do not depend on how busy the
machine is).

    python benchmarks/syscalls.py                        # default store (fsync interval)
    python benchmarks/syscalls.py --memory
    python benchmarks/syscalls.py --python /path/to/venv/bin/python   # another install

The server runs from a temporary directory, so ``--python`` measures that interpreter's
installed broker (e.g. a compiled build), or the tree on ``PYTHONPATH``, not this source
tree. Needs ``strace``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import BrokerConn, Stats, close_all, new_loop  # noqa: E402

from broker.core.auth import mint_token  # noqa: E402

SECRET = "syscalls-benchmark-secret-0123456789"


@contextlib.contextmanager
def serve(python: str, memory: bool) -> Iterator[tuple[int, int]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="broker-syscalls-") as tmp:
        store = ["--memory"] if memory else ["--data", str(Path(tmp) / "data")]
        cmd = [python, "-m", "broker.cli", "serve", "--port", str(port), "--secret", SECRET]
        cmd += [*store, "--log-level", "warning"]
        proc = subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while True:
                if proc.poll() is not None:
                    raise SystemExit("the broker exited")
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                    break
                if time.monotonic() > deadline:
                    raise SystemExit("the broker did not start")
                time.sleep(0.05)
            yield port, proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def parse(table: str) -> dict[str, int]:
    """``strace -c``'s table as {syscall: calls}."""
    calls: dict[str, int] = {}
    for line in table.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0].replace(".", "").isdigit() and parts[-1] != "total":
            calls[parts[-1]] = int(parts[3])
    return calls


async def run(args: argparse.Namespace, port: int, pid: int) -> tuple[int, dict[str, int]]:
    loop = asyncio.get_running_loop()
    stats = Stats()
    conns: list[BrokerConn] = []
    for i in range(args.connections):
        room = f"room/{i // args.room_size}"
        _, conn = await loop.create_connection(
            lambda i=i, room=room: BrokerConn(
                stats,
                "127.0.0.1",
                port,
                token=mint_token(SECRET, f"u{i}", ttl=3600),
                user=f"u{i}",
                topics=(room,),
                pub_topics=(room,),
            ),
            "127.0.0.1",
            port,
        )
        await asyncio.wait_for(conn.ready, 10)
        conns.append(conn)

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
                ["strace", "-f", "-c", "-o", out.name, "-p", str(pid)],
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
    parser.add_argument("--python", default=sys.executable, help="the interpreter to serve with")
    parser.add_argument("--memory", action="store_true", help="the memory store")
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--room-size", type=int, default=5)
    parser.add_argument("--publishes", type=int, default=1000)
    parser.add_argument("--gap", type=float, default=0.002, help="seconds between publishes")
    args = parser.parse_args()
    if shutil.which("strace") is None:
        raise SystemExit("needs strace")
    with serve(args.python, args.memory) as (port, pid):
        loop = new_loop()
        try:
            published, calls = loop.run_until_complete(run(args, port, pid))
        finally:
            loop.close()
    total = sum(calls.values())
    print(f"{published} publishes, {total / published:.2f} system calls per publish")
    for name, n in sorted(calls.items(), key=lambda kv: -kv[1]):
        if n / published >= 0.01:
            print(f"  {name:<16} {n / published:6.2f}")


if __name__ == "__main__":
    main()
