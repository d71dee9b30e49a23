"""Result ordering: in order, held back, gaps, failures, silence, duplicates, bound."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lingua_scheduler.clock import ManualClock
from lingua_scheduler.config import SessionConfig
from lingua_scheduler.core.results import Release, ReleaseKind, ResultQueue
from lingua_scheduler.protocol.session import MissingReason

K = ReleaseKind


def make(**cfg: int) -> tuple[ResultQueue[str], ManualClock]:
    clock = ManualClock()
    return ResultQueue[str](SessionConfig(**cfg), clock), clock


def expect_all(q: ResultQueue[str], n: int) -> None:
    for i in range(n):
        q.expect(i, [f"j{i}"])


def summary(releases: list[Release[str]]) -> list[tuple[int, ReleaseKind, str | None]]:
    return [(r.index, r.kind, r.payload if r.kind is K.RESULT else r.job_id) for r in releases]


def assert_drained(q: ResultQueue[str]) -> None:
    q.validate()
    assert q.held == 0 and q.outstanding == 0 and q.next_deadline() is None


def test_in_order_results_go_out_at_once() -> None:
    q, _ = make()
    expect_all(q, 3)
    for i in range(3):
        assert summary(q.offer(i, f"j{i}", 1, f"r{i}")) == [(i, K.RESULT, f"r{i}")]
    assert_drained(q)


def test_out_of_order_results_are_held_until_earlier_ones_resolve() -> None:
    q, _ = make()
    expect_all(q, 3)
    assert q.offer(2, "j2", 1, "r2") == []
    assert q.offer(1, "j1", 1, "r1") == []
    assert q.held == 2
    assert summary(q.offer(0, "j0", 1, "r0")) == [
        (0, K.RESULT, "r0"),
        (1, K.RESULT, "r1"),
        (2, K.RESULT, "r2"),
    ]
    assert_drained(q)


def test_a_missing_index_is_released_after_the_gap_timeout() -> None:
    q, clock = make(result_gap_timeout_ms=10_000)
    expect_all(q, 2)
    assert q.next_deadline() is None  # nothing is waiting on index 0 yet: no timer
    q.offer(1, "j1", 1, "r1")
    assert q.next_deadline() == pytest.approx(clock.monotonic() + 10)
    clock.advance(9.9)
    assert q.tick() == []
    clock.advance(0.1)
    out = q.tick()
    assert summary(out) == [(0, K.GAP, "j0"), (1, K.RESULT, "r1")]
    assert out[0].missing_reason is MissingReason.GAP_TIMEOUT and out[1].missing_reason is None
    assert [(r.kind, r.late) for r in q.offer(0, "j0", 1, "late")] == [(K.RESULT, True)]
    assert_drained(q)


def test_several_gaps_time_out_together() -> None:
    q, clock = make(result_gap_timeout_ms=1000)
    expect_all(q, 4)
    q.offer(3, "j3", 1, "r3")
    clock.advance(1)
    assert summary(q.tick()) == [(0, K.GAP, "j0"), (1, K.GAP, "j1"), (2, K.GAP, "j2"), (3, K.RESULT, "r3")]
    assert q.gaps == 3


def test_a_gap_timer_starts_when_the_index_first_blocks() -> None:
    q, clock = make(result_gap_timeout_ms=1000)
    expect_all(q, 3)
    q.offer(1, "j1", 1, "r1")  # 0 blocks from now
    clock.advance(0.5)
    q.offer(0, "j0", 1, "r0")
    q.offer(2, "j2", 1, "r2")  # 1 is done; nothing blocks
    assert_drained(q)


def test_a_failed_job_unblocks_later_indices() -> None:
    q, _ = make()
    expect_all(q, 2)
    q.offer(1, "j1", 1, "r1")
    out = q.fail(0, "j0")
    assert summary(out) == [(0, K.FAILED, "j0"), (1, K.RESULT, "r1")]
    assert out[0].missing_reason is MissingReason.JOB_FAILED
    assert_drained(q)


def test_silence_is_released_in_order() -> None:
    q, _ = make()
    expect_all(q, 2)
    assert q.offer(1, "j1", 1, "r1", silent=True) == []
    out = q.offer(0, "j0", 1, "r0")
    assert [r.kind for r in out] == [K.RESULT, K.SILENCE]
    assert out[1].missing_reason is MissingReason.SILENCE_DETECTED


def test_duplicates_are_dropped() -> None:
    q, _ = make()
    expect_all(q, 3)
    q.offer(2, "j2", 1, "r2")
    assert q.offer(2, "j2", 1, "r2") == []  # same job, same attempt
    assert q.offer(2, "j2", 2, "r2b") == []  # same job, another attempt
    q.offer(0, "j0", 1, "r0")
    assert q.offer(0, "j0", 1, "r0") == []  # index already delivered
    assert q.dropped_duplicates == 2 and q.dropped_late == 1
    assert q.offer(9, "j9", 1, "x") == [] and q.dropped_unknown == 1  # never expected
    assert q.fail(1, "other-job") == []  # not a part of index 1
    assert q.outstanding == 2


def test_all_targets_of_an_index_are_delivered_before_the_next_index() -> None:
    q, _ = make()
    q.expect(0, ["a-en", "a-de"])
    q.expect(1, ["b-en", "b-de"])
    assert q.offer(1, "b-en", 1, "b-en") == []
    assert summary(q.offer(0, "a-en", 1, "a-en")) == [(0, K.RESULT, "a-en")]  # head part goes at once
    assert summary(q.offer(0, "a-de", 1, "a-de")) == [(0, K.RESULT, "a-de"), (1, K.RESULT, "b-en")]
    assert summary(q.offer(1, "b-de", 1, "b-de")) == [(1, K.RESULT, "b-de")]
    assert_drained(q)


def test_a_gap_gives_up_only_the_open_parts() -> None:
    q, clock = make(result_gap_timeout_ms=1000)
    q.expect(0, ["a-en", "a-de"])
    q.expect(1, ["b-en"])
    q.offer(0, "a-en", 1, "a-en")
    q.offer(1, "b-en", 1, "b-en")
    clock.advance(1)
    assert summary(q.tick()) == [(0, K.GAP, "a-de"), (1, K.RESULT, "b-en")]


def test_fail_without_job_resolves_every_open_part() -> None:
    q, _ = make()
    q.expect(0, ["a", "b"])
    q.expect(1, [])  # its jobs could not be created
    q.offer(0, "a", 1, "ra")
    assert summary(q.fail(1)) == []
    assert summary(q.fail(0)) == [(0, K.FAILED, "b"), (1, K.FAILED, None)]
    assert_drained(q)


def test_the_bound_refuses_new_indices_and_never_gives_up_finished_work() -> None:
    q, _ = make(max_pending_results=2)
    expect_all(q, 2)
    assert q.offer(1, "j1", 1, "r1") == [] and not q.has_room
    with pytest.raises(ValueError, match="no room"):
        q.expect(2, ["j2"])
    q.refuse(2)  # answered by the caller at once; it takes no slot
    q.refuse(3)
    q.validate()
    assert q.held == 1 and q.refused == 2
    assert summary(q.offer(0, "j0", 1, "r0")) == [(0, K.RESULT, "r0"), (1, K.RESULT, "r1")]
    assert q.cursor == 4 and q.has_room  # stepped over the refused indices
    q.expect(4, ["j4"])
    assert summary(q.offer(4, "j4", 1, "r4")) == [(4, K.RESULT, "r4")]
    assert_drained(q)


def test_refused_index_on_an_empty_queue_moves_the_cursor() -> None:
    q, _ = make()
    q.refuse(0)
    q.expect(1, ["j1"])
    assert summary(q.offer(1, "j1", 1, "r1")) == [(1, K.RESULT, "r1")]
    assert_drained(q)


def test_a_late_result_after_its_gap_is_released_marked_late() -> None:
    q, clock = make(result_gap_timeout_ms=1000)
    expect_all(q, 2)
    q.offer(1, "j1", 1, "r1")
    clock.advance(1)
    assert summary(q.tick()) == [(0, K.GAP, "j0"), (1, K.RESULT, "r1")]
    assert q.oldest_unsettled == 0  # index 0 may still get its late result
    [late] = q.offer(0, "j0", 2, "r0")
    assert (late.index, late.kind, late.payload, late.late) == (0, K.RESULT, "r0", True)
    assert q.offer(0, "j0", 2, "r0") == [] and q.dropped_late == 1  # once only
    assert q.late == 1 and q.oldest_unsettled == 2
    assert_drained(q)


def test_a_gapped_part_that_fails_or_is_silent_adds_nothing() -> None:
    q, clock = make(result_gap_timeout_ms=1000)
    expect_all(q, 3)
    q.offer(2, "j2", 1, "r2")
    clock.advance(1)
    assert [r.kind for r in q.tick()] == [K.GAP, K.GAP, K.RESULT]
    assert q.fail(0, "j0") == [] and q.offer(1, "j1", 1, "", silent=True) == []
    assert q.oldest_unsettled == 3 and q.late == 0


def test_indices_must_be_expected_in_order() -> None:
    q, _ = make()
    q.expect(0, ["j0"])
    with pytest.raises(ValueError, match="expected utterance index 1"):
        q.expect(2, ["j2"])
    with pytest.raises(ValueError):
        q.expect(0, ["j0"])


def test_flush_releases_everything_in_order() -> None:
    q, _ = make()
    expect_all(q, 3)
    q.offer(2, "j2", 1, "r2")
    assert summary(q.flush()) == [(0, K.GAP, "j0"), (1, K.GAP, "j1"), (2, K.RESULT, "r2")]
    assert_drained(q)


# --- property: whatever the order of resolutions, each part comes out once and in index order ------


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    targets=st.lists(st.integers(1, 3), min_size=1, max_size=12),
    bound=st.integers(1, 6),
)
def test_any_resolution_order_releases_each_part_once_in_order(
    data: st.DataObject, targets: list[int], bound: int
) -> None:
    q, clock = make(max_pending_results=bound, result_gap_timeout_ms=1000)
    parts = []
    for i, n in enumerate(targets):
        if q.has_room:
            q.expect(i, [f"{i}-{t}" for t in range(n)])
            parts += [(i, f"{i}-{t}") for t in range(n)]
        else:
            q.refuse(i)
    order = data.draw(st.permutations(parts))
    out: list[Release[str]] = []
    for index, job_id in order:
        action = data.draw(st.sampled_from(["offer", "fail", "silent", "tick"]))
        if action == "fail":
            out += q.fail(index, job_id)
        else:
            out += q.offer(index, job_id, 1, job_id, silent=action == "silent")
        if action == "tick":
            clock.advance(data.draw(st.floats(0, 1.5)))
            out += q.tick()
        q.validate()
    out += q.flush()
    in_order = [r for r in out if not r.late]
    assert [r.index for r in in_order] == sorted(r.index for r in in_order)
    assert sorted((r.index, r.job_id or "") for r in in_order) == sorted(parts)
    # a late release is the result of a part given up before, once
    gapped = {(r.index, r.job_id) for r in in_order if r.kind is K.GAP}
    late = [(r.index, r.job_id) for r in out if r.late]
    assert len(late) == len(set(late)) and set(late) <= gapped
    assert all(r.kind is K.RESULT for r in out if r.late)
    assert_drained(q)
