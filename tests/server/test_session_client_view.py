"""What the real web client sees, through real WebSockets: its audio format (undeclared Opus), the TTS
playback messages and guard, utterance groups, ``audio_lost``, its own utterance numbers, binary audio
frames in its layout, and resuming a dropped session.

(Backpressure instead of ``RATE_LIMITED`` popups:
``test_limits.py::test_session_flood_is_dropped_then_closed``.)
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from lingua_scheduler.core.opus import frame
from lingua_scheduler.node import Job, Partial, Result
from lingua_scheduler.sim.nodes import Executor, SimulatedNode
from lingua_scheduler.sim.profiles import NodeProfile
from lingua_scheduler.sim.sessions import SimulatedSession, opus_audio, opus_chunk, pcm_chunk
from tests.conftest import MS, RunningScheduler, eventually

FAST = {
    "jobs": {"ack_timeout_ms": 400, "pending_timeout_ms": 1500, "retention_seconds": 0.2},
    "session": {"pause_ms": 300, "result_gap_timeout_ms": 3000},
    "scheduler": {"fleet_view_interval_ms": 10},
}


class SpeechlessNode(SimulatedNode):
    """Answers with text but without synthesized speech (its TTS failed)."""

    async def handle(self, job: Job) -> AsyncIterator[Partial | Result]:
        async for out in super().handle(job):
            yield dataclasses.replace(out, tts_audio=b"") if isinstance(out, Result) else out


def is_ready(rs: RunningScheduler, node: SimulatedNode) -> bool:
    nv = rs.state.publisher.view.nodes.get(node.node_id or "")
    return nv is not None and nv.status == "ready"


async def ready(rs: RunningScheduler, *nodes: SimulatedNode) -> None:
    for n in nodes:
        assert (await n.start())["type"] == "node_register_ack"
    await eventually(lambda: all(is_ready(rs, n) for n in nodes))


def assigns(n: SimulatedNode) -> list[dict[str, Any]]:
    return [m for m in n.received if m.get("type") == "job_assign"]


def errors(s: SimulatedSession) -> list[dict[str, Any]]:
    return s.of_type("error")


@pytest.fixture
async def rs(scheduler_factory: Any) -> RunningScheduler:
    out: RunningScheduler = await scheduler_factory(**FAST)
    return out


# --- audio format ----------------------------------------------------------------------------------


async def test_undeclared_client_streaming_opus_gets_opus_jobs(
    rs: RunningScheduler, node_factory: Any, session_factory: Any
) -> None:
    """The web client declares no format and streams length-framed Opus: the node is told "opus"."""
    node = node_factory(url=rs.node_url, executor=Executor(latency=0.01))
    await ready(rs, node)
    s = session_factory(url=rs.session_url)  # audio_format None in session_init, Opus chunks
    ack = await s.start()
    assert ack["negotiated_audio_format"] == "opus"
    await s.speak(chunks=3)
    await eventually(lambda: len(s.of_type("translation_result")) == 1)
    [job] = assigns(node)
    assert job["audio_format"] == "opus"
    assert base64.b64decode(job["audio"]) == opus_audio(100) * 3  # the client's bytes, unchanged
    assert errors(s) == []


async def test_undeclared_pcm16_is_refused_and_the_session_goes_on(
    rs: RunningScheduler, node_factory: Any, session_factory: Any
) -> None:
    node = node_factory(url=rs.node_url, executor=Executor(latency=0.01))
    await ready(rs, node)
    s = session_factory(url=rs.session_url)
    await s.start()
    refused = s.wait_for(lambda m: m.get("type") == "error")
    await s.chunk(pcm_chunk())  # raw pcm16 bytes, never declared
    err = await refused
    assert err["code"] == "INVALID_MESSAGE"
    assert err["details"]["reason"] == "audio_format" and err["details"]["field"] == "$.payload"
    assert err["details"]["expected"]
    # nothing changed: the session takes Opus and answers it
    await s.speak(chunks=2)
    await eventually(lambda: len(s.of_type("translation_result")) == 1)
    assert [j["audio_format"] for j in assigns(node)] == ["opus"]
    assert base64.b64decode(assigns(node)[0]["audio"]) == opus_audio(100) * 2  # no pcm16 bytes in it


async def test_declared_pcm16_is_streamed_as_pcm16(
    rs: RunningScheduler, node_factory: Any, session_factory: Any
) -> None:
    node = node_factory(url=rs.node_url, executor=Executor(latency=0.01))
    await ready(rs, node)
    s = session_factory(url=rs.session_url, audio_format="pcm16")
    ack = await s.start()
    assert ack["negotiated_audio_format"] == "pcm16"
    await s.speak(chunks=2)
    await eventually(lambda: len(s.of_type("translation_result")) == 1)
    assert [j["audio_format"] for j in assigns(node)] == ["pcm16"]
    assert errors(s) == []


# --- TTS playback ----------------------------------------------------------------------------------


async def test_tts_messages_are_accepted_and_no_pause_cut_happens_during_playback(
    rs: RunningScheduler, node_factory: Any, session_factory: Any
) -> None:
    """``pause_ms`` is 300: audio followed by silence while the client plays speech is not cut; once
    ``tts_play_ended`` arrives the pause counts from there."""
    node = node_factory(url=rs.node_url, executor=Executor(latency=0.01))
    await ready(rs, node)
    s = session_factory(url=rs.session_url)
    await s.start()
    base = {"session_id": s.session_id, "trace_id": "t-1", "group_id": "group_x"}
    await s.send({"type": "tts_started", **base, "ts_start_ms": int(time.time() * 1000)})
    await s.chunk(opus_chunk(100))
    await asyncio.sleep(900 * MS)  # three pause lengths of silence: no cut while playing
    assert assigns(node) == []
    ended = time.monotonic()
    await s.send({"type": "tts_play_ended", **base, "ts_end_ms": int(time.time() * 1000)})
    await eventually(lambda: len(assigns(node)) == 1, timeout=3)
    assert time.monotonic() - ended >= 0.25  # the pause counted from the end of the playback
    await eventually(lambda: len(s.of_type("translation_result")) == 1)
    assert errors(s) == []


# --- results as the client sees them ---------------------------------------------------------------


async def test_results_carry_a_group_and_its_parts(
    rs: RunningScheduler, node_factory: Any, session_factory: Any
) -> None:
    node = node_factory(url=rs.node_url, executor=Executor(latency=0.01, partials=0))
    await ready(rs, node)
    s = session_factory(url=rs.session_url)
    await s.start()
    for _ in range(2):
        await s.utterance()
    await eventually(lambda: len(s.of_type("translation_result")) == 2)
    first, second = s.of_type("translation_result")
    assert first["group_id"].startswith(f"group_{s.session_id}_")
    assert (second["group_id"], first["part_index"], second["part_index"]) == (first["group_id"], 0, 1)
    # the client reports the playback's end; a result well after the window starts a new group
    await s.send(
        {"type": "tts_play_ended", "session_id": s.session_id, "trace_id": "t", "group_id": first["group_id"]}
    )
    await asyncio.sleep(2.2)
    await s.utterance()
    await eventually(lambda: len(s.of_type("translation_result")) == 3)
    third = s.of_type("translation_result")[2]
    assert third["group_id"] != first["group_id"] and third["part_index"] == 0


async def test_audio_lost_when_speech_was_asked_and_missing(
    rs: RunningScheduler, session_factory: Any
) -> None:
    s = session_factory(url=rs.session_url)
    profile = NodeProfile(asr_languages=["en", "zh"], tts_languages=["en", "zh"], nmt_languages=["en", "zh"])
    node = SpeechlessNode(s.http, rs.node_url, profile, executor=Executor(latency=0.01, partials=0))
    await ready(rs, node)
    await s.start()
    try:
        await s.utterance()  # the default pipeline asks for TTS
        no_tts = {**utterance_msg(s, 1), "pipeline": {"use_asr": True, "use_nmt": True, "use_tts": False}}
        await s.send(no_tts)
        s.utterances_sent += 1
        await eventually(lambda: len(s.of_type("translation_result")) == 2)
        asked, not_asked = s.of_type("translation_result")
        assert asked["utterance_index"] == 0 and asked["audio_lost"] is True
        assert not_asked["utterance_index"] == 1 and not not_asked.get("audio_lost")
    finally:
        await node.close()


def utterance_msg(s: SimulatedSession, index: int, audio: str | None = None) -> dict[str, Any]:
    return {
        "type": "utterance",
        "session_id": s.session_id,
        "utterance_index": index,
        "manual_cut": True,
        "src_lang": s.src_lang,
        "tgt_lang": s.tgt_lang,
        "audio": audio if audio is not None else base64.b64encode(opus_audio(200)).decode(),
        "audio_format": "opus",
        "sample_rate": 16000,
    }


async def test_results_carry_the_clients_utterance_index_also_after_a_refused_one(
    rs: RunningScheduler, node_factory: Any, session_factory: Any
) -> None:
    node = node_factory(url=rs.node_url, executor=Executor(latency=0.01, partials=0))
    await ready(rs, node)
    s = session_factory(url=rs.session_url)
    await s.start()
    await s.send(utterance_msg(s, 5))
    await eventually(lambda: len(s.of_type("translation_result")) == 1)
    refused = s.wait_for(lambda m: m.get("type") == "error")
    await s.send(utterance_msg(s, 6, audio="not base64!"))
    err = await refused
    assert err["code"] == "INVALID_MESSAGE" and err["details"]["field"] == "$.audio"
    await s.send(utterance_msg(s, 7))
    await eventually(lambda: len(s.of_type("translation_result")) == 2)
    assert [r["utterance_index"] for r in s.of_type("translation_result")] == [5, 7]
    assert [j["utterance_index"] for j in assigns(node)] == [0, 1]  # contiguous towards nodes
    assert s.of_type("missing_result") == []


# --- binary audio frames, built the way the web client's binary_protocol.ts builds them --------------


def client_audio_frame(session_id: str, seq: int, is_final: bool, audio: bytes) -> bytes:
    """The client's audio-chunk frame: type 0x01, id length, seq u32 LE, Date.now() as u32 LE,
    is_final, reserved 0, then the id and the audio."""
    sid = session_id.encode()
    now = int(time.time() * 1000) % 2**32  # DataView.setUint32 keeps the low 32 bits
    return bytes([0x01, len(sid)]) + struct.pack("<II", seq, now) + bytes([int(is_final), 0]) + sid + audio


def client_final_frame(session_id: str, seq: int) -> bytes:
    """The client's final frame: type 0x02, id length, seq, timestamp, then the id (no flags)."""
    sid = session_id.encode()
    return bytes([0x02, len(sid)]) + struct.pack("<II", seq, int(time.time() * 1000) % 2**32) + sid


async def test_binary_frames_of_the_client_layout(
    rs: RunningScheduler, node_factory: Any, session_factory: Any
) -> None:
    node = node_factory(url=rs.node_url, executor=Executor(latency=0.01, partials=0))
    await ready(rs, node)
    s = session_factory(url=rs.session_url)
    await s.connect()
    ack = await s.init(use_binary_frame=True)
    assert ack["use_binary_frame"] is True
    assert s.ws is not None and s.session_id is not None
    await s.ws.send_bytes(client_audio_frame(s.session_id, 0, False, opus_audio(100)))
    await s.ws.send_bytes(client_audio_frame(s.session_id, 1, False, opus_audio(100)))
    await s.ws.send_bytes(client_final_frame(s.session_id, 2))  # the send button
    await eventually(lambda: len(s.of_type("translation_result")) == 1)
    [job] = assigns(node)
    assert job["audio_format"] == "opus" and base64.b64decode(job["audio"]) == opus_audio(100) * 2
    assert errors(s) == []
    # a session that did not negotiate them gets a clear refusal, and goes on
    other = session_factory(url=rs.session_url)
    await other.start()
    assert other.ws is not None and other.session_id is not None
    refused = other.wait_for(lambda m: m.get("type") == "error")
    await other.ws.send_bytes(client_audio_frame(other.session_id, 0, True, opus_audio(100)))
    err = await refused
    assert err["code"] == "INVALID_MESSAGE" and err["details"] == {"reason": "invalid_value", "field": "$"}
    await other.speak(chunks=2)
    await eventually(lambda: len(other.of_type("translation_result")) == 1)


async def test_a_max_size_frame_of_tiny_opus_packets_is_refused_without_blocking_the_loop(
    rs: RunningScheduler, node_factory: Any, session_factory: Any
) -> None:
    """One binary frame as large as a frame may be, made of 3-byte Opus packets (about 200 000 of
    them): refused for its packet count, having parsed no more than the limit, while another
    connection's heartbeat is answered; the session goes on."""
    node = node_factory(url=rs.node_url, executor=Executor(latency=0.01, partials=0))
    await ready(rs, node)
    s = session_factory(url=rs.session_url)
    await s.connect()
    await s.init(use_binary_frame=True)
    other = session_factory(url=rs.session_url)
    await other.start()
    assert s.ws is not None and s.session_id is not None and other.ws is not None
    header = len(client_audio_frame(s.session_id, 0, False, b""))
    packets = (rs.state.config.server.max_frame_bytes - header) // 5
    assert packets > 2 * rs.state.config.session.max_chunk_packets
    big = client_audio_frame(s.session_id, 0, False, frame([b"\x18\x00\x00"] * packets))
    assert len(big) <= rs.state.config.server.max_frame_bytes
    refused = s.wait_for(lambda m: m.get("type") == "error")
    hb = other.wait_for(lambda m: m.get("type") == "server_heartbeat")
    await s.ws.send_bytes(big)
    await other.send({"type": "client_heartbeat", "session_id": other.session_id, "timestamp": 1})
    err = await asyncio.wait_for(refused, 2000 * MS)
    assert err["code"] == "INVALID_MESSAGE"
    assert err["details"] == {"reason": "too_large", "field": "$.payload"}
    assert (await asyncio.wait_for(hb, 2000 * MS))["session_id"] == other.session_id
    assert assigns(node) == []  # nothing of it was segmented
    await s.ws.send_bytes(client_audio_frame(s.session_id, 1, True, opus_audio(100)))
    await eventually(lambda: len(s.of_type("translation_result")) == 1)
    assert len(errors(s)) == 1


# --- resume ----------------------------------------------------------------------------------------


async def test_resume_within_the_window_keeps_session_results_and_numbering(
    scheduler_factory: Any, node_factory: Any, session_factory: Any
) -> None:
    """The client drops its socket while its utterance is being worked on and reconnects with its
    token: the same session, the pending result delivered, the next utterance numbered after it."""
    rs: RunningScheduler = await scheduler_factory(
        **{**FAST, "session": {**FAST["session"], "resume_window_ms": 5000}}
    )
    node = node_factory(url=rs.node_url, executor=Executor(latency=0.6, partials=0))
    await ready(rs, node)
    s = session_factory(url=rs.session_url)
    ack = await s.start()
    token = ack["resume_token"]
    assert token and ack["resumed"] is False
    await s.utterance()
    await eventually(lambda: len(assigns(node)) == 1)
    await s.disconnect()  # mid-utterance: the job is running
    again = session_factory(url=rs.session_url)
    await again.connect()
    resumed = await again.init(resume_token=token)
    assert resumed["session_id"] == ack["session_id"] and resumed["resumed"] is True
    await eventually(lambda: len(again.of_type("translation_result")) == 1)
    assert again.of_type("translation_result")[0]["utterance_index"] == 0
    again.utterances_sent = 1
    await again.speak(chunks=2)
    await eventually(lambda: len(again.of_type("translation_result")) == 2)
    assert [r["utterance_index"] for r in again.of_type("translation_result")] == [0, 1]
    assert errors(again) == [] and again.of_type("missing_result") == []


async def test_expired_or_unknown_token_opens_a_new_session(
    scheduler_factory: Any, node_factory: Any, session_factory: Any
) -> None:
    rs: RunningScheduler = await scheduler_factory(
        **{**FAST, "session": {**FAST["session"], "resume_window_ms": 300}}
    )
    s = session_factory(url=rs.session_url)
    ack = await s.start()
    await s.disconnect()
    await eventually(lambda: ack["session_id"] not in rs.state.sessions, timeout=3)  # the window ended
    late = session_factory(url=rs.session_url)
    await late.connect()
    fresh = await late.init(resume_token=ack["resume_token"])
    assert fresh["type"] == "session_init_ack" and fresh["resumed"] is False
    assert fresh["session_id"] != ack["session_id"]
    stranger = session_factory(url=rs.session_url)
    await stranger.connect()
    other = await stranger.init(resume_token=f"{fresh['session_id']}.not-its-secret")
    assert other["resumed"] is False and other["session_id"] not in (fresh["session_id"], ack["session_id"])
    assert fresh["session_id"] in rs.state.sessions  # a wrong secret takes nothing over
