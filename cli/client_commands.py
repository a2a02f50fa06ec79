"""The client commands: token, sub, pub, tail, presence, stats.

They talk to the broker only through ``broker.client`` and print with rich. Connection
options are shared: ``--url`` / ``BROKER_URL`` and ``--token`` / ``BROKER_TOKEN``; with no
token, one is minted for the local user from ``BROKER_SECRET`` or the local secret file
that ``broker serve`` writes, so ``broker sub football`` just works on the broker's machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import inspect
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Self, TypeVar

import click
import jwt
import orjson
from jwt.warnings import InsecureKeyLengthWarning
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from broker.client import Client, Gap, Message, TokenProvider
from broker.core.auth import HMAC_ALGORITHMS, TokenVerifier, mint_token
from broker.core.topics import validate_pattern, validate_topic
from broker.errors import (
    BadRequest,
    BrokerError,
    RateLimited,
    Unauthorized,
    Unavailable,
)
from broker.server.config import DEFAULT_URL, read_local_secret, secret_path

from .errors import (
    EXIT_CODES_HELP,
    EXIT_TIMEOUT,
    EXIT_UNAUTHORIZED,
    EXIT_USAGE,
    CommandError,
    exit_code_for,
    run,
)
from .params import Duration
from .render import TEMPLATE_HELP, Printer, compile_template, data_text

F = TypeVar("F", bound=Callable[..., Any])

#: Lifetime of tokens minted for the local user; refreshed on long-lived connections.
LOCAL_TOKEN_TTL = 15 * 60
#: Publishes in flight at once when ``pub`` reads stdin.
PUB_WINDOW = 100


# -- shared plumbing ---------------------------------------------------------------------


def _stderr() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _warn(text: str) -> None:
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


def _secret(explicit: str | None) -> str | None:
    return explicit or os.environ.get("BROKER_SECRET") or read_local_secret()


def resolve_token(token: str | None) -> tuple[str | None, TokenProvider | None]:
    """The token to use, or a provider minting short-lived local tokens; else a CommandError."""
    if token:
        return token, None
    secret = _secret(None)
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
    **kwargs: Any,
) -> Client:
    """A ``Client`` for the shared options; bad URLs are usage errors."""
    _setup_logging()
    urls = [u.strip() for u in url.split(",") if u.strip()]
    plain, provider = resolve_token(token)
    try:
        return Client(
            urls,
            plain,
            token_provider=provider,
            ca_file=ca_file,
            reconnect=reconnect,
            **kwargs,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--url'") from None


def _check_patterns(patterns: tuple[str, ...]) -> None:
    for pattern in patterns:
        try:
            validate_pattern(pattern)
        except BadRequest as exc:
            raise click.BadParameter(f"{pattern!r}: {exc.message}", param_hint="PATTERN") from None


def _template(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        try:
            compile_template(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def _on_state_printer() -> Callable[[str], None]:
    seen_connected = False

    def on_state(state: str) -> None:
        nonlocal seen_connected
        if state == "disconnected":
            _warn("connection lost; reconnecting...")
        elif state == "connected":
            if seen_connected:
                _warn("reconnected; resuming subscriptions")
            seen_connected = True

    return on_state


def _on_gap(gap: Gap) -> None:
    _warn(gap.describe())


def _on_error(error: BrokerError) -> None:
    _warn(f"{error.code.replace('_', ' ')}: {error.message}")


def _with_help(text: str) -> str:
    return inspect.cleandoc(text) + "\n" + EXIT_CODES_HELP


# -- token -------------------------------------------------------------------------------


def _human_duration(seconds: float) -> str:
    seconds = int(abs(seconds))
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    if seconds or not parts:
        parts.append(f"{seconds}s")
    return " ".join(parts[:2])


def _ttl(ctx: click.Context, param: click.Parameter, value: str) -> float | None:
    if value.strip().lower() in ("never", "none", "0"):
        return None
    ttl = Duration().convert(value, param, ctx)
    if ttl < 1:
        raise click.BadParameter("must be at least 1s (or 'never')")
    return ttl


@click.command(
    "token",
    short_help="Mint a token, or check one with --decode.",
    help=_with_help(
        """Mint a token (printed alone on stdout), or check one with --decode.

    The secret comes from --secret, else BROKER_SECRET, else the local secret file
    written by `broker serve`.

    \b
    Examples:
      broker token --id alice --name Alice --ttl 7d
      broker token --id scoreboard --pub 'scores/#' --sub 'scores/#'
      broker token --id ops --admin --ttl 15m
      broker token --decode "$BROKER_TOKEN"
    """
    ),
)
@click.option("--id", "user_id", help="User id (the 'sub' claim). Default: your login name.")
@click.option("--name", help="Display name. Default: the id.")
@click.option(
    "--ttl",
    default="1h",
    show_default=True,
    callback=_ttl,
    help="Lifetime: seconds or 30s, 15m, 1h, 7d; 'never' for no expiry.",
)
@click.option(
    "--pub",
    "pub",
    multiple=True,
    metavar="PATTERN",
    help="Allow publishing here only (repeatable); --pub '' allows no publishing.",
)
@click.option(
    "--sub",
    "sub",
    multiple=True,
    metavar="PATTERN",
    help="Allow subscribing here only (repeatable; the own inbox is always allowed); "
    "--sub '' allows no other subscription.",
)
@click.option("--admin", is_flag=True, help="Allow the admin operations (stats).")
@click.option("--secret", help="HMAC secret [env BROKER_SECRET]. Default: the local secret file.")
@click.option(
    "--algorithm",
    type=click.Choice([*HMAC_ALGORITHMS, "RS256", "ES256"]),
    default="HS256",
    show_default=True,
    help="Signing algorithm (must be the one the broker accepts). RS256/ES256 need "
    "--private-key (or --public-key with --decode).",
)
@click.option(
    "--private-key",
    type=click.Path(exists=True, dir_okay=False),
    help="PEM private key to sign with (RS256/ES256).",
)
@click.option(
    "--public-key",
    type=click.Path(exists=True, dir_okay=False),
    help="PEM public key to verify with --decode (RS256/ES256).",
)
@click.option(
    "--decode",
    "decode",
    metavar="TOKEN",
    help="Verify TOKEN and show its claims instead.",
)
def token_command(
    user_id: str | None,
    name: str | None,
    ttl: float | None,
    pub: tuple[str, ...],
    sub: tuple[str, ...],
    admin: bool,
    secret: str | None,
    algorithm: str,
    private_key: str | None,
    public_key: str | None,
    decode: str | None,
) -> None:
    """``broker token`` (help above)."""
    # PyJWT warns about short HMAC keys with a multi-line warning; say it in one line.
    warnings.filterwarnings("ignore", category=InsecureKeyLengthWarning)
    if algorithm not in HMAC_ALGORITHMS:
        if decode is not None:
            if not public_key:
                raise click.UsageError(f"--decode with {algorithm} needs --public-key")
            _decode_token(decode, Path(public_key).read_bytes(), algorithm)
            return
        if not private_key:
            raise click.UsageError(f"--algorithm {algorithm} needs --private-key")
        signing: str | bytes = Path(private_key).read_bytes()
        _mint(signing, user_id, name, ttl, pub, sub, admin, algorithm)
        return
    if private_key or public_key:
        raise click.UsageError(f"{algorithm} signs with a secret, not a key file")
    key = _secret(secret)
    if key is not None and len(key.encode()) < 32 and decode is None:
        _warn(f"the secret is only {len(key.encode())} bytes long; 32 or more are recommended")
    if key is None:
        raise CommandError(
            f"no secret: pass --secret, set BROKER_SECRET, or run `broker serve` once on this "
            f"machine to create {secret_path()}",
            EXIT_USAGE,
        )
    if decode is not None:
        _decode_token(decode, key, algorithm)
        return
    _mint(key, user_id, name, ttl, pub, sub, admin, algorithm)


def _mint(
    key: str | bytes,
    user_id: str | None,
    name: str | None,
    ttl: float | None,
    pub: tuple[str, ...],
    sub: tuple[str, ...],
    admin: bool,
    algorithm: str,
) -> None:
    pub_given, sub_given = bool(pub), bool(sub)
    # '' is how a shell passes an empty list: the action is allowed nowhere.
    pub = tuple(p for p in pub if p)
    sub_list = tuple(p for p in sub if p)
    pub_acl = list(pub) if pub or pub_given else None
    sub_acl = list(sub_list) if sub_list or sub_given else None
    for pattern in pub + sub_list:
        try:
            validate_pattern(pattern)
        except BadRequest as exc:
            raise click.BadParameter(
                f"{pattern!r}: {exc.message}", param_hint="--pub/--sub"
            ) from None
    uid = user_id or local_user()
    try:
        token = mint_token(
            key,
            uid,
            name,
            ttl=ttl,
            algorithm=algorithm,
            pub=pub_acl,
            sub=sub_acl,
            admin=admin,
        )
    except BadRequest as exc:
        raise click.BadParameter(exc.message, param_hint="'--id'") from None
    except (ValueError, TypeError, jwt.PyJWTError) as exc:
        raise CommandError(f"cannot sign with that key: {exc}", EXIT_USAGE) from None
    click.echo(token)


def _decode_token(token: str, key: str | bytes, algorithm: str) -> None:
    out = Console(highlight=False, soft_wrap=True)
    try:
        claims = jwt.decode(token.strip(), options={"verify_signature": False})
    except jwt.PyJWTError:
        claims = None
    try:
        identity = TokenVerifier(key, algorithm).verify(token.strip())
    except Unauthorized as exc:
        reason = exc.message
        if claims is not None:
            exp = claims.get("exp")
            if isinstance(exp, (int, float)) and exp <= time.time():
                when = datetime.fromtimestamp(exp).astimezone().isoformat(timespec="seconds")
                reason = f"token expired {_human_duration(time.time() - exp)} ago (at {when})"
            nbf = claims.get("nbf")
            if "not yet valid" in reason and isinstance(nbf, (int, float)):
                reason += f": valid in {_human_duration(nbf - time.time())}"
            out.print("claims (NOT verified):")
            out.print_json(orjson.dumps(claims).decode())
        raise CommandError(f"token refused: {reason}", EXIT_UNAUTHORIZED) from None
    assert claims is not None
    out.print(f"valid token for user {identity.id!r} ({identity.name})")
    out.print_json(orjson.dumps(claims).decode())
    if identity.exp is None:
        out.print("expires: never")
    else:
        when = datetime.fromtimestamp(identity.exp).astimezone().isoformat(timespec="seconds")
        out.print(f"expires in {_human_duration(identity.exp - time.time())} (at {when})")
    acl = identity.acl
    out.print(f"may publish to: {', '.join(acl.pub) if acl.pub is not None else 'any topic'}")
    out.print(f"may subscribe to: {', '.join(acl.sub) if acl.sub is not None else 'any topic'}")
    out.print(f"admin: {'yes' if identity.admin else 'no'}")


# -- sub and tail --------------------------------------------------------------------------


def _output_options(func: F) -> F:
    func = click.option(
        "--timeout",
        type=Duration(),
        help="Give up after this long (exit 6) unless --count messages came first.",
    )(func)
    func = click.option(
        "--count",
        "-c",
        type=click.IntRange(min=1),
        help="Exit 0 after this many messages.",
    )(func)
    func = click.option(
        "--format",
        "-F",
        "template",
        callback=_template,
        metavar="TEMPLATE",
        help=TEMPLATE_HELP,
    )(func)
    func = click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Each message as one JSON line: topic, seq, data, from, ts.",
    )(func)
    return func


async def _follow(
    client: Client,
    patterns: tuple[str, ...],
    printer: Callable[[Message], None],
    *,
    since: int | None,
    epoch: str | None,
    last: int | None,
    count: int | None,
    verbose: bool,
) -> None:
    async with client:
        for pattern in patterns:
            sub = await client.subscribe(pattern, since=since, epoch=epoch, last=last)
            if since is not None and not sub.recovered:
                if epoch is not None and sub.epoch != epoch:
                    _warn(
                        f"the broker's history is not epoch {epoch} any more (now {sub.epoch}); "
                        f"showing all it still holds for {pattern!r}"
                    )
                else:
                    _warn(
                        f"some messages on {pattern!r} after seq {since} are no longer in history"
                    )
            if verbose:
                _stderr().print(
                    f"[dim]subscribed to {pattern} (seq {sub.seq}, epoch {sub.epoch})[/dim]"
                )
        received = 0
        async for msg in client:
            printer(msg)
            received += 1
            if count is not None and received >= count:
                return


def _run_follow(
    url: str,
    token: str | None,
    ca_file: str | None,
    patterns: tuple[str, ...],
    mode: str,
    template: str | None,
    *,
    since: int | None = None,
    epoch: str | None = None,
    last: int | None = None,
    count: int | None,
    timeout: float | None,
    verbose: bool,
) -> None:
    _check_patterns(patterns)
    client = make_client(
        url,
        token,
        ca_file,
        reconnect=True,
        on_gap=_on_gap,
        on_error=_on_error,
        on_state=_on_state_printer(),
    )
    printer = Printer(Console(highlight=False), mode, template)
    received = 0

    def count_and_print(msg: Message) -> None:
        nonlocal received
        received += 1
        printer(msg)

    async def main() -> None:
        try:
            await asyncio.wait_for(
                _follow(
                    client,
                    patterns,
                    count_and_print,
                    since=since,
                    epoch=epoch,
                    last=last,
                    count=count,
                    verbose=verbose,
                ),
                timeout,
            )
        except TimeoutError:
            got = f"{received} of {count}" if count is not None else str(received)
            raise CommandError(
                f"timed out after {timeout:g}s ({got} messages received)", EXIT_TIMEOUT
            ) from None

    run(main)


def _mode(as_json: bool, template: str | None, rich_default: bool) -> str:
    if as_json and template is not None:
        raise click.UsageError("--json and --format are exclusive")
    if as_json:
        return "json"
    if template is not None:
        return "template"
    return "rich" if rich_default else "raw"


@click.command(
    "sub",
    short_help="Print messages on topics or patterns as they come.",
    help=_with_help(
        """Subscribe to topics or patterns and print each message as it arrives.

    PATTERN is a topic or an MQTT-style pattern: '+' is one level, '#' (last)
    any number of levels, e.g. 'scores/+' or 'scores/#'. Quote them in the shell.

    Output: the data alone (strings raw, other JSON compact), one message per line;
    on a terminal a readable line (time, topic, sender, data) instead. --json prints
    the whole message as one JSON object per line, --format a template of your own.

    Reconnects by itself and resumes where it stopped, without loss or duplicates
    while the broker's history holds the messages; says so on stderr when it cannot.
    To resume a later run, pass --since with the last seq you saw (see --json).

    \b
    Examples:
      broker sub football
      broker sub 'scores/#' --json
      broker sub football --last 5 --count 5
      broker sub football --since 1042 --epoch 3f2a9c
      broker sub 'chat/+' -F '{time} {from.name}@{topic}: {data}'
    """
    ),
)
@click.argument("patterns", metavar="PATTERN...", nargs=-1, required=True)
@click.option(
    "--since",
    type=click.IntRange(min=0),
    metavar="SEQ",
    help="First replay the kept messages after this seq.",
)
@click.option(
    "--epoch",
    metavar="EPOCH",
    help="The history epoch SEQ was seen under (with --since).",
)
@click.option(
    "--last",
    type=click.IntRange(min=0),
    metavar="N",
    help="First replay the last N kept messages.",
)
@_output_options
@click.option("--raw", is_flag=True, help="Print the data only, even on a terminal.")
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Report each subscription's seq and epoch on stderr.",
)
@connection_options
def sub_command(
    patterns: tuple[str, ...],
    since: int | None,
    epoch: str | None,
    last: int | None,
    as_json: bool,
    template: str | None,
    count: int | None,
    timeout: float | None,
    raw: bool,
    verbose: bool,
    url: str,
    token: str | None,
    ca_file: str | None,
) -> None:
    """``broker sub`` (help above)."""
    if since is not None and last is not None:
        raise click.UsageError("--since and --last are exclusive")
    if epoch is not None and since is None:
        raise click.UsageError("--epoch goes with --since")
    mode = _mode(as_json, template, rich_default=sys.stdout.isatty() and not raw)
    _run_follow(
        url,
        token,
        ca_file,
        patterns,
        mode,
        template,
        since=since,
        epoch=epoch,
        last=last,
        count=count,
        timeout=timeout,
        verbose=verbose,
    )


@click.command(
    "tail",
    short_help="Show the last N messages, then follow.",
    help=_with_help(
        """Show the last N messages on topics or patterns, then follow, like tail -f.

    Each message is one readable line: time, topic, sender, data.

    \b
    Examples:
      broker tail football
      broker tail 'scores/#' -n 50
    """
    ),
)
@click.argument("patterns", metavar="PATTERN...", nargs=-1, required=True)
@click.option(
    "-n",
    "--lines",
    "lines",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help="How many past messages to show first.",
)
@_output_options
@connection_options
def tail_command(
    patterns: tuple[str, ...],
    lines: int,
    as_json: bool,
    template: str | None,
    count: int | None,
    timeout: float | None,
    url: str,
    token: str | None,
    ca_file: str | None,
) -> None:
    """``broker tail`` (help above)."""
    mode = _mode(as_json, template, rich_default=True)
    _run_follow(
        url,
        token,
        ca_file,
        patterns,
        mode,
        template,
        last=lines,
        count=count,
        timeout=timeout,
        verbose=False,
    )


# -- pub -----------------------------------------------------------------------------------


def _parse(text: str, as_json: bool, where: str) -> Any:
    if not as_json:
        return text
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise click.UsageError(f"{where} is not valid JSON: {exc}") from None


async def _publish_retrying(
    client: Client, topic: str, data: Any, echo: bool, attempts: int = 5
) -> int:
    """Publish, retrying a few times when the broker says rate_limited or unavailable."""
    delay = 0.05
    for attempt in range(attempts):
        try:
            seq = await client.publish(topic, data, echo=echo)
            assert seq is not None
            return seq
        except (RateLimited, Unavailable):
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
    raise AssertionError("unreachable")


class _Progress:
    """A rich progress display on stderr, or nothing when stderr is not a terminal.

    With stdin a regular file the bar shows the share of its bytes acknowledged.
    """

    def __init__(self, total_bytes: int | None) -> None:
        self.progress: Any = None
        self.count = 0
        if not sys.stderr.isatty():
            return
        from rich.progress import (
            BarColumn,
            Progress,
            SpinnerColumn,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        columns: list[Any] = [
            SpinnerColumn(),
            TextColumn("{task.fields[count]} published"),
        ]
        if total_bytes:
            columns += [BarColumn(), TaskProgressColumn()]
        columns.append(TimeElapsedColumn())
        self.progress = Progress(*columns, console=_stderr(), transient=True)
        self.task = self.progress.add_task("pub", total=total_bytes or None, count=0)

    def __enter__(self) -> Self:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def acked(self, size: int) -> None:
        """Count one acknowledged message of ``size`` bytes of input."""
        self.count += 1
        if self.progress is not None:
            self.progress.update(self.task, advance=size, count=self.count)


def _stdin_size() -> int | None:
    try:
        st = os.fstat(sys.stdin.fileno())
    except (OSError, ValueError, AttributeError):
        return None
    import stat

    return st.st_size if stat.S_ISREG(st.st_mode) else None


async def _pub_lines(client: Client, topic: str, as_json: bool, echo: bool) -> tuple[int, int]:
    """Publish each stdin line, up to PUB_WINDOW in flight; (sent, acknowledged)."""
    stream = click.get_text_stream("stdin")
    window = asyncio.Semaphore(PUB_WINDOW)
    tasks: set[asyncio.Task[None]] = set()
    failures: list[tuple[int, BrokerError]] = []
    fatal = asyncio.Event()
    sent = acked = 0
    interactive = stream.isatty() or _stdin_size() is None

    async def one(line_no: int, data: Any, size: int, progress: _Progress) -> None:
        nonlocal acked
        try:
            await _publish_retrying(client, topic, data, echo)
            acked += 1
            progress.acked(size)
        except BrokerError as exc:
            failures.append((line_no, exc))
            if not isinstance(exc, (RateLimited, Unavailable)):
                fatal.set()  # refused or connection gone: the rest would fail alike
        finally:
            window.release()

    with _Progress(_stdin_size()) as progress:
        line_no = 0
        while not fatal.is_set():
            line = await asyncio.to_thread(stream.readline) if interactive else stream.readline()
            if not line:
                break
            line_no += 1
            size = len(line.encode())
            text = line.rstrip("\r\n")
            if not text.strip():
                continue  # blank lines are not messages
            data = _parse(text, as_json, f"line {line_no}")
            await window.acquire()
            if fatal.is_set():
                window.release()
                break
            sent += 1
            task = asyncio.create_task(one(line_no, data, size, progress))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    if failures:
        failures.sort(key=lambda f: f[0])
        line_no, first = failures[0]
        error = CommandError.from_broker(first, f"line {line_no}")
        raise CommandError(
            f"{sent - acked} of {sent} messages not acknowledged; first failure at {error.message}",
            exit_code_for(first),
        )
    return sent, acked


@click.command(
    "pub",
    short_help="Publish a message, or each line of stdin.",
    help=_with_help(
        """Publish MESSAGE to TOPIC, or each line of stdin when there is no MESSAGE.

    MESSAGE is sent as a string; with --json it is parsed as JSON and sent as that
    value (number, object, ...). Reading stdin, blank lines are skipped, up to 100
    messages are in flight at once, and a progress bar shows on a terminal. The exit
    code is 0 only when the broker acknowledged (durably recorded) every message;
    rate-limited ones are retried a few times.

    \b
    Examples:
      broker pub football "2-1"
      broker pub scores/uk '{"home": 2, "away": 1}' --json
      seq 1000 | broker pub counter --json
      tail -f app.log | broker pub logs/app
    """
    ),
)
@click.argument("topic")
@click.argument("message", required=False)
@click.option("--json", "as_json", is_flag=True, help="MESSAGE (or each line) is a JSON value.")
@click.option(
    "--echo",
    is_flag=True,
    help="Ask the broker to deliver it to this connection's own subscriptions too.",
)
@connection_options
def pub_command(
    topic: str,
    message: str | None,
    as_json: bool,
    echo: bool,
    url: str,
    token: str | None,
    ca_file: str | None,
) -> None:
    """``broker pub`` (help above)."""
    try:
        validate_topic(topic)
    except BadRequest as exc:
        raise click.BadParameter(f"{topic!r}: {exc.message}", param_hint="TOPIC") from None
    data = _parse(message, as_json, "MESSAGE") if message is not None else None
    client = make_client(url, token, ca_file, reconnect=False, on_error=_on_error)
    terminal = sys.stderr.isatty()

    async def main() -> None:
        async with client:
            if message is not None:
                seq = await client.publish(topic, data, echo=echo)
                if terminal:
                    _stderr().print(f"[dim]published to {topic} (seq {seq})[/dim]")
                return
            sent, acked = await _pub_lines(client, topic, as_json, echo)
            if terminal:
                _stderr().print(f"[dim]{acked} of {sent} messages published to {topic}[/dim]")

    run(main)


# -- presence and stats --------------------------------------------------------------------


@click.command(
    "presence",
    short_help="Who is subscribed to a topic now.",
    help=_with_help(
        """Show who is subscribed to exactly TOPIC now, with their connection counts.

    Pattern subscriptions do not count. Asking about another user's inbox is
    forbidden.

    \b
    Examples:
      broker presence chat/lobby
      broker presence chat/lobby --json
    """
    ),
)
@click.argument("topic")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@connection_options
def presence_command(
    topic: str, as_json: bool, url: str, token: str | None, ca_file: str | None
) -> None:
    """``broker presence`` (help above)."""
    client = make_client(url, token, ca_file, reconnect=False, on_error=_on_error)

    async def main() -> list[Any]:
        async with client:
            return await client.presence(topic)

    users = run(main)
    if as_json:
        click.echo(
            orjson.dumps(
                [{"id": u.id, "name": u.name, "connections": u.connections} for u in users]
            ).decode()
        )
        return
    console = Console(highlight=False)
    if not users:
        console.print(f"nobody is subscribed to {topic}")
        return
    table = Table(title=f"subscribed to {topic}", title_justify="left")
    table.add_column("user id", style="cyan")
    table.add_column("name", style="green")
    table.add_column("connections", justify="right")
    for user in sorted(users, key=lambda u: u.id):
        table.add_row(Text(user.id), Text(user.name), str(user.connections))
    console.print(table)


def flatten(figures: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested stats as ``a.b`` keys."""
    flat: dict[str, Any] = {}
    for key, value in figures.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


_TOPIC_PREFIX = "top_topics."


def _stats_view(figures: dict[str, Any], previous: dict[str, Any] | None, elapsed: float) -> Group:
    """The figures table, then the busiest topics by message rate (by count at first)."""
    plain = {k: v for k, v in figures.items() if not k.startswith(_TOPIC_PREFIX)}
    topics = Table(title="top topics", title_justify="left")
    topics.add_column("topic", style="cyan")
    topics.add_column("messages", justify="right")
    topics.add_column("per second", justify="right", style="yellow")
    rows = []
    for key, count in figures.items():
        if not key.startswith(_TOPIC_PREFIX) or not isinstance(count, int):
            continue
        before = (previous or {}).get(key)
        rate = (
            (count - before) / elapsed
            if isinstance(before, int) and elapsed > 0 and count >= before
            else None
        )
        rows.append((key.removeprefix(_TOPIC_PREFIX), count, rate))
    rows.sort(key=lambda r: (r[2] if r[2] is not None else -1.0, r[1]), reverse=True)
    for topic, count, rate in rows[:10]:
        topics.add_row(Text(topic), f"{count:,}", "" if rate is None else f"{rate:,.1f}")
    return Group(_stats_table(plain, previous, elapsed), topics)


def _stats_table(figures: dict[str, Any], previous: dict[str, Any] | None, elapsed: float) -> Table:
    table = Table(title="broker stats", title_justify="left")
    table.add_column("figure", style="cyan")
    table.add_column("value", justify="right")
    if previous is not None:
        table.add_column("per second", justify="right", style="yellow")
    for key, value in figures.items():
        shown = (
            value
            if isinstance(value, (int, float)) and not isinstance(value, bool)
            else data_text(value)
        )
        row: list[Any] = [
            Text(key),
            Text(f"{shown:,}" if isinstance(shown, int) else str(shown)),
        ]
        if previous is not None:
            before = previous.get(key)
            rate = ""
            if (
                isinstance(value, (int, float))
                and isinstance(before, (int, float))
                and not isinstance(value, bool)
                and elapsed > 0
                and value >= before
                and key.split(".")[-1]
                not in (
                    "connections",
                    "subscriptions",
                    "topics",
                    "users",
                    "uptime",
                    "seq",
                )
            ):
                rate = f"{(value - before) / elapsed:,.1f}"
            row.append(rate)
        table.add_row(*row)
    return table


@click.command(
    "stats",
    short_help="Broker figures; --watch for a live table (admin).",
    help=_with_help(
        """Show the broker's figures: connections, topics, subscriptions, messages.

    Needs an admin token (`broker token --admin`). --watch keeps a live table,
    with per-second rates of the counters, until Ctrl-C.

    \b
    Examples:
      broker stats
      broker stats --watch --interval 2
    """
    ),
)
@click.option("--watch", "-w", is_flag=True, help="Refresh a live table until Ctrl-C.")
@click.option(
    "--interval",
    default="1s",
    show_default=True,
    type=Duration(),
    help="Refresh period with --watch.",
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    help="With --watch: stop after this many refreshes.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the figures as JSON (one line per refresh with --watch).",
)
@connection_options
def stats_command(
    watch: bool,
    interval: float,
    count: int | None,
    as_json: bool,
    url: str,
    token: str | None,
    ca_file: str | None,
) -> None:
    """``broker stats`` (help above)."""
    client = make_client(url, token, ca_file, reconnect=watch, on_error=_on_error)
    console = Console(highlight=False)

    async def once() -> None:
        async with client:
            figures = await client.stats()
        if as_json:
            click.echo(orjson.dumps(figures).decode())
        else:
            console.print(_stats_view(flatten(figures), None, 0))

    async def watching() -> None:
        async with client:
            previous: dict[str, Any] | None = None
            before = time.monotonic()
            refreshes = 0
            live = None if as_json else Live(console=console, auto_refresh=False)
            with live if live is not None else contextlib.nullcontext():
                while True:
                    figures = await client.stats()
                    now = time.monotonic()
                    flat = flatten(figures)
                    if live is None:
                        click.echo(orjson.dumps(figures).decode())
                    else:
                        live.update(_stats_view(flat, previous, now - before), refresh=True)
                    previous, before = flat, now
                    refreshes += 1
                    if count is not None and refreshes >= count:
                        return
                    await asyncio.sleep(interval or 1.0)

    run(watching if watch else once)


def register(group: click.Group) -> None:
    """Add the client commands to ``group``."""
    for command in (
        token_command,
        sub_command,
        pub_command,
        tail_command,
        presence_command,
        stats_command,
    ):
        group.add_command(command)
