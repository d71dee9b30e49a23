"""Admin actions through the real HTTP API: authentication, drain/undrain, disconnect, cancel, audit."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from lingua_scheduler.config import load_config
from lingua_scheduler.errors import ConfigError
from lingua_scheduler.sim.nodes import Behavior, Executor
from tests.conftest import RunningScheduler, eventually

TOKEN = "test-admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FAST = {
    "jobs": {"ack_timeout_ms": 5000, "pending_timeout_ms": 400, "retention_seconds": 5},
    "session": {"pause_ms": 300},
    "scheduler": {"fleet_view_interval_ms": 10},
}
ROUTES = [
    ("GET", "/api/v1/admin/check"),
    ("POST", "/api/v1/admin/nodes/node-X/drain"),
    ("POST", "/api/v1/admin/nodes/node-X/undrain"),
    ("POST", "/api/v1/admin/nodes/node-X/disconnect"),
    ("POST", "/api/v1/admin/nodes/node-X/forget"),
    ("POST", "/api/v1/admin/offline-nodes/forget?older_than_seconds=60"),
    ("POST", "/api/v1/admin/jobs/job-X/cancel"),
]


@pytest.fixture
async def sched(scheduler_factory: Any) -> RunningScheduler:
    rs: RunningScheduler = await scheduler_factory(admin={"token": TOKEN}, **FAST)
    return rs


async def call(rs: RunningScheduler, method: str, path: str, **kw: Any) -> tuple[int, Any, Any]:
    async with rs.http.request(method, rs.base + path, **kw) as r:
        return r.status, await r.json(), r.headers


async def start_nodes(rs: RunningScheduler, node_factory: Any, n: int, **kw: Any) -> list[Any]:
    nodes = [node_factory(url=rs.node_url, **kw) for _ in range(n)]
    for node in nodes:
        await node.start()
    ids = {node.node_id for node in nodes}
    view = rs.state.publisher

    def ready() -> bool:
        return all((nv := view.view.get(i)) is not None and nv.status == "ready" for i in ids)

    await eventually(ready)
    return nodes


# --- authentication ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_disabled_without_token(scheduler_factory: Any, method: str, path: str) -> None:
    rs = await scheduler_factory()
    for headers in ({}, AUTH):
        status, body, _ = await call(rs, method, path, headers=headers)
        assert status == 403 and body["code"] == "ADMIN_DISABLED"


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_refused_without_valid_token(sched: RunningScheduler, method: str, path: str) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token-wrong-token-wrong"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},  # a prefix is not the token
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": "Bearer"},
    ):
        status, body, hdrs = await call(sched, method, path, headers=headers)
        assert status == 401, headers
        assert body["code"] == "UNAUTHORIZED" and TOKEN not in body["message"]
        assert hdrs["WWW-Authenticate"].startswith("Bearer")
    assert await sched.metric("lingua_admin_actions_total", "") == 0  # labelled: no bare sample
    tail = path.split("?")[0]
    action = (
        "forget_offline"
        if "/offline-nodes/" in tail
        else tail.rsplit("/", 1)[-1].replace("cancel", "cancel_job")
    )
    assert (
        await sched.metric("lingua_admin_actions_total", f'{{action="{action}",result="unauthorized"}}') == 7
    )


async def test_check_and_unknown_targets(sched: RunningScheduler) -> None:
    status, body, _ = await call(
        sched, "GET", "/api/v1/admin/check", headers={"authorization": f"bearer {TOKEN}"}
    )
    assert status == 200 and body == {"ok": True}  # scheme and header name are case-insensitive
    for method, path in ROUTES[1:]:
        if "/offline-nodes/" in path:
            continue  # no target: nothing to forget is a 200 (test_forget_nodes.py)
        status, body, _ = await call(sched, method, path, headers=AUTH)
        assert status == 404 and body["code"] == "NOT_FOUND", path
    status, body, _ = await call(sched, "GET", "/api/v1/admin/nodes/node-X/drain", headers=AUTH)
    assert status == 405 and body["code"] == "METHOD_NOT_ALLOWED"


def test_token_config() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(env={"LINGUA_ADMIN__TOKEN": "short"})
    assert err.value.key == "admin.token" and "16" in err.value.reason
    assert load_config(env={"LINGUA_ADMIN__TOKEN": TOKEN}).admin.token == TOKEN
    assert load_config(env={}).admin.token == ""


# --- drain / undrain --------------------------------------------------------------------------------


async def test_drain_lets_inflight_finish_and_takes_no_new_job(
    sched: RunningScheduler, node_factory: Any, session_factory: Any
) -> None:
    [node] = await start_nodes(sched, node_factory, 1, executor=Executor(latency=0.4))
    s = session_factory(url=sched.session_url)
    await s.start()
    assigned = node.wait_for(lambda m: m.get("type") == "job_assign")
    await s.utterance()
    await assigned

    told = node.wait_for(lambda m: m.get("type") == "node_status" and m["status"] == "draining")
    status, body, _ = await call(
        sched, "POST", f"/api/v1/admin/nodes/{node.node_id}/drain", headers={**AUTH, "X-Operator": "alice"}
    )
    assert status == 200
    assert body == {
        "action": "drain",
        "node_id": node.node_id,
        "status": "draining",
        "drain_requested": True,
        "connected": True,
        "changed": True,
        "published": True,
    }
    assert (await told)["reason"] == "drained by operator"
    # selection no longer offers it the moment the action answered
    sim = await sched.get_json("/api/v1/pools/simulate?src_lang=en&tgt_lang=zh")
    assert sim["selected_node_id"] is None
    # the in-flight job finishes on the draining node
    await eventually(lambda: len(s.of_type("translation_result")) == 1, timeout=3)
    # a new job finds no node and fails explicitly
    err = s.wait_for(lambda m: m.get("type") == "error")
    await s.utterance()
    assert (await err)["code"] == "NO_AVAILABLE_NODE"
    assert len([m for m in node.received if m["type"] == "job_assign"]) == 1
    # draining twice changes nothing
    status, body, _ = await call(sched, "POST", f"/api/v1/admin/nodes/{node.node_id}/drain", headers=AUTH)
    assert status == 200 and body["changed"] is False and body["status"] == "draining"

    told = node.wait_for(lambda m: m.get("type") == "node_status" and m["status"] == "ready")
    status, body, _ = await call(sched, "POST", f"/api/v1/admin/nodes/{node.node_id}/undrain", headers=AUTH)
    assert status == 200 and body["status"] == "ready" and body["changed"] and not body["drain_requested"]
    await told
    await s.utterance()
    await eventually(lambda: len(s.of_type("translation_result")) == 2, timeout=3)

    detail = await sched.get_json(f"/api/v1/nodes/{node.node_id}")
    assert any("drained by operator" in h["event"] for h in detail["history"])
    events = await sched.get_json("/api/v1/events?kind=admin")
    assert [(e["action"], e["operator"]) for e in events["events"]][-3:] == [
        ("undrain", "anonymous"),
        ("drain", "anonymous"),
        ("drain", "alice"),
    ]
    assert await sched.metric("lingua_admin_actions_total", '{action="drain",result="ok"}') == 2
    sched.state.registry.validate()


async def test_drain_survives_reconnect(sched: RunningScheduler, node_factory: Any) -> None:
    [node] = await start_nodes(sched, node_factory, 1)
    status, _, _ = await call(sched, "POST", f"/api/v1/admin/nodes/{node.node_id}/drain", headers=AUTH)
    assert status == 200
    await node.close()
    await eventually(lambda: sched.state.registry.nodes[node.node_id].status == "offline")
    again = node_factory(url=sched.node_url, node_id=node.node_id)
    await again.start()
    await eventually(lambda: sched.state.registry.nodes[node.node_id].status == "draining")


# --- disconnect ---------------------------------------------------------------------------------------


async def test_disconnect_closes_the_socket(
    sched: RunningScheduler, node_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    [node, other] = await start_nodes(sched, node_factory, 2)
    caplog.set_level(logging.INFO, logger="lingua_scheduler.server.http.admin")
    status, body, _ = await call(
        sched,
        "POST",
        f"/api/v1/admin/nodes/{node.node_id}/disconnect",
        headers={**AUTH, "X-Operator": "bob\u00e9"},
        json={"reason": "maintenance"},
    )
    assert status == 200
    assert body["status"] == "offline" and body["connected"] is False and body["action"] == "disconnect"
    await eventually(lambda: node.closed)
    assert sched.state.registry.nodes[other.node_id].status == "ready"
    status, body, _ = await call(
        sched, "POST", f"/api/v1/admin/nodes/{node.node_id}/disconnect", headers=AUTH
    )
    assert status == 409 and body["code"] == "NOT_CONNECTED"
    # audited: who and what, never the token
    records = [r for r in caplog.records if r.name == "lingua_scheduler.server.http.admin"]
    done = [r for r in records if getattr(r, "result", None) == "ok"]
    assert len(done) == 1
    rec: Any = done[0]
    # the operator name is cleaned to printable ASCII (it lands in logs)
    assert (rec.action, rec.operator, rec.node_id) == ("disconnect", "bob", node.node_id)
    assert rec.remote == "127.0.0.1"
    assert all(TOKEN not in str(r.__dict__) for r in records)
    events = await sched.get_json("/api/v1/events?kind=node_status")
    assert any(e["node_id"] == node.node_id and e["new"] == "offline" for e in events["events"])


# --- cancel a job -------------------------------------------------------------------------------------


async def test_cancel_job(sched: RunningScheduler, node_factory: Any, session_factory: Any) -> None:
    [node] = await start_nodes(sched, node_factory, 1, executor=Executor(behavior=Behavior.NEVER_ACK))
    s = session_factory(url=sched.session_url)
    await s.start()
    assigned = node.wait_for(lambda m: m.get("type") == "job_assign")
    index = await s.utterance()
    job_id = (await assigned)["job_id"]
    cancel = node.wait_for(lambda m: m.get("type") == "job_cancel")
    err = s.wait_for(lambda m: m.get("type") == "error")
    missing = s.wait_for(lambda m: m.get("type") == "missing_result")

    status, body, _ = await call(
        sched, "POST", f"/api/v1/admin/jobs/{job_id}/cancel", headers=AUTH, json={"reason": "stuck job"}
    )
    assert status == 200 and body == {
        "action": "cancel_job",
        "job_id": job_id,
        "state": "cancelled",
        "attempt": 1,
    }
    assert (await cancel)["job_id"] == job_id
    e = await err
    assert e["code"] == "JOB_CANCELLED" and e["message"] == "stuck job" and e["details"]["job_id"] == job_id
    m = await missing
    assert m["utterance_index"] == index and m["reason"] == "job_failed"
    job = await sched.get_json(f"/api/v1/jobs/{job_id}")
    assert job["state"] == "cancelled" and job["history"][-1]["reason"] == "stuck job"
    assert sched.state.registry.nodes[node.node_id].load.inflight == 0

    status, body, _ = await call(sched, "POST", f"/api/v1/admin/jobs/{job_id}/cancel", headers=AUTH)
    assert status == 409 and body["code"] == "JOB_ENDED"
    status, body, _ = await call(sched, "POST", "/api/v1/admin/jobs/job-nope/cancel", headers=AUTH)
    assert status == 404 and body["code"] == "NOT_FOUND"
    assert await sched.metric("lingua_jobs_total", '{outcome="cancelled"}') == 1
    sched.state.engine.store.validate()


async def test_node_of_another_instance_refused(sched: RunningScheduler, node_factory: Any) -> None:
    [node] = await start_nodes(sched, node_factory, 1)
    entry = sched.state.registry.nodes[node.node_id]
    entry.owner = "instance-b"  # as the multi-instance directory marks a node another instance holds
    try:
        for action in ("drain", "undrain", "disconnect"):
            status, body, _ = await call(
                sched, "POST", f"/api/v1/admin/nodes/{node.node_id}/{action}", headers=AUTH
            )
            assert status == 409 and body["code"] == "REMOTE_NODE" and "instance-b" in body["message"]
        assert entry.status == "ready" and not entry.drain_requested and not node.closed
    finally:
        entry.owner = None
