"""Exit codes of the client commands and the one place errors become them.

Every failure is reported as one line on stderr (``Error: ...``) with an exit code that
tells scripts what went wrong; no command ever prints a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

import click

from broker.errors import (
    ERRORS_BY_CODE,
    BadRequest,
    BrokerError,
    ConnectionFailed,
    ConnectionLost,
    Forbidden,
    RateLimited,
    RequestTimeout,
    TooLarge,
    Unauthorized,
    Unavailable,
)

EXIT_OTHER = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_UNAUTHORIZED = 4
EXIT_FORBIDDEN = 5
EXIT_TIMEOUT = 6
EXIT_BUSY = 7
EXIT_INTERRUPTED = 130

#: Exit code per error class; the first class the error is an instance of wins.
EXIT_CODES: tuple[tuple[type[BrokerError], int], ...] = (
    (ConnectionFailed, EXIT_UNREACHABLE),
    (ConnectionLost, EXIT_UNREACHABLE),
    (Unauthorized, EXIT_UNAUTHORIZED),
    (Forbidden, EXIT_FORBIDDEN),
    (RequestTimeout, EXIT_TIMEOUT),
    (RateLimited, EXIT_BUSY),
    (Unavailable, EXIT_BUSY),
    (BadRequest, EXIT_USAGE),
)

#: Appended to the help of every client command (``\b`` keeps click from rewrapping it).
EXIT_CODES_HELP = """
\b
Exit codes:
  0   success
  1   any other error
  2   bad arguments (also a topic or pattern the broker calls bad_request)
  3   broker unreachable, or the connection was lost
  4   no token, or the token was refused or expired
  5   forbidden (ACL, reserved topic, another user's inbox, admin only)
  6   timed out
  7   broker busy: rate limited or unavailable, retry later
  130 interrupted (Ctrl-C)
"""


def exit_code_for(error: BrokerError) -> int:
    """The documented exit code for a client-library error."""
    for cls, code in EXIT_CODES:
        if isinstance(error, cls):
            return code
    return EXIT_OTHER


class CommandError(click.ClickException):
    """A failure shown as one ``Error: ...`` line on stderr, exiting with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_OTHER) -> None:
        super().__init__(message)
        # click declares exit_code a class-level default; this instance carries its own.
        setattr(self, "exit_code", exit_code)  # noqa: B010

    @classmethod
    def from_broker(cls, error: BrokerError, context: str = "") -> CommandError:
        """Wrap a client-library error, keeping its message and mapping its exit code."""
        error = explain(error)
        message = error.message
        if error.code in ERRORS_BY_CODE and error.code != BrokerError.code:  # a wire code
            message = f"{error.code.replace('_', ' ')}: {message}"
        if context:
            message = f"{context}: {message}"
        return cls(message, exit_code_for(error))


# What the client library says about a URL that failed (messages of broker.client).
_HTTP_404 = re.compile(r"(wss?://[^\s;]+?): HTTP 404\b[^;]*")
_TLS_FAILED = re.compile(r"cannot connect to (wss://[^\s;]+): ([^;]*)")


def explain(error: BrokerError) -> BrokerError:
    """``error`` with what a person at a terminal needs next: the likely cause and fix."""
    message = error.message
    if isinstance(error, ConnectionLost) and "(close 1009" in message:
        # The broker closes with 1009 on a frame over its size limit, which it never reads.
        return TooLarge(
            "refused by the broker: the message is over its size limit (max_message_size); "
            "it was not recorded"
        )
    if not isinstance(error, ConnectionFailed):
        return error

    def wrong_path(match: re.Match[str]) -> str:
        scheme, _, rest = match[1].partition("://")
        endpoint = f"{scheme}://{rest.split('/', 1)[0]}/ws"
        return f"{match[0]} (the broker's WebSocket endpoint is /ws: {endpoint})"

    def plain_server(match: re.Match[str]) -> str:
        reason = match[2]
        if "CERTIFICATE" in reason or not ("SSL" in reason or "reset" in reason.lower()):
            return match[0]  # a real TLS server whose certificate failed, or no server
        plain = "ws://" + match[1].removeprefix("wss://")
        return (
            f"cannot connect to {match[1]}: TLS handshake failed ({reason}); "
            f"if the broker serves plain WebSocket, use {plain}"
        )

    explained = _TLS_FAILED.sub(plain_server, _HTTP_404.sub(wrong_path, message))
    return error if explained == message else ConnectionFailed(explained)


T = TypeVar("T")


def run(main: Callable[[], Awaitable[T]]) -> T:
    """Run a command's coroutine, turning every failure into a ``CommandError`` or an exit.

    Ctrl-C exits quietly with 130; a closed stdout (``| head``) exits quietly with 0.
    ``BROKER_DEBUG=1`` lets unexpected exceptions through with their traceback.
    """
    try:
        return asyncio.run(main())  # type: ignore[arg-type]
    except KeyboardInterrupt:
        _exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        _quiet_stdout()
        _exit(0)
    except click.ClickException:
        raise
    except BrokerError as exc:
        raise CommandError.from_broker(exc) from None
    except (click.exceptions.Exit, click.Abort, SystemExit):
        raise
    except Exception as exc:
        if os.environ.get("BROKER_DEBUG"):
            raise
        raise CommandError(f"unexpected error: {type(exc).__name__}: {exc}") from None


def _quiet_stdout() -> None:
    # Python flushes stdout at exit; with the reader gone that raises again.
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _exit(code: int) -> NoReturn:
    raise click.exceptions.Exit(code)
