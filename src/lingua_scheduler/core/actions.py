"""What the scheduler asks the world to do, as typed outputs of ``SchedulerEngine.handle_stimulus``.

Owns the vocabulary of instructions: one frozen record per effect the runtime (server/runtime.py)
carries out -- a message to a node or a session, a shared-store reservation, a job record, a metric,
an operator event, a timer. The engine returns them in the order they must happen; executing them
decides nothing.

Must never: carry a callback, a connection or an untyped message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lingua_scheduler.core.events import JobMessage, RefusedNodeRetry
from lingua_scheduler.core.quality import Change
from lingua_scheduler.core.rooms import FanoutPlan
from lingua_scheduler.core.usage import Outcome
from lingua_scheduler.protocol.common import ErrorMessage
from lingua_scheduler.protocol.node import JobAssign, JobCancel
from lingua_scheduler.protocol.session import AsrPartial, MissingResult, TranslationResult, UiEvent

#: what the engine sends a session
SessionOutput = TranslationResult | AsrPartial | MissingResult | UiEvent | ErrorMessage
#: the counters the engine moves (attribute names of server/metrics.py's ``Metrics``)
CounterName = Literal[
    "silent_utterances",
    "refused_utterances",
    "jobs_created",
    "selections",
    "affinity",
    "stale_messages",
    "early_results",
    "jobs",
    "failovers",
    "late_results",
]
#: the histograms the engine observes (seconds)
HistogramName = Literal["selection_seconds", "job_end_to_end"]
#: the operator event kinds the engine records (server/events.py)
EventKind = Literal["failover", "job_failed"]
Scalar = str | int | float | bool | None


@dataclass(frozen=True, slots=True)
class SendToNode:
    """Write ``message`` to the node: its local outbox, or through the instance it is connected to."""

    node_id: str
    message: JobCancel


@dataclass(frozen=True, slots=True)
class AssignJob:
    """Write ``job_assign`` to the node (local outbox, or its ``owner`` instance's inbox). When a local
    outbox does not take it the runtime reports ``AssignUndelivered`` and skips ``on_sent``."""

    node_id: str
    owner: str | None
    assign: JobAssign
    on_sent: tuple[Action, ...] = ()


@dataclass(frozen=True, slots=True)
class SendToSession:
    session_id: str
    message: SessionOutput


@dataclass(frozen=True, slots=True)
class SendToRoomGroup:
    """A room member's outcome for the members of group ``group`` of ``plan`` still in the planned
    room (the speaker excepted), wherever they are connected (server/room_relay.py)."""

    plan: FanoutPlan
    group: int
    message: TranslationResult | MissingResult


@dataclass(frozen=True, slots=True)
class FanoutCreated:
    """``jobs`` jobs were created for one room member's utterance (``lingua_fanout_jobs_total``)."""

    jobs: int


@dataclass(frozen=True, slots=True)
class ObserveFanout:
    """The last ``job_assign`` of a room member's utterance was written: its fan-out overhead ran from
    ``received_at`` (perf_counter)."""

    received_at: float


@dataclass(frozen=True, slots=True)
class SessionEnded:
    """The session's book is gone (its jobs cancelled): it leaves its room, the others are told."""

    session_id: str


@dataclass(frozen=True, slots=True)
class SessionDelivered:
    """A delivery to the session is complete (already in its client's view)."""

    session_id: str
    #: the session is closing (``SessionClosing``): it may finish its close now
    closing: bool = False


@dataclass(frozen=True, slots=True)
class AudioAdmitted:
    """An utterance passed the tenant's job rate and quota and gets its jobs: its audio is metered
    as received and spent from the quota (the observer, server/usage_recorder.py)."""

    session_id: str
    tenant_id: str | None
    src_lang: str
    tgt_lang: str
    utterance_index: int
    seconds: float


@dataclass(frozen=True, slots=True)
class JobEnded:
    """A job reached its end (the observer meters it; a failure sends ``job.failed``). Emitted before
    the delivery that may end its session. ``audio_seconds`` and ``tts_seconds``: what a completed job
    translated and synthesized (0 otherwise); ``code``/``message``: a failure's."""

    job_id: str
    session_id: str
    tenant_id: str | None
    src_lang: str
    tgt_lang: str
    utterance_index: int
    outcome: Outcome
    audio_seconds: float = 0.0
    tts_seconds: float = 0.0
    #: the integrator's per-job metadata (the job spec's own mapping, never changed)
    metadata: dict[str, str] | None = None
    code: str | None = None
    message: str | None = None


@dataclass(frozen=True, slots=True)
class Reserve:
    """Take a slot on ``node_id`` in the shared store; the answer comes back as an event."""

    job_id: str
    attempt: int
    node_id: str
    member: str
    slots: int
    ttl_ms: int


@dataclass(frozen=True, slots=True)
class ReleaseSlot:
    node_id: str
    member: str


@dataclass(frozen=True, slots=True)
class CommitSlot:
    """The attempt runs: its reservation lives for the execution from now on."""

    node_id: str
    member: str
    ttl_ms: int


@dataclass(frozen=True, slots=True)
class RecordJob:
    """The job's state for the shared job records (written in batches by the cluster shell)."""

    job_id: str
    state: str
    attempt: int
    node_id: str | None
    session_id: str
    terminal: bool


@dataclass(frozen=True, slots=True)
class ForwardToOwner:
    """A job message from our node for a job this instance does not hold: to the job's owner."""

    node_id: str
    message: JobMessage


@dataclass(frozen=True, slots=True)
class RecordEvent:
    """An entry of the operator's recent-events log."""

    kind: EventKind
    fields: tuple[tuple[str, Scalar], ...]


@dataclass(frozen=True, slots=True)
class Count:
    name: CounterName
    label: str | None = None


@dataclass(frozen=True, slots=True)
class Observe:
    name: HistogramName
    value: float


@dataclass(frozen=True, slots=True)
class ObserveDispatch:
    """A job_assign was written: its dispatch latency ran from ``received_at`` (perf_counter)."""

    received_at: float


@dataclass(frozen=True, slots=True)
class QualityChanged:
    """Nodes were ejected or readmitted by the quality rules: count, log and record them."""

    changes: tuple[Change, ...]


@dataclass(frozen=True, slots=True)
class WakeTimer:
    """Run the deadline timer's turn soon (a slot freed or the next deadline moved)."""


@dataclass(frozen=True, slots=True)
class ArmTimer:
    """Feed ``event`` back after ``after_s`` seconds."""

    after_s: float
    event: RefusedNodeRetry


Action = (
    SendToNode
    | AssignJob
    | SendToSession
    | SessionDelivered
    | AudioAdmitted
    | JobEnded
    | SendToRoomGroup
    | FanoutCreated
    | ObserveFanout
    | SessionEnded
    | Reserve
    | ReleaseSlot
    | CommitSlot
    | RecordJob
    | ForwardToOwner
    | RecordEvent
    | Count
    | Observe
    | ObserveDispatch
    | QualityChanged
    | WakeTimer
    | ArmTimer
)
