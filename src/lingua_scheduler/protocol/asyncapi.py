"""The AsyncAPI 3.0 documents of ``/ws/node`` and ``/ws/session``, generated from the message types.

Owns what the types cannot say: each channel's life (its state machine, in prose), the rules enforced in
code beyond the message shapes, the binary audio frame layout, and the meaning of every error code and
every ``details.reason``. Everything else (every message both ways, every field with its type, bounds
and meaning) comes from the msgspec Structs of ``protocol/node.py`` and ``protocol/session.py``, so the
documents cannot drift from the decoder. The scheduler serves them (``/api/v1/asyncapi/node.json``,
``/api/v1/asyncapi/session.json``); ``docs/protocol.md`` holds their rendering between marker comments,
written by::

    python -m lingua_scheduler.protocol.asyncapi --write docs/

and a test fails when the committed rendering differs from what this module produces.

The documents describe the scheduler: ``receive`` operations are what a peer sends, ``send`` operations
what the scheduler sends. Payload schemas are JSON Schema as msgspec derives it, adjusted for readers
other than Python: a pattern's ``\\Z`` (end of text) is written ``$``, which means the same in ECMAScript
regular expressions, and a ``$ref`` with a description beside it is wrapped in ``allOf`` (JSON Schema
draft 7, the AsyncAPI schema format, ignores the siblings of a ``$ref``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import msgspec

from lingua_scheduler import __version__
from lingua_scheduler.core.jobs import RETRYABLE_CODES
from lingua_scheduler.errors import ErrorCode, Reason
from lingua_scheduler.protocol import binary_frames
from lingua_scheduler.protocol.common import ErrorMessage
from lingua_scheduler.protocol.node import (
    PROTOCOL_FEATURES,
    JobAck,
    JobAssign,
    JobCancel,
    JobResult,
    JobStarted,
    NodeAsrPartial,
    NodeDrain,
    NodeDrainAck,
    NodeErrorReport,
    NodeHeartbeat,
    NodeHeartbeatAck,
    NodeRegister,
    NodeRegisterAck,
    NodeStatusMessage,
    PairingCode,
    RequestPairingCode,
)
from lingua_scheduler.protocol.session import (
    AsrPartial,
    AudioChunk,
    Backpressure,
    ClientHeartbeat,
    MissingResult,
    RoomCreate,
    RoomCreateAck,
    RoomError,
    RoomExpired,
    RoomJoin,
    RoomLeave,
    RoomMembers,
    RoomRawVoicePreference,
    ServerHeartbeat,
    SessionClose,
    SessionCloseAck,
    SessionInit,
    SessionInitAck,
    TranslationResult,
    TtsPlayEnded,
    TtsStarted,
    UiEvent,
    UtteranceMessage,
    WebRtcAnswer,
    WebRtcAnswerRelayed,
    WebRtcIce,
    WebRtcIceRelayed,
    WebRtcOffer,
    WebRtcOfferRelayed,
)

Doc = dict[str, Any]

#: the message name of the binary audio frame (it has no JSON ``type``)
BINARY_FRAME = "binary_audio_frame"

#: codes only the HTTP API answers with (never in a WebSocket frame)
HTTP_ONLY = frozenset({"http"})
#: what each error code means, and on which endpoints the scheduler sends it (``http``: HTTP answers)
ERROR_CODES: dict[ErrorCode, tuple[str, frozenset[str]]] = {
    ErrorCode.INVALID_MESSAGE: (
        "A frame failed validation (shape, type, bounds, base64, audio format, binary frame layout): "
        "`details.reason` says what and `details.field` where. Nothing changed; the connection stays open.",
        frozenset({"node", "session", "http"}),
    ),
    ErrorCode.INTERNAL_ERROR: (
        "The scheduler failed, or a job failed without an error code from its node (HTTP 500: a route "
        "failed; the server log says why).",
        frozenset({"session", "http"}),
    ),
    ErrorCode.INVALID_SESSION: (
        "The message needs this connection's open session: none was opened, it names another session, "
        "or the session was resumed on another connection.",
        frozenset({"session"}),
    ),
    ErrorCode.SESSION_CLOSED: ("The session is closing: no more audio is accepted.", frozenset({"session"})),
    ErrorCode.NODE_UNAVAILABLE: (
        "A job failed because its node went away and no attempt was left.",
        frozenset({"node", "session"}),
    ),
    ErrorCode.NODE_OVERLOADED: (
        "A job failed: the session's audio backlog is over its limit.",
        frozenset({"node", "session", "http"}),
    ),
    ErrorCode.MODEL_NOT_AVAILABLE: (
        "The node lacks a model the job needs.",
        frozenset({"node", "session", "http"}),
    ),
    ErrorCode.MODEL_LOAD_FAILED: (
        "The node could not load a model.",
        frozenset({"node", "session"}),
    ),
    ErrorCode.UNSUPPORTED_FEATURE: (
        "Reserved: a message this scheduler knows but does not serve (none now). Nothing changed.",
        frozenset(),
    ),
    ErrorCode.INVALID_PAIRING_CODE: (
        "`session_init` refused: its `pairing_code` is wrong, used already or expired (one answer for "
        "all three). The session is not opened.",
        frozenset({"session"}),
    ),
    ErrorCode.NO_AVAILABLE_NODE: (
        "No node could take the utterance within the wait timeout, or the scheduler cannot take more "
        "jobs right now; the message names what excluded most nodes.",
        frozenset({"session", "http"}),
    ),
    ErrorCode.WS_DISCONNECTED: ("Reserved (a client-side code; not sent by this scheduler).", frozenset()),
    ErrorCode.NMT_TIMEOUT: (
        "A node's translation timed out (passed on from the node).",
        frozenset({"session"}),
    ),
    ErrorCode.TTS_TIMEOUT: (
        "A node's synthesis timed out (passed on from the node).",
        frozenset({"session"}),
    ),
    ErrorCode.JOB_TIMEOUT: (
        "No acknowledgement or result came in time on any attempt.",
        frozenset({"session", "http"}),
    ),
    ErrorCode.JOB_CANCELLED: (
        "An operator cancelled the job (admin API), or its client did (`utterance_cancel`).",
        frozenset({"session", "http"}),
    ),
    ErrorCode.MODEL_VERIFY_FAILED: (
        "The node's model failed verification.",
        frozenset({"node", "session"}),
    ),
    ErrorCode.MODEL_CORRUPTED: (
        "The node's model file is corrupted.",
        frozenset({"node", "session"}),
    ),
    ErrorCode.NO_GPU_AVAILABLE: (
        "`node_register` refused: `hardware.gpus` is absent or empty. A node needs at least one GPU.",
        frozenset({"node"}),
    ),
    ErrorCode.NODE_ID_CONFLICT: (
        "`node_register` refused: the node id is connected on another connection right now, or this "
        "connection already registered another id.",
        frozenset({"node"}),
    ),
    ErrorCode.INVALID_CAPABILITY_SCHEMA: (
        '`node_register` refused: `capability_schema_version` is absent or not "2.0".',
        frozenset({"node"}),
    ),
    ErrorCode.SCHEDULER_DEPENDENCY_DOWN: ("Reserved (not sent by this scheduler).", frozenset()),
    ErrorCode.SCHEDULER_SHUTTING_DOWN: (
        "This instance is shutting down: jobs it cannot finish fail with it, a new session is refused, "
        "then the socket is closed with 1001. Reconnect (to another instance) to go on.",
        frozenset({"node", "session", "http"}),
    ),
    ErrorCode.NOT_REGISTERED: (
        "A node message names a node id that is not registered on this connection (register first).",
        frozenset({"node"}),
    ),
    ErrorCode.NODE_ID_MISMATCH: (
        "A node message names a node id that another connection registered.",
        frozenset({"node"}),
    ),
    ErrorCode.MESSAGE_TOO_LARGE: (
        "A frame is over `server.max_frame_bytes` (the socket is closed with 1009 when the frame header "
        "already says so), or an utterance is over its size limit.",
        frozenset({"node", "session", "http"}),
    ),
    ErrorCode.CONFIG_INVALID: (
        "A configuration value is invalid (at start-up; never on the wire).",
        frozenset(),
    ),
    ErrorCode.NOT_FOUND: ("No such node or job (HTTP API).", frozenset({"http"})),
    ErrorCode.UNAUTHORIZED: (
        "Missing, wrong or revoked credentials (node enrollment secret or token, tenant API key): the "
        "error is sent, then the socket is closed with 1008.",
        frozenset({"node", "session", "http"}),
    ),
    ErrorCode.TENANT_LIMIT: (
        "The tenant is at its limit of concurrent sessions (`auth.tenants[].max_sessions`).",
        frozenset({"session", "http"}),
    ),
    ErrorCode.TENANT_RATE_LIMITED: (
        "The tenant is over its job rate (`auth.tenants[].max_jobs_per_second`): the utterance is refused.",
        frozenset({"session", "http"}),
    ),
    ErrorCode.RATE_LIMITED: (
        "The connection sends frames faster than its rate limit (`limits.*_messages_per_second`): frames "
        "are dropped, and a connection that goes on is closed with 1008. Sessions get `backpressure` "
        "instead.",
        frozenset({"node"}),
    ),
    ErrorCode.NODE_LIMIT_REACHED: (
        "`node_register` refused: this instance holds `limits.max_nodes` nodes. Register elsewhere or later.",
        frozenset({"node"}),
    ),
    ErrorCode.SESSION_LIMIT_REACHED: (
        "`session_init` refused: this instance holds `limits.max_sessions` sessions.",
        frozenset({"session", "http"}),
    ),
    ErrorCode.ORIGIN_NOT_ALLOWED: (
        "HTTP 403 before the upgrade: the browser Origin is not in `limits.session_allowed_origins`.",
        frozenset({"upgrade", "http"}),
    ),
    ErrorCode.TOO_MANY_CONNECTIONS: (
        "HTTP 503 before the upgrade: this instance holds `limits.max_connections` WebSockets.",
        frozenset({"upgrade", "http"}),
    ),
    ErrorCode.REQUEST_TIMEOUT: (
        "HTTP 408: the request head was not complete within `limits.header_timeout_seconds`.",
        frozenset({"upgrade", "http"}),
    ),
    ErrorCode.INVALID_REQUEST: (
        "HTTP 400: a query parameter is missing, malformed or out of range (the message names it).",
        HTTP_ONLY,
    ),
    ErrorCode.METHOD_NOT_ALLOWED: ("HTTP 405: the route has no such method (`Allow` lists them).", HTTP_ONLY),
    ErrorCode.ADMIN_DISABLED: ("HTTP 403: no `admin.token` is configured, the admin API is off.", HTTP_ONLY),
    ErrorCode.REMOTE_NODE: (
        "HTTP 409: the node is marked as another instance's; act on that instance.",
        HTTP_ONLY,
    ),
    ErrorCode.NOT_CONNECTED: ("HTTP 409: the node has no socket on this instance.", HTTP_ONLY),
    ErrorCode.NODE_CONNECTED: (
        "HTTP 409: only an offline, disconnected node can be forgotten (disconnect it first).",
        HTTP_ONLY,
    ),
    ErrorCode.JOB_ENDED: ("HTTP 409: the job already ended.", HTTP_ONLY),
    ErrorCode.NODE_AUTH_DISABLED: (
        "HTTP 409: node authentication is not configured, a revocation would have no effect.",
        HTTP_ONLY,
    ),
    ErrorCode.STORE_UNAVAILABLE: ("HTTP 503: the shared store (Redis) did not answer.", HTTP_ONLY),
    ErrorCode.OWNER_TIMEOUT: (
        "HTTP 504: the node's instance did not answer a forwarded action in time; it may still take effect.",
        HTTP_ONLY,
    ),
    ErrorCode.TOO_MANY_CLIENTS: (
        "HTTP 503: `admin.max_dashboard_clients` dashboards are connected, or (webhook test) "
        "`webhooks.max_queued` events wait for delivery.",
        HTTP_ONLY,
    ),
    ErrorCode.ROOM_NOT_FOUND: ("`room_error`: no live room has this code.", frozenset()),
    ErrorCode.ALREADY_IN_ROOM: (
        "`room_error`: the session is in a room already (a session is in at most one room): leave it first.",
        frozenset(),
    ),
    ErrorCode.INVALID_ROOM_CODE: (
        "`room_error`: the room code is not `rooms.code_length` digits.",
        frozenset(),
    ),
    ErrorCode.ROOM_FULL: ("`room_error`: the room holds `rooms.max_members` members.", frozenset()),
    ErrorCode.NOT_IN_ROOM: ("`room_error`: the request names a room the session is not in.", frozenset()),
    ErrorCode.PEER_NOT_IN_ROOM: (
        "`room_error`: a relay's `to` (or a preference's `target_session_id`) is not another member of "
        "the room; the relay was not delivered.",
        frozenset(),
    ),
    ErrorCode.RAW_VOICE_DECLINED: (
        "`room_error`: the receiver of a relay declined the sender's voice (`room_raw_voice_preference`); "
        "the relay was not delivered.",
        frozenset(),
    ),
    ErrorCode.PAIRING_RATE_LIMITED: (
        "`session_init` refused: too many pairing codes tried from this connection or source address "
        "(`pairing.attempts_per_minute_per_*`); `details.retry_after_ms` says when to try again.",
        frozenset({"session"}),
    ),
    ErrorCode.QUOTA_EXCEEDED: (
        "The tenant used up its daily or monthly audio minutes (`details.period`, `details.reset_at` "
        "say which and when it resets): a session_init or an utterance is refused (HTTP 429).",
        frozenset({"http", "session"}),
    ),
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: (
        "HTTP 415: the request body is in a media type the route does not take.",
        HTTP_ONLY,
    ),
    ErrorCode.FORBIDDEN: (
        "HTTP 403: the credential is valid, but not for this (a tenant key asking about another tenant).",
        HTTP_ONLY,
    ),
}

#: what each ``details.reason`` of an INVALID_MESSAGE (or MESSAGE_TOO_LARGE) error means
REASONS: dict[Reason, str] = {
    Reason.MALFORMED_JSON: "The text frame is not one complete JSON value.",
    Reason.INVALID_UTF8: "The text (or a binary frame's session id) is not valid UTF-8.",
    Reason.TOO_DEEP: "The JSON is nested too deeply.",
    Reason.TOO_LARGE: "The frame is over the size limit (with MESSAGE_TOO_LARGE).",
    Reason.UNKNOWN_TYPE: "`type` (or a binary frame's first byte) names no message of this endpoint.",
    Reason.MISSING_FIELD: "A required field is absent (`details.field` names it).",
    Reason.UNKNOWN_FIELD: "A field is not allowed there (unknown fields are otherwise ignored).",
    Reason.WRONG_TYPE: "A value is of the wrong JSON type.",
    Reason.INVALID_VALUE: "A value of the right type is out of its bounds or not one of the allowed values.",
    Reason.INVALID_BASE64: "A base64 field (`payload`, `audio`, `tts_audio`) is not standard base64.",
    Reason.MALFORMED_FRAME: "A binary frame is shorter than its header, or its session id does not fit.",
    Reason.AUDIO_FORMAT: (
        "Audio in no format the session may stream (`details.expected` names the one expected)."
    ),
}

_CLOSE_CODES = (
    "Before the upgrade, the HTTP request may be refused with a JSON `{code, message}` body: 403 "
    "ORIGIN_NOT_ALLOWED (sessions, a browser Origin not allowed), 503 TOO_MANY_CONNECTIONS, 408 "
    "REQUEST_TIMEOUT. After it, close codes: 1001 the instance is shutting down; 1008 a policy "
    "violation (credentials refused, rate limit exceeded, no handshake within "
    "`limits.handshake_timeout_seconds`, a consumer too slow to read its messages); 1009 a frame over "
    "`server.max_frame_bytes`."
)

NODE_LIFE = f"""\
A node connects, registers, heartbeats and works on jobs, all on one WebSocket of JSON text frames.

1. **Connected.** The first message must be `node_register` within `limits.handshake_timeout_seconds`,
   or the socket is closed. Any other node message is answered with `error` NOT_REGISTERED.
2. **Registered.** `node_register_ack` gives the node its `node_id` (assigned when the node sent none)
   and `heartbeat_interval_ms`; with node authentication, a `node_token` to present from then on. A
   refused registration is an `error` and the connection stays open: fix the message and send it again.
   The rules beyond the message's shape: `capability_schema_version` must be "2.0"
   (INVALID_CAPABILITY_SCHEMA) and `hardware.gpus` must list a GPU (NO_GPU_AVAILABLE). Every later
   message carries the registered `node_id` (another id: NODE_ID_MISMATCH / NOT_REGISTERED).
3. **Status.** The scheduler decides the node's status and announces each change with `node_status`:
   `registering` until a heartbeat shows a running service for every installed core type (asr, nmt,
   tts), then `ready`; `degraded` while heartbeats show no running service, `draining` when an operator
   drains it or the node sends `node_drain`, `offline` when its heartbeats stop or its socket closes.
   Only `ready` nodes get new jobs. A node that reconnects with its `node_id` gets its record back and
   starts at `registering` again (a drain it asked for itself ends there; an operator's is kept).
4. **Jobs.** `job_assign` gives a job; the node answers with `job_result` (success or an error),
   optionally `asr_partial` while recognizing. A node that declared `protocol_features: ["job_ack"]`
   must send `job_ack` (or `job_started`) within the ack timeout; for the others the execution deadline
   runs from the dispatch. A job not answered in time moves to another node with a new `attempt_id` and
   the node gets `job_cancel`. Messages of an older attempt are dropped, except a successful
   `job_result` of the same node while the job is still unanswered.
   Known `protocol_features`: {", ".join(sorted(PROTOCOL_FEATURES))}.
5. **Capacity (optional).** A node may declare `node_register.max_concurrent_jobs` (its job slots,
   instead of the scheduler's default per-node limit) and `load_threshold`, and report
   `resource_usage.load` (0..1) in its heartbeats: at or above its threshold it gets no new job.
6. **Leaving (optional).** `node_drain` makes the node `draining` (answered with `node_drain_ack`): no
   new job, the running ones finish; the node closes once its last result is sent.
7. **Closed.** The node is set offline; its running jobs move to other nodes at once.
8. **Pairing.** `request_pairing_code` asks for a single-use code (`pairing_code`, valid until
   `expires_at_ms`) that a client presents in `session_init.pairing_code` to be bound to this node.
   A new request replaces the node's earlier code; the code ends with the node's connection. The
   session's jobs go to this node first (`pairing.fallback_to_pools` decides what happens when it
   cannot take one).

Unknown fields are ignored. A frame that fails validation is answered with `error` INVALID_MESSAGE and
changes nothing. {_CLOSE_CODES}
"""

SESSION_LIFE = f"""\
A client opens a session, streams audio, and receives results in utterance order, on one WebSocket.

1. **Connected.** The first message must be `session_init` within `limits.handshake_timeout_seconds`,
   or the socket is closed. A tenant API key may be given at connect (`Authorization: Bearer`,
   `X-Api-Key`, or the `api_key` query parameter when `auth.api_key_query_param` allows it) or in
   `session_init.api_key`.
2. **Open.** `session_init_ack` names the `session_id` and what was negotiated (audio format, sample
   rate, binary frames, a `resume_token` when resuming is on). A session that declares no
   `audio_format` is assumed to stream Opus in 2-byte length framing (each packet preceded by its
   length, little-endian). Every later message names this `session_id` (another one: INVALID_SESSION).
   Audio comes as `audio_chunk` (or binary frames, when negotiated) or whole `utterance` messages. The
   scheduler cuts the stream into utterances (at a pause, at the maximum duration or size, at an
   `is_final` chunk); each becomes a job, numbered from 0 without gaps. For each utterance the client
   gets `translation_result`, or `missing_result` (and an `error` and `ui_event` ERROR when its job
   failed), always in index order. `asr_partial` and `ui_event` report progress. `backpressure` asks
   the client to slow down before frames would be dropped.
3. **Replaced.** Another `session_init` on the same connection closes the open session
   (`session_close_ack`) and opens a new one.
4. **Closing.** `session_close` dispatches the remaining audio; the results still due are delivered,
   then `session_close_ack`. Messages naming the session meanwhile get SESSION_CLOSED.
5. **Detached.** With `session.resume_window_ms` > 0, a dropped connection detaches the session: its
   jobs run on and its output is kept. A `session_init` with the `resume_token` within the window gets
   an ack with the same `session_id` and `resumed: true`, then the kept messages. An unknown or
   expired token opens a new session. After the window the session ends.
6. **Rooms.** An open session may create a room (`room_create`: `room_create_ack` with the code, then
   `room_members`) or join one by its code (`room_join`: `room_members` to every member); it is in at
   most one room, and leaves it with `room_leave` or by closing. Members exchange WebRTC signalling
   through the scheduler (`webrtc_offer`, `webrtc_answer`, `webrtc_ice`: delivered to `to` with `to`
   naming the sender); a room nobody spoke in for `rooms.expire_after_seconds` ends with
   `room_expired`. Refusals are `room_error`. When a member speaks, the scheduler makes one job per
   language the other members asked for (`preferred_lang`) and delivers each result to the members of
   that language, in the speaker's order, marked with `speaker_session_id` and `room_code`; a member
   whose language is the speaker's gets the transcript; the speaker gets its own result once.
   A `session_init` with a node's `pairing_code` binds the session to that node
   (`session_init_ack.assigned_node_id`); a wrong, used or expired code is refused with `error`
   INVALID_PAIRING_CODE, too many tries with PAIRING_RATE_LIMITED.

Unknown fields are ignored. A frame that fails validation is answered with `error` INVALID_MESSAGE and
changes nothing. {_CLOSE_CODES}
"""

BINARY_FRAME_LAYOUT = f"""\
Sent instead of `audio_chunk` by a session whose `session_init` had `use_binary_frame: true` (the ack's
`use_binary_frame` confirms it). All integers little-endian; a JSON text never starts with these bytes.

| offset | size | audio chunk (type {binary_frames.AUDIO_CHUNK:#04x}) | final ({binary_frames.FINAL:#04x}) |
|---|---|---|---|
| 0 | 1 | type = {binary_frames.AUDIO_CHUNK} | type = {binary_frames.FINAL} |
| 1 | 1 | `session_id` length N (1..255) | `session_id` length N |
| 2 | 4 | `seq` (u32) | `seq` (u32) |
| 6 | 4 | timestamp (u32, ms) | timestamp (u32, ms) |
| 10 | 1 | `is_final` (0 or 1) | the session id (N bytes, UTF-8) |
| 11 | 1 | reserved (0) | |
| 12 | N | the session id (UTF-8) | |
| 12+N | rest | the audio bytes | |

A final frame is an empty chunk with `is_final`. A frame too short for its header, of an unknown type or
with a session id that is not UTF-8 is refused with INVALID_MESSAGE (`details.reason`
malformed_frame, unknown_type or invalid_utf8); a session that did not negotiate binary frames gets
INVALID_MESSAGE too. The bytes are never echoed.
"""


@dataclass(frozen=True)
class Channel:
    """One WebSocket endpoint: its messages both ways and the prose that goes with them."""

    name: str
    address: str
    title: str
    description: str
    #: what peers send (the scheduler receives), in document order
    inbound: tuple[type[msgspec.Struct], ...]
    #: what the scheduler sends
    outbound: tuple[type[msgspec.Struct], ...]
    #: inbound message tag -> the tags of its possible answers
    replies: dict[str, tuple[str, ...]] = field(default_factory=dict)
    binary_frames: bool = False


NODE = Channel(
    name="node",
    address="/ws/node",
    title="GPU node connection",
    description=NODE_LIFE,
    inbound=(
        NodeRegister,
        NodeHeartbeat,
        JobAck,
        JobStarted,
        NodeAsrPartial,
        JobResult,
        NodeErrorReport,
        NodeDrain,
        RequestPairingCode,
    ),
    outbound=(
        NodeRegisterAck,
        NodeHeartbeatAck,
        NodeStatusMessage,
        NodeDrainAck,
        JobAssign,
        JobCancel,
        PairingCode,
        ErrorMessage,
    ),
    replies={
        "node_register": ("node_register_ack", "error"),
        "node_heartbeat": ("node_heartbeat_ack", "error"),
        "node_drain": ("node_drain_ack", "error"),
        "request_pairing_code": ("pairing_code", "error"),
    },
)

SESSION = Channel(
    name="session",
    address="/ws/session",
    title="Client session connection",
    description=SESSION_LIFE,
    inbound=(
        SessionInit,
        AudioChunk,
        UtteranceMessage,
        ClientHeartbeat,
        TtsStarted,
        TtsPlayEnded,
        SessionClose,
        RoomCreate,
        RoomJoin,
        RoomLeave,
        RoomRawVoicePreference,
        WebRtcOffer,
        WebRtcAnswer,
        WebRtcIce,
    ),
    outbound=(
        SessionInitAck,
        AsrPartial,
        TranslationResult,
        MissingResult,
        UiEvent,
        Backpressure,
        ServerHeartbeat,
        SessionCloseAck,
        RoomCreateAck,
        RoomMembers,
        RoomError,
        RoomExpired,
        WebRtcOfferRelayed,
        WebRtcAnswerRelayed,
        WebRtcIceRelayed,
        ErrorMessage,
    ),
    replies={
        "session_init": ("session_init_ack", "error"),
        "client_heartbeat": ("server_heartbeat",),
        "session_close": ("session_close_ack",),
        "room_create": ("room_create_ack", "room_error", "error"),
        "room_join": ("room_members", "room_error", "error"),
        "room_leave": ("room_error", "error"),
        "room_raw_voice_preference": ("room_members", "room_error", "error"),
        "webrtc_offer": ("room_error", "error"),
        "webrtc_answer": ("room_error", "error"),
        "webrtc_ice": ("room_error", "error"),
    },
    binary_frames=True,
)

CHANNELS: dict[str, Channel] = {c.name: c for c in (NODE, SESSION)}

_REF_PREFIX = "#/components/schemas/"


def _tag(t: type[msgspec.Struct]) -> str:
    tag = t.__struct_config__.tag
    assert isinstance(tag, str), f"{t.__name__} is not a tagged message"
    return tag


def _summary(t: type[msgspec.Struct]) -> tuple[str, str]:
    """The first sentence of the type's docstring, and the rest (the message's summary, description)."""
    text = " ".join((t.__doc__ or "").split())
    head, dot, rest = text.partition(". ")
    return (head + "." if dot else head), rest


def _portable(node: Any) -> Any:
    """The schema for readers other than Python (module docstring): ``\\Z`` -> ``$``, ``$ref`` alone."""
    if isinstance(node, list):
        return [_portable(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _portable(v) for k, v in node.items()}
    pattern = out.get("pattern")
    if isinstance(pattern, str) and pattern.endswith("\\Z"):
        out["pattern"] = pattern[:-2] + "$"
    if "$ref" in out and len(out) > 1:
        out["allOf"] = [{"$ref": out.pop("$ref")}]
    return out


def error_codes(channel: str) -> dict[str, str]:
    """The error codes the scheduler sends on ``channel`` (node, session; upgrade: refusals of the
    WebSocket upgrade; http: the HTTP API), with their meaning."""
    return {code.value: meaning(code) for code, (_, where) in ERROR_CODES.items() if channel in where}


#: appended to the meaning of a code a node may report in ``job_result.error.code`` to have the job retried
RETRIED = "Reported by a node in `job_result.error.code`, the job is retried on another node."


def meaning(code: ErrorCode) -> str:
    text = ERROR_CODES[code][0]
    return f"{text} {RETRIED}" if code in RETRYABLE_CODES else text


def _check_tables() -> None:
    missing = [c.value for c in ErrorCode if c not in ERROR_CODES] + [
        r.value for r in Reason if r not in REASONS
    ]
    if missing:
        raise RuntimeError(f"protocol/asyncapi.py gives no meaning for: {', '.join(missing)}")


#: suffix of the key of an outbound message whose tag an inbound one has too (the relayed ``webrtc_*``)
RELAYED = "_relayed"


def message_key(t: type[msgspec.Struct], outbound: bool, channel: Channel) -> str:
    """The message's key in the document: its tag, with ``RELAYED`` appended for an outbound
    message whose tag is also inbound (a key names one message; ``name`` stays the wire tag)."""
    tag = _tag(t)
    if outbound and tag in {_tag(i) for i in channel.inbound}:
        return tag + RELAYED
    return tag


def _messages(channel: Channel, schemas: dict[str, Doc]) -> dict[str, Doc]:
    out: dict[str, Doc] = {}
    for direction, types in (("receive", channel.inbound), ("send", channel.outbound)):
        for t in types:
            key = message_key(t, direction == "send", channel)
            summary, description = _summary(t)
            message: Doc = {
                "name": _tag(t),
                "title": t.__name__,
                "summary": summary,
                "payload": {"$ref": _REF_PREFIX + t.__name__},
                "x-direction": "to the scheduler" if direction == "receive" else "from the scheduler",
            }
            if description:
                message["description"] = description
            if t is ErrorMessage:
                codes = error_codes(channel.name)
                message["description"] = "Error codes on this endpoint:\n\n" + "\n".join(
                    f"- `{code}`: {text}" for code, text in codes.items()
                )
            out[key] = message
            schemas[t.__name__].pop("title", None)  # the message's title says it
    if channel.binary_frames:
        out[BINARY_FRAME] = {
            "name": BINARY_FRAME,
            "title": "Binary audio frame",
            "summary": "Audio as a binary WebSocket frame instead of a JSON audio_chunk.",
            "description": BINARY_FRAME_LAYOUT,
            "contentType": "application/octet-stream",
            "payload": {"type": "string", "format": "binary"},
            "x-direction": "to the scheduler",
        }
    return out


def _operations(channel: Channel, messages: dict[str, Doc]) -> dict[str, Doc]:
    chan_ref = {"$ref": f"#/channels/{channel.name}"}

    def msg_ref(name: str) -> Doc:
        return {"$ref": f"#/channels/{channel.name}/messages/{name}"}

    out: dict[str, Doc] = {}
    for name, message in messages.items():
        receive = message["x-direction"] == "to the scheduler"
        op: Doc = {
            "action": "receive" if receive else "send",
            "channel": chan_ref,
            "summary": message["summary"],
            "messages": [msg_ref(name)],
        }
        answers = channel.replies.get(name)
        if answers:
            op["reply"] = {"channel": chan_ref, "messages": [msg_ref(a) for a in answers]}
        out[f"{'receive' if receive else 'send'}_{name}"] = op
    return out


@cache
def _document(name: str) -> str:
    _check_tables()
    channel = CHANNELS[name]
    types = channel.inbound + channel.outbound
    _, components = msgspec.json.schema_components(types, ref_template=_REF_PREFIX + "{name}")
    schemas: dict[str, Doc] = _portable(components)
    messages = _messages(channel, schemas)
    doc: Doc = {
        "asyncapi": "3.0.0",
        "info": {
            "title": f"lingua-scheduler {channel.address}",
            "version": __version__,
            "description": f"{channel.title}: every message both ways, generated from the scheduler's "
            "message types. The channel's description says how a connection goes; `x-error-codes` and "
            "`x-invalid-message-reasons` list every error code and `details.reason` value.",
        },
        "defaultContentType": "application/json",
        "channels": {
            channel.name: {
                "address": channel.address,
                "title": channel.title,
                "description": channel.description,
                "messages": {m: {"$ref": f"#/components/messages/{m}"} for m in messages},
                "bindings": {"ws": {"bindingVersion": "0.1.0"}},
            }
        },
        "operations": _operations(channel, messages),
        "components": {"messages": messages, "schemas": dict(sorted(schemas.items()))},
        "x-error-codes": error_codes(channel.name),
        **(
            {"x-job-error-codes": {c: meaning(ErrorCode(c)) for c in sorted(RETRYABLE_CODES)}}
            if channel is NODE
            else {}
        ),
        "x-invalid-message-reasons": {r.value: text for r, text in REASONS.items()},
    }
    return json.dumps(doc)


def document(name: str) -> Doc:
    """The AsyncAPI document of channel ``name`` (``node`` or ``session``), a fresh copy."""
    return dict(json.loads(_document(name)))


def document_bytes(name: str) -> bytes:
    """The document as served (built once)."""
    return _document(name).encode()


# --- rendering into docs/protocol.md ---------------------------------------------------------------

BEGIN = (
    "<!-- BEGIN GENERATED: message reference (python -m lingua_scheduler.protocol.asyncapi --write docs/) -->"
)
END = "<!-- END GENERATED: message reference -->"
REGENERATE = ".venv/bin/python -m lingua_scheduler.protocol.asyncapi --write docs/"


def _resolve(doc: Doc, schema: Doc) -> Doc:
    ref = schema.get("$ref")
    if ref is None and len(schema.get("allOf", [])) == 1:
        ref = schema["allOf"][0].get("$ref")
    if isinstance(ref, str) and ref.startswith(_REF_PREFIX):
        target: Doc = doc["components"]["schemas"][ref[len(_REF_PREFIX) :]]
        return target
    return schema


def _type_name(schema: Doc) -> str:
    """A schema's type in a few words: ``string``, ``integer``, ``array of GpuInfo``, ``X or null``."""
    if "anyOf" in schema:
        return " or ".join(_type_name(s) for s in schema["anyOf"])
    ref = schema.get("$ref") or (
        schema["allOf"][0].get("$ref") if len(schema.get("allOf", [])) == 1 else None
    )
    if isinstance(ref, str):
        return ref.rsplit("/", 1)[-1]
    if "enum" in schema:
        return "one of " + ", ".join(f"`{v}`" for v in schema["enum"])
    kind = schema.get("type")
    if kind == "array":
        return "array of " + _type_name(schema.get("items", {}))
    if kind == "object" and "additionalProperties" in schema:
        return "object of " + _type_name(schema["additionalProperties"])
    if kind is None:
        return "any"
    return str(kind)


_BOUNDS: tuple[tuple[str, Callable[[Any], str]], ...] = (
    ("minimum", lambda v: f">= {v}"),
    ("maximum", lambda v: f"<= {v}"),
    ("exclusiveMinimum", lambda v: f"> {v}"),
    ("exclusiveMaximum", lambda v: f"< {v}"),
    ("minLength", lambda v: f"at least {v} chars"),
    ("maxLength", lambda v: f"at most {v} chars"),
    ("pattern", lambda v: f"matches `{v}`"),
    ("minItems", lambda v: f"at least {v} items"),
    ("maxItems", lambda v: f"at most {v} items"),
)


def _bounds(schema: Doc) -> str:
    parts: list[str] = []
    for sub in [schema, *schema.get("anyOf", [])]:
        each = sub.get("items", {}) if sub.get("type") == "array" else {}
        for target, prefix in ((sub, ""), (each, "each ")):
            for key, words in _BOUNDS:
                if key in target:
                    text = prefix + words(target[key])
                    if text not in parts:
                        parts.append(text)
    if "default" in schema:
        parts.append(f"default {json.dumps(schema['default'])}")
    return "; ".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _fields_table(schema: Doc, tag_field: str | None = None) -> list[str]:
    """A table of the object's fields (without a message's tag), or its values for an enumeration."""
    if "enum" in schema:
        return ["One of " + ", ".join(f"`{v}`" for v in schema["enum"]) + "."]
    rows = ["| field | type | required | bounds | meaning |", "|---|---|---|---|---|"]
    required = set(schema.get("required", []))
    for name, prop in schema.get("properties", {}).items():
        if name == tag_field:
            continue
        rows.append(
            f"| `{name}` | {_cell(_type_name(prop))} | {'yes' if name in required else 'no'} "
            f"| {_cell(_bounds(prop))} | {_cell(prop.get('description', ''))} |"
        )
    return rows


def _nested(doc: Doc, schema: Doc, seen: set[str], order: list[str]) -> None:
    """The component schemas a schema refers to, depth first, each once."""
    for value in _walk(schema):
        ref = value.get("$ref")
        if isinstance(ref, str) and ref.startswith(_REF_PREFIX):
            name = ref[len(_REF_PREFIX) :]
            if name not in seen:
                seen.add(name)
                order.append(name)
                _nested(doc, doc["components"]["schemas"][name], seen, order)


def _walk(node: Any) -> Iterable[Doc]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _render_channel(doc: Doc) -> list[str]:
    ((_, channel),) = doc["channels"].items()
    out = [f"### `{channel['address']}`: {channel['title'].lower()}", "", channel["description"].rstrip(), ""]
    messages = doc["components"]["messages"]
    seen: set[str] = set()
    for direction in ("to the scheduler", "from the scheduler"):
        out += [f"#### Messages {direction}", ""]
        for message in messages.values():
            if message["x-direction"] != direction:
                continue
            out += [f"##### `{message['name']}`", "", message["summary"]]
            if "description" in message:
                out += ["", message["description"].rstrip()]
            out.append("")
            payload = message["payload"]
            if "$ref" in payload:
                schema = _resolve(doc, payload)
                out += [*_fields_table(schema, "type"), ""]
                order: list[str] = []
                _nested(doc, schema, seen, order)
                for nested in order:
                    sub = doc["components"]["schemas"][nested]
                    if "enum" in sub:
                        out += [f"`{nested}`: one of " + ", ".join(f"`{v}`" for v in sub["enum"]) + ".", ""]
                        continue
                    out += [f"`{nested}`: {sub.get('description', '')}".rstrip(), ""]
                    out += [*_fields_table(sub), ""]
    return out


def render_markdown() -> str:
    """The message reference of both endpoints, as it stands between the markers of docs/protocol.md."""
    out = [
        "## Message reference",
        "",
        "Generated from the message types by `protocol/asyncapi.py`; the same content is served as AsyncAPI "
        "3.0 at `/api/v1/asyncapi/node.json` and `/api/v1/asyncapi/session.json`. Types are JSON types; "
        "a nested object's fields follow the first message that uses it. Unknown fields are ignored.",
        "",
    ]
    for name in CHANNELS:
        out += _render_channel(document(name))
    out += [
        "### Error codes",
        "",
        "Where each is sent: `error` frames on `/ws/node` and `/ws/session`, HTTP refusals of the upgrade, "
        "HTTP API answers; *from nodes*: a node may report it in `job_result.error.code`.",
        "",
        "| code | node | session | upgrade | HTTP API | from nodes | meaning |",
        "|---|---|---|---|---|---|---|",
    ]
    for code, (_, where) in ERROR_CODES.items():
        marks = " | ".join("yes" if c in where else "" for c in ("node", "session", "upgrade", "http"))
        retried = "retried" if code in RETRYABLE_CODES else ""
        out.append(f"| `{code.value}` | {marks} | {retried} | {_cell(meaning(code))} |")
    out += ["", "### `details.reason` of INVALID_MESSAGE", "", "| reason | meaning |", "|---|---|"]
    out += [f"| `{r.value}` | {_cell(text)} |" for r, text in REASONS.items()]
    return "\n".join(out).rstrip() + "\n"


def spliced(text: str) -> str:
    """``text`` (docs/protocol.md) with the generated reference between its markers (appended with the
    markers if it has none)."""
    block = f"{BEGIN}\n\n{render_markdown()}\n{END}\n"
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < 0:
        return text.rstrip() + "\n\n" + block
    return text[:start] + block + text[end + len(END) :].lstrip("\n")


def generated_block(text: str) -> str | None:
    """What stands between the markers of ``text`` (None without markers)."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < 0:
        return None
    return text[start : end + len(END)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--write", metavar="DOCS", type=Path, help="update DOCS/protocol.md")
    parser.add_argument("--print", dest="show", choices=sorted(CHANNELS), help="print one AsyncAPI document")
    args = parser.parse_args(argv)
    if args.show:
        sys.stdout.write(json.dumps(document(args.show), indent=2) + "\n")
    if args.write:
        path = args.write / "protocol.md"
        path.write_text(spliced(path.read_text(encoding="utf-8")), encoding="utf-8")
    if not args.show and not args.write:
        parser.print_usage()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
