"""Nodes that behave like the published node clients: no job_ack, slow first jobs, open service types,
their own language pairs, the turn dialect of job_assign; and the session-level routing built for them
(affinity, two-way placement, streaming ASR). Through real WebSockets."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest
import pytest_asyncio

from lingua_scheduler.core import opus
from lingua_scheduler.core.engine import trigger_flags
from lingua_scheduler.core.segmentation import CutReason
from lingua_scheduler.node.jobs import Result, result_message
from lingua_scheduler.protocol.node import JobAssign
from lingua_scheduler.sim.nodes import Behavior, Executor, SimulatedNode
from lingua_scheduler.sim.profiles import NodeProfile
from lingua_scheduler.sim.sessions import SimulatedSession, opus_audio
from tests.conftest import MS, RunningScheduler, eventually


def real_like(**kw: Any) -> NodeProfile:
    """A node as the published clients are: no acks."""
    langs = kw.pop("langs", ["en", "zh"])
    return NodeProfile(asr_languages=langs, tts_languages=langs, nmt_languages=langs, sends_acks=False, **kw)


@pytest_asyncio.fixture
async def cleanup() -> AsyncIterator[list[Any]]:
    peers: list[Any] = []
    yield peers
    for p in peers:
        await (p.disconnect() if isinstance(p, SimulatedSession) else p.close())


async def start(
    scheduler_factory: Any,
    *,
    jobs: dict[str, Any] | None = None,
    scheduler: dict[str, Any] | None = None,
    **sections: Any,
) -> RunningScheduler:
    rs: RunningScheduler = await scheduler_factory(
        scheduler={"fleet_view_interval_ms": 10, **(scheduler or {})},
        jobs={"ack_timeout_ms": 100, **(jobs or {})},
        **sections,
    )
    return rs


async def node(
    rs: RunningScheduler, http: aiohttp.ClientSession, cleanup: list[Any], profile: NodeProfile, **kw: Any
) -> SimulatedNode:
    n = SimulatedNode(http, rs.node_url, profile, interval=0.05, **kw)
    cleanup.append(n)
    reply = await n.start()
    assert reply["type"] == "node_register_ack", reply
    await eventually(lambda: rs.state.registry.nodes[n.node_id].status.value == "ready")
    await eventually(lambda: n.node_id in rs.state.publisher.view.nodes)
    return n


async def session(
    rs: RunningScheduler, http: aiohttp.ClientSession, cleanup: list[Any], **init: Any
) -> SimulatedSession:
    s = SimulatedSession(
        http,
        rs.session_url,
        src_lang=init.pop("src", "zh"),
        tgt_lang=init.pop("tgt", "en"),
        audio_format=init.pop("audio_format", "opus"),
    )
    cleanup.append(s)
    await s.connect()
    ack = await s.init(**init)
    assert ack["type"] == "session_init_ack", ack
    return s


#: two of the simulated session's 100 ms Opus chunks: a maximum utterance size that cuts a turn
TWO_CHUNKS = 2 * len(opus_audio(100))


def assigns(n: SimulatedNode) -> list[dict[str, Any]]:
    return [m for m in n.received if m.get("type") == "job_assign"]


# --- acks that never come ----------------------------------------------------------------------------


async def test_slow_job_of_a_node_without_acks_is_delivered(
    scheduler_factory: Any, http: aiohttp.ClientSession, cleanup: list[Any]
) -> None:
    """The ack timeout is 100 ms; the node takes 7x that and never acks: its result is the answer."""
    rs = await start(scheduler_factory)
    n = await node(rs, http, cleanup, real_like(), executor=Executor(latency=700 * MS, partials=0))
    s = await session(rs, http, cleanup)
    waiter = s.wait_for(lambda m: m["type"] in ("translation_result", "error"), timeout=10)
    await s.utterance()
    msg = await waiter
    assert msg["type"] == "translation_result" and msg["utterance_index"] == 0
    assert not [m for m in n.received if m.get("type") == "job_cancel"]
    assert len(assigns(n)) == 1 and await rs.metric("lingua_failovers_total", '{reason="ack_timeout"}') == 0


async def test_a_node_that_declares_acks_still_fails_over_without_one(
    scheduler_factory: Any, http: aiohttp.ClientSession, cleanup: list[Any]
) -> None:
    rs = await start(scheduler_factory)
    acking = NodeProfile(asr_languages=["en", "zh"], tts_languages=["en", "zh"], nmt_languages=["en", "zh"])
    mute = await node(rs, http, cleanup, acking, executor=Executor(behavior=Behavior.NEVER_ACK))
    s = await session(rs, http, cleanup)
    waiter = s.wait_for(lambda m: m["type"] == "error", timeout=10)
    await s.utterance()
    await waiter  # one node only: after the ack timeout no other node is left
    assert [m["reason"] for m in mute.received if m.get("type") == "job_cancel"] == ["failover"]
    assert await rs.metric("lingua_failovers_total", '{reason="ack_timeout"}') == 1


async def test_result_of_an_earlier_attempt_is_delivered_while_unanswered(
    scheduler_factory: Any, http: aiohttp.ClientSession, cleanup: list[Any]
) -> None:
    """The first node misses the (short) execution deadline; the job moves to a second node that never
    answers; the first node's result then arrives and is the answer, the second node's attempt is
    cancelled."""
    rs = await start(
        scheduler_factory,
        jobs={"exec_timeout_base_ms": 300, "exec_timeout_min_ms": 300, "exec_timeout_max_ms": 300},
    )
    slow = await node(
        rs, http, cleanup, real_like(), executor=Executor(latency=900 * MS, partials=0, honours_cancel=False)
    )
    s = await session(rs, http, cleanup)
    waiter = s.wait_for(lambda m: m["type"] in ("translation_result", "error"), timeout=10)
    await s.utterance()
    await eventually(lambda: len(assigns(slow)) == 1)
    silent = await node(rs, http, cleanup, real_like(), executor=Executor(behavior=Behavior.NEVER_ACK))
    await eventually(lambda: len(assigns(silent)) == 1, timeout=5)
    assert assigns(silent)[0]["attempt_id"] == 2
    msg = await waiter
    assert msg["type"] == "translation_result" and msg["job_id"] == assigns(slow)[0]["job_id"]
    await eventually(lambda: any(m.get("type") == "job_cancel" for m in silent.received))
    assert await rs.metric("lingua_early_attempt_results_total") == 1
    await eventually(lambda: rs.state.engine.store.inflight == 0)
    assert rs.state.registry.nodes[silent.node_id].load.inflight == 0
    assert len(s.of_type("translation_result")) == 1 and not s.of_type("missing_result")


async def test_result_from_a_node_that_never_had_the_job_is_dropped(
    scheduler_factory: Any, http: aiohttp.ClientSession, cleanup: list[Any]
) -> None:
    rs = await start(scheduler_factory, jobs={"exec_timeout_min_ms": 15_000})
    busy = await node(rs, http, cleanup, real_like(), executor=Executor(behavior=Behavior.NEVER_ACK))
    s = await session(rs, http, cleanup)
    await s.utterance()
    await eventually(lambda: len(assigns(busy)) == 1)
    job = assigns(busy)[0]
    intruder = await node(rs, http, cleanup, real_like(), executor=Executor(behavior=Behavior.NEVER_ACK))
    forged = result_message(msgspec.convert(job, JobAssign), intruder.node_id, Result(text_asr="x"), 5)
    await intruder.send(forged)
    for _ in range(200):
        if await rs.metric("lingua_stale_job_messages_total") == 1:
            break
        await asyncio.sleep(5 * MS)
    assert await rs.metric("lingua_stale_job_messages_total") == 1
    assert not s.of_type("translation_result")
    assert rs.state.engine.store.get(job["job_id"]).state.value == "dispatched"  # type: ignore[union-attr]


# --- a node that is only busy ---------------------------------------------------------------------------


async def test_jobs_wait_for_a_busy_slow_node_instead_of_failing(
    scheduler_factory: Any, http: aiohttp.ClientSession, cleanup: list[Any]
) -> None:
    """One slot, 600 ms a job, no acks, a 200 ms wait for "no node": three utterances sent at once all
    reach the node one after another and all are translated, in order, without an error."""
    rs = await start(
        scheduler_factory, jobs={"pending_timeout_ms": 200}, scheduler={"max_concurrent_jobs_per_node": 1}
    )
    n = await node(rs, http, cleanup, real_like(), executor=Executor(latency=600 * MS, partials=0))
    s = await session(rs, http, cleanup)
    done = s.wait_for(lambda m: len(s.of_type("translation_result")) == 3 or m["type"] == "error", timeout=15)
    for _ in range(3):
        await s.utterance()
    await done
    assert not s.of_type("error")
    assert [m["utterance_index"] for m in s.of_type("translation_result")] == [0, 1, 2]
    assert n.max_running == 1 and len(assigns(n)) == 3


async def test_a_job_waiting_for_a_busy_node_fails_soon_once_no_node_serves_it(
    scheduler_factory: Any, http: aiohttp.ClientSession, cleanup: list[Any]
) -> None:
    """The busy node goes away: the waiting job now has no node that could ever take it, so it fails
    with NO_AVAILABLE_NODE after the short wait, not at its (long) execution timeout."""
    rs = await start(
        scheduler_factory, jobs={"pending_timeout_ms": 300}, scheduler={"max_concurrent_jobs_per_node": 1}
    )
    n = await node(rs, http, cleanup, real_like(), executor=Executor(behavior=Behavior.NEVER_ACK))
    s = await session(rs, http, cleanup)
    await s.utterance()
    await eventually(lambda: len(assigns(n)) == 1)
    await s.utterance()
    await asyncio.sleep(0.6)  # twice the short wait: still waiting, for the busy node
    assert not s.of_type("error")
    waiter = s.wait_for(lambda m: m["type"] == "error" and m["details"]["utterance_index"] == 1, timeout=5)
    await n.close()
    gone_at = asyncio.get_running_loop().time()
    msg = await waiter
    assert msg["code"] == "NO_AVAILABLE_NODE"
    assert asyncio.get_running_loop().time() - gone_at < 3.0  # not the 15 s execution timeout


async def test_an_utterance_of_opus_silence_gets_no_job(
    scheduler_factory: Any, http: aiohttp.ClientSession, cleanup: list[Any]
) -> None:
    """The web client's silence frames after its send button: missing_result(silence_detected), and
    the node is not bothered; a real utterance after it is translated as usual."""
    rs = await start(scheduler_factory)
    n = await node(rs, http, cleanup, real_like())
    s = await session(rs, http, cleanup)
    silent_frame = bytes.fromhex("4807c979c8c9c8c9")  # 8 bytes per 20 ms
    waiter = s.wait_for(lambda m: m["type"] in ("missing_result", "translation_result", "error"), timeout=5)
    await s.chunk(is_final=True, payload=base64.b64encode(opus.frame([silent_frame] * 50)).decode())
    msg = await waiter
    assert (msg["type"], msg["utterance_index"], msg["reason"]) == ("missing_result", 0, "silence_detected")
    waiter = s.wait_for(lambda m: m["type"] in ("translation_result", "error"), timeout=5)
    s.utterances_sent = 1
    await s.utterance()
    assert (await waiter)["utterance_index"] == 1
    assert [a["utterance_index"] for a in assigns(n)] == [1]
    assert await rs.metric("lingua_silent_utterances_total") == 1


# --- what the node reports -----------------------------------------------------------------------------


HEAD_REGISTER: dict[str, Any] = {
    "type": "node_register",
    "node_id": None,
    "version": "2.0.0",
    "capability_schema_version": "2.0",
    "platform": "linux",
    "hardware": {
        "cpu_cores": 2,
        "memory_gb": 24,
        "gpus": [{"name": "NVIDIA GeForce RTX 4090", "memory_gb": 24}],
    },
    "installed_models": [],
    "installed_services": [
        {"service_id": "faster-whisper-vad", "type": "asr", "device": "gpu", "status": "running"},
        {"service_id": "nmt-m2m100", "type": "nmt", "device": "gpu", "status": "running"},
        {"service_id": "piper-tts", "type": "tts", "device": "gpu", "status": "running"},
        {"service_id": "lexicon-zh", "type": "lexicon", "device": "npu", "status": "running"},
        {"service_id": "phonetic-zh", "type": "phonetic", "device": "cpu", "status": "running"},
    ],
    "capability_by_type": [
        {"type": t, "ready": True, "devices": ["gpu"]}
        for t in ("asr", "nmt", "tts", "tone", "semantic", "phonetic", "punctuation")
    ],
    "features_supported": {"emotion_detection": False},
    "accept_public_jobs": True,
    "language_capabilities": {
        "asr_languages": ["zh", "en"],
        "tts_languages": ["zh", "en"],
        "nmt": [],
        "semantic_languages": ["zh", "en"],
    },
}


async def test_head_register_with_unknown_service_types_is_accepted_and_shown(
    scheduler_factory: Any, http: aiohttp.ClientSession
) -> None:
    rs = await start(scheduler_factory)
    async with http.ws_connect(rs.node_url) as ws:
        await ws.send_json(HEAD_REGISTER)
        ack = await ws.receive_json(timeout=5)
        assert ack["type"] == "node_register_ack", ack
        body = await rs.get_json(f"/api/v1/nodes/{ack['node_id']}")
        services = body["services"]
        assert services["unknown_types"] == ["lexicon", "phonetic", "punctuation"]
        assert services["unknown_devices"] == ["npu"]
        assert services["installed"] == ["asr", "nmt", "tts"]
        assert body["protocol"] == {"sends_acks": False, "turn_dialect": True}
        assert await rs.metric("lingua_node_unknown_values_total", '{kind="service_type"}') == 3
        assert await rs.metric("lingua_node_unknown_values_total", '{kind="device"}') == 1
        # the same report again (a heartbeat-equivalent re-register) counts nothing new
        await ws.send_json({**HEAD_REGISTER, "node_id": ack["node_id"]})
        assert (await ws.receive_json(timeout=5))["type"] == "node_register_ack"
        assert await rs.metric("lingua_node_unknown_values_total", '{kind="service_type"}') == 3


async def test_supported_language_pairs_restrict_the_pools(
    scheduler_factory: Any, http: aiohttp.ClientSession, cleanup: list[Any]
) -> None:
    rs = await start(scheduler_factory)
    many = ["zh", "en", "ja", "ko", "fr"]
    n = await node(rs, http, cleanup, real_like(langs=many, supported_pairs=[("zh", "en"), ("en", "zh")]))
    body = await rs.get_json(f"/api/v1/nodes/{n.node_id}")
    groups = sorted({p.split("#")[0] for p in body["pools"]})
    assert groups == ["auto->en", "auto->zh", "en->zh", "zh->en"]
    assert body["supported_language_pairs"] == ["en->zh", "zh->en"]
    # without the declaration the same node serves every pair of its languages
    free = await node(rs, http, cleanup, real_like(langs=many))
    assert len({p.split("#")[0] for p in (await rs.get_json(f"/api/v1/nodes/{free.node_id}"))["pools"]}) == 25
    s = await session(rs, http, cleanup, src="ja", tgt="en")
    await s.utterance()
    await eventually(lambda: bool(assigns(free)))
    assert not assigns(n)


# --- job_assign --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "older", "turn"),
    [
        (CutReason.PAUSE, (True, False, False), (False, True, False)),
        (CutReason.MAX_DURATION, (False, True, False), (False, False, True)),
        (CutReason.MAX_BYTES, (False, False, False), (False, False, True)),
        (CutReason.MANUAL_CUT, (False, False, False), (False, False, False)),
    ],
)
def test_trigger_flags_per_dialect(
    reason: CutReason, older: tuple[bool, bool, bool], turn: tuple[bool, bool, bool]
) -> None:
    assert trigger_flags(reason, turn_dialect=False) == older
    assert trigger_flags(reason, turn_dialect=True) == turn


async def test_turn_dialect_fields_and_max_duration_chain_on_one_node(
    scheduler_factory: Any, http: aiohttp.ClientSession, cleanup: list[Any]
) -> None:
    """A turn cut twice at its maximum size then ended by the speaker: three jobs, one turn_id, one node
    (even though another idle node is there); the next utterance opens a new turn."""
    rs = await start(scheduler_factory, session={"max_utterance_bytes": TWO_CHUNKS})
    nodes = [await node(rs, http, cleanup, real_like(turn_dialect=True)) for _ in range(2)]
    s = await session(rs, http, cleanup)
    await s.speak(chunks=5)
    await s.speak(chunks=1)
    await eventually(lambda: sum(len(assigns(n)) for n in nodes) == 4, timeout=5)
    jobs = sorted((a for n in nodes for a in assigns(n)), key=lambda a: a["utterance_index"])
    assert [bool(a.get("is_max_duration_triggered")) for a in jobs] == [True, True, False, False]
    assert not any(a.get("is_pause_triggered") or a.get("is_timeout_triggered") for a in jobs)
    assert [bool(a.get("is_manual_cut")) for a in jobs] == [False, False, True, True]
    turns = [a["turn_id"] for a in jobs]
    assert turns[0] == turns[1] == turns[2] != turns[3]
    first_turn_nodes = {n.node_id for n in nodes for a in assigns(n) if a["turn_id"] == turns[0]}
    assert len(first_turn_nodes) == 1


async def test_older_dialect_gets_no_turn_fields(
    scheduler_factory: Any, http: aiohttp.ClientSession, cleanup: list[Any]
) -> None:
    rs = await start(scheduler_factory, session={"max_utterance_bytes": TWO_CHUNKS})
    n = await node(rs, http, cleanup, real_like())
    s = await session(rs, http, cleanup)
    await s.speak(chunks=3)
    await eventually(lambda: len(assigns(n)) == 2)
    assert not any("turn_id" in a or "is_max_duration_triggered" in a for a in assigns(n))


async def test_session_affinity_keeps_a_session_on_its_node(
    scheduler_factory: Any, http: aiohttp.ClientSession, cleanup: list[Any]
) -> None:
    rs = await start(scheduler_factory)
    nodes = [await node(rs, http, cleanup, real_like(), executor=Executor(partials=0)) for _ in range(3)]
    s = await session(rs, http, cleanup)
    for _ in range(6):
        waiter = s.wait_for(lambda m: m["type"] == "translation_result", timeout=10)
        await s.utterance()
        await waiter
    used = [n for n in nodes if assigns(n)]
    assert len(used) == 1 and len(assigns(used[0])) == 6
    assert await rs.metric("lingua_session_affinity_total", '{result="hit"}') == 5
    # its node gone, the session moves (and is counted so)
    await used[0].close()
    gone = used[0].node_id
    await eventually(lambda: rs.state.registry.nodes[gone].status.value == "offline")
    await eventually(lambda: rs.state.publisher.view.nodes[gone].status.value == "offline")
    waiter = s.wait_for(lambda m: m["type"] == "translation_result", timeout=10)
    await s.utterance()
    await waiter
    assert await rs.metric("lingua_session_affinity_total", '{result="moved"}') == 1


async def test_streaming_asr_asked_and_partials_relayed(
    scheduler_factory: Any, http: aiohttp.ClientSession, cleanup: list[Any]
) -> None:
    rs = await start(scheduler_factory)
    n = await node(rs, http, cleanup, real_like(), executor=Executor(partials=2))
    s = await session(rs, http, cleanup, auto_langs=["zh", "en"])
    waiter = s.wait_for(lambda m: m["type"] == "translation_result", timeout=10)
    await s.utterance()
    await waiter
    (a,) = assigns(n)
    assert a["enable_streaming_asr"] is True and a["partial_update_interval_ms"] == 1000
    assert a["auto_langs"] == ["zh", "en"]
    assert len(s.of_type("asr_partial")) == 2
    # a session that says no gets no partials
    s2 = await session(rs, http, cleanup, enable_streaming_asr=False)
    waiter = s2.wait_for(lambda m: m["type"] == "translation_result", timeout=10)
    await s2.utterance()
    await waiter
    assert "enable_streaming_asr" not in assigns(n)[-1] or assigns(n)[-1]["enable_streaming_asr"] is False
    assert not s2.of_type("asr_partial")


async def test_two_way_session_only_on_a_node_serving_both_directions(
    scheduler_factory: Any, http: aiohttp.ClientSession, cleanup: list[Any]
) -> None:
    rs = await start(scheduler_factory)
    one_way = NodeProfile(
        asr_languages=["zh", "en"], tts_languages=["en"], nmt_languages=["zh", "en"], sends_acks=False
    )
    half = await node(rs, http, cleanup, one_way)
    s = await session(rs, http, cleanup, src="auto", tgt="en", mode="two_way_auto", lang_a="zh", lang_b="en")
    waiter = s.wait_for(lambda m: m["type"] in ("translation_result", "error"), timeout=10)
    await s.utterance()
    assert (await waiter)["type"] == "error"  # no TTS in zh: cannot answer the other speaker
    assert not assigns(half)
    both = await node(rs, http, cleanup, real_like())
    waiter = s.wait_for(lambda m: m["type"] == "translation_result", timeout=10)
    await s.utterance()
    await waiter
    (a,) = assigns(both)
    assert (a["mode"], a["lang_a"], a["lang_b"]) == ("two_way_auto", "zh", "en")
    assert not assigns(half)
