"""One TCP connection to the broker: HTTP handshake and WebSocket framing, no tasks.

websockets' sans-I/O ``ServerProtocol`` parses the HTTP request, builds the handshake
response and parses incoming frames (masking, fragmentation, size limit, UTF-8, ping,
pong and the closing handshake). This ``asyncio.Protocol`` feeds it bytes and hands what
comes out to a ``Handler`` (the server) synchronously, from ``data_received``: a
connection costs no task, no future and no per-frame wake-up, which is what keeps an idle
connection small and a small room cheap. Outgoing protocol frames (``Session``) are
written to ``transport`` directly: server frames are unmasked, so one encoded frame
serves every subscriber.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING, cast
from typing import Protocol as Interface

import h11
from websockets.datastructures import Headers
from websockets.extensions.base import ServerExtensionFactory
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

try:  # websockets' C helper, as its own parser uses; the pure-Python one otherwise
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover
    from websockets.utils import apply_mask

from broker.core.auth import Identity
from broker.server.logs import clip_utf8

if TYPE_CHECKING:
    from broker.server.session import Session

log = logging.getLogger("broker.server.connection")

_STATUSES = {int(status) for status in HTTPStatus}
#: Bytes a plain HTTP client may pipeline while its request is answered; past this, the
#: connection is not read until the answer is sent.
_MAX_QUEUED = 256 * 1024

#: Close code websockets uses for an abnormal closure (no close frame).
CLOSE_ABNORMAL = 1006
#: Close code for a text message that is not UTF-8.
CLOSE_INVALID_DATA = 1007
#: Longest close reason, in UTF-8 bytes: a close frame's payload is at most 125 bytes,
#: two of them the code (RFC 6455 5.5).
MAX_CLOSE_REASON = 123
#: Close code for an internal error; also for a peer that stopped answering pings, as
#: websockets uses it.
CLOSE_INTERNAL = 1011


class HttpRequest:
    """A whole plain HTTP request (not a WebSocket upgrade), as h11 parsed it; or, with
    ``error`` set, a request that could not be read (status, reason): the server answers
    it and the connection closes."""

    __slots__ = ("body", "error", "headers", "method", "path", "query", "target")

    def __init__(
        self,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes = b"",
        error: tuple[int, str] | None = None,
    ) -> None:
        self.method = method
        self.target = target
        self.path, _, self.query = target.partition("?")
        self.headers = headers
        self.body = body
        self.error = error

    def header(self, name: str) -> list[str]:
        """The values of header ``name`` (lower case), in order."""
        key = name.encode()
        return [value.decode("latin-1") for field, value in self.headers if field == key]


class _Http:
    """A connection's HTTP/1.1 state while it is not a WebSocket: the h11 parser, the
    raw bytes of the first request (handed to websockets if it is an upgrade), the
    request being read and whether one is being answered."""

    __slots__ = (
        "body",
        "busy",
        "closing",
        "head",
        "method",
        "parser",
        "paused",
        "queued",
        "request",
        "timeout",
    )

    def __init__(self, timeout: float) -> None:
        self.parser = h11.Connection(h11.SERVER)
        self.head: bytearray | None = bytearray()
        self.request: h11.Request | None = None
        self.method = b""
        self.body = bytearray()
        self.busy = False
        self.closing = False
        self.timeout = timeout
        # Bytes received while a request is being answered (pipelined), and whether
        # reading is paused because there are too many of them.
        self.queued = 0
        self.paused = False


def _is_upgrade(request: h11.Request) -> bool:
    """Whether websockets' handshake should take this (first) request: ``/ws``, or any
    request asking to upgrade (websockets answers those as before)."""
    if request.target.split(b"?", 1)[0] == b"/ws":
        return True
    return any(name == b"upgrade" for name, _ in request.headers)


class Handler(Interface):
    """What a ``Connection`` calls back into (the server)."""

    def http(self, conn: Connection, request: HttpRequest) -> None:
        """A plain HTTP request: answer it with ``conn.respond``, now or later."""

    def http_request(self, conn: Connection, request: Request) -> Response | None:
        """A plain HTTP response to send, None to accept the WebSocket upgrade, or
        ``DEFERRED``: the handler answers later with ``conn.answer_handshake``."""

    def accepted(self, conn: Connection) -> bool:
        """A TCP connection was accepted; False: drop it at once (a limit is reached)."""

    def opened(self, conn: Connection) -> None:
        """The WebSocket handshake completed."""

    def message(self, conn: Connection, data: str | bytes) -> None:
        """A complete text (str) or binary (bytes) message arrived."""

    def closed(self, conn: Connection) -> None:
        """The TCP connection is gone (called once, for every connection)."""


#: What ``Handler.http_request`` returns to answer the upgrade later (``answer_handshake``).
DEFERRED = Response(0, "deferred", Headers())


class Connection(asyncio.Protocol):
    """The server side of one TCP connection, from the HTTP request to the last byte."""

    __slots__ = (
        "_close_timer",
        "_direct",
        "_drain_waiter",
        "_fragments",
        "_fragments_text",
        "_partial",
        "_paused",
        "closed",
        "handler",
        "http",
        "identity",
        "last_seen",
        "loop",
        "peer",
        "protocol",
        "server_header",
        "session",
        "timer",
        "transport",
    )

    def __init__(
        self,
        handler: Handler,
        *,
        max_size: int | None,
        extensions: Sequence[ServerExtensionFactory] | None,
        server_header: str,
        open_timeout: float,
    ) -> None:
        self.handler = handler
        self.protocol = ServerProtocol(extensions=extensions, max_size=max_size)
        self.server_header = server_header
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        #: Set by the server: the identity from a bearer header, then the session.
        self.identity: Identity | None = None
        self.session: Session | None = None
        #: One timer at a time: the opening-handshake deadline, then the auth deadline.
        self.timer: asyncio.TimerHandle | None = self.loop.call_later(
            open_timeout, self._handshake_timeout
        )
        self.last_seen = self.loop.time()
        #: Resolved when the TCP connection is gone.
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self._close_timer: asyncio.TimerHandle | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        # A fragmented message being received: its payloads so far, and whether it is text.
        self._fragments: list[bytes] | None = None
        self._fragments_text = False
        # Frames parsed by _receive_direct rather than websockets, and a partial one.
        self._direct = False
        self._partial = bytearray()
        self._paused = False
        #: Plain HTTP/1.1 (h11) until the first request turns out to be a WebSocket
        #: upgrade; then None, so that a WebSocket keeps no HTTP state.
        self.http: _Http | None = _Http(open_timeout)

    def __repr__(self) -> str:
        return f"<Connection {self.peer} {self.protocol.state.name}>"

    # -- state -------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """The handshake is done and no close frame was sent or received."""
        return self.protocol.state is State.OPEN

    @property
    def close_code(self) -> int:
        """The close code received (1006 if none, or not closed yet)."""
        code = self.protocol.close_code
        return CLOSE_ABNORMAL if code is None else int(code)

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = f"{peer[0]}:{peer[1]}"
        if not self.handler.accepted(self):
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.last_seen = self.loop.time()
        if self._direct:
            self._receive_direct(data)
            return
        if self.http is not None:
            self._receive_http(data)
            return
        self._feed_protocol(data)

    def _feed_protocol(self, data: bytes) -> None:
        """Bytes for websockets' protocol; then maybe parse frames directly."""
        self._receive_protocol(data)
        # Past the handshake, and with nothing left half-parsed in websockets' reader,
        # read plain data frames ourselves (see _receive_direct).
        protocol = self.protocol
        self._direct = (
            protocol.state is State.OPEN
            and not protocol.extensions
            and not protocol.reader.buffer
            and self._fragments is None
        )

    def _receive_protocol(self, data: bytes) -> None:
        """Feed bytes to websockets' protocol and act on what it parsed."""
        protocol = self.protocol
        protocol.receive_data(data)
        events = protocol.events_received()
        self._write_protocol_data()
        try:
            for event in events:
                if isinstance(event, Frame):
                    self._frame(event)
                elif isinstance(event, Request):
                    self._handshake(event)
        except Exception:
            # The server answers failed requests itself; this is a bug in the shell.
            log.exception("internal error on the connection from %s", self.peer)
            self.fail(CLOSE_INTERNAL, "internal error")
            return
        if protocol.close_expected():
            self._expect_close()

    def _receive_direct(self, data: bytes) -> None:
        """Parse the frames in ``data``, after any partial frame kept from before.

        The common frame, a complete masked text or binary message within the size limit,
        is unmasked (websockets' C ``apply_mask``) and handed over here: websockets'
        generator-based parser costs several times more per frame, and a small room is
        mostly small frames. Every other frame (ping, pong, close, fragments) goes to
        websockets' protocol, whole and in order, so its rules and answers apply. A frame
        that is unmasked or over the size limit, and anything once the connection is no
        longer open, hands the rest of the stream to websockets for good: it fails the
        connection with the right code.
        """
        buffer: bytes | bytearray = data
        if self._partial:
            self._partial += data
            buffer = self._partial  # parsed in place; what was consumed is cut below
        max_size = self.protocol.max_message_size
        end = len(buffer)
        pos = 0
        try:
            while end - pos >= 2:
                if self.protocol.state is not State.OPEN:
                    self._direct = False
                    break
                head1 = buffer[pos]
                head2 = buffer[pos + 1]
                length = head2 & 0x7F
                start = pos + 6  # 2 header bytes and the 4-byte mask
                if length == 126:
                    if end - pos < 4:
                        break
                    length = int.from_bytes(buffer[pos + 2 : pos + 4], "big")
                    start += 2
                elif length == 127:
                    if end - pos < 10:
                        break
                    length = int.from_bytes(buffer[pos + 2 : pos + 10], "big")
                    start += 8
                if not head2 & 0x80 or (max_size is not None and length > max_size):
                    self._direct = False
                    break
                stop = start + length
                if stop > end:
                    break  # the rest of this frame is still on its way
                if (head1 == 0x81 or head1 == 0x82) and self._fragments is None:
                    payload = apply_mask(buffer[start:stop], buffer[start - 4 : start])
                    pos = stop
                    self._message(payload, head1 == 0x81)
                else:
                    frame, pos = bytes(buffer[pos:stop]), stop
                    self._receive_protocol(frame)
        except Exception:
            log.exception("internal error on the connection from %s", self.peer)
            self.fail(CLOSE_INTERNAL, "internal error")
            return
        if buffer is self._partial:
            del self._partial[:pos]
        elif pos < end:
            self._partial = bytearray(buffer[pos:])
        if not self._direct and self._partial:
            rest, self._partial = bytes(self._partial), bytearray()
            if self.transport is not None and not self.transport.is_closing():
                self._receive_protocol(rest)

    # -- plain HTTP (h11) ------------------------------------------------------------------

    def _receive_http(self, data: bytes) -> None:
        http = self.http
        assert http is not None
        if http.head is not None:
            http.head += data
        if http.busy:
            http.queued += len(data)
            if http.queued > _MAX_QUEUED and not http.paused and self.transport is not None:
                http.paused = True
                self.transport.pause_reading()
        try:
            http.parser.receive_data(data)
        except h11.RemoteProtocolError:
            self.abort()
            return
        self._http_events()

    def _http_events(self) -> None:
        """Act on what h11 parsed, until it needs more bytes or a request is being answered."""
        http = self.http
        while http is not None and not http.busy and not self.closed.done():
            try:
                event = http.parser.next_event()
            except h11.RemoteProtocolError as exc:
                self._http_failed(exc.error_status_hint, str(exc) or "malformed HTTP request")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                if http.head is not None:
                    raw, http.head = bytes(http.head), None
                    if _is_upgrade(event):
                        # websockets parses this request again and does the handshake.
                        self.http = None
                        self._feed_protocol(raw)
                        return
                http.request = event
                http.method = event.method
                http.body = bytearray()
                length = next((v for n, v in event.headers if n == b"content-length"), b"0")
                limit = self.protocol.max_message_size
                if limit is not None and int(length) > limit:
                    self._http_failed(413, f"body larger than the max message size ({limit} bytes)")
                    return
            elif isinstance(event, h11.Data):
                http.body += event.data
                limit = self.protocol.max_message_size
                if limit is not None and len(http.body) > limit:
                    self._http_failed(413, f"body larger than the max message size ({limit} bytes)")
                    return
            elif isinstance(event, h11.EndOfMessage):
                request, http.request = http.request, None
                assert request is not None
                if self.timer is not None:
                    self.timer.cancel()
                    self.timer = None
                http.busy = True
                body, http.body = bytes(http.body), bytearray()
                self.handler.http(
                    self,
                    HttpRequest(
                        request.method.decode("ascii", "replace"),
                        request.target.decode("ascii", "replace"),
                        list(request.headers),
                        body,
                    ),
                )
            elif isinstance(event, h11.ConnectionClosed):
                if self.transport is not None:
                    self.transport.close()
                return

    def _http_failed(self, status: int, reason: str) -> None:
        """A request that cannot be read: the server answers it, then the connection closes."""
        http = self.http
        assert http is not None
        http.head = None
        http.busy = True
        http.closing = True
        request = http.request
        method = request.method.decode("ascii", "replace") if request else ""
        target = request.target.decode("ascii", "replace") if request else ""
        headers = list(request.headers) if request else []
        self.handler.http(self, HttpRequest(method, target, headers, error=(status, reason)))

    def respond(
        self, status: int, headers: list[tuple[str, str]], body: bytes, *, close: bool = False
    ) -> None:
        """Send the response to the request being answered; then read the next one on
        this connection (keep-alive), or close it."""
        http = self.http
        transport = self.transport
        if http is None or transport is None or self.closed.done():
            return
        parser = http.parser
        close = close or http.closing
        fields = [("Server", self.server_header), *headers]
        head_only = http.method == b"HEAD"
        fields.append(("Content-Length", str(len(body))))
        if close:
            fields.append(("Connection", "close"))
        try:
            reason = HTTPStatus(status).phrase.encode() if status in _STATUSES else b""
            out = parser.send(h11.Response(status_code=status, headers=fields, reason=reason))
            if body and not head_only:
                out += parser.send(h11.Data(data=body))
            out += parser.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            log.exception("cannot send the HTTP response to %s", self.peer)
            self.abort()
            return
        transport.write(out)
        http.busy = False
        http.queued = 0
        if http.paused:
            http.paused = False
            transport.resume_reading()
        if close or parser.our_state is not h11.DONE or parser.their_state is not h11.DONE:
            # Closing, or the client is still sending a body we refused: end here.
            transport.close()
            return
        parser.start_next_cycle()
        # The next request (or an idle keep-alive connection) has the same time bound.
        self.timer = self.loop.call_later(http.timeout, self.abort)
        self._http_events()

    def close_http(self) -> None:
        """Close a plain HTTP connection: now when idle, after its response otherwise."""
        http = self.http
        if http is None:
            return
        if http.busy:
            http.closing = True
        elif self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool:
        if self.http is not None:
            # Half-closed after its request: keep the socket to send the response.
            self.http.closing = True
            return self.http.busy
        self.protocol.receive_eof()
        self._write_protocol_data()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.protocol.receive_eof()  # idempotent: the state is CLOSED from here on
        for timer in (self.timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        self.timer = self._close_timer = None
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(ConnectionResetError("connection lost"))
            self._drain_waiter.exception()  # nobody may be waiting any more
        self.closed.set_result(None)
        self.handler.closed(self)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # -- actions -----------------------------------------------------------------------

    async def drain(self) -> None:
        """Wait while the transport has paused writing (its buffer is over the high-water
        mark) until it resumes."""
        if self.closed.done():
            raise ConnectionResetError("connection lost")
        if not self._paused:
            return
        self._drain_waiter = self.loop.create_future()
        try:
            await self._drain_waiter
        finally:
            self._drain_waiter = None

    def close(self, code: int, reason: str = "", timeout: float = 2.0) -> None:
        """Start the closing handshake; drop the TCP connection if the peer has not
        finished it within ``timeout`` seconds. Does nothing if already closing."""
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(code, clip_utf8(reason, MAX_CLOSE_REASON))
            self._write_protocol_data()
            self._expect_close(timeout)
        elif self.protocol.state is State.CONNECTING:
            self.abort()

    def write(self, frame: bytes) -> None:
        """Write a ready-made WebSocket frame, if the connection is open."""
        if self.transport is not None and self.protocol.state is State.OPEN:
            self.transport.write(frame)

    def ping(self) -> None:
        """Send a keepalive ping (the pong, like any incoming byte, updates ``last_seen``)."""
        if self.protocol.state is State.OPEN:
            self.protocol.send_ping(b"")
            self._write_protocol_data()

    def fail(self, code: int, reason: str) -> None:
        """Close at once, without waiting for the peer (a dead or broken peer)."""
        if self.protocol.state is State.OPEN:
            self.protocol.fail(code, clip_utf8(reason, MAX_CLOSE_REASON))
            self._write_protocol_data()
        self.abort()

    def abort(self) -> None:
        """Drop the TCP connection now."""
        if self.transport is not None and not self.closed.done():
            self.transport.abort()

    # -- internals ---------------------------------------------------------------------

    def _handshake(self, request: Request) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        try:
            response = self.handler.http_request(self, request)
        except Exception:
            log.exception("handling the HTTP request failed")
            response = self.protocol.reject(500, "internal error\n")
        if response is DEFERRED:
            return  # the handler calls answer_handshake once it knows (a connect hook)
        self.answer_handshake(request, response)

    def answer_handshake(self, request: Request, response: Response | None) -> None:
        """Send the answer to the upgrade ``request``: ``response``, or the ``101`` when
        None; then the connection is open (``Handler.opened``) or closing."""
        if self.closed.done():
            return
        if response is None:
            response = self.protocol.accept(request)
        response.headers["Server"] = self.server_header
        self.protocol.send_response(response)
        self._write_protocol_data()
        # websockets' parser keeps the request in a local variable for the connection's
        # whole life; its headers are most of an idle connection's memory.
        request.headers.clear()
        if self.protocol.state is State.OPEN:
            self.handler.opened(self)
        else:
            self._expect_close()

    def _frame(self, frame: Frame) -> None:
        # Ping, pong and close are answered by the protocol itself; only data remains.
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                self._message(bytes(frame.data), opcode is Opcode.TEXT)
            else:
                self._fragments = [bytes(frame.data)]
                self._fragments_text = opcode is Opcode.TEXT
        elif opcode is Opcode.CONT and self._fragments is not None:
            self._fragments.append(bytes(frame.data))
            if frame.fin:
                payload, self._fragments = b"".join(self._fragments), None
                self._message(payload, self._fragments_text)

    def _message(self, payload: bytes, text: bool) -> None:
        if not text:
            self.handler.message(self, payload)
            return
        try:
            data = payload.decode()  # whole: a character may span fragments
        except UnicodeDecodeError:
            self.fail(CLOSE_INVALID_DATA, "invalid UTF-8 in a text message")
            return
        self.handler.message(self, data)

    def _write_protocol_data(self) -> None:
        transport = self.transport
        if transport is None or self.closed.done():
            return
        for data in self.protocol.data_to_send():
            if data:
                transport.write(data)
            elif transport.can_write_eof():
                with contextlib.suppress(Exception):  # uvloop: RuntimeError when closing
                    transport.write_eof()
            else:
                transport.close()  # TLS cannot half-close

    def _expect_close(self, timeout: float = 2.0) -> None:
        # The server closes TCP first once both close frames crossed (RFC 6455 7.1.1);
        # a peer that never answers is dropped after the timeout.
        if self.protocol.state is State.CLOSED and self.transport is not None:
            self.transport.close()
        elif self._close_timer is None:
            self._close_timer = self.loop.call_later(timeout, self.abort)

    def _handshake_timeout(self) -> None:
        self.timer = None
        if self.protocol.state is State.CONNECTING:
            self.abort()
