"""Exponential backoff with full jitter: the one retry schedule of every reconnect loop."""

from __future__ import annotations

import random


class Backoff:
    """Delays that double from ``initial`` up to ``maximum``; ``reset`` after a success.

    With ``jitter`` each delay is drawn uniformly between half the step and the step, so
    many clients dropped at once do not come back at once.
    """

    __slots__ = ("attempts", "initial", "jitter", "maximum")

    def __init__(self, initial: float = 0.1, maximum: float = 5.0, *, jitter: bool = True) -> None:
        if initial <= 0 or maximum < initial:
            raise ValueError("need 0 < initial <= maximum")
        self.initial = initial
        self.maximum = maximum
        self.jitter = jitter
        self.attempts = 0

    def next(self) -> float:
        """The delay before the next attempt (seconds), and count the attempt."""
        step = min(self.maximum, self.initial * 2 ** min(self.attempts, 62))
        self.attempts += 1
        return random.uniform(step / 2, step) if self.jitter else step

    def reset(self) -> None:
        """Back to the first, shortest delay (after an attempt that worked)."""
        self.attempts = 0
