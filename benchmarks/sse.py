"""Server-sent event streams against WebSockets, in one run: the memory of one idle
connection, and the broker's CPU per delivery of a fan-out to N of them.

For each kind a fresh ``broker serve --memory`` is started; a client process (this one)
opens N connections subscribed to one topic (WebSockets: handshake with a bearer header and
one ``sub``; streams: ``GET /sse?topic=...``), waits, and reads the broker's RSS; then one
publisher sends ``--messages`` messages to that topic and the broker's CPU time
(utime + stime from /proc) is divided by the deliveries, once every client has them all.
The clients only count bytes, so they cost as little as a reader can.

    python benchmarks/sse.py                  # 1,000 of each, 1,000 messages (~40 s)
    python benchmarks/sse.py -n 500 --messages 100
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson
from websockets.frames import Frame, Opcode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.core.auth import mint_token  # noqa: E402

SECRET = "benchmark-secret-0123456789-abcdefghij"
TOPIC = "fan/out"
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


class Reader:
    """One connection that only counts the bytes it receives."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.received = 0
        self.task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        while chunk := await self.reader.read(65536):
            self.received += len(chunk)


async def open_ws(port: int, token: str) -> Reader:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        ).encode()
    )
    await reader.readuntil(b"\r\n\r\n")
    sub = {"op": "sub", "topic": TOPIC, "id": 1}
    writer.write(Frame(Opcode.TEXT, orjson.dumps(sub)).serialize(mask=True))
    head = b""
    while b'"op":"ok"' not in head:
        head += await reader.read(4096)
    return Reader(reader, writer)


async def open_sse(port: int, token: str) -> Reader:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        (
            f"GET /sse?topic={TOPIC.replace('/', '%2F')} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"event: ready" not in head or not head.endswith(b"\n\n"):
        head += await reader.read(4096)
    return Reader(reader, writer)


async def wait_until(check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("the deliveries did not all arrive in time")
        await asyncio.sleep(0.01)


async def publisher(port: int, token: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        ).encode()
    )
    await reader.readuntil(b"\r\n\r\n")
    await reader.read(4096)  # hello
    return reader, writer


async def run(kind: str, n: int, messages: int) -> tuple[float, float, float]:
    """Bytes of RSS per idle connection, and broker µs of CPU per delivery in a burst and
    one message at a time, for ``kind``."""
    port = free_port()
    home = Path(f"/tmp/broker-sse-bench-{os.getpid()}-{kind}")
    env = {**os.environ, "XDG_CONFIG_HOME": str(home / "c"), "XDG_DATA_HOME": str(home / "d")}
    broker = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "serve", "--memory", "--port", str(port),
         "--secret", SECRET, "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        token = mint_token(SECRET, "reader", ttl=3600)
        opener = open_ws if kind == "websocket" else open_sse
        # A warm-up batch first, so the figure leaves out one-time growth.
        warm = [await opener(port, token) for _ in range(100)]
        await asyncio.sleep(0.5)
        before = rss(broker.pid)
        readers = [await opener(port, token) for _ in range(n)]
        await asyncio.sleep(1.0)
        per_idle = (rss(broker.pid) - before) / n
        readers += warm
        pub_reader, pub_writer = await publisher(port, mint_token(SECRET, "pub", ttl=3600))
        payload = {"home": 2, "away": 1, "minute": 67}

        def send(i: int) -> None:
            frame = {"op": "pub", "topic": TOPIC, "data": {**payload, "i": i}}
            pub_writer.write(Frame(Opcode.TEXT, orjson.dumps(frame)).serialize(mask=True))

        base = [r.received for r in readers]
        send(0)
        await wait_until(lambda: all(r.received > b for r, b in zip(readers, base)), 30)
        await asyncio.sleep(0.2)
        size = readers[0].received - base[0]  # one delivery's bytes
        start = [r.received for r in readers]
        began = cpu(broker.pid)
        for i in range(1, messages + 1):
            send(i)
            if i % 20 == 0:
                await pub_writer.drain()
        await wait_until(
            lambda: all(r.received >= s + size * messages for r, s in zip(readers, start)), 60
        )
        used = cpu(broker.pid) - began
        per_delivery = used / (messages * len(readers)) * 1e6
        # One at a time: each message fanned out on its own, as at a low publish rate.
        paced = max(1, messages // 5)
        start = [r.received for r in readers]
        began = cpu(broker.pid)
        for i in range(paced):
            send(messages + 1 + i)
            want = [s + size * (i + 1) for s in start]
            await wait_until(lambda w=want: all(r.received >= x for r, x in zip(readers, w)), 30)
        per_paced = (cpu(broker.pid) - began) / (paced * len(readers)) * 1e6
        for r in readers:
            r.writer.close()
        pub_writer.close()
        return per_idle, per_delivery, per_paced
    finally:
        broker.terminate()
        try:
            broker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            broker.kill()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=1000, help="connections of each kind")
    parser.add_argument("--messages", type=int, default=1000)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.n + 256)), hard))
    print(f"{args.n:,} idle connections; fan-out of {args.messages} messages to {args.n + 100:,}")
    for kind in ("websocket", "sse"):
        per_idle, burst, paced = await run(kind, args.n, args.messages)
        print(
            f"{kind:>9}: {per_idle / 1024:5.1f} KiB RSS per idle connection; broker CPU per "
            f"delivery {burst:5.2f} µs in a burst, {paced:5.2f} µs one message at a time"
        )


if __name__ == "__main__":
    asyncio.run(main())
