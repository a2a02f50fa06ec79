"""A lean client WebSocket for load generation (``broker bench``).

The load generator shares the machine with the broker it measures, so what it costs per
message decides whether a benchmark measures the broker or itself: websockets' asyncio
client costs ~45 µs per acknowledged publish (a coroutine, a frame object and a
``send`` system call per message, a future per received frame), about what the broker
spends on it. This ``asyncio.Protocol`` writes frames encoded by the core's codec
(``broker.core.frames``), as many as the caller has ready in one ``write``, and parses the
server's frames with the same codec in ``data_received``, handing each text or binary
message to a callback; pings are answered, a close frame is echoed. It is also the
benchmarks' WebSocket client (``benchmarks/loadgen.py``), so it asks only for what the
caller gives: a URL, headers (a bearer token, a subprotocol). Applications use
``broker.client.Client``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import random
import ssl
from collections.abc import Callable, Iterable
from typing import cast
from urllib.parse import urlsplit

from broker.core import frames
from broker.core.frames import (
    BINARY,
    CLOSE,
    CLOSE_NORMAL,
    PING,
    PONG,
    TEXT,
    FrameError,
    Masker,
    Parser,
)

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_HEAD = 64 * 1024
#: Default bound on a message from the server (a history batch can be large).
MAX_MESSAGE = 64 * 1024 * 1024


def _fast_mask() -> Masker:
    """websockets' C helper, several times faster than the codec's pure Python; the
    codec's own where it is missing."""
    try:
        from websockets.speedups import apply_mask
    except ImportError:  # pragma: no cover
        return frames.apply_mask
    return apply_mask


_APPLY_MASK = _fast_mask()


class HandshakeFailed(Exception):
    """The server did not upgrade the connection: its HTTP ``status`` (0 when the
    response was not HTTP), with the status line and the body's start as the message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def frame(payload: bytes, opcode: int = TEXT) -> bytes:
    """One masked client frame carrying ``payload`` whole. The mask need not be
    unpredictable here (no proxy to poison between a load generator and the broker it
    measures): ``random`` spares a system call per frame."""
    return frames.encode(payload, opcode, mask=random.randbytes(4), apply_mask=_APPLY_MASK)


class Link(asyncio.Protocol):
    """One client WebSocket: ``open()`` it (or make one and ``connect()`` it), ``send``
    frames, get messages (text or binary, as bytes) through ``on_message``, which may use
    the link from the first message on; ``closed`` resolves when the TCP connection is
    gone. ``bytes_received`` counts every byte read, handshake included."""

    def __init__(self, on_message: Callable[[bytes], None], max_size: int = MAX_MESSAGE) -> None:
        self.on_message = on_message
        self.transport: asyncio.Transport | None = None
        #: The server's close code: 1005 for a close frame without one, 1006 (set when the
        #: connection is lost) for none; None while open.
        self.close_code: int | None = None
        self.bytes_received = 0
        self._buffer = bytearray()
        self._parser = Parser(masked=False, max_size=max_size)
        self._opened: asyncio.Future[None] | None = None
        self._key = b""
        self._handshaking = True
        self._close_sent = False
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
        max_size: int = MAX_MESSAGE,
    ) -> Link:
        """Connect to ``url`` (``ws://`` or ``wss://``) with ``headers`` on the upgrade;
        ``max_size`` bounds a message from the server (close 1009 above it)."""
        link = cls(on_message, max_size)
        await link.connect(url, headers, timeout)
        return link

    async def connect(self, url: str, headers: dict[str, str], timeout: float = 30.0) -> None:
        """Connect this link to ``url`` (``ws://`` or ``wss://``) with ``headers`` on the
        upgrade; ``HandshakeFailed`` if the server does not upgrade."""
        parts = urlsplit(url)
        secure = parts.scheme == "wss"
        host = parts.hostname or "127.0.0.1"
        port = parts.port or (443 if secure else 80)
        loop = asyncio.get_running_loop()
        link = self
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

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.bytes_received += len(data)
        if self._handshaking:
            self._buffer += data
            if not self._handshake():
                return
            data, self._buffer = bytes(self._buffer), bytearray()
        on_message = self.on_message
        try:
            for opcode, payload in self._parser.feed(data):
                if opcode <= BINARY:  # TEXT or BINARY: fragments are joined
                    on_message(payload)
                elif opcode == PING:
                    self.send([payload], opcode=PONG)
                elif opcode == CLOSE:
                    self._closed_by_server(payload)
                    return
        except FrameError as exc:
            self.close_code = exc.code
            if not self._close_sent:
                self._write(frame(frames.close_payload(exc.code, exc.reason), CLOSE))
                self._close_sent = True
            if self.transport is not None:
                self.transport.close()

    def _closed_by_server(self, payload: bytes) -> None:
        """Echo the server's close frame (if this side did not send one first), and end
        the connection."""
        self.close_code = frames.parse_close(payload)[0]
        if not self._close_sent:
            self._write(frame(payload[:2], CLOSE))
            self._close_sent = True
        if self.transport is not None:
            self.transport.close()

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
        if self.close_code is None:
            self.close_code = frames.CLOSE_ABNORMAL
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

    def send(self, payloads: Iterable[bytes], opcode: int = TEXT) -> None:
        """Send each payload as one message (``TEXT``, or ``BINARY``), all in one
        ``write``."""
        if not self._close_sent:
            self._write(b"".join([frame(p, opcode) for p in payloads]))

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

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
        if not self._close_sent:
            self._write(frame(frames.close_payload(CLOSE_NORMAL), CLOSE))
            self._close_sent = True
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        except TimeoutError:
            self.transport.abort()
