"""Forgetting offline node records through the admin API: one, all offline longer than N, and a live
node refused; in multi-instance mode the record leaves every instance's view."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import pytest

from lingua_scheduler.core.status import NodeStatus
from tests.conftest import RunningScheduler, eventually
from tests.redis_support import RedisServer, cluster_cfg, has_redis, ready_in_view, start_instances

TOKEN = "forget-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}", "X-Operator": "carol"}


async def post(rs: RunningScheduler, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with rs.http.post(rs.base + path, headers=AUTH if headers is None else headers) as r:
        return r.status, await r.json()


async def test_forget_one_all_older_than_and_live_refused(scheduler_factory: Any, node_factory: Any) -> None:
    rs: RunningScheduler = await scheduler_factory(
        admin={"token": TOKEN}, scheduler={"fleet_view_interval_ms": 10}
    )
    old, young, single, live = (node_factory(url=rs.node_url) for _ in range(4))
    for n in (old, young, single, live):
        await n.start()
    await eventually(lambda: rs.state.registry.counts()[NodeStatus.READY] == 4)
    await old.close()
    await single.close()
    await eventually(lambda: rs.state.registry.counts()[NodeStatus.OFFLINE] == 2)
    await asyncio.sleep(1.0)
    await young.close()
    await eventually(lambda: rs.state.registry.counts()[NodeStatus.OFFLINE] == 3)

    # a live node is refused, and nothing changes
    status, body = await post(rs, f"/api/v1/admin/nodes/{live.node_id}/forget")
    assert status == 409 and body["code"] == "NODE_CONNECTED"
    assert live.node_id in rs.state.registry.nodes
    # no token: refused before anything is done
    status, body = await post(rs, f"/api/v1/admin/nodes/{single.node_id}/forget", headers={})
    assert status == 401 and single.node_id in rs.state.registry.nodes

    # one
    status, body = await post(rs, f"/api/v1/admin/nodes/{single.node_id}/forget")
    assert status == 200, body
    assert body["action"] == "forget" and body["node_id"] == single.node_id and body["offline_seconds"] >= 1.0
    async with rs.http.get(rs.base + f"/api/v1/nodes/{single.node_id}") as r:
        assert r.status == 404
    status, body = await post(rs, f"/api/v1/admin/nodes/{single.node_id}/forget")
    assert status == 404 and body["code"] == "NOT_FOUND"

    # all offline longer than N: the one offline for a second goes, the young one stays
    for bad in ("", "?older_than_seconds=soon", "?older_than_seconds=-1"):
        status, body = await post(rs, "/api/v1/admin/offline-nodes/forget" + bad)
        assert status == 400 and body["code"] == "INVALID_REQUEST" and "older_than_seconds" in body["message"]
    assert rs.state.registry.counts()[NodeStatus.OFFLINE] == 2
    status, body = await post(rs, "/api/v1/admin/offline-nodes/forget?older_than_seconds=0.8")
    assert status == 200, body
    assert body["forgotten"] == [old.node_id] and body["count"] == 1
    stats = await rs.get_json("/api/v1/stats")
    assert stats["nodes"]["offline"] == 1 and stats["nodes_total"] == 2
    listing = await rs.get_json("/api/v1/nodes")
    assert sorted(n["node_id"] for n in listing["nodes"]) == sorted([young.node_id, live.node_id])
    rs.state.registry.validate()

    # audited in the events ring
    events = await rs.get_json("/api/v1/events?kind=admin")
    done = [(e["action"], e["result"]) for e in events["events"]]
    assert ("forget", "ok") in done and ("forget", "conflict") in done and ("forget_offline", "ok") in done

    # a forgotten node that comes back registers afresh
    again = node_factory(url=rs.node_url)
    again.node_id = old.node_id
    await again.start()
    await eventually(lambda: rs.state.registry.nodes.get(old.node_id) is not None)
    assert rs.state.registry.nodes[old.node_id].history[0][1] == "registered"


@pytest.mark.skipif(not has_redis(), reason="no redis-server binary")
async def test_forget_in_multi_instance_mode(
    redis_server: RedisServer, scheduler_factory: Any, node_factory: Any
) -> None:
    sections = {**cluster_cfg(redis_server.url, "fgt" + secrets.token_hex(3)), "admin": {"token": TOKEN}}
    a, b = await start_instances(scheduler_factory, 2, sections)
    gone, live = node_factory(url=b.node_url), node_factory(url=b.node_url)
    for n in (gone, live):
        await n.start()
    await eventually(lambda: ready_in_view(a, gone.node_id) and ready_in_view(a, live.node_id), timeout=5)
    await eventually(lambda: gone.node_id in b.state.cluster._sent_loads, timeout=5)  # its load was shared
    await gone.close()
    await eventually(
        lambda: (
            (e := a.state.registry.nodes.get(gone.node_id)) is not None and e.status is NodeStatus.OFFLINE
        ),
        timeout=5,
    )

    # asked on A, done by B (which holds the record); the record leaves A's view and the directory
    status, body = await post(a, f"/api/v1/admin/nodes/{live.node_id}/forget")
    assert status == 409 and body["code"] == "NODE_CONNECTED"
    status, body = await post(a, f"/api/v1/admin/nodes/{gone.node_id}/forget")
    assert status == 200, body
    assert body["instance"] == b.state.cluster.instance_id and body["shared"] is True
    assert gone.node_id not in b.state.registry.nodes
    # the last load figures B sent for the forgotten node are not kept for ever
    await eventually(lambda: gone.node_id not in b.state.cluster._sent_loads, timeout=5)
    await eventually(lambda: gone.node_id not in a.state.registry.nodes, timeout=5)
    records, _ = await a.state.cluster.store.directory()
    assert gone.node_id not in {r.node_id for r in records}
    assert live.node_id in {r.node_id for r in records}
