"""``broker backup FILE`` and ``broker restore FILE``: the SQLite store copied out while the
broker runs, and put back while it is stopped."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

from broker.errors import ConfigError, Unavailable
from broker.local import data_dir
from broker.server.config_load import load_settings
from broker.server.kinds import DirPath
from broker.store.backup import STORE_FILE_NAME, backup_sqlite, inside, restore_sqlite

from .serve import SettingType


def _data_options(fn: Callable[..., None]) -> Callable[..., None]:
    fn = click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="BROKER_CONFIG",
        help="The TOML settings file of that broker [env BROKER_CONFIG].",
    )(fn)
    return click.option(
        "--data",
        type=SettingType(DirPath()),
        help="Data directory of the broker [env BROKER_DATA]. Default: as `broker serve` "
        "would use (its --config file, else the user's data directory).",
    )(fn)


def _data_dir(data: Path | None, config_file: Path | None) -> Path:
    """The data directory of the broker these settings describe (SQLite stores only)."""
    try:
        config = load_settings({"data": data} if data else {}, os.environ, config_file).config
    except ConfigError as exc:
        raise click.ClickException(exc.message) from None
    if config.memory or config.redis:
        store = "memory" if config.memory else "redis"
        raise click.ClickException(f"that broker's store is {store}: there is no SQLite file")
    return config.data or data_dir()


@contextlib.contextmanager
def _progress(what: str) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on stderr for a copy of pages (none when stderr is not a terminal)."""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield None
        return
    columns = (
        TextColumn(what),
        BarColumn(),
        TaskProgressColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(what, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@click.command("backup", short_help="Copy the SQLite store to FILE, while the broker runs.")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@_data_options
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
def backup_command(file: Path, data: Path | None, config_file: Path | None, force: bool) -> None:
    """Copy the broker's SQLite store to FILE, safely while the broker runs.

    The copy is one consistent snapshot in a single file, holding every message
    acknowledged before the backup started (those still in the commit log too). FILE
    may not lie inside the data directory. To restore it: `broker restore --help`.

    \b
    Examples:
      broker backup /var/backups/broker-$(date +%F).sqlite3
      broker backup copy.sqlite3 --data /var/lib/broker
    """
    folder = _data_dir(data, config_file)
    source = folder / STORE_FILE_NAME
    if inside(file, folder):
        raise click.ClickException(
            f"{file} is inside the data directory {folder}: choose a FILE outside it"
        )
    if file.exists() and not force:
        raise click.ClickException(f"{file} exists; pass --force to replace it")
    try:
        with _progress("backing up") as progress:
            info = backup_sqlite(source, file, progress)
    except FileNotFoundError:
        raise click.ClickException(
            f"no store at {source}: pass the broker's --data directory"
        ) from None
    except (ValueError, sqlite3.Error, OSError) as exc:
        raise click.ClickException(f"backup failed: {exc}") from None
    click.echo(
        f"backed up {source} to {file}: epoch {info.epoch}, last seq {info.last_seq}, "
        f"{info.messages} messages ({info.from_log} from the commit log), {info.size:,} bytes",
        err=True,
    )


@click.command("restore", short_help="Put a backup FILE in place of a stopped broker's store.")
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@_data_options
def restore_command(file: Path, data: Path | None, config_file: Path | None) -> None:
    """Put the backup FILE (made by `broker backup`) in place as the broker's store.

    \b
    To restore a backup:
      1. stop the broker (systemctl stop broker, or Ctrl-C in its terminal);
      2. broker restore FILE --data DATA
      3. start the broker as before.

    Restore refuses while a broker holds the data directory, and checks FILE (a broker
    database, SQLite's integrity check) before anything changes. Nothing is deleted: the
    history it replaces (database, WAL, commit log) is moved to DATA/replaced-<time>/.
    The next start begins a new epoch: seqs given after the backup was taken are never
    given again under the epoch clients saw, and every client that resumes is told
    recovered: false and replays what the backup holds.
    """
    folder = _data_dir(data, config_file)
    if file.resolve() == (folder / STORE_FILE_NAME).resolve():
        raise click.ClickException("FILE is the live store itself")
    try:
        with _progress("restoring") as progress:
            done = restore_sqlite(file, folder, progress)
    except Unavailable as exc:
        raise click.ClickException(f"{exc.message}; restore refused") from None
    except ValueError as exc:
        raise click.ClickException(f"restore refused: {exc}") from None
    except (sqlite3.Error, OSError) as exc:
        raise click.ClickException(f"restore failed: {exc}") from None
    info = done.backup
    kept = f"; the history it replaced is in {done.replaced}" if done.replaced else ""
    click.echo(
        f"restored {file} to {folder / STORE_FILE_NAME}: epoch {info.epoch}, last seq "
        f"{info.last_seq}, {info.messages} messages{kept}; the next start begins a new epoch",
        err=True,
    )
