"""Nothing a session sent or a node finished is lost silently, through real WebSockets: a full result
queue refuses new utterances instead of discarding finished work, a result after its gap_timeout is
delivered marked late, frames dropped by the rate limit are reported one by one (an utterance by its
index, a chunk stream with a hole refused instead of spliced), and results carry the client's indices."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from lingua_scheduler.core.auth import hash_api_key
from lingua_scheduler.sim.nodes import Executor, SimulatedNode
from lingua_scheduler.sim.profiles import NodeProfile
from lingua_scheduler.sim.sessions import SimulatedSession
from tests.conftest import MS, RunningScheduler, eventually

#: LINGUA_TEST_TIME_FACTOR: the tests' sleeps stretch by it, so the rates they race shrink by it
FACTOR = MS * 1000
KEY = "tenant-a-key-" + "a" * 32
PROFILE = NodeProfile(asr_languages=["en", "zh"], tts_languages=["en", "zh"], nmt_languages=["en", "zh"])


def per_second(rate: float) -> float:
    return rate / FACTOR


async def ready_node(rs: RunningScheduler, node: SimulatedNode) -> None:
    assert (await node.start())["type"] == "node_register_ack"

    def ready() -> bool:
        view = rs.state.publisher.view.nodes.get(node.node_id or "")
        return view is not None and view.status == "ready"

    await eventually(ready)


def missing(s: SimulatedSession, reason: str) -> list[dict[str, Any]]:
    return [m for m in s.of_type("missing_result") if m["reason"] == reason]


def assigned(node: SimulatedNode) -> list[dict[str, Any]]:
    return [m for m in node.received if m.get("type") == "job_assign"]


async def test_a_burst_on_a_rate_limited_tenant_delivers_every_completed_job(
    scheduler_factory: Any, node_factory: Any, session_factory: Any
) -> None:
    """120 utterances at once, 40 within the tenant's job rate, a queue of 64: the 40 jobs' results
    all reach the client; the next 24 are refused by the tenant's rate (in order), the 56 beyond the
    queue's bound are refused at once with queue_full. Nothing completed is discarded."""
    rs = await scheduler_factory(
        auth={
            "tenants": [
                {
                    "tenant_id": "tenant-a",
                    "key_sha256": hash_api_key(KEY),
                    "max_jobs_per_second": 0.01,
                    "jobs_burst": 40,
                }
            ]
        },
        session={"max_pending_results": 64, "result_gap_timeout_ms": 60_000},
        jobs={"pending_timeout_ms": 60_000},
        scheduler={"fleet_view_interval_ms": 10},
    )
    s = session_factory(url=rs.session_url, api_key=KEY, audio_format="pcm16")
    await s.start()
    for _ in range(120):
        await s.utterance(n_bytes=640)
    await eventually(lambda: len(s.outcomes()) == 56)  # refusals for want of room: answered at once
    # the node comes once the burst is in: no result can come back in the middle of it
    node = node_factory(profile=PROFILE, url=rs.node_url, executor=Executor(latency=0.01))
    await ready_node(rs, node)
    await eventually(lambda: s.settled() and node.jobs_done == 40, timeout=20)
    outcomes = s.outcomes()
    assert all(len(v) == 1 for v in outcomes.values()) and sorted(outcomes) == list(range(120)), {
        i: v for i, v in outcomes.items() if len(v) != 1
    }
    assert [i for i, v in outcomes.items() if v == ["result"]] == list(range(40))
    assert [m["utterance_index"] for m in missing(s, "job_failed")] == list(range(40, 64))
    assert [m["utterance_index"] for m in missing(s, "queue_full")] == list(range(64, 120))
    assert missing(s, "gap_timeout") == []
    assert len(s.of_type("translation_result")) == node.jobs_done == len(assigned(node)) == 40
    refusals = await rs.metric("lingua_refused_utterances_total", '{reason="queue_full"}')
    assert refusals == 56
    # the queue has room again once results are out: the session goes on
    assert rs.state.sessions[s.session_id or ""].results.has_room


class SlowFirstNode(SimulatedNode):
    """Holds the job of utterance 0 for ``hold`` seconds more than the others."""

    hold = 0.0

    async def _execute(self, job: dict[str, Any]) -> None:
        if job["utterance_index"] == 0:
            await asyncio.sleep(self.hold)
        await super()._execute(job)


async def test_a_late_result_after_its_gap_is_delivered_marked_late(
    scheduler_factory: Any, session_factory: Any
) -> None:
    """Utterance 0's job is slow; 1 is refused by the tenant's rate, which holds its release back: 0 is
    given up (gap_timeout) so that 1 goes out, and 0's result, when it comes, is delivered marked late."""
    rs = await scheduler_factory(
        auth={
            "tenants": [
                {
                    "tenant_id": "tenant-a",
                    "key_sha256": hash_api_key(KEY),
                    "max_jobs_per_second": 0.01,
                    "jobs_burst": 1,
                }
            ]
        },
        session={"result_gap_timeout_ms": int(300 * FACTOR)},
        scheduler={"fleet_view_interval_ms": 10},
    )
    node = SlowFirstNode(rs.http, rs.node_url, PROFILE, executor=Executor(latency=0.01))
    node.hold = 1000 * MS
    try:
        await ready_node(rs, node)
        s = session_factory(url=rs.session_url, api_key=KEY, audio_format="pcm16")
        await s.start()
        await s.utterance()
        await s.utterance()
        await eventually(lambda: len(s.of_type("translation_result")) == 1, timeout=10)
        kinds = [
            (m["type"], m["utterance_index"], m.get("reason") or m.get("late"))
            for m in s.messages
            if m["type"] in ("translation_result", "missing_result")
        ]
        assert kinds == [
            ("missing_result", 0, "gap_timeout"),
            ("missing_result", 1, "job_failed"),
            ("translation_result", 0, True),
        ]
        assert await rs.metric("lingua_late_results_total") == 1
    finally:
        await node.close()


async def test_utterances_dropped_by_the_frame_rate_are_each_answered(
    scheduler_factory: Any, node_factory: Any, session_factory: Any
) -> None:
    """A burst of utterances over the frame rate: every one the rate limit dropped is answered with
    missing_result(rate_limited) under the client's own index, and the count matches the drops."""
    rs = await scheduler_factory(
        limits={
            "session_messages_per_second": per_second(2),
            "session_message_burst": 30,
            "rate_limit_close_after_seconds": 60,
        },
        scheduler={"fleet_view_interval_ms": 10},
    )
    node = node_factory(profile=PROFILE, url=rs.node_url, executor=Executor(latency=0.01))
    await ready_node(rs, node)
    s = session_factory(url=rs.session_url, audio_format="pcm16")
    await s.start()
    for _ in range(70):
        await s.utterance(n_bytes=640)
    await eventually(lambda: s.settled(), timeout=10)
    dropped = await rs.metric("lingua_rate_limited_frames_total", '{endpoint="session"}')
    outcomes = s.outcomes()
    assert sorted(outcomes) == list(range(70)) and all(len(v) == 1 for v in outcomes.values())
    limited = [m["utterance_index"] for m in missing(s, "rate_limited")]
    assert 30 <= len(limited) == dropped <= 41, (len(limited), dropped)
    results = [m["utterance_index"] for m in s.of_type("translation_result")]
    assert sorted(results + limited) == list(range(70))  # the client's indices, none shifted
    assert len(assigned(node)) == len(results)
    assert s.of_type("error") == []  # no popup: backpressure and missing_result only
    assert "PAUSE" in [m["action"] for m in s.of_type("backpressure")]


def chunk_of(seq: int) -> str:
    return base64.b64encode(bytes([seq]) * 3200).decode()


async def test_a_chunk_stream_with_a_hole_is_refused_not_spliced(
    scheduler_factory: Any, node_factory: Any, session_factory: Any
) -> None:
    rs = await scheduler_factory(
        limits={
            "session_messages_per_second": per_second(2),
            "session_message_burst": 6,
            "rate_limit_close_after_seconds": 60,
        },
        session={"pause_ms": 20_000},
        scheduler={"fleet_view_interval_ms": 10},
    )
    node = node_factory(profile=PROFILE, url=rs.node_url, executor=Executor(latency=0.01))
    await ready_node(rs, node)
    s = session_factory(url=rs.session_url, audio_format="pcm16")
    await s.start()  # one token
    for seq in range(1, 13):  # 5 pass, the rest are dropped
        await s.chunk(payload=chunk_of(seq))
    dropped = s.wait_for(lambda m: m.get("type") == "missing_result", timeout=10)
    await asyncio.sleep(2000 * MS)  # the bucket refills (4 tokens)
    for seq in range(13, 16):
        await s.chunk(payload=chunk_of(seq), is_final=seq == 15)
    refused = await dropped
    n = int(await rs.metric("lingua_rate_limited_frames_total", '{endpoint="session"}'))
    assert refused["utterance_index"] == 0 and refused["reason"] == "rate_limited"
    assert refused["dropped_chunks"] == n and refused["dropped_seqs"] == list(range(13 - n, 13))
    await eventually(lambda: len(s.of_type("translation_result")) == 1)
    assert s.of_type("translation_result")[0]["utterance_index"] == 1
    # the job holds the audio after the hole only: nothing from before it was spliced in
    [job] = assigned(node)
    assert base64.b64decode(job["audio"]) == b"".join(bytes([q]) * 3200 for q in (13, 14, 15))
    assert s.of_type("error") == []


async def test_results_carry_the_clients_indices_after_a_refusal(
    scheduler_factory: Any, node_factory: Any, session_factory: Any
) -> None:
    """A client numbering its utterances from 10: the one the tenant's rate refuses is named by the
    client's number in the error (details and text) and in missing_result; later results keep the
    client's numbers. Streamed utterances after a refused one take the next index."""
    rs = await scheduler_factory(
        auth={
            "tenants": [
                {
                    "tenant_id": "tenant-a",
                    "key_sha256": hash_api_key(KEY),
                    "max_jobs_per_second": per_second(2),
                    "jobs_burst": 1,
                }
            ]
        },
        session={"pause_ms": 20_000},
        scheduler={"fleet_view_interval_ms": 10},
    )
    node = node_factory(profile=PROFILE, url=rs.node_url, executor=Executor(latency=0.01))
    await ready_node(rs, node)
    s = session_factory(url=rs.session_url, api_key=KEY, audio_format="pcm16")
    await s.start()
    s.utterances_sent = 10  # the client's own numbering
    await s.utterance()  # 10: within the burst
    await s.utterance()  # 11: over the tenant's rate
    await eventually(lambda: 11 in s.outcomes())
    [error] = [m for m in s.of_type("error") if m["code"] == "TENANT_RATE_LIMITED"]
    assert error["details"]["utterance_index"] == 11 and "utterance 11 " in error["message"]
    await asyncio.sleep(600 * MS)  # one job's worth of refill
    await s.utterance()  # 12
    await eventually(lambda: 12 in s.outcomes())
    assert s.outcomes() == {10: ["result"], 11: ["missing:job_failed"], 12: ["result"]}
    # streamed: internal indices 3, 4 (refused: over the rate), 5
    await asyncio.sleep(600 * MS)
    for _ in range(2):
        await s.chunk(is_final=True)
    await eventually(lambda: 4 in s.outcomes())
    await asyncio.sleep(600 * MS)
    await s.chunk(is_final=True)
    await eventually(lambda: 5 in s.outcomes())
    outcomes = s.outcomes()
    assert (outcomes[3], outcomes[4], outcomes[5]) == (["result"], ["missing:job_failed"], ["result"])


async def test_a_refused_utterance_is_named_once_by_the_clients_number(
    scheduler_factory: Any, node_factory: Any, session_factory: Any
) -> None:
    """The client's number of a refused utterance is also a live internal index (a streamed
    utterance came first): the error still names the client's number, not the client number of
    the utterance that internal index belongs to."""
    rs = await scheduler_factory(
        auth={
            "tenants": [
                {
                    "tenant_id": "tenant-a",
                    "key_sha256": hash_api_key(KEY),
                    "max_jobs_per_second": per_second(0.5),
                    "jobs_burst": 2,
                }
            ]
        },
        session={"pause_ms": 20_000},
        scheduler={"fleet_view_interval_ms": 10},
    )
    node = node_factory(profile=PROFILE, url=rs.node_url, executor=Executor(latency=3.0))
    await ready_node(rs, node)
    s = session_factory(url=rs.session_url, api_key=KEY, audio_format="pcm16")
    await s.start()
    await s.chunk(is_final=True)  # internal 0, streamed
    s.utterances_sent = 0
    await s.utterance()  # client 0 -> internal 1, still running on the slow node
    await s.utterance()  # client 1 -> internal 2: over the tenant's rate
    await eventually(lambda: any(m["code"] == "TENANT_RATE_LIMITED" for m in s.of_type("error")))
    [error] = [m for m in s.of_type("error") if m["code"] == "TENANT_RATE_LIMITED"]
    assert error["details"]["utterance_index"] == 1 and "utterance 1 " in error["message"]
