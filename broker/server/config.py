"""The settings of ``broker serve``: one table, ``ServerConfig``.

Every setting is one field of ``ServerConfig`` declared with ``setting(default, KIND,
"help")``: that one declaration is the row of the table. From it come the flag
(``--max-queue``), the environment variable (``BROKER_MAX_QUEUE``: ``BROKER_`` and the name
in upper snake case), the key of the TOML file (``max_queue``) and the line of ``broker
serve --print-config``; the kind (``broker.server.kinds``) says how a value is read and
its bounds. ``broker.server.config_load`` reads them (flags, then the environment, then
the file, then the defaults); ``broker.server.config_docs`` writes the starter file and
the docs' table.

Structured settings, more than one value each (a ``[table]`` or ``[[array of tables]]``
of the file, no flag or variable), are fields declared below the settings and listed in
``SECTIONS``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from broker.core.auth import ALGORITHMS
from broker.core.hooks import HookSettings
from broker.core.hooks import parse_settings as parse_hooks
from broker.core.namespaces import Namespace, parse_namespaces
from broker.local import DEFAULT_HOST, DEFAULT_PORT, data_dir
from broker.server.kinds import (
    Choice,
    DirPath,
    Duration,
    FilePath,
    Integer,
    Kind,
    Number,
    Size,
    Switch,
    Text,
    TextList,
)

#: Prefix of the environment variable of every setting: BROKER_ + upper snake case.
ENV_PREFIX = "BROKER_"

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
#: Upper bound of the counts that have no natural one: past it, a typo, not a plan.
MANY = 10_000_000


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
        Duration(0.01, HOUR),
        "SQLite store: how often the commit log is fsynced and applied to SQLite; with "
        "fsync 'interval' the publishes a power loss or OS crash can lose.",
    )
    redis: str | None = setting(
        None,
        Text("URL"),
        "Cluster mode: the Redis-backed store and fan-out shared by every node given the "
        "same URL; memory and data don't apply. With Sentinel: "
        "redis+sentinel://host:26379[,host:port...]/service/db (follows failovers).",
        example="redis://127.0.0.1:6379/0",
    )
    redis_wait: int = setting(
        0,
        Integer(0, 100),
        "Cluster mode: acknowledge a publish only once N Redis replicas have it (WAIT).",
    )
    redis_wait_timeout: float = setting(
        1.0,
        Duration(0.01, MINUTE),
        "How long redis_wait waits; then the publish gets 'unavailable'.",
    )
    history: int = setting(1000, Integer(0, MANY), "Messages kept per topic.")
    retention: float = setting(24 * HOUR, Duration(1, 3650 * DAY), "Maximum age of kept messages.")
    max_message_size: int = setting(
        64 * KiB, Size(256, 64 * MiB), "Largest frame accepted (close 1009 above)."
    )
    max_queue: int = setting(
        1 * MiB,
        Size(1 * KiB, 1 * GiB),
        "Unsent bytes per connection before it is closed as a slow consumer (4008).",
    )
    max_pending_publishes: int = setting(
        1000,
        Integer(1, MANY),
        "Publishes of one connection waiting to be recorded in history; past it the broker "
        "stops reading that connection until they are.",
    )
    max_pending_bytes: int = setting(
        256 * KiB,
        Size(1 * KiB, 1 * GiB),
        "Bytes of one connection's publishes waiting to be recorded in history; past it the "
        "broker stops reading that connection until they are.",
    )
    max_store_backlog: int = setting(
        64 * MiB,
        Size(64 * KiB, 64 * GiB),
        "Bytes of publishes waiting to be recorded, all connections together; past it "
        "publishing connections stop being read and HTTP publishes get 'unavailable'.",
    )
    history_size: int = setting(
        256 * MiB,
        Size(1 * KiB, 1 * TiB),
        "Memory store: total bytes of messages kept, all topics together; past it the "
        "oldest messages go first, whatever their topic.",
    )
    max_disk: int = setting(
        8 * GiB,
        Size(1 * MiB, 1024 * TiB),
        "On-disk store: bytes its database may take, all topics together; past it "
        "publishes get 'unavailable' until retention frees room.",
    )
    rate_limit: float | None = setting(
        None,
        Number(1_000_000),
        "Publishes per second per connection. Not set: no limit.",
        example=100,
    )
    max_connections: int | None = setting(
        None,
        Integer(1, 1_000_000),
        "Connections (TCP sockets, counted from accept) at once; over it a new one gets 503. "
        "Not set: what the file-descriptor limit allows (raised to its hard limit at start, "
        "128 kept aside), at most 65536.",
        example=10000,
    )
    max_unauthenticated: int | None = setting(
        None,
        Integer(1, 1_000_000),
        "Connections not authenticated yet, at once; when full, the oldest is dropped. "
        "Not set: a quarter of max_connections (at least 16), at most 4096.",
        example=1000,
    )
    max_unauthenticated_per_address: int = setting(
        256,
        Integer(0, 1_000_000),
        "Connections not authenticated yet from one IP address, at once; when full, that "
        "address's oldest is dropped (0: no limit).",
    )
    max_anonymous: int | None = setting(
        None,
        Integer(0, 1_000_000),
        "Anonymous connections and streams (public topics, no token) at once; over it a new "
        "one is refused (close 1013, or 503). Not set: half of max_connections.",
        example=5000,
    )
    max_anonymous_per_address: int = setting(
        256,
        Integer(0, 1_000_000),
        "Anonymous connections and streams from one IP address at once (0: no limit).",
    )
    dedupe_window: float = setting(
        120.0,
        Duration(1, 7 * DAY),
        "How long a publish's idempotency key is remembered, from its first publish.",
    )
    max_subscriptions: int = setting(
        1000, Integer(1, 1_000_000), "Subscriptions per connection; past it a 'sub' gets forbidden."
    )
    auth_timeout: float = setting(
        5.0,
        Duration(0.1, 10 * MINUTE),
        "Time a new connection has, from accept, to send its HTTP request and authenticate.",
    )
    ping_interval: float = setting(
        20.0,
        Duration(0.1, HOUR, off=True),
        "How often to ping quiet connections; one silent for two intervals is dropped "
        "(0: no pings).",
    )
    drain_timeout: float = setting(10.0, Duration(0, HOUR), "Time allowed for a graceful shutdown.")
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

    # -- structured settings: a [table] or [[array of tables]] of the file each ----------
    # Declare each as a field with a default_factory here, and list it in SECTIONS below.
    namespaces: tuple[Namespace, ...] = field(default_factory=tuple)
    #: The file's ``[hooks]`` table (broker.core.hooks): the application's backend.
    hooks: HookSettings = field(default_factory=HookSettings)

    @property
    def scheme(self) -> str:
        """``wss`` with a TLS certificate, else ``ws``."""
        return "wss" if self.tls_cert else "ws"

    @property
    def url(self) -> str:
        """The WebSocket URL clients use to reach this server."""
        return f"{self.scheme}://{self._authority}/ws"

    @property
    def console_url(self) -> str:
        """The browser console's URL (and the base of ``/healthz``, ``/api/...``)."""
        return f"{'https' if self.tls_cert else 'http'}://{self._authority}/"

    @property
    def _authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def data_folder(self) -> Path | None:
        """The directory of the on-disk store: ``data``, else the user's data directory;
        None when the history is not on disk (``memory``, ``redis``)."""
        if self.memory or self.redis:
            return None
        return Path(self.data) if self.data else data_dir()


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


@dataclass(frozen=True)
class Section:
    """A structured setting: a ``[table]`` or ``[[array of tables]]`` of the file, read
    into one ``ServerConfig`` field. No flag, no environment variable."""

    field: str  #: the ServerConfig attribute
    name: str  #: the TOML table name
    #: The field's value from the parsed TOML value; raises ``ValueError`` saying why.
    parse: Callable[[object], Any]
    help: str


#: The structured settings, by TOML name.
SECTIONS: dict[str, Section] = {
    "namespace": Section(
        "namespaces",
        "namespace",
        parse_namespaces,
        "Per-pattern options (broker.core.namespaces): public, history, retention, presence, "
        "subscribe_hook, publish_hook.",
    ),
    "hooks": Section(
        "hooks",
        "hooks",
        parse_hooks,
        "Hooks to the application's backend (broker.core.hooks): connect, subscribe, "
        "publish and events URLs, secret, timeout, bounds.",
    ),
}

_URL_PASSWORD = re.compile(r"(://[^/@:\s]*:)[^/@\s]+@")


def _redact_url_password(text: str) -> str:
    return _URL_PASSWORD.sub(r"\1<redacted>@", text)
