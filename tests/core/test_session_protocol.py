"""Session wire messages: round trips, reference shapes, invalid input, hints, base64."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from lingua_scheduler.config import SessionConfig
from lingua_scheduler.core.audio import decode_base64, encode_base64, negotiate
from lingua_scheduler.errors import ErrorCode, ProtocolError
from lingua_scheduler.protocol.codec import FrameDecoder, encode
from lingua_scheduler.protocol.common import ErrorMessage, ExtraResult, FeatureFlags, ServiceTimings
from lingua_scheduler.protocol.node import PipelineConfig
from lingua_scheduler.protocol.session import (
    DEFAULT_HINT,
    ERROR_HINTS,
    AsrPartial,
    AudioChunk,
    ClientHeartbeat,
    MissingReason,
    MissingResult,
    NetworkTimings,
    ServerHeartbeat,
    SessionClose,
    SessionCloseAck,
    SessionInbound,
    SessionInit,
    SessionInitAck,
    SessionOutbound,
    TranslationResult,
    TtsPlayEnded,
    UiEvent,
    UiEventStatus,
    UiEventType,
    UtteranceMessage,
    error_ui_event,
    hint_for,
)

inbound = FrameDecoder[Any](SessionInbound, max_bytes=1 << 20)
outbound = FrameDecoder[Any](SessionOutbound, max_bytes=1 << 20)

INBOUND: list[msgspec.Struct] = [
    SessionInit(client_version="1.2", platform="web", src_lang="zh", tgt_lang="en"),
    SessionInit(
        client_version="1.2",
        platform="api-gateway",
        src_lang="auto",
        tgt_lang="en",
        dialect="yue",
        features=FeatureFlags(emotion_detection=True, speech_rate_detection=False),
        pairing_code="123456",
        tenant_id="acme",
        mode="two_way_auto",
        lang_a="zh",
        lang_b="en",
        auto_langs=["zh", "en"],
        enable_streaming_asr=True,
        partial_update_interval_ms=1000,
        trace_id="t-1",
        audio_format="opus",
        sample_rate=48000,
    ),
    AudioChunk(
        session_id="s-1", seq=0, is_final=False, payload=encode_base64(b"\x00\x01"), client_timestamp_ms=5
    ),
    AudioChunk(session_id="s-1", seq=1, is_final=True),
    UtteranceMessage(
        session_id="s-1",
        utterance_index=4,
        manual_cut=False,
        src_lang="zh",
        tgt_lang="en",
        audio=encode_base64(b"abc"),
        audio_format="pcm16",
        sample_rate=16000,
        pipeline=PipelineConfig(use_tts=False),
    ),
    ClientHeartbeat(session_id="s-1", timestamp=1_700_000_000_000),
    TtsPlayEnded(session_id="s-1", trace_id="t", group_id="g", ts_end_ms=12),
    SessionClose(session_id="s-1", reason="user"),
]

OUTBOUND: list[msgspec.Struct] = [
    SessionInitAck(
        session_id="s-1",
        trace_id="t",
        negotiated_codec="pcm16",
        negotiated_audio_format="pcm16",
        negotiated_sample_rate=16000,
    ),
    TranslationResult(
        session_id="s-1",
        utterance_index=0,
        job_id="job-1",
        text_asr="ni hao",
        text_translated="hello",
        tts_audio="",
        tts_format="pcm16",
        audio_lost=True,
        trace_id="t",
        late=False,
        extra=ExtraResult(emotion="calm"),
        service_timings=ServiceTimings(total_ms=10),
        network_timings=NetworkTimings(scheduler_to_node_ms=3),
        reason_codes=["x"],
    ),
    AsrPartial(session_id="s-1", utterance_index=0, job_id="job-1", text="ni", is_final=False, trace_id="t"),
    ServerHeartbeat(session_id="s-1", timestamp=1),
    SessionCloseAck(session_id="s-1"),
    MissingResult(session_id="s-1", utterance_index=2, reason=MissingReason.GAP_TIMEOUT, created_at_ms=9),
    UiEvent(
        trace_id="t",
        session_id="s-1",
        job_id="job-1",
        utterance_index=0,
        event=UiEventType.NODE_ACCEPTED,
        status=UiEventStatus.OK,
        elapsed_ms=5,
    ),
    ErrorMessage(code="INVALID_MESSAGE", message="bad"),
]


@pytest.mark.parametrize("msg", INBOUND, ids=lambda m: type(m).__name__)
def test_inbound_round_trip(msg: msgspec.Struct) -> None:
    assert inbound.decode(encode(msg)) == msg


@pytest.mark.parametrize("msg", OUTBOUND, ids=lambda m: type(m).__name__)
def test_outbound_round_trip(msg: msgspec.Struct) -> None:
    assert outbound.decode(encode(msg)) == msg


def test_reference_shaped_frames_decode() -> None:
    frame = {
        "type": "audio_chunk",
        "session_id": "s-1",
        "seq": 3,
        "is_final": True,
        "payload": "AAE=",
        "x": 1,
    }
    msg = inbound.decode(json.dumps(frame))
    assert isinstance(msg, AudioChunk) and msg.is_final and decode_base64(msg.payload) == b"\x00\x01"
    init = inbound.decode(
        '{"type":"session_init","client_version":"1","platform":"ios","src_lang":"zh","tgt_lang":"en"}'
    )
    assert isinstance(init, SessionInit) and init.mode is None and init.audio_format is None


def test_constant_and_boolean_fields_are_always_serialised() -> None:
    ack = json.loads(encode(OUTBOUND[0]))
    assert ack["type"] == "session_init_ack"
    assert ack["protocol_version"] == "1.0" and ack["use_binary_frame"] is False
    assert ack["negotiated_channel_count"] == 1 and ack["message"] == "session created"
    assert "assigned_node_id" in ack
    result = json.loads(
        encode(TranslationResult(**{**msgspec.structs.asdict(OUTBOUND[1]), "audio_lost": False}))
    )
    assert result["audio_lost"] is False and result["tts_format"] == "pcm16"
    partial = json.loads(encode(OUTBOUND[2]))
    assert partial["job_id"] == "job-1" and partial["is_final"] is False


def test_ack_from_negotiation() -> None:
    spec = negotiate("opus", 24000, SessionConfig())
    ack = SessionInitAck(
        session_id="s-1",
        trace_id="t",
        negotiated_codec=spec.codec,
        negotiated_audio_format=spec.audio_format,
        negotiated_sample_rate=spec.sample_rate,
        negotiated_channel_count=spec.channels,
    )
    wire = json.loads(encode(ack))
    assert (wire["negotiated_audio_format"], wire["negotiated_sample_rate"]) == ("opus", 24000)


INIT = {"type": "session_init", "client_version": "1", "platform": "web", "src_lang": "zh", "tgt_lang": "en"}
UTTERANCE = {
    "type": "utterance",
    "session_id": "s-1",
    "utterance_index": 0,
    "manual_cut": False,
    "src_lang": "zh",
    "tgt_lang": "en",
    "audio": "",
    "audio_format": "pcm16",
    "sample_rate": 16000,
}


@pytest.mark.parametrize(
    ("frame", "reason", "field"),
    [
        ({"type": "audio_chunk", "session_id": "s-1", "seq": 0}, "missing_field", "$.is_final"),
        (
            {"type": "audio_chunk", "session_id": "s-1", "seq": -1, "is_final": False},
            "invalid_value",
            "$.seq",
        ),
        (
            {"type": "audio_chunk", "session_id": "", "seq": 0, "is_final": False},
            "invalid_value",
            "$.session_id",
        ),
        ({**INIT, "src_lang": ""}, "invalid_value", "$.src_lang"),
        ({**INIT, "mode": "three_way"}, "invalid_value", "$.mode"),
        ({**INIT, "sample_rate": 0}, "invalid_value", "$.sample_rate"),
        ({k: v for k, v in UTTERANCE.items() if k != "manual_cut"}, "missing_field", "$.manual_cut"),
        ({**UTTERANCE, "sample_rate": "16000"}, "wrong_type", "$.sample_rate"),
        # a server type sent by a client
        ({"type": "translation_result", "session_id": "s-1"}, "unknown_type", "$.type"),
        ({"type": "room_create"}, "missing_field", "$.client_ts"),
        ({"type": "room_join", "room_code": "1" * 65}, "invalid_value", "$.room_code"),
        ({"type": "webrtc_ice", "room_code": "123456", "to": "s-1"}, "missing_field", "$.candidate"),
        ({"type": "room_create_ack", "room_code": "123456", "room_id": "x"}, "unknown_type", "$.type"),
        ({"type": "room_error", "code": "ROOM_FULL"}, "unknown_type", "$.type"),
        ({"type": "nope"}, "unknown_type", "$.type"),
        ({"session_id": "s-1"}, "missing_field", "$.type"),
        ([INIT], "wrong_type", "$"),
    ],
)
def test_invalid_frames_are_refused(frame: Any, reason: str, field: str) -> None:
    with pytest.raises(ProtocolError) as exc:
        inbound.decode(json.dumps(frame))
    assert exc.value.code is ErrorCode.INVALID_MESSAGE
    assert (exc.value.reason, exc.value.field) == (reason, field)
    assert exc.value.details == {"reason": reason, "field": field}
    assert field in exc.value.message


def test_malformed_json_and_oversized_frames() -> None:
    with pytest.raises(ProtocolError) as exc:
        inbound.decode("{not json")
    assert (exc.value.reason, exc.value.field) == ("malformed_json", "$")
    small = FrameDecoder[Any](SessionInbound, max_bytes=10)
    with pytest.raises(ProtocolError) as exc:
        small.decode(encode(INBOUND[0]))
    assert exc.value.code is ErrorCode.MESSAGE_TOO_LARGE and exc.value.reason == "too_large"


def test_missing_result_reason_is_validated() -> None:
    frame = (
        b'{"type":"missing_result","session_id":"s","utterance_index":0,"reason":"pending_overflow_evict",'
    )
    with pytest.raises(ProtocolError) as exc:
        outbound.decode(frame + b'"created_at_ms":1}')
    assert (exc.value.reason, exc.value.field) == ("invalid_value", "$.reason")


# --- hints ----------------------------------------------------------------------------------------


def test_every_error_code_has_a_hint() -> None:
    for code in ErrorCode:
        assert hint_for(code)
    assert hint_for("NO_AVAILABLE_NODE") == "No node is available right now, please try later."
    assert hint_for("JOB_TIMEOUT") == ERROR_HINTS[ErrorCode.JOB_TIMEOUT]
    assert hint_for("SOMETHING_FROM_A_NODE") == DEFAULT_HINT
    assert len(ERROR_HINTS) >= 12  # the reference's twelve, plus ours (e.g. SCHEDULER_SHUTTING_DOWN)


def test_error_ui_event_carries_code_and_hint() -> None:
    ev = error_ui_event("NODE_UNAVAILABLE", trace_id="t", session_id="s", job_id="j", utterance_index=3)
    wire = json.loads(encode(ev))
    assert wire["event"] == "ERROR" and wire["status"] == "error"
    assert wire["error_code"] == "NODE_UNAVAILABLE" and wire["hint"] == DEFAULT_HINT


# --- base64 ---------------------------------------------------------------------------------------


def test_base64_round_trip_and_empty() -> None:
    assert decode_base64(encode_base64(b"\x00\xff" * 100)) == b"\x00\xff" * 100
    assert decode_base64(None) == b"" and decode_base64("") == b""


@pytest.mark.parametrize("bad", ["AAE", "A@==", "AAE=\n", "####", "AAE=AAE"])
def test_invalid_base64_is_an_error_not_empty_audio(bad: str) -> None:
    with pytest.raises(ProtocolError) as exc:
        decode_base64(bad)
    assert exc.value.code is ErrorCode.INVALID_MESSAGE and exc.value.reason == "invalid_base64"
    assert bad.strip() not in exc.value.message  # the payload is never echoed
