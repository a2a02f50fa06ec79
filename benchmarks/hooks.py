"""The cost of the ``publish`` hook (section 12 of docs/protocol.md) on the publish path.

One ``broker serve --memory`` process whose namespace ``chat/#`` asks the ``publish``
hook of a minimal backend (this file run with ``--backend PORT``: asyncio, keep-alive,
answers ``200 {}`` at once, no signature check), so that what is measured is the broker's
side of a hook call, not an application's work. One WebSocket client publishes at a steady ``--rate`` (with an ``id``,
so each gets its ``ok``) for ``--seconds``, first to ``news/x`` (no hook), then to
``chat/x`` (the hook is asked before each is recorded). Per run: publish-to-ok latency
p50/p99 as the client sees it, and the broker process's CPU time (user + system) per
publish. The backend's own time is in the latency, not in the broker's CPU.

    python benchmarks/hooks.py                  # 1,000 publishes/s, 5 s per run
    python benchmarks/hooks.py --rate 500 --seconds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import Broker, free_port, stop_process, wait_port  # noqa: E402

HOOK_SECRET = "bench-hook-secret"


async def run(url: str, token: str, topic: str, rate: int, seconds: float) -> list[float]:
    """Publish to ``topic`` at ``rate`` per second for ``seconds``: each one's latency."""
    sent: dict[int, float] = {}
    latencies: list[float] = []
    total = int(rate * seconds)
    async with connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        json.loads(await ws.recv())  # hello

        async def read() -> None:
            while len(latencies) < total:
                frame = json.loads(await ws.recv())
                if frame.get("op") == "ok":
                    latencies.append(time.perf_counter() - sent.pop(frame["id"]))
                elif frame.get("op") == "error":
                    raise SystemExit(f"publish refused: {frame}")

        reader = asyncio.create_task(read())
        start = time.perf_counter()
        for i in range(total):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent[i] = time.perf_counter()
            await ws.send(json.dumps({"op": "pub", "id": i, "topic": topic, "data": {"n": i}}))
        await asyncio.wait_for(reader, 30)
    return latencies


class _Backend(asyncio.Protocol):
    """Answers every HTTP/1.1 request ``200 {}``, keep-alive (requests have a body)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
            )


async def backend(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_Backend, "127.0.0.1", port)
    await server.serve_forever()


def cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=1000, help="publishes per second")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each run")
    parser.add_argument("--backend", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend:
        asyncio.run(backend(args.backend))
        return
    with tempfile.TemporaryDirectory() as tmp:
        app_port = free_port()
        app = subprocess.Popen(
            [sys.executable, __file__, "--backend", str(app_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        config = Path(tmp) / "broker.toml"
        config.write_text(
            f'[hooks]\npublish = "http://127.0.0.1:{app_port}/broker/publish"\n'
            f'secret = "{HOOK_SECRET}"\n[[namespace]]\npattern = "chat/#"\npublish_hook = true\n'
        )
        try:
            wait_port(app_port, app, "the backend")
            with Broker(["--memory", "--config", str(config)]) as broker:
                token = broker.token("bench")
                proc = psutil.Process(broker.pid)
                print(f"{args.rate} publishes/s for {args.seconds:g} s per run; one publisher")
                print(f"{'run':<22} {'p50 ms':>8} {'p99 ms':>8} {'broker CPU us/publish':>22}")
                asyncio.run(run(broker.url, token, "warmup", args.rate, 1.0))
                for label, topic in (
                    ("no hook (news/x)", "news/x"),
                    ("publish hook (chat/x)", "chat/x"),
                ):
                    before = cpu(proc)
                    lat = sorted(
                        asyncio.run(run(broker.url, token, topic, args.rate, args.seconds))
                    )
                    spent = cpu(proc) - before
                    p50 = statistics.median(lat) * 1000
                    p99 = lat[int(len(lat) * 0.99) - 1] * 1000
                    print(f"{label:<22} {p50:>8.2f} {p99:>8.2f} {spent / len(lat) * 1e6:>22.0f}")
        finally:
            stop_process(app)


if __name__ == "__main__":
    main()
