"""One place where Redis failures become ``Unavailable``, and outages are logged once."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from broker.errors import Unavailable

log = logging.getLogger("broker.store.redis")

T = TypeVar("T")

#: While Redis is down, how often a request may try it (others are refused at once).
PROBE_INTERVAL = 0.25


def redis_label(client: aioredis.Redis) -> str:
    """host:port/db of a client, never its password."""
    kw = client.connection_pool.connection_kwargs
    where = kw.get("path") or f"{kw.get('host', '?')}:{kw.get('port', '?')}"
    return f"redis {where}/{kw.get('db', 0)}"


class EpochChanged(Exception):
    """The append script found another epoch in Redis than this node's."""


class Health:
    """Whether Redis answers: logs once when an outage starts and once when it ends."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.down_since: float | None = None
        self.last_try = 0.0

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def failed(self, what: str, exc: BaseException) -> None:
        self.last_try = time.monotonic()
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning(
                "%s unreachable (%s failed: %s); refusing publishes until it is back",
                self.label,
                what,
                str(exc) or type(exc).__name__,
                extra={"event": "redis_down"},
            )

    def ok(self) -> None:
        self.last_try = time.monotonic()
        if self.down_since is not None:
            log.info(
                "%s is back after %.1fs",
                self.label,
                time.monotonic() - self.down_since,
                extra={"event": "redis_up"},
            )
            self.down_since = None

    def check(self) -> None:
        """Refuse at once while Redis is down and was tried very recently."""
        if self.down and time.monotonic() - self.last_try < PROBE_INTERVAL:
            raise Unavailable("the cluster store (Redis) is unreachable; retry later")


class Link:
    """This node's connections to Redis; every round trip goes through ``call``."""

    def __init__(self, url: str, block_seconds: float) -> None:
        # One immediate retry: a pooled connection may be stale after a Redis restart.
        # No more, so that an unreachable Redis is reported within ~2 s.
        common: dict[str, Any] = {
            "socket_connect_timeout": 1.0,
            "retry": Retry(NoBackoff(), 1),
        }
        self.redis = aioredis.Redis.from_url(url, socket_timeout=2.0, **common)
        #: Blocking reads (XREAD BLOCK, pub/sub) get connections of their own.
        self.blocking = aioredis.Redis.from_url(url, socket_timeout=block_seconds + 2.0, **common)
        self.health = Health(redis_label(self.redis))
        #: Called with the seconds each Redis round trip took (metrics), when set.
        self.observe_roundtrip: Callable[[float], None] | None = None

    async def call(self, what: str, awaitable: Awaitable[T]) -> T:
        """Await one Redis round trip: timed, and mapped to ``Unavailable`` on failure."""
        started = time.perf_counter()
        try:
            result = await awaitable
        except ResponseError as exc:
            if str(exc).startswith("EPOCH"):
                raise EpochChanged(str(exc)) from None
            self.health.failed(what, exc)
            raise Unavailable(
                "the cluster store (Redis) cannot take this now; retry later"
            ) from exc
        except (RedisError, OSError) as exc:
            self.health.failed(what, exc)
            raise Unavailable(
                "the cluster store (Redis) cannot take this now; retry later"
            ) from exc
        self.health.ok()
        if self.observe_roundtrip is not None:
            self.observe_roundtrip(time.perf_counter() - started)
        return result
