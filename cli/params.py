"""Click parameter types shared by the commands: durations and sizes."""

from __future__ import annotations

import click

from broker.core.units import parse_duration, parse_size


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

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> int:
        try:
            return parse_size(value)  # type: ignore[arg-type]
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
