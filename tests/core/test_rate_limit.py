"""The token bucket and the rate policy of a connection, on a manual clock."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lingua_scheduler.clock import ManualClock
from lingua_scheduler.core.rate_limit import QUIET, TELL_EVERY, Decision, RateGuard, TokenBucket


def test_bucket_starts_full_and_refills_at_rate() -> None:
    b = TokenBucket(rate=10, burst=5, now=0.0)
    assert [b.take(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert b.retry_after() == pytest.approx(0.1)
    assert not b.take(0.05)
    assert b.take(0.1)
    assert b.take(100.0) and b.tokens == pytest.approx(4)  # capped at burst, minus the one taken


def test_bucket_ignores_a_backwards_clock() -> None:
    b = TokenBucket(rate=10, burst=1, now=10.0)
    assert b.take(10.0)
    assert not b.take(5.0)  # stepping back mints nothing
    assert not b.take(10.05)
    assert b.take(10.1)


def test_bucket_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1, now=0)
    with pytest.raises(ValueError):
        TokenBucket(rate=1, burst=0, now=0)


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(0.5, 1000),
    burst=st.integers(1, 500),
    gaps=st.lists(st.floats(0, 0.5), min_size=1, max_size=300),
)
def test_bucket_never_admits_more_than_burst_plus_rate_times_time(
    rate: float, burst: int, gaps: list[float]
) -> None:
    b = TokenBucket(rate, burst, now=0.0)
    now = 0.0
    admitted = 0
    for gap in gaps:
        now += gap
        admitted += b.take(now)
        assert admitted <= burst + rate * now + 1e-6


@settings(max_examples=100, deadline=None)
@given(rate=st.floats(1, 500), slack=st.floats(1.0, 4.0), burst=st.integers(1, 50))
def test_a_sender_within_the_rate_is_never_limited(rate: float, slack: float, burst: int) -> None:
    """Frames spaced at or above 1/rate always pass, whatever the burst (audio at 50/s under 100/s)."""
    clock = ManualClock(start=0.0)
    guard = RateGuard(rate, burst, close_after=1.0, clock=clock)
    for _ in range(500):
        assert guard.check() is Decision.PASS
        clock.advance(slack / rate)
    assert guard.dropped == 0


def test_excess_is_told_once_a_second_then_closed_when_sustained() -> None:
    clock = ManualClock(start=0.0)
    guard = RateGuard(rate=10, burst=10, close_after=3.0, clock=clock)
    decisions = []
    for _ in range(400):  # 100 frames a second for 4 s: ten times the rate
        decisions.append(guard.check())
        clock.advance(0.01)
    assert decisions[:10] == [Decision.PASS] * 10  # the burst
    first_drop = next(d for d in decisions if d is not Decision.PASS)
    assert first_drop is Decision.DROP_AND_TELL  # the first drop of an episode is always told
    told = [i for i, d in enumerate(decisions) if d is Decision.DROP_AND_TELL]
    # once per TELL_EVERY second while it lasts (the frames are 10 ms apart)
    assert all(b - a >= TELL_EVERY / 0.01 - 1 for a, b in itertools.pairwise(told))
    assert len(told) == 3
    first_close = decisions.index(Decision.CLOSE)
    assert first_close * 0.01 == pytest.approx(0.1 + 3.0, abs=0.05)
    assert guard.dropped == 400 - decisions.count(Decision.PASS)


def test_twice_the_rate_is_sustained_excess_too() -> None:
    """Every other frame passes, but the peer never slows down: it is closed after close_after."""
    clock = ManualClock(start=0.0)
    guard = RateGuard(rate=10, burst=1, close_after=2.0, clock=clock)
    seen = set()
    for _ in range(100):  # 20 frames a second for 5 s
        d = guard.check()
        seen.add(d)
        if d is Decision.CLOSE:
            break
        clock.advance(0.05)
    assert Decision.PASS in seen and Decision.CLOSE in seen


def test_a_brief_burst_is_forgiven_after_a_quiet_spell() -> None:
    clock = ManualClock(start=0.0)
    guard = RateGuard(rate=10, burst=5, close_after=2.0, clock=clock)
    for _ in range(3):  # three episodes of 1.5 s over the rate, each followed by quiet
        for _ in range(150):
            assert guard.check() is not Decision.CLOSE
            clock.advance(0.01)
        clock.advance(QUIET + 1.0)
        assert guard.check() is Decision.PASS
    assert guard.episode_seconds < 2.0
