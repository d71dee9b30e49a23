"""Admin node actions in multi-instance mode: asked on any instance, done by the node's instance."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

from lingua_scheduler.core.status import NodeStatus
from tests.conftest import RunningScheduler, eventually
from tests.redis_support import RedisServer, cluster_cfg, ready_in_view, start_instances

TOKEN = "test-admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}", "X-Operator": "alice"}


async def post(rs: RunningScheduler, path: str, **kw: Any) -> tuple[int, Any]:
    async with rs.http.post(rs.base + path, headers=AUTH, **kw) as r:
        return r.status, await r.json()


def with_admin(url: str, **cluster: Any) -> dict[str, dict[str, Any]]:
    """Two instances' configuration under a fresh prefix, with the admin API on."""
    return {**cluster_cfg(url, "adm" + secrets.token_hex(3), **cluster), "admin": {"token": TOKEN}}


def status_in_view(rs: RunningScheduler, node_id: str) -> NodeStatus | None:
    nv = rs.state.publisher.view.get(node_id)
    return nv.status if nv is not None else None


async def test_node_actions_asked_on_another_instance_are_done_by_the_owner(
    redis_server: RedisServer, scheduler_factory: Any, node_factory: Any
) -> None:
    a, b = await start_instances(scheduler_factory, 2, with_admin(redis_server.url))
    node = node_factory(url=b.node_url)
    await node.start()
    node_id = node.node_id
    await eventually(lambda: ready_in_view(a, node_id), timeout=5)
    b_id = b.state.cluster.instance_id

    # drain through A: B drains its node and answers; A's view follows B's record
    status, body = await post(a, f"/api/v1/admin/nodes/{node_id}/drain")
    assert status == 200, body
    assert body["instance"] == b_id and body["status"] == "draining" and body["changed"] is True
    assert b.state.registry.nodes[node_id].drain_requested
    await eventually(lambda: status_in_view(a, node_id) is NodeStatus.DRAINING, timeout=5)
    assert any(m.get("type") == "node_status" and m.get("status") == "draining" for m in node.received)
    # again: idempotent, nothing changes
    status, body = await post(a, f"/api/v1/admin/nodes/{node_id}/drain")
    assert status == 200 and body["changed"] is False

    status, body = await post(a, f"/api/v1/admin/nodes/{node_id}/undrain")
    assert status == 200 and body["status"] == "ready" and body["instance"] == b_id
    await eventually(lambda: ready_in_view(a, node_id), timeout=5)

    # disconnect through A: B closes the node's socket (1001) and the node is offline everywhere
    status, body = await post(a, f"/api/v1/admin/nodes/{node_id}/disconnect", json={"reason": "maintenance"})
    assert status == 200 and body["connected"] is False and body["instance"] == b_id
    await eventually(lambda: node.closed, timeout=5)
    await eventually(lambda: not ready_in_view(a, node_id), timeout=5)

    # counted and audited where the operator asked
    assert await a.metric("lingua_admin_actions_total", '{action="drain",result="ok"}') == 2
    assert await a.metric("lingua_admin_actions_total", '{action="disconnect",result="ok"}') == 1
    # a node no instance knows is still a 404
    status, body = await post(a, "/api/v1/admin/nodes/node-nobody/drain")
    assert status == 404 and body["code"] == "NOT_FOUND"


async def test_a_silent_owner_is_a_504_not_a_hang(
    redis_server: RedisServer, scheduler_factory: Any, node_factory: Any
) -> None:
    # presence outlives the test: A keeps B's node in its view while B's inbox is not read
    a, b = await start_instances(
        scheduler_factory, 2, with_admin(redis_server.url, presence_ttl_seconds=30.0)
    )
    node = node_factory(url=b.node_url)
    await node.start()
    await eventually(lambda: ready_in_view(a, node.node_id), timeout=5)
    # B stops reading its inbox (as a frozen instance would)
    cluster_b = b.state.cluster
    assert cluster_b is not None
    [inbox] = [t for t in asyncio.all_tasks() if t.get_name() == cluster_b.task_name("inbox")]
    inbox.cancel()
    status, body = await post(a, f"/api/v1/admin/nodes/{node.node_id}/drain")
    assert status == 504 and body["code"] == "OWNER_TIMEOUT" and "may still take effect" in body["message"]
    assert not b.state.registry.nodes[node.node_id].drain_requested
    assert await a.metric("lingua_admin_actions_total", '{action="drain",result="timeout"}') == 1
