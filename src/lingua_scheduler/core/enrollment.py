"""Rate limits on node enrollment: per fleet secret and per source address. Pure and synchronous.

Owns ``EnrollmentLimiter``: one token bucket for the enrollments made with the fleet secret (all sources
together) and one per source address for every enrollment attempt, with the secret right or wrong.
Enrollment is once in a node's life (a known node reconnects with its token, which no limit here
touches), so the buckets can be small: they bound how fast anybody holding the secret, or guessing it
from one address, can create node records.

The per-source buckets are bounded: at most ``MAX_SOURCES`` are kept, the least recently used is
forgotten first (a forgotten source starts again with a full bucket: an attacker needs that many
addresses to gain anything, and then the per-secret bucket still holds).

Must never: read the time itself (the ``Clock`` is injected), do I/O, or keep a secret.
"""

from __future__ import annotations

from collections import OrderedDict

from lingua_scheduler.clock import Clock
from lingua_scheduler.config import LimitsConfig
from lingua_scheduler.core.rate_limit import TokenBucket

#: source addresses whose buckets are kept at once
MAX_SOURCES = 4096


class EnrollmentLimiter:
    def __init__(self, config: LimitsConfig, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self._secret = TokenBucket(
            config.enrollments_per_second_per_secret, config.enrollment_burst_per_secret, clock.monotonic()
        )
        self._sources: OrderedDict[str, TokenBucket] = OrderedDict()

    def admit_source(self, source: str) -> float | None:
        """Take one attempt from ``source``'s bucket; None when admitted, else seconds to wait."""
        now = self.clock.monotonic()
        bucket = self._sources.get(source)
        if bucket is None:
            cfg = self.config
            bucket = TokenBucket(cfg.enrollments_per_second_per_source, cfg.enrollment_burst_per_source, now)
            self._sources[source] = bucket
            if len(self._sources) > MAX_SOURCES:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(source)
        return None if bucket.take(now) else bucket.retry_after()

    def admit_secret(self) -> float | None:
        """Take one enrollment from the fleet secret's bucket; None when admitted, else seconds to wait."""
        bucket = self._secret
        return None if bucket.take(self.clock.monotonic()) else bucket.retry_after()

    @property
    def sources(self) -> int:
        return len(self._sources)
