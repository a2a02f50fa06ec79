"""The backend of the hooks tests: examples/hooks/app.py in a real process, and brokers
whose ``[hooks]`` point at it."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

from .support import ROOT, BrokerProcess, free_port, isolated_env

HOOK_SECRET = "hook-secret-for-the-tests"
APP = ROOT / "examples" / "hooks" / "app.py"


class Reply:
    """An HTTP answer: status, headers (lower-case names), body."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    method: str,
    url: str,
    *,
    body: bytes | None = None,
    json_body: object = None,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> Reply:
    """One HTTP request over a fresh connection (http.client: no client library)."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path + ("?" + urllib.parse.urlencode(params) if params else "")
    sent = dict(headers or {})
    if json_body is not None:
        body = json.dumps(json_body).encode()
        sent["Content-Type"] = "application/json"
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=sent)
        answer = conn.getresponse()
        if answer.getheader("content-type", "").startswith("text/event-stream"):
            data = b"".join(answer.readline() for _ in range(3))  # the head of a stream
        else:
            data = answer.read()
        return Reply(answer.status, {k.lower(): v for k, v in answer.getheaders()}, data)
    finally:
        conn.close()


class Backend:
    """``examples/hooks/app.py`` on a free port; restartable on the same port."""

    def __init__(self, home: Path, broker_url: str = "ws://127.0.0.1:1/ws") -> None:
        self.home = home
        self.port = free_port()
        self.events_path = home / "events.jsonl"
        self.broker_url = broker_url
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> Backend:
        self.home.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(APP), "--port", str(self.port), "--secret", HOOK_SECRET]
        cmd += ["--broker", self.broker_url, "--events", str(self.events_path)]
        with open(self.home / "app.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, env=isolated_env(self.home), stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the example application exited")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return self
            time.sleep(0.05)
        raise RuntimeError("the example application did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def events(self) -> list[dict[str, Any]]:
        """The events recorded so far, in the order they arrived."""
        try:
            lines = self.events_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def login(self, name: str) -> str:
        """Log ``name`` in; the session cookie's value."""
        form = urllib.parse.urlencode({"name": name}).encode()
        kind = {"Content-Type": "application/x-www-form-urlencoded"}
        reply = request("POST", f"{self.url}/login", body=form, headers=kind)
        assert reply.status == 303, reply.body
        cookie = reply.headers["set-cookie"].split(";")[0]
        return cookie.removeprefix("session=")


def hooks_toml(
    backend: Backend,
    hooks: tuple[str, ...] = ("connect", "subscribe", "publish", "events"),
    timeout: str = "1s",
    public: str | None = None,
    extra: str = "",
) -> str:
    """A settings file whose hooks point at ``backend``; ``chat/#`` asks subscribe and
    publish."""
    lines = ["[hooks]"]
    lines += [f'{name} = "{backend.url}/broker/{name}"' for name in hooks]
    lines += [f'secret = "{HOOK_SECRET}"', f'timeout = "{timeout}"', extra]
    lines += ["[[namespace]]", 'pattern = "chat/#"']
    if "subscribe" in hooks:
        lines.append("subscribe_hook = true")
    if "publish" in hooks:
        lines.append("publish_hook = true")
    if public is not None:
        lines += ["[[namespace]]", f'pattern = "{public}"', "public = true"]
    return "\n".join(lines) + "\n"


class _Node(BrokerProcess):
    """A cluster node: history in Redis, no --data."""

    def command(self) -> list[str]:
        cmd = super().command()
        i = cmd.index("--data")
        del cmd[i : i + 2]
        return cmd


def hooked_broker(
    home: Path,
    backend: Backend,
    *args: str,
    cluster: str | None = None,
    port: int | None = None,
    **kw: Any,
) -> BrokerProcess:
    """A started broker with ``hooks_toml(backend, **kw)`` as its settings file; a node
    of the cluster on Redis URL ``cluster`` when given."""
    home.mkdir(parents=True, exist_ok=True)
    config = home / "broker.toml"
    config.write_text(hooks_toml(backend, **kw))
    if cluster is not None:
        return _Node(home, "--config", str(config), "--redis", cluster, *args, port=port).start()
    return BrokerProcess(home, "--config", str(config), *args, memory=True, port=port).start()
