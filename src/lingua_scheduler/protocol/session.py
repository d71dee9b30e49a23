"""Client <-> scheduler messages on ``/ws/session``.

Wire names match the reference client. Deliberate differences:
- ``session_init`` may declare ``audio_format`` / ``sample_rate``; the ack reports what was granted
  (``core.audio.negotiate``) instead of hard-coded values.
- ``asr_partial`` carries the real ``job_id`` (the reference always sent "").
- ``translation_result.audio_lost`` flags text whose audio is missing; the text is never rewritten.
- ``missing_result.reason`` is one of gap_timeout, job_failed, silence_detected, and all are produced.
- ``session_init`` may carry ``resume_token`` (from an earlier ack) to resume a session whose
  connection dropped; ``tts_started`` is accepted (the reference only planned it); ``backpressure``
  tells the client to slow down before its frames would be refused.
- Scheduler-to-client types and room/WebRTC messages sent by a client are not part of
  ``SessionInbound``: they fail decoding (INVALID_MESSAGE) instead of being silently ignored.
- The ``session_id`` in a message body is a claim, not an identity: the endpoint compares it with the
  session bound to the connection (the reference did not: session hijack).
- ``session_init.tenant_id`` is a claim too: with tenant API keys configured the tenant is the key's
  (``server/auth.py``), and a body naming another tenant is refused.

Unknown fields are ignored. Every boolean is either required or always serialised, so no reader can
miss a false value (the reference omitted false booleans yet required them when parsing, so messages
between its instances were dropped).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

import msgspec

from lingua_scheduler.errors import ErrorCode
from lingua_scheduler.protocol.common import (
    ErrorMessage,
    ExtraResult,
    FeatureFlags,
    SafeInt,
    SegmentsMeta,
    ServiceTimings,
    Struct,
)
from lingua_scheduler.protocol.node import Lang, NonNegInt, PipelineConfig, ShortStr

SessionId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
SampleRate = Annotated[int, msgspec.Meta(ge=1, le=384_000)]
Mode = Literal["one_way", "two_way_auto"]

PROTOCOL_VERSION = "1.0"


class UiEventType(StrEnum):
    INPUT_STARTED = "INPUT_STARTED"
    INPUT_ENDED = "INPUT_ENDED"
    ASR_PARTIAL = "ASR_PARTIAL"
    ASR_FINAL = "ASR_FINAL"
    DISPATCHED = "DISPATCHED"
    NODE_ACCEPTED = "NODE_ACCEPTED"
    NMT_DONE = "NMT_DONE"
    TTS_PLAY_STARTED = "TTS_PLAY_STARTED"
    TTS_PLAY_ENDED = "TTS_PLAY_ENDED"
    ERROR = "ERROR"


class UiEventStatus(StrEnum):
    OK = "ok"
    ERROR = "error"


class MissingReason(StrEnum):
    GAP_TIMEOUT = "gap_timeout"
    JOB_FAILED = "job_failed"
    SILENCE_DETECTED = "silence_detected"


#: user-facing hint per error code, attached to ``ui_event.hint`` (the reference's hints, in English)
ERROR_HINTS: dict[str, str] = {
    ErrorCode.NO_AVAILABLE_NODE: "No node is available right now, please try later.",
    ErrorCode.MODEL_NOT_AVAILABLE: "The node lacks a required model; rescheduling or waiting for the model.",
    ErrorCode.WS_DISCONNECTED: "Connection lost, refresh or reconnect.",
    ErrorCode.NMT_TIMEOUT: "Translation timed out, try a shorter sentence.",
    ErrorCode.TTS_TIMEOUT: "Speech synthesis timed out, try later.",
    ErrorCode.JOB_TIMEOUT: "Task timed out, try later.",
    ErrorCode.MODEL_VERIFY_FAILED: "Model verification failed, re-download it.",
    ErrorCode.MODEL_CORRUPTED: "Model file corrupted, re-download it.",
    ErrorCode.NO_GPU_AVAILABLE: "The node has no GPU and cannot register.",
    ErrorCode.NODE_ID_CONFLICT: "Node id conflict, clear the local node_id.",
    ErrorCode.INVALID_CAPABILITY_SCHEMA: "Unsupported capability schema, update the node.",
    ErrorCode.SCHEDULER_DEPENDENCY_DOWN: "A scheduler dependency is unavailable, try later.",
    ErrorCode.SCHEDULER_SHUTTING_DOWN: "The server is restarting, reconnecting.",
}
DEFAULT_HINT = "An error occurred, please try later."


def hint_for(code: str) -> str:
    """The hint for a wire error code (codes from nodes are free strings)."""
    return ERROR_HINTS.get(code, DEFAULT_HINT)


# --- client -> scheduler -------------------------------------------------------------------------


class SpeechOptions(Struct, kw_only=True):
    """The optional fields ``session_init`` and ``utterance`` share (not a message of its own).

    ``kw_only``: these fields have defaults, and the subclasses' required fields must still come first in
    ``__init__``. Only the order of the struct's fields changes with it; the wire stays the same, since a
    JSON object's keys are unordered and the required fields keep their order among themselves."""

    dialect: ShortStr | None = None
    features: FeatureFlags | None = None
    mode: Mode | None = None
    lang_a: Lang | None = None
    lang_b: Lang | None = None
    auto_langs: list[Lang] | None = None
    enable_streaming_asr: bool | None = None
    partial_update_interval_ms: NonNegInt | None = None
    trace_id: ShortStr | None = None


class SessionInit(SpeechOptions, tag="session_init", tag_field="type"):
    client_version: ShortStr
    platform: ShortStr  # "android" | "ios" | "web" | "api-gateway"; free string
    src_lang: Lang  # a code or "auto"
    tgt_lang: Lang
    pairing_code: ShortStr | None = None
    tenant_id: ShortStr | None = None
    #: what the client would like to stream; the ack says what was granted
    audio_format: ShortStr | None = None
    sample_rate: SampleRate | None = None
    #: the tenant API key, for clients that cannot send it at connect (Authorization / X-Api-Key)
    api_key: ShortStr | None = None
    #: ``session_init_ack.resume_token`` of a session whose connection dropped: resume it
    resume_token: ShortStr | None = None
    #: the client can send the binary audio frames (``protocol/binary_frames.py``)
    use_binary_frame: bool | None = None


class AudioChunk(Struct, tag="audio_chunk", tag_field="type"):
    session_id: SessionId
    seq: NonNegInt
    is_final: bool
    #: standard base64 with padding; absent or "" is an empty chunk; invalid base64 is an error
    payload: str | None = None
    client_timestamp_ms: SafeInt | None = None


class UtteranceMessage(SpeechOptions, tag="utterance", tag_field="type"):
    """A whole utterance in one message; it takes the session's next utterance index."""

    session_id: SessionId
    utterance_index: NonNegInt
    manual_cut: bool
    src_lang: Lang
    tgt_lang: Lang
    audio: str
    audio_format: ShortStr
    sample_rate: SampleRate
    pipeline: PipelineConfig | None = None


class ClientHeartbeat(Struct, tag="client_heartbeat", tag_field="type"):
    session_id: SessionId
    timestamp: SafeInt


class TtsStarted(Struct, tag="tts_started", tag_field="type"):
    """The client started playing a result's synthesized speech (no pause cut while it plays)."""

    session_id: SessionId
    trace_id: ShortStr
    group_id: ShortStr
    ts_start_ms: NonNegInt


class TtsPlayEnded(Struct, tag="tts_play_ended", tag_field="type"):
    session_id: SessionId
    trace_id: ShortStr
    group_id: ShortStr
    ts_end_ms: NonNegInt


class SessionClose(Struct, tag="session_close", tag_field="type"):
    session_id: SessionId
    reason: ShortStr


SessionInbound = (
    SessionInit | AudioChunk | UtteranceMessage | ClientHeartbeat | TtsStarted | TtsPlayEnded | SessionClose
)

# --- scheduler -> client -------------------------------------------------------------------------


class NetworkTimings(Struct):
    web_to_scheduler_ms: int | None = None
    scheduler_to_node_ms: int | None = None
    node_to_scheduler_ms: int | None = None
    scheduler_to_web_ms: int | None = None


class SessionInitAck(Struct, tag="session_init_ack", tag_field="type", kw_only=True, omit_defaults=False):
    """Every field is always serialised (the constants included), as the reference client expects."""

    session_id: str
    assigned_node_id: str | None = None
    message: str = "session created"
    trace_id: str
    protocol_version: str = PROTOCOL_VERSION
    use_binary_frame: bool = False
    negotiated_codec: str
    negotiated_audio_format: str
    negotiated_sample_rate: int
    negotiated_channel_count: int = 1
    #: present the client to resume this session after a dropped connection; None when resuming is off
    resume_token: str | None = None
    #: true when this session_init resumed an earlier session (same session_id, results kept)
    resumed: bool = False


class BackpressureAction(StrEnum):
    BUSY = "BUSY"
    PAUSE = "PAUSE"
    SLOW_DOWN = "SLOW_DOWN"


class Backpressure(Struct, tag="backpressure", tag_field="type", kw_only=True):
    """Sent before the connection's frames would be refused: send slower, or pause, for a while."""

    action: BackpressureAction
    resume_after_ms: int
    session_id: str | None = None


class TranslationResult(Struct, tag="translation_result", tag_field="type", kw_only=True):
    session_id: str
    utterance_index: int
    job_id: str
    text_asr: str
    text_translated: str
    tts_audio: str
    #: the node's format, or "pcm16" when it named none (always sent, like the reference)
    tts_format: str
    #: true when there is text but the synthesized audio is missing (the text itself is untouched)
    audio_lost: bool
    trace_id: str
    extra: ExtraResult | None = None
    group_id: str | None = None
    part_index: int | None = None
    service_timings: ServiceTimings | None = None
    network_timings: NetworkTimings | None = None
    scheduler_sent_at_ms: int | None = None
    asr_quality_level: str | None = None
    reason_codes: list[str] | None = None
    quality_score: float | None = None
    rerun_count: int | None = None
    segments_meta: SegmentsMeta | None = None


class AsrPartial(Struct, tag="asr_partial", tag_field="type", kw_only=True):
    session_id: str
    utterance_index: int
    job_id: str
    text: str
    is_final: bool
    trace_id: str


class ServerHeartbeat(Struct, tag="server_heartbeat", tag_field="type"):
    session_id: str
    timestamp: int


class SessionCloseAck(Struct, tag="session_close_ack", tag_field="type"):
    session_id: str


class MissingResult(Struct, tag="missing_result", tag_field="type", kw_only=True):
    """Keeps indices contiguous for the client when an utterance yields no translation."""

    session_id: str
    utterance_index: int
    reason: MissingReason
    created_at_ms: int
    trace_id: str | None = None


class UiEvent(Struct, tag="ui_event", tag_field="type", kw_only=True):
    trace_id: str
    session_id: str
    job_id: str
    utterance_index: int
    event: UiEventType
    status: UiEventStatus
    elapsed_ms: int | None = None
    error_code: str | None = None
    hint: str | None = None


def error_ui_event(
    code: str,
    *,
    trace_id: str,
    session_id: str,
    job_id: str,
    utterance_index: int,
    elapsed_ms: int | None = None,
) -> UiEvent:
    """``ui_event ERROR`` for ``code`` with its hint."""
    return UiEvent(
        trace_id=trace_id,
        session_id=session_id,
        job_id=job_id,
        utterance_index=utterance_index,
        event=UiEventType.ERROR,
        status=UiEventStatus.ERROR,
        elapsed_ms=elapsed_ms,
        error_code=code,
        hint=hint_for(code),
    )


SessionOutbound = (
    SessionInitAck
    | TranslationResult
    | AsrPartial
    | ServerHeartbeat
    | SessionCloseAck
    | MissingResult
    | UiEvent
    | Backpressure
    | ErrorMessage
)
