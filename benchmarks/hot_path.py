"""The server's own cost per publish in small rooms, without the kernel: an in-process
broker whose 500 connections (rooms of 5) have stand-in transports that count bytes
instead of writing them. Frames are fed straight to ``Connection.data_received``, so the
figure is Python, uvloop-free and syscall-free: the part of ``compare.py``'s rooms figure
we can change in our code. Each round, every connection publishes once (acked) and the
round ends when all 500 are committed and fanned out.

    python benchmarks/hot_path.py                  # memory store
    python benchmarks/hot_path.py --store sqlite   # the default durable store
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.core.auth import mint_token  # noqa: E402
from broker.core.frames import TEXT, encode  # noqa: E402
from broker.server.app import SERVER_NAME, BrokerServer  # noqa: E402
from broker.server.config import ServerConfig  # noqa: E402
from broker.server.connection import Connection  # noqa: E402
from broker.server.factory import create_server  # noqa: E402


class CountingTransport:
    """Stands in for a socket: counts what would be written."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.bytes = 0

    def write(self, data: bytes) -> None:
        self.bytes += len(data)

    def writelines(self, chunks: list[bytes]) -> None:
        self.bytes += sum(map(len, chunks))

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", self.port) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def masked(obj: object) -> bytes:
    """``obj`` as a client's (masked) text frame."""
    return encode(orjson.dumps(obj), TEXT, mask=os.urandom(4))


SECRET = "k" * 32


async def open_rooms(
    config: ServerConfig, connections: int, room_size: int
) -> tuple[BrokerServer, list[Connection]]:
    """An in-process broker for ``config`` with ``connections`` authenticated connections
    on counting transports, each subscribed to its room of ``room_size``."""
    server = create_server(config)
    await server.store.open()
    server.hub.last_seq = server.store.last_seq
    conns = []
    for i in range(connections):
        conn = Connection(
            server, max_size=65536, extensions=None, server_header=SERVER_NAME, open_timeout=10
        )
        conn.connection_made(CountingTransport(i))  # type: ignore[arg-type]
        key = base64.b64encode(os.urandom(16)).decode()
        token = mint_token(SECRET, f"u{i}", ttl=3600)
        conn.data_received(
            f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        conn.data_received(masked({"op": "sub", "topic": f"room/{i // room_size}", "id": 1}))
        conns.append(conn)
    await asyncio.sleep(0.2)
    return server, conns


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=["memory", "sqlite"], default="memory")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--room-size", type=int, default=5)
    args = parser.parse_args()
    server, conns = await open_rooms(
        ServerConfig(
            secret=SECRET,
            memory=args.store == "memory",
            data=Path(tempfile.mkdtemp(prefix="hot-path-")),
            max_queue=1 << 30,
            ping_interval=0,
        ),
        args.connections,
        args.room_size,
    )
    frames = [
        masked(
            {
                "op": "pub",
                "topic": f"room/{i // args.room_size}",
                "data": {"n": i, "text": "x" * 60},
                "id": 2,
            }
        )
        for i in range(args.connections)
    ]

    async def one_round() -> None:
        for conn, frame in zip(conns, frames):
            conn.data_received(frame)
        target = server.hub.last_seq + len(conns)
        while server.hub.last_seq < target:
            # Not a busy loop while the SQLite thread commits: that would count as CPU.
            await asyncio.sleep(0 if args.store == "memory" else 0.0005)
        await asyncio.sleep(0)  # the flush

    for _ in range(20):
        await one_round()
    gc.collect()
    gc.freeze()  # as broker.server.run does after start-up
    gc.set_threshold(50_000, 20, 100)
    delivered0 = server.hub.delivered
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(args.rounds):
        await one_round()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    published = args.rounds * len(conns)
    delivered = server.hub.delivered - delivered0
    print(
        f"{args.store}: {cpu / published * 1e6:.2f} µs CPU per publish, "
        f"{cpu / delivered * 1e6:.2f} per delivery ({delivered / published:.0f} deliveries "
        f"per publish; wall {wall / published * 1e6:.2f} µs per publish)"
    )
    await server.store.close()


if __name__ == "__main__":
    asyncio.run(main())
