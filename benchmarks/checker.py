"""The history checker of tests/checker.py over longer runs: a cluster fault injected again
and again while keyed publishers and resuming subscribers run, then every guarantee
checked and the figures printed as a markdown table row.

    python benchmarks/checker.py --fault snapshot --duration 60
    python benchmarks/checker.py --fault all --duration 20     # every fault, 20 s each

Faults: node-kill (a cluster node kill -9, then restarted), redis-rdb / redis-aof
(redis-server kill -9 with snapshots every second / AOF everysec), snapshot (restarted
from a snapshot taken a moment before), pause (SIGSTOP 5 s), oom (maxmemory 1 with
noeviction for 2 s), lagging / lagging-wait (a failover behind a moving endpoint to a
replica cut off for 0.5 s, without / with --redis-wait 1), sentinel / sentinel-wait (the
primary killed under Sentinel); on one node with the SQLite store, sqlite-kill-interval /
sqlite-kill-always (the node kill -9, then restarted, with --fsync interval / always). Each run is bounded: ``--duration`` (at most 600 s) plus
the start and the final drain.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.checker import Checker  # noqa: E402
from tests.redis_procs import Forwarder, Node, RedisProc, Sentinels  # noqa: E402
from tests.support import BrokerProcess, free_port, wait_for  # noqa: E402

HISTORY = ("--history", "1000000")
Setup = tuple[list[BrokerProcess], Callable[[], None]]


@contextlib.contextmanager
def scenario(name: str, home: Path) -> Iterator[Setup]:
    """The processes of one fault scenario, and the fault (a blocking call)."""
    procs: list[Any] = []
    forwarder: Forwarder | None = None
    topology: Sentinels | None = None
    try:
        nodes: list[BrokerProcess]
        if name.startswith("sqlite-kill"):
            fsync = name.removeprefix("sqlite-kill-")
            nodes = [BrokerProcess(home / "n0", "--fsync", fsync, *HISTORY)]
            single = nodes[0]

            def fault() -> None:
                single.kill()
                single.start()

        elif name.startswith("sentinel"):
            topology = Sentinels(home / "ha").start()
            extra = ("--redis-wait", "1") if name.endswith("wait") else ()
            nodes = [Node(home / f"n{i}", topology.url, *HISTORY, *extra) for i in range(2)]
            ha = topology

            def fault() -> None:
                old = ha.primary.port
                ha.primary.kill()
                wait_for(lambda: ha.primary_port() not in (None, old), 30, 0.1)
                # The old primary comes back as a replica of the new one (the roles swap).
                new = ha.primary_port()
                ha.primary, ha.replica = ha.replica, ha.primary
                ha.replica.extra = ["--replicaof", "127.0.0.1", str(new)]
                ha.replica.start()
                wait_for(ha.replica_in_sync, 30, 0.1)

        elif name.startswith("lagging"):
            primary = RedisProc(home / "a", "none").start()
            replica = RedisProc(home / "b", "none", "--replicaof", "127.0.0.1", str(primary.port))
            replica.start()
            procs += [primary, replica]
            wait_for(lambda: replica.client().info("replication")["master_link_status"] == "up", 20)
            forwarder = Forwarder(primary.port).start()
            extra = ("--redis-wait", "1") if name.endswith("wait") else ()
            nodes = [Node(home / f"n{i}", forwarder.url, *HISTORY, *extra) for i in range(2)]
            pair = [primary, replica]
            moving = forwarder

            def fault() -> None:
                old, new = pair
                new.client().replicaof("127.0.0.1", str(free_port()))
                time.sleep(0.5)
                old.kill()
                new.client().replicaof("NO", "ONE")
                moving.target = new.port
                old.extra = ["--replicaof", "127.0.0.1", str(new.port)]
                old.start()
                wait_for(lambda: old.client().info("replication")["master_link_status"] == "up", 20)
                pair.reverse()

        else:
            persistence = {"redis-rdb": "rdb", "redis-aof": "aof", "snapshot": "rdb"}
            extra = ("--save", "1 1") if name == "redis-rdb" else ()
            server = RedisProc(home / "redis", persistence.get(name, "none"), *extra).start()
            procs.append(server)
            nodes = [Node(home / f"n{i}", server.url, *HISTORY) for i in range(2)]
            faults: dict[str, Callable[[], None]] = {
                "node-kill": lambda: (nodes[0].kill(), nodes[0].start()) and None,
                "redis-rdb": server.restart,
                "redis-aof": server.restart,
                "snapshot": lambda: (server.save(), time.sleep(0.3), server.restart()) and None,
                "pause": lambda: (server.pause(), time.sleep(5), server.resume()) and None,
                "oom": lambda: refuse(server),
            }
            fault = faults[name]
        procs += nodes
        for node in nodes:
            node.start()
        yield nodes, fault
    finally:
        for proc in reversed(procs):
            proc.kill()
        if forwarder is not None:
            forwarder.close()
        if topology is not None:
            topology.stop()


def refuse(server: RedisProc) -> None:
    client = server.client()
    client.config_set("maxmemory", "1")
    time.sleep(2)
    client.config_set("maxmemory", "0")


async def run(name: str, duration: float, every: float) -> dict[str, Any]:
    begun = time.monotonic()

    def progress(what: str) -> None:
        print(f"  {name}: {what} at {time.monotonic() - begun:.1f}s", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp, scenario(name, Path(tmp)) as (nodes, fault):
        progress("processes up")
        checker = Checker([n.url for n in nodes], nodes[-1].token, give_up=30)
        started = time.monotonic()
        faults = 0
        async with checker.running(publishers=2, subscribers=3):
            while time.monotonic() - started < duration:
                await asyncio.sleep(min(every, max(duration - (time.monotonic() - started), 0)))
                if time.monotonic() - started >= duration:
                    break
                await asyncio.get_running_loop().run_in_executor(None, fault)
                faults += 1
                progress(f"fault {faults} done")
            progress("publishers stopping")
        progress("publishers stopped")
        history = await checker.finish(drain=3)
        progress("subscribers drained")
        found = history.violations()
        return {"fault": name, "faults": faults, **history.figures(), "violations": found}


FAULTS = [
    "node-kill",
    "redis-rdb",
    "redis-aof",
    "snapshot",
    "pause",
    "oom",
    "lagging",
    "lagging-wait",
    "sentinel",
    "sentinel-wait",
    "sqlite-kill-interval",
    "sqlite-kill-always",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fault", choices=[*FAULTS, "all"], default="all")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per fault")
    parser.add_argument("--every", type=float, default=8.0, help="seconds between faults")
    args = parser.parse_args()
    duration = min(args.duration, 600.0)
    columns = ["fault", "faults", "acked", "longest_wait", "recovered_false", "epochs"]
    columns += ["lost", "gone_from_history", "redelivered", "failed_attempts"]
    print("| " + " | ".join(columns) + " | violations |")
    print("|" + " --- |" * (len(columns) + 1))
    bad = 0
    for name in FAULTS if args.fault == "all" else [args.fault]:
        row = asyncio.run(run(name, duration, args.every))
        bad += len(row["violations"])
        cells = [str(row[c]) for c in columns] + [str(len(row["violations"]))]
        print("| " + " | ".join(cells) + " |", flush=True)
        for v in row["violations"][:10]:
            print(f"    {v}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
