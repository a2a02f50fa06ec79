"""How the client commands print messages: raw data, JSON lines, templates, rich lines.

Pure formatting, no I/O except through a rich ``Console`` handed in.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

import orjson
from rich.console import Console
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
