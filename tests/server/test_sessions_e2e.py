"""Sessions and jobs end to end through real sockets: simulated sessions, simulated nodes, one scheduler."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lingua_scheduler.sim.nodes import Behavior, Executor
from tests.conftest import RunningScheduler, eventually

FAST = {
    "jobs": {"ack_timeout_ms": 400, "pending_timeout_ms": 600, "retention_seconds": 0.2},
    "session": {"pause_ms": 300, "result_gap_timeout_ms": 3000},
    "scheduler": {"fleet_view_interval_ms": 10},
}


@pytest.fixture
async def sched(scheduler_factory: Any) -> RunningScheduler:
    rs: RunningScheduler = await scheduler_factory(**FAST)
    return rs


def ready_count(rs: RunningScheduler) -> int:
    view = rs.state.publisher.view
    return sum(1 for n in view.nodes.values() if n.status == "ready")


async def start_nodes(
    rs: RunningScheduler, node_factory: Any, n: int, executor: Executor | None = None
) -> list[Any]:
    before = ready_count(rs)
    nodes = [node_factory(url=rs.node_url, executor=executor) for _ in range(n)]
    for node in nodes:
        await node.start()
    await eventually(lambda: ready_count(rs) == before + n)
    return nodes


def results(session: Any) -> list[dict[str, Any]]:
    return session.of_type("translation_result")


async def test_stream_results_in_order(
    sched: RunningScheduler, node_factory: Any, session_factory: Any
) -> None:
    await start_nodes(sched, node_factory, 3, Executor(latency=0.01, jitter=0.05))
    s = session_factory(url=sched.session_url)
    ack = await s.start()
    assert (
        ack["type"] == "session_init_ack"
        and ack["session_id"].startswith("s-")
        and len(ack["session_id"]) == 34  # "s-" and 128 bits in hex: unique across instances
    )
    assert ack["negotiated_sample_rate"] == 16000
    for _ in range(8):
        await s.speak(chunks=2)
    await eventually(lambda: len(results(s)) == 8)
    assert [r["utterance_index"] for r in results(s)] == list(range(8))
    assert all(r["text_translated"].startswith("zh ") for r in results(s))
    events = [m["event"] for m in s.of_type("ui_event") if m["utterance_index"] == 0]
    assert events[:2] == ["DISPATCHED", "NODE_ACCEPTED"]
    assert "ASR_PARTIAL" in events and events[-2:] == ["ASR_FINAL", "NMT_DONE"]
    assert len(s.of_type("asr_partial")) == 8


async def test_pause_finalizes_and_late_chunk_starts_next(
    sched: RunningScheduler, node_factory: Any, session_factory: Any
) -> None:
    [node] = await start_nodes(sched, node_factory, 1, Executor(latency=0.01))
    s = session_factory(url=sched.session_url)
    await s.start()
    await s.chunk()
    await s.chunk()
    await eventually(lambda: len(results(s)) == 1, timeout=3)  # the pause timer cut it
    await s.chunk(is_final=True)  # the late chunk is the next utterance, not lost
    await eventually(lambda: len(results(s)) == 2)
    sizes = [len(m["audio"]) for m in node.received if m["type"] == "job_assign"]
    assert sizes[0] > sizes[1] > 0


async def _first_attempt_on(bad: Any, s: Any) -> int:
    got = bad.wait_for(lambda m: m.get("type") == "job_assign")
    index = await s.speak(chunks=1)
    await got
    return index


@pytest.mark.parametrize(
    "behavior", [Behavior.NEVER_ACK, Behavior.CRASH_MID_JOB, Behavior.MODEL_NOT_AVAILABLE]
)
async def test_failover_to_another_node(
    sched: RunningScheduler, node_factory: Any, session_factory: Any, behavior: Behavior
) -> None:
    [bad] = await start_nodes(
        sched, node_factory, 1, Executor(latency=0.2, behavior=behavior, late_result_after=1.0)
    )
    s = session_factory(url=sched.session_url)
    await s.start()
    index = await _first_attempt_on(bad, s)
    [good] = await start_nodes(sched, node_factory, 1, Executor(latency=0.01))
    await eventually(lambda: len(results(s)) == 1, timeout=5)
    [assigned] = [m for m in good.received if m["type"] == "job_assign"]
    assert assigned["attempt_id"] == 2 and assigned["utterance_index"] == index
    job = sched.state.engine.store.get(assigned["job_id"])
    assert job is not None and job.attempt == 2
    if behavior is Behavior.NEVER_ACK:
        # the first node answers late for attempt 1: fenced, never delivered
        stale = await sched.metric("lingua_stale_job_messages_total")
        await eventually(lambda: sched.state.engine.store.stale_messages >= 1, timeout=3)
        assert await sched.metric("lingua_stale_job_messages_total") >= max(1, stale)
        assert any(m["type"] == "job_cancel" for m in bad.received)
    await asyncio.sleep(0.1)
    assert len(results(s)) == 1
    reason = {
        Behavior.NEVER_ACK: "ack_timeout",
        Behavior.CRASH_MID_JOB: "node_lost",
        Behavior.MODEL_NOT_AVAILABLE: "node_error",
    }[behavior]
    assert await sched.metric("lingua_failovers_total", f'{{reason="{reason}"}}') == 1


async def test_no_node_client_told_then_next_succeeds(
    sched: RunningScheduler, node_factory: Any, session_factory: Any
) -> None:
    s = session_factory(url=sched.session_url)
    await s.start()
    err = s.wait_for(lambda m: m.get("type") == "error", timeout=5)
    await s.speak(chunks=1)
    e = await err
    assert e["code"] == "NO_AVAILABLE_NODE"
    await eventually(lambda: bool(s.of_type("missing_result")))
    assert s.of_type("missing_result")[0]["reason"] == "job_failed"
    assert any(
        m["event"] == "ERROR" and m["error_code"] == "NO_AVAILABLE_NODE" for m in s.of_type("ui_event")
    )
    await start_nodes(sched, node_factory, 1, Executor(latency=0.01))
    await s.speak(chunks=1)
    await eventually(lambda: len(results(s)) == 1)
    assert results(s)[0]["utterance_index"] == 1


async def test_job_waits_briefly_for_capacity(
    sched: RunningScheduler, node_factory: Any, session_factory: Any
) -> None:
    s = session_factory(url=sched.session_url)
    await s.start()
    await s.speak(chunks=1)
    await asyncio.sleep(0.1)  # no node yet; the job waits (pending_timeout 600 ms)
    await start_nodes(sched, node_factory, 1, Executor(latency=0.01))
    await eventually(lambda: len(results(s)) == 1)
    assert not s.of_type("error")


async def test_session_cannot_touch_another(
    sched: RunningScheduler, node_factory: Any, session_factory: Any
) -> None:
    await start_nodes(sched, node_factory, 1, Executor(latency=0.01))
    victim, attacker = session_factory(url=sched.session_url), session_factory(url=sched.session_url)
    await victim.start()
    await attacker.start()
    own = attacker.session_id
    attacker.session_id = victim.session_id
    for action in (
        attacker.chunk(is_final=True),
        attacker.utterance(),
        attacker.send({"type": "session_close", "session_id": victim.session_id, "reason": "x"}),
    ):
        err = attacker.wait_for(lambda m: m.get("type") == "error")
        await action
        reply = await err
        assert reply["code"] == "INVALID_SESSION" and victim.session_id in reply["message"]
    assert victim.session_id in sched.state.sessions
    assert sched.state.engine.store.jobs_of(victim.session_id) == []
    attacker.session_id = own
    await victim.speak(chunks=1)
    await eventually(lambda: len(results(victim)) == 1)


async def test_invalid_frames_keep_the_session(sched: RunningScheduler, session_factory: Any) -> None:
    s = session_factory(url=sched.session_url)
    await s.start()
    for junk in ('{"type":"audio_chunk"}', "nope", '{"type":"translation_result"}'):
        err = s.wait_for(lambda m: m.get("type") == "error")
        await s.ws.send_str(junk)
        assert (await err)["code"] == "INVALID_MESSAGE"
    err = s.wait_for(lambda m: m.get("type") == "error")
    await s.chunk(payload="***not base64***")
    assert (await err)["code"] == "INVALID_MESSAGE"
    hb = s.wait_for(lambda m: m.get("type") == "server_heartbeat")
    await s.send({"type": "client_heartbeat", "session_id": s.session_id, "timestamp": 1})
    assert (await hb)["session_id"] == s.session_id


async def test_second_init_closes_first(sched: RunningScheduler, session_factory: Any) -> None:
    s = session_factory(url=sched.session_url)
    await s.start()
    first = s.session_id
    closed = s.wait_for(lambda m: m.get("type") == "session_close_ack")
    await s.init()
    assert (await closed)["session_id"] == first
    assert first not in sched.state.sessions and s.session_id in sched.state.sessions


async def test_close_dispatches_last_audio_then_frees(
    sched: RunningScheduler, node_factory: Any, session_factory: Any
) -> None:
    [node] = await start_nodes(sched, node_factory, 1, Executor(latency=0.05))
    s = session_factory(url=sched.session_url)
    await s.start()
    await s.speak(chunks=2)
    await s.chunk()  # trailing audio, no is_final, no pause yet
    s.utterances_sent += 1
    ack = await s.close()
    assert ack["session_id"] == s.session_id
    assert [r["utterance_index"] for r in results(s)] == [0, 1]  # the tail was dispatched and answered
    assert len([m for m in node.received if m["type"] == "job_assign"]) == 2
    state = sched.state
    assert state.sessions == {}
    store = state.engine.store
    assert store.inflight == 0 and store.waiting == 0 and store.audio_bytes == 0
    await eventually(lambda: len(store) == 0, timeout=3)  # terminal jobs evicted after retention
    assert state.engine.tracked_jobs() == 0  # no per-job bookkeeping outlives its job
    state.engine.validate()


async def test_disconnect_cancels_inflight(
    sched: RunningScheduler, node_factory: Any, session_factory: Any
) -> None:
    [node] = await start_nodes(sched, node_factory, 1, Executor(latency=1.0))
    s = session_factory(url=sched.session_url)
    await s.start()
    got = node.wait_for(lambda m: m.get("type") == "job_assign")
    await s.speak(chunks=1)
    await got
    cancel = node.wait_for(lambda m: m.get("type") == "job_cancel")
    await s.disconnect()
    await cancel
    state = sched.state
    await eventually(lambda: state.sessions == {} and state.engine.store.inflight == 0)
    assert state.registry.nodes[node.node_id].load.inflight == 0
