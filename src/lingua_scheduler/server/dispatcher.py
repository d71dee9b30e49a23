"""Job dispatch: turns finalized utterances into jobs, places them on nodes and follows each to its end.

Owns the instance's ``JobStore``, the selector and the unavailable-service marks, the deadline timer
task, the translation of node job messages into session output, each session's routing memory
(``SessionRoute``: the node of its previous job and its current turn, dropped when the session's jobs
are cancelled at its end) and the ``job_assign`` dialect each node is spoken to in. Every job ends in a
result or an explicit failure the session sees (``error`` + ``ui_event ERROR`` +
``missing_result(job_failed)``).

Placement prefers the node of the session's previous job while it is fit (soft affinity: the node
clients keep per-session audio aggregation state); a job continuing a max-duration cut is bound to that
node even at capacity. Two-way sessions go only to nodes serving both directions of (lang_a, lang_b).

Must never: await inside a placement or a node message (all of it is synchronous; the only await is
the timer task's sleep), hold state about a session beyond what ``SessionPort`` exposes and its routing
memory, or log text.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import msgspec

from lingua_scheduler.clock import Clock
from lingua_scheduler.config import Config
from lingua_scheduler.core.fleet_view import FleetViewPublisher
from lingua_scheduler.core.jobs import DeadlineKind, Job, JobSpec, JobState, JobStore, Outcome, Verdict
from lingua_scheduler.core.languages import normalize
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
from lingua_scheduler.core.unavailable import UnavailableMarks
from lingua_scheduler.errors import ErrorCode, NoAvailableNodeError
from lingua_scheduler.protocol.cluster import CancelOnNode, Dispatch
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
from lingua_scheduler.server.auth import AuthService
from lingua_scheduler.server.events import FAILOVER, JOB_FAILED, RecentEvents
from lingua_scheduler.server.latency import LatencyWindow
from lingua_scheduler.server.links import local_outbox, reachable
from lingua_scheduler.server.metrics import Metrics
from lingua_scheduler.server.quality import QualityMonitor
from lingua_scheduler.server.store_writer import StoreWriter
from lingua_scheduler.store.base import JobRecord, StateStore, StoreUnavailable

log = logging.getLogger(__name__)

EVICT_EVERY = 1.0
#: a reservation outlives the ack deadline by this much (the ack commits it for the execution)
RESERVE_MARGIN_MS = 1000
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


#: cuts after which the speaker is still talking: the next utterance belongs to the same turn
CONTINUED_CUTS = frozenset({CutReason.MAX_DURATION, CutReason.MAX_BYTES})
TWO_WAY = "two_way_auto"


class SessionPort(Protocol):
    """What the dispatch needs of a client session (server/sessions.py's ``Session`` is one): who it
    is, its languages, its result queue, and the one way to send it something."""

    @property
    def session_id(self) -> str: ...
    @property
    def tenant_id(self) -> str | None: ...
    @property
    def trace_id(self) -> str: ...
    @property
    def init(self) -> SessionInit: ...
    @property
    def src_lang(self) -> str: ...
    @property
    def targets(self) -> list[str]: ...
    @property
    def results(self) -> ResultQueue[TranslationResult]: ...

    def send(self, msg: msgspec.Struct, *, numbered_by_client: bool = False) -> None: ...

    def forget_released(self) -> None:
        """Drop what the result queue has released (called after each delivery)."""

    def maybe_finish_close(self) -> None:
        """A closing session whose outstanding work is done finishes its close now."""


class ClusterPort(Protocol):
    """What the dispatch needs of the multi-instance shell (server/cluster.py's ``Cluster`` is one):
    the shared store's reservations and batched writes, the job records, and the degraded flag."""

    instance_id: str
    degraded: bool
    store: StateStore
    writer: StoreWriter

    def forward(self, node_id: str, message: object) -> bool:
        """A message from our node for a job another instance owns: True if it went there."""

    def job_changed(self, record: JobRecord) -> None: ...
    def reservation_unsure(self, node_id: str) -> None: ...
    async def suspect(self, why: str, refused: bool = False) -> None: ...


class FanoutPort(Protocol):
    """Rooms (server/room_service.py's ``RoomService`` is one): which jobs a room member's utterance
    gets and who receives each of their outcomes. Every method is synchronous."""

    def targets(self, session: SessionPort, index: int, src_lang: str, tgt_lang: str) -> list[str] | None:
        """The target languages of utterance ``index`` (one job each); None: not in a room (the
        session's own targets)."""

    def created(self, session: SessionPort, index: int, jobs: list[tuple[str, str]]) -> None:
        """The (target language, job id) pairs created for utterance ``index`` after ``targets``."""

    def speaker_sees(self, job_id: str) -> bool:
        """The speaker's session gets this job's progress (ui events, partials, errors)."""

    def deliver(
        self, session: SessionPort, job_id: str | None, message: msgspec.Struct
    ) -> msgspec.Struct | None:
        """A released outcome of the speaker's job (``translation_result`` or ``missing_result``): sent
        to the job's other recipients here; returns what the speaker gets (None: nothing)."""

    def session_ended(self, session_id: str) -> None:
        """The session's jobs are cancelled at its end: forget its fan-out, take it out of its room."""

    def assigned(self, job_id: str, elapsed: float) -> None:
        """The job's first ``job_assign`` was written ``elapsed`` seconds after its utterance arrived."""


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


class Dispatcher:
    def __init__(
        self,
        config: Config,
        clock: Clock,
        *,
        registry: Registry,
        publisher: FleetViewPublisher,
        metrics: Metrics,
        auth: AuthService,
        quality: QualityMonitor,
        events: RecentEvents,
        sessions: Mapping[str, SessionPort],
        dispatch_window: LatencyWindow,
        shutting_down: Callable[[], bool],
    ) -> None:
        """Each argument is one thing the dispatch uses: ``sessions`` the instance's open sessions by
        id (read only), ``shutting_down`` whether a graceful shutdown has begun (no job taken then)."""
        self.config = config
        self.clock = clock
        self.registry = registry
        self.publisher = publisher
        self.metrics = metrics
        self.auth = auth
        self.quality = quality
        self.events = events
        self.sessions = sessions
        self.dispatch_window = dispatch_window
        self.shutting_down = shutting_down
        cfg = config
        self.store = JobStore(cfg.jobs, clock, session_audio_limit=cfg.session.max_session_buffer_bytes)
        self.marks = UnavailableMarks(clock, cfg.pools.unavailable_ttl_seconds)
        # The scan budget bounds a failing selection at saturation (every shard of a pair full).
        self.selector = Selector(
            marks=self.marks,
            resource_threshold=cfg.scheduler.resource_threshold,
            scan_budget=SCAN_BUDGET,
            soft_threshold=True,
            quality=quality.tracker,
        )
        #: job id -> perf_counter when its utterance was finalized (dispatch latency); bounded by live jobs
        self._finalized_at: dict[str, float] = {}
        #: job id -> the last selection's dominant exclusion reason (explains NO_AVAILABLE_NODE)
        self._last_reason: dict[str, str] = {}
        #: job id -> (node, load epoch token, reservation member) of its current attempt
        self._load_tokens: dict[str, tuple[str, int, str | None]] = {}
        #: jobs whose reservation is in flight (multi-instance mode)
        self._placing: set[str] = set()
        #: nodes whose reservation was just refused (full in the shared count)
        self._reserve_refused: set[str] = set()
        #: reservation tasks in flight, kept so that they are not garbage-collected mid-way
        self._placements: set[asyncio.Task[None]] = set()
        #: set by the app in multi-instance mode
        self.cluster: ClusterPort | None = None
        self._wake = asyncio.Event()
        self._last_evict = 0.0
        #: jobs created per directed language pair since start (the dashboard's demand per pair)
        self.created_by_pair: dict[str, int] = {}
        #: session id -> its routing memory; bounded by live sessions (dropped in ``cancel_session``)
        self._routes: dict[str, SessionRoute] = {}
        #: rooms' fan-out (set by the app; None: no rooms, every session's own targets)
        self.fanout: FanoutPort | None = None

    # --- sessions -> jobs -----------------------------------------------------------------------

    def submit(
        self,
        session: SessionPort,
        utterances: list[Utterance],
        *,
        src_lang: str | None = None,
        tgt_lang: str | None = None,
        pipeline: PipelineConfig | None = None,
        received_at: float | None = None,
    ) -> None:
        """Create the jobs of finalized utterances (one per target language) and try to place them.

        ``received_at`` (perf_counter) is when the frame that finalized them arrived: the dispatch
        latency runs from there to the ``job_assign`` being written."""
        if not utterances:
            return
        now = received_at if received_at is not None else time.perf_counter()
        init = session.init
        jobs_cfg = self.config.jobs
        streaming = (
            jobs_cfg.streaming_asr_default if init.enable_streaming_asr is None else init.enable_streaming_asr
        )
        route = self._routes.setdefault(session.session_id, SessionRoute())
        for utt in utterances:
            if utt.dropped_chunks or not session.results.has_room:
                # A stream with a hole is not spliced, and finished work is never dropped to make
                # room: the utterance is refused, at once, and gets no job.
                reason = MissingReason.RATE_LIMITED if utt.dropped_chunks else MissingReason.QUEUE_FULL
                self.refuse(session, utt.index, reason, utt)
                route.continued = False
                continue
            if route.turn_start is None or not route.continued:
                route.turn_start = utt.index
            continues, route.continued = route.continued, utt.reason in CONTINUED_CUTS
            if not continues and not route.continued and _silent(utt):
                # No speech to recognise: a job would only hold a node (and the session's next
                # sentence behind it) for nothing. Part of a max-duration chain it still goes, since
                # the node holding the turn waits for its last piece.
                session.results.expect(utt.index, [])
                self.metrics.silent_utterances.inc()
                self.deliver(session, session.results.silence(utt.index))
                continue
            turn_id = f"{session.session_id}:{route.turn_start}"
            job_ids: list[str] = []
            failed: list[Job] = []
            targets = [tgt_lang] if tgt_lang else session.targets
            fanout = self.fanout
            if fanout is not None:  # a room member: one job per language of the others
                src = src_lang or session.src_lang
                targets = fanout.targets(session, utt.index, src, targets[0]) or targets
            created: list[tuple[str, str]] = []
            # Per-tenant job rate (server/auth.py): an utterance over it gets no job, only the error below.
            limited = not self.auth.admit_jobs(session.tenant_id, len(targets))
            for tgt in [] if limited else targets:
                spec = JobSpec.from_utterance(
                    utt,
                    session_id=session.session_id,
                    src_lang=src_lang or session.src_lang,
                    tgt_lang=tgt,
                    trace_id=session.trace_id,
                )
                spec = dataclasses.replace(
                    spec,
                    tenant_id=session.tenant_id,
                    dialect=session.init.dialect,
                    features=session.init.features,
                    pipeline=pipeline,
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
                )
                try:
                    out = self.store.create(spec, utt.audio)
                except NoAvailableNodeError as exc:
                    log.warning(
                        "job refused",
                        extra={
                            "session_id": session.session_id,
                            "trace_id": session.trace_id,
                            "reason": exc.message,
                        },
                    )
                    continue
                if out.verdict is Verdict.DUPLICATE or out.job is None:
                    continue
                job_ids.append(out.job.job_id)
                created.append((tgt, out.job.job_id))
                self._finalized_at[out.job.job_id] = now
                self._count_created(spec.src_lang, spec.tgt_lang)
                if out.job.state is JobState.FAILED:
                    failed.append(out.job)
            if fanout is not None:
                fanout.created(session, utt.index, created)
            session.results.expect(utt.index, job_ids)
            if not job_ids:
                self.deliver(session, session.results.fail(utt.index))
                session.send(
                    self.auth.rate_limited(
                        session.tenant_id,
                        utt.index,
                        utt.index if utt.client_index is None else utt.client_index,
                    )
                    if limited
                    else ErrorMessage(
                        code=ErrorCode.NO_AVAILABLE_NODE.value,
                        message="the scheduler cannot take more jobs right now",
                    )
                )
            for job in failed:
                self._report_failure(job)
        self.pump()

    def refuse(
        self, session: SessionPort, index: int, reason: MissingReason, utt: Utterance | None = None
    ) -> None:
        """Utterance ``index`` gets no job: answered at once with ``missing_result(reason)``."""
        session.results.refuse(index)
        self.metrics.refused_utterances.labels(reason.value).inc()
        session.send(
            MissingResult(
                session_id=session.session_id,
                utterance_index=index,
                reason=reason,
                created_at_ms=self.clock.wall_ms(),
                trace_id=session.trace_id,
                dropped_seqs=list(utt.dropped_seqs) if utt is not None and utt.dropped_chunks else None,
                dropped_chunks=utt.dropped_chunks if utt is not None and utt.dropped_chunks else None,
            )
        )

    def _count_created(self, src: str, tgt: str) -> None:
        self.metrics.jobs_created.inc()
        pair = f"{src}->{tgt}"
        counts = self.created_by_pair
        if pair not in counts and len(counts) >= MAX_COUNTED_PAIRS:
            pair = OTHER_PAIR
        counts[pair] = counts.get(pair, 0) + 1

    # --- placement ------------------------------------------------------------------------------

    def pump(self) -> None:
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
        self._wake.set()

    def _place_pass(self, hopeless: dict[tuple[object, ...], bool]) -> bool:
        """One pass of ``pump`` over the heads of the streams; True if it dispatched a job here."""
        view = self.publisher.view
        m = self.metrics
        shared = self.cluster is not None and not self.cluster.degraded
        placed = False
        for job in self.store.dispatchable():
            if job.job_id in self._placing:
                continue
            spec = job.spec
            route = self._routes.get(spec.session_id)
            last_node = route.last_node if route is not None else None
            # A paired session's node comes first (a max-duration chain stays where its turn is).
            pinned = route.pinned if route is not None else None
            preferred = last_node if spec.continues_turn and last_node else (pinned or last_node)
            only = pinned is not None and route is not None and route.pinned_only
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
                preferred_only=only and preferred == pinned,
                also_serves=also,
                exclude=frozenset(job.tried_nodes) | self._reserve_refused,
                refused=frozenset(self._reserve_refused.difference(job.tried_nodes)),
            )
            t0 = time.perf_counter()
            result = self.selector.select(view, req)
            m.selection_seconds.observe(time.perf_counter() - t0)
            node_id = result.node_id
            entry = self.registry.nodes.get(node_id) if node_id is not None else None
            if node_id is None or entry is None or not reachable(entry):
                m.selections.labels("no_node").inc()
                self._last_reason[job.job_id] = result.best_reason
                busy = node_id is None and self._busy(req, result)
                hopeless[key] = busy
                self.store.hold(job.job_id, busy=busy)
                continue
            m.selections.labels("ok").inc()
            if shared:
                # Another instance may place work on the same node: take a slot in the shared store first.
                self._placing.add(job.job_id)
                task = asyncio.get_running_loop().create_task(
                    self._place_shared(job.job_id, job.attempt, node_id)
                )
                self._placements.add(task)
                task.add_done_callback(self._placements.discard)
            else:
                self._send_assign(job, node_id, None)
                placed = True
        return placed

    def _busy(self, req: SelectionRequest, result: SelectionResult) -> bool:
        """A node able to take the job was passed over only for its load (or a refused reservation):
        the job waits for it rather than failing after the short wait for any node. Only refused
        nodes this selection came upon count, not one the job already tried."""
        bd = result.breakdown
        return (
            result.preferred_node in BUSY_REASONS
            or any(bd.count(r) for r in BUSY_REASONS)
            or bd.refused > 0
            or (result.preferred_node == "excluded" and req.preferred_node in req.refused)
        )

    def _send_assign(self, job: Job, node_id: str, member: str | None) -> None:
        """Record the dispatch and write ``job_assign`` to a local node (or hand it to its owner)."""
        entry = self.registry.nodes[node_id]
        self.store.dispatch(job.job_id, node_id, acks=entry.sends_acks)
        self._load_tokens[job.job_id] = (node_id, entry.load.dispatched(), member)
        if not entry.sends_acks:
            self._commit_slot(job)  # no ack will commit the reservation: the job runs from now on
        self._record(job)
        self._follow(job.session_id, node_id)
        assign = self._assign(job, turn_dialect=entry.turn_dialect)
        if entry.owner is not None and self.cluster is not None:
            self._send_remote(job.job_id, job.attempt, entry.owner, node_id, assign)
        elif (outbox := local_outbox(entry)) is None or not outbox.send(assign):
            self._apply(self.store.failover(job.job_id, "send failed", cancel=False), "send_failed")
            return
        started = self._finalized_at.pop(job.job_id, None)
        if started is not None:
            elapsed = time.perf_counter() - started
            self.metrics.job_dispatch.observe(elapsed)
            self.dispatch_window.record(elapsed)
            if self.fanout is not None:
                self.fanout.assigned(job.job_id, elapsed)
        session = self.sessions.get(job.session_id)
        if session is not None and self._speaker_sees(job.job_id):
            session.send(self._ui(job, UiEventType.DISPATCHED))

    async def _place_shared(self, job_id: str, attempt: int, node_id: str) -> None:
        """Reserve a slot on ``node_id`` in the shared store, then dispatch (multi-instance mode).

        An unexpected error fails the job explicitly (the session is told) rather than leaving it
        marked as being placed, which would keep it out of every later pass."""
        try:
            await self._reserve_and_send(job_id, attempt, node_id)
        except Exception:
            log.exception("placement failed", extra={"job_id": job_id, "node_id": node_id})
            self._placing.discard(job_id)
            job = self.store.get(job_id)
            if job is not None and job.attempt == attempt:
                self._apply(
                    self.store.abort(job_id, ErrorCode.INTERNAL_ERROR.value, "the job could not be placed"),
                    "placement_failed",
                )
            self.pump()
        finally:
            self._placing.discard(job_id)

    async def _reserve_and_send(self, job_id: str, attempt: int, node_id: str) -> None:
        assert self.cluster is not None
        member = f"{job_id}:{attempt}"
        ttl = self.config.jobs.ack_timeout_ms + RESERVE_MARGIN_MS
        declared = self.registry.nodes.get(node_id)
        slots = (declared.max_concurrent_jobs if declared is not None else None) or (
            self.config.scheduler.max_concurrent_jobs_per_node
        )
        try:
            res = await self.cluster.store.reserve(node_id, member, slots, ttl)
        except StoreUnavailable as exc:
            self.cluster.reservation_unsure(node_id)  # it may have been taken all the same
            await self.cluster.suspect(str(exc), refused=exc.refused)
            self._placing.discard(job_id)
            self.pump()  # degraded: local nodes are dispatched without reservations; else try again
            return
        self._placing.discard(job_id)
        job = self.store.get(job_id)
        entry = self.registry.nodes.get(node_id)
        if job is None or job.state is not JobState.CREATED or job.attempt != attempt or entry is None:
            if res.ok:
                self._release_slot(node_id, member)
            self.pump()
            return
        if not res.ok:
            # Our view of the node's load was behind the shared count: leave the node alone briefly.
            log.info(
                "reservation refused", extra={"job_id": job_id, "node_id": node_id, "reason": res.reason}
            )
            self._last_reason[job_id] = f"reservation {res.reason.lower()}"
            self._reserve_refused.add(node_id)
            asyncio.get_running_loop().call_later(RESERVE_RETRY_S, self._retry_refused, node_id)
            self.pump()
            return
        self._send_assign(job, node_id, member)
        self.pump()  # the next job of the same stream was waiting for this one to leave the queue

    def _follow(self, session_id: str, node_id: str) -> None:
        """Remember where the session's job went (affinity for its next one) and count hit or move."""
        route = self._routes.get(session_id)
        if route is None:
            return
        if route.last_node is not None:
            self.metrics.affinity.labels("hit" if route.last_node == node_id else "moved").inc()
        route.last_node = node_id

    def _retry_refused(self, node_id: str) -> None:
        self._reserve_refused.discard(node_id)
        self.pump()

    def _send_remote(self, job_id: str, attempt: int, owner: str, node_id: str, assign: JobAssign) -> None:
        """Hand ``job_assign`` to the node's instance (its inbox, in the writer's next pipeline)."""
        assert self.cluster is not None
        self.cluster.writer.send(
            owner,
            Dispatch(
                node_id=node_id,
                reply_to=self.cluster.instance_id,
                assign=assign,
                sent_at_ns=time.time_ns(),
            ),
            on_fail=lambda: self.remote_dispatch_failed(job_id, attempt, node_id, "shared store unreachable"),
        )

    def remote_dispatch_failed(self, job_id: str, attempt: int, node_id: str, reason: str) -> None:
        """The node's instance could not deliver our job_assign: fail over at once."""
        job = self.store.get(job_id)
        if (
            job is None
            or job.attempt != attempt
            or job.node_id != node_id
            or job.state is not JobState.DISPATCHED
        ):
            return
        self._apply(self.store.failover(job_id, reason, cancel=False), "send_failed")

    def deliver_to_local_node(self, node_id: str, message: JobAssign | JobCancel) -> bool:
        outbox = local_outbox(self.registry.nodes.get(node_id))
        if outbox is None:
            return False
        if self.shutting_down() and isinstance(message, JobAssign):
            # Another instance's job would outlive us here: refusing it makes its owner fail over at
            # once (DispatchFailed) instead of finding out when this instance is gone.
            return False
        return outbox.send(message)

    def cancel_on_local_node(self, node_id: str, job_id: str, reason: str) -> None:
        self.deliver_to_local_node(node_id, JobCancel(job_id=job_id, reason=reason))

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
            audio=_b64(job.audio or b""),
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
            is_manual_cut=reason.is_manual_cut,
            is_pause_triggered=pause,
            is_timeout_triggered=timeout,
            is_max_duration_triggered=max_duration,
        )

    # --- node messages --------------------------------------------------------------------------

    def on_node_message(self, node_id: str, msg: object) -> None:
        """A job message from a node whose binding the endpoint already checked (or, forwarded by the
        node's instance, from a node connected there)."""
        store = self.store
        job_id = getattr(msg, "job_id", "")
        if self.cluster is not None and store.get(job_id) is None and self.cluster.forward(node_id, msg):
            return  # the job belongs to a session on another instance
        if isinstance(msg, JobAck):
            out = store.on_ack(msg.job_id, msg.attempt_id, node_id)
            if out.verdict is Verdict.APPLIED and out.job is not None:
                self._to_session(out.job, self._ui(out.job, UiEventType.NODE_ACCEPTED))
                self._commit_slot(out.job)
        elif isinstance(msg, JobStarted):
            out = store.on_started(msg.job_id, msg.attempt_id, node_id)
        elif isinstance(msg, NodeAsrPartial):
            out = store.on_partial(msg.job_id, msg.attempt_id, node_id)
            if out.verdict is Verdict.APPLIED and out.job is not None:
                job = out.job
                self._to_session(
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
                self._to_session(job, self._ui(job, UiEventType.ASR_PARTIAL))
        elif isinstance(msg, JobResult):
            out = self._on_result(node_id, msg)
        else:
            return
        if out.verdict is Verdict.APPLIED and out.job is not None:
            self._record(out.job)
        if out.verdict is Verdict.STALE:
            self.metrics.stale_messages.inc()
            log.info(
                "stale job message dropped", extra={"node_id": node_id, "job_id": getattr(msg, "job_id", "")}
            )
        if isinstance(msg, JobResult) and (
            out.verdict in (Verdict.STALE, Verdict.UNKNOWN) or out.early_node is not None
        ):
            # The node finished a job we no longer follow (an attempt abandoned when its connection
            # dropped or its deadline passed): its last report counted it as running, so that figure is
            # one too high until the next heartbeat -- up to an interval of phantom load otherwise.
            entry = self.registry.nodes.get(node_id)
            if entry is not None and entry.owner is None:
                entry.load.report_ended()
                self._slot_freed()

    def _on_result(self, node_id: str, msg: JobResult) -> Outcome:
        error = msg.error
        if (
            error is not None
            and error.code == ErrorCode.MODEL_NOT_AVAILABLE
            and isinstance(error.details, dict)
        ):
            service = error.details.get("service_id") or error.details.get("model_id")
            if isinstance(service, str):
                self.marks.mark(node_id, service)
        out = self.store.on_result(
            msg.job_id,
            msg.attempt_id,
            node_id,
            success=msg.success,
            error_code=error.code if error else None,
            error_message=error.message if error else None,
        )
        self.quality.on_result(node_id, msg, out)  # node quality: success, empty or failure
        if out.verdict is not Verdict.APPLIED or out.job is None:
            return out
        job = out.job
        if job.state is JobState.COMPLETED:
            if out.early_node is not None:
                self.metrics.early_results.inc()
                log.info(
                    "result of an earlier attempt delivered",
                    extra={"job_id": job.job_id, "node_id": node_id, "attempt": job.won_attempt},
                )
            self._release(out)
            # Only a failure explains itself with it; a result held back for ordering may never be
            # delivered (its session may go first), so it is dropped here, not on delivery.
            self._last_reason.pop(job.job_id, None)
            session = self.sessions.get(job.session_id)
            if session is not None:
                payload = self._translation(job, msg)
                silent = not (msg.text_asr or msg.text_translated or msg.tts_audio)
                self.deliver(
                    session,
                    session.results.offer(
                        job.utterance_index, job.job_id, job.won_attempt, payload, silent=silent
                    ),
                )
            self.metrics.jobs.labels("completed").inc()
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
        )

    # --- outcomes ---------------------------------------------------------------------------------

    def _apply(self, out: Outcome, why: str) -> None:
        """Carry out what an outcome asks: free load, cancel on the old node, report or re-place."""
        job = out.job
        if out.verdict is not Verdict.APPLIED or job is None:
            return
        self.quality.on_outcome(out)  # node quality: an expired deadline is a timeout
        self._release(out)
        if job.state is JobState.CREATED:
            self.metrics.failovers.labels(why).inc()
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
            self.events.add(
                FAILOVER,
                job_id=job.job_id,
                session_id=job.session_id,
                node_id=old_node,
                attempt=job.attempt,
                reason=why,
            )
        elif job.state in (JobState.FAILED, JobState.TIMED_OUT):
            self._report_failure(job)
        elif job.state is JobState.CANCELLED:
            self.metrics.jobs.labels("cancelled").inc()
            self._forget(job)

    def _release(self, out: Outcome) -> None:
        nodes = self.registry.nodes
        if out.job is not None:
            self._record(out.job)
        if out.freed_node is not None and out.job is not None:
            node_id, token, member = self._load_tokens.pop(out.job.job_id, (out.freed_node, None, None))
            if (entry := nodes.get(out.freed_node)) is not None:
                entry.load.finished(token if node_id == out.freed_node else None)
            if member is not None:
                self._release_slot(out.freed_node, member)
            self._slot_freed()
        if out.cancel_node is not None and out.job is not None:
            cancel = JobCancel(
                job_id=out.job.job_id,
                trace_id=out.job.spec.trace_id,
                reason="failover" if not out.job.terminal else "cancelled",
            )
            entry = nodes.get(out.cancel_node)
            if entry is not None and entry.owner is not None and self.cluster is not None:
                self.cluster.writer.send(entry.owner, CancelOnNode(node_id=out.cancel_node, cancel=cancel))
            elif (outbox := local_outbox(entry)) is not None:
                outbox.send(cancel)

    # --- shared-store bookkeeping (multi-instance mode; no-ops when embedded) ---------------------------

    def _record(self, job: Job) -> None:
        if self.cluster is not None:
            self.cluster.job_changed(
                JobRecord(
                    job.job_id,
                    job.state.value,
                    job.attempt,
                    job.node_id,
                    self.cluster.instance_id,
                    job.session_id,
                    job.terminal,
                )
            )

    def _slot_freed(self) -> None:
        """A node has a slot free again: waiting jobs get it at the timer task's next turn (one pump
        for all the slots freed in one loop turn), not at its next deadline or 1 s tick."""
        if self.store.waiting:
            self._wake.set()

    def held_reservations(self) -> dict[str, list[tuple[str, int]]]:
        """Node id -> (member, ttl ms) of every attempt of this instance on a node now: what the
        shared reservation sets must hold for it (re-synced after the store was unreachable). An
        attempt dispatched without a reservation meanwhile gets its member now, so its end releases
        it and other instances count its slot."""
        jobs = self.config.jobs
        out: dict[str, list[tuple[str, int]]] = {}
        for job_id, (node_id, token, member) in list(self._load_tokens.items()):
            job = self.store.get(job_id)
            if job is None or job.terminal or job.node_id != node_id:
                continue
            if member is None:
                member = f"{job_id}:{job.attempt}"
                self._load_tokens[job_id] = (node_id, token, member)
            acked = job.state is not JobState.DISPATCHED
            ttl = (jobs.exec_timeout_max_ms if acked else jobs.ack_timeout_ms) + RESERVE_MARGIN_MS
            out.setdefault(node_id, []).append((member, ttl))
        return out

    def _release_slot(self, node_id: str, member: str) -> None:
        if self.cluster is not None:
            self.cluster.writer.release(node_id, member)

    def _commit_slot(self, job: Job) -> None:
        tokens = self._load_tokens.get(job.job_id)
        if self.cluster is None or tokens is None or tokens[2] is None:
            return
        self.cluster.writer.commit(
            tokens[0], tokens[2], self.config.jobs.exec_timeout_max_ms + RESERVE_MARGIN_MS
        )

    def _report_failure(self, job: Job) -> None:
        m = self.metrics
        m.jobs.labels(job.state.value).inc()
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
        self.events.add(
            JOB_FAILED,
            job_id=job.job_id,
            session_id=job.session_id,
            node_id=job.node_id,
            state=job.state.value,
            code=code,
        )
        session = self.sessions.get(job.session_id)
        self._forget(job)
        if session is None:
            return
        if not self._speaker_sees(job.job_id):  # another room member's job: its missing_result says it
            self.deliver(session, session.results.fail(job.utterance_index, job.job_id))
            return
        session.send(
            ErrorMessage(
                code=code,
                message=message,
                details={"job_id": job.job_id, "utterance_index": job.utterance_index},
            )
        )
        session.send(
            error_ui_event(
                code,
                trace_id=job.spec.trace_id,
                session_id=job.session_id,
                job_id=job.job_id,
                utterance_index=job.utterance_index,
                elapsed_ms=self._elapsed_ms(job),
            )
        )
        self.deliver(session, session.results.fail(job.utterance_index, job.job_id))

    def _forget(self, job: Job) -> None:
        self._finalized_at.pop(job.job_id, None)
        self._load_tokens.pop(job.job_id, None)
        self._last_reason.pop(job.job_id, None)

    def deliver(self, session: SessionPort, releases: list[Release[TranslationResult]]) -> None:
        """Send released results in order; report end-to-end latency; let a closing session finish."""
        m = self.metrics
        for rel in releases:
            reason, payload = rel.missing_reason, rel.payload
            if reason is None and payload is not None:
                job = self.store.get(payload.job_id)
                if job is not None:
                    # another room member's job: its progress is not the speaker's
                    sees = self._speaker_sees(job.job_id)
                    if payload.text_asr and sees:
                        session.send(self._ui(job, UiEventType.ASR_FINAL))
                    if payload.text_translated and sees:
                        session.send(self._ui(job, UiEventType.NMT_DONE))
                    m.job_end_to_end.observe(max(0.0, self.clock.monotonic() - job.created_at))
                    self._forget(job)
                if rel.late:  # its index was given up (gap_timeout) before it came: delivered anyway
                    m.late_results.inc()
                    payload = msgspec.structs.replace(payload, late=True)
                self._send_release(session, rel.job_id, payload)
            else:
                missing = MissingResult(
                    session_id=session.session_id,
                    utterance_index=rel.index,
                    reason=reason or MissingReason.SILENCE_DETECTED,
                    created_at_ms=self.clock.wall_ms(),
                    trace_id=session.trace_id,
                )
                self._send_release(session, rel.job_id, missing)
        session.forget_released()
        session.maybe_finish_close()

    def _send_release(self, session: SessionPort, job_id: str | None, msg: msgspec.Struct) -> None:
        """A released outcome: to the speaker, or (a room's fan-out) to the job's recipients."""
        out: msgspec.Struct | None = msg
        if self.fanout is not None:
            out = self.fanout.deliver(session, job_id, msg)
        if out is not None:
            session.send(out)

    def _speaker_sees(self, job_id: str) -> bool:
        return self.fanout is None or self.fanout.speaker_sees(job_id)

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

    def _to_session(self, job: Job, msg: object) -> None:
        session = self.sessions.get(job.session_id)
        if session is not None and self._speaker_sees(job.job_id):
            session.send(msg)  # type: ignore[arg-type]

    # --- lifecycle ------------------------------------------------------------------------------

    def node_lost(self, node_id: str) -> None:
        """The node's socket closed: every attempt it held fails over at once."""
        for out in self.store.node_lost(node_id):
            self._apply(out, "node_lost")
        self.pump()

    def cancel_session(self, session_id: str, reason: str) -> None:
        self._routes.pop(session_id, None)
        for out in self.store.cancel_session(session_id, reason):
            self._apply(out, "session_closed")
        if self.fanout is not None:
            self.fanout.session_ended(session_id)

    def pin(self, session_id: str, node_id: str, *, only: bool) -> None:
        """The session's jobs go to ``node_id`` first (a pairing code bound it); ``only``: never to
        another node. Forgotten with the rest of its routing memory at its end."""
        route = self._routes.setdefault(session_id, SessionRoute())
        route.pinned, route.pinned_only = node_id, only

    def pinned_node(self, session_id: str) -> str | None:
        route = self._routes.get(session_id)
        return route.pinned if route is not None else None

    def fail_all(self, code: ErrorCode, message: str) -> int:
        """End every live job of this instance as FAILED with ``code`` (graceful shutdown past its
        deadline): each node gets ``job_cancel`` and its slot back, each session ``error`` +
        ``ui_event ERROR`` + ``missing_result(job_failed)``, in utterance order. Returns how many."""
        n = 0
        for job in self.store.live():
            out = self.store.abort(job.job_id, code.value, message)
            if out.verdict is Verdict.APPLIED:
                self._apply(out, "shutdown")
                n += 1
        return n

    def cancel_job(self, job_id: str, reason: str) -> Outcome:
        """Cancel one job (operator action): the node gets ``job_cancel`` and its load back, the session
        an ``error`` (JOB_CANCELLED) and ``missing_result(job_failed)`` for the utterance, so its result
        queue moves on. ``UNKNOWN``/``DUPLICATE`` verdicts (no such job, already ended) change nothing."""
        out = self.store.cancel(job_id, reason)
        job = out.job
        if out.verdict is not Verdict.APPLIED or job is None:
            return out
        self._apply(out, "cancelled")
        session = self.sessions.get(job.session_id)
        if session is not None:
            if self._speaker_sees(job.job_id):
                session.send(
                    ErrorMessage(
                        code=ErrorCode.JOB_CANCELLED.value,
                        message=reason,
                        details={"job_id": job.job_id, "utterance_index": job.utterance_index},
                    )
                )
            self.deliver(session, session.results.fail(job.utterance_index, job.job_id))
        self.pump()  # the freed slot may take a waiting job
        return out

    def tracked_jobs(self) -> int:
        """Jobs this dispatcher still keeps per-job bookkeeping for (dispatch start time, the node slot
        of the current attempt, a reservation in flight, the last exclusion reason): 0 once every job
        has ended, whatever its end was."""
        return len(
            self._finalized_at.keys() | self._load_tokens.keys() | self._placing | self._last_reason.keys()
        )

    def live_jobs_of(self, session_id: str) -> int:
        return sum(1 for j in self.store.jobs_of(session_id) if not j.terminal)

    async def run(self) -> None:
        """Deadline timer: apply expired deadlines, retry waiting jobs, evict old ones."""
        clock = self.clock
        while True:
            deadline = self.store.next_deadline()
            timeout = 1.0 if deadline is None else min(1.0, max(0.0, deadline - clock.monotonic()))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            for out in self.store.expire():
                self._apply(out, EXPIRY_REASONS.get(out.expired, "timeout"))
            self.pump()
            now = clock.monotonic()
            if now - self._last_evict >= EVICT_EVERY:
                self._last_evict = now
                self.store.evict()
                self.marks.purge()


def _silent(utt: Utterance) -> bool:
    return utt.audio_format == "opus" and is_silent_opus(utt.audio)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
