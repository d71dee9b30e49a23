"""Message-rate limiting for one connection: a token bucket and the policy built on it.

Owns: ``TokenBucket`` (``rate`` tokens per second, at most ``burst`` saved up) and ``RateGuard``, which
turns the bucket's yes/no into what the endpoint must do with one inbound frame:

- ``PASS``: a token was available, handle the frame;
- ``DROP_AND_TELL``: over the rate, drop the frame and tell the peer (``error{RATE_LIMITED}``). At most
  one telling per ``TELL_EVERY`` seconds: answering every dropped frame would let a flooding peer make
  us write as much as it sends;
- ``DROP``: over the rate, drop the frame silently (the peer was told less than a second ago);
- ``CLOSE``: the peer has stayed over the rate for ``close_after`` seconds: close the connection.

"Stayed over the rate" is an *episode*: it starts at a dropped frame and lasts while dropped frames keep
coming less than ``QUIET`` seconds apart. A peer that exceeds its rate only briefly (a client flushing
audio after a network stall) loses those frames and is told so; a peer that keeps sending faster than
its rate, even at twice the rate with every other frame passing, is closed.

Must never: sleep, do I/O, or read the wall clock. Time is the injected ``Clock``'s monotonic time, and
a clock that steps backwards only stops the refill for a while, it never mints tokens.
"""

from __future__ import annotations

from enum import StrEnum

from lingua_scheduler.clock import Clock

#: an episode of excess ends after this long without a dropped frame
QUIET = 1.0
#: at most one RATE_LIMITED error per this many seconds per connection
TELL_EVERY = 1.0
#: float slack: a frame arriving exactly 1/rate after the last must pass despite rounding
_EPS = 1e-9


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``; starts full."""

    __slots__ = ("_at", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, got {rate}, {burst}")
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._at = now

    def take(self, now: float, n: float = 1.0) -> bool:
        """Take ``n`` tokens if there are that many (after refilling up to ``now``)."""
        elapsed = now - self._at
        if elapsed > 0:  # a backwards step refills nothing and does not move the reference
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
            self._at = now
        if self._tokens >= n - _EPS:
            self._tokens = max(0.0, self._tokens - n)
            return True
        return False

    def reshape(self, rate: float, burst: float) -> None:
        """New rate and capacity from now on; tokens above the new capacity are dropped."""
        if rate <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, got {rate}, {burst}")
        self.rate = rate
        self.burst = float(burst)
        self._tokens = min(self._tokens, self.burst)

    def retry_after(self, n: float = 1.0) -> float:
        """Seconds until ``n`` tokens are available (0 when they already are), as of the last call."""
        return max(0.0, (n - self._tokens) / self.rate)

    @property
    def tokens(self) -> float:
        return self._tokens


class Decision(StrEnum):
    PASS = "pass"
    DROP = "drop"
    DROP_AND_TELL = "drop_and_tell"
    CLOSE = "close"


class RateGuard:
    """The rate policy of one connection (see the module docstring)."""

    __slots__ = ("_clock", "_episode_start", "_last_drop", "_last_told", "bucket", "close_after", "dropped")

    def __init__(self, rate: float, burst: int, close_after: float, clock: Clock) -> None:
        self._clock = clock
        self.bucket = TokenBucket(rate, burst, clock.monotonic())
        self.close_after = close_after
        #: frames dropped over the connection's life
        self.dropped = 0
        self._episode_start: float | None = None
        self._last_drop = 0.0
        self._last_told = 0.0

    def check(self) -> Decision:
        """What to do with the frame that just arrived."""
        now = self._clock.monotonic()
        if self.bucket.take(now):
            return Decision.PASS
        self.dropped += 1
        if self._episode_start is None or now - self._last_drop >= QUIET or now < self._last_drop:
            self._episode_start = now
            self._last_told = now - TELL_EVERY  # the first drop of an episode is always told
        self._last_drop = now
        if now - self._episode_start >= self.close_after:
            return Decision.CLOSE
        if now - self._last_told >= TELL_EVERY:
            self._last_told = now
            return Decision.DROP_AND_TELL
        return Decision.DROP

    @property
    def episode_seconds(self) -> float:
        """How long the current episode of excess has lasted (0 when there is none)."""
        if self._episode_start is None:
            return 0.0
        return max(0.0, self._last_drop - self._episode_start)
