"""Soak test: many subscribers, a steady acknowledged publish load and constant reconnects.

Starts a broker (or targets one with --url), holds --connections WebSocket clients, each
subscribed to one of --topics topics, publishes --rate messages per second (with ids, so
every one is acknowledged) for --duration seconds, and every second closes and reopens a
slice of the clients, which resume with ``since`` (the last seq they saw) and the epoch.

It reports, per --interval and in total:

* messages acknowledged vs delivered vs expected (expected = every acknowledged message
  once per subscriber of its topic): missing, duplicated, out-of-order and unexpected
  deliveries must all be 0;
* the broker's RSS (and open file descriptors) over time, and its growth after warm-up;
* p50/p99/max delivery latency (publish sent -> msg received, live messages only) over time;
* errors by code, close codes, ``recovered: false`` resumes.

The subscribers live in --workers processes (one asyncio loop each, uvloop when present);
the publishers, the monitor and the broker run beside them. Loopback only, bounded in
connections and time.

    python benchmarks/soak.py                           # 2000 connections, 10 minutes
    python benchmarks/soak.py --duration 60 --connections 500 --rate 100
    python benchmarks/soak.py --url ws://127.0.0.1:8765/ws --secret S --pid 1234
    python benchmarks/soak.py --json soak.json          # also write the figures as JSON
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import multiprocessing as mp
import os
import queue
import random
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import orjson
import psutil
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness import Broker, StartFailed  # noqa: E402

from broker.core.auth import mint_token  # noqa: E402

MAX_CONNECTIONS = 20_000  # bound: this is a loopback soak, not a load generator
MAX_DURATION = 6 * 3600


def raise_fd_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def install_uvloop() -> str:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return "uvloop"
    except ImportError:  # pragma: no cover
        return "asyncio"


# -- subscriber workers ----------------------------------------------------------------


class Client:
    """One subscriber connection and everything it saw."""

    __slots__ = ("busy", "closed_by_us", "idx", "last_seq", "received", "resume_seq", "topic", "ws")

    def __init__(self, idx: int, topic: str) -> None:
        self.idx = idx
        self.topic = topic
        self.ws: ClientConnection | None = None
        self.last_seq = 0
        self.resume_seq = 0  # messages with seq <= this came from a replay
        self.received: set[int] = set()
        self.busy = False  # connecting or reconnecting
        self.closed_by_us = False


class Worker:
    def __init__(self, cfg: dict[str, Any], index: int, reports: Any, stop: Any) -> None:
        self.cfg = cfg
        self.index = index
        self.reports = reports
        self.stop = stop
        first, last = cfg["ranges"][index]
        self.clients = [Client(i, f"soak/{i % cfg['topics']}") for i in range(first, last)]
        self.epoch: str | None = None
        self.lat: list[float] = []
        self.delivered = 0
        self.replayed = 0
        self.duplicates = 0
        self.out_of_order = 0
        self.unrecovered = 0
        self.reconnects = 0
        self.connect_failures = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.closes: collections.Counter[str] = collections.Counter()
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def open(self, c: Client, resume: bool) -> None:
        """Connect, authenticate (header), subscribe (with since/epoch when resuming)."""
        token = mint_token(self.cfg["secret"], f"s{c.idx}", ttl=self.cfg["token_ttl"])
        delay = 0.2
        while True:
            try:
                ws = await connect(
                    self.cfg["url"],
                    additional_headers={"Authorization": f"Bearer {token}"},
                    open_timeout=30,
                    close_timeout=5,
                    max_size=None,
                )
                hello = orjson.loads(await asyncio.wait_for(ws.recv(), 30))
                assert hello["op"] == "hello", hello
                sub: dict[str, Any] = {"op": "sub", "id": 1, "topic": c.topic}
                if resume:
                    sub["since"] = c.last_seq
                    if self.epoch is not None:
                        sub["epoch"] = self.epoch
                await ws.send(orjson.dumps(sub).decode())
                reply = orjson.loads(await asyncio.wait_for(ws.recv(), 30))
                if reply.get("op") != "ok":
                    self.errors[f"sub:{reply.get('code')}"] += 1
                    await ws.close()
                    raise RuntimeError(reply)
                self.epoch = self.epoch or reply["epoch"]
                if resume and not reply["recovered"]:
                    self.unrecovered += 1
                c.resume_seq = reply["seq"] if resume else 0
                c.ws = ws
                c.closed_by_us = False
                self.spawn(self.read(c, ws))
                return
            except (TimeoutError, OSError, InvalidStatus, ConnectionClosed, RuntimeError) as exc:
                self.connect_failures += 1
                key = (
                    f"connect:{exc.response.status_code}"
                    if isinstance(exc, InvalidStatus)
                    else f"connect:{type(exc).__name__}"
                )
                self.errors[key] += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def read(self, c: Client, ws: ClientConnection) -> None:
        received, now = c.received, time.time
        try:
            async for raw in ws:
                frame = orjson.loads(raw)
                op = frame["op"]
                if op == "msg":
                    seq = frame["seq"]
                    if seq in received:
                        self.duplicates += 1
                        continue
                    received.add(seq)
                    self.delivered += 1
                    if seq <= c.last_seq:
                        self.out_of_order += 1
                    else:
                        c.last_seq = seq
                    if seq > c.resume_seq:
                        self.lat.append((now() - frame["data"]["t"]) * 1000.0)
                    else:
                        self.replayed += 1
                elif op == "error":
                    self.errors[frame.get("code", "?")] += 1
        except ConnectionClosed:
            pass
        if not c.closed_by_us:
            self.closes[str(ws.close_code)] += 1
            if not c.busy:  # dropped by the server: come back and resume
                c.busy = True
                c.ws = None
                await asyncio.sleep(0.5)
                await self.open(c, resume=True)
                c.busy = False

    async def reconnect(self, c: Client) -> None:
        c.busy = True
        try:
            if c.ws is not None:
                c.closed_by_us = True
                await c.ws.close()
                c.ws = None
            await self.open(c, resume=True)
            self.reconnects += 1
        finally:
            c.busy = False

    def report(self, final: bool = False) -> None:
        lat, self.lat = self.lat, []
        record: dict[str, Any] = {
            "worker": self.index,
            "t": time.time(),
            "lat": lat,
            "delivered": self.delivered,
            "replayed": self.replayed,
            "duplicates": self.duplicates,
            "out_of_order": self.out_of_order,
            "unrecovered": self.unrecovered,
            "reconnects": self.reconnects,
            "connect_failures": self.connect_failures,
            "errors": dict(self.errors),
            "closes": dict(self.closes),
            "connected": sum(1 for c in self.clients if c.ws is not None and not c.busy),
        }
        if final:
            record["final"] = {c.idx: (c.topic, sorted(c.received)) for c in self.clients}
        self.reports.put(record)

    async def run(self) -> None:
        sem = asyncio.Semaphore(self.cfg["connect_concurrency"])

        async def first_open(c: Client) -> None:
            async with sem:
                await self.open(c, resume=False)

        await asyncio.gather(*(first_open(c) for c in self.clients))
        self.reports.put({"worker": self.index, "ready": True, "t": time.time()})

        churn = self.cfg["reconnect_per_sec"]
        carry = 0.0
        while not self.stop.is_set():
            await asyncio.sleep(1.0)
            carry += churn
            n, carry = int(carry), carry - int(carry)
            idle = [c for c in self.clients if not c.busy and c.ws is not None]
            for c in random.sample(idle, min(n, len(idle))):
                self.spawn(self.reconnect(c))
            self.report()  # every second: the parent groups them into its rows
        # Stop churning; let reconnects finish and deliveries settle.
        deadline = time.time() + 60
        while time.time() < deadline and any(c.busy or c.ws is None for c in self.clients):
            await asyncio.sleep(0.2)
        last, quiet_since = -1, time.time()
        while time.time() < deadline and time.time() - quiet_since < 3.0:
            await asyncio.sleep(0.2)
            if self.delivered != last:
                last, quiet_since = self.delivered, time.time()
        self.report(final=True)
        for c in self.clients:
            if c.ws is not None:
                c.closed_by_us = True
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(c.ws.close(), 2)


def worker_main(cfg: dict[str, Any], index: int, reports: Any, stop: Any) -> None:
    raise_fd_limit(cfg["connections"] + 1000)
    install_uvloop()
    try:
        asyncio.run(Worker(cfg, index, reports, stop).run())
    except BaseException as exc:  # report, never hang the parent
        reports.put({"worker": index, "crash": repr(exc), "t": time.time()})
        raise


# -- publishers, monitor, orchestration ------------------------------------------------


class Publishers:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.acked: dict[str, list[int]] = collections.defaultdict(list)
        self.ack_lat: list[float] = []
        self.sent = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.outstanding: dict[tuple[int, int], tuple[str, float]] = {}
        self.stopping = False

    async def run_one(self, k: int, started: float) -> None:
        token = mint_token(
            self.cfg["secret"], f"publisher{k}", f"Publisher {k}", ttl=self.cfg["token_ttl"]
        )
        ws = await connect(
            self.cfg["url"], additional_headers={"Authorization": f"Bearer {token}"}, max_size=None
        )
        assert orjson.loads(await ws.recv())["op"] == "hello"
        rate = self.cfg["rate"] / self.cfg["publishers"]
        topics = self.cfg["topics"]
        pad = "p" * self.cfg["size"]

        async def acks() -> None:
            with contextlib.suppress(ConnectionClosed):
                async for raw in ws:
                    frame = orjson.loads(raw)
                    rid = frame.get("id")
                    entry = self.outstanding.pop((k, rid), None) if rid is not None else None
                    if frame["op"] == "ok" and entry is not None:
                        self.acked[entry[0]].append(frame["seq"])
                        self.ack_lat.append((time.time() - entry[1]) * 1000.0)
                    elif frame["op"] == "error":
                        self.errors[frame.get("code", "?")] += 1

        reader = asyncio.get_running_loop().create_task(acks())
        n = 0
        while not self.stopping:
            due = int((time.monotonic() - started) * rate)
            while n < due:
                topic = f"soak/{(n * self.cfg['publishers'] + k) % topics}"
                t = time.time()
                self.outstanding[(k, n)] = (topic, t)
                await ws.send(
                    orjson.dumps(
                        {
                            "op": "pub",
                            "id": n,
                            "topic": topic,
                            "data": {"t": t, "k": k, "n": n, "pad": pad},
                        }
                    ).decode()
                )
                n += 1
                self.sent += 1
            await asyncio.sleep(0.005)
        deadline = time.time() + 30
        while any(key[0] == k for key in self.outstanding) and time.time() < deadline:
            await asyncio.sleep(0.05)
        await ws.close()
        await reader


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


async def orchestrate(
    args: argparse.Namespace, cfg: dict[str, Any], broker_pid: int | None
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    reports: Any = ctx.Queue()
    stop = ctx.Event()
    workers = [
        ctx.Process(target=worker_main, args=(cfg, i, reports, stop), daemon=True)
        for i in range(args.workers)
    ]
    for w in workers:
        w.start()

    received: list[dict[str, Any]] = []
    lock = threading.Lock()

    def pump() -> None:
        while True:
            try:
                item = reports.get(timeout=0.5)
            except queue.Empty:
                if all(not w.is_alive() for w in workers) and reports.empty():
                    return
                continue
            with lock:
                received.append(item)

    pump_thread = threading.Thread(target=pump, daemon=True)
    pump_thread.start()

    def items() -> list[dict[str, Any]]:
        with lock:
            return list(received)

    proc = psutil.Process(broker_pid) if broker_pid else None
    t_ramp = time.time()
    while sum(1 for r in items() if r.get("ready")) < args.workers:
        crashed = [r for r in items() if "crash" in r]
        if crashed:
            raise SystemExit(f"worker crashed: {crashed}")
        if time.time() - t_ramp > 600:
            raise SystemExit("subscribers did not connect within 10 minutes")
        await asyncio.sleep(0.2)
    ramp = time.time() - t_ramp
    print(f"# {args.connections} subscribers connected in {ramp:.1f}s", flush=True)

    admin_token = mint_token(cfg["secret"], "soak-admin", admin=True, ttl=cfg["token_ttl"])
    admin = await connect(cfg["url"], additional_headers={"Authorization": f"Bearer {admin_token}"})
    await admin.recv()

    async def stats() -> dict[str, Any]:
        await admin.send('{"op":"stats","id":1}')
        while True:
            frame = orjson.loads(await asyncio.wait_for(admin.recv(), 10))
            if frame.get("id") == 1:
                return frame

    pubs = Publishers(cfg)
    t0 = time.time()
    started = time.monotonic()
    pub_tasks = [
        asyncio.get_running_loop().create_task(pubs.run_one(k, started))
        for k in range(args.publishers)
    ]
    samples: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    header = (
        f"{'t(s)':>6} {'conns':>6} {'rss MB':>7} {'fds':>6} {'acked':>7} {'delivered':>9} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'max ms':>8} {'ack p99':>7} {'reconn':>6} {'cpu%':>5} {'load':>5} errors"
    )
    print(header, flush=True)
    seen_reports = 0
    last_delivered = last_acked = 0
    last_cpu = (time.time(), sum(proc.cpu_times()[:2]) if proc else 0.0)
    next_row = t0 + args.interval
    while time.time() - t0 < args.duration:
        await asyncio.sleep(1.0)
        sample: dict[str, Any] = {"t": time.time() - t0}
        if proc is not None:
            with contextlib.suppress(psutil.Error):
                sample["rss"] = proc.memory_info().rss
                sample["fds"] = proc.num_fds()
        samples.append(sample)
        if time.time() >= next_row:
            next_row += args.interval
            snapshot = items()
            fresh, seen_reports = snapshot[seen_reports:], len(snapshot)
            latest: dict[int, dict[str, Any]] = {}
            lat: list[float] = []
            for r in snapshot:
                if "delivered" in r:
                    latest[r["worker"]] = r
            for r in fresh:
                lat.extend(r.get("lat", ()))
            delivered = sum(r["delivered"] for r in latest.values())
            acked = sum(len(v) for v in pubs.acked.values())
            ack_lat, pubs.ack_lat = pubs.ack_lat, []
            errors: collections.Counter[str] = collections.Counter()
            for r in latest.values():
                errors.update(r["errors"])
            errors.update({f"pub:{k}": v for k, v in pubs.errors.items()})
            try:
                st = await stats()
            except Exception as exc:  # noqa: BLE001
                st = {"connections": None, "error": repr(exc)}
            row = {
                "t": round(time.time() - t0),
                "connections": st.get("connections"),
                "rss_mb": sample.get("rss", 0) / 2**20 if "rss" in sample else None,
                "fds": sample.get("fds"),
                "acked": acked - last_acked,
                "delivered": delivered - last_delivered,
                "p50": percentile(lat, 50),
                "p99": percentile(lat, 99),
                "max": max(lat) if lat else None,
                "ack_p99": percentile(ack_lat, 99),
                "reconnects": sum(r["reconnects"] for r in latest.values()),
                "errors": dict(errors),
                "load": os.getloadavg()[0],  # the machine may be shared: say how busy it was
            }
            last_acked, last_delivered = acked, delivered
            if proc is not None:
                with contextlib.suppress(psutil.Error):
                    now_cpu = (time.time(), sum(proc.cpu_times()[:2]))
                    row["cpu"] = round(
                        100 * (now_cpu[1] - last_cpu[1]) / (now_cpu[0] - last_cpu[0]), 1
                    )
                    last_cpu = now_cpu
            rows.append(row)
            print(
                f"{row['t']:>6} {row['connections'] if row['connections'] is not None else '-':>6} "
                f"{fmt(row['rss_mb']):>7} {row['fds'] if row['fds'] is not None else '-':>6} "
                f"{row['acked']:>7} {row['delivered']:>9} {fmt(row['p50']):>7} {fmt(row['p99']):>7} "
                f"{fmt(row['max']):>8} {fmt(row['ack_p99']):>7} {row['reconnects']:>6} {fmt(row.get('cpu')):>5} {fmt(row['load'], '.2f'):>5} "
                f"{dict(errors) or ''}",
                flush=True,
            )

    # Stop publishing, collect the acks, then let the subscribers settle and report.
    pubs.stopping = True
    await asyncio.gather(*pub_tasks)
    final_stats = await stats()  # before the subscribers start leaving
    stop.set()
    deadline = time.time() + 180
    while sum(1 for r in items() if "final" in r) < args.workers and time.time() < deadline:
        if any("crash" in r for r in items()):
            break
        await asyncio.sleep(0.2)
    await admin.close()
    for w in workers:
        w.join(10)
        if w.is_alive():
            w.terminate()

    # -- accounting ------------------------------------------------------------------
    snapshot = items()
    crashes = [r["crash"] for r in snapshot if "crash" in r]
    finals = [r for r in snapshot if "final" in r]
    last_reports = {r["worker"]: r for r in snapshot if "delivered" in r}
    acked_by_topic = {t: set(v) for t, v in pubs.acked.items()}
    all_acked = set().union(*acked_by_topic.values()) if acked_by_topic else set()
    expected = delivered = missing = unexpected = 0
    missing_examples: list[tuple[int, int]] = []
    for r in finals:
        for idx, (topic, seqs) in r["final"].items():
            want = acked_by_topic.get(topic, set())
            got = set(seqs)
            expected += len(want)
            delivered += len(got & want)
            lost = want - got
            missing += len(lost)
            unexpected += len(got - all_acked)
            if lost and len(missing_examples) < 10:
                missing_examples.append((idx, min(lost)))
    errors_total: collections.Counter[str] = collections.Counter()
    closes_total: collections.Counter[str] = collections.Counter()
    for r in last_reports.values():
        errors_total.update(r["errors"])
        closes_total.update(r["closes"])
    errors_total.update({f"pub:{k}": v for k, v in pubs.errors.items()})
    warm = args.warmup
    steady = [s for s in samples if s["t"] >= warm and "rss" in s]
    rss_growth = slope = None
    if len(steady) >= 2:
        first_min = statistics.mean(s["rss"] for s in steady[: max(1, len(steady) // 10)])
        last_min = statistics.mean(s["rss"] for s in steady[-max(1, len(steady) // 10) :])
        rss_growth = (last_min - first_min) / 2**20
        xs = [s["t"] for s in steady]
        ys = [s["rss"] / 2**20 for s in steady]
        mx, my = statistics.mean(xs), statistics.mean(ys)
        den = sum((x - mx) ** 2 for x in xs)
        slope = (
            sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den * 60 if den else 0.0
        )
    p99s = [r["p99"] for r in rows if r["p99"] is not None]
    summary = {
        "connections": args.connections,
        "topics": args.topics,
        "duration_s": args.duration,
        "rate": args.rate,
        "reconnect_per_sec": args.reconnect_per_sec,
        "ramp_s": round(ramp, 1),
        "published": pubs.sent,
        "acknowledged": len(all_acked),
        "expected_deliveries": expected,
        "delivered": delivered,
        "missing": missing,
        "missing_examples": missing_examples,
        "duplicates": sum(r["duplicates"] for r in last_reports.values()),
        "out_of_order": sum(r["out_of_order"] for r in last_reports.values()),
        "unexpected": unexpected,
        "replayed_on_resume": sum(r["replayed"] for r in last_reports.values()),
        "reconnects": sum(r["reconnects"] for r in last_reports.values()),
        "unrecovered_resumes": sum(r["unrecovered"] for r in last_reports.values()),
        "connect_failures": sum(r["connect_failures"] for r in last_reports.values()),
        "errors": dict(errors_total),
        "server_closes": dict(closes_total),
        "worker_crashes": crashes,
        "rss_mb_after_warmup": round(steady[0]["rss"] / 2**20, 1) if steady else None,
        "rss_mb_end": round(steady[-1]["rss"] / 2**20, 1) if steady else None,
        "rss_mb_peak": round(max(s["rss"] for s in samples if "rss" in s) / 2**20, 1)
        if proc
        else None,
        "rss_growth_mb_after_warmup": None if rss_growth is None else round(rss_growth, 1),
        "rss_slope_mb_per_min": None if slope is None else round(slope, 3),
        "fds_end": samples[-1].get("fds") if samples else None,
        "loadavg_1min_median": round(statistics.median(r["load"] for r in rows), 2)
        if rows
        else None,
        "loadavg_1min_max": round(max(r["load"] for r in rows), 2) if rows else None,
        "broker_cpu_percent_median": statistics.median(
            r["cpu"] for r in rows if r.get("cpu") is not None
        )
        if rows
        else None,
        "p99_ms_median_interval": round(statistics.median(p99s), 1) if p99s else None,
        "p99_ms_worst_interval": round(max(p99s), 1) if p99s else None,
        "final_stats": {
            k: final_stats.get(k)
            for k in ("connections", "subscriptions", "messages_in", "messages_out", "last_seq")
        },
        "intervals": rows,
    }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="target this broker instead of starting one (needs --secret)")
    parser.add_argument(
        "--secret", default=None, help="HMAC secret of the broker (generated when starting one)"
    )
    parser.add_argument("--pid", type=int, help="pid of the --url broker, to sample its RSS")
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--topics", type=int, default=200)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of steady load")
    parser.add_argument("--rate", type=float, default=200.0, help="publishes per second, in total")
    parser.add_argument("--size", type=int, default=100, help="padding bytes per message")
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument(
        "--reconnect-per-sec",
        type=float,
        default=None,
        help="clients reconnected per second (default 1%%)",
    )
    parser.add_argument("--workers", type=int, default=2, help="subscriber processes")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds per report row")
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds before RSS growth counts (default 10%%, at least 30 s)",
    )
    parser.add_argument(
        "--memory", action="store_true", help="started broker keeps history in memory"
    )
    parser.add_argument(
        "--broker-arg",
        action="append",
        default=[],
        help="extra `broker serve` argument (repeatable)",
    )
    parser.add_argument("--json", type=Path, help="write the summary here")
    args = parser.parse_args()
    if not 1 <= args.connections <= MAX_CONNECTIONS:
        parser.error(f"--connections must be 1..{MAX_CONNECTIONS}")
    if not 0 < args.duration <= MAX_DURATION:
        parser.error(f"--duration must be in (0, {MAX_DURATION}]")
    if args.url and not args.secret:
        parser.error("--url needs --secret")
    if args.url and urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error("the soak runs on loopback only")
    args.workers = max(1, min(args.workers, args.connections))
    args.reconnect_per_sec = (
        args.connections / 100 if args.reconnect_per_sec is None else args.reconnect_per_sec
    )
    args.warmup = max(30.0, args.duration / 10) if args.warmup is None else args.warmup
    args.secret = args.secret or os.urandom(24).hex()
    limit = raise_fd_limit(args.connections + 1000)
    if limit < args.connections + 200:
        parser.error(f"open-file limit {limit} is too low for {args.connections} connections")

    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    broker = None
    pid = args.pid
    if args.url:
        url = args.url
    else:
        broker = Broker(
            ["--memory", *args.broker_arg] if args.memory else args.broker_arg,
            workdir=workdir,
            secret=args.secret,
            data=workdir / "store",
        )
        try:
            broker.start()
        except StartFailed as exc:
            raise SystemExit(str(exc)) from None
        url, pid = broker.url, broker.pid
    per = args.connections // args.workers
    ranges = [
        (i * per, (i + 1) * per if i < args.workers - 1 else args.connections)
        for i in range(args.workers)
    ]
    cfg = {
        "url": url,
        "secret": args.secret,
        "connections": args.connections,
        "topics": args.topics,
        "rate": args.rate,
        "size": args.size,
        "publishers": args.publishers,
        "reconnect_per_sec": args.reconnect_per_sec / args.workers,
        "ranges": ranges,
        "connect_concurrency": 50,
        "token_ttl": args.duration + 3600,
    }
    loop_name = install_uvloop()
    print(
        f"# soak {time.strftime('%Y-%m-%d %H:%M:%S')} on {os.cpu_count()} cores, {loop_name}; "
        f"broker {url} (pid {pid}, log {broker.log_path if broker else '-'})",
        flush=True,
    )
    print(
        f"# {args.connections} connections over {args.topics} topics, {args.rate:g} msg/s "
        f"({args.size} B padding) for {args.duration:g}s, {args.reconnect_per_sec:g} reconnects/s, "
        f"{args.workers} subscriber processes",
        flush=True,
    )
    try:
        summary = asyncio.run(orchestrate(args, cfg, pid))
    finally:
        if broker is not None:
            code = broker.stop(30)
            print(f"# broker exit code on SIGTERM: {code}", flush=True)
    summary["date"] = time.strftime("%Y-%m-%d")
    summary["cpus"] = os.cpu_count()
    print(json.dumps({k: v for k, v in summary.items() if k != "intervals"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    ok = (
        summary["missing"] == 0
        and summary["duplicates"] == 0
        and summary["out_of_order"] == 0
        and summary["unexpected"] == 0
        and not summary["worker_crashes"]
    )
    print("# RESULT:", "nothing lost" if ok else "PROBLEMS (see above)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
