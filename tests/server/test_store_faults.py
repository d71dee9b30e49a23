"""Faults of the shared store that leave it answering, in multi-instance mode (Redis): frozen (SIGSTOP)
for longer than the presence TTL while utterances flow through two instances, and out of memory
(``maxmemory`` reached with ``noeviction``: PING answers, every write is refused).

What must hold, beyond what tests/server/test_faults_cluster.py checks for shorter partitions: nothing
the store missed while it was unusable stays wrong once it is back (the reservation sets hold no slot
for a job that ended; all capacity is usable within a few seconds), no instance that lived through the
stall is declared dead, and a store refusing writes is an outage (degraded, /ready 503, a metric).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from lingua_scheduler.sim.nodes import Executor, SimulatedNode
from lingua_scheduler.sim.sessions import SimulatedSession
from tests.conftest import RunningScheduler, eventually
from tests.redis_support import RedisServer, cluster_cfg, has_redis, ready_in_view, start_instances
from tests.server.test_faults import check_sessions, profile

pytestmark = pytest.mark.skipif(not has_redis(), reason="no redis-server binary")

JOBS = {"ack_timeout_ms": 1500, "pending_timeout_ms": 4000, "retention_seconds": 2.0}
TTL_S = 1.0
#: what the log says when an instance declares another dead (server/cluster/cluster.py)
TAKEOVER = "instance presence expired: taking over"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        yield client


def sections(url: str, slots: int = 2) -> dict[str, dict[str, Any]]:
    out = cluster_cfg(
        url, "s" + secrets.token_hex(3), jobs=JOBS, op_timeout_seconds=0.2, presence_ttl_seconds=TTL_S
    )
    out["scheduler"]["max_concurrent_jobs_per_node"] = slots
    return out


def takeovers(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage() == TAKEOVER]


async def reserved(redis: RedisServer, prefix: str, node_id: str) -> int:
    """Slots of ``node_id`` the shared reservation set counts now (unexpired members)."""
    with redis.client() as r:
        sec, usec = r.time()
        now_ms = int(sec) * 1000 + int(usec) // 1000
        return int(r.zcount(f"{{{prefix}:node:{node_id}}}:resv", now_ms, "+inf"))


def no_node_failures(s: SimulatedSession, since: int) -> list[int]:
    return [
        (m.get("details") or {}).get("utterance_index", -1)
        for m in s.messages
        if m["type"] == "error"
        and m.get("code") == "NO_AVAILABLE_NODE"
        and (m.get("details") or {}).get("utterance_index", -1) >= since
    ]


async def test_redis_frozen_longer_than_presence_ttl_under_load(
    scheduler_factory: Callable[..., Any], http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """Two instances, a node and a session on each, jobs of 0.6 s, utterances every 0.25 s from both
    sessions; Redis frozen (SIGSTOP) for 2.5 x the presence TTL, then resumed. Must hold: neither
    instance declares the other dead; within 5 s of the resume no node's reservation set counts more
    slots than the node runs (releases lost in the freeze are re-synced, not left to expire after a
    minute); every utterance ended once, with a result or an explicit failure; after it, a burst that
    fills every slot of the fleet is answered with results only (no NO_AVAILABLE_NODE)."""
    caplog.set_level(logging.WARNING, logger="lingua_scheduler.server.cluster.cluster")
    redis = RedisServer().start()
    cfg = sections(redis.url)
    prefix = cfg["cluster"]["key_prefix"]
    a, b = await start_instances(scheduler_factory, 2, cfg)
    na = SimulatedNode(http, a.node_url, profile(), executor=Executor(latency=0.6), seed=1)
    nb = SimulatedNode(http, b.node_url, profile(), executor=Executor(latency=0.6), seed=2)
    sa, sb = SimulatedSession(http, a.session_url), SimulatedSession(http, b.session_url)
    try:
        for n in (na, nb):
            await n.start()
        for rs in (a, b):
            await eventually(lambda rs=rs: ready_in_view(rs, na.node_id) and ready_in_view(rs, nb.node_id), 5)
        await sa.start()
        await sb.start()

        async def load(seconds: float) -> None:
            t0 = time.monotonic()
            while time.monotonic() - t0 < seconds:
                await sa.utterance()
                await sb.utterance()
                await asyncio.sleep(0.25)

        await load(1.0)
        redis.pause()
        await load(2.5 * TTL_S)
        redis.resume()
        resumed = time.monotonic()
        await eventually(lambda: not a.state.cluster.degraded and not b.state.cluster.degraded, 5)
        # no phantom slot: a reservation set never counts more than its node runs
        while True:
            counts = {
                n.node_id: (await reserved(redis, prefix, n.node_id or ""), n.running_jobs) for n in (na, nb)
            }
            if all(held <= running for held, running in counts.values()):
                break
            assert time.monotonic() - resumed < 5.0, f"reservations of ended jobs still held: {counts}"
            await asyncio.sleep(0.05)
        print(f"reservations consistent {time.monotonic() - resumed:.2f} s after the resume")
        await eventually(lambda: sa.settled() and sb.settled(), timeout=15)
        tally = check_sessions([sa, sb])
        print(f"during the freeze: {dict(tally)}")
        # all capacity usable: 2 slots on each of the 2 nodes, one burst per session
        before = (sa.utterances_sent, sb.utterances_sent)
        for _ in range(2):
            await sa.utterance()
            await sb.utterance()
        await eventually(lambda: sa.settled() and sb.settled(), timeout=10)
        for s, since in zip((sa, sb), before, strict=True):
            assert no_node_failures(s, since) == []
            assert all(s.outcomes()[i] == ["result"] for i in range(since, s.utterances_sent)), s.outcomes()
        check_sessions([sa, sb])
        assert takeovers(caplog) == []
        for rs in (a, b):
            await eventually(lambda rs=rs: rs.state.engine.store.inflight == 0, timeout=5)
        for n in (na, nb):
            assert await reserved(redis, prefix, n.node_id or "") == 0
    finally:
        redis.resume()
        await asyncio.gather(na.close(), nb.close(), sa.disconnect(), sb.disconnect(), return_exceptions=True)
        redis.close()


async def ready_status(rs: RunningScheduler) -> tuple[int, dict[str, Any]]:
    async with rs.http.get(rs.base + "/ready") as r:
        return r.status, await r.json()


async def test_redis_out_of_memory_is_an_outage(
    scheduler_factory: Callable[..., Any], http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """``maxmemory`` set below what Redis uses, policy ``noeviction``: PING still answers, every write
    is refused. Must hold: both instances degrade (/ready 503 naming ``shared_store``, /health says
    why, ``lingua_store_degraded`` 1, the refusals counted), local traffic is still served; when
    ``maxmemory`` is raised both recover, neither declared the other dead, and a node of B serves a
    session of A again."""
    caplog.set_level(logging.WARNING, logger="lingua_scheduler.server.cluster.cluster")
    redis = RedisServer().start()
    a, b = await start_instances(scheduler_factory, 2, sections(redis.url))
    na = SimulatedNode(http, a.node_url, profile(), executor=Executor(latency=0.05), seed=1)
    sa = SimulatedSession(http, a.session_url)
    nb: SimulatedNode | None = None
    try:
        await na.start()
        await eventually(lambda: ready_in_view(a, na.node_id), 5)
        await sa.start()
        assert (await ready_status(a))[0] == 200
        with redis.client() as r:
            r.config_set("maxmemory-policy", "noeviction")
            r.config_set("maxmemory", "1")
            assert r.ping()
        for rs in (a, b):
            await eventually(lambda rs=rs: rs.state.cluster.degraded, timeout=5)
            status, body = await ready_status(rs)
            assert status == 503 and body["checks"]["shared_store"] is False, body
            assert await rs.metric("lingua_store_degraded") == 1
            assert await rs.metric("lingua_store_failures_total", '{kind="refused"}') >= 1
        async with a.http.get(a.base + "/health") as r:
            health = await r.json()
        assert health["store"] == "degraded" and "maxmemory" in health["store_reason"], health
        await sa.utterance()
        await eventually(sa.settled, timeout=5)
        assert sa.outcomes()[0] == ["result"]
        await asyncio.sleep(2 * TTL_S)  # longer than the presence TTL with every tick refused
        with redis.client() as r:
            r.config_set("maxmemory", "0")
        for rs in (a, b):
            await eventually(lambda rs=rs: not rs.state.cluster.degraded, timeout=5)
            assert (await ready_status(rs))[0] == 200
            assert await rs.metric("lingua_store_degraded") == 0
        # cross-instance traffic again: with A's own node gone, a node of B serves A's session
        nb = SimulatedNode(http, b.node_url, profile(), executor=Executor(latency=0.05), seed=2)
        await nb.start()
        await eventually(lambda: ready_in_view(a, nb.node_id if nb else None), 5)
        await na.close()
        await eventually(lambda: not ready_in_view(a, na.node_id), 5)
        await sa.utterance()
        await eventually(sa.settled, timeout=10)
        assert sa.outcomes()[1] == ["result"]
        assert takeovers(caplog) == []
        check_sessions([sa])
    finally:
        await asyncio.gather(
            na.close(), *([nb.close()] if nb else []), sa.disconnect(), return_exceptions=True
        )
        redis.close()
