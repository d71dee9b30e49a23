"""Node <-> scheduler messages on ``/ws/node``.

Wire-compatible with the reference node client at both of its published generations (docs/protocol.md).
Deliberate differences: ``memory_gb`` accepts floats, ``job_assign`` booleans default to false, heartbeats
are acknowledged with ``node_heartbeat_ack``; ``node_register`` may carry credentials (``enrollment_secret``
or ``node_token``, docs/security.md) and its ack the node's token, and ``protocol_features`` (what the node
does beyond the base protocol, e.g. ``job_ack``), all optional and omitted when unused. Protocol additions,
optional as well (the node SDK uses them): declared capacity (``node_register.max_concurrent_jobs``),
declared load (``resource_usage.load`` against ``node_register.load_threshold``) and a node-initiated
drain (``node_drain`` -> ``node_drain_ack``). Pairing: ``request_pairing_code`` -> ``pairing_code``, a
single-use code a client's ``session_init.pairing_code`` presents to be bound to this node (the
reference had the message but no scheduler answered it). Service types and
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
    Metadata,
    SafeInt,
    SegmentsMeta,
    ServiceStatus,
    Struct,
    doc,
)

NonNegInt = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
Percent = Annotated[float, msgspec.Meta(ge=0.0, le=100.0)]
Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
#: the most job slots a node may declare (``node_register.max_concurrent_jobs``)
MAX_DECLARED_SLOTS = 1024
Slots = Annotated[int, msgspec.Meta(ge=1, le=MAX_DECLARED_SLOTS)]
ShortStr = Annotated[str, msgspec.Meta(max_length=256)]
Lang = Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
#: a service type or device kind: open-ended (newer nodes report kinds this scheduler does not route on)
Kind = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
#: matched whole: msgspec searches the pattern and ``$`` alone also matches before a trailing newline
NodeId = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:\-]+\Z")]


class GpuInfo(FrozenStruct, frozen=True):
    """One GPU of the node."""

    name: Annotated[ShortStr, doc("the GPU's model name")]
    memory_gb: Annotated[float, msgspec.Meta(ge=0), doc("its memory, in GB")]


class HardwareInfo(FrozenStruct, frozen=True):
    """The node's machine."""

    cpu_cores: Annotated[NonNegInt, doc("CPU cores")]
    memory_gb: Annotated[float, msgspec.Meta(ge=0), doc("main memory, in GB (a float is accepted)")]
    gpus: Annotated[
        list[GpuInfo] | None,
        doc(
            "the node's GPUs: at least one is required, registration is refused with "
            "NO_GPU_AVAILABLE otherwise"
        ),
    ] = None


class InstalledModel(FrozenStruct, frozen=True):
    """A model installed on the node."""

    model_id: Annotated[ShortStr, doc("the model's id")]
    kind: Annotated[ShortStr, doc("what the model does (asr, nmt, tts, ...)")]
    version: Annotated[ShortStr, doc("the model's version")]
    src_lang: Annotated[Lang | None, doc("source language, for a language-specific model")] = None
    tgt_lang: Annotated[Lang | None, doc("target language, for a translation model")] = None
    dialect: Annotated[ShortStr | None, doc("dialect the model is made for")] = None
    enabled: Annotated[bool | None, doc("false when installed but switched off")] = None


class InstalledService(FrozenStruct, frozen=True):
    """A service process on the node (a recognizer, a translator, a synthesizer, ...)."""

    service_id: Annotated[ShortStr, doc("the service's id on the node")]
    type: Annotated[
        Kind,
        doc(
            "a service type (asr, nmt, tts, tone, semantic) or a kind this scheduler does not know: "
            "kept and shown, ignored for routing"
        ),
    ]
    device: Annotated[Kind, doc("gpu or cpu, or another device kind (kept and shown)")]
    status: Annotated[ServiceStatus, doc("running services count for readiness")]
    version: Annotated[ShortStr | None, doc("the service's version")] = None
    model_id: Annotated[ShortStr | None, doc("the model the service runs")] = None
    engine: Annotated[ShortStr | None, doc("the engine the service runs on")] = None
    mem_mb: Annotated[NonNegInt | None, doc("memory the service uses, in MB")] = None
    warmup_ms: Annotated[NonNegInt | None, doc("how long the service took to warm up, in ms")] = None
    last_error: Annotated[str | None, doc("the service's last error, in words")] = None


class CapabilityByType(FrozenStruct, frozen=True):
    """Whether the node can serve one service type right now."""

    type: Annotated[Kind, doc("a service type, or a kind this scheduler does not know (kept, ignored)")]
    ready: Annotated[bool, doc("the node serves this type now")]
    reason: Annotated[str | None, doc("why not, when not ready")] = None
    ready_impl_ids: Annotated[
        list[ShortStr] | None, doc("service ids that serve the type (the older node app's shape)")
    ] = None
    devices: Annotated[
        list[Kind] | None,
        doc(
            "device kinds the type runs on (the newer node app sends this instead of ready_impl_ids; "
            "its presence selects the turn dialect of job_assign)"
        ),
    ] = None


class LanguagePair(FrozenStruct, frozen=True):
    """A directed language pair."""

    src: Annotated[Lang, doc("source language code")]
    tgt: Annotated[Lang, doc("target language code")]


class NmtCapability(FrozenStruct, frozen=True):
    """The languages one translation model handles."""

    model_id: Annotated[ShortStr, doc("the translation model")]
    languages: Annotated[list[Lang], doc("the language codes it handles")]
    rule: Annotated[
        ShortStr,
        doc("how pairs follow from the languages (any_to_any, any_to_en, en_to_any, specific_pairs)"),
    ]
    blocked_pairs: Annotated[list[LanguagePair] | None, doc("pairs excluded from the rule")] = None
    supported_pairs: Annotated[list[LanguagePair] | None, doc("the pairs, with rule specific_pairs")] = None


class NodeLanguageCapabilities(FrozenStruct, frozen=True):
    """The languages the node serves, per stage."""

    asr_languages: Annotated[list[Lang] | None, doc("languages it recognizes")] = None
    tts_languages: Annotated[list[Lang] | None, doc("languages it synthesizes")] = None
    nmt_capabilities: Annotated[list[NmtCapability] | None, doc("its translation models' languages")] = None
    semantic_languages: Annotated[list[Lang] | None, doc("languages of its semantic repair")] = None
    supported_language_pairs: Annotated[
        list[LanguagePair] | None,
        doc(
            "when present and non-empty, the directed pairs the node translates: replaces the pairs "
            "inferred from its models (a pair still needs recognition of its source and synthesis of its "
            "target); an empty list counts as not reported"
        ),
    ] = None
    nmt: Annotated[
        list[Any] | None,
        doc(
            "the published node app's summary of its translation models, one string each "
            '("<model_id>:<rule>:<count> langs", e.g. "nmt-m2m100:any_to_any:37 langs"); used when '
            "nmt_capabilities is absent, its rule applied to the node's ASR and TTS languages; entries of "
            "another shape are ignored, never refused"
        ),
    ] = None


class ResourceUsage(FrozenStruct, frozen=True):
    """The node's load, for selection thresholds."""

    cpu_percent: Annotated[Percent, doc("CPU use, percent")]
    mem_percent: Annotated[Percent, doc("memory use, percent")]
    running_jobs: Annotated[NonNegInt, doc("jobs the node is running")]
    gpu_percent: Annotated[Percent | None, doc("GPU use, percent")] = None
    gpu_mem_percent: Annotated[Percent | None, doc("GPU memory use, percent")] = None
    load: Annotated[
        Fraction | None,
        doc(
            "protocol addition, optional: the node's own measure of how busy it is, 0 (idle) to 1 (full); "
            "at or above the node's load_threshold it gets no new job"
        ),
    ] = None


class ProcessingMetrics(FrozenStruct, frozen=True):
    """The node's processing efficiency (accepted, not used for scheduling)."""

    serviceEfficiencies: Annotated[dict[str, float], doc("efficiency per service id")]


class RerunMetrics(FrozenStruct, frozen=True):
    """The node's re-recognition counters (accepted, not used for scheduling)."""

    totalReruns: Annotated[NonNegInt, doc("re-runs started")]
    successfulReruns: Annotated[NonNegInt, doc("re-runs that succeeded")]
    failedReruns: Annotated[NonNegInt, doc("re-runs that failed")]
    timeoutReruns: Annotated[NonNegInt, doc("re-runs that timed out")]
    qualityImprovements: Annotated[NonNegInt, doc("re-runs that improved the text")]


class ASRMetrics(FrozenStruct, frozen=True):
    """The node's recognizer metrics (accepted, not used for scheduling)."""

    processingEfficiency: Annotated[float | None, doc("audio seconds recognized per second")] = None


class PipelineConfig(FrozenStruct, frozen=True):
    """Which stages a job runs."""

    use_asr: Annotated[bool, doc("recognize speech")] = True
    use_nmt: Annotated[bool, doc("translate")] = True
    use_tts: Annotated[bool, doc("synthesize speech of the translation")] = True
    use_semantic: Annotated[bool, doc("repair the recognized text")] = False


# --- node -> scheduler -------------------------------------------------------------------------------


class NodeRegister(Struct, tag="node_register", tag_field="type"):
    """The first message of a node connection: who the node is and what it can do. Answered with
    ``node_register_ack`` or an ``error`` (the connection stays open; fix and send again).

    Refused unless ``capability_schema_version`` is ``"2.0"`` (INVALID_CAPABILITY_SCHEMA) and
    ``hardware.gpus`` lists at least one GPU (NO_GPU_AVAILABLE), although neither is required by the
    message's shape: the refusal then names the rule. Also refused: a ``node_id`` connected on another
    connection right now, or another id than the one this connection registered (NODE_ID_CONFLICT);
    missing or wrong credentials when node authentication is configured (UNAUTHORIZED, then the socket
    is closed); a full instance (NODE_LIMIT_REACHED)."""

    version: Annotated[ShortStr, doc("the node app's version")]
    platform: Annotated[ShortStr, doc("the node's operating system (linux, windows, ...)")]
    hardware: Annotated[HardwareInfo, doc("the node's machine; hardware.gpus must not be empty")]
    installed_models: Annotated[list[InstalledModel], doc("models installed on the node")]
    capability_by_type: Annotated[list[CapabilityByType], doc("readiness per service type")]
    features_supported: Annotated[FeatureFlags, doc("optional features the node supports")]
    accept_public_jobs: Annotated[
        bool, doc("the node takes jobs of any session (shown; not a routing rule here)")
    ]
    node_id: Annotated[
        NodeId | None,
        doc(
            "absent or null for a new node (the ack assigns an id); a known id to reconnect, keeping "
            "the node's record"
        ),
    ] = None
    capability_schema_version: Annotated[
        ShortStr | None,
        doc('must be "2.0": anything else, or absent, is refused with INVALID_CAPABILITY_SCHEMA'),
    ] = None
    installed_services: Annotated[
        list[InstalledService], doc("the node's service processes: readiness needs running core services")
    ] = []
    advanced_features: Annotated[list[ShortStr] | None, doc("free feature names (accepted, not used)")] = None
    language_capabilities: Annotated[
        NodeLanguageCapabilities | None, doc("the languages the node serves (decides its language pairs)")
    ] = None
    enrollment_secret: Annotated[
        ShortStr | None,
        doc("the fleet enrollment secret, presented by a new node (no node_id) when node auth is configured"),
    ] = None
    node_token: Annotated[
        ShortStr | None, doc("the token issued in an earlier node_register_ack, presented with its node_id")
    ] = None
    protocol_features: Annotated[
        list[ShortStr] | None,
        doc(
            "protocol features beyond the base protocol: job_ack (the node acknowledges every job, so "
            "the ack timeout applies), turn_jobs (the node reads the turn dialect of job_assign); "
            "unknown names are ignored"
        ),
    ] = None
    max_concurrent_jobs: Annotated[
        Slots | None,
        doc(
            "protocol addition, optional: the most jobs the node runs at once; replaces the scheduler's "
            "default per-node limit (scheduler.max_concurrent_jobs_per_node) for this node"
        ),
    ] = None
    load_threshold: Annotated[
        Fraction | None,
        doc(
            "protocol addition, optional: while the load its heartbeats report (resource_usage.load) is at "
            "or above this, the node gets no new job; 1 when absent"
        ),
    ] = None


class NodeHeartbeat(Struct, tag="node_heartbeat", tag_field="type"):
    """Periodic report of a registered node (every ``heartbeat_interval_ms``); answered with
    ``node_heartbeat_ack``. Its services and capabilities replace the registered ones; a node whose
    heartbeats stop is set offline and its jobs move to other nodes."""

    node_id: Annotated[
        NodeId, doc("this connection's registered node id (NOT_REGISTERED / NODE_ID_MISMATCH otherwise)")
    ]
    timestamp: Annotated[SafeInt, doc("the node's clock, in ms since the epoch (echoed in the ack)")]
    resource_usage: Annotated[ResourceUsage, doc("the node's load now")]
    installed_services: Annotated[list[InstalledService], doc("the node's service processes now")]
    capability_by_type: Annotated[list[CapabilityByType], doc("readiness per service type now")]
    installed_models: Annotated[list[InstalledModel] | None, doc("installed models, when they changed")] = (
        None
    )
    rerun_metrics: Annotated[RerunMetrics | None, doc("re-recognition counters")] = None
    asr_metrics: Annotated[ASRMetrics | None, doc("recognizer metrics")] = None
    processing_metrics: Annotated[ProcessingMetrics | None, doc("processing efficiency")] = None
    language_capabilities: Annotated[NodeLanguageCapabilities | None, doc("the languages served now")] = None


class NodeErrorReport(Struct, tag="node_error", tag_field="type"):
    """The node reports a problem of its own: logged, not answered."""

    node_id: Annotated[NodeId, doc("this connection's registered node id")]
    code: Annotated[ShortStr, doc("the node's error code")]
    message: Annotated[str, doc("what went wrong, in words")]
    details: Annotated[Any, doc("anything else (not interpreted)")] = None


class JobAck(Struct, tag="job_ack", tag_field="type"):
    """The node took the job (nodes that declared ``protocol_features: ["job_ack"]`` must send it within
    the ack timeout, or the job moves to another node)."""

    job_id: Annotated[ShortStr, doc("the job_assign's job_id")]
    attempt_id: Annotated[
        NonNegInt, doc("the job_assign's attempt_id (messages of an older attempt are dropped)")
    ]
    node_id: Annotated[NodeId, doc("this connection's registered node id")]
    session_id: Annotated[ShortStr, doc("the job_assign's session_id")]
    trace_id: Annotated[ShortStr, doc("the job_assign's trace_id")]


class JobStarted(Struct, tag="job_started", tag_field="type"):
    """The node started working on the job (counts as its acknowledgement)."""

    job_id: Annotated[ShortStr, doc("the job_assign's job_id")]
    attempt_id: Annotated[NonNegInt, doc("the job_assign's attempt_id")]
    node_id: Annotated[NodeId, doc("this connection's registered node id")]
    session_id: Annotated[ShortStr, doc("the job_assign's session_id")]
    trace_id: Annotated[ShortStr, doc("the job_assign's trace_id")]


class JobResult(Struct, tag="job_result", tag_field="type"):
    """The outcome of a job: text and speech, or an error. The first valid result of a job wins; a
    successful result of an earlier attempt of the same node still completes a job that is unanswered."""

    job_id: Annotated[ShortStr, doc("the job_assign's job_id")]
    attempt_id: Annotated[NonNegInt, doc("the job_assign's attempt_id")]
    node_id: Annotated[NodeId, doc("this connection's registered node id")]
    session_id: Annotated[ShortStr, doc("the job_assign's session_id")]
    utterance_index: Annotated[NonNegInt, doc("the job_assign's utterance_index")]
    success: Annotated[bool, doc("false: the job failed, error says why")]
    trace_id: Annotated[ShortStr, doc("the job_assign's trace_id")]
    text_asr: Annotated[str | None, doc("the recognized text")] = None
    text_translated: Annotated[str | None, doc("the translation")] = None
    tts_audio: Annotated[
        str | None,
        doc("synthesized speech, standard base64 (invalid base64 is refused with INVALID_MESSAGE)"),
    ] = None
    tts_format: Annotated[ShortStr | None, doc("the speech's format (pcm16 when absent)")] = None
    extra: Annotated[ExtraResult | None, doc("what the node found beyond the text")] = None
    processing_time_ms: Annotated[NonNegInt | None, doc("time the node spent on the job, in ms")] = None
    error: Annotated[JobError | None, doc("why the job failed, with success false")] = None
    group_id: Annotated[
        ShortStr | None, doc("the node's utterance group (the scheduler assigns its own)")
    ] = None
    part_index: Annotated[NonNegInt | None, doc("the part within the node's group")] = None
    node_completed_at_ms: Annotated[SafeInt | None, doc("the node's clock when it finished, in ms")] = None
    asr_quality_level: Annotated[ShortStr | None, doc("the recognizer's quality verdict (passed on)")] = None
    reason_codes: Annotated[list[ShortStr] | None, doc("the recognizer's quality reasons (passed on)")] = None
    quality_score: Annotated[float | None, doc("the recognizer's quality score (passed on)")] = None
    rerun_count: Annotated[NonNegInt | None, doc("re-recognitions done (passed on)")] = None
    segments_meta: Annotated[SegmentsMeta | None, doc("how the audio was segmented (passed on)")] = None


class NodeAsrPartial(Struct, tag="asr_partial", tag_field="type"):
    """Text recognized so far (when the job asked for streaming recognition): forwarded to the session.
    The first one counts as the job's acknowledgement."""

    job_id: Annotated[ShortStr, doc("the job_assign's job_id")]
    node_id: Annotated[NodeId, doc("this connection's registered node id")]
    session_id: Annotated[ShortStr, doc("the job_assign's session_id")]
    utterance_index: Annotated[NonNegInt, doc("the job_assign's utterance_index")]
    text: Annotated[str, doc("the text recognized so far")]
    is_final: Annotated[bool, doc("the recognition of this utterance is complete")]
    trace_id: Annotated[ShortStr, doc("the job_assign's trace_id")]
    attempt_id: Annotated[NonNegInt | None, doc("the job_assign's attempt_id")] = None


class NodeDrain(Struct, tag="node_drain", tag_field="type"):
    """Protocol addition, optional: the node asks to be drained (it is about to leave, e.g. on SIGTERM).
    It becomes ``draining``: no new job, the running ones finish; then it may close. Answered with
    ``node_drain_ack`` and a ``node_status``. Unlike an operator's drain, it ends when the node registers
    again (a new process wants work)."""

    node_id: Annotated[NodeId, doc("this connection's registered node id")]
    reason: Annotated[ShortStr | None, doc("why, in words (logged)")] = None


class RequestPairingCode(Struct, tag="request_pairing_code", tag_field="type"):
    """The node asks for a pairing code to show its user. Answered with ``pairing_code``; a new code
    replaces the node's earlier one."""


#: ``protocol_features`` names: the node sends ``job_ack`` (and may send ``job_started``) for every job, so
#: a missing ack within the ack timeout means the node is not working on it
FEATURE_JOB_ACK = "job_ack"
#: the node reads the turn dialect of ``job_assign`` (``turn_id``, ``is_max_duration_triggered``, a pause
#: reported as ``is_timeout_triggered``)
FEATURE_TURN_JOBS = "turn_jobs"
PROTOCOL_FEATURES = frozenset({FEATURE_JOB_ACK, FEATURE_TURN_JOBS})

NodeInbound = (
    NodeRegister
    | NodeHeartbeat
    | NodeErrorReport
    | JobAck
    | JobStarted
    | JobResult
    | NodeAsrPartial
    | NodeDrain
    | RequestPairingCode
)
NODE_JOB_MESSAGES = (JobAck, JobStarted, JobResult, NodeAsrPartial)

# --- scheduler -> node -------------------------------------------------------------------------------


class NodeRegisterAck(Struct, tag="node_register_ack", tag_field="type"):
    """Registration accepted. The node is ``registering`` until a heartbeat shows its core services
    running (a ``node_status`` follows)."""

    node_id: Annotated[str, doc("the node's id: send it in every later message and on reconnects")]
    message: Annotated[str, doc('"registered"')]
    status: Annotated[str, doc("the node's status: registering, ready, degraded, draining or offline")]
    heartbeat_interval_ms: Annotated[int | None, doc("send node_heartbeat this often, in ms")] = None
    node_token: Annotated[
        str | None,
        doc("with node authentication configured: the node's token, to present with its node_id from now on"),
    ] = None


class NodeHeartbeatAck(Struct, tag="node_heartbeat_ack", tag_field="type"):
    """A heartbeat was received (this scheduler answers every heartbeat)."""

    node_id: Annotated[str, doc("the heartbeat's node_id")]
    timestamp: Annotated[int, doc("the heartbeat's timestamp, echoed")]
    server_ts_ms: Annotated[int, doc("the scheduler's clock, in ms since the epoch")]
    next_heartbeat_ms: Annotated[int, doc("send the next heartbeat within this many ms")]


class NodeStatusMessage(Struct, tag="node_status", tag_field="type"):
    """The node's status changed (the scheduler decides it from heartbeats and operator actions)."""

    node_id: Annotated[str, doc("the node")]
    status: Annotated[
        str, doc("registering, ready, degraded, draining or offline; only ready nodes get jobs")
    ]
    reason: Annotated[str | None, doc("why, in words")]
    timestamp: Annotated[int, doc("when, in seconds since the epoch")]


class NodeDrainAck(Struct, tag="node_drain_ack", tag_field="type"):
    """The answer to ``node_drain``: the node takes no new job from now on."""

    node_id: Annotated[str, doc("the node")]
    status: Annotated[str, doc("the node's status now (draining, or offline/registering when not routable)")]
    running_jobs: Annotated[int, doc("jobs of the node the scheduler still waits for")]


class JobAssign(Struct, tag="job_assign", tag_field="type"):
    """A job for the node: one utterance to recognize, translate and synthesize. Answer with
    ``job_result`` (and ``job_ack`` / ``job_started`` / ``asr_partial`` as applicable) carrying its
    ``job_id``, ``attempt_id``, ``session_id`` and ``trace_id``. A job not answered within its
    execution deadline moves to another node with a higher ``attempt_id``."""

    job_id: Annotated[str, doc("the job")]
    attempt_id: Annotated[int, doc("the attempt: a job moved to another node gets a new one")]
    session_id: Annotated[str, doc("the session the utterance is from")]
    utterance_index: Annotated[int, doc("the utterance's index in its session (contiguous from 0)")]
    src_lang: Annotated[str, doc('source language code, or "auto"')]
    tgt_lang: Annotated[str, doc("target language code")]
    pipeline: Annotated[PipelineConfig, doc("the stages to run")]
    audio: Annotated[str, doc("the utterance's audio, standard base64")]
    audio_format: Annotated[
        str, doc("the audio's format (the format the session actually streams: opus or pcm16)")
    ]
    sample_rate: Annotated[int, doc("the audio's sample rate, in Hz")]
    trace_id: Annotated[str, doc("the trace id to echo in every message about the job")]
    dialect: Annotated[str | None, doc("the session's dialect")] = None
    features: Annotated[FeatureFlags | None, doc("the features the session asked for")] = None
    mode: Annotated[str | None, doc("one_way or two_way_auto")] = None
    lang_a: Annotated[str | None, doc("two-way sessions: the first language")] = None
    lang_b: Annotated[str | None, doc("two-way sessions: the second language")] = None
    auto_langs: Annotated[list[str] | None, doc("candidate languages for automatic detection")] = None
    enable_streaming_asr: Annotated[bool | None, doc("send asr_partial while recognizing")] = None
    partial_update_interval_ms: Annotated[int | None, doc("at most one asr_partial this often, in ms")] = None
    group_id: Annotated[str | None, doc("the utterance group of the job")] = None
    part_index: Annotated[int | None, doc("the part within the group")] = None
    context_text: Annotated[str | None, doc("translation context (never sent by this scheduler)")] = None
    padding_ms: Annotated[int | None, doc("silence padding, in ms (never sent by this scheduler)")] = None
    turn_id: Annotated[
        str | None,
        doc("turn dialect only: the spoken turn this job belongs to (the node aggregates a turn's jobs)"),
    ] = None
    metadata: Annotated[
        Metadata | None,
        doc("the integrator's metadata of the job (session_init.metadata or the request's), passed as is"),
    ] = None
    is_manual_cut: Annotated[bool, doc("the client ended the utterance (an is_final chunk)")] = False
    is_pause_triggered: Annotated[bool, doc("older dialect only: cut at a pause")] = False
    is_timeout_triggered: Annotated[
        bool, doc("older dialect: cut at the maximum duration; turn dialect: cut at a pause")
    ] = False
    is_max_duration_triggered: Annotated[
        bool,
        doc(
            "turn dialect only: cut because the speaker went on past the maximum duration or size "
            "(more follows)"
        ),
    ] = False


class JobCancel(Struct, tag="job_cancel", tag_field="type"):
    """Stop working on a job: it was answered elsewhere, timed out, or an operator cancelled it. Later
    messages about it are dropped."""

    job_id: Annotated[str, doc("the job")]
    trace_id: Annotated[str | None, doc("the job's trace id")] = None
    reason: Annotated[str | None, doc("why, in words")] = None


class PairingCode(Struct, tag="pairing_code", tag_field="type", kw_only=True):
    """A single-use code binding one client session to this node: the client sends it as
    ``session_init.pairing_code`` before ``expires_at_ms``."""

    code: Annotated[str, doc("the code (digits) the node's user gives the client")]
    expires_at_ms: Annotated[int, doc("when the code stops being accepted, in ms since the epoch")]


NodeOutbound = (
    NodeRegisterAck
    | NodeHeartbeatAck
    | NodeStatusMessage
    | NodeDrainAck
    | JobAssign
    | JobCancel
    | PairingCode
    | ErrorMessage
)
