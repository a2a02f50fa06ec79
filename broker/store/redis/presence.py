"""Presence and ``stats`` over every node of a cluster, and this node's heartbeat."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from redis.exceptions import RedisError

from broker.core.backoff import Backoff
from broker.core.hub import Hub
from broker.core.topics import is_pattern
from broker.errors import Unavailable
from broker.store.redis.codec import to_str
from broker.store.redis.link import Link
from broker.store.redis.scripts import script

log = logging.getLogger("broker.store.redis")

#: Seconds between heartbeats; a node whose heartbeat key expired is swept.
HEARTBEAT_INTERVAL = 1.5
HEARTBEAT_TTL_MS = 5000
#: How long shutdown waits for the presence loops to stop (seconds).
CLOSE_WAIT = 2.0
#: Figures of ``stats`` that are summed over the nodes.
SUMMED = ("connections", "subscriptions", "messages_in", "messages_out", "bytes_in", "bytes_out")


class Cluster:
    """Presence and ``stats`` over every node, and this node's heartbeat.

    The hub reports a user's first and last local subscription to a topic through
    ``on_presence``; the exact local connection counts are written with absolute values
    (so retries and resyncs are idempotent) by one writer task, and compared with the hub
    at every heartbeat to catch counts that changed without a join or leave. Join/leave
    reach local watchers through the Redis ``events`` channel, like everyone else's.
    """

    def __init__(self, link: Link, prefix: str, node_id: str) -> None:
        self.link = link
        self.redis = link.redis
        self.prefix = prefix
        self.node_id = node_id
        self.hub: Hub | None = None
        self.figures: Callable[[], Mapping[str, Any]] = dict
        self._set = self.redis.register_script(script("set_presence"))
        self._sweep = self.redis.register_script(script("sweep"))
        self._presence = self.redis.register_script(script("presence"))
        self._nodes = self.redis.register_script(script("nodes"))
        # (topic, user) whose count must be written; what Redis holds for this node.
        self._dirty: set[tuple[str, str]] = set()
        self._written: dict[tuple[str, str], int] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        #: Called with (op, topic, user) for each cluster-wide join/leave that this node's
        #: writes caused (each one on exactly one node), when set: the hook events.
        self.on_transition: Callable[[str, str, dict[str, str]], None] | None = None

    def make_hub(self, figures: Callable[[], Mapping[str, Any]]) -> Hub:
        """The node's hub, with presence made cluster-wide; ``figures`` gives the node's
        ``stats`` figures for its heartbeat."""
        self.hub = Hub(self.on_presence)
        self.hub.on_rename = self.on_rename
        self.figures = figures
        return self.hub

    def on_presence(self, op: str, topic: str, user: dict[str, str]) -> None:
        """The hub's presence listener: queue the change for the writer task."""
        self._dirty.add((topic, user["id"]))
        self._wake.set()

    def on_rename(self, topic: str, user_id: str) -> None:
        """A user present on ``topic`` has a new name (a refreshed token): rewrite it."""
        self._dirty.add((topic, user_id))
        self._wake.set()

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        await self._heartbeat()
        loop = asyncio.get_running_loop()
        for job in (self._heartbeat_loop(), self._writer_loop(), self._events_loop()):
            self._tasks.append(loop.create_task(job))

    async def close(self) -> None:
        """Stop, and drop this node's presence entries (leaves go out for users who had
        no other node) and its heartbeat."""
        # redis-py's PubSub.get_message can swallow a cancellation and return None: the
        # events loop also stops on this flag, within its 1 s read timeout.
        self._closing = True
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        # redis-py can swallow a cancellation in the middle of a command, and the task then
        # goes on to its next await: the loops also stop on the flag, and shutdown waits for
        # them a bounded time rather than forever.
        done, pending = await asyncio.wait(self._tasks, timeout=CLOSE_WAIT)
        for task in done:
            if not task.cancelled():
                task.exception()  # retrieved: a loop that failed while stopping says nothing
        for task in pending:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._sweep(args=[self.prefix, self.node_id]), 2.0)

    # -- heartbeat --------------------------------------------------------------------------

    def _node_figures(self) -> bytes:
        figures = self.figures()
        return orjson.dumps({k: figures.get(k, 0) for k in SUMMED})

    async def _heartbeat(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(
            self.prefix + "node:" + self.node_id,
            self._node_figures(),
            px=HEARTBEAT_TTL_MS,
            get=True,
        )
        pipe.sadd(self.prefix + "nodes", self.node_id)
        await self._sweep(args=[self.prefix, ""], client=pipe)
        previous, _, _ = await self.link.call("heartbeat", pipe.execute())
        if previous is None and self._written:
            # Our entries were swept (heartbeat missed) or Redis started over: rewrite all.
            log.warning(
                "presence entries lost in Redis; writing them again",
                extra={"event": "presence_resync"},
            )
            self._written.clear()
        self._sync()

    async def _heartbeat_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            try:
                await self._heartbeat()
            except Unavailable:
                pass  # Health logged it
            except Exception:
                log.exception("cluster heartbeat failed", extra={"event": "heartbeat_failed"})

    def _local(self, topic: str) -> dict[str, tuple[str, int]]:
        assert self.hub is not None
        return {
            str(u["id"]): (str(u["name"]), int(u["connections"]))  # type: ignore[call-overload]
            for u in self.hub.presence(topic)
        }

    def _sync(self) -> None:
        """Mark every (topic, user) whose local count differs from what Redis holds."""
        if self.hub is None:
            return
        seen: set[tuple[str, str]] = set()
        for pattern, _ in self.hub.index.patterns():
            if is_pattern(pattern):
                continue
            for uid, (_, count) in self._local(pattern).items():
                seen.add((pattern, uid))
                if self._written.get((pattern, uid)) != count:
                    self._dirty.add((pattern, uid))
        self._dirty.update(k for k in self._written if k not in seen)
        if self._dirty:
            self._wake.set()

    # -- writing presence -------------------------------------------------------------------

    async def _writer_loop(self) -> None:
        backoff = Backoff(0.1, 2.0, jitter=False)
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            try:
                while self._dirty:
                    await self._write_some()
                backoff.reset()
            except Unavailable:
                await asyncio.sleep(backoff.next())  # Health logged it; the keys are dirty again
                self._wake.set()
            except Exception:
                log.exception(
                    "writing presence to Redis failed", extra={"event": "presence_failed"}
                )
                await asyncio.sleep(backoff.next())
                self._wake.set()

    async def _write_some(self, limit: int = 1000) -> None:
        """Write the current local counts of up to ``limit`` dirty (topic, user) pairs."""
        batch = [self._dirty.pop() for _ in range(min(limit, len(self._dirty)))]
        local: dict[str, dict[str, tuple[str, int]]] = {}
        args: list[Any] = [self.prefix, self.node_id]
        values: list[tuple[tuple[str, str], int]] = []
        for topic, uid in batch:
            users = local.get(topic)
            if users is None:
                users = local[topic] = self._local(topic)
            name, count = users.get(uid, ("", 0))
            values.append(((topic, uid), count))
            args += (topic, uid, name, count)
        try:
            changes = await self.link.call("presence", self._set(args=args))
        except BaseException:
            self._dirty.update(batch)
            raise
        if changes and self.on_transition is not None:
            for op, topic, uid, name in orjson.loads(changes):
                self.on_transition(op, topic, {"id": uid, "name": name})
        for key, count in values:
            if count:
                self._written[key] = count
            else:
                self._written.pop(key, None)

    # -- events -----------------------------------------------------------------------------

    async def _events_loop(self) -> None:
        backoff = Backoff(0.1, 2.0, jitter=False)
        while not self._closing:
            pubsub = self.link.blocking.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.prefix + "events")
                backoff.reset()
                while not self._closing:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._announce(message["data"])
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self.link.health.failed("presence events", exc)
                await asyncio.sleep(backoff.next())
            finally:
                # A typed alias: redis-py types aclose in some releases and not in others.
                close: Callable[[], Awaitable[object]] = pubsub.aclose
                with contextlib.suppress(Exception):
                    await close()

    def _announce(self, raw: bytes) -> None:
        try:
            op, topic, uid, name = orjson.loads(raw)
        except (orjson.JSONDecodeError, ValueError, TypeError):
            log.warning(
                "ignoring a malformed presence event", extra={"event": "bad_presence_event"}
            )
            return
        if self.hub is not None and op in ("join", "leave"):
            self.hub.announce(op, topic, {"id": uid, "name": name})

    # -- answers ----------------------------------------------------------------------------

    async def presence(self, topic: str, local: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The ``presence`` answer for ``topic``: this node's ``local`` entries (exact
        counts) plus those of every other live node."""
        raw = await self.link.call(
            "presence", self._presence(args=[self.prefix, topic, self.node_id])
        )
        users = {u["id"]: dict(u) for u in local}
        for i in range(0, len(raw), 3):
            uid, name, count = to_str(raw[i]), to_str(raw[i + 1]), int(raw[i + 2])
            entry = users.setdefault(uid, {"id": uid, "name": name, "connections": 0})
            entry["connections"] += count
        return [users[uid] for uid in sorted(users)]

    async def stats(self, local: dict[str, Any]) -> dict[str, Any]:
        """The ``stats`` answer: ``local`` (this node's figures) with the SUMMED figures
        added up over every live node, plus ``node`` (this node's id) and ``nodes``."""
        raw = await self.link.call("stats", self._nodes(args=[self.prefix]))
        nodes = [{"id": self.node_id, **{k: local.get(k, 0) for k in SUMMED}}]
        for i in range(0, len(raw), 2):
            node = to_str(raw[i])
            if node != self.node_id:
                try:
                    nodes.append({"id": node, **orjson.loads(raw[i + 1])})
                except orjson.JSONDecodeError:
                    continue
        out = dict(local)
        for k in SUMMED:
            out[k] = sum(int(n.get(k, 0)) for n in nodes)
        out["node"] = self.node_id
        out["nodes"] = sorted(nodes, key=lambda n: str(n["id"]))
        return out
