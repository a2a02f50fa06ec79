"""broker.core.limits.TokenBucket with an injected clock: burst, refill, cap. In-process."""

from __future__ import annotations

import pytest

from broker.core.limits import TokenBucket


def take_all(bucket: TokenBucket, now: float, most: int = 10_000) -> int:
    """How many single-token events the bucket allows at ``now`` (bounded)."""
    taken = 0
    while taken < most and bucket.allow(now):
        taken += 1
    return taken


@pytest.mark.parametrize("rate", [1, 5, 20, 1000])
def test_burst_is_one_seconds_worth(rate: int) -> None:
    bucket = TokenBucket(rate, now=100.0)
    assert take_all(bucket, 100.0) == rate


def test_a_slow_rate_still_allows_one_event() -> None:
    bucket = TokenBucket(0.5, now=0.0)
    assert bucket.capacity == 1.0
    assert take_all(bucket, 0.0) == 1
    assert not bucket.allow(1.0)  # half a token after one second at 0.5/s
    assert bucket.allow(2.0)


def test_refills_at_the_rate() -> None:
    bucket = TokenBucket(10, now=0.0)
    assert take_all(bucket, 0.0) == 10
    assert not bucket.allow(0.0)
    assert take_all(bucket, 0.25) == 2  # 2.5 tokens: two whole ones
    assert take_all(bucket, 0.35) == 1  # the half left plus one more tenth of a second
    assert take_all(bucket, 0.35) == 0


def test_never_above_capacity_however_long_idle() -> None:
    bucket = TokenBucket(5, now=0.0)
    assert take_all(bucket, 3600.0) == 5
    assert bucket.tokens < 1


def test_a_refused_event_takes_nothing() -> None:
    bucket = TokenBucket(4, now=0.0)
    assert bucket.allow(0.0, cost=3)
    assert not bucket.allow(0.0, cost=2)  # one left: refused whole
    assert bucket.allow(0.0, cost=1)


def test_a_cost_above_capacity_is_never_allowed() -> None:
    bucket = TokenBucket(3, now=0.0)
    assert not bucket.allow(1000.0, cost=4)
    assert bucket.allow(1000.0, cost=3)


def test_rate_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0)
