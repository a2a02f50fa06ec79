"""Cluster mode: several broker nodes sharing one Redis (``broker serve --redis URL``).

``RedisStore`` is the shared ``Store``: one Lua script per group commit gives a batch its
seqs (``INCRBY``), records each message in its topic's history (a ZSET scored by seq) and
appends it to the ``log`` stream, atomically, so the order of seqs is the order in which
Redis ran the nodes' scripts. Every node follows the whole stream (``follow``) and fans
each message out to its own subscribers. ``Cluster`` makes presence and ``stats``
cluster-wide: per topic, each node's users in a HASH; a heartbeat key per node with a TTL,
so the entries of a node killed with ``kill -9`` are swept by the others; join/leave
events on a pub/sub channel.

Keys, under a prefix (default ``broker:``)::

    seq                 counter: the last seq assigned
    epoch               string: the name of this history (new when Redis starts over empty)
    log                 stream: every message, entry id "<seq>-1", capped (MAXLEN ~),
                        one field m = "<node> <session> <echo> <len(topic)>\n<topic><member>"
    h:<topic>           ZSET: retained messages of a topic, score = seq
    topics              SET: every topic ever published to
    trimmed             HASH: topic -> highest seq removed by retention
    p:<topic>           HASH: "<node>|<user>" -> that user's connections on that node
    pu:<topic>          HASH: user -> connections over the whole cluster
    pn:<topic>          HASH: user -> display name
    pt:<node>           HASH: topic -> number of that node's users in p:<topic>
    nodes               SET: node ids that may hold presence entries
    node:<id>           string with a TTL: the node's heartbeat and figures (JSON)
    events              pub/sub channel: presence join/leave, JSON [op, topic, user, name]

A history member (in ``h:<topic>``, and at the end of a stream entry) is binary-safe:
``b"<seq> <ts> <len(id)> <len(name)>\\n" + id + name + data`` (lengths in bytes). Lua
formats numbers with ``%.14g``, so seqs must stay below 1e14; timestamps travel as text.

Every Redis failure is mapped here, in one place, to ``Unavailable``: the journal then
answers publishes with ``error unavailable`` and the server keeps its connections. An
outage is logged once when it starts and once when it ends (``Health``).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from .errors import Unavailable
from .hub import Hub
from .protocol import Message
from .store import Deliver, Draft, Replay, Store, new_epoch
from .topics import is_pattern, matches

log = logging.getLogger("broker.cluster")

#: Every node refreshes its heartbeat this often (seconds) ...
HEARTBEAT_INTERVAL = 1.5
#: ... and is considered dead, its presence entries swept, once it is this old (ms).
HEARTBEAT_TTL_MS = 5000
#: Longest wait of one blocking XREAD (ms); also how often an idle follower checks the epoch.
BLOCK_MS = 1000
#: Stream entries read (and fanned out) per XREAD.
FOLLOW_BATCH = 2000
#: Approximate cap of the ``log`` stream: a node may fall this far behind before it has
#: to fill the gap from the per-topic histories.
STREAM_MAXLEN = 100_000
#: Topics per pipeline when reading history.
PIPELINE_CHUNK = 500
#: While Redis is known to be down, publishes are refused without trying it for this long.
PROBE_INTERVAL = 0.25
#: Figures summed over nodes in the cluster-wide ``stats``.
SUMMED = ("connections", "subscriptions", "messages_in", "messages_out", "bytes_in", "bytes_out")

# -- Lua ------------------------------------------------------------------------------------
# Keys are built from the prefix inside the scripts (standalone Redis only: a Redis Cluster
# would need every key in KEYS and one hash slot; see docs/cluster.md).

_APPEND = """
local P = ARGV[1]
local cur = redis.call('GET', P .. 'epoch')
if cur ~= ARGV[2] then
  return redis.error_reply('EPOCH ' .. tostring(cur))
end
local history = tonumber(ARGV[3])
local node = ARGV[5]
local n = tonumber(ARGV[6])
local last = redis.call('INCRBY', P .. 'seq', n)
local first = last - n + 1
local touched = {}
for i = 0, n - 1 do
  local a = 7 + i * 4
  local topic = ARGV[a]
  local seq = tostring(first + i)
  local member = seq .. ' ' .. ARGV[a + 1]
  redis.call('ZADD', P .. 'h:' .. topic, seq, member)
  if not touched[topic] then
    touched[topic] = true
    redis.call('SADD', P .. 'topics', topic)
  end
  -- One field: "<node> <session> <echo> <len(topic)>" LF topic member (see RedisStore._entry)
  redis.call('XADD', P .. 'log', 'MAXLEN', '~', ARGV[4], seq .. '-1', 'm',
    node .. ' ' .. ARGV[a + 2] .. ' ' .. ARGV[a + 3] .. ' ' .. #topic .. '\\n' .. topic .. member)
end
for topic in pairs(touched) do
  local key = P .. 'h:' .. topic
  local extra = redis.call('ZCARD', key) - history
  if extra > 0 then
    local top = redis.call('ZRANGE', key, extra - 1, extra - 1, 'WITHSCORES')[2]
    redis.call('ZREMRANGEBYRANK', key, 0, extra - 1)
    if tonumber(top) > tonumber(redis.call('HGET', P .. 'trimmed', topic) or '0') then
      redis.call('HSET', P .. 'trimmed', topic, top)
    end
  end
end
return last
"""

# The stream entries after ARGV[2] (at most ARGV[3]), concatenated as "<len>:<m field>"...
_READ_LOG = """
local entries = redis.call('XRANGE', ARGV[1] .. 'log', '(' .. ARGV[2], '+', 'COUNT', ARGV[3])
local out = {}
for i, e in ipairs(entries) do
  out[i] = #e[2][2] .. ':' .. e[2][2]
end
return table.concat(out)
"""

# Create the epoch when there is none (Redis started over empty) and make sure the seq
# counter is not below what this node has already seen, so that seqs keep increasing on
# connections that stayed open across the restart. Returns {epoch, seq}.
_ENSURE_EPOCH = """
local P = ARGV[1]
local cur = redis.call('GET', P .. 'epoch')
if not cur then
  cur = ARGV[2]
  redis.call('SET', P .. 'epoch', cur)
end
if tonumber(redis.call('GET', P .. 'seq') or '0') < tonumber(ARGV[3]) then
  redis.call('SET', P .. 'seq', ARGV[3])
end
return {cur, redis.call('GET', P .. 'seq') or '0'}
"""

# Age retention of one topic: drop the oldest members while older than the cutoff (ms).
_TRIM = """
local P, topic, cutoff = ARGV[1], ARGV[2], tonumber(ARGV[3])
local key = P .. 'h:' .. topic
local removed, top, young = 0, nil, false
while not young do
  local batch = redis.call('ZRANGE', key, removed, removed + 99)
  if #batch == 0 then break end
  for _, m in ipairs(batch) do
    local seq, ts = string.match(m, '^(%d+) (%d+) ')
    if tonumber(ts) >= cutoff then young = true break end
    removed, top = removed + 1, seq
  end
end
if removed > 0 then
  redis.call('ZREMRANGEBYRANK', key, 0, removed - 1)
  if tonumber(top) > tonumber(redis.call('HGET', P .. 'trimmed', topic) or '0') then
    redis.call('HSET', P .. 'trimmed', topic, top)
  end
end
return removed
"""

# Shared by the presence scripts: change one node's count for a user on a topic and
# publish join/leave when the user's cluster-wide total leaves or reaches zero.
_PRESENCE_LIB = """
local P = ARGV[1]
local function set_count(node, topic, user, name, count)
  local pkey = P .. 'p:' .. topic
  local field = node .. '|' .. user
  local old = tonumber(redis.call('HGET', pkey, field) or '0')
  if count == old then return end
  if count == 0 then
    redis.call('HDEL', pkey, field)
    if redis.call('HINCRBY', P .. 'pt:' .. node, topic, -1) <= 0 then
      redis.call('HDEL', P .. 'pt:' .. node, topic)
    end
  else
    redis.call('HSET', pkey, field, count)
    if old == 0 then redis.call('HINCRBY', P .. 'pt:' .. node, topic, 1) end
  end
  if count > 0 then redis.call('HSET', P .. 'pn:' .. topic, user, name) end
  local total = redis.call('HINCRBY', P .. 'pu:' .. topic, user, count - old)
  local before = total - (count - old)
  if total <= 0 then
    local shown = redis.call('HGET', P .. 'pn:' .. topic, user) or name
    redis.call('HDEL', P .. 'pu:' .. topic, user)
    redis.call('HDEL', P .. 'pn:' .. topic, user)
    if before > 0 then
      redis.call('PUBLISH', P .. 'events', cjson.encode({'leave', topic, user, shown}))
    end
  elseif before <= 0 then
    redis.call('PUBLISH', P .. 'events', cjson.encode({'join', topic, user, name}))
  end
end
local function sweep(node)
  for _, topic in ipairs(redis.call('HKEYS', P .. 'pt:' .. node)) do
    local fields = redis.call('HGETALL', P .. 'p:' .. topic)
    local head = node .. '|'
    for i = 1, #fields, 2 do
      if string.sub(fields[i], 1, #head) == head then
        set_count(node, topic, string.sub(fields[i], #head + 1), '', 0)
      end
    end
  end
  redis.call('DEL', P .. 'pt:' .. node)
  redis.call('SREM', P .. 'nodes', node)
end
"""

# ARGV: prefix, node, then (topic, user, name, count) per change.
_SET_PRESENCE = _PRESENCE_LIB + """
local node = ARGV[2]
for i = 3, #ARGV, 4 do
  set_count(node, ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3]))
end
return 0
"""

# ARGV: prefix, node or '' — sweep that node (shutdown) or every node whose heartbeat expired.
_SWEEP = _PRESENCE_LIB + """
if ARGV[2] ~= '' then
  redis.call('DEL', P .. 'node:' .. ARGV[2])
  sweep(ARGV[2])
  return 1
end
local swept = 0
for _, node in ipairs(redis.call('SMEMBERS', P .. 'nodes')) do
  if redis.call('EXISTS', P .. 'node:' .. node) == 0 then
    sweep(node)
    swept = swept + 1
  end
end
return swept
"""

# ARGV: prefix, topic, this node. Returns (user, name, connections) of live other nodes.
_PRESENCE = """
local P, topic, me = ARGV[1], ARGV[2], ARGV[3]
local fields = redis.call('HGETALL', P .. 'p:' .. topic)
local alive, counts, order = {}, {}, {}
for i = 1, #fields, 2 do
  local bar = string.find(fields[i], '|', 1, true)
  local node, user = string.sub(fields[i], 1, bar - 1), string.sub(fields[i], bar + 1)
  if node ~= me then
    if alive[node] == nil then
      alive[node] = redis.call('EXISTS', P .. 'node:' .. node) == 1
    end
    if alive[node] then
      if counts[user] == nil then
        counts[user] = 0
        table.insert(order, user)
      end
      counts[user] = counts[user] + tonumber(fields[i + 1])
    end
  end
end
local out = {}
for _, user in ipairs(order) do
  table.insert(out, user)
  table.insert(out, redis.call('HGET', P .. 'pn:' .. topic, user) or user)
  table.insert(out, counts[user])
end
return out
"""

# ARGV: prefix. Returns (node, figures JSON) of every live node.
_NODES = """
local P = ARGV[1]
local out = {}
for _, node in ipairs(redis.call('SMEMBERS', P .. 'nodes')) do
  local v = redis.call('GET', P .. 'node:' .. node)
  if v then
    table.insert(out, node)
    table.insert(out, v)
  end
end
return out
"""


# -- helpers --------------------------------------------------------------------------------


def _b(text: str) -> bytes:
    # Ids and names come from JSON and may hold lone surrogates; keep them byte-exact.
    return text.encode("utf-8", "surrogatepass")


def _s(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogatepass")


def encode_tail(draft: Draft) -> bytes:
    """The part of a history member after ``"<seq> "``: ts, sender and data."""
    sid, name = _b(draft.sender_id), _b(draft.sender_name)
    return b"%d %d %d\n%b%b%b" % (draft.ts, len(sid), len(name), sid, name, draft.data)


def decode_member(topic: str, member: bytes) -> Message:
    """A history member (``<seq> <ts> <idlen> <namelen>\\n<id><name><data>``) as a Message."""
    head, _, rest = member.partition(b"\n")
    seq, ts, idlen, namelen = (int(x) for x in head.split(b" "))
    return Message(
        seq,
        topic,
        rest[idlen + namelen :],
        _s(rest[:idlen]),
        _s(rest[idlen : idlen + namelen]),
        ts,
    )


def split_batch(batch: bytes) -> list[bytes]:
    """The entries of a ``_READ_LOG`` answer (``<len>:<entry>`` repeated)."""
    out = []
    pos, end = 0, len(batch)
    while pos < end:
        colon = batch.index(b":", pos)
        start = colon + 1
        pos = start + int(batch[pos:colon])
        out.append(batch[start:pos])
    return out


def _redis_label(client: aioredis.Redis) -> str:
    """host:port/db of a client, never its password."""
    kw = client.connection_pool.connection_kwargs
    where = kw.get("path") or f"{kw.get('host', '?')}:{kw.get('port', '?')}"
    return f"redis {where}/{kw.get('db', 0)}"


class _EpochChanged(Exception):
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


# -- the store ------------------------------------------------------------------------------


class RedisStore(Store):
    """History and seq assignment in Redis, shared by every node of a cluster."""

    shared = True

    def __init__(
        self,
        url: str,
        history: int = 1000,
        retention: float = 24 * 3600,
        *,
        prefix: str = "broker:",
        node_id: str | None = None,
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
    ) -> None:
        super().__init__(history, retention)
        self.url = url
        self.prefix = prefix
        #: Replicas that must confirm an append (Redis WAIT) before it is acknowledged.
        self.wait_replicas = wait_replicas
        self.wait_timeout = wait_timeout
        #: This node's name in Redis (presence fields, heartbeat, stream origin).
        self.node_id = node_id or uuid.uuid4().hex[:12]
        # One immediate retry: a pooled connection may be stale after a Redis restart.
        # No more, so that an unreachable Redis is reported within ~2 s.
        common: dict[str, Any] = {
            "socket_connect_timeout": 1.0,
            "retry": Retry(NoBackoff(), 1),
        }
        self.redis = aioredis.Redis.from_url(url, socket_timeout=2.0, **common)
        # Blocking reads (XREAD BLOCK, pub/sub) get connections of their own.
        self._blocking = aioredis.Redis.from_url(
            url, socket_timeout=BLOCK_MS / 1000 + 2.0, **common
        )
        self.health = Health(_redis_label(self.redis))
        self.cluster = Cluster(self)
        #: Called with the seconds each Redis round trip took (metrics), when set.
        self.observe_roundtrip: Callable[[float], None] | None = None
        self._append = self.redis.register_script(_APPEND)
        self._ensure = self.redis.register_script(_ENSURE_EPOCH)
        self._trim = self.redis.register_script(_TRIM)
        self._followed_epoch: str | None = None
        self._node_bytes = self.node_id.encode()
        self._read_sha = self.redis.register_script(_READ_LOG).sha

    def key(self, name: str) -> str:
        return self.prefix + name

    async def _timed(self, what: str, call: Any) -> Any:
        """Await one Redis round trip: timed, and mapped to ``Unavailable`` on failure."""
        started = time.perf_counter()
        try:
            result = await call
        except ResponseError as exc:
            if str(exc).startswith("EPOCH"):
                raise _EpochChanged(str(exc)) from None
            self.health.failed(what, exc)
            raise Unavailable("the cluster store (Redis) cannot take this now; retry later") from exc
        except (RedisError, OSError) as exc:
            self.health.failed(what, exc)
            raise Unavailable("the cluster store (Redis) cannot take this now; retry later") from exc
        self.health.ok()
        if self.observe_roundtrip is not None:
            self.observe_roundtrip(time.perf_counter() - started)
        return result

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        """Read or create the epoch (retrying for a few seconds) and join the cluster."""
        deadline = time.monotonic() + 10
        while True:
            try:
                await self._ensure_epoch(0)
                break
            except Unavailable:
                if time.monotonic() > deadline:
                    raise Unavailable(f"cannot reach {self.health.label}") from None
                await asyncio.sleep(0.5)
        self._followed_epoch = self.epoch
        await self._timed("open", self.redis.script_load(_READ_LOG))
        if self.wait_replicas:
            info = await self._timed("open", self.redis.info("replication"))
            connected = int(info.get("connected_slaves", 0))
            if connected < self.wait_replicas:
                log.warning(
                    "--redis-wait %d, but %s has %d replica(s) connected: publishes are "
                    "refused as unavailable until enough replicas are",
                    self.wait_replicas,
                    self.health.label,
                    connected,
                    extra={"event": "redis_replicas_missing"},
                )
        await self.cluster.start()

    async def _ensure_epoch(self, floor: int) -> None:
        epoch, seq = await self._timed(
            "epoch", self._ensure(args=[self.prefix, new_epoch(), str(floor)])
        )
        self.epoch = _s(epoch)
        self.last_seq = max(self.last_seq, int(seq))

    async def close(self) -> None:
        await self.cluster.close()
        for client in (self._blocking, self.redis):
            with contextlib.suppress(Exception):
                await client.aclose()

    # -- writing ----------------------------------------------------------------------------

    async def append(self, drafts: list[Draft]) -> list[Message]:
        self.health.check()
        args: list[Any] = [
            self.prefix, self.epoch, self.history, STREAM_MAXLEN, self.node_id, len(drafts)
        ]
        for d in drafts:
            args += (d.topic, encode_tail(d), d.origin, 1 if d.echo else 0)
        try:
            last = await self._append_and_wait(args)
        except _EpochChanged:
            # Redis started over (empty): name the new history, then retry once.
            await self._ensure_epoch(self.last_seq)
            args[1] = self.epoch
            try:
                last = await self._append_and_wait(args)
            except _EpochChanged:
                raise Unavailable("the cluster's history is changing; retry later") from None
        first = int(last) - len(drafts) + 1
        return [
            Message(first + i, d.topic, d.data, d.sender_id, d.sender_name, d.ts)
            for i, d in enumerate(drafts)
        ]

    async def _append_and_wait(self, args: list[Any]) -> int:
        """Run the append script; with ``wait_replicas``, WAIT for them on the same
        connection (a pipeline), so that the ``ok`` survives a failover to a replica."""
        if not self.wait_replicas:
            return int(await self._timed("append", self._append(args=args)))
        pipe = self.redis.pipeline(transaction=False)
        await self._append(args=args, client=pipe)
        pipe.execute_command("WAIT", self.wait_replicas, int(self.wait_timeout * 1000))
        last, confirmed = await self._timed("append", pipe.execute())
        if int(confirmed) < self.wait_replicas:
            raise Unavailable(
                f"recorded by the Redis primary but confirmed by {confirmed} of "
                f"{self.wait_replicas} replicas within {self.wait_timeout:g}s: it may be "
                "delivered, or lost if the primary fails over"
            )
        return int(last)

    async def trim(self, now: float) -> int:
        cutoff = str(int((now - self.retention) * 1000))
        removed = 0
        try:
            topics = await self._timed("trim", self.redis.smembers(self.key("topics")))
            for chunk in _chunks(sorted(topics)):
                pipe = self.redis.pipeline(transaction=False)
                for topic in chunk:
                    await self._trim(args=[self.prefix, topic, cutoff], client=pipe)
                removed += sum(await self._timed("trim", pipe.execute()))
        except Unavailable:
            pass  # logged once by Health; the next round trims what is left
        return removed

    # -- reading ----------------------------------------------------------------------------

    async def _topics(self, pattern: str) -> list[str]:
        if not is_pattern(pattern):
            return [pattern]
        raw = await self._timed("read", self.redis.smembers(self.key("topics")))
        return sorted(t for t in (_s(r) for r in raw) if matches(pattern, t))

    async def _ranges(
        self, topics: list[str], since: int, upto: int, last: int | None = None
    ) -> tuple[list[list[Message]], bool]:
        """Per topic, its retained messages in ``(since, upto]`` (the latest ``last`` only,
        when given), and whether none with seq > since was lost to retention."""
        runs: list[list[Message]] = []
        recovered = True
        for chunk in _chunks(topics):
            pipe = self.redis.pipeline(transaction=False)
            for topic in chunk:
                key = self.key("h:" + topic)
                if last is None:
                    pipe.zrangebyscore(key, f"({since}", upto)
                else:
                    pipe.zrevrangebyscore(key, upto, "-inf", start=0, num=last)
            pipe.hmget(self.key("trimmed"), chunk)
            *members, trimmed = await self._timed("read", pipe.execute())
            recovered = recovered and all(int(t or 0) <= since for t in trimmed)
            for topic, found in zip(chunk, members):
                if last is not None:
                    found.reverse()
                runs.append([decode_member(topic, m) for m in found])
        return runs, recovered

    async def read_since(self, pattern: str, since: int, upto: int) -> Replay:
        runs, recovered = await self._ranges(await self._topics(pattern), since, upto)
        return Replay(list(heapq.merge(*runs, key=lambda m: m.seq)), recovered)

    async def read_last(self, pattern: str, n: int, upto: int) -> list[Message]:
        if n == 0:
            return []
        runs, _ = await self._ranges(await self._topics(pattern), 0, upto, last=n)
        return list(heapq.merge(*runs, key=lambda m: m.seq))[-n:]

    # -- following the stream -------------------------------------------------------------

    async def follow(self, deliver: Deliver, restart: Callable[[int], None]) -> None:
        """Feed ``deliver`` every message of the ``log`` stream after ``last_seq``, in seq
        order, forever; reconnect after Redis errors and resume from the last entry."""
        last = self.last_seq
        delay = 0.1
        # After a new epoch the stream may start above last + 1 (seqs continue from the
        # highest any node had seen): not a gap.
        new_history = False
        while True:
            try:
                # XREAD BLOCK only waits for the next entry; the script that runs right
                # after it returns the whole batch as one string (cheap to parse).
                pipe = self._blocking.pipeline(transaction=False)
                pipe.get(self.key("epoch"))
                pipe.xread({self.key("log"): f"{last}-1"}, count=1, block=BLOCK_MS)
                pipe.evalsha(self._read_sha, 0, self.prefix, f"{last}-1", FOLLOW_BATCH)
                try:
                    epoch, _, batch = await pipe.execute()
                except NoScriptError:  # Redis restarted: its script cache is empty
                    await self._blocking.script_load(_READ_LOG)
                    continue
                self.health.ok()
                delay = 0.1
                epoch = _s(epoch) if epoch else None
                if epoch != self._followed_epoch:
                    await self._ensure_epoch(last)
                    if self.epoch != self._followed_epoch:
                        log.warning(
                            "Redis history started over (epoch %s -> %s); seqs continue from %d",
                            self._followed_epoch,
                            self.epoch,
                            self.last_seq,
                            extra={"event": "epoch_changed"},
                        )
                        self._followed_epoch = self.epoch
                        new_history = True
                        restart(last)
                    continue  # the entries just read may belong to the old stream
                if not batch:
                    continue
                pairs = [self._entry(entry) for entry in split_batch(batch)]
                first = pairs[0][0].seq
                if first > last + 1 and last and not new_history:
                    pairs = await self._fill_gap(last, first) + pairs
                new_history = False
                deliver(pairs)
                last = pairs[-1][0].seq
                self.last_seq = max(self.last_seq, last)
            except asyncio.CancelledError:
                raise
            except Unavailable:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            except (RedisError, OSError) as exc:
                self.health.failed("follow", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            except Exception:
                log.exception("following the Redis stream failed", extra={"event": "follow_failed"})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _entry(self, entry: bytes) -> tuple[Message, Draft]:
        head, _, rest = entry.partition(b"\n")
        node, session, echo, size = head.split(b" ")
        topic = _s(rest[: int(size)])
        msg = decode_member(topic, rest[int(size) :])
        draft = Draft(
            topic,
            msg.data,
            msg.sender_id,
            msg.sender_name,
            msg.ts,
            origin=int(session) if node == self._node_bytes else 0,
            echo=echo == b"1",
        )
        return msg, draft

    async def _fill_gap(self, last: int, first: int) -> list[tuple[Message, Draft]]:
        """Messages between ``last`` and ``first`` that the capped stream no longer holds
        (this node fell more than STREAM_MAXLEN behind): read them from the histories.
        Their origin is lost, so a publisher may get its own copy of those."""
        raw = await self._timed("read", self.redis.smembers(self.key("topics")))
        runs, _ = await self._ranges(sorted(_s(r) for r in raw), last, first - 1)
        missed = list(heapq.merge(*runs, key=lambda m: m.seq))
        log.error(
            "fell %d messages behind the Redis stream; %d recovered from history",
            first - last - 1,
            len(missed),
            extra={"event": "follow_gap"},
        )
        return [(m, Draft(m.topic, m.data, m.sender_id, m.sender_name, m.ts)) for m in missed]


def _chunks(items: list[Any]) -> Iterable[list[Any]]:
    for i in range(0, len(items), PIPELINE_CHUNK):
        yield items[i : i + PIPELINE_CHUNK]


# -- presence and stats ---------------------------------------------------------------------


class Cluster:
    """Presence and ``stats`` over every node, and this node's heartbeat.

    The hub reports a user's first and last local subscription to a topic through
    ``on_presence``; the exact local connection counts are written with absolute values
    (so retries and resyncs are idempotent) by one writer task, and compared with the hub
    at every heartbeat to catch counts that changed without a join or leave. Join/leave
    reach local watchers through the Redis ``events`` channel, like everyone else's.
    """

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.redis = store.redis
        self.prefix = store.prefix
        self.node_id = store.node_id
        self.hub: Hub | None = None
        self.figures: Callable[[], Mapping[str, Any]] = dict
        self._set = self.redis.register_script(_SET_PRESENCE)
        self._sweep = self.redis.register_script(_SWEEP)
        self._presence = self.redis.register_script(_PRESENCE)
        self._nodes = self.redis.register_script(_NODES)
        # (topic, user) whose count must be written; what Redis holds for this node.
        self._dirty: set[tuple[str, str]] = set()
        self._written: dict[tuple[str, str], int] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def make_hub(self, figures: Callable[[], Mapping[str, Any]]) -> Hub:
        """The node's hub, with presence made cluster-wide; ``figures`` gives the node's
        ``stats`` figures for its heartbeat."""
        self.hub = Hub(self.on_presence)
        self.figures = figures
        return self.hub

    def on_presence(self, op: str, topic: str, user: dict[str, str]) -> None:
        """The hub's presence listener: queue the change for the writer task."""
        self._dirty.add((topic, user["id"]))
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
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._sweep(args=[self.prefix, self.node_id]), 2.0)

    # -- heartbeat --------------------------------------------------------------------------

    def _node_figures(self) -> bytes:
        figures = self.figures()
        return orjson.dumps({k: figures.get(k, 0) for k in SUMMED})

    async def _heartbeat(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(
            self.prefix + "node:" + self.node_id, self._node_figures(), px=HEARTBEAT_TTL_MS, get=True
        )
        pipe.sadd(self.prefix + "nodes", self.node_id)
        await self._sweep(args=[self.prefix, ""], client=pipe)
        previous, _, _ = await self.store._timed("heartbeat", pipe.execute())
        if previous is None and self._written:
            # Our entries were swept (heartbeat missed) or Redis started over: rewrite all.
            log.warning("presence entries lost in Redis; writing them again", extra={"event": "presence_resync"})
            self._written.clear()
        self._sync()

    async def _heartbeat_loop(self) -> None:
        while True:
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
        delay = 0.1
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                while self._dirty:
                    await self._write_some()
                delay = 0.1
            except Unavailable:
                await asyncio.sleep(delay)  # Health logged it; the keys are dirty again
                delay = min(delay * 2, 2.0)
                self._wake.set()
            except Exception:
                log.exception("writing presence to Redis failed", extra={"event": "presence_failed"})
                await asyncio.sleep(delay)
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
            await self.store._timed("presence", self._set(args=args))
        except BaseException:
            self._dirty.update(batch)
            raise
        for key, count in values:
            if count:
                self._written[key] = count
            else:
                self._written.pop(key, None)

    # -- events -----------------------------------------------------------------------------

    async def _events_loop(self) -> None:
        delay = 0.1
        while True:
            pubsub = self.store._blocking.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.prefix + "events")
                delay = 0.1
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._announce(message["data"])
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self.store.health.failed("presence events", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _announce(self, raw: bytes) -> None:
        try:
            op, topic, uid, name = orjson.loads(raw)
        except (orjson.JSONDecodeError, ValueError, TypeError):
            log.warning("ignoring a malformed presence event", extra={"event": "bad_presence_event"})
            return
        if self.hub is not None and op in ("join", "leave"):
            self.hub.announce(op, topic, {"id": uid, "name": name})

    # -- answers ----------------------------------------------------------------------------

    async def presence(self, topic: str, local: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The ``presence`` answer for ``topic``: this node's ``local`` entries (exact
        counts) plus those of every other live node."""
        raw = await self.store._timed("presence", self._presence(args=[self.prefix, topic, self.node_id]))
        users = {u["id"]: dict(u) for u in local}
        for i in range(0, len(raw), 3):
            uid, name, count = _s(raw[i]), _s(raw[i + 1]), int(raw[i + 2])
            entry = users.setdefault(uid, {"id": uid, "name": name, "connections": 0})
            entry["connections"] += count
        return [users[uid] for uid in sorted(users)]

    async def stats(self, local: dict[str, Any]) -> dict[str, Any]:
        """The ``stats`` answer: ``local`` (this node's figures) with the SUMMED figures
        added up over every live node, plus ``node`` (this node's id) and ``nodes``."""
        raw = await self.store._timed("stats", self._nodes(args=[self.prefix]))
        nodes = [{"id": self.node_id, **{k: local.get(k, 0) for k in SUMMED}}]
        for i in range(0, len(raw), 2):
            node = _s(raw[i])
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
