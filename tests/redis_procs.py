"""Real Redis topologies for fault tests: a redis-server with persistence that can be
killed, paused and restarted on the same port and directory; a primary with a replica and
three sentinels; broker nodes in cluster mode. Every process on a free loopback port,
every wait bounded."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from .support import BrokerProcess, free_port, wait_for


def need_redis() -> None:
    """Skip without redis-server (fail under CI=true)."""
    if shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is required in CI")
        pytest.skip("redis-server is not installed")


class RedisProc:
    """One redis-server on a free port with its own directory. ``persistence`` is
    ``"none"``, ``"rdb"`` (snapshots only when asked: ``save()``), ``"aof"``
    (appendfsync everysec, no snapshots) or ``"aof-always"`` (every write fsynced before
    it is answered: a kill -9 loses nothing)."""

    def __init__(self, home: Path, persistence: str = "rdb", *extra: str) -> None:
        self.home = home
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.persistence = persistence
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        cmd += ["--dir", str(self.home), "--save", ""]
        if self.persistence in ("aof", "aof-always"):
            fsync = "always" if self.persistence == "aof-always" else "everysec"
            cmd += ["--appendonly", "yes", "--appendfsync", fsync]
        else:
            cmd += ["--appendonly", "no"]
        return cmd + self.extra

    def start(self, timeout: float = 10.0) -> RedisProc:
        with open(self.home / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log)
        client = self.client(0.2)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.ping():
                    return self
            except redis.exceptions.BusyLoadingError:
                pass
            except redis.ConnectionError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited:\n{self.log()}") from None
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not start:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        return (self.home / "redis.log").read_text(errors="replace")[-3000:]

    def client(self, timeout: float = 5.0) -> redis.Redis:
        return redis.Redis(port=self.port, socket_connect_timeout=timeout, socket_timeout=timeout)

    def save(self) -> None:
        """A snapshot now (``SAVE``): what a restart after ``kill()`` comes back to."""
        self.client().save()

    def kill(self) -> None:
        """``kill -9``: nothing saved, nothing flushed."""
        if self.proc is not None and self.proc.poll() is None:
            if self.paused:
                self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def restart(self) -> RedisProc:
        """kill -9, then start again on the same port and directory."""
        self.kill()
        return self.start()


class Node(BrokerProcess):
    """A broker node in cluster mode: history in Redis, so no --memory/--data."""

    def __init__(self, home: Path, redis_url: str, *args: str) -> None:
        super().__init__(home, "--redis", redis_url, *args)

    def command(self) -> list[str]:
        cmd = super().command()
        i = cmd.index("--data")
        del cmd[i : i + 2]
        return cmd


SENTINEL_CONF = """port {port}
bind 127.0.0.1
dir {dir}
sentinel monitor {name} 127.0.0.1 {primary} 2
sentinel down-after-milliseconds {name} 500
sentinel failover-timeout {name} 5000
sentinel parallel-syncs {name} 1
"""


class Sentinels:
    """A primary, one replica and three sentinels (quorum 2), all on loopback. ``url`` is
    the ``redis+sentinel://`` URL a node is given."""

    name = "brokerha"

    def __init__(self, home: Path) -> None:
        self.home = home
        self.primary = RedisProc(home / "primary", "none")
        self.replica = RedisProc(home / "replica", "none")
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.name}/0"

    def start(self) -> Sentinels:
        self.primary.start()
        self.replica.extra = ["--replicaof", "127.0.0.1", str(self.primary.port)]
        self.replica.start()
        wait_for(lambda: self.replica_in_sync(), 10)
        for i, port in enumerate(self.sentinel_ports):
            folder = self.home / f"sentinel{i}"
            folder.mkdir(parents=True, exist_ok=True)
            conf = folder / "sentinel.conf"
            conf.write_text(
                SENTINEL_CONF.format(
                    port=port, dir=folder, name=self.name, primary=self.primary.port
                )
            )
            with open(folder / "sentinel.log", "ab") as log:
                self.sentinels.append(
                    subprocess.Popen(
                        ["redis-server", str(conf), "--sentinel"], stdout=log, stderr=log
                    )
                )
        wait_for(lambda: self._sentinels_agree(self.primary.port), 15, 0.1)
        return self

    def replica_in_sync(self) -> bool:
        try:
            info: dict[str, Any] = self.replica.client(1).info("replication")
        except redis.RedisError:
            return False
        return info.get("master_link_status") == "up"

    def _sentinels_agree(self, port: int) -> bool:
        """Every sentinel names ``port`` as the primary and knows the replica and the
        other sentinels (so that a failover can start at once)."""
        for sp in self.sentinel_ports:
            try:
                client = redis.Redis(port=sp, socket_timeout=1, socket_connect_timeout=1)
                addr = client.sentinel_get_master_addr_by_name(self.name)
                master = client.sentinel_master(self.name)
            except redis.RedisError:
                return False
            if addr is None or int(addr[1]) != port:
                return False
            if int(master.get("num-other-sentinels", 0)) < 2:
                return False
            if int(master.get("num-slaves", 0)) < 1:
                return False
        return True

    def primary_port(self) -> int | None:
        """The primary's port as the first sentinel that answers names it."""
        for sp in self.sentinel_ports:
            try:
                client = redis.Redis(port=sp, socket_timeout=1, socket_connect_timeout=1)
                addr = client.sentinel_get_master_addr_by_name(self.name)
            except redis.RedisError:
                continue
            return int(addr[1]) if addr else None
        return None

    def stop(self) -> None:
        for proc in self.sentinels:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        self.primary.kill()
        self.replica.kill()


class Forwarder:
    """A TCP endpoint on loopback that forwards each new connection to ``target`` (a port):
    a managed primary endpoint, such as a cloud service's DNS name, that moves to the
    new primary on failover while connections already open stay where they were. Runs
    its own event loop in a thread; ``target`` may be changed from any thread."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Forwarder:
        self._thread.start()
        listen = asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self._server = asyncio.run_coroutine_threadsafe(listen, self._loop).result(5)
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
