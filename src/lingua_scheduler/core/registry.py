"""The node registry: one live record per node, registration, heartbeats, status and liveness.

Owns: ``NodeEntry`` records, the binding of a node id to the connection that registered it, the status
machine's application, the set of nodes whose capabilities or status changed ("dirty", drained by the
fleet-view publisher), per-status counts, and what each node said about its protocol generation: whether
it acknowledges jobs (``sends_acks``) and which ``job_assign`` dialect it reads (``turn_dialect``), and
what it declared about its capacity (``max_concurrent_jobs``, its own load threshold). A drain is asked by
an operator (``drain``, kept across reconnects) or by the node itself (``node_drain``, which a later
registration ends: a new process of the node wants work).

Also owns the bounds on what one node can cost (``[limits]``, docs/reliability.md):

- a capability report is validated against ``CapabilityLimits`` (``core/capabilities.py``) and refused
  whole (``INVALID_CAPABILITY_SCHEMA``) when over them: at registration the node is refused, in a
  heartbeat the heartbeat still counts for liveness and the previous capabilities stay;
- capability changes are rate-limited per node (a token bucket of ``capability_changes_per_minute``,
  ``capability_change_burst``, kept across reconnects): a change over the budget is *deferred*, and the
  latest deferred report is applied as soon as the budget allows (``scan``), so a node alternating
  between two sets costs at most the budgeted number of pool rebuilds;
- offline records (kept for a reconnect) are evicted oldest first: after
  ``offline_record_retention_seconds`` (``scan``), and before a new node would be refused for
  ``max_node_records`` (``make_room``);
- the node ids are kept sorted (``ids_after``), so a page of the node listing costs the page, not a sort.

Must never: await, lock, do I/O, or do work proportional to the fleet size on the heartbeat path.
A heartbeat is O(1) in the fleet: validate the binding, store load, compare capability fields by value,
maybe step the status machine, mark dirty only on a real change. Time comes from the injected ``Clock``.
"""

from __future__ import annotations

import bisect
import secrets
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from lingua_scheduler.clock import Clock
from lingua_scheduler.config import LimitsConfig, NodeHealthConfig
from lingua_scheduler.core.capabilities import Capabilities, CapabilityLimitError, CapabilityLimits, derive
from lingua_scheduler.core.load import NodeLoad
from lingua_scheduler.core.rate_limit import TokenBucket
from lingua_scheduler.core.status import NodeStatus, check_transition, healthy
from lingua_scheduler.errors import ErrorCode, NotRegisteredError, RegistrationError
from lingua_scheduler.protocol.cluster import NodeRecord
from lingua_scheduler.protocol.node import (
    FEATURE_JOB_ACK,
    FEATURE_TURN_JOBS,
    CapabilityByType,
    HardwareInfo,
    InstalledModel,
    InstalledService,
    NodeHeartbeat,
    NodeLanguageCapabilities,
    NodeRegister,
)

REQUIRED_SCHEMA = "2.0"
HISTORY_LEN = 32
#: labels of ``unknown_seen``
UNKNOWN_SERVICE_TYPE = "service_type"
UNKNOWN_DEVICE = "device"


def protocol_generation(msg: NodeRegister) -> tuple[bool, bool]:
    """(sends_acks, turn_dialect) of a registering node.

    Acks are only expected from a node that declares ``job_ack``: the published node clients never send
    ``job_ack`` nor ``job_started``. The turn dialect is declared with ``turn_jobs``, or recognised by
    the shape the newer client gives ``capability_by_type`` (``devices`` per type, where the older one
    sends ``ready_impl_ids``): both generations report the same ``version``, so the shape is what tells
    them apart."""
    declared = frozenset(msg.protocol_features or ())
    newer_shape = any(c.devices is not None for c in msg.capability_by_type)
    return FEATURE_JOB_ACK in declared, FEATURE_TURN_JOBS in declared or newer_shape


@dataclass(frozen=True, slots=True)
class Transition:
    """One status change, for the shell to tell the node (``node_status``) and to log."""

    node_id: str
    old: NodeStatus
    new: NodeStatus
    reason: str
    at: float


@dataclass(slots=True)
class NodeEntry:
    node_id: str
    name: str
    version: str
    platform: str
    hardware: HardwareInfo
    accept_public_jobs: bool
    features: frozenset[str]
    registered_at: float
    registered_wall_ms: int
    # what the node last reported, kept to detect change by value
    services: list[InstalledService]
    by_type: list[CapabilityByType]
    models: list[InstalledModel]
    languages: NodeLanguageCapabilities | None
    caps: Capabilities
    #: the node acknowledges jobs (declared ``job_ack``): only then does the ack deadline apply
    sends_acks: bool = False
    #: the node reads the turn dialect of job_assign (``protocol_generation``)
    turn_dialect: bool = False
    status: NodeStatus = NodeStatus.REGISTERING
    #: bumped on every change of capability or status; the fleet view copies only changed versions
    version_no: int = 1
    conn: object | None = None
    #: instance that holds the node's socket; None = this instance
    owner: str | None = None
    #: order of the last record applied for a remote node: (epoch_ms, version) at its owner
    remote_order: tuple[int, int] = (0, 0)
    last_heartbeat: float = 0.0
    heartbeats: int = 0
    healthy_streak: int = 0
    unhealthy_streak: int = 0
    drain_requested: bool = False
    #: the drain was asked by the node (``node_drain``), not by an operator: registering again ends it
    drain_by_node: bool = False
    #: job slots the node declared (None: the scheduler's default per-node limit)
    max_concurrent_jobs: int | None = None
    #: the node's own load threshold (``node_register.load_threshold``), copied into every new load cell
    load_threshold: float = 1.0
    load: NodeLoad = field(default_factory=NodeLoad)
    history: deque[tuple[float, str]] = field(default_factory=lambda: deque(maxlen=HISTORY_LEN))
    #: the node's budget of capability changes (created at its first change)
    change_budget: TokenBucket | None = None
    #: a validated capability value waiting for the budget (the latest report wins)
    pending_caps: Capabilities | None = None
    #: capability changes deferred for the budget, over the record's life
    deferred_changes: int = 0

    @property
    def has_gpu(self) -> bool:
        return bool(self.hardware.gpus)

    @property
    def connected(self) -> bool:
        return self.conn is not None


@dataclass(frozen=True, slots=True)
class HeartbeatOutcome:
    capability_changed: bool
    transitions: tuple[Transition, ...]
    #: the heartbeat's capability report was over a limit: refused, the previous capabilities stay
    refused: CapabilityLimitError | None = None


@dataclass(frozen=True, slots=True)
class ScanOutcome:
    transitions: tuple[Transition, ...]
    #: nodes that had timed out but were kept because our own event loop was lagging
    suppressed: int
    #: offline records evicted for their age
    evicted: int = 0
    #: deferred capability changes applied now that their node's budget allowed
    applied_deferred: int = 0


def new_node_id() -> str:
    return "node-" + secrets.token_hex(4).upper()


class Registry:
    def __init__(self, config: NodeHealthConfig, clock: Clock, limits: LimitsConfig | None = None) -> None:
        self.config = config
        self.clock = clock
        self.limits = limits if limits is not None else LimitsConfig()
        self.capability_limits = CapabilityLimits.from_config(self.limits)
        self.nodes: dict[str, NodeEntry] = {}
        #: every node id, sorted (the node listing pages through it)
        self._ids: list[str] = []
        #: local records without a connection -> monotonic time they lost it; oldest first (dict order)
        self._offline: dict[str, float] = {}
        #: nodes with a deferred capability change
        self._pending: set[str] = set()
        self.capability_deferred = 0
        #: capability reports refused for a limit: own nodes' (error sent) and other instances' records
        self.capability_refused = 0
        self.remote_capability_refused = 0
        #: offline records evicted, by why: "retention" (age) or "room" (a new node needed the space)
        self.evicted: dict[str, int] = {"retention": 0, "room": 0}
        #: node id -> monotonic time it first became dirty since the last drain
        self._dirty: dict[str, float] = {}
        self._counts: dict[NodeStatus, int] = dict.fromkeys(NodeStatus, 0)
        self.capability_changes = 0
        self.suppressed_offline = 0
        #: unknown service types / device kinds first seen on a node, by kind, since the last take
        self._unknown_seen: dict[str, int] = {}
        #: owned nodes whose capabilities or status changed since the cluster shell last published
        self.changed_local: set[str] = set()
        #: called when ``changed_local`` gains a node (the cluster shell wakes its publisher)
        self.on_local_change: Callable[[], None] | None = None

    # --- registration ---------------------------------------------------------------------------

    def register(self, msg: NodeRegister, conn: object) -> tuple[NodeEntry, tuple[Transition, ...]]:
        """Accept or refuse a ``node_register`` arriving on connection ``conn``.

        A known id whose old connection is gone gets its record back (reconnect); a known id that is
        connected right now is a conflict. Raises ``RegistrationError`` with the wire code.
        """
        if msg.capability_schema_version != REQUIRED_SCHEMA:
            got = msg.capability_schema_version
            raise RegistrationError(
                f"capability_schema_version {'is missing' if got is None else repr(got) + ' is unsupported'}"
                f" (required: {REQUIRED_SCHEMA}); update the node client",
                code=ErrorCode.INVALID_CAPABILITY_SCHEMA,
            )
        if not msg.hardware.gpus:
            raise RegistrationError(
                "hardware.gpus is empty: a node needs at least one GPU", code=ErrorCode.NO_GPU_AVAILABLE
            )
        now = self.clock.monotonic()
        node_id = msg.node_id or new_node_id()
        entry = self.nodes.get(node_id)
        features = msg.features_supported.enabled()
        try:
            caps = derive(
                msg.installed_services,
                msg.capability_by_type,
                msg.installed_models,
                msg.language_capabilities,
                features,
                self.capability_limits,
            )
        except CapabilityLimitError:
            self.capability_refused += 1
            raise
        sends_acks, turn_dialect = protocol_generation(msg)
        transitions: list[Transition] = []
        if entry is not None:
            if entry.conn is not None and entry.conn is not conn:
                raise RegistrationError(
                    f"node id {node_id} is connected on another connection; clear the local node_id "
                    "or close the other connection",
                    code=ErrorCode.NODE_ID_CONFLICT,
                )
            # Reconnect (or re-register on the same socket): same id, same record, fresh report.
            entry.version, entry.platform, entry.hardware = msg.version, msg.platform, msg.hardware
            entry.accept_public_jobs = msg.accept_public_jobs
            entry.features = features
            entry.services, entry.by_type = msg.installed_services, msg.capability_by_type
            entry.models, entry.languages = msg.installed_models, msg.language_capabilities
            entry.sends_acks, entry.turn_dialect = sends_acks, turn_dialect
            if entry.drain_by_node:  # the node's own drain ends with the process that asked for it
                entry.drain_requested = entry.drain_by_node = False
            # a reconnect is a report like a heartbeat's: reconnecting does not reset the budget
            self._offer(entry, caps, now)
            self._offline.pop(node_id, None)
            entry.conn = conn
            entry.owner = None  # the node reconnected here: this instance owns it now
            entry.registered_at = now
            entry.registered_wall_ms = self.clock.wall_ms()
            entry.healthy_streak = entry.unhealthy_streak = 0
            entry.load = NodeLoad()
            if entry.status is not NodeStatus.REGISTERING:
                if entry.status is not NodeStatus.OFFLINE:
                    transitions.append(self._set_status(entry, NodeStatus.OFFLINE, "re-registered", now))
                transitions.append(self._set_status(entry, NodeStatus.REGISTERING, "reconnected", now))
            entry.history.append((now, "re-registered"))
        else:
            entry = NodeEntry(
                node_id=node_id,
                name="Node-" + secrets.token_hex(4).upper(),
                version=msg.version,
                platform=msg.platform,
                hardware=msg.hardware,
                accept_public_jobs=msg.accept_public_jobs,
                features=features,
                registered_at=now,
                registered_wall_ms=self.clock.wall_ms(),
                services=msg.installed_services,
                by_type=msg.capability_by_type,
                models=msg.installed_models,
                languages=msg.language_capabilities,
                caps=caps,
                sends_acks=sends_acks,
                turn_dialect=turn_dialect,
                conn=conn,
            )
            self._count_unknown(None, caps)
            self._add(entry)
            self._counts[NodeStatus.REGISTERING] += 1
            entry.history.append((now, "registered"))
        entry.max_concurrent_jobs = msg.max_concurrent_jobs
        entry.load_threshold = msg.load_threshold if msg.load_threshold is not None else 1.0
        entry.load.own_threshold = entry.load_threshold
        entry.last_heartbeat = now
        self._mark(entry, now)
        return entry, tuple(transitions)

    # --- heartbeat (hot path) -------------------------------------------------------------------

    def heartbeat(self, conn: object, msg: NodeHeartbeat) -> HeartbeatOutcome:
        """Apply one heartbeat in O(1). Raises ``NotRegisteredError`` if ``conn`` does not own the id."""
        entry = self.entry_for(conn, msg.node_id)
        now = self.clock.monotonic()
        entry.last_heartbeat = now
        entry.heartbeats += 1
        ru = msg.resource_usage
        entry.load.report(
            ru.cpu_percent, ru.gpu_percent, ru.gpu_mem_percent, ru.mem_percent, ru.running_jobs, now, ru.load
        )
        refused: CapabilityLimitError | None = None
        try:
            changed = self._update_capabilities(entry, msg, now)
        except CapabilityLimitError as exc:  # liveness still counts; the previous capabilities stay
            self.capability_refused += 1
            changed, refused = False, exc
        resumed: tuple[Transition, ...] = ()
        if entry.status is NodeStatus.OFFLINE:
            # Timed out while the socket stayed open: it is alive after all, start over.
            resumed = (self._set_status(entry, NodeStatus.REGISTERING, "heartbeat resumed", now),)
        transitions = resumed + self._health_step(
            entry, healthy(entry.status, entry.has_gpu, msg.installed_services), now
        )
        if changed:
            self._mark(entry, now)
        return HeartbeatOutcome(changed, transitions, refused)

    def entry_for(self, conn: object, node_id: str) -> NodeEntry:
        """The record of ``node_id`` if ``conn`` is the connection that registered it; else refuse."""
        entry = self.nodes.get(node_id)
        if entry is None or entry.conn is not conn:
            raise NotRegisteredError(
                f"node_id {node_id!r} is not registered on this connection",
                code=ErrorCode.NODE_ID_MISMATCH if entry is not None else ErrorCode.NOT_REGISTERED,
            )
        return entry

    def _update_capabilities(self, entry: NodeEntry, msg: NodeHeartbeat, now: float) -> bool:
        # Fast path: the reported fields equal the previous report (C-level struct comparison).
        models = msg.installed_models if msg.installed_models is not None else entry.models
        languages = msg.language_capabilities if msg.language_capabilities is not None else entry.languages
        if (
            msg.installed_services == entry.services
            and msg.capability_by_type == entry.by_type
            and models == entry.models
            and languages == entry.languages
        ):
            return False
        # Bounded whatever the node sends; raises before anything is stored, so the same refused
        # report is refused again (and told again) at the next heartbeat.
        caps = derive(
            msg.installed_services,
            msg.capability_by_type,
            models,
            languages,
            entry.features,
            self.capability_limits,
        )
        entry.services, entry.by_type, entry.models, entry.languages = (
            msg.installed_services,
            msg.capability_by_type,
            models,
            languages,
        )
        return self._offer(entry, caps, now)

    def _offer(self, entry: NodeEntry, caps: Capabilities, now: float) -> bool:
        """A validated capability value: apply it now if the node's budget allows, else keep it as the
        pending change (replacing an older one). Returns whether it was applied."""
        if caps == entry.caps:  # reordered, cosmetic, or back to what applies: nothing to change
            if entry.pending_caps is not None:
                entry.pending_caps = None
                self._pending.discard(entry.node_id)
            return False
        budget = entry.change_budget
        if budget is None:
            lim = self.limits
            budget = entry.change_budget = TokenBucket(
                lim.capability_changes_per_minute / 60.0, lim.capability_change_burst, now
            )
        if not budget.take(now):
            if entry.pending_caps is None:
                self._pending.add(entry.node_id)
            entry.pending_caps = caps
            entry.deferred_changes += 1
            self.capability_deferred += 1
            return False
        self._apply_caps(entry, caps, now)
        return True

    def _apply_caps(self, entry: NodeEntry, caps: Capabilities, now: float) -> None:
        if entry.pending_caps is not None:
            entry.pending_caps = None
            self._pending.discard(entry.node_id)
        self._count_unknown(entry.caps, caps)
        entry.caps = caps
        entry.version_no += 1
        self.capability_changes += 1
        entry.history.append((now, "capabilities changed"))

    def apply_deferred(self) -> int:
        """Apply the deferred capability changes whose node's budget allows now. O(deferred nodes)."""
        if not self._pending:
            return 0
        now = self.clock.monotonic()
        applied = 0
        for node_id in list(self._pending):
            entry = self.nodes.get(node_id)
            caps = entry.pending_caps if entry is not None else None
            if entry is None or caps is None:
                self._pending.discard(node_id)
                continue
            if entry.change_budget is not None and not entry.change_budget.take(now):
                continue
            self._apply_caps(entry, caps, now)
            self._mark(entry, now)
            applied += 1
        return applied

    def _count_unknown(self, old: Capabilities | None, new: Capabilities) -> None:
        for kind, before, now in (
            (UNKNOWN_SERVICE_TYPE, old.unknown_types if old else frozenset(), new.unknown_types),
            (UNKNOWN_DEVICE, old.unknown_devices if old else frozenset(), new.unknown_devices),
        ):
            if fresh := len(now - before):
                self._unknown_seen[kind] = self._unknown_seen.get(kind, 0) + fresh

    def take_unknown_seen(self) -> dict[str, int]:
        """Unknown service types / device kinds newly reported by a node (by kind) since the last call:
        the node endpoint turns them into a metric. A value counts once per node that starts reporting it."""
        seen, self._unknown_seen = self._unknown_seen, {}
        return seen

    def _health_step(self, entry: NodeEntry, ok: bool, now: float) -> tuple[Transition, ...]:
        st = entry.status
        if st is NodeStatus.OFFLINE:
            return ()
        if ok:
            entry.healthy_streak += 1
            entry.unhealthy_streak = 0
            if st is NodeStatus.REGISTERING and entry.healthy_streak >= self.config.health_check_count:
                return (self._promote(entry, "healthy heartbeats", now),)
            if st is NodeStatus.DEGRADED:
                return (self._promote(entry, "healthy again", now),)
            return ()
        entry.healthy_streak = 0
        entry.unhealthy_streak += 1
        if st is NodeStatus.READY and entry.unhealthy_streak >= self.config.consecutive_failure_count:
            return (self._set_status(entry, NodeStatus.DEGRADED, "unhealthy heartbeats", now),)
        return ()

    def _promote(self, entry: NodeEntry, reason: str, now: float) -> Transition:
        target = NodeStatus.DRAINING if entry.drain_requested else NodeStatus.READY
        return self._set_status(entry, target, reason, now)

    # --- liveness -------------------------------------------------------------------------------

    def disconnect(self, node_id: str, conn: object) -> tuple[Transition, ...]:
        """The socket ``conn`` closed. Offline at once -- unless a newer connection owns the id now."""
        entry = self.nodes.get(node_id)
        if entry is None or entry.conn is not conn:
            return ()
        entry.conn = None
        now = self.clock.monotonic()
        entry.history.append((now, "disconnected"))
        self._offline.pop(node_id, None)
        self._offline[node_id] = now  # the newest at the end: eviction takes from the front
        if entry.status is NodeStatus.OFFLINE:
            return ()
        return (self._set_status(entry, NodeStatus.OFFLINE, "connection closed", now),)

    def heartbeat_interval(self) -> float:
        """Seconds between heartbeats the scheduler asks for, scaled so the fleet stays in budget."""
        live = len(self.nodes) - self._counts[NodeStatus.OFFLINE]
        return max(self.config.heartbeat_interval_seconds, live / self.config.heartbeat_budget_per_second)

    def heartbeat_timeout(self) -> float:
        return max(self.config.heartbeat_timeout_seconds, 3.0 * self.heartbeat_interval())

    def scan(self, loop_lag: float) -> ScanOutcome:
        """Periodic check: silent nodes go offline, registering too long goes degraded.

        When our own event loop lags more than the configured limit, silence may be our fault
        (frames waiting in socket buffers), so timeouts are not applied this round.
        """
        now = self.clock.monotonic()
        evicted = self._expire(now)
        applied = self.apply_deferred()
        timeout = self.heartbeat_timeout()
        warmup = self.config.warmup_timeout_seconds
        out: list[Transition] = []
        silent: list[NodeEntry] = []
        for entry in self.nodes.values():
            if entry.status is NodeStatus.OFFLINE or entry.owner is not None:
                continue  # remote nodes' liveness is their owner's business
            if now - entry.last_heartbeat > timeout:
                silent.append(entry)
            elif entry.status is NodeStatus.REGISTERING and now - entry.registered_at > warmup:
                out.append(self._set_status(entry, NodeStatus.DEGRADED, "warm-up timeout", now))
        suppressed = 0
        if silent and loop_lag > self.config.offline_suppress_loop_lag_seconds:
            suppressed = len(silent)
            self.suppressed_offline += suppressed
        else:
            for entry in silent:
                out.append(self._set_status(entry, NodeStatus.OFFLINE, "heartbeat timeout", now))
        return ScanOutcome(tuple(out), suppressed, evicted, applied)

    # --- offline records ------------------------------------------------------------------------

    def _expire(self, now: float) -> int:
        """Evict offline records older than the retention, oldest first. O(evicted)."""
        horizon = now - self.limits.offline_record_retention_seconds
        n = 0
        while self._offline:
            node_id, since = next(iter(self._offline.items()))
            if since > horizon:
                break
            self._evict(node_id, "retention")
            n += 1
        return n

    def make_room(self, records: int) -> int:
        """Evict the oldest offline records until fewer than ``records`` are held (or none is left to
        evict): a new node gets a record before anybody is refused for the bound. Returns how many."""
        n = 0
        while len(self.nodes) >= records and self._offline:
            self._evict(next(iter(self._offline)), "room")
            n += 1
        return n

    def _evict(self, node_id: str, why: str) -> None:
        self._offline.pop(node_id, None)
        entry = self.nodes.get(node_id)
        if entry is None or entry.conn is not None or entry.owner is not None:
            return
        self._remove(entry)
        self.evicted[why] += 1

    def offline_since(self, node_id: str) -> float | None:
        """When a local record lost its connection (monotonic), or None if it is not an offline record."""
        return self._offline.get(node_id)

    def forget(self, node_id: str) -> bool:
        """An operator forgets an offline record of this instance (``POST .../forget``). Only a record
        held for a reconnect can go: a connected or remote node is refused (False). A node that comes
        back later with the same id registers as new."""
        entry = self.nodes.get(node_id)
        if entry is None or node_id not in self._offline or entry.conn is not None or entry.owner is not None:
            return False
        self._offline.pop(node_id)
        self._remove(entry)
        return True

    def forget_offline(self, older_than: float) -> list[str]:
        """Forget every offline record of this instance that lost its connection ``older_than`` seconds
        ago or more; their ids, oldest first. O(forgotten): the records are kept oldest first."""
        horizon = self.clock.monotonic() - older_than
        out: list[str] = []
        for node_id, since in list(self._offline.items()):
            if since > horizon:
                break
            if self.forget(node_id):
                out.append(node_id)
        return out

    @property
    def offline_records(self) -> int:
        """Records held only for a reconnect (local, no connection): what eviction can free."""
        return len(self._offline)

    # --- the sorted id index --------------------------------------------------------------------

    def _add(self, entry: NodeEntry) -> None:
        self.nodes[entry.node_id] = entry
        bisect.insort(self._ids, entry.node_id)

    def _remove(self, entry: NodeEntry) -> None:
        """Forget a record: counts, the id index, a deferred change; the publisher drops its view."""
        node_id = entry.node_id
        del self.nodes[node_id]
        self._counts[entry.status] -= 1
        i = bisect.bisect_left(self._ids, node_id)
        if i < len(self._ids) and self._ids[i] == node_id:
            del self._ids[i]
        self._pending.discard(node_id)
        self._dirty.setdefault(node_id, self.clock.monotonic())

    def ids_after(self, after: str | None = None, start: int = 0) -> Iterator[str]:
        """Node ids in id order, from the first id greater than ``after`` (or from position ``start``).
        O(log n) to start, then O(1) per id: the listing walks only what it returns or skips."""
        ids = self._ids
        i = bisect.bisect_right(ids, after) if after is not None else start
        while i < len(ids):
            yield ids[i]
            i += 1

    # --- remote nodes (owned by other instances) ---------------------------------------------

    def upsert_remote(self, rec: NodeRecord) -> tuple[NodeStatus, NodeStatus] | None:
        """Apply another instance's record of a node. Stale records (older order) and records of
        nodes connected here are ignored. Returns (old, new) status when it changed, else None."""
        entry = self.nodes.get(rec.node_id)
        if entry is not None and entry.owner is None and entry.conn is not None:
            return None  # connected here: our own view is authoritative
        if entry is not None and entry.owner is not None and rec.order <= entry.remote_order:
            return None
        features = frozenset(rec.features)
        if (
            entry is not None
            and features == entry.features
            and rec.services == entry.services
            and rec.by_type == entry.by_type
            and rec.models == entry.models
            and rec.languages == entry.languages
        ):
            caps = entry.caps  # a status or order change: nothing to derive again
        else:
            try:
                caps = derive(
                    rec.services, rec.by_type, rec.models, rec.languages, features, self.capability_limits
                )
            except CapabilityLimitError:
                # Over this instance's limits (configured lower than at the owner): the node is known
                # but routes nothing here rather than costing this instance unbounded pool work.
                self.remote_capability_refused += 1
                caps = Capabilities()
        now = self.clock.monotonic()
        status = NodeStatus(rec.status)
        if entry is None:
            entry = NodeEntry(
                node_id=rec.node_id,
                name=rec.node_id,
                version="remote",
                platform="remote",
                hardware=rec.hardware,
                accept_public_jobs=rec.accept_public_jobs,
                features=features,
                registered_at=now,
                registered_wall_ms=rec.epoch_ms,
                services=rec.services,
                by_type=rec.by_type,
                models=rec.models,
                languages=rec.languages,
                caps=caps,
                status=NodeStatus.OFFLINE,
                owner=rec.owner,
            )
            self._add(entry)
            self._counts[NodeStatus.OFFLINE] += 1
        self._offline.pop(rec.node_id, None)  # another instance holds it now: not ours to evict
        old = entry.status
        entry.owner, entry.remote_order = rec.owner, rec.order
        entry.sends_acks, entry.turn_dialect = rec.sends_acks, rec.turn_dialect
        entry.max_concurrent_jobs = rec.max_concurrent_jobs
        entry.hardware, entry.accept_public_jobs, entry.features = (
            rec.hardware,
            rec.accept_public_jobs,
            features,
        )
        entry.services, entry.by_type, entry.models, entry.languages = (
            rec.services,
            rec.by_type,
            rec.models,
            rec.languages,
        )
        if caps != entry.caps:
            entry.caps = caps
        entry.last_heartbeat = now
        self._force_status(entry, status, f"record from {rec.owner}", now)
        return (old, status) if old is not status else None

    def remote_load(self, node_id: str, running: int, cpu: float, gpu: float, mem: float) -> None:
        entry = self.nodes.get(node_id)
        if entry is not None and entry.owner is not None:
            entry.load.report(cpu, gpu if gpu >= 0 else None, None, mem, running, self.clock.monotonic())

    def remove_remote(self, node_id: str) -> NodeStatus | None:
        """Forget a remote node (its owner removed it, or died). Returns its last status."""
        entry = self.nodes.get(node_id)
        if entry is None or entry.owner is None:
            return None
        self._remove(entry)
        return entry.status

    def remote_nodes_of(self, owner: str) -> list[str]:
        return [e.node_id for e in self.nodes.values() if e.owner == owner]

    def local_nodes(self) -> list[NodeEntry]:
        return [e for e in self.nodes.values() if e.owner is None]

    def _force_status(self, entry: NodeEntry, new: NodeStatus, reason: str, now: float) -> None:
        """Status of a remote node, as its owner decided (the owner's table applied there)."""
        old = entry.status
        entry.version_no += 1
        if old is not new:
            entry.status = new
            self._counts[old] -= 1
            self._counts[new] += 1
            entry.history.append((now, f"{old} -> {new}: {reason}"))
        self._dirty.setdefault(entry.node_id, now)

    # --- operator actions -----------------------------------------------------------------------

    def drain(self, node_id: str, *, by_node: bool = False) -> tuple[Transition, ...]:
        """Drain a node: no new job, its running ones finish. ``by_node``: the node asked
        (``node_drain``); an operator's drain, asked before or after, outlives the node's."""
        entry = self._get(node_id)
        entry.drain_by_node = by_node and (entry.drain_by_node or not entry.drain_requested)
        entry.drain_requested = True
        if entry.status in (NodeStatus.READY, NodeStatus.DEGRADED, NodeStatus.REGISTERING):
            why = "drained by the node" if by_node else "drained by operator"
            return (self._set_status(entry, NodeStatus.DRAINING, why, self.clock.monotonic()),)
        return ()

    def undrain(self, node_id: str) -> tuple[Transition, ...]:
        entry = self._get(node_id)
        entry.drain_requested = entry.drain_by_node = False
        if entry.status is NodeStatus.DRAINING:
            return (
                self._set_status(entry, NodeStatus.READY, "undrained by operator", self.clock.monotonic()),
            )
        return ()

    def _get(self, node_id: str) -> NodeEntry:
        entry = self.nodes.get(node_id)
        if entry is None:
            raise KeyError(node_id)
        return entry

    # --- status bookkeeping ---------------------------------------------------------------------

    def _set_status(self, entry: NodeEntry, new: NodeStatus, reason: str, now: float) -> Transition:
        """The one place a node's status changes: checks the table, counts, records history, dirties."""
        old = entry.status
        check_transition(entry.node_id, old, new)
        entry.status = new
        self._counts[old] -= 1
        self._counts[new] += 1
        entry.version_no += 1
        entry.history.append((now, f"{old} -> {new}: {reason}"))
        self._mark(entry, now)
        return Transition(entry.node_id, old, new, reason, now)

    def _mark(self, entry: NodeEntry, now: float) -> None:
        self._dirty.setdefault(entry.node_id, now)
        if entry.owner is None:
            self.changed_local.add(entry.node_id)
            if self.on_local_change is not None:
                self.on_local_change()

    def take_dirty(self) -> dict[str, float]:
        """Hand the changed node ids (with the time each first changed) to the publisher; clears them."""
        dirty, self._dirty = self._dirty, {}
        return dirty

    def oldest_dirty(self) -> float | None:
        """When the oldest change not yet taken by the publisher happened (dicts keep insertion order)."""
        return next(iter(self._dirty.values()), None)

    @property
    def dirty_count(self) -> int:
        return len(self._dirty)

    def counts(self) -> dict[NodeStatus, int]:
        return dict(self._counts)

    def __iter__(self) -> Iterator[NodeEntry]:
        return iter(self.nodes.values())

    def __len__(self) -> int:
        return len(self.nodes)

    def validate(self) -> None:
        """Check the registry's invariants (tests call this after each scenario)."""
        counts = dict.fromkeys(NodeStatus, 0)
        for nid, e in self.nodes.items():
            assert nid == e.node_id, f"{nid} stored under the wrong key"
            counts[e.status] += 1
            assert e.load.inflight >= 0
            if e.status is not NodeStatus.OFFLINE and e.conn is None and e.owner is None:
                raise AssertionError(f"{nid} is {e.status} without a connection")
        assert counts == self._counts, f"status counts drifted: {counts} != {self._counts}"
        assert self._ids == sorted(self.nodes), "the sorted id index drifted"
        for nid in self._offline:
            e = self.nodes[nid]
            assert e.conn is None and e.owner is None, f"{nid} is connected or remote but evictable"
        for nid in self._pending:
            assert self.nodes[nid].pending_caps is not None, f"{nid} pending without a change"
