"""History in process memory: fast, lost on restart."""

from __future__ import annotations

import bisect
import heapq
import time
from collections import OrderedDict, deque
from typing import Final

from broker.core.model import Draft, Message, merge_by_seq, new_epoch
from broker.core.topics import is_pattern, matches
from broker.store.base import (
    LATEST_LIMIT,
    PAGE_BYTES,
    PAGE_SIZE,
    Pages,
    Replay,
    Store,
    Visible,
)
from broker.store.dedupe import KeyId, number

#: A kept message: (seq, topic, data, sender id, sender name, ts). A plain tuple of
#: atomic values, not a ``Message``: the garbage collector stops tracking such tuples, so
#: a full history does not make each collection walk it (a ``Message`` per kept message
#: made collections of 0.5 s), and it holds no cached frames.
Kept = tuple[int, str, bytes, str, str, int]
SEQ: Final = 0
TOPIC: Final = 1
DATA: Final = 2
SENDER_ID: Final = 3
SENDER_NAME: Final = 4
TS: Final = 5


def _seq(kept: Kept) -> int:
    return kept[SEQ]


def _keep(msg: Message) -> Kept:
    return (msg.seq, msg.topic, msg.payload, msg.sender_id, msg.sender_name, msg.ts)


def _message(kept: Kept) -> Message:
    return Message(*kept)


class _MemoryPages(Pages):
    """A replay over the memory store's topics a page at a time: a merge of the topics'
    runs by seq that resumes where the last page stopped (a heap of each topic's next
    seq), so a page costs its own size, not the history's."""

    def __init__(
        self,
        runs: dict[str, deque[Kept]],
        topics: list[str],
        start: int,
        recovered: bool,
        upto: int,
        size: int,
        max_bytes: int,
    ) -> None:
        super().__init__(start, recovered)
        self._runs = runs
        self._upto = upto
        self._size = size
        self._max_bytes = max_bytes
        self._heap: list[tuple[int, str]] = []
        for topic in topics:
            q = runs.get(topic)
            if not q or q[-1][SEQ] <= start:
                continue
            i = bisect.bisect_right(q, start, key=_seq)
            if q[i][SEQ] <= upto:
                self._heap.append((q[i][SEQ], topic))
        heapq.heapify(self._heap)

    async def next(self) -> list[Message]:
        page: list[Message] = []
        total = 0
        heap = self._heap
        while heap and len(page) < self._size and not self.gap:
            seq, topic = heap[0]
            q = self._runs.get(topic)
            i = bisect.bisect_left(q, seq, key=_seq) if q else 0
            if not q or i == len(q) or q[i][SEQ] != seq:
                # Removed (age, count, size) before it was sent: stop before the hole.
                self.gap = True
                break
            kept = q[i]
            if page and total + len(kept[DATA]) > self._max_bytes:
                break
            heapq.heappop(heap)
            page.append(_message(kept))
            total += len(kept[DATA])
            if i + 1 < len(q) and q[i + 1][SEQ] <= self._upto:
                heapq.heappush(heap, (q[i + 1][SEQ], topic))
        return page


#: What a kept message costs beyond its text: its tuple, deque slot, seq and ts, the
#: bytes and str objects' headers (measured).
MESSAGE_OVERHEAD = 240
#: What a topic with messages costs beyond its name: its deque and its dict entries.
TOPIC_OVERHEAD = 900
#: What a topic whose messages are all gone costs while its trim mark is remembered.
EMPTY_TOPIC_OVERHEAD = 160
#: What a remembered idempotency key costs beyond the user id and key text.
KEY_OVERHEAD = 320
#: Expired idempotency keys dropped per ``trim`` call, at most: a slice, not a stall.
KEY_SLICE = 10_000


def message_size(kept: Kept) -> int:
    """What a kept message counts against ``history_size``: its data, topic and sender,
    and ``MESSAGE_OVERHEAD``: near what it really takes in memory."""
    text = len(kept[TOPIC]) + len(kept[SENDER_ID]) + len(kept[SENDER_NAME])
    return len(kept[DATA]) + text + MESSAGE_OVERHEAD


def _key_size(kid: KeyId) -> int:
    return len(kid[0]) + len(kid[1]) + KEY_OVERHEAD


class MemoryStore(Store):
    """History in process memory: fast, lost on restart (a new epoch every start).

    Bounded per topic (``history`` messages) and in all (``history_size`` bytes, see
    ``message_size``, topics and keys included): past the total, the oldest messages go
    first, whatever their topic, and their topic's ``trimmed`` mark moves on, so a
    ``since`` replay that misses them answers ``recovered: false``.

    A topic whose messages are all gone keeps only its trim mark; those marks are dropped
    first, oldest first, when room is needed, and ``floor`` (the highest mark dropped)
    answers for them: a ``since`` below it is ``recovered: false``. Idempotency keys take
    at most a quarter of ``history_size``; past it the oldest are forgotten early. Expired
    keys go a slice at a time."""

    def __init__(
        self,
        history: int = 1000,
        retention: float = 24 * 3600,
        history_size: int | None = None,
    ) -> None:
        super().__init__(history, retention)
        self.epoch = new_epoch()
        self.history_size = history_size
        self._topics: dict[str, deque[Kept]] = {}
        self._trimmed: dict[str, int] = {}
        #: Bytes of the retained messages (``message_size``).
        self.size = 0
        # (seq of a topic's oldest message, topic), a heap: finds the oldest message of all.
        # Entries go stale when a topic loses messages another way; fixed when met.
        self._oldest: list[tuple[int, str]] = []
        # Topics with no message left (their trim mark kept), in the order they emptied.
        # OrderedDicts here and for the keys: taking the oldest of a plain dict after
        # many deletions at its front scans every deleted slot, each time.
        self._empty: OrderedDict[str, None] = OrderedDict()
        #: The highest trim mark of a topic forgotten to make room (see the class doc).
        self.floor = 0
        # (user, key) -> (seqs, monotonic time of the publish), oldest first.
        self._keys: OrderedDict[KeyId, tuple[tuple[int, ...], float]] = OrderedDict()
        #: Bytes the keys count for (``_key_size``), within ``history_size // 4``.
        self.keys_size = 0

    async def append(self, drafts: list[Draft]) -> list[Message]:
        return self.append_now(drafts)

    def append_now(self, drafts: list[Draft]) -> list[Message]:
        numbered = number(drafts, self.last_seq + 1, self._known_key)
        spaces = self.namespaces
        history = self.history
        for msg in numbered.fresh:
            topic = msg.topic
            if spaces:
                history = spaces.history(topic, self.history)
            q = self._topics.get(topic)
            if q is None:
                q = self._topics[topic] = deque()
                if topic in self._empty:
                    del self._empty[topic]
                    self.size -= EMPTY_TOPIC_OVERHEAD + len(topic)
                else:
                    self._trimmed.setdefault(topic, 0)
                self.size += TOPIC_OVERHEAD + len(topic)
                heapq.heappush(self._oldest, (msg.seq, topic))
            kept = _keep(msg)
            q.append(kept)
            self.size += message_size(kept)
            while len(q) > history:
                gone = q.popleft()
                self.size -= message_size(gone)
                self._trimmed[topic] = gone[SEQ]
        if self.history_size is not None and self.size > self.history_size:
            self._evict(self.history_size)
        if numbered.fresh:
            self.last_seq = numbered.fresh[-1].seq
        if numbered.keys:
            self._add_keys(numbered.keys)
        return numbered.results

    def _add_keys(self, keys: dict[KeyId, tuple[int, ...]]) -> None:
        now = time.monotonic()
        held = self._keys
        for kid, seqs in keys.items():
            if held.pop(kid, None) is not None:  # a reused expired key moves to the end
                self.keys_size -= _key_size(kid)
            held[kid] = (seqs, now)
            self.keys_size += _key_size(kid)
        # Expired keys go as new ones come (a few more than came), so that no sweep
        # ever meets millions at once; past the bound the oldest go early.
        self._expire_keys(now - self.dedupe_window, len(keys) + 16)
        if self.history_size is not None:
            limit = self.history_size // 4
            while self.keys_size > limit and held:
                kid, _ = held.popitem(last=False)
                self.keys_size -= _key_size(kid)

    def _expire_keys(self, before: float, budget: int) -> None:
        """Drop up to ``budget`` keys published before ``before`` (the oldest are first)."""
        held = self._keys
        while budget > 0 and held:
            kid, (seqs, stamp) = held.popitem(last=False)
            if stamp >= before:
                held[kid] = (seqs, stamp)
                held.move_to_end(kid, last=False)
                return
            self.keys_size -= _key_size(kid)
            budget -= 1

    def _emptied(self, topic: str) -> None:
        """``topic`` lost its last message: keep only its trim mark."""
        del self._topics[topic]
        self._empty[topic] = None
        self.size -= TOPIC_OVERHEAD - EMPTY_TOPIC_OVERHEAD

    def _forget_empty(self) -> bool:
        """Forget the oldest emptied topic's trim mark (``floor`` answers for it); False
        when there is none."""
        empty = self._empty
        if not empty:
            return False
        topic, _ = empty.popitem(last=False)
        self.floor = max(self.floor, self._trimmed.pop(topic, 0))
        self.size -= EMPTY_TOPIC_OVERHEAD + len(topic)
        return True

    def _evict(self, limit: int) -> None:
        """Drop the oldest messages of all topics until the total is within ``limit``."""
        while self.size > limit and self._forget_empty():
            pass
        oldest = self._oldest
        while self.size > limit and oldest:
            seq, topic = heapq.heappop(oldest)
            q = self._topics.get(topic)
            if not q:
                continue
            if q[0][SEQ] != seq:  # stale: file the topic under its oldest message now
                heapq.heappush(oldest, (q[0][SEQ], topic))
                continue
            gone = q.popleft()
            self.size -= message_size(gone)
            self._trimmed[topic] = gone[SEQ]
            if q:
                heapq.heappush(oldest, (q[0][SEQ], topic))
            else:
                self._emptied(topic)
                # An emptied topic's mark is what goes next.
                while self.size > limit and self._forget_empty():
                    pass
        if len(oldest) > 2 * len(self._topics) + 64:
            # Topics emptied by age and made again leave entries behind: start afresh.
            self._oldest = [(q[0][SEQ], t) for t, q in self._topics.items() if q]
            heapq.heapify(self._oldest)

    async def known_key(self, user: str, key: str) -> bool:
        return self._known_key(user, key) is not None

    def _known_key(self, user: str, key: str) -> tuple[int, ...] | None:
        found = self._keys.get((user, key))
        if found is None or time.monotonic() - found[1] >= self.dedupe_window:
            return None
        return found[0]

    def _matching(self, pattern: str) -> list[str]:
        if not is_pattern(pattern):
            return [pattern] if pattern in self._trimmed else []
        return [t for t in self._trimmed if matches(pattern, t)]

    def _recovered(self, topics: list[str], since: int) -> bool:
        return since >= self.floor and all(self._trimmed[t] <= since for t in topics)

    async def read_since(self, pattern: str, since: int, upto: int) -> Replay:
        topics = self._matching(pattern)
        recovered = self._recovered(topics, since)
        runs = [
            [_message(k) for k in self._topics.get(t, ()) if since < k[SEQ] <= upto] for t in topics
        ]
        return Replay(list(merge_by_seq(runs)), recovered)

    async def replay(
        self,
        pattern: str,
        *,
        since: int | None = None,
        last: int | None = None,
        upto: int,
        page_size: int = PAGE_SIZE,
        page_bytes: int = PAGE_BYTES,
    ) -> Pages:
        topics = self._matching(pattern)
        if since is not None:
            start, recovered = since, self._recovered(topics, since)
        else:
            start, recovered = self._nth_latest(topics, last or 0, upto), True
        return _MemoryPages(self._topics, topics, start, recovered, upto, page_size, page_bytes)

    def _nth_latest(self, topics: list[str], n: int, upto: int) -> int:
        """The seq after which the latest ``n`` messages (``seq <= upto``) of ``topics``
        begin; ``upto`` when there are none."""
        if n <= 0:
            return upto
        runs = [
            (k[SEQ] for k in reversed(self._topics.get(t, ())) if k[SEQ] <= upto) for t in topics
        ]
        nth = None
        for i, seq in enumerate(heapq.merge(*runs, reverse=True)):
            nth = seq
            if i + 1 >= n:
                break
        return upto if nth is None else nth - 1

    async def read_last(self, pattern: str, n: int, upto: int) -> list[Message]:
        runs = [
            [_message(k) for k in self._topics.get(t, ()) if k[SEQ] <= upto][-n:] if n else []
            for t in self._matching(pattern)
        ]
        merged = list(merge_by_seq(runs))
        return merged[-n:] if n else []

    async def latest(
        self, pattern: str, upto: int, limit: int = LATEST_LIMIT, visible: Visible = None
    ) -> list[Message]:
        # Each topic's deque ends with its latest message: one look per matching topic.
        found: list[Kept] = []
        for topic in self._matching(pattern):
            q = self._topics.get(topic)
            if not q or (visible is not None and not visible(topic)):
                continue
            kept = q[-1]
            if kept[SEQ] > upto:
                i = bisect.bisect_right(q, upto, key=_seq)
                if not i:
                    continue
                kept = q[i - 1]
            found.append(kept)
        return [_message(k) for k in sorted(heapq.nlargest(limit, found, key=_seq), key=_seq)]

    async def trim(self, now: float) -> int:
        cutoff = int((now - self.retention) * 1000)
        spaces = self.namespaces
        removed = 0
        for topic, q in self._topics.items():
            if spaces:
                cutoff = int((now - spaces.retention(topic, self.retention)) * 1000)
            while q and q[0][TS] < cutoff:
                gone = q.popleft()
                self.size -= message_size(gone)
                self._trimmed[topic] = gone[SEQ]
                removed += 1
        for topic in [t for t, q in self._topics.items() if not q]:
            self._emptied(topic)
        # Expired keys: insertion order is publish order, so they are at the front. A
        # slice: ``append`` drops them as new ones come too.
        self._expire_keys(time.monotonic() - self.dedupe_window, KEY_SLICE)
        return removed
