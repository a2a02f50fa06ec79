"""``broker config``: the settings file of ``broker serve``."""

from __future__ import annotations

import os
from pathlib import Path

import click

from broker.local import default_config_file
from broker.server.config_docs import starter_file


@click.group("config")
def config_group() -> None:
    """Write or locate the TOML settings file of `broker serve`."""


@config_group.command("init")
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
def init_command(file: Path | None, force: bool) -> None:
    """Write a starter settings file: every setting commented out, with its help and default.

    FILE defaults to broker.toml in the user's config directory, the file `broker serve`
    reads when no --config is given.

    \b
    Examples:
      broker config init
      broker config init /etc/broker/broker.toml
      broker serve --config /etc/broker/broker.toml --print-config
    """
    path = file or default_config_file()
    if path.exists() and not force:
        raise click.ClickException(f"{path} exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    # 0600: the file may come to hold the token secret.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(starter_file())
    click.echo(f"wrote {path}", err=True)


@config_group.command("path")
def path_command() -> None:
    """Print where `broker serve` looks for its settings file by default."""
    click.echo(default_config_file())
