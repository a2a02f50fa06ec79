"""``broker pub``: publish one message, or one per line of stdin."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import click
import orjson

from broker.client import Client
from broker.core.topics import validate_topic
from broker.errors import (
    BadRequest,
    BrokerError,
    RateLimited,
    Unavailable,
)

from .common import PUB_WINDOW, connection_options, make_client, on_error, with_help
from .errors import (
    CommandError,
    exit_code_for,
    run,
)
from .render import PubProgress, stderr

#: How long ``broker pub`` waits for a lost broker to come back (seconds).
RECONNECT_TIMEOUT = 60.0


def _parse(text: str, as_json: bool, where: str) -> Any:
    if not as_json:
        return text
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise click.UsageError(f"{where} is not valid JSON: {exc}") from None


async def _publish_retrying(
    client: Client, topic: str, data: Any, echo: bool, attempts: int = 5
) -> int:
    """Publish, retrying a few times when the broker says rate_limited or unavailable."""
    delay = 0.05
    for attempt in range(attempts):
        try:
            seq = await client.publish(topic, data, echo=echo)
            assert seq is not None
            return seq
        except (RateLimited, Unavailable):
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
    raise AssertionError("unreachable")


def _stdin_size() -> int | None:
    try:
        st = os.fstat(sys.stdin.fileno())
    except (OSError, ValueError, AttributeError):
        return None
    import stat

    return st.st_size if stat.S_ISREG(st.st_mode) else None


async def _pub_lines(client: Client, topic: str, as_json: bool, echo: bool) -> tuple[int, int]:
    """Publish each stdin line, up to PUB_WINDOW in flight; (sent, acknowledged)."""
    stream = sys.stdin
    window = asyncio.Semaphore(PUB_WINDOW)
    tasks: set[asyncio.Task[None]] = set()
    failures: list[tuple[int, BrokerError]] = []
    fatal = asyncio.Event()
    sent = acked = 0
    interactive = stream.isatty() or _stdin_size() is None

    async def one(line_no: int, data: Any, size: int, progress: PubProgress) -> None:
        nonlocal acked
        try:
            await _publish_retrying(client, topic, data, echo)
            acked += 1
            progress.acked(size)
        except BrokerError as exc:
            failures.append((line_no, exc))
            if not isinstance(exc, (RateLimited, Unavailable)):
                fatal.set()  # refused or connection gone: the rest would fail alike
        finally:
            window.release()

    with PubProgress(_stdin_size()) as progress:
        line_no = 0
        while not fatal.is_set():
            line = await asyncio.to_thread(stream.readline) if interactive else stream.readline()
            if not line:
                break
            line_no += 1
            size = len(line.encode())
            text = line.rstrip("\r\n")
            if not text.strip():
                continue  # blank lines are not messages
            data = _parse(text, as_json, f"line {line_no}")
            await window.acquire()
            if fatal.is_set():
                window.release()
                break
            sent += 1
            task = asyncio.create_task(one(line_no, data, size, progress))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    if failures:
        failures.sort(key=lambda f: f[0])
        line_no, first = failures[0]
        error = CommandError.from_broker(first, f"line {line_no}")
        raise CommandError(
            f"{sent - acked} of {sent} messages not acknowledged; first failure at {error.message}",
            exit_code_for(first),
        )
    return sent, acked


@click.command(
    "pub",
    short_help="Publish a message, or each line of stdin.",
    help=with_help(
        """Publish MESSAGE to TOPIC, or each line of stdin when there is no MESSAGE.

    MESSAGE is sent as a string; with --json it is parsed as JSON and sent as that
    value (number, object, ...). Reading stdin, blank lines are skipped, up to 100
    messages are in flight at once, and a progress bar shows on a terminal. The exit
    code is 0 only when the broker acknowledged (durably recorded) every message;
    rate-limited ones are retried a few times. When the connection drops (a broker
    restart), pub reconnects for up to a minute and sends what was in flight again with
    the same idempotency keys, so each message is recorded exactly once.

    \b
    Examples:
      broker pub football "2-1"
      broker pub scores/uk '{"home": 2, "away": 1}' --json
      seq 1000 | broker pub counter --json
      tail -f app.log | broker pub logs/app
    """
    ),
)
@click.argument("topic")
@click.argument("message", required=False)
@click.option("--json", "as_json", is_flag=True, help="MESSAGE (or each line) is a JSON value.")
@click.option(
    "--echo",
    is_flag=True,
    help="Ask the broker to deliver it to this connection's own subscriptions too.",
)
@connection_options
def pub_command(
    topic: str,
    message: str | None,
    as_json: bool,
    echo: bool,
    url: str,
    token: str | None,
    ca_file: str | None,
) -> None:
    """``broker pub`` (help above)."""
    try:
        validate_topic(topic)
    except BadRequest as exc:
        raise click.BadParameter(f"{topic!r}: {exc.message}", param_hint="TOPIC") from None
    data = _parse(message, as_json, "MESSAGE") if message is not None else None
    if message is None and sys.stdin.isatty():
        # Else a terminal just sits there: say what it waits for.
        click.echo(
            f"reading messages for {topic} from stdin, one per line; end with Ctrl-D "
            f"(or give one: broker pub {topic} MESSAGE)",
            err=True,
        )
    # Reconnect after a lost connection (a broker restart, say): the client sends the
    # publishes that were in flight again with their idempotency keys, so every message
    # is recorded once. A broker that does not come back within the timeout fails them.
    client = make_client(
        url,
        token,
        ca_file,
        reconnect=True,
        reconnect_timeout=RECONNECT_TIMEOUT,
        on_error=on_error,
    )
    terminal = sys.stderr.isatty()

    async def main() -> None:
        async with client:
            if message is not None:
                seq = await client.publish(topic, data, echo=echo)
                if terminal:
                    stderr().print(f"[dim]published to {topic} (seq {seq})[/dim]")
                return
            sent, acked = await _pub_lines(client, topic, as_json, echo)
            if terminal:
                stderr().print(f"[dim]{acked} of {sent} messages published to {topic}[/dim]")

    run(main)


# -- presence and stats --------------------------------------------------------------------
