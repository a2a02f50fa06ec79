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
from typing import IO, Any

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


#: Longest string argument or ``extra`` field a log line carries, in UTF-8 bytes: values
#: that come from clients (a token's ``alg``, a user id, a reason) are cut to it.
MAX_VALUE_BYTES = 256
# Longest message template (ours, but it may quote an exception).
_MAX_MESSAGE_BYTES = 4096
# C0 and C1 controls and DEL: a value from a client must not forge a line break or
# drive a terminal.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def clip_utf8(text: str, size: int) -> str:
    """``text`` cut to at most ``size`` bytes of UTF-8, never inside a character."""
    if len(text) * 4 <= size:
        return text
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= size:
        return text
    return raw[:size].decode("utf-8", "ignore")


def untrusted(value: str, size: int = MAX_VALUE_BYTES) -> str:
    """A client-supplied string made safe to log: control characters escaped (``\\x0a``)
    and the result cut to ``size`` bytes, marked with an ellipsis when cut."""
    text = (
        _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", value)
        if not value.isprintable()
        else value
    )
    clipped = clip_utf8(text, size)
    return clipped if clipped == text else clipped + "\u2026"


class RedactTokens(logging.Filter):
    """Blank JWT-shaped strings in a record's message and arguments before formatting,
    then escape and cut every string argument and ``extra`` field (``untrusted``): a log
    line stays one line of bounded size whatever a client sent."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = untrusted(redact(record.msg), _MAX_MESSAGE_BYTES)
        if isinstance(record.args, tuple):
            record.args = tuple(
                untrusted(redact(a)) if isinstance(a, str) else a for a in record.args
            )
        fields = record.__dict__
        for key, value in list(fields.items()):
            if type(value) is str and key not in _STANDARD and not key.startswith("_"):
                fields[key] = untrusted(redact(value))
        return True


class Repeats:
    """Log an event that may repeat fast (a refused connection, a limit reached) in full
    at most ``burst`` times per ``window`` seconds per key, then one summary line for the
    rest ("412 more in the last 10 s") when the window ends.

    ``allow(key, what)`` says whether to log this occurrence; ``flush()``, called every few
    seconds, writes the summaries of windows that ended."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int,
        window: float = 10.0,
        clock: Any = time.monotonic,
    ) -> None:
        self.logger = logger
        self.burst = burst
        self.window = window
        self.clock = clock
        # key -> [window start, occurrences in it, what they are]
        self._open: dict[str, list[Any]] = {}

    def allow(self, key: str, what: str) -> bool:
        """Count one occurrence of ``key``; True when it is to be logged in full."""
        now = self.clock()
        entry = self._open.get(key)
        if entry is not None and now - entry[0] >= self.window:
            self._summarise(key, entry, now)
            entry = None
        if entry is None:
            entry = self._open[key] = [now, 0, what]
        entry[1] += 1
        return bool(entry[1] <= self.burst)

    def flush(self, *, final: bool = False) -> None:
        """Write the summary of every window that has ended (``final``: of every window,
        at shutdown), and forget quiet keys."""
        now = self.clock()
        for key, entry in list(self._open.items()):
            if final or now - entry[0] >= self.window:
                self._summarise(key, entry, now)

    def _summarise(self, key: str, entry: list[Any], now: float) -> None:
        del self._open[key]
        more = entry[1] - self.burst
        if more > 0:
            seconds = max(1, round(now - entry[0]))
            self.logger.warning(
                "%d more %s in the last %d s",
                more,
                entry[2],
                seconds,
                extra={"event": "repeated", "key": key, "count": more},
            )


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


def log_handler(fmt: str = "rich", stream: IO[str] | None = None) -> logging.Handler:
    """A handler writing the server's records to ``stream`` (stderr by default) in ``fmt``:
    ``"json"`` (one object per line) or ``"rich"`` (rich's coloured console on a terminal;
    on a pipe or a file, plain timestamped lines, never wrapped). Tokens are redacted."""
    out = stream if stream is not None else sys.stderr
    handler: logging.Handler
    if fmt == "json":
        handler = logging.StreamHandler(out)
        handler.setFormatter(JsonFormatter())
    else:
        from rich.console import Console
        from rich.logging import RichHandler

        console = Console(file=out)
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
            handler = logging.StreamHandler(out)
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
            )
    handler.addFilter(RedactTokens())
    return handler


def setup_logging(level: str = "info", fmt: str = "rich") -> None:
    """Configure the root logger for the server process: ``log_handler(fmt)`` on stderr."""
    root = logging.getLogger()
    root.handlers[:] = [log_handler(fmt)]
    root.setLevel(level.upper())
    # websockets logs every failed handshake at info; ours are clearer.
    logging.getLogger("websockets").setLevel(max(root.level, logging.WARNING))
