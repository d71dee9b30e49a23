"""The HTTP API's wire types: every JSON answer, every parsed query string, the error body, and the
HTTP status of each error code.

Handlers build these Structs and ``server/http/http_io.py`` encodes them with msgspec;
``server/http/openapi.py`` generates the OpenAPI document from them (``msgspec.json.schema_components``) and
the route table of ``server/http/routes.py``, so the document says what the code sends. A field that exists
only in one mode (Redis or embedded) or for some actions is ``UNSET`` elsewhere: left out of the JSON, not
required by the schema.

Fields keep the names and values the dashboard and API clients read; adding a field is compatible,
renaming or retyping one is not.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType, field

from lingua_scheduler.core.jobs import JobState
from lingua_scheduler.core.quality import QualityState
from lingua_scheduler.core.status import NodeStatus
from lingua_scheduler.errors import ErrorCode
from lingua_scheduler.protocol.common import ServiceType

#: the kinds of the recent-events ring (server/events.py uses these)
EventKind = Literal["failover", "job_failed", "node_status", "admin", "node_quality"]
EVENT_KINDS: tuple[str, ...] = ("failover", "job_failed", "node_status", "admin", "node_quality")
#: the four latencies an operator watches, by their name in the API
LATENCY_NAMES: tuple[str, ...] = ("heartbeat_handle", "selection", "dispatch", "end_to_end")
#: what a chart point holds: per-second rates, then the p50/p99 of each latency in that second
SERIES_KEYS: tuple[str, ...] = (
    "heartbeats_per_s",
    "created_per_s",
    "completed_per_s",
    "failed_per_s",
    "failovers_per_s",
    *(f"{n}_{q}" for n in LATENCY_NAMES for q in ("p50", "p99")),
)

NonNeg = Annotated[int, Meta(ge=0)]
Rate = Annotated[float | None, Meta(description="Per second over the window; null before a second passed")]
Seconds = float


class Response(Struct, kw_only=True, forbid_unknown_fields=True):
    """Base of the answers: building one from a dict with a key it does not declare fails (a field the
    code sends but the document would not show)."""


# --- errors ------------------------------------------------------------------------------------------


class ErrorBody(Response):
    """Every error answer of the HTTP API (and of the connection guard before it)."""

    code: Annotated[ErrorCode, Meta(description="Stable machine-readable code")]
    message: Annotated[str, Meta(description="What went wrong, for a human")]
    details: Annotated[Any, Meta(description="Structured particulars, when the code has any")] | UnsetType = (
        UNSET
    )
    instance: (
        Annotated[str, Meta(description="Redis mode: the instance that refused a forwarded node action")]
        | UnsetType
    ) = UNSET


#: the HTTP status of each code an HTTP answer carries (server/http/http_io.py's error boundary reads it)
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.INVALID_MESSAGE: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.ADMIN_DISABLED: 403,
    ErrorCode.ORIGIN_NOT_ALLOWED: 403,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.REQUEST_TIMEOUT: 408,
    ErrorCode.REMOTE_NODE: 409,
    ErrorCode.NOT_CONNECTED: 409,
    ErrorCode.NODE_CONNECTED: 409,
    ErrorCode.JOB_ENDED: 409,
    ErrorCode.NODE_AUTH_DISABLED: 409,
    ErrorCode.MESSAGE_TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.QUOTA_EXCEEDED: 429,
    # the translate front door answers what the session machinery refused or failed with
    ErrorCode.JOB_CANCELLED: 409,
    ErrorCode.TENANT_LIMIT: 429,
    ErrorCode.TENANT_RATE_LIMITED: 429,
    ErrorCode.SESSION_LIMIT_REACHED: 503,
    ErrorCode.NO_AVAILABLE_NODE: 503,
    ErrorCode.NODE_OVERLOADED: 503,
    ErrorCode.MODEL_NOT_AVAILABLE: 503,
    ErrorCode.JOB_TIMEOUT: 504,
    ErrorCode.INTERNAL_ERROR: 500,
    ErrorCode.STORE_UNAVAILABLE: 503,
    ErrorCode.TOO_MANY_CLIENTS: 503,
    ErrorCode.TOO_MANY_CONNECTIONS: 503,
    ErrorCode.SCHEDULER_SHUTTING_DOWN: 503,
    ErrorCode.OWNER_TIMEOUT: 504,
}


# --- health ------------------------------------------------------------------------------------------


class NodeCounts(Response):
    registering: NonNeg
    ready: NonNeg
    degraded: NonNeg
    draining: NonNeg
    offline: NonNeg


class Health(Response):
    status: Annotated[
        Literal["ok", "degraded"], Meta(description="degraded: Redis mode, the shared store is unusable")
    ]
    version: str
    uptime_seconds: Seconds
    nodes: NodeCounts
    nodes_total: NonNeg
    fleet_view_version: NonNeg
    mode: Literal["embedded", "redis"]
    instance_id: str | UnsetType = UNSET
    store: Literal["ok", "degraded"] | UnsetType = UNSET
    store_reason: Annotated[str, Meta(description="Why the store is degraded")] | UnsetType = UNSET


class Ready(Response):
    status: Literal["ready", "not_ready"]
    checks: Annotated[
        dict[str, bool],
        Meta(description="Each readiness check by name: registry, fleet_view, accepting, ..."),
    ]


# --- stats -------------------------------------------------------------------------------------------


class JobStateCounts(Response):
    created: NonNeg
    dispatched: NonNeg
    accepted: NonNeg
    running: NonNeg
    completed: NonNeg
    failed: NonNeg
    timed_out: NonNeg
    cancelled: NonNeg


class JobRates(Response):
    created: Rate
    completed: Rate
    failed: Rate
    timed_out: Rate
    cancelled: Rate
    failovers: Rate


class StatsJobs(Response):
    inflight: NonNeg
    waiting: NonNeg
    by_state: JobStateCounts
    per_second: JobRates


class LatencyWindow(Response):
    p50: float | None
    p99: float | None
    count: Annotated[float, Meta(ge=0)]


class LatencyLastMinute(Response):
    heartbeat_handle: LatencyWindow
    selection: LatencyWindow
    dispatch: LatencyWindow
    end_to_end: LatencyWindow


class Percentiles(Response):
    p50: float | None
    p99: float | None
    p999: float | None


class ExactLatency(Response):
    """Exact-tail percentiles of the last samples of the hot paths (seconds)."""

    heartbeat_handle_seconds: Percentiles
    job_dispatch_seconds: Percentiles
    cross_instance_dispatch_seconds: Percentiles
    room_fanout_seconds: Annotated[
        Percentiles,
        Meta(
            description="Rooms: a member's utterance arriving to the last job_assign of its fan-out "
            "written (one sample per utterance with jobs for other members)"
        ),
    ]


class FleetViewInfo(Response):
    version: NonNeg
    age_seconds: Seconds


class PoolsSummary(Response):
    mode: str
    groups: NonNeg
    shards: NonNeg


class PairDemand(Response):
    sessions: NonNeg
    jobs_per_second: Rate
    jobs_last_minute: NonNeg


class PairSupply(Response):
    nodes: Annotated[int, Meta(ge=0, description="Pool members (any status but offline)")]
    ready: Annotated[int, Meta(ge=0, description="Members ready to take jobs")]
    slots: Annotated[int, Meta(ge=0, description="ready x max_concurrent_jobs_per_node")]


class LanguagePair(Response):
    pair: Annotated[str, Meta(description="Directed pair ``src->tgt``")]
    demand: PairDemand
    supply: Annotated[PairSupply | None, Meta(description="Null unless pools are by language pair")]


class ClusterTotals(Response):
    """Sums over the live instances (their figures are at most about a second old)."""

    instances: NonNeg
    age_seconds: Seconds | None
    sessions: NonNeg
    jobs_inflight: NonNeg
    jobs_waiting: NonNeg
    heartbeats_per_second: Rate
    jobs_created_per_second: Rate
    jobs_completed_per_second: Rate


class RoomsSummary(Response):
    rooms: Annotated[NonNeg, Meta(description="Live rooms on this instance")]
    members: Annotated[NonNeg, Meta(description="Their members")]
    fanout_jobs_per_second: Annotated[
        float | None, Meta(description="Jobs created for room members' utterances, per second (1 min)")
    ]


class Stats(Response):
    nodes: NodeCounts
    nodes_total: NonNeg
    nodes_ejected: Annotated[
        NonNeg, Meta(description="Nodes this instance has ejected for failing their jobs")
    ]
    sessions: NonNeg
    jobs: StatsJobs
    heartbeats_per_second: Rate
    totals: Annotated[dict[str, NonNeg], Meta(description="Cumulative counters since start")]
    window_seconds: Annotated[float, Meta(description="Span the rates and latencies cover (up to 60 s)")]
    latency_last_minute: LatencyLastMinute
    latency: ExactLatency
    heartbeats_total: NonNeg
    jobs_dispatched_total: NonNeg
    event_loop_lag_seconds: Seconds
    fleet_view: FleetViewInfo
    pools: PoolsSummary
    language_pairs: list[LanguagePair]
    language_pairs_total: NonNeg
    rooms: RoomsSummary
    computed_at_ms: int
    cluster: Annotated[ClusterTotals, Meta(description="Redis mode only: every instance")] | UnsetType = UNSET


StatsSeries: type[Struct] = msgspec.defstruct(
    "StatsSeries",
    [
        ("window_seconds", float),
        ("step_seconds", float),
        ("t", Annotated[list[int], Meta(description="Wall time (ms) of each point")]),
        *((k, list[float | None]) for k in SERIES_KEYS),
    ],
    bases=(Response,),
    kw_only=True,
    module=__name__,
)
StatsSeries.__doc__ = (
    "Columns of chart points: ``t`` and one array per series, averaged into ``step_seconds``"
)


# --- cluster -----------------------------------------------------------------------------------------


class ClusterInstance(Response):
    instance_id: str | None
    self_: Annotated[bool, Meta(description="This is the instance that answered")] = field(name="self")
    address: str | None
    presence_age_seconds: Annotated[float, Meta(description="Since the instance's last tick (s)")]
    degraded: bool | None
    uptime_seconds: Seconds | None
    nodes: NodeCounts | None
    nodes_total: NonNeg | None
    sessions: NonNeg | None
    jobs_inflight: NonNeg | None
    jobs_waiting: NonNeg | None
    heartbeats_per_second: Rate
    jobs_created_per_second: Rate
    inbox_depth: NonNeg | None
    dead_letters: NonNeg | None


class StoreHealth(Response):
    status: Literal["ok", "degraded"]
    reason: str | None
    round_trip_seconds: Seconds | None
    failures: dict[str, NonNeg]
    stalls: NonNeg
    takeovers: NonNeg
    degraded_episodes: NonNeg


class Cluster(Response):
    mode: Literal["embedded", "redis"]
    instance_id: str | None
    instances: list[ClusterInstance]
    store: StoreHealth | None
    totals: ClusterTotals | None


# --- events ------------------------------------------------------------------------------------------

Scalar = str | int | float | bool | None
Event = Annotated[
    dict[str, Scalar],
    Meta(
        description="One recent event; other fields (node_id, job_id, reason, code, ...) by kind",
        extra_json_schema={
            "required": ["seq", "at_ms", "kind"],
            "properties": {
                "seq": {"type": "integer"},
                "at_ms": {"type": "integer"},
                "kind": {"enum": list(EVENT_KINDS)},
            },
        },
    ),
]


class Events(Response):
    last_seq: NonNeg
    events: list[Event]


# --- nodes -------------------------------------------------------------------------------------------


class NodeLoad(Response):
    cpu_percent: float
    gpu_percent: float | None
    mem_percent: float
    reported_running_jobs: int
    inflight_jobs: int
    effective_jobs: int
    max_jobs: Annotated[int, Meta(description="Its job slots: declared by the node, else the default")]
    node_load: Annotated[float | None, Meta(description="The node's own load 0..1, null if it reports none")]
    node_load_threshold: Annotated[float, Meta(description="At or above its own load it takes no new job")]


class NodeLanguages(Response):
    asr: list[str]
    tts: list[str]
    semantic: list[str]
    language_id: bool


class NodeServices(Response):
    installed: list[str]
    ready: list[str]
    unknown_types: Annotated[list[str], Meta(description="Reported kinds this scheduler does not know")]
    unknown_devices: list[str]


class NodeModel(Response):
    model_id: str
    kind: str
    version: str
    enabled: bool | None


class NodeProtocol(Response):
    sends_acks: bool
    turn_dialect: bool


class NodeHistoryEntry(Response):
    age_seconds: Seconds
    event: str


class NodeDetail(Response):
    node_id: str
    name: str
    status: NodeStatus
    drain_requested: bool
    connected: bool
    version: str
    platform: str
    accept_public_jobs: bool
    gpus: list[str]
    last_heartbeat_age_seconds: Seconds
    heartbeats: NonNeg
    capability_version: int
    capability_change_pending: bool
    capability_changes_deferred: NonNeg
    load: NodeLoad
    languages: NodeLanguages
    services: NodeServices
    models: list[NodeModel]
    supported_language_pairs: list[str] | None
    protocol: NodeProtocol
    instance: Annotated[
        str | None, Meta(description="Redis mode: the instance holding the node's socket (null embedded)")
    ]
    quality_state: Annotated[
        QualityState, Meta(description="Node quality: ejected nodes are skipped by selection")
    ]
    pools: list[str]
    history: list[NodeHistoryEntry]
    quality: (
        Annotated[NodeQuality, Meta(description="Rolling job figures and ejection state (node detail only)")]
        | UnsetType
    ) = UNSET


class NodeLatency(Response):
    mean: float | None
    p50: float | None
    p95: float | None


class NodeQuality(Response):
    """A node's rolling job figures and its ejection state (docs/operations.md, "Node quality")."""

    state: QualityState
    ejected_until_ms: Annotated[int | None, Meta(description="Wall time the ejection ends (ejected only)")]
    ejected_for_seconds: float | None
    ejections: NonNeg
    last_ejection_reason: str | None
    consecutive_errors: NonNeg
    probation_successes: NonNeg
    window_seconds: float
    jobs: Annotated[NonNeg, Meta(description="Attempts of this node that ended within the window")]
    successes: NonNeg
    failures: NonNeg
    timeouts: Annotated[NonNeg, Meta(description="No ack or no result before the deadline")]
    empty_results: Annotated[NonNeg, Meta(description="No ASR text for audio judged to hold speech")]
    success_rate: float | None
    latency_ms: NodeLatency
    codes: Annotated[
        dict[str, NonNeg], Meta(description="Failure codes and timeout kinds (ack_timeout, exec_timeout)")
    ]


class NodePage(Response):
    total: NonNeg
    offset: NonNeg
    limit: NonNeg
    next_offset: NonNeg | None
    next_after: str | None
    nodes: list[NodeDetail]


class NodeJob(Response):
    job_id: str
    state: Annotated[str, Meta(description="The job's state, or failed_over when it moved to another node")]
    attempt: NonNeg
    src_lang: str
    tgt_lang: str
    error_code: str | None
    age_seconds: Seconds
    duration_seconds: Seconds | None


class NodeJobs(Response):
    node_id: str
    retention_seconds: Seconds
    total: NonNeg
    outcomes: dict[str, NonNeg]
    jobs: list[NodeJob]


# --- pools -------------------------------------------------------------------------------------------


class PoolEntry(Response):
    pool_id: str
    shards: list[str]
    members: NonNeg
    ready: NonNeg
    asr_ready: NonNeg
    nmt_ready: NonNeg
    tts_ready: NonNeg
    sample_node_ids: list[str]
    name: Annotated[str, Meta(description="Capability pools only")] | UnsetType = UNSET
    required_services: list[str] | UnsetType = UNSET


class Pools(Response):
    mode: str
    max_pool_size: NonNeg
    pool_count: NonNeg
    shard_count: NonNeg
    pools: list[PoolEntry]


class SimulationDebug(Response):
    mode: str
    pool_count: NonNeg
    preferred_pool: str | None
    selected_pool: str | None
    fallback_used: bool
    truncated: bool
    attempts: Annotated[
        list[tuple[str, str, NonNeg]], Meta(description="[pool_id, outcome, candidates] per pool tried")
    ]


class Breakdown(Response):
    """Nodes examined, and how many each exclusion reason ruled out (``core.selection.REASONS``, in order)."""

    total_nodes: NonNeg
    offline: NonNeg
    status_not_ready: NonNeg
    not_in_public_pool: NonNeg
    gpu_unavailable: NonNeg
    model_not_available: NonNeg
    service_unavailable: NonNeg
    capacity_exceeded: NonNeg
    resource_threshold_exceeded: NonNeg
    lang_pair_unsupported: NonNeg
    asr_lang_unsupported: NonNeg
    tts_lang_unsupported: NonNeg
    src_auto_no_candidate: NonNeg
    ejected: Annotated[NonNeg, Meta(description="Nodes ejected for failing their jobs (node quality)")]
    eligible: NonNeg
    excluded: NonNeg


class SimulationRequest(Response):
    src_lang: str
    tgt_lang: str
    required: list[str]
    routing_key: str
    tenant_id: str | None


class Simulation(Response):
    selected_node_id: str | None
    best_reason: str
    preferred_node: str | None
    debug: SimulationDebug
    breakdown: Breakdown
    request: SimulationRequest
    fleet_view_version: NonNeg


# --- jobs, sessions, tenants -------------------------------------------------------------------------


class JobAges(Response):
    created: Seconds | None
    dispatched: Seconds | None
    accepted: Seconds | None
    started: Seconds | None
    finished: Seconds | None


class JobTransition(Response):
    age_seconds: Seconds | None
    from_: JobState | None = field(name="from")
    to: JobState
    reason: str
    attempt: NonNeg
    node_id: str | None


class JobDetail(Response):
    job_id: str
    session_id: str
    utterance_index: NonNeg
    src_lang: str
    tgt_lang: str
    state: JobState
    attempt: NonNeg
    node_id: str | None
    tried_nodes: list[str]
    error_code: str | None
    audio_ms: NonNeg
    age_seconds: JobAges
    history: list[JobTransition]


class Sessions(Response):
    total: NonNeg
    by_phase: dict[str, NonNeg]
    by_language_pair: dict[str, NonNeg]


class RoomAges(Response):
    p50: Annotated[float | None, Meta(description="Median age of the live rooms, in seconds")]
    max: Annotated[float | None, Meta(description="Age of the oldest live room, in seconds")]


class Rooms(Response):
    """Counts only: no room codes, member names, languages or text."""

    rooms: Annotated[NonNeg, Meta(description="Rooms with a member on this instance")]
    members: Annotated[NonNeg, Meta(description="Their members (on any instance)")]
    max_members: Annotated[NonNeg, Meta(description="rooms.max_members")]
    by_size: Annotated[dict[str, NonNeg], Meta(description="Members -> how many rooms have that many")]
    age_seconds: RoomAges
    fanout_jobs_total: Annotated[NonNeg, Meta(description="Jobs created for room members' utterances")]


class TenantRow(Response):
    tenant_id: str | None
    sessions: NonNeg
    jobs_last_minute: NonNeg
    jobs_per_second: float
    sessions_elsewhere: NonNeg


class Tenants(Response):
    window_seconds: Seconds
    configured: list[str]
    metered: Annotated[bool, Meta(description="Always false: the scheduler does not meter usage")]
    total: NonNeg
    tenants: list[TenantRow]


# --- admin -------------------------------------------------------------------------------------------


class AdminCheck(Response):
    ok: bool


class NodeAction(Response):
    action: Literal["drain", "undrain", "disconnect"]
    node_id: str
    status: NodeStatus
    drain_requested: bool
    connected: bool
    changed: Annotated[bool, Meta(description="False when the node already was in the asked state")]
    published: (
        Annotated[bool, Meta(description="drain/undrain: the fleet view selection reads has the change")]
        | UnsetType
    ) = UNSET
    instance: (
        Annotated[str, Meta(description="Redis mode: the instance holding the node, which did the action")]
        | UnsetType
    ) = UNSET


class NodeForgotten(Response):
    action: Literal["forget"]
    node_id: str
    offline_seconds: Annotated[float, Meta(description="How long the node had been disconnected (s)")]
    shared: Annotated[bool, Meta(description="Removed from the shared directory too (always true embedded)")]
    instance: (
        Annotated[str, Meta(description="Redis mode: the instance that held the record")] | UnsetType
    ) = UNSET


class NodeRevoked(Response):
    action: Literal["revoke"]
    node_id: str
    changed: Annotated[bool, Meta(description="False when the id was revoked already")]
    disconnected: Annotated[bool, Meta(description="The node was connected here and its socket is closed")]
    shared: Annotated[bool, Meta(description="Written to the shared revocation list (false: 202, pending)")]
    scope: Literal["instance", "cluster"]


class OfflineForgotten(Response):
    action: Literal["forget_offline"]
    older_than_seconds: float
    forgotten: Annotated[list[str], Meta(description="Ids forgotten, oldest first")]
    count: NonNeg
    shared: bool
    held_elsewhere: Annotated[
        int, Meta(ge=0, description="Offline nodes in this view held by other instances (forget them there)")
    ]


class JobCancelled(Response):
    action: Literal["cancel_job"]
    job_id: str
    state: Literal["cancelled"]
    attempt: NonNeg


class ReasonBody(Struct, kw_only=True):
    """Optional request body of some admin actions: shown to the peer and in the log (a body that is
    not this is ignored, the default reason applies)."""

    reason: Annotated[str, Meta(max_length=200)] | UnsetType = UNSET


# --- query strings -----------------------------------------------------------------------------------
#
# A list parameter may repeat (``?status=ready&status=draining``) or hold commas (``?status=ready,draining``);
# blank items are dropped, so ``?status=`` means no filter. ``Meta.extra["noun"]`` names an enum item in
# the error message; ``extra["fold_case"]`` accepts it in any case.

Limit = Annotated[int, Meta(ge=1, le=500, description="Page size")]


class EventsQuery(Struct, kw_only=True):
    kind: Annotated[list[EventKind], Meta(description="Only these kinds", extra={"noun": "event kind"})] = []
    limit: Limit = 50


class NodeListQuery(Struct, kw_only=True):
    status: Annotated[
        list[NodeStatus], Meta(description="Only nodes in these states", extra={"noun": "status"})
    ] = []
    pool: (
        Annotated[str, Meta(description="Only members of this pool (group ``en->zh`` or shard ``en->zh#0``)")]
        | None
    ) = None
    language: (
        Annotated[str, Meta(description="Only nodes speaking this language (ASR, TTS or semantic)")] | None
    ) = None
    limit: Limit = 100
    offset: Annotated[int, Meta(ge=0, le=10**9, description="Skip")] = 0
    after: (
        Annotated[
            str,
            Meta(
                description="Cursor: only nodes with ids after this one (``next_after`` of the previous "
                "page); ``offset`` then skips matches after it"
            ),
        ]
        | None
    ) = None


NonEmpty = Annotated[str, Meta(min_length=1)]


class SimulateQuery(Struct, kw_only=True):
    src_lang: Annotated[str, Meta(min_length=1, description="Source language")]
    tgt_lang: Annotated[str, Meta(min_length=1, description="Target language")]
    required: Annotated[
        list[ServiceType],
        Meta(
            description="Services (default: the core ones)", extra={"noun": "service type", "fold_case": True}
        ),
    ] = []
    features: Annotated[list[str], Meta(description="Feature flags the node must support")] = []
    routing_key: Annotated[str, Meta(description="Affinity key (else tenant_id, else session_id)")] | None = (
        None
    )
    tenant_id: Annotated[str, Meta(description="Tenant (tenant pool overrides)")] | None = None
    session_id: Annotated[str, Meta(description="Session id, as a routing key")] | None = None
    preferred_node: Annotated[str, Meta(description="Paired node to try first")] | None = None
    exclude_node_id: Annotated[list[str], Meta(description="Nodes not to pick")] = []
    accept_public: Annotated[bool, Meta(description="Public nodes only")] = True


class SeriesQuery(Struct, kw_only=True):
    window: Annotated[int, Meta(ge=60, le=3600, description="Seconds")] = 3600


class ForgetOfflineQuery(Struct, kw_only=True):
    older_than_seconds: Annotated[
        float, Meta(ge=0, le=365 * 86400, description="Disconnected at least this long (s)")
    ]
