"""Logging setup: rich console logs on stderr, or one JSON object per line.

The server's log calls name what happened in ``extra``: ``event`` (``connect``,
``disconnect``, ``refused``, ``slow_consumer``, ``token_expired``, ...), ``conn`` (the
connection id), ``user`` (the user id), and where it applies ``code``, ``peer``, ``result``.
The JSON format emits them as top-level fields for log shippers; the rich format shows the
message, which carries the same facts for a human.

Neither format ever carries a token or a message payload: the server never passes them to
a log call, and ``RedactTokens`` blanks anything shaped like a JWT as a second line of
defence (an exception message quoting a header, say).
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

import orjson

#: Fields first in every JSON line, in this order (then any other ``extra`` field).
LEADING_FIELDS = ("event", "conn", "user")

# Every attribute a plain LogRecord has: anything else on a record came from ``extra``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
# A JWT: three base64url segments, the first two JSON objects ("eyJ" is '{"').
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")
REDACTED = "[token redacted]"


def redact(text: str) -> str:
    """``text`` with anything shaped like a JWT replaced."""
    return _JWT.sub(REDACTED, text) if "eyJ" in text else text


class RedactTokens(logging.Filter):
    """Blank JWT-shaped strings in a record's message and arguments before formatting."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        return True


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a log call passed in ``extra``, leading fields first, None left out."""
    fields: dict[str, Any] = {}
    for key in LEADING_FIELDS:
        value = record.__dict__.get(key)
        if value is not None:
            fields[key] = value
    for key, value in record.__dict__.items():
        if (
            key not in _STANDARD
            and key not in fields
            and value is not None
            and not key.startswith("_")
        ):
            fields[key] = value
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(entry, default=str).decode()


def setup_logging(level: str = "info", fmt: str = "rich") -> None:
    """Configure the root logger for the server process.

    ``fmt`` is ``"json"`` (one object per line on stderr) or ``"rich"`` (rich's coloured
    console on a terminal; on a pipe or a file, plain timestamped lines, never wrapped).
    """
    handler: logging.Handler
    if fmt == "json":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    else:
        from rich.console import Console
        from rich.logging import RichHandler

        console = Console(stderr=True)
        if console.is_terminal:
            handler = RichHandler(
                console=console,
                show_path=False,
                rich_tracebacks=False,
                markup=False,
                log_time_format="[%X]",
            )
        else:
            # A pipe, a file or journald: one unpadded, unwrapped line per record.
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
            )
    handler.addFilter(RedactTokens())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # websockets logs every failed handshake at info; ours are clearer.
    logging.getLogger("websockets").setLevel(max(root.level, logging.WARNING))
