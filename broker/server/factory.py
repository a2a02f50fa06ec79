"""Building a broker from its configuration, and running it until a signal.

The one place that chooses the store and the token verifier. The Redis store is
imported only when ``--redis`` asks for it: a single node never loads redis-py.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import jwt

from broker import __version__
from broker.core.auth import TokenVerifier
from broker.errors import ConfigError
from broker.server.app import BrokerServer
from broker.server.config import ServerConfig
from broker.store.base import Store
from broker.store.memory import MemoryStore
from broker.store.sqlite import SqliteStore

log = logging.getLogger("broker")

#: Test-only: cap the SQLite database at this many pages, so that a test of a real
#: ``broker serve`` meets "database or disk is full" without filling a disk.
SQLITE_MAX_PAGES_ENV = "BROKER_TEST_SQLITE_MAX_PAGES"
#: Test-only: this machine's boot id, as if it had rebooted (a power loss) since the last
#: run of the broker.
BOOT_ID_ENV = "BROKER_TEST_BOOT_ID"


def build_verifier(config: ServerConfig) -> TokenVerifier:
    """The token verifier for ``config``: a secret for HS*, a public key file otherwise."""
    if config.algorithm.startswith("HS"):
        if not config.secret:
            raise ValueError("a secret is required for HMAC algorithms")
        key: str | bytes = config.secret
    else:
        if not config.public_key:
            raise ValueError(f"--public-key is required for {config.algorithm}")
        try:
            key = Path(config.public_key).read_bytes()
            # Checked now: a key jwt cannot load would refuse every token, one by one.
            jwt.get_algorithm_by_name(config.algorithm).prepare_key(key)
        except OSError as exc:
            raise ConfigError(
                f"cannot read public_key {config.public_key}: {exc.strerror or exc}"
            ) from None
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise ConfigError(
                f"public_key {config.public_key} is not a PEM public key for "
                f"{config.algorithm}: {exc}"
            ) from None
    return TokenVerifier(
        key,
        config.algorithm,
        audience=config.audience,
        issuer=config.issuer,
        require_exp=config.require_exp,
    )


def build_store(config: ServerConfig) -> Store:
    """The history store ``config`` asks for."""
    if config.redis:
        from broker.store.redis import RedisStore  # only a cluster node needs redis-py

        return RedisStore(
            config.redis,
            config.history,
            config.retention,
            wait_replicas=config.redis_wait,
            wait_timeout=config.redis_wait_timeout,
        )
    if config.memory:
        return MemoryStore(config.history, config.retention, config.history_size)
    folder = config.data_folder()
    assert folder is not None  # neither memory nor redis
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create data directory {folder}: {exc.strerror or exc}") from None
    # Read here, not in the store: the tests that need them run a real `broker serve`.
    max_pages = os.environ.get(SQLITE_MAX_PAGES_ENV)
    return SqliteStore(
        Path(folder) / "broker.sqlite3",
        config.history,
        config.retention,
        fsync=config.fsync,
        fsync_interval=config.fsync_interval,
        max_pages=int(max_pages) if max_pages else None,
        boot_id=os.environ.get(BOOT_ID_ENV) or None,
        max_disk=config.max_disk,
    )


#: The GIL switch interval (seconds) a broker runs with (see shorten_switch_interval).
SWITCH_INTERVAL = 0.0005


def shorten_switch_interval() -> None:
    """Let the event loop take the GIL back within ``SWITCH_INTERVAL``, whatever the store.

    Threads besides the loop run Python (the SQLite store's readers build and match rows,
    its fsync thread binds them; a hook's or Redis client's work) while the loop waits for
    the GIL once per callback: at the interpreter's 5 ms, 32 history readers made each
    turn wait that long several times (issue 27, row 6). A process-wide setting, so made
    here at start-up, not by whichever part happens to start a thread."""
    sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))


def create_server(config: ServerConfig, store: Store | None = None) -> BrokerServer:
    """A broker for ``config`` (not started), with ``store`` or the one it asks for."""
    store = store if store is not None else build_store(config)
    cluster = getattr(store, "cluster", None)  # a RedisStore's cluster-wide presence
    return BrokerServer(config, store, build_verifier(config), cluster)


async def run(config: ServerConfig, on_ready: Callable[[BrokerServer], None] | None = None) -> None:
    """Run a broker until SIGTERM/SIGINT, then shut down gracefully; ``on_ready`` is
    called once it listens (the CLI prints its banner there)."""
    server = create_server(config)
    await server.start()
    # Before anyone can be told the broker listens: a SIGTERM right after that must shut
    # it down gracefully, not kill it.
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, lambda: loop.create_task(server.shutdown()))
    # Start-up objects never die: keep them out of the collector's way, and collect the
    # young generation less often (fan-out allocates many short-lived frames).
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    shorten_switch_interval()
    if on_ready is not None:
        on_ready(server)
    log.info(
        "broker %s listening on %s (console: %s, store: %s)",
        __version__,
        config.url,
        config.console_url,
        store_label(server.store),
        extra={"event": "listening"},
    )
    await server.serve_forever()
    log.info("broker stopped", extra={"event": "stopped"})


def store_label(store: Store) -> str:
    """A short description of ``store`` for humans."""
    if isinstance(store, SqliteStore):
        return f"sqlite {store.path}"
    return type(store).__name__.removesuffix("Store").lower()
