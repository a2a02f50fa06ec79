"""History in process memory: fast, lost on restart."""

from __future__ import annotations

from collections import deque

from broker.core.model import Draft, Message, merge_by_seq, new_epoch
from broker.core.topics import is_pattern, matches
from broker.store.base import Replay, Store


class MemoryStore(Store):
    """History in process memory: fast, lost on restart (a new epoch every start)."""

    def __init__(self, history: int = 1000, retention: float = 24 * 3600) -> None:
        super().__init__(history, retention)
        self.epoch = new_epoch()
        self._topics: dict[str, deque[Message]] = {}
        self._trimmed: dict[str, int] = {}

    async def append(self, drafts: list[Draft]) -> list[Message]:
        out = []
        for d in drafts:
            self.last_seq += 1
            msg = d.to_message(self.last_seq)
            q = self._topics.get(d.topic)
            if q is None:
                q = self._topics[d.topic] = deque()
                self._trimmed.setdefault(d.topic, 0)
            q.append(msg)
            if len(q) > self.history:
                self._trimmed[d.topic] = q.popleft().seq
            out.append(msg)
        return out

    def _matching(self, pattern: str) -> list[str]:
        if not is_pattern(pattern):
            return [pattern] if pattern in self._trimmed else []
        return [t for t in self._trimmed if matches(pattern, t)]

    async def read_since(self, pattern: str, since: int, upto: int) -> Replay:
        topics = self._matching(pattern)
        recovered = all(self._trimmed[t] <= since for t in topics)
        runs = [[m for m in self._topics.get(t, ()) if since < m.seq <= upto] for t in topics]
        return Replay(list(merge_by_seq(runs)), recovered)

    async def read_last(self, pattern: str, n: int, upto: int) -> list[Message]:
        runs = [
            [m for m in self._topics.get(t, ()) if m.seq <= upto][-n:] if n else []
            for t in self._matching(pattern)
        ]
        merged = list(merge_by_seq(runs))
        return merged[-n:] if n else []

    async def trim(self, now: float) -> int:
        cutoff = int((now - self.retention) * 1000)
        removed = 0
        for topic, q in self._topics.items():
            while q and q[0].ts < cutoff:
                self._trimmed[topic] = q.popleft().seq
                removed += 1
        for topic in [t for t, q in self._topics.items() if not q]:
            del self._topics[topic]
        return removed
