"""Side-by-side: this broker vs the Socket.IO tutorial server vs Mosquitto (WebSocket).

Runs the same workloads against each server on 127.0.0.1, the server pinned to core 0 and
this load generator (benchmarks/loadgen.py, raw asyncio protocols on uvloop) pinned to
core 1, and prints a table with the ratio of each peer to our broker.

    python benchmarks/compare.py                       # everything, ~5 minutes
    python benchmarks/compare.py --peers broker,mosquitto --workloads fanout,idle
    python benchmarks/compare.py --scaling             # also: cost vs subscribers and topics
    python benchmarks/compare.py --profile /tmp/prof   # also: py-spy profiles of our server

Servers:

* ``broker``: ours, started by ``benchmarks/harness.py`` (``broker serve``, default SQLite
  store in a temporary directory); publishes carry an ``id`` and are acked only once
  recorded durably.
* ``socketio``: ``benchmarks/peers/socketio-server.js`` (Node, Socket.IO 4, JWT in the
  handshake ``auth``, ``socket.to(room).emit`` relay); installed with ``npm ci`` in
  ``benchmarks/peers`` when ``node_modules`` is missing. Publishes use an ack callback.
* ``mosquitto``: the Debian ``mosquitto`` binary, our own instance with a temporary config
  (``listener <port> lo``, ``protocol websockets``, ``allow_anonymous true``, plus an unused
  loopback MQTT listener that 2.0.x needs to start); the system service is not touched. MQTT 5; publishes are QoS 1 (PUBACK), subscriptions QoS 0
  with No Local.

A peer that cannot be started is skipped, and the reason printed.

Workloads (each on a fresh server):

* ``fanout``: 1 publisher, N subscribers (1,000) on one topic, 100-byte payloads, the
  publisher keeping 100 acked publishes in flight for D seconds: server CPU per delivered
  message (utime+stime of the server process from /proc, divided by deliveries) and
  deliveries/s.
* ``idle``: authenticated connections with one subscription each (own topic): server RSS
  growth from 100 to 1,100 connections, per connection.
* ``latency``: 1 publisher at 20 msgs/s to 1,000 subscribers (20,000 deliveries/s) for
  10 s: publish-to-delivery latency of every delivery, p50/p99.
* ``rooms``: 500 connections in rooms of 5, each publishing with one acked publish in
  flight (closed loop): server CPU per delivery and deliveries/s.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import Broker, StartFailed, free_port, stop_process, wait_port  # noqa: E402
from loadgen import Stats, close_all, new_loop, open_many, raise_nofile, wait_until  # noqa: E402

from broker.client.bench import percentiles, proc_cpu_seconds, proc_rss_bytes  # noqa: E402
from broker.core.auth import mint_token  # noqa: E402

PEERS_DIR = ROOT / "benchmarks" / "peers"
HOST = "127.0.0.1"
SERVER_CPU = 0
LOADGEN_CPU = 1
WORKLOADS = ("fanout", "idle", "latency", "rooms")
PEER_KIND = {"broker": "broker", "socketio": "socketio", "mosquitto": "mqtt"}
PEER_TITLE = {
    "broker": "broker (ours)",
    "socketio": "Socket.IO 4 (Node)",
    "mosquitto": "Mosquitto 2 (WS)",
}


class Skip(Exception):
    """This peer cannot be run here."""


@dataclass
class Server:
    name: str
    port: int
    pid: int
    token: Callable[[str], str]


def pin(pid: int, cpu: int) -> None:
    """Pin every thread of ``pid`` to ``cpu`` (threads started later inherit it)."""
    with contextlib.suppress(FileNotFoundError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), {cpu})


def started(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    """Wait until ``proc`` listens on ``port``; ``Skip`` with its error output if not."""
    try:
        wait_port(port, proc, what)
    except StartFailed as exc:
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        raise Skip(f"{exc}: {err.strip()[-400:]}") from None


@contextlib.contextmanager
def start_broker() -> Iterator[Server]:
    try:
        broker = Broker(["--max-queue", "64MiB"]).start()
    except StartFailed as exc:
        raise Skip(str(exc)) from None
    try:
        pin(broker.pid, SERVER_CPU)
        yield Server("broker", broker.port, broker.pid, broker.token)
    finally:
        broker.stop()


def ensure_node_peer() -> None:
    if not shutil.which("node"):
        raise Skip("node is not installed")
    if not (PEERS_DIR / "node_modules" / "socket.io").is_dir():
        if not shutil.which("npm"):
            raise Skip("npm is not installed and benchmarks/peers/node_modules is missing")
        done = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"],
            cwd=PEERS_DIR,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            raise Skip(f"npm ci failed: {done.stderr.strip()[-400:]}")


@contextlib.contextmanager
def start_socketio() -> Iterator[Server]:
    ensure_node_peer()
    port = free_port()
    secret = os.urandom(24).hex()
    proc = subprocess.Popen(
        [
            "taskset",
            "-c",
            str(SERVER_CPU),
            "node",
            "socketio-server.js",
            "--port",
            str(port),
            "--secret",
            secret,
        ],
        cwd=PEERS_DIR,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        started(port, proc, "the Socket.IO server")
        pin(proc.pid, SERVER_CPU)
        yield Server("socketio", port, proc.pid, lambda uid: mint_token(secret, uid, ttl=3600))
    finally:
        stop_process(proc)


def mosquitto_binary() -> str:
    for cand in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if cand and os.access(cand, os.X_OK):
            return cand
    raise Skip("mosquitto is not installed (apt-get install mosquitto)")


@contextlib.contextmanager
def start_mosquitto() -> Iterator[Server]:
    binary = mosquitto_binary()
    port, native = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="bench-mosquitto-") as tmp:
        conf = Path(tmp) / "mosquitto.conf"
        # Mosquitto 2.0.x (libwebsockets) will not start with a WebSocket listener alone
        # (eclipse-mosquitto/mosquitto#2284), so an unused loopback MQTT listener comes
        # first; and libwebsockets binds to an interface, not an address: "lo" keeps the
        # WebSocket listener on loopback (2.0.11 ignores "127.0.0.1" there and binds *).
        conf.write_text(
            f"listener {native} {HOST}\n"
            f"listener {port} lo\n"
            "protocol websockets\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "log_dest stderr\n"
            "log_type error\n"
            "max_queued_messages 100000\n"
        )
        proc = subprocess.Popen(
            ["taskset", "-c", str(SERVER_CPU), binary, "-c", str(conf)],
            cwd=tmp,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            started(port, proc, "mosquitto")
            pin(proc.pid, SERVER_CPU)
            yield Server("mosquitto", port, proc.pid, lambda uid: "")
        finally:
            stop_process(proc)


STARTERS = {"broker": start_broker, "socketio": start_socketio, "mosquitto": start_mosquitto}


# -- measurement helpers ---------------------------------------------------------------------


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def proc_system_seconds(pid: int) -> float:
    """System (kernel) CPU seconds used so far by process ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[12]) / os.sysconf("SC_CLK_TCK")


def core_times(cpu: int | str) -> tuple[int, int, int]:
    """(busy, softirq, total) jiffies of one core (or "" for all) from /proc/stat."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:]]
                idle = v[3] + v[4]
                return sum(v) - idle, v[6], sum(v)
    return 0, 0, 1


class Meter:
    """Server CPU, loadgen CPU and wall time between ``start`` and ``stop``; also how busy
    the server's core was, softirq included (loopback TCP processing that /proc/PID/stat
    does not charge to any process)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def start(self) -> None:
        self.core0, self.all0 = core_times(SERVER_CPU), core_times("")
        self.cpu0, self.gen0, self.t0 = proc_cpu_seconds(self.pid), self_cpu(), time.perf_counter()
        self.sys0 = proc_system_seconds(self.pid)

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self.t0
        cpu = proc_cpu_seconds(self.pid) - self.cpu0
        gen = self_cpu() - self.gen0
        busy, soft, total = (b - a for a, b in zip(self.core0, core_times(SERVER_CPU)))
        all_busy = (core_times("")[0] - self.all0[0]) / os.sysconf("SC_CLK_TCK")
        return {
            "wall_s": round(wall, 3),
            "server_cpu_s": round(cpu, 3),
            # of which in the kernel (syscalls: socket reads and writes, fsync)
            "server_system_s": round(proc_system_seconds(self.pid) - self.sys0, 3),
            "server_util": round(cpu / wall, 3),
            "loadgen_util": round(gen / wall, 3),
            "server_core_busy": round(busy / max(total, 1), 3),
            "server_core_softirq": round(soft / max(total, 1), 3),
            # everything else the machine did meanwhile (other processes, softirq), in cores
            "other_load": round(max(0.0, all_busy - cpu - gen) / wall, 3),
        }


def specs(
    server: Server,
    n: int,
    topic_of: Callable[[int], str],
    prefix: str,
    pub_of: Callable[[int], tuple[str, ...]] | None = None,
) -> list[dict[str, object]]:
    return [
        {
            "token": server.token(f"{prefix}{i}"),
            "user": f"{prefix}{i}",
            "topics": (topic_of(i),),
            "pub_topics": pub_of(i) if pub_of else (),
        }
        for i in range(n)
    ]


async def fanout(
    server: Server,
    kind: str,
    subs: int = 1000,
    topics: int = 1,
    duration: float = 8.0,
    window: int = 100,
    warmup: float = 1.0,
    before_measure: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, object]:
    """1 publisher (``window`` acked publishes in flight, topics in turn), ``subs``
    subscribers spread over ``topics`` topics, saturating for ``duration`` seconds."""
    stats = Stats()
    names = [f"bench/{t}" for t in range(topics)]
    conns = await open_many(
        kind, stats, HOST, server.port, specs(server, subs, lambda i: names[i % topics], "s")
    )
    try:
        [pub] = await open_many(
            kind,
            stats,
            HOST,
            server.port,
            [{"token": server.token("p0"), "user": "p0", "topics": (), "pub_topics": tuple(names)}],
        )
        per_topic_subs = collections.Counter(i % topics for i in range(subs))
        meter = Meter(server.pid)

        async def phase(seconds: float, sample_every: int) -> dict[str, object]:
            stats.delivered = stats.published = stats.acked = 0
            stats.latencies.clear()
            stats.sample_every = sample_every
            base = list(pub.per_topic)
            meter.start()
            pub.window, pub.publishing = window, True
            pub.fill()
            await asyncio.sleep(seconds)
            pub.publishing = False
            published = [a - b for a, b in zip(pub.per_topic, base)]
            expected = sum(published[t] * per_topic_subs[t] for t in range(topics))
            complete = await wait_until(
                lambda: stats.delivered >= expected and pub.in_flight <= 0,
                lambda: stats.delivered + stats.acked,
                idle=3.0,
                limit=90.0,
            )
            m = meter.stop()
            return {
                **m,
                "published": sum(published),
                "acked": stats.acked,
                "errors": stats.errors,
                "delivered": stats.delivered,
                "expected": expected,
                "complete": complete,
            }

        await phase(warmup, 0)
        if before_measure is not None:
            await before_measure()
        bytes0 = stats.bytes_in
        r = await phase(duration, max(1, subs // 20))
        delivered = int(r["delivered"]) or 1
        r["cpu_per_delivery_us"] = round(float(r["server_cpu_s"]) / delivered * 1e6, 3)
        r["deliveries_per_s"] = round(delivered / float(r["wall_s"]))
        r["bytes_per_delivery"] = round((stats.bytes_in - bytes0) / delivered, 1)
        r["latency_ms"] = percentiles(stats.latencies)
        r["subscribers"], r["topics"], r["window"] = subs, topics, window
        return r
    finally:
        close_all(conns)
        await asyncio.sleep(0.5)


async def idle(
    server: Server, kind: str, base: int = 100, extra: int = 1000, settle: float = 2.0
) -> dict[str, object]:
    """RSS growth per idle authenticated connection with one subscription."""
    stats = Stats()
    conns = await open_many(
        kind, stats, HOST, server.port, specs(server, base, lambda i: f"idle/{i}", "b")
    )
    try:
        await asyncio.sleep(settle)
        rss0 = proc_rss_bytes(server.pid)
        conns += await open_many(
            kind, stats, HOST, server.port, specs(server, extra, lambda i: f"idle/{base + i}", "i")
        )
        await asyncio.sleep(settle)
        rss1 = proc_rss_bytes(server.pid)
        return {
            "connections": base + extra,
            "rss_mb": round(rss1 / 2**20, 1),
            "rss_per_connection_kib": round((rss1 - rss0) / extra / 1024, 2),
        }
    finally:
        close_all(conns)
        await asyncio.sleep(0.5)


async def latency(
    server: Server, kind: str, subs: int = 1000, rate: float = 20.0, duration: float = 10.0
) -> dict[str, object]:
    """Publish-to-delivery latency at ``rate`` msgs/s to ``subs`` subscribers."""
    stats = Stats(sample_every=1)
    conns = await open_many(
        kind, stats, HOST, server.port, specs(server, subs, lambda i: "lat/0", "s")
    )
    try:
        [pub] = await open_many(
            kind,
            stats,
            HOST,
            server.port,
            [{"token": server.token("p0"), "user": "p0", "topics": (), "pub_topics": ("lat/0",)}],
        )
        pub.track_acks = True
        await asyncio.sleep(0.5)
        stats.latencies.clear()
        meter = Meter(server.pid)
        meter.start()
        n = int(rate * duration)
        t0 = time.perf_counter()
        for k in range(n):
            delay = t0 + k / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            pub.publish_one()
        await wait_until(
            lambda: stats.delivered >= n * subs, lambda: stats.delivered, idle=3.0, limit=30.0
        )
        m = meter.stop()
        lat = percentiles(stats.latencies)
        return {
            **m,
            "published": n,
            "delivered": stats.delivered,
            "expected": n * subs,
            "deliveries_per_s": round(stats.delivered / float(m["wall_s"])),
            "latency_ms": lat,
            "ack_latency_ms": percentiles(stats.ack_latencies),
        }
    finally:
        close_all(conns)
        await asyncio.sleep(0.5)


async def rooms(
    server: Server,
    kind: str,
    conns_n: int = 500,
    room_size: int = 5,
    duration: float = 8.0,
    window: int = 1,
    warmup: float = 1.0,
    before_measure: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, object]:
    """``conns_n`` connections in rooms of ``room_size``, each publishing to its room with
    ``window`` acked publishes in flight; deliveries go to the other members."""
    stats = Stats()

    def room(i: int) -> str:
        return f"room/{i // room_size}"

    conns = await open_many(
        kind,
        stats,
        HOST,
        server.port,
        specs(server, conns_n, room, "r", pub_of=lambda i: (room(i),)),
    )
    try:
        meter = Meter(server.pid)

        async def phase(seconds: float) -> dict[str, object]:
            stats.delivered = stats.published = stats.acked = 0
            stats.sample_every = 0 if seconds == warmup else 50
            stats.latencies.clear()
            meter.start()
            for c in conns:
                c.window, c.publishing = window, True
            for c in conns:
                c.fill()
            await asyncio.sleep(seconds)
            for c in conns:
                c.publishing = False
            await wait_until(
                lambda: all(c.in_flight <= 0 for c in conns),
                lambda: stats.acked,
                idle=3.0,
                limit=60,
            )
            expected = stats.published * (room_size - 1)
            complete = await wait_until(
                lambda: stats.delivered >= expected, lambda: stats.delivered, idle=3.0, limit=60
            )
            m = meter.stop()
            return {
                **m,
                "published": stats.published,
                "acked": stats.acked,
                "errors": stats.errors,
                "delivered": stats.delivered,
                "expected": expected,
                "complete": complete,
            }

        await phase(warmup)
        if before_measure is not None:
            await before_measure()
        r = await phase(duration)
        delivered = int(r["delivered"]) or 1
        r["cpu_per_delivery_us"] = round(float(r["server_cpu_s"]) / delivered * 1e6, 3)
        r["system_per_delivery_us"] = round(float(r["server_system_s"]) / delivered * 1e6, 3)
        r["deliveries_per_s"] = round(delivered / float(r["wall_s"]))
        r["latency_ms"] = percentiles(stats.latencies)
        return r
    finally:
        close_all(conns)
        await asyncio.sleep(0.5)


# -- profile ---------------------------------------------------------------------------------


_WAITS = (
    "pthread_cond_timedwait",
    "epoll_pwait",
    "epoll_wait",
    "PyThread_acquire_lock_timed",
    "take_gil",
    "_queue_SimpleQueue_get",
)


def _frame_name(frame: str) -> tuple[str, bool]:
    """("function (file)", is_python) for one py-spy raw frame "function (file:line)"."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0] if ":" in where else where
    python = path.endswith(".py") or path.startswith("<")
    if not python and name.startswith("0x"):
        name = "?"  # an unnamed address in a shared library
    return f"{name} ({path})", python


def summarize_collapsed(path: Path, top: int = 15) -> list[str]:
    """Where the server's time goes, from py-spy's raw (collapsed) output with native
    frames: the event-loop thread's busy samples attributed (a) to the innermost Python
    function, C code it calls included, and (b) to the innermost frame, Python or C;
    (c) inclusive time of the main functions; then what the store's worker thread does."""
    loop_own: collections.Counter[str] = collections.Counter()
    loop_leaf: collections.Counter[str] = collections.Counter()
    loop_incl: collections.Counter[str] = collections.Counter()
    worker_py: collections.Counter[str] = collections.Counter()
    loop_total = loop_idle = worker_total = worker_idle = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame_name(f.strip()) for f in stack.split(";")]
        names = [f for f, _ in frames]
        waiting = any(w in stack for w in _WAITS)
        if "_worker (concurrent/futures/thread.py)" in names:
            worker_total += n
            if waiting:
                worker_idle += n
                continue
            py = [f for f, is_py in frames if is_py]
            worker_py[py[-1] if py else names[-1]] += n
            continue
        if not any("Loop__run" in f or "run_forever" in f or "Runner.run" in f for f in names):
            continue
        loop_total += n
        if waiting:
            loop_idle += n
            continue
        py = [f for f, is_py in frames if is_py]
        loop_own[py[-1] if py else "?"] += n
        loop_leaf[names[-1]] += n
        for name in set(names):
            if (
                name.endswith(".py)")
                and "click" not in name
                and "runpy" not in name
                and "cli/" not in name
            ):
                loop_incl[name] += n
    busy = loop_total - loop_idle or 1
    out = [
        f"event-loop thread: {loop_total} samples, {100 * loop_idle / max(loop_total, 1):.1f}% waiting in epoll;"
        f" shares below are of its {busy} busy samples",
        "",
        "(a) innermost Python function, including the C code it calls:",
    ]
    out += [f"  {100 * v / busy:5.1f}%  {k}" for k, v in loop_own.most_common(top)]
    out += ["", "(b) innermost frame (Python or C):"]
    out += [f"  {100 * v / busy:5.1f}%  {k}" for k, v in loop_leaf.most_common(top)]
    out += ["", "(c) inclusive:"]
    out += [f"  {100 * v / busy:5.1f}%  {k}" for k, v in loop_incl.most_common(top) if v < busy]
    wbusy = worker_total - worker_idle
    out += [
        "",
        f"store worker thread: {worker_total} samples, {100 * wbusy / max(worker_total, 1):.1f}% busy"
        " (not waiting for work or for the GIL); busy samples by innermost Python function:",
    ]
    out += [f"  {100 * v / max(wbusy, 1):5.1f}%  {k}" for k, v in worker_py.most_common(6)]
    return out


async def profiled(
    server: Server, out: Path, seconds: float, workload: str, subs: int, window: int
) -> list[str]:
    """Profile our server with py-spy during the measured part of a fan-out (or rooms) run
    (after every connection is open, so handshakes stay out of the picture)."""
    pyspy = shutil.which("py-spy")
    if not pyspy:
        return ["py-spy is not installed (pip install py-spy): no profile"]
    raw = out.with_suffix(".txt")
    svg = out.with_suffix(".svg")
    procs: list[asyncio.subprocess.Process] = []

    async def start_pyspy() -> None:
        # raw: with native frames (C code such as uvloop's writes shows up), which needs
        # py-spy to pause the process for each sample; the flame graph: Python only, not paused.
        for fmt, dest, mode in (("raw", raw, "--native"), ("flamegraph", svg, "--nonblocking")):
            procs.append(
                await asyncio.create_subprocess_exec(
                    pyspy,
                    "record",
                    "--pid",
                    str(server.pid),
                    "--duration",
                    str(int(seconds)),
                    "--rate",
                    "100",
                    mode,
                    "--format",
                    fmt,
                    "-o",
                    str(dest),
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
            )
        await asyncio.sleep(0.3)

    if workload == "rooms":
        result = await rooms(server, "broker", duration=seconds, before_measure=start_pyspy)
    else:
        result = await fanout(
            server,
            "broker",
            subs=subs,
            window=window,
            duration=seconds,
            warmup=1.0,
            before_measure=start_pyspy,
        )
    for p in procs:
        await p.wait()
    lines = [
        f"{workload} during the profile: {result['cpu_per_delivery_us']} µs/delivery, "
        f"{result['deliveries_per_s']:,} deliveries/s (py-spy sampling inflates both)"
    ]
    if raw.exists():
        lines += summarize_collapsed(raw)
        lines.append(f"flame graph: {svg}")
    return lines


# -- report ----------------------------------------------------------------------------------


ROWS = [
    # (label, workload, key path, lower is better, format)
    (
        "fan-out 1→{subs}: server CPU per delivery (µs)",
        "fanout",
        ("cpu_per_delivery_us",),
        True,
        "{:.2f}",
    ),
    ("fan-out 1→{subs}: deliveries/s", "fanout", ("deliveries_per_s",), False, "{:,.0f}"),
    ("fan-out 1→{subs}: server CPU use (cores)", "fanout", ("server_util",), None, "{:.2f}"),
    (
        "fan-out 1→{subs}: server's core busy, softirq incl.",
        "fanout",
        ("server_core_busy",),
        None,
        "{:.2f}",
    ),
    (
        "fan-out 1→{subs}: load generator CPU use (cores)",
        "fanout",
        ("loadgen_util",),
        None,
        "{:.2f}",
    ),
    (
        "fan-out 1→{subs}: bytes per delivery on the wire",
        "fanout",
        ("bytes_per_delivery",),
        None,
        "{:.0f}",
    ),
    (
        "idle connection + 1 subscription: RSS (KiB)",
        "idle",
        ("rss_per_connection_kib",),
        True,
        "{:.1f}",
    ),
    ("{rate} msg/s × {subs}: latency p50 (ms)", "latency", ("latency_ms", "p50"), True, "{:.2f}"),
    ("{rate} msg/s × {subs}: latency p99 (ms)", "latency", ("latency_ms", "p99"), True, "{:.2f}"),
    ("{rate} msg/s × {subs}: server CPU use (cores)", "latency", ("server_util",), True, "{:.2f}"),
    (
        "rooms 500×(5): server CPU per delivery (µs)",
        "rooms",
        ("cpu_per_delivery_us",),
        True,
        "{:.2f}",
    ),
    (
        "rooms 500×(5): of which in the kernel (µs)",
        "rooms",
        ("system_per_delivery_us",),
        True,
        "{:.2f}",
    ),
    ("rooms 500×(5): deliveries/s", "rooms", ("deliveries_per_s",), False, "{:,.0f}"),
    ("rooms 500×(5): server CPU use (cores)", "rooms", ("server_util",), None, "{:.2f}"),
    (
        "rooms 500×(5): server's core busy, softirq incl.",
        "rooms",
        ("server_core_busy",),
        None,
        "{:.2f}",
    ),
    ("rooms 500×(5): load generator CPU use (cores)", "rooms", ("loadgen_util",), None, "{:.2f}"),
    ("fan-out: other load on the machine (cores)", "fanout", ("other_load",), None, "{:.2f}"),
    ("rooms: other load on the machine (cores)", "rooms", ("other_load",), None, "{:.2f}"),
]


def dig(
    results: dict[str, dict[str, object]], peer: str, workload: str, path: tuple[str, ...]
) -> float | None:
    value: object = results.get(peer, {}).get(workload)
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return float(value) if isinstance(value, (int, float)) else None


def table(
    results: dict[str, dict[str, object]], peers: list[str], subs: int = 1000, rate: float = 20
) -> str:
    """A Markdown table: one column per peer, each peer's value with its ratio to ours."""
    head = ["metric", *(PEER_TITLE[p] for p in peers)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for label, workload, path, lower, fmt in ROWS:
        ours = dig(results, "broker", workload, path)
        cells = [label.format(subs=f"{subs:,}", rate=f"{rate:g}")]
        any_value = False
        for p in peers:
            v = dig(results, p, workload, path)
            if v is None:
                cells.append("–")
                continue
            any_value = True
            cell = fmt.format(v)
            if p != "broker" and lower is not None and ours:
                cell += f" ({v / ours:.2f}×)"
            cells.append(cell)
        if any_value:
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scaling_table(results: dict[str, dict[str, object]], peers: list[str]) -> str:
    head = [
        "subscribers",
        "topics",
        *(f"{PEER_TITLE[p]} µs/delivery" for p in peers),
        *(f"{PEER_TITLE[p]} deliveries/s" for p in peers),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    keys: list[str] = []
    for p in peers:
        for k in results.get(p, {}).get("scaling", {}) or {}:  # type: ignore[union-attr]
            if k not in keys:
                keys.append(k)
    for k in keys:
        subs, topics = k.split("x")
        cells = [f"{int(subs):,}", topics]
        for field in ("cpu_per_delivery_us", "deliveries_per_s"):
            for p in peers:
                r = (results.get(p, {}).get("scaling") or {}).get(k)  # type: ignore[union-attr]
                v = r.get(field) if isinstance(r, dict) else None
                cells.append(
                    "–" if v is None else (f"{v:.2f}" if field.startswith("cpu") else f"{v:,.0f}")
                )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def job_for(
    name: str, kind: str, args: argparse.Namespace
) -> Callable[[Server], Awaitable[dict[str, object]]]:
    if name == "fanout":
        return lambda s: fanout(s, kind, subs=args.subs, duration=args.duration, window=args.window)
    if name == "idle":
        return lambda s: idle(s, kind, extra=args.idle_connections)
    if name == "latency":
        return lambda s: latency(s, kind, subs=args.subs, rate=args.rate)
    return lambda s: rooms(s, kind, duration=args.duration)


async def run_workloads(
    peers: list[str], args: argparse.Namespace, results: dict[str, dict[str, object]]
) -> None:
    """Every workload ``--repeat`` times, peers interleaved (round k of every peer before
    round k+1 of any), so that background load on a shared machine hits all of them alike;
    each peer's figures are the medians of its rounds."""
    runs: dict[tuple[str, str], list[dict[str, object]]] = collections.defaultdict(list)
    for k in range(args.repeat):
        for name in (w for w in WORKLOADS if w in args.workloads):
            for peer in peers:
                res = results.setdefault(peer, {})
                if "skipped" in res:
                    continue
                log(f"[{peer}] {name} ({k + 1}/{args.repeat}) ...")
                try:
                    with STARTERS[peer]() as server:
                        r = await job_for(name, PEER_KIND[peer], args)(server)
                except Skip as exc:
                    log(f"[{peer}] skipped: {exc}")
                    res["skipped"] = str(exc)
                    continue
                log(f"[{peer}] {name}: {json.dumps(r)}")
                runs[(peer, name)].append(r)
    for (peer, name), rs in runs.items():
        results[peer][name] = median_of(rs)
        if len(rs) > 1:
            results[peer][f"{name}_runs"] = rs


async def run_extras(
    peer: str, args: argparse.Namespace, results: dict[str, dict[str, object]]
) -> None:
    """Scaling points and profiles (after the comparison)."""
    kind = PEER_KIND[peer]
    res: dict[str, object] = results.setdefault(peer, {})
    if "skipped" in res:
        return
    if args.scaling and (peer == "broker" or args.scaling_all):
        scale: dict[str, object] = {}
        res["scaling"] = scale
        points = [(n, 1) for n in args.scaling_subs] + [
            (1000, t) for t in args.scaling_topics if t != 1
        ]
        for subs, topics in points:
            log(f"[{peer}] scaling {subs} subscribers x {topics} topics ...")
            try:
                with STARTERS[peer]() as server:
                    r = await fanout(
                        server,
                        kind,
                        subs=subs,
                        topics=topics,
                        duration=args.scaling_duration,
                        window=args.window,
                    )
            except Skip as exc:
                log(f"[{peer}] skipped: {exc}")
                return
            except Exception as exc:  # noqa: BLE001 - one point failing (fd limits) should not end the run
                log(f"[{peer}] scaling {subs}x{topics} failed: {exc!r}")
                continue
            scale[f"{subs}x{topics}"] = r
            log(f"[{peer}] scaling {subs}x{topics}: {json.dumps(r)}")
    if args.profile and peer == "broker":
        for workload in args.profile_workloads.split(","):
            log(f"[broker] profiling {workload} with py-spy ...")
            out = Path(args.profile).resolve()
            out = out.with_name(f"{out.name}-{workload}")
            with STARTERS[peer]() as server:
                res[f"profile_{workload}"] = lines = await profiled(
                    server, out, args.profile_seconds, workload, args.subs, args.window
                )
            log("\n".join(lines))


def median_of(runs: list[dict[str, object]]) -> dict[str, object]:
    """Field by field median of repeated runs (nested dicts too); other values from the first."""
    out: dict[str, object] = {}
    for key, first in runs[0].items():
        values = [r.get(key) for r in runs]
        if isinstance(first, dict):
            out[key] = median_of([v for v in values if isinstance(v, dict)])  # type: ignore[misc]
        elif isinstance(first, (int, float)) and not isinstance(first, bool):
            out[key] = statistics.median(v for v in values if isinstance(v, (int, float)))
        else:
            out[key] = first
    return out


def versions() -> dict[str, str]:
    out = {
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    with contextlib.suppress(Exception):
        out["cpu"] = next(
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        )
    with contextlib.suppress(Exception):
        out["node"] = subprocess.run(["node", "-v"], capture_output=True, text=True).stdout.strip()
    with contextlib.suppress(Exception):
        out["socket.io"] = json.loads(
            (PEERS_DIR / "node_modules/socket.io/package.json").read_text()
        )["version"]
    with contextlib.suppress(Exception):
        out["mosquitto"] = subprocess.run(
            [mosquitto_binary(), "-h"], capture_output=True, text=True
        ).stdout.split("\n")[0]
    with contextlib.suppress(Exception):
        import uvloop

        out["uvloop"] = uvloop.__version__
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", default="broker,socketio,mosquitto")
    parser.add_argument("--workloads", default="fanout,idle,latency,rooms")
    parser.add_argument("--subs", type=int, default=1000)
    parser.add_argument(
        "--duration", type=float, default=8.0, help="Seconds of publishing per saturating run."
    )
    parser.add_argument(
        "--window", type=int, default=100, help="Acked publishes in flight in the fan-out runs."
    )
    parser.add_argument("--rate", type=float, default=20.0, help="Publishes/s in the latency run.")
    parser.add_argument("--idle-connections", type=int, default=1000)
    parser.add_argument(
        "--repeat", type=int, default=1, help="Run each workload N times; report medians."
    )
    parser.add_argument(
        "--scaling", action="store_true", help="Also measure cost vs subscribers and topics (ours)."
    )
    parser.add_argument(
        "--scaling-all", action="store_true", help="... for every peer, not only ours."
    )
    parser.add_argument(
        "--scaling-subs", type=lambda s: [int(x) for x in s.split(",")], default=[100, 1000, 10000]
    )
    parser.add_argument(
        "--scaling-topics", type=lambda s: [int(x) for x in s.split(",")], default=[1, 10, 100]
    )
    parser.add_argument("--scaling-duration", type=float, default=5.0)
    parser.add_argument(
        "--profile",
        metavar="PATH",
        help="Profile our server with py-spy into PATH-<workload>.svg / .txt.",
    )
    parser.add_argument("--profile-seconds", type=float, default=8.0)
    parser.add_argument("--profile-workloads", default="fanout,rooms", help="fanout and/or rooms")
    parser.add_argument("--json", metavar="FILE", help="Also write every measurement as JSON.")
    args = parser.parse_args()
    args.workloads = set(args.workloads.split(","))
    peers = [p for p in args.peers.split(",") if p]
    for p in peers:
        if p not in STARTERS:
            parser.error(f"unknown peer {p!r} (choose from {', '.join(STARTERS)})")
    if os.cpu_count() and os.cpu_count() >= 2:  # type: ignore[operator]
        os.sched_setaffinity(0, {LOADGEN_CPU})
    else:
        log("warning: fewer than 2 CPUs: server and load generator share one")
    raise_nofile(
        max(args.subs, max(args.scaling_subs) if args.scaling else 0, args.idle_connections + 100)
        * 2
        + 1000
    )

    results: dict[str, dict[str, object]] = {}
    started = datetime.datetime.now(datetime.UTC)
    loop = new_loop()
    try:
        loop.run_until_complete(run_workloads(peers, args, results))
        for peer in peers:
            loop.run_until_complete(run_extras(peer, args, results))
    finally:
        loop.close()
    shown = [p for p in peers if "skipped" not in results.get(p, {})]
    print(f"# broker comparison, {started:%Y-%m-%d %H:%M} UTC")
    print(", ".join(f"{k}: {v}" for k, v in versions().items()))
    for p in peers:
        if "skipped" in results.get(p, {}):
            print(f"skipped {PEER_TITLE[p]}: {results[p]['skipped']}")
    print()
    print(
        "In brackets: the peer's figure divided by ours (for costs and latencies, above 1 means ours is lower)."
    )
    print()
    print(table(results, shown, args.subs, args.rate))
    if args.scaling:
        print()
        print(scaling_table(results, [p for p in shown if results.get(p, {}).get("scaling")]))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"date": started.isoformat(), "versions": versions(), "results": results},
                indent=2,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
