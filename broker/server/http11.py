"""Plain HTTP/1.1 on the broker's port, without I/O: requests read by httptools (llhttp,
in C), responses written from templates.

``RequestReader`` takes the bytes of one connection (``receive``) and gives whole requests
one at a time (``next_request``), in order, or a request that could not be read (``error``
set: the server answers it and the connection closes). It hands the parser at most
``SLICE`` bytes at a time and only once every request parsed before has been taken, so
that pipelined requests are held as bytes (which the connection bounds), not as parsed
objects. llhttp is strict (CRLF line ends, token names, no obs-fold, no
``Content-Length`` beside ``Transfer-Encoding``, no data after a request that closes);
this module adds the bounds it lacks: a request head of at most ``MAX_HEAD`` bytes, a body
of at most ``max_size``. A first request for ``/ws`` or asking to upgrade stops the reader
(``upgrade``) with every byte received so far in ``head``, for websockets' handshake.

``response`` writes a response's bytes: a status line and a ``Server`` line made once, the
headers, ``Content-Length`` and, when the connection closes after it, ``Connection:
close``. Header values come from the server's code or from request headers that llhttp
read (which cannot hold CR or LF).
"""

from __future__ import annotations

from collections import deque
from http import HTTPStatus

import httptools

#: Most bytes of a request head (request line and headers), h11's bound before.
MAX_HEAD = 16 * 1024
#: Most bytes handed to the parser at once: a feed turns at most this many bytes into
#: parsed requests.
SLICE = 16 * 1024

_STATUS_LINES = {int(s): f"HTTP/1.1 {int(s)} {s.phrase}\r\n".encode() for s in HTTPStatus}
#: ``Server: ...`` lines, one per server header (one per server).
_SERVER_LINES: dict[str, bytes] = {}
_CLOSE = b"Connection: close\r\n\r\n"


class HttpRequest:
    """A whole plain HTTP request (not a WebSocket upgrade); or, with ``error`` set, a
    request that could not be read (status, reason): the server answers it and the
    connection closes. ``keep_alive``: another request may follow on the connection."""

    __slots__ = ("body", "error", "headers", "keep_alive", "method", "path", "query", "target")

    def __init__(
        self,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes = b"",
        error: tuple[int, str] | None = None,
        keep_alive: bool = True,
    ) -> None:
        self.method = method
        self.target = target
        self.path, _, self.query = target.partition("?")
        #: Names in lower case, values without surrounding blanks, in order.
        self.headers = headers
        self.body = body
        self.error = error
        self.keep_alive = keep_alive and error is None

    def header(self, name: str) -> list[str]:
        """The values of header ``name`` (lower case), in order."""
        key = name.encode()
        return [value.decode("latin-1") for field, value in self.headers if field == key]


class RequestReader:
    """One connection's requests, from its bytes (see the module's docstring)."""

    __slots__ = (
        "_began",
        "_body",
        "_fields",
        "_in_head",
        "_length",
        "_offset",
        "_parser",
        "_pending",
        "_ready",
        "_seen",
        "_url",
        "error",
        "head",
        "max_size",
        "stopped",
        "upgrade",
    )

    def __init__(self, max_size: int | None) -> None:
        # Made on the first bytes parsed: a WebSocket handshake on the fast path needs none.
        self._parser: httptools.HttpRequestParser | None = None
        #: Bound on a request body, in bytes.
        self.max_size = max_size
        #: Every byte received until the first request's head is read: websockets reads
        #: it again when that request is an upgrade.
        self.head: bytearray | None = bytearray()
        #: The first request is a WebSocket upgrade: nothing more is read here.
        self.upgrade = False
        #: The parser takes no more bytes (an error, an upgrade, a request that closes).
        self.stopped = False
        #: Why the request being read cannot be (status, reason), once ``stopped``.
        self.error: tuple[int, str] | None = None
        self._ready: deque[HttpRequest] = deque()
        self._pending = b""
        self._offset = 0
        # The request being parsed: its target, headers and body so far; whether its head
        # is still being read, and how many bytes of its head earlier feeds held.
        self._url = b""
        self._fields: list[tuple[bytes, bytes]] = []
        self._body = bytearray()
        self._length = 0
        self._in_head = False
        self._began = False
        self._seen = 0

    @property
    def fresh(self) -> bool:
        """Nothing was received yet."""
        return self.head is not None and not self.head

    def buffered(self) -> int:
        """Bytes received and not yet parsed."""
        return len(self._pending) - self._offset

    def receive(self, data: bytes) -> None:
        """Keep ``data`` (bytes read from the connection) for ``next_request``."""
        if self.head is not None:
            self.head += data
        if self.stopped:
            return
        if self._offset >= len(self._pending):
            self._pending, self._offset = data, 0
        else:
            self._pending = self._pending[self._offset :] + data
            self._offset = 0

    def next_request(self) -> HttpRequest | None:
        """The next whole request, parsing what was received as far as needed; None when
        more bytes are needed or the reader has stopped (``upgrade``, or all answered)."""
        ready = self._ready
        while not ready:
            if self.stopped:
                if self.error is None:
                    return None
                status, reason = self.error
                self.error = None
                parser = self._parser
                return HttpRequest(
                    parser.get_method().decode("ascii", "replace") if parser and self._url else "",
                    self._url.decode("ascii", "replace"),
                    self._fields,
                    error=(status, reason),
                )
            pending, offset = self._pending, self._offset
            if offset >= len(pending):
                return None
            if offset == 0 and len(pending) <= SLICE:
                chunk: bytes | memoryview = pending
            else:
                chunk = memoryview(pending)[offset : offset + SLICE]
            self._offset = offset + len(chunk)
            self._feed(chunk)
        request = ready.popleft()
        if not ready and self.stopped and self.error is None:
            request.keep_alive = False  # the last request the parser read: closes
        return request

    def _feed(self, chunk: bytes | memoryview) -> None:
        self._began = False
        parser = self._parser
        if parser is None:
            parser = self._parser = httptools.HttpRequestParser(self)
        try:
            parser.feed_data(chunk)
        except httptools.HttpParserUpgrade:
            # A later request asking to upgrade (the first one stopped in its head):
            # answered as a plain request, the last on this connection.
            self._stop()
        except httptools.HttpParserError as exc:
            if not self.stopped:  # not a reason of ours, given already
                self._stop(400, str(exc) or "malformed HTTP request")
        if self._in_head and not self.stopped:
            # A head's bytes are counted by the whole feeds it spans after the one it began
            # in (where in a feed it begins is not known): a head of MAX_HEAD bytes always
            # passes, and a longer one is refused before it is 2 SLICEs longer.
            if not self._began:
                self._seen += len(chunk)
            if self._seen > MAX_HEAD:
                self._stop(431, f"request head larger than {MAX_HEAD} bytes")

    def _stop(self, status: int = 0, reason: str = "") -> None:
        self.stopped = True
        self._pending, self._offset = b"", 0
        if status:
            self.error = (status, reason)

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._fields = []
        self._length = 0
        self._in_head = True
        self._began = True
        self._seen = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if value and value[-1] in (9, 32):
            value = value.rstrip(b" \t")
        name = name.lower()
        if name == b"content-length":
            self._length = int(value)  # llhttp checked it: digits, and given once
        self._fields.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self.head is not None:
            if self._url.split(b"?", 1)[0] == b"/ws" or any(
                name == b"upgrade" for name, _ in self._fields
            ):
                self.upgrade = True
                self._stop()
                raise _Stopped
            self.head = None
        self._bound_body(self._length)

    def on_body(self, body: bytes) -> None:
        self._body += body
        self._bound_body(len(self._body))

    def _bound_body(self, size: int) -> None:
        """Refuse the request (413) and end the feed when its body, ``size`` bytes
        announced or read, is over ``max_size``."""
        limit = self.max_size
        if limit is not None and size > limit:
            self._stop(413, f"body larger than the max message size ({limit} bytes)")
            raise _Stopped

    def on_message_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        body = b""
        if self._body:
            body = bytes(self._body)
            self._body.clear()
        self._ready.append(
            HttpRequest(
                parser.get_method().decode("ascii"),
                self._url.decode("ascii", "replace"),
                self._fields,
                body,
            )
        )
        if not parser.should_keep_alive():
            self._stop()
            raise _Stopped


class _Stopped(Exception):
    """Raised in a parser callback to end the feed (the reader has stopped)."""


def response(
    status: int,
    server: str,
    headers: list[tuple[str, str]],
    body: bytes,
    *,
    head_only: bool = False,
    close: bool = False,
) -> bytes:
    """The bytes of a response: ``body`` (none for a HEAD request, with its length all the
    same) after the headers, ``Server``, ``Content-Length`` and, if ``close``,
    ``Connection: close``."""
    line = _STATUS_LINES.get(status) or f"HTTP/1.1 {status} \r\n".encode()
    server_line = _SERVER_LINES.get(server)
    if server_line is None:
        server_line = _SERVER_LINES[server] = f"Server: {server}\r\n".encode("latin-1")
    parts = [line, server_line]
    for name, value in headers:
        parts.append(f"{name}: {value}\r\n".encode("latin-1"))
    parts.append(b"Content-Length: %d\r\n" % len(body))
    parts.append(_CLOSE if close else b"\r\n")
    if body and not head_only:
        parts.append(body)
    return b"".join(parts)
