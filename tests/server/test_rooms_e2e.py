"""Rooms end to end through ``/ws/session``: membership, the translation fan-out, expiry and the WebRTC
signalling relay, with simulated clients and nodes on real sockets against one scheduler."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lingua_scheduler.sim.nodes import Behavior, Executor
from lingua_scheduler.sim.profiles import NodeProfile
from tests.conftest import RunningScheduler, eventually

LANGS = ["en", "zh", "ja", "de"]
FAST = {
    "jobs": {"ack_timeout_ms": 400, "pending_timeout_ms": 600, "retention_seconds": 0.2},
    "session": {"pause_ms": 300, "result_gap_timeout_ms": 3000},
    "scheduler": {"fleet_view_interval_ms": 10},
}


@pytest.fixture
async def sched(scheduler_factory: Any) -> RunningScheduler:
    rs: RunningScheduler = await scheduler_factory(
        **FAST, rooms={"max_members": 3, "relay_messages_per_second": 5, "relay_burst": 4}
    )
    return rs


def profile() -> NodeProfile:
    return NodeProfile(asr_languages=LANGS, tts_languages=LANGS, nmt_languages=LANGS)


async def start_nodes(
    rs: RunningScheduler, node_factory: Any, n: int, executor: Executor | None = None
) -> list[Any]:
    nodes = [
        node_factory(profile(), url=rs.node_url, executor=executor or Executor(latency=0.01))
        for _ in range(n)
    ]
    for node in nodes:
        await node.start()
    await eventually(
        lambda: sum(1 for v in rs.state.publisher.view.nodes.values() if v.status == "ready") >= n
    )
    return nodes


async def member(session_factory: Any, rs: RunningScheduler, src: str, tgt: str) -> Any:
    s = session_factory(url=rs.session_url, src_lang=src, tgt_lang=tgt)
    ack = await s.start()
    assert ack["type"] == "session_init_ack"
    return s


async def ask(s: Any, msg: dict[str, Any], *types: str) -> dict[str, Any]:
    """Send ``msg`` and return the first answer of one of ``types``."""
    waiter = s.wait_for(lambda m: m.get("type") in types)
    await s.send(msg)
    answer: dict[str, Any] = await waiter
    return answer


async def create(s: Any, lang: str | None = None, name: str | None = None) -> str:
    ack = await ask(
        s,
        {"type": "room_create", "client_ts": 1, "preferred_lang": lang, "display_name": name},
        "room_create_ack",
        "room_error",
    )
    assert ack["type"] == "room_create_ack", ack
    return str(ack["room_code"])


async def join(s: Any, code: str, lang: str | None = None) -> dict[str, Any]:
    return await ask(
        s, {"type": "room_join", "room_code": code, "preferred_lang": lang}, "room_members", "room_error"
    )


def heard(s: Any, speaker: Any) -> list[dict[str, Any]]:
    return [m for m in s.of_type("translation_result") if m.get("speaker_session_id") == speaker.session_id]


def own(s: Any) -> list[dict[str, Any]]:
    return [m for m in s.of_type("translation_result") if m.get("speaker_session_id") is None]


def last_members(s: Any) -> list[str]:
    return [m["session_id"] for m in s.of_type("room_members")[-1]["members"]]


async def test_three_languages_each_hears_the_others_in_its_own_in_order(
    sched: RunningScheduler, node_factory: Any, session_factory: Any
) -> None:
    nodes = await start_nodes(sched, node_factory, 2)
    a = await member(session_factory, sched, "zh", "en")
    b = await member(session_factory, sched, "en", "ja")
    c = await member(session_factory, sched, "ja", "zh")
    code = await create(a, "zh", "Ann")
    assert (await join(b, code, "en"))["type"] == "room_members"
    assert (await join(c, code, "ja"))["type"] == "room_members"
    await eventually(
        lambda: all(len(s.of_type("room_members")) and len(last_members(s)) == 3 for s in (a, b, c))
    )
    assert last_members(a) == [a.session_id, b.session_id, c.session_id]
    for s in (a, b, c):
        for _ in range(3):
            await s.speak(chunks=2)
    lang = {a: "zh", b: "en", c: "ja"}
    sessions = (a, b, c)
    await eventually(
        lambda: (
            all(len(heard(x, y)) == 3 for x in sessions for y in sessions if x is not y)
            and all(len(own(x)) == 3 for x in sessions)
        ),
        timeout=10,
    )
    for listener in sessions:
        for speaker in sessions:
            if listener is speaker:
                continue
            got = heard(listener, speaker)
            # in the listener's language, the speaker's utterances in order, attributed to the speaker
            assert [r["utterance_index"] for r in got] == [0, 1, 2]
            assert [r["text_translated"] for r in got] == [f"{lang[listener]} {i}" for i in range(3)]
            assert all(r["room_code"] == code for r in got)
        # the speaker's own result: once per utterance, in its session's target language
        mine = own(listener)
        assert [r["utterance_index"] for r in mine] == [0, 1, 2]
        assert all(r["text_asr"] for r in mine)
    # one job per other language per utterance: 9 utterances x 2 target languages
    assigns = [m for n in nodes for m in n.received if m["type"] == "job_assign"]
    assert len(assigns) == 18
    assert await sched.metric("lingua_fanout_jobs_total") == 18
    # one fan-out overhead sample per utterance: its arrival to its last job_assign written
    assert sched.state.rooms.relay.fanout_window.count == 9
    stats = await sched.get_json("/api/v1/stats")
    assert (
        stats["latency"]["room_fanout_seconds"]["p99"] >= stats["latency"]["room_fanout_seconds"]["p50"] > 0
    )
    assert await sched.metric("lingua_rooms") == 1
    assert await sched.metric("lingua_room_members") == 3


async def test_same_language_listener_gets_the_transcript_and_no_job_is_made_for_it(
    sched: RunningScheduler, node_factory: Any, session_factory: Any
) -> None:
    [node] = await start_nodes(sched, node_factory, 1)
    a = await member(session_factory, sched, "zh", "en")
    b = await member(session_factory, sched, "zh", "en")
    code = await create(a, "zh")
    await join(b, code, "zh")
    await a.speak(chunks=2)
    await eventually(lambda: len(heard(b, a)) == 1 and len(own(a)) == 1)
    [r] = heard(b, a)
    assert r["text_translated"] == r["text_asr"] and r["tts_audio"] == ""
    # nobody else needs a translation: the one job is the speaker's own target
    [assign] = [m for m in node.received if m["type"] == "job_assign"]
    assert assign["tgt_lang"] == "en"
    assert own(a)[0]["text_translated"] == "en 0"


async def test_speaker_whose_target_nobody_asks_for_gets_its_transcript_once(
    sched: RunningScheduler, node_factory: Any, session_factory: Any
) -> None:
    [node] = await start_nodes(sched, node_factory, 1)
    a = await member(session_factory, sched, "zh", "en")  # its own target: en
    b = await member(session_factory, sched, "en", "ja")
    code = await create(a, "zh")
    await join(b, code, "ja")  # nobody asks for en
    await a.speak(chunks=2)
    await eventually(lambda: len(heard(b, a)) == 1 and len(own(a)) == 1)
    assert [m["tgt_lang"] for m in node.received if m["type"] == "job_assign"] == ["ja"]
    [mine] = own(a)
    assert mine["text_asr"] == "asr 0" and mine["text_translated"] == "" and mine["tts_audio"] == ""
    assert heard(b, a)[0]["text_translated"] == "ja 0"
    # the speaker's progress is that one job's, once
    assert [e["event"] for e in a.of_type("ui_event")].count("ASR_FINAL") == 1


async def test_alone_in_a_room_its_own_target(
    sched: RunningScheduler, node_factory: Any, session_factory: Any
) -> None:
    await start_nodes(sched, node_factory, 1)
    a = await member(session_factory, sched, "zh", "en")
    await create(a)
    assert a.of_type("room_members")[-1]["members"][0]["preferred_lang"] == "en"  # its tgt_lang
    await a.speak(chunks=2)
    await eventually(lambda: len(own(a)) == 1)
    assert own(a)[0]["text_translated"] == "en 0"


async def test_leaving_and_disconnecting_mid_utterance(
    sched: RunningScheduler, node_factory: Any, session_factory: Any
) -> None:
    await start_nodes(sched, node_factory, 1, Executor(latency=0.4))
    a = await member(session_factory, sched, "zh", "en")
    b = await member(session_factory, sched, "en", "ja")
    c = await member(session_factory, sched, "ja", "de")
    code = await create(a, "zh")
    await join(b, code, "en")
    await join(c, code, "de")
    await eventually(lambda: len(last_members(a)) == 3)
    await a.speak(chunks=2)
    # the jobs are running: b leaves, c's connection drops
    await eventually(lambda: sched.state.engine.live_jobs_of(a.session_id) == 2)
    told = len(a.of_type("room_members"))
    await b.send({"type": "room_leave", "room_code": code})
    await eventually(lambda: len(a.of_type("room_members")) == told + 1)
    assert last_members(a) == [a.session_id, c.session_id]
    await c.disconnect()
    await eventually(lambda: last_members(a) == [a.session_id])  # told, no ghost
    await eventually(lambda: len(own(a)) == 1, timeout=5)
    await asyncio.sleep(0.3)
    assert heard(b, a) == []  # left before the result: not a recipient any more
    assert sched.state.rooms.rooms.room_of(c.session_id) is None
    # b is in no room now: a relay from it is refused
    refused = await ask(
        b, {"type": "webrtc_offer", "room_code": code, "to": a.session_id, "sdp": {"sdp": "x"}}, "room_error"
    )
    assert refused["code"] == "NOT_IN_ROOM"


async def test_failed_job_missing_result_reaches_exactly_its_recipients(
    sched: RunningScheduler, node_factory: Any, session_factory: Any
) -> None:
    await start_nodes(sched, node_factory, 1, Executor(latency=0.01, behavior=Behavior.MODEL_NOT_AVAILABLE))
    a = await member(session_factory, sched, "zh", "en")
    b = await member(session_factory, sched, "en", "ja")
    code = await create(a, "zh")
    await join(b, code, "en")
    await a.speak(chunks=2)
    await eventually(
        lambda: len(a.of_type("missing_result")) == 1 and len(b.of_type("missing_result")) == 1, 8
    )
    [mb] = b.of_type("missing_result")
    assert mb["speaker_session_id"] == a.session_id and mb["utterance_index"] == 0
    assert b.of_type("error") == []  # a listener gets no popup for another member's job


async def test_expiry(scheduler_factory: Any, session_factory: Any) -> None:
    rs = await scheduler_factory(**FAST, rooms={"expire_after_seconds": 0.3})
    a = await member(session_factory, rs, "zh", "en")
    b = await member(session_factory, rs, "en", "zh")
    code = await create(a)
    await join(b, code)
    await eventually(lambda: bool(a.of_type("room_expired")) and bool(b.of_type("room_expired")), timeout=3)
    assert a.of_type("room_expired")[0]["room_code"] == code
    assert len(rs.state.rooms.rooms) == 0
    again = await join(b, code)
    assert again["type"] == "room_error" and again["code"] == "ROOM_NOT_FOUND"


async def test_membership_refusals(sched: RunningScheduler, session_factory: Any) -> None:
    s = [await member(session_factory, sched, "zh", "en") for _ in range(4)]
    code = await create(s[0])
    for x in s[1:3]:
        assert (await join(x, code))["type"] == "room_members"
    full = await join(s[3], code)
    assert full["type"] == "room_error" and full["code"] == "ROOM_FULL"
    second = await ask(s[1], {"type": "room_create", "client_ts": 1}, "room_create_ack", "room_error")
    assert second["type"] == "room_error" and second["code"] == "ALREADY_IN_ROOM"
    bad = await join(s[3], "12ab56")
    assert bad["code"] == "INVALID_ROOM_CODE"
    missing = await join(s[3], "000000" if code != "000000" else "000001")
    assert missing["code"] == "ROOM_NOT_FOUND"
    # a room request before any session: refused as every session message is
    lone = session_factory(url=sched.session_url)
    await lone.connect()
    answer = await ask(lone, {"type": "room_create", "client_ts": 1}, "error", "room_create_ack")
    assert answer["type"] == "error" and answer["code"] == "INVALID_SESSION"


async def test_signalling_relay_rules(sched: RunningScheduler, session_factory: Any) -> None:
    a = await member(session_factory, sched, "zh", "en")
    b = await member(session_factory, sched, "en", "zh")
    outsider = await member(session_factory, sched, "en", "zh")
    code = await create(a)
    await join(b, code)
    offer = {
        "type": "webrtc_offer",
        "room_code": code,
        "to": b.session_id,
        "sdp": {"type": "offer", "sdp": "v=0"},
    }
    got = b.wait_for(lambda m: m.get("type") == "webrtc_offer")
    await a.send(offer)
    relayed = await got
    # `to` names the sender; the description is relayed unchanged
    assert relayed == {"type": "webrtc_offer", "room_code": code, "to": a.session_id, "sdp": offer["sdp"]}
    got = a.wait_for(lambda m: m.get("type") == "webrtc_ice")
    cand = {"candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host", "sdpMid": "0", "sdpMLineIndex": 0}
    await b.send({"type": "webrtc_ice", "room_code": code, "to": a.session_id, "candidate": cand})
    assert (await got)["candidate"] == cand
    # to a non-member, from a non-member
    err = await ask(a, {**offer, "to": outsider.session_id}, "room_error")
    assert err["code"] == "PEER_NOT_IN_ROOM"
    err = await ask(outsider, offer, "room_error")
    assert err["code"] == "NOT_IN_ROOM"
    assert outsider.of_type("webrtc_offer") == []
    # b declines a's voice: a's offers are refused, b's to a still go
    pref = await ask(
        b,
        {
            "type": "room_raw_voice_preference",
            "room_code": code,
            "target_session_id": a.session_id,
            "receive_raw_voice": False,
        },
        "room_members",
    )
    assert [m["raw_voice_preferences"] for m in pref["members"] if m["session_id"] == b.session_id] == [
        {a.session_id: False}
    ]
    err = await ask(a, offer, "room_error")
    assert err["code"] == "RAW_VOICE_DECLINED"
    # size bound
    big = {**offer, "sdp": {"sdp": "x" * 20_000}}
    err = await ask(b, {**big, "to": a.session_id}, "room_error")
    assert err["code"] == "MESSAGE_TOO_LARGE"
    # rate: a burst of 4 (b spent 2 of it above), then refused
    limited = b.wait_for(lambda m: m.get("type") == "room_error" and m["code"] == "RATE_LIMITED")
    before = len(a.of_type("webrtc_offer"))
    for _ in range(8):
        await b.send({**offer, "to": a.session_id})
    await limited
    await asyncio.sleep(0.1)
    assert 1 <= len(a.of_type("webrtc_offer")) - before <= 3
    assert await sched.metric("lingua_webrtc_relayed_total", '{outcome="delivered"}') >= 2


async def test_operator_view_counts_rooms_and_nothing_said(
    sched: RunningScheduler, node_factory: Any, session_factory: Any
) -> None:
    await start_nodes(sched, node_factory, 1)
    a = await member(session_factory, sched, "zh", "en")
    b = await member(session_factory, sched, "en", "zh")
    c = await member(session_factory, sched, "en", "zh")
    code = await create(a, "zh", "Ann")
    await join(b, code, "en")
    await create(c)
    await a.speak(chunks=2)
    await eventually(lambda: len(heard(b, a)) == 1)
    body = await sched.get_json("/api/v1/rooms")
    assert (body["rooms"], body["members"], body["by_size"]) == (2, 3, {"2": 1, "1": 1})
    assert body["max_members"] == 3 and body["fanout_jobs_total"] == 1
    assert body["age_seconds"]["max"] >= body["age_seconds"]["p50"] >= 0
    text = str(body)
    assert code not in text and "Ann" not in text and a.session_id not in text
    stats = await sched.get_json("/api/v1/stats")
    assert (stats["rooms"]["rooms"], stats["rooms"]["members"]) == (2, 3)


async def test_tenant_job_rate_counts_every_fanout_job(
    scheduler_factory: Any, node_factory: Any, session_factory: Any
) -> None:
    from tests.server.test_auth import KEY_A, KEY_B, tenants

    cfg = tenants(max_jobs_per_second=0.01, jobs_burst=3)
    rs = await scheduler_factory(**cfg, **{k: v for k, v in FAST.items() if k != "scheduler"})
    [node] = await start_nodes(rs, node_factory, 1)
    a = session_factory(url=rs.session_url, api_key=KEY_A, src_lang="zh", tgt_lang="en")
    b = session_factory(url=rs.session_url, api_key=KEY_B, src_lang="en", tgt_lang="ja")
    c = session_factory(url=rs.session_url, api_key=KEY_B, src_lang="ja", tgt_lang="de")
    for s in (a, b, c):
        await s.start()
    code = await create(a, "zh")
    await join(b, code, "en")
    await join(c, code, "ja")
    for _ in range(2):
        await a.utterance()
    # utterance 0 takes 2 of the 3 jobs of the burst (en and ja); utterance 1 would need 2 more
    await eventually(lambda: len(a.outcomes()) == 2 and len(heard(b, a)) == 1 and len(heard(c, a)) == 1)
    assert a.outcomes() == {0: ["result"], 1: ["missing:job_failed"]}
    assert [m["code"] for m in a.of_type("error")] == ["TENANT_RATE_LIMITED"]
    assert sorted(m["tgt_lang"] for m in node.received if m["type"] == "job_assign") == ["en", "ja"]
