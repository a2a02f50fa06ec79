"""``broker serve``: run a broker node.

Its options are built from the settings table (``broker.server.config.SETTINGS``): one
option per setting, whose value, when given, wins over the environment and the file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from click.core import ParameterSource

if TYPE_CHECKING:
    from broker.server.app import BrokerServer

from broker.core.hooks import render as render_hooks
from broker.core.namespaces import render as render_namespaces
from broker.errors import ConfigError
from broker.local import (
    default_config_file,
    ensure_local_secret,
    read_local_secret,
    secret_path,
    short_secret,
)
from broker.server.config import SETTINGS, Setting
from broker.server.config_load import Effective, describe, load_settings
from broker.server.kinds import Kind

F = TypeVar("F", bound=Callable[..., Any])


def banner(server: BrokerServer) -> None:
    """Print where the broker listens and how to use it, on stderr when it is a terminal."""
    from rich.console import Console
    from rich.panel import Panel

    from broker import __version__
    from broker.server.factory import store_label

    console = Console(stderr=True)
    if not console.is_terminal:
        return  # a pipe or journald: the 'listening' log line says it in one line
    config = server.config
    if config.algorithm.startswith("HS"):
        keys = (
            "the secret setting (--secret, BROKER_SECRET or the file)"
            if config.secret != read_local_secret()
            else str(secret_path())
        )
    else:
        keys = f"{config.algorithm} public key {config.public_key}"
    lines = [
        f"[bold]broker {__version__}[/bold] listening on [cyan]{config.url}[/cyan]",
        f"console  [cyan]{config.console_url}[/cyan]   also /healthz, /metrics",
        f"store    {store_label(server.store)}",
        f"history  epoch {server.store.epoch}, last seq {server.store.last_seq}",
        f"tokens   {config.algorithm}, key from {keys}",
        'try      [bold]broker sub football[/bold]  and  [bold]broker pub football "2-1"[/bold]',
    ]
    console.print(Panel("\n".join(lines), expand=False, border_style="green"))


class SettingType(click.ParamType):  # type: ignore[type-arg]
    """A click type that reads a flag's text with a setting's kind."""

    def __init__(self, kind: Kind) -> None:
        self.kind = kind
        self.name = kind.metavar.lower()

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return self.kind.metavar

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> Any:
        try:
            return self.kind.parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _help(row: Setting) -> str:
    shown = row.show(row.default) if row.default not in (None, []) else ""
    default = f"default: {shown.strip(chr(34))}; " if shown else ""
    bounds = row.kind.bounds()
    return f"{row.help} [{default}{bounds + '; ' if bounds else ''}env {row.env}]"


def setting_options(func: F) -> F:
    """One click option per row of the settings table, in table order."""
    for row in reversed(SETTINGS):
        if row.kind.switch:
            decl = f"{row.flag}/--no-{row.flag[2:]}"
            option = click.option(decl, row.name, default=None, help=_help(row))
        else:
            option = click.option(
                row.flag,
                row.name,
                type=SettingType(row.kind),
                multiple=row.kind.multiple,
                default=None,
                help=_help(row),
            )
        func = option(func)
    return func


class SettingsError(click.ClickException):
    """A setting is unknown, bad or in conflict: ``Error: ...`` and exit code 2."""

    exit_code = 2


def given_flags(ctx: click.Context, opts: dict[str, Any]) -> dict[str, Any]:
    """The settings given as flags on the command line, by name (parsed)."""
    flags: dict[str, Any] = {}
    for row in SETTINGS:
        if ctx.get_parameter_source(row.name) is ParameterSource.COMMANDLINE:
            value = opts[row.name]
            # A repeated flag is a tuple of what each occurrence parsed to (a list each).
            flags[row.name] = [v for part in value for v in part] if row.kind.multiple else value
    return flags


def effective_settings(
    ctx: click.Context, config_file: Path | None, opts: dict[str, Any]
) -> Effective:
    """The settings from the flags given, the environment and the file; usage errors else."""
    try:
        return load_settings(given_flags(ctx, opts), os.environ, config_file)
    except ConfigError as exc:
        raise SettingsError(exc.message) from None


def render_config(effective: Effective) -> None:
    """The effective settings as TOML, each with where it came from."""
    where = effective.file or f"{default_config_file()} (not found)"
    click.echo("# broker serve: effective settings; precedence flag > env > file > default")
    click.echo(f"# config file: {where}")
    rows = describe(effective)
    lines = [
        (f"{name} = {value}" if value else f"# {name} (not set)", src) for name, value, src in rows
    ]
    width = max(len(line) for line, _ in lines)
    for line, source in lines:
        click.echo(f"{line:<{width}}  # {source}")
    if effective.config.namespaces:
        click.echo(
            f"\n# namespaces ({effective.sources['namespace']}); the first that covers a topic wins"
        )
        for line in render_namespaces(effective.config.namespaces):
            click.echo(line)
    if effective.config.hooks.configured:
        click.echo(f"\n# hooks (file {effective.file}); the secret is not shown")
        for line in render_hooks(effective.config.hooks):
            click.echo(line)


@click.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="BROKER_CONFIG",
    help="TOML settings file [env BROKER_CONFIG]. Default: broker.toml in the user's config "
    "directory, when it exists. Write a starter one with `broker config init`.",
)
@click.option(
    "--print-config",
    is_flag=True,
    help="Print the effective settings (secrets redacted) and where each came from, then exit.",
)
@setting_options
@click.pass_context
def serve(ctx: click.Context, /, config_file: Path | None, print_config: bool, **opts: Any) -> None:
    """Run a broker on HOST:PORT until SIGTERM or Ctrl-C.

    \b
    Endpoints: ws://HOST:PORT/ws (the protocol), /healthz, and / (browser console).
    History is kept on disk by default; --memory keeps it in memory only.

    \b
    Every option can also be set in the environment (BROKER_ and the option in upper
    snake case: --max-queue is BROKER_MAX_QUEUE) or in the TOML file (max_queue = "1MiB").
    Precedence: flags, then the environment, then the file, then the defaults.

    \b
    Per-pattern options (public topics, history, retention, presence) are [[namespace]]
    tables of the TOML file only, with no flag or environment form; see
    docs/operations.md, "Namespaces and public topics".

    \b
    Examples:
      broker serve
      broker serve --port 9000 --history 100 --retention 1h
      BROKER_SECRET=s3cret broker serve --host 0.0.0.0
      broker serve --config /etc/broker/broker.toml --print-config
    """
    effective = effective_settings(ctx, config_file, opts)
    if print_config:
        render_config(effective)
        return
    _run(effective)


def _run(effective: Effective) -> None:
    from broker.errors import Unavailable
    from broker.server.factory import run
    from broker.server.logs import setup_logging

    config = effective.config
    too_short = None
    if config.algorithm.startswith("HS"):
        config.secret = config.secret or ensure_local_secret()
        too_short = short_secret(config.secret)
    setup_logging(config.log_level, config.log_format)
    if too_short:  # the same warning as `broker token`, in the log of the broker it weakens
        logging.getLogger("broker.server").warning(
            "%s (secret from %s)",
            too_short,
            effective.sources["secret"],
            extra={"event": "weak_secret"},
        )
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is optional
        runner = asyncio.run  # type: ignore[assignment]
    try:
        runner(run(config, on_ready=banner if config.log_format == "rich" else None))
    except ConfigError as exc:  # found at start: a key file, the data directory
        click.echo(f"broker: {exc.message}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(
            f"broker: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}", err=True
        )
        sys.exit(1)
    except Unavailable as exc:
        click.echo(f"broker: {exc.message}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
