"""A broker restart under N connected clients that all resume with ``since``: how long
until every one has resumed, and the broker CPU it took.

A ``broker serve`` (SQLite store) is started; worker processes open N clients (each its
own token, rooms of ``N / topics``), each subscribes and keeps the ``seq`` and ``epoch``
of its ``ok``. A publisher then sends ``--missed`` messages to every topic, which the
clients take as missed (their ``since`` stays). The broker is stopped (SIGTERM: the
clients get 1001) and started again on the same data; every client reconnects on the
project's backoff (``broker.core.backoff``, 0.1 s doubling to 5 s, jittered), subscribes
with ``since`` and ``epoch``, and counts as resumed once its ``ok`` says ``recovered`` and
the missed messages have been replayed. Printed: the time from the new broker's start
(and from its listening) until the last client resumed, and the broker's CPU seconds
over that span (from ``/proc``), per client.

File descriptors: the broker raises its soft limit to the hard one and keeps 128 aside;
each worker raises its own. Clients connect from 127.0.0.2.. (``--addresses``), as many
clients would, so that no one address meets the per-address bound on unauthenticated
connections. Every wait is bounded (``--timeout``).

    python benchmarks/restart_resume.py                       # 19,800 clients (see below)
    python benchmarks/restart_resume.py -n 2000 --workers 1
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
from harness import HOST, Broker, broker_env, stop_process  # noqa: E402

from broker.client.link import frame  # noqa: E402
from broker.core.auth import mint_token  # noqa: E402
from broker.core.backoff import Backoff  # noqa: E402
from broker.core.frames import CLOSE, PING, PONG, FrameError, Parser  # noqa: E402

#: The most clients one worker holds (its descriptors, under a 20,000 hard limit).
PER_WORKER = 10_000
CLK_TCK = os.sysconf("SC_CLK_TCK")


def raise_nofile() -> int:
    """Raise this process's soft descriptor limit to the hard one; the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_cpu_seconds() -> float:
    """CPU seconds used so far by every process on the machine (``/proc/stat``)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    busy = sum(int(v) for i, v in enumerate(fields[:8]) if i not in (3, 4))  # not idle, iowait
    return busy / CLK_TCK


# -- the worker: a share of the clients ------------------------------------------------


class Client(asyncio.Protocol):
    """One subscriber: handshake, ``sub``, then on a lost connection a resume with
    ``since``; counts the replayed messages."""

    def __init__(self, worker: Worker, index: int) -> None:
        self.worker = worker
        self.index = index
        self.topic = f"room/{index % worker.topics}"
        self.since: int | None = None
        self.epoch: str | None = None
        self.replayed = 0
        self.recovered = False
        self.resumed_at: float | None = None
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.parser: Parser | None = None
        self.lost: asyncio.Future[None] | None = None
        self.ready: asyncio.Future[None] | None = None

    async def connect(self, port: int, token: str, address: str, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self.buffer = bytearray()
        self.parser = None
        self.lost = loop.create_future()
        self.ready = loop.create_future()
        await asyncio.wait_for(
            loop.create_connection(lambda: self, HOST, port, local_addr=(address, 0)), timeout
        )
        key = base64.b64encode(os.urandom(16)).decode()
        if self.transport is None:  # dropped at accept (a limit)
            raise ConnectionResetError("dropped")
        self.transport.write(
            (
                f"GET /ws HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
            ).encode()
        )
        await asyncio.wait_for(asyncio.shield(self.ready), timeout)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        for future in (self.ready, self.lost):
            if future is not None and not future.done():
                future.set_exception(ConnectionResetError("lost"))
                future.exception()

    def data_received(self, data: bytes) -> None:
        if self.parser is None:
            self.buffer += data
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.buffer.startswith(b"HTTP/1.1 101"):
                assert self.transport is not None
                self.transport.abort()
                return
            data = bytes(self.buffer[end + 4 :])
            self.parser = Parser(masked=False, max_size=1 << 20)
        try:
            for opcode, payload in self.parser.feed(data):
                if opcode == CLOSE:
                    if self.transport is not None:
                        self.transport.close()
                elif opcode == PING:
                    self.send(frame(payload, PONG))
                elif opcode != PONG:
                    self.message(orjson.loads(payload))
        except FrameError:
            if self.transport is not None:
                self.transport.abort()

    def send(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def message(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "hello":
            sub: dict[str, Any] = {"op": "sub", "id": 1, "topic": self.topic}
            if self.since is not None:
                sub["since"] = self.since
                sub["epoch"] = self.epoch
            self.send(frame(orjson.dumps(sub)))
        elif op == "ok" and msg.get("id") == 1:
            if self.since is None:
                self.since, self.epoch = msg["seq"], msg["epoch"]
            else:
                self.recovered = bool(msg.get("recovered"))
            self._check()
        elif op == "msg" and self.resuming and msg.get("seq", 0) > (self.since or 0):
            self.replayed += 1
            self._check()
        elif op == "error":
            self.worker.errors.append(str(msg.get("code")))

    @property
    def resuming(self) -> bool:
        return self.worker.expect is not None

    def _check(self) -> None:
        if self.ready is not None and not self.ready.done():
            if not self.resuming or (self.recovered and self.replayed >= self.worker.expect):
                self.ready.set_result(None)
                if self.resuming:
                    self.resumed_at = time.monotonic()


class Worker:
    """Clients ``first .. first + count`` of the run, driven over stdin/stdout."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.port = args.port
        self.secret = args.secret
        self.topics = args.topics
        self.first = args.first
        self.count = args.count
        self.addresses = [f"127.0.0.{2 + i}" for i in range(args.addresses)]
        self.timeout = args.timeout
        self.expect: int | None = None
        self.errors: list[str] = []
        self.attempts = 0
        self.tokens = [
            mint_token(self.secret, f"u{self.first + i}", ttl=3600) for i in range(self.count)
        ]
        self.clients: list[Client] = []

    def address(self, i: int) -> str:
        return self.addresses[i % len(self.addresses)]

    async def open_all(self, concurrency: int = 200) -> int:
        gate = asyncio.Semaphore(concurrency)
        failed = 0

        async def one(i: int) -> None:
            nonlocal failed
            client = Client(self, self.first + i)
            async with gate:
                try:
                    await client.connect(self.port, self.tokens[i], self.address(i), 10)
                    self.clients.append(client)
                except (OSError, TimeoutError):
                    failed += 1

        await asyncio.gather(*(one(i) for i in range(self.count)))
        return failed

    async def resume(self, client: Client, i: int, deadline: float) -> bool:
        """Wait for the connection to go, then reconnect on the backoff until resumed."""
        assert client.lost is not None
        try:
            await asyncio.wait_for(
                asyncio.shield(client.lost), max(0.0, deadline - time.monotonic())
            )
        except (ConnectionResetError, TimeoutError):
            pass
        client.replayed = 0
        client.recovered = False
        backoff = Backoff()
        while time.monotonic() < deadline:
            await asyncio.sleep(backoff.next())
            self.attempts += 1
            try:
                await client.connect(self.port, self.tokens[i], self.address(i), 10)
                return True
            except (OSError, TimeoutError):
                if client.transport is not None:
                    client.transport.abort()
        return False

    async def run(self) -> None:
        raise_nofile()
        failed = await self.open_all()
        reply(f"ready {len(self.clients)} {failed}")
        line = await read_line()  # "expect P": the missed messages are published
        self.expect = int(line.split()[1])
        deadline = time.monotonic() + self.timeout
        resumes = [
            asyncio.ensure_future(self.resume(c, c.index - self.first, deadline))
            for c in self.clients
        ]
        reply("armed")
        usage = resource.getrusage(resource.RUSAGE_SELF)
        done = await asyncio.gather(*resumes)
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
        times = [c.resumed_at for c in self.clients if c.resumed_at is not None]
        reply(
            json.dumps(
                {
                    "resumed": sum(done),
                    "not_resumed": len(done) - sum(done),
                    "times": times,
                    "attempts": self.attempts,
                    "cpu_s": cpu,
                    "errors": self.errors[:5],
                }
            )
        )


def reply(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


async def read_line() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


# -- the driver ----------------------------------------------------------------------


async def publish_missed(port: int, token: str, topics: int, per_topic: int) -> None:
    """``per_topic`` acknowledged publishes to every topic, at most 64 unacknowledged."""
    window = asyncio.Semaphore(64)
    acked = 0

    class Publisher(Client):
        def message(self, msg: dict[str, Any]) -> None:
            nonlocal acked
            op = msg.get("op")
            if op == "hello" and self.ready is not None:
                self.ready.set_result(None)
            elif op == "ok":
                acked += 1
                window.release()
            elif op == "error":
                raise RuntimeError(f"publish refused: {msg}")

    class Alone:
        topics = 1
        expect = None
        errors: list[str] = []

    client = Publisher(Alone(), 0)  # type: ignore[arg-type]
    await client.connect(port, token, HOST, 10)
    total = topics * per_topic
    for n in range(total):
        await asyncio.wait_for(window.acquire(), 10)
        pub = {"op": "pub", "id": n + 2, "topic": f"room/{n % topics}", "data": {"n": n}}
        client.send(frame(orjson.dumps(pub)))
    deadline = time.monotonic() + 30
    while acked < total and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    if client.transport is not None:
        client.transport.close()


async def read_from(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    loop = asyncio.get_running_loop()
    line = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), timeout)
    if not line:
        raise RuntimeError(f"worker {proc.pid} exited ({proc.poll()})")
    return line.decode().strip()


async def drive(args: argparse.Namespace) -> dict[str, Any]:
    workers_n = args.workers or max(1, -(-args.clients // PER_WORKER))
    per = -(-args.clients // workers_n)
    with Broker() as broker:
        env = broker_env(broker.workdir)
        workers = []
        for w in range(workers_n):
            count = min(per, args.clients - w * per)
            cmd = [sys.executable, __file__, "--worker", "--port", str(broker.port)]
            cmd += ["--secret", broker.secret, "--topics", str(args.topics)]
            cmd += ["--first", str(w * per), "--count", str(count)]
            cmd += ["--addresses", str(args.addresses), "--timeout", str(args.timeout)]
            workers.append(
                subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
            )
        try:
            t0 = time.monotonic()
            ready = [await read_from(p, args.timeout) for p in workers]
            connected = sum(int(r.split()[1]) for r in ready)
            refused = sum(int(r.split()[2]) for r in ready)
            connect_s = time.monotonic() - t0
            await publish_missed(broker.port, broker.token("publisher"), args.topics, args.missed)
            for p in workers:
                assert p.stdin is not None
                p.stdin.write(f"expect {args.missed}\n".encode())
                p.stdin.flush()
            for p in workers:
                await read_from(p, args.timeout)  # armed
            stop_started = time.monotonic()
            assert broker.proc is not None
            stop_process(broker.proc, timeout=60)
            stopped = time.monotonic()
            broker.start(timeout=60)
            listening = time.monotonic()
            cpu0 = cpu_seconds(broker.pid)
            machine0 = machine_cpu_seconds()
            results = [json.loads(await read_from(p, args.timeout + 30)) for p in workers]
            cpu1 = cpu_seconds(broker.pid)
            machine = machine_cpu_seconds() - machine0
            span = time.monotonic() - listening
            rss = int(
                next(
                    line.split()[1]
                    for line in Path(f"/proc/{broker.pid}/status").read_text().splitlines()
                    if line.startswith("VmRSS:")
                )
            )
        finally:
            for p in workers:
                p.kill()
                p.wait()
    times = sorted(t - listening for r in results for t in r["times"])
    last = times[-1] + listening if times else None

    def at(q: float) -> float | None:
        return round(times[min(len(times) - 1, int(q * len(times)))], 2) if times else None

    resumed = sum(r["resumed"] for r in results)
    return {
        "clients": args.clients,
        "connected": connected,
        "refused_at_first_connect": refused,
        "first_connect_s": round(connect_s, 2),
        "topics": args.topics,
        "missed_per_client": args.missed,
        "stop_s": round(stopped - stop_started, 2),
        "start_to_listen_s": round(listening - stopped, 2),
        "resumed": resumed,
        "not_resumed": sum(r["not_resumed"] for r in results),
        "reconnect_attempts": sum(r["attempts"] for r in results),
        "resumed_after_listen_p50_p90_s": [at(0.5), at(0.9)],
        "all_resumed_after_listen_s": round(last - listening, 2) if last else None,
        "all_resumed_after_start_s": round(last - stopped, 2) if last else None,
        "broker_cpu_s_from_listen": round(cpu1 - cpu0, 2),
        "broker_cpu_s_with_start": round(cpu1, 2),
        "broker_cpu_us_per_resume": round(1e6 * (cpu1 - cpu0) / resumed) if resumed else None,
        "clients_cpu_s": round(sum(r["cpu_s"] for r in results), 2),
        # Everything else on the machine (other users), in % of one core, over the resume.
        "other_cpu_pct": round(
            100 * (machine - (cpu1 - cpu0) - sum(r["cpu_s"] for r in results)) / span
        ),
        "cores": os.cpu_count(),
        "broker_rss_mib_after": round(rss / 1024, 1),
        "errors": sorted({e for r in results for e in r["errors"]}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--clients", type=int, default=19_800)
    parser.add_argument("--topics", type=int, default=200, help="rooms (default 200)")
    parser.add_argument("--missed", type=int, default=2, help="messages missed per topic")
    parser.add_argument("--workers", type=int, default=0, help="default: 10,000 clients each")
    parser.add_argument("--addresses", type=int, default=64, help="client source addresses")
    parser.add_argument("--timeout", type=float, default=120.0, help="bound on each phase")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--secret", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    if args.worker:
        asyncio.run(Worker(args).run())
        return
    random.seed()
    print(json.dumps(asyncio.run(drive(args))))


if __name__ == "__main__":
    main()
