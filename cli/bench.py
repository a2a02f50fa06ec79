"""``broker bench``: measure a broker (a running one, or one it starts)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import click
import orjson
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from broker.client.bench import BenchConfig, BenchResult, run
from broker.client.link import HandshakeFailed
from broker.core.auth import mint_token

from .errors import EXIT_UNAUTHORIZED, EXIT_UNREACHABLE, CommandError
from .params import Duration


@contextlib.contextmanager
def embedded_broker(args: list[str]) -> Iterator[tuple[str, str, int]]:
    """Start ``broker serve`` on a free loopback port with a temporary data dir."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret = os.urandom(24).hex()
    with tempfile.TemporaryDirectory(prefix="broker-bench-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "broker.cli",
            "serve",
            "--port",
            str(port),
            "--secret",
            secret,
            *([] if "--memory" in args else ["--data", tmp]),
            "--log-level",
            "warning",
            "--max-queue",
            "64MiB",
            *args,
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 20
            while True:
                if proc.poll() is not None:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    raise click.ClickException(f"embedded broker exited: {err.strip()}")
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", port), 0.2),
                ):
                    break
                if time.monotonic() > deadline:
                    raise click.ClickException("embedded broker did not start")
                time.sleep(0.05)
            yield f"ws://127.0.0.1:{port}/ws", secret, proc.pid
        finally:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
            if proc.poll() is None:
                proc.kill()


def render(result: BenchResult, console: Console) -> None:
    table = Table(title="broker bench", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("published", f"{result.published:,} ({result.publish_rate:,.0f}/s)")
    table.add_row("acknowledged / errors", f"{result.acked:,} / {result.errors:,}")
    table.add_row(
        "delivered / expected",
        f"{result.delivered:,} / {result.expected:,} ({result.delivery_rate:,.0f}/s)",
    )
    for name, lat in (
        ("ack latency ms", result.ack_latency_ms),
        ("delivery latency ms", result.delivery_latency_ms),
    ):
        if lat:
            table.add_row(name, "  ".join(f"{k} {v:g}" for k, v in lat.items() if k != "mean"))
    if result.server_cpu_per_delivery_us is not None:
        table.add_row("server CPU per delivery", f"{result.server_cpu_per_delivery_us:.3f} µs")
    if result.rss_per_connection_kib is not None:
        table.add_row(
            "server RSS / per connection",
            f"{result.server_rss_mb} MB / {result.rss_per_connection_kib} KiB",
        )
    table.add_row("duration", f"{result.seconds:.2f} s")
    console.print(table)


@click.command()
@click.option(
    "--url", envvar="BROKER_URL", help="Benchmark this running broker instead of starting one."
)
@click.option("--secret", envvar="BROKER_SECRET", help="Secret of that broker (to mint tokens).")
@click.option("--server-pid", type=int, help="Pid of that broker, for CPU and memory figures.")
@click.option("--pub", "publishers", default=1, show_default=True, type=click.IntRange(1))
@click.option("--sub", "subscribers", default=10, show_default=True, type=click.IntRange(0))
@click.option(
    "--msgs",
    "messages",
    default=10_000,
    show_default=True,
    type=click.IntRange(1),
    help="Messages in total.",
)
@click.option(
    "--size",
    default=100,
    show_default=True,
    type=click.IntRange(40),
    help="Approximate message size in bytes.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=1),
    help="Total publish rate (messages/s); default: as fast as acks allow.",
)
@click.option("--topics", default=1, show_default=True, type=click.IntRange(1))
@click.option(
    "--acks/--no-acks", default=True, show_default=True, help="Publish with ids and wait for acks."
)
@click.option(
    "--window",
    default=100,
    show_default=True,
    type=click.IntRange(1),
    help="Acked publishes in flight per publisher.",
)
@click.option("--duration", type=Duration(), help="Stop publishing after this long (e.g. 30s, 2m).")
@click.option("--memory", is_flag=True, help="Embedded broker: memory store instead of SQLite.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def bench(
    url: str | None,
    secret: str | None,
    server_pid: int | None,
    memory: bool,
    as_json: bool,
    **opts: object,
) -> None:
    """Measure throughput, latency and server cost of a broker.

    Without --url, starts a broker on a free loopback port (SQLite store in a temporary
    directory, or --memory) and reports its CPU per delivery and memory per connection.

    \b
    Examples:
      broker bench --pub 1 --sub 1000 --msgs 20000
      broker bench --sub 0 --msgs 50000 --window 100     # acked publish throughput
      broker bench --url ws://host:8765/ws --secret S --rate 2000 --duration 1m

    \b
    Exit codes: 0 done, 1 other failure, 2 bad arguments, 3 broker unreachable or
    connection lost, 4 token refused (wrong --secret).
    """
    console = Console(stderr=True)

    def go(target: str, key: str, pid: int | None) -> BenchResult:
        try:
            return measure(target, key, pid)
        except HandshakeFailed as exc:
            code = EXIT_UNAUTHORIZED if exc.status == 401 else EXIT_UNREACHABLE
            reason = "token refused (is --secret the broker's?)" if exc.status == 401 else exc
            raise CommandError(f"benchmark failed: {target}: {reason}", code) from None
        except (OSError, TimeoutError) as exc:
            # The same exit code as the other commands give an unreachable broker.
            reason = str(exc) or type(exc).__name__
            raise CommandError(f"benchmark failed: {target}: {reason}", EXIT_UNREACHABLE) from None
        except RuntimeError as exc:
            raise CommandError(f"benchmark failed: {exc}") from None

    def measure(target: str, key: str, pid: int | None) -> BenchResult:
        cfg = BenchConfig(
            url=target,
            token=lambda uid: mint_token(key, uid, ttl=3600),
            server_pid=pid,
            **opts,  # type: ignore[arg-type]
        )
        if as_json or not console.is_terminal:
            return run(cfg)
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("publishing", total=cfg.messages)
            return run(cfg, lambda done, total: bar.update(task, completed=done))

    if url:
        from broker.local import read_local_secret

        key = secret or read_local_secret()
        if not key:
            raise click.UsageError("--secret is needed to mint tokens for that broker")
        result = go(url, key, server_pid)
    else:
        with embedded_broker(["--memory"] if memory else []) as (target, key, pid):
            result = go(target, key, pid)
    if as_json:
        click.echo(orjson.dumps(result.as_dict()).decode())
    else:
        render(result, Console())
