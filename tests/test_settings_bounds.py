"""Every number ``broker serve`` takes parses, or is refused with one line and exit code 2.

Durations, sizes and counts each have a lower and an upper bound (the ``accepted`` column of
docs/operations.md's settings table), from a flag, the environment or the file alike; the
settings file itself is read with a size bound. Before this, ``--max-queue 1e400`` was an
``OverflowError`` traceback, ``--config /dev/zero`` a ``MemoryError`` and
``--ping-interval 1e-9`` a broker pinging at 100 % CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from hypothesis import given
from hypothesis import strategies as st

from broker.cli.main import cli
from broker.core.units import parse_duration, parse_size
from broker.server.config import SETTINGS, SETTINGS_BY_NAME
from broker.server.config_load import MAX_CONFIG_FILE
from broker.server.kinds import Duration, Integer, Number, Size

from .support import ROOT, isolated_env

NUMERIC = [row for row in SETTINGS if isinstance(row.kind, (Duration, Integer, Number, Size))]
#: Not numbers at all, or numbers no setting can take.
NEVER = ["1e400", "-1e400", "inf", "nan", "-1", "9" * 5000, "1e308TiB", "0x10", ""]


def print_config(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    """``broker serve ARGS --print-config`` in-process, in a clean environment."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    clean["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    return CliRunner().invoke(cli, ["serve", *args, "--print-config"], env={**clean, **(env or {})})


def refused(result: Result, *words: str) -> str:
    """The one ``Error:`` line of a refusal with exit code 2, checked to hold ``words``."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(
        result.exception, SystemExit
    ), repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def outside(row_name: str) -> list[str]:
    """Values just outside the setting's bounds, as text."""
    kind = SETTINGS_BY_NAME[row_name].kind
    if isinstance(kind, Integer):
        return [str(kind.low - 1), str(kind.high + 1)]
    if isinstance(kind, Number):
        return ["0", str(kind.high * 2)]
    if isinstance(kind, Size):
        return [str(kind.low - 1), str(kind.high + 1)] if kind.low > 1 else [str(kind.high + 1)]
    assert isinstance(kind, Duration)
    low = [f"{kind.low / 2}s"] if kind.low > 0 else []
    return [*low, f"{kind.high * 2}s"]


def test_every_number_of_the_table_has_both_bounds_and_a_default_inside() -> None:
    assert {row.name for row in NUMERIC} >= {"max_queue", "ping_interval", "retention", "port"}
    for row in NUMERIC:
        assert row.kind.bounds(), row.name
        if row.default is not None:
            assert row.kind.parse(row.kind.show(row.default).strip('"')) == row.default


@pytest.mark.parametrize("row", NUMERIC, ids=lambda row: row.name)
def test_a_number_outside_the_bounds_is_one_line_from_every_source(
    tmp_path: Path, row: object
) -> None:
    name = row.name  # type: ignore[attr-defined]
    setting = SETTINGS_BY_NAME[name]
    for value in [*NEVER, *outside(name)]:
        refused(print_config(tmp_path, setting.flag, value), setting.flag)
        if value:  # an empty variable counts as unset
            line = refused(print_config(tmp_path, env={setting.env: value}), f"env {setting.env}")
            assert len(line) < 300, line
    config = tmp_path / "broker.toml"
    for value in [*outside(name), "1e400", "nan"]:
        config.write_text(f'{name} = "{value}"\n')
        refused(print_config(tmp_path, "--config", str(config)), name, "file")
    # TOML's own numbers: infinities, not-a-number, an integer past any 64-bit one.
    for literal in ("inf", "-inf", "nan", "1e400", "9" * 400, "-" + "9" * 400):
        config.write_text(f"{name} = {literal}\n")
        refused(print_config(tmp_path, "--config", str(config)), name, "file")


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--max-queue", "1e400", "not a finite size"),
        ("--ping-interval", "1e-9", "0 (off), or 100ms to 1h"),
        ("--ping-interval", "-0.5", "not a positive duration"),
        ("--max-message-size", "1e300GiB", "not a finite size"),
        ("--retention", "1e400", "not a finite duration"),
        ("--rate-limit", "1e400", "out of range"),
        ("--history", "1e3", "not a whole number"),
    ],
)
def test_the_reported_values_are_refused(tmp_path: Path, flag: str, value: str, words: str) -> None:
    refused(print_config(tmp_path, flag, value), flag, words)


def test_the_bounds_themselves_are_accepted(tmp_path: Path) -> None:
    result = print_config(
        tmp_path,
        "--ping-interval",
        "0",
        "--auth-timeout",
        "100ms",
        "--max-queue",
        "1GiB",
        "--max-message-size",
        "256",
        "--retention",
        "3650d",
        "--port",
        "65535",
    )
    assert result.exit_code == 0, result.output
    assert 'ping_interval = "0s"' in result.output
    assert 'max_queue = "1GiB"' in result.output


@pytest.mark.timeout(30)
def test_a_config_file_is_read_with_a_size_bound(tmp_path: Path) -> None:
    started = time.monotonic()
    refused(print_config(tmp_path, "--config", "/dev/zero"), "/dev/zero", "larger than 1MiB")
    assert time.monotonic() - started < 10  # read 1 MiB, not until memory runs out
    big = tmp_path / "big.toml"
    big.write_text("# a comment\n" * (MAX_CONFIG_FILE // 12 + 1))
    refused(print_config(tmp_path, "--config", str(big)), "larger than 1MiB")
    fits = tmp_path / "fits.toml"
    fits.write_text("# a comment\n" * (MAX_CONFIG_FILE // 12 - 1) + "port = 9000\n")
    assert print_config(tmp_path, "--config", str(fits)).exit_code == 0


def test_a_config_file_that_is_not_toml_text_is_one_line(tmp_path: Path) -> None:
    deep = tmp_path / "deep.toml"
    deep.write_text("port = " + "[" * 50_000 + "\n")
    refused(print_config(tmp_path, "--config", str(deep)), "not valid TOML")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b'secret = "\xff\xfe"\n')
    refused(print_config(tmp_path, "--config", str(binary)), "not valid TOML", "UTF-8")


@pytest.mark.slow
@pytest.mark.timeout(30)
def test_serve_refuses_before_it_starts(tmp_path: Path) -> None:
    # The real command line: exit 2 with no traceback, before anything listens.
    for args in (["--max-queue", "1e400"], ["--config", "/dev/zero"], ["--ping-interval", "1e-9"]):
        done = subprocess.run(
            [sys.executable, "-m", "broker.cli", "serve", "--memory", *args],
            cwd=ROOT,
            env=isolated_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 2, (args, done.stderr)
        assert "Traceback" not in done.stderr
        assert [line for line in done.stderr.splitlines() if line.startswith("Error:")], done.stderr


@given(st.one_of(st.text(max_size=30), st.floats(), st.integers()))
def test_units_parse_or_refuse_with_a_value_error(raw: str | float) -> None:
    for parse in (parse_duration, parse_size):
        try:
            value = parse(raw)
        except ValueError as exc:
            assert "\n" not in str(exc) and len(str(exc)) < 200
        else:
            assert value >= 0 and value == value and value != float("inf")
