"""The cluster view: two instances on a real Redis see each other in GET /api/v1/cluster, /api/v1/stats
carries the cluster-wide sums, and the node API names the instance that holds each node."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import RunningScheduler, eventually
from tests.redis_support import RedisServer, has_redis, instances, ready_in_view


async def test_embedded_mode_is_one_instance(scheduler: RunningScheduler, node_factory: Any) -> None:
    node = node_factory()
    await node.start()
    body = await scheduler.get_json("/api/v1/cluster")
    assert body["mode"] == "embedded" and body["store"] is None and body["totals"] is None
    [me] = body["instances"]
    assert me["self"] is True and me["nodes_total"] == 1
    stats = await scheduler.get_json("/api/v1/stats")
    assert "cluster" not in stats
    assert (await scheduler.get_json(f"/api/v1/nodes/{node.node_id}"))["instance"] is None


@pytest.mark.skipif(not has_redis(), reason="no redis-server binary")
async def test_two_instances_in_the_cluster_view(
    redis_server: RedisServer, scheduler_factory: Any, node_factory: Any, session_factory: Any
) -> None:
    a, b = await instances(scheduler_factory, redis_server.url, tag="cv")
    a_id, b_id = (rs.state.cluster.instance_id for rs in (a, b))
    nodes = [node_factory(url=b.node_url, interval=0.05) for _ in range(2)]
    for n in nodes:
        await n.start()
    await eventually(lambda: all(ready_in_view(a, n.node_id) for n in nodes), timeout=5)
    s = session_factory(url=a.session_url)
    await s.start()

    # each node names the instance holding it, on both instances
    for rs in (a, b):
        detail = await rs.get_json(f"/api/v1/nodes/{nodes[0].node_id}")
        assert detail["instance"] == b_id

    async def cluster_of(rs: RunningScheduler) -> dict[str, Any]:
        body: dict[str, Any] = await rs.get_json("/api/v1/cluster")
        return body

    async def both_seen() -> bool:
        body = await cluster_of(a)
        rows = {r["instance_id"]: r for r in body["instances"]}
        return set(rows) == {a_id, b_id} and all(r["sessions"] is not None for r in rows.values())

    for _ in range(100):
        if await both_seen():
            break
        await asyncio.sleep(0.05)
    body = await cluster_of(a)
    assert body["mode"] == "redis" and body["instance_id"] == a_id
    rows = {r["instance_id"]: r for r in body["instances"]}
    assert set(rows) == {a_id, b_id}
    assert rows[a_id]["self"] is True and rows[b_id]["self"] is False
    assert rows[b_id]["nodes"]["ready"] == 2 and rows[a_id]["nodes_total"] == 0
    assert rows[a_id]["sessions"] == 1 and rows[b_id]["sessions"] == 0
    for row in rows.values():
        assert 0 <= row["presence_age_seconds"] < 1.0  # ticks every 0.2 s, presence TTL 1 s
        assert row["inbox_depth"] >= 0 and row["dead_letters"] == 0
        assert row["address"].startswith("http://127.0.0.1:")
    assert body["store"]["status"] == "ok" and body["store"]["round_trip_seconds"] > 0
    assert body["totals"]["instances"] == 2 and body["totals"]["sessions"] == 1

    # cluster-wide rates: A's own heartbeats are none (its nodes live on B), the cluster's are B's
    async def rates() -> tuple[float, float | None]:
        stats = await a.get_json("/api/v1/stats")
        return stats["heartbeats_per_second"] or 0.0, stats["cluster"]["heartbeats_per_second"]

    for _ in range(60):
        own, total = await rates()
        if total is not None and total > 10:
            break
        await asyncio.sleep(0.1)
    own, total = await rates()
    assert own == 0.0 and total is not None and total > 10, (own, total)
    stats = await a.get_json("/api/v1/stats")
    assert stats["cluster"]["instances"] == 2 and stats["cluster"]["sessions"] == 1
    b_stats = await b.get_json("/api/v1/stats")
    assert b_stats["sessions"] == 0 and b_stats["cluster"]["sessions"] == 1

    # an instance that stops is gone from the view once its presence expires (and its figures with it)
    await b.server.close()
    for _ in range(100):
        body = await cluster_of(a)
        if [r["instance_id"] for r in body["instances"]] == [a_id]:
            break
        await asyncio.sleep(0.05)
    assert [r["instance_id"] for r in body["instances"]] == [a_id]
    assert (await a.get_json("/api/v1/stats"))["cluster"]["instances"] == 1
    raw = redis_server.client().hkeys(a.state.cluster.store.keys.instance_info)
    assert {k.decode() for k in raw} == {a_id}
