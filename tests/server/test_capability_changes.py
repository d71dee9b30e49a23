"""Change is detected by value: load never counts, a real language change counts exactly once."""

from __future__ import annotations

from typing import Any

from lingua_scheduler.protocol.node import NodeLanguageCapabilities
from tests.conftest import RunningScheduler, eventually


async def test_load_only_heartbeats_change_nothing(scheduler: RunningScheduler, node_factory: Any) -> None:
    node = node_factory()
    await node.start()
    await eventually(lambda: len(node.rtts) == 1 and scheduler.state.registry.dirty_count == 0)
    changes = await scheduler.metric("lingua_capability_changes_total")
    publishes = await scheduler.metric("lingua_fleet_view_publishes_total")
    for i in range(200):
        node.running_jobs = i % 4  # load varies on every heartbeat (cpu/gpu/mem are random too)
        await node.heartbeat()
    await eventually(lambda: len(node.rtts) == 201)
    assert await scheduler.metric("lingua_capability_changes_total") == changes
    assert await scheduler.metric("lingua_fleet_view_publishes_total") == publishes
    detail = await scheduler.get_json(f"/api/v1/nodes/{node.node_id}")
    assert detail["heartbeats"] == 201
    assert detail["load"]["reported_running_jobs"] == 199 % 4

    # one heartbeat with a changed language set moves the counter by exactly one
    langs = NodeLanguageCapabilities(
        asr_languages=["en", "zh", "ja"],
        tts_languages=["en", "zh", "ja"],
        nmt_capabilities=node.profile.languages().nmt_capabilities,
    )
    await node.heartbeat(language_capabilities=langs)
    await eventually(lambda: len(node.rtts) == 202)
    assert await scheduler.metric("lingua_capability_changes_total") == changes + 1
    detail = await scheduler.get_json(f"/api/v1/nodes/{node.node_id}")
    assert detail["languages"]["asr"] == ["en", "ja", "zh"]
    # repeating the new set is not a change
    await node.heartbeat(language_capabilities=langs)
    await eventually(lambda: len(node.rtts) == 203)
    assert await scheduler.metric("lingua_capability_changes_total") == changes + 1
    await eventually(lambda: scheduler.state.publisher.publishes == publishes + 1)
