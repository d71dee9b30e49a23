"""Usage metering (hourly buckets, bounded labels, query, merge across instances), quotas (UTC periods,
refusal with reset time, one warning per period) and webhook signatures."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lingua_scheduler.clock import ManualClock
from lingua_scheduler.core import webhook_signing as ws
from lingua_scheduler.core.quota import Period, QuotaBook, QuotaLimits, period_bounds
from lingua_scheduler.core.usage import HOUR_MS, UsageMeter, merge, report
from lingua_scheduler.errors import ErrorCode


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


def clock_at(text: str) -> ManualClock:
    return ManualClock(wall_ms=ms(text))


# --- usage -------------------------------------------------------------------------------------------


def test_usage_in_hourly_buckets_per_pair() -> None:
    clock = clock_at("2025-03-01T10:15:00")
    meter = UsageMeter(["acme"], clock)
    meter.record_audio_received("acme", "en", "zh-CN", 30.0)
    meter.record_job("acme", "en", "zh", "completed", audio_seconds=30.0, tts_seconds=25.0)
    meter.record_job("acme", "en", "de", "failed", audio_seconds=9.0)  # not translated: not counted
    clock.advance(3600)
    meter.record_audio_received("acme", "en", "zh", 12.5)
    r = meter.query("acme", ms("2025-03-01T10:59:00"), ms("2025-03-01T12:00:00"))
    assert [(b.hour_ms, b.src_lang, b.tgt_lang) for b in r.buckets] == [
        (ms("2025-03-01T10:00:00"), "en", "de"),
        (ms("2025-03-01T10:00:00"), "en", "zh"),
        (ms("2025-03-01T11:00:00"), "en", "zh"),
    ]
    assert r.total.audio_seconds_received == 42.5 and r.total.audio_seconds_translated == 30.0
    assert r.total.tts_seconds == 25.0 and r.total.jobs == {
        "completed": 1,
        "failed": 1,
        "timed_out": 0,
        "cancelled": 0,
    }
    later = meter.query("acme", ms("2025-03-01T11:00:00"), ms("2025-03-02T00:00:00"))
    assert later.total.audio_seconds_received == 12.5


def test_only_configured_tenants_and_bounded_pairs() -> None:
    meter = UsageMeter(["acme"], ManualClock(), max_pairs=2)
    meter.record_audio_received("intruder", "en", "zh", 5)
    meter.record_audio_received(None, "en", "zh", 5)
    for tgt in ("zh", "de", "fr", "ja"):
        meter.record_audio_received("acme", "en", tgt, 1)
    meter.record_audio_received("acme", "x" * 40, "zh", 1)
    assert meter.unmetered == 2 and set(meter.totals) == {"acme"}
    pairs = {(r.src_lang, r.tgt_lang): r.counts.audio_seconds_received for r in meter.records()}
    assert pairs == {("en", "zh"): 1, ("en", "de"): 1, ("other", "other"): 3}


def test_old_buckets_age_out_totals_stay() -> None:
    clock = ManualClock()
    meter = UsageMeter(["acme"], clock, retention_hours=2)
    meter.record_audio_received("acme", "en", "zh", 1)
    clock.advance(3 * 3600)
    meter.record_audio_received("acme", "en", "zh", 1)
    assert len(meter.records()) == 1 and meter.totals["acme"].audio_seconds_received == 2


def test_merge_sums_instances() -> None:
    clock = clock_at("2025-03-01T10:00:00")
    a, b = UsageMeter(["acme", "globex"], clock), UsageMeter(["acme"], clock)
    a.record_audio_received("acme", "en", "zh", 10)
    b.record_audio_received("acme", "en", "zh", 5)
    b.record_job("acme", "en", "zh", "timed_out")
    a.record_audio_received("globex", "en", "zh", 7)
    merged = merge([a.records(), b.records()])
    r = report(merged, "acme", 0, ms("2025-03-02T00:00:00"))
    assert len(r.buckets) == 1 and r.total.audio_seconds_received == 15 and r.total.jobs["timed_out"] == 1
    assert report(merged, "globex", 0, ms("2025-03-02T00:00:00")).total.audio_seconds_received == 7


@given(st.lists(st.tuples(st.integers(0, 72), st.sampled_from(["a", "b"]), st.floats(0, 100)), max_size=40))
def test_query_of_the_whole_range_is_the_sum(events: list[tuple[int, str, float]]) -> None:
    clock = ManualClock(wall_ms=0)
    meter = UsageMeter(["a", "b"], clock, retention_hours=1000)
    for hour, tenant, seconds in sorted(events):
        clock._wall_ms = hour * HOUR_MS
        meter.record_audio_received(tenant, "en", "zh", seconds)
    total = meter.query("a", 0, 100 * HOUR_MS).total.audio_seconds_received
    assert total == pytest.approx(sum(s for _, t, s in events if t == "a" and s > 0))


# --- quotas ------------------------------------------------------------------------------------------


def test_utc_periods() -> None:
    assert period_bounds(Period.DAILY, ms("2025-03-01T23:59:59")) == (
        ms("2025-03-01T00:00:00"),
        ms("2025-03-02T00:00:00"),
    )
    assert period_bounds(Period.MONTHLY, ms("2025-12-31T12:00:00")) == (
        ms("2025-12-01T00:00:00"),
        ms("2026-01-01T00:00:00"),
    )
    assert period_bounds(Period.MONTHLY, ms("2024-02-29T00:00:00"))[1] == ms("2024-03-01T00:00:00")


def test_daily_quota_refuses_with_its_reset_and_resets() -> None:
    clock = clock_at("2025-03-01T22:00:00")
    book = QuotaBook(clock, {"acme": QuotaLimits(daily_seconds=600)})
    assert book.check("acme", 590).allowed
    book.consume("acme", 590)
    refused = book.check("acme", 20)
    assert (
        not refused.allowed
        and refused.period is Period.DAILY
        and refused.reset_at_ms == ms("2025-03-02T00:00:00")
    )
    err = refused.error("acme")
    assert err.code is ErrorCode.QUOTA_EXCEEDED
    assert err.details["reset_at"] == "2025-03-02T00:00:00Z" and err.details["period"] == "daily"
    assert book.used("acme", Period.DAILY) == 590  # a refusal changes nothing
    assert book.check("acme", 10).allowed
    book.consume("acme", 10)
    assert not book.check("acme").allowed  # used up: even nothing more is refused
    clock.advance(2 * 3600)
    assert book.check("acme", 600).allowed and book.used("acme", Period.DAILY) == 0
    assert book.used("acme", Period.MONTHLY) == 600


def test_monthly_quota_and_unlimited_tenants() -> None:
    clock = clock_at("2025-03-31T10:00:00")
    book = QuotaBook(clock, {"acme": QuotaLimits(monthly_seconds=100)})
    book.consume("acme", 100)
    d = book.check("acme", 1)
    assert d.period is Period.MONTHLY and d.reset_at_ms == ms("2025-04-01T00:00:00")
    assert book.check("other", 10**9).allowed and book.check(None).allowed


def test_warning_once_per_period_at_the_fraction() -> None:
    clock = clock_at("2025-03-01T10:00:00")
    book = QuotaBook(clock, {"acme": QuotaLimits(daily_seconds=100, monthly_seconds=1000)}, warn_fraction=0.8)
    assert book.consume("acme", 79) == []
    (w,) = book.consume("acme", 1)
    assert (w.period, w.used_seconds, w.limit_seconds, w.reset_at_ms) == (
        Period.DAILY,
        80,
        100,
        ms("2025-03-02T00:00:00"),
    )
    assert book.consume("acme", 5) == []
    clock.advance(86400)
    assert [w.period for w in book.consume("acme", 80)] == [Period.DAILY]
    assert [w.period for w in book.consume("acme", 700)] == [Period.MONTHLY]


def test_other_instances_use_counts() -> None:
    clock = clock_at("2025-03-01T10:00:00")
    book = QuotaBook(clock, {"acme": QuotaLimits(daily_seconds=100)})
    start, _ = period_bounds(Period.DAILY, clock.wall_ms())
    book.share("acme", Period.DAILY, start, 95)
    assert not book.check("acme", 10).allowed
    book.share("acme", Period.DAILY, start - 86_400_000, 0)  # yesterday's figure: ignored
    assert not book.check("acme", 10).allowed


# --- webhook signatures ------------------------------------------------------------------------------


def test_signature_round_trip_and_refusals() -> None:
    body = b'{"type":"test.ping"}'
    header = ws.sign("whsec-0123456789abcdef", 1_700_000_000, body)
    assert header.startswith("t=1700000000,v1=")
    assert ws.verify("whsec-0123456789abcdef", header, body, now=1_700_000_100) == 1_700_000_000
    for secret, hdr, data, now, why in [
        ("wrong-secret-0123456789", header, body, 1_700_000_000, "mismatch"),
        ("whsec-0123456789abcdef", header, body + b" ", 1_700_000_000, "mismatch"),
        ("whsec-0123456789abcdef", header, body, 1_700_000_301, "stale"),
        ("whsec-0123456789abcdef", "v1=abc", body, 1_700_000_000, "malformed"),
        (
            "whsec-0123456789abcdef",
            header.replace("t=1700000000", "t=1700000001"),
            body,
            1_700_000_000,
            "mismatch",
        ),
    ]:
        with pytest.raises(ws.SignatureError) as exc:
            ws.verify(secret, hdr, data, now=now)
        assert exc.value.reason == why


def test_any_of_several_signatures_may_match() -> None:
    body = b"{}"
    good = ws.signature("new-secret-0123456789", 5, body)
    assert ws.verify("new-secret-0123456789", f"t=5,v1={'0' * 64},v1={good}", body, now=5) == 5


@given(st.text(max_size=120), st.binary(max_size=50))
def test_verify_never_crashes(header: str, body: bytes) -> None:
    try:
        ws.verify("s" * 16, header, body, now=0)
    except ws.SignatureError as exc:
        assert exc.reason in ("malformed", "mismatch", "stale")
