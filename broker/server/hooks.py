"""Calling the application's backend: the hooks of section 12, over HTTP.

One pooled keep-alive ``aiohttp.ClientSession`` per server (aiohttp rather than httpx:
about a tenth of the CPU per call here), at most ``concurrency`` calls in flight and
``queue`` more waiting (past that a call fails at once with ``unavailable``),
each bounded by ``timeout``. ``connect``, ``subscribe`` and ``publish`` are awaited by the
one connection or request that asked (other connections go on meanwhile); ``events`` are
queued and sent in batches by one task, in order, retried with backoff while the backend
fails, from a bounded queue whose overflow is counted and logged once per interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import aiohttp

from broker.core import hooks as core
from broker.core.auth import Identity
from broker.core.backoff import Backoff
from broker.core.hooks import ConnectAnswer, HookSettings
from broker.core.model import now_ms
from broker.errors import Unavailable
from broker.server.metrics import Metrics

log = logging.getLogger("broker.hooks")

#: Seconds between two log lines about dropped events or a failing events backend.
LOG_INTERVAL = 10.0
#: Longest pause between two attempts to send events while the backend fails.
MAX_BACKOFF = 5.0


class Hooks:
    """The hooks of one server (``settings``), counted in ``metrics``."""

    def __init__(self, settings: HookSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._secret = settings.secret or ""
        self._client: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._waiting = 0
        self._events: deque[dict[str, Any]] = deque()
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._dropped_since_log = 0
        self._logged: dict[str, float] = {}  # log event -> when last written
        metrics.hook_events_queued = lambda: len(self._events)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Open the HTTP client and start the events sender (when ``events`` is set)."""
        size = self.settings.concurrency
        self._client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=size, limit_per_host=size),
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout),
            trust_env=False,
            auto_decompress=False,
        )
        if self.settings.events:
            self._sender = asyncio.get_running_loop().create_task(self._send_events())

    async def close(self, timeout: float = 2.0) -> None:
        """Send what events are queued (for at most ``timeout`` seconds), then close."""
        deadline = time.monotonic() + timeout
        while self._events and self._sender is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(BaseException):
                await self._sender
        if self._events:
            log.warning(
                "%d hook events not sent at shutdown",
                len(self._events),
                extra={"event": "hook_events_lost"},
            )
        if self._client is not None:
            await self._client.close()

    # -- calls ------------------------------------------------------------------------------

    async def call(self, name: str, body: bytes) -> tuple[int, bytes]:
        """POST ``body`` to hook ``name``, signed: the answer's status and body.
        ``Unavailable`` when the queue is full, on a timeout or a connection error."""
        url = self.settings.url(name)
        assert url is not None and self._client is not None
        metrics = self.metrics
        if self._slots.locked() and self._waiting >= self.settings.queue:
            metrics.hook_calls[name] += 1
            metrics.hook_failures[name] += 1
            raise Unavailable("too many calls to the application's backend wait; retry later")
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        started = time.perf_counter()
        metrics.hook_calls[name] += 1
        try:
            headers = {
                "Content-Type": "application/json",
                core.SIGNATURE: core.sign(self._secret, body),
            }
            # The session's timeout bounds the whole call, the answer's body included.
            async with self._client.post(
                url, data=body, headers=headers, allow_redirects=False
            ) as response:
                content = await response.content.read(core.MAX_ANSWER + 1)
            if len(content) > core.MAX_ANSWER:
                raise Unavailable("the application's backend answered too much")
            return response.status, content
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            metrics.hook_failures[name] += 1
            late = isinstance(exc, TimeoutError)
            reason = "no answer in time" if late else "cannot reach it"
            raise Unavailable(f"the application's backend: {reason}; retry later") from None
        except Unavailable:
            metrics.hook_failures[name] += 1
            raise
        finally:
            metrics.hook_seconds[name].observe(time.perf_counter() - started)
            self._slots.release()

    async def connect(
        self, transport: str, headers: Mapping[str, str], remote_addr: str
    ) -> ConnectAnswer:
        """Ask the ``connect`` hook who a connection without a token is; a failed call
        admits nothing."""
        body = core.connect_body(transport, headers, remote_addr)
        try:
            status, answer = await self.call("connect", body)
        except Unavailable as exc:
            return ConnectAnswer(message=exc.message)
        return core.read_connect(status, answer)

    async def check(
        self,
        name: str,
        identity: Identity,
        topic: str,
        data: bytes | None = None,
        key: str | None = None,
    ) -> bytes | None:
        """Ask the ``subscribe`` or ``publish`` hook; None: allowed as it is; bytes: the
        data to record instead. Raises ``Forbidden``, ``BadRequest`` or ``Unavailable``."""
        body = core.check_body(identity.user_json(), topic, data, key)
        status, answer = await self.call(name, body)
        if status not in (200, 400, 403):
            self.metrics.hook_failures[name] += 1
        return core.read_check(status, answer)

    # -- events -----------------------------------------------------------------------------

    def emit(
        self,
        kind: str,
        identity: Identity,
        *,
        topic: str | None = None,
        code: int | None = None,
        user: Mapping[str, str] | None = None,
    ) -> None:
        """Queue one event (never waits); dropped and counted when the queue is full."""
        if self._sender is None:
            return
        if len(self._events) >= self.settings.events_queue:
            self.metrics.hook_events_dropped += 1
            self._dropped_since_log += 1
            self._log_now(
                "hook events queue full (%d): %d events dropped",
                self.settings.events_queue,
                self._dropped_since_log,
                event="hook_events_dropped",
                reset=True,
            )
            return
        who = user if user is not None else identity.user_json()
        self._events.append(core.event(kind, who, now_ms(), topic=topic, code=code))
        self._wake.set()

    def _log_now(self, message: str, *args: Any, event: str, reset: bool = False) -> None:
        """Log at most once per ``LOG_INTERVAL`` per ``event``."""
        now = time.monotonic()
        if now - self._logged.get(event, -LOG_INTERVAL) < LOG_INTERVAL:
            return
        self._logged[event] = now
        log.warning(message, *args, extra={"event": event})
        if reset:
            self._dropped_since_log = 0

    async def _send_events(self) -> None:
        """Send the queue in order, a batch at a time; a batch leaves the queue only once
        the backend answered 2xx, so nothing is lost or reordered while it fails."""
        backoff = Backoff(0.05, MAX_BACKOFF)
        events = self._events
        while True:
            if not events:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = [events[i] for i in range(min(len(events), self.settings.events_batch))]
            try:
                status, _ = await self.call("events", core.events_body(batch))
                if not 200 <= status < 300:
                    self.metrics.hook_failures["events"] += 1
                    raise Unavailable(f"answered {status}")
            except Unavailable as exc:
                self._log_now(
                    "hook events not delivered (%s); retrying, %d queued",
                    exc.message,
                    len(events),
                    event="hook_events_retry",
                )
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            for _ in batch:
                events.popleft()
