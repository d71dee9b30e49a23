"""Routing of node answers across instances (Redis mode): a session on instance A, its jobs on nodes
connected to instance B. B routes a node's job message to A only for an attempt that was given to
that very node; nothing a node sends removes or replaces the route of an attempt running on another
node. What does not qualify is dropped at B as stale and counted (``lingua_stale_job_messages``)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from lingua_scheduler.sim.nodes import Behavior, Executor, SimulatedNode
from lingua_scheduler.sim.sessions import SimulatedSession
from tests.conftest import eventually
from tests.redis_support import RedisServer, cluster_cfg, has_redis, ready_in_view, start_instances
from tests.server.test_faults import check_sessions, profile

pytestmark = pytest.mark.skipif(not has_redis(), reason="no redis-server binary")

STALE = "lingua_stale_job_messages_total"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def forged_result(job: dict[str, Any], node_id: str | None, attempt: int, **fields: Any) -> dict[str, Any]:
    return {
        "type": "job_result",
        "job_id": job["job_id"],
        "attempt_id": attempt,
        "node_id": node_id,
        "session_id": job["session_id"],
        "utterance_index": job["utterance_index"],
        "trace_id": job["trace_id"],
        "processing_time_ms": 5,
        **fields,
    }


async def test_late_result_of_abandoned_attempt_keeps_the_new_attempts_route(
    redis_server: RedisServer, scheduler_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """Node N1 (on B) takes attempt 1 and its connection dies: A fails the job over to N2 (also on
    B), whose job runs 1.5 s. Meanwhile N1 reconnects with its id and answers its abandoned attempt
    late (a failure), then forges a success for attempt 2, which it was never given. Must hold: the
    utterance is answered by N2's result, once, well before any deadline (N1's late answer did not
    take N2's route away); the late failure reaches A, which drops it as stale (not the current
    attempt); the forged result is dropped at B and counted there."""
    cfg = cluster_cfg(redis_server.url, "rt" + secrets.token_hex(3))
    a, b = await start_instances(scheduler_factory, 2, cfg)
    n1 = SimulatedNode(http, b.node_url, profile(), executor=Executor(behavior=Behavior.NEVER_ACK), seed=1)
    n2 = SimulatedNode(http, b.node_url, profile(), executor=Executor(latency=1.5), seed=2)
    s = SimulatedSession(http, a.session_url)
    n1_again: SimulatedNode | None = None
    try:
        await n1.start()
        await eventually(lambda: ready_in_view(a, n1.node_id), 5)
        await s.start()
        first = n1.wait_for(lambda m: m.get("type") == "job_assign", timeout=5)
        await s.utterance()
        job = await first
        await n2.start()
        await eventually(lambda: ready_in_view(a, n2.node_id), 5)
        second = n2.wait_for(lambda m: m.get("type") == "job_assign", timeout=5)
        await n1.kill()
        assert (await second)["attempt_id"] == 2
        # N2's ack went through B to A
        await eventually(lambda: any(m.get("event") == "NODE_ACCEPTED" for m in s.of_type("ui_event")), 5)
        stale_a, stale_b = await a.metric(STALE), await b.metric(STALE)
        n1_again = SimulatedNode(http, b.node_url, profile(), node_id=n1.node_id, seed=3)
        await n1_again.start()
        error = {"code": "INTERNAL_ERROR", "message": "cancelled"}
        await n1_again.send(forged_result(job, n1.node_id, 1, success=False, error=error))
        await n1_again.send(
            forged_result(job, n1.node_id, 2, success=True, text_asr="forged", text_translated="x")
        )
        await eventually(s.settled, timeout=5)  # N2's result, well before its execution deadline
        assert s.outcomes() == {0: ["result"]}
        (result,) = s.of_type("translation_result")
        assert result["text_asr"] == "asr 0", result  # N2's, not the forged one
        assert n2.jobs_done == 1
        await eventually(lambda: b.state.cluster.stale_routes == 1, timeout=5)
        assert await b.metric(STALE) == stale_b + 1  # the forged result
        assert await a.metric(STALE) == stale_a + 1  # the late failure: not the current attempt
        check_sessions([s])
        await eventually(lambda: b.state.cluster.remote_jobs == {}, timeout=5)
    finally:
        for peer in (n1, n2, *([n1_again] if n1_again else [])):
            await peer.close()
        await s.disconnect()


async def test_result_for_a_job_never_given_to_the_node_is_dropped(
    redis_server: RedisServer, scheduler_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """A's session's job runs on N2 (on B). A node R, also on B, that was never given the job sends
    a successful job_result for it. Must hold: R's result is dropped at B and counted, the job is
    not affected (N2's result is delivered, once), and A sees nothing of R."""
    cfg = cluster_cfg(redis_server.url, "rg" + secrets.token_hex(3))
    a, b = await start_instances(scheduler_factory, 2, cfg)
    n2 = SimulatedNode(http, b.node_url, profile(), executor=Executor(latency=1.5), seed=2)
    rogue = SimulatedNode(http, b.node_url, profile(), seed=3)
    s = SimulatedSession(http, a.session_url)
    try:
        await n2.start()
        await eventually(lambda: ready_in_view(a, n2.node_id), 5)
        await s.start()
        assigned = n2.wait_for(lambda m: m.get("type") == "job_assign", timeout=5)
        await s.utterance()
        job = await assigned
        await rogue.start()
        stale_a, stale_b = await a.metric(STALE), await b.metric(STALE)
        forged = forged_result(job, rogue.node_id, 1, success=True, text_asr="forged", text_translated="x")
        await rogue.send(forged)
        await eventually(s.settled, timeout=5)
        (result,) = s.of_type("translation_result")
        assert result["text_asr"] == "asr 0", result
        assert await b.metric(STALE) == stale_b + 1
        assert await a.metric(STALE) == stale_a  # never forwarded
        check_sessions([s])
    finally:
        for peer in (n2, rogue):
            await peer.close()
        await s.disconnect()
