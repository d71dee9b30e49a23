"""Job store: state table, idempotency, fencing, timeouts and failover, wait queue, eviction."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lingua_scheduler.clock import ManualClock
from lingua_scheduler.config import JobConfig, SessionConfig
from lingua_scheduler.core.audio import AudioFormat, AudioSpec
from lingua_scheduler.core.jobs import (
    TERMINAL,
    TRANSITIONS,
    DeadlineKind,
    IllegalJobTransition,
    Job,
    JobSpec,
    JobState,
    JobStore,
    Outcome,
    Verdict,
    check_transition,
    exec_timeout_ms,
)
from lingua_scheduler.core.segmentation import CutReason, Segmenter
from lingua_scheduler.errors import ErrorCode, NoAvailableNodeError

S = JobState


def spec(session: str = "s-1", index: int = 0, tgt: str = "en", audio_ms: int = 1000) -> JobSpec:
    return JobSpec(
        session_id=session,
        utterance_index=index,
        src_lang="zh",
        tgt_lang=tgt,
        trace_id="t-1",
        audio_format="pcm16",
        sample_rate=16000,
        audio_ms=audio_ms,
    )


def new(store: JobStore, s: JobSpec | None = None, audio: bytes = b"a") -> Job:
    """Create a job and return it (whatever state creation left it in)."""
    out = store.create(s or spec(), audio)
    assert out.job is not None
    return out.job


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def store_with(clock: ManualClock, session_audio_limit: int | None = None, **cfg: float) -> JobStore:
    return JobStore(JobConfig(**cfg), clock, session_audio_limit=session_audio_limit)


@pytest.fixture
def store(clock: ManualClock) -> Iterator[JobStore]:
    s = store_with(clock)
    yield s
    s.validate()


def assert_empty(store: JobStore) -> None:
    store.validate()
    assert store.inflight == 0 and store.waiting == 0 and store.audio_bytes == 0
    assert all(n == 0 for state, n in store.counts().items() if state not in TERMINAL)


# --- the table ------------------------------------------------------------------------------------


@pytest.mark.parametrize("src", list(JobState))
@pytest.mark.parametrize("dst", list(JobState))
def test_transition_table(src: JobState, dst: JobState) -> None:
    if dst in TRANSITIONS[src]:
        check_transition("job-x", src, dst)
    else:
        with pytest.raises(IllegalJobTransition):
            check_transition("job-x", src, dst)


def test_terminal_states_are_final_and_created_only_comes_back_by_failover() -> None:
    assert all(not TRANSITIONS[t] for t in TERMINAL)
    assert {src for src, dsts in TRANSITIONS.items() if S.CREATED in dsts} == {
        S.DISPATCHED,
        S.ACCEPTED,
        S.RUNNING,
    }


def test_illegal_calls_raise(store: JobStore) -> None:
    job = new(store)
    with pytest.raises(IllegalJobTransition):
        store.failover(job.job_id, "no")  # CREATED has no attempt to abandon
    store.dispatch(job.job_id, "n1")
    with pytest.raises(IllegalJobTransition):
        store.dispatch(job.job_id, "n2")
    store.on_result(job.job_id, 1, "n1", success=True)
    with pytest.raises(IllegalJobTransition):
        store.failover(job.job_id, "too late")


# --- happy path -----------------------------------------------------------------------------------


def test_happy_path_and_story(store: JobStore, clock: ManualClock) -> None:
    out = store.create(spec(), b"audio")
    job = out.job
    assert out.verdict is Verdict.APPLIED and job is not None
    assert job.job_id.startswith("job-") and job.state is S.CREATED and job.attempt == 1
    assert store.dispatchable() == [job] and job.deadline_kind is DeadlineKind.WAIT
    store.validate()

    store.dispatch(job.job_id, "n1")
    assert job.state is S.DISPATCHED and job.deadline_kind is DeadlineKind.ACK
    assert store.inflight_on("n1") == 1 and store.waiting == 0
    clock.advance(0.1)
    assert store.on_ack(job.job_id, 1, "n1").verdict is Verdict.APPLIED
    assert job.state is S.ACCEPTED and job.deadline_kind is DeadlineKind.EXEC
    assert store.on_ack(job.job_id, 1, "n1").verdict is Verdict.DUPLICATE
    assert store.on_started(job.job_id, 1, "n1").verdict is Verdict.APPLIED
    assert store.on_partial(job.job_id, 1, "n1").verdict is Verdict.APPLIED
    assert store.on_partial(job.job_id, None, "n1").verdict is Verdict.APPLIED  # relay every partial
    store.validate()
    clock.advance(1.0)
    assert store.on_result(job.job_id, 1, "n1", success=True).verdict is Verdict.APPLIED
    assert job.state is S.COMPLETED and job.audio is None and job.deadline is None
    assert store.on_result(job.job_id, 1, "n1", success=True).verdict is Verdict.DUPLICATE
    assert store.inflight_on("n1") == 0
    assert [(e.src, e.dst) for e in store.story(job.job_id)] == [
        (None, S.CREATED),
        (S.CREATED, S.DISPATCHED),
        (S.DISPATCHED, S.ACCEPTED),
        (S.ACCEPTED, S.RUNNING),
        (S.RUNNING, S.COMPLETED),
    ]
    assert store.story(job.job_id)[-1].at == clock.monotonic()
    assert_empty(store)


def test_first_partial_starts_the_job_without_ack(store: JobStore) -> None:
    job = new(store)
    store.dispatch(job.job_id, "n1")
    assert store.on_partial(job.job_id, None, "n1").verdict is Verdict.APPLIED
    assert job.state is S.RUNNING and job.deadline_kind is DeadlineKind.EXEC
    assert store.on_ack(job.job_id, 1, "n1").verdict is Verdict.DUPLICATE  # late ack changes nothing
    assert store.on_result(job.job_id, 1, "n1", success=True).verdict is Verdict.APPLIED


def test_result_without_ack_or_start_completes(store: JobStore) -> None:
    job = new(store)
    store.dispatch(job.job_id, "n1")
    assert store.on_result(job.job_id, 1, "n1", success=True).verdict is Verdict.APPLIED
    assert job.state is S.COMPLETED


# --- idempotency ----------------------------------------------------------------------------------


def test_replayed_utterance_returns_the_existing_job(store: JobStore) -> None:
    first = new(store, spec(index=3), b"abc")
    again = store.create(spec(index=3), b"abc")
    assert again.verdict is Verdict.DUPLICATE and again.job is first
    assert len(store) == 1 and store.duplicates_blocked == 1
    other_target = new(store, spec(index=3, tgt="de"), b"abc")
    assert other_target is not first and len(store) == 2
    assert store.find("s-1", 3, "de") is other_target
    assert store.session_audio_bytes("s-1") == 3  # the utterance's audio counts once


def test_audio_is_dropped_when_every_target_ended(store: JobStore) -> None:
    a = new(store, spec(tgt="en"), b"abcd")
    b = new(store, spec(tgt="de"), b"abcd")
    store.cancel(a.job_id, "test")
    assert store.audio_bytes == 4 and a.audio is None and b.audio == b"abcd"
    store.cancel(b.job_id, "test")
    assert_empty(store)


# --- fencing --------------------------------------------------------------------------------------


def test_messages_from_other_nodes_or_attempts_are_stale(store: JobStore) -> None:
    job = new(store)
    store.dispatch(job.job_id, "n1")
    assert store.on_ack(job.job_id, 1, "n2").verdict is Verdict.STALE
    assert store.on_ack(job.job_id, 2, "n1").verdict is Verdict.STALE
    assert store.on_partial(job.job_id, None, "n2").verdict is Verdict.STALE
    assert store.on_result(job.job_id, 7, "n1", success=True).verdict is Verdict.STALE
    assert job.state is S.DISPATCHED and store.stale_messages == 4
    assert store.on_result("job-nope", 1, "n1", success=True).verdict is Verdict.UNKNOWN


def test_messages_of_an_abandoned_attempt_are_stale_except_its_success(
    store: JobStore, clock: ManualClock
) -> None:
    job = new(store)
    store.dispatch(job.job_id, "n1")
    store.on_ack(job.job_id, 1, "n1")
    out = store.failover(job.job_id, "test")
    assert out.cancel_node == "n1" and job.state is S.CREATED and job.attempt == 2
    store.dispatch(job.job_id, "n2")
    # the old attempt's partials, acks and failures change nothing
    assert store.on_partial(job.job_id, 1, "n1").verdict is Verdict.STALE
    assert store.on_ack(job.job_id, 1, "n1").verdict is Verdict.STALE
    assert store.on_result(job.job_id, 1, "n1", success=False, error_code="X").verdict is Verdict.STALE
    # a node that never had the job, or another attempt's number, is stale too
    assert store.on_result(job.job_id, 1, "n3", success=True).verdict is Verdict.STALE
    assert store.on_result(job.job_id, 1, "n2", success=True).verdict is Verdict.STALE
    assert job.state is S.DISPATCHED
    assert store.on_result(job.job_id, 2, "n2", success=True).verdict is Verdict.APPLIED
    assert job.tried_nodes == ["n1", "n2"] and job.won_attempt == 2
    # answered: the old node's late success is now only a stale message
    assert store.on_result(job.job_id, 1, "n1", success=True).verdict is Verdict.STALE
    store.validate()


def test_success_of_an_earlier_attempt_wins_while_unanswered(store: JobStore, clock: ManualClock) -> None:
    job = new(store)
    store.dispatch(job.job_id, "n1")
    store.failover(job.job_id, "ack timeout")
    store.dispatch(job.job_id, "n2")
    out = store.on_result(job.job_id, 1, "n1", success=True)
    assert out.verdict is Verdict.APPLIED and job.state is S.COMPLETED
    # the current attempt is cancelled on n2 and its slot freed; n1's slot went at the failover
    assert (out.cancel_node, out.freed_node, out.early_node) == ("n2", "n2", "n1")
    assert job.won_attempt == 1 and job.node_id == "n1"
    assert store.inflight_on("n2") == 0
    assert store.on_result(job.job_id, 2, "n2", success=True).verdict is Verdict.STALE
    store.validate()


def test_earlier_attempt_result_completes_a_job_waiting_for_a_node(store: JobStore) -> None:
    job = new(store)
    store.dispatch(job.job_id, "n1")
    store.failover(job.job_id, "exec timeout")
    assert job.state is S.CREATED and store.waiting == 1
    out = store.on_result(job.job_id, 1, "n1", success=True)
    assert out.verdict is Verdict.APPLIED and job.state is S.COMPLETED
    assert (out.cancel_node, out.freed_node, out.early_node) == (None, None, "n1")
    assert store.waiting == 0 and store.dispatchable() == []
    store.validate()


def test_without_acks_the_execution_deadline_runs_from_dispatch(store: JobStore, clock: ManualClock) -> None:
    job = new(store)
    store.dispatch(job.job_id, "n1", acks=False)
    assert job.deadline_kind is DeadlineKind.EXEC
    # well past the ack timeout: nothing expires
    clock.advance(store.config.ack_timeout_ms / 1000 + 1)
    assert store.expire() == [] and job.state is S.DISPATCHED
    # a partial is the implicit ack: the job runs, and the deadline does not move
    deadline = job.deadline
    store.on_partial(job.job_id, 1, "n1")
    assert job.state is S.RUNNING and job.deadline == deadline
    assert store.on_result(job.job_id, 1, "n1", success=True).verdict is Verdict.APPLIED


def test_with_acks_a_missing_ack_still_fails_over(store: JobStore, clock: ManualClock) -> None:
    job = new(store)
    store.dispatch(job.job_id, "n1")
    assert job.deadline_kind is DeadlineKind.ACK
    clock.advance(store.config.ack_timeout_ms / 1000 + 0.01)
    (out,) = store.expire()
    assert out.expired is DeadlineKind.ACK and job.state is S.CREATED and out.cancel_node == "n1"


# --- timeouts and failover ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "per_s", "audio_ms", "expected"),
    [
        (30_000, 500, 0, 30_000),
        (30_000, 500, 10_000, 35_000),
        (30_000, 500, 60_000, 60_000),
        (30_000, 500, 200_000, 60_000),
        (10_000, 10, 100, 15_000),
        (20_000, 500, 20_000, 30_000),
        (40_000, 500, 20_000, 50_000),
        (30_000, 300, 20_000, 36_000),
        (30_000, 700, 20_000, 44_000),
        (30_000, 500, 1_001, 30_501),  # rounded up to the millisecond
    ],
)
def test_exec_timeout_formula(base: int, per_s: int, audio_ms: int, expected: int) -> None:
    cfg = JobConfig(
        exec_timeout_base_ms=base,
        exec_timeout_per_audio_second_ms=per_s,
        exec_timeout_min_ms=15_000,
        exec_timeout_max_ms=60_000,
    )
    assert exec_timeout_ms(audio_ms, cfg) == expected


def test_ack_timeout_fails_over_until_the_budget_is_spent(clock: ManualClock) -> None:
    store = store_with(clock, max_attempts=3, ack_timeout_ms=5000)
    job = new(store)
    for attempt, node in enumerate(["n1", "n2", "n3"], start=1):
        assert job.attempt == attempt and store.dispatchable() == [job]
        store.dispatch(job.job_id, node)
        assert store.next_deadline() == pytest.approx(clock.monotonic() + 5.0)
        clock.advance(4.9)
        assert store.expire() == [] and store.expired() == []
        clock.advance(0.2)
        assert store.expired() == [job]
        [out] = store.expire()
        assert out.cancel_node == node and out.job is job
        assert out.expired is DeadlineKind.ACK
        store.validate()
    assert job.state is S.TIMED_OUT and job.error_code == ErrorCode.JOB_TIMEOUT
    assert store.failovers == 2
    assert_empty(store)


def test_exec_timeout_scales_with_audio(clock: ManualClock) -> None:
    store = store_with(clock, max_attempts=1)
    job = new(store, spec(audio_ms=10_000), b"a")
    store.dispatch(job.job_id, "n1")
    clock.advance(1.0)
    store.on_ack(job.job_id, 1, "n1")
    assert job.deadline == pytest.approx(clock.monotonic() + 30.0)  # 10 s + 2 s/s x 10 s
    clock.advance(29.9)
    assert store.expire() == []
    store.on_started(job.job_id, 1, "n1")  # started does not extend the deadline
    clock.advance(0.2)
    [out] = store.expire()
    assert job.state is S.TIMED_OUT and out.cancel_node == "n1"
    assert out.expired is DeadlineKind.EXEC


def test_retryable_node_failure_goes_to_another_node(store: JobStore) -> None:
    job = new(store)
    store.dispatch(job.job_id, "n1")
    out = store.on_result(job.job_id, 1, "n1", success=False, error_code="MODEL_NOT_AVAILABLE")
    assert out.verdict is Verdict.APPLIED and out.cancel_node is None
    assert job.state is S.CREATED and job.attempt == 2 and job.node_id is None
    store.dispatch(job.job_id, "n2")
    out = store.on_result(job.job_id, 2, "n2", success=False, error_code="NMT_TIMEOUT", error_message="slow")
    assert job.state is S.FAILED and (job.error_code, job.error_message) == ("NMT_TIMEOUT", "slow")


def test_node_lost_fails_over_all_its_jobs_at_once(store: JobStore) -> None:
    jobs = [new(store, spec(index=i)) for i in range(3)]
    for job in jobs:
        store.dispatch(job.job_id, "n1" if job.utterance_index < 2 else "n2")
    outs = store.node_lost("n1")
    assert [o.job for o in outs] == jobs[:2]
    assert all(o.cancel_node is None and o.job and o.job.state is S.CREATED for o in outs)
    assert store.inflight_on("n1") == 0 and store.inflight_on("n2") == 1


def test_send_failure_with_no_attempt_left_fails_with_node_unavailable(clock: ManualClock) -> None:
    store = store_with(clock, max_attempts=1)
    job = new(store)
    store.dispatch(job.job_id, "n1")
    out = store.failover(job.job_id, "send failed", cancel=False)
    assert out.cancel_node is None and job.state is S.FAILED
    assert job.error_code == ErrorCode.NODE_UNAVAILABLE


# --- waiting for capacity -------------------------------------------------------------------------


def test_wait_queue_is_fifo_per_stream(store: JobStore) -> None:
    a0 = new(store, spec("a", 0), b"x")
    a1 = new(store, spec("a", 1), b"x")
    b0 = new(store, spec("b", 0), b"x")
    assert store.dispatchable() == [a0, b0]  # a1 waits behind a0
    store.dispatch(b0.job_id, "n1")
    assert store.dispatchable() == [a0]
    store.dispatch(a0.job_id, "n1")
    assert store.dispatchable() == [a1]


def test_a_retry_goes_before_newer_work(store: JobStore) -> None:
    a = new(store, spec("a", 0), b"x")
    store.dispatch(a.job_id, "n1")
    b = new(store, spec("b", 0), b"x")
    store.failover(a.job_id, "test")
    assert store.dispatchable() == [a, b]


def test_waiting_jobs_are_counted_per_pair(clock: ManualClock) -> None:
    store = store_with(clock, max_pending_jobs=3)
    a = new(store, spec("a", 0, tgt="en"))
    new(store, spec("b", 0, tgt="en"))
    c = new(store, spec("a", 0, tgt="de"))
    assert store.waiting_by_pair() == {"zh->en": 2, "zh->de": 1}
    full = new(store, spec("c", 0, tgt="ja"))  # the queue is full: failed at once, never waiting
    assert full.state is S.FAILED and store.waiting_by_pair() == {"zh->en": 2, "zh->de": 1}
    store.dispatch(c.job_id, "n1")
    store.dispatch(a.job_id, "n1")
    assert store.waiting_by_pair() == {"zh->en": 1}
    store.failover(a.job_id, "test")  # back in the queue
    assert store.waiting_by_pair() == {"zh->en": 2}
    store.validate()
    for _ in range(10):  # wait deadlines, and the dispatched job's missing ack (back to the queue)
        clock.advance(10)
        store.expire()
    assert store.waiting_by_pair() == {} and store.waiting == 0
    store.validate()


def test_full_wait_queue_fails_at_once(clock: ManualClock) -> None:
    store = store_with(clock, max_pending_jobs=2)
    store.create(spec(index=0), b"x")
    store.create(spec(index=1), b"x")
    out = store.create(spec(index=2), b"x")
    assert out.verdict is Verdict.APPLIED and out.job is not None
    assert out.job.state is S.FAILED and out.job.error_code == ErrorCode.NO_AVAILABLE_NODE
    assert store.waiting == 2
    store.validate()


def test_waiting_too_long_fails_with_no_available_node(clock: ManualClock) -> None:
    store = store_with(clock, pending_timeout_ms=3000)
    job = new(store, spec(), b"x")
    clock.advance(2.9)
    assert store.expire() == []
    clock.advance(0.2)
    [out] = store.expire()
    assert out.job is job and job.state is S.FAILED and job.error_code == ErrorCode.NO_AVAILABLE_NODE
    assert out.expired is DeadlineKind.WAIT
    assert_empty(store)


def test_a_job_held_for_a_busy_node_waits_up_to_its_execution_timeout(clock: ManualClock) -> None:
    """Busy: the wait is the execution timeout of its audio (10 s base + 2 s per audio second = 14 s
    here, at least 15 s min), for the jobs behind it in its stream too; another stream keeps 3 s."""
    store = store_with(clock, pending_timeout_ms=3000)
    head = new(store, spec(index=0, audio_ms=2000), b"x")
    behind = new(store, spec(index=1, audio_ms=2000), b"y")
    other = new(store, spec(session="s-2"), b"z")
    store.hold(head.job_id, busy=True)
    clock.advance(3.1)
    [out] = store.expire()
    assert out.job is other and other.error_code == ErrorCode.NO_AVAILABLE_NODE
    assert head.state is behind.state is S.CREATED
    clock.advance(15.0 - 3.1 - 0.1)
    assert store.expire() == []
    clock.advance(0.2)
    outs = store.expire()
    assert {o.job.job_id for o in outs if o.job} == {head.job_id, behind.job_id}
    assert head.error_code == ErrorCode.NO_AVAILABLE_NODE and "free" in (head.error_message or "")
    store.validate()


def test_a_job_waiting_for_a_node_that_is_gone_fails_after_the_short_wait_from_then(
    clock: ManualClock,
) -> None:
    store = store_with(clock, pending_timeout_ms=3000)
    job = new(store, spec(), b"x")
    store.hold(job.job_id, busy=True)
    clock.advance(10.0)
    assert store.expire() == []
    store.hold(job.job_id, busy=False)  # no node serves it any more
    clock.advance(2.9)
    assert store.expire() == []
    clock.advance(0.2)
    [out] = store.expire()
    assert out.job is job and job.state is S.FAILED and job.error_code == ErrorCode.NO_AVAILABLE_NODE
    # holding a job that is not waiting changes nothing
    store.hold(job.job_id, busy=True)
    assert job.state is S.FAILED and job.deadline is None


def test_a_retry_waits_the_short_wait_again_until_held_busy(clock: ManualClock) -> None:
    store = store_with(clock, pending_timeout_ms=3000)
    job = new(store, spec(), b"x")
    store.hold(job.job_id, busy=True)
    store.dispatch(job.job_id, "n1", acks=False)
    clock.advance(1.0)
    store.failover(job.job_id, "test")
    assert job.state is S.CREATED and not job.waits_for_slot and job.queued_at == clock.monotonic()
    assert job.deadline == clock.monotonic() + 3.0


def test_failover_into_a_full_queue_fails(clock: ManualClock) -> None:
    store = store_with(clock, max_pending_jobs=1)
    a = new(store, spec(index=0), b"x")
    store.dispatch(a.job_id, "n1")
    store.create(spec(index=1), b"x")
    store.failover(a.job_id, "test")
    assert a.state is S.FAILED and a.error_code == ErrorCode.NO_AVAILABLE_NODE


# --- bounds and eviction --------------------------------------------------------------------------


def test_terminal_jobs_are_evicted_after_retention(clock: ManualClock) -> None:
    store = store_with(clock, retention_seconds=60)
    done = new(store, spec(index=0), b"x")
    live = new(store, spec(index=1), b"x")
    store.cancel(done.job_id, "test")
    clock.advance(59)
    assert store.evict() == 0
    clock.advance(1)
    assert store.evict() == 1
    assert store.get(done.job_id) is None and store.story(done.job_id) == []
    assert store.get(live.job_id) is live and len(store) == 1
    # once forgotten, a replay makes a new job
    assert store.create(spec(index=0), b"x").verdict is Verdict.APPLIED
    store.validate()


def test_max_jobs_evicts_ended_jobs_early_then_refuses(clock: ManualClock) -> None:
    store = store_with(clock, max_jobs=2)
    a = new(store, spec(index=0), b"x")
    store.cancel(a.job_id, "test")
    store.create(spec(index=1), b"x")
    store.create(spec(index=2), b"x")  # room made by forgetting the ended job
    assert store.get(a.job_id) is None and len(store) == 2
    with pytest.raises(NoAvailableNodeError):
        store.create(spec(index=3), b"x")
    store.validate()


def test_session_audio_budget(clock: ManualClock) -> None:
    store = store_with(clock, session_audio_limit=10)
    a = new(store, spec(index=0), b"x" * 6)
    b = new(store, spec(index=1), b"x" * 6)
    assert a.state is S.CREATED and b.state is S.FAILED and b.error_code == ErrorCode.NODE_OVERLOADED
    assert new(store, spec("other", 0), b"x" * 6).state is S.CREATED
    store.cancel(a.job_id, "test")
    assert new(store, spec(index=2), b"x" * 6).state is S.CREATED
    store.validate()


def test_cancel_session(store: JobStore) -> None:
    a = new(store, spec(index=0), b"x")
    b = new(store, spec(index=1), b"x")
    store.dispatch(a.job_id, "n1")
    outs = store.cancel_session("s-1", "session closed")
    assert [(o.job, o.cancel_node) for o in outs] == [(a, "n1"), (b, None)]
    assert a.state is b.state is S.CANCELLED
    assert store.cancel(a.job_id, "again").verdict is Verdict.DUPLICATE
    assert store.cancel("job-nope", "x").verdict is Verdict.UNKNOWN
    assert_empty(store)


def test_spec_from_utterance(clock: ManualClock) -> None:
    seg = Segmenter(SessionConfig(), clock, AudioSpec(AudioFormat.PCM16, 16000))
    [utt] = seg.chunk(b"\0" * 3200, True)
    s = JobSpec.from_utterance(utt, session_id="s-1", src_lang="zh", tgt_lang="en", trace_id="t")
    s = dataclasses.replace(s, tenant_id="acme")
    assert (s.utterance_index, s.audio_ms, s.cut_reason, s.tenant_id) == (
        0,
        100,
        CutReason.MANUAL_CUT,
        "acme",
    )


def test_job_repr_has_no_audio(store: JobStore) -> None:
    job = new(store, spec(), b"\xde\xad" * 10)
    assert "\\xde" not in repr(job)


# --- property: any sequence of inputs keeps the invariants and drains to zero -----------------------

NODES = ["n1", "n2", "n3"]
op = st.one_of(
    st.tuples(st.just("create"), st.integers(0, 5), st.sampled_from(["en", "de"]), st.just(0)),
    st.tuples(st.just("dispatch"), st.integers(0, 10), st.sampled_from(NODES), st.just(0)),
    st.tuples(
        st.sampled_from(["ack", "started", "partial", "ok", "fail", "retryable"]),
        st.integers(0, 10),
        st.sampled_from(NODES),
        st.integers(0, 4),
    ),
    st.tuples(st.just("lost"), st.just(0), st.sampled_from(NODES), st.just(0)),
    st.tuples(st.just("cancel"), st.integers(0, 10), st.just(""), st.just(0)),
    st.tuples(st.just("wait"), st.integers(0, 20), st.just(""), st.just(0)),
)


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(op, max_size=80))
def test_random_inputs_keep_invariants_and_drain(ops: list[tuple[str, int, str, int]]) -> None:
    clock = ManualClock()
    store = store_with(clock, max_pending_jobs=4, max_attempts=2, retention_seconds=5)
    ids: list[str] = []
    load = dict.fromkeys(NODES, 0)  # what a shell following the Outcome contract would count

    def account(outs: list[Outcome]) -> None:
        for out in outs:
            if out.freed_node is not None:
                load[out.freed_node] -= 1
            assert out.cancel_node in (None, out.freed_node)

    for name, n, arg, attempt in ops:
        pick = ids[n % len(ids)] if ids else "job-none"
        job = store.get(pick)
        if name == "create":
            out = store.create(spec(index=n, tgt=arg), b"a" * (n + 1))
            if out.job is not None and out.verdict is Verdict.APPLIED:
                ids.append(out.job.job_id)
        elif name == "dispatch" and job is not None and job.state is S.CREATED:
            assert store.dispatch(pick, arg).freed_node is None
            load[arg] += 1
        elif name in ("ack", "started", "partial", "ok", "fail", "retryable"):
            att = attempt or (job.attempt if job else 1)
            node = job.node_id or arg if job else arg
            if name == "ack":
                account([store.on_ack(pick, att, node)])
            elif name == "started":
                account([store.on_started(pick, att, node)])
            elif name == "partial":
                account([store.on_partial(pick, None, node)])
            else:
                code = "MODEL_NOT_AVAILABLE" if name == "retryable" else "NMT_TIMEOUT"
                account([store.on_result(pick, att, node, success=name == "ok", error_code=code)])
        elif name == "lost":
            account(store.node_lost(arg))
        elif name == "cancel":
            account([store.cancel(pick, "test")])
        elif name == "wait":
            clock.advance(n / 2)
            account(store.expire())
            store.evict()
        store.validate()
        assert load == {node: store.inflight_on(node) for node in NODES}
    for _ in range(10):  # nobody answers any more: every job must end by its deadlines
        clock.advance(100)
        account(store.expire())
    assert_empty(store)
    assert load == dict.fromkeys(NODES, 0)
    clock.advance(100)
    store.evict()
    assert len(store) == 0 and store.next_deadline() is None
