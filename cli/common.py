"""What every client command shares: connection options, tokens, the client, errors."""

from __future__ import annotations

import getpass
import inspect
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import click

from broker.client import Client, Gap, TokenProvider
from broker.core.auth import mint_token
from broker.core.topics import validate_pattern
from broker.errors import (
    BadRequest,
    BrokerError,
)
from broker.local import DEFAULT_URL, read_local_secret, secret_path

from .errors import (
    EXIT_CODES_HELP,
    EXIT_UNAUTHORIZED,
    CommandError,
)
from .render import compile_template

F = TypeVar("F", bound=Callable[..., Any])

#: Lifetime of tokens minted for the local user; refreshed on long-lived connections.
LOCAL_TOKEN_TTL = 15 * 60
#: Publishes in flight at once when ``pub`` reads stdin.
PUB_WINDOW = 100


# -- shared plumbing ---------------------------------------------------------------------


def warn(text: str) -> None:
    click.echo(f"warning: {text}", err=True)


def _setup_logging() -> None:
    """Library warnings (e.g. a slow-consumer close) go to stderr as one plain line."""
    log = logging.getLogger("broker.client")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        log.addHandler(_StderrHandler())
    log.propagate = False
    log.setLevel(logging.WARNING)


class _StderrHandler(logging.Handler):
    """Log records as ``warning: ...`` lines on the current stderr (no tracebacks)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"warning: {record.getMessage()}", err=True)


def local_user() -> str:
    """The login name of the local user, the id of auto-minted tokens."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid()) if hasattr(os, "getuid") else "local"


def resolve_secret(explicit: str | None) -> str | None:
    return explicit or os.environ.get("BROKER_SECRET") or read_local_secret()


def resolve_token(token: str | None) -> tuple[str | None, TokenProvider | None]:
    """The token to use, or a provider minting short-lived local tokens; else a CommandError."""
    if token:
        return token, None
    secret = resolve_secret(None)
    if secret is None:
        raise CommandError(
            "no token: pass --token or set BROKER_TOKEN (on the broker's own machine the "
            f"local secret file {secret_path()} is used when readable)",
            EXIT_UNAUTHORIZED,
        )
    user = local_user()
    try:
        mint_token(secret, user)
    except BadRequest as exc:
        raise CommandError(
            f"cannot mint a token for local user {user!r}: {exc.message}",
            EXIT_UNAUTHORIZED,
        ) from None

    def provider() -> str:
        return mint_token(secret, user, ttl=LOCAL_TOKEN_TTL)

    return None, provider


def connection_options(func: F) -> F:
    """The ``--url``, ``--token`` and ``--ca-file`` options every client command takes."""
    func = click.option(
        "--ca-file",
        envvar="BROKER_CA_FILE",
        type=click.Path(exists=True, dir_okay=False),
        help="CA certificate (PEM) to trust for wss:// URLs [env BROKER_CA_FILE].",
    )(func)
    func = click.option(
        "--token",
        envvar="BROKER_TOKEN",
        help="JWT to authenticate with [env BROKER_TOKEN]. Default: a short-lived token "
        "for the local user, minted from BROKER_SECRET or the local secret file.",
    )(func)
    func = click.option(
        "--url",
        envvar="BROKER_URL",
        default=DEFAULT_URL,
        show_default=True,
        help="Broker WebSocket URL [env BROKER_URL]; several, comma-separated, are tried in turn.",
    )(func)
    return func


def make_client(
    url: str,
    token: str | None,
    ca_file: str | None,
    *,
    reconnect: bool,
    anonymous: bool = False,
    **kwargs: Any,
) -> Client:
    """A ``Client`` for the shared options (``anonymous``: no token at all, public topics
    only); bad URLs are usage errors."""
    _setup_logging()
    urls = [u.strip() for u in url.split(",") if u.strip()]
    plain, provider = (None, None) if anonymous else resolve_token(token)
    try:
        return Client(
            urls,
            plain,
            token_provider=provider,
            ca_file=ca_file,
            reconnect=reconnect,
            anonymous=anonymous,
            **kwargs,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--url'") from None


def check_patterns(patterns: tuple[str, ...]) -> None:
    for pattern in patterns:
        try:
            validate_pattern(pattern)
        except BadRequest as exc:
            raise click.BadParameter(f"{pattern!r}: {exc.message}", param_hint="PATTERN") from None


def check_template(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        try:
            compile_template(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def on_state_printer() -> Callable[[str], None]:
    seen_connected = False

    def on_state(state: str) -> None:
        nonlocal seen_connected
        if state == "disconnected":
            warn("connection lost; reconnecting...")
        elif state == "connected":
            if seen_connected:
                warn("reconnected; resuming subscriptions")
            seen_connected = True

    return on_state


def on_gap(gap: Gap) -> None:
    warn(gap.describe())


def on_error(error: BrokerError) -> None:
    warn(f"{error.code.replace('_', ' ')}: {error.message}")


def with_help(text: str) -> str:
    return inspect.cleandoc(text) + "\n" + EXIT_CODES_HELP


# -- token -------------------------------------------------------------------------------


def human_duration(seconds: float) -> str:
    seconds = int(abs(seconds))
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    if seconds or not parts:
        parts.append(f"{seconds}s")
    return " ".join(parts[:2])
