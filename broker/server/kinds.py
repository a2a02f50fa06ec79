"""Kinds of setting: how text (a flag, an environment variable) or a TOML value becomes a
setting's value, within its bounds, and how a value is shown again.

Every number a setting takes has a lower and an upper bound: a value outside them, or one
that is not a finite number, is refused with a ``ValueError`` of one line saying why.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from broker.core.units import format_duration, format_size, parse_duration, parse_size, shown


class Kind:
    """How one setting's value is read and shown; ``parse`` raises ``ValueError`` saying why."""

    metavar = "TEXT"
    #: A list (repeatable flag, TOML array, comma-separated environment variable).
    multiple = False
    #: A switch: ``--name/--no-name``, TOML true/false.
    switch = False

    def parse(self, raw: object) -> Any:
        """The value of ``raw``: a string from a flag or the environment, or a TOML value."""
        if not isinstance(raw, str):
            raise ValueError(f"{toml_type(raw)} where text is expected")
        return raw

    def show(self, value: Any) -> str:
        """``value`` as a TOML literal."""
        return json.dumps(str(value))

    def bounds(self) -> str:
        """The values accepted, for the help and the docs (``""``: any of the kind)."""
        return ""


class Text(Kind):
    """Any string."""

    def __init__(self, metavar: str = "TEXT") -> None:
        self.metavar = metavar


class Integer(Kind):
    """A whole number from ``low`` to ``high``."""

    metavar = "INTEGER"

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high

    def parse(self, raw: object) -> int:
        if isinstance(raw, bool) or not isinstance(raw, (int, str)):
            raise ValueError(f"{toml_type(raw)} where a whole number is expected")
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{shown(raw)} is not a whole number") from None
        if not self.low <= value <= self.high:
            raise ValueError(f"{shown(raw)} is out of range: {self.bounds()}")
        return value

    def show(self, value: Any) -> str:
        return str(value)

    def bounds(self) -> str:
        return f"{self.low} to {self.high}"


class Number(Kind):
    """A number above zero, at most ``high``."""

    metavar = "NUMBER"

    def __init__(self, high: float) -> None:
        self.high = high

    def parse(self, raw: object) -> float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
            raise ValueError(f"{toml_type(raw)} where a number is expected")
        try:
            value = float(raw)
        except (ValueError, OverflowError):
            raise ValueError(f"{shown(raw)} is not a number") from None
        if not 0 < value <= self.high:
            raise ValueError(f"{shown(raw)} is out of range: {self.bounds()}")
        return value

    def show(self, value: Any) -> str:
        return f"{value:g}" if float(value) != int(value) else str(int(value))

    def bounds(self) -> str:
        return f"above 0, up to {self.show(self.high)}"


class Switch(Kind):
    """On or off: ``--name/--no-name``; true/false, 1/0, yes/no, on/off."""

    metavar = "BOOLEAN"
    switch = True
    _words = {
        "1": True,
        "true": True,
        "yes": True,
        "on": True,
        "0": False,
        "false": False,
        "no": False,
        "off": False,
    }

    def parse(self, raw: object) -> bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in self._words:
            return self._words[raw.strip().lower()]
        raise ValueError(f"{shown(raw)} is not true or false")

    def show(self, value: Any) -> str:
        return "true" if value else "false"

    def bounds(self) -> str:
        return "true or false"


class Duration(Kind):
    """Seconds, or a number with a unit (``30s``, ``15m``, ``1h``, ``7d``), from ``low`` to
    ``high`` seconds; with ``off``, 0 as well (the thing it times is turned off)."""

    metavar = "DURATION"

    def __init__(self, low: float, high: float, *, off: bool = False) -> None:
        self.low, self.high, self.off = low, high, off

    def parse(self, raw: object) -> float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
            raise ValueError(f"{toml_type(raw)} where a duration is expected")
        value = parse_duration(raw)
        if not (self.low <= value <= self.high or (self.off and value == 0)):
            raise ValueError(f"{shown(raw)} is out of range: {self.bounds()}")
        return value

    def show(self, value: Any) -> str:
        return json.dumps(format_duration(float(value)))

    def bounds(self) -> str:
        span = f"{format_duration(self.low)} to {format_duration(self.high)}"
        return f"0 (off), or {span}" if self.off else span


class Size(Kind):
    """Bytes, or a number with a unit (``64KiB``, ``1MiB``), from ``low`` to ``high``."""

    metavar = "SIZE"

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high

    def parse(self, raw: object) -> int:
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
            raise ValueError(f"{toml_type(raw)} where a size is expected")
        value = parse_size(raw)
        if not self.low <= value <= self.high:
            raise ValueError(f"{shown(raw)} is out of range: {self.bounds()}")
        return value

    def show(self, value: Any) -> str:
        return json.dumps(format_size(int(value)))

    def bounds(self) -> str:
        return f"{format_size(self.low)} to {format_size(self.high)}"


class Choice(Kind):
    """One of a fixed set of words."""

    def __init__(self, *choices: str) -> None:
        self.choices = choices
        self.metavar = "[" + "|".join(choices) + "]"

    def parse(self, raw: object) -> str:
        text = super().parse(raw)
        if text not in self.choices:
            raise ValueError(f"{shown(text)} is not one of {', '.join(self.choices)}")
        return str(text)

    def bounds(self) -> str:
        return "one of " + ", ".join(self.choices)


class FilePath(Kind):
    """The path of a file that exists."""

    metavar = "FILE"

    def parse(self, raw: object) -> str:
        text = super().parse(raw)
        if not Path(text).is_file():
            raise ValueError(f"{shown(text)} is not an existing file")
        return str(text)


class DirPath(Kind):
    """The path of a directory (created when missing)."""

    metavar = "DIR"

    def parse(self, raw: object) -> Path:
        text = super().parse(raw)
        if not text.strip():
            raise ValueError("an empty path")
        path = Path(text).expanduser()
        if path.exists() and not path.is_dir():
            raise ValueError(f"{shown(text)} is not a directory")
        return path


class TextList(Kind):
    """Several strings: a repeated flag, a TOML array, or comma-separated in the environment."""

    multiple = True

    def parse(self, raw: object) -> list[str]:
        if isinstance(raw, str):
            return [part.strip() for part in raw.split(",") if part.strip()]
        if isinstance(raw, (list, tuple)) and all(isinstance(item, str) for item in raw):
            return list(raw)
        raise ValueError(f"{toml_type(raw)} where a list of strings is expected")

    def show(self, value: Any) -> str:
        return "[" + ", ".join(json.dumps(item) for item in value) + "]"


def toml_type(raw: object) -> str:
    """What a TOML value is, in words, for an error message."""
    if isinstance(raw, float) and not math.isfinite(raw):
        return f"{raw} (not a finite number)"
    names = {
        bool: "true/false",
        int: "a whole number",
        float: "a decimal number",
        str: "text",
        list: "a list",
        dict: "a table",
    }
    return names.get(type(raw), type(raw).__name__)
