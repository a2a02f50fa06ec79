"""Rate limiting: a token bucket per connection (burst = one second's worth)."""

from __future__ import annotations

import time


class TokenBucket:
    """Allow ``rate`` events per second on average, bursts of up to ``rate`` events."""

    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, rate: float, now: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.capacity = max(rate, 1.0)
        self.tokens = self.capacity
        self.stamp = time.monotonic() if now is None else now

    def allow(self, now: float | None = None, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens if there are that many; False (taking none) when the rate
        is exceeded."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False
