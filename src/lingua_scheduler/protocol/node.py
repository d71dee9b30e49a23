"""Node <-> scheduler messages on ``/ws/node``.

Wire-compatible with the reference node client at both of its published generations (docs/protocol.md).
Deliberate differences: ``memory_gb`` accepts floats, ``job_assign`` booleans default to false, heartbeats
are acknowledged with ``node_heartbeat_ack``; ``node_register`` may carry credentials (``enrollment_secret``
or ``node_token``, docs/security.md) and its ack the node's token, and ``protocol_features`` (what the node
does beyond the base protocol, e.g. ``job_ack``), all optional and omitted when unused. Service types and
device kinds are open strings: values this scheduler does not know are kept and shown, never refused.
Unknown fields are ignored; a frame that fails validation is answered with ``error{INVALID_MESSAGE}``.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from lingua_scheduler.protocol.common import (
    ErrorMessage,
    ExtraResult,
    FeatureFlags,
    FrozenStruct,
    JobError,
    SafeInt,
    SegmentsMeta,
    ServiceStatus,
    Struct,
)

NonNegInt = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
Percent = Annotated[float, msgspec.Meta(ge=0.0, le=100.0)]
ShortStr = Annotated[str, msgspec.Meta(max_length=256)]
Lang = Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
#: a service type or device kind: open-ended (newer nodes report kinds this scheduler does not route on)
Kind = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
#: matched whole: msgspec searches the pattern and ``$`` alone also matches before a trailing newline
NodeId = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:\-]+\Z")]


class GpuInfo(FrozenStruct, frozen=True):
    name: ShortStr
    memory_gb: Annotated[float, msgspec.Meta(ge=0)]


class HardwareInfo(FrozenStruct, frozen=True):
    cpu_cores: NonNegInt
    memory_gb: Annotated[float, msgspec.Meta(ge=0)]
    gpus: list[GpuInfo] | None = None


class InstalledModel(FrozenStruct, frozen=True):
    model_id: ShortStr
    kind: ShortStr
    version: ShortStr
    src_lang: Lang | None = None
    tgt_lang: Lang | None = None
    dialect: ShortStr | None = None
    enabled: bool | None = None


class InstalledService(FrozenStruct, frozen=True):
    service_id: ShortStr
    #: a ``ServiceType`` value, or a kind this scheduler does not know (kept, ignored for routing)
    type: Kind
    #: a ``DeviceType`` value, or another device kind (kept, shown)
    device: Kind
    status: ServiceStatus
    version: ShortStr | None = None
    model_id: ShortStr | None = None
    engine: ShortStr | None = None
    mem_mb: NonNegInt | None = None
    warmup_ms: NonNegInt | None = None
    last_error: str | None = None


class CapabilityByType(FrozenStruct, frozen=True):
    type: Kind
    ready: bool
    reason: str | None = None
    ready_impl_ids: list[ShortStr] | None = None
    #: device kinds the type runs on (newer node clients send this instead of ``ready_impl_ids``)
    devices: list[Kind] | None = None


class LanguagePair(FrozenStruct, frozen=True):
    src: Lang
    tgt: Lang


class NmtCapability(FrozenStruct, frozen=True):
    model_id: ShortStr
    languages: list[Lang]
    rule: ShortStr
    blocked_pairs: list[LanguagePair] | None = None
    supported_pairs: list[LanguagePair] | None = None


class NodeLanguageCapabilities(FrozenStruct, frozen=True):
    asr_languages: list[Lang] | None = None
    tts_languages: list[Lang] | None = None
    nmt_capabilities: list[NmtCapability] | None = None
    semantic_languages: list[Lang] | None = None
    supported_language_pairs: list[LanguagePair] | None = None
    #: the published node app's summary of its translation models, one string each
    #: (``"<model_id>:<rule>:<count> langs"``); entries of another shape are ignored, never refused
    nmt: list[Any] | None = None


class ResourceUsage(FrozenStruct, frozen=True):
    cpu_percent: Percent
    mem_percent: Percent
    running_jobs: NonNegInt
    gpu_percent: Percent | None = None
    gpu_mem_percent: Percent | None = None


class ProcessingMetrics(FrozenStruct, frozen=True):
    serviceEfficiencies: dict[str, float]


class RerunMetrics(FrozenStruct, frozen=True):
    totalReruns: NonNegInt
    successfulReruns: NonNegInt
    failedReruns: NonNegInt
    timeoutReruns: NonNegInt
    qualityImprovements: NonNegInt


class ASRMetrics(FrozenStruct, frozen=True):
    processingEfficiency: float | None = None


class PipelineConfig(FrozenStruct, frozen=True):
    use_asr: bool = True
    use_nmt: bool = True
    use_tts: bool = True
    use_semantic: bool = False


# --- node -> scheduler -------------------------------------------------------------------------------


class NodeRegister(Struct, tag="node_register", tag_field="type"):
    version: ShortStr
    platform: ShortStr
    hardware: HardwareInfo
    installed_models: list[InstalledModel]
    capability_by_type: list[CapabilityByType]
    features_supported: FeatureFlags
    accept_public_jobs: bool
    node_id: NodeId | None = None
    capability_schema_version: ShortStr | None = None
    installed_services: list[InstalledService] = []
    advanced_features: list[ShortStr] | None = None
    language_capabilities: NodeLanguageCapabilities | None = None
    #: fleet enrollment secret, presented by a new node (no node_id) when node auth is configured
    enrollment_secret: ShortStr | None = None
    #: the token issued in an earlier node_register_ack, presented with its node_id
    node_token: ShortStr | None = None
    #: protocol features beyond the base protocol (``PROTOCOL_FEATURES``); unknown names are ignored
    protocol_features: list[ShortStr] | None = None


class NodeHeartbeat(Struct, tag="node_heartbeat", tag_field="type"):
    node_id: NodeId
    timestamp: SafeInt
    resource_usage: ResourceUsage
    installed_services: list[InstalledService]
    capability_by_type: list[CapabilityByType]
    installed_models: list[InstalledModel] | None = None
    rerun_metrics: RerunMetrics | None = None
    asr_metrics: ASRMetrics | None = None
    processing_metrics: ProcessingMetrics | None = None
    language_capabilities: NodeLanguageCapabilities | None = None


class NodeErrorReport(Struct, tag="node_error", tag_field="type"):
    node_id: NodeId
    code: ShortStr
    message: str
    details: Any = None


class JobAck(Struct, tag="job_ack", tag_field="type"):
    job_id: ShortStr
    attempt_id: NonNegInt
    node_id: NodeId
    session_id: ShortStr
    trace_id: ShortStr


class JobStarted(Struct, tag="job_started", tag_field="type"):
    job_id: ShortStr
    attempt_id: NonNegInt
    node_id: NodeId
    session_id: ShortStr
    trace_id: ShortStr


class JobResult(Struct, tag="job_result", tag_field="type"):
    job_id: ShortStr
    attempt_id: NonNegInt
    node_id: NodeId
    session_id: ShortStr
    utterance_index: NonNegInt
    success: bool
    trace_id: ShortStr
    text_asr: str | None = None
    text_translated: str | None = None
    tts_audio: str | None = None
    tts_format: ShortStr | None = None
    extra: ExtraResult | None = None
    processing_time_ms: NonNegInt | None = None
    error: JobError | None = None
    group_id: ShortStr | None = None
    part_index: NonNegInt | None = None
    node_completed_at_ms: SafeInt | None = None
    asr_quality_level: ShortStr | None = None
    reason_codes: list[ShortStr] | None = None
    quality_score: float | None = None
    rerun_count: NonNegInt | None = None
    segments_meta: SegmentsMeta | None = None


class NodeAsrPartial(Struct, tag="asr_partial", tag_field="type"):
    job_id: ShortStr
    node_id: NodeId
    session_id: ShortStr
    utterance_index: NonNegInt
    text: str
    is_final: bool
    trace_id: ShortStr
    attempt_id: NonNegInt | None = None


#: ``protocol_features`` names: the node sends ``job_ack`` (and may send ``job_started``) for every job, so
#: a missing ack within the ack timeout means the node is not working on it
FEATURE_JOB_ACK = "job_ack"
#: the node reads the turn dialect of ``job_assign`` (``turn_id``, ``is_max_duration_triggered``, a pause
#: reported as ``is_timeout_triggered``)
FEATURE_TURN_JOBS = "turn_jobs"
PROTOCOL_FEATURES = frozenset({FEATURE_JOB_ACK, FEATURE_TURN_JOBS})

NodeInbound = (
    NodeRegister | NodeHeartbeat | NodeErrorReport | JobAck | JobStarted | JobResult | NodeAsrPartial
)
NODE_JOB_MESSAGES = (JobAck, JobStarted, JobResult, NodeAsrPartial)

# --- scheduler -> node -------------------------------------------------------------------------------


class NodeRegisterAck(Struct, tag="node_register_ack", tag_field="type"):
    node_id: str
    message: str
    status: str
    heartbeat_interval_ms: int | None = None
    #: with node auth configured: the node's token, to present with its node_id from now on
    node_token: str | None = None


class NodeHeartbeatAck(Struct, tag="node_heartbeat_ack", tag_field="type"):
    node_id: str
    timestamp: int
    server_ts_ms: int
    next_heartbeat_ms: int


class NodeStatusMessage(Struct, tag="node_status", tag_field="type"):
    node_id: str
    status: str
    reason: str | None
    timestamp: int


class JobAssign(Struct, tag="job_assign", tag_field="type"):
    job_id: str
    attempt_id: int
    session_id: str
    utterance_index: int
    src_lang: str
    tgt_lang: str
    pipeline: PipelineConfig
    audio: str
    audio_format: str
    sample_rate: int
    trace_id: str
    dialect: str | None = None
    features: FeatureFlags | None = None
    mode: str | None = None
    lang_a: str | None = None
    lang_b: str | None = None
    auto_langs: list[str] | None = None
    enable_streaming_asr: bool | None = None
    partial_update_interval_ms: int | None = None
    group_id: str | None = None
    part_index: int | None = None
    context_text: str | None = None
    padding_ms: int | None = None
    #: turn dialect only: the spoken turn this job belongs to (the node aggregates a turn's jobs)
    turn_id: str | None = None
    is_manual_cut: bool = False
    is_pause_triggered: bool = False
    is_timeout_triggered: bool = False
    #: turn dialect only: cut because the speaker went on past the maximum duration (more follows)
    is_max_duration_triggered: bool = False


class JobCancel(Struct, tag="job_cancel", tag_field="type"):
    job_id: str
    trace_id: str | None = None
    reason: str | None = None


NodeOutbound = NodeRegisterAck | NodeHeartbeatAck | NodeStatusMessage | JobAssign | JobCancel | ErrorMessage
