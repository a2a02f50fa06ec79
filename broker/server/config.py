"""Server settings, and the local files shared by ``broker serve`` and the client commands.

Every ``broker serve`` setting is one field of ``ServerConfig`` declared with
``setting(default, KIND, "help")``: that one declaration is the settings table. From it come
the flag (``--max-queue``), the environment variable (``BROKER_MAX_QUEUE``: ``BROKER_`` and
the name in upper snake case), the key of the TOML file (``max_queue``) and the line of
``broker serve --print-config``. Precedence: flags, then the environment, then the file
(``--config FILE``, else ``broker.toml`` in the user's config directory when it exists),
then the defaults.

The local secret lives at ``$XDG_CONFIG_HOME/broker/secret`` (mode 0600): ``broker serve``
creates it on first start when no secret is given, and ``broker token`` and the client
commands on the same machine read it, so a fresh install works with no configuration.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import secrets
import textwrap
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import platformdirs

from broker.core.auth import ALGORITHMS
from broker.core.namespaces import Namespace, parse_namespaces
from broker.errors import ConfigError

APP_NAME = "broker"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_URL = f"ws://{DEFAULT_HOST}:{DEFAULT_PORT}/ws"
#: Prefix of the environment variable of every setting: BROKER_ + upper snake case.
ENV_PREFIX = "BROKER_"
CONFIG_FILE_NAME = "broker.toml"
#: The TOML key of the ``[[namespace]]`` tables.
NAMESPACE_KEY = "namespace"


def config_dir() -> Path:
    """The user's config directory for broker (XDG on Linux)."""
    return Path(platformdirs.user_config_dir(APP_NAME))


def data_dir() -> Path:
    """The default directory for the on-disk store (XDG data dir on Linux)."""
    return Path(platformdirs.user_data_dir(APP_NAME))


def default_config_file() -> Path:
    """Where ``broker serve`` looks for its TOML file when no ``--config`` is given."""
    return config_dir() / CONFIG_FILE_NAME


def secret_path() -> Path:
    """Where the locally generated HMAC secret is kept."""
    return config_dir() / "secret"


def read_local_secret() -> str | None:
    """The local secret if the file exists and is readable, else None."""
    try:
        return secret_path().read_text().strip() or None
    except OSError:
        return None


def ensure_local_secret() -> str:
    """The local secret, created (random, mode 0600) when there is none yet."""
    existing = read_local_secret()
    if existing:
        return existing
    path = secret_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    value = secrets.token_urlsafe(32)
    # O_EXCL: when two processes start at once, one creates and the other reads.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        again = read_local_secret()
        if again:
            return again
        raise
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def parse_duration(text: str | float) -> float:
    """Seconds in ``text``: a plain number of seconds or a number with a unit
    (``30s``, ``15m``, ``1h``, ``7d``). Raises ``ValueError`` with a readable message."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        raw = text.strip().lower()
        units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
        multiplier = 1.0
        for unit in sorted(units, key=len, reverse=True):
            if raw.endswith(unit):
                multiplier = units[unit]
                raw = raw[: -len(unit)]
                break
        try:
            value = float(raw) * multiplier
        except ValueError:
            raise ValueError(
                f"{text!r} is not a duration (use seconds or e.g. 30s, 15m, 1h, 7d)"
            ) from None
    if math.isinf(value):
        raise ValueError(f"{text!r} is not a finite duration")
    if value < 0 or math.isnan(value):
        raise ValueError(f"{text!r} is not a positive duration")
    return value


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1 << 20,
    "mb": 10**6,
    "mib": 1 << 20,
}


def parse_size(text: str | int) -> int:
    """Bytes in ``text``: a plain number or one with a unit (``64KiB``, ``1MiB``, also K, M,
    KB, MB). Raises ``ValueError`` with a readable message."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        raw = str(text).strip().lower()
        number = raw.rstrip("kmbi")
        try:
            size = int(float(number) * _SIZE_UNITS[raw[len(number) :]])
        except (KeyError, ValueError):
            raise ValueError(f"{text!r} is not a size (use bytes or e.g. 64KiB, 1MiB)") from None
    if size <= 0:
        raise ValueError(f"{text!r} is not a positive size")
    return size


# -- kinds: how text (a flag, an environment variable) or a TOML value becomes a setting ---


class Kind:
    """How one setting's value is read and shown; ``parse`` raises ``ValueError`` saying why."""

    metavar = "TEXT"
    #: A list (repeatable flag, TOML array, comma-separated environment variable).
    multiple = False
    #: A switch: ``--name/--no-name``, TOML true/false.
    switch = False

    def parse(self, raw: object) -> Any:
        """The value of ``raw``: a string from a flag or the environment, or a TOML value."""
        if not isinstance(raw, str):
            raise ValueError(f"{_toml_type(raw)} where text is expected")
        return raw

    def show(self, value: Any) -> str:
        """``value`` as a TOML literal."""
        return json.dumps(str(value))


class Text(Kind):
    """Any string."""

    def __init__(self, metavar: str = "TEXT") -> None:
        self.metavar = metavar


class Integer(Kind):
    """A whole number, at least ``low`` (and at most ``high``)."""

    metavar = "INTEGER"

    def __init__(self, low: int | None = None, high: int | None = None) -> None:
        self.low, self.high = low, high

    def parse(self, raw: object) -> int:
        if isinstance(raw, bool) or not isinstance(raw, (int, str)):
            raise ValueError(f"{_toml_type(raw)} where a whole number is expected")
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not a whole number") from None
        if self.low is not None and value < self.low or self.high is not None and value > self.high:
            bound = (
                f"between {self.low} and {self.high}"
                if self.high is not None
                else f"at least {self.low}"
            )
            raise ValueError(f"{raw!r} is not {bound}")
        return value

    def show(self, value: Any) -> str:
        return str(value)


class Number(Kind):
    """A number above zero."""

    metavar = "NUMBER"

    def parse(self, raw: object) -> float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
            raise ValueError(f"{_toml_type(raw)} where a number is expected")
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not a number") from None
        if not value > 0 or math.isinf(value):
            raise ValueError(f"{raw!r} is not a number above 0")
        return value

    def show(self, value: Any) -> str:
        return f"{value:g}" if float(value) != int(value) else str(int(value))


class Switch(Kind):
    """On or off: ``--name/--no-name``; true/false, 1/0, yes/no, on/off."""

    metavar = "BOOLEAN"
    switch = True
    _words = {
        "1": True,
        "true": True,
        "yes": True,
        "on": True,
        "0": False,
        "false": False,
        "no": False,
        "off": False,
    }

    def parse(self, raw: object) -> bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in self._words:
            return self._words[raw.strip().lower()]
        raise ValueError(f"{raw!r} is not true or false")

    def show(self, value: Any) -> str:
        return "true" if value else "false"


class Duration(Kind):
    """Seconds, or a number with a unit: ``30s``, ``15m``, ``1h``, ``7d``."""

    metavar = "DURATION"

    def parse(self, raw: object) -> float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
            raise ValueError(f"{_toml_type(raw)} where a duration is expected")
        return parse_duration(raw)

    def show(self, value: Any) -> str:
        return json.dumps(format_duration(float(value)))


class Size(Kind):
    """Bytes, or a number with a unit: ``64KiB``, ``1MiB``."""

    metavar = "SIZE"

    def parse(self, raw: object) -> int:
        if isinstance(raw, bool) or not isinstance(raw, (int, str)):
            raise ValueError(f"{_toml_type(raw)} where a size is expected")
        return parse_size(raw)

    def show(self, value: Any) -> str:
        return json.dumps(format_size(int(value)))


class Choice(Kind):
    """One of a fixed set of words."""

    def __init__(self, *choices: str) -> None:
        self.choices = choices
        self.metavar = "[" + "|".join(choices) + "]"

    def parse(self, raw: object) -> str:
        text = super().parse(raw)
        if text not in self.choices:
            raise ValueError(f"{text!r} is not one of {', '.join(self.choices)}")
        return str(text)


class FilePath(Kind):
    """The path of a file that exists."""

    metavar = "FILE"

    def parse(self, raw: object) -> str:
        text = super().parse(raw)
        if not Path(text).is_file():
            raise ValueError(f"{text!r} is not an existing file")
        return str(text)


class DirPath(Kind):
    """The path of a directory (created when missing)."""

    metavar = "DIR"

    def parse(self, raw: object) -> Path:
        text = super().parse(raw)
        if not text.strip():
            raise ValueError("an empty path")
        path = Path(text).expanduser()
        if path.exists() and not path.is_dir():
            raise ValueError(f"{text!r} is not a directory")
        return path


class TextList(Kind):
    """Several strings: a repeated flag, a TOML array, or comma-separated in the environment."""

    multiple = True

    def parse(self, raw: object) -> list[str]:
        if isinstance(raw, str):
            return [part.strip() for part in raw.split(",") if part.strip()]
        if isinstance(raw, (list, tuple)) and all(isinstance(item, str) for item in raw):
            return list(raw)
        raise ValueError(f"{_toml_type(raw)} where a list of strings is expected")

    def show(self, value: Any) -> str:
        return "[" + ", ".join(json.dumps(item) for item in value) + "]"


def _toml_type(raw: object) -> str:
    names = {
        bool: "true/false",
        int: "a number",
        float: "a number",
        str: "text",
        list: "a list",
        dict: "a table",
    }
    return names.get(type(raw), type(raw).__name__)


def format_duration(seconds: float) -> str:
    """``seconds`` the way a person writes it: ``24h``, ``90s``, ``1.5s``, ``250ms``."""
    if seconds == 0:
        return "0s"
    # Days only from two on: "24h" reads better than "1d".
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= max(size, 2 * 86400 if unit == "d" else 0) and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds < 1 and (seconds * 1000) == int(seconds * 1000):
        return f"{int(seconds * 1000)}ms"
    return f"{seconds:g}s"


def format_size(size: int) -> str:
    """``size`` bytes the way a person writes it: ``64KiB``, ``1MiB``, ``1500``."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


# -- the table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One row of the settings table: a ``ServerConfig`` field and how it is set."""

    field: str  #: the ServerConfig attribute
    name: str  #: the TOML key; the flag and the environment variable derive from it
    kind: Kind
    default: Any
    help: str
    secret: bool = False
    #: A value shown (commented out) in the starter file when the default is "not set".
    example: Any = None

    @property
    def flag(self) -> str:
        """The command-line option, e.g. ``--max-queue``."""
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        """The environment variable, e.g. ``BROKER_MAX_QUEUE``."""
        return ENV_PREFIX + self.name.upper()

    def show(self, value: Any) -> str:
        """``value`` as a TOML literal, secrets blanked; ``""`` when not set."""
        if value is None:
            return ""
        if self.secret:
            return '"<redacted>"'
        return _redact_url_password(self.kind.show(value))


def setting(
    default: Any,
    kind: Kind,
    help: str,
    *,
    secret: bool = False,
    example: Any = None,
    name: str | None = None,
) -> Any:
    """Declare a ``ServerConfig`` field as a setting (one row of the table).

    ``name`` overrides the TOML key (and so the flag and the variable) when it differs from
    the field's name.
    """
    meta = {"setting": (kind, help, secret, example, name)}
    if isinstance(default, list):
        items = list(default)
        return field(default_factory=lambda: list(items), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ServerConfig:
    """Everything ``broker serve`` can be told; each ``setting(...)`` is a row of the table."""

    host: str = setting(
        DEFAULT_HOST, Text("ADDRESS"), "Address to listen on (0.0.0.0 or :: for every interface)."
    )
    port: int = setting(
        DEFAULT_PORT, Integer(0, 65535), "TCP port to listen on (0: any free port)."
    )
    secret: str | None = setting(
        None,
        Text("SECRET"),
        "HMAC secret tokens are signed with. Not set: a random one kept in the local secret "
        "file, so `broker token` on this machine finds it.",
        secret=True,
        example="change-me-to-32-or-more-random-bytes",
    )
    algorithm: str = setting("HS256", Choice(*ALGORITHMS), "The one JWT algorithm accepted.")
    public_key: str | None = setting(
        None, FilePath(), "PEM public key, for RS256/ES256.", example="/etc/broker/jwt-public.pem"
    )
    audience: str | None = setting(None, Text(), "Require this 'aud' claim.", example="my-app")
    issuer: str | None = setting(
        None, Text(), "Require this 'iss' claim.", example="https://auth.example.com"
    )
    require_exp: bool = setting(False, Switch(), "Refuse tokens without 'exp'.")
    data: Path | None = setting(
        None,
        DirPath(),
        "Directory of the on-disk (SQLite) history. Not set: the user's data directory.",
        example="/var/lib/broker",
    )
    memory: bool = setting(False, Switch(), "Keep history in memory only (lost on restart).")
    fsync: str = setting(
        "interval",
        Choice("interval", "always"),
        "SQLite store: 'interval' acknowledges a publish once it is appended to the commit "
        "log, i.e. written to the operating system (a crash of the broker loses nothing "
        "acknowledged), and fsyncs every fsync_interval; 'always' fsyncs the log before every "
        "acknowledgement (a power loss loses nothing acknowledged either), at a cost in CPU "
        "and latency.",
    )
    fsync_interval: float = setting(
        1.0,
        Duration(),
        "SQLite store: how often the commit log is fsynced and applied to SQLite; with "
        "fsync 'interval' the publishes a power loss or OS crash can lose.",
    )
    redis: str | None = setting(
        None,
        Text("URL"),
        "Cluster mode: the Redis-backed store and fan-out shared by every node given the "
        "same URL; memory and data don't apply.",
        example="redis://127.0.0.1:6379/0",
    )
    redis_wait: int = setting(
        0,
        Integer(0),
        "Cluster mode: acknowledge a publish only once N Redis replicas have it (WAIT).",
    )
    redis_wait_timeout: float = setting(
        1.0, Duration(), "How long redis_wait waits; then the publish gets 'unavailable'."
    )
    history: int = setting(1000, Integer(0), "Messages kept per topic.")
    retention: float = setting(24 * 3600.0, Duration(), "Maximum age of kept messages.")
    max_message_size: int = setting(64 * 1024, Size(), "Largest frame accepted (close 1009 above).")
    max_queue: int = setting(
        1 << 20,
        Size(),
        "Unsent bytes per connection before it is closed as a slow consumer (4008).",
    )
    max_pending_publishes: int = setting(
        1000,
        Integer(1),
        "Publishes of one connection waiting to be recorded in history; past it the broker "
        "stops reading that connection until they are.",
    )
    max_pending_bytes: int = setting(
        256 << 10,
        Size(),
        "Bytes of one connection's publishes waiting to be recorded in history; past it the "
        "broker stops reading that connection until they are.",
    )
    max_store_backlog: int = setting(
        64 << 20,
        Size(),
        "Bytes of publishes waiting to be recorded, all connections together; past it "
        "publishing connections stop being read and HTTP publishes get 'unavailable'.",
    )
    history_size: int = setting(
        256 << 20,
        Size(),
        "Memory store: total bytes of messages kept, all topics together; past it the "
        "oldest messages go first, whatever their topic.",
    )
    rate_limit: float | None = setting(
        None, Number(), "Publishes per second per connection. Not set: no limit.", example=100
    )
    max_connections: int | None = setting(
        None,
        Integer(1),
        "Connections (TCP sockets, counted from accept) at once; over it a new one gets 503. "
        "Not set: what the file-descriptor limit allows (raised to its hard limit at start, "
        "128 kept aside), at most 65536.",
        example=10000,
    )
    max_unauthenticated: int | None = setting(
        None,
        Integer(1),
        "Connections not authenticated yet, at once; when full, the oldest is dropped. "
        "Not set: a quarter of max_connections (at least 16), at most 4096.",
        example=1000,
    )
    max_unauthenticated_per_address: int = setting(
        256,
        Integer(0),
        "Connections not authenticated yet from one IP address, at once; when full, that "
        "address's oldest is dropped (0: no limit).",
    )
    max_anonymous: int | None = setting(
        None,
        Integer(0),
        "Anonymous connections and streams (public topics, no token) at once; over it a new "
        "one is refused (close 1013, or 503). Not set: half of max_connections.",
        example=5000,
    )
    max_anonymous_per_address: int = setting(
        256,
        Integer(0),
        "Anonymous connections and streams from one IP address at once (0: no limit).",
    )
    dedupe_window: float = setting(
        120.0,
        Duration(),
        "How long a publish's idempotency key is remembered, from its first publish.",
    )
    max_subscriptions: int = setting(
        1000, Integer(1), "Subscriptions per connection; past it a 'sub' gets forbidden."
    )
    auth_timeout: float = setting(
        5.0,
        Duration(),
        "Time a new connection has, from accept, to send its HTTP request and authenticate.",
    )
    ping_interval: float = setting(
        20.0,
        Duration(),
        "How often to ping quiet connections; one silent for two intervals is dropped "
        "(0: no pings).",
    )
    drain_timeout: float = setting(10.0, Duration(), "Time allowed for a graceful shutdown.")
    allowed_origins: list[str] = setting(
        [],
        TextList(),
        "Browser origins allowed to connect (repeatable); others get 403. Not set: any.",
        name="allowed_origin",
        example=["https://app.example.com"],
    )
    tls_cert: str | None = setting(
        None,
        FilePath(),
        "PEM certificate: serve wss:// (needs tls_key).",
        example="/etc/broker/cert.pem",
    )
    tls_key: str | None = setting(
        None, FilePath(), "PEM private key for tls_cert.", example="/etc/broker/key.pem"
    )
    log_level: str = setting(
        "info", Choice("debug", "info", "warning", "error"), "Lowest level logged."
    )
    log_format: str = setting(
        "rich",
        Choice("rich", "json"),
        "rich: readable lines (coloured on a terminal); json: one object per line.",
    )
    compression: bool = False  # permessage-deflate; not a setting (clients rarely gain from it)
    #: The file's ``[[namespace]]`` tables (broker.core.namespaces): structured, so they
    #: have no flag or environment form.
    namespaces: tuple[Namespace, ...] = ()

    @property
    def scheme(self) -> str:
        """``wss`` with a TLS certificate, else ``ws``."""
        return "wss" if self.tls_cert else "ws"

    @property
    def url(self) -> str:
        """The WebSocket URL clients use to reach this server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/ws"


def _table() -> tuple[Setting, ...]:
    rows = []
    for f in fields(ServerConfig):
        if "setting" not in f.metadata:
            continue
        kind, help_text, secret, example, name = f.metadata["setting"]
        default = f.default_factory() if callable(f.default_factory) else f.default
        rows.append(Setting(f.name, name or f.name, kind, default, help_text, secret, example))
    return tuple(rows)


#: The settings table, in declaration order.
SETTINGS: tuple[Setting, ...] = _table()
SETTINGS_BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}

# -- reading them: flags > environment > file > defaults --------------------------------------


@dataclass
class Effective:
    """The settings in force and where each came from (``flag --port``, ``env BROKER_PORT``,
    ``file /etc/broker/broker.toml``, ``default``)."""

    config: ServerConfig
    sources: dict[str, str]
    #: The TOML file read, if any.
    file: Path | None


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings in a TOML file, parsed; ``ConfigError`` naming the file and the key."""
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key == NAMESPACE_KEY:  # read in load_settings, once the global retention is known
            values[key] = value
            continue
        row = SETTINGS_BY_NAME.get(key)
        if row is None:
            close = difflib.get_close_matches(key, SETTINGS_BY_NAME, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: unknown setting {key!r}{hint}")
        values[key] = _parse(row, value, f"file {path}")
    return values


def _parse(row: Setting, raw: object, source: str) -> Any:
    try:
        return row.kind.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"bad value for {row.name} from {source}: {exc}") from None


def load_settings(
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    config_file: Path | None = None,
) -> Effective:
    """Combine the sources into a ``ServerConfig``.

    ``flags`` maps setting names to values given on the command line (already parsed);
    ``environ`` is the environment (``BROKER_*`` variables are read, an empty one counts as
    unset); ``config_file`` is the ``--config`` file, else the default file is read when it
    exists. Raises ``ConfigError`` for an unknown key, a bad value, or settings that
    exclude each other.
    """
    path = config_file
    if path is None and default_config_file().is_file():
        path = default_config_file()
    from_file = read_config_file(path) if path is not None else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for row in SETTINGS:
        text = environ.get(row.env, "")
        if row.name in flags:
            values[row.field], sources[row.name] = flags[row.name], f"flag {row.flag}"
        elif text.strip():
            values[row.field], sources[row.name] = (
                _parse(row, text, f"env {row.env}"),
                f"env {row.env}",
            )
        elif row.name in from_file:
            values[row.field], sources[row.name] = from_file[row.name], f"file {path}"
        else:
            sources[row.name] = "default"
    config = ServerConfig(**values)
    _check(config, sources)
    if NAMESPACE_KEY in from_file:
        config.namespaces = parse_namespaces(
            from_file[NAMESPACE_KEY], str(path), parse_duration, config.retention
        )
    return Effective(config, sources, path)


def _check(config: ServerConfig, sources: Mapping[str, str]) -> None:
    """Settings that exclude or need each other; the message names where each came from."""

    def given(name: str) -> str:
        return f"{name} ({sources[name]})"

    if config.tls_cert and not config.tls_key:
        raise ConfigError(f"{given('tls_cert')} needs tls_key")
    if config.tls_key and not config.tls_cert:
        raise ConfigError(f"{given('tls_key')} needs tls_cert")
    if config.memory and config.data:
        raise ConfigError(f"{given('memory')} and {given('data')} exclude each other")
    if config.redis and not config.redis.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"{given('redis')} is not a Redis URL (redis://, rediss:// or unix://)")
    if config.redis_wait and not config.redis:
        raise ConfigError(f"{given('redis_wait')} needs redis")
    if config.redis and (config.memory or config.data):
        other = "memory" if config.memory else "data"
        raise ConfigError(f"{given('redis')} keeps history in Redis: {given(other)} doesn't apply")
    if not config.algorithm.startswith("HS") and not config.public_key:
        raise ConfigError(f"{given('algorithm')} {config.algorithm} needs public_key")
    if config.fsync_interval <= 0:
        raise ConfigError(
            f"{given('fsync_interval')} must be more than 0; for an fsync before every "
            "acknowledgement use fsync = 'always'"
        )


_URL_PASSWORD = re.compile(r"(://[^/@:\s]*:)[^/@\s]+@")


def _redact_url_password(text: str) -> str:
    return _URL_PASSWORD.sub(r"\1<redacted>@", text)


def describe(effective: Effective) -> list[tuple[str, str, str]]:
    """``(name, value as TOML or "", source)`` per setting, secrets redacted."""
    config = effective.config
    return [
        (row.name, row.show(getattr(config, row.field)), effective.sources[row.name])
        for row in SETTINGS
    ]


def starter_file() -> str:
    """A TOML file with every setting commented out, its help and its default."""
    lines = [
        "# broker serve settings. Uncomment and change what you need.",
        "# Precedence: command-line flags, then environment variables (BROKER_ + the key in",
        "# upper case, e.g. BROKER_MAX_QUEUE), then this file, then the defaults shown here.",
        "# Durations: 30s, 15m, 1h, 7d. Sizes: bytes, or 64KiB, 1MiB.",
        "# Check the result with: broker serve --config THIS_FILE --print-config",
        "",
    ]
    for row in SETTINGS:
        text = f"{row.help} [{row.flag}, {row.env}]"
        lines += textwrap.wrap(text, 88, initial_indent="# ", subsequent_indent="# ")
        if row.default is None or row.default == []:
            example = row.kind.show(row.example) if row.example is not None else '""'
            lines.append(f"# {row.name} = {example}  # not set by default")
        else:
            lines.append(f"# {row.name} = {row.show(row.default)}")
        lines.append("")
    return "\n".join(lines)


def settings_markdown() -> str:
    """The settings table of docs/operations.md: key, environment variable, default, help."""
    lines = ["| key (`--flag`) | environment | default | meaning |", "| --- | --- | --- | --- |"]
    for row in SETTINGS:
        shown = row.show(row.default).strip('"')
        default = f"`{shown}`" if shown not in ("", "[]") else "not set"
        lines.append(f"| `{row.name}` (`{row.flag}`) | `{row.env}` | {default} | {row.help} |")
    return "\n".join(lines)
