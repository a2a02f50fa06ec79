"""History in process memory: fast, lost on restart."""

from __future__ import annotations

import bisect
import heapq
import time
from collections import deque

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


def _seq(msg: Message) -> int:
    return msg.seq


class _MemoryPages(Pages):
    """A replay over the memory store's topics a page at a time: a merge of the topics'
    runs by seq that resumes where the last page stopped (a heap of each topic's next
    seq), so a page costs its own size, not the history's."""

    def __init__(
        self,
        runs: dict[str, deque[Message]],
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
            if not q or q[-1].seq <= start:
                continue
            i = bisect.bisect_right(q, start, key=_seq)
            if q[i].seq <= upto:
                self._heap.append((q[i].seq, topic))
        heapq.heapify(self._heap)

    async def next(self) -> list[Message]:
        page: list[Message] = []
        total = 0
        heap = self._heap
        while heap and len(page) < self._size and not self.gap:
            seq, topic = heap[0]
            q = self._runs.get(topic)
            i = bisect.bisect_left(q, seq, key=_seq) if q else 0
            if not q or i == len(q) or q[i].seq != seq:
                # Removed (age, count, size) before it was sent: stop before the hole.
                self.gap = True
                break
            msg = q[i]
            if page and total + len(msg.payload) > self._max_bytes:
                break
            heapq.heappop(heap)
            page.append(msg)
            total += len(msg.payload)
            if i + 1 < len(q) and q[i + 1].seq <= self._upto:
                heapq.heappush(heap, (q[i + 1].seq, topic))
        return page


def message_size(msg: Message) -> int:
    """What a message counts against ``history_size``: its data, topic and sender."""
    return len(msg.payload) + len(msg.topic) + len(msg.sender_id) + len(msg.sender_name)


class MemoryStore(Store):
    """History in process memory: fast, lost on restart (a new epoch every start).

    Bounded per topic (``history`` messages) and in all (``history_size`` bytes, see
    ``message_size``): past the total, the oldest messages go first, whatever their topic,
    and their topic's ``trimmed`` mark moves on, so a ``since`` replay that misses them
    answers ``recovered: false``."""

    def __init__(
        self,
        history: int = 1000,
        retention: float = 24 * 3600,
        history_size: int | None = None,
    ) -> None:
        super().__init__(history, retention)
        self.epoch = new_epoch()
        self.history_size = history_size
        self._topics: dict[str, deque[Message]] = {}
        self._trimmed: dict[str, int] = {}
        #: Bytes of the retained messages (``message_size``).
        self.size = 0
        # (seq of a topic's oldest message, topic), a heap: finds the oldest message of all.
        # Entries go stale when a topic loses messages another way; fixed when met.
        self._oldest: list[tuple[int, str]] = []
        # (user, key) -> (seqs, monotonic time of the publish), oldest first.
        self._keys: dict[KeyId, tuple[tuple[int, ...], float]] = {}

    async def append(self, drafts: list[Draft]) -> list[Message]:
        return self.append_now(drafts)

    def append_now(self, drafts: list[Draft]) -> list[Message]:
        numbered = number(drafts, self.last_seq + 1, self._known_key)
        spaces = self.namespaces
        history = self.history
        for msg in numbered.fresh:
            if spaces:
                history = spaces.history(msg.topic, self.history)
            q = self._topics.get(msg.topic)
            if q is None:
                q = self._topics[msg.topic] = deque()
                self._trimmed.setdefault(msg.topic, 0)
            if not q:
                heapq.heappush(self._oldest, (msg.seq, msg.topic))
            q.append(msg)
            self.size += message_size(msg)
            while len(q) > history:
                gone = q.popleft()
                self.size -= message_size(gone)
                self._trimmed[msg.topic] = gone.seq
        if self.history_size is not None and self.size > self.history_size:
            self._evict(self.history_size)
        if numbered.fresh:
            self.last_seq = numbered.fresh[-1].seq
        now = time.monotonic()
        for kid, seqs in numbered.keys.items():
            self._keys.pop(kid, None)  # a reused expired key moves to the end
            self._keys[kid] = (seqs, now)
        return numbered.results

    def _evict(self, limit: int) -> None:
        """Drop the oldest messages of all topics until the total is within ``limit``."""
        oldest = self._oldest
        while self.size > limit and oldest:
            seq, topic = heapq.heappop(oldest)
            q = self._topics.get(topic)
            if not q:
                continue
            if q[0].seq != seq:  # stale: file the topic under its oldest message now
                heapq.heappush(oldest, (q[0].seq, topic))
                continue
            gone = q.popleft()
            self.size -= message_size(gone)
            self._trimmed[topic] = gone.seq
            if q:
                heapq.heappush(oldest, (q[0].seq, topic))
        if len(oldest) > 2 * len(self._topics) + 64:
            # Topics emptied by age and made again leave entries behind: start afresh.
            self._oldest = [(q[0].seq, t) for t, q in self._topics.items() if q]
            heapq.heapify(self._oldest)

    def _known_key(self, user: str, key: str) -> tuple[int, ...] | None:
        found = self._keys.get((user, key))
        if found is None or time.monotonic() - found[1] >= self.dedupe_window:
            return None
        return found[0]

    def _matching(self, pattern: str) -> list[str]:
        if not is_pattern(pattern):
            return [pattern] if pattern in self._trimmed else []
        return [t for t in self._trimmed if matches(pattern, t)]

    async def read_since(self, pattern: str, since: int, upto: int) -> Replay:
        topics = self._matching(pattern)
        recovered = all(self._trimmed[t] <= since for t in topics)
        runs = [[m for m in self._topics.get(t, ()) if since < m.seq <= upto] for t in topics]
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
            start, recovered = since, all(self._trimmed[t] <= since for t in topics)
        else:
            start, recovered = self._nth_latest(topics, last or 0, upto), True
        return _MemoryPages(self._topics, topics, start, recovered, upto, page_size, page_bytes)

    def _nth_latest(self, topics: list[str], n: int, upto: int) -> int:
        """The seq after which the latest ``n`` messages (``seq <= upto``) of ``topics``
        begin; ``upto`` when there are none."""
        if n <= 0:
            return upto
        runs = [(m.seq for m in reversed(self._topics.get(t, ())) if m.seq <= upto) for t in topics]
        nth = None
        for i, seq in enumerate(heapq.merge(*runs, reverse=True)):
            nth = seq
            if i + 1 >= n:
                break
        return upto if nth is None else nth - 1

    async def read_last(self, pattern: str, n: int, upto: int) -> list[Message]:
        runs = [
            [m for m in self._topics.get(t, ()) if m.seq <= upto][-n:] if n else []
            for t in self._matching(pattern)
        ]
        merged = list(merge_by_seq(runs))
        return merged[-n:] if n else []

    async def latest(
        self, pattern: str, upto: int, limit: int = LATEST_LIMIT, visible: Visible = None
    ) -> list[Message]:
        # Each topic's deque ends with its latest message: one look per matching topic.
        found: list[Message] = []
        for topic in self._matching(pattern):
            q = self._topics.get(topic)
            if not q or (visible is not None and not visible(topic)):
                continue
            msg = q[-1]
            if msg.seq > upto:
                i = bisect.bisect_right(q, upto, key=_seq)
                if not i:
                    continue
                msg = q[i - 1]
            found.append(msg)
        return sorted(heapq.nlargest(limit, found, key=_seq), key=_seq)

    async def trim(self, now: float) -> int:
        cutoff = int((now - self.retention) * 1000)
        spaces = self.namespaces
        removed = 0
        for topic, q in self._topics.items():
            if spaces:
                cutoff = int((now - spaces.retention(topic, self.retention)) * 1000)
            while q and q[0].ts < cutoff:
                gone = q.popleft()
                self.size -= message_size(gone)
                self._trimmed[topic] = gone.seq
                removed += 1
        for topic in [t for t, q in self._topics.items() if not q]:
            del self._topics[topic]
        # Expired keys: insertion order is publish order, so they are at the front.
        expired = time.monotonic() - self.dedupe_window
        for kid, (_, stamp) in list(self._keys.items()):
            if stamp >= expired:
                break
            del self._keys[kid]
        return removed
