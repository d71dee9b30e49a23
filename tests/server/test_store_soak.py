"""Bounded soak of the shared store's faults (``long``; ``make test-long``): two instances on a real
redis-server under a steady load while Redis is, in turn, frozen (SIGSTOP) for longer than the
presence TTL, out of memory (``maxmemory`` reached, ``noeviction``), restarted empty (every key
lost), and emptied by FLUSHALL (a restart too quick for any call to fail). Three times each, about
70 s in all.

Must hold: every utterance ends in a result or an explicit error the client sees, none twice; within
5 s of the store answering again all capacity is usable: both instances connected, both nodes ready
in both views and published again (records, presence, status for reservations), no reservation
held for a job that ended, and the tenant's sessions counted again (the cap still holds); at the
end a burst that fills every slot of the fleet gets results only.
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

from lingua_scheduler.core.auth import hash_api_key
from lingua_scheduler.sim.nodes import Executor, SimulatedNode
from lingua_scheduler.sim.sessions import SimulatedSession
from tests.conftest import RunningScheduler, eventually
from tests.redis_support import RedisServer, cluster_cfg, has_redis, ready_in_view, start_instances
from tests.server.test_faults import check_sessions, profile
from tests.server.test_store_faults import TAKEOVER, no_node_failures

pytestmark = [pytest.mark.long, pytest.mark.skipif(not has_redis(), reason="no redis-server binary")]

TTL_S = 1.0
SLOTS = 2
KEY = "soak-tenant-key-" + "s" * 32
CAP = 3
#: within this long of the store answering, all capacity must be usable again
RECOVERY_S = 5.0


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        yield client


def sections(url: str) -> dict[str, Any]:
    out: dict[str, Any] = cluster_cfg(
        url,
        "soak" + secrets.token_hex(3),
        jobs={"ack_timeout_ms": 1500, "pending_timeout_ms": 4000, "retention_seconds": 2.0},
        op_timeout_seconds=0.2,
        presence_ttl_seconds=TTL_S,
    )
    out["scheduler"]["max_concurrent_jobs_per_node"] = SLOTS
    out["auth"] = {"tenants": [{"tenant_id": "soak", "key_sha256": hash_api_key(KEY), "max_sessions": CAP}]}
    return out


class Store:
    """What the shared store holds, read with a client of the test's own."""

    def __init__(self, redis: RedisServer, prefix: str) -> None:
        self.redis, self.prefix = redis, prefix

    def published(self, instances: list[str], nodes: list[str], sessions: int) -> bool:
        """Both instances present, both nodes' records, presence and ready status there, and the
        tenant's sessions counted."""
        p = self.prefix
        try:
            with self.redis.client() as r:
                sec, usec = r.time()
                now = int(sec) * 1000 + int(usec) // 1000
                live = {m.decode() for m in r.zrangebyscore(f"{{{p}:fleet}}:instances", now, "+inf")}
                records = {k.decode() for k in r.hkeys(f"{{{p}:fleet}}:nodes")}
                present = {m.decode() for m in r.zrangebyscore(f"{{{p}:fleet}}:presence", now, "+inf")}
                ready = all(r.hget(f"{{{p}:node:{n}}}:state", "status") == b"ready" for n in nodes)
                counted = sum(int(v) for v in r.hvals(f"{{{p}:fleet}}:tenant:soak:counts"))
        except Exception:  # the store is not answering yet
            return False
        return (
            set(instances) <= live
            and set(nodes) <= records
            and set(nodes) <= present
            and ready
            and counted == sessions
        )

    def reserved(self, node_id: str) -> int:
        with self.redis.client() as r:
            sec, usec = r.time()
            now = int(sec) * 1000 + int(usec) // 1000
            return int(r.zcount(f"{{{self.prefix}:node:{node_id}}}:resv", now, "+inf"))


async def test_store_faults_soak(
    scheduler_factory: Callable[..., Any], http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="lingua_scheduler.server.cluster.cluster")
    redis = RedisServer().start()
    cfg = sections(redis.url)
    store = Store(redis, cfg["cluster"]["key_prefix"])
    a, b = await start_instances(scheduler_factory, 2, cfg)
    na = SimulatedNode(http, a.node_url, profile(), executor=Executor(latency=0.3), seed=1)
    nb = SimulatedNode(http, b.node_url, profile(), executor=Executor(latency=0.3), seed=2)
    sa = SimulatedSession(http, a.session_url, api_key=KEY)
    sb = SimulatedSession(http, b.session_url, api_key=KEY)
    extra: list[SimulatedSession] = []
    running = True
    recoveries: dict[str, list[float]] = {"freeze": [], "oom": [], "restart": [], "flush": []}

    async def load() -> None:
        while running:
            await sa.utterance()
            await sb.utterance()
            await asyncio.sleep(0.3)

    def ids(rs: RunningScheduler) -> str:
        return str(rs.state.cluster.instance_id)

    async def recovered(fault: str, answering: float) -> None:
        """All capacity usable again: measured from when the store answers."""
        nodes = [na.node_id or "", nb.node_id or ""]
        while True:
            connected = not a.state.cluster.degraded and not b.state.cluster.degraded
            views = all(ready_in_view(rs, n) for rs in (a, b) for n in nodes)
            slots = all(store.reserved(n.node_id or "") <= n.running_jobs for n in (na, nb))
            if connected and views and slots and store.published([ids(a), ids(b)], nodes, 2):
                break
            assert time.monotonic() - answering < RECOVERY_S, (
                fault,
                {"connected": connected, "views": views, "slots": slots},
            )
            await asyncio.sleep(0.05)
        recoveries[fault].append(round(time.monotonic() - answering, 2))

    try:
        for n in (na, nb):
            await n.start()
        for rs in (a, b):
            await eventually(lambda rs=rs: ready_in_view(rs, na.node_id) and ready_in_view(rs, nb.node_id), 5)
        assert (await sa.start())["type"] == "session_init_ack"
        assert (await sb.start())["type"] == "session_init_ack"
        talking = asyncio.create_task(load())
        for _ in range(3):
            await asyncio.sleep(4)
            redis.pause()
            await asyncio.sleep(2.5 * TTL_S)
            redis.resume()
            await recovered("freeze", time.monotonic())
            await asyncio.sleep(4)
            with redis.client() as r:
                r.config_set("maxmemory-policy", "noeviction")
                r.config_set("maxmemory", "1")
            await eventually(lambda: a.state.cluster.degraded, timeout=5)
            await asyncio.sleep(2 * TTL_S)
            with redis.client() as r:
                r.config_set("maxmemory", "0")
            await recovered("oom", time.monotonic())
            await asyncio.sleep(4)
            redis.restart()  # empty: no persistence
            await recovered("restart", time.monotonic())
            await asyncio.sleep(4)
            # a restart too quick for any call to fail: every key gone, the connections still good
            with redis.client() as r:
                r.flushall()
            await recovered("flush", time.monotonic())
        await asyncio.sleep(3)
        # the tenant's cap still holds after the store lost its data: 2 of 3 places taken, one left
        more = [SimulatedSession(http, rs.session_url, api_key=KEY) for rs in (a, b)]
        extra += more
        replies = [
            r["type"] if r["type"] == "session_init_ack" else r["code"]
            for r in await asyncio.gather(*(s.start() for s in more))
        ]
        assert sorted(replies) == ["TENANT_LIMIT", "session_init_ack"], replies
        running = False
        await talking
        await eventually(lambda: sa.settled() and sb.settled(), timeout=20)
        tally = check_sessions([sa, sb])
        # all capacity usable: every slot of the fleet at once, results only
        before = (sa.utterances_sent, sb.utterances_sent)
        for _ in range(SLOTS):
            await sa.utterance()
            await sb.utterance()
        await eventually(lambda: sa.settled() and sb.settled(), timeout=10)
        for s, since in zip((sa, sb), before, strict=True):
            assert no_node_failures(s, since) == []
            assert all(s.outcomes()[i] == ["result"] for i in range(since, s.utterances_sent)), s.outcomes()
        check_sessions([sa, sb])
        takeovers = [r for r in caplog.records if r.getMessage() == TAKEOVER]
        print(
            f"soak: {sa.utterances_sent + sb.utterances_sent} utterances, {dict(tally)}; "
            f"recovered after (s): {recoveries}; take-overs: {len(takeovers)}; "
            f"republished: {[rs.state.cluster.republished for rs in (a, b)]}"
        )
    finally:
        running = False
        redis.resume()
        await asyncio.gather(
            na.close(),
            nb.close(),
            sa.disconnect(),
            sb.disconnect(),
            *(s.disconnect() for s in extra),
            return_exceptions=True,
        )
        redis.close()
