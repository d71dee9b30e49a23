"""Fault injection in multi-instance mode (Redis): an instance killed while its sessions' jobs run on
another instance's nodes, Redis killed and restarted with jobs in flight, and a network partition
between an instance and Redis (the Redis process frozen with SIGSTOP).

Complements tests/server/test_multi_instance.py (an instance killed while its *nodes* run another
instance's jobs; an outage with no job in flight). What must hold is the same as in test_faults.py:
every utterance ends once (result, or explicit failure, or -- for a session on a killed instance --
with the connection, which its client sees), nothing is delivered twice, no node or session is stuck;
and here also: an instance cut off from Redis keeps its event loop responsive, reports itself
degraded, serves its own nodes and sessions, and rejoins when Redis is back.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from lingua_scheduler.sim.nodes import Executor, SimulatedNode
from lingua_scheduler.sim.sessions import SimulatedSession
from tests.conftest import RunningScheduler, eventually
from tests.redis_support import RedisServer, cluster_cfg, has_redis, ready_in_view, start_instances
from tests.scheduler_process import SchedulerProcess
from tests.server.test_faults import Client, assert_nothing_stuck, check_sessions, profile

pytestmark = pytest.mark.skipif(not has_redis(), reason="no redis-server binary")


#: the jobs section of this module's instances: longer pending timeout and retention than cluster_cfg's
JOBS = {"ack_timeout_ms": 1500, "pending_timeout_ms": 4000, "retention_seconds": 2.0}


def cluster_sections(url: str, prefix: str, **cluster: Any) -> dict[str, dict[str, Any]]:
    return cluster_cfg(url, prefix, jobs=JOBS, **cluster)


async def instances(
    factory: Callable[..., Any], url: str, n: int = 2, **cluster: Any
) -> list[RunningScheduler]:
    return await start_instances(factory, n, cluster_sections(url, "f" + secrets.token_hex(3), **cluster))


# --- an instance killed (SIGKILL) with its sessions' jobs running elsewhere ---------------------------


async def test_killed_instance_sessions_reconnect_and_its_jobs_end(
    redis_server: RedisServer, scheduler_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """Sessions on B (a process), their jobs running on nodes connected to A; B dies by SIGKILL.
    Must hold: B's clients see their connection drop (their in-flight utterances end with it); A
    takes over once B's presence expires: every job it ran for B is cancelled on its node and
    forgotten, B's job records are failed, no load is left on A's nodes; the clients reconnect (to
    A, their fallback) and every utterance they send there is answered once."""
    prefix = "k" + secrets.token_hex(3)
    sections = cluster_sections(redis_server.url, prefix)
    a: RunningScheduler = await scheduler_factory(**sections)
    await eventually(lambda: not a.state.cluster.degraded, timeout=5)
    b = SchedulerProcess(**sections).start()
    nodes = [
        SimulatedNode(http, a.node_url, profile(), executor=Executor(latency=8.0), seed=i) for i in range(2)
    ]
    clients = [Client(http, b.session_url, a.session_url) for _ in range(2)]
    try:
        await b.wait_ready(http)
        for n in nodes:
            await n.start()
        cluster = a.state.cluster
        b_id = ""

        async def b_sees_nodes() -> bool:
            nonlocal b_id
            async with http.get(b.base + "/api/v1/nodes") as r:
                body = await r.json()
            async with http.get(b.base + "/health") as r:
                b_id = (await r.json())["instance_id"]
            listed = body["nodes"] if isinstance(body, dict) else body
            return sum(1 for x in listed if x["status"] == "ready") == 2

        for _ in range(100):
            if await b_sees_nodes():
                break
            await asyncio.sleep(0.05)
        for c in clients:
            s = await c.connect()
            for _ in range(3):
                await s.utterance()
        await eventually(lambda: sum(n.jobs_received for n in nodes) == 6, timeout=10)
        assert len(cluster.remote_jobs) == 6
        cancels = [n.wait_for(lambda m: m.get("type") == "job_cancel", timeout=10) for n in nodes]
        b.kill()
        # the clients saw it at once
        await eventually(lambda: all(c.incarnations[0].ws.closed for c in clients), timeout=5)
        # A took over: B's jobs on A's nodes stopped and forgotten, B's records failed, nothing stuck
        await asyncio.gather(*cancels)
        await eventually(lambda: cluster.remote_jobs == {}, timeout=5)
        await eventually(lambda: all(n.running_jobs == 0 for n in nodes), timeout=5)
        await eventually(lambda: not cluster.degraded, timeout=5)
        assert await cluster.store.jobs_of(b_id) == []
        # the clients carry on on A (later jobs are quick)
        for n in nodes:
            n.executor.latency = 0.05
        await asyncio.gather(*(c.talk(3, 0.05) for c in clients))
        await eventually(lambda: all(c.incarnations[-1].settled() for c in clients), timeout=15)
        for c in clients:
            assert len(c.incarnations) == 2
            check_sessions(c.incarnations[:1], lost_ok=True)
            check_sessions(c.incarnations[1:])
            assert all(v == ["result"] for v in c.incarnations[1].outcomes().values()), (
                c.incarnations[1].outcomes(),
                [(m["code"], m["message"]) for m in c.incarnations[1].of_type("error")],
            )
        await eventually(lambda: a.state.engine.store.inflight == 0, timeout=5)
        assert_nothing_stuck(a.state)
    finally:
        await asyncio.gather(
            *(n.close() for n in nodes),
            *(s.disconnect() for c in clients for s in c.incarnations),
            return_exceptions=True,
        )
        b.close()


# --- Redis killed and restarted with jobs in flight ---------------------------------------------------


async def test_redis_outage_with_jobs_in_flight(
    scheduler_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """A session on A whose 3 jobs run on a node of B; Redis dies. Must hold: A degrades, drops B's
    node and fails its jobs over to a node of its own: each utterance gets its result once (the
    node on B finishes the old attempts; what it answers cannot reach A, or is fenced if it does);
    B keeps serving its own session; after Redis returns both rejoin, the node on B serves A's
    session again and no reservation is left over."""
    redis = RedisServer().start()
    a, b = await instances(scheduler_factory, redis.url, op_timeout_seconds=0.2)
    remote = SimulatedNode(http, b.node_url, profile(), executor=Executor(latency=1.5), seed=1)
    local = SimulatedNode(http, a.node_url, profile(), executor=Executor(latency=0.05), seed=2)
    sa, sb = SimulatedSession(http, a.session_url), SimulatedSession(http, b.session_url)
    try:
        await remote.start()
        await eventually(lambda: ready_in_view(a, remote.node_id), timeout=5)
        await sa.start()
        await sb.start()
        for _ in range(3):
            await sa.utterance()
        await eventually(lambda: remote.jobs_received == 3, timeout=5)
        await local.start()
        await eventually(lambda: ready_in_view(a, local.node_id), timeout=5)
        redis.stop()
        await eventually(lambda: a.state.cluster.degraded, timeout=5)
        await eventually(sa.settled, timeout=10)
        assert sa.outcomes() == {0: ["result"], 1: ["result"], 2: ["result"]}, sa.outcomes()
        assert [m["attempt_id"] for m in local.received if m["type"] == "job_assign"] == [2, 2, 2]
        # B, cut off too, serves its own session with its own node
        await sb.utterance()
        await eventually(lambda: sb.outcomes() == {0: ["result"]}, timeout=10)
        redis.start()  # same port, empty
        await eventually(
            lambda: not a.state.cluster.degraded and not b.state.cluster.degraded,
            timeout=10,
        )
        await eventually(lambda: ready_in_view(a, remote.node_id), timeout=10)
        # the node on B is not stuck: with A's own node gone, A's next job runs there
        await local.close()
        await eventually(lambda: not ready_in_view(a, local.node_id), timeout=5)
        remote.executor.latency = 0.05
        await sa.utterance()
        await eventually(lambda: 3 in sa.outcomes(), timeout=10)
        assert sa.outcomes()[3] == ["result"]
        assert [m["attempt_id"] for m in remote.received if m.get("session_id") == sa.session_id] == [
            1,
            1,
            1,
            1,
        ]
        check_sessions([sa, sb])
        await eventually(lambda: a.state.engine.store.inflight == 0, timeout=5)
        assert await a.state.cluster.store.slots_used(remote.node_id, a.state.clock.wall_ms()) == 0
        await eventually(lambda: b.state.cluster.remote_jobs == {}, timeout=5)
    finally:
        await asyncio.gather(
            remote.close(), local.close(), sa.disconnect(), sb.disconnect(), return_exceptions=True
        )
        redis.close()


# --- a network partition between an instance and Redis (SIGSTOP) ------------------------------------


async def run_partition(
    scheduler_factory: Callable[..., Any], http: aiohttp.ClientSession, *, pauses: int, pause_s: float
) -> dict[str, float]:
    redis = RedisServer().start()
    # presence outlives the partition: the instances must not declare each other dead meanwhile
    a, b = await instances(
        scheduler_factory, redis.url, op_timeout_seconds=0.2, presence_ttl_seconds=pause_s + 3.0
    )
    local = SimulatedNode(http, a.node_url, profile(), executor=Executor(latency=0.05), interval=0.1, seed=1)
    s = SimulatedSession(http, a.session_url)
    worst = {"loop_lag_s": 0.0, "heartbeat_rtt_s": 0.0, "health_s": 0.0}
    try:
        await local.start()
        await eventually(lambda: ready_in_view(a, local.node_id), timeout=5)
        await s.start()
        for _ in range(pauses):
            redis.pause()
            t0 = time.monotonic()
            rtts_before = len(local.rtts)
            sent_before = s.utterances_sent
            while time.monotonic() - t0 < pause_s:
                await s.utterance()
                t1 = time.monotonic()
                async with a.http.get(a.base + "/health") as r:
                    health = await r.json()
                worst["health_s"] = max(worst["health_s"], time.monotonic() - t1)
                worst["loop_lag_s"] = max(worst["loop_lag_s"], a.state.loop_lag.recent_max)
                await asyncio.sleep(0.2)
            # degraded, and said so; the event loop never stalled on the frozen store
            assert a.state.cluster.degraded and health["status"] == "degraded"
            acked = local.rtts[rtts_before:]
            assert len(acked) >= pause_s / 0.1 * 0.6, f"only {len(acked)} heartbeats acked in {pause_s} s"
            worst["heartbeat_rtt_s"] = max(worst["heartbeat_rtt_s"], *acked)
            # local traffic was served throughout
            await eventually(s.settled, timeout=5)
            assert all(s.outcomes()[i] == ["result"] for i in range(sent_before, s.utterances_sent))
            redis.resume()
            await eventually(
                lambda: not a.state.cluster.degraded and not b.state.cluster.degraded,
                timeout=10,
            )
        assert worst["loop_lag_s"] < 0.25 and worst["heartbeat_rtt_s"] < 0.25 and worst["health_s"] < 0.5, (
            worst
        )
        # after the partition: cross-instance traffic again (a node on B serves the session on A)
        remote = SimulatedNode(http, b.node_url, profile(), executor=Executor(latency=0.05), seed=2)
        await remote.start()
        await eventually(lambda: ready_in_view(a, remote.node_id), timeout=5)
        await local.close()
        await eventually(lambda: not ready_in_view(a, local.node_id), timeout=5)
        await s.utterance()
        await eventually(s.settled, timeout=10)
        assert s.outcomes()[s.utterances_sent - 1] == ["result"]
        await remote.close()
        check_sessions([s])
        assert all(o == ["result"] for o in s.outcomes().values())
        return worst
    finally:
        redis.resume()
        await asyncio.gather(local.close(), s.disconnect(), return_exceptions=True)
        redis.close()


async def test_partition_from_redis_keeps_instance_responsive(
    scheduler_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """Redis frozen (SIGSTOP) for 3 s: connections stay open, nothing answers. Must hold: A's event
    loop lag stays under 0.25 s, its node's heartbeats keep being acked promptly, /health answers
    fast and says degraded, its session's utterances are all answered; after SIGCONT both instances
    rejoin and cross-instance dispatch works."""
    worst = await run_partition(scheduler_factory, http, pauses=1, pause_s=3.0)
    print(f"worst during the partition: {worst}")


@pytest.mark.long
async def test_partition_from_redis_soak(
    scheduler_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    worst = await run_partition(scheduler_factory, http, pauses=5, pause_s=5.0)
    print(f"worst during the partitions: {worst}")
