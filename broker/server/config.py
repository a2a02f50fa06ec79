"""Server settings and the local files shared by ``broker serve`` and the client commands.

The local secret lives at ``$XDG_CONFIG_HOME/broker/secret`` (mode 0600): ``broker serve``
creates it on first start when no secret is given, and ``broker token`` and the client
commands on the same machine read it, so a fresh install works with no configuration.
"""

from __future__ import annotations

import math
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

APP_NAME = "broker"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_URL = f"ws://{DEFAULT_HOST}:{DEFAULT_PORT}/ws"


def config_dir() -> Path:
    """The user's config directory for broker (XDG on Linux)."""
    return Path(platformdirs.user_config_dir(APP_NAME))


def data_dir() -> Path:
    """The default directory for the on-disk store (XDG data dir on Linux)."""
    return Path(platformdirs.user_data_dir(APP_NAME))


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
    if value < 0 or math.isnan(value):
        raise ValueError(f"{text!r} is not a positive duration")
    return value


@dataclass
class ServerConfig:
    """Everything ``broker serve`` can be told; the defaults are the documented ones."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    secret: str | None = None
    algorithm: str = "HS256"
    public_key: str | None = None
    audience: str | None = None
    issuer: str | None = None
    require_exp: bool = False
    data: Path | None = None  # None: the default data dir
    memory: bool = False
    redis: str | None = None
    redis_wait: int = 0  # replicas that must confirm an append before the ok
    redis_wait_timeout: float = 1.0
    history: int = 1000
    retention: float = 24 * 3600
    max_message_size: int = 64 * 1024
    max_queue: int = 1024 * 1024
    rate_limit: float | None = None
    max_connections: int | None = None
    max_subscriptions: int | None = None
    auth_timeout: float = 10.0
    ping_interval: float = 20.0  # 0: no keepalive pings
    drain_timeout: float = 10.0
    allowed_origins: list[str] = field(default_factory=list)
    tls_cert: str | None = None
    tls_key: str | None = None
    compression: bool = False
    log_format: str = "rich"

    @property
    def scheme(self) -> str:
        return "wss" if self.tls_cert else "ws"

    @property
    def url(self) -> str:
        """The WebSocket URL clients use to reach this server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/ws"
