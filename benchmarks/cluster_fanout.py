"""Fan-out of one topic to many subscribers: one node vs two vs three on one Redis.

Starts a throwaway redis-server (no persistence) on a free port and, for each node count,
that many ``broker serve --redis`` nodes (plus a ``--memory`` node without Redis as a
baseline). SUBSCRIBERS connections subscribe to one topic, spread round-robin over the
nodes; one publisher on the first node publishes MSGS messages (acknowledged, WINDOW in
flight). Prints deliveries per second (SUBSCRIBERS x MSGS over the time from the first
publish to the last delivery) and the CPU seconds each process used.

The subscribers are a minimal WebSocket reader (asyncio Protocol, frames counted, not
decoded) so that the measuring process costs far less per delivery than a node.

    python benchmarks/cluster_fanout.py [--subscribers 1000] [--msgs 1000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
from websockets.asyncio.client import connect

from broker.core.auth import mint_token
from tests.support import free_port, isolated_env

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-secret-0123456789-abcdefghijklmnop"
TOPIC = "fan"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


class Counter(asyncio.Protocol):
    """A WebSocket subscriber that only counts ``msg`` frames (server frames are unmasked)."""

    def __init__(self, path: str, port: int, token: str, done: asyncio.Future[None] | None) -> None:
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
        ).encode()
        self.buf = bytearray()
        self.upgraded = False
        self.count = 0
        self.ready = asyncio.get_running_loop().create_future()
        self.target = 0
        self.done = done
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)

    def send(self, frame: dict[str, object]) -> None:
        payload = orjson.dumps(frame)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        assert len(payload) < 126
        assert self.transport is not None
        self.transport.write(bytes([0x81, 0x80 | len(payload)]) + mask + masked)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            assert buf.startswith(b"HTTP/1.1 101"), bytes(buf[:80])
            del buf[: end + 4]
            self.upgraded = True
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            size = buf[pos + 1] & 0x7F
            head = 2
            if size == 126:
                if n - pos < 4:
                    break
                size = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                head = 4
            elif size == 127:
                if n - pos < 10:
                    break
                size = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            if n - pos < head + size:
                break
            body = pos + head
            if buf[body + 7 : body + 10] == b"msg":  # {"op":"msg",...
                self.count += 1
            elif not self.ready.done() and buf[body + 7 : body + 9] == b"ok":
                self.ready.set_result(None)
            pos = body + size
        del buf[:pos]
        if (
            self.done is not None
            and self.target
            and self.count >= self.target
            and not self.done.done()
        ):
            self.done.set_result(None)


async def measure(
    urls: list[tuple[int, str]], subscribers: int, msgs: int, window: int, mark: Callable[[], None]
) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    counters: list[Counter] = []
    finished: list[asyncio.Future[None]] = []
    for i in range(subscribers):
        port, _ = urls[i % len(urls)]
        fut: asyncio.Future[None] = loop.create_future()
        _, proto = await loop.create_connection(
            lambda p=port, f=fut, i=i: Counter("/ws", p, mint_token(SECRET, f"s{i}"), f),
            "127.0.0.1",
            port,
        )
        counters.append(proto)
        finished.append(fut)
        while not proto.upgraded:
            await asyncio.sleep(0.001)
        proto.send({"op": "sub", "id": 1, "topic": TOPIC})
    await asyncio.gather(*(c.ready for c in counters))
    for c in counters:
        c.target = msgs
    ws = await connect(
        urls[0][1], additional_headers={"Authorization": f"Bearer {mint_token(SECRET, 'pub')}"}
    )
    await ws.recv()  # hello
    payload = orjson.dumps(
        {"op": "pub", "topic": TOPIC, "data": {"n": 0, "pad": "x" * 64}}
    ).decode()
    sem = asyncio.Semaphore(window)

    async def acks() -> None:
        for _ in range(msgs):
            await ws.recv()
            sem.release()

    mark()  # CPU counted from here: the fan-out only, not the connection setup
    started = time.perf_counter()
    reader = asyncio.create_task(acks())
    for i in range(msgs):
        await sem.acquire()
        await ws.send(payload.replace('"pub",', f'"pub","id":{i},', 1))
    await reader
    acked = time.perf_counter() - started
    await asyncio.wait_for(asyncio.gather(*finished), 120)
    elapsed = time.perf_counter() - started
    if os.environ.get("BENCH_DEBUG"):
        print(f"  acks after {acked:.2f}s, all delivered after {elapsed:.2f}s")
    await ws.close()
    for c in counters:
        assert c.transport is not None
        c.transport.close()
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
    wait_port(rport, redis_proc)
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
                procs: list[subprocess.Popen[bytes]] = []
                urls: list[tuple[int, str]] = []
                for k in range(max(count, 1)):
                    port = free_port()
                    store = (
                        ["--memory"] if count == 0 else ["--redis", f"redis://127.0.0.1:{rport}/0"]
                    )
                    cmd = [
                        sys.executable,
                        "-m",
                        "broker.cli",
                        "serve",
                        "--port",
                        str(port),
                        "--secret",
                        SECRET,
                    ]
                    cmd += [*store, "--log-level", "warning", "--log-format", "json"]
                    proc = subprocess.Popen(
                        cmd, cwd=ROOT, env=isolated_env(home / f"n{k}"), stdout=subprocess.DEVNULL
                    )
                    wait_port(port, proc)
                    procs.append(proc)
                    urls.append((port, f"ws://127.0.0.1:{port}/ws"))
                before: list[float] = []

                def mark(
                    procs: list[subprocess.Popen[bytes]] = procs, before: list[float] = before
                ) -> None:
                    before[:] = [cpu_seconds(p.pid) for p in (*procs, redis_proc)]
                    before.append(time.process_time())

                try:
                    rate, pub_rate = asyncio.run(
                        measure(urls, args.subscribers, args.msgs, args.window, mark)
                    )
                    rates.append(rate)
                    pubs.append(pub_rate)
                    used = [cpu_seconds(p.pid) - b for p, b in zip((*procs, redis_proc), before)]
                    cpu = (
                        f"{sum(used[:-1]):.2f} / {used[-1]:.2f} / "
                        f"{time.process_time() - before[-1]:.2f}"
                    )
                finally:
                    for p in procs:
                        p.send_signal(signal.SIGKILL)
                        p.wait()
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
