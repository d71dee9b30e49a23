"""What happens to the scheduler, as typed input events of ``SchedulerEngine.handle_stimulus``.

Owns the vocabulary of stimuli: one frozen record per thing the runtime observed (an utterance was
cut, a node sent a job message, a socket closed, a timer fired, a reservation was answered, an
operator acted). An event carries what the runtime saw and nothing it decided.

Must never: hold a connection, a callback or anything mutable the engine would keep.
"""

from __future__ import annotations

from dataclasses import dataclass

from lingua_scheduler.core.quota import Allowance
from lingua_scheduler.core.rooms import RoomSnapshot
from lingua_scheduler.core.segmentation import Utterance
from lingua_scheduler.protocol.node import JobAck, JobResult, JobStarted, NodeAsrPartial, PipelineConfig
from lingua_scheduler.protocol.session import SessionInit

#: the job messages a node sends (directly, or forwarded by the instance it is connected to)
JobMessage = JobAck | JobStarted | JobResult | NodeAsrPartial


@dataclass(frozen=True, slots=True)
class SessionOpened:
    """A session was admitted on this instance: its jobs may be created from now on."""

    session_id: str
    tenant_id: str | None
    trace_id: str
    init: SessionInit
    src_lang: str
    targets: tuple[str, ...]
    #: a session continued from another instance numbers its utterances from here
    start_index: int = 0
    #: the node a pairing code bound the session to (its jobs go there first), and whether only it
    #: may take them (no fallback to the pools)
    pinned: str | None = None
    pinned_only: bool = False


@dataclass(frozen=True, slots=True)
class UtterancesReady:
    """The session's segmenter cut these utterances: each becomes a job per target (or an answer)."""

    session_id: str
    utterances: tuple[Utterance, ...]
    src_lang: str | None = None
    tgt_lang: str | None = None
    pipeline: PipelineConfig | None = None
    #: perf_counter when the frame that finalized them arrived (the dispatch latency starts there)
    received_at: float | None = None
    #: the speaker's room when they were cut (None: in no room, or alone in it): each utterance fans
    #: out to one job per language of the other members
    room: RoomSnapshot | None = None
    #: the session's tenant's audio-minute quota as it stands (None: no quota): an utterance past it
    #: is refused with QUOTA_EXCEEDED; the engine spends from this copy as it admits utterances
    quota: Allowance | None = None


@dataclass(frozen=True, slots=True)
class CancelUtterance:
    """The session's client cancels one of its utterances (``utterance_cancel``, our index)."""

    session_id: str
    utterance_index: int
    reason: str


@dataclass(frozen=True, slots=True)
class SessionTick:
    """The session's timer fired: its result queue gives up on indices past their gap timeout."""

    session_id: str


@dataclass(frozen=True, slots=True)
class SessionFlush:
    """Release everything the session's result queue holds (shutdown: nothing more will come)."""

    session_id: str


@dataclass(frozen=True, slots=True)
class PlaybackEnded:
    """The session's client finished playing ``group_id``'s speech (``tts_play_ended``): the group
    stays open a window from now (the engine's clock, not the client's)."""

    session_id: str
    group_id: str


@dataclass(frozen=True, slots=True)
class SessionClosing:
    """The session closes gracefully: each delivery to it from now on says so (``SessionDelivered``),
    so it can acknowledge once its outstanding work is out."""

    session_id: str


@dataclass(frozen=True, slots=True)
class SessionClosed:
    """The session is gone: its live jobs are cancelled and its book (queue, routing memory) dropped."""

    session_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class NodeJobReport:
    """A job message from ``node_id`` (its binding to the socket already checked)."""

    node_id: str
    message: JobMessage


@dataclass(frozen=True, slots=True)
class NodeGone:
    """The node's socket closed (or its remote record left the view): its attempts fail over."""

    node_id: str


@dataclass(frozen=True, slots=True)
class Tick:
    """The deadline timer fired: expired deadlines apply, waiting jobs are tried, old ones evicted."""


@dataclass(frozen=True, slots=True)
class CapacityChanged:
    """Something outside the engine may have freed a slot (remote load, a readmitted node, a
    re-synced reservation): waiting jobs are tried now."""


@dataclass(frozen=True, slots=True)
class SharedSlotsRequired:
    """Whether a placement must first take a slot in the shared store (multi-instance mode with the
    store reachable). Sent when it changes; the engine starts with False."""

    required: bool


@dataclass(frozen=True, slots=True)
class ReservationAnswered:
    """The shared store answered a ``Reserve``: ``ok`` with the slot taken, or refused (``reason``)."""

    job_id: str
    attempt: int
    node_id: str
    member: str
    ok: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ReservationFailed:
    """A ``Reserve`` got no answer (store unreachable) or failed unexpectedly (``broken``)."""

    job_id: str
    attempt: int
    node_id: str
    broken: bool = False


@dataclass(frozen=True, slots=True)
class RefusedNodeRetry:
    """A node whose reservation was refused may be tried again."""

    node_id: str


@dataclass(frozen=True, slots=True)
class AssignUndelivered:
    """A local node's outbox did not take our ``job_assign`` (closed or full)."""

    job_id: str
    attempt: int
    node_id: str


@dataclass(frozen=True, slots=True)
class RemoteDispatchFailed:
    """The node's instance could not deliver our ``job_assign`` (or the store lost it)."""

    job_id: str
    attempt: int
    node_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class DrainBegan:
    """A graceful shutdown began: in-flight work may finish, another instance's new job is refused."""


@dataclass(frozen=True, slots=True)
class CancelJob:
    """An operator cancels one job."""

    job_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class FailAll:
    """Every live job ends as FAILED with ``code`` (graceful shutdown past its deadline)."""

    code: str
    message: str


Event = (
    SessionOpened
    | UtterancesReady
    | CancelUtterance
    | SessionTick
    | SessionFlush
    | PlaybackEnded
    | SessionClosing
    | SessionClosed
    | NodeJobReport
    | NodeGone
    | Tick
    | CapacityChanged
    | SharedSlotsRequired
    | ReservationAnswered
    | ReservationFailed
    | RefusedNodeRetry
    | AssignUndelivered
    | RemoteDispatchFailed
    | DrainBegan
    | CancelJob
    | FailAll
)
