"""The scheduler's decisions about sessions, nodes and jobs, as one sans-I/O state machine.

Owns ``SchedulerEngine``: the instance's ``JobStore``, the selector and the unavailable-service
marks, each open session's book (its ``ResultQueue`` -- the one owner of "this session's outstanding
work" -- its routing memory, and its client's view: the client's utterance numbers, its utterance
groups, which utterances asked for no speech), the per-attempt slot bookkeeping (load token, shared
reservation member), the nodes whose reservation was refused, and the per-pair creation counters.
It is fed typed
events (core/events.py) through ``handle_stimulus`` and answers with typed actions (core/actions.py)
that server/runtime.py carries out, in order.

Placement prefers the node of the session's previous job while it is fit (soft affinity: the node
clients keep per-session audio aggregation state); a job continuing a max-duration cut is bound to that
node even at capacity. Two-way sessions go only to nodes serving both directions of (lang_a, lang_b).
Every job ends in a result or an explicit failure the session sees (``error`` + ``ui_event ERROR`` +
``missing_result(job_failed)``), and results reach the session in utterance order. An utterance
gets its jobs only within the tenant's job rate and then its audio-minute quota (the ``Allowance``
the runtime passes in ``UtterancesReady``: the engine spends from that copy, never from the quota
itself); it is then ``AudioAdmitted``, and every job's end is one ``JobEnded`` (the usage meter's,
carried out by the runtime). The integrator's metadata rides the job from ``session_init`` to
``job_assign`` and back on ``translation_result``.

Must never: await, read a clock other than the injected one, touch a socket, ask whether there is a
cluster (shared-store reservations are asked for only after ``SharedSlotsRequired(True)``; a node
owned by another instance is simply addressed to its owner), or log text. Heartbeats do not pass here:
they update the registry directly.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import random
from collections import deque
from typing import Any, Protocol

import msgspec

from lingua_scheduler.clock import Clock
from lingua_scheduler.config import Config
from lingua_scheduler.core import actions as a
from lingua_scheduler.core import events as ev
from lingua_scheduler.core.fanout import Fanout, targets_of
from lingua_scheduler.core.fleet_view import FleetViewPublisher
from lingua_scheduler.core.groups import GroupTracker
from lingua_scheduler.core.jobs import (
    ON_NODE,
    DeadlineKind,
    HistoryEntry,
    Job,
    JobSpec,
    JobState,
    JobStore,
    Outcome,
    Verdict,
)
from lingua_scheduler.core.languages import normalize
from lingua_scheduler.core.quality import Kind, QualityTracker, speech_expected
from lingua_scheduler.core.quota import Allowance
from lingua_scheduler.core.registry import Registry
from lingua_scheduler.core.results import Release, ResultQueue
from lingua_scheduler.core.segmentation import CutReason, Utterance
from lingua_scheduler.core.selection import (
    CAPACITY_EXCEEDED,
    REASONS,
    RESOURCE_THRESHOLD_EXCEEDED,
    SelectionRequest,
    SelectionResult,
    Selector,
)
from lingua_scheduler.core.silence import is_silent_opus
from lingua_scheduler.core.status import NodeStatus
from lingua_scheduler.core.unavailable import UnavailableMarks
from lingua_scheduler.core.usage import Outcome as UsageOutcome
from lingua_scheduler.core.usage import tts_seconds
from lingua_scheduler.errors import ErrorCode, NoAvailableNodeError
from lingua_scheduler.protocol.common import CORE_SERVICE_TYPES, ErrorMessage, ServiceType
from lingua_scheduler.protocol.node import (
    JobAck,
    JobAssign,
    JobCancel,
    JobResult,
    JobStarted,
    NodeAsrPartial,
    PipelineConfig,
)
from lingua_scheduler.protocol.session import (
    AsrPartial,
    MissingReason,
    MissingResult,
    SessionInit,
    TranslationResult,
    UiEvent,
    UiEventStatus,
    UiEventType,
    error_ui_event,
)

log = logging.getLogger(__name__)

EVICT_EVERY = 1.0
#: a reservation outlives the ack deadline by this much (the ack commits it for the execution)
RESERVE_MARGIN_MS = 1000
#: the shared-store bound of a turn continuation's reservation: none in effect. The continuation goes to
#: the node holding the turn's audio even at capacity (as selection binds it); the reservation is still
#: taken, so the other instances count it as load.
BOUND_CONTINUATION_SLOTS = 1 << 30
#: a node whose reservation was refused is left alone this long by this instance
RESERVE_RETRY_S = 0.2
#: distinct language pairs counted in ``created_by_pair``; the rest count under OTHER_PAIR (sessions
#: choose languages, so an unbounded dict would be theirs to grow)
MAX_COUNTED_PAIRS = 256
OTHER_PAIR = "other"
#: most nodes one selection may examine before giving up (a full pair at 50k nodes is ~45k)
SCAN_BUDGET = 2000
#: exclusion reasons that only mean "busy now": a job excluded from a node for them waits for a slot
BUSY_REASONS = (REASONS[CAPACITY_EXCEEDED], REASONS[RESOURCE_THRESHOLD_EXCEEDED])
#: the failover reason (``lingua_failovers_total{reason}``) for each deadline a job can miss
EXPIRY_REASONS: dict[DeadlineKind | None, str] = {
    DeadlineKind.ACK: "ack_timeout",
    DeadlineKind.EXEC: "exec_timeout",
}
#: the node-quality code of each deadline a job can miss
_TIMEOUT_CODES = {DeadlineKind.ACK: "ack_timeout", DeadlineKind.EXEC: "exec_timeout"}
#: lines of a job's story kept by ``story`` (its store history is bounded as well)
STORY_LINES = 64

#: cuts after which the speaker is still talking: the next utterance belongs to the same turn
CONTINUED_CUTS = frozenset({CutReason.MAX_DURATION, CutReason.MAX_BYTES})
TWO_WAY = "two_way_auto"


class TenantJobs(Protocol):
    """The per-tenant job rate (server/auth.py's ``AuthService`` is one): take ``n`` jobs from the
    tenant's bucket, and the refusal a session gets for an utterance over it."""

    def admit_jobs(self, tenant_id: str | None, n: int) -> bool: ...
    def rate_limited(self, tenant_id: str | None, utterance_index: int, shown_index: int) -> ErrorMessage: ...


class InvariantError(AssertionError):
    """``SchedulerEngine.validate`` found its state inconsistent."""


@dataclasses.dataclass(slots=True)
class SessionRoute:
    """A session's routing memory: where its last job went, and the turn its next utterance opens or
    continues."""

    last_node: str | None = None
    #: index of the first utterance of the current turn; None before the first utterance
    turn_start: int | None = None
    #: the last utterance was cut at its maximum duration (the next one continues it)
    continued: bool = False
    #: the node a pairing code bound the session to (tried first), and whether only it may be used
    pinned: str | None = None
    pinned_only: bool = False


@dataclasses.dataclass(slots=True)
class SessionBook:
    """What the engine keeps of an open session: who it is, its results in order, its routing."""

    session_id: str
    tenant_id: str | None
    trace_id: str
    init: SessionInit
    src_lang: str
    targets: tuple[str, ...]
    results: ResultQueue[TranslationResult]
    route: SessionRoute = dataclasses.field(default_factory=SessionRoute)
    #: the client's view (``_for_client``): internal utterance index -> the index the client gave it
    #: (whole utterances it numbered), and the utterances whose pipeline asked for no speech (no audio
    #: to lose); both forgotten once the index is settled
    client_index: dict[int, int] = dataclasses.field(default_factory=dict)
    no_tts: set[int] = dataclasses.field(default_factory=set)
    #: its utterance groups (``group_id``/``part_index`` on results with recognised text)
    groups: GroupTracker | None = None
    #: the session is closing (``SessionClosing``): a delivery may let it finish its close
    closing: bool = False


@dataclasses.dataclass(slots=True)
class Slot:
    """The node slot a job's current attempt holds: its load token and shared reservation member."""

    node_id: str
    token: int | None
    member: str | None


def trigger_flags(reason: CutReason, *, turn_dialect: bool) -> tuple[bool, bool, bool]:
    """(is_pause_triggered, is_timeout_triggered, is_max_duration_triggered) of a cut, per dialect."""
    if turn_dialect:
        return False, reason is CutReason.PAUSE, reason in CONTINUED_CUTS
    return reason.is_pause_triggered, reason.is_timeout_triggered, False


def required_services(pipeline: PipelineConfig | None) -> frozenset[ServiceType]:
    if pipeline is None:
        return CORE_SERVICE_TYPES
    out = set()
    if pipeline.use_asr:
        out.add(ServiceType.ASR)
    if pipeline.use_nmt:
        out.add(ServiceType.NMT)
    if pipeline.use_tts:
        out.add(ServiceType.TTS)
    if pipeline.use_semantic:
        out.add(ServiceType.SEMANTIC)
    return frozenset(out)


class SchedulerEngine:
    def __init__(
        self,
        config: Config,
        clock: Clock,
        *,
        registry: Registry,
        publisher: FleetViewPublisher,
        quality: QualityTracker,
        tenants: TenantJobs,
        rng: random.Random | None = None,
    ) -> None:
        """``registry``/``publisher``: the fleet (read, and its load accounting); ``quality``: the
        node-quality rules judged on outcomes and read by the selector; ``tenants``: the job rates;
        ``rng``: the selector's randomness (seeded in tests)."""
        self.config = config
        self.clock = clock
        self.registry = registry
        self.publisher = publisher
        self.quality = quality
        self.tenants = tenants
        cfg = config
        self.store = JobStore(cfg.jobs, clock, session_audio_limit=cfg.session.max_session_buffer_bytes)
        self.marks = UnavailableMarks(clock, cfg.pools.unavailable_ttl_seconds)
        # The scan budget bounds a failing selection at saturation (every shard of a pair full).
        self.selector = Selector(
            marks=self.marks,
            resource_threshold=cfg.scheduler.resource_threshold,
            scan_budget=SCAN_BUDGET,
            soft_threshold=True,
            quality=quality,
            rng=rng,
        )
        #: session id -> its book; bounded by open sessions (dropped at ``SessionClosed``)
        self.sessions: dict[str, SessionBook] = {}
        #: job id -> perf_counter when its utterance was finalized (dispatch latency); bounded by live jobs
        self._finalized_at: dict[str, float] = {}
        #: job id -> the last selection's dominant exclusion reason (explains NO_AVAILABLE_NODE)
        self._last_reason: dict[str, str] = {}
        #: job id -> the slot of its current attempt
        self._slots: dict[str, Slot] = {}
        #: jobs whose reservation is in flight (only while shared slots are required)
        self._placing: set[str] = set()
        #: nodes whose reservation was just refused (full in the shared count)
        self._reserve_refused: set[str] = set()
        #: placements take a slot in the shared store first (``SharedSlotsRequired``)
        self.shared_slots = False
        #: a graceful shutdown has begun (``DrainBegan``)
        self.draining = False
        self._last_evict = 0.0
        #: jobs created per directed language pair since start (the dashboard's demand per pair)
        self.created_by_pair: dict[str, int] = {}
        #: room members' utterances: which job serves which group, who sees what (core/fanout.py)
        self.fanout = Fanout()
        self._out: list[a.Action] = []

    # --- the one entry ------------------------------------------------------------------------------

    def handle_stimulus(self, *events: ev.Event) -> list[a.Action]:
        """Apply each event in order; return what the runtime must do, in order."""
        for event in events:
            self._handle(event)
        out, self._out = self._out, []
        return out

    def _handle(self, event: ev.Event) -> None:
        match event:
            case ev.UtterancesReady():
                self._submit(event)
            case ev.CancelUtterance(session_id=sid, utterance_index=index, reason=reason):
                for job_id in self.cancellable(sid, index):
                    self._cancel_job(job_id, reason)
            case ev.NodeJobReport(node_id=node_id, message=msg):
                self._node_message(node_id, msg)
            case ev.Tick():
                self._tick()
            case ev.SessionTick(session_id=sid):
                book = self.sessions.get(sid)
                if book is not None:
                    self._deliver(book, book.results.tick())
            case ev.SessionFlush(session_id=sid):
                book = self.sessions.get(sid)
                if book is not None:
                    self._deliver(book, book.results.flush())
            case ev.NodeGone(node_id=node_id):
                for out in self.store.node_lost(node_id):
                    self._apply(out, "node_lost")
                self._pump()
            case ev.SessionOpened():
                self._open(event)
            case ev.PlaybackEnded(session_id=sid, group_id=group_id):
                book = self.sessions.get(sid)
                if book is not None and book.groups is not None:
                    book.groups.playback_ended(group_id, int(self.clock.monotonic() * 1000))
            case ev.SessionClosing(session_id=sid):
                book = self.sessions.get(sid)
                if book is not None:
                    book.closing = True
            case ev.SessionClosed(session_id=sid, reason=reason):
                self.sessions.pop(sid, None)
                for out in self.store.cancel_session(sid, reason):
                    self._apply(out, "session_closed")
                self.fanout.speaker_ended(sid)
                self._emit(a.SessionEnded(sid))
            case ev.CapacityChanged():
                self._pump()
            case ev.SharedSlotsRequired(required=required):
                self.shared_slots = required
            case ev.ReservationAnswered():
                self._reserved(event)
            case ev.ReservationFailed():
                self._reservation_failed(event)
            case ev.RefusedNodeRetry(node_id=node_id):
                self._reserve_refused.discard(node_id)
                self._pump()
            case ev.AssignUndelivered(job_id=job_id, attempt=attempt, node_id=node_id):
                if self._current(job_id, attempt, node_id):
                    self._apply(self.store.failover(job_id, "send failed", cancel=False), "send_failed")
            case ev.RemoteDispatchFailed(job_id=job_id, attempt=attempt, node_id=node_id, reason=reason):
                if self._current(job_id, attempt, node_id):
                    self._apply(self.store.failover(job_id, reason, cancel=False), "send_failed")
            case ev.DrainBegan():
                self.draining = True
            case ev.CancelJob(job_id=job_id, reason=reason):
                self._cancel_job(job_id, reason)
            case ev.FailAll(code=code, message=message):
                for job in self.store.live():
                    out = self.store.abort(job.job_id, code, message)
                    if out.verdict is Verdict.APPLIED:
                        self._apply(out, "shutdown")

    def _emit(self, action: a.Action) -> None:
        self._out.append(action)

    # --- sessions -> jobs -----------------------------------------------------------------------

    def _open(self, e: ev.SessionOpened) -> None:
        self.sessions[e.session_id] = SessionBook(
            e.session_id,
            e.tenant_id,
            e.trace_id,
            e.init,
            e.src_lang,
            e.targets,
            ResultQueue(self.config.session, self.clock, start_index=e.start_index),
            SessionRoute(pinned=e.pinned, pinned_only=e.pinned is not None and e.pinned_only),
            groups=GroupTracker(e.session_id),
        )

    def results_of(self, session_id: str) -> ResultQueue[TranslationResult]:
        """The open session's result queue (read by the session for its timer and its close)."""
        return self.sessions[session_id].results

    def settled(self, session_id: str) -> bool:
        """The session's utterances all have their outcome out and none of its jobs is live."""
        book = self.sessions.get(session_id)
        if book is not None and book.results.outstanding:
            return False
        return not any(not j.terminal for j in self.store.jobs_of(session_id))

    def _submit(self, e: ev.UtterancesReady) -> None:
        """Create the jobs of finalized utterances (one per target language) and try to place them."""
        book = self.sessions.get(e.session_id)
        if book is None or not e.utterances:
            return
        now = e.received_at
        init = book.init
        jobs_cfg = self.config.jobs
        streaming = (
            jobs_cfg.streaming_asr_default if init.enable_streaming_asr is None else init.enable_streaming_asr
        )
        route = book.route
        results = book.results
        quota = e.quota
        no_tts = e.pipeline is not None and not e.pipeline.use_tts
        for utt in e.utterances:
            # the client's view of it, before anything is sent about it
            if utt.client_index is not None:
                book.client_index[utt.index] = utt.client_index
            if no_tts:
                book.no_tts.add(utt.index)
            if utt.dropped_chunks or not results.has_room:
                # A stream with a hole is not spliced, and finished work is never dropped to make
                # room: the utterance is refused, at once, and gets no job.
                reason = MissingReason.RATE_LIMITED if utt.dropped_chunks else MissingReason.QUEUE_FULL
                self._refuse(book, utt.index, reason, utt)
                route.continued = False
                continue
            if route.turn_start is None or not route.continued:
                route.turn_start = utt.index
            continues, route.continued = route.continued, utt.reason in CONTINUED_CUTS
            if not continues and not route.continued and _silent(utt):
                # No speech to recognise: a job would only hold a node (and the session's next
                # sentence behind it) for nothing. Part of a max-duration chain it still goes, since
                # the node holding the turn waits for its last piece.
                results.expect(utt.index, [])
                self._emit(a.Count("silent_utterances"))
                self._deliver(book, results.silence(utt.index))
                continue
            turn_id = f"{book.session_id}:{route.turn_start}"
            job_ids: list[str] = []
            failed: list[Job] = []
            targets = [e.tgt_lang] if e.tgt_lang else list(book.targets)
            own_target = targets[0]
            plan = None
            if e.room is not None:  # a room member: one job per language of the others
                plan, targets = targets_of(e.room, src_lang=e.src_lang or book.src_lang, tgt_lang=own_target)
            created: list[tuple[str, str]] = []
            # Per-tenant job rate: an utterance over it gets no job, only the error below (every
            # fan-out job counts). The rate decides first: an utterance it refuses is neither metered
            # nor spent from the quota.
            limited = not self.tenants.admit_jobs(book.tenant_id, len(targets))
            src = e.src_lang or book.src_lang
            refusal = None if limited else self._over_quota(quota, utt)
            if not limited and refusal is None:
                seconds = utt.duration_ms / 1000
                if quota is not None:
                    quota = quota.spent(seconds)
                self._emit(
                    a.AudioAdmitted(book.session_id, book.tenant_id, src, own_target, utt.index, seconds)
                )
            for tgt in [] if limited or refusal is not None else targets:
                spec = JobSpec.from_utterance(
                    utt,
                    session_id=book.session_id,
                    src_lang=src,
                    tgt_lang=tgt,
                    trace_id=book.trace_id,
                )
                spec = dataclasses.replace(
                    spec,
                    tenant_id=book.tenant_id,
                    dialect=init.dialect,
                    features=init.features,
                    pipeline=e.pipeline,
                    mode=init.mode,
                    lang_a=init.lang_a,
                    lang_b=init.lang_b,
                    auto_langs=tuple(init.auto_langs) if init.auto_langs else None,
                    enable_streaming_asr=streaming,
                    partial_update_interval_ms=(
                        (init.partial_update_interval_ms or jobs_cfg.partial_update_interval_ms)
                        if streaming
                        else None
                    ),
                    turn_id=turn_id,
                    continues_turn=continues,
                    metadata=init.metadata,
                )
                try:
                    out = self.store.create(spec, utt.audio)
                except NoAvailableNodeError as exc:
                    log.warning(
                        "job refused",
                        extra={
                            "session_id": book.session_id,
                            "trace_id": book.trace_id,
                            "reason": exc.message,
                        },
                    )
                    continue
                if out.verdict is Verdict.DUPLICATE or out.job is None:
                    continue
                job_ids.append(out.job.job_id)
                created.append((tgt, out.job.job_id))
                if now is not None:
                    self._finalized_at[out.job.job_id] = now
                self._count_created(spec.src_lang, spec.tgt_lang)
                if out.job.state is JobState.FAILED:
                    failed.append(out.job)
            if plan is not None and created:
                client_index = utt.index if utt.client_index is None else utt.client_index
                self.fanout.created(
                    plan, client_index, created, own_target, transcript_only=own_target not in targets
                )
                self._emit(a.FanoutCreated(len(created)))
            results.expect(utt.index, job_ids)
            if not job_ids:
                self._deliver(book, results.fail(utt.index))
                self._send(
                    book.session_id,
                    refusal
                    if refusal is not None
                    else self.tenants.rate_limited(
                        book.tenant_id,
                        utt.index,
                        utt.index if utt.client_index is None else utt.client_index,
                    )
                    if limited
                    else ErrorMessage(
                        code=ErrorCode.NO_AVAILABLE_NODE.value,
                        message="the scheduler cannot take more jobs right now",
                    ),
                )
            for job in failed:
                self._report_failure(job)
        self._pump()

    @staticmethod
    def _over_quota(quota: Allowance | None, utt: Utterance) -> ErrorMessage | None:
        """The ``QUOTA_EXCEEDED`` refusal of an utterance its tenant's quota has no room for (with the
        period and its reset time), or None."""
        if quota is None:
            return None
        decision = quota.check(utt.duration_ms / 1000)
        if decision.allowed:
            return None
        err = decision.error(quota.tenant_id)
        return ErrorMessage(
            code=err.code.value,
            message=err.message,
            details={**(err.details or {}), "utterance_index": utt.index},
        )

    def _refuse(self, book: SessionBook, index: int, reason: MissingReason, utt: Utterance) -> None:
        """Utterance ``index`` gets no job: answered at once with ``missing_result(reason)``."""
        book.results.refuse(index)
        self._emit(a.Count("refused_utterances", reason.value))
        self._send(
            book.session_id,
            MissingResult(
                session_id=book.session_id,
                utterance_index=index,
                reason=reason,
                created_at_ms=self.clock.wall_ms(),
                trace_id=book.trace_id,
                dropped_seqs=list(utt.dropped_seqs) if utt.dropped_chunks else None,
                dropped_chunks=utt.dropped_chunks if utt.dropped_chunks else None,
            ),
        )

    def _count_created(self, src: str, tgt: str) -> None:
        self._emit(a.Count("jobs_created"))
        pair = f"{src}->{tgt}"
        counts = self.created_by_pair
        if pair not in counts and len(counts) >= MAX_COUNTED_PAIRS:
            pair = OTHER_PAIR
        counts[pair] = counts.get(pair, 0) + 1

    # --- placement ------------------------------------------------------------------------------

    def _pump(self) -> None:
        """Place every waiting job that has a node now. Jobs with none keep waiting (bounded).

        A pass places at most the oldest waiting job of each stream; once it has left the queue the
        stream's next job is the one to place, so passes repeat while they place jobs (a backlog of
        one session drains in one call, not one job per call)."""
        if not self.store.waiting:
            return
        #: requests that found nothing -> whether a busy node could take them: nothing frees capacity
        #: during the call, so do not repeat them
        hopeless: dict[tuple[object, ...], bool] = {}
        while self._place_pass(hopeless) and self.store.waiting:
            pass
        self._emit(a.WakeTimer())

    def _place_pass(self, hopeless: dict[tuple[object, ...], bool]) -> bool:
        """One pass of ``_pump`` over the heads of the streams; True if it dispatched a job here."""
        view = self.publisher.view
        clock = self.clock
        placed = False
        for job in self.store.dispatchable():
            if job.job_id in self._placing:
                continue
            spec = job.spec
            book = self.sessions.get(spec.session_id)
            route = book.route if book is not None else None
            last_node = route.last_node if route is not None else None
            # A paired session's node comes first (a max-duration chain stays where its turn is).
            pinned = route.pinned if route is not None else None
            preferred = last_node if spec.continues_turn and last_node else (pinned or last_node)
            only = pinned is not None and route is not None and route.pinned_only and preferred == pinned
            # Without fallback the routing key decides the one pool tried, so it is part of the request.
            routing = spec.tenant_id if self.config.pools.fallback else (spec.tenant_id or spec.session_id)
            key = (
                spec.src_lang,
                spec.tgt_lang,
                spec.pipeline,
                spec.features,
                routing,
                tuple(job.tried_nodes),
                last_node,
                spec.continues_turn,
                spec.mode,
                spec.lang_a,
                spec.lang_b,
                preferred,
                only,
            )
            if key in hopeless:
                self.store.hold(job.job_id, busy=hopeless[key])
                continue
            src, tgt = spec.src_lang, spec.tgt_lang
            also: tuple[tuple[str, str], ...] = ()
            if spec.mode == TWO_WAY and spec.lang_a and spec.lang_b:
                # The node picks the direction per utterance: it must serve both.
                src, tgt = normalize(spec.lang_a), normalize(spec.lang_b)
                also = ((tgt, src),)
            req = SelectionRequest(
                src_lang=src,
                tgt_lang=tgt,
                required=required_services(spec.pipeline),
                features=spec.features.enabled() if spec.features else frozenset(),
                routing_key=spec.tenant_id or spec.session_id,
                tenant_id=spec.tenant_id,
                preferred_node=preferred,
                bind_preferred=spec.continues_turn,
                preferred_only=only,
                also_serves=also,
                exclude=frozenset(job.tried_nodes) | self._reserve_refused,
                refused=frozenset(self._reserve_refused.difference(job.tried_nodes)),
            )
            t0 = clock.monotonic()
            result = self.selector.select(view, req)
            self._emit(a.Observe("selection_seconds", clock.monotonic() - t0))
            node_id = result.node_id
            entry = self.registry.nodes.get(node_id) if node_id is not None else None
            if node_id is None or entry is None or not (entry.owner is not None or entry.connected):
                self._emit(a.Count("selections", "no_node"))
                self._last_reason[job.job_id] = result.best_reason
                busy = node_id is None and _busy(req, result)
                hopeless[key] = busy
                self.store.hold(job.job_id, busy=busy)
                continue
            self._emit(a.Count("selections", "ok"))
            if self.shared_slots:
                # Another instance may place work on the same node: take a slot in the shared store first.
                self._placing.add(job.job_id)
                slots = entry.max_concurrent_jobs or self.config.scheduler.max_concurrent_jobs_per_node
                if spec.continues_turn and node_id == preferred:
                    slots = BOUND_CONTINUATION_SLOTS
                self._emit(
                    a.Reserve(
                        job.job_id,
                        job.attempt,
                        node_id,
                        f"{job.job_id}:{job.attempt}",
                        slots,
                        self.config.jobs.ack_timeout_ms + RESERVE_MARGIN_MS,
                    )
                )
            else:
                self._send_assign(job, node_id, None)
                placed = True
        return placed

    def _reserved(self, e: ev.ReservationAnswered) -> None:
        self._placing.discard(e.job_id)
        job = self.store.get(e.job_id)
        entry = self.registry.nodes.get(e.node_id)
        if job is None or job.state is not JobState.CREATED or job.attempt != e.attempt or entry is None:
            if e.ok:
                self._emit(a.ReleaseSlot(e.node_id, e.member))
            self._pump()
            return
        if not e.ok:
            # Our view of the node's load was behind the shared count: leave the node alone briefly.
            log.info(
                "reservation refused", extra={"job_id": e.job_id, "node_id": e.node_id, "reason": e.reason}
            )
            self._last_reason[e.job_id] = f"reservation {e.reason.lower()}"
            self._reserve_refused.add(e.node_id)
            self._emit(a.ArmTimer(RESERVE_RETRY_S, ev.RefusedNodeRetry(e.node_id)))
            self._pump()
            return
        self._send_assign(job, e.node_id, e.member)
        self._pump()  # the next job of the same stream was waiting for this one to leave the queue

    def _reservation_failed(self, e: ev.ReservationFailed) -> None:
        """No answer from the store: degraded, local nodes are dispatched without reservations (the
        runtime says so with ``SharedSlotsRequired``); else the job is tried again. An unexpected
        failure fails the job explicitly rather than leaving it marked as being placed."""
        self._placing.discard(e.job_id)
        if e.broken:
            job = self.store.get(e.job_id)
            if job is not None and job.attempt == e.attempt:
                self._apply(
                    self.store.abort(e.job_id, ErrorCode.INTERNAL_ERROR.value, "the job could not be placed"),
                    "placement_failed",
                )
        self._pump()

    def _send_assign(self, job: Job, node_id: str, member: str | None) -> None:
        """Record the dispatch and write ``job_assign`` to the node (or hand it to its owner)."""
        entry = self.registry.nodes[node_id]
        self.store.dispatch(job.job_id, node_id, acks=entry.sends_acks)
        self._slots[job.job_id] = Slot(node_id, entry.load.dispatched(), member)
        if not entry.sends_acks:
            self._commit_slot(job)  # no ack will commit the reservation: the job runs from now on
        self._record(job)
        self._follow(job.session_id, node_id)
        on_sent: list[a.Action] = []
        started = self._finalized_at.pop(job.job_id, None)
        if started is not None:
            on_sent.append(a.ObserveDispatch(started))
            if self.fanout.assigned(job.job_id):  # the utterance's last group has its job_assign
                on_sent.append(a.ObserveFanout(started))
        if job.session_id in self.sessions and self.fanout.speaker_sees(job.job_id):
            book = self.sessions[job.session_id]
            ui = self._for_client(book, self._ui(job, UiEventType.DISPATCHED))
            on_sent.append(a.SendToSession(job.session_id, ui))
        assign = self._assign(job, turn_dialect=entry.turn_dialect)
        self._emit(a.AssignJob(node_id, entry.owner, assign, tuple(on_sent)))

    def _current(self, job_id: str, attempt: int, node_id: str) -> bool:
        """The attempt is the job's current one, dispatched to ``node_id`` and not yet acknowledged."""
        job = self.store.get(job_id)
        return (
            job is not None
            and job.attempt == attempt
            and job.node_id == node_id
            and job.state is JobState.DISPATCHED
        )

    def _follow(self, session_id: str, node_id: str) -> None:
        """Remember where the session's job went (affinity for its next one) and count hit or move."""
        book = self.sessions.get(session_id)
        if book is None:
            return
        route = book.route
        if route.last_node is not None:
            self._emit(a.Count("affinity", "hit" if route.last_node == node_id else "moved"))
        route.last_node = node_id

    def _assign(self, job: Job, *, turn_dialect: bool = False) -> JobAssign:
        """``job_assign`` in the dialect the node reads. The turn dialect carries ``turn_id`` and
        ``is_max_duration_triggered`` and reports a pause as ``is_timeout_triggered`` (that node
        ignores ``is_pause_triggered`` and would keep buffering); the older one reports a max-duration
        cut as ``is_timeout_triggered``."""
        spec = job.spec
        reason = spec.cut_reason
        pause, timeout, max_duration = trigger_flags(reason, turn_dialect=turn_dialect)
        return JobAssign(
            job_id=job.job_id,
            attempt_id=job.attempt,
            session_id=spec.session_id,
            utterance_index=spec.utterance_index,
            src_lang=spec.src_lang,
            tgt_lang=spec.tgt_lang,
            pipeline=spec.pipeline or PipelineConfig(),
            audio=base64.b64encode(job.audio or b"").decode("ascii"),
            audio_format=spec.audio_format,
            sample_rate=spec.sample_rate,
            trace_id=spec.trace_id,
            dialect=spec.dialect,
            features=spec.features,
            mode=spec.mode,
            lang_a=spec.lang_a,
            lang_b=spec.lang_b,
            auto_langs=list(spec.auto_langs) if spec.auto_langs else None,
            enable_streaming_asr=spec.enable_streaming_asr,
            partial_update_interval_ms=spec.partial_update_interval_ms,
            turn_id=spec.turn_id if turn_dialect else None,
            metadata=spec.metadata,
            is_manual_cut=reason.is_manual_cut,
            is_pause_triggered=pause,
            is_timeout_triggered=timeout,
            is_max_duration_triggered=max_duration,
        )

    # --- node messages --------------------------------------------------------------------------

    def _node_message(self, node_id: str, msg: ev.JobMessage) -> None:
        """A job message from a node whose binding the endpoint already checked (or, forwarded by the
        node's instance, from a node connected there)."""
        store = self.store
        if store.get(msg.job_id) is None:
            # Not a job of ours: the job's owner decides (embedded, nobody: the message is dropped).
            if isinstance(msg, JobResult):
                self._mark_unavailable(node_id, msg)
                self._phantom_ended(node_id)
            self._emit(a.ForwardToOwner(node_id, msg))
            return
        if isinstance(msg, JobAck):
            out = store.on_ack(msg.job_id, msg.attempt_id, node_id)
            if out.verdict is Verdict.APPLIED and out.job is not None:
                self._send_job(out.job, self._ui(out.job, UiEventType.NODE_ACCEPTED))
                self._commit_slot(out.job)
        elif isinstance(msg, JobStarted):
            out = store.on_started(msg.job_id, msg.attempt_id, node_id)
        elif isinstance(msg, NodeAsrPartial):
            out = store.on_partial(msg.job_id, msg.attempt_id, node_id)
            if out.verdict is Verdict.APPLIED and out.job is not None:
                job = out.job
                self._send_job(
                    job,
                    AsrPartial(
                        session_id=job.session_id,
                        utterance_index=job.utterance_index,
                        job_id=job.job_id,
                        text=msg.text,
                        is_final=msg.is_final,
                        trace_id=job.spec.trace_id,
                    ),
                )
                self._send_job(job, self._ui(job, UiEventType.ASR_PARTIAL))
        else:
            out = self._on_result(node_id, msg)
        if out.verdict is Verdict.APPLIED and out.job is not None:
            self._record(out.job)
        if out.verdict is Verdict.STALE:
            self._emit(a.Count("stale_messages"))
            log.info("stale job message dropped", extra={"node_id": node_id, "job_id": msg.job_id})
        if isinstance(msg, JobResult) and (
            out.verdict in (Verdict.STALE, Verdict.UNKNOWN) or out.early_node is not None
        ):
            self._phantom_ended(node_id)

    def _phantom_ended(self, node_id: str) -> None:
        """The node finished a job we do not follow (an attempt abandoned when its connection dropped
        or its deadline passed, or another instance's): its last report counted it as running, so that
        figure is one too high until the next heartbeat -- up to an interval of phantom load otherwise."""
        entry = self.registry.nodes.get(node_id)
        if entry is not None and entry.owner is None:
            entry.load.report_ended()
            self._slot_freed()

    def _mark_unavailable(self, node_id: str, msg: JobResult) -> None:
        """A node saying it lacks a service is left out for that service a while (any job's result)."""
        error = msg.error
        if (
            error is not None
            and error.code == ErrorCode.MODEL_NOT_AVAILABLE
            and isinstance(error.details, dict)
        ):
            service = error.details.get("service_id") or error.details.get("model_id")
            if isinstance(service, str):
                self.marks.mark(node_id, service)

    def _on_result(self, node_id: str, msg: JobResult) -> Outcome:
        error = msg.error
        self._mark_unavailable(node_id, msg)
        out = self.store.on_result(
            msg.job_id,
            msg.attempt_id,
            node_id,
            success=msg.success,
            error_code=error.code if error else None,
            error_message=error.message if error else None,
        )
        if out.verdict is not Verdict.APPLIED or out.job is None:
            return out
        job = out.job
        self._judge_result(node_id, msg, out, job)
        if job.state is JobState.COMPLETED:
            if out.early_node is not None:
                self._emit(a.Count("early_results"))
                log.info(
                    "result of an earlier attempt delivered",
                    extra={"job_id": job.job_id, "node_id": node_id, "attempt": job.won_attempt},
                )
            self._release(out)
            # usage: before the delivery, which may end the session (its session.ended counts this job)
            self._ended(job, "completed", msg)
            # Only a failure explains itself with it; a result held back for ordering may never be
            # delivered (its session may go first), so it is dropped here, not on delivery.
            self._last_reason.pop(job.job_id, None)
            book = self.sessions.get(job.session_id)
            if book is not None:
                payload = self._translation(job, msg)
                silent = not (msg.text_asr or msg.text_translated or msg.tts_audio)
                self._deliver(
                    book,
                    book.results.offer(
                        job.utterance_index, job.job_id, job.won_attempt, payload, silent=silent
                    ),
                )
            self._emit(a.Count("jobs", "completed"))
        else:
            self._apply(out, "node_error")
        return out

    def _translation(self, job: Job, msg: JobResult) -> TranslationResult:
        return TranslationResult(
            session_id=job.session_id,
            utterance_index=job.utterance_index,
            job_id=job.job_id,
            text_asr=msg.text_asr or "",
            text_translated=msg.text_translated or "",
            tts_audio=msg.tts_audio or "",
            tts_format=msg.tts_format or "pcm16",
            audio_lost=False,
            trace_id=job.spec.trace_id,
            late=False,
            extra=msg.extra,
            group_id=msg.group_id,
            part_index=msg.part_index,
            service_timings=msg.extra.service_timings if msg.extra else None,
            scheduler_sent_at_ms=self.clock.wall_ms(),
            asr_quality_level=msg.asr_quality_level,
            reason_codes=msg.reason_codes,
            quality_score=msg.quality_score,
            rerun_count=msg.rerun_count,
            segments_meta=msg.segments_meta,
            metadata=job.spec.metadata,
        )

    # --- node quality -------------------------------------------------------------------------------

    def _judge_result(self, node_id: str, msg: JobResult, out: Outcome, job: Job) -> None:
        """A ``job_result`` the store applied: a success (empty or not) of its node, or its failure."""
        if msg.success:
            if job.state is not JobState.COMPLETED:
                return
            latency = None
            if out.early_node is None and job.dispatched_at is not None and job.finished_at is not None:
                latency = (job.finished_at - job.dispatched_at) * 1000.0
            empty = not msg.text_asr and speech_expected(job.spec)
            self._judge(node_id, Kind.EMPTY if empty else Kind.SUCCESS, latency_ms=latency)
        else:
            code = msg.error.code if msg.error is not None else ErrorCode.INTERNAL_ERROR.value
            self._judge(node_id, Kind.FAILURE, code=code)

    def _judge(
        self, node_id: str, kind: Kind, *, latency_ms: float | None = None, code: str | None = None
    ) -> None:
        counts = self.registry.counts()
        fleet = sum(n for s, n in counts.items() if s is not NodeStatus.OFFLINE)
        changes = self.quality.record(node_id, kind, fleet_size=fleet, latency_ms=latency_ms, code=code)
        if changes:
            self._emit(a.QualityChanged(tuple(changes)))

    # --- outcomes ---------------------------------------------------------------------------------

    def _apply(self, out: Outcome, why: str) -> None:
        """Carry out what an outcome asks: free load, cancel on the old node, report or re-place."""
        job = out.job
        if out.verdict is not Verdict.APPLIED or job is None:
            return
        # node quality: only an expired ack or execution deadline judges the attempt's node
        code = _TIMEOUT_CODES.get(out.expired) if out.expired is not None else None
        if code is not None and out.freed_node is not None:
            self._judge(out.freed_node, Kind.TIMEOUT, code=code)
        self._release(out)
        if job.state is JobState.CREATED:
            self._emit(a.Count("failovers", why))
            old_node = out.freed_node or out.cancel_node
            log.info(
                "job failover",
                extra={
                    "job_id": job.job_id,
                    "session_id": job.session_id,
                    "trace_id": job.spec.trace_id,
                    "node_id": old_node,
                    "attempt": job.attempt,
                    "reason": why,
                },
            )
            self._emit(
                a.RecordEvent(
                    "failover",
                    (
                        ("job_id", job.job_id),
                        ("session_id", job.session_id),
                        ("node_id", old_node),
                        ("attempt", job.attempt),
                        ("reason", why),
                    ),
                )
            )
        elif job.state in (JobState.FAILED, JobState.TIMED_OUT):
            self._report_failure(job)
        elif job.state is JobState.CANCELLED:
            self._emit(a.Count("jobs", "cancelled"))
            self._forget(job)
            self._ended(job, "cancelled")

    def _release(self, out: Outcome) -> None:
        job = out.job
        if job is None:
            return
        nodes = self.registry.nodes
        self._record(job)
        if out.freed_node is not None:
            slot = self._slots.pop(job.job_id, None) or Slot(out.freed_node, None, None)
            if (entry := nodes.get(out.freed_node)) is not None:
                entry.load.finished(slot.token if slot.node_id == out.freed_node else None)
            if slot.member is not None:
                self._emit(a.ReleaseSlot(out.freed_node, slot.member))
            self._slot_freed()
        if out.cancel_node is not None:
            cancel = JobCancel(
                job_id=job.job_id,
                trace_id=job.spec.trace_id,
                reason="failover" if not job.terminal else "cancelled",
            )
            self._emit(a.SendToNode(out.cancel_node, cancel))

    def _record(self, job: Job) -> None:
        self._emit(
            a.RecordJob(job.job_id, job.state.value, job.attempt, job.node_id, job.session_id, job.terminal)
        )

    def _slot_freed(self) -> None:
        """A node has a slot free again: waiting jobs get it at the timer's next turn (one pump for
        all the slots freed in one loop turn), not at its next deadline or 1 s tick."""
        if self.store.waiting:
            self._emit(a.WakeTimer())

    def _commit_slot(self, job: Job) -> None:
        slot = self._slots.get(job.job_id)
        if slot is None or slot.member is None:
            return
        self._emit(
            a.CommitSlot(slot.node_id, slot.member, self.config.jobs.exec_timeout_max_ms + RESERVE_MARGIN_MS)
        )

    def held_reservations(self) -> dict[str, list[tuple[str, int]]]:
        """Node id -> (member, ttl ms) of every attempt of this instance on a node now: what the
        shared reservation sets must hold for it (re-synced after the store was unreachable). An
        attempt dispatched without a reservation meanwhile gets its member now, so its end releases
        it and other instances count its slot."""
        jobs = self.config.jobs
        out: dict[str, list[tuple[str, int]]] = {}
        for job_id, slot in self._slots.items():
            job = self.store.get(job_id)
            if job is None or job.terminal or job.node_id != slot.node_id:
                continue
            if slot.member is None:
                slot.member = f"{job_id}:{job.attempt}"
            acked = job.state is not JobState.DISPATCHED
            ttl = (jobs.exec_timeout_max_ms if acked else jobs.ack_timeout_ms) + RESERVE_MARGIN_MS
            out.setdefault(slot.node_id, []).append((slot.member, ttl))
        return out

    def _report_failure(self, job: Job) -> None:
        self._emit(a.Count("jobs", job.state.value))
        code = job.error_code or ErrorCode.INTERNAL_ERROR.value
        message = job.error_message or "the job failed"
        if code == ErrorCode.NO_AVAILABLE_NODE and job.job_id in self._last_reason:
            message = f"{message} (most nodes excluded by: {self._last_reason[job.job_id]})"
        log.info(
            "job failed",
            extra={
                "job_id": job.job_id,
                "session_id": job.session_id,
                "trace_id": job.spec.trace_id,
                "node_id": job.node_id,
                "code": code,
            },
        )
        self._emit(
            a.RecordEvent(
                "job_failed",
                (
                    ("job_id", job.job_id),
                    ("session_id", job.session_id),
                    ("node_id", job.node_id),
                    ("state", job.state.value),
                    ("code", code),
                ),
            )
        )
        book = self.sessions.get(job.session_id)
        self._forget(job)
        self._ended(job, "timed_out" if job.state is JobState.TIMED_OUT else "failed")
        if book is None:
            return
        if not self.fanout.speaker_sees(job.job_id):  # another room member's job: its missing_result says it
            self._deliver(book, book.results.fail(job.utterance_index, job.job_id))
            return
        details: dict[str, object] = {"job_id": job.job_id, "utterance_index": job.utterance_index}
        self._send(job.session_id, ErrorMessage(code=code, message=message, details=details))
        self._send(
            job.session_id,
            error_ui_event(
                code,
                trace_id=job.spec.trace_id,
                session_id=job.session_id,
                job_id=job.job_id,
                utterance_index=job.utterance_index,
                elapsed_ms=self._elapsed_ms(job),
            ),
        )
        self._deliver(book, book.results.fail(job.utterance_index, job.job_id))

    def _ended(self, job: Job, outcome: UsageOutcome, result: JobResult | None = None) -> None:
        """``JobEnded`` for the usage meter: a completed job's source audio and speech, a failure's
        code and message."""
        spec = job.spec
        done = result is not None
        self._emit(
            a.JobEnded(
                job.job_id,
                job.session_id,
                spec.tenant_id,
                spec.src_lang,
                spec.tgt_lang,
                spec.utterance_index,
                outcome,
                audio_seconds=spec.audio_ms / 1000 if done else 0.0,
                tts_seconds=tts_seconds(result.tts_audio, result.tts_format) if result is not None else 0.0,
                metadata=spec.metadata,
                code=job.error_code if not done else None,
                message=job.error_message if not done else None,
            )
        )

    def _forget(self, job: Job) -> None:
        self._finalized_at.pop(job.job_id, None)
        self._slots.pop(job.job_id, None)
        self._last_reason.pop(job.job_id, None)

    def _deliver(self, book: SessionBook, releases: list[Release[TranslationResult]]) -> None:
        """Send released results in order; report end-to-end latency; let a closing session finish."""
        clock = self.clock
        sid = book.session_id
        for rel in releases:
            reason, payload = rel.missing_reason, rel.payload
            if reason is None and payload is not None:
                job = self.store.get(payload.job_id)
                if job is not None:
                    # another room member's job: its progress is not the speaker's
                    sees = self.fanout.speaker_sees(job.job_id)
                    if payload.text_asr and sees:
                        self._send(sid, self._ui(job, UiEventType.ASR_FINAL))
                    if payload.text_translated and sees:
                        self._send(sid, self._ui(job, UiEventType.NMT_DONE))
                    self._emit(a.Observe("job_end_to_end", max(0.0, clock.monotonic() - job.created_at)))
                    self._forget(job)
                if rel.late:  # its index was given up (gap_timeout) before it came: delivered anyway
                    self._emit(a.Count("late_results"))
                    payload = msgspec.structs.replace(payload, late=True)
                self._send_release(sid, rel.job_id, payload)
            else:
                missing = MissingResult(
                    session_id=sid,
                    utterance_index=rel.index,
                    reason=reason or MissingReason.SILENCE_DETECTED,
                    created_at_ms=clock.wall_ms(),
                    trace_id=book.trace_id,
                )
                self._send_release(sid, rel.job_id, missing)
        self._forget_released(book)
        self._emit(a.SessionDelivered(sid, closing=book.closing))

    def _send_release(
        self, session_id: str, job_id: str | None, msg: TranslationResult | MissingResult
    ) -> None:
        """A released outcome: to the speaker, and (a room's fan-out) to the job's language groups."""
        delivery = self.fanout.deliver(job_id, msg)
        if delivery.speaker is not None:
            self._send(session_id, delivery.speaker)
        if delivery.plan is not None:
            for group, message in delivery.groups:
                self._emit(a.SendToRoomGroup(delivery.plan, group, message))

    def _send(self, session_id: str, msg: a.SessionOutput) -> None:
        book = self.sessions.get(session_id)
        if book is not None:
            self._emit(a.SendToSession(session_id, self._for_client(book, msg)))

    def _for_client(self, book: SessionBook, msg: a.SessionOutput) -> a.SessionOutput:
        """The message as the session's client sees it: its own utterance numbers (whole utterances it
        numbered), utterance groups on results with recognised text, ``audio_lost`` on a translation
        whose speech did not come (unless its pipeline asked for none)."""
        client_index = book.client_index
        if isinstance(msg, TranslationResult):
            changes: dict[str, Any] = {}
            if msg.text_asr and msg.group_id is None and book.groups is not None:
                changes["group_id"], changes["part_index"] = book.groups.part(
                    int(self.clock.monotonic() * 1000),
                    self.clock.wall_ms(),  # the id carries a timestamp
                )
            if msg.text_translated and not msg.tts_audio and msg.utterance_index not in book.no_tts:
                changes["audio_lost"] = True
            if msg.utterance_index in client_index:
                changes["utterance_index"] = client_index[msg.utterance_index]
            return msgspec.structs.replace(msg, **changes) if changes else msg
        if isinstance(msg, ErrorMessage):
            if isinstance(msg.details, dict):
                index = msg.details.get("utterance_index")
                if isinstance(index, int) and index in client_index:
                    details = {**msg.details, "utterance_index": client_index[index]}
                    return msgspec.structs.replace(msg, details=details)
            return msg
        index = getattr(msg, "utterance_index", None)
        if isinstance(index, int) and index in client_index:
            return msgspec.structs.replace(msg, utterance_index=client_index[index])
        return msg

    @staticmethod
    def _forget_released(book: SessionBook) -> None:
        """Drop the client-view facts of settled indices (bounds both maps); those of an index given up
        are kept for its late result. After a whole delivery: one result may release several indices,
        whose messages all need the facts until then."""
        if not (book.client_index or book.no_tts):
            return
        settled = book.results.oldest_unsettled
        for index in [i for i in book.client_index if i < settled]:
            del book.client_index[index]
        for index in [i for i in book.no_tts if i < settled]:
            book.no_tts.discard(index)

    def client_index(self, session_id: str, internal: int) -> int:
        """The client's number of the session's utterance ``internal`` (its own when it gave none)."""
        book = self.sessions.get(session_id)
        return internal if book is None else book.client_index.get(internal, internal)

    def internal_index(self, session_id: str, client: int) -> int:
        """Our index of the utterance the session's client numbered ``client`` (the same if none)."""
        book = self.sessions.get(session_id)
        if book is None:
            return client
        return next((i for i, c in book.client_index.items() if c == client), client)

    def outstanding(self, session_id: str, end: int) -> list[tuple[int, int]]:
        """(internal index, the client's index) of the session's utterances whose outcome is not out
        yet: those its result queue holds, and those it will number up to ``end`` (exclusive)."""
        book = self.sessions[session_id]
        queued = book.results.outstanding_indices()  # refused indices were answered already
        later = range(book.results.next_expected, end)
        return [(i, book.client_index.get(i, i)) for i in [*queued, *later]]

    def _send_job(self, job: Job, msg: a.SessionOutput) -> None:
        """Progress of ``job`` for its session: not for a room member's job serving only the others."""
        if self.fanout.speaker_sees(job.job_id):
            self._send(job.session_id, msg)

    def _ui(self, job: Job, event: UiEventType) -> UiEvent:
        return UiEvent(
            trace_id=job.spec.trace_id,
            session_id=job.session_id,
            job_id=job.job_id,
            utterance_index=job.utterance_index,
            event=event,
            status=UiEventStatus.OK,
            elapsed_ms=self._elapsed_ms(job),
        )

    def _elapsed_ms(self, job: Job) -> int:
        return int((self.clock.monotonic() - job.created_at) * 1000)

    # --- lifecycle ------------------------------------------------------------------------------

    def _cancel_job(self, job_id: str, reason: str) -> None:
        """Cancel one job (operator action): the node gets ``job_cancel`` and its load back, the session
        an ``error`` (JOB_CANCELLED) and ``missing_result(job_failed)`` for the utterance, so its result
        queue moves on. No such job, or one already ended, changes nothing."""
        out = self.store.cancel(job_id, reason)
        job = out.job
        if out.verdict is not Verdict.APPLIED or job is None:
            return
        self._apply(out, "cancelled")
        book = self.sessions.get(job.session_id)
        if book is not None:
            details: dict[str, object] = {"job_id": job.job_id, "utterance_index": job.utterance_index}
            self._send_job(
                job, ErrorMessage(code=ErrorCode.JOB_CANCELLED.value, message=reason, details=details)
            )
            self._deliver(book, book.results.fail(job.utterance_index, job.job_id))
        self._pump()  # the freed slot may take a waiting job

    def _tick(self) -> None:
        for out in self.store.expire():
            self._apply(out, EXPIRY_REASONS.get(out.expired, "timeout"))
        self._pump()
        now = self.clock.monotonic()
        if now - self._last_evict >= EVICT_EVERY:
            self._last_evict = now
            self.store.evict()
            self.marks.purge()

    def next_wake(self) -> float:
        """Seconds until the timer's next turn is due (at most 1 s: waiting jobs are retried)."""
        deadline = self.store.next_deadline()
        return 1.0 if deadline is None else min(1.0, max(0.0, deadline - self.clock.monotonic()))

    # --- reading ------------------------------------------------------------------------------------

    def tracked_jobs(self) -> int:
        """Jobs the engine still keeps per-job bookkeeping for (dispatch start time, the node slot of
        the current attempt, a reservation in flight, the last exclusion reason): 0 once every job has
        ended, whatever its end was."""
        return len(self._finalized_at.keys() | self._slots.keys() | self._placing | self._last_reason.keys())

    def takes_foreign_assign(self) -> bool:
        """Whether a ``job_assign`` another instance sends for a node connected here is passed on. Not
        while draining: the job would outlive us here; refused, its owner fails over at once
        (DispatchFailed) instead of finding out when this instance is gone."""
        return not self.draining

    def cancellable(self, session_id: str, utterance_index: int) -> list[str]:
        """The live jobs of one utterance of the session (what ``CancelUtterance`` cancels)."""
        return [
            j.job_id
            for j in self.store.jobs_of(session_id)
            if j.utterance_index == utterance_index and not j.terminal
        ]

    def tenant_of(self, session_id: str) -> str | None:
        """The open session's tenant (None for none, or a session not open here)."""
        book = self.sessions.get(session_id)
        return book.tenant_id if book is not None else None

    def live_jobs_of(self, session_id: str) -> int:
        return sum(1 for j in self.store.jobs_of(session_id) if not j.terminal)

    def placing(self) -> frozenset[str]:
        """Jobs whose shared reservation is in flight."""
        return frozenset(self._placing)

    def route_of(self, session_id: str) -> SessionRoute | None:
        book = self.sessions.get(session_id)
        return book.route if book is not None else None

    def story(self, job_id: str) -> list[str]:
        """The job's history as readable lines, oldest first (at most ``STORY_LINES``)."""
        job = self.store.get(job_id)
        if job is None:
            return [f"{job_id}: unknown (never created here, or evicted)"]
        lines: deque[str] = deque(maxlen=STORY_LINES)
        lines.append(
            f"{job_id}: session {job.session_id} utterance {job.utterance_index} "
            f"{job.spec.src_lang}->{job.spec.tgt_lang}"
        )
        for h in self.store.story(job_id):
            lines.append(_story_line(job.created_at, h))
        slot = self._slots.get(job_id)
        now = f"now {job.state.value}, attempt {job.attempt}"
        if slot is not None:
            now += f", holding a slot on {slot.node_id}" + (f" ({slot.member})" if slot.member else "")
        if job_id in self._placing:
            now += ", reservation in flight"
        lines.append(now)
        return list(lines)

    # --- invariants ---------------------------------------------------------------------------------

    def validate(self) -> None:
        """Check every invariant of the engine's state; raise ``InvariantError`` naming the first broken."""
        try:
            self.store.validate()
        except AssertionError as exc:
            raise InvariantError(f"job store: {exc}") from exc
        for sid, book in self.sessions.items():
            try:
                book.results.validate()
            except AssertionError as exc:
                raise InvariantError(f"session {sid} result queue: {exc}") from exc
        for job_id, slot in self._slots.items():
            job = self.store.get(job_id)
            _check(job is not None, f"slot held for unknown job {job_id}")
            assert job is not None
            _check(
                job.state in ON_NODE or job.terminal,
                f"job {job_id} holds a slot on {slot.node_id} in state {job.state.value}",
            )
            if not job.terminal:
                _check(
                    job.node_id == slot.node_id, f"job {job_id} runs on {job.node_id}, slot on {slot.node_id}"
                )
        for job in self.store.live():
            if job.state in ON_NODE:
                _check(job.job_id in self._slots, f"job {job.job_id} is {job.state.value} without a slot")
        for job_id in self._placing:
            job = self.store.get(job_id)
            # the job may have ended meanwhile (the answer then releases the slot), never be on a node
            _check(
                job is None or job.state not in ON_NODE,
                f"job {job_id} has a reservation in flight but is {job.state.value if job else ''}",
            )
            _check(job_id not in self._slots, f"job {job_id} both reserving and holding a slot")
        for job in self.store.live():
            open_book = self.sessions.get(job.session_id)
            if open_book is not None:
                _check(
                    job.utterance_index < open_book.results.next_expected,
                    f"live job {job.job_id} of utterance {job.utterance_index} never expected by the session",
                )
        for job_id in self._finalized_at:
            job = self.store.get(job_id)
            _check(
                job is not None and job.state is JobState.CREATED and job.attempt == 1,
                f"job {job_id} still timed for its first dispatch",
            )
        _check(len(self.created_by_pair) <= MAX_COUNTED_PAIRS + 1, "created_by_pair grew past its bound")
        try:
            self.fanout.validate()
        except AssertionError as exc:
            raise InvariantError(f"fan-out: {exc}") from exc
        for sid in self.fanout.speakers():
            _check(sid in self.sessions, f"fan-out kept for session {sid}, which is not open")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvariantError(message)


def _story_line(created_at: float, h: HistoryEntry) -> str:
    move = h.dst.value if h.src is None else f"{h.src.value} -> {h.dst.value}"
    where = f" on {h.node_id}" if h.node_id else ""
    return f"+{(h.at - created_at) * 1000:.0f} ms attempt {h.attempt}: {move}{where} ({h.reason})"


def _busy(req: SelectionRequest, result: SelectionResult) -> bool:
    """A node able to take the job was passed over only for its load (or a refused reservation): the
    job waits for it rather than failing after the short wait for any node. Only refused nodes this
    selection came upon count, not one the job already tried."""
    bd = result.breakdown
    return (
        result.preferred_node in BUSY_REASONS
        or any(bd.count(r) for r in BUSY_REASONS)
        or bd.refused > 0
        or (result.preferred_node == "excluded" and req.preferred_node in req.refused)
    )


def _silent(utt: Utterance) -> bool:
    return utt.audio_format == "opus" and is_silent_opus(utt.audio)
