"""The node protocol through the real ``/ws/node`` endpoint."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import msgspec

from lingua_scheduler.core.status import NodeStatus
from tests.conftest import MS, RunningScheduler, eventually


def is_type(t: str) -> Any:
    return lambda m: m.get("type") == t


async def test_register_ack_and_ready(scheduler: RunningScheduler, node_factory: Any) -> None:
    node = node_factory()
    await node.connect()
    status = node.wait_for(lambda m: m.get("type") == "node_status" and m["status"] == "ready")
    ack = await node.register()
    assert ack["type"] == "node_register_ack"
    assert ack["node_id"].startswith("node-")
    assert ack["status"] == "registering"
    await node.heartbeat()
    msg = await status
    assert msg["node_id"] == ack["node_id"] and msg["reason"]
    assert scheduler.state.registry.nodes[ack["node_id"]].status is NodeStatus.READY


async def test_every_heartbeat_is_acked(scheduler: RunningScheduler, node_factory: Any) -> None:
    node = node_factory()
    await node.connect()
    await node.register()
    for _ in range(50):
        await node.heartbeat()
    await eventually(lambda: len(node.rtts) == 50)
    assert scheduler.state.registry.nodes[node.node_id].heartbeats == 50
    assert await scheduler.metric("lingua_heartbeats_total") == 50


async def test_heartbeat_ack_shape(scheduler: RunningScheduler, node_factory: Any) -> None:
    node = node_factory()
    await node.connect()
    await node.register()
    hb = node.heartbeat_message()
    ack_f = node.wait_for(is_type("node_heartbeat_ack"))
    await node.send(hb)
    # The reader consumes acks for RTTs; read the raw ack through a second waiter on the same frame.
    ack = await ack_f
    assert ack["node_id"] == node.node_id
    assert ack["timestamp"] == hb.timestamp
    assert ack["server_ts_ms"] > 0
    assert ack["next_heartbeat_ms"] == 15000


async def test_invalid_frame_answered_and_connection_survives(
    scheduler: RunningScheduler, node_factory: Any
) -> None:
    node = node_factory()
    await node.connect()
    await node.register()
    err = node.wait_for(is_type("error"))
    bad = msgspec.json.encode(node.heartbeat_message()).replace(
        b'"cpu_percent":', b'"cpu_percent":"x","ignored":'
    )
    await node.ws.send_str(bad.decode())
    reply = await err
    assert reply["code"] == "INVALID_MESSAGE"
    assert reply["details"] == {"reason": "wrong_type", "field": "$.resource_usage.cpu_percent"}
    assert "$.resource_usage.cpu_percent" in reply["message"]
    for junk, reason in (
        ("not json", "malformed_json"),
        ('{"type":"nope"}', "unknown_type"),
        ("[]", "wrong_type"),
        ('{"type":"node_heartbeat"}', "missing_field"),
    ):
        err = node.wait_for(is_type("error"))
        await node.ws.send_str(junk)
        reply = await err
        assert (reply["code"], reply["details"]["reason"]) == ("INVALID_MESSAGE", reason), reply
    # still alive and serving
    await node.heartbeat()
    await eventually(lambda: len(node.rtts) == 1)
    assert not node.closed


async def test_oversized_frame_refused(scheduler_factory: Any, node_factory: Any) -> None:
    rs = await scheduler_factory(server={"max_frame_bytes": 4096})
    node = node_factory(url=rs.node_url)
    await node.connect()
    await node.register()
    # over server.max_frame_bytes the socket is closed at the frame's header (1009); the node goes offline
    await node.ws.send_str('{"type":"node_error","node_id":"x","code":"c","message":"' + "a" * 5000 + '"}')
    await eventually(lambda: node.ws.closed)
    assert node.ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    await eventually(lambda: rs.state.registry.nodes[node.node_id].status is NodeStatus.OFFLINE)


async def test_messages_before_registration_refused(scheduler: RunningScheduler, node_factory: Any) -> None:
    node = node_factory()
    await node.connect()
    node.node_id = "node-NOTREGD"
    err = node.wait_for(is_type("error"))
    await node.heartbeat()
    assert (await err)["code"] == "NOT_REGISTERED"
    assert "node-NOTREGD" not in scheduler.state.registry.nodes


async def test_foreign_node_id_refused(scheduler: RunningScheduler, node_factory: Any) -> None:
    a, b = node_factory(), node_factory()
    await a.start()
    await b.start()
    before = scheduler.state.registry.nodes[a.node_id].heartbeats
    err = b.wait_for(is_type("error"))
    await b.send(b.heartbeat_message(node_id=a.node_id))
    reply = await err
    assert reply["code"] == "NODE_ID_MISMATCH"
    assert scheduler.state.registry.nodes[a.node_id].heartbeats == before
    # and a job message for the foreign id is refused the same way
    err = b.wait_for(is_type("error"))
    await b.send(
        {
            "type": "job_ack",
            "job_id": "j",
            "attempt_id": 1,
            "node_id": a.node_id,
            "session_id": "s",
            "trace_id": "t",
        }
    )
    assert (await err)["code"] == "NODE_ID_MISMATCH"


async def test_schema_and_gpu_checks(scheduler: RunningScheduler, node_factory: Any) -> None:
    node = node_factory()
    await node.connect()
    msg = node.profile.register_message()
    for changes, code in (
        ({"capability_schema_version": "1.0"}, "INVALID_CAPABILITY_SCHEMA"),
        ({"capability_schema_version": None}, "INVALID_CAPABILITY_SCHEMA"),
    ):
        err = node.wait_for(is_type("error"))
        await node.send(msgspec.structs.replace(msg, **changes))
        assert (await err)["code"] == code
    no_gpu = msgspec.structs.replace(msg, hardware=msgspec.structs.replace(msg.hardware, gpus=[]))
    err = node.wait_for(is_type("error"))
    await node.send(no_gpu)
    assert (await err)["code"] == "NO_GPU_AVAILABLE"
    # fractional memory is fine (the reference dropped such registrations silently)
    assert msg.hardware.memory_gb % 1 != 0
    ack = await node.register()
    assert ack["type"] == "node_register_ack"
    assert len(scheduler.state.registry) == 1


async def test_reconnect_with_persisted_id(scheduler: RunningScheduler, node_factory: Any) -> None:
    first = node_factory()
    await first.start()
    node_id = first.node_id
    await first.close()
    await eventually(lambda: scheduler.state.registry.nodes[node_id].status is NodeStatus.OFFLINE)
    again = node_factory(node_id=node_id)
    ready = None
    await again.connect()
    ready = again.wait_for(lambda m: m.get("type") == "node_status" and m["status"] == "ready")
    ack = await again.register()
    assert ack["type"] == "node_register_ack" and ack["node_id"] == node_id
    await again.heartbeat()
    await ready
    assert len(scheduler.state.registry) == 1
    scheduler.state.registry.validate()


async def test_conflicting_live_id_refused(scheduler: RunningScheduler, node_factory: Any) -> None:
    first = node_factory()
    await first.start()
    thief = node_factory(node_id=first.node_id)
    await thief.connect()
    reply = await thief.register()
    assert reply["type"] == "error" and reply["code"] == "NODE_ID_CONFLICT"
    # the thief's later close must not take the real node offline
    await thief.close()
    await asyncio.sleep(50 * MS)
    entry = scheduler.state.registry.nodes[first.node_id]
    assert entry.status is NodeStatus.READY and entry.connected


async def test_offline_at_once_on_close(scheduler: RunningScheduler, node_factory: Any) -> None:
    node = node_factory()
    await node.start()
    await eventually(lambda: scheduler.state.registry.nodes[node.node_id].status is NodeStatus.READY)
    await node.kill()  # no close handshake: the TCP connection just dies
    await eventually(
        lambda: scheduler.state.registry.nodes[node.node_id].status is NodeStatus.OFFLINE, timeout=2.0
    )
    assert await scheduler.metric("lingua_nodes", '{status="offline"}') == 1


async def test_offline_after_heartbeat_timeout(scheduler_factory: Any, node_factory: Any) -> None:
    rs = await scheduler_factory(
        node_health={
            "heartbeat_interval_seconds": 0.1,
            "heartbeat_timeout_seconds": 0.3,
            "status_scan_interval_seconds": 0.05,
        }
    )
    node = node_factory(url=rs.node_url, interval=3600)  # connected, but silent after one heartbeat
    await node.connect()
    offline = node.wait_for(lambda m: m.get("type") == "node_status" and m["status"] == "offline", 5)
    await node.register()
    await node.heartbeat()
    msg = await offline
    assert msg["reason"] == "heartbeat timeout"
    assert not node.closed
    # a heartbeat on the still-open socket brings it back
    ready = node.wait_for(lambda m: m.get("type") == "node_status" and m["status"] == "ready", 5)
    await node.heartbeat()
    await ready


async def test_health_reports_counts(scheduler: RunningScheduler, node_factory: Any) -> None:
    nodes = [node_factory() for _ in range(3)]
    for n in nodes:
        await n.start()
    await eventually(lambda: scheduler.state.registry.counts()[NodeStatus.READY] == 3)
    health = await scheduler.get_json("/health")
    assert health["status"] == "ok"
    assert health["nodes"]["ready"] == 3
    assert health["nodes_total"] == 3
