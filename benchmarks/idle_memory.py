"""Where an idle connection's memory goes: tracemalloc on an in-process broker.

Starts a broker (memory store) in this process, opens a warm-up batch of connections
from a child process, then N more, each authenticated with a bearer header and
subscribed to its own topic; prints the Python heap per connection, grouped by file and
by line. RSS per connection, the figure in docs/performance.md, comes from compare.py.

    python benchmarks/idle_memory.py                 # 1,000 connections
    python benchmarks/idle_memory.py -n 2000 --top 30
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import shutil
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness import broker_env, free_port  # noqa: E402

from broker.core.auth import mint_token  # noqa: E402
from broker.server.config import ServerConfig  # noqa: E402
from broker.server.factory import create_server  # noqa: E402

# The child: N raw connections (handshake by hand, one masked 'sub' frame each), kept open.
CLIENTS = r"""
import asyncio, base64, os, sys
import orjson
from broker.client.link import frame

async def one(port, token, i):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {token}\r\n\r\n").encode())
    await reader.readuntil(b"\r\n\r\n")
    sub = {"op": "sub", "topic": f"idle/{i}", "id": 1}
    writer.write(frame(orjson.dumps(sub)))
    await reader.read(4096)  # hello and the sub's ok
    return reader, writer

async def main():
    port, n, token = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    conns = [await one(port, token, i) for i in range(n)]
    print("ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def open_clients(port: int, n: int, token: str, home: Path) -> subprocess.Popen[bytes]:
    child = subprocess.Popen(
        [sys.executable, "-c", CLIENTS, str(port), str(n), token],
        stdout=subprocess.PIPE,
        env=broker_env(home),
    )
    assert child.stdout is not None
    await asyncio.get_running_loop().run_in_executor(None, child.stdout.readline)
    return child


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--connections", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--port", type=int, help="default: a free one")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    secret = "k" * 32
    port = args.port or free_port()
    home = Path(tempfile.mkdtemp(prefix="idle-memory-"))
    server = create_server(ServerConfig(port=port, secret=secret, memory=True))
    await server.start()
    token = mint_token(secret, "idle", ttl=3600)
    children = [await open_clients(port, args.warmup, token, home)]
    try:
        gc.collect()
        tracemalloc.start(1)
        before = tracemalloc.take_snapshot()
        children.append(await open_clients(port, args.connections, token, home))
        await asyncio.sleep(0.5)
        gc.collect()
        after = tracemalloc.take_snapshot()
        n = args.connections
        for key in ("filename", "lineno"):
            stats = after.compare_to(before, key)
            print(f"\nby {key}: {sum(s.size_diff for s in stats) / n:,.0f} bytes per connection")
            for stat in stats[: args.top]:
                print(
                    f"{stat.size_diff / n:8.0f} B {stat.count_diff / n:6.1f} objects  {stat.traceback}"
                )
    finally:
        for child in children:
            child.kill()
            child.wait()
        await server.shutdown()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
