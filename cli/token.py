"""``broker token``: mint a token, or decode one and say why it is refused."""

from __future__ import annotations

import time
import warnings
from datetime import datetime
from pathlib import Path

import click
import jwt
import orjson
from jwt.warnings import InsecureKeyLengthWarning
from rich.console import Console

from broker.core.auth import ALGORITHMS, HMAC_ALGORITHMS, TokenVerifier, mint_token
from broker.core.topics import validate_pattern
from broker.errors import (
    BadRequest,
    Unauthorized,
)
from broker.local import secret_path, short_secret

from .common import human_duration, local_user, resolve_secret, warn, with_help
from .errors import (
    EXIT_UNAUTHORIZED,
    EXIT_USAGE,
    CommandError,
)
from .params import Duration


def _ttl(ctx: click.Context, param: click.Parameter, value: str) -> float | None:
    # Only the word: a ttl of 0 (a typo, an unset variable) must not mean "forever".
    if value.strip().lower() == "never":
        return None
    ttl = Duration().convert(value, param, ctx)
    if ttl < 1:
        raise click.BadParameter(f"{value!r}: must be at least 1s (or 'never' for no expiry)")
    return ttl


def _user_id(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value == "":
        raise click.BadParameter("must not be empty (leave --id out to use your login name)")
    return value


@click.command(
    "token",
    short_help="Mint a token, or check one with --decode.",
    help=with_help(
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
@click.option(
    "--id",
    "user_id",
    callback=_user_id,
    help="User id (the 'sub' claim). Default: your login name.",
)
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
    type=click.Choice(ALGORITHMS),
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
    key = resolve_secret(secret)
    too_short = short_secret(key) if key is not None and decode is None else None
    if too_short:
        warn(too_short)
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
                reason = f"token expired {human_duration(time.time() - exp)} ago (at {when})"
            nbf = claims.get("nbf")
            if "not yet valid" in reason and isinstance(nbf, (int, float)):
                reason += f": valid in {human_duration(nbf - time.time())}"
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
        out.print(f"expires in {human_duration(identity.exp - time.time())} (at {when})")
    acl = identity.acl
    out.print(f"may publish to: {', '.join(acl.pub) if acl.pub is not None else 'any topic'}")
    out.print(f"may subscribe to: {', '.join(acl.sub) if acl.sub is not None else 'any topic'}")
    out.print(f"admin: {'yes' if identity.admin else 'no'}")


# -- sub and tail --------------------------------------------------------------------------
