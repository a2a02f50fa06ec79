"""The broker on this machine: its default address, where its files live, the local secret.

What ``broker serve`` and the clients on the same machine (the CLI, the examples) agree on
without configuration. ``broker serve`` creates the local secret at
``$XDG_CONFIG_HOME/broker/secret`` (mode 0600) on first start when no secret is given;
``broker token``, the client commands and the examples read it, so a fresh install works
with no setup. Reading and writing these files is all the I/O here, which is why this is
not the (sans-I/O) core; it imports no server and no client, so both may import it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import platformdirs

APP_NAME = "broker"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_URL = f"ws://{DEFAULT_HOST}:{DEFAULT_PORT}/ws"
CONFIG_FILE_NAME = "broker.toml"
#: HMAC secrets shorter than this are warned about (RFC 7518 3.2: at least the hash size).
MIN_SECRET_BYTES = 32


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


def short_secret(secret: str) -> str | None:
    """Why ``secret`` is too short to sign tokens safely, or None when it is long enough."""
    size = len(secret.encode())
    if size >= MIN_SECRET_BYTES:
        return None
    return f"the secret is only {size} bytes long; {MIN_SECRET_BYTES} or more are recommended"
