"""In-process brokers: the server ``broker serve`` builds, run by the test process itself.

``BrokerThread`` builds its settings from the same flags ``broker serve`` takes (parsed by
the ``serve`` command's own options), builds the server with ``create_server`` as
``broker serve`` does, and runs it in an event loop of its own on a thread, listening on a
port the system chose, with a real socket and a real store (SQLite in the test's
directory, or memory). Starting one costs milliseconds where a ``broker serve`` process
costs most of a second.

Why a thread and not the test's own loop: the tests drive the broker with blocking clients
as much as with asyncio ones (``http.client``, ``urllib``, click's ``CliRunner``, the
synchronous ``publish`` helper), and a blocking call on the loop the server runs on would
wait for itself. On its own loop the server is reached only through its socket, as a
client would reach it.

What needs a process stays on ``BrokerProcess`` (tests/support.py): the CLI's own start-up,
signals, ``kill -9``, the data-directory lock, the process's memory.
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from broker.cli.serve import given_flags, serve
from broker.core.auth import mint_token
from broker.server.app import BrokerServer
from broker.server.config import ServerConfig
from broker.server.config_load import load_settings
from broker.server.factory import create_server
from broker.server.logs import log_handler

from .support import SECRET, BrokerProcess

try:
    import uvloop

    _new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
except ImportError:  # pragma: no cover - uvloop is optional, as for ``broker serve``
    _new_loop = asyncio.new_event_loop

# Time a test's broker is given to close at teardown: the test's clients are no longer
# read by anyone, so waiting for their closing handshakes would only wait.
_TEARDOWN_DRAIN = 0.05


def serve_config(home: Path, args: list[str]) -> ServerConfig:
    """The settings ``broker serve ARGS`` would run with: its flags and the ``--config``
    file they name; the environment and the user's own config file left out."""
    ctx = serve.make_context("serve", list(args))
    config_file = ctx.params.get("config_file")
    if config_file is None:
        config_file = home / "empty.toml"
        config_file.write_text("")
    return load_settings(given_flags(ctx, ctx.params), {}, config_file).config


class BrokerThread:
    """A broker server in this process; ``start()`` returns once it listens.

    The same conveniences as ``BrokerProcess``: ``url``, ``http_url``, ``port``,
    ``token(...)``, ``log()`` (the lines its event loop logged, in the format
    ``--log-format`` asks for),
    ``stop()`` (graceful, as SIGTERM) and ``restart()`` (same port, same data).
    """

    def __init__(
        self,
        home: Path,
        *args: str,
        secret: str | None = SECRET,
        memory: bool = False,
        data: Path | None = None,
    ) -> None:
        self.home = home
        self.secret = secret
        self.memory = memory
        self.data = data if data is not None else home / "store"
        self.args = list(args)
        self.port = 0
        self.server: BrokerServer | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._log = io.StringIO()
        self._handler: logging.Handler | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """The ``broker serve`` arguments this broker runs with."""
        cmd = ["--host", "127.0.0.1", "--port", str(self.port)]
        if self.secret is not None:
            cmd += ["--secret", self.secret]
        cmd += ["--memory"] if self.memory else ["--data", str(self.data)]
        return cmd + self.args

    def token(self, user_id: str = "1", name: str | None = None, **kw: Any) -> str:
        assert self.secret is not None
        return mint_token(self.secret, user_id, name, **kw)

    @property
    def running(self) -> bool:
        """Serving: started, and neither shut down nor stopped by an error."""
        return (
            self._thread is not None
            and self._thread.is_alive()
            and self.server is not None
            and not self.server.draining
        )

    def log(self) -> str:
        """Everything the broker logged so far (across restarts)."""
        return self._log.getvalue()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> BrokerThread:
        assert self._thread is None, "already started"
        self.home.mkdir(parents=True, exist_ok=True)
        config = serve_config(self.home, self.command())
        self._capture_logs(config)
        started: Future[BrokerServer] = Future()
        self._thread = threading.Thread(
            target=self._run, args=(config, started), name=f"broker-{self.port}", daemon=True
        )
        self._thread.start()
        try:
            self.server = started.result(timeout)
        except BaseException:
            self._thread.join(timeout)
            self._thread = None
            self._release_logs()
            raise
        self.port = self.server.config.port
        return self

    def _run(self, config: ServerConfig, started: Future[BrokerServer]) -> None:
        loop = _new_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(config, started))
        finally:
            # As asyncio.run does: nothing of this broker outlives its loop.
            try:
                _cancel_all(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()

    async def _serve(self, config: ServerConfig, started: Future[BrokerServer]) -> None:
        try:
            server = create_server(config)
            await server.start()
        except BaseException as exc:
            started.set_exception(exc)
            return
        started.set_result(server)
        await server.serve_forever()

    def stop(self, timeout: float = 20.0, drain: float | None = None) -> int:
        """Shut the broker down gracefully (what SIGTERM does) and wait for it: 0, the exit
        code ``broker serve`` gives then (a failed shutdown raises). ``drain`` overrides
        the drain timeout."""
        if self._thread is None:
            return 0
        assert self._loop is not None and self.server is not None
        if drain is not None:
            self.server.config.drain_timeout = drain
        try:
            asyncio.run_coroutine_threadsafe(self.server.shutdown(), self._loop).result(timeout)
        finally:
            self._thread.join(timeout)
            self._thread = None
            self._release_logs()
        return 0

    def close(self) -> None:
        """Teardown: stop without waiting for clients that nobody reads any more."""
        self.stop(drain=_TEARDOWN_DRAIN)

    def kill(self) -> None:
        raise TypeError("kill -9 needs a process: mark the test with @pytest.mark.process")

    def restart(self) -> BrokerThread:
        """Stop gracefully, then start again on the same port with the same data."""
        self.stop()
        return self.start()

    # -- logs ------------------------------------------------------------------------------

    def _capture_logs(self, config: ServerConfig) -> None:
        handler = log_handler(config.log_format, self._log)
        handler.setLevel(config.log_level.upper())
        # The logger is the process's: keep what this broker's own thread logs, not what
        # another broker of the same test does (its worker threads' lines are left out).
        handler.addFilter(
            lambda record: self._thread is not None and record.thread == self._thread.ident
        )
        _LogLevel.acquire(config.log_level.upper())
        logging.getLogger("broker").addHandler(handler)
        self._handler = handler

    def _release_logs(self) -> None:
        if self._handler is not None:
            logging.getLogger("broker").removeHandler(self._handler)
            self._handler = None
            _LogLevel.release()


class _LogLevel:
    """The ``broker`` logger's level while in-process brokers run: the lowest any of them
    asks for (a test process's logging is otherwise left as pytest set it)."""

    _held: list[int] = []
    _before: int = logging.NOTSET

    @classmethod
    def acquire(cls, level: str) -> None:
        logger = logging.getLogger("broker")
        if not cls._held:
            cls._before = logger.level
        cls._held.append(logging.getLevelNamesMapping()[level])
        logger.setLevel(min(cls._held))

    @classmethod
    def release(cls) -> None:
        logger = logging.getLogger("broker")
        cls._held.pop()
        logger.setLevel(min(cls._held) if cls._held else cls._before)


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


#: What the ``broker`` and ``make_broker`` fixtures give: a ``BrokerThread``, or a
#: ``BrokerProcess`` for tests marked ``process``.
Broker = BrokerThread | BrokerProcess
