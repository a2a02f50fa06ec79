"""This node's connections to Redis: the URL forms, and one place for every round trip.

Two URL forms name the Redis primary:

* ``redis://[user:password@]host:port/db`` (also ``rediss://``, ``unix://``): one address.
  When it is a managed primary endpoint (a DNS name that a cloud service moves to the new
  primary on failover), every new connection resolves the name again, and a connection
  that finds a replica behind it (``READONLY``) closes every pooled connection, so that the
  next ones reach the new primary.
* ``redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]`` (also
  ``rediss+sentinel://``): Sentinel. The node asks the sentinels which server is the
  primary of ``service``, and asks again whenever a connection fails or finds a replica.
  The password is the Redis servers'; the sentinels are reached without one.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ReadOnlyError, RedisError, ResponseError

from broker.errors import ConfigError, Unavailable
from broker.store.redis.health import EpochChanged, Health, HistoryWentBack, ServerChanged

T = TypeVar("T")

#: URL schemes of the Sentinel form.
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
#: Every URL scheme a node accepts.
SCHEMES = ("redis", "rediss", "unix", *SENTINEL_SCHEMES)
DEFAULT_SENTINEL_PORT = 26379
#: The scripts' own error answers: another epoch in Redis, a counter behind this node, or
#: another Redis server than the one recorded with the epoch.
_SCRIPT_ANSWER = re.compile(r"(?:^|error: )(EPOCH|BEHIND|SERVER) (\S+)\s*$")


@dataclass(frozen=True)
class SentinelURL:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: list[tuple[str, int]]
    service: str
    db: int
    username: str | None
    password: str | None
    tls: bool


def parse_sentinel_url(url: str) -> SentinelURL:
    """The parts of ``redis+sentinel://[user:pass@]h:p[,h:p...]/service[/db]``;
    ConfigError with what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in SENTINEL_SCHEMES:
        raise ConfigError(f"{url!r} is not a redis+sentinel:// URL")
    auth, _, hosts = parts.netloc.rpartition("@")
    username = password = None
    if auth:
        user, _, secret = auth.partition(":")
        username, password = unquote(user) or None, unquote(secret) or None
    sentinels: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "")
        host = host.strip("[]")
        if not host:
            raise ConfigError(f"{url!r}: a sentinel address is empty")
        try:
            sentinels.append((host, int(port) if port else DEFAULT_SENTINEL_PORT))
        except ValueError:
            raise ConfigError(f"{url!r}: {item!r} is not host:port") from None
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ConfigError(f"{url!r}: expected /service or /service/db after the sentinels")
    try:
        db = int(path[1]) if len(path) == 2 else 0
    except ValueError:
        raise ConfigError(f"{url!r}: the database {path[1]!r} is not a number") from None
    return SentinelURL(
        sentinels, unquote(path[0]), db, username, password, parts.scheme.startswith("rediss")
    )


def check_url(url: str) -> None:
    """ConfigError when ``url`` is not a Redis URL a node can use."""
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        raise ConfigError(
            f"{url!r} is not a Redis URL (redis://, rediss://, unix:// or "
            "redis+sentinel://host:26379/service/db)"
        )
    if scheme in SENTINEL_SCHEMES:
        parse_sentinel_url(url)


def describe(url: str) -> str:
    """Where ``url`` points, for the logs: host:port/db or the Sentinel service, never
    a password."""
    parts = urlsplit(url)
    if parts.scheme in SENTINEL_SCHEMES:
        s = parse_sentinel_url(url)
        first = f"{s.sentinels[0][0]}:{s.sentinels[0][1]}"
        more = f" (+{len(s.sentinels) - 1})" if len(s.sentinels) > 1 else ""
        return f"redis sentinel {first}{more} {s.service}/{s.db}"
    if parts.scheme == "unix":
        return f"redis {parts.path}"
    db = parts.path.strip("/") or "0"
    return f"redis {parts.hostname or '?'}:{parts.port or 6379}/{db}"


def _client(url: str, socket_timeout: float, common: dict[str, Any]) -> aioredis.Redis:
    if urlsplit(url).scheme not in SENTINEL_SCHEMES:
        return aioredis.Redis.from_url(url, socket_timeout=socket_timeout, **common)
    s = parse_sentinel_url(url)
    sentinel = Sentinel(
        s.sentinels,
        sentinel_kwargs={"socket_timeout": 1.0, "socket_connect_timeout": 1.0},
        socket_timeout=socket_timeout,
        **common,
    )
    extra: dict[str, Any] = {"db": s.db, "username": s.username, "password": s.password}
    if s.tls:
        from redis.asyncio.sentinel import SentinelManagedSSLConnection

        extra["connection_class"] = SentinelManagedSSLConnection
    client: aioredis.Redis = sentinel.master_for(s.service, **extra)
    return client


class Link:
    """This node's connections to Redis; every round trip goes through ``call``."""

    def __init__(self, url: str, block_seconds: float, command_seconds: float = 2.0) -> None:
        # One immediate retry: a pooled connection may be stale after a Redis restart.
        # No more, so that an unreachable Redis is reported within ~2 s.
        common: dict[str, Any] = {
            "socket_connect_timeout": 1.0,
            "retry": Retry(NoBackoff(), 1),
        }
        self.redis = _client(url, command_seconds, common)
        #: Blocking reads (XREAD BLOCK, pub/sub) get connections of their own.
        self.blocking = _client(url, block_seconds + 2.0, common)
        self.health = Health(describe(url))
        #: Called with the seconds each Redis round trip took (metrics), when set.
        self.observe_roundtrip: Callable[[float], None] | None = None

    async def call(self, what: str, awaitable: Awaitable[T]) -> T:
        """Await one Redis round trip: timed, and mapped to ``Unavailable`` on failure."""
        started = time.perf_counter()
        try:
            result = await awaitable
        except ReadOnlyError as exc:
            # The address now leads to a replica (a managed endpoint mid-failover): drop
            # the pooled connections so that new ones resolve the name again.
            await self.reset()
            self.health.failed(what, exc)
            raise Unavailable("the cluster store (Redis) is failing over; retry later") from exc
        except ResponseError as exc:
            # In a pipeline redis-py puts "Command # n (...) of pipeline caused error: "
            # in front of the script's answer.
            found = _SCRIPT_ANSWER.search(str(exc))
            if found and found[1] == "EPOCH":
                raise EpochChanged(found[2]) from None
            if found and found[1] == "BEHIND":
                raise HistoryWentBack(int(found[2])) from None
            if found and found[1] == "SERVER":
                raise ServerChanged(found[2]) from None
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

    async def reset(self) -> None:
        """Close every pooled connection; the next command opens new ones."""
        for client in (self.redis, self.blocking):
            with contextlib.suppress(Exception):
                await client.connection_pool.disconnect()

    async def close(self) -> None:
        for client in (self.blocking, self.redis):
            with contextlib.suppress(Exception):
                await client.aclose()
