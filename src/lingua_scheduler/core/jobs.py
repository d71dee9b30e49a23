"""Jobs: one record per (utterance, target language), one state machine, attempt fencing and deadlines.

Owns: ``Job`` records; the idempotency index (session_id, utterance_index, tgt_lang) -> job; the
bounded FIFO of jobs waiting for a node; the per-node and per-session indexes; the deadlines (waiting,
ack, execution) in a heap; the audio held by live jobs (dropped the moment a job ends); eviction of
ended jobs after ``retention_seconds``; and a bounded history of every job's transitions (``story``).

Rules:
- Every state change goes through ``_transition``; the legal ones are ``TRANSITIONS``. The only way
  back is failover: DISPATCHED | ACCEPTED | RUNNING -> CREATED with ``attempt + 1``, within
  ``max_attempts``.
- A CREATED job is always in the wait queue (new jobs and retries alike); the shell takes jobs to
  place from ``dispatchable()``. A full queue fails the job at once with NO_AVAILABLE_NODE; a job
  waiting longer than ``pending_timeout_ms`` fails the same way -- unless the shell reported that a
  node able to take it is merely busy (``hold(busy=True)``): such a job waits for a slot up to its
  execution timeout (scaled by its audio length) from when it was queued, since a slow node finishing
  the job later is still better than an error now. A job no node could ever take fails after
  ``pending_timeout_ms``.
- Messages from nodes are fenced: an attempt_id or node_id other than the current attempt's changes
  nothing and is reported ``STALE``; the shell must not deliver it. One exception: a successful
  ``job_result`` of an earlier attempt, from the node that attempt was given to, while the job is still
  unanswered, completes the job (first valid result wins; the current attempt, if on a node, is
  cancelled). A node's slow answer is never thrown away for a retry that may fare no better.
- The ack deadline applies only to nodes that acknowledge jobs (``dispatch(acks=True)``); for the
  others the execution deadline runs from the dispatch. A first ``asr_partial`` or ``job_started``
  counts as the ack.

Must never: await, do I/O, select nodes (the shell does, excluding ``Job.tried_nodes``), build wire
messages, log audio or transcripts, or scan every job on a timer (deadlines live in a heap).
"""

from __future__ import annotations

import heapq
import secrets
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from enum import StrEnum

from lingua_scheduler.clock import Clock
from lingua_scheduler.config import JobConfig
from lingua_scheduler.core.segmentation import CutReason, Utterance
from lingua_scheduler.errors import ErrorCode, NoAvailableNodeError, SchedulerError
from lingua_scheduler.protocol.common import FeatureFlags
from lingua_scheduler.protocol.node import PipelineConfig

HISTORY_LEN = 32


class JobState(StrEnum):
    CREATED = "created"  # waiting in the queue for a node
    DISPATCHED = "dispatched"  # job_assign sent to node_id; ack deadline armed
    ACCEPTED = "accepted"  # job_ack from the current attempt; execution deadline armed
    RUNNING = "running"  # job_started or a first asr_partial from the current attempt
    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"


J = JobState
TERMINAL: frozenset[JobState] = frozenset({J.COMPLETED, J.FAILED, J.TIMED_OUT, J.CANCELLED})
#: states in which an attempt runs on a node (the job counts in that node's in-flight set)
ON_NODE: frozenset[JobState] = frozenset({J.DISPATCHED, J.ACCEPTED, J.RUNNING})

#: from-state -> states it may move to. ``-> CREATED`` is failover (a new attempt), nothing else.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    # -> COMPLETED: an abandoned attempt's result arrived while the retry was waiting for a node
    J.CREATED: frozenset({J.DISPATCHED, J.COMPLETED, J.FAILED, J.CANCELLED}),
    # a node may skip job_ack or job_started; a result is accepted from any running-ish state
    J.DISPATCHED: frozenset({J.ACCEPTED, J.RUNNING, J.CREATED}) | TERMINAL,
    J.ACCEPTED: frozenset({J.RUNNING, J.CREATED}) | TERMINAL,
    J.RUNNING: frozenset({J.CREATED}) | TERMINAL,
    J.COMPLETED: frozenset(),
    J.FAILED: frozenset(),
    J.TIMED_OUT: frozenset(),
    J.CANCELLED: frozenset(),
}

#: node-reported failures another node may not have: retried within the attempt budget
RETRYABLE_CODES: frozenset[str] = frozenset(
    {
        ErrorCode.MODEL_NOT_AVAILABLE,
        ErrorCode.MODEL_LOAD_FAILED,
        ErrorCode.MODEL_VERIFY_FAILED,
        ErrorCode.MODEL_CORRUPTED,
        ErrorCode.NODE_OVERLOADED,
        ErrorCode.NODE_UNAVAILABLE,
    }
)


class DeadlineKind(StrEnum):
    WAIT = "wait"  # CREATED: no node found within pending_timeout_ms
    ACK = "ack"  # DISPATCHED: no sign of life within ack_timeout_ms
    EXEC = "exec"  # ACCEPTED / RUNNING: no result within the execution timeout


class Verdict(StrEnum):
    APPLIED = "applied"  # accepted from the current attempt: act on it (relay, deliver, dispatch)
    DUPLICATE = "duplicate"  # a repeat of something already applied: nothing changed, send nothing
    STALE = "stale"  # another attempt or another node: nothing changed, never deliver
    UNKNOWN = "unknown"  # no such job here (evicted, or never ours)


class IllegalJobTransition(SchedulerError):
    """A bug in the caller or this module, never a peer's fault."""

    def __init__(self, job_id: str, src: JobState, dst: JobState) -> None:
        super().__init__(f"job {job_id}: illegal transition {src} -> {dst}", code=ErrorCode.INTERNAL_ERROR)
        self.src = src
        self.dst = dst


def check_transition(job_id: str, src: JobState, dst: JobState) -> None:
    if dst not in TRANSITIONS[src]:
        raise IllegalJobTransition(job_id, src, dst)


# --- timeouts (pure) ------------------------------------------------------------------------------


def ack_deadline(dispatched_at: float, config: JobConfig) -> float:
    return dispatched_at + config.ack_timeout_ms / 1000.0


def exec_timeout_ms(audio_ms: int, config: JobConfig) -> int:
    """base + per_audio_second x audio seconds (rounded up to the ms), clamped to [min, max]."""
    per_audio = -(-config.exec_timeout_per_audio_second_ms * max(audio_ms, 0) // 1000)
    raw = config.exec_timeout_base_ms + per_audio
    return min(max(raw, config.exec_timeout_min_ms), config.exec_timeout_max_ms)


def exec_deadline(started_at: float, audio_ms: int, config: JobConfig) -> float:
    return started_at + exec_timeout_ms(audio_ms, config) / 1000.0


def wait_deadline(queued_at: float, config: JobConfig) -> float:
    return queued_at + config.pending_timeout_ms / 1000.0


# --- records --------------------------------------------------------------------------------------

JobKey = tuple[str, int, str]


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What to run: everything ``job_assign`` needs except the audio, the node and the attempt."""

    session_id: str
    utterance_index: int
    src_lang: str
    tgt_lang: str
    trace_id: str
    audio_format: str
    sample_rate: int
    audio_ms: int
    cut_reason: CutReason = CutReason.COMPLETE
    tenant_id: str | None = None
    dialect: str | None = None
    features: FeatureFlags | None = None
    pipeline: PipelineConfig | None = None
    mode: str | None = None
    lang_a: str | None = None
    lang_b: str | None = None
    auto_langs: tuple[str, ...] | None = None
    first_client_ts_ms: int | None = None
    enable_streaming_asr: bool | None = None
    partial_update_interval_ms: int | None = None
    #: the spoken turn (turn dialect): utterances up to and including the first cut that is not a
    #: max-duration cut
    turn_id: str | None = None
    #: the previous utterance of the session was cut at its maximum duration: this one continues it
    #: on the node that has the rest of the turn
    continues_turn: bool = False
    #: the integrator's per-job metadata (bounded by the wire types), carried to the node and back
    metadata: dict[str, str] | None = None

    @property
    def key(self) -> JobKey:
        """Idempotency key: a replayed utterance maps to the job already made for it."""
        return (self.session_id, self.utterance_index, self.tgt_lang)

    @classmethod
    def from_utterance(
        cls, utt: Utterance, *, session_id: str, src_lang: str, tgt_lang: str, trace_id: str
    ) -> JobSpec:
        """Spec for one target language of a finalized utterance; set the optional session fields
        (tenant, dialect, features, mode...) with ``dataclasses.replace``."""
        return cls(
            session_id=session_id,
            utterance_index=utt.index,
            src_lang=src_lang,
            tgt_lang=tgt_lang,
            trace_id=trace_id,
            audio_format=utt.audio_format,
            sample_rate=utt.sample_rate,
            audio_ms=utt.duration_ms,
            cut_reason=utt.reason,
            first_client_ts_ms=utt.first_client_ts_ms,
        )


def _pair(spec: JobSpec) -> str:
    return f"{spec.src_lang}->{spec.tgt_lang}"


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    at: float
    src: JobState | None  # None for the creation entry
    dst: JobState
    reason: str
    attempt: int
    node_id: str | None


@dataclass(slots=True, eq=False)
class Job:
    job_id: str
    seq: int
    spec: JobSpec
    created_at: float
    created_wall_ms: int
    #: the audio, kept until the job ends (a failover needs it again), then dropped
    audio: bytes | None = field(default=None, repr=False)
    state: JobState = JobState.CREATED
    #: current attempt, from 1; messages carrying another attempt_id are stale
    attempt: int = 1
    #: node of the current attempt (kept after the end, for duplicate detection); None while waiting
    node_id: str | None = None
    tried_nodes: list[str] = field(default_factory=list)
    #: attempt -> the node it was given to (the fence for results of earlier attempts)
    attempt_nodes: dict[int, str] = field(default_factory=dict)
    #: the attempt whose result completed the job (None until then; may be earlier than ``attempt``)
    won_attempt: int | None = None
    dispatched_at: float | None = None
    accepted_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    deadline: float | None = None
    deadline_kind: DeadlineKind | None = None
    #: when the job last entered the wait queue (None while on a node or ended)
    queued_at: float | None = None
    #: the last failed placement found a node able to take the job, only busy (the wait is longer)
    waits_for_slot: bool = False
    error_code: str | None = None
    error_message: str | None = None
    history: deque[HistoryEntry] = field(default_factory=lambda: deque(maxlen=HISTORY_LEN), repr=False)
    deadline_token: int = field(default=-1, repr=False)

    @property
    def session_id(self) -> str:
        return self.spec.session_id

    @property
    def utterance_index(self) -> int:
        return self.spec.utterance_index

    @property
    def tgt_lang(self) -> str:
        return self.spec.tgt_lang

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


@dataclass(frozen=True, slots=True)
class Outcome:
    """What an input did to a job.

    After APPLIED, ``job.state`` tells the shell what to do: CREATED -> place it (``dispatchable``);
    COMPLETED -> deliver the result; FAILED / TIMED_OUT / CANCELLED -> report and resolve the index.
    """

    verdict: Verdict
    #: None only with UNKNOWN
    job: Job | None
    #: send ``job_cancel`` to this node: its attempt was abandoned while it may still be running
    cancel_node: str | None = None
    #: this input ended the attempt on that node: release one in-flight slot of its load (exactly once
    #: per ``dispatch``, which took the slot)
    freed_node: str | None = None
    #: ``expire()`` only: the deadline that passed
    expired: DeadlineKind | None = None
    #: the result came from an abandoned attempt on this node (its slot was released at the failover)
    early_node: str | None = None


def new_job_id() -> str:
    return "job-" + secrets.token_hex(8)


class JobStore:
    """All jobs of this instance. ``now`` arguments default to the injected clock's monotonic time."""

    def __init__(self, config: JobConfig, clock: Clock, *, session_audio_limit: int | None = None) -> None:
        self.config = config
        self.clock = clock
        #: bound on audio held by one session's live jobs (SessionConfig.max_session_buffer_bytes)
        self.session_audio_limit = session_audio_limit
        self._jobs: dict[str, Job] = {}
        self._by_key: dict[JobKey, str] = {}
        self._by_session: dict[str, set[str]] = {}
        self._by_node: dict[str, set[str]] = {}
        #: FIFO of CREATED jobs (job_id -> None); retries go to the front
        self._waiting: OrderedDict[str, None] = OrderedDict()
        #: queued jobs per directed language pair ("src->tgt"); a pair leaves when its last job does, so
        #: this is bounded by the wait queue (the per-pair demand of /metrics, read without a scan)
        self._waiting_pairs: dict[str, int] = {}
        #: ended jobs in the order they ended (job_id -> finished_at), for eviction
        self._ended: OrderedDict[str, float] = OrderedDict()
        #: (deadline, token, job_id); an entry is live only while the job still carries that token
        self._deadlines: list[tuple[float, int, str]] = []
        self._audio_refs: dict[tuple[str, int], int] = {}
        self._session_audio: dict[str, int] = {}
        self._counts: dict[JobState, int] = dict.fromkeys(JobState, 0)
        self._seq = 0
        self._token = 0
        self.duplicates_blocked = 0
        self.stale_messages = 0
        self.failovers = 0
        self.evicted = 0

    # --- creation and placement -----------------------------------------------------------------

    def create(self, spec: JobSpec, audio: bytes, now: float | None = None) -> Outcome:
        """The job for ``spec.key``: a new one (APPLIED, state CREATED and queued, or already FAILED
        when the wait queue or the session's audio budget is full) or the existing one (DUPLICATE; do
        not dispatch or expect it again). Raises ``NoAvailableNodeError`` when ``max_jobs`` live jobs
        exist."""
        now = self._now(now)
        existing = self._by_key.get(spec.key)
        if existing is not None:
            self.duplicates_blocked += 1
            return Outcome(Verdict.DUPLICATE, self._jobs[existing])
        if len(self._jobs) >= self.config.max_jobs and not self._evict_oldest():
            raise NoAvailableNodeError(f"job table full ({self.config.max_jobs} live jobs)")
        job_id = new_job_id()
        while job_id in self._jobs:
            job_id = new_job_id()
        self._seq += 1
        job = Job(job_id, self._seq, spec, now, self.clock.wall_ms())
        self._jobs[job_id] = job
        self._by_key[spec.key] = job_id
        self._by_session.setdefault(spec.session_id, set()).add(job_id)
        self._counts[JobState.CREATED] += 1
        job.history.append(HistoryEntry(now, None, JobState.CREATED, "created", 1, None))
        if not self._hold_audio(job, audio):
            self._end(job, J.FAILED, ErrorCode.NODE_OVERLOADED, "session audio backlog over its limit", now)
        else:
            self._enqueue(job, now, front=False)
        return Outcome(Verdict.APPLIED, job)

    def dispatchable(self) -> list[Job]:
        """Waiting jobs the shell may try to place now, in queue order: the oldest waiting job of each
        (session, target language), so a stream's jobs leave the queue in order. A job the shell
        cannot place stays queued and blocks only its own stream."""
        heads: dict[tuple[str, str], Job] = {}
        for job_id in self._waiting:
            job = self._jobs[job_id]
            stream = (job.session_id, job.tgt_lang)
            head = heads.get(stream)
            if head is None or job.seq < head.seq:
                heads[stream] = job
        return list(heads.values())

    def hold(self, job_id: str, *, busy: bool, now: float | None = None) -> None:
        """The shell could not place waiting job ``job_id`` now. ``busy``: a node able to take it is
        only at capacity, so the job -- and the jobs queued behind it in its stream, which wait for it
        -- may wait up to their execution timeout from when they were queued; otherwise (no node
        serves it) they fail ``pending_timeout_ms`` after they were queued, or after now when they had
        been waiting for a busy node that is gone. O(jobs of the session)."""
        now = self._now(now)
        head = self._jobs.get(job_id)
        if head is None or head.state is not J.CREATED:
            return
        for other in self._by_session.get(head.session_id, ()):
            job = self._jobs[other]
            if job.state is not J.CREATED or job.tgt_lang != head.tgt_lang or job.waits_for_slot == busy:
                continue
            assert job.queued_at is not None and job.deadline is not None
            job.waits_for_slot = busy
            if busy:
                slot_wait = max(
                    exec_timeout_ms(job.spec.audio_ms, self.config), self.config.pending_timeout_ms
                )
                at = job.queued_at + slot_wait / 1000.0
            else:
                at = min(job.deadline, wait_deadline(now, self.config))
            if at != job.deadline:
                self._arm(job, DeadlineKind.WAIT, at)

    def dispatch(self, job_id: str, node_id: str, now: float | None = None, *, acks: bool = True) -> Outcome:
        """Record that attempt ``job.attempt`` goes to ``node_id``. Call it before sending
        ``job_assign`` (a fast ack then finds the job DISPATCHED); if the send fails call
        ``failover(job_id, "send failed", cancel=False)``. ``acks``: the node acknowledges jobs, so
        the ack deadline applies; otherwise the execution deadline runs from now."""
        now = self._now(now)
        job = self._get(job_id)
        check_transition(job_id, job.state, J.DISPATCHED)
        job.node_id = node_id
        job.tried_nodes.append(node_id)
        job.attempt_nodes[job.attempt] = node_id
        job.dispatched_at = now
        self._transition(job, J.DISPATCHED, f"dispatched to {node_id}", now)
        if acks:
            self._arm(job, DeadlineKind.ACK, ack_deadline(now, self.config))
        else:
            self._arm(job, DeadlineKind.EXEC, exec_deadline(now, job.spec.audio_ms, self.config))
        return Outcome(Verdict.APPLIED, job)

    # --- node messages (fenced) -----------------------------------------------------------------

    def on_ack(self, job_id: str, attempt_id: int, node_id: str, now: float | None = None) -> Outcome:
        now = self._now(now)
        job, verdict = self._fence(job_id, attempt_id, node_id)
        if job is None or verdict is not None:
            return Outcome(verdict or Verdict.UNKNOWN, job)
        if job.state is not J.DISPATCHED:
            return Outcome(Verdict.DUPLICATE, job)
        job.accepted_at = now
        self._transition(job, J.ACCEPTED, "job_ack", now)
        self._arm(job, DeadlineKind.EXEC, exec_deadline(now, job.spec.audio_ms, self.config))
        return Outcome(Verdict.APPLIED, job)

    def on_started(self, job_id: str, attempt_id: int, node_id: str, now: float | None = None) -> Outcome:
        now = self._now(now)
        job, verdict = self._fence(job_id, attempt_id, node_id)
        if job is None or verdict is not None:
            return Outcome(verdict or Verdict.UNKNOWN, job)
        if job.state not in (J.DISPATCHED, J.ACCEPTED):
            return Outcome(Verdict.DUPLICATE, job)
        self._start(job, "job_started", now)
        return Outcome(Verdict.APPLIED, job)

    def on_partial(
        self, job_id: str, attempt_id: int | None, node_id: str, now: float | None = None
    ) -> Outcome:
        """An ``asr_partial``: APPLIED means relay it. Fenced by node, and by attempt when the node
        sends one (the field is optional on the wire)."""
        now = self._now(now)
        job, verdict = self._fence(job_id, attempt_id, node_id)
        if job is None or verdict is not None:
            return Outcome(verdict or Verdict.UNKNOWN, job)
        if job.terminal:
            return Outcome(Verdict.DUPLICATE, job)
        if job.state is not J.RUNNING:
            self._start(job, "first asr_partial", now)
        return Outcome(Verdict.APPLIED, job)

    def on_result(
        self,
        job_id: str,
        attempt_id: int,
        node_id: str,
        *,
        success: bool,
        error_code: str | None = None,
        error_message: str | None = None,
        now: float | None = None,
    ) -> Outcome:
        """A ``job_result``. APPLIED with state COMPLETED: deliver; FAILED: report; CREATED: the
        failure was retryable (``RETRYABLE_CODES``) and the job waits for another node. A success of
        an earlier attempt of this node completes a job still unanswered (``early_node`` set; the
        current attempt's node, if any, is in ``cancel_node``)."""
        now = self._now(now)
        if success and (early := self._early_result(job_id, attempt_id, node_id, now)) is not None:
            return early
        job, verdict = self._fence(job_id, attempt_id, node_id)
        if job is None or verdict is not None:
            return Outcome(verdict or Verdict.UNKNOWN, job)
        if job.terminal:
            return Outcome(Verdict.DUPLICATE, job)
        if success:
            job.won_attempt = job.attempt
            self._transition(job, J.COMPLETED, "job_result ok", now)
            return Outcome(Verdict.APPLIED, job, freed_node=node_id)
        code = error_code or ErrorCode.INTERNAL_ERROR
        message = error_message or "the node reported a failure"
        if code in RETRYABLE_CODES:
            return self._retry_or_end(
                job, f"node reported {code}", now, J.FAILED, code, message, cancel=False
            )
        self._end(job, J.FAILED, code, message, now)
        return Outcome(Verdict.APPLIED, job, freed_node=node_id)

    def _early_result(self, job_id: str, attempt_id: int, node_id: str, now: float) -> Outcome | None:
        """Complete a live job with the result of an earlier attempt given to ``node_id``; None when
        the result is not such a one (the normal fence then judges it)."""
        job = self._jobs.get(job_id)
        if (
            job is None
            or job.terminal
            or attempt_id >= job.attempt
            or job.attempt_nodes.get(attempt_id) != node_id
        ):
            return None
        current = job.node_id if job.state in ON_NODE else None
        self._transition(job, J.COMPLETED, f"job_result of earlier attempt {attempt_id} from {node_id}", now)
        job.node_id, job.won_attempt = node_id, attempt_id
        return Outcome(Verdict.APPLIED, job, cancel_node=current, freed_node=current, early_node=node_id)

    # --- failover, cancellation, timeouts -------------------------------------------------------

    def failover(self, job_id: str, reason: str, now: float | None = None, *, cancel: bool = True) -> Outcome:
        """Abandon the current attempt: back to CREATED with attempt + 1 (queued in front), or FAILED
        with NODE_UNAVAILABLE once ``max_attempts`` is spent. ``cancel``: tell the old node."""
        now = self._now(now)
        job = self._get(job_id)
        if job.state not in ON_NODE:
            raise IllegalJobTransition(job_id, job.state, J.CREATED)
        return self._retry_or_end(
            job,
            reason,
            now,
            J.FAILED,
            ErrorCode.NODE_UNAVAILABLE,
            f"{reason}; no attempt left",
            cancel=cancel,
        )

    def node_lost(self, node_id: str, now: float | None = None) -> list[Outcome]:
        """The node's connection closed: fail over every attempt it held, at once."""
        now = self._now(now)
        jobs = sorted((self._jobs[j] for j in self._by_node.get(node_id, ())), key=lambda j: j.seq)
        return [
            self._retry_or_end(
                job,
                f"node {node_id} lost",
                now,
                J.FAILED,
                ErrorCode.NODE_UNAVAILABLE,
                "node lost",
                cancel=False,
            )
            for job in jobs
        ]

    def cancel(self, job_id: str, reason: str, now: float | None = None) -> Outcome:
        return self._stop(job_id, J.CANCELLED, None, reason, now)

    def cancel_session(self, session_id: str, reason: str, now: float | None = None) -> list[Outcome]:
        """Cancel every live job of a session (it closed or disconnected)."""
        now = self._now(now)
        live = [j for j in self.jobs_of(session_id) if not j.terminal]
        return [self.cancel(j.job_id, reason, now) for j in live]

    def abort(self, job_id: str, code: str, message: str, now: float | None = None) -> Outcome:
        """The scheduler gives up on a live job (graceful shutdown past its deadline): FAILED with
        ``code``, no retry. Unlike ``cancel`` the session is owed an explicit failure, so the shell
        reports it; the node of the current attempt, if any, gets ``job_cancel`` and its slot back."""
        return self._stop(job_id, J.FAILED, code, message, now)

    def _stop(
        self, job_id: str, state: JobState, code: str | None, reason: str, now: float | None
    ) -> Outcome:
        """End a live job from outside (cancel, abort): the node of its current attempt, if any, is
        told and gets its slot back."""
        now = self._now(now)
        job = self._jobs.get(job_id)
        if job is None:
            return Outcome(Verdict.UNKNOWN, None)
        if job.terminal:
            return Outcome(Verdict.DUPLICATE, job)
        node = job.node_id if job.state in ON_NODE else None
        self._end(job, state, code, reason, now)
        return Outcome(Verdict.APPLIED, job, cancel_node=node, freed_node=node)

    def live(self) -> list[Job]:
        """Jobs not yet ended, oldest first. O(jobs): for shutdown and diagnostics, not a hot path."""
        return sorted((j for j in self._jobs.values() if not j.terminal), key=lambda j: j.seq)

    def expire(self, now: float | None = None) -> list[Outcome]:
        """Apply every deadline that has passed: waiting too long -> FAILED(NO_AVAILABLE_NODE); no ack
        or no result in time -> failover with job_cancel to the old node, or TIMED_OUT(JOB_TIMEOUT)
        once the attempts are spent. Call it at ``next_deadline()``."""
        now = self._now(now)
        out: list[Outcome] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, token, job_id = heapq.heappop(self._deadlines)
            job = self._jobs.get(job_id)
            if job is None or job.deadline_token != token:
                continue
            kind = job.deadline_kind
            if kind is DeadlineKind.WAIT:
                waited = (
                    f"no node free within {int((now - (job.queued_at or now)) * 1000)} ms"
                    if job.waits_for_slot
                    else f"no node within {self.config.pending_timeout_ms} ms"
                )
                self._end(job, J.FAILED, ErrorCode.NO_AVAILABLE_NODE, waited, now)
                outcome = Outcome(Verdict.APPLIED, job)
            else:
                what = "ack" if kind is DeadlineKind.ACK else "result"
                reason = f"no {what} from {job.node_id} in time"
                outcome = self._retry_or_end(
                    job, reason, now, J.TIMED_OUT, ErrorCode.JOB_TIMEOUT, reason, cancel=True
                )
            out.append(replace(outcome, expired=kind))
        return out

    def expired(self, now: float | None = None) -> list[Job]:
        """Jobs whose deadline has passed, without acting (diagnostics; O(heap))."""
        now = self._now(now)
        return [
            job
            for at, token, job_id in sorted(self._deadlines)
            if at <= now and (job := self._jobs.get(job_id)) is not None and job.deadline_token == token
        ]

    def next_deadline(self) -> float | None:
        """Earliest live deadline (monotonic), or None: when the shell should call ``expire()``."""
        while self._deadlines:
            _, token, job_id = self._deadlines[0]
            job = self._jobs.get(job_id)
            if job is not None and job.deadline_token == token:
                return self._deadlines[0][0]
            heapq.heappop(self._deadlines)
        return None

    def evict(self, now: float | None = None) -> int:
        """Forget jobs that ended more than ``retention_seconds`` ago; returns how many."""
        now = self._now(now)
        horizon = now - self.config.retention_seconds
        n = 0
        while self._ended:
            job_id, finished_at = next(iter(self._ended.items()))
            if finished_at > horizon:
                break
            self._forget(job_id)
            n += 1
        return n

    # --- queries --------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def find(self, session_id: str, utterance_index: int, tgt_lang: str) -> Job | None:
        job_id = self._by_key.get((session_id, utterance_index, tgt_lang))
        return None if job_id is None else self._jobs[job_id]

    def jobs_of(self, session_id: str) -> list[Job]:
        return sorted((self._jobs[j] for j in self._by_session.get(session_id, ())), key=lambda j: j.seq)

    def story(self, job_id: str) -> list[HistoryEntry]:
        """What happened to a job (the last ``HISTORY_LEN`` transitions); empty if unknown."""
        job = self._jobs.get(job_id)
        return list(job.history) if job is not None else []

    def counts(self) -> dict[JobState, int]:
        return dict(self._counts)

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[Job]:
        """Every job held (live, and ended within the retention), oldest first."""
        return iter(list(self._jobs.values()))

    @property
    def inflight(self) -> int:
        """Jobs not yet ended (waiting or on a node)."""
        return len(self._jobs) - len(self._ended)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def waiting_by_pair(self) -> dict[str, int]:
        """Queued jobs per directed language pair ``"src->tgt"`` (pairs with none are absent)."""
        return dict(self._waiting_pairs)

    @property
    def audio_bytes(self) -> int:
        return sum(self._session_audio.values())

    def session_audio_bytes(self, session_id: str) -> int:
        return self._session_audio.get(session_id, 0)

    def inflight_on(self, node_id: str) -> int:
        """Attempts this scheduler has running on the node (its own view of the node's load)."""
        return len(self._by_node.get(node_id, ()))

    def validate(self) -> None:
        """Raise ``AssertionError`` listing every broken invariant (tests call it after each step)."""
        p: list[str] = []
        actual: dict[JobState, int] = dict.fromkeys(JobState, 0)
        for job in self._jobs.values():
            actual[job.state] += 1
        if actual != self._counts:
            p.append(f"state counts {self._counts} != actual {actual}")
        if len(self._by_key) != len(self._jobs) or any(
            self._jobs.get(jid) is None or self._jobs[jid].spec.key != key
            for key, jid in self._by_key.items()
        ):
            p.append("idempotency index out of step with the jobs")
        created = {j.job_id for j in self._jobs.values() if j.state is J.CREATED}
        if set(self._waiting) != created:
            p.append("wait queue differs from the CREATED jobs")
        if len(self._waiting) > self.config.max_pending_jobs:
            p.append("wait queue over its bound")
        by_pair: dict[str, int] = {}
        for jid in self._waiting:
            pair = _pair(self._jobs[jid].spec)
            by_pair[pair] = by_pair.get(pair, 0) + 1
        if by_pair != self._waiting_pairs:
            p.append(f"waiting per pair {self._waiting_pairs} != actual {by_pair}")
        on_node = {(j.node_id, j.job_id) for j in self._jobs.values() if j.state in ON_NODE}
        if {(n, j) for n, js in self._by_node.items() for j in js} != on_node or any(
            not js for js in self._by_node.values()
        ):
            p.append("node index differs from the jobs on nodes")
        if set(self._ended) != {j.job_id for j in self._jobs.values() if j.terminal}:
            p.append("ended-jobs index differs from the terminal jobs")
        if {(s, j) for s, js in self._by_session.items() for j in js} != {
            (j.session_id, j.job_id) for j in self._jobs.values()
        }:
            p.append("session index differs from the jobs")
        refs: dict[tuple[str, int], int] = {}
        sizes: dict[tuple[str, int], int] = {}
        for job in self._jobs.values():
            if job.terminal and (job.audio is not None or job.deadline is not None):
                p.append(f"ended job {job.job_id} still holds audio or a deadline")
            if not job.terminal and (job.audio is None or job.deadline is None):
                p.append(f"live job {job.job_id} lacks audio or a deadline")
            if not 1 <= job.attempt <= self.config.max_attempts:
                p.append(f"job {job.job_id} attempt {job.attempt} outside the budget")
            if job.audio is not None:
                key = (job.session_id, job.utterance_index)
                refs[key] = refs.get(key, 0) + 1
                sizes[key] = len(job.audio)
        if refs != self._audio_refs:
            p.append("audio reference counts out of step")
        per_session: dict[str, int] = {}
        for (sid, _), size in sizes.items():
            per_session[sid] = per_session.get(sid, 0) + size
        if per_session != self._session_audio:
            p.append(f"session audio {self._session_audio} != held {per_session}")
        if p:
            raise AssertionError("; ".join(p))

    # --- internals ------------------------------------------------------------------------------

    def _now(self, now: float | None) -> float:
        return self.clock.monotonic() if now is None else now

    def _get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise SchedulerError(f"unknown job {job_id}", code=ErrorCode.NOT_FOUND)
        return job

    def _fence(self, job_id: str, attempt_id: int | None, node_id: str) -> tuple[Job | None, Verdict | None]:
        """(job, None) when the message is from the current attempt's node, else the verdict."""
        job = self._jobs.get(job_id)
        if job is None:
            return None, Verdict.UNKNOWN
        if node_id != job.node_id or (attempt_id is not None and attempt_id != job.attempt):
            self.stale_messages += 1
            return job, Verdict.STALE
        return job, None

    def _transition(self, job: Job, dst: JobState, reason: str, now: float) -> None:
        """The one place a job changes state; keeps every index in step and records history."""
        src = job.state
        check_transition(job.job_id, src, dst)
        if src in ON_NODE and dst not in ON_NODE:
            assert job.node_id is not None
            on = self._by_node[job.node_id]
            on.discard(job.job_id)
            if not on:
                del self._by_node[job.node_id]
            if dst is J.CREATED:
                job.node_id = None
        elif dst in ON_NODE and src not in ON_NODE:
            assert job.node_id is not None
            self._by_node.setdefault(job.node_id, set()).add(job.job_id)
        if src is J.CREATED and job.job_id in self._waiting:
            del self._waiting[job.job_id]
            pair = _pair(job.spec)
            left = self._waiting_pairs[pair] - 1
            if left:
                self._waiting_pairs[pair] = left
            else:
                del self._waiting_pairs[pair]
        if src is J.CREATED:
            job.queued_at, job.waits_for_slot = None, False
        self._counts[src] -= 1
        self._counts[dst] += 1
        job.state = dst
        job.history.append(HistoryEntry(now, src, dst, reason, job.attempt, job.node_id))
        if dst in TERMINAL:
            job.finished_at = now
            self._disarm(job)
            self._release_audio(job)
            self._ended[job.job_id] = now

    def _start(self, job: Job, reason: str, now: float) -> None:
        if job.deadline_kind is DeadlineKind.ACK:  # no ack was seen: the execution clock starts now
            self._arm(job, DeadlineKind.EXEC, exec_deadline(now, job.spec.audio_ms, self.config))
        job.started_at = now
        self._transition(job, J.RUNNING, reason, now)

    def _end(self, job: Job, state: JobState, code: str | None, message: str, now: float) -> None:
        job.error_code = code
        job.error_message = message
        self._transition(job, state, message if code is None else f"{code}: {message}", now)

    def _enqueue(self, job: Job, now: float, *, front: bool) -> None:
        if len(self._waiting) >= self.config.max_pending_jobs:
            self._end(job, J.FAILED, ErrorCode.NO_AVAILABLE_NODE, "wait queue full", now)
            return
        self._waiting[job.job_id] = None
        job.queued_at = now
        pair = _pair(job.spec)
        self._waiting_pairs[pair] = self._waiting_pairs.get(pair, 0) + 1
        if front:  # a retry has waited once already: it goes before newer work
            self._waiting.move_to_end(job.job_id, last=False)
        self._arm(job, DeadlineKind.WAIT, wait_deadline(now, self.config))

    def _retry_or_end(
        self, job: Job, reason: str, now: float, end: JobState, code: str, message: str, *, cancel: bool
    ) -> Outcome:
        old_node = job.node_id if job.state in ON_NODE else None
        if job.attempt < self.config.max_attempts:
            job.attempt += 1
            self.failovers += 1
            self._transition(job, J.CREATED, f"retry: {reason}", now)
            self._enqueue(job, now, front=True)
        else:
            self._end(job, end, code, f"{message} (after {job.attempt} attempts)", now)
        return Outcome(Verdict.APPLIED, job, cancel_node=old_node if cancel else None, freed_node=old_node)

    def _arm(self, job: Job, kind: DeadlineKind, at: float) -> None:
        self._token += 1
        job.deadline, job.deadline_kind, job.deadline_token = at, kind, self._token
        heapq.heappush(self._deadlines, (at, self._token, job.job_id))
        if len(self._deadlines) > 4 * len(self._jobs) + 1024:
            self._compact_deadlines()

    def _disarm(self, job: Job) -> None:
        job.deadline, job.deadline_kind, job.deadline_token = None, None, -1

    def _compact_deadlines(self) -> None:
        # superseded entries pile up when deadlines move; rebuild from the live ones
        self._deadlines = [
            (j.deadline, j.deadline_token, j.job_id) for j in self._jobs.values() if j.deadline is not None
        ]
        heapq.heapify(self._deadlines)

    def _hold_audio(self, job: Job, audio: bytes) -> bool:
        """Attach the audio; targets of one utterance share it and count once against the session."""
        key = (job.session_id, job.utterance_index)
        if key not in self._audio_refs:
            held = self._session_audio.get(job.session_id, 0)
            if self.session_audio_limit is not None and held + len(audio) > self.session_audio_limit:
                return False
            self._session_audio[job.session_id] = held + len(audio)
            self._audio_refs[key] = 0
        self._audio_refs[key] += 1
        job.audio = audio
        return True

    def _release_audio(self, job: Job) -> None:
        if job.audio is None:
            return
        key = (job.session_id, job.utterance_index)
        self._audio_refs[key] -= 1
        if self._audio_refs[key] == 0:
            del self._audio_refs[key]
            left = self._session_audio[job.session_id] - len(job.audio)
            if left:
                self._session_audio[job.session_id] = left
            else:
                del self._session_audio[job.session_id]
        job.audio = None

    def _evict_oldest(self) -> bool:
        """Make room under ``max_jobs`` by forgetting the oldest ended job early."""
        if not self._ended:
            return False
        self._forget(next(iter(self._ended)))
        return True

    def _forget(self, job_id: str) -> None:
        job = self._jobs.pop(job_id)
        del self._ended[job_id]
        del self._by_key[job.spec.key]
        on = self._by_session[job.session_id]
        on.discard(job_id)
        if not on:
            del self._by_session[job.session_id]
        self._counts[job.state] -= 1
        self.evicted += 1
