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
    epoch               string: the name of this history (new when Redis starts over empty,
                        comes back older, or another server serves it)
    server              string: the run_id of the redis-server that serves the epoch
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
    follower:<id>       string with a TTL: written by a node's follower before its WAIT
                        (with --redis-wait), so that it delivers only replicated entries
    events              pub/sub channel: presence join/leave, JSON [op, topic, user, name]
    k:<len(user)>:<user><key>   string with a TTL of --dedupe-window: the seqs ("12,13")
                        of the first publish with that idempotency key, set by the
                        append script that recorded them

A history member (in ``h:<topic>``, and at the end of a stream entry) is binary-safe:
``b"<seq> <ts> <len(id)> <len(name)>\\n" + id + name + data`` (lengths in bytes). Lua
formats numbers with ``%.14g``, so seqs must stay below 1e14; timestamps travel as text.

Every Redis failure is mapped in one place (``health.Link.call``) to ``Unavailable``:
the journal then answers publishes with ``error unavailable`` and the server keeps its
connections. An outage is logged once when it starts and once when it ends (``Health``).
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from redis.exceptions import NoScriptError, RedisError

from broker.core.backoff import Backoff
from broker.core.model import Draft, Message, merge_by_seq, new_epoch
from broker.core.topics import is_pattern, matches
from broker.errors import Unavailable
from broker.store.base import LATEST_LIMIT, Deliver, Replay, Store, Visible, chunks
from broker.store.dedupe import decode_seqs, number
from broker.store.redis.codec import decode_member, encode_tail, key_id, split_batch, to_str
from broker.store.redis.health import EpochChanged, HistoryWentBack, ServerChanged
from broker.store.redis.link import Link
from broker.store.redis.presence import Cluster
from broker.store.redis.scripts import script

log = logging.getLogger("broker.store.redis")

#: Longest wait of one blocking XREAD (ms); also how often an idle follower checks the epoch.
BLOCK_MS = 1000
#: Stream entries read (and fanned out) per XREAD.
FOLLOW_BATCH = 2000
#: Approximate cap of the ``log`` stream: a node may fall this far behind before it has
#: to fill the gap from the per-topic histories.
STREAM_MAXLEN = 100_000
#: Seqs left unused between a history and the new epoch that replaces it (when Redis
#: came back empty or older): room for what other nodes had read and the one starting
#: the new epoch had not, so that no seq they passed is handed out again.
EPOCH_GAP = 1_000_000
#: Topics per pipeline when reading history.
PIPELINE_CHUNK = 500


def _seq(message: Message) -> int:
    return message.seq


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
        # A command waits at most 2 s, or the WAIT of --redis-wait-timeout and a second.
        self.link = Link(url, BLOCK_MS / 1000, max(2.0, wait_timeout + 1.0))
        self.redis = self.link.redis
        self.health = self.link.health
        self.cluster = Cluster(self.link, prefix, self.node_id)
        self._append = self.redis.register_script(script("append"))
        self._ensure = self.redis.register_script(script("ensure_epoch"))
        self._trim = self.redis.register_script(script("trim"))
        self._followed_epoch: str | None = None
        self._node_bytes = self.node_id.encode()
        self._read_sha = self.redis.register_script(script("read_log")).sha

    def key(self, name: str) -> str:
        return self.prefix + name

    async def known_key(self, user: str, key: str) -> bool:
        name = self.prefix.encode() + b"k:" + key_id(user, key)
        return bool(await self.link.call("dedupe", self.redis.exists(name)))

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        """Read or create the epoch (retrying for a few seconds) and join the cluster."""
        deadline = time.monotonic() + 10
        while True:
            try:
                await self._ensure_epoch(0, "")
                break
            except Unavailable:
                if time.monotonic() > deadline:
                    raise Unavailable(f"cannot reach {self.health.label}") from None
                await asyncio.sleep(0.5)
        self._followed_epoch = self.epoch
        await self.link.call("open", self.redis.script_load(script("read_log")))
        if self.wait_replicas:
            info = await self.link.call("open", self.redis.info("replication"))
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

    async def _ensure_epoch(self, floor: int, known: str, rewritten: bool = False) -> None:
        """Learn the history's epoch (create it when Redis has none) with the counter at
        ``floor`` or above; when Redis still holds ``known`` but its counter is below
        ``floor`` (or ``rewritten``: the stream changed under this node's follower),
        history went back, and when another Redis server than the recorded one answers
        (restarted from disk, failed over) it may have: a new epoch replaces it (logged
        here, once, by the node that replaced it)."""
        args: list[str | int] = [self.prefix, new_epoch(), floor, known, int(rewritten), EPOCH_GAP]
        reply = await self.link.call("epoch", self._ensure(args=args))
        epoch, counter, top, renewed, after, server, here, before = reply
        self.epoch = to_str(epoch)
        self.last_seq = max(self.last_seq, int(after))
        if int(renewed) == 3:
            log.warning(
                "another Redis server serves the history (run_id %s, recorded %s): it "
                "restarted and loaded its data from disk, or failed over, so it may hold "
                "less than was handed out (its seq counter is at %d, its stream ends at %s, "
                "this node had seen seq %d); started epoch %s after %s with seqs above %d, "
                "so every resume answers recovered: false and replays what is retained",
                to_str(here),
                to_str(server) or "none",
                int(counter),
                to_str(top),
                floor,
                self.epoch,
                to_str(before),
                int(after),
                extra={"event": "redis_server_changed"},
            )
        if int(renewed) == 2:
            log.error(
                "Redis history went back (restarted from an older snapshot, or failed over "
                "to a replica that lagged): its seq counter was at %d and its stream ends at "
                "%s, but this node had seen seq %d%s under epoch %s; started epoch %s with "
                "seqs above %d, so every resume answers recovered: false; the messages "
                "acknowledged after seq %s are gone from history",
                int(counter),
                to_str(top),
                floor,
                " (and a different message at that seq)" if rewritten else "",
                known,
                self.epoch,
                int(after),
                to_str(top),
                extra={"event": "history_went_back"},
            )

    async def close(self) -> None:
        await self.cluster.close()
        await self.link.close()

    # -- writing ----------------------------------------------------------------------------

    async def append(self, drafts: list[Draft]) -> list[Message]:
        self.health.check()
        args: list[Any] = [
            self.prefix,
            self.epoch,
            self.history,
            STREAM_MAXLEN,
            self.node_id,
            len(drafts),
            int(self.dedupe_window * 1000),
            self.last_seq,
        ]
        for d in drafts:
            kid = "" if d.key is None else key_id(d.sender_id, d.key)
            args += (d.topic, encode_tail(d), d.origin, 1 if d.echo else 0, kid, d.group)
        spaces = self.namespaces
        if spaces:  # the topics whose namespace keeps another number of messages
            for topic in dict.fromkeys(d.topic for d in drafts):
                keep = spaces.history(topic, self.history)
                if keep != self.history:
                    args += (topic, keep)
        try:
            reply = await self._append_and_wait(args)
        except (EpochChanged, HistoryWentBack, ServerChanged):
            # Redis started over (empty), another node named a new history, Redis came
            # back older than this node saw it, or another Redis server answers: learn or
            # start the new epoch, retry once.
            await self._ensure_epoch(self.last_seq, self.epoch)
            args[1], args[7] = self.epoch, self.last_seq
            try:
                reply = await self._append_and_wait(args)
            except (EpochChanged, HistoryWentBack, ServerChanged):
                raise Unavailable("the cluster's history is changing; retry later") from None
        self.last_seq = max(self.last_seq, int(reply[0]))
        # The script skipped the publishes whose key it found; the others got consecutive
        # seqs ending at reply[0].
        prior = {
            (drafts[int(i)].sender_id, drafts[int(i)].key): decode_seqs(seqs)
            for i, seqs in zip(reply[1::2], reply[2::2])
        }
        skipped = sum(max(drafts[int(i)].group, 1) for i in reply[1::2])
        first = int(reply[0]) - (len(drafts) - skipped) + 1
        return number(drafts, first, lambda user, key: prior.get((user, key))).results

    async def _append_and_wait(self, args: list[Any]) -> list[Any]:
        """Run the append script; with ``wait_replicas``, WAIT for them on the same
        connection (a pipeline), so that the ``ok`` survives a failover to a replica."""
        if not self.wait_replicas:
            result: list[Any] = await self.link.call("append", self._append(args=args))
            return result
        pipe = self.redis.pipeline(transaction=False)
        await self._append(args=args, client=pipe)
        pipe.execute_command("WAIT", self.wait_replicas, int(self.wait_timeout * 1000))
        reply, confirmed = await self.link.call("append", pipe.execute())
        if int(confirmed) < self.wait_replicas:
            raise Unavailable(
                f"recorded by the Redis primary but confirmed by {confirmed} of "
                f"{self.wait_replicas} replicas within {self.wait_timeout:g}s: it may be "
                "delivered, or lost if the primary fails over"
            )
        return list(reply)

    async def trim(self, now: float) -> int:
        cutoff = str(int((now - self.retention) * 1000))
        spaces = self.namespaces
        removed = 0
        try:
            topics = await self.link.call("trim", self.redis.smembers(self.key("topics")))
            for chunk in chunks(sorted(topics), PIPELINE_CHUNK):
                pipe = self.redis.pipeline(transaction=False)
                for topic in chunk:
                    name = to_str(topic)
                    own = (
                        str(int((now - spaces.retention(name, self.retention)) * 1000))
                        if spaces
                        else cutoff
                    )
                    await self._trim(args=[self.prefix, topic, own], client=pipe)
                removed += sum(await self.link.call("trim", pipe.execute()))
        except Unavailable:
            pass  # logged once by Health; the next round trims what is left
        return removed

    # -- reading ----------------------------------------------------------------------------

    async def _topics(self, pattern: str) -> list[str]:
        if not is_pattern(pattern):
            return [pattern]
        raw = await self.link.call("read", self.redis.smembers(self.key("topics")))
        return sorted(t for t in (to_str(r) for r in raw) if matches(pattern, t))

    async def _ranges(
        self, topics: list[str], since: int, upto: int, last: int | None = None
    ) -> tuple[list[list[Message]], bool]:
        """Per topic, its retained messages in ``(since, upto]`` (the latest ``last`` only,
        when given), and whether none with seq > since was lost to retention."""
        runs: list[list[Message]] = []
        recovered = True
        for chunk in chunks(topics, PIPELINE_CHUNK):
            pipe = self.redis.pipeline(transaction=False)
            for topic in chunk:
                key = self.key("h:" + topic)
                if last is None:
                    pipe.zrangebyscore(key, f"({since}", upto)
                else:
                    pipe.zrevrangebyscore(key, upto, "-inf", start=0, num=last)
            pipe.hmget(self.key("trimmed"), chunk)
            *members, trimmed = await self.link.call("read", pipe.execute())
            recovered = recovered and all(int(t or 0) <= since for t in trimmed)
            for topic, found in zip(chunk, members):
                if last is not None:
                    found.reverse()
                runs.append([decode_member(topic, m) for m in found])
        return runs, recovered

    async def read_since(self, pattern: str, since: int, upto: int) -> Replay:
        runs, recovered = await self._ranges(await self._topics(pattern), since, upto)
        return Replay(list(merge_by_seq(runs)), recovered)

    async def read_last(self, pattern: str, n: int, upto: int) -> list[Message]:
        if n == 0:
            return []
        runs, _ = await self._ranges(await self._topics(pattern), 0, upto, last=n)
        return list(merge_by_seq(runs))[-n:]

    async def latest(
        self, pattern: str, upto: int, limit: int = LATEST_LIMIT, visible: Visible = None
    ) -> list[Message]:
        # Per topic, the top of its ZSET (scored by seq): one O(log n) lookup each.
        topics = [t for t in await self._topics(pattern) if visible is None or visible(t)]
        runs, _ = await self._ranges(topics, 0, upto, last=1)
        found = [run[-1] for run in runs if run]
        return sorted(heapq.nlargest(limit, found, key=_seq), key=_seq)

    # -- following the stream -------------------------------------------------------------

    async def follow(self, deliver: Deliver, restart: Callable[[int], None]) -> None:
        """Feed ``deliver`` every message of the ``log`` stream after ``last_seq``, in seq
        order, forever; reconnect after Redis errors and resume from the last entry.

        Each read also checks that Redis did not go back under the follower: a counter
        below its position, or another entry at its position than the one it read
        (Redis restarted from an older snapshot, a failover to a lagging replica). Then a
        new epoch starts (``_ensure_epoch``) and the follower goes on with the seqs above
        its position, instead of waiting for entries that will never come."""
        last = self.last_seq
        #: SHA-1 of the entry at ``last``, when this follower read it.
        mark: str | None = None
        backoff = Backoff(0.1, 2.0, jitter=False)
        # After a new epoch the stream may start above last + 1 (seqs continue from the
        # highest any node had seen): not a gap.
        new_history = False
        while True:
            try:
                # XREAD BLOCK only waits for the next entry; the script that runs right
                # after it returns the whole batch as one string (cheap to parse).
                pipe = self.link.blocking.pipeline(transaction=False)
                pipe.xread({self.key("log"): f"{last}-1"}, count=1, block=BLOCK_MS)
                pipe.evalsha(self._read_sha, 0, self.prefix, str(last), FOLLOW_BATCH)
                try:
                    _, (epoch, counter, at, trimmed, batch) = await pipe.execute()
                except NoScriptError:  # Redis restarted: its script cache is empty
                    await self.link.blocking.script_load(script("read_log"))
                    continue
                self.health.ok()
                backoff.reset()
                epoch = to_str(epoch)
                rewritten = (
                    mark is not None and to_str(at) != mark and not (not at and int(trimmed))
                )
                went_back = epoch == self._followed_epoch and (int(counter) < last or rewritten)
                if epoch != self._followed_epoch or went_back:
                    await self._ensure_epoch(
                        max(last, self.last_seq), self._followed_epoch or "", rewritten
                    )
                    if self.epoch != self._followed_epoch:
                        log.warning(
                            "Redis history changed (epoch %s -> %s); seqs continue from %d",
                            self._followed_epoch,
                            self.epoch,
                            self.last_seq,
                            extra={"event": "epoch_changed"},
                        )
                        self._followed_epoch = self.epoch
                        new_history = True
                        mark = None
                        restart(last)
                    continue  # the entries just read may belong to the old stream
                if not batch:
                    continue
                raw = split_batch(batch)
                pairs = [self._entry(entry) for entry in raw]
                first = pairs[0][0].seq
                if first > last + 1 and last and not new_history:
                    pairs = await self._fill_gap(last, first) + pairs
                if self.wait_replicas:
                    await self._replicated()
                new_history = False
                deliver(pairs)
                last = pairs[-1][0].seq
                mark = hashlib.sha1(raw[-1]).hexdigest()
                self.last_seq = max(self.last_seq, last)
            except asyncio.CancelledError:
                raise
            except Unavailable:
                await asyncio.sleep(backoff.next())
            except (RedisError, OSError) as exc:
                self.health.failed("follow", exc)
                await asyncio.sleep(backoff.next())
            except Exception:
                log.exception("following the Redis stream failed", extra={"event": "follow_failed"})
                await asyncio.sleep(backoff.next())

    async def _replicated(self) -> None:
        """With ``wait_replicas``: return once that many replicas hold everything this
        follower read (a write of its own, then WAIT), so that subscribers only receive
        what a failover keeps; Unavailable otherwise (the batch is read again)."""
        pipe = self.link.blocking.pipeline(transaction=False)
        pipe.set(self.key("follower:" + self.node_id), b"", px=60_000)
        # Within the blocking connection's timeout; a batch not confirmed is read again.
        wait_ms = int(min(self.wait_timeout, BLOCK_MS / 1000) * 1000)
        pipe.execute_command("WAIT", self.wait_replicas, wait_ms)
        _, confirmed = await self.link.call("follow", pipe.execute())
        if int(confirmed) < self.wait_replicas:
            raise Unavailable("not replicated yet")

    def _entry(self, entry: bytes) -> tuple[Message, Draft]:
        head, _, rest = entry.partition(b"\n")
        node, session, echo, size = head.split(b" ")
        topic = to_str(rest[: int(size)])
        msg = decode_member(topic, rest[int(size) :])
        draft = Draft(
            topic,
            msg.payload,
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
        raw = await self.link.call("read", self.redis.smembers(self.key("topics")))
        runs, _ = await self._ranges(sorted(to_str(r) for r in raw), last, first - 1)
        missed = list(merge_by_seq(runs))
        log.error(
            "fell %d messages behind the Redis stream; %d recovered from history",
            first - last - 1,
            len(missed),
            extra={"event": "follow_gap"},
        )
        return [(m, Draft(m.topic, m.payload, m.sender_id, m.sender_name, m.ts)) for m in missed]
