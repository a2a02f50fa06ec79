"""Durations and sizes as people write them: ``30s``, ``15m``, ``7d``; ``64KiB``, ``1MiB``.

Parsing refuses what is not a finite, non-negative amount with a ``ValueError`` whose
message is one readable line; the bounds of a particular setting are its caller's.
"""

from __future__ import annotations

import math

_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1 << 20,
    "mb": 10**6,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 10**9,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tb": 10**12,
    "tib": 1 << 40,
}


def shown(raw: object, width: int = 40) -> str:
    """``repr(raw)`` cut to about ``width`` characters, for an error message of one line."""
    text = repr(raw)
    if len(text) <= width:
        return text
    quote = text[-1] if text[-1] in "'\"" else ""
    return text[: width - 4] + "..." + quote


def _number(number: str | float, text: object, what: str, example: str) -> float:
    """``float(number)``; else a ValueError naming ``text``, the whole value given."""
    try:
        return float(number)
    except (ValueError, OverflowError):
        raise ValueError(f"{shown(text)} is not {what} (use {example})") from None


def parse_duration(text: str | float) -> float:
    """Seconds in ``text``: a plain number of seconds or a number with a unit
    (``250ms``, ``30s``, ``15m``, ``1h``, ``7d``, ``2w``)."""
    example = "seconds or e.g. 30s, 15m, 1h, 7d"
    if isinstance(text, (int, float)):
        value = _number(text, text, "a duration", example)
    else:
        raw = text.strip().lower()
        multiplier = 1.0
        for unit in sorted(_DURATION_UNITS, key=len, reverse=True):
            if raw.endswith(unit):
                multiplier = _DURATION_UNITS[unit]
                raw = raw[: -len(unit)]
                break
        value = _number(raw, text, "a duration", example) * multiplier
    if math.isinf(value):
        raise ValueError(f"{shown(text)} is not a finite duration")
    if value < 0 or math.isnan(value):
        raise ValueError(f"{shown(text)} is not a positive duration")
    return value


def parse_size(text: str | float) -> int:
    """Bytes in ``text``: a plain number or one with a unit (``64KiB``, ``1MiB``, ``2GiB``;
    also K, M, G, and KB, MB, GB in powers of ten). At least one byte."""
    example = "bytes or e.g. 64KiB, 1MiB"
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        raw = str(text).strip().lower()
        number = raw.rstrip("kmgtbi")
        unit = _SIZE_UNITS.get(raw[len(number) :])
        if unit is None:
            raise ValueError(f"{shown(text)} is not a size (use {example})")
        value = _number(number, text, "a size", example) * unit
        if math.isinf(value):
            raise ValueError(f"{shown(text)} is not a finite size")
        if math.isnan(value):
            raise ValueError(f"{shown(text)} is not a size (use {example})")
        size = int(value)
    if size <= 0:
        raise ValueError(f"{shown(text)} is not a positive size")
    return size


def format_duration(seconds: float) -> str:
    """``seconds`` the way a person writes it: ``24h``, ``90s``, ``1.5s``, ``250ms``."""
    if seconds == 0:
        return "0s"
    # Days only from two on: "24h" reads better than "1d".
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= max(size, 2 * 86400 if unit == "d" else 0) and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds < 1 and (seconds * 1000) == int(seconds * 1000):
        return f"{int(seconds * 1000)}ms"
    return f"{seconds:g}s"


def format_size(size: int) -> str:
    """``size`` bytes the way a person writes it: ``64KiB``, ``1MiB``, ``1500``."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)
