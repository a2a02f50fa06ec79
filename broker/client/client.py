"""The asyncio client library: connect, subscribe, publish, and survive reconnects.

    async with Client("ws://127.0.0.1:8765/ws", token) as client:
        await client.subscribe("scores/#")
        seq = await client.publish("scores/uk", {"home": 2, "away": 1})
        async for msg in client:
            print(msg.topic, msg.data)

One ``Client`` owns one WebSocket at a time and a background task that reads it. Requests
carry ids and many may be in flight at once (pipelining); replies are matched by id.

Reconnection. After a dropped connection, a broker restart (close ``1001``) or a
slow-consumer close (``4008``) the client reconnects by itself, trying its URLs in turn with
exponential backoff and full jitter, authenticates again (asking ``token_provider`` for a
fresh token when there is one) and re-subscribes every subscription with ``since`` = the
last seq it delivered for it and the ``epoch`` it was seen under. Messages are deduplicated
by seq, so a consumer sees every message exactly once across reconnects while the broker's
history still holds them; when it does not (the broker answers ``recovered: false``) the
client emits a ``Gap`` event and calls ``on_gap``.

Requests in flight when the connection drops:

* ``publish``: sent again on the next connection. Every publish carries an idempotency
  ``key`` (a fresh one unless the caller gives one), so a publish the broker did record
  before the connection dropped is answered with its first seq instead of being published
  twice (within the broker's ``--dedupe-window``, 2 minutes by default): ``publish``
  returns once, with the one seq. Only with ``reconnect=False`` does a publish in flight
  fail with ``ConnectionLost``.
* ``subscribe``, ``unsubscribe``, ``presence``, ``stats``: idempotent, sent again on the
  next connection; the caller just waits a little longer.

Giving up. A refused token (HTTP ``401``, ``error unauthorized``, close ``4001``) and an
expired one (close ``4003``) without a ``token_provider`` are final: pending calls, the
message iterator and every later call raise ``Unauthorized`` / ``TokenExpired``. Expiry is
known by its code, never by the words of a reason: close ``4003``, or an ``unauthorized``
refusal of a token whose own ``exp`` has passed by this machine's clock. So does a
lost connection with ``reconnect=False`` (``ConnectionLost``) or one that does not come back
within ``reconnect_timeout`` (``ConnectionFailed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Self

import jwt
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidStatus,
    InvalidURI,
    WebSocketException,
)
from websockets.uri import parse_uri

from broker.client.state import ClientState, Gap, SubState
from broker.core.backoff import Backoff
from broker.core.model import Message, User
from broker.core.protocol import (
    Auth,
    Presence,
    Pub,
    Request,
    Stats,
    Sub,
    Unsub,
    encode_request,
    parse_reply,
)
from broker.core.topics import validate_pattern, validate_topic
from broker.errors import (
    CLOSE_SLOW_CONSUMER,
    CLOSE_TOKEN_EXPIRED,
    CLOSE_TOO_BIG,
    CLOSE_UNAUTHORIZED,
    BadRequest,
    BrokerError,
    ConnectionFailed,
    ConnectionLost,
    Forbidden,
    RequestTimeout,
    TokenExpired,
    TooLarge,
    Unauthorized,
    error_for_code,
)

__all__ = [
    "Client",
    "Event",
    "Gap",
    "Message",
    "PresenceEvent",
    "PresenceUser",
    "Subscription",
    "TokenProvider",
    "User",
]

logger = logging.getLogger("broker.client")

#: A callable returning a token, plain or awaitable; called at every (re)connect and refresh.
TokenProvider = Callable[[], str | Awaitable[str]]


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    """A ``join`` or ``leave`` on a topic subscribed to with ``presence=True``."""

    kind: str  # "join" or "leave"
    topic: str
    user: User


#: What ``Client.events()`` yields.
Event = Message | PresenceEvent | Gap


@dataclass(frozen=True, slots=True)
class Subscription:
    """The broker's answer to ``subscribe``: latest ``seq``, history ``epoch``, ``recovered``."""

    pattern: str
    seq: int
    epoch: str
    recovered: bool


@dataclass(frozen=True, slots=True)
class PresenceUser:
    """One entry of a ``presence`` answer."""

    id: str
    name: str
    connections: int


@dataclass
class _Request:
    request: Request
    frame: str  # the encoded request, sent again as is on a new connection
    future: asyncio.Future[dict[str, Any]]
    retry: bool  # idempotent: send again on the next connection
    generation: int = -1  # the connection it was last written to
    written: bool = False
    on_reply: Callable[[dict[str, Any]], None] | None = None


class _End:
    """Queue sentinel: the client is closed or failed."""


_END = _End()


class _Fatal(Exception):
    """Internal: stop reconnecting and fail the client with ``error``."""

    def __init__(self, error: BrokerError) -> None:
        super().__init__(str(error))
        self.error = error


def _check_url(url: str) -> str:
    try:
        parse_uri(url)
    except InvalidURI as exc:
        raise ValueError(f"invalid broker URL {url!r}: {exc}") from None
    return url


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of ``token`` read without verifying it (None when absent or unreadable)."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    exp = claims.get("exp")
    return float(exp) if isinstance(exp, (int, float)) else None


def refused(message: str, token: str | None) -> Unauthorized:
    """The error for ``token`` refused as ``unauthorized`` with ``message``: the wire gives
    the same code to every refusal at authentication, so ``TokenExpired`` when the token's
    own ``exp`` has passed, whatever the message says."""
    exp = token_expiry(token) if token is not None else None
    if exp is not None and exp <= time.time():
        return TokenExpired(message)
    return Unauthorized(message)


class Client:
    """An asyncio connection to a broker that reconnects and resumes by itself.

    ``urls`` is one URL or a list tried in turn (cluster). Give either a ``token`` or a
    ``token_provider`` (called at every connect, and before the token expires to refresh it
    in place on the live connection, at ``refresh_at`` of its lifetime).

    Incoming messages wait in a queue of at most ``max_buffered`` until the iterator takes
    them. When it is full the client stops reading from the socket: replies to requests
    wait too, and if the consumer stays behind the broker eventually closes the connection
    as a slow consumer (4008); the client then resumes from the last message it queued, so
    nothing is lost while history holds it. ``on_gap`` is
    called when a resume could not recover everything, ``on_error`` with errors that answer
    no request (a refused ``ack=False`` publish, a resumed subscription refused), and
    ``on_state`` with ``"connected"``, ``"disconnected"`` (reconnecting) or ``"failed"``.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        token: str | None = None,
        *,
        token_provider: TokenProvider | None = None,
        ca_file: str | None = None,
        reconnect: bool = True,
        auth_header: bool = False,
        connect_timeout: float = 10.0,
        request_timeout: float | None = 30.0,
        reconnect_timeout: float | None = None,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        refresh_at: float = 0.8,
        dedupe_window: int = 100_000,
        max_buffered: int = 10_000,
        on_gap: Callable[[Gap], None] | None = None,
        on_error: Callable[[BrokerError], None] | None = None,
        on_state: Callable[[str], None] | None = None,
        anonymous: bool = False,
    ) -> None:
        url_list = [urls] if isinstance(urls, str) else list(urls)
        if not url_list:
            raise ValueError("at least one broker URL is needed")
        self.urls = [_check_url(u) for u in url_list]
        if token is None and token_provider is None and not anonymous:
            raise ValueError("a token or a token_provider is needed (or anonymous=True)")
        #: Connect without a token: read public topics only (docs/protocol.md).
        self.anonymous = anonymous
        self._token = token
        # The token last sent (at connect or in a refresh): what a refusal refuses.
        self._offered = token
        self._token_provider = token_provider
        self._ssl: ssl.SSLContext | None = None
        if ca_file is not None:
            self._ssl = ssl.create_default_context(cafile=ca_file)
        self.reconnect = reconnect
        self.auth_header = auth_header
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.reconnect_timeout = reconnect_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.refresh_at = refresh_at
        if max_buffered < 1:
            raise ValueError("max_buffered must be at least 1")
        self.max_buffered = max_buffered
        self.on_gap = on_gap
        self.on_error = on_error
        self.on_state = on_state

        #: The authenticated user, from ``hello``.
        self.user: User | None = None
        #: The broker's ``server`` string from ``hello`` (``broker/<version>``).
        self.server: str | None = None
        #: The URL of the current (or last) connection.
        self.url: str | None = None
        #: How many times the client has reconnected.
        self.reconnects = 0

        self._ws: ClientConnection | None = None
        self._generation = 0
        self._ready = asyncio.Event()
        self._next_id = 0
        self._pending: dict[int, _Request] = {}
        self._state = ClientState(dedupe_window)
        self._subs = self._state.subs
        self._events: asyncio.Queue[Event | _End] = asyncio.Queue()
        self._room = asyncio.Event()  # set while the queue has room (see _session)
        self._room.set()
        self._failure: BrokerError | None = None
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._url_index = 0

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the first connection (each URL tried once); ``ConnectionFailed`` if none answers."""
        if self._supervisor is not None:
            return
        errors: list[str] = []
        for _ in self.urls:
            try:
                ws = await self._open_next()
            except ConnectionFailed as exc:
                errors.append(exc.message)
                continue
            except _Fatal as exc:
                raise exc.error from None
            self._supervisor = asyncio.create_task(self._supervise(ws), name="broker-client")
            await self._ready_ws()
            return
        raise ConnectionFailed("; ".join(errors))

    async def close(self) -> None:
        """Close the connection; pending calls fail and iterators end."""
        if self._closing:
            return
        self._closing = True
        self._ready.clear()
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2)
        for task in (self._supervisor, self._refresher):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self._fail_pending(lambda req: ConnectionLost("the client was closed"), everything=True)
        self._events.put_nowait(_END)

    @property
    def epoch(self) -> str | None:
        """The broker's history epoch, from the latest ``sub`` answer."""
        return self._state.epoch

    @property
    def connected(self) -> bool:
        """True while a connection is open and authenticated."""
        return self._ready.is_set()

    @property
    def buffered(self) -> int:
        """Events received and not yet taken by an iterator (at most ``max_buffered``)."""
        return self._events.qsize()

    @property
    def subscriptions(self) -> list[str]:
        """The patterns this client is subscribed to (kept across reconnects)."""
        return list(self._subs)

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until a connection is open and authenticated (raises the final error if any)."""
        await self._ready_ws(timeout)

    # -- requests ------------------------------------------------------------------------

    async def subscribe(
        self,
        pattern: str,
        since: int | None = None,
        epoch: str | None = None,
        last: int | None = None,
        presence: bool = False,
        latest: bool = False,
    ) -> Subscription:
        """Subscribe to a topic or pattern, replaying history ``since`` a seq, the ``last``
        N, or the ``latest`` message of each matching topic."""
        validate_pattern(pattern)
        if sum((since is not None, last is not None, latest)) > 1:
            raise ValueError("since, last and latest are exclusive")
        for name, value in (("since", since), ("last", last)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative integer")
        state = SubState(pattern, presence, watermark=since, epoch=epoch, last=last, latest=latest)
        self._subs[pattern] = state
        try:
            reply = await self._request(
                lambda rid: state.request(rid),
                retry=True,
                on_reply=lambda r: self._apply_sub_reply(state, since, epoch, r, False),
            )
        except BaseException:
            if self._subs.get(pattern) is state:
                del self._subs[pattern]
            raise
        return Subscription(
            pattern,
            int(reply.get("seq", 0)),
            str(reply.get("epoch", "")),
            bool(reply.get("recovered", True)),
        )

    async def unsubscribe(self, pattern: str) -> None:
        """Drop the subscription to ``pattern`` (fine when there is none)."""
        self._subs.pop(pattern, None)
        await self._request(lambda rid: Unsub(rid, pattern), retry=True)

    async def publish(
        self,
        topic: str,
        data: Any,
        *,
        ack: bool = True,
        echo: bool = False,
        key: str | None = None,
    ) -> int | None:
        """Publish ``data`` (any JSON value) to ``topic``; its seq once recorded (None if
        not ``ack``).

        ``key`` (1 to 128 characters; a random one when not given) names this publish for
        the broker: a publish interrupted by a lost connection is sent again with the same
        key after reconnecting, and the broker records it once. Give your own key (an
        order id, say) to make retries of your own, across processes, safe as well."""
        validate_topic(topic)
        payload = orjson.dumps(data)
        key = uuid.uuid4().hex if key is None else key
        if not ack:
            await self._send_unacked(Pub(topic, payload, echo=echo, key=key))
            return None
        reply = await self._request(lambda rid: Pub(topic, payload, rid, echo, key), retry=True)
        # A key already used for a batch (HTTP API) answers with that batch's seqs.
        return int(reply["seq"] if "seq" in reply else reply["seqs"][0])

    async def presence(self, topic: str) -> list[PresenceUser]:
        """Who holds a subscription to exactly ``topic`` now."""
        reply = await self._request(lambda rid: Presence(rid, topic), retry=True)
        users = reply.get("users") or []
        return [
            PresenceUser(
                str(u.get("id", "")),
                str(u.get("name", "")),
                int(u.get("connections", 0)),
            )
            for u in users
            if isinstance(u, dict)
        ]

    async def stats(self) -> dict[str, Any]:
        """Server-wide figures (the token needs ``admin``)."""
        reply = await self._request(lambda rid: Stats(rid), retry=True)
        return {k: v for k, v in reply.items() if k not in ("op", "id")}

    async def refresh_token(self, token: str | None = None) -> float | None:
        """Replace the token on the live connection (from ``token_provider`` when not
        given); return its new ``exp``."""
        new = token if token is not None else await self._get_token()
        self._offered = new
        reply = await self._request(lambda rid: Auth(new, rid), retry=False)
        self._token = new
        exp = reply.get("exp")
        return float(exp) if isinstance(exp, (int, float)) else None

    # -- receiving -----------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Message]:
        return self.messages()

    async def messages(self) -> AsyncIterator[Message]:
        """Messages from every subscription, each once, until the client closes or fails."""
        async for event in self.events():
            if isinstance(event, Message):
                yield event

    async def events(self) -> AsyncIterator[Event]:
        """Messages plus presence ``join``/``leave`` and resume ``Gap`` events."""
        while True:
            item = await self._events.get()
            if not self._room.is_set() and self._events.qsize() <= self.max_buffered // 2:
                self._room.set()
            if isinstance(item, _End):
                self._events.put_nowait(item)  # let other iterators end too
                if self._failure is not None:
                    raise self._failure
                return
            yield item

    async def next_message(self, timeout: float | None = None) -> Message:
        """The next message (``RequestTimeout`` after ``timeout`` seconds)."""
        try:
            return await asyncio.wait_for(anext(self.messages()), timeout)
        except TimeoutError:
            raise RequestTimeout(f"no message within {timeout:g}s") from None
        except StopAsyncIteration:
            raise ConnectionLost("the client was closed") from None

    # -- internals: requests -------------------------------------------------------------

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closing:
            raise ConnectionLost("the client is closed")
        if self._supervisor is None:
            raise ConnectionFailed("not connected: use 'async with Client(...)' or connect()")

    async def _ready_ws(self, timeout: float | None = None) -> ClientConnection:
        while True:
            self._check_usable()
            if self._ready.is_set() and self._ws is not None:
                return self._ws
            waiter = asyncio.create_task(self._ready.wait())
            assert self._supervisor is not None
            done, _ = await asyncio.wait(
                {waiter, self._supervisor},
                timeout=timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if waiter not in done:
                waiter.cancel()
                if not done:
                    raise RequestTimeout(f"not connected to the broker within {timeout:g}s")

    async def _request(
        self,
        build: Callable[[int], Request],
        *,
        retry: bool,
        on_reply: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        rid = self._new_id()
        request = build(rid)
        op = type(request).__name__.lower()  # the request classes are named after their op
        frame = encode_request(request).decode()
        loop = asyncio.get_running_loop()
        req = _Request(request, frame, loop.create_future(), retry, on_reply=on_reply)
        deadline = None if self.request_timeout is None else loop.time() + self.request_timeout
        try:
            while not req.future.done():
                remaining = None if deadline is None else max(deadline - loop.time(), 0.001)
                ws = await self._ready_ws(remaining)
                generation = self._generation
                self._pending[rid] = req
                req.generation = generation
                try:
                    await ws.send(frame)
                except ConnectionClosed:
                    self._dropped(ws)
                    # Not written: safe to send again on the next connection.
                    if not retry:
                        self._pending.pop(rid, None)
                        continue
                    break  # the next session resends retryable requests
                req.written = True
                if generation != self._generation and not retry and not req.future.done():
                    # The connection dropped while we were writing: outcome unknown.
                    self._pending.pop(rid, None)
                    raise ConnectionLost(
                        f"connection lost before the broker answered this {op}; "
                        "it may or may not have been done"
                    )
                break
            remaining = None if deadline is None else max(deadline - loop.time(), 0.001)
            try:
                return await asyncio.wait_for(asyncio.shield(req.future), remaining)
            except TimeoutError:
                raise RequestTimeout(
                    f"no answer from the broker to {op} within {self.request_timeout:g}s"
                ) from None
        finally:
            self._pending.pop(rid, None)

    async def _send_unacked(self, request: Pub) -> None:
        data = encode_request(request).decode()
        while True:
            ws = await self._ready_ws(self.request_timeout)
            try:
                await ws.send(data)
                return
            except ConnectionClosed:
                self._dropped(ws)

    def _dropped(self, ws: ClientConnection) -> None:
        """Stop handing out ``ws`` as soon as a send finds it closed.

        The session task notices the close only on its next turn; until then
        ``_ready`` is still set, and a sender retrying at once would spin on the
        dead connection without ever yielding to the loop.
        """
        if self._ws is ws:
            self._ready.clear()

    def _refuse_oversized(self, reason: str) -> None:
        """After a 1009 close: the largest frame written was over the broker's size limit.

        The broker closes without reading it, so it recorded nothing; sending it again
        on the next connection would only be refused again, so it fails here instead."""
        written = [(rid, req) for rid, req in self._pending.items() if req.written]
        if not written:
            return
        rid, req = max(written, key=lambda item: len(item[1].frame))
        del self._pending[rid]
        if not req.future.done():
            req.future.set_exception(
                TooLarge(
                    "refused by the broker: over its message size limit "
                    f"({reason or 'close 1009'}); not recorded"
                )
            )
            req.future.exception()  # mark retrieved: the caller may be gone

    def _fail_pending(
        self, make_error: Callable[[_Request], BrokerError], *, everything: bool
    ) -> None:
        for rid, req in list(self._pending.items()):
            if everything or (req.written and not req.retry):
                del self._pending[rid]
                if not req.future.done():
                    req.future.set_exception(make_error(req))
                    req.future.exception()  # mark retrieved: the caller may be gone

    # -- internals: connections ----------------------------------------------------------

    async def _get_token(self) -> str | None:
        if self.anonymous:
            return None
        if self._token_provider is None:
            assert self._token is not None
            return self._token
        try:
            value = self._token_provider()
            if inspect.isawaitable(value):
                value = await value
        except Exception as exc:
            raise ConnectionFailed(f"token_provider failed: {exc!r}") from exc
        if not isinstance(value, str) or not value:
            raise _Fatal(Unauthorized("token_provider returned no token"))
        return value

    async def _open_next(self) -> ClientConnection:
        """Connect and authenticate to the next URL; ``ConnectionFailed`` or ``_Fatal``."""
        url = self.urls[self._url_index % len(self.urls)]
        self._url_index += 1
        token = await self._get_token()
        self._offered = token
        headers = {"Authorization": f"Bearer {token}"} if self.auth_header and token else None
        options: dict[str, Any] = {}
        if self._ssl is not None and url.startswith("wss:"):
            options["ssl"] = self._ssl  # else the system's default trust store
        try:
            ws = await connect(
                url,
                additional_headers=headers,
                open_timeout=self.connect_timeout,
                max_size=None,
                compression=None,
                close_timeout=2,
                **options,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            body = exc.response.body.decode("utf-8", "replace").strip() if exc.response.body else ""
            if status == 401:
                raise _Fatal(refused(body or "token refused", token)) from None
            if status == 403:
                raise _Fatal(Forbidden(body or "connection refused (HTTP 403)")) from None
            raise ConnectionFailed(f"{url}: HTTP {status} {body}".strip()) from None
        except (TimeoutError, OSError, WebSocketException) as exc:
            reason = str(exc) or type(exc).__name__
            if isinstance(exc, asyncio.TimeoutError):
                reason = f"no answer within {self.connect_timeout:g}s"
            raise ConnectionFailed(f"cannot connect to {url}: {reason}") from None
        try:
            if not self.auth_header or token is None:
                await ws.send(encode_request(Auth(token)).decode())
            raw = await asyncio.wait_for(ws.recv(), self.connect_timeout)
            frame = parse_reply(raw)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else None
            if code == CLOSE_UNAUTHORIZED:
                raise _Fatal(refused(exc.rcvd.reason if exc.rcvd else "", token)) from None
            raise ConnectionFailed(f"{url}: connection closed during authentication") from None
        except (TimeoutError, BadRequest):
            await ws.close()
            raise ConnectionFailed(f"{url}: no hello from the broker") from None
        if frame.get("op") == "error":
            await ws.close()
            message = str(frame.get("message", "refused"))
            if frame.get("code") == "unauthorized":
                raise _Fatal(refused(message, token))
            raise ConnectionFailed(f"{url}: {message}")
        if frame.get("op") != "hello":
            await ws.close()
            raise ConnectionFailed(f"{url}: expected hello, got {frame.get('op')!r}")
        self.user = User.from_json(frame.get("user"))
        self.server = str(frame.get("server", ""))
        self.url = url
        self._token = token
        return ws

    async def _reopen(self) -> ClientConnection:
        """Reconnect with backoff and jitter until it works, times out or is refused."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        backoff = Backoff(self.backoff_initial, self.backoff_max)
        last_error = "connection lost"
        while True:
            if (
                self.reconnect_timeout is not None
                and loop.time() - started > self.reconnect_timeout
            ):
                raise _Fatal(
                    ConnectionFailed(
                        f"could not reconnect within {self.reconnect_timeout:g}s: {last_error}"
                    )
                )
            await asyncio.sleep(backoff.next())
            try:
                return await self._open_next()
            except ConnectionFailed as exc:
                last_error = exc.message
                logger.debug("reconnect attempt %d failed: %s", backoff.attempts, exc.message)

    def _set_state(self, state: str) -> None:
        if self.on_state is not None:
            try:
                self.on_state(state)
            except Exception:  # a callback must not kill the connection
                logger.exception("on_state callback failed")

    async def _supervise(self, ws: ClientConnection) -> None:
        try:
            while True:
                close_error = await self._session(ws)
                if self._closing:
                    return
                if isinstance(close_error, _Fatal):
                    raise close_error
                if not self.reconnect:
                    raise _Fatal(close_error)
                self._set_state("disconnected")
                ws = await self._reopen()
                self.reconnects += 1
        except _Fatal as exc:
            self._fail(exc.error)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: fail loudly rather than hang
            logger.exception("broker client crashed")
            self._fail(BrokerError(f"client error: {exc!r}"))

    def _fail(self, error: BrokerError) -> None:
        self._failure = error
        self._ready.clear()
        self._fail_pending(lambda req: error, everything=True)
        self._events.put_nowait(_END)
        self._set_state("failed")

    async def _session(self, ws: ClientConnection) -> BrokerError | _Fatal:
        """Run one connection until it closes; return why it closed."""
        self._ws = ws
        self._generation += 1
        generation = self._generation
        await self._resume(ws, generation)
        self._ready.set()
        self._set_state("connected")
        self._schedule_refresh()
        last_auth_error: str | None = None
        try:
            async for raw in ws:
                frame = parse_reply(raw)
                if frame.get("op") == "error" and frame.get("code") == "unauthorized":
                    last_auth_error = str(frame.get("message", ""))
                try:
                    self._dispatch(frame)
                except (TypeError, ValueError, KeyError) as exc:
                    logger.warning("ignored a malformed frame from the broker (%s): %r", exc, frame)
                if self._events.qsize() >= self.max_buffered:
                    # Backpressure: read nothing more until the consumer catches up.
                    self._room.clear()
                    await self._room.wait()
        except ConnectionClosed:
            pass
        except BadRequest:
            await ws.close()
        finally:
            self._ready.clear()
            self._generation += 1  # requests written from now on went nowhere
            if self._refresher is not None:
                self._refresher.cancel()
                self._refresher = None
        code = ws.close_code
        reason = ws.close_reason or ""
        lost = ConnectionLost(
            f"connection to {self.url} lost (close {code}{': ' + reason if reason else ''}) "
            "before the broker answered; the publish may or may not have been recorded"
        )
        self._fail_pending(lambda req: lost, everything=False)
        if code == CLOSE_TOO_BIG:
            self._refuse_oversized(reason)
        if code == CLOSE_UNAUTHORIZED:
            return _Fatal(refused(last_auth_error or reason or "token refused", self._offered))
        if code == CLOSE_TOKEN_EXPIRED and self._token_provider is None:
            return _Fatal(TokenExpired(reason or "token expired"))
        if code == CLOSE_SLOW_CONSUMER:
            logger.warning("closed by the broker as a slow consumer; resuming")
        return ConnectionLost(f"connection to {self.url} lost (close {code})")

    async def _resume(self, ws: ClientConnection, generation: int) -> None:
        """Re-subscribe confirmed subscriptions and resend retryable requests."""
        loop = asyncio.get_running_loop()
        frames: list[str] = []
        for state in self._subs.values():
            if not state.confirmed:
                continue
            rid = self._new_id()
            request = state.request(rid)
            frame = encode_request(request).decode()
            req = _Request(request, frame, loop.create_future(), retry=True, generation=generation)
            since, epoch = request.since, request.epoch
            req.on_reply = lambda r, s=state, a=since, e=epoch: self._apply_sub_reply(
                s, a, e, r, True
            )
            req.future.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
            self._pending[rid] = req
            frames.append(frame)
        for req in list(self._pending.values()):
            if req.retry and req.generation != generation:
                req.generation = generation
                frames.append(req.frame)
        try:
            for frame in frames:
                await ws.send(frame)
        except ConnectionClosed:
            pass  # the session's read loop sees the close at once

    def _schedule_refresh(self) -> None:
        if self._token_provider is None or self._token is None:
            return
        exp = token_expiry(self._token)
        if exp is None:
            return
        lifetime = exp - time.time()
        if lifetime <= 1:
            return  # nothing to gain; the broker closes with 4003 and we reconnect
        delay = max(lifetime * self.refresh_at, 0.5)
        self._refresher = asyncio.create_task(self._refresh_after(delay), name="broker-refresh")

    async def _refresh_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await self.refresh_token()
        except _Fatal as exc:
            self._report_error(exc.error)
        except BrokerError as exc:
            self._report_error(exc)
        except Exception as exc:  # noqa: BLE001 - the user's token_provider failed
            self._report_error(Unauthorized(f"token refresh failed: {exc!r}"))
        else:
            self._refresher = None
            self._schedule_refresh()

    # -- internals: incoming frames ------------------------------------------------------

    def _dispatch(self, frame: dict[str, Any]) -> None:
        op = frame.get("op")
        if op == "msg":
            self._on_msg(frame)
        elif op in ("ok", "error"):
            rid = frame.get("id")
            req = self._pending.pop(rid, None) if isinstance(rid, int) else None
            if req is None:
                if op == "error":
                    self._report_error(
                        error_for_code(str(frame.get("code")), str(frame.get("message", "")))
                    )
                return
            if op == "ok":
                if req.on_reply is not None:
                    req.on_reply(frame)
                if not req.future.done():
                    req.future.set_result(frame)
            else:
                code = str(frame.get("code"))
                message = str(frame.get("message", ""))
                err = (
                    refused(message, self._offered)
                    if code == "unauthorized"
                    else error_for_code(code, message, rid)
                )
                err.request_id = rid
                if isinstance(req.request, Sub) and self._state.refused(req.request.topic):
                    self._report_error(err)
                if not req.future.done():
                    req.future.set_exception(err)
        elif op in ("join", "leave"):
            self._events.put_nowait(
                PresenceEvent(
                    str(op),
                    str(frame.get("topic", "")),
                    User.from_json(frame.get("user")),
                )
            )

    def _report_error(self, error: BrokerError) -> None:
        if self.on_error is not None:
            try:
                self.on_error(error)
            except Exception:
                logger.exception("on_error callback failed")
        else:
            logger.warning("broker error: %s: %s", error.code, error.message)

    def _on_msg(self, frame: dict[str, Any]) -> None:
        message = self._state.on_msg(frame)
        if message is not None:
            self._events.put_nowait(message)

    def _apply_sub_reply(
        self,
        state: SubState,
        since: int | None,
        epoch: str | None,
        reply: dict[str, Any],
        resumed: bool,
    ) -> None:
        """Update a subscription from its ``ok``; report a resume that lost messages."""
        gap = self._state.apply_sub_reply(state, since, epoch, reply, resumed)
        if gap is None:
            return
        self._events.put_nowait(gap)
        if self.on_gap is None:
            logger.warning("%s", gap.describe())
            return
        try:
            self.on_gap(gap)
        except Exception:
            logger.exception("on_gap callback failed")
