"""What every benchmark needs around the broker it measures: a free loopback port, the
``broker serve`` command line, a broker subprocess started and awaited until it listens,
tokens for it, and a clean stop.

    from harness import Broker

    with Broker(["--memory"]) as broker:        # a temporary directory, a free port
        token = broker.token("alice")
        ...                                     # broker.url, broker.port, broker.pid

The broker under test is the ``broker`` package that ``$PYTHONPATH`` makes importable when
it is set (another checkout, to compare versions), else this checkout's. Its output goes to
``broker.log`` in its working directory (``Broker.log()``). Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from broker.core.auth import mint_token  # noqa: E402

HOST = "127.0.0.1"


class StartFailed(RuntimeError):
    """A process exited before it listened, or did not listen in time."""


def free_port(host: str = HOST) -> int:
    """A TCP port on ``host`` that is free right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(
    port: int,
    proc: subprocess.Popen[Any],
    what: str = "the broker",
    timeout: float = 20.0,
    host: str = HOST,
) -> None:
    """Wait until something accepts connections on ``port``; ``StartFailed`` if ``proc``
    exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise StartFailed(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.2):
            return
        if time.monotonic() > deadline:
            raise StartFailed(f"{what} did not listen on {host}:{port} within {timeout:.0f} s")
        time.sleep(0.05)


def stop_process(proc: subprocess.Popen[Any], timeout: float = 15.0) -> int | None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def serve_command(
    port: int,
    secret: str,
    *,
    data: Path | None = None,
    log_level: str | None = "warning",
    args: Sequence[str] = (),
) -> list[str]:
    """The ``broker serve`` command line: loopback ``port``, ``secret``, the data directory
    (unless ``args`` keep history elsewhere: ``--memory``, ``--redis``), then ``args``."""
    cmd = [sys.executable, "-m", "broker.cli", "serve", "--host", HOST, "--port", str(port)]
    cmd += ["--secret", secret]
    if data is not None and not {"--memory", "--redis"} & set(args):
        cmd += ["--data", str(data)]
    if log_level is not None:
        cmd += ["--log-level", log_level]
    return [*cmd, *args]


def broker_env(home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment for a broker process whose XDG directories live under ``home``, with
    no ``BROKER_*`` settings leaking in from the caller's."""
    env = dict(os.environ if base is None else base)
    env["XDG_CONFIG_HOME"] = str(home / "config")
    env["XDG_DATA_HOME"] = str(home / "xdg-data")
    env["PYTHONPATH"] = env.get("PYTHONPATH") or str(ROOT)
    env["NO_COLOR"] = "1"
    env["COLUMNS"] = "200"
    for name in ("BROKER_SECRET", "BROKER_TOKEN", "BROKER_URL"):
        env.pop(name, None)
    return env


def broker_package(env: Mapping[str, str] | None = None) -> Path:
    """Where the broker under test is imported from (to say which version was measured)."""
    out = subprocess.run(
        [sys.executable, "-c", "import broker, os; print(os.path.dirname(broker.__file__))"],
        env=dict(os.environ if env is None else env),
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return Path(out.stdout.strip())


class Broker:
    """A ``broker serve`` subprocess on a free loopback port (or ``port``).

    ``workdir`` holds its log, its data directory (``data``, default ``workdir/data``) and
    its XDG directories; without one a temporary directory is made and removed by
    ``stop()``. ``args`` are more ``serve`` options (``--memory``, ``--redis URL``...).
    ``nofile`` sets the process's soft file-descriptor limit. A context manager: starts,
    then stops.
    """

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        workdir: Path | None = None,
        secret: str | None = None,
        data: Path | None = None,
        port: int | None = None,
        log_level: str | None = "warning",
        env: Mapping[str, str] | None = None,
        nofile: int | None = None,
    ) -> None:
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="broker-bench-"))
        self.port = port or free_port()
        self.secret = secret or os.urandom(24).hex()
        self.data = data or self.workdir / "data"
        self.args = list(args)
        self.env = broker_env(self.workdir, env)
        self.cmd = serve_command(
            self.port, self.secret, data=self.data, log_level=log_level, args=self.args
        )
        self.log_path = self.workdir / f"broker-{self.port}.log"
        self.nofile = nofile
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The WebSocket endpoint."""
        return f"ws://{HOST}:{self.port}/ws"

    @property
    def http_url(self) -> str:
        """The HTTP base URL (API, metrics, health)."""
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def token(self, user: str, **claims: Any) -> str:
        """A token for ``user`` signed with this broker's secret (an hour long unless
        ``ttl`` says otherwise); ``claims`` as ``mint_token`` takes them (``admin=True``)."""
        claims.setdefault("ttl", 3600)
        return mint_token(self.secret, user, **claims)

    def start(self, timeout: float = 20.0) -> Broker:
        """Start and wait until it listens; ``StartFailed`` (with the log's end) if it
        exits first or does not listen in time."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        nofile = self.nofile

        def limits() -> None:
            if nofile is not None:
                hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                soft = nofile if hard == resource.RLIM_INFINITY else min(nofile, hard)
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=self.workdir,
                env=self.env,
                stdout=log,
                stderr=log,
                preexec_fn=limits if nofile is not None else None,
            )
        try:
            wait_port(self.port, self.proc, timeout=timeout)
        except StartFailed as exc:
            self.kill()
            raise StartFailed(f"{exc}: {self.log().strip()[-400:]}") from None
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        """Everything the broker wrote so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (a graceful shutdown), SIGKILL after ``timeout``; the exit code. A
        temporary working directory is removed."""
        code = None if self.proc is None else stop_process(self.proc, timeout)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return code

    def kill(self) -> None:
        """SIGKILL, now."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
