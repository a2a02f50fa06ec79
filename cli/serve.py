"""``broker serve``: run a broker node."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from broker.server.app import BrokerServer

from broker.server.config import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    ServerConfig,
    ensure_local_secret,
    read_local_secret,
)

from .params import Duration, Size


def banner(server: BrokerServer) -> None:
    """Print where the broker listens and how to use it, on stderr."""
    from rich.console import Console
    from rich.panel import Panel

    from broker import __version__
    from broker.server.config import secret_path
    from broker.server.factory import store_label

    config = server.config
    http = config.url.removesuffix("/ws").replace("ws", "http", 1)
    if config.algorithm.startswith("HS"):
        keys = (
            "--secret / BROKER_SECRET"
            if config.secret != read_local_secret()
            else str(secret_path())
        )
    else:
        keys = f"{config.algorithm} public key {config.public_key}"
    lines = [
        f"[bold]broker {__version__}[/bold] listening on [cyan]{config.url}[/cyan]",
        f"console  [cyan]{http}/[/cyan]   also /healthz, /metrics",
        f"store    {store_label(server.store)}",
        f"history  epoch {server.store.epoch}, last seq {server.store.last_seq}",
        f"tokens   {config.algorithm}, key from {keys}",
        'try      [bold]broker sub football[/bold]  and  [bold]broker pub football "2-1"[/bold]',
    ]
    Console(stderr=True).print(Panel("\n".join(lines), expand=False, border_style="green"))


@click.command()
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to listen on.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--secret",
    envvar="BROKER_SECRET",
    help="HMAC secret for tokens [env BROKER_SECRET]. Default: a random one kept in the "
    "local secret file, so `broker token` on this machine finds it.",
)
@click.option(
    "--algorithm",
    default="HS256",
    show_default=True,
    type=click.Choice(["HS256", "HS384", "HS512", "RS256", "ES256"]),
    help="The one JWT algorithm accepted.",
)
@click.option(
    "--public-key",
    type=click.Path(exists=True, dir_okay=False),
    help="PEM public key for RS256/ES256.",
)
@click.option("--audience", help="Require this 'aud' claim.")
@click.option("--issuer", help="Require this 'iss' claim.")
@click.option("--require-exp", is_flag=True, help="Refuse tokens without 'exp'.")
@click.option(
    "--data",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory of the on-disk (SQLite) history. Default: the user's data dir.",
)
@click.option("--memory", is_flag=True, help="Keep history in memory only (lost on restart).")
@click.option(
    "--redis",
    metavar="URL",
    help="Cluster mode: switches to the Redis-backed store and fan-out shared by every node "
    "given the same URL (e.g. redis://127.0.0.1:6379/0); --memory/--data don't apply.",
)
@click.option(
    "--redis-wait",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    metavar="N",
    help="Cluster mode: acknowledge a publish only once N Redis replicas have it (WAIT).",
)
@click.option(
    "--redis-wait-timeout",
    default="1s",
    show_default=True,
    type=Duration(),
    help="How long --redis-wait waits; then the publish gets 'unavailable'.",
)
@click.option(
    "--history",
    default=1000,
    show_default=True,
    type=click.IntRange(0),
    help="Messages kept per topic.",
)
@click.option(
    "--retention",
    default="24h",
    show_default=True,
    type=Duration(),
    help="Maximum age of kept messages.",
)
@click.option(
    "--max-message-size",
    default="64KiB",
    show_default=True,
    type=Size(),
    help="Largest frame accepted (close 1009 above).",
)
@click.option(
    "--max-queue",
    default="1MiB",
    show_default=True,
    type=Size(),
    help="Unsent bytes per connection before it is closed as a slow consumer (4008).",
)
@click.option(
    "--rate-limit",
    type=click.FloatRange(min=0, min_open=True),
    help="Publishes per second per connection.",
)
@click.option("--max-connections", type=click.IntRange(1), help="Connections accepted at once.")
@click.option("--max-subscriptions", type=click.IntRange(1), help="Subscriptions per connection.")
@click.option(
    "--auth-timeout",
    default="10s",
    show_default=True,
    type=Duration(),
    help="Time a new connection has to send its HTTP request, and then its 'auth' frame.",
)
@click.option(
    "--ping-interval",
    default="20s",
    show_default=True,
    type=Duration(),
    help="How often to ping quiet connections; one silent for two intervals is dropped "
    "(0: no pings).",
)
@click.option(
    "--drain-timeout",
    default="10s",
    show_default=True,
    type=Duration(),
    help="Time allowed for a graceful shutdown.",
)
@click.option(
    "--allowed-origin",
    "allowed_origins",
    multiple=True,
    help="Browser origin allowed to connect (repeatable); others get 403.",
)
@click.option(
    "--tls-cert",
    type=click.Path(exists=True, dir_okay=False),
    help="PEM certificate: serve wss://.",
)
@click.option(
    "--tls-key",
    type=click.Path(exists=True, dir_okay=False),
    help="PEM private key for --tls-cert.",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@click.option(
    "--log-format", default="rich", show_default=True, type=click.Choice(["rich", "json"])
)
def serve(**opts: object) -> None:
    """Run a broker on HOST:PORT until SIGTERM or Ctrl-C.

    \b
    Endpoints: ws://HOST:PORT/ws (the protocol), /healthz, and / (browser console).
    History is kept on disk by default; --memory keeps it in memory only.

    \b
    Examples:
      broker serve
      broker serve --port 9000 --history 100 --retention 1h
      BROKER_SECRET=s3cret broker serve --host 0.0.0.0
    """
    from broker.errors import Unavailable
    from broker.server.factory import run
    from broker.server.logs import setup_logging

    if opts["tls_cert"] and not opts["tls_key"]:
        raise click.UsageError("--tls-cert needs --tls-key")
    if opts["memory"] and opts["data"]:
        raise click.UsageError("--memory and --data exclude each other")
    if opts["redis_wait"] and not opts["redis"]:
        raise click.UsageError("--redis-wait needs --redis")
    if opts["redis"] and (opts["memory"] or opts["data"]):
        raise click.UsageError("--redis keeps history in Redis: --memory and --data don't apply")
    log_level = str(opts.pop("log_level"))
    config = ServerConfig(**{k: v for k, v in opts.items()})  # type: ignore[arg-type]
    config.allowed_origins = list(opts["allowed_origins"])  # type: ignore[call-overload]
    if config.algorithm.startswith("HS"):
        config.secret = config.secret or ensure_local_secret()
    elif not config.public_key:
        raise click.UsageError(f"--algorithm {config.algorithm} needs --public-key")
    setup_logging(log_level, config.log_format)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is optional
        runner = asyncio.run  # type: ignore[assignment]
    try:
        runner(run(config, on_ready=banner if config.log_format == "rich" else None))
    except OSError as exc:
        click.echo(
            f"broker: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}", err=True
        )
        sys.exit(1)
    except Unavailable as exc:
        click.echo(f"broker: {exc.message}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
