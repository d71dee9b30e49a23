"""Node quality: the rolling figures, the ejection rules, the state machine and the cap, on a manual clock;
and selection skipping an ejected node (reason ``ejected``)."""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lingua_scheduler.clock import ManualClock
from lingua_scheduler.config import QualityConfig
from lingua_scheduler.core.jobs import JobSpec
from lingua_scheduler.core.quality import (
    CONSECUTIVE_FAILURES,
    CONSECUTIVE_TIMEOUTS,
    EJECTION_ENDED,
    FAILURE_PERCENTAGE,
    PROBATION_FAILED,
    PROBATION_PASSED,
    SUCCESS_RATE,
    Change,
    Kind,
    QualityState,
    QualityTracker,
    speech_expected,
)
from lingua_scheduler.core.segmentation import CutReason
from lingua_scheduler.core.selection import Selector
from lingua_scheduler.protocol.node import PipelineConfig
from tests.core.conftest import FleetFactory

S, F, T, E = Kind.SUCCESS, Kind.FAILURE, Kind.TIMEOUT, Kind.EMPTY
BIG = 100  # a fleet large enough that the cap never matters


def tracker(**cfg: Any) -> tuple[QualityTracker, ManualClock]:
    clock = ManualClock()
    return QualityTracker(QualityConfig(**cfg), clock), clock


def feed(t: QualityTracker, node: str, kinds: list[Kind], fleet: int = BIG) -> list[Change]:
    out: list[Change] = []
    for k in kinds:
        out += t.record(node, k, fleet_size=fleet)
    return out


# --- the consecutive rules -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cfg", "kinds", "state", "reason"),
    [
        ({}, [T, T, T], QualityState.EJECTED, CONSECUTIVE_TIMEOUTS),
        ({}, [T, T], QualityState.HEALTHY, None),
        ({}, [T, T, F, F, F], QualityState.EJECTED, CONSECUTIVE_FAILURES),
        ({}, [F, F, F, F, F], QualityState.EJECTED, CONSECUTIVE_FAILURES),
        ({}, [T, T, S, T, T], QualityState.HEALTHY, None),
        ({}, [F, F, F, F, S, F, F, F, F], QualityState.HEALTHY, None),
        ({}, [T, T, F, T], QualityState.HEALTHY, None),  # an answer breaks a run of timeouts...
        ({}, [T, T, F, T, T], QualityState.EJECTED, CONSECUTIVE_FAILURES),  # ...not one of errors
        ({}, [E] * 10, QualityState.HEALTHY, None),  # empty is a figure only by default
        ({"empty_result_is_failure": True}, [E] * 5, QualityState.EJECTED, CONSECUTIVE_FAILURES),
        ({"consecutive_timeouts": 0}, [T, T, T, T], QualityState.HEALTHY, None),
        ({"consecutive_timeouts": 0}, [T] * 5, QualityState.EJECTED, CONSECUTIVE_FAILURES),
        ({"consecutive_timeouts": 0, "consecutive_failures": 0}, [T] * 20, QualityState.HEALTHY, None),
        ({"ejection_enabled": False}, [T] * 20, QualityState.HEALTHY, None),
        ({"consecutive_failures": 2}, [F, F], QualityState.EJECTED, CONSECUTIVE_FAILURES),
    ],
)
def test_consecutive_rules(
    cfg: dict[str, Any], kinds: list[Kind], state: QualityState, reason: str | None
) -> None:
    t, _ = tracker(**cfg)
    changes = feed(t, "n", kinds)
    assert t.state_of("n") is state
    assert [c.reason for c in changes] == ([reason] if reason else [])
    assert t.blocks("n") is (state is QualityState.EJECTED)


# --- the state machine -----------------------------------------------------------------------------


def test_ejection_probation_and_recovery() -> None:
    t, clock = tracker(base_ejection_ms=30_000, probation_jobs=3)
    [ch] = feed(t, "n", [T, T, T])
    assert ch == Change("n", QualityState.EJECTED, CONSECUTIVE_TIMEOUTS, ejection_ms=30_000, ejections=1)
    clock.advance(29.9)
    assert t.blocks("n") and t.readmit_due() == []
    clock.advance(0.1)
    assert not t.blocks("n")
    assert t.state_of("n") is QualityState.PROBATION  # as selection sees it, before the sweep
    assert t.readmit_due() == [Change("n", QualityState.PROBATION, EJECTION_ENDED, ejections=1)]
    assert feed(t, "n", [S, S]) == []
    assert feed(t, "n", [S]) == [Change("n", QualityState.HEALTHY, PROBATION_PASSED, ejections=1)]
    assert t.get("n") is not None and t.get("n").ejections == 1  # type: ignore[union-attr]


def test_failing_probation_doubles_the_ejection_up_to_the_bound() -> None:
    t, clock = tracker(base_ejection_ms=1_000, max_ejection_ms=5_000)
    feed(t, "n", [T, T, T])
    lengths = []
    for _ in range(5):
        q = t.get("n")
        assert q is not None and q.ejected_until is not None
        clock.advance(q.ejected_until - clock.monotonic())
        [back] = t.readmit_due()
        assert back.state is QualityState.PROBATION
        [again] = feed(t, "n", [F])  # one failure in probation is enough
        assert again.reason == PROBATION_FAILED
        lengths.append(again.ejection_ms)
    assert lengths == [2_000, 4_000, 5_000, 5_000, 5_000]


def test_healthy_sweeps_forgive_ejections_in_a_row() -> None:
    t, clock = tracker(base_ejection_ms=1_000, probation_jobs=1, request_volume=200)
    feed(t, "n", [T, T, T])  # 1 s; streak 1
    clock.advance(1)
    t.readmit_due()
    feed(t, "n", [S])  # healthy again
    feed(t, "n", [T, T, T])
    assert t.readmit_due() == []  # nothing due yet
    q = t.get("n")
    assert q is not None and q.ejected_until is not None
    assert round((q.ejected_until - clock.monotonic()) * 1000) == 2_000  # doubled: still in a row
    clock.advance(2)
    t.readmit_due()
    feed(t, "n", [S])
    for _ in range(2):  # two healthy sweeps forgive both
        t.sweep(BIG, lambda _: True)
    [ch] = feed(t, "n", [T, T, T])
    assert ch.ejection_ms == 1_000


def test_outcomes_while_ejected_are_figures_only() -> None:
    t, _ = tracker()
    feed(t, "n", [T, T, T])
    assert feed(t, "n", [F] * 10) == []  # late answers of attempts given before the ejection
    assert t.figures("n").failures == 10
    q = t.get("n")
    assert q is not None and q.ejections == 1 and q.consecutive_errors == 0


def test_a_late_outcome_after_the_ejection_ran_out_readmits_first() -> None:
    t, clock = tracker(base_ejection_ms=1_000)
    feed(t, "n", [T, T, T])
    clock.advance(1)
    changes = feed(t, "n", [F])
    assert [(c.state, c.reason) for c in changes] == [
        (QualityState.PROBATION, EJECTION_ENDED),
        (QualityState.EJECTED, PROBATION_FAILED),
    ]


# --- the rules against the fleet -------------------------------------------------------------------


def fleet_outcomes(t: QualityTracker, rates: dict[str, float], jobs: int, fleet: int = BIG) -> None:
    """Each node gets ``jobs`` outcomes, failures spread evenly (no run long enough for the inline rules)."""
    for node, rate in rates.items():
        fails = round(jobs * (1 - rate))
        for i in range(jobs):
            failed = fails and i % max(1, jobs // fails) == 0 and i // max(1, jobs // fails) < fails
            t.record(node, F if failed else S, fleet_size=fleet)


@pytest.mark.parametrize(
    ("cfg", "rates", "jobs", "ejected"),
    [
        # 4 good nodes and one failing half its jobs: below mean - 1.9 stdev
        ({}, {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0, "bad": 0.5}, 20, {"bad": SUCCESS_RATE}),
        # not enough volume to judge
        ({}, {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0, "bad": 0.5}, 19, {}),
        # too few nodes for the success-rate rule by default
        ({}, {"a": 1.0, "b": 1.0, "bad": 0.5}, 40, {}),
        # ... unless configured for a small fleet
        (
            {"success_rate_minimum_nodes": 3, "success_rate_stdev_factor": 1.0},
            {"a": 1.0, "b": 1.0, "bad": 0.5},
            20,
            {"bad": SUCCESS_RATE},
        ),
        # all alike: no outlier
        ({}, {n: 0.7 for n in "abcdef"}, 30, {}),
        # the failure-percentage rule needs no spread: two nodes, one failing 90 %
        ({}, {"a": 1.0, "bad": 0.1}, 20, {"bad": FAILURE_PERCENTAGE}),
        ({"failure_percentage_threshold": 0}, {"a": 1.0, "bad": 0.1}, 20, {}),
    ],
)
def test_success_rate_and_failure_percentage(
    cfg: dict[str, Any], rates: dict[str, float], jobs: int, ejected: dict[str, str]
) -> None:
    t, _ = tracker(consecutive_failures=0, consecutive_timeouts=0, max_ejection_percent=50, **cfg)
    fleet_outcomes(t, rates, jobs)
    assert all(t.state_of(n) is QualityState.HEALTHY for n in rates)  # nothing inline
    changes = t.sweep(BIG, lambda _: True)
    assert {c.node_id: c.reason for c in changes} == ejected


def test_rules_judge_only_what_a_node_did_since_its_return() -> None:
    t, clock = tracker(consecutive_failures=0, consecutive_timeouts=0, base_ejection_ms=1_000)
    fleet_outcomes(t, {"a": 1.0, "bad": 0.1}, 20)
    [ch] = t.sweep(BIG, lambda _: True)
    assert ch.reason == FAILURE_PERCENTAGE
    clock.advance(1)
    t.readmit_due()
    # its old failures are still in the window (and the figures) but judge it no more
    assert t.figures("bad").failures == 18
    assert t.sweep(BIG, lambda _: True) == []
    assert t.state_of("bad") is QualityState.PROBATION


# --- the cap ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fleet", "percent", "allowed"),
    [(10, 20, 2), (10, 10, 1), (3, 20, 1), (2, 20, 1), (1, 100, 0), (5, 100, 4), (20, 25, 5), (4, 0, 1)],
)
def test_the_cap(fleet: int, percent: float, allowed: int) -> None:
    t, _ = tracker(max_ejection_percent=percent)
    for i in range(fleet):
        feed(t, f"n{i}", [T, T, T], fleet=fleet)
    assert t.ejected == allowed
    assert t.capped == fleet - allowed
    assert t.counts()[QualityState.EJECTED] == allowed


def cap(fleet: int, percent: float) -> int:
    """Most nodes out at once: the percentage of the fleet, at least one, never all of it."""
    return min(fleet - 1, max(1, math.floor(fleet * percent / 100 + 1e-9)))


@settings(max_examples=150, deadline=None)
@given(
    fleet=st.integers(1, 12),
    percent=st.sampled_from([0.0, 10.0, 20.0, 33.0, 50.0, 100.0]),
    ops=st.lists(st.tuples(st.integers(0, 11), st.sampled_from([S, F, T, E, "tick", "sweep"])), max_size=120),
)
def test_never_more_ejected_than_the_cap(fleet: int, percent: float, ops: list[tuple[int, Any]]) -> None:
    t, clock = tracker(
        max_ejection_percent=percent,
        consecutive_failures=2,
        consecutive_timeouts=1,
        base_ejection_ms=2_000,
        request_volume=2,
        success_rate_minimum_nodes=2,
        success_rate_stdev_factor=0.5,
        failure_percentage_threshold=50,
        probation_jobs=2,
    )
    limit = cap(fleet, percent) if fleet > 1 else 0
    for i, op in ops:
        node = f"n{i % fleet}"
        if op == "tick":
            clock.advance(1.0)
            t.readmit_due()
        elif op == "sweep":
            t.sweep(fleet, lambda _: True)
        else:
            t.record(node, op, fleet_size=fleet)
        assert t.ejected <= limit
        blocked = sum(t.blocks(f"n{j}") for j in range(fleet))
        assert blocked <= limit and blocked < fleet


# --- figures and bounds ----------------------------------------------------------------------------


def test_figures() -> None:
    t, _ = tracker()
    for ms in (100, 200, 300, 400):
        t.record("n", S, fleet_size=BIG, latency_ms=ms)
    t.record("n", E, fleet_size=BIG, latency_ms=1000)
    t.record("n", F, fleet_size=BIG, code="NODE_OVERLOADED")
    t.record("n", T, fleet_size=BIG, code="ack_timeout")
    f = t.figures("n")
    assert (f.jobs, f.successes, f.empty, f.failures, f.timeouts) == (7, 4, 1, 1, 1)
    assert f.success_rate == pytest.approx(5 / 7)  # empty counts as answered by default
    assert f.latency_ms_mean == 400 and f.latency_ms_p50 == 300 and f.latency_ms_p95 == 1000
    assert f.codes == {"NODE_OVERLOADED": 1, "ack_timeout": 1}
    out = f.to_json()
    assert out["empty_results"] == 1 and out["latency_ms"] == {"mean": 400.0, "p50": 300.0, "p95": 1000.0}
    empty = t.figures("unknown")
    assert empty.jobs == 0 and empty.success_rate is None and empty.latency_ms_p50 is None


def test_window_by_time_and_by_count() -> None:
    t, clock = tracker(window_seconds=60, window_max_jobs=5, request_volume=5)
    feed(t, "n", [F, F])
    clock.advance(61)
    assert t.figures("n").jobs == 0  # out of the window
    feed(t, "n", [S] * 9)
    q = t.get("n")
    assert q is not None and len(q.window) == 5 and t.figures("n").jobs == 5


def test_sweep_forgets_nodes_the_registry_forgot() -> None:
    t, _ = tracker()
    feed(t, "gone", [T, T, T])
    feed(t, "kept", [S])
    assert t.ejected == 1
    t.sweep(BIG, lambda n: n == "kept")
    assert list(t) == ["kept"] and t.ejected == 0 and not t.blocks("gone")


def base_spec(**kw: Any) -> JobSpec:
    fields: dict[str, Any] = {
        "session_id": "s",
        "utterance_index": 0,
        "src_lang": "en",
        "tgt_lang": "zh",
        "trace_id": "t",
        "audio_format": "opus",
        "sample_rate": 16000,
        "audio_ms": 1000,
    }
    fields.update(kw)
    return JobSpec(**fields)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, True),
        ({"cut_reason": CutReason.PAUSE}, True),
        ({"cut_reason": CutReason.MAX_DURATION}, False),  # a piece of a long turn may be silence
        ({"cut_reason": CutReason.MAX_BYTES}, False),
        ({"continues_turn": True}, False),
        ({"audio_format": "pcm16"}, False),  # never judged: silence may reach a node
        ({"pipeline": PipelineConfig(use_asr=False)}, False),
        ({"pipeline": PipelineConfig()}, True),
    ],
)
def test_speech_expected(changes: dict[str, Any], expected: bool) -> None:
    assert speech_expected(dataclasses.replace(base_spec(), **changes)) is expected


def test_config_bounds() -> None:
    from lingua_scheduler.errors import InvalidField

    cases: list[dict[str, Any]] = [
        {"max_ejection_percent": 120},
        {"base_ejection_ms": 0},
        {"max_ejection_ms": 10, "base_ejection_ms": 20},
        {"consecutive_failures": -1},
        {"request_volume": 50, "window_max_jobs": 40},
    ]
    for bad in cases:
        with pytest.raises(InvalidField) as info:
            QualityConfig(**bad)
        assert info.value.field in bad
    assert QualityConfig(request_volume=40, window_max_jobs=40).request_volume == 40


# --- selection -------------------------------------------------------------------------------------


def test_selection_skips_an_ejected_node_and_says_why(make_fleet: FleetFactory) -> None:
    f = make_fleet()
    q = QualityTracker(QualityConfig(base_ejection_ms=5_000), f.clock)
    f.selector = Selector(rng=random.Random(0), marks=f.marks, quality=q)
    f.add("bad")
    f.add("good")
    feed(q, "bad", [T, T, T])
    for _ in range(20):
        assert f.select("en", "zh").node_id == "good"
    r = f.select("en", "zh", preferred_node="bad")
    assert r.preferred_node == "ejected" and r.node_id == "good"
    f.registry.drain("good")
    f.publish()
    r = f.select("en", "zh")
    assert r.node_id is None and r.breakdown.count("ejected") == 1
    assert r.to_json()["breakdown"]["ejected"] == 1  # type: ignore[index]
    f.clock.advance(5)
    assert f.select("en", "zh").node_id == "bad"  # back, on probation
