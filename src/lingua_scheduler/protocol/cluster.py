"""Messages between scheduler instances, and the node records they share through the state store.

``NodeRecord`` carries what a node reported (the same wire structs the node sent), so every instance
derives capabilities with the same code; ``(epoch_ms, version)`` orders records of one node across
reconnects and owners, making the merge idempotent and stale updates harmless. Inbox messages are a
tagged union; every field has a default or is required explicitly, and booleans are always
serialised (the reference dropped cross-instance messages whose false booleans were omitted).
"""

from __future__ import annotations

import msgspec

from lingua_scheduler.protocol.node import (
    CapabilityByType,
    HardwareInfo,
    InstalledModel,
    InstalledService,
    JobAck,
    JobAssign,
    JobCancel,
    JobResult,
    JobStarted,
    NodeAsrPartial,
    NodeLanguageCapabilities,
)


class Record(msgspec.Struct, forbid_unknown_fields=False):
    """Base of cluster records: always complete on the wire (no omitted defaults)."""


class NodeRecord(Record, kw_only=True):
    node_id: str
    owner: str
    #: registration time at the owner (ms); a reconnect elsewhere starts a newer epoch
    epoch_ms: int
    #: the owner's change counter for this node within the epoch
    version: int
    status: str
    hardware: HardwareInfo
    accept_public_jobs: bool
    features: list[str]
    services: list[InstalledService]
    by_type: list[CapabilityByType]
    models: list[InstalledModel]
    languages: NodeLanguageCapabilities | None = None
    #: the node acknowledges jobs (the ack deadline applies to it) and reads the turn dialect of
    #: job_assign; the instance dispatching to it needs both. Absent in records of instances that
    #: predate them: False, the published node clients' behaviour.
    sends_acks: bool = False
    turn_dialect: bool = False
    #: job slots the node declared (None: each instance's default per-node limit)
    max_concurrent_jobs: int | None = None

    @property
    def order(self) -> tuple[int, int]:
        return (self.epoch_ms, self.version)


class LoadBatch(Record, kw_only=True):
    """Load of an instance's nodes whose figures changed since its last batch: id -> figures."""

    owner: str
    #: node id -> [running jobs, cpu %, gpu % (-1 if none), mem %]
    loads: dict[str, tuple[int, float, float, float]]


# --- inbox messages ---------------------------------------------------------------------------------


class Dispatch(Record, tag="dispatch", tag_field="kind", kw_only=True):
    """Send ``assign`` to ``node_id`` (connected to the receiving instance); answers go to ``reply_to``."""

    node_id: str
    reply_to: str
    assign: JobAssign
    #: wall clock (ns) when the sender wrote it: the receiver measures the hop between instances
    sent_at_ns: int = 0


class CancelOnNode(Record, tag="cancel", tag_field="kind", kw_only=True):
    node_id: str
    cancel: JobCancel


class DispatchFailed(Record, tag="dispatch_failed", tag_field="kind", kw_only=True):
    """The receiving instance could not deliver a ``Dispatch`` (node not connected there)."""

    job_id: str
    attempt_id: int
    node_id: str
    reason: str


class NodeJobMessage(Record, tag="node_job", tag_field="kind", kw_only=True):
    """A job message from a node, forwarded to the instance that owns the job's session."""

    node_id: str
    message: JobAck | JobStarted | JobResult | NodeAsrPartial


class NodeAdminRequest(Record, tag="node_admin", tag_field="kind", kw_only=True):
    """An operator's drain / undrain / disconnect of a node connected to the receiving instance,
    asked through another instance's admin API (which authenticated and audited it)."""

    request_id: str
    reply_to: str
    node_id: str
    #: drain, undrain or disconnect
    action: str
    reason: str
    operator: str


class NodeAdminReply(Record, tag="node_admin_reply", tag_field="kind", kw_only=True):
    """The answer to a ``NodeAdminRequest``: the HTTP status and body the owner would have answered."""

    request_id: str
    status: int
    body: dict[str, object]


# --- resuming a session on another instance (server/cluster/resume.py) --------------------------------------


class ResumeRecord(Record, kw_only=True):
    """Written by the instance of a session whose connection dropped, for the resume window: lets any
    instance check a resume token and continue the session when its owner is gone."""

    session_id: str
    owner: str
    #: sha256 (hex) of the whole resume token: the record does not hold the token itself
    token_digest: str
    tenant_id: str | None = None
    trace_id: str = ""
    #: the session's next internal utterance index
    next_index: int = 0
    #: (internal index, the index the client knows it by) of utterances without their outcome yet
    outstanding: list[tuple[int, int]] = []


class ResumeRequest(Record, tag="resume_request", tag_field="kind", kw_only=True):
    """Another instance holds a ``session_init`` with this session's token: hand the session over."""

    request_id: str
    reply_to: str
    session_id: str
    token_digest: str
    #: the asker's wall clock (ms) when it stops waiting: informational only (clocks differ between
    #: hosts); the claim on the resume record decides whether a hand-over may still happen
    deadline_ms: int


class ResumeHandover(Record, tag="resume_handover", tag_field="kind", kw_only=True):
    """The answer to a ``ResumeRequest``. ``ok``: the session is the asker's from now on; what its old
    instance kept while detached follows in ``held``, results still to come follow as
    ``SessionOutput``."""

    request_id: str
    session_id: str
    ok: bool
    next_index: int = 0
    outstanding: list[tuple[int, int]] = []
    #: messages for the client, encoded, in order (already in the client's view)
    held: list[bytes] = []


class SessionOutput(Record, tag="session_output", tag_field="kind", kw_only=True):
    """One message for a session's client, from the instance that ran the utterance to the instance
    the session was resumed on (already in the client's view, encoded)."""

    session_id: str
    data: bytes


class MemberRecord(Record, kw_only=True):
    """One member of a room as the shared store holds it (multi-instance rooms)."""

    session_id: str
    #: the instance its session is connected to
    instance: str
    display_name: str | None = None
    preferred_lang: str
    #: ms since the epoch (Redis's clock), set by the store
    joined_at: int = 0
    #: join order within the room, set by the store
    seq: int = 0
    #: other member -> whether this one receives its voice (absent: it does)
    raw_voice: dict[str, bool] = {}


class RoomState(Record, tag="room_state", tag_field="kind", kw_only=True):
    """A room changed: its members now (to every instance holding one of them, and to those that held a
    member that is gone), or it ended (``closed``; ``expired``: nobody spoke)."""

    room_code: str
    room_id: str
    members: list[MemberRecord] = []
    closed: bool = False
    expired: bool = False


class RoomOutput(Record, tag="room_output", tag_field="kind", kw_only=True):
    """One message for a room member connected to the receiving instance (a relayed WebRTC message,
    another member's result), already in that client's view and encoded."""

    session_id: str
    data: bytes


InboxMessage = (
    Dispatch
    | CancelOnNode
    | DispatchFailed
    | NodeJobMessage
    | NodeAdminRequest
    | NodeAdminReply
    | ResumeRequest
    | ResumeHandover
    | SessionOutput
    | RoomState
    | RoomOutput
)
