"""Test helpers: real broker processes on loopback ports, raw WebSocket clients.

Nothing here is mocked: ``BrokerProcess`` runs ``python -m broker.cli serve`` (the same code
as the ``broker`` console script) in a subprocess on a free port.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidStatus

import broker
from broker.core.auth import mint_token

ROOT = Path(__file__).resolve().parent.parent
#: The broker under test is this source tree (not an installed build, such as the compiled
#: wheel .ci/run also tests): subprocesses must then import it from here too.
FROM_SOURCE = Path(broker.__file__).resolve().parent.parent == ROOT
SECRET = "test-secret-0123456789-abcdefghijklmnop"
SECRET_B = SECRET.encode()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def isolated_env(home: Path) -> dict[str, str]:
    """Environment for a subprocess whose XDG dirs live under ``home``."""
    env = dict(os.environ)
    env["XDG_CONFIG_HOME"] = str(home / "config")
    env["XDG_DATA_HOME"] = str(home / "data")
    if FROM_SOURCE:
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("BROKER_SECRET", None)
    env.pop("BROKER_TOKEN", None)
    env.pop("BROKER_URL", None)
    env["NO_COLOR"] = "1"
    return env


#: A configuration with the ``scores/#`` topics public: readable without a token.
PUBLIC_SCORES = '[[namespace]]\npattern = "scores/#"\npublic = true\n'


def public_broker(make_broker: Callable[..., Any], home: Path, *args: str) -> Any:
    """A broker from the ``make_broker`` fixture whose ``scores/#`` topics are public,
    with extra ``serve`` ARGS."""
    path = home / "public.toml"
    path.write_text(PUBLIC_SCORES)
    return make_broker("--config", str(path), *args)


def run_cli(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``broker ARGS`` in a subprocess with its XDG dirs under ``home``; output captured."""
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", *args],
        cwd=ROOT,
        env=isolated_env(home),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class BrokerProcess:
    """A ``broker serve`` subprocess; ``start()`` waits until it accepts connections."""

    def __init__(
        self,
        home: Path,
        *args: str,
        port: int | None = None,
        secret: str | None = SECRET,
        memory: bool = False,
        data: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.home = home
        #: Extra environment variables, set after isolated_env's.
        self.env = env or {}
        self.port = port or free_port()
        self.secret = secret
        self.data = data if data is not None else home / "store"
        self.args = list(args)
        self.memory = memory
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = home / f"broker-{self.port}.log"

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "broker.cli", "serve", "--port", str(self.port)]
        if self.secret is not None:
            cmd += ["--secret", self.secret]
        cmd += ["--memory"] if self.memory else ["--data", str(self.data)]
        return cmd + self.args

    def start(self, timeout: float = 15.0) -> BrokerProcess:
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.command(),
            cwd=ROOT,
            env={**isolated_env(self.home), **self.env},
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode}:\n{self.log()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"broker did not start within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def token(self, user_id: str = "1", name: str | None = None, **kw: Any) -> str:
        assert self.secret is not None
        return mint_token(self.secret, user_id, name, **kw)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send ``sig`` and wait for the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def close(self) -> None:
        """Teardown: ``kill -9``, nothing to wait for."""
        self.kill()

    def kill(self) -> None:
        """``kill -9``: no cleanup of any kind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> BrokerProcess:
        self.stop()
        return self.start()


def wait_for(predicate: Callable[[], object], timeout: float = 5.0, interval: float = 0.02) -> None:
    """Poll ``predicate`` until it returns something true; AssertionError after ``timeout``
    seconds. For conditions another process or thread makes true (a log line, a file)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout} s")
        time.sleep(interval)


async def async_wait_for(
    predicate: Callable[[], object], timeout: float = 5.0, interval: float = 0.02
) -> None:
    """``wait_for`` inside a coroutine: polls without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout} s")
        await asyncio.sleep(interval)


class RedisServer:
    """A throwaway redis-server without persistence on a free port (never the machine's
    6379), restartable on the same port. Tests use the session's one through the
    ``redis_server`` fixture (tests/conftest.py)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *extra: str) -> None:
        import redis

        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        cmd += ["--save", "", "--appendonly", "no", "--dir", str(self.home), *extra]
        with open(self.home / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def ensure_running(self) -> None:
        """Start it again if a previous test killed it."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def flush(self) -> None:
        import redis

        redis.Redis(port=self.port).flushall()


class Peer:
    """A raw protocol client over a real WebSocket, for tests of the wire format."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._next_id = 0

    @classmethod
    async def open(cls, url: str, token: str | None = None, *, hello: bool = True) -> Peer:
        ws = await connect(url, max_size=None, open_timeout=10)
        peer = cls(ws)
        if token is not None:
            await peer.send({"op": "auth", "token": token})
            if hello:
                frame = await peer.recv()
                assert frame["op"] == "hello", frame
        return peer

    @classmethod
    async def open_with_header(cls, url: str, token: str) -> Peer:
        ws = await connect(
            url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=10
        )
        return cls(ws)

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        if isinstance(frame, dict):
            await self.ws.send(orjson.dumps(frame).decode())
        else:
            await self.ws.send(frame)

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        frame = orjson.loads(raw)
        assert isinstance(frame, dict)
        return frame

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send a request with a fresh id; return its reply, skipping other frames."""
        self._next_id += 1
        rid = self._next_id
        await self.send({"op": op, "id": rid, **fields})
        while True:
            frame = await self.recv()
            if frame.get("id") == rid and frame["op"] in ("ok", "error"):
                return frame

    async def expect_nothing(self, wait: float = 0.3) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            frame = await self.recv(timeout=wait)
            raise AssertionError(f"unexpected frame {frame}")

    async def close(self) -> None:
        await self.ws.close()


def self_signed_cert(tmp: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost: (cert.pem, key.pem)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


# -- hand-built tokens and raw clients ------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(part: dict[str, Any] | bytes) -> str:
    raw = part if isinstance(part, bytes) else json.dumps(part, separators=(",", ":")).encode()
    return b64(raw)


def forge(
    header: dict[str, Any] | bytes,
    payload: dict[str, Any] | bytes,
    key: bytes = SECRET_B,
    digest: Any = hashlib.sha256,
) -> str:
    """A JWT with exactly this header and payload, HMAC-signed by hand with ``key``
    (PyJWT would refuse to build most of the tokens below)."""
    signing_input = segment(header) + "." + segment(payload)
    mac = hmac.new(key, signing_input.encode(), digest).digest()
    return signing_input + "." + b64(mac)


def alg_none(alg: str, payload: dict[str, Any]) -> str:
    return segment({"alg": alg, "typ": "JWT"}) + "." + segment(payload) + "."


async def refusal(url: str, headers: Headers | dict[str, str], **kw: Any) -> tuple[int, str]:
    """Status and body of a refused upgrade (fails if the upgrade succeeds)."""
    with pytest.raises(InvalidStatus) as info:
        ws = await connect(url, additional_headers=headers, open_timeout=5, **kw)
        await ws.close()
    response = info.value.response
    return response.status_code, bytes(response.body or b"").decode(errors="replace")


async def closed_with(
    peer: Peer, timeout: float = 5.0
) -> tuple[int | None, str | None, list[dict[str, Any]]]:
    """Read until the connection closes; the close code, reason and the frames seen."""
    frames: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    with contextlib.suppress(ConnectionClosed):
        while True:
            frames.append(await peer.recv(timeout=max(0.01, deadline - time.monotonic())))
    return peer.ws.close_code, peer.ws.close_reason, frames


def http_get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError):
        return 0, b""  # port closed


async def raw_upgrade(
    port: int, token: str, timeout: float = 5
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP client that completes the WebSocket handshake, then does nothing by itself."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


class RawClient:
    """A WebSocket client written by hand on a plain blocking socket: it completes the
    handshake (token in the Authorization header), can send masked text frames and parse
    what comes back, and otherwise never reads, like a consumer that stopped reading."""

    GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, port: int, token: str, *, rcvbuf: int = 4096) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16))
        request = (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(4096)
            assert chunk, f"handshake cut short: {buf!r}"
            buf += chunk
        head, _, self.buf = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].startswith("HTTP/1.1 101"), lines[0]
        expected = base64.b64encode(hashlib.sha1(key + self.GUID).digest()).decode()
        headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])}
        assert headers["sec-websocket-accept"] == expected
        self.bytes_read = 0

    def send_json(self, obj: Any) -> None:
        payload = orjson.dumps(obj)
        mask = os.urandom(4)
        n = len(payload)
        header = (
            bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
        )
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def _need(self, n: int) -> None:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError
            self.bytes_read += len(chunk)
            self.buf += chunk

    def recv_frame(self) -> tuple[int, bytes]:
        """(opcode, payload) of the next frame (server frames are unmasked)."""
        self._need(2)
        opcode, n = self.buf[0] & 0x0F, self.buf[1] & 0x7F
        offset = 2
        if n == 126:
            self._need(4)
            n, offset = int.from_bytes(self.buf[2:4], "big"), 4
        elif n == 127:
            self._need(10)
            n, offset = int.from_bytes(self.buf[2:10], "big"), 10
        self._need(offset + n)
        payload, self.buf = self.buf[offset : offset + n], self.buf[offset + n :]
        return opcode, payload

    def recv_json(self) -> dict[str, Any]:
        opcode, payload = self.recv_frame()
        assert opcode == 1, opcode
        return orjson.loads(payload)

    def drain_until_closed(self, timeout: float) -> tuple[bool, int | None]:
        """Read everything until EOF or reset: (closed, close code if a close frame came)."""
        self.sock.settimeout(timeout)
        code = None
        try:
            while True:
                opcode, payload = self.recv_frame()
                if opcode == 8:
                    code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        except (EOFError, ConnectionResetError, BrokenPipeError):
            return True, code
        except TimeoutError:
            return False, code

    def close(self) -> None:
        self.sock.close()


def overlapping_patterns(depth: int) -> list[str]:
    """Every pattern of ``depth`` levels, each level ``a`` or ``+``: 2**depth of them,
    all matching ``a/a/.../a``."""
    return [
        "/".join("+" if bits >> level & 1 else "a" for level in range(depth))
        for bits in range(2**depth)
    ]


# -- what a broker reports: /metrics samples, JSON log events -----------------------------

#: Prometheus samples by (name, labels).
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics(broker: Any) -> Samples:
    """The samples of ``broker``'s /metrics (a BrokerThread or a BrokerProcess)."""
    with urllib.request.urlopen(broker.http_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def limit_hits(broker: Any, limit: str) -> float:
    """How often ``limit`` was reached, from the broker's /metrics."""
    return metrics(broker)[("broker_limit_hits_total", frozenset({("limit", limit)}))]


def log_events(broker: Any, event: str) -> list[dict[str, Any]]:
    """The JSON log lines of ``broker`` (``--log-format json``) whose event is ``event``."""
    entries = []
    for line in broker.log().splitlines():
        if line.startswith("{"):
            entry = orjson.loads(line)
            if entry.get("event") == event:
                entries.append(entry)
    return entries
