"""Configuration: typed sections with documented defaults, a TOML file, and ``LINGUA_*`` overrides.

Precedence: built-in defaults < TOML file (``--config``) < environment < command-line flags.
An environment variable ``LINGUA_<SECTION>__<KEY>`` (double underscore between section and key, e.g.
``LINGUA_NODE_HEALTH__HEARTBEAT_TIMEOUT_SECONDS=30``) overrides one key; its value is read as a TOML
value (``30``, ``true``, ``"text"``, ``[1, 2]``), falling back to a plain string.
Bad configuration raises ``ConfigError`` naming the key, the reason (in our words: what msgspec refused is
interpreted by ``protocol.codec.explain``, as for wire frames) and where the value came from: the
environment variable (``LINGUA_SERVER__PORT: ...``) or the file; the CLI prints it and exits.
``docs/configuration.md`` and ``lingua-scheduler.example.toml`` list every key.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec
import msgspec.inspect

from lingua_scheduler.errors import ConfigError, InvalidField, Reason
from lingua_scheduler.protocol.codec import explain

ENV_PREFIX = "LINGUA_"
#: shortest admin token accepted: a guessable token is worse than none
MIN_ADMIN_TOKEN = 16
#: bound of ``admin.max_metric_pairs``: the engine counts the jobs of at most this many pairs
MAX_METRIC_PAIRS = 256


class Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of config sections: unknown keys are errors, not silently ignored."""


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise InvalidField(name, f"must be > 0, got {value}")


class ServerConfig(Section):
    """Listener, frame limits and logging."""

    #: address to listen on
    host: str = "127.0.0.1"
    #: port for WebSockets (/ws/node, /ws/session) and HTTP
    port: int = 5010
    #: largest WebSocket frame accepted from nodes and sessions; bigger frames are refused
    max_frame_bytes: int = 1_048_576
    #: per-connection outbound queue bound; a peer that falls this far behind is disconnected
    outbound_queue: int = 1024
    #: listen backlog: a fleet reconnecting at once after a restart must not be refused
    backlog: int = 2048
    #: root log level of the lines on stderr
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: log lines: "text" (readable) on a terminal and "json" (one object each) otherwise, or forced
    log_format: Literal["auto", "text", "json"] = "auto"
    #: per-module log levels, e.g. {"lingua_scheduler.server.ws.node_endpoint" = "debug"}
    log_levels: dict[str, str] = {}

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise InvalidField("port", f"must be in 0..65535, got {self.port}")
        _positive("max_frame_bytes", self.max_frame_bytes)
        _positive("outbound_queue", self.outbound_queue)
        levels = ("debug", "info", "warning", "error", "critical")
        for module, level in self.log_levels.items():
            if level.lower() not in levels:
                raise InvalidField(
                    "log_levels", f"must map modules to one of {levels}; {module!r} has {level!r}"
                )


class NodeHealthConfig(Section):
    """Heartbeats, liveness and the node status machine."""

    #: heartbeat interval told to nodes while the fleet is small
    heartbeat_interval_seconds: float = 15.0
    #: total heartbeats per second the scheduler wants to absorb; the interval told to nodes grows
    #: with the fleet so that nodes / interval stays under this budget
    heartbeat_budget_per_second: float = 2000.0
    #: silence after which a node is offline; never less than 3 current intervals
    heartbeat_timeout_seconds: float = 45.0
    #: healthy heartbeats needed to go registering -> ready
    health_check_count: int = 1
    #: registering longer than this -> degraded
    warmup_timeout_seconds: float = 60.0
    #: consecutive unhealthy heartbeats that take a ready node to degraded
    consecutive_failure_count: int = 3
    #: how often silent nodes are looked for
    status_scan_interval_seconds: float = 1.0
    #: while the event loop lags more than this, timeouts are not applied (our stall, not theirs)
    offline_suppress_loop_lag_seconds: float = 1.0

    def __post_init__(self) -> None:
        for name in (
            "heartbeat_interval_seconds",
            "heartbeat_budget_per_second",
            "heartbeat_timeout_seconds",
            "warmup_timeout_seconds",
            "status_scan_interval_seconds",
            "offline_suppress_loop_lag_seconds",
        ):
            _positive(name, getattr(self, name))
        if self.health_check_count < 1:
            raise InvalidField("health_check_count", "must be >= 1")
        if self.consecutive_failure_count < 1:
            raise InvalidField("consecutive_failure_count", "must be >= 1")


class SchedulerConfig(Section):
    """Capacity and the fleet view."""

    #: jobs a node runs at once; selection excludes a node whose effective load reaches it
    max_concurrent_jobs_per_node: int = 4
    #: cpu/gpu/memory percentage at or above which a node is passed over for nodes under it (it still
    #: takes work when every capable node is over it)
    resource_threshold: float = 85.0
    #: the fleet view is republished at most this often when something changed
    fleet_view_interval_ms: int = 50

    def __post_init__(self) -> None:
        _positive("max_concurrent_jobs_per_node", self.max_concurrent_jobs_per_node)
        if not 0 < self.resource_threshold <= 100:
            raise InvalidField("resource_threshold", "must be in (0, 100]")
        _positive("fleet_view_interval_ms", self.fleet_view_interval_ms)


class CapabilityPoolConfig(Section):
    """One configured pool of capability mode (the same fields as the reference's capability pools)."""

    pool_id: str
    name: str = ""
    #: service types ("asr", "nmt", "tts", "tone", "semantic"); empty = wildcard pool
    required_services: list[str] = []


class TenantOverride(Section):
    tenant_id: str
    pool_id: str


class PoolsConfig(Section):
    """Pools and two-level selection."""

    #: "language_pair" (default), "capability" or "hash"
    mode: Literal["language_pair", "capability", "hash"] = "language_pair"
    #: language-pair pools are split into shards of at most this many nodes
    max_pool_size: int = 100
    #: hash mode: number of buckets
    pool_count: int = 16
    #: mixed into every FNV-1a hash of pools (appended to the key as 8 bytes little-endian)
    hash_seed: int = 0
    #: capability mode: the configured pools
    pools: list[CapabilityPoolConfig] = []
    pool_match_scope: Literal["core_only", "all_required"] = "core_only"
    pool_match_mode: Literal["contains", "exact"] = "contains"
    #: capability mode: no eligible pool -> fail instead of trying every pool
    strict_pool_eligibility: bool = False
    #: try the other eligible pools when the preferred one yields no node
    fallback: bool = True
    tenant_overrides: list[TenantOverride] = []
    #: preferred pool by stable hash of the routing key (else random)
    session_affinity: bool = False
    #: power-of-d choices inside a pool
    choices: int = 2
    #: how long a (node, service) stays unusable after a MODEL_NOT_AVAILABLE job error
    unavailable_ttl_seconds: float = 60.0

    def __post_init__(self) -> None:
        _positive("max_pool_size", self.max_pool_size)
        _positive("pool_count", self.pool_count)
        _positive("choices", self.choices)
        _positive("unavailable_ttl_seconds", self.unavailable_ttl_seconds)
        if not 0 <= self.hash_seed < 2**64:
            raise InvalidField("hash_seed", "must be in 0..2^64-1")
        if self.mode == "capability" and not self.pools:
            raise InvalidField("pools", "must list at least one pool when mode is 'capability'")


class SessionConfig(Section):
    """Client sessions: segmentation and result ordering."""

    #: silence longer than this, beyond the end of the audio received (timed as if played from its
    #: arrival), finalizes the current utterance; a client's chunk cadence never counts as silence
    pause_ms: int = 800
    #: an utterance is cut when its estimated audio reaches this length
    max_duration_ms: int = 20_000
    #: an utterance is cut when its buffered audio reaches this many bytes
    max_utterance_bytes: int = 512 * 1024
    #: all audio buffered for one session (utterances not yet dispatched); over it -> error
    max_session_buffer_bytes: int = 4 * 1024 * 1024
    #: Opus packets one audio chunk (or one whole utterance) may hold; more is refused with
    #: invalid_message(too_large), so the work of segmenting one frame stays bounded. The default holds
    #: max_duration_ms of the shortest packets (2.5 ms) with room to spare
    max_chunk_packets: int = 10_000
    #: utterances of one session waiting for their results (accepted, not all delivered); one more is
    #: refused at once with missing_result(queue_full) and gets no job (finished work is never dropped)
    max_pending_results: int = 64
    #: an utterance index still missing after this long is released as missing_result(gap_timeout);
    #: its result, if it comes later, is still delivered, marked late
    result_gap_timeout_ms: int = 10_000
    #: what a session that declares no audio_format streams; "opus" is length-prefixed Opus (a 2-byte
    #: little-endian length before each packet), what the reference web client always sends. Such audio
    #: is recognised whatever this says; undeclared audio in no recognised format is refused
    default_audio_format: str = "opus"
    default_sample_rate: int = 16_000
    #: while the client plays synthesized speech (tts_started .. tts_play_ended) no pause cut happens,
    #: for at most this long after tts_started (a client that never reports the end)
    tts_guard_max_ms: int = 30_000
    #: a session whose connection drops stays resumable this long (session_init.resume_token): its
    #: jobs keep running and its results wait for the reconnect; 0 ends it at the disconnect
    resume_window_ms: int = 0
    #: messages kept for a detached session until it resumes (results, missing_result, errors); past
    #: it the oldest are dropped, and the client learns of their utterances by missing_result on resume
    max_detached_messages: int = 256

    def __post_init__(self) -> None:
        for name in (
            "pause_ms",
            "max_duration_ms",
            "max_utterance_bytes",
            "max_session_buffer_bytes",
            "max_chunk_packets",
            "max_pending_results",
            "result_gap_timeout_ms",
            "default_sample_rate",
            "tts_guard_max_ms",
            "max_detached_messages",
        ):
            _positive(name, getattr(self, name))
        if self.resume_window_ms < 0:
            raise InvalidField("resume_window_ms", "must be >= 0 (0 disables resuming)")


class JobConfig(Section):
    """Jobs: timeouts, failover, waiting for capacity, retention."""

    #: a dispatched job not acknowledged by its node within this time fails over
    ack_timeout_ms: int = 5_000
    #: execution timeout = base + per_audio_second x audio seconds, clamped to [min, max]
    exec_timeout_base_ms: int = 10_000
    exec_timeout_per_audio_second_ms: int = 2_000
    exec_timeout_min_ms: int = 15_000
    exec_timeout_max_ms: int = 60_000
    #: attempts per job in total (first dispatch included)
    max_attempts: int = 3
    #: a job with no node fitting waits this long for capacity before NO_AVAILABLE_NODE
    pending_timeout_ms: int = 3_000
    #: bound of the wait queue of jobs waiting for capacity (per instance); full -> fail at once
    max_pending_jobs: int = 1_000
    #: terminal jobs are kept this long (for /api/v1/jobs and duplicate detection), then evicted
    retention_seconds: float = 60.0
    #: bound on jobs known to this instance; over it new jobs are refused
    max_jobs: int = 100_000
    #: ask nodes for live ASR partials (job_assign.enable_streaming_asr) when the session does not say
    streaming_asr_default: bool = True
    #: partial update interval asked of nodes when the session does not give one
    partial_update_interval_ms: int = 1_000

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if not isinstance(value, bool):
                _positive(name, value)
        if self.exec_timeout_min_ms > self.exec_timeout_max_ms:
            raise InvalidField("exec_timeout_min_ms", "must be <= exec_timeout_max_ms")


class QualityConfig(Section):
    """Node quality: rolling job outcome figures per node and outlier ejection (docs/operations.md)."""

    #: eject nodes that fail their jobs; off: the figures are still kept and shown, no node is ejected
    ejection_enabled: bool = True
    #: the rolling figures (and the success-rate rules) cover this much recent time per node
    window_seconds: float = 300.0
    #: and at most this many recent jobs per node (bounds memory: a node costs this many entries)
    window_max_jobs: int = 200
    #: how often the success-rate rules run and ejected nodes come back on probation
    interval_ms: int = 10_000
    #: failed or timed-out jobs in a row that eject a node at once; 0 disables the rule
    consecutive_failures: int = 5
    #: timed-out jobs in a row (no ack or no result in time) that eject a node at once; a node that
    #: never answers costs each of its jobs a full deadline, so this is lower; 0 disables the rule
    consecutive_timeouts: int = 3
    #: first ejection lasts this long; each further ejection in a row doubles it
    base_ejection_ms: int = 30_000
    #: bound of the doubled ejection time
    max_ejection_ms: int = 300_000
    #: at most this share of the fleet is ejected at once; one node may always be ejected while no
    #: other is, and never the last node not ejected
    max_ejection_percent: float = 20.0
    #: jobs a node must have had in the window for the success-rate rules to judge it
    request_volume: int = 20
    #: the success-rate rule runs only with at least this many nodes having ``request_volume``
    success_rate_minimum_nodes: int = 5
    #: a node whose success rate is below mean - factor x standard deviation of the fleet's is ejected
    success_rate_stdev_factor: float = 1.9
    #: a node failing at least this percentage of its jobs is ejected whatever the fleet does; 0 disables
    failure_percentage_threshold: float = 85.0
    #: the failure-percentage rule runs only with at least this many nodes having ``request_volume``
    failure_percentage_minimum_nodes: int = 2
    #: successes in a row that end a returning node's probation; a failure during probation ejects it
    #: again, for twice as long
    probation_jobs: int = 3
    #: count an empty recognition (no ASR text for audio judged to hold speech) as a failure; off, it
    #: is a figure only (noise the client did not filter may be recognised as nothing)
    empty_result_is_failure: bool = False

    def __post_init__(self) -> None:
        for name in (
            "window_seconds",
            "window_max_jobs",
            "interval_ms",
            "base_ejection_ms",
            "probation_jobs",
        ):
            _positive(name, getattr(self, name))
        for name in (
            "consecutive_failures",
            "consecutive_timeouts",
            "request_volume",
            "success_rate_minimum_nodes",
            "success_rate_stdev_factor",
            "failure_percentage_minimum_nodes",
        ):
            if getattr(self, name) < 0:
                raise InvalidField(name, f"must be >= 0, got {getattr(self, name)}")
        if self.max_ejection_ms < self.base_ejection_ms:
            raise InvalidField("max_ejection_ms", "must be >= base_ejection_ms")
        if self.request_volume > self.window_max_jobs:
            # the window would never hold enough jobs for the success-rate rules to judge a node
            raise InvalidField("request_volume", "must be <= window_max_jobs")
        for name in ("max_ejection_percent", "failure_percentage_threshold"):
            if not 0 <= getattr(self, name) <= 100:
                raise InvalidField(name, f"must be in 0..100, got {getattr(self, name)}")


#: shortest TURN shared secret accepted (rooms.turn_secret): the TURN server trusts whoever knows it
MIN_TURN_SECRET = 16
_ICE_URL = re.compile(r"(stun|stuns|turn|turns):[^\s]+")


class RoomsConfig(Section):
    """Rooms: multi-party translated conversations and their WebRTC signalling (docs/configuration.md)."""

    #: digits of a room code (made with a CSPRNG, unique among live rooms); the reference web client
    #: only joins 6-digit codes
    code_length: int = 6
    #: members a room holds at most; one more room_join -> ROOM_FULL. Every member opens a WebRTC
    #: connection to every other one, so the cost of a room grows with the square of this
    max_members: int = 8
    #: a room in which nobody spoke (nor joined) for this long expires: room_expired to every member
    expire_after_seconds: float = 1800.0
    #: rooms are checked for expiry when the next one is due, and at least this often
    sweep_interval_seconds: float = 60.0
    #: JSON bytes of a relayed session description (webrtc_offer / webrtc_answer sdp) at most;
    #: larger -> room_error MESSAGE_TOO_LARGE
    max_sdp_bytes: int = 16_384
    #: JSON bytes of a relayed ICE candidate (webrtc_ice candidate) at most
    max_candidate_bytes: int = 2_048
    #: webrtc_* relays per second one connection may send on average; over it -> room_error RATE_LIMITED
    relay_messages_per_second: float = 20.0
    #: relays a connection may send at once above that rate (ICE gathering sends a burst of candidates)
    relay_burst: int = 100
    #: STUN server URLs handed to members (room_create_ack / room_members ice_servers); empty = none
    stun_urls: list[str] = []
    #: TURN server URLs handed to members with time-limited credentials; needs turn_secret
    turn_urls: list[str] = []
    #: the TURN server's shared secret (coturn: use-auth-secret, static-auth-secret): credentials are
    #: user "<expiry unix seconds>:<session_id>", password base64(HMAC-SHA1(secret, user)). At least
    #: 16 characters
    turn_secret: str = ""
    #: TURN credentials are valid this long after they are handed out (the TURN server refuses them,
    #: and refreshes of allocations made with them, afterwards); every room_members hands out new ones
    turn_credential_ttl_seconds: int = 43_200

    def __post_init__(self) -> None:
        if not 4 <= self.code_length <= 12:
            raise InvalidField("code_length", f"must be in 4..12, got {self.code_length}")
        if self.max_members < 2:
            raise InvalidField("max_members", f"must be >= 2, got {self.max_members}")
        for name in (
            "expire_after_seconds",
            "sweep_interval_seconds",
            "max_sdp_bytes",
            "max_candidate_bytes",
            "relay_messages_per_second",
            "relay_burst",
            "turn_credential_ttl_seconds",
        ):
            _positive(name, getattr(self, name))
        for name in ("stun_urls", "turn_urls"):
            for url in getattr(self, name):
                if not _ICE_URL.fullmatch(url):
                    raise InvalidField(name, f"must hold stun:, stuns:, turn: or turns: URLs, got {url!r}")
        if self.turn_urls and not self.turn_secret:
            raise InvalidField("turn_secret", "must be set when turn_urls is")
        if self.turn_secret and len(self.turn_secret) < MIN_TURN_SECRET:
            raise InvalidField("turn_secret", f"must be at least {MIN_TURN_SECRET} characters")


class PairingConfig(Section):
    """Pairing: a node hands out a single-use code that binds one client session to it."""

    #: digits of a pairing code (made with a CSPRNG)
    code_length: int = 6
    #: a code is accepted this long after the node asked for it, once
    ttl_seconds: float = 300.0
    #: pairing codes one client connection may try per minute on average (right or wrong); over it
    #: -> PAIRING_RATE_LIMITED
    attempts_per_minute_per_connection: float = 6.0
    #: codes a connection may try at once above that rate
    attempt_burst_per_connection: int = 3
    #: pairing codes all connections from one source address together may try per minute on average:
    #: with the defaults, one address tries at most 66 codes within a code's lifetime, out of 10^6
    attempts_per_minute_per_source: float = 12.0
    #: codes one source address may try at once above that rate
    attempt_burst_per_source: int = 6
    #: source addresses whose attempts are remembered at most (the longest-idle ones are forgotten)
    max_tracked_sources: int = 100_000
    #: a paired session's job when its node cannot take it (offline, unfit; busy jobs wait for it):
    #: true places it on the pools as any job; false fails it (NO_AVAILABLE_NODE), so that the
    #: user's audio never reaches another machine
    fallback_to_pools: bool = True

    def __post_init__(self) -> None:
        if not 4 <= self.code_length <= 12:
            raise InvalidField("code_length", f"must be in 4..12, got {self.code_length}")
        for name in self.__struct_fields__:
            if name not in ("code_length", "fallback_to_pools"):
                _positive(name, getattr(self, name))


class ClusterConfig(Section):
    """Multi-instance mode: shared state in Redis. Empty ``redis_url`` = embedded single instance."""

    #: redis://host:port/db of the shared store; empty runs the embedded in-memory default
    redis_url: str = ""
    #: the URL points at a Redis Cluster node
    redis_cluster: bool = False
    #: prefix of every key (several deployments can share one Redis)
    key_prefix: str = "lingua"
    #: this instance's id; "auto" = hostname-pid-random
    instance_id: str = "auto"
    #: liveness refresh and load summary period (one pipeline per tick)
    tick_interval_seconds: float = 1.0
    #: an instance (and its nodes) not refreshed for this long is dead
    presence_ttl_seconds: float = 5.0
    #: deadline of every Redis call; past it the instance counts Redis as unreachable
    op_timeout_seconds: float = 0.5
    #: blocking stream reads wait at most this long (on their own connections)
    stream_block_ms: int = 1000
    #: full directory resync period: the safety net under the change feed
    resync_interval_seconds: float = 60.0
    #: inbox entries delivered this many times without success go to the dead-letter stream
    inbox_max_deliveries: int = 5
    #: changes of owned nodes are published at most this often (coalesced)
    publish_interval_ms: int = 20
    #: where operators and other instances reach this instance's HTTP API, shown in GET /api/v1/cluster;
    #: empty = http(s)://<server.host or the host name>:<the port bound>
    advertise_address: str = ""

    def __post_init__(self) -> None:
        for name in (
            "tick_interval_seconds",
            "presence_ttl_seconds",
            "op_timeout_seconds",
            "stream_block_ms",
            "resync_interval_seconds",
            "inbox_max_deliveries",
            "publish_interval_ms",
        ):
            _positive(name, getattr(self, name))
        if self.presence_ttl_seconds < 2 * self.tick_interval_seconds:
            raise InvalidField("presence_ttl_seconds", "must be at least 2 x tick_interval_seconds")


class AdminConfig(Section):
    """Operator surface: admin actions (drain, undrain, disconnect, cancel) and the dashboard."""

    #: bearer token the admin actions (/api/v1/admin/...) require; empty = admin API disabled.
    #: Prefer the environment (LINGUA_ADMIN__TOKEN) to a file; at least 16 characters
    token: str = ""
    #: most dashboards (live event streams) served at once; more are refused with 503
    max_dashboard_clients: int = 32
    #: most language pairs with a label value of their own in the per-pair metrics of /metrics
    #: (lingua_pair_*{pair="src->tgt"}); the others are summed under pair="other" (at most 256: jobs are
    #: counted for 256 distinct pairs)
    max_metric_pairs: int = 200

    def __post_init__(self) -> None:
        if self.token and len(self.token) < MIN_ADMIN_TOKEN:
            raise InvalidField(
                "token", f"must be at least {MIN_ADMIN_TOKEN} characters (or empty to disable)"
            )
        if self.token != self.token.strip():
            raise InvalidField("token", "must not start or end with whitespace")
        _positive("max_dashboard_clients", self.max_dashboard_clients)
        if not 1 <= self.max_metric_pairs <= MAX_METRIC_PAIRS:
            raise InvalidField("max_metric_pairs", f"must be between 1 and {MAX_METRIC_PAIRS}")


#: shortest node enrollment / token-signing secret accepted (docs/security.md)
MIN_AUTH_SECRET = 16
#: longest: secrets travel in node_register fields of at most 256 characters
MAX_AUTH_SECRET = 256
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_TENANT_ID = re.compile(r"[A-Za-z0-9._\-]{1,64}")


class TenantKeyConfig(Section):
    """One tenant API key of ``[auth] tenants``: the key itself is never configured, only its hash."""

    tenant_id: str
    #: lowercase hex SHA-256 of the API key (``lingua-scheduler api-key`` prints a new key and its hash)
    key_sha256: str
    #: concurrent sessions of this tenant, across all instances (docs/security.md); 0 = unlimited
    max_sessions: int = 0
    #: jobs per second of this tenant, across all instances (token bucket); 0 = unlimited
    max_jobs_per_second: float = 0.0
    #: bucket size (jobs accepted at once after a quiet spell), split among instances like the rate;
    #: 0 = one second's worth, at least 1
    jobs_burst: int = 0
    #: minutes of audio this tenant may have translated per UTC day (docs/integration.md); 0 = no quota
    daily_audio_minutes: float = 0.0
    #: minutes of audio this tenant may have translated per UTC calendar month; 0 = no quota
    monthly_audio_minutes: float = 0.0
    #: http(s) URL that receives this tenant's webhook events (signed; docs/integration.md); empty = none
    webhook_url: str = ""
    #: secret the webhook signatures are computed with (HMAC-SHA256), at least 16 characters; required
    #: with webhook_url. Prefer the environment to a file
    webhook_secret: str = ""

    def __post_init__(self) -> None:
        if not self.tenant_id.strip():
            raise InvalidField("tenant_id", "must not be empty")
        if not _TENANT_ID.fullmatch(self.tenant_id):
            raise InvalidField(
                "tenant_id", "must be 1 to 64 of A-Z a-z 0-9 . _ - (it labels metrics and keys)"
            )
        self.key_sha256 = self.key_sha256.lower()
        if not _SHA256_HEX.fullmatch(self.key_sha256):
            raise InvalidField("key_sha256", "must be 64 hex digits (the SHA-256 of the key, not the key)")
        for name in ("max_sessions", "max_jobs_per_second", "jobs_burst", "daily_audio_minutes"):
            if getattr(self, name) < 0:
                raise InvalidField(name, "must be >= 0")
        if self.monthly_audio_minutes < 0:
            raise InvalidField("monthly_audio_minutes", "must be >= 0")
        if self.webhook_url:
            if not re.fullmatch(r"https?://[^\s/?#]+[^\s]*", self.webhook_url):
                raise InvalidField("webhook_url", "must be an http:// or https:// URL")
            if len(self.webhook_secret) < MIN_AUTH_SECRET:
                raise InvalidField(
                    "webhook_secret", f"must be at least {MIN_AUTH_SECRET} characters when webhook_url is set"
                )

    def settings(self) -> tuple[object, ...]:
        """What every key of one tenant must agree on (its limits, quotas and webhook endpoint)."""
        return (
            self.max_sessions,
            self.max_jobs_per_second,
            self.jobs_burst,
            self.daily_audio_minutes,
            self.monthly_audio_minutes,
            self.webhook_url,
            self.webhook_secret,
        )


class AuthConfig(Section):
    """Authentication of nodes and client sessions (docs/security.md). Nothing configured = open."""

    #: accept every node and session even when secrets are configured (local development only;
    #: ``serve --insecure-dev``); a loud warning is logged at start
    insecure_dev: bool = False
    #: fleet enrollment secret a new node presents once to be issued its node token; empty = node
    #: authentication off unless node_token_secret is set (then no new node can enroll).
    #: Prefer the environment (LINGUA_AUTH__NODE_ENROLLMENT_SECRET); at least 16 characters
    node_enrollment_secret: str = ""
    #: key material of node tokens (HMAC over the node id); empty = derived from the enrollment
    #: secret. Changing it invalidates every node token. At least 16 characters
    node_token_secret: str = ""
    #: earlier signing secrets still accepted during a rotation (tokens are re-issued with the current one)
    node_token_previous_secrets: list[str] = []
    #: node ids whose tokens are refused, in addition to the revocation list kept in the state store
    revoked_node_ids: list[str] = []
    #: tenant API keys ([[auth.tenants]] tables: tenant_id, key_sha256, max_sessions,
    #: max_jobs_per_second, jobs_burst, daily_audio_minutes, monthly_audio_minutes, webhook_url,
    #: webhook_secret); empty = sessions are not authenticated
    tenants: list[TenantKeyConfig] = []
    #: also accept the API key as ``?api_key=`` on the /ws/session URL (browsers cannot set headers;
    #: URLs end up in proxy logs and browser history: prefer session_init.api_key)
    api_key_query_param: bool = True

    def __post_init__(self) -> None:
        for name in ("node_enrollment_secret", "node_token_secret"):
            value = getattr(self, name)
            if value and len(value) < MIN_AUTH_SECRET:
                raise InvalidField(name, f"must be at least {MIN_AUTH_SECRET} characters (or empty)")
            if len(value) > MAX_AUTH_SECRET:
                raise InvalidField(name, f"must be at most {MAX_AUTH_SECRET} characters")
            if value != value.strip():
                raise InvalidField(name, "must not start or end with whitespace")
        if any(len(s) < MIN_AUTH_SECRET for s in self.node_token_previous_secrets):
            raise InvalidField(
                "node_token_previous_secrets", f"must be at least {MIN_AUTH_SECRET} characters each"
            )
        # A tenant may have several keys (to rotate one without downtime); they share its limits.
        limits: dict[str, tuple[object, ...]] = {}
        for t in self.tenants:
            mine = t.settings()
            if limits.setdefault(t.tenant_id, mine) != mine:
                raise InvalidField(
                    "tenants",
                    f"must give every key of tenant {t.tenant_id!r} the same limits, quotas and webhook",
                )
        hashes = [t.key_sha256 for t in self.tenants]
        if len(set(hashes)) != len(hashes):
            raise InvalidField("tenants", "must not list the same key_sha256 twice")

    @property
    def nodes_required(self) -> bool:
        """Node credentials are checked."""
        return not self.insecure_dev and bool(self.node_enrollment_secret or self.node_token_secret)

    @property
    def sessions_required(self) -> bool:
        """Session API keys are checked."""
        return not self.insecure_dev and bool(self.tenants)


class IntegratorConfig(Section):
    """The integrator API: one-shot translation uploads, usage metering and quotas (docs/integration.md)."""

    #: largest body of POST /v1/speech/translate (the upload and its form fields), in bytes
    translate_max_body_bytes: int = 32 * 1024 * 1024
    #: longest audio one translate request may carry, in seconds (it is cut into utterances)
    translate_max_audio_seconds: float = 600.0
    #: hours of hourly usage buckets kept per tenant and language pair (GET /api/v1/usage reaches back
    #: this far); the default covers a calendar month and a day
    usage_retention_hours: int = 32 * 24
    #: most language pairs metered apart per tenant; the others are summed under "other"
    usage_max_pairs_per_tenant: int = 32
    #: part of a daily or monthly quota whose use sends one quota.warning webhook per period
    quota_warn_fraction: float = 0.8
    #: longest a translate request may take from its arrival to its answer (JOB_TIMEOUT past it), in s
    translate_deadline_seconds: float = 120.0
    #: how long a translate answer is kept for a retry with the same Idempotency-Key, in seconds
    idempotency_ttl_seconds: float = 24 * 3600.0
    #: most answers kept for Idempotency-Key retries in embedded mode (the oldest go first)
    idempotency_max_entries: int = 1000

    def __post_init__(self) -> None:
        for name in (
            "translate_max_body_bytes",
            "translate_max_audio_seconds",
            "usage_retention_hours",
            "usage_max_pairs_per_tenant",
            "translate_deadline_seconds",
            "idempotency_ttl_seconds",
            "idempotency_max_entries",
        ):
            _positive(name, getattr(self, name))
        if not 0 < self.quota_warn_fraction < 1:
            raise InvalidField("quota_warn_fraction", "must be between 0 and 1 (exclusive)")


class WebhooksConfig(Section):
    """Delivery of the tenants' webhook events ([[auth.tenants]] webhook_url; docs/integration.md)."""

    #: deadline of one delivery attempt (connect, send, answer), in seconds
    timeout_seconds: float = 10.0
    #: wait before the first retry; doubled after each failed attempt (with jitter), in seconds
    backoff_initial_seconds: float = 1.0
    #: longest wait between two attempts, in seconds
    backoff_max_seconds: float = 300.0
    #: an event not delivered this long after it was queued is given up (counted, logged), in seconds
    give_up_after_seconds: float = 24 * 3600.0
    #: most events waiting for delivery on this instance; more are dropped (counted)
    max_queued: int = 10_000
    #: Redis mode: events of an instance whose presence expired are taken over by another once they
    #: waited this long unacknowledged, in seconds
    claim_idle_seconds: float = 5.0

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            _positive(name, getattr(self, name))
        if self.backoff_max_seconds < self.backoff_initial_seconds:
            raise InvalidField("backoff_max_seconds", "must be >= backoff_initial_seconds")


class TlsConfig(Section):
    """TLS for every listener route (wss:// and https://); ``serve --tls-cert/--tls-key``."""

    #: PEM certificate chain; empty = plain HTTP/WebSocket (terminate TLS in front of the scheduler)
    cert_file: str = ""
    #: PEM private key of the certificate
    key_file: str = ""

    def __post_init__(self) -> None:
        if self.cert_file and not self.key_file:
            raise InvalidField("key_file", "must be set when cert_file is")
        if self.key_file and not self.cert_file:
            raise InvalidField("cert_file", "must be set when key_file is")


class ShutdownConfig(Section):
    """Graceful shutdown on SIGTERM (docs/reliability.md, "Faults")."""

    #: after SIGTERM, in-flight jobs get this long to finish; what is still running then is failed
    #: explicitly to its session (SCHEDULER_SHUTTING_DOWN). Keep it below the orchestrator's grace
    #: period (Kubernetes: terminationGracePeriodSeconds, 30 s by default)
    drain_timeout_seconds: float = 20.0
    #: bound on the last step: flushing queued messages and closing every socket (code 1001)
    close_timeout_seconds: float = 2.0

    def __post_init__(self) -> None:
        if self.drain_timeout_seconds < 0:
            raise InvalidField("drain_timeout_seconds", "must be >= 0")
        _positive("close_timeout_seconds", self.close_timeout_seconds)


_ORIGIN = re.compile(r"[a-z][a-z0-9+.\-]*://[^/\s?#]+")


class LimitsConfig(Section):
    """Limits against misbehaving or hostile peers; each has a defined behaviour (docs/reliability.md)."""

    #: frames per second a node connection may send on average (token bucket refill); a node sends a
    #: heartbeat every few seconds and a handful of messages per job, so this is far above normal use
    node_messages_per_second: float = 100.0
    #: frames a node connection may send at once above that rate (bucket size)
    node_message_burst: int = 500
    #: frames per second a session connection may send on average (20 ms audio chunks are 50/s)
    session_messages_per_second: float = 100.0
    #: frames a session connection may send at once above that rate (bucket size)
    session_message_burst: int = 500
    #: over the rate, frames are dropped and the peer is told (RATE_LIMITED, at most once a second);
    #: a connection that stays over its rate this long is closed (close code 1008)
    rate_limit_close_after_seconds: float = 5.0
    #: most nodes registered on this instance's sockets at once; one more -> NODE_LIMIT_REACHED
    max_nodes: int = 50_000
    #: most node records this instance keeps (online and offline, in Redis mode also other instances');
    #: over it a node id never seen before is refused (NODE_LIMIT_REACHED), known ids still reconnect
    max_node_records: int = 200_000
    #: offline node records (kept for a reconnect: drain flag, history) older than this are evicted;
    #: before a new node is refused for max_node_records, the oldest offline records are evicted first
    offline_record_retention_seconds: float = 86_400.0
    #: new nodes enrolling with the fleet secret (node auth on), per second on average, all sources together
    enrollments_per_second_per_secret: float = 10.0
    #: enrollments with the fleet secret accepted at once above that rate (a fleet being installed)
    enrollment_burst_per_secret: int = 200
    #: enrollment attempts (secret right or wrong) from one source address, per second on average
    enrollments_per_second_per_source: float = 2.0
    #: enrollment attempts from one source address accepted at once above that rate
    enrollment_burst_per_source: int = 50
    #: languages in one list a node reports (asr, tts, semantic, each translation model's languages);
    #: longer -> INVALID_CAPABILITY_SCHEMA
    max_languages_per_list: int = 64
    #: language pairs in one list a node reports (supported_language_pairs, a model's supported_pairs or
    #: blocked_pairs); longer -> INVALID_CAPABILITY_SCHEMA
    max_language_pairs_per_list: int = 1024
    #: translation models (nmt_capabilities entries) of one node; more -> INVALID_CAPABILITY_SCHEMA
    max_translation_models: int = 32
    #: entries of installed_services, installed_models and capability_by_type, each; more ->
    #: INVALID_CAPABILITY_SCHEMA
    max_services_per_node: int = 256
    #: directed language pairs (auto -> x included) one node may serve end to end, i.e. pools it joins;
    #: a report that would serve more is refused (INVALID_CAPABILITY_SCHEMA), never cut short
    max_served_pairs_per_node: int = 1024
    #: capability changes applied per node and minute on average; changes beyond it are deferred and
    #: coalesced: the latest report is applied as soon as the node's budget allows
    capability_changes_per_minute: float = 12.0
    #: capability changes a node may make at once above that rate (a node loading its models)
    capability_change_burst: int = 6
    #: most open sessions on this instance; one more session_init -> SESSION_LIMIT_REACHED
    max_sessions: int = 20_000
    #: most open WebSockets (both endpoints) on this instance; more upgrade requests -> HTTP 503
    max_connections: int = 100_000
    #: a WebSocket that has not registered a node / opened a session within this time is closed (1008)
    handshake_timeout_seconds: float = 10.0
    #: sockets accepted beyond max_connections for plain HTTP (/health, /metrics, admin), so that they
    #: answer while the WebSockets are at their cap; every accepted socket counts against
    #: max_connections + http_socket_reserve, more are answered 503 and closed
    http_socket_reserve: int = 256
    #: sockets open at once from one source IP address; more are answered 503 and closed
    max_connections_per_source: int = 1_000
    #: a request head (and, with TLS, the TLS handshake) must be complete this long after the socket
    #: was accepted or the next request's first byte arrived; else 408 and the socket is closed
    header_timeout_seconds: float = 10.0
    #: bytes a socket may send before it authenticates (a WebSocket registers a node / opens a
    #: session; a plain HTTP request reaches its handler); more -> closed (1009, HTTP 413)
    preauth_connection_bytes: int = 256 * 1024
    #: bytes all unauthenticated sockets together may have sent (what the server may buffer for
    #: them); a socket that would go over it is closed (1013, HTTP 503)
    preauth_buffer_bytes: int = 64 * 1024 * 1024
    #: file descriptors kept for everything but client sockets (listener, Redis, logs, files); at
    #: start max_connections is lowered so that max_connections + http_socket_reserve + fd_reserve
    #: fits the process's descriptor limit (RLIMIT_NOFILE, raised to its hard limit first)
    fd_reserve: int = 128
    #: bytes queued for one connection (with server.outbound_queue, the message count) beyond which the
    #: peer is disconnected as a slow consumer (1008); one larger message is still sent on its own
    outbound_queue_bytes: int = 16 * 1024 * 1024
    #: Origin values (scheme://host[:port]) allowed to open /ws/session; empty = any. Browsers always
    #: send Origin; a request without one (native apps, gateways) is not a browser's and is allowed
    session_allowed_origins: list[str] = []

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            if name != "session_allowed_origins":
                _positive(name, getattr(self, name))
        origins = [o.strip().lower().rstrip("/") for o in self.session_allowed_origins]
        for o in origins:
            if not _ORIGIN.fullmatch(o):
                raise InvalidField(
                    "session_allowed_origins", f"must hold scheme://host[:port] values, got {o!r}"
                )
        self.session_allowed_origins = origins


class Config(Section):
    """The whole configuration."""

    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    node_health: NodeHealthConfig = msgspec.field(default_factory=NodeHealthConfig)
    scheduler: SchedulerConfig = msgspec.field(default_factory=SchedulerConfig)
    pools: PoolsConfig = msgspec.field(default_factory=PoolsConfig)
    session: SessionConfig = msgspec.field(default_factory=SessionConfig)
    jobs: JobConfig = msgspec.field(default_factory=JobConfig)
    quality: QualityConfig = msgspec.field(default_factory=QualityConfig)
    rooms: RoomsConfig = msgspec.field(default_factory=RoomsConfig)
    pairing: PairingConfig = msgspec.field(default_factory=PairingConfig)
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)
    shutdown: ShutdownConfig = msgspec.field(default_factory=ShutdownConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    integrator: IntegratorConfig = msgspec.field(default_factory=IntegratorConfig)
    webhooks: WebhooksConfig = msgspec.field(default_factory=WebhooksConfig)
    tls: TlsConfig = msgspec.field(default_factory=TlsConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)


_CONFIG_TYPE = msgspec.inspect.type_info(Config)


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _env_overrides(env: Mapping[str, str]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The sections and keys the environment sets, and the variable that set each ``section.key``."""
    out: dict[str, dict[str, Any]] = {}
    names: dict[str, str] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        out.setdefault(section, {})[key] = _parse_env_value(raw)
        names[f"{section}.{key}"] = name
    return out, names


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(merged.get(k), dict):
            merged[k] = _merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def _lookup(data: Mapping[str, Any], key: str) -> bool:
    """``section.key`` (or ``section``) is set in ``data`` (an empty section sets nothing)."""
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return bool(node != {})


#: how a problem reads in a configuration error (the codec's wording says "field", we say "key")
_CONFIG_REASONS = {Reason.UNKNOWN_FIELD: "unknown key", Reason.MISSING_FIELD: "missing required key"}


def load_config(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Build the configuration; raises ``ConfigError`` naming the offending key, and the environment
    variable or the file it came from."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(str(path), "config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(path), f"not valid TOML: {exc}", file=str(path)) from None
    from_file = data
    from_env, env_names = _env_overrides(os.environ if env is None else env)
    data = _merge(data, from_env)
    if overrides:
        data = _merge(data, overrides)
    try:
        return msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as exc:
        problem = explain(exc, data, _CONFIG_TYPE)
        key = problem.field.removeprefix("$").removeprefix(".") or "<root>"
        reason = _CONFIG_REASONS.get(problem.reason, problem.detail)
        raise _config_error(key, reason, from_file, env_names, overrides, path) from None


def _config_error(
    key: str,
    reason: str,
    from_file: Mapping[str, Any],
    env_names: Mapping[str, str],
    overrides: Mapping[str, Mapping[str, Any]] | None,
    path: str | Path | None,
) -> ConfigError:
    """The error names where the bad value came from: command-line flags win over the environment,
    which wins over the file (the precedence of ``load_config``)."""
    # the key as set (``auth.tenants[0].max_sessions`` was set as ``auth.tenants``)
    set_as = ".".join(key.split(".")[:2]).split("[")[0]
    if overrides and _lookup(overrides, set_as):
        return ConfigError(key, reason)
    # a key of a section that does not exist (``LINGUA_BOGUS__X`` is reported as key ``bogus``)
    variables = sorted(n for k, n in env_names.items() if k == set_as or k.startswith(set_as + "."))
    if variables:
        return ConfigError(key, reason, env_var=", ".join(variables))
    if path is not None and _lookup(from_file, set_as):
        return ConfigError(key, reason, file=str(path))
    return ConfigError(key, reason)


def _field_docs(cls: type) -> dict[str, str]:
    """``#:`` comments above each field of a section, read from its source."""
    import inspect

    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        m = re.match(r"(\w+)\s*:", stripped)
        if m and pending:
            docs[m.group(1)] = " ".join(pending)
        pending = []
    return docs


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def render_defaults() -> str:
    """The full default configuration as commented TOML (``lingua-scheduler config-defaults``)."""
    config = Config()
    out = [
        "# lingua-scheduler configuration: every key with its default.",
        "# Environment variables LINGUA_<SECTION>__<KEY> override this file.",
        "",
    ]
    for section in config.__struct_fields__:
        value = getattr(config, section)
        doc = (type(value).__doc__ or "").strip().splitlines()
        out.append(f"[{section}]" + (f"  # {doc[0]}" if doc else ""))
        docs = _field_docs(type(value))
        for key in value.__struct_fields__:
            if key in docs:
                out.append(f"# {docs[key]}")
            v = getattr(value, key)
            if isinstance(v, list) and v and isinstance(v[0], msgspec.Struct):
                continue  # tables of tables are documented in docs/configuration.md
            out.append(f"{key} = {_toml_value(v)}")
        out.append("")
    return "\n".join(out)
