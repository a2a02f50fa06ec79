"""One TCP connection to the broker: plain HTTP, the WebSocket handshake and frames, no tasks.

A WebSocket upgrade whose head arrives whole in the first read, well-formed and asking
for nothing to negotiate (nearly every client), is parsed once and answered by
``broker.server.handshake`` (the checks, the 101 from a template). Everything else goes
the general way: ``broker.server.http11`` reads plain HTTP requests (httptools) and writes
their responses, and websockets' sans-I/O ``ServerProtocol``
answers other upgrades and every refused handshake (validation, extension negotiation,
the response), created only for them and dropped once the handshake is done.
From then on the core's frame codec (``broker.core.frames``) parses incoming frames
(masking, fragments, size limit, control frames) and this class runs the rest of RFC
6455: UTF-8 of text messages, pongs, and the closing handshake. What comes out goes to a
``Handler`` (the server) synchronously, from ``data_received``: a connection costs no
task, no future and no per-frame wake-up, which is what keeps an idle connection small
and a small room cheap. Outgoing protocol frames (``Session``) are written to
``transport`` directly: server frames are unmasked, so one encoded frame serves every
subscriber.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast
from typing import Protocol as Interface

from websockets.datastructures import Headers
from websockets.extensions.base import ServerExtensionFactory
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

from broker.core import frames
from broker.core.auth import Identity
from broker.core.frames import (
    BINARY,
    CLOSE,
    CLOSE_ABNORMAL,
    CLOSE_INVALID_DATA,
    PING,
    PONG,
    TEXT,
    FrameError,
    Masker,
    Parser,
    close_payload,
    encode,
    parse_close,
)
from broker.server import http11
from broker.server.handshake import ResponseTemplate, parse_upgrade, upgrade_ok
from broker.server.http11 import HttpRequest, RequestReader

if TYPE_CHECKING:
    from broker.server.session import Session

log = logging.getLogger("broker.server.connection")

#: Bytes a plain HTTP client may pipeline while its request is answered; past this, the
#: connection is not read until the answer is sent.
_MAX_QUEUED = 256 * 1024
#: Bytes of answers not yet sent to a plain HTTP client past which its next pipelined
#: request waits until they drain: a client that never reads holds this much, not more.
_MAX_UNSENT = 1024 * 1024
#: Close code for the server's own failures (a bug, a peer that stopped answering pings).
CLOSE_INTERNAL = frames.CLOSE_INTERNAL

# A connection's WebSocket states (RFC 6455 4 and 7): the handshake (or plain HTTP), open,
# a close frame sent and the peer's awaited, closed.
_CONNECTING, _OPEN, _CLOSING, _CLOSED = 0, 1, 2, 3
_STATE_NAMES = ("CONNECTING", "OPEN", "CLOSING", "CLOSED")
_PING = encode(b"", PING)


def _fast_mask() -> Masker:
    """websockets' C helper, which unmasks several times faster than the codec's pure
    Python; the codec's own where it is missing."""
    try:
        from websockets.speedups import apply_mask
    except ImportError:  # pragma: no cover
        return frames.apply_mask
    return apply_mask


_APPLY_MASK = _fast_mask()
#: One 101 template per ``Server`` header (one per server).
_TEMPLATES: dict[str, ResponseTemplate] = {}


class _Http:
    """A connection's HTTP/1.1 state while it is not a WebSocket: its requests' reader,
    and the request being answered."""

    __slots__ = (
        "busy",
        "closing",
        "draining",
        "eof",
        "head_only",
        "looping",
        "paused",
        "reader",
        "streaming",
        "timeout",
    )

    def __init__(self, timeout: float, max_size: int | None) -> None:
        self.reader = RequestReader(max_size)
        #: A request is being answered.
        self.busy = False
        #: The connection closes after the answer being sent.
        self.closing = False
        #: The request being answered is a HEAD: its response has no body.
        self.head_only = False
        #: Answered, and waiting until the answers not yet sent drain.
        self.draining = False
        #: The client half-closed (EOF read).
        self.eof = False
        #: The response is a server-sent event stream, ended only by the close.
        self.streaming = False
        self.timeout = timeout
        #: Reading is paused: too many bytes received and not yet parsed, or too many of
        #: the answers not yet sent.
        self.paused = False
        # True while ``_http_events`` runs: an answer given meanwhile does not start
        # another loop (pipelined requests are a loop, never a recursion).
        self.looping = False


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
        "_close_code",
        "_close_timer",
        "_drain_waiter",
        "_extensions",
        "_parser",
        "_paused",
        "_protocol",
        "_state",
        "closed",
        "handler",
        "http",
        "identity",
        "last_seen",
        "loop",
        "max_size",
        "peer",
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
        #: Bound on a WebSocket message and on an HTTP request body, in bytes.
        self.max_size = max_size
        self._extensions = extensions
        # websockets' handshake, for the requests the fast path leaves to it (``protocol``).
        self._protocol: ServerProtocol | None = None
        self._state = _CONNECTING
        self._close_code = CLOSE_ABNORMAL
        #: The frame parser, from the handshake's completion until a protocol error.
        self._parser: Parser | None = None
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
        self._paused = False
        #: Plain HTTP/1.1 until the first request turns out to be a WebSocket upgrade;
        #: then None, so that a WebSocket keeps no HTTP state.
        self.http: _Http | None = _Http(open_timeout, max_size)

    def __repr__(self) -> str:
        return f"<Connection {self.peer} {_STATE_NAMES[self._state]}>"

    # -- state -------------------------------------------------------------------------

    @property
    def protocol(self) -> ServerProtocol:
        """websockets' opening handshake (and its ``reject`` for HTTP answers), made on
        first use: an upgrade the fast path accepts never needs one."""
        if self._protocol is None:
            self._protocol = ServerProtocol(extensions=self._extensions, max_size=self.max_size)
        return self._protocol

    @property
    def is_open(self) -> bool:
        """The handshake is done and no close frame was sent or received."""
        return self._state == _OPEN

    @property
    def close_code(self) -> int:
        """The close code received (1005 for a close frame without one; 1006 if none)."""
        return self._close_code

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
        if self._parser is not None:
            self._receive_frames(data)
        elif self.http is not None:
            if self.http.streaming:
                # A stream's client sends nothing after its request: bytes now mean it is
                # not a stream reader (or is gone); the stream ends.
                self.abort()
                return
            self._receive_http(data)
        # Otherwise a refused handshake or a failed connection: nothing more is read.

    def _receive_frames(self, data: bytes) -> None:
        """Act on the messages and control frames in ``data`` (after any partial frame
        kept from before), in order. Once a close frame is sent, only the peer's close
        frame still matters."""
        parser = self._parser
        assert parser is not None
        try:
            for opcode, payload in parser.feed(data):
                if self._state != _OPEN:
                    if opcode == CLOSE:
                        self._close_received(payload)
                elif opcode == TEXT:
                    try:
                        text = payload.decode()  # whole: a character may span fragments
                    except UnicodeDecodeError:
                        self._fail_frames(CLOSE_INVALID_DATA, "invalid UTF-8 in a text message")
                        return
                    self.handler.message(self, text)
                elif opcode == BINARY:
                    self.handler.message(self, payload)
                elif opcode == PING:
                    self._send(encode(payload, PONG))
                elif opcode == CLOSE:
                    self._close_received(payload)
                # A pong needs nothing: like any byte received, it updated last_seen.
        except FrameError as exc:
            self._fail_frames(exc.code, exc.reason)
        except Exception:
            log.exception("internal error on the connection from %s", self.peer)
            self.fail(CLOSE_INTERNAL, "internal error")

    def _fast_upgrade(self, data: bytes) -> bool:
        """Accept or refuse the upgrade whose head is all in ``data`` (the first read),
        then read the frames after it; False (nothing done) when the general path must
        read the request (``handshake.parse_upgrade``)."""
        end = data.find(b"\r\n\r\n") + 4
        if end < 4:
            return False
        request = parse_upgrade(data[:end], bool(self._extensions))
        if request is None:
            return False
        accept = upgrade_ok(request.headers)
        if accept is None:
            return False
        self.http = None
        try:
            deferred = self._handshake(request, accept)
        except Exception:
            log.exception("internal error on the connection from %s", self.peer)
            self.abort()
            return True
        if deferred:
            return True  # answered later (answer_handshake); no frame comes before the 101
        if self._parser is None:
            self._expect_close()
        elif end < len(data):
            self._receive_frames(data[end:])
        return True

    def _upgrade(self, raw: bytes) -> None:
        """The first request asks for a WebSocket: websockets answers its head; what
        came after it is the first frames."""
        end = raw.find(b"\r\n\r\n")
        end = len(raw) if end < 0 else end + 4
        protocol = self.protocol
        protocol.receive_data(raw[:end])
        events = protocol.events_received()
        self._write_protocol_data()  # a request websockets could not parse: its 400
        deferred = False
        try:
            for event in events:
                if isinstance(event, Request):
                    deferred = self._handshake(event)
        except Exception:
            # The server answers failed requests itself; this is a bug in the shell.
            log.exception("internal error on the connection from %s", self.peer)
            self.abort()
            return
        if deferred:
            # Answered later (answer_handshake); a client sends no frame before the 101.
            return
        if self._parser is None:
            self._expect_close()  # refused: websockets sent its response, then EOF
        elif end < len(raw):
            self._receive_frames(raw[end:])

    # -- plain HTTP -------------------------------------------------------------------------

    def _receive_http(self, data: bytes) -> None:
        http = self.http
        assert http is not None
        reader = http.reader
        if reader.fresh and data.startswith(b"GET /ws") and self._fast_upgrade(data):
            return
        reader.receive(data)
        if reader.buffered() > _MAX_QUEUED and not http.paused and self.transport is not None:
            # A client pipelining faster than it is answered: read no more until the
            # requests received are answered.
            http.paused = True
            self.transport.pause_reading()
        self._http_events()

    def _http_events(self) -> None:
        """Handle the requests received, until more bytes are needed or a request is
        being answered.

        Pipelined requests answered at once are handled by this loop, one after another:
        ``respond`` does not call back in while it runs."""
        http = self.http
        if http is None or http.looping:
            return
        http.looping = True
        try:
            self._http_loop(http)
        finally:
            http.looping = False

    def _http_loop(self, http: _Http) -> None:
        reader = http.reader
        while self.http is http and not http.busy and not self.closed.done():
            request = reader.next_request()
            if request is None:
                if reader.upgrade:
                    # websockets parses this request again and does the handshake.
                    self.http = None
                    head = reader.head
                    self._upgrade(bytes(head) if head is not None else b"")
                    return
                if http.paused and self.transport is not None:
                    http.paused = False
                    self.transport.resume_reading()
                return
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            http.busy = True
            http.head_only = request.method == "HEAD"
            if not request.keep_alive:
                http.closing = True
            self.handler.http(self, request)

    def respond(
        self, status: int, headers: list[tuple[str, str]], body: bytes, *, close: bool = False
    ) -> None:
        """Send the response to the request being answered; then read the next one on
        this connection (keep-alive), or close it."""
        http = self.http
        transport = self.transport
        if http is None or transport is None or self.closed.done():
            return
        close = close or http.closing
        transport.write(
            http11.response(
                status, self.server_header, headers, body, head_only=http.head_only, close=close
            )
        )
        if close:
            transport.close()
            return
        # The next request (or an idle keep-alive connection) has the same time bound.
        self.timer = self.loop.call_later(http.timeout, self.abort)
        if transport.get_write_buffer_size() > _MAX_UNSENT:
            # A client that does not read its answers: stay busy (not reading, the next
            # request not parsed) until they drain (``resume_writing``).
            http.draining = True
            if not http.paused:
                http.paused = True
                transport.pause_reading()
            return
        self._http_next()

    def _http_next(self) -> None:
        """The answer is out: handle the next pipelined request, if any."""
        http = self.http
        transport = self.transport
        if http is None or transport is None:
            return
        http.busy = False
        http.draining = False
        if http.paused and http.reader.buffered() <= _MAX_QUEUED:
            http.paused = False
            transport.resume_reading()
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

    def start_stream(self) -> bool:
        """The answer being sent is a stream, written as it is until the connection
        closes; False (and the connection closed) when the client already half-closed,
        for a stream has no end it could still be waiting to read."""
        http = self.http
        if http is None or self.transport is None or self.closed.done():
            return False
        if http.eof:
            self.transport.close()
            return False
        http.streaming = True
        return True

    def eof_received(self) -> bool:
        http = self.http
        if http is not None:
            http.eof = True
            if http.streaming:
                # A stream's client never sends anything after its request, so EOF means
                # it has gone: end the stream now, not at the next comment line's error.
                return False
            # Half-closed after its request: keep the socket to send the response.
            http.closing = True
            return http.busy
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._state = _CLOSED
        self._parser = None
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
        http = self.http
        if (
            http is not None
            and http.draining
            and self.transport is not None
            and self.transport.get_write_buffer_size() <= _MAX_UNSENT
        ):
            self._http_next()
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
        if self._state == _OPEN:
            self._send(encode(close_payload(code, reason), CLOSE))
            self._state = _CLOSING
            self._expect_close(timeout)
        elif self._state == _CONNECTING:
            self.abort()

    def write(self, frame: bytes) -> None:
        """Write a ready-made WebSocket frame, if the connection is open."""
        if self.transport is not None and self._state == _OPEN:
            self.transport.write(frame)

    def ping(self) -> None:
        """Send a keepalive ping (the pong, like any incoming byte, updates ``last_seen``)."""
        self.write(_PING)

    def fail(self, code: int, reason: str) -> None:
        """Close at once, without waiting for the peer (a dead or broken peer)."""
        if self._state == _OPEN:
            self._send(encode(close_payload(code, reason), CLOSE))
            self._state = _CLOSING
        self.abort()

    def abort(self) -> None:
        """Drop the TCP connection now."""
        if self.transport is not None and not self.closed.done():
            self.transport.abort()

    # -- internals ---------------------------------------------------------------------

    def _handshake(self, request: Request, accept: str | None = None) -> bool:
        """Answer an upgrade request now, or later: True when the handler answers it later
        (``DEFERRED``, a connect hook) with ``answer_handshake``. ``accept`` is the key the
        fast path computed for a request it checked."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        try:
            response = self.handler.http_request(self, request)
        except Exception:
            log.exception("handling the HTTP request failed")
            response = self.protocol.reject(500, "internal error\n")
        if response is DEFERRED:
            return True
        self.answer_handshake(request, response, accept)
        return False

    def answer_handshake(
        self, request: Request, response: Response | None, accept: str | None = None
    ) -> None:
        """Send the answer to the upgrade ``request``: ``response``, or the ``101`` when
        None (from the template when the fast path checked the request and found its
        ``accept`` key, from websockets otherwise); then the connection is open
        (``Handler.opened``) or closing."""
        if self.closed.done():
            return
        deflate = False
        if response is None and accept is not None:
            template = _TEMPLATES.get(self.server_header)
            if template is None:
                template = _TEMPLATES[self.server_header] = ResponseTemplate(self.server_header)
            if self.transport is not None:
                self.transport.write(template.accept(accept))
        else:
            if response is not None:
                self._expect_close()  # refused: the response, then EOF
            if response is None:
                response = self.protocol.accept(request)
            response.headers["Server"] = self.server_header
            self.protocol.send_response(response)
            self._write_protocol_data()
            if response.status_code != 101:
                self._protocol = None
                return
            # permessage-deflate, the one extension offered, was negotiated.
            deflate = "Sec-WebSocket-Extensions" in response.headers
        # websockets' parser keeps the request for as long as it lives: drop both.
        self._protocol = None
        self._state = _OPEN
        self._parser = Parser(
            masked=True,
            max_size=self.max_size,
            deflate=deflate,
            apply_mask=_APPLY_MASK,
        )
        self.handler.opened(self)

    def _send(self, frame: bytes) -> None:
        """Write a frame of the protocol's own (pong, close) whatever the state."""
        if self.transport is not None and not self.closed.done():
            self.transport.write(frame)

    def _close_received(self, payload: bytes) -> None:
        """The peer's close frame (valid: the parser checked it). Echo it if it opens the
        closing handshake; either way both close frames have now crossed, and the
        server closes TCP first (RFC 6455 7.1.1)."""
        if self._state == _CLOSED:
            return
        self._close_code = parse_close(payload)[0]
        if self._state == _OPEN:
            self._send(encode(payload, CLOSE))
        self._state = _CLOSED
        if self.transport is not None:
            self.transport.close()

    def _fail_frames(self, code: int, reason: str) -> None:
        """The peer broke the framing rules (or sent text that is not UTF-8): send the
        close frame with ``code``, read nothing more, and half-close, so that the close
        frame reaches the peer before TCP ends; a peer that does not close in time is
        dropped."""
        log.debug("closing the connection from %s: %s (%d)", self.peer, reason, code)
        if self._state == _OPEN:
            self._send(encode(close_payload(code, reason), CLOSE))
        self._state = _CLOSING
        self._parser = None
        transport = self.transport
        if transport is not None and not self.closed.done():
            if transport.can_write_eof():
                with contextlib.suppress(Exception):  # uvloop: RuntimeError when closing
                    transport.write_eof()
            else:
                transport.close()  # TLS cannot half-close
        self._expect_close()

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
        if self._state == _CLOSED and self.transport is not None:
            self.transport.close()
        elif self._close_timer is None:
            self._close_timer = self.loop.call_later(timeout, self.abort)

    def _handshake_timeout(self) -> None:
        self.timer = None
        if self._state == _CONNECTING:
            self.abort()
