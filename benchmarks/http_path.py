"""The server's own cost of one HTTP publish next to one WebSocket publish, without the
kernel: an in-process broker (uvloop, as ``broker serve`` runs) with two connections on
stand-in transports that count bytes instead of writing them.

One keep-alive HTTP connection is fed ``POST /api/publish`` requests and one WebSocket
connection acknowledged ``pub`` frames, the same message on the same topic, one at a time:
each waits for its answer (the response, the ``ok``) before the next is fed, and nobody
subscribes. This is the Python part of ``http_publish.py``'s server CPU per publish (which
adds the sockets and keeps 16 in flight), and it is deterministic enough to run under
``valgrind --tool=callgrind``: the difference between two runs with different
``--publishes`` is the instructions of that many publishes, whatever the machine's load.

    python benchmarks/http_path.py                        # memory store, both transports
    python benchmarks/http_path.py --store sqlite         # the default store
    python benchmarks/http_path.py --only http --blocks 1 --publishes 2000   # for callgrind
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

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hot_path import SECRET, CountingTransport, masked  # noqa: E402

from broker.core.auth import mint_token  # noqa: E402
from broker.server.app import SERVER_NAME  # noqa: E402
from broker.server.config import ServerConfig  # noqa: E402
from broker.server.connection import Connection  # noqa: E402
from broker.server.factory import create_server  # noqa: E402

#: The message of ``http_publish.py``.
PAYLOAD = {"home": 2, "away": 1, "minute": 67, "note": "x" * 40}


class WatchedTransport(CountingTransport):
    """A counting transport that resolves ``waiter`` on each write."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.waiter: asyncio.Future[None] | None = None

    def _wrote(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def write(self, data: bytes) -> None:
        super().write(data)
        self._wrote()

    def writelines(self, chunks: list[bytes]) -> None:
        super().writelines(chunks)
        self._wrote()


def http_request(token: str) -> bytes:
    """The request ``http_publish.py``'s client sends (h11's header order)."""
    body = orjson.dumps({"topic": "bench/0", "data": PAYLOAD})
    return (
        b"POST /api/publish HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        b"authorization: Bearer %s\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (token.encode(), len(body), body)
    )


async def main(args: argparse.Namespace) -> None:
    config = ServerConfig(
        secret=SECRET,
        memory=args.store == "memory",
        data=None if args.store == "memory" else Path(tempfile.mkdtemp(prefix="http-path-")),
        max_queue=1 << 30,
        ping_interval=0,
    )
    server = create_server(config)
    await server.store.open()
    server.hub.last_seq = server.store.last_seq
    loop = asyncio.get_running_loop()
    token = mint_token(SECRET, "bench", ttl=3600)

    def connection(port: int) -> tuple[Connection, WatchedTransport]:
        conn = Connection(
            server, max_size=65536, extensions=None, server_header=SERVER_NAME, open_timeout=10
        )
        transport = WatchedTransport(port)
        conn.connection_made(transport)  # type: ignore[arg-type]
        return conn, transport

    async def fed(conn: Connection, transport: WatchedTransport, data: bytes) -> None:
        transport.waiter = loop.create_future()
        conn.data_received(data)
        await transport.waiter

    http, http_out = connection(1)
    request = http_request(token)
    ws, ws_out = connection(2)
    await fed(
        ws,
        ws_out,
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Authorization: Bearer %s\r\n\r\n" % token.encode(),
    )
    frame = masked({"op": "pub", "id": 1, "topic": "bench/ws", "data": PAYLOAD})
    transports = {"http": (http, http_out, request), "websocket": (ws, ws_out, frame)}
    chosen = [args.only] if args.only else ["http", "websocket"]

    async def block(name: str, count: int) -> None:
        conn, out, data = transports[name]
        for _ in range(count):
            await fed(conn, out, data)

    for name in chosen:
        await block(name, args.warmup)
    gc.collect()
    gc.freeze()  # as broker.server.run does after start-up
    gc.set_threshold(50_000, 20, 100)
    figures: dict[str, list[float]] = {name: [] for name in chosen}
    for _ in range(args.blocks):
        for name in chosen:
            cpu0 = time.process_time()
            await block(name, args.publishes)
            figures[name].append((time.process_time() - cpu0) / args.publishes * 1e6)
    for name, per in figures.items():
        print(
            f"{args.store} {name}: {min(per):.1f} µs CPU per publish "
            f"(median of {len(per)} blocks {statistics.median(per):.1f})"
        )
    if len(figures) == 2:
        ratio = min(figures["http"]) / min(figures["websocket"])
        print(f"ratio HTTP / WebSocket (best blocks): {ratio:.2f}")
    await server.store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=["memory", "sqlite"], default="memory")
    parser.add_argument("--only", choices=["http", "websocket"])
    parser.add_argument("--publishes", type=int, default=500, help="per block")
    parser.add_argument("--blocks", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=1000)
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(main(parser.parse_args()))
    else:
        uvloop.run(main(parser.parse_args()))
