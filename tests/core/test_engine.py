"""The scheduler engine alone: events in, actions out, on a manual clock and a real registry and fleet
view (tests/core/conftest.py), with ``engine.validate()`` after every step. ``World`` carries out the
actions the way the runtime does (a node's messages are kept in its list, a session's in its own),
without a socket. The tables name each case; the state machine at the end feeds random sequences."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field

import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from lingua_scheduler.clock import ManualClock
from lingua_scheduler.config import AuthConfig, Config, JobConfig, SessionConfig, TenantKeyConfig
from lingua_scheduler.core import actions as a
from lingua_scheduler.core import events as ev
from lingua_scheduler.core.engine import (
    BOUND_CONTINUATION_SLOTS,
    MAX_COUNTED_PAIRS,
    OTHER_PAIR,
    InvariantError,
    SchedulerEngine,
)
from lingua_scheduler.core.groups import GROUP_WINDOW_MS
from lingua_scheduler.core.jobs import JobState
from lingua_scheduler.core.quality import QualityTracker
from lingua_scheduler.core.quota import Period, QuotaBook, QuotaLimits
from lingua_scheduler.core.rooms import RoomSnapshot
from lingua_scheduler.core.segmentation import CutReason, Utterance
from lingua_scheduler.protocol.common import ErrorMessage
from lingua_scheduler.protocol.node import (
    JobAck,
    JobAssign,
    JobCancel,
    JobError,
    JobResult,
    NodeAsrPartial,
    PipelineConfig,
)
from lingua_scheduler.protocol.session import MissingResult, SessionInit, TranslationResult, UiEvent
from lingua_scheduler.server.auth import AuthService
from tests.core.conftest import Fleet, Spec

ACK_MS = 1000
PENDING_MS = 3000
TENANT_KEY = "0" * 64


def utterance(index: int, reason: CutReason = CutReason.PAUSE, client_index: int | None = None) -> Utterance:
    return Utterance(
        client_index=client_index,
        index=index,
        audio=b"\x01\x02" * 1600,
        reason=reason,
        audio_format="pcm16",
        sample_rate=16000,
        duration_ms=100,
        started_at=0.0,
        finalized_at=0.0,
        created_wall_ms=0,
    )


@dataclass
class World:
    """An engine on a manual clock with ``nodes`` ready (each may take ``max_jobs`` at once)."""

    nodes: tuple[str, ...] = ("n1", "n2")
    max_jobs: int = 4
    acks: bool = True
    rate: float = 0.0
    burst: int = 1
    seed: int = 0
    #: the languages every node serves (asr = nmt = tts)
    langs: tuple[str, ...] = ("en", "zh")
    clock: ManualClock = field(default_factory=ManualClock)
    #: tenant t1's daily audio quota in seconds (0: none), kept in a real ``QuotaBook`` that the world
    #: asks and spends from as the runtime and the usage recorder do
    daily_quota_s: float = 0.0

    def __post_init__(self) -> None:
        tenants = (
            [
                TenantKeyConfig(
                    tenant_id="t1",
                    key_sha256=TENANT_KEY,
                    max_jobs_per_second=self.rate,
                    jobs_burst=self.burst,
                )
            ]
            if self.rate
            else []
        )
        self.config = Config(
            jobs=JobConfig(ack_timeout_ms=ACK_MS, pending_timeout_ms=PENDING_MS, retention_seconds=5.0),
            session=SessionConfig(result_gap_timeout_ms=4000),
            auth=AuthConfig(tenants=tenants),
        )
        self.fleet = Fleet(clock=self.clock, max_jobs=self.max_jobs)
        features = ["job_ack"] if self.acks else []
        for node_id in self.nodes:
            self.add_node(node_id, features)
        self.engine = SchedulerEngine(
            self.config,
            self.clock,
            registry=self.fleet.registry,
            publisher=self.fleet.publisher,
            quality=QualityTracker(self.config.quality, self.clock),
            tenants=AuthService(self.config.auth, self.clock, self.config.limits),
            rng=random.Random(self.seed),
        )
        #: what each node and each session was sent, in order
        self.to_node: dict[str, list[JobAssign | JobCancel]] = defaultdict(list)
        self.to_session: dict[str, list[a.SessionOutput]] = defaultdict(list)
        #: nodes whose outbox refuses what it is given
        self.broken: set[str] = set()
        self.actions: list[a.Action] = []
        self._in_tick = False
        #: reservations asked for and not answered yet; members the "shared store" holds; timers armed
        self.pending_reserves: list[a.Reserve] = []
        self.shared_members: set[str] = set()
        self.timers: list[ev.RefusedNodeRetry] = []
        limits = {"t1": QuotaLimits(daily_seconds=self.daily_quota_s)} if self.daily_quota_s else {}
        self.quotas = QuotaBook(self.clock, limits)

    def add_node(self, node_id: str, features: list[str] | None = None) -> None:
        fleet = self.fleet
        spec = Spec(langs=self.langs)
        msg = msgspec.structs.replace(
            spec.register(node_id), protocol_features=features if features is not None else ["job_ack"]
        )
        conn = object()
        fleet.registry.register(msg, conn)
        fleet.conns[node_id], fleet.specs[node_id] = conn, spec
        fleet.heartbeat(node_id)
        fleet.publish()

    # --- driving ----------------------------------------------------------------------------------

    def feed(self, *events: ev.Event) -> list[a.Action]:
        """Feed events and carry out the answer; a ``WakeTimer`` runs the timer's turn right after,
        as the runtime's timer task does."""
        out = self.engine.handle_stimulus(*events)
        self.engine.validate()
        self._carry_out(out)
        if any(isinstance(x, a.WakeTimer) for x in out) and self.engine.store.waiting and not self._in_tick:
            self._in_tick = True
            try:
                self._carry_out(self.engine.handle_stimulus(ev.Tick()))
                self.engine.validate()
            finally:
                self._in_tick = False
        return out

    def _carry_out(self, actions: list[a.Action]) -> None:
        for action in actions:
            self.actions.append(action)
            match action:
                case a.AssignJob(node_id=node_id, assign=assign, on_sent=then):
                    if node_id in self.broken:
                        self.feed(ev.AssignUndelivered(assign.job_id, assign.attempt_id, node_id))
                        continue
                    self.to_node[node_id].append(assign)
                    self._carry_out(list(then))
                case a.SendToNode(node_id=node_id, message=msg):
                    self.to_node[node_id].append(msg)
                case a.SendToSession(session_id=sid, message=msg):
                    self.to_session[sid].append(msg)
                case a.Reserve():
                    self.pending_reserves.append(action)
                case a.ReleaseSlot(member=member):
                    self.shared_members.discard(member)
                case a.ArmTimer(event=event):
                    self.timers.append(event)
                case a.AudioAdmitted(tenant_id=tenant, seconds=seconds):
                    self.quotas.consume(tenant, seconds)
                case a.SendToRoomGroup(plan=plan, group=group, message=msg):
                    # the room relay's part: the group's planned recipients (all still in the room here)
                    for member in plan.groups[group].recipients:
                        self.to_session[member].append(msg)
                case _:
                    pass

    def answer(self, reserve: a.Reserve, *, ok: bool, broken: bool = False) -> None:
        """The shared store's answer to ``reserve`` (a slot taken when ``ok``)."""
        self.pending_reserves.remove(reserve)
        if broken:
            self.feed(ev.ReservationFailed(reserve.job_id, reserve.attempt, reserve.node_id, broken=True))
            return
        if ok:
            self.shared_members.add(reserve.member)
        r = reserve
        self.feed(ev.ReservationAnswered(r.job_id, r.attempt, r.node_id, r.member, ok, "" if ok else "FULL"))

    def open(
        self,
        sid: str = "s1",
        *,
        tenant: str | None = None,
        targets: tuple[str, ...] = ("zh",),
        metadata: dict[str, str] | None = None,
        pinned: str | None = None,
        pinned_only: bool = False,
    ) -> str:
        init = SessionInit(
            client_version="1", platform="web", src_lang="en", tgt_lang=targets[0], metadata=metadata
        )
        self.feed(
            ev.SessionOpened(
                sid, tenant, f"trace-{sid}", init, "en", targets, pinned=pinned, pinned_only=pinned_only
            )
        )
        return sid

    def speak(
        self, sid: str, *indices: int, reason: CutReason = CutReason.PAUSE, room: RoomSnapshot | None = None
    ) -> None:
        utts = tuple(utterance(i, reason) for i in indices)
        quota = self.quotas.allowance(self.engine.tenant_of(sid))  # as the runtime asks the recorder
        self.feed(ev.UtterancesReady(sid, utts, received_at=0.0, room=room, quota=quota))

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.feed(ev.Tick())

    # --- node side --------------------------------------------------------------------------------

    def assigns(self, node_id: str) -> list[JobAssign]:
        return [m for m in self.to_node[node_id] if isinstance(m, JobAssign)]

    def cancels(self, node_id: str) -> list[JobCancel]:
        return [m for m in self.to_node[node_id] if isinstance(m, JobCancel)]

    def all_assigns(self) -> list[tuple[str, JobAssign]]:
        return [(n, m) for n in self.to_node for m in self.assigns(n)]

    def ack(self, node_id: str, assign: JobAssign) -> None:
        self.feed(
            ev.NodeJobReport(
                node_id,
                JobAck(
                    job_id=assign.job_id,
                    attempt_id=assign.attempt_id,
                    node_id=node_id,
                    session_id=assign.session_id,
                    trace_id=assign.trace_id,
                ),
            )
        )

    def result(
        self,
        node_id: str,
        assign: JobAssign,
        *,
        ok: bool = True,
        code: str = "INTERNAL_ERROR",
        speech: bool = True,
    ) -> None:
        self.feed(
            ev.NodeJobReport(
                node_id,
                JobResult(
                    job_id=assign.job_id,
                    attempt_id=assign.attempt_id,
                    node_id=node_id,
                    session_id=assign.session_id,
                    utterance_index=assign.utterance_index,
                    success=ok,
                    trace_id=assign.trace_id,
                    text_asr="hello" if ok else None,
                    text_translated="ni hao" if ok else None,
                    tts_audio="AAAA" if ok and speech else None,
                    error=None if ok else JobError(code=code, message="it broke"),
                ),
            )
        )

    # --- session side -----------------------------------------------------------------------------

    def outcomes(self, sid: str) -> list[tuple[int, str]]:
        """(utterance index, "result" or "missing:<reason>") in the order the session got them."""
        out: list[tuple[int, str]] = []
        for m in self.to_session[sid]:
            if isinstance(m, TranslationResult):
                out.append((m.utterance_index, "result"))
            elif isinstance(m, MissingResult):
                out.append((m.utterance_index, f"missing:{m.reason.value}"))
        return out

    def errors(self, sid: str) -> list[str]:
        return [m.code for m in self.to_session[sid] if isinstance(m, ErrorMessage)]

    def ui(self, sid: str) -> list[str]:
        return [m.event.value.lower() for m in self.to_session[sid] if isinstance(m, UiEvent)]

    def counted(self, name: str, label: str | None = None) -> int:
        return sum(1 for x in self.actions if isinstance(x, a.Count) and x.name == name and x.label == label)

    def ended(self) -> list[a.JobEnded]:
        return [x for x in self.actions if isinstance(x, a.JobEnded)]

    def admitted(self) -> list[int]:
        return [x.utterance_index for x in self.actions if isinstance(x, a.AudioAdmitted)]


def only_assign(w: World) -> tuple[str, JobAssign]:
    [(node_id, assign)] = w.all_assigns()
    return node_id, assign


# --- the way through: utterance -> job_assign -> translation_result ------------------------------


def test_an_utterance_becomes_one_assign_and_one_result() -> None:
    w = World()
    sid = w.open()
    w.speak(sid, 0)
    node_id, assign = only_assign(w)
    assert (assign.session_id, assign.utterance_index, assign.src_lang, assign.tgt_lang) == (
        sid,
        0,
        "en",
        "zh",
    )
    assert w.ui(sid) == ["dispatched"]
    w.ack(node_id, assign)
    w.result(node_id, assign)
    assert w.outcomes(sid) == [(0, "result")]
    assert w.ui(sid) == ["dispatched", "node_accepted", "asr_final", "nmt_done"]
    assert any(isinstance(x, a.SessionDelivered) for x in w.actions)
    assert w.engine.settled(sid) and w.engine.tracked_jobs() == 0
    assert w.fleet.registry.nodes[node_id].load.inflight == 0
    assert w.counted("jobs", "completed") == 1
    assert [line for line in w.engine.story(assign.job_id) if "completed" in line]


# --- failover ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "why"),
    [
        ("ack_timeout", "ack_timeout"),
        ("exec_timeout", "exec_timeout"),
        ("node_error", "node_error"),
        ("node_lost", "node_lost"),
        ("remote_dispatch_failed", "send_failed"),
    ],
)
def test_failover_moves_the_job_to_the_other_node_and_the_session_sees_one_result(
    case: str, why: str
) -> None:
    w = World()
    sid = w.open()
    w.speak(sid, 0)
    first_node, first = w.all_assigns()[0]
    if case == "ack_timeout":
        w.advance(ACK_MS / 1000 + 0.1)
    elif case == "exec_timeout":
        w.ack(first_node, first)
        w.advance(61.0)  # past the execution ceiling (exec_timeout_max_ms)
    elif case == "node_error":
        w.ack(first_node, first)
        w.result(first_node, first, ok=False, code="MODEL_NOT_AVAILABLE")
    elif case == "node_lost":
        w.ack(first_node, first)
        w.fleet.disconnect(first_node)
        w.feed(ev.NodeGone(first_node))
    elif case == "remote_dispatch_failed":
        w.feed(ev.RemoteDispatchFailed(first.job_id, first.attempt_id, first_node, "store lost it"))
    [_, (second_node, second)] = w.all_assigns()
    assert second_node != first_node and second.job_id == first.job_id and second.attempt_id == 2
    assert w.counted("failovers", why) == 1
    if case in ("ack_timeout", "exec_timeout"):
        assert [c.job_id for c in w.cancels(first_node)] == [first.job_id]  # the old attempt is stopped
    else:
        assert w.cancels(first_node) == []  # it ended there already (or never began)
    w.ack(second_node, second)
    w.result(second_node, second)
    assert w.outcomes(sid) == [(0, "result")]
    assert w.engine.tracked_jobs() == 0
    assert all(w.fleet.registry.nodes[n].load.inflight == 0 for n in w.nodes if n in w.fleet.registry.nodes)


def test_an_assign_the_outbox_refuses_fails_over_without_a_dispatched_event() -> None:
    w = World(nodes=("n1",))
    w.broken = {"n1"}
    sid = w.open()
    w.speak(sid, 0)
    assert w.counted("failovers", "send_failed") == 1 and w.all_assigns() == []
    assert w.ui(sid) == []  # DISPATCHED follows only an assign the node's outbox took
    assert w.engine.store.waiting == 1  # n1 was tried: the job waits for another node
    w.add_node("n2")
    w.feed(ev.CapacityChanged())
    [(node_id, assign)] = w.all_assigns()
    assert (node_id, assign.attempt_id) == ("n2", 2) and w.ui(sid) == ["dispatched"]


def test_a_job_out_of_attempts_ends_with_an_explicit_failure() -> None:
    w = World(nodes=("n1", "n2", "n3"))
    sid = w.open()
    w.speak(sid, 0)
    for _ in range(3):  # max_attempts
        node_id, assign = w.all_assigns()[-1]
        w.ack(node_id, assign)
        w.result(node_id, assign, ok=False, code="NODE_OVERLOADED")
        w.advance(0.01)
    assert w.outcomes(sid) == [(0, "missing:job_failed")]
    assert w.errors(sid) == ["NODE_OVERLOADED"]
    assert w.ui(sid)[-1] == "error"
    assert any(isinstance(x, a.RecordEvent) and x.kind == "job_failed" for x in w.actions)
    assert w.engine.settled(sid) and w.engine.tracked_jobs() == 0


def test_a_stale_message_of_an_old_attempt_is_dropped_and_counted() -> None:
    w = World()
    sid = w.open()
    w.speak(sid, 0)
    first_node, first = only_assign(w)
    w.advance(ACK_MS / 1000 + 0.1)
    w.ack(first_node, first)  # too late: the job moved on
    assert w.counted("stale_messages") == 1
    second_node, second = w.all_assigns()[-1]
    w.ack(second_node, second)
    w.result(second_node, second)
    assert w.outcomes(sid) == [(0, "result")]


def test_no_node_fails_the_job_after_the_pending_wait() -> None:
    w = World(nodes=())
    sid = w.open()
    w.speak(sid, 0)
    assert w.all_assigns() == [] and w.engine.store.waiting == 1
    w.advance(PENDING_MS / 1000 + 0.1)
    assert w.outcomes(sid) == [(0, "missing:job_failed")]
    assert w.errors(sid) == ["NO_AVAILABLE_NODE"]


# --- ordering -------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [(2, 0, 1), (1, 2, 0), (2, 1, 0), (0, 1, 2)])
def test_results_reach_the_session_in_utterance_order(order: tuple[int, int, int]) -> None:
    w = World(nodes=("n1", "n2", "n3"))
    sid = w.open()
    w.speak(sid, 0, 1, 2)
    by_index = {m.utterance_index: (n, m) for n, m in w.all_assigns()}
    assert sorted(by_index) == [0, 1, 2]
    for i in order:
        node_id, assign = by_index[i]
        w.ack(node_id, assign)
        w.result(node_id, assign)
    assert w.outcomes(sid) == [(0, "result"), (1, "result"), (2, "result")]


def test_a_failed_utterance_does_not_hold_back_the_next() -> None:
    w = World(nodes=("n1",))
    sid = w.open()
    w.speak(sid, 0, 1)
    by_index = {m.utterance_index: (n, m) for n, m in w.all_assigns()}
    n1, second = by_index[1]
    w.ack(n1, second)
    w.result(n1, second)  # 1 done first: held behind 0
    assert w.outcomes(sid) == []
    w.feed(ev.CancelJob(by_index[0][1].job_id, "operator"))
    assert w.outcomes(sid) == [(0, "missing:job_failed"), (1, "result")]
    assert w.errors(sid) == ["JOB_CANCELLED"]


# --- cancel ---------------------------------------------------------------------------------------


def test_session_close_cancels_its_live_jobs_on_their_nodes() -> None:
    w = World()
    sid = w.open()
    w.speak(sid, 0)
    node_id, assign = only_assign(w)
    w.feed(ev.SessionClosed(sid, "connection closed"))
    assert [c.job_id for c in w.cancels(node_id)] == [assign.job_id]
    assert w.engine.store.get(assign.job_id).state is JobState.CANCELLED  # type: ignore[union-attr]
    assert w.fleet.registry.nodes[node_id].load.inflight == 0
    assert sid not in w.engine.sessions and w.counted("jobs", "cancelled") == 1
    w.result(node_id, assign)  # the node finishes anyway: nothing reaches the gone session
    assert w.outcomes(sid) == []


def test_operator_cancel_of_an_ended_job_changes_nothing() -> None:
    w = World()
    sid = w.open()
    w.speak(sid, 0)
    node_id, assign = only_assign(w)
    w.ack(node_id, assign)
    w.result(node_id, assign)
    before = len(w.to_session[sid])
    assert w.feed(ev.CancelJob(assign.job_id, "late")) == []
    assert w.feed(ev.CancelJob("no-such-job", "typo")) == []
    assert len(w.to_session[sid]) == before


def test_fail_all_ends_every_live_job_explicitly_in_order() -> None:
    w = World()
    sid = w.open()
    w.speak(sid, 0, 1)
    w.feed(ev.FailAll("SCHEDULER_SHUTTING_DOWN", "bye"))
    assert w.outcomes(sid) == [(0, "missing:job_failed"), (1, "missing:job_failed")]
    assert w.errors(sid) == ["SCHEDULER_SHUTTING_DOWN", "SCHEDULER_SHUTTING_DOWN"]
    assert w.engine.store.inflight == 0 and w.engine.tracked_jobs() == 0


# --- backlog --------------------------------------------------------------------------------------


def test_the_backlog_drains_as_slots_free() -> None:
    w = World(nodes=("n1",), max_jobs=1)
    sid = w.open()
    w.speak(sid, 0, 1, 2)
    [(_, first)] = w.all_assigns()
    assert w.engine.store.waiting == 2
    for expected in (1, 2):
        w.ack("n1", first)
        w.result("n1", first)
        assert any(isinstance(x, a.WakeTimer) for x in w.actions)
        w.feed(ev.CapacityChanged())  # the runtime's wake-up after a freed slot
        first = w.assigns("n1")[-1]
        assert first.utterance_index == expected
    w.ack("n1", first)
    w.result("n1", first)
    assert w.outcomes(sid) == [(0, "result"), (1, "result"), (2, "result")]
    assert w.engine.store.waiting == 0


def test_a_busy_node_keeps_its_job_waiting_past_the_pending_wait() -> None:
    w = World(nodes=("n1",), max_jobs=1)
    sid = w.open()
    w.speak(sid, 0, 1)
    [first] = w.assigns("n1")
    w.ack("n1", first)
    w.advance(PENDING_MS / 1000 + 0.5)  # the node is only busy: job 1 waits for it, not failing
    assert w.engine.store.waiting == 1 and w.errors(sid) == []
    w.result("n1", first)
    second = w.assigns("n1")[-1]
    assert second.utterance_index == 1
    w.ack("n1", second)
    w.result("n1", second)
    assert w.outcomes(sid) == [(0, "result"), (1, "result")]


# --- tenant rate --------------------------------------------------------------------------------


def test_an_utterance_over_the_tenant_rate_gets_no_job_and_an_explicit_refusal() -> None:
    w = World(rate=1.0)
    sid = w.open(tenant="t1")
    w.speak(sid, 0, 1)  # burst 1: the second is over the rate
    assert [m.utterance_index for _, m in w.all_assigns()] == [0]
    assert w.errors(sid) == ["TENANT_RATE_LIMITED"]
    assert w.outcomes(sid) == []  # 1 waits behind 0 in order
    n, assign = only_assign(w)
    w.ack(n, assign)
    w.result(n, assign)
    assert w.outcomes(sid) == [(0, "result"), (1, "missing:job_failed")]
    w.clock.advance(1.0)
    w.speak(sid, 2)  # the bucket refilled
    assert len(w.all_assigns()) == 2


def test_a_full_result_queue_refuses_the_utterance_at_once() -> None:
    w = World()
    sid = w.open()
    limit = w.config.session.max_pending_results
    w.speak(sid, *range(limit + 1))
    assert (limit, "missing:queue_full") in w.outcomes(sid)
    assert w.counted("refused_utterances", "queue_full") == 1


# --- the integrator's hooks: metadata, usage, quota, a client's cancel ----------------------------


def test_the_sessions_metadata_rides_the_assign_and_comes_back_on_the_result() -> None:
    w = World()
    meta = {"domain": "medical", "customer_ref": "c-42"}
    sid = w.open(metadata=meta)
    w.speak(sid, 0)
    node_id, assign = only_assign(w)
    assert assign.metadata == meta
    w.ack(node_id, assign)
    w.result(node_id, assign)
    [result] = [m for m in w.to_session[sid] if isinstance(m, TranslationResult)]
    assert result.metadata == meta
    [ended] = w.ended()
    assert ended.metadata == meta


def test_a_completed_job_ends_once_with_its_audio_and_speech_before_the_delivery() -> None:
    w = World()
    sid = w.open(tenant="t9")
    w.speak(sid, 0)
    node_id, assign = only_assign(w)
    w.ack(node_id, assign)
    w.result(node_id, assign)
    [ended] = w.ended()
    assert (ended.job_id, ended.session_id, ended.tenant_id, ended.outcome) == (
        assign.job_id,
        sid,
        "t9",
        "completed",
    )
    assert (ended.src_lang, ended.tgt_lang, ended.utterance_index) == ("en", "zh", 0)
    # 100 ms of source audio; "AAAA" is 3 bytes of pcm16 at 16 kHz
    assert ended.audio_seconds == 0.1 and ended.tts_seconds == 3 / 32000
    assert ended.code is None
    at = w.actions.index(ended)
    delivered = [i for i, x in enumerate(w.actions) if isinstance(x, a.SendToSession | a.SessionDelivered)]
    assert delivered[-2:] and all(i > at for i in delivered[-2:]), "the usage comes before the delivery"
    assert w.admitted() == [0]


@pytest.mark.parametrize("how", ["node_error", "no_node", "exec_timeout", "operator", "session_closed"])
def test_every_other_end_is_one_job_ended_with_its_outcome(how: str) -> None:
    w = World(nodes={"no_node": (), "exec_timeout": ("n1", "n2", "n3")}.get(how, ("n1",)))
    sid = w.open()
    w.speak(sid, 0)
    [job] = w.engine.store.jobs_of(sid)
    if how == "node_error":
        node_id, assign = only_assign(w)
        w.result(node_id, assign, ok=False, code="ASR_FAILED")
    elif how == "no_node":
        w.advance(PENDING_MS / 1000 + 0.5)
    elif how == "exec_timeout":
        for _ in range(w.config.jobs.max_attempts):  # each attempt on a node not tried yet
            node_id, assign = w.all_assigns()[-1]
            w.ack(node_id, assign)
            w.advance(61.0)
        assert len(w.all_assigns()) == w.config.jobs.max_attempts
    elif how == "operator":
        w.feed(ev.CancelJob(job.job_id, "operator"))
    else:
        w.feed(ev.SessionClosed(sid, "gone"))
    outcome = {"exec_timeout": "timed_out", "operator": "cancelled", "session_closed": "cancelled"}
    [ended] = w.ended()
    assert ended.job_id == job.job_id and ended.outcome == outcome.get(how, "failed")
    assert ended.audio_seconds == 0.0 and ended.tts_seconds == 0.0
    if ended.outcome == "failed":
        assert ended.code == job.error_code and ended.code is not None and ended.message
    assert job.terminal


def test_a_quota_refuses_the_utterance_that_would_go_over_it_even_within_one_event() -> None:
    w = World(daily_quota_s=0.25)
    sid = w.open(tenant="t1")
    w.speak(sid, 0, 1, 2)  # 0.1 s each: the third would make 0.3 s of 0.25
    assert [m.utterance_index for _, m in w.all_assigns()] == [0, 1]
    assert w.admitted() == [0, 1]
    [refusal] = [m for m in w.to_session[sid] if isinstance(m, ErrorMessage)]
    assert refusal.code == "QUOTA_EXCEEDED"
    assert isinstance(refusal.details, dict)
    assert refusal.details["period"] == "daily" and refusal.details["utterance_index"] == 2
    assert refusal.details["limit_seconds"] == 0.25 and "reset_at" in refusal.details
    for node_id, assign in w.all_assigns():
        w.ack(node_id, assign)
        w.result(node_id, assign)
    assert w.outcomes(sid) == [(0, "result"), (1, "result"), (2, "missing:job_failed")]
    assert w.quotas.used("t1", Period.DAILY) == pytest.approx(0.2)
    w.speak(sid, 3)  # the next event sees the spent quota too
    assert w.errors(sid) == ["QUOTA_EXCEEDED", "QUOTA_EXCEEDED"] and w.admitted() == [0, 1]


def test_the_tenant_rate_decides_before_the_quota_and_spends_none_of_it() -> None:
    w = World(rate=1.0, daily_quota_s=0.25)
    sid = w.open(tenant="t1")
    w.speak(sid, 0, 1)  # burst 1: 1 is over the rate
    assert w.errors(sid) == ["TENANT_RATE_LIMITED"] and w.admitted() == [0]
    assert w.quotas.used("t1", Period.DAILY) == pytest.approx(0.1)
    w.clock.advance(1.0)
    w.speak(sid, 2)  # within the quota because 1 spent none of it
    assert w.admitted() == [0, 2] and len(w.all_assigns()) == 2
    w.clock.advance(1.0)
    w.speak(sid, 3)
    assert w.errors(sid) == ["TENANT_RATE_LIMITED", "QUOTA_EXCEEDED"] and w.admitted() == [0, 2]


def test_a_client_cancels_one_utterance_every_target_of_it_and_nothing_else() -> None:
    w = World()
    sid = w.open(targets=("zh", "en"))
    w.speak(sid, 0, 1)
    assert len(w.all_assigns()) == 4
    zero = {m.job_id for _, m in w.all_assigns() if m.utterance_index == 0}
    assert sorted(w.engine.cancellable(sid, 0)) == sorted(zero)
    w.feed(ev.CancelUtterance(sid, 0, "cancelled by the client"))
    cancelled = {c.job_id for n in w.to_node for c in w.cancels(n)}
    assert cancelled == zero
    assert w.errors(sid) == ["JOB_CANCELLED", "JOB_CANCELLED"]
    assert w.outcomes(sid) == [(0, "missing:job_failed")] * 2  # one per target, as for its results
    assert sorted(e.job_id for e in w.ended() if e.outcome == "cancelled") == sorted(zero)
    assert w.engine.cancellable(sid, 0) == []
    assert w.feed(ev.CancelUtterance(sid, 0, "again")) == []  # nothing live: nothing changes
    for node_id, assign in w.all_assigns():
        if assign.utterance_index == 1:
            w.ack(node_id, assign)
            w.result(node_id, assign)
    assert w.outcomes(sid) == [(0, "missing:job_failed")] * 2 + [(1, "result")] * 2
    assert w.engine.settled(sid) and w.engine.tracked_jobs() == 0


def test_pair_counter_is_bounded() -> None:
    w = World(nodes=())
    for i in range(MAX_COUNTED_PAIRS + 50):
        sid = w.open(f"s{i}", targets=(f"x{i}",))
        w.speak(sid, 0)
        w.feed(ev.SessionClosed(sid, "done"))
    assert len(w.engine.created_by_pair) == MAX_COUNTED_PAIRS + 1
    assert w.engine.created_by_pair[OTHER_PAIR] == 50


# --- instances ------------------------------------------------------------------------------------


def test_shared_slots_reserve_first_and_a_refusal_leaves_the_node_alone_briefly() -> None:
    w = World(nodes=("n1",))
    w.feed(ev.SharedSlotsRequired(True))
    sid = w.open()
    w.speak(sid, 0)
    assert w.all_assigns() == []
    [reserve] = [x for x in w.actions if isinstance(x, a.Reserve)]
    assert reserve.node_id == "n1" and w.engine.placing() == {reserve.job_id}
    w.feed(ev.ReservationAnswered(reserve.job_id, reserve.attempt, "n1", reserve.member, False, "FULL"))
    [timer] = [x for x in w.actions if isinstance(x, a.ArmTimer)]
    assert timer.event == ev.RefusedNodeRetry("n1") and w.all_assigns() == []
    w.feed(timer.event)
    reserve = [x for x in w.actions if isinstance(x, a.Reserve)][-1]
    w.feed(ev.ReservationAnswered(reserve.job_id, reserve.attempt, "n1", reserve.member, True))
    n, assign = only_assign(w)
    w.ack(n, assign)
    assert any(isinstance(x, a.CommitSlot) and x.member == reserve.member for x in w.actions)
    w.result(n, assign)
    assert any(isinstance(x, a.ReleaseSlot) and x.member == reserve.member for x in w.actions)
    assert w.outcomes(sid) == [(0, "result")]


def test_a_reservation_answered_for_a_job_gone_meanwhile_is_released() -> None:
    w = World(nodes=("n1",))
    w.feed(ev.SharedSlotsRequired(True))
    sid = w.open()
    w.speak(sid, 0)
    [reserve] = [x for x in w.actions if isinstance(x, a.Reserve)]
    w.feed(ev.SessionClosed(sid, "gone"))
    w.feed(ev.ReservationAnswered(reserve.job_id, reserve.attempt, "n1", reserve.member, True))
    assert any(isinstance(x, a.ReleaseSlot) and x.member == reserve.member for x in w.actions)
    assert w.all_assigns() == [] and w.engine.tracked_jobs() == 0


def test_a_broken_reservation_fails_the_job_explicitly() -> None:
    w = World(nodes=("n1",))
    w.feed(ev.SharedSlotsRequired(True))
    sid = w.open()
    w.speak(sid, 0)
    [reserve] = [x for x in w.actions if isinstance(x, a.Reserve)]
    w.feed(ev.ReservationFailed(reserve.job_id, reserve.attempt, "n1", broken=True))
    assert w.outcomes(sid) == [(0, "missing:job_failed")] and w.errors(sid) == ["INTERNAL_ERROR"]


def test_held_reservations_give_an_unreserved_attempt_its_member() -> None:
    w = World(nodes=("n1",))
    sid = w.open()
    w.speak(sid, 0)
    _, assign = only_assign(w)
    held = w.engine.held_reservations()
    assert held == {"n1": [(f"{assign.job_id}:1", ACK_MS + 1000)]}
    w.ack("n1", assign)
    w.result("n1", assign)
    assert any(isinstance(x, a.ReleaseSlot) and x.member == f"{assign.job_id}:1" for x in w.actions)


def test_a_message_for_a_job_not_held_here_goes_to_its_owner() -> None:
    w = World(nodes=("n1",))
    msg = JobResult(
        job_id="elsewhere",
        attempt_id=1,
        node_id="n1",
        session_id="s9",
        utterance_index=0,
        success=True,
        trace_id="t",
    )
    out = w.feed(ev.NodeJobReport("n1", msg))
    assert a.ForwardToOwner("n1", msg) in out


def test_a_node_of_another_instance_is_assigned_through_its_owner() -> None:
    w = World(nodes=("n1",))
    w.fleet.registry.nodes["n1"].owner = "instance-b"  # as a remote record would make it
    sid = w.open()
    w.speak(sid, 0)
    [assign] = [x for x in w.actions if isinstance(x, a.AssignJob)]
    assert assign.owner == "instance-b"


# --- turns and affinity -----------------------------------------------------------------------------


def test_turn_continuation_binds_to_the_node_holding_the_turn() -> None:
    w = World(nodes=("n1", "n2"), max_jobs=1)
    sid = w.open()
    w.speak(sid, 0, reason=CutReason.MAX_DURATION)
    node_id, _ = only_assign(w)
    w.speak(sid, 1)  # continues the turn: bound to the same node, even at capacity
    assigns = w.all_assigns()
    assert [n for n, _ in assigns] == [node_id, node_id]
    assert assigns[1][1].utterance_index == 1
    assert w.engine.route_of(sid) is not None and w.engine.route_of(sid).last_node == node_id  # type: ignore[union-attr]
    assert w.engine.store.get(assigns[1][1].job_id).spec.turn_id == f"{sid}:0"  # type: ignore[union-attr]


def test_a_turn_continuation_reserves_its_node_past_the_shared_bound() -> None:
    """In the shared store a continuation is bound to its node even at capacity, as in selection: its
    reservation is taken without the node's bound (the store would answer FULL and move it off)."""
    w = World(nodes=("n1", "n2"), max_jobs=1)
    w.feed(ev.SharedSlotsRequired(True))
    sid = w.open()
    w.speak(sid, 0, reason=CutReason.MAX_DURATION)
    [first] = [x for x in w.actions if isinstance(x, a.Reserve)]
    assert first.slots < BOUND_CONTINUATION_SLOTS  # the node's own bound
    w.feed(ev.ReservationAnswered(first.job_id, first.attempt, first.node_id, first.member, True))
    node_id, _ = only_assign(w)
    w.speak(sid, 1)
    second = [x for x in w.actions if isinstance(x, a.Reserve)][-1]
    assert second.node_id == node_id and second.slots == BOUND_CONTINUATION_SLOTS
    w.feed(ev.ReservationAnswered(second.job_id, second.attempt, node_id, second.member, True))
    assert [n for n, _ in w.all_assigns()] == [node_id, node_id]


def test_soft_affinity_prefers_the_previous_node() -> None:
    w = World(nodes=("n1", "n2", "n3"))
    sid = w.open()
    for i in range(4):
        w.speak(sid, i)
        node_id, assign = w.all_assigns()[-1]
        w.ack(node_id, assign)
        w.result(node_id, assign)
    assert len({n for n, _ in w.all_assigns()}) == 1
    assert w.counted("affinity", "hit") == 3


def test_partials_pass_to_the_session() -> None:
    w = World()
    sid = w.open()
    w.speak(sid, 0)
    node_id, assign = only_assign(w)
    partial = NodeAsrPartial(
        job_id=assign.job_id,
        node_id=node_id,
        session_id=sid,
        utterance_index=0,
        text="hel",
        is_final=False,
        trace_id=assign.trace_id,
        attempt_id=1,
    )
    w.feed(ev.NodeJobReport(node_id, partial))
    assert "asr_partial" in w.ui(sid)


def test_validate_names_a_broken_invariant() -> None:
    w = World()
    sid = w.open()
    w.speak(sid, 0)
    _, assign = only_assign(w)
    w.engine._slots.pop(assign.job_id)  # what a lost release would leave
    with pytest.raises(InvariantError, match="without a slot"):
        w.engine.validate()


def test_story_tells_the_history_bounded() -> None:
    w = World()
    sid = w.open()
    w.speak(sid, 0)
    node_id, assign = only_assign(w)
    w.advance(ACK_MS / 1000 + 0.1)
    lines = w.engine.story(assign.job_id)
    assert lines[0].startswith(assign.job_id) and "attempt 2" in lines[-1]
    assert any(node_id in line and "dispatched" in line for line in lines)
    assert w.engine.story("nope") == ["nope: unknown (never created here, or evicted)"]


# --- random sequences ------------------------------------------------------------------------------


class EngineMachine(RuleBasedStateMachine):
    """Random interleavings of sessions speaking (alone or in a room) and closing, nodes answering,
    failing, leaving and coming back, time passing and operators acting; every invariant holds after
    each step, and a session that got every answer has nothing outstanding."""

    @initialize()
    def start(self) -> None:
        self.w = World(nodes=("n1", "n2", "n3"), max_jobs=2, seed=7, langs=("en", "zh", "de"))
        self.next_index: dict[str, int] = {}
        self.gone: set[str] = set()
        self.opened = 0

    def _open_sessions(self) -> list[str]:
        return sorted(self.next_index)

    @rule(name=st.sampled_from(["s1", "s2", "s3"]))
    def open_session(self, name: str) -> None:
        # a session id is never reused (new_session_id: 128 random bits): a name opened again after
        # its close is a new session with a new id
        if not any(sid.startswith(f"{name}.") for sid in self.next_index):
            self.opened += 1
            sid = self.w.open(f"{name}.{self.opened}")
            self.next_index[sid] = 0

    @rule(
        data=st.data(),
        n=st.integers(1, 3),
        continued=st.booleans(),
        room=st.sampled_from([(), (("A", "zh"),), (("A", "zh"), ("B", "de"), ("C", "en"))]),
    )
    def speak(self, data: st.DataObject, n: int, continued: bool, room: tuple[tuple[str, str], ...]) -> None:
        """``room``: the other members the speaker's utterances fan out to (none: no room)."""
        if not self.next_index:
            return
        sid = data.draw(st.sampled_from(self._open_sessions()))
        start = self.next_index[sid]
        self.next_index[sid] = start + n
        self.w.speak(
            sid,
            *range(start, start + n),
            reason=CutReason.MAX_DURATION if continued else CutReason.PAUSE,
            room=RoomSnapshot(sid, "room-1", "123456", room) if room else None,
        )

    @rule(data=st.data(), answer=st.sampled_from(["ack", "ok", "fail", "retryable"]))
    def node_answers(self, data: st.DataObject, answer: str) -> None:
        live = [(n, m) for n, m in self.w.all_assigns() if n not in self.gone]
        if not live:
            return
        node_id, assign = live[data.draw(st.integers(0, 10_000)) % len(live)]
        if answer == "ack":
            self.w.ack(node_id, assign)
        else:
            self.w.result(
                node_id, assign, ok=answer == "ok", code="NODE_OVERLOADED" if answer == "retryable" else "X"
            )

    @rule(node_id=st.sampled_from(["n1", "n2", "n3"]))
    def node_leaves_or_returns(self, node_id: str) -> None:
        if node_id in self.gone:
            self.gone.discard(node_id)
            self.w.fleet.reconnect(node_id)
            self.w.fleet.publish()
            self.w.feed(ev.CapacityChanged())
        else:
            self.gone.add(node_id)
            self.w.fleet.disconnect(node_id)
            self.w.feed(ev.NodeGone(node_id))

    @rule(seconds=st.sampled_from([0.1, 0.5, 1.2, 4.5, 20.0]))
    def time_passes(self, seconds: float) -> None:
        self.w.advance(seconds)
        for sid in self._open_sessions():
            self.w.feed(ev.SessionTick(sid))

    @rule(data=st.data())
    def close_session(self, data: st.DataObject) -> None:
        if not self.next_index:
            return
        sid = data.draw(st.sampled_from(self._open_sessions()))
        del self.next_index[sid]
        self.w.feed(ev.SessionClosed(sid, "closed"))

    @rule(data=st.data())
    def operator_cancels(self, data: st.DataObject) -> None:
        jobs = sorted(self.w.engine.store.live(), key=lambda j: (j.session_id, j.utterance_index))
        if jobs:
            job = jobs[data.draw(st.integers(0, 10_000)) % len(jobs)]
            self.w.feed(ev.CancelJob(job.job_id, "operator"))

    @rule(data=st.data())
    def client_cancels_an_utterance(self, data: st.DataObject) -> None:
        if not self.next_index:
            return
        sid = data.draw(st.sampled_from(self._open_sessions()))
        index = data.draw(st.integers(0, max(0, self.next_index[sid] - 1)))
        self.w.feed(ev.CancelUtterance(sid, index, "client"))

    @rule(required=st.booleans())
    def shared_store_comes_or_goes(self, required: bool) -> None:
        self.w.feed(ev.SharedSlotsRequired(required))

    @rule(data=st.data(), answer=st.sampled_from(["ok", "refused", "broken"]))
    def store_answers_a_reservation(self, data: st.DataObject, answer: str) -> None:
        pending = self.w.pending_reserves
        if pending:
            reserve = pending[data.draw(st.integers(0, 10_000)) % len(pending)]
            self.w.answer(reserve, ok=answer == "ok", broken=answer == "broken")

    @rule()
    def retry_timer_fires(self) -> None:
        if self.w.timers:
            self.w.feed(self.w.timers.pop(0))

    @invariant()
    def valid(self) -> None:
        if hasattr(self, "w"):
            self.w.engine.validate()
            held = {slot.member for slot in self.w.engine._slots.values() if slot.member is not None}
            assert held == self.w.shared_members, "a shared slot is held without an attempt, or lost"
            for sid in self._open_sessions():
                indices = [i for i, _ in self.w.outcomes(sid)]
                assert indices == sorted(indices), f"{sid} got its outcomes out of order: {indices}"
            ended = [e.job_id for e in self.w.ended()]
            assert len(ended) == len(set(ended)), "a job ended twice"
            for job in self.w.engine.store:
                assert (job.job_id in ended) is job.terminal, f"{job.job_id} {job.state.value}: JobEnded"


EngineMachine.TestCase.settings = settings(
    max_examples=80, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_engine_machine = EngineMachine.TestCase


def test_a_gap_is_given_up_on_the_session_timer_and_a_late_result_still_delivered() -> None:
    w = World(nodes=("n1", "n2"))
    sid = w.open()
    w.speak(sid, 0, 1)
    by_index = {m.utterance_index: (n, m) for n, m in w.all_assigns()}
    n1, second = by_index[1]
    w.ack(n1, second)
    w.result(n1, second)
    w.clock.advance(4.1)  # past result_gap_timeout_ms: the session's timer fires
    w.feed(ev.SessionTick(sid))
    assert w.outcomes(sid) == [(0, "missing:gap_timeout"), (1, "result")]
    n0, first = by_index[0]
    w.ack(n0, first)
    w.result(n0, first)
    late = [m for m in w.to_session[sid] if isinstance(m, TranslationResult) and m.utterance_index == 0]
    assert len(late) == 1 and late[0].late and w.counted("late_results") == 1


def test_flush_releases_what_the_queue_holds() -> None:
    w = World(nodes=("n1", "n2"))
    sid = w.open()
    w.speak(sid, 0, 1)
    n1, second = next((n, m) for n, m in w.all_assigns() if m.utterance_index == 1)
    w.ack(n1, second)
    w.result(n1, second)
    w.feed(ev.FailAll("SCHEDULER_SHUTTING_DOWN", "bye"), ev.SessionFlush(sid))
    assert w.outcomes(sid) == [(0, "missing:job_failed"), (1, "result")]


def test_a_draining_instance_refuses_other_instances_assigns() -> None:
    w = World()
    assert w.engine.takes_foreign_assign()
    w.feed(ev.DrainBegan())
    assert not w.engine.takes_foreign_assign()


def test_model_not_available_marks_the_service_on_that_node() -> None:
    w = World(nodes=("n1",))
    sid = w.open()
    w.speak(sid, 0)
    _, assign = only_assign(w)
    w.feed(
        ev.NodeJobReport(
            "n1",
            JobResult(
                job_id=assign.job_id,
                attempt_id=assign.attempt_id,
                node_id="n1",
                session_id=sid,
                utterance_index=0,
                success=False,
                trace_id=assign.trace_id,
                error=JobError(
                    code="MODEL_NOT_AVAILABLE", message="no", details={"service_id": "asr-whisper"}
                ),
            ),
        )
    )
    assert len(w.engine.marks) == 1 and w.counted("failovers", "node_error") == 1
    w.speak(sid, 1)  # the only node lacks ASR now: the next job waits
    assert [m.utterance_index for m in w.assigns("n1")] == [0] and w.engine.store.waiting == 2


def test_an_instance_dying_fails_over_the_jobs_on_its_nodes() -> None:
    """Another instance's death removes its nodes from the view (their remote records go): a job of
    ours on one of them moves to a node still there, and nothing is sent to the gone node."""
    w = World(nodes=("n1",))
    w.fleet.registry.nodes["n1"].owner = "instance-b"
    sid = w.open()
    w.speak(sid, 0)
    [first] = [x for x in w.actions if isinstance(x, a.AssignJob)]
    assert first.owner == "instance-b"
    w.add_node("n2")
    w.fleet.registry.remove_remote("n1")
    w.fleet.publish()
    w.feed(ev.NodeGone("n1"))
    [second] = w.assigns("n2")
    assert (second.job_id, second.attempt_id) == (first.assign.job_id, 2)
    assert w.counted("failovers", "node_lost") == 1 and w.cancels("n1") == []
    w.ack("n2", second)
    w.result("n2", second)
    assert w.outcomes(sid) == [(0, "result")]


# --- rooms: the fan-out of a member's utterance -----------------------------------------------------

#: s1 speaks en (its own target zh); A hears zh, B de, C en (the speaker's language: the transcript)
ROOM = RoomSnapshot("s1", "room-1", "123456", (("A", "zh"), ("B", "de"), ("C", "en")))


def room_world(**kw: object) -> World:
    return World(langs=("en", "zh", "de"), **kw)  # type: ignore[arg-type]


def room_messages(w: World, member: str) -> list[TranslationResult | MissingResult]:
    return [m for m in w.to_session[member] if isinstance(m, (TranslationResult, MissingResult))]


def test_a_member_utterance_gets_one_job_per_other_language_and_each_group_its_result() -> None:
    w = room_world()
    sid = w.open()
    w.speak(sid, 0, room=ROOM)
    assigns = w.all_assigns()
    assert sorted(x.tgt_lang for _, x in assigns) == ["de", "zh"]  # en (C's) needs no job
    assert [x.jobs for x in w.actions if isinstance(x, a.FanoutCreated)] == [2]
    assert len([x for x in w.actions if isinstance(x, a.ObserveFanout)]) == 1  # once both are written
    assert w.ui(sid) == ["dispatched"]  # only the speaker's own job's progress
    for node_id, assign in reversed(assigns):
        w.ack(node_id, assign)
        w.result(node_id, assign)
    [own] = room_messages(w, sid)
    zh_job = next(x.job_id for _, x in assigns if x.tgt_lang == "zh")
    assert isinstance(own, TranslationResult) and own.job_id == zh_job and own.room_code == "123456"
    assert own.speaker_session_id is None
    for member, lang in (("A", "zh"), ("B", "de")):
        [got] = room_messages(w, member)
        job = next(x.job_id for _, x in assigns if x.tgt_lang == lang)
        assert isinstance(got, TranslationResult) and got.job_id == job
        assert (got.speaker_session_id, got.utterance_index, got.room_code) == (sid, 0, "123456")
    [transcript] = room_messages(w, "C")
    assert isinstance(transcript, TranslationResult) and transcript.job_id == zh_job
    assert transcript.text_translated == transcript.text_asr and transcript.tts_audio == ""
    assert len(w.engine.fanout) == 0 and w.engine.tracked_jobs() == 0


def test_a_failed_group_job_reaches_exactly_its_recipients_and_not_the_speaker() -> None:
    w = room_world(nodes=("n1",))
    sid = w.open()
    w.speak(sid, 0, room=ROOM)
    by_lang = {x.tgt_lang: (n, x) for n, x in w.all_assigns()}
    node_de, de = by_lang["de"]
    w.ack(node_de, de)
    w.result(node_de, de, ok=False, code="NODE_OVERLOADED")
    w.advance(PENDING_MS / 1000 + 0.1)  # no other node: the job fails
    assert w.engine.store.get(de.job_id).state is JobState.FAILED  # type: ignore[union-attr]
    assert w.errors(sid) == [] and "error" not in w.ui(sid)  # not the speaker's job
    node_zh, zh = by_lang["zh"]
    w.ack(node_zh, zh)
    w.result(node_zh, zh)
    assert [type(m).__name__ for m in room_messages(w, sid)] == ["TranslationResult"]
    [missing] = room_messages(w, "B")
    assert isinstance(missing, MissingResult) and missing.speaker_session_id == sid
    assert missing.reason.value == "job_failed"
    assert [type(m).__name__ for m in room_messages(w, "A")] == ["TranslationResult"]
    assert [type(m).__name__ for m in room_messages(w, "C")] == ["TranslationResult"]


def test_a_speaker_whose_target_no_member_has_gets_its_transcript_only() -> None:
    w = room_world()
    sid = w.open()
    w.speak(sid, 0, room=RoomSnapshot("s1", "room-1", "123456", (("B", "de"),)))
    [(node_id, assign)] = w.all_assigns()
    assert assign.tgt_lang == "de" and w.ui(sid) == ["dispatched"]  # the speaker's only job
    w.ack(node_id, assign)
    w.result(node_id, assign)
    [own] = room_messages(w, sid)
    assert isinstance(own, TranslationResult) and own.text_asr and own.text_translated == ""
    assert own.tts_audio == ""
    [got] = room_messages(w, "B")
    assert isinstance(got, TranslationResult) and got.text_translated and got.tts_audio


def test_a_speaker_session_closing_forgets_its_fanout_and_leaves_its_room() -> None:
    w = room_world()
    sid = w.open()
    w.speak(sid, 0, 1, room=ROOM)
    assert len(w.engine.fanout) == 4
    w.feed(ev.SessionClosed(sid, "closed"))
    assert len(w.engine.fanout) == 0
    assert [x.session_id for x in w.actions if isinstance(x, a.SessionEnded)] == [sid]
    assert all(m.reason == "cancelled" for n in w.nodes for m in w.cancels(n))


def test_every_fanout_job_counts_against_the_tenant_rate() -> None:
    w = room_world(rate=0.001, burst=3)
    sid = w.open(tenant="t1")
    w.speak(sid, 0, room=ROOM)  # two jobs from the bucket of three
    assert len(w.all_assigns()) == 2 and w.errors(sid) == []
    w.speak(sid, 1, room=ROOM)  # two more: one is left, so the utterance is refused
    assert len(w.all_assigns()) == 2 and w.errors(sid) == ["TENANT_RATE_LIMITED"]
    assert [x.jobs for x in w.actions if isinstance(x, a.FanoutCreated)] == [2]


# --- pairing: a session pinned to a node -----------------------------------------------------------


def test_a_paired_session_goes_to_its_node_first() -> None:
    for seed in range(4):  # whatever the selector's randomness, the pinned node is taken
        w = World(nodes=("n1", "n2", "n3"), seed=seed)
        sid = w.open(pinned="n3")
        w.speak(sid, 0)
        assert [n for n, _ in w.all_assigns()] == ["n3"]
        assert w.engine.route_of(sid).pinned == "n3"  # type: ignore[union-attr]


@pytest.mark.parametrize("only", [False, True])
def test_a_paired_session_whose_node_is_gone_falls_back_or_fails_by_configuration(only: bool) -> None:
    w = World(nodes=("n1", "n2"))
    w.fleet.disconnect("n2")
    w.fleet.publish()
    w.feed(ev.NodeGone("n2"))
    sid = w.open(pinned="n2", pinned_only=only)
    w.speak(sid, 0)
    if not only:
        assert [n for n, _ in w.all_assigns()] == ["n1"]
        return
    assert w.all_assigns() == []
    w.advance(PENDING_MS / 1000 + 0.1)
    assert w.all_assigns() == [] and w.errors(sid) == ["NO_AVAILABLE_NODE"]
    assert w.outcomes(sid) == [(0, "missing:job_failed")]


# --- the client's view: what the session's client sees is decided here ----------------------------

NO_TTS = PipelineConfig(use_asr=True, use_nmt=True, use_tts=False)


def speak_numbered(
    w: World, sid: str, *pairs: tuple[int, int], pipeline: PipelineConfig | None = None
) -> None:
    """Whole utterances the client numbered: (our index, the client's index) each."""
    utts = tuple(utterance(i, client_index=c) for i, c in pairs)
    w.feed(ev.UtterancesReady(sid, utts, pipeline=pipeline, received_at=0.0))


def results(w: World, sid: str) -> list[TranslationResult]:
    return [m for m in w.to_session[sid] if isinstance(m, TranslationResult)]


def test_the_client_sees_its_own_utterance_numbers_on_results_progress_errors_and_missing_results() -> None:
    w = World(nodes=("n1",))
    sid = w.open()
    speak_numbered(w, sid, (0, 40), (1, 41))
    assert w.engine.internal_index(sid, 41) == 1 and w.engine.internal_index(sid, 99) == 99
    assert w.engine.outstanding(sid, 3) == [(0, 40), (1, 41), (2, 2)]
    (n, first), (_, second) = w.all_assigns()
    assert (first.utterance_index, second.utterance_index) == (0, 1)  # the node sees our numbers
    w.ack(n, first)
    w.ack(n, second)
    w.result(n, first)
    w.result(n, second, ok=False)
    assert w.outcomes(sid) == [(40, "result"), (41, "missing:job_failed")]
    [error] = [m for m in w.to_session[sid] if isinstance(m, ErrorMessage)]
    assert isinstance(error.details, dict) and error.details["utterance_index"] == 41
    assert {m.utterance_index for m in w.to_session[sid] if isinstance(m, UiEvent)} == {40, 41}
    # settled: the facts are forgotten (bounded), and a later streamed utterance keeps its own number
    assert not w.engine.sessions[sid].client_index
    w.speak(sid, 2)
    [(n, third)] = [(n, x) for n, x in w.all_assigns() if x.utterance_index == 2]
    w.ack(n, third)
    w.result(n, third)
    assert w.outcomes(sid)[-1] == (2, "result")


def test_a_refused_whole_utterance_is_named_by_the_clients_number() -> None:
    w = World(rate=1.0, burst=1)
    sid = w.open(tenant="t1")
    speak_numbered(w, sid, (0, 7), (1, 8))  # the second is over the tenant's rate
    [error] = [m for m in w.to_session[sid] if isinstance(m, ErrorMessage)]
    assert isinstance(error.details, dict) and error.details["utterance_index"] == 8
    n, assign = only_assign(w)
    w.ack(n, assign)
    w.result(n, assign)
    assert w.outcomes(sid) == [(7, "result"), (8, "missing:job_failed")]


def test_results_of_one_exchange_share_a_group_and_a_playback_end_keeps_it_open() -> None:
    w = World(nodes=("n1",))
    sid = w.open()
    window = GROUP_WINDOW_MS / 1000

    def one(index: int) -> TranslationResult:
        w.speak(sid, index)
        [(n, assign)] = [(n, x) for n, x in w.all_assigns() if x.utterance_index == index]
        w.ack(n, assign)
        w.result(n, assign)
        return results(w, sid)[-1]

    first = one(0)
    assert first.group_id is not None and first.group_id.startswith(f"group_{sid}_")
    assert first.part_index == 0
    w.clock.advance(window * 0.75)
    w.feed(ev.PlaybackEnded(sid, first.group_id))
    w.feed(ev.PlaybackEnded(sid, "group_of_someone_else"))  # not the active group: changes nothing
    w.clock.advance(window * 0.75)  # past the window since the group began, within it since playback
    second = one(1)
    assert (second.group_id, second.part_index) == (first.group_id, 1)
    w.clock.advance(window * 1.1)
    third = one(2)
    assert third.group_id != first.group_id and third.part_index == 0


def test_audio_lost_only_where_speech_was_asked_for() -> None:
    w = World(nodes=("n1",))
    sid = w.open()
    speak_numbered(w, sid, (0, 0))
    speak_numbered(w, sid, (1, 1), pipeline=NO_TTS)
    speak_numbered(w, sid, (2, 2))
    by_index = {x.utterance_index: (n, x) for n, x in w.all_assigns()}
    for index, speech in ((0, False), (1, False), (2, True)):
        n, assign = by_index[index]
        w.ack(n, assign)
        w.result(n, assign, speech=speech)
    lost = {r.utterance_index: r.audio_lost for r in results(w, sid)}
    assert lost == {0: True, 1: False, 2: False}
    assert not w.engine.sessions[sid].no_tts  # settled: forgotten
