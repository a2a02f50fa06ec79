"""The broker server: a thin asyncio shell around the protocol core.

``BrokerServer`` owns the store, the journal (group commit) and the hub (subscriptions,
presence, fan-out): it runs the server's lifecycle, authenticates connections and
dispatches their frames. Around it: ``connection`` (bytes, HTTP parsing, WebSocket
framing), ``http`` and ``api`` (the plain HTTP paths and the HTTP API), ``admission`` and
``backpressure`` (limits), ``replay`` (serving a ``sub`` from history). Requests are handled
synchronously as they arrive; only those that wait on the store or the cluster (``sub``,
``presence``, ``stats``) run as a task, while later frames of that connection wait.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, cast

from websockets.extensions.permessage_deflate import enable_server_permessage_deflate
from websockets.http11 import Request, Response

from broker import __version__
from broker.core.auth import Identity, TokenVerifier, parse_bearer
from broker.core.hooks import CONNECT_HEADERS
from broker.core.hub import Hub
from broker.core.model import Draft, Message, now_ms, text_frame
from broker.core.namespaces import Namespaces
from broker.core.protocol import (
    Auth,
    Presence,
    Pub,
    Stats,
    Sub,
    Unsub,
    encode_ack,
    encode_error,
    encode_hello,
    encode_ok,
    parse_request,
)
from broker.core.protocol import Request as Frame
from broker.core.sse import StreamRequest, parse_stream
from broker.errors import (
    CLOSE_GOING_AWAY,
    CLOSE_SLOW_CONSUMER,
    CLOSE_TOKEN_EXPIRED,
    CLOSE_TRY_AGAIN_LATER,
    CLOSE_UNAUTHORIZED,
    BadRequest,
    BrokerError,
    Forbidden,
    RateLimited,
    Unauthorized,
    Unavailable,
)
from broker.server.admission import (
    Admission,
    AnonymousCaps,
    connection_budget,
    default_anonymous,
    default_unauthenticated,
    raise_descriptor_limit,
)
from broker.server.api import HttpApi, Reply, error_reply
from broker.server.backpressure import Backpressure
from broker.server.config import ServerConfig
from broker.server.connection import CLOSE_INTERNAL, DEFERRED, Connection
from broker.server.hooks import Hooks
from broker.server.http import Routes, origin_allowed
from broker.server.http11 import HttpRequest
from broker.server.journal import Journal
from broker.server.logs import Repeats
from broker.server.memory import release_memory
from broker.server.metrics import Metrics, wire_size
from broker.server.replay import Subscriptions
from broker.server.session import Flusher, Session
from broker.server.sse import StreamLink, StreamSession, heartbeats
from broker.server.sse import serve as serve_stream
from broker.store.base import Store
from broker.store.dedupe import Duplicate

if TYPE_CHECKING:
    from broker.store.redis import Cluster

# Frames of one connection that wait while one of its requests runs as a task; past this
# many, stop reading from its socket until they are handled.
_BACKLOG_PAUSE = 64
# Frames of one connection handled per event-loop turn; the rest of what one read brought
# waits (as the backlog above) for a later turn. A read can bring hundreds of frames: 32
# connections flooding publishes made each turn, and so every other client's publish and
# delivery, wait for thousands of them (pair p99 ~150-500 ms; issue 27, row 11).
_TURN_SLICE = 32
# Frames from the backlogs of connections that used their slice, all connections
# together, per event-loop turn; a frame that comes to a connection with no backlog is
# handled at once. 32 flooding connections with a slice each made a turn 1,024 publishes
# long (~15 ms of CPU, 60-100 ms of wall time on a busy machine), and a well-behaved
# client's publish waited up to two such turns (issue 27, row 11); now the flood shares
# this much per turn, round robin, and a turn stays short whatever the number of floods.
_TURN_BUDGET = 256
# Subscriptions dropped per loop turn when a connection that holds many closes.
_DETACH_SLICE = 2000
# Connections the kernel queues before accept (capped by net.core.somaxconn): asyncio's
# default, 100, drops the SYNs of a reconnect storm, and each dropped one costs its client
# a 1, 3, 7 s retransmission.
_LISTEN_BACKLOG = 4096
# Refused connections logged in full per result and 10 s window; the rest are summarised.
_REFUSALS_LOGGED = 10
#: What each limit of ``metrics.LIMITS`` refuses, for the log line.
_LIMIT_TEXT = {
    "connections": "max_connections, new connections refused",
    "unauthenticated": "max_unauthenticated, the oldest unauthenticated connections dropped",
    "unauthenticated_per_address": "max_unauthenticated_per_address, new connections refused",
    "subscriptions": "max_subscriptions, subscriptions refused",
    "anonymous": "max_anonymous, new anonymous connections refused",
    "anonymous_per_address": "max_anonymous_per_address, new anonymous connections refused",
}

log = logging.getLogger("broker")

SERVER_NAME = f"broker/{__version__}"
#: Log event names for the close codes a session is closed with.
CLOSE_EVENTS = {
    CLOSE_SLOW_CONSUMER: "slow_consumer",
    CLOSE_TOKEN_EXPIRED: "token_expired",
    CLOSE_UNAUTHORIZED: "unauthorized",
}


class BrokerServer:
    """One broker node: accepts connections and runs the protocol."""

    def __init__(
        self,
        config: ServerConfig,
        store: Store,
        verifier: TokenVerifier,
        cluster: Cluster | None = None,
    ) -> None:
        self.config = config
        self.verifier = verifier
        self.store = store
        #: Per-pattern options, ``[[namespace]]`` (public topics, history, presence).
        self.namespaces = Namespaces(config.namespaces)
        store.namespaces = self.namespaces
        # In cluster mode presence and stats span every node (broker/store/redis).
        self.cluster = cluster
        self.hub = self.cluster.make_hub(self.stats) if self.cluster else Hub()
        self.hub.max_user_patterns = config.max_subscriptions
        # A shared store feeds every node through follow(); a local one after append.
        self.flusher = Flusher()
        #: Frames handled per connection in this turn (see _TURN_SLICE).
        self._turn_handled: dict[Session, int] = {}
        #: Frames handled from backlogs in this turn, all connections (_TURN_BUDGET).
        self._turn_backlog = 0
        self.journal = Journal(
            self.store,
            _ignore if self.store.shared else self.hub.fanout,
            flusher=self.flusher,
        )
        self.subscriptions = Subscriptions(
            self.hub, self.store, config.max_subscriptions, self._limit_reached, self.namespaces
        )
        self.backpressure = Backpressure(
            config.max_pending_publishes,
            config.max_pending_bytes,
            config.max_store_backlog,
            _BACKLOG_PAUSE,
        )
        self.sessions: set[Session] = set()
        self.connections = 0
        self.draining = False
        self.started = time.time()
        self.published = 0
        self.metrics = Metrics(self.stats)
        self.routes = Routes(self)
        self.api = HttpApi(self)
        store.dedupe_window = config.dedupe_window
        self.journal.commit_observers.append(self.metrics.observe_commit)
        self.hub.observe_fanout = self.metrics.fanout_seconds.observe
        if cluster is not None:
            cluster.link.observe_roundtrip = self.metrics.redis_roundtrip_seconds.observe
        self._listener: asyncio.Server | None = None
        self._conns: set[Connection] = set()  # upgraded to WebSocket
        self._unauthenticated: set[Connection] = set()  # waiting for the first frame
        self._http_conns: set[Connection] = set()  # plain HTTP (keep-alive) clients
        self._stopped = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.admission = self._admission()
        self.anonymous = AnonymousCaps(
            self.config.max_anonymous
            if self.config.max_anonymous is not None
            else default_anonymous(self.admission.max_connections),
            self.config.max_anonymous_per_address,
        )
        # Anonymous sessions and the address each is counted under.
        self._anonymous_peers: dict[Session, str] = {}
        #: Open server-sent event streams (GET /sse).
        self.streams: set[StreamSession] = set()
        #: Hooks to the application's backend (section 12), when configured.
        self.hooks = Hooks(config.hooks, self.metrics) if config.hooks.configured else None
        self._publish_hook = self.hooks is not None and bool(config.hooks.publish)
        if self.hooks is not None and config.hooks.subscribe:
            self.subscriptions.check = self.check_subscribe
        if self.hooks is not None and config.hooks.events and self.cluster is None:
            announce = self.hub.on_presence

            def on_presence(op: str, topic: str, user: dict[str, str]) -> None:
                announce(op, topic, user)
                self._presence_event(op, topic, user)

            self.hub.on_presence = on_presence
        if self.hooks is not None and config.hooks.events and self.cluster is not None:
            self.cluster.on_transition = self._presence_event
        # Refused connections and limits reached: a few lines in full, then a summary.
        self._refusals = Repeats(log, burst=_REFUSALS_LOGGED)
        self._limits = Repeats(log, burst=1)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store and start listening."""
        await self.store.open()
        self.hub.last_seq = self.store.last_seq
        if self.hooks is not None:
            self.hooks.start()
        ssl_context = None
        if self.config.tls_cert:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        extensions = enable_server_permessage_deflate(None) if self.config.compression else None
        max_size = self.config.max_message_size
        open_timeout = self.config.auth_timeout  # for the HTTP request, then again for 'auth'

        def connection() -> Connection:
            return Connection(
                self,
                max_size=max_size,
                extensions=extensions,
                server_header=SERVER_NAME,
                open_timeout=open_timeout,
            )

        self._listener = await asyncio.get_running_loop().create_server(
            connection,
            self.config.host,
            self.config.port,
            ssl=ssl_context,
            ssl_handshake_timeout=self.config.auth_timeout if ssl_context else None,
            backlog=_LISTEN_BACKLOG,
        )
        if self.config.port == 0:  # the port the system chose, for the logs and the banner
            # Any: typeshed declares a tuple, uvloop hands a list, and the compiled build
            # checks declared types.
            sockets: Any = cast(Any, self._listener).sockets
            self.config.port = int(sockets[0].getsockname()[1])
        self._spawn(self._summary_loop())
        self._spawn(self._trim_loop())
        if self.config.ping_interval > 0:
            self._spawn(self._keepalive_loop(self.config.ping_interval))
        self._spawn(heartbeats(lambda: list(self.streams)))
        if self.store.shared:
            self._spawn(self.store.follow(self.hub.fanout, self._history_restarted))

    def _history_restarted(self, last_seq: int) -> None:
        log.warning("history started over (new epoch %s)", self.store.epoch)
        self.hub.last_seq = last_seq

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _trim_loop(self) -> None:
        interval = min(max(self.config.retention / 20, 0.5), 30.0)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.store.trim(time.time())
            except Exception:
                log.exception("retention trim failed", extra={"event": "trim_failed"})

    async def _keepalive_loop(self, interval: float) -> None:
        """Every ``interval``: ping connections quiet for half of it, drop those quiet
        for two (they were pinged at the previous round and never answered).

        One timer for the whole server rather than a task per connection: a dead peer
        is dropped within three intervals, an idle live one costs a ping per interval."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for conn in list(self._conns):
                quiet = now - conn.last_seen
                if quiet >= 2 * interval:
                    log.info(
                        "dropping %s: no answer to keepalive pings",
                        conn.peer,
                        extra={"event": "keepalive_timeout", "peer": conn.peer},
                    )
                    conn.fail(CLOSE_INTERNAL, "keepalive ping timeout")
                elif quiet >= interval / 2:
                    conn.ping()

    async def serve_forever(self) -> None:
        """Run until ``shutdown`` completes."""
        await self._stopped.wait()

    async def shutdown(self) -> None:
        """Stop accepting, refuse new publishes, commit what was accepted, close every
        connection with 1001 and release the store, within the drain timeout."""
        if self.draining:
            return
        self.draining = True
        log.info(
            "shutting down: draining %d connections",
            len(self.sessions),
            extra={"event": "shutdown"},
        )
        assert self._listener is not None
        self._listener.close()  # no new connections
        try:
            await asyncio.wait_for(self.journal.close(), self.config.drain_timeout)
        except TimeoutError:
            log.error(
                "pending commits did not finish within the drain timeout",
                extra={"event": "drain_timeout"},
            )
        for session in list(self.sessions):
            session.close(CLOSE_GOING_AWAY, "server shutting down")
        for conn in list(self._conns):  # not authenticated yet
            conn.close(CLOSE_GOING_AWAY, "server shutting down")
        for conn in list(self._http_conns):
            conn.close_http()
        if self._conns:
            await asyncio.wait(
                [conn.closed for conn in self._conns], timeout=self.config.drain_timeout
            )
        for conn in list(self._conns):
            conn.abort()
        for task in list(self._tasks):
            task.cancel()
        if self.hooks is not None:
            await self.hooks.close(min(2.0, self.config.drain_timeout))
        await self.store.close()
        self._refusals.flush(final=True)
        self._limits.flush(final=True)
        self._stopped.set()

    # -- HTTP --------------------------------------------------------------------------

    def http_request(self, conn: Connection, request: Request) -> Response | None:
        """Answer plain HTTP paths, or None to let ``/ws`` upgrade."""
        path = request.path.split("?", 1)[0]
        response = self.routes.respond(conn, request, path)
        if response is not None:
            return response
        origins = request.headers.get_all("Origin")
        hosts = request.headers.get_all("Host")
        if not origin_allowed(origins, hosts, self.config.allowed_origins):
            return self._refuse(
                conn, HTTPStatus.FORBIDDEN, "forbidden_origin", "origin not allowed"
            )
        if self.draining:
            return self._refuse(
                conn, HTTPStatus.SERVICE_UNAVAILABLE, "shutting_down", "shutting down"
            )
        if self.admission.refused(conn, conn.loop.time()):
            return self._refuse(
                conn, HTTPStatus.SERVICE_UNAVAILABLE, "over_capacity", "too many connections"
            )
        authorization = request.headers.get_all("Authorization")
        if authorization:
            try:
                if len(authorization) > 1:
                    raise Unauthorized("more than one Authorization header")
                identity = self.verifier.verify(parse_bearer(authorization[0]))
            except Unauthorized as exc:
                return self._refuse(conn, HTTPStatus.UNAUTHORIZED, "unauthorized", exc.message)
            conn.identity = identity
        elif self.hooks is not None and self.config.hooks.connect:
            headers = {name: request.headers.get(name, "") for name in CONNECT_HEADERS}
            headers = {name: value for name, value in headers.items() if value}
            self._spawn(self._connect_hook(conn, request, headers))
            return DEFERRED
        return None

    async def _connect_hook(
        self, conn: Connection, request: Request, headers: dict[str, str]
    ) -> None:
        """Ask the ``connect`` hook who a WebSocket without a token is, then answer the
        upgrade: a user's or an anonymous connection starts at once; otherwise the
        connection waits for ``auth`` as if no hook were configured."""
        assert self.hooks is not None
        response: Response | None = None
        try:
            answer = await self.hooks.connect("websocket", headers, _address(conn.peer))
            if answer.identity is not None:
                conn.identity = answer.identity
            elif answer.anonymous and self.namespaces.public:
                try:
                    conn.identity = self.anonymous_identity(conn)
                except Unavailable as exc:
                    response = self._refuse(
                        conn, HTTPStatus.SERVICE_UNAVAILABLE, "over_capacity", exc.message
                    )
        except Exception:
            log.exception("the connect hook failed")
        conn.answer_handshake(request, response)

    def _refuse(self, conn: Connection, status: HTTPStatus, result: str, reason: str) -> Response:
        """Refuse a handshake with ``status``, counted as attempt ``result``."""
        self._refused(conn, result, reason)
        return conn.protocol.reject(status, reason + "\n")

    def _refused(self, conn: Connection, result: str, reason: str) -> None:
        """Count and log a connection refused before or after the upgrade."""
        self.metrics.attempt(result)
        if not self._refusals.allow(result, f"refused connections ({result})"):
            return
        peer = conn.peer
        log.info(
            "refused connection from %s: %s",
            peer,
            reason,
            extra={"event": "refused", "result": result, "peer": peer},
        )

    # -- plain HTTP and the HTTP API (called by Connection) -----------------------------

    def http(self, conn: Connection, request: HttpRequest) -> None:
        """A plain HTTP request: ``/api/...`` (answered by a task), or a plain path.

        The connection stays unauthenticated (within those bounds) until a request of
        its carries a valid token: tokenless keep-alive sockets cannot hold the door."""
        if conn not in self._http_conns:
            if self.admission.refused(conn, conn.loop.time()):
                self._refused(conn, "over_capacity", "too many connections")
                self._reply(conn, request, error_reply(Unavailable("too many connections")), True)
                return
            self._http_conns.add(conn)
            self.connections += 1
        if request.error is not None:
            status, reason = request.error
            self._reply(conn, request, error_reply(BadRequest(reason), status), True)
        elif request.path.startswith("/api/"):
            if not self._api_now(conn, request):
                self._spawn(self._api(conn, request))
        elif request.path == "/sse":
            self._stream(conn, request)
        else:
            status, headers, body = self.routes.plain(conn, request)
            self.metrics.http_request(request.path, status)
            conn.respond(status, headers, body)

    # -- server-sent event streams (section 11) -------------------------------------------

    def _stream(self, conn: Connection, request: HttpRequest) -> None:
        """``GET /sse``: refuse it before the stream (status and JSON body), or start it."""
        allowed, origin = self.api.origin_allowed(request)
        cors = [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")] if origin else []
        if allowed and request.method == "OPTIONS":
            headers = [
                *cors,
                ("Access-Control-Allow-Methods", "GET, OPTIONS"),
                ("Access-Control-Allow-Headers", "Authorization, Last-Event-ID"),
                ("Allow", "GET, OPTIONS"),
            ]
            self._reply(conn, request, Reply(204, headers=headers, content_type=None))
            return
        try:
            if not allowed:
                raise Forbidden("origin not allowed")
            if request.method != "GET":
                reply = error_reply(BadRequest(f"/sse takes GET, not {request.method}"), 405)
                reply.headers.append(("Allow", "GET, OPTIONS"))
                self._reply(conn, request, reply, close=True)
                return
            if self.draining:
                raise Unavailable("the broker is shutting down")
            resume = request.header("last-event-id")
            ask = parse_stream(
                request.query, resume[-1] if resume else None, self.config.max_subscriptions
            )
            if self.hooks is not None and self._stream_hooks(request, ask):
                self._spawn(self._stream_hooked(conn, request, ask, cors))
                return
            identity = self._stream_identity(conn, request, ask)
        except BrokerError as exc:
            self._stream_refused(conn, request, exc, cors)
            return
        self._start_stream(conn, identity, ask, cors)

    def _stream_refused(
        self, conn: Connection, request: HttpRequest, exc: BrokerError, cors: list[tuple[str, str]]
    ) -> None:
        reply = error_reply(exc)
        reply.headers += cors
        self.metrics.error(exc.code)
        self._reply(conn, request, reply, close=True)

    def _stream_hooks(self, request: HttpRequest, ask: StreamRequest) -> bool:
        """Whether a stream asks the backend: no token and a ``connect`` hook, or a
        pattern the ``subscribe`` hook selects."""
        hooks = self.config.hooks
        tokenless = not request.header("authorization") and ask.token is None
        return bool(hooks.connect and tokenless) or bool(
            hooks.subscribe and any(self.namespaces.subscribe_hook(p) for p in ask.patterns)
        )

    async def _stream_hooked(
        self,
        conn: Connection,
        request: HttpRequest,
        ask: StreamRequest,
        cors: list[tuple[str, str]],
    ) -> None:
        """A stream that asks the backend who it is (``connect``) or whether it may read
        its patterns (``subscribe``), before the ``200``."""
        assert self.hooks is not None
        counted = False  # an anonymous stream's slot is taken: give it back if refused
        try:
            identity: Identity | None = None
            tokenless = not request.header("authorization") and ask.token is None
            if self.config.hooks.connect and tokenless:
                headers = {n: v[-1] for n in CONNECT_HEADERS if (v := request.header(n))}
                answer = await self.hooks.connect("sse", headers, _address(conn.peer))
                if answer.identity is not None:
                    identity = answer.identity
                    for pattern in ask.patterns:
                        identity.check_subscribe(pattern)
                elif not (
                    self.namespaces.public and all(map(self.namespaces.is_public, ask.patterns))
                ):
                    raise Unauthorized(answer.message or "the application admitted no user")
            if identity is None:
                identity = self._stream_identity(conn, request, ask)
                counted = identity.anonymous
            for pattern in ask.patterns:
                await self.check_subscribe(identity, pattern)
        except BrokerError as exc:
            if counted:
                self.anonymous.release(conn.peer)
            self._stream_refused(conn, request, exc, cors)
            return
        except Exception:
            if counted:
                self.anonymous.release(conn.peer)
            log.exception("the hooks of a stream failed")
            self._stream_refused(conn, request, BrokerError("internal error"), cors)
            return
        self._start_stream(conn, identity, ask, cors)

    def _stream_identity(
        self, conn: Connection, request: HttpRequest, ask: StreamRequest
    ) -> Identity:
        """Who a stream is for: its bearer header, its ``token`` parameter, or nobody (an
        anonymous stream, counted against its caps last, once all else passed)."""
        header = request.header("authorization")
        if len(header) > 1:
            raise Unauthorized("more than one Authorization header")
        if header:
            identity = self.verifier.verify(parse_bearer(header[0]))
        elif ask.token is not None:
            identity = self.verifier.verify(ask.token)
        elif self.namespaces.public:
            identity = Identity.anonymous_reader(self.namespaces.public)
        else:
            raise Unauthorized(
                "an 'Authorization: Bearer <token>' header or a 'token' parameter is required"
            )
        for pattern in ask.patterns:
            identity.check_subscribe(pattern)
        if identity.anonymous:
            identity = self.anonymous_identity(conn)
        return identity

    def _start_stream(
        self,
        conn: Connection,
        identity: Identity,
        ask: StreamRequest,
        cors: list[tuple[str, str]],
    ) -> None:
        transport = conn.transport
        if transport is None or not conn.start_stream():
            # Gone, or half-closed while the stream was being decided: nothing to start.
            if identity.anonymous:
                self.anonymous.release(conn.peer)
            return
        head = [
            "HTTP/1.1 200 OK",
            f"Server: {SERVER_NAME}",
            "Content-Type: text/event-stream",
            "Cache-Control: no-cache",
            "X-Accel-Buffering: no",
            "Connection: close",
            *(f"{name}: {value}" for name, value in cors),
        ]
        # Written as it is, not through h11: the body is the stream, ended by the close.
        transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        self.metrics.http_request("/sse", 200)
        session = StreamSession(
            StreamLink(conn),
            identity,
            flusher=self.flusher,
            max_queue=self.config.max_queue,
            on_close=self._on_session_close,
        )
        session.epoch = self.store.epoch
        session.opened = False
        conn.session = session
        self.sessions.add(session)
        self.streams.add(session)
        if identity.anonymous:
            self._anonymous_peers[session] = conn.peer
        self.hub.attach(session)
        session.set_expiry(identity.exp)
        if self.hooks is not None and not identity.anonymous:
            self.hooks.emit("connect", identity)
        log.info(
            "stream %s user=%s from %s: %s",
            session.id,
            identity.id,
            conn.peer,
            " ".join(ask.patterns),
            extra={"event": "connect", "conn": session.id, "user": identity.id, "peer": conn.peer},
        )
        session.task = asyncio.get_running_loop().create_task(self._serve_stream(session, ask))

    async def _serve_stream(self, session: StreamSession, ask: StreamRequest) -> None:
        try:
            if (
                self.store.shared
                and ask.since is not None
                and ask.epoch in (None, self.store.epoch)
            ):
                await self.catch_up(ask.since)
            await serve_stream(
                session, ask, self.store, self.hub.subscribe, lambda: self.hub.last_seq
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("stream %s failed: %s", session.id, exc, extra={"event": "store_error"})
            session.close(CLOSE_INTERNAL, "history cannot be read now")
        finally:
            session.task = None

    def _api_now(self, conn: Connection, request: HttpRequest) -> bool:
        """Answer a publish without a task when the API can (most): False otherwise."""
        try:
            return self.api.publish_now(request, lambda reply: self._answered(conn, request, reply))
        except Exception:
            log.exception("internal error answering %s %s", request.method, request.path)
            self._answered(conn, request, error_reply(BrokerError("internal error")))
            return True

    async def _api(self, conn: Connection, request: HttpRequest) -> None:
        try:
            reply = await self.api.handle(request)
        except Exception:
            log.exception("internal error answering %s %s", request.method, request.path)
            reply = error_reply(BrokerError("internal error"))
        self._answered(conn, request, reply)

    def _answered(self, conn: Connection, request: HttpRequest, reply: Reply) -> None:
        """Send the reply to an ``/api/`` request; a request with a valid token settles
        its connection."""
        if reply.identity is not None:
            self.admission.settle(conn)
        self._reply(conn, request, reply)

    def _reply(
        self, conn: Connection, request: HttpRequest, reply: Reply, close: bool = False
    ) -> None:
        self.metrics.http_request(request.path, reply.status)
        headers = list(reply.headers)
        if reply.content_type is not None:
            headers.append(("Content-Type", reply.content_type))
        conn.respond(reply.status, headers, reply.body, close=close)

    async def catch_up(self, seq: int) -> None:
        """Wait (briefly) until this node has fanned out ``seq`` (cluster reads)."""
        await self.subscriptions.catch_up(seq)

    # -- limits ------------------------------------------------------------------------

    def _admission(self) -> Admission:
        """Connection limits from the settings and the file-descriptor limit (raised to
        its hard limit first)."""
        budget = connection_budget(raise_descriptor_limit())
        wanted = self.config.max_connections
        if wanted is not None and wanted > budget:
            log.warning(
                "max_connections %d is more than the file-descriptor limit allows: using %d",
                wanted,
                budget,
                extra={"event": "limit_lowered", "limit": "connections"},
            )
        cap = budget if wanted is None else min(wanted, budget)
        unauthenticated = self.config.max_unauthenticated or default_unauthenticated(cap)
        return Admission(
            max_connections=cap,
            max_unauthenticated=min(unauthenticated, cap),
            max_per_address=self.config.max_unauthenticated_per_address,
            on_limit=lambda limit, conn: self._limit_reached(limit, f"from {conn.peer}"),
        )

    def accepted(self, conn: Connection) -> bool:
        """A TCP connection was accepted: count it, or refuse it (False: drop it now)."""
        return self.admission.admit(conn, conn.loop.time())

    def _limit_reached(self, limit: str, who: str) -> None:
        """Count a refusal by ``limit``; log it once per episode, then a summary."""
        self.metrics.limit_hit(limit)
        if self._limits.allow(limit, f"refusals by the {limit} limit"):
            log.warning(
                "limit reached: %s (%s); further refusals are summarised",
                _LIMIT_TEXT[limit],
                who,
                extra={"event": "limit_reached", "limit": limit},
            )

    async def _summary_loop(self) -> None:
        """Write the summaries of repeated refusals as their windows end."""
        while True:
            await asyncio.sleep(1.0)
            self._refusals.flush()
            self._limits.flush()

    # -- WebSocket (called by Connection) ----------------------------------------------

    def opened(self, conn: Connection) -> None:
        """Handshake done: start the session (bearer header) or wait for ``auth``."""
        self._conns.add(conn)
        self.connections += 1
        if conn.identity is not None:
            self._start_session(conn, conn.identity)
        else:
            self._unauthenticated.add(conn)
            # One deadline from accept for the HTTP request and the 'auth' frame together.
            since = self.admission.accepted_at(conn)
            spent = 0.0 if since is None else conn.loop.time() - since
            left = max(0.0, self.config.auth_timeout - spent)
            conn.timer = conn.loop.call_later(left, self._auth_timeout, conn)

    def message(self, conn: Connection, data: str | bytes) -> None:
        """One incoming message: ``auth`` first, then requests, in order."""
        self.metrics.bytes_in += wire_size(data)
        session = conn.session
        if session is None:
            if conn in self._unauthenticated:
                self._authenticate(conn, data)
        elif session.closing:
            return
        elif session.task is None and self._in_slice(session):
            self._handle(session, data)
        else:
            if session.backlog is None:
                session.backlog = deque()
            session.backlog.append(data)
            if len(session.backlog) >= _BACKLOG_PAUSE and conn.transport is not None:
                conn.transport.pause_reading()

    def _in_slice(self, session: Session, backlog: bool = False) -> bool:
        """Count one frame of ``session`` handled in this turn (``backlog``: one that
        waited in its backlog); False once its slice, or the turn's budget for backlogs,
        is used: it then waits for a later turn (a task that resumes the backlog; the
        tasks run in the order made, so the backlogs are served round robin)."""
        handled = self._turn_handled
        count = handled.get(session, 0)
        if count >= _TURN_SLICE or (backlog and self._turn_backlog >= _TURN_BUDGET):
            session.task = asyncio.get_running_loop().create_task(self._next_turn(session))
            return False
        if not handled:
            self.flusher.defer(self._new_turn)  # a new slice for everyone next turn
        handled[session] = count + 1
        if backlog:
            self._turn_backlog += 1
        return True

    def _new_turn(self) -> None:
        self._turn_handled.clear()
        self._turn_backlog = 0

    async def _next_turn(self, session: Session) -> None:
        """Give ``session`` a new slice (this runs in a later turn) and handle its backlog."""
        self._turn_handled.pop(session, None)
        session.task = None
        self._resume(session)

    def closed(self, conn: Connection) -> None:
        """The connection is gone: forget it and its session."""
        self.admission.forget(conn)
        if conn in self._http_conns:
            self._http_conns.discard(conn)
            self.connections -= 1
            stream = conn.session
            if stream is not None:  # a server-sent event stream
                if stream.task is not None:
                    stream.task.cancel()
                self._drop(stream)
                conn.session = None
                if self.hooks is not None and not stream.identity.anonymous:
                    self.hooks.emit("disconnect", stream.identity, code=1000)
                log.info(
                    "stream %s ended user=%s",
                    stream.id,
                    stream.identity.id,
                    extra={"event": "disconnect", "conn": stream.id, "user": stream.identity.id},
                )
            return
        if conn not in self._conns:
            return  # never upgraded: a plain HTTP request or a failed handshake
        self._conns.discard(conn)
        self.connections -= 1
        if conn in self._unauthenticated:
            self._unauthenticated.discard(conn)
            self.metrics.attempt("abandoned")
        session = conn.session
        if session is None:
            return
        if session.task is not None:
            session.task.cancel()
        for _, waiting in session.pipeline or ():
            if waiting is not None:
                waiting.cancel()
        self._drop(session)
        conn.session = None  # no cycle left: both are freed now, not by the collector
        if self.hooks is not None and not session.identity.anonymous:
            self.hooks.emit("disconnect", session.identity, code=conn.close_code)
        log.info(
            "disconnect %s user=%s code=%s",
            session.id,
            session.identity.id,
            conn.close_code,
            extra={
                "event": "disconnect",
                "conn": session.id,
                "user": session.identity.id,
                "code": conn.close_code,
            },
        )

    def _authenticate(self, conn: Connection, data: str | bytes) -> None:
        self._unauthenticated.discard(conn)
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        request_id = None
        try:
            frame = parse_request(data)
            request_id = getattr(frame, "id", None)
            if not isinstance(frame, Auth):
                raise Unauthorized("the first frame must be 'auth'")
            if frame.token is None and self.namespaces.public:
                identity = self.anonymous_identity(conn)
            else:
                identity = self.verifier.verify(frame.token)
        except Unavailable as exc:  # a cap of anonymous connections
            exc.request_id = request_id
            self.metrics.error(exc.code)
            conn.write(text_frame(encode_error(exc)))
            conn.close(CLOSE_TRY_AGAIN_LATER, exc.message[:120])
            return
        except BrokerError as exc:
            error = exc if isinstance(exc, Unauthorized) else Unauthorized(exc.message)
            error.request_id = exc.request_id if request_id is None else request_id
            self._refuse_session(conn, error)
            return
        self._start_session(conn, identity)

    def anonymous_identity(self, conn: Connection) -> Identity:
        """An anonymous connection's identity, counted against its caps (section 10);
        ``Unavailable`` when one is reached (the caller answers 1013 or 503)."""
        limit = self.anonymous.admit(conn.peer)
        if limit is not None:
            self._refused(conn, "over_capacity", f"{limit} cap reached")
            self._limit_reached(limit, f"from {conn.peer}")
            raise Unavailable("too many anonymous connections; try again later")
        return Identity.anonymous_reader(self.namespaces.public)

    def _auth_timeout(self, conn: Connection) -> None:
        conn.timer = None
        if conn in self._unauthenticated:
            self._unauthenticated.discard(conn)
            self._refuse_session(
                conn, Unauthorized("no 'auth' frame within the authentication timeout")
            )

    def _refuse_session(self, conn: Connection, error: Unauthorized) -> None:
        """Answer a failed first-frame ``auth`` with the error, then close with 4001."""
        self._refused(conn, "unauthorized", error.message)
        self.metrics.error(error.code)
        conn.write(text_frame(encode_error(error)))
        conn.close(CLOSE_UNAUTHORIZED, error.message[:120])

    def _start_session(self, conn: Connection, identity: Identity) -> None:
        self.metrics.attempt("accepted")
        session = Session(
            conn,
            identity,
            flusher=self.flusher,
            max_queue=self.config.max_queue,
            rate_limit=self.config.rate_limit,
            on_close=self._on_session_close,
        )
        conn.session = session
        self.admission.settle(conn)
        self.sessions.add(session)
        if identity.anonymous:
            self._anonymous_peers[session] = conn.peer
        self.hub.attach(session)
        log.info(
            "connect %s user=%s from %s",
            session.id,
            identity.id,
            conn.peer,
            extra={"event": "connect", "conn": session.id, "user": identity.id, "peer": conn.peer},
        )
        session.send(encode_hello(identity.user_json(), SERVER_NAME, identity.anonymous))
        session.set_expiry(identity.exp)
        if self.hooks is not None and not identity.anonymous:
            self.hooks.emit("connect", identity)

    def _handle(self, session: Session, data: str | bytes) -> None:
        """Handle one request now, or start a task for one that waits on I/O."""
        frame = None
        try:
            frame = parse_request(data)
            if session.pipeline and not isinstance(frame, Pub):
                # Publishes wait for the publish hook: this request comes after them.
                session.task = asyncio.get_running_loop().create_task(
                    self._after_pipeline(session, data)
                )
                return
            if isinstance(frame, Pub):
                self._publish(session, frame)
            elif isinstance(frame, Unsub):
                self.hub.unsubscribe(session, frame.topic)
                session.send(encode_ok(frame.id))
            elif isinstance(frame, Auth):
                self._refresh(session, frame)
            else:
                session.task = asyncio.get_running_loop().create_task(
                    self._handle_async(session, frame)
                )
        except Exception as exc:
            self._request_failed(session, frame, exc)

    async def _handle_async(self, session: Session, frame: Frame) -> None:
        try:
            if isinstance(frame, Sub):
                await self.subscriptions.subscribe(session, frame)
            elif isinstance(frame, Presence):
                if session.identity.anonymous:
                    raise Forbidden("an anonymous connection may not ask who is present")
                session.identity.check_subscribe(frame.topic)
                users = self.hub.presence(frame.topic)
                if self.cluster is not None:
                    users = await self.cluster.presence(frame.topic, users)
                session.send(encode_ok(frame.id, users=users))
            elif isinstance(frame, Stats):
                if not session.identity.admin:
                    raise Forbidden("stats needs an admin token")
                figures = self.stats()
                if self.cluster is not None:
                    figures = await self.cluster.stats(figures)
                session.send(encode_ok(frame.id, **figures))
        except Exception as exc:
            self._request_failed(session, frame, exc)
        finally:
            session.task = None
        self._resume(session)

    def _resume(self, session: Session) -> None:
        """Handle the frames that arrived while a request ran as a task, in order, until
        one needs a task again. (A function of its own: right after ``session.task = None``
        mypy takes ``session.task`` to be None through the calls that set it, which the
        compiled build would check at run time: a TypeError.)"""
        backlog = session.backlog
        if backlog is None:
            return
        was_full = len(backlog) >= _BACKLOG_PAUSE
        while backlog and session.task is None and not session.closing:
            if self._in_slice(session, backlog=True):
                self._handle(session, backlog.popleft())
        if not backlog or session.closing:
            session.backlog = None
        if was_full and not session.closing and session.conn.transport is not None:
            if session.backlog is None or len(session.backlog) < _BACKLOG_PAUSE:
                session.conn.transport.resume_reading()

    def _request_failed(self, session: Session, frame: Frame | None, exc: Exception) -> None:
        """Answer a request that failed: its error code, or ``internal`` for a bug."""
        if isinstance(exc, BrokerError):
            if exc.request_id is None:
                exc.request_id = getattr(frame, "id", None)
            self.metrics.error(exc.code)
            session.send(encode_error(exc))
            if isinstance(exc, Unauthorized):
                session.close(CLOSE_UNAUTHORIZED, exc.message[:120])
            return
        log.error(
            "internal error on connection %s",
            session.id,
            exc_info=exc,
            extra={"event": "internal_error", "conn": session.id, "user": session.identity.id},
        )
        self.metrics.error("internal")
        rid = getattr(frame, "id", None)
        session.send(encode_error(BrokerError("internal error", request_id=rid)))

    def _on_session_close(self, session: Session, code: int, reason: str) -> None:
        if code == CLOSE_SLOW_CONSUMER:
            self.metrics.slow_consumer_closes += 1
        if code != CLOSE_GOING_AWAY:
            log.log(
                logging.WARNING if code == CLOSE_SLOW_CONSUMER else logging.INFO,
                "closing %s user=%s: %s (%d)",
                session.id,
                session.identity.id,
                reason,
                code,
                extra={
                    "event": CLOSE_EVENTS.get(code, "close"),
                    "conn": session.id,
                    "user": session.identity.id,
                    "code": code,
                },
            )
        self._drop(session)

    def _drop(self, session: Session) -> None:
        self.backpressure.forget(session)
        if session in self.sessions:
            self.sessions.discard(session)
            if isinstance(session, StreamSession):
                self.streams.discard(session)
            peer = self._anonymous_peers.pop(session, None)
            if peer is not None:
                self.anonymous.release(peer)
            session.set_expiry(None)
            if not self.hub.detach(session, _DETACH_SLICE):
                self._spawn(self._detach_rest(session))

    async def _detach_rest(self, session: Session) -> None:
        """Drop a closed connection's many subscriptions a slice per loop turn, then give
        the memory they held back to the system."""
        while not self.hub.detach(session, _DETACH_SLICE):
            await asyncio.sleep(0)
        release_memory()

    # -- requests ----------------------------------------------------------------------

    def _publish(self, session: Session, frame: Pub) -> None:
        if self.draining:
            raise Unavailable("the broker is shutting down")
        session.identity.check_publish(frame.topic)
        if not session.allow_publish():
            self.metrics.rate_limited += 1
            raise RateLimited("publish rate limit exceeded")
        hooked = self._publish_hook and self.namespaces.publish_hook(frame.topic)
        if hooked or session.pipeline:
            self._pipeline(session, frame, hooked)
            return
        self._record(session, frame, frame.data)

    # -- publishes that ask the publish hook: asked at once, recorded in order -----------

    def _pipeline(self, session: Session, frame: Pub, hooked: bool) -> None:
        """Queue a publish behind this connection's publishes that wait for the hook
        (asking the hook now when ``hooked``): each is recorded, in the order sent, once
        every one before it is; the hook is asked for many at once."""
        pipeline = session.pipeline
        if pipeline is None:
            pipeline = session.pipeline = deque()
        task = None
        if hooked:
            task = asyncio.get_running_loop().create_task(self._ask_publish(session, frame))
            task.add_done_callback(lambda _: self._drain_pipeline(session))
        pipeline.append((frame, task))
        if len(pipeline) >= _BACKLOG_PAUSE and session.conn.transport is not None:
            session.conn.transport.pause_reading()
        self._drain_pipeline(session)

    async def _ask_publish(self, session: Session, frame: Pub) -> bytes | None:
        """The publish hook's answer for ``frame`` (None: as it is); a key already
        recorded asks nothing (the journal answers it as a duplicate)."""
        assert self.hooks is not None
        ident = session.identity
        if frame.key is not None and await self.store.known_key(ident.id, frame.key):
            return None
        return await self.hooks.check("publish", ident, frame.topic, frame.data, frame.key)

    def _drain_pipeline(self, session: Session) -> None:
        """Record (or refuse) the publishes at the head of the pipeline that are ready."""
        pipeline = session.pipeline
        while pipeline:
            frame, task = pipeline[0]
            if task is not None and not task.done():
                return
            pipeline.popleft()
            if session.closing or (task is not None and task.cancelled()):
                continue
            error = task.exception() if task is not None else None
            if isinstance(error, Exception):
                self._request_failed(session, frame, error)
                continue
            data = task.result() if task is not None else None
            try:
                self._record(session, frame, frame.data if data is None else data)
            except Exception as exc:
                self._request_failed(session, frame, exc)
        session.pipeline = None
        if session.conn.transport is not None and session.backlog is None:
            session.conn.transport.resume_reading()
        if session.pipeline_done is not None:
            session.pipeline_done.set_result(None)
            session.pipeline_done = None

    async def _after_pipeline(self, session: Session, data: str | bytes) -> None:
        """Handle a request once the publishes sent before it are recorded or refused."""
        try:
            if session.pipeline:
                waiter = session.pipeline_done
                if waiter is None:
                    waiter = session.pipeline_done = asyncio.get_running_loop().create_future()
                await waiter
        finally:
            session.task = None
        if not session.closing:
            self._handle(session, data)
            if session.task is None:
                self._resume(session)

    def _record(self, session: Session, frame: Pub, data: bytes) -> None:
        """Submit an accepted publish to the journal; answer it once recorded."""
        ident = session.identity
        draft = Draft(
            frame.topic,
            data,
            ident.id,
            ident.name,
            now_ms(),
            session.id,
            frame.echo,
            frame.key,
        )
        self.published += 1
        self.metrics.top_topics.add(frame.topic)
        rid = frame.id
        # Counted as waiting for the store until ``done``: one closure does both.
        backpressure = self.backpressure
        size = len(draft.payload) + len(draft.topic)
        backpressure.accepted(session, size)
        received = time.perf_counter()

        def done(msg: Message | None, error: BrokerError | None) -> None:
            backpressure.recorded(session, size)
            if error is not None:
                error.request_id = rid
                self.metrics.error(error.code)
                session.send(encode_error(error))
                return
            self.metrics.publish_seconds.observe(time.perf_counter() - received)
            if rid is not None and msg is not None:
                if type(msg) is Duplicate:
                    seqs = msg.seqs  # the first publish's, whatever its size
                    if len(seqs) == 1:
                        session.send(encode_ok(rid, seq=seqs[0], duplicate=True))
                    else:
                        session.send(encode_ok(rid, seqs=list(seqs), duplicate=True))
                else:
                    session.send(encode_ack(rid, msg.seq))

        self.journal.submit(draft, done)

    def submit(
        self,
        identity: Identity,
        topics: list[str],
        data: bytes,
        key: str | None,
        answer: Callable[[tuple[int, ...] | None, bool, BrokerError | None], None],
        rewritten: dict[str, bytes] | None = None,
    ) -> None:
        """Publish ``data`` to each of ``topics`` (already checked) as one publish with
        ``key``: one append, consecutive seqs; ``answer(seqs, duplicate, error)`` once.
        ``rewritten``: the data the ``publish`` hook gave some topics instead."""
        ts = now_ms()
        n = len(topics)
        given = rewritten or {}
        drafts = [
            Draft(t, given.get(t, data), identity.id, identity.name, ts, 0, False, key, n)
            if i == 0
            else Draft(t, given.get(t, data), identity.id, identity.name, ts, group=0)
            for i, t in enumerate(topics)
        ]
        got: list[Message] = []
        failed: list[BrokerError] = []
        received = time.perf_counter()

        def done(msg: Message | None, error: BrokerError | None) -> None:
            if error is not None or msg is None:
                if not failed:
                    failed.append(error or Unavailable("not recorded"))
                    self.metrics.error(failed[0].code)
                    answer(None, False, failed[0])
                return
            got.append(msg)
            if len(got) == n and not failed:
                self.metrics.publish_seconds.observe(time.perf_counter() - received)
                first = got[0]
                if type(first) is Duplicate:
                    answer(first.seqs, True, None)
                else:
                    answer(tuple(m.seq for m in got), False, None)

        if self.backpressure.over_total:
            error = Unavailable("too many publishes wait for the store; retry later")
            self.metrics.error(error.code)
            answer(None, False, error)
            return
        self.published += n
        for draft in drafts:
            self.metrics.top_topics.add(draft.topic)
            self.journal.submit(draft, self.backpressure.wrap(None, draft, done))

    def _refresh(self, session: Session, frame: Auth) -> None:
        if session.identity.anonymous:
            raise Forbidden("an anonymous connection cannot log in: open a new connection")
        identity = self.verifier.verify(frame.token)
        if identity.id != session.identity.id:
            raise Unauthorized("a refreshed token must be for the same user")
        if identity.name != session.identity.name:
            self.hub.rename(session, identity.name)  # presence shows the new name
        session.identity = identity
        for pattern in list(self.hub.subscriptions.get(session, {})):
            try:
                identity.check_subscribe(pattern)
            except Forbidden:
                self.hub.unsubscribe(session, pattern)
        session.set_expiry(identity.exp)
        if frame.id is not None:
            session.send(encode_ok(frame.id, exp=int(identity.exp) if identity.exp else None))

    # -- hooks (section 12) --------------------------------------------------------------

    def publish_hooked(self, topics: list[str]) -> bool:
        """Whether a publish to any of ``topics`` may ask the ``publish`` hook."""
        return self._publish_hook and any(self.namespaces.publish_hook(t) for t in topics)

    async def check_publish(
        self, identity: Identity, topics: list[str], data: bytes, key: str | None
    ) -> dict[str, bytes]:
        """Ask the ``publish`` hook about each of ``topics`` it selects (none when ``key``
        is already recorded); the data it gave some topics instead. Raises its refusal."""
        if not self._publish_hook or self.hooks is None:
            return {}
        chosen = [t for t in topics if self.namespaces.publish_hook(t)]
        if not chosen or (key is not None and await self.store.known_key(identity.id, key)):
            return {}
        answers = await asyncio.gather(
            *(self.hooks.check("publish", identity, t, data, key) for t in chosen)
        )
        return {t: a for t, a in zip(chosen, answers) if a is not None}

    async def check_subscribe(self, identity: Identity, pattern: str) -> None:
        """Ask the ``subscribe`` hook about ``pattern`` when it can match a topic that a
        namespace selects; raises its refusal."""
        if self.hooks is not None and self.namespaces.subscribe_hook(pattern):
            await self.hooks.check("subscribe", identity, pattern)

    def _presence_event(self, op: str, topic: str, user: dict[str, str]) -> None:
        if self.hooks is not None:
            self.hooks.emit(op, Identity(user["id"], user["name"]), topic=topic, user=user)

    def stats(self) -> dict[str, Any]:
        """Server-wide figures for the ``stats`` op."""
        return {
            "connections": len(self.sessions),
            "subscriptions": len(self.hub.index),
            "topics": self.hub.index.pattern_count,
            "messages_in": self.published,
            "messages_out": self.hub.delivered,
            "last_seq": self.hub.last_seq,
            "epoch": self.store.epoch,
            "uptime": round(time.time() - self.started, 3),
            "pending_commits": self.journal.pending,
            "bytes_in": self.metrics.bytes_in,
            "bytes_out": self.flusher.bytes_out,
            "slow_consumer_closes": self.metrics.slow_consumer_closes,
            "rate_limited": self.metrics.rate_limited,
            "errors": dict(self.metrics.errors),
            "connection_attempts": dict(self.metrics.attempts),
            "limit_hits": dict(self.metrics.limit_hits),
            "max_connections": self.admission.max_connections,
            "unauthenticated": self.admission.unauthenticated,
            "anonymous": self.anonymous.count,
            "streams": len(self.streams),
            "top_topics": dict(self.metrics.top_topics.top(10)),
        }


def _address(peer: str) -> str:
    """The IP address of ``peer`` (``host:port``, IPv6 hosts included)."""
    host = peer.rsplit(":", 1)[0]
    return host.strip("[]")


def _ignore(committed: list[tuple[Message, Draft]]) -> None:
    """Fan-out of a shared store's appends happens in ``Store.follow``."""
