"""Acknowledged publishes per second, SQLite store vs memory store, one publisher.

Starts a broker (benchmarks/harness.py) for each store on a free loopback port, publishes with up to
WINDOW acknowledged publishes in flight, and prints throughput and publish-to-ack latency.

    python benchmarks/publish_ack.py [--msgs 50000] [--window 100] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import Broker  # noqa: E402

from broker.client.bench import BenchConfig, run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--msgs", type=int, default=50_000)
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(
        f"{'store':8} {'acked/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'server CPU s':>13}"
    )
    for store, extra in (("sqlite", []), ("memory", ["--memory"])):
        rates, p50s, p99s, maxes, cpus = [], [], [], [], []
        for _ in range(args.runs):
            with Broker([*extra, "--max-queue", "64MiB"]) as broker:
                cfg = BenchConfig(
                    url=broker.url,
                    token=broker.token,
                    publishers=1,
                    subscribers=0,
                    messages=args.msgs,
                    window=args.window,
                    server_pid=broker.pid,
                )
                result = run(cfg)
            assert result.acked == args.msgs and result.errors == 0, result
            rates.append(result.publish_rate)
            p50s.append(result.ack_latency_ms["p50"])
            p99s.append(result.ack_latency_ms["p99"])
            maxes.append(result.ack_latency_ms["max"])
            cpus.append(result.server_cpu_seconds or 0.0)
        print(
            f"{store:8} {statistics.median(rates):>10,.0f} {statistics.median(p50s):>8.2f} "
            f"{statistics.median(p99s):>8.2f} {statistics.median(maxes):>8.2f} {statistics.median(cpus):>13.2f}"
        )


if __name__ == "__main__":
    main()
