"""The HTTP API for application backends: ``/api/publish``, ``/api/history``,
``/api/presence``, ``/api/stats`` (section 7 of docs/protocol.md).

Requests arrive whole from ``Connection`` (``broker.server.http11``); this module turns one
into one ``Reply``: a publish that no hook asks about without a task (``publish_now``, the
common case), anything else in a coroutine (``handle``). Authentication, ACL and inbox
rules are those of a WebSocket connection with the same token (``TokenVerifier`` and
``Identity``), and publishes take the same path as an acknowledged ``pub``:
``BrokerServer.submit`` and the journal, answered once recorded.
Errors are ``broker.errors`` classes, answered with their class's ``http_status``.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from typing import Protocol as Interface
from urllib.parse import parse_qs

import orjson

from broker.core.auth import Identity, parse_bearer
from broker.core.limits import TokenBucket
from broker.core.model import Message, kept_bytes
from broker.core.protocol import parse_key
from broker.core.topics import is_pattern, validate_pattern, validate_topic
from broker.errors import (
    BadRequest,
    BrokerError,
    Forbidden,
    RateLimited,
    Unauthorized,
    Unavailable,
)
from broker.server.http import origin_allowed
from broker.store.base import ListPages, Pages

if TYPE_CHECKING:
    from broker.core.auth import TokenVerifier
    from broker.core.hub import Hub
    from broker.server.config import ServerConfig
    from broker.server.http11 import HttpRequest
    from broker.server.metrics import Metrics
    from broker.store.base import Store
    from broker.store.redis import Cluster

#: The API's paths and the methods each allows (OPTIONS: CORS preflight, on every one).
ROUTES = {
    "/api/publish": ("POST",),
    "/api/history": ("GET",),
    "/api/presence": ("GET",),
    "/api/stats": ("GET",),
}
#: Most topics in one batch publish.
MAX_TOPICS = 100
#: Most messages in one history answer.
PAGE = 1000
#: Most bytes of messages in one history answer (at least one message is always given):
#: a request costs what it returns, as a WebSocket replay's page does.
PAGE_BYTES = 1 << 20
#: Messages read from the store at a time for one answer: at the largest message size
#: this is what a request holds beyond its answer.
READ_PAGE = 256
#: Per-user rate buckets kept at once (the least recently used go first).
MAX_BUCKETS = 10_000
JSON = "application/json"


class Reply:
    """One HTTP response."""

    # Not a dataclass: in the compiled build a dataclass's generated __init__ stays
    # interpreted Python, and every request makes a Reply.
    __slots__ = ("body", "code", "content_type", "headers", "identity", "status")

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        headers: list[tuple[str, str]] | None = None,
        content_type: str | None = JSON,
        code: str | None = None,
        identity: Identity | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.headers: list[tuple[str, str]] = [] if headers is None else headers
        self.content_type = content_type
        #: The error code of an error reply (counted in the metrics), None for a success.
        self.code = code
        #: Who sent the request, when its token was valid: the connection has authenticated.
        self.identity = identity

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.body!r}, code={self.code!r})"


def error_reply(error: BrokerError, status: int | None = None) -> Reply:
    """``{"error": {"code", "message"}}`` with the error's ``http_status`` (or ``status``)."""
    body = orjson.dumps({"error": {"code": error.code, "message": error.message}})
    return Reply(status or error.http_status, body, code=error.code)


#: ``answer(seqs, duplicate, error)``: how ``Server.submit`` reports a publish, once.
Answer = Callable[[tuple[int, ...] | None, bool, BrokerError | None], None]


class Server(Interface):
    """What the HTTP API uses of the server (``BrokerServer`` is one): the same
    verifier, store, hub and publish path as its WebSocket connections."""

    @property
    def config(self) -> ServerConfig:
        """The settings: allowed origins, the rate limit."""

    @property
    def metrics(self) -> Metrics:
        """Where errors and rate-limited requests are counted."""

    @property
    def verifier(self) -> TokenVerifier:
        """Checks the bearer tokens."""

    @property
    def draining(self) -> bool:
        """Shutting down: publishes are refused."""

    @property
    def store(self) -> Store:
        """The history."""

    @property
    def hub(self) -> Hub:
        """Subscriptions and presence on this node, and the last seq fanned out."""

    @property
    def cluster(self) -> Cluster | None:
        """In cluster mode, presence and stats of every node."""

    def publish_hooked(self, topics: list[str]) -> bool:
        """Whether a publish to any of ``topics`` may ask the ``publish`` hook."""

    def submit(
        self,
        identity: Identity,
        topics: list[str],
        data: bytes,
        key: str | None,
        answer: Answer,
        rewritten: dict[str, bytes] | None = None,
    ) -> None:
        """Publish ``data`` to ``topics`` (already checked) as one publish."""

    async def catch_up(self, seq: int) -> None:
        """Wait (briefly) until this node has fanned out ``seq``."""

    async def check_publish(
        self, identity: Identity, topics: list[str], data: bytes, key: str | None
    ) -> dict[str, bytes]:
        """Ask the ``publish`` hook about the topics it selects: the data it gave some
        instead; raises its refusal."""

    async def check_subscribe(self, identity: Identity, pattern: str) -> None:
        """Ask the ``subscribe`` hook about ``pattern`` when it selects it."""

    def stats(self) -> dict[str, Any]:
        """This node's figures."""


class HttpApi:
    """Answers ``/api/`` requests for one server."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    # -- entry points ------------------------------------------------------------------

    def origin_allowed(self, request: HttpRequest) -> tuple[bool, str | None]:
        """Whether the request's ``Origin`` (if any) is allowed, and that origin."""
        origins = request.header("origin")
        if not origins:
            return True, None
        if len(origins) > 1:  # a header sent twice is refused as a whole
            return False, None
        # The same rule as /ws, the broker's own origin included.
        allowed = self.server.config.allowed_origins
        if not origin_allowed(origins, request.header("host"), allowed):
            return False, None
        return True, origins[0]

    async def handle(self, request: HttpRequest) -> Reply:
        """The reply to one ``/api/`` request (never raises)."""
        allowed, origin = self.origin_allowed(request)
        if not allowed:
            reply = error_reply(Forbidden("origin not allowed"))
        else:
            try:
                reply = await self._route(request)
            except BrokerError as exc:
                reply = error_reply(exc)
        return self._finished(reply, allowed, origin)

    def publish_now(self, request: HttpRequest, finish: Callable[[Reply], None]) -> bool:
        """Answer a ``POST /api/publish`` that no hook asks about without a task:
        ``finish(reply)`` once it is recorded or refused. False (nothing done) for any
        other request, which ``handle`` answers."""
        if request.path != "/api/publish" or request.method != "POST":
            return False
        allowed, origin = self.origin_allowed(request)
        identity: Identity | None = None
        try:
            if not allowed:
                raise Forbidden("origin not allowed")
            identity = self._authenticate(request)
            topics, batch, data, key = self._publish_body(request)
            server = self.server
            if server.publish_hooked(topics):
                return False
            self._may_publish(identity, topics)
        except BrokerError as exc:
            reply = error_reply(exc)
            reply.identity = identity
            finish(self._finished(reply, allowed, origin))
            return True
        sender = identity

        def done(seqs: tuple[int, ...] | None, duplicate: bool, error: BrokerError | None) -> None:
            if error is not None or seqs is None:
                reply = error_reply(error or Unavailable("not recorded"))
            else:
                reply = _published(seqs, duplicate, batch)
            reply.identity = sender
            finish(self._finished(reply, allowed, origin))

        server.submit(identity, topics, data, key, done)
        return True

    def _finished(self, reply: Reply, allowed: bool, origin: str | None) -> Reply:
        """``reply`` with its CORS headers, its error counted."""
        if allowed and origin is not None:
            reply.headers += [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
        if reply.code is not None:
            self.server.metrics.error(reply.code)
        return reply

    async def _route(self, request: HttpRequest) -> Reply:
        methods = ROUTES.get(request.path)
        if methods is None:
            return error_reply(BadRequest(f"no such API path: {request.path}"), 404)
        if request.method == "OPTIONS":
            return Reply(
                204,
                headers=[
                    ("Access-Control-Allow-Methods", ", ".join((*methods, "OPTIONS"))),
                    ("Access-Control-Allow-Headers", "Authorization, Content-Type"),
                    ("Access-Control-Max-Age", "600"),
                    ("Allow", ", ".join((*methods, "OPTIONS"))),
                ],
                content_type=None,
            )
        if request.method not in methods:
            reply = error_reply(
                BadRequest(f"{request.path} takes {' or '.join(methods)}, not {request.method}"),
                405,
            )
            reply.headers.append(("Allow", ", ".join((*methods, "OPTIONS"))))
            return reply
        identity = self._authenticate(request)
        try:
            reply = await self._authenticated(identity, request)
        except BrokerError as exc:
            reply = error_reply(exc)
        reply.identity = identity
        return reply

    async def _authenticated(self, identity: Identity, request: HttpRequest) -> Reply:
        if request.path == "/api/publish":
            return await self._publish(identity, request)
        query = self._query(request)
        if request.path == "/api/history":
            return await self._history(identity, query)
        if request.path == "/api/presence":
            return await self._presence(identity, query)
        return await self._stats(identity)

    # -- parts -------------------------------------------------------------------------

    def _authenticate(self, request: HttpRequest) -> Identity:
        values = request.header("authorization")
        if not values:
            raise Unauthorized("an 'Authorization: Bearer <token>' header is required")
        if len(values) > 1:
            raise Unauthorized("more than one Authorization header")
        # The verifier remembers a verified token until its exp, for WebSocket handshakes
        # and requests alike: a backend sends the same token with every request.
        return self.server.verifier.verify(parse_bearer(values[0]))

    @staticmethod
    def _query(request: HttpRequest) -> dict[str, str]:
        try:
            parsed = parse_qs(
                request.query, keep_blank_values=True, strict_parsing=False, errors="strict"
            )
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("the query string is not valid") from None
        out: dict[str, str] = {}
        for name, values in parsed.items():
            if len(values) > 1:
                raise BadRequest(f"{name!r} is given more than once")
            out[name] = values[0]
        return out

    @staticmethod
    def _count(query: dict[str, str], name: str) -> int | None:
        raw = query.get(name)
        if raw is None:
            return None
        if not raw.isascii() or not raw.isdigit():
            raise BadRequest(f"{name!r} must be a non-negative integer")
        return int(raw)

    @staticmethod
    def _flag(query: dict[str, str], name: str) -> bool:
        raw = query.get(name)
        if raw is None or raw in ("false", "0"):
            return False
        if raw in ("true", "1"):
            return True
        raise BadRequest(f"{name!r} must be true, false, 1 or 0")

    def _rate(self, identity: Identity, units: int) -> None:
        rate = self.server.config.rate_limit
        if rate is None:
            return
        bucket = self._buckets.get(identity.id)
        if bucket is None:
            bucket = self._buckets[identity.id] = TokenBucket(rate)
            if len(self._buckets) > MAX_BUCKETS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(identity.id)
        if not bucket.allow(cost=units):
            self.server.metrics.rate_limited += 1
            raise RateLimited("publish rate limit exceeded")

    @staticmethod
    def _publish_body(request: HttpRequest) -> tuple[list[str], bool, bytes, str | None]:
        """The topics, whether a batch (``topics``), the data and the key of a publish."""
        types = request.header("content-type")
        kind = types[0].split(";", 1)[0].strip().lower() if len(types) == 1 else ""
        if kind != JSON:
            raise BadRequest("the body must be JSON (Content-Type: application/json)")
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            raise BadRequest("the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        if "data" not in body:
            raise BadRequest("'data' is required")
        if ("topic" in body) == ("topics" in body):
            raise BadRequest("give exactly one of 'topic' and 'topics'")
        if "topic" in body:
            topics = [validate_topic(body["topic"])]
        else:
            raw = body["topics"]
            if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_TOPICS:
                raise BadRequest(f"'topics' must be a list of 1 to {MAX_TOPICS} topics")
            topics = [validate_topic(t) for t in raw]
            if len(set(topics)) != len(topics):
                raise BadRequest("'topics' must not repeat a topic")
        key = parse_key(body)
        return topics, "topics" in body, kept_bytes(orjson.dumps(body["data"])), key

    def _may_publish(self, identity: Identity, topics: list[str]) -> None:
        """Raise why ``identity`` may not publish to ``topics`` now, if it may not."""
        if self.server.draining:
            raise Unavailable("the broker is shutting down")
        for topic in topics:  # the whole batch first: nothing is published on a refusal
            identity.check_publish(topic)
        self._rate(identity, len(topics))

    async def _publish(self, identity: Identity, request: HttpRequest) -> Reply:
        topics, batch, data, key = self._publish_body(request)
        server = self.server
        self._may_publish(identity, topics)
        rewritten = await server.check_publish(identity, topics, data, key)
        answer: asyncio.Future[tuple[tuple[int, ...], bool]] = (
            asyncio.get_running_loop().create_future()
        )

        def done(seqs: tuple[int, ...] | None, duplicate: bool, error: BrokerError | None) -> None:
            if answer.done():
                return
            if error is not None:
                answer.set_exception(error)
            else:
                assert seqs is not None
                answer.set_result((seqs, duplicate))

        server.submit(identity, topics, data, key, done, rewritten)
        seqs, duplicate = await answer
        return _published(seqs, duplicate, batch)

    async def _history(self, identity: Identity, query: dict[str, str]) -> Reply:
        pattern = validate_pattern(query.get("topic"))
        last, since = self._count(query, "last"), self._count(query, "since")
        if last is not None and since is not None:
            raise BadRequest("'since' and 'last' cannot be used together")
        latest = self._flag(query, "latest")
        if latest and (last is not None or since is not None):
            raise BadRequest("'latest' cannot be used with 'since' or 'last'")
        epoch = query.get("epoch")
        identity.check_subscribe(pattern)
        server = self.server
        await server.check_subscribe(identity, pattern)
        store = server.store
        if store.shared and since is not None and epoch in (None, store.epoch):
            await server.catch_up(since)
        upto = server.hub.last_seq
        recovered = True
        # Read a page at a time, up to one message more than a response holds (in count or
        # in bytes): the memory a request takes is bounded by that, not by the history it
        # could cover.
        visible: list[Message] = []
        size = 0
        try:
            if latest:
                found = await store.latest(pattern, upto, visible=identity.may_receive)
                pages: Pages = ListPages(found, upto, True, PAGE + 1)
            elif since is not None:
                if (epoch is not None and epoch != store.epoch) or since > upto:
                    since, recovered = 0, False
                pages = await store.replay(pattern, since=since, upto=upto, page_size=READ_PAGE)
                recovered = recovered and pages.recovered
            else:
                pages = await store.replay(pattern, last=last or 0, upto=upto, page_size=READ_PAGE)
            while len(visible) <= PAGE and size <= PAGE_BYTES:
                chunk = await pages.next()
                if not chunk:
                    break
                for m in chunk:
                    if identity.may_receive(m.topic):
                        visible.append(m)
                        size += len(m.frame)
        except BrokerError:
            raise
        except Exception:
            raise Unavailable("history cannot be read now; retry later") from None
        # A gap (retention removed some before they were read): "more", and the next
        # request (since = the last seq returned) answers recovered: false.
        page = visible[:PAGE]
        taken = 0
        for n, m in enumerate(page):
            taken += len(m.frame)
            if taken > PAGE_BYTES and n:
                page = page[:n]
                break
        more = len(visible) > len(page) or pages.gap
        body = b"".join(
            (
                b'{"seq":',
                str(upto).encode(),
                b',"epoch":',
                orjson.dumps(store.epoch),
                b',"recovered":',
                b"true" if recovered else b"false",
                b',"messages":[',
                b",".join(_message_json(m) for m in page),
                b'],"more":',
                b"true" if more else b"false",
                b"}",
            )
        )
        return Reply(200, body)

    async def _presence(self, identity: Identity, query: dict[str, str]) -> Reply:
        topic = validate_pattern(query.get("topic"))
        if is_pattern(topic):
            raise BadRequest("presence takes a topic, not a pattern")
        identity.check_subscribe(topic)
        server = self.server
        users = server.hub.presence(topic)
        if server.cluster is not None:
            users = await server.cluster.presence(topic, users)
        return Reply(200, orjson.dumps({"users": users}))

    async def _stats(self, identity: Identity) -> Reply:
        if not identity.admin:
            raise Forbidden("stats needs an admin token")
        server = self.server
        figures = server.stats()
        if server.cluster is not None:
            figures = await server.cluster.stats(figures)
        return Reply(200, orjson.dumps(figures))


def _published(seqs: tuple[int, ...], duplicate: bool, batch: bool) -> Reply:
    """The answer to a recorded publish. A retry gets the shape of its own request; a key
    reused for a publish of another size gets the first publish's seqs as they were."""
    if not batch and len(seqs) == 1:
        body = b'{"seq":%d,"duplicate":true}' if duplicate else b'{"seq":%d}'
        return Reply(200, body % seqs[0])
    out: dict[str, Any] = {"seqs": list(seqs)}
    if duplicate:
        out["duplicate"] = True
    return Reply(200, orjson.dumps(out))


def _message_json(msg: Message) -> bytes:
    """A message as the fields of its ``msg`` frame, without ``op``."""
    return msg.body
