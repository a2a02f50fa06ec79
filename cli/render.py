"""How the client commands print messages: raw data, JSON lines, templates, rich lines.

Pure formatting, no I/O except through a rich ``Console`` handed in.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any, Self

import orjson
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from broker.client import Message

#: The fields ``--format`` templates may use.
TEMPLATE_FIELDS = {
    "topic": "the message's topic",
    "seq": "its broker-wide sequence number",
    "data": "its data: strings raw, other JSON compact",
    "data.KEY": "a field inside JSON object data (nested: data.a.b, lists: data.0)",
    "from.id": "the sender's user id",
    "from.name": "the sender's display name",
    "ts": "the broker's receive time, milliseconds since the Unix epoch",
    "time": "that time, local, ISO 8601 with milliseconds",
    "json": "the whole message as one JSON object",
}

TEMPLATE_HELP = (
    "Template over message fields, e.g. '{time} {topic} {from.name}: {data}'. Fields: "
    + ", ".join("{" + name + "}" for name in TEMPLATE_FIELDS)
    + ". '{{' and '}}' are literal braces; \\n and \\t are newline and tab."
)


def stderr() -> Console:
    """A console on stderr for messages to the user (never the data itself)."""
    return Console(stderr=True, highlight=False, soft_wrap=True)


def data_text(data: Any) -> str:
    """Message data as text: a string as is, any other JSON value compact."""
    if isinstance(data, str):
        return data
    return orjson.dumps(data).decode()


def json_line(msg: Message) -> str:
    """The whole message as one compact JSON object."""
    return orjson.dumps(msg.to_json()).decode()


def local_time(msg: Message, *, date: bool = True) -> str:
    """The message's time in local time, ISO 8601 with milliseconds (or just the clock)."""
    when = datetime.fromtimestamp(msg.ts / 1000).astimezone()
    if date:
        return when.isoformat(timespec="milliseconds")
    return when.strftime("%H:%M:%S.") + f"{when.microsecond // 1000:03d}"


def _dig(value: Any, path: list[str]) -> Any:
    for key in path:
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            return None
    return value


def _field_getter(name: str) -> Callable[[Message], str]:
    simple: dict[str, Callable[[Message], str]] = {
        "topic": lambda m: m.topic,
        "seq": lambda m: str(m.seq),
        "data": lambda m: data_text(m.data),
        "from.id": lambda m: m.sender.id,
        "from.name": lambda m: m.sender.name,
        "ts": lambda m: str(m.ts),
        "time": local_time,
        "json": json_line,
    }
    if name in simple:
        return simple[name]
    if name.startswith("data.") and len(name) > 5:
        path = name[5:].split(".")

        def getter(m: Message) -> str:
            value = _dig(m.data, path)
            return "" if value is None else data_text(value)

        return getter
    raise ValueError(
        f"unknown field {{{name}}} in --format; use "
        + ", ".join("{" + n + "}" for n in TEMPLATE_FIELDS)
    )


_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_ESCAPES = {"\\n": "\n", "\\t": "\t", "\\\\": "\\"}


def _unescape(text: str) -> str:
    return re.sub(r"\\[nt\\]", lambda m: _ESCAPES[m.group(0)], text)


def compile_template(template: str) -> Callable[[Message], str]:
    """A function rendering a message through ``template``; ``ValueError`` if it is invalid."""
    parts: list[str | Callable[[Message], str]] = []
    pos = 0
    for match in _TOKEN.finditer(template):
        parts.append(_unescape(template[pos : match.start()]))
        token = match.group(0)
        if token in ("{{", "}}"):
            parts.append(token[0])
        elif token in ("{", "}"):
            raise ValueError(f"unbalanced {token!r} in --format (use '{token * 2}' for a brace)")
        else:
            parts.append(_field_getter(match.group(1).strip()))
        pos = match.end()
    parts.append(_unescape(template[pos:]))

    def render(msg: Message) -> str:
        return "".join(p if isinstance(p, str) else p(msg) for p in parts)

    return render


def rich_line(msg: Message) -> Text:
    """A readable one-line rendering: time, topic, sender, data."""
    line = Text()
    line.append(local_time(msg, date=False), style="dim")
    line.append(" ")
    line.append(msg.topic, style="bold cyan")
    line.append(" ")
    sender = (
        msg.sender.name
        if msg.sender.name == msg.sender.id
        else (f"{msg.sender.name} ({msg.sender.id})")
    )
    line.append(sender, style="green")
    line.append(" ")
    if isinstance(msg.data, str):
        line.append(msg.data)
    else:
        line.append(data_text(msg.data), style="yellow")
    return line


class Printer:
    """Writes messages to stdout in the chosen mode: raw, json, template or rich."""

    def __init__(self, console: Console, mode: str, template: str | None = None) -> None:
        self.console = console
        self.mode = mode
        self.template = compile_template(template) if template is not None else None

    def __call__(self, msg: Message) -> None:
        """Print one message."""
        if self.mode == "rich":
            self.console.print(rich_line(msg), soft_wrap=True, highlight=False)
            return
        if self.template is not None:
            text = self.template(msg)
        elif self.mode == "json":
            text = json_line(msg)
        else:
            text = data_text(msg.data)
        out = self.console.file
        out.write(text + "\n")
        out.flush()


class PubProgress:
    """A rich progress display on stderr, or nothing when stderr is not a terminal.

    With stdin a regular file the bar shows the share of its bytes acknowledged.
    """

    def __init__(self, total_bytes: int | None) -> None:
        self.progress: Any = None
        self.count = 0
        if not sys.stderr.isatty():
            return
        from rich.progress import (
            BarColumn,
            Progress,
            SpinnerColumn,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        columns: list[Any] = [
            SpinnerColumn(),
            TextColumn("{task.fields[count]} published"),
        ]
        if total_bytes:
            columns += [BarColumn(), TaskProgressColumn()]
        columns.append(TimeElapsedColumn())
        self.progress = Progress(*columns, console=stderr(), transient=True)
        self.task = self.progress.add_task("pub", total=total_bytes or None, count=0)

    def __enter__(self) -> Self:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def acked(self, size: int) -> None:
        """Count one acknowledged message of ``size`` bytes of input."""
        self.count += 1
        if self.progress is not None:
            self.progress.update(self.task, advance=size, count=self.count)


def flatten(figures: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested stats as ``a.b`` keys."""
    flat: dict[str, Any] = {}
    for key, value in figures.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


TOPIC_PREFIX = "top_topics."


def stats_view(figures: dict[str, Any], previous: dict[str, Any] | None, elapsed: float) -> Group:
    """The figures table, then the busiest topics by message rate (by count at first)."""
    plain = {k: v for k, v in figures.items() if not k.startswith(TOPIC_PREFIX)}
    topics = Table(title="top topics", title_justify="left")
    topics.add_column("topic", style="cyan")
    topics.add_column("messages", justify="right")
    topics.add_column("per second", justify="right", style="yellow")
    rows = []
    for key, count in figures.items():
        if not key.startswith(TOPIC_PREFIX) or not isinstance(count, int):
            continue
        before = (previous or {}).get(key)
        rate = (
            (count - before) / elapsed
            if isinstance(before, int) and elapsed > 0 and count >= before
            else None
        )
        rows.append((key.removeprefix(TOPIC_PREFIX), count, rate))
    rows.sort(key=lambda r: (r[2] if r[2] is not None else -1.0, r[1]), reverse=True)
    for topic, count, rate in rows[:10]:
        topics.add_row(Text(topic), f"{count:,}", "" if rate is None else f"{rate:,.1f}")
    return Group(stats_table(plain, previous, elapsed), topics)


def stats_table(figures: dict[str, Any], previous: dict[str, Any] | None, elapsed: float) -> Table:
    table = Table(title="broker stats", title_justify="left")
    table.add_column("figure", style="cyan")
    table.add_column("value", justify="right")
    if previous is not None:
        table.add_column("per second", justify="right", style="yellow")
    for key, value in figures.items():
        shown = (
            value
            if isinstance(value, (int, float)) and not isinstance(value, bool)
            else data_text(value)
        )
        row: list[Any] = [
            Text(key),
            Text(f"{shown:,}" if isinstance(shown, int) else str(shown)),
        ]
        if previous is not None:
            before = previous.get(key)
            rate = ""
            if (
                isinstance(value, (int, float))
                and isinstance(before, (int, float))
                and not isinstance(value, bool)
                and elapsed > 0
                and value >= before
                and key.split(".")[-1]
                not in (
                    "connections",
                    "subscriptions",
                    "topics",
                    "users",
                    "uptime",
                    "seq",
                )
            ):
                rate = f"{(value - before) / elapsed:,.1f}"
            row.append(rate)
        table.add_row(*row)
    return table
