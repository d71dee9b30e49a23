"""The engine's runtime: feeds events to ``SchedulerEngine`` and carries out its actions.

Owns the deadline timer task, the shared-store reservation tasks and the refused-node retry timers;
everything else it does is one flat ladder over the action types (``_execute``), reaching nodes and
sessions through server/links.py, the other instances through the cluster shell and the integrator
shell (usage, quotas, webhooks) through its ``JobObserver``. It decides nothing: every choice about a
job, a node or a session is the engine's (core/engine.py); the observer's quota is read here only to
hand it to the engine with the utterances (``UtterancesReady.quota``).

Must never: look inside a job, choose a node, or keep state about a job or a session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Protocol

from lingua_scheduler.core import actions as a
from lingua_scheduler.core import events as ev
from lingua_scheduler.core.engine import SchedulerEngine
from lingua_scheduler.core.quality import Change
from lingua_scheduler.core.quota import Allowance
from lingua_scheduler.core.results import ResultQueue
from lingua_scheduler.core.rooms import FanoutPlan, RoomSnapshot
from lingua_scheduler.core.segmentation import Utterance
from lingua_scheduler.errors import ErrorCode
from lingua_scheduler.protocol.node import JobAssign, JobCancel, PipelineConfig
from lingua_scheduler.protocol.session import MissingResult, SessionInit, TranslationResult
from lingua_scheduler.server.cluster.store_writer import StoreWriter
from lingua_scheduler.server.events import RecentEvents
from lingua_scheduler.server.latency import LatencyWindow
from lingua_scheduler.server.links import Links, local_outbox
from lingua_scheduler.server.metrics import Metrics
from lingua_scheduler.store.base import JobRecord, StateStore, StoreUnavailable

log = logging.getLogger(__name__)


class ClusterPort(Protocol):
    """What the runtime needs of the multi-instance shell (server/cluster/cluster.py's ``Cluster`` is one):
    the shared store's reservations and batched writes, the job records, the forwarding of other
    instances' job messages, and the degraded flag."""

    instance_id: str
    degraded: bool
    store: StateStore
    writer: StoreWriter

    def forward(self, node_id: str, message: ev.JobMessage) -> None:
        """A message from our node for a job another instance owns."""

    def job_changed(self, record: JobRecord) -> None: ...
    def reservation_unsure(self, node_id: str) -> None: ...
    async def suspect(self, why: str, refused: bool = False) -> None: ...


class ObservedSession(Protocol):
    """What the integrator shell reads of a session it is told about (server/sessions.py's
    ``Session`` is one)."""

    session_id: str
    tenant_id: str | None
    src_lang: str
    targets: list[str]
    metadata: dict[str, str] | None
    #: which front door opened it ("session", "stream", "translate")
    via: str
    #: the clock's monotonic time it opened here
    opened_at: float
    #: the instance it was handed over to (its end is that instance's to report)
    relay_to: str | None


class JobObserver(Protocol):
    """The integrator shell (server/usage_recorder.py's ``UsageRecorder``): usage metering, quotas and
    lifecycle webhooks. Told what the engine decided (``AudioAdmitted``, ``JobEnded``) and, by the
    session code, of sessions opening and ending; asked for a tenant's quota, which the engine decides
    on. Each call is synchronous and never raises, except ``check_quota``'s refusal."""

    def allowance(self, tenant_id: str | None) -> Allowance | None:
        """The tenant's audio-minute quota as it stands (None: it has none)."""

    def audio_admitted(self, admitted: a.AudioAdmitted) -> None: ...
    def job_ended(self, ended: a.JobEnded) -> None: ...
    def check_quota(self, tenant_id: str | None) -> None:
        """Raise ``QUOTA_EXCEEDED`` when the tenant's quota is used up (a new session is refused)."""

    def session_opened(self, session: ObservedSession) -> None: ...
    def session_ended(self, session: ObservedSession, reason: str) -> None: ...


class RoomsPort(Protocol):
    """What the runtime needs of the rooms (server/room_service.py's ``RoomService`` is one): the
    speaker's room as data for each utterance, and the delivery of the engine's room actions."""

    def spoke(self, session_id: str) -> RoomSnapshot | None:
        """The session cut an utterance: its room (None: in no room, or alone in it)."""

    def send_group(self, plan: FanoutPlan, group: int, message: TranslationResult | MissingResult) -> None:
        """An outcome for the members of a language group of ``plan`` (here or on other instances)."""

    def fanout_created(self, jobs: int) -> None: ...
    def fanout_dispatched(self, elapsed: float) -> None: ...
    def session_ended(self, session_id: str) -> None:
        """The session's book is gone: it leaves its room."""


class QualityReport(Protocol):
    """Where node-quality changes are counted, logged and recorded (server/quality.py)."""

    def report(self, changes: tuple[Change, ...]) -> None: ...


class Runtime:
    def __init__(
        self,
        engine: SchedulerEngine,
        *,
        links: Links,
        metrics: Metrics,
        events: RecentEvents,
        quality: QualityReport,
        dispatch_window: LatencyWindow,
    ) -> None:
        """``links``: how nodes and sessions are reached."""
        self.engine = engine
        self.links = links
        self.registry = links.registry
        self.metrics = metrics
        self.events = events
        self.quality = quality
        self.dispatch_window = dispatch_window
        #: the multi-instance shell, set by the composition root in Redis mode (with ``links.instances``)
        self.cluster: ClusterPort | None = None
        #: usage metering, quotas and lifecycle webhooks (set by server/http/integrator_api.py)
        self.observer: JobObserver | None = None
        #: the rooms, set by the composition root; None: no member's utterance fans out
        self.rooms: RoomsPort | None = None
        self._wake = asyncio.Event()
        #: reservation tasks in flight, kept so that they are not garbage-collected mid-way
        self._tasks: set[asyncio.Task[None]] = set()
        m = metrics
        self._counters = {
            "silent_utterances": m.silent_utterances,
            "refused_utterances": m.refused_utterances,
            "jobs_created": m.jobs_created,
            "selections": m.selections,
            "affinity": m.affinity,
            "stale_messages": m.stale_messages,
            "early_results": m.early_results,
            "jobs": m.jobs,
            "failovers": m.failovers,
            "late_results": m.late_results,
        }
        self._histograms = {"selection_seconds": m.selection_seconds, "job_end_to_end": m.job_end_to_end}

    # --- events in ---------------------------------------------------------------------------------

    def handle(self, *events: ev.Event) -> None:
        """Feed events to the engine and carry out what it answers."""
        cluster = self.cluster
        shared = cluster is not None and not cluster.degraded
        engine = self.engine
        if shared is not engine.shared_slots:
            engine.handle_stimulus(ev.SharedSlotsRequired(shared))
        self._execute(engine.handle_stimulus(*events))

    def open_session(
        self,
        session_id: str,
        *,
        tenant_id: str | None,
        trace_id: str,
        init: SessionInit,
        src_lang: str,
        targets: list[str],
        start_index: int,
        pinned: str | None = None,
        pinned_only: bool = False,
    ) -> ResultQueue[TranslationResult]:
        """``pinned``: the node a pairing code bound the session to (``pinned_only``: no other)."""
        self.handle(
            ev.SessionOpened(
                session_id,
                tenant_id,
                trace_id,
                init,
                src_lang,
                tuple(targets),
                start_index,
                pinned=pinned,
                pinned_only=pinned_only,
            )
        )
        return self.engine.results_of(session_id)

    def submit(
        self,
        session_id: str,
        utterances: list[Utterance],
        *,
        src_lang: str | None = None,
        tgt_lang: str | None = None,
        pipeline: PipelineConfig | None = None,
        received_at: float | None = None,
    ) -> None:
        """Finalized utterances of a session. ``received_at`` (perf_counter): when the frame that
        finalized them arrived (the dispatch latency runs from there to the ``job_assign``)."""
        if utterances:
            at = received_at if received_at is not None else time.perf_counter()
            observer = self.observer
            quota = observer.allowance(self.engine.tenant_of(session_id)) if observer is not None else None
            room = self.rooms.spoke(session_id) if self.rooms is not None else None
            self.handle(
                ev.UtterancesReady(
                    session_id, tuple(utterances), src_lang, tgt_lang, pipeline, at, room=room, quota=quota
                )
            )

    def cancel_utterance(self, session_id: str, utterance_index: int, reason: str) -> int:
        """Cancel the live jobs of one utterance of the session (its client asked): each node gets
        ``job_cancel`` and its slot back, the session ``error`` (JOB_CANCELLED) and
        ``missing_result(job_failed)`` for the utterance. Returns how many jobs were cancelled."""
        n = len(self.engine.cancellable(session_id, utterance_index))
        if n:
            self.handle(ev.CancelUtterance(session_id, utterance_index, reason))
        return n

    def pump(self) -> None:
        self.handle(ev.CapacityChanged())

    def node_lost(self, node_id: str) -> None:
        self.handle(ev.NodeGone(node_id))

    def on_node_message(self, node_id: str, msg: ev.JobMessage) -> None:
        self.handle(ev.NodeJobReport(node_id, msg))

    def fail_all(self, code: ErrorCode, message: str) -> int:
        """End every live job as FAILED with ``code``; returns how many there were."""
        n = len(self.engine.store.live())
        self.handle(ev.FailAll(code.value, message))
        return n

    # --- what only the node's instance can do ------------------------------------------------------

    def deliver_to_local_node(self, node_id: str, message: JobAssign | JobCancel) -> bool:
        """Another instance's message for a node connected here; True if the node's outbox took it."""
        outbox = local_outbox(self.registry.nodes.get(node_id))
        if outbox is None:
            return False
        if isinstance(message, JobAssign) and not self.engine.takes_foreign_assign():
            return False
        return outbox.send(message)

    def cancel_on_local_node(self, node_id: str, job_id: str, reason: str) -> None:
        self.deliver_to_local_node(node_id, JobCancel(job_id=job_id, reason=reason))

    # --- actions out -------------------------------------------------------------------------------

    def _execute(self, actions: list[a.Action]) -> None:
        for action in actions:
            # the cases in the order of their frequency on the job path (a match tries them in turn)
            match action:
                case a.SendToSession(session_id=sid, message=msg):
                    self.links.to_session(sid, msg)
                case a.RecordJob():
                    if (cluster := self.cluster) is not None:
                        cluster.job_changed(
                            JobRecord(
                                action.job_id,
                                action.state,
                                action.attempt,
                                action.node_id,
                                cluster.instance_id,
                                action.session_id,
                                action.terminal,
                            )
                        )
                case a.Count(name=name, label=label):
                    counter = self._counters[name]
                    (counter if label is None else counter.labels(label)).inc()
                case a.SessionDelivered(session_id=sid, closing=closing):
                    # only a closing session has anything to do after a delivery: its ack, once settled
                    if closing and (session := self.links.session(sid)) is not None:
                        session.maybe_finish_close()
                case a.Observe(name=name, value=value):
                    self._histograms[name].observe(value)
                case a.WakeTimer():
                    self._wake.set()
                case a.AssignJob():
                    self._assign(action)
                case a.ObserveDispatch(received_at=at):
                    elapsed = time.perf_counter() - at
                    self.metrics.job_dispatch.observe(elapsed)
                    self.dispatch_window.record(elapsed)
                case a.AudioAdmitted():
                    if (observer := self.observer) is not None:
                        observer.audio_admitted(action)
                case a.JobEnded():
                    if (observer := self.observer) is not None:
                        observer.job_ended(action)
                case a.SendToNode(node_id=node_id, message=msg):
                    self.links.cancel(node_id, msg)
                case a.RecordEvent(kind=kind, fields=fields):
                    self.events.add(kind, **dict(fields))
                case a.Reserve():
                    self._spawn(self._reserve(action))
                case a.ReleaseSlot(node_id=node_id, member=member):
                    if (cluster := self.cluster) is not None:
                        cluster.writer.release(node_id, member)
                case a.CommitSlot(node_id=node_id, member=member, ttl_ms=ttl):
                    if (cluster := self.cluster) is not None:
                        cluster.writer.commit(node_id, member, ttl)
                case a.ForwardToOwner(node_id=node_id, message=msg):
                    if (cluster := self.cluster) is not None:
                        cluster.forward(node_id, msg)
                case a.SendToRoomGroup(plan=plan, group=group, message=msg):
                    if (rooms := self.rooms) is not None:
                        rooms.send_group(plan, group, msg)
                case a.FanoutCreated(jobs=n):
                    if (rooms := self.rooms) is not None:
                        rooms.fanout_created(n)
                case a.ObserveFanout(received_at=at):
                    if (rooms := self.rooms) is not None:
                        rooms.fanout_dispatched(time.perf_counter() - at)
                case a.SessionEnded(session_id=sid):
                    if (rooms := self.rooms) is not None:
                        rooms.session_ended(sid)
                case a.QualityChanged(changes=changes):
                    self.quality.report(changes)
                case a.ArmTimer(after_s=delay, event=event):
                    asyncio.get_running_loop().call_later(delay, self.handle, event)

    def _assign(self, action: a.AssignJob) -> None:
        """``job_assign`` through the links; the engine's follow-ups run once it is handed over."""
        assign, node_id = action.assign, action.node_id
        job_id, attempt = assign.job_id, assign.attempt_id
        if not self.links.assign(
            node_id,
            action.owner,
            assign,
            on_fail=lambda: self.handle(
                ev.RemoteDispatchFailed(job_id, attempt, node_id, "shared store unreachable")
            ),
        ):
            self.handle(ev.AssignUndelivered(job_id, attempt, node_id))
            return
        self._execute(list(action.on_sent))

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reserve(self, r: a.Reserve) -> None:
        """Reserve a slot in the shared store and report the answer. An unexpected error is reported
        as a broken placement (the engine fails the job explicitly)."""
        cluster = self.cluster
        try:
            if cluster is None:
                raise RuntimeError("a reservation without a shared store")
            try:
                res = await cluster.store.reserve(r.node_id, r.member, r.slots, r.ttl_ms)
            except StoreUnavailable as exc:
                cluster.reservation_unsure(r.node_id)  # it may have been taken all the same
                await cluster.suspect(str(exc), refused=exc.refused)
                self.handle(ev.ReservationFailed(r.job_id, r.attempt, r.node_id))
                return
            self.handle(ev.ReservationAnswered(r.job_id, r.attempt, r.node_id, r.member, res.ok, res.reason))
        except Exception:
            log.exception("placement failed", extra={"job_id": r.job_id, "node_id": r.node_id})
            self.handle(ev.ReservationFailed(r.job_id, r.attempt, r.node_id, broken=True))

    # --- the timer ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Deadline timer: apply expired deadlines, retry waiting jobs, evict old ones."""
        engine = self.engine
        while True:
            timeout = engine.next_wake()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self.handle(ev.Tick())
