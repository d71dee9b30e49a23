"""The stats aggregator on a manual clock: bucket quantiles, last-minute rates, the once-a-second cache,
the bounded ring and the shared dashboard frame."""

from __future__ import annotations

import asyncio
import json

import pytest

from lingua_scheduler.clock import ManualClock
from lingua_scheduler.server.app import build_state
from lingua_scheduler.server.http.stats import StatsAggregator, quantile
from lingua_scheduler.server.metrics import LATENCY_BUCKETS
from tests.conftest import make_config

N = len(LATENCY_BUCKETS) + 1  # the +Inf bucket


def cumulative(counts: dict[float, int]) -> list[float]:
    """Cumulative counts per bound from {upper bound: observations in that bucket}."""
    out, total = [], 0.0
    for b in (*LATENCY_BUCKETS, float("inf")):
        total += counts.get(b, 0)
        out.append(total)
    return out


def test_quantile_interpolates_inside_the_bucket() -> None:
    assert quantile(0.5, [0.0] * N) is None
    # 100 observations in (0.0001, 0.0002]: the median is half-way through that bucket
    c = cumulative({0.0002: 100})
    assert quantile(0.5, c) == pytest.approx(0.00015)
    assert quantile(0.99, c) == pytest.approx(0.0001 + 0.0001 * 0.99)
    # 90 fast (in the (5 us, 10 us] bucket), 10 slow: p50 among the fast, p99 among the slow
    c = cumulative({0.00001: 90, 0.5: 10})
    assert quantile(0.5, c) == pytest.approx(0.000005 + 0.000005 * 50 / 90)
    assert 0.2 < quantile(0.99, c) <= 0.5  # type: ignore[operator]
    # beyond the last finite bound: the last bound, as Prometheus reports it
    assert quantile(0.99, cumulative({float("inf"): 5})) == 30.0


@pytest.fixture
def agg() -> tuple[StatsAggregator, ManualClock]:
    clock = ManualClock()
    state = build_state(make_config(), clock)
    return StatsAggregator(state, interval=1.0, window=60.0), clock


def test_rates_and_latencies_over_the_last_minute(agg: tuple[StatsAggregator, ManualClock]) -> None:
    a, clock = agg
    m = a.state.metrics
    for second in range(90):
        clock.advance(1.0)
        m.heartbeats.inc(10)
        m.jobs_created.inc(2)
        m.jobs.labels("completed").inc(2)
        if second >= 30:  # the first 30 s were slow: they drop out of the last minute
            m.job_end_to_end.observe(0.04)
        else:
            m.job_end_to_end.observe(5.0)
        a.tick()
    assert len(a.ring) == 61  # a minute of samples, bounded
    snap = a.snapshot()
    assert snap["window_seconds"] == 60.0
    assert snap["heartbeats_per_second"] == 10.0
    assert snap["jobs"]["per_second"]["created"] == 2.0 and snap["jobs"]["per_second"]["completed"] == 2.0
    assert snap["jobs"]["per_second"]["failed"] == 0.0
    assert snap["totals"]["created"] == 180
    e2e = snap["latency_last_minute"]["end_to_end"]
    assert e2e["count"] == 60 and 0.02 < e2e["p50"] <= 0.05 and e2e["p99"] <= 0.05
    assert snap["latency_last_minute"]["heartbeat_handle"] == {"p50": None, "p99": None, "count": 0.0}
    series = a.series()
    assert len(series["t"]) == 60 and series["created_per_s"][-1] == 2.0
    assert series["end_to_end_p50"][-1] == pytest.approx(0.035, rel=0.01)
    assert series["selection_p50"][-1] is None  # no selection in that second: a gap in the chart


def test_snapshot_built_at_most_once_per_interval(agg: tuple[StatsAggregator, ManualClock]) -> None:
    a, clock = agg
    first = a.snapshot()
    for _ in range(100):
        assert a.snapshot() is first
    assert a.builds == 1
    clock.advance(0.99)
    assert a.snapshot() is first
    clock.advance(0.01)
    assert a.snapshot() is not first and a.builds == 2
    a.snapshot(force=True)
    assert a.builds == 3


async def test_frame_shared_and_woken(agg: tuple[StatsAggregator, ManualClock]) -> None:
    a, clock = agg
    seq, frame = a.current_frame()
    assert a.current_frame() == (seq, frame)  # not rebuilt within the interval
    body = json.loads(frame)
    assert {"nodes", "series", "events", "admin_enabled", "language_pairs"} <= set(body)
    waiter = asyncio.ensure_future(a.next_frame(seq))
    await asyncio.sleep(0)
    assert not waiter.done()
    clock.advance(1.0)
    a.tick()
    a.build_frame()
    nxt = await asyncio.wait_for(waiter, 1)
    assert nxt is not None and nxt[0] == seq + 1
    waiter = asyncio.ensure_future(a.next_frame(nxt[0]))
    a.close()
    assert await asyncio.wait_for(waiter, 1) is None  # shutdown ends the streams
