"""``broker backup FILE``: an online backup of the SQLite store."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import click

from broker.errors import ConfigError
from broker.local import data_dir
from broker.server.config_load import load_settings
from broker.server.kinds import DirPath
from broker.store.backup import STORE_FILE_NAME, backup_sqlite

from .serve import SettingType


@click.command("backup", short_help="Copy the SQLite store to FILE, while the broker runs.")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--data",
    type=SettingType(DirPath()),
    help="Data directory of the broker [env BROKER_DATA]. Default: as `broker serve` "
    "would use (its --config file, else the user's data directory).",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="BROKER_CONFIG",
    help="The TOML settings file of that broker [env BROKER_CONFIG].",
)
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
def backup_command(file: Path, data: Path | None, config_file: Path | None, force: bool) -> None:
    """Copy the broker's SQLite store to FILE, safely while the broker runs.

    The copy is one consistent snapshot (SQLite's online backup) in a single file. To
    restore: stop the broker, put the copy at DATA/broker.sqlite3 (removing any
    broker.sqlite3-wal and -shm there), start it; it has the same epoch and history, so
    clients resume with since.

    \b
    Examples:
      broker backup /var/backups/broker-$(date +%F).sqlite3
      broker backup copy.sqlite3 --data /var/lib/broker
    """
    try:
        config = load_settings({"data": data} if data else {}, os.environ, config_file).config
    except ConfigError as exc:
        raise click.ClickException(exc.message) from None
    if config.memory or config.redis:
        store = "memory" if config.memory else "redis"
        raise click.ClickException(f"that broker's store is {store}: there is no SQLite file")
    source = (config.data or data_dir()) / STORE_FILE_NAME
    if file.exists() and not force:
        raise click.ClickException(f"{file} exists; pass --force to replace it")
    try:
        if file.resolve() == source.resolve():
            raise click.ClickException("FILE is the live store itself")
        info = backup_sqlite(source, file)
    except FileNotFoundError:
        raise click.ClickException(
            f"no store at {source}: pass the broker's --data directory"
        ) from None
    except (ValueError, sqlite3.Error, OSError) as exc:
        raise click.ClickException(f"backup failed: {exc}") from None
    click.echo(
        f"backed up {source} to {file}: epoch {info.epoch}, last seq {info.last_seq}, "
        f"{info.messages} messages, {info.size:,} bytes",
        err=True,
    )
