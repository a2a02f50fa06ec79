"""``broker sub`` and ``broker tail``: print messages as they arrive."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable

import click
from rich.console import Console

from broker.client import Client, Message

from .common import (
    F,
    check_patterns,
    check_template,
    connection_options,
    make_client,
    on_error,
    on_gap,
    on_state_printer,
    warn,
    with_help,
)
from .errors import (
    EXIT_TIMEOUT,
    CommandError,
    run,
)
from .params import Duration
from .render import TEMPLATE_HELP, Printer, stderr


def _output_options(func: F) -> F:
    func = click.option(
        "--timeout",
        type=Duration(),
        help="Give up after this long (exit 6) unless --count messages came first.",
    )(func)
    func = click.option(
        "--count",
        "-c",
        type=click.IntRange(min=1),
        help="Exit 0 after this many messages.",
    )(func)
    func = click.option(
        "--format",
        "-F",
        "template",
        callback=check_template,
        metavar="TEMPLATE",
        help=TEMPLATE_HELP,
    )(func)
    func = click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Each message as one JSON line: topic, seq, data, from, ts.",
    )(func)
    return func


async def _follow(
    client: Client,
    patterns: tuple[str, ...],
    printer: Callable[[Message], None],
    *,
    since: int | None,
    epoch: str | None,
    last: int | None,
    latest: bool = False,
    count: int | None,
    verbose: bool,
) -> None:
    async with client:
        for pattern in patterns:
            sub = await client.subscribe(
                pattern, since=since, epoch=epoch, last=last, latest=latest
            )
            if since is not None and not sub.recovered:
                if epoch is not None and sub.epoch != epoch:
                    warn(
                        f"the broker's history is not epoch {epoch} any more (now {sub.epoch}); "
                        f"showing all it still holds for {pattern!r}"
                    )
                else:
                    warn(f"some messages on {pattern!r} after seq {since} are no longer in history")
            if verbose:
                stderr().print(
                    f"[dim]subscribed to {pattern} (seq {sub.seq}, epoch {sub.epoch})[/dim]"
                )
        received = 0
        async for msg in client:
            printer(msg)
            received += 1
            if count is not None and received >= count:
                return


def _run_follow(
    url: str,
    token: str | None,
    ca_file: str | None,
    patterns: tuple[str, ...],
    mode: str,
    template: str | None,
    *,
    since: int | None = None,
    epoch: str | None = None,
    last: int | None = None,
    latest: bool = False,
    anonymous: bool = False,
    count: int | None,
    timeout: float | None,
    verbose: bool,
) -> None:
    check_patterns(patterns)
    client = make_client(
        url,
        token,
        ca_file,
        reconnect=True,
        anonymous=anonymous,
        on_gap=on_gap,
        on_error=on_error,
        on_state=on_state_printer(),
    )
    printer = Printer(Console(highlight=False), mode, template)
    received = 0

    def count_and_print(msg: Message) -> None:
        nonlocal received
        received += 1
        printer(msg)

    async def main() -> None:
        try:
            await asyncio.wait_for(
                _follow(
                    client,
                    patterns,
                    count_and_print,
                    since=since,
                    epoch=epoch,
                    last=last,
                    latest=latest,
                    count=count,
                    verbose=verbose,
                ),
                timeout,
            )
        except TimeoutError:
            got = f"{received} of {count}" if count is not None else str(received)
            raise CommandError(
                f"timed out after {timeout:g}s ({got} messages received)", EXIT_TIMEOUT
            ) from None

    run(main)


def _mode(as_json: bool, template: str | None, rich_default: bool) -> str:
    if as_json and template is not None:
        raise click.UsageError("--json and --format are exclusive")
    if as_json:
        return "json"
    if template is not None:
        return "template"
    return "rich" if rich_default else "raw"


@click.command(
    "sub",
    short_help="Print messages on topics or patterns as they come.",
    help=with_help(
        """Subscribe to topics or patterns and print each message as it arrives.

    PATTERN is a topic or an MQTT-style pattern: '+' is one level, '#' (last)
    any number of levels, e.g. 'scores/+' or 'scores/#'. Quote them in the shell.

    Output: the data alone (strings raw, other JSON compact), one message per line;
    on a terminal a readable line (time, topic, sender, data) instead. --json prints
    the whole message as one JSON object per line, --format a template of your own.

    Reconnects by itself and resumes where it stopped, without loss or duplicates
    while the broker's history holds the messages; says so on stderr when it cannot.
    To resume a later run, pass --since with the last seq you saw (see --json).

    \b
    Examples:
      broker sub football
      broker sub 'scores/#' --json
      broker sub football --last 5 --count 5
      broker sub football --since 1042 --epoch 3f2a9c
      broker sub 'scores/#' --latest --anonymous
      broker sub 'chat/+' -F '{time} {from.name}@{topic}: {data}'
    """
    ),
)
@click.argument("patterns", metavar="PATTERN...", nargs=-1, required=True)
@click.option(
    "--since",
    type=click.IntRange(min=0),
    metavar="SEQ",
    help="First replay the kept messages after this seq.",
)
@click.option(
    "--epoch",
    metavar="EPOCH",
    help="The history epoch SEQ was seen under (with --since).",
)
@click.option(
    "--last",
    type=click.IntRange(min=0),
    metavar="N",
    help="First replay the last N kept messages.",
)
@click.option(
    "--latest",
    is_flag=True,
    help="First replay the latest kept message of each matching topic (a scoreboard's "
    "current scores).",
)
@click.option(
    "--anonymous",
    is_flag=True,
    help="Connect without a token (any --token is ignored): public topics only, the "
    "broker's public namespaces.",
)
@_output_options
@click.option("--raw", is_flag=True, help="Print the data only, even on a terminal.")
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Report each subscription's seq and epoch on stderr.",
)
@connection_options
def sub_command(
    patterns: tuple[str, ...],
    since: int | None,
    epoch: str | None,
    last: int | None,
    latest: bool,
    anonymous: bool,
    as_json: bool,
    template: str | None,
    count: int | None,
    timeout: float | None,
    raw: bool,
    verbose: bool,
    url: str,
    token: str | None,
    ca_file: str | None,
) -> None:
    """``broker sub`` (help above)."""
    if sum((since is not None, last is not None, latest)) > 1:
        raise click.UsageError("--since, --last and --latest are exclusive")
    if epoch is not None and since is None:
        raise click.UsageError("--epoch goes with --since")
    mode = _mode(as_json, template, rich_default=sys.stdout.isatty() and not raw)
    _run_follow(
        url,
        token,
        ca_file,
        patterns,
        mode,
        template,
        since=since,
        epoch=epoch,
        last=last,
        latest=latest,
        anonymous=anonymous,
        count=count,
        timeout=timeout,
        verbose=verbose,
    )


@click.command(
    "tail",
    short_help="Show the last N messages, then follow.",
    help=with_help(
        """Show the last N messages on topics or patterns, then follow, like tail -f.

    Each message is one readable line: time, topic, sender, data.

    \b
    Examples:
      broker tail football
      broker tail 'scores/#' -n 50
    """
    ),
)
@click.argument("patterns", metavar="PATTERN...", nargs=-1, required=True)
@click.option(
    "-n",
    "--lines",
    "lines",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help="How many past messages to show first.",
)
@_output_options
@connection_options
def tail_command(
    patterns: tuple[str, ...],
    lines: int,
    as_json: bool,
    template: str | None,
    count: int | None,
    timeout: float | None,
    url: str,
    token: str | None,
    ca_file: str | None,
) -> None:
    """``broker tail`` (help above)."""
    mode = _mode(as_json, template, rich_default=True)
    _run_follow(
        url,
        token,
        ca_file,
        patterns,
        mode,
        template,
        last=lines,
        count=count,
        timeout=timeout,
        verbose=False,
    )


# -- pub -----------------------------------------------------------------------------------
