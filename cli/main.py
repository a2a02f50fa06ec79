"""The ``broker`` command group; each command lives in its own module."""

from __future__ import annotations

import click

from broker import __version__, build

from . import backup, bench, config, info, pub, serve, sub, token


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="broker", message=f"%(prog)s %(version)s ({build()})")
def cli() -> None:
    """broker: a real-time pub/sub topic broker over WebSocket.

    \b
    Quick start, in three terminals on one machine:
      broker serve
      broker sub football
      broker pub football "2-1"
    """


for command in (
    serve.serve,
    token.token_command,
    sub.sub_command,
    pub.pub_command,
    sub.tail_command,
    info.presence_command,
    info.stats_command,
    bench.bench,
    config.config_group,
    backup.backup_command,
    backup.restore_command,
):
    cli.add_command(command)


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()
