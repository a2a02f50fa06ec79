"""``broker presence`` and ``broker stats``: who is here, and the server's figures."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import click
import orjson
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from broker.client import Client
from broker.errors import Forbidden

from .common import connection_options, make_client, on_error, with_help
from .errors import (
    run,
)
from .params import Duration
from .render import flatten, stats_view


@click.command(
    "presence",
    short_help="Who is subscribed to a topic now.",
    help=with_help(
        """Show who is subscribed to exactly TOPIC now, with their connection counts.

    Pattern subscriptions do not count. Asking about another user's inbox is
    forbidden.

    \b
    Examples:
      broker presence chat/lobby
      broker presence chat/lobby --json
    """
    ),
)
@click.argument("topic")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@connection_options
def presence_command(
    topic: str, as_json: bool, url: str, token: str | None, ca_file: str | None
) -> None:
    """``broker presence`` (help above)."""
    client = make_client(url, token, ca_file, reconnect=False, on_error=on_error)

    async def main() -> list[Any]:
        async with client:
            return await client.presence(topic)

    users = run(main)
    if as_json:
        click.echo(
            orjson.dumps(
                [{"id": u.id, "name": u.name, "connections": u.connections} for u in users]
            ).decode()
        )
        return
    console = Console(highlight=False)
    if not users:
        console.print(f"nobody is subscribed to {topic}")
        return
    table = Table(title=f"subscribed to {topic}", title_justify="left")
    table.add_column("user id", style="cyan")
    table.add_column("name", style="green")
    table.add_column("connections", justify="right")
    for user in sorted(users, key=lambda u: u.id):
        table.add_row(Text(user.id), Text(user.name), str(user.connections))
    console.print(table)


#: What to do about a token without ``admin``, said where ``stats`` refuses one.
GET_ADMIN = (
    "mint one on the broker's machine with `broker token --id ops --admin` and pass it "
    "with --token or BROKER_TOKEN"
)


async def admin_stats(client: Client) -> dict[str, Any]:
    """``client.stats()``; a refusal for want of ``admin`` says how to get such a token."""
    try:
        return await client.stats()
    except Forbidden as exc:
        raise Forbidden(f"{exc.message}; {GET_ADMIN}") from None


@click.command(
    "stats",
    short_help="Broker figures; --watch for a live table (admin).",
    help=with_help(
        """Show the broker's figures: connections, topics, subscriptions, messages.

    Needs an admin token: `broker token --id ops --admin` on the broker's machine
    mints one; pass it with --token or BROKER_TOKEN. --watch keeps a live table,
    with per-second rates of the counters, until Ctrl-C.

    \b
    Examples:
      broker stats
      broker stats --watch --interval 2
    """
    ),
)
@click.option("--watch", "-w", is_flag=True, help="Refresh a live table until Ctrl-C.")
@click.option(
    "--interval",
    default="1s",
    show_default=True,
    type=Duration(),
    help="Refresh period with --watch.",
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    help="With --watch: stop after this many refreshes.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the figures as JSON (one line per refresh with --watch).",
)
@connection_options
def stats_command(
    watch: bool,
    interval: float,
    count: int | None,
    as_json: bool,
    url: str,
    token: str | None,
    ca_file: str | None,
) -> None:
    """``broker stats`` (help above)."""
    client = make_client(url, token, ca_file, reconnect=watch, on_error=on_error)
    console = Console(highlight=False)

    async def once() -> None:
        async with client:
            figures = await admin_stats(client)
        if as_json:
            click.echo(orjson.dumps(figures).decode())
        else:
            console.print(stats_view(flatten(figures), None, 0))

    async def watching() -> None:
        async with client:
            previous: dict[str, Any] | None = None
            before = time.monotonic()
            refreshes = 0
            live = None if as_json else Live(console=console, auto_refresh=False)
            with live if live is not None else contextlib.nullcontext():
                while True:
                    figures = await admin_stats(client)
                    now = time.monotonic()
                    flat = flatten(figures)
                    if live is None:
                        click.echo(orjson.dumps(figures).decode())
                    else:
                        live.update(stats_view(flat, previous, now - before), refresh=True)
                    previous, before = flat, now
                    refreshes += 1
                    if count is not None and refreshes >= count:
                        return
                    await asyncio.sleep(interval or 1.0)

    run(watching if watch else once)
