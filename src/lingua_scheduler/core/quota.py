"""Audio-minute quotas per tenant: daily and monthly, over UTC periods.

Owns ``QuotaBook`` and its decisions. A tenant's quota (``[[auth.tenants]] daily_audio_minutes``,
``monthly_audio_minutes``; 0 = none) is spent by the seconds of audio accepted for translation (what
``core/usage.py`` counts as received). The periods are the UTC day (00:00 to 00:00) and the UTC
calendar month; a period's use starts at zero when it begins.

- ``check(tenant, seconds)`` before audio is accepted: allowed, or refused with ``QUOTA_EXCEEDED``
  naming the period, its use and limit and when it resets (the start of the next period) when the
  period is used up or these seconds would go over it. A refusal changes nothing.
- ``allowance(tenant)``: the same rule as a frozen value (each period's use, limit and reset), for a
  decision made elsewhere without this book: the engine decides a batch of utterances on it, spending
  from its own copy (``Allowance.spent``) so that the second of two utterances sees the first's use.
- ``consume(tenant, seconds)`` once the audio is accepted: adds it to both periods and returns the
  warnings due: one per period, the first time its use reaches ``warn_fraction`` of the limit.
- ``share(tenant, ...)``: in Redis mode the other instances' use of the current periods (as last
  read) counts too.

Must never: read the time itself (the ``Clock`` is injected: ``wall_ms`` on the shared clock), do I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

from lingua_scheduler.clock import Clock
from lingua_scheduler.errors import ErrorCode, SchedulerError


class Period(StrEnum):
    DAILY = "daily"
    MONTHLY = "monthly"


@dataclass(frozen=True, slots=True)
class QuotaLimits:
    daily_seconds: float = 0.0
    monthly_seconds: float = 0.0

    def of(self, period: Period) -> float:
        return self.daily_seconds if period is Period.DAILY else self.monthly_seconds


def period_bounds(period: Period, wall_ms: int) -> tuple[int, int]:
    """The UTC period holding ``wall_ms``, as [start, end) in ms since the epoch."""
    t = datetime.fromtimestamp(wall_ms / 1000, UTC)
    if period is Period.DAILY:
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        end_ms = int(start.timestamp() * 1000) + 86_400_000
        return int(start.timestamp() * 1000), end_ms
    start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    nxt = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return int(start.timestamp() * 1000), int(nxt.timestamp() * 1000)


@dataclass(frozen=True, slots=True)
class QuotaWarning:
    """The tenant used ``warn_fraction`` of a period's quota (sent once per period)."""

    tenant_id: str
    period: Period
    used_seconds: float
    limit_seconds: float
    reset_at_ms: int


@dataclass(frozen=True, slots=True)
class QuotaDecision:
    allowed: bool
    #: the period that refused (None when allowed)
    period: Period | None = None
    used_seconds: float = 0.0
    limit_seconds: float = 0.0
    reset_at_ms: int = 0

    def error(self, tenant_id: str) -> SchedulerError:
        """The refusal as an error (``QUOTA_EXCEEDED``); ``details`` say which period, its use, its
        limit and when it resets."""
        assert not self.allowed and self.period is not None
        reset = datetime.fromtimestamp(self.reset_at_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return SchedulerError(
            f"tenant {tenant_id} has used {self.used_seconds / 60:.1f} of its {self.period.value} "
            f"{self.limit_seconds / 60:g} audio minutes; the quota resets at {reset}",
            code=ErrorCode.QUOTA_EXCEEDED,
            details={
                "period": self.period.value,
                "used_seconds": round(self.used_seconds, 3),
                "limit_seconds": self.limit_seconds,
                "reset_at": reset,
                "reset_at_ms": self.reset_at_ms,
            },
        )


@dataclass(frozen=True, slots=True)
class PeriodUse:
    period: Period
    used_seconds: float
    limit_seconds: float
    reset_at_ms: int


@dataclass(frozen=True, slots=True)
class Allowance:
    """A tenant's quota as it stands: the periods that have a limit, with their use so far."""

    tenant_id: str
    periods: tuple[PeriodUse, ...]

    def check(self, seconds: float = 0.0) -> QuotaDecision:
        """Allowed, or refused by the first period used up or that ``seconds`` would go over."""
        for p in self.periods:
            used = p.used_seconds
            if used >= p.limit_seconds or used + seconds > p.limit_seconds:
                return QuotaDecision(False, p.period, used, p.limit_seconds, p.reset_at_ms)
        return QuotaDecision(True)

    def spent(self, seconds: float) -> Allowance:
        """The allowance after ``seconds`` more are accepted."""
        return Allowance(
            self.tenant_id,
            tuple(
                PeriodUse(p.period, p.used_seconds + seconds, p.limit_seconds, p.reset_at_ms)
                for p in self.periods
            ),
        )


@dataclass(slots=True)
class _Spent:
    start_ms: int = 0
    here: float = 0.0
    elsewhere: float = 0.0
    warned: bool = False


@dataclass(slots=True)
class _Tenant:
    periods: dict[Period, _Spent] = field(default_factory=lambda: {p: _Spent() for p in Period})


class QuotaBook:
    def __init__(
        self, clock: Clock, limits: Mapping[str, QuotaLimits], *, warn_fraction: float = 0.8
    ) -> None:
        self.clock = clock
        self.warn_fraction = warn_fraction
        self.limits: dict[str, QuotaLimits] = dict(limits)
        self._tenants: dict[str, _Tenant] = {}

    def set_limits(self, limits: Mapping[str, QuotaLimits]) -> None:
        """New quotas (reload): the use of the current periods is kept."""
        self.limits = dict(limits)

    def _spent(self, tenant_id: str, period: Period, now_ms: int) -> tuple[_Spent, int]:
        start, end = period_bounds(period, now_ms)
        st = self._tenants.setdefault(tenant_id, _Tenant()).periods[period]
        if st.start_ms != start:  # a new period: its use starts at zero, and it may warn again
            st.start_ms, st.here, st.elsewhere, st.warned = start, 0.0, 0.0, False
        return st, end

    def used(self, tenant_id: str, period: Period) -> float:
        st, _ = self._spent(tenant_id, period, self.clock.wall_ms())
        return st.here + st.elsewhere

    def allowance(self, tenant_id: str | None) -> Allowance | None:
        """The tenant's quota now; None for a tenant without one (nothing to decide)."""
        limits = self.limits.get(tenant_id or "")
        if tenant_id is None or limits is None:
            return None
        now = self.clock.wall_ms()
        periods = []
        for period in Period:
            limit = limits.of(period)
            if limit <= 0:
                continue
            st, end = self._spent(tenant_id, period, now)
            periods.append(PeriodUse(period, st.here + st.elsewhere, limit, end))
        return Allowance(tenant_id, tuple(periods))

    def check(self, tenant_id: str | None, seconds: float = 0.0) -> QuotaDecision:
        allowance = self.allowance(tenant_id)
        return QuotaDecision(True) if allowance is None else allowance.check(seconds)

    def consume(self, tenant_id: str | None, seconds: float) -> list[QuotaWarning]:
        limits = self.limits.get(tenant_id or "")
        if tenant_id is None or limits is None or seconds <= 0:
            return []
        now = self.clock.wall_ms()
        warnings = []
        for period in Period:
            st, end = self._spent(tenant_id, period, now)
            st.here += seconds
            limit = limits.of(period)
            if limit > 0 and not st.warned and st.here + st.elsewhere >= self.warn_fraction * limit:
                st.warned = True
                warnings.append(QuotaWarning(tenant_id, period, st.here + st.elsewhere, limit, end))
        return warnings

    def share(self, tenant_id: str, period: Period, start_ms: int, elsewhere_seconds: float) -> None:
        """The other instances' use of ``period`` starting at ``start_ms`` (ignored when it is not the
        current period: a figure of the last period does not count in this one)."""
        st, _ = self._spent(tenant_id, period, self.clock.wall_ms())
        if st.start_ms == start_ms:
            st.elsewhere = max(0.0, elsewhere_seconds)
