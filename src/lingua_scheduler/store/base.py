"""The ``StateStore`` interface: everything scheduler instances share.

Callers never wait on the store from a hot path: heartbeats and selection do not touch it; the
cluster shell (server/cluster/cluster.py) batches directory writes per tick; only dispatch awaits a
reservation, and only in shared mode. Every method of a shared store has a deadline: a store that
cannot be reached raises ``StoreUnavailable`` promptly instead of blocking.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from lingua_scheduler.errors import ErrorCode, SchedulerError
from lingua_scheduler.protocol.cluster import InboxMessage, LoadBatch, NodeRecord, ResumeRecord


class StoreUnavailable(SchedulerError):
    """The shared store did not answer in time, refused the connection, or answered but refused the
    command (``refused``: e.g. Redis out of memory refuses every write while PING still answers)."""

    code = ErrorCode.STORE_UNAVAILABLE

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


@dataclass(frozen=True, slots=True)
class ReserveResult:
    ok: bool
    #: OK, FULL, NOT_READY, EXISTS
    reason: str
    #: slots in use on the node after the call
    used: int


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of the fleet change feed."""

    entry_id: str
    #: "node" (a NodeRecord), "load" (a LoadBatch) or "gone" (node id removed from the directory)
    kind: str
    record: NodeRecord | None = None
    loads: LoadBatch | None = None
    node_id: str | None = None


@dataclass(frozen=True, slots=True)
class PoolDelta:
    node_id: str
    added: tuple[str, ...]
    removed: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class JobRecord:
    job_id: str
    state: str
    attempt: int
    node_id: str | None
    owner: str
    session_id: str
    terminal: bool


@dataclass(frozen=True, slots=True)
class TickResult:
    #: instances whose presence expired
    dead: list[str]
    #: tenant id -> its live sessions on the other live instances (tenants with limits only)
    tenant_sessions: dict[str, int]
    #: ms during which no instance ticked, when this tick found such a stall (else 0): the presence
    #: of the instances alive when it began was extended by as much
    stalled_ms: int = 0
    #: this instance's presence was not in the store before this tick: the store lost its data
    #: (restarted empty) or another instance took this one over; what it owns must be published again
    presence_lost: bool = False


@dataclass(slots=True)
class WriteBatch:
    """Small writes gathered over one event-loop turn and sent in one round trip: messages to other
    instances' inboxes, reservation commits and releases, acknowledgements of our inbox entries."""

    #: (instance id, message), in the order they must arrive
    sends: list[tuple[str, InboxMessage]] = field(default_factory=list)
    #: (node id, reservation member, new ttl ms): extend a reservation whose job was acknowledged
    commits: list[tuple[str, str, int]] = field(default_factory=list)
    #: (node id, reservation member): give the slot back
    releases: list[tuple[str, str]] = field(default_factory=list)
    #: ids of entries of this instance's inbox that were handled
    acks: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sends) + len(self.commits) + len(self.releases) + len(self.acks)


class StateStore(Protocol):
    instance_id: str
    #: False for the embedded store: one instance, nothing to share
    shared: bool

    async def start(self, *, from_start: bool = False) -> None:
        """Connect; ``from_start``: the store lost this instance's inbox (read it from its start)."""
        ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless the store answers and accepts a write."""
        ...

    # --- node directory, presence, pools ------------------------------------------------------------

    async def publish(
        self, records: list[NodeRecord], gone: list[str], pools: list[PoolDelta], node_status: dict[str, str]
    ) -> None:
        """Owned nodes that changed: one pipelined round trip (directory, change feed, pool sets)."""
        ...

    async def tick(
        self, owned: list[str], loads: LoadBatch | None, ttl_ms: int, tenant_sessions: dict[str, int]
    ) -> TickResult:
        """Per-tick liveness in one round trip: this instance's presence, its nodes' presence, the load
        batch, its sessions per limited tenant (and a new reading of the shared clock). Returns the
        instances whose presence expired and the sessions the others hold per tenant."""
        ...

    async def changes(self, last_id: str, block_ms: int) -> list[Change]:
        """Next entries of the fleet change feed after ``last_id`` (blocking read, own connection)."""
        ...

    async def directory(self) -> tuple[list[NodeRecord], str]:
        """The whole node directory and the change-feed id it is current to (periodic resync only)."""
        ...

    async def forget_instance(self, instance_id: str) -> list[str]:
        """Clean up after a dead instance (presence, inbox); returns the ids of the nodes it owned."""
        ...

    # --- capacity reservations ----------------------------------------------------------------------

    async def reserve(self, node_id: str, member: str, max_slots: int, ttl_ms: int) -> ReserveResult:
        """Take a slot on ``node_id`` for ``ttl_ms`` (on the shared clock): refused when the node is
        not ready, full, or ``member`` holds one already. Reaps expired slots in the same step."""
        ...

    async def release(self, node_id: str, member: str) -> None: ...

    async def resync_reservations(self, held: dict[str, list[tuple[str, int]]]) -> tuple[int, int]:
        """Make this instance's reservations on each node of ``held`` exactly the (member, ttl ms)
        listed, in one step per node; returns (members removed, members added)."""
        ...

    # --- sessions of tenants with a session cap (cluster-wide) ----------------------------------------

    async def admit_session(
        self, tenant_id: str, session_id: str, cap: int, ended: list[str]
    ) -> tuple[bool, int]:
        """Admit ``session_id`` of ``tenant_id`` under ``cap`` sessions across the live instances, in
        one atomic step that first releases this instance's ``ended`` sessions of the tenant. Returns
        (admitted, sessions counted)."""
        ...

    async def release_sessions(self, ended: dict[str, list[str]]) -> None:
        """Tenant id -> this instance's sessions of it that ended: they stop counting. Not idempotent
        (the store may keep counts, not ids): release each session once, here or as ``ended`` of an
        admission; after a failed call the re-sync (``resync_sessions``) repairs."""
        ...

    async def resync_sessions(self, live: dict[str, list[str]]) -> tuple[int, int]:
        """Tenant id -> this instance's live sessions of it: its members become exactly those (after a
        store failure or a store that lost its data). Returns (members removed, members added)."""
        ...

    # --- job records --------------------------------------------------------------------------------

    async def save_jobs(self, records: list[JobRecord], ttl_s: int) -> None: ...

    async def jobs_of(self, instance_id: str) -> list[JobRecord]: ...

    # --- messages between instances -----------------------------------------------------------------

    async def write(self, batch: WriteBatch) -> None:
        """Apply a batch of small writes in one round trip, sends in order. A commit whose
        reservation expired meanwhile is not revived."""
        ...

    async def receive(self, block_ms: int, count: int) -> list[tuple[str, InboxMessage | None]]:
        """Next inbox entries (blocking, own connection); ``None`` for an entry that failed to decode."""
        ...

    # --- resume records (server/cluster/resume.py)
    # -----------------------------------------------------------

    async def save_resume(self, record: ResumeRecord, ttl_ms: int) -> None:
        """Write (or replace) a session's resume record, expiring after ``ttl_ms``."""
        ...

    async def load_resume(self, session_id: str) -> ResumeRecord | None:
        """The session's resume record, None when there is none (expired, dropped, never written)."""
        ...

    async def drop_resume(self, session_id: str) -> None:
        """Delete the session's resume record and any claim on it."""
        ...

    async def claim_resume(self, session_id: str, request_id: str, ttl_ms: int) -> bool:
        """Claim the session's record for ``request_id`` (one instance resuming it): True only while
        the record exists and nobody else holds a claim. ``save_resume`` voids claims."""
        ...

    async def settle_resume(
        self, session_id: str, request_id: str, outcome: str, ttl_ms: int, *, drop_record: bool
    ) -> str | None:
        """Replace the claim by ``outcome`` ('' releases it) only while it is still ``request_id``'s;
        ``drop_record``: delete the record in the same step. The claim's value afterwards."""
        ...

    # --- node token revocation (docs/security.md) ---------------------------------------------------

    async def revoke_node(self, node_id: str) -> bool:
        """Add a node id to the shared revocation list; False if it was there already."""
        ...

    async def revoked_nodes(self) -> set[str]:
        """The whole revocation list (small: one id per revoked node; read once per tick)."""
        ...
