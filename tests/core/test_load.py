"""Effective load: reports never erase the scheduler's own assignments, and ended jobs stop counting."""

from __future__ import annotations

from lingua_scheduler.core.load import NodeLoad


def report(load: NodeLoad, running: int) -> None:
    load.report(10.0, None, None, 10.0, running, now=0.0)


def test_dispatches_after_a_report_count_on_top_of_it() -> None:
    load = NodeLoad()
    report(load, 2)
    a = load.dispatched()
    load.dispatched()
    assert load.effective == 4
    load.finished(a)
    assert load.effective == 3


def test_a_stale_report_does_not_erase_inflight() -> None:
    load = NodeLoad()
    load.dispatched()
    load.dispatched()
    report(load, 0)  # the node reports before it saw our two jobs
    assert load.effective == 2


def test_a_job_reported_then_ended_leaves_the_reported_figure() -> None:
    load = NodeLoad()
    token = load.dispatched()
    report(load, 1)  # the report includes our job
    assert load.effective == 1
    load.finished(token)  # older epoch: it was in the reported figure
    assert load.effective == 0 and load.reported_running == 0 and load.inflight == 0


def test_threshold() -> None:
    load = NodeLoad()
    load.report(84.9, 85.0, None, 10.0, 0, now=0.0)
    assert load.over_threshold(85.0)
    load.report(84.9, None, None, 10.0, 0, now=0.0)
    assert not load.over_threshold(85.0)
