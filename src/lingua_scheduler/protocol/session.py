"""Client <-> scheduler messages on ``/ws/session``.

Wire names match the reference client. Deliberate differences:
- ``session_init`` may declare ``audio_format`` / ``sample_rate``; the ack reports what was granted
  (``core.audio.negotiate``) instead of hard-coded values.
- ``asr_partial`` carries the real ``job_id`` (the reference always sent "").
- ``translation_result.audio_lost`` flags text whose audio is missing; the text is never rewritten.
- ``missing_result.reason`` is one of gap_timeout, job_failed, silence_detected, queue_full,
  rate_limited, and all are produced. A refusal (queue_full, rate_limited) is answered at once, out of
  index order: it answers the client's request, it is not a result. A result that comes after its
  index was given up (gap_timeout) is still delivered, with ``translation_result.late`` true.
- Frames dropped by the connection's rate limit are reported exactly: an ``utterance`` dropped whole
  gets ``missing_result(rate_limited)`` with its ``utterance_index``; a dropped ``audio_chunk`` (or
  binary audio frame) leaves a hole, and the streamed utterance it belonged to is refused
  (``missing_result(rate_limited)`` naming the dropped ``seq`` numbers) instead of being spliced.
- ``session_init`` may carry ``resume_token`` (from an earlier ack) to resume a session whose
  connection dropped; ``tts_started`` is accepted (the reference only planned it); ``backpressure``
  tells the client to slow down before its frames would be refused.
- Scheduler-to-client types sent by a client are not part of ``SessionInbound``: they fail decoding
  (INVALID_MESSAGE) instead of being silently ignored.
- Rooms (``room_*``) and the WebRTC signalling relay (``webrtc_*``) use the reference client's field
  names. Room codes are checked for their format (``room_error`` INVALID_ROOM_CODE), a room has a member
  limit (ROOM_FULL), ``room_error.message`` is English, and a relay that cannot be delivered is answered
  with a ``room_error`` instead of being dropped. The relayed ``webrtc_*`` messages are separate types
  (``*Relayed``): the same wire type, whose ``to`` names the sender. ``room_create_ack`` and
  ``room_members`` may carry ``ice_servers`` (STUN/TURN, with time-limited TURN credentials).
  ``room_members[].joined_at`` is in ms since the epoch, as the client's types declare it (the
  reference sent an RFC 3339 string).
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
    Metadata,
    SafeInt,
    SegmentsMeta,
    ServiceTimings,
    Struct,
    doc,
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
    QUEUE_FULL = "queue_full"
    RATE_LIMITED = "rate_limited"


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

    dialect: Annotated[ShortStr | None, doc("the speaker's dialect, passed to nodes")] = None
    features: Annotated[FeatureFlags | None, doc("optional features to ask nodes for")] = None
    mode: Annotated[
        Mode | None,
        doc("one_way (default) or two_way_auto (lang_a and lang_b, the node picks the direction)"),
    ] = None
    lang_a: Annotated[Lang | None, doc("two_way_auto: the first language")] = None
    lang_b: Annotated[Lang | None, doc("two_way_auto: the second language")] = None
    auto_langs: Annotated[list[Lang] | None, doc("candidate languages when src_lang is auto")] = None
    enable_streaming_asr: Annotated[
        bool | None,
        doc("ask for asr_partial while recognizing (default: the scheduler's jobs.streaming_asr_default)"),
    ] = None
    partial_update_interval_ms: Annotated[
        NonNegInt | None,
        doc("at most one asr_partial this often, in ms (default: jobs.partial_update_interval_ms)"),
    ] = None
    trace_id: Annotated[ShortStr | None, doc("the client's trace id (one is made when absent)")] = None


class SessionInit(SpeechOptions, tag="session_init", tag_field="type"):
    """Open a session (the first message of a session connection). Answered with ``session_init_ack``,
    or an ``error``: SCHEDULER_SHUTTING_DOWN, SESSION_LIMIT_REACHED, TENANT_LIMIT, UNAUTHORIZED (then
    the socket is closed). A second ``session_init`` on the same connection closes the first session
    (``session_close_ack``) and opens a new one; with a valid ``resume_token`` it resumes that session."""

    client_version: Annotated[ShortStr, doc("the client app's version")]
    platform: Annotated[ShortStr, doc("android, ios, web, api-gateway, ... (a free string)")]
    src_lang: Annotated[Lang, doc('source language code, or "auto"')]
    tgt_lang: Annotated[Lang, doc("target language code")]
    pairing_code: Annotated[
        ShortStr | None,
        doc(
            "a node's pairing code (its request_pairing_code): the session is bound to that node "
            "(session_init_ack.assigned_node_id); a wrong, used or expired code is refused with "
            "INVALID_PAIRING_CODE, too many tries with PAIRING_RATE_LIMITED"
        ),
    ] = None
    tenant_id: Annotated[
        ShortStr | None,
        doc("a claim: with tenant API keys configured the tenant is the key's, and another one is refused"),
    ] = None
    audio_format: Annotated[
        ShortStr | None,
        doc(
            "pcm16 or opus, what the client would like to stream (the ack says what was granted); absent: "
            "Opus in 2-byte length framing is assumed"
        ),
    ] = None
    sample_rate: Annotated[SampleRate | None, doc("the sample rate the client would like, in Hz")] = None
    api_key: Annotated[
        ShortStr | None,
        doc("the tenant API key, for clients that cannot send it at connect (Authorization / X-Api-Key)"),
    ] = None
    resume_token: Annotated[
        ShortStr | None,
        doc(
            "session_init_ack.resume_token of a session whose connection dropped: resume it (an unknown or "
            "expired token opens a new session)"
        ),
    ] = None
    use_binary_frame: Annotated[
        bool | None, doc("the client will send binary audio frames instead of audio_chunk")
    ] = None
    metadata: Annotated[
        Metadata | None,
        doc(
            "the integrator's metadata of the session's jobs (domain, glossary id, customer reference; at "
            "most 16 entries, keys up to 64 and values up to 256 characters): sent to the node in every "
            "job_assign, echoed on each translation_result and kept with the usage"
        ),
    ] = None


class AudioChunk(Struct, tag="audio_chunk", tag_field="type"):
    """A piece of the session's audio stream. The scheduler cuts utterances from the stream (at a pause,
    at the maximum duration or size, or at an ``is_final`` chunk) and dispatches each as a job. Not
    answered; audio in a format the session may not stream is refused (INVALID_MESSAGE, details.reason
    audio_format)."""

    session_id: Annotated[SessionId, doc("this connection's session (INVALID_SESSION otherwise)")]
    seq: Annotated[
        NonNegInt,
        doc(
            "the chunk's sequence number, counting up by one per chunk: not checked, but when chunks "
            "were dropped by the rate limit it tells which (missing_result.dropped_seqs)"
        ),
    ]
    is_final: Annotated[bool, doc("the client ends the utterance here (a manual cut)")]
    payload: Annotated[
        str | None,
        doc(
            'audio, standard base64 with padding; absent or "" is an empty chunk; invalid base64 is an error'
        ),
    ] = None
    client_timestamp_ms: Annotated[
        SafeInt | None, doc("the client's clock when it sent the chunk, in ms")
    ] = None


class UtteranceMessage(SpeechOptions, tag="utterance", tag_field="type"):
    """A whole utterance in one message; it takes the session's next utterance index."""

    session_id: Annotated[SessionId, doc("this connection's session")]
    utterance_index: Annotated[
        NonNegInt, doc("the client's number for it: its results, errors and missing_result carry this number")
    ]
    manual_cut: Annotated[bool, doc("accepted (a whole utterance is always complete)")]
    src_lang: Annotated[Lang, doc('source language code, or "auto"')]
    tgt_lang: Annotated[Lang, doc("target language code")]
    audio: Annotated[str, doc("the utterance's audio, standard base64")]
    audio_format: Annotated[ShortStr, doc("the audio's format: pcm16 or opus")]
    sample_rate: Annotated[SampleRate, doc("the audio's sample rate, in Hz")]
    pipeline: Annotated[
        PipelineConfig | None, doc("the stages to run (all but semantic repair by default)")
    ] = None


class ClientHeartbeat(Struct, tag="client_heartbeat", tag_field="type"):
    """Keep-alive; answered with ``server_heartbeat``."""

    session_id: Annotated[SessionId, doc("this connection's session")]
    timestamp: Annotated[SafeInt, doc("the client's clock, in ms")]


class TtsStarted(Struct, tag="tts_started", tag_field="type"):
    """The client started playing a result's synthesized speech (no pause cut while it plays)."""

    session_id: Annotated[SessionId, doc("this connection's session")]
    trace_id: Annotated[ShortStr, doc("the result's trace_id")]
    group_id: Annotated[ShortStr, doc("the result's group_id")]
    ts_start_ms: Annotated[NonNegInt, doc("the client's clock when playback started, in ms")]


class TtsPlayEnded(Struct, tag="tts_play_ended", tag_field="type"):
    """The client finished playing a result's speech: pause detection resumes, and the result's group
    takes parts for 2 s more (timed by the scheduler's clock)."""

    session_id: Annotated[SessionId, doc("this connection's session")]
    trace_id: Annotated[ShortStr, doc("the result's trace_id")]
    group_id: Annotated[ShortStr, doc("the result's group_id")]
    ts_end_ms: Annotated[
        NonNegInt, doc("the client's clock when playback ended, in ms (not used for timing)")
    ]


class UtteranceCancel(Struct, tag="utterance_cancel", tag_field="type"):
    """Cancel one utterance: its jobs stop on their nodes, and the client gets ``error``
    (JOB_CANCELLED) and ``missing_result(job_failed)`` for it; an utterance with no job in flight (not
    cut yet, or already answered) gets ``error`` INVALID_MESSAGE (details.reason invalid_value) and
    nothing changes."""

    session_id: Annotated[SessionId, doc("this connection's session")]
    utterance_index: Annotated[
        NonNegInt, doc("the utterance, as its results name it (the client's own number for an utterance)")
    ]


class SessionClose(Struct, tag="session_close", tag_field="type"):
    """End the session: its remaining audio is dispatched, its results delivered, then
    ``session_close_ack``."""

    session_id: Annotated[SessionId, doc("this connection's session")]
    reason: Annotated[ShortStr, doc("why, in words (logged)")]


#: a room code as it arrives: bounded here, its format is checked by the rooms (INVALID_ROOM_CODE)
RoomCode = Annotated[str, msgspec.Meta(max_length=64)]
DisplayName = Annotated[str, msgspec.Meta(max_length=128)]


class RoomCreate(Struct, tag="room_create", tag_field="type"):
    """Create a room and join it (the session must be open and in no room). Answered with
    ``room_create_ack`` then ``room_members``, or ``room_error`` (ALREADY_IN_ROOM)."""

    client_ts: Annotated[SafeInt, doc("the client's clock, in ms (not used)")]
    display_name: Annotated[DisplayName | None, doc("the name the other members see")] = None
    preferred_lang: Annotated[
        Lang | None, doc("the language this member wants the others' speech in (default: its tgt_lang)")
    ] = None


class RoomJoin(Struct, tag="room_join", tag_field="type"):
    """Join a room by its code. Every member (the joiner too) gets ``room_members``; refused with
    ``room_error``: INVALID_ROOM_CODE, ROOM_NOT_FOUND, ROOM_FULL, ALREADY_IN_ROOM."""

    room_code: Annotated[RoomCode, doc("the room's code (digits, as room_create_ack gave it)")]
    display_name: Annotated[DisplayName | None, doc("the name the other members see")] = None
    preferred_lang: Annotated[
        Lang | None, doc("the language this member wants the others' speech in (default: its tgt_lang)")
    ] = None


class RoomLeave(Struct, tag="room_leave", tag_field="type"):
    """Leave the room; the remaining members get ``room_members`` (a room without members is gone).
    Closing the connection leaves the room as well."""

    room_code: Annotated[RoomCode, doc("the room being left")]


class RoomRawVoicePreference(Struct, tag="room_raw_voice_preference", tag_field="type"):
    """Whether this member receives another member's own voice (the WebRTC audio). Every member gets
    ``room_members`` with the new preference."""

    room_code: Annotated[RoomCode, doc("this member's room")]
    target_session_id: Annotated[SessionId, doc("the other member (its session_id)")]
    receive_raw_voice: Annotated[bool, doc("true: receive that member's voice (the default); false: not")]


class WebRtcOffer(Struct, tag="webrtc_offer", tag_field="type"):
    """A WebRTC offer for another member, relayed to it (as ``webrtc_offer`` whose ``to`` names the
    sender). Refused with ``room_error`` when either is not in the room, the receiver declined this
    member's voice, the description is too large or relays come too fast."""

    room_code: Annotated[RoomCode, doc("the room both members are in")]
    to: Annotated[SessionId, doc("the receiving member's session_id")]
    sdp: Annotated[msgspec.Raw, doc("the session description (any JSON, relayed unchanged, size-bounded)")]


class WebRtcAnswer(Struct, tag="webrtc_answer", tag_field="type"):
    """A WebRTC answer for another member, relayed like ``webrtc_offer``."""

    room_code: Annotated[RoomCode, doc("the room both members are in")]
    to: Annotated[SessionId, doc("the receiving member's session_id")]
    sdp: Annotated[msgspec.Raw, doc("the session description (any JSON, relayed unchanged, size-bounded)")]


class WebRtcIce(Struct, tag="webrtc_ice", tag_field="type"):
    """An ICE candidate for another member, relayed like ``webrtc_offer``."""

    room_code: Annotated[RoomCode, doc("the room both members are in")]
    to: Annotated[SessionId, doc("the receiving member's session_id")]
    candidate: Annotated[msgspec.Raw, doc("the ICE candidate (any JSON, relayed unchanged, size-bounded)")]


ROOM_MESSAGES = (
    RoomCreate,
    RoomJoin,
    RoomLeave,
    RoomRawVoicePreference,
    WebRtcOffer,
    WebRtcAnswer,
    WebRtcIce,
)
RELAY_MESSAGES = (WebRtcOffer, WebRtcAnswer, WebRtcIce)

SessionInbound = (
    SessionInit
    | AudioChunk
    | UtteranceMessage
    | ClientHeartbeat
    | TtsStarted
    | TtsPlayEnded
    | SessionClose
    | UtteranceCancel
    | RoomCreate
    | RoomJoin
    | RoomLeave
    | RoomRawVoicePreference
    | WebRtcOffer
    | WebRtcAnswer
    | WebRtcIce
)

# --- scheduler -> client -------------------------------------------------------------------------


class NetworkTimings(Struct):
    """Transfer times per hop, in ms (never filled in by this scheduler)."""

    web_to_scheduler_ms: Annotated[int | None, doc("client to scheduler")] = None
    scheduler_to_node_ms: Annotated[int | None, doc("scheduler to node")] = None
    node_to_scheduler_ms: Annotated[int | None, doc("node to scheduler")] = None
    scheduler_to_web_ms: Annotated[int | None, doc("scheduler to client")] = None


class SessionInitAck(Struct, tag="session_init_ack", tag_field="type", kw_only=True, omit_defaults=False):
    """The session is open (or resumed). Every field is always serialised (the constants included), as
    the reference client expects."""

    session_id: Annotated[str, doc("the session: name it in every later message")]
    assigned_node_id: Annotated[
        str | None,
        doc(
            "the node the session's pairing_code bound it to (its jobs go there first); null without "
            "a pairing code"
        ),
    ] = None
    message: Annotated[str, doc('"session created"')] = "session created"
    trace_id: Annotated[str, doc("the session's trace id")]
    protocol_version: Annotated[str, doc('"1.0"')] = PROTOCOL_VERSION
    use_binary_frame: Annotated[bool, doc("binary audio frames are accepted on this session")] = False
    negotiated_codec: Annotated[str, doc("the codec the scheduler assumes (pcm16 or opus)")]
    negotiated_audio_format: Annotated[str, doc("the audio format granted (pcm16 or opus)")]
    negotiated_sample_rate: Annotated[int, doc("the sample rate granted, in Hz")]
    negotiated_channel_count: Annotated[int, doc("always 1 (mono)")] = 1
    resume_token: Annotated[
        str | None,
        doc(
            "present it in a session_init to resume this session after a dropped connection; null "
            "when resuming is off"
        ),
    ] = None
    resumed: Annotated[
        bool, doc("true when this session_init resumed an earlier session (same session_id, results kept)")
    ] = False


class BackpressureAction(StrEnum):
    BUSY = "BUSY"
    PAUSE = "PAUSE"
    SLOW_DOWN = "SLOW_DOWN"


class Backpressure(Struct, tag="backpressure", tag_field="type", kw_only=True):
    """Sent before the connection's frames would be refused: send slower, or pause, for a while."""

    action: Annotated[
        BackpressureAction,
        doc("SLOW_DOWN: the message rate nears its limit; PAUSE: frames are being dropped; BUSY: never sent"),
    ]
    resume_after_ms: Annotated[int, doc("wait this long, in ms")]
    session_id: Annotated[str | None, doc("the session, when one is open")] = None


class TranslationResult(Struct, tag="translation_result", tag_field="type", kw_only=True):
    """An utterance's result, in utterance order (a later result waits for the earlier ones)."""

    session_id: Annotated[str, doc("the session")]
    utterance_index: Annotated[int, doc("the utterance (the client's own number for an utterance message)")]
    job_id: Annotated[str, doc("the job that produced it")]
    text_asr: Annotated[str, doc("the recognized text")]
    text_translated: Annotated[str, doc("the translation")]
    tts_audio: Annotated[str, doc('synthesized speech, standard base64 ("" when there is none)')]
    tts_format: Annotated[str, doc('the node\'s format, or "pcm16" when it named none (always sent)')]
    audio_lost: Annotated[
        bool,
        doc("true when there is text but the synthesized audio is missing (the text itself is untouched)"),
    ]
    trace_id: Annotated[str, doc("the utterance's trace id")]
    late: Annotated[
        bool,
        doc(
            "true when this utterance was already given up (missing_result gap_timeout came before): "
            "the result came after all and is delivered anyway, out of index order"
        ),
    ]
    extra: Annotated[ExtraResult | None, doc("what the node found beyond the text")] = None
    group_id: Annotated[str | None, doc("the utterance group (results with recognized text)")] = None
    part_index: Annotated[int | None, doc("the part within the group")] = None
    service_timings: Annotated[ServiceTimings | None, doc("per-stage timings on the node")] = None
    network_timings: Annotated[NetworkTimings | None, doc("never sent by this scheduler")] = None
    scheduler_sent_at_ms: Annotated[
        int | None, doc("the scheduler's clock when it sent the result, in ms")
    ] = None
    asr_quality_level: Annotated[str | None, doc("the recognizer's quality verdict")] = None
    reason_codes: Annotated[list[str] | None, doc("the recognizer's quality reasons")] = None
    quality_score: Annotated[float | None, doc("the recognizer's quality score")] = None
    rerun_count: Annotated[int | None, doc("re-recognitions done")] = None
    segments_meta: Annotated[SegmentsMeta | None, doc("how the audio was segmented")] = None
    metadata: Annotated[Metadata | None, doc("the session's metadata (session_init.metadata), echoed")] = None
    speaker_session_id: Annotated[
        str | None,
        doc(
            "in a room: the member who spoke (its session_id); absent for the session's own "
            "utterances outside a room"
        ),
    ] = None
    room_code: Annotated[str | None, doc("in a room: the room the utterance was spoken in")] = None


class AsrPartial(Struct, tag="asr_partial", tag_field="type", kw_only=True):
    """Text recognized so far (streaming recognition), forwarded from the node."""

    session_id: Annotated[str, doc("the session")]
    utterance_index: Annotated[int, doc("the utterance")]
    job_id: Annotated[str, doc("the job (the real one: the reference always sent an empty string)")]
    text: Annotated[str, doc("the text recognized so far")]
    is_final: Annotated[bool, doc("the recognition of this utterance is complete")]
    trace_id: Annotated[str, doc("the utterance's trace id")]


class ServerHeartbeat(Struct, tag="server_heartbeat", tag_field="type"):
    """The answer to ``client_heartbeat``."""

    session_id: Annotated[str, doc("the session")]
    timestamp: Annotated[int, doc("the scheduler's clock, in ms since the epoch")]


class SessionCloseAck(Struct, tag="session_close_ack", tag_field="type"):
    """The session ended (after session_close, or replaced by a new session_init)."""

    session_id: Annotated[str, doc("the session that ended")]


class MissingResult(Struct, tag="missing_result", tag_field="type", kw_only=True):
    """Keeps indices contiguous for the client when an utterance yields no translation."""

    session_id: Annotated[str, doc("the session")]
    utterance_index: Annotated[int, doc("the utterance without a result")]
    reason: Annotated[
        MissingReason,
        doc(
            "gap_timeout: the result did not come in time (it is still delivered if it comes, marked "
            "late); job_failed: its job failed (an error came before); silence_detected: the utterance "
            "was silence; queue_full: refused at once, session.max_pending_results utterances are "
            "waiting for their results (send it again later); rate_limited: refused at once, frames "
            "of it were dropped by the connection's message rate limit (an utterance message dropped "
            "whole, or a streamed utterance with dropped chunks, named by dropped_seqs)"
        ),
    ]
    created_at_ms: Annotated[int, doc("the scheduler's clock, in ms since the epoch")]
    trace_id: Annotated[str | None, doc("the utterance's trace id")] = None
    dropped_seqs: Annotated[
        list[int] | None,
        doc(
            "rate_limited, streamed audio: the seq of the chunks of this utterance that were dropped "
            "(at most 64; dropped_chunks counts them all); null otherwise"
        ),
    ] = None
    dropped_chunks: Annotated[
        int | None, doc("rate_limited, streamed audio: how many chunks of this utterance were dropped")
    ] = None
    speaker_session_id: Annotated[
        str | None, doc("in a room: the member whose utterance this was (another member's, for a listener)")
    ] = None
    room_code: Annotated[str | None, doc("in a room: the room the utterance was spoken in")] = None


class UiEvent(Struct, tag="ui_event", tag_field="type", kw_only=True):
    """Progress of an utterance for the client's interface; ``ERROR`` events carry the code and a hint
    to show the user."""

    trace_id: Annotated[str, doc("the utterance's trace id")]
    session_id: Annotated[str, doc("the session")]
    job_id: Annotated[str, doc("the job")]
    utterance_index: Annotated[int, doc("the utterance")]
    event: Annotated[UiEventType, doc("what happened")]
    status: Annotated[UiEventStatus, doc("ok, or error for ERROR")]
    elapsed_ms: Annotated[int | None, doc("time since the utterance was dispatched, in ms")] = None
    error_code: Annotated[str | None, doc("ERROR: one of the error codes of this document")] = None
    hint: Annotated[str | None, doc("ERROR: a sentence to show the user")] = None


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


class IceServer(Struct, kw_only=True):
    """A STUN or TURN server for the members' WebRTC connections (an ``RTCIceServer``)."""

    urls: Annotated[list[str], doc("stun:, turn: or turns: URLs")]
    username: Annotated[
        str | None, doc("TURN: the time-limited user name, <expiry in unix seconds>:<session_id>")
    ] = None
    credential: Annotated[
        str | None, doc("TURN: the password for that user name (base64 of an HMAC-SHA1 of it)")
    ] = None


class RoomCreateAck(Struct, tag="room_create_ack", tag_field="type", kw_only=True):
    """The room is created and the session is its first member (``room_members`` follows)."""

    room_code: Annotated[str, doc("the code others join with")]
    room_id: Annotated[str, doc("the room's unique id (a UUID; a code may be reused after the room ends)")]
    ice_servers: Annotated[
        list[IceServer] | None, doc("STUN/TURN servers for WebRTC; absent when none is configured")
    ] = None
    ice_expires_at_ms: Annotated[
        int | None,
        doc("when the TURN credentials expire, in ms since the epoch (new ones come with room_members)"),
    ] = None


class RoomMember(Struct, kw_only=True):
    """One member of a room."""

    participant_id: Annotated[str, doc("the member's id in the room: its session_id")]
    session_id: Annotated[str, doc("the member's session")]
    display_name: Annotated[str | None, doc("the name it gave")] = None
    preferred_lang: Annotated[str, doc("the language it receives the others' speech in")]
    raw_voice_preferences: Annotated[
        dict[str, bool],
        doc("other members' session_id -> whether this member receives their voice; absent means it does"),
    ]
    joined_at: Annotated[int, doc("when it joined, in ms since the epoch")]


class RoomMembers(Struct, tag="room_members", tag_field="type", kw_only=True):
    """The room's members, sent to every member after each change (create, join, leave, a closed
    connection, a preference)."""

    room_code: Annotated[str, doc("the room")]
    members: Annotated[list[RoomMember], doc("every member, in the order they joined")]
    ice_servers: Annotated[
        list[IceServer] | None, doc("STUN/TURN servers for WebRTC; absent when none is configured")
    ] = None
    ice_expires_at_ms: Annotated[
        int | None, doc("when the TURN credentials expire, in ms since the epoch")
    ] = None


class RoomError(Struct, tag="room_error", tag_field="type", kw_only=True):
    """A room or relay request was refused; nothing changed."""

    code: Annotated[
        str,
        doc(
            "INVALID_ROOM_CODE, ROOM_NOT_FOUND, ROOM_FULL, ALREADY_IN_ROOM, NOT_IN_ROOM, PEER_NOT_IN_ROOM, "
            "RAW_VOICE_DECLINED, MESSAGE_TOO_LARGE, RATE_LIMITED or INTERNAL_ERROR"
        ),
    ]
    message: Annotated[str, doc("what was refused and why, in words")]
    room_code: Annotated[str | None, doc("the room the request named, when it named one")] = None


class RoomExpired(Struct, tag="room_expired", tag_field="type", kw_only=True):
    """Nobody spoke in the room for ``rooms.expire_after_seconds``: the room is closed and every member
    has left it."""

    room_code: Annotated[str, doc("the room that expired")]
    message: Annotated[str, doc("why, in words")]


class WebRtcOfferRelayed(Struct, tag="webrtc_offer", tag_field="type"):
    """A member's WebRTC offer for this member."""

    room_code: Annotated[str, doc("the room")]
    to: Annotated[str, doc("the SENDING member's session_id (the reference client's naming)")]
    sdp: Annotated[msgspec.Raw, doc("the session description, as the sender sent it")]


class WebRtcAnswerRelayed(Struct, tag="webrtc_answer", tag_field="type"):
    """A member's WebRTC answer for this member."""

    room_code: Annotated[str, doc("the room")]
    to: Annotated[str, doc("the SENDING member's session_id (the reference client's naming)")]
    sdp: Annotated[msgspec.Raw, doc("the session description, as the sender sent it")]


class WebRtcIceRelayed(Struct, tag="webrtc_ice", tag_field="type"):
    """A member's ICE candidate for this member."""

    room_code: Annotated[str, doc("the room")]
    to: Annotated[str, doc("the SENDING member's session_id (the reference client's naming)")]
    candidate: Annotated[msgspec.Raw, doc("the ICE candidate, as the sender sent it")]


SessionOutbound = (
    SessionInitAck
    | TranslationResult
    | AsrPartial
    | ServerHeartbeat
    | SessionCloseAck
    | MissingResult
    | UiEvent
    | Backpressure
    | RoomCreateAck
    | RoomMembers
    | RoomError
    | RoomExpired
    | WebRtcOfferRelayed
    | WebRtcAnswerRelayed
    | WebRtcIceRelayed
    | ErrorMessage
)
