"""The optional node protocol additions through the real ``/ws/node`` endpoint: declared capacity
(``max_concurrent_jobs``), declared load (``resource_usage.load`` against ``load_threshold``) and the
node-initiated drain (``node_drain`` -> ``node_drain_ack``)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from lingua_scheduler.sim.nodes import Executor, SimulatedNode
from tests.conftest import RunningScheduler, eventually

FAST = {
    "jobs": {"ack_timeout_ms": 2000, "pending_timeout_ms": 3000, "retention_seconds": 0.2},
    "scheduler": {"fleet_view_interval_ms": 10, "max_concurrent_jobs_per_node": 4},
}


@pytest.fixture
async def sched(scheduler_factory: Any) -> RunningScheduler:
    rs: RunningScheduler = await scheduler_factory(**FAST)
    return rs


async def registered(node: SimulatedNode, **fields: Any) -> dict[str, Any]:
    """Connect and register with extra ``node_register`` fields; the first heartbeat makes it ready."""
    await node.connect()
    waiter = node.wait_for(lambda m: m.get("type") in ("node_register_ack", "error"))
    await node.send(msgspec.structs.replace(node.profile.register_message(node.node_id), **fields))
    reply = await waiter
    if reply["type"] == "node_register_ack":
        node.node_id = reply["node_id"]
    return reply


async def pick(rs: RunningScheduler) -> dict[str, Any]:
    body: dict[str, Any] = await rs.get_json("/api/v1/pools/simulate?src_lang=en&tgt_lang=zh")
    return body


def ready(rs: RunningScheduler, node_id: str) -> bool:
    nv = rs.state.publisher.view.get(node_id)
    return nv is not None and nv.status == "ready"


async def heartbeat(node: SimulatedNode, running: int = 0, load: float | None = None) -> None:
    hb = node.heartbeat_message()
    usage = msgspec.structs.replace(
        hb.resource_usage,
        running_jobs=running,
        load=load,
        cpu_percent=10.0,
        mem_percent=10.0,
        gpu_percent=10.0,
    )
    ack = node.wait_for(lambda m: m.get("type") == "node_heartbeat_ack" and m["timestamp"] == hb.timestamp)
    await node.send(msgspec.structs.replace(hb, resource_usage=usage))
    await ack


async def test_declared_slots_replace_the_default(sched: RunningScheduler, node_factory: Any) -> None:
    node = node_factory(url=sched.node_url)
    assert (await registered(node, max_concurrent_jobs=1))["type"] == "node_register_ack"
    await heartbeat(node, running=0)
    await eventually(lambda: ready(sched, node.node_id))
    assert (await pick(sched))["selected_node_id"] == node.node_id
    await heartbeat(node, running=1)  # one job is its whole capacity (the default would allow 4)
    body = await pick(sched)
    assert body["selected_node_id"] is None and body["breakdown"]["capacity_exceeded"] == 1

    other = node_factory(url=sched.node_url)
    assert (await registered(other))["type"] == "node_register_ack"  # declares nothing: the default
    await heartbeat(other, running=3)
    await eventually(lambda: ready(sched, other.node_id))
    assert (await pick(sched))["selected_node_id"] == other.node_id
    shown = [(await sched.get_json(f"/api/v1/nodes/{n.node_id}"))["load"]["max_jobs"] for n in (node, other)]
    assert shown == [1, 4]


async def test_declared_slots_bound_what_a_node_is_given(
    sched: RunningScheduler, node_factory: Any, session_factory: Any
) -> None:
    node = node_factory(url=sched.node_url, executor=Executor(latency=0.3))
    await registered(node, max_concurrent_jobs=1)
    await node.heartbeat()
    await eventually(lambda: ready(sched, node.node_id))
    sessions = [session_factory(url=sched.session_url) for _ in range(3)]
    for s in sessions:
        await s.start()
    for s in sessions:
        await s.utterance()
    await eventually(lambda: all(s.of_type("translation_result") for s in sessions), timeout=10)
    assert node.jobs_done == 3 and node.max_running == 1


async def test_declared_load_over_its_threshold_takes_no_new_job(
    sched: RunningScheduler, node_factory: Any
) -> None:
    node = node_factory(url=sched.node_url)
    await registered(node, load_threshold=0.5)
    await heartbeat(node, load=0.4)
    await eventually(lambda: ready(sched, node.node_id))
    assert (await pick(sched))["selected_node_id"] == node.node_id
    await heartbeat(node, load=0.5)  # at the threshold: full
    load = (await sched.get_json(f"/api/v1/nodes/{node.node_id}"))["load"]
    assert (load["node_load"], load["node_load_threshold"]) == (0.5, 0.5)
    body = await pick(sched)
    assert body["selected_node_id"] is None and body["breakdown"]["resource_threshold_exceeded"] == 1
    await heartbeat(node, load=None)  # a heartbeat without a load clears it
    assert (await pick(sched))["selected_node_id"] == node.node_id

    plain = node_factory(url=sched.node_url)  # no threshold declared: 1, a load of 1 means full
    await registered(plain)
    await heartbeat(node, load=0.9)
    await heartbeat(plain, load=1.0)
    await eventually(lambda: ready(sched, plain.node_id))
    body = await pick(sched)
    assert body["selected_node_id"] is None and body["breakdown"]["resource_threshold_exceeded"] == 2
    await heartbeat(plain, load=0.99)
    assert (await pick(sched))["selected_node_id"] == plain.node_id


async def test_out_of_range_declarations_are_refused_by_field(
    sched: RunningScheduler, node_factory: Any
) -> None:
    node = node_factory(url=sched.node_url)
    for fields, path in (
        ({"max_concurrent_jobs": 0}, "$.max_concurrent_jobs"),
        ({"max_concurrent_jobs": 1025}, "$.max_concurrent_jobs"),
        ({"load_threshold": 1.5}, "$.load_threshold"),
    ):
        reply = await (registered(node, **fields) if node.ws is None else _again(node, **fields))
        assert reply["type"] == "error" and reply["code"] == "INVALID_MESSAGE"
        assert reply["details"]["field"] == path
    assert sched.state.registry.nodes == {}
    await registered_again_ok(node)
    err = node.wait_for(lambda m: m.get("type") == "error")
    hb = node.heartbeat_message()
    bad = msgspec.json.encode(hb).replace(b'"running_jobs":', b'"load":-0.1,"running_jobs":')
    await node.ws.send_str(bad.decode())
    reply = await err
    assert reply["code"] == "INVALID_MESSAGE" and reply["details"]["field"] == "$.resource_usage.load"


async def _again(node: SimulatedNode, **fields: Any) -> dict[str, Any]:
    waiter = node.wait_for(lambda m: m.get("type") in ("node_register_ack", "error"))
    await node.send(msgspec.structs.replace(node.profile.register_message(None), **fields))
    return await waiter


async def registered_again_ok(node: SimulatedNode) -> None:
    reply = await _again(node, max_concurrent_jobs=2, load_threshold=0.8)
    assert reply["type"] == "node_register_ack"
    node.node_id = reply["node_id"]


async def test_node_drain_finishes_running_jobs_and_ends_with_a_new_registration(
    sched: RunningScheduler, node_factory: Any, session_factory: Any
) -> None:
    node = node_factory(url=sched.node_url, executor=Executor(latency=0.5))
    not_yet = node.wait_for(lambda m: m.get("type") == "error")
    await node.connect()
    await node.send({"type": "node_drain", "node_id": "node-X"})
    assert (await not_yet)["code"] == "NOT_REGISTERED"

    await registered(node)
    await node.heartbeat()
    await eventually(lambda: ready(sched, node.node_id))
    s = session_factory(url=sched.session_url)
    await s.start()
    accepted = s.wait_for(lambda m: m.get("event") == "NODE_ACCEPTED")
    await s.utterance()
    await accepted
    drained = node.wait_for(lambda m: m.get("type") == "node_drain_ack")
    status = node.wait_for(lambda m: m.get("type") == "node_status" and m["status"] == "draining")
    await node.send({"type": "node_drain", "node_id": node.node_id, "reason": "shutting down"})
    ack = await drained
    assert ack == {"type": "node_drain_ack", "node_id": node.node_id, "status": "draining", "running_jobs": 1}
    await status
    await eventually(lambda: not ready(sched, node.node_id))  # the published view follows
    body = await pick(sched)
    assert body["selected_node_id"] is None and body["breakdown"]["status_not_ready"] == 1
    await eventually(lambda: len(s.of_type("translation_result")) == 1)  # the running job finished
    second = session_factory(url=sched.session_url)
    await second.start()
    await second.utterance()
    await eventually(lambda: bool(second.of_type("missing_result") or second.of_type("error")), timeout=10)
    assert node.jobs_received == 1  # nothing new while draining

    # the node's process comes back (a new connection, the same id): its own drain is over
    await node.close()
    again = node_factory(url=sched.node_url, node_id=node.node_id)
    await registered(again)
    await again.heartbeat()
    await eventually(lambda: ready(sched, node.node_id))
    assert sched.state.registry.nodes[node.node_id].drain_requested is False
