"""Click parameter types shared by the commands: durations and sizes."""

from __future__ import annotations

import click

from broker.server.config import parse_duration


class Duration(click.ParamType):  # type: ignore[type-arg]
    """Seconds, or a number with a unit: 30s, 15m, 1h, 7d."""

    name = "duration"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        try:
            return parse_duration(value)  # type: ignore[arg-type]
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class Size(click.ParamType):  # type: ignore[type-arg]
    """Bytes, or a number with a unit: 64KiB, 1MiB (also K, M, KB, MB)."""

    name = "size"
    _units = {
        "": 1,
        "b": 1,
        "k": 1024,
        "kb": 1000,
        "kib": 1024,
        "m": 1 << 20,
        "mb": 10**6,
        "mib": 1 << 20,
    }

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower()
        number = text.rstrip("kmbi")
        unit = text[len(number) :]
        try:
            size = int(float(number) * self._units[unit])
        except (KeyError, ValueError):
            self.fail(f"{value!r} is not a size (use bytes or e.g. 64KiB, 1MiB)", param, ctx)
        if size <= 0:
            self.fail(f"{value!r} must be positive", param, ctx)
        return size
