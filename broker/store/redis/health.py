"""Whether Redis answers (outages logged once), and the answers that are not failures."""

from __future__ import annotations

import logging
import time

from broker.errors import Unavailable

log = logging.getLogger("broker.store.redis")

#: While Redis is down, how often a request may try it (others are refused at once).
PROBE_INTERVAL = 0.25


class EpochChanged(Exception):
    """The append script found another epoch in Redis than this node's."""


class HistoryWentBack(Exception):
    """The append script found the seq counter below what this node already saw."""

    def __init__(self, counter: int) -> None:
        super().__init__(f"the seq counter is back at {counter}")
        self.counter = counter


class ServerChanged(Exception):
    """The append script ran on another Redis server than the one recorded with the epoch
    (a restart that loaded its data from disk, or a failover)."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"the Redis server is now {run_id}")
        self.run_id = run_id


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
