"""A lean client WebSocket for load generation (``broker bench``).

The load generator shares the machine with the broker it measures, so what it costs per
message decides whether a benchmark measures the broker or itself: websockets' asyncio
client costs ~45 µs per acknowledged publish (a coroutine, a frame object and a
``send`` system call per message, a future per received frame), about what the broker
spends on it. This ``asyncio.Protocol`` writes frames built by hand, as many as the
caller has ready in one ``write``, and parses the server's unmasked frames in
``data_received``, handing each text message to a callback. It speaks only what
``broker bench`` needs: text messages, ping (answered) and close. Applications use
``broker.client.Client``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import random
import ssl
import struct
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

try:  # websockets' C helper, as the server uses it
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover
    from websockets.utils import apply_mask

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_HEAD = 64 * 1024


class HandshakeFailed(Exception):
    """The server did not upgrade the connection: its HTTP ``status`` (0 when the
    response was not HTTP), with the status line and the body's start as the message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One masked client frame (RFC 6455 5.2) carrying ``payload`` whole. The mask need
    not be unpredictable here (no proxy to poison between a load generator and the
    broker it measures): ``random`` spares a system call per frame."""
    mask = random.randbytes(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + mask + apply_mask(payload, mask)


class Link(asyncio.Protocol):
    """One client WebSocket: ``open()`` it, ``send`` frames, get messages through
    ``on_message``; ``closed`` resolves when the TCP connection is gone."""

    def __init__(self, on_message: Callable[[bytes], None]) -> None:
        self.on_message = on_message
        self.transport: asyncio.Transport | None = None
        self.close_code: int | None = None
        self._buffer = bytearray()
        self._opened: asyncio.Future[None] | None = None
        self._key = b""
        self._handshaking = True
        self._paused = False
        self._drained: asyncio.Future[None] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(
        cls,
        url: str,
        headers: dict[str, str],
        on_message: Callable[[bytes], None],
        timeout: float = 30.0,
    ) -> Link:
        """Connect to ``url`` (``ws://`` or ``wss://``) with ``headers`` on the upgrade."""
        parts = urlsplit(url)
        secure = parts.scheme == "wss"
        host = parts.hostname or "127.0.0.1"
        port = parts.port or (443 if secure else 80)
        loop = asyncio.get_running_loop()
        link = cls(on_message)
        link._opened = loop.create_future()
        context = ssl.create_default_context() if secure else None
        await asyncio.wait_for(
            loop.create_connection(lambda: link, host, port, ssl=context), timeout
        )
        link._key = base64.b64encode(os.urandom(16))
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {parts.netloc}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {link._key.decode()}",
            "Sec-WebSocket-Version: 13",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        assert link.transport is not None
        link.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await asyncio.wait_for(asyncio.shield(link._opened), timeout)
        return link

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        if self._handshaking and not self._handshake():
            return
        pos, end = 0, len(buffer)
        while end - pos >= 2:
            head1, head2 = buffer[pos], buffer[pos + 1]
            length, start = head2 & 0x7F, pos + 2
            if length == 126:
                if end - pos < 4:
                    break
                length, start = int.from_bytes(buffer[pos + 2 : pos + 4], "big"), pos + 4
            elif length == 127:
                if end - pos < 10:
                    break
                length, start = int.from_bytes(buffer[pos + 2 : pos + 10], "big"), pos + 10
            stop = start + length
            if stop > end:
                break
            payload = bytes(buffer[start:stop])
            pos = stop
            opcode = head1 & 0x0F
            if opcode == 0x1 or opcode == 0x2:
                self.on_message(payload)
            elif opcode == 0x9:
                self.send([payload], opcode=0xA)
            elif opcode == 0x8:
                self.close_code = int.from_bytes(payload[:2], "big") if payload else 1005
                self.send([payload[:2]], opcode=0x8)
                if self.transport is not None:
                    self.transport.close()
                break
        del buffer[:pos]

    def _handshake(self) -> bool:
        """Read the upgrade response; True once the connection is open."""
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > _MAX_HEAD:
                self._fail(HandshakeFailed(0, "response head too large"))
            return False
        head = bytes(buffer[:end]).decode("latin-1").split("\r\n")
        del buffer[: end + 4]
        status = head[0].split(" ", 2)
        fields = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in head[1:])
        }
        accept = base64.b64encode(hashlib.sha1(self._key + _GUID).digest()).decode()
        if len(status) < 2 or status[1] != "101" or fields.get("sec-websocket-accept") != accept:
            code = int(status[1]) if len(status) > 1 and status[1].isdigit() else 0
            body = bytes(buffer[:200]).decode(errors="replace").strip()
            self._fail(HandshakeFailed(code, f"{head[0]}: {body}" if body else head[0]))
            return False
        self._handshaking = False
        if self._opened is not None and not self._opened.done():
            self._opened.set_result(None)
        return True

    def _fail(self, exc: Exception) -> None:
        if self._opened is not None and not self._opened.done():
            self._opened.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError("connection closed during the handshake"))
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(ConnectionError("connection lost"))
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # -- actions -----------------------------------------------------------------------

    def send(self, payloads: Iterable[bytes], opcode: int = 0x1) -> None:
        """Send each payload as one message, all in one ``write``."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join([frame(p, opcode) for p in payloads]))

    async def drain(self) -> None:
        """Wait while the socket's write buffer is above its high-water mark."""
        if self.closed.done():
            raise ConnectionError("connection lost")
        if self._paused:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained

    async def close(self, timeout: float = 2.0) -> None:
        """Send a close frame and wait (bounded) for the server to end the connection."""
        if self.transport is None or self.closed.done():
            return
        self.send([(1000).to_bytes(2, "big")], opcode=0x8)
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        except TimeoutError:
            self.transport.abort()
