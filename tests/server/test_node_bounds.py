"""What one node can cost the scheduler is bounded: capability reports, capability changes, node records,
enrollments, and the node listing. Every test goes through real WebSockets and the HTTP API."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from lingua_scheduler.protocol.node import NmtCapability, NodeLanguageCapabilities
from lingua_scheduler.sim.nodes import SimulatedNode
from lingua_scheduler.sim.profiles import NodeProfile
from tests.conftest import MS, RunningScheduler, eventually

SECRET = "fleet-secret-0123456789"


def langs(n: int, prefix: str = "l") -> list[str]:
    return [f"{prefix}{i:03d}" for i in range(n)]


def any_to_any(asr: list[str], tts: list[str], nmt: list[str] | None = None) -> NodeProfile:
    return NodeProfile(asr_languages=asr, tts_languages=tts, nmt_languages=nmt or sorted({*asr, *tts}))


def language_report(profile: NodeProfile) -> NodeLanguageCapabilities:
    return profile.languages()


async def status_of(rs: RunningScheduler, node_id: str) -> int:
    async with rs.http.get(f"{rs.base}/api/v1/nodes/{node_id}") as r:
        return r.status


# --- capability reports ------------------------------------------------------------------------------


async def test_oversized_language_list_is_refused_naming_the_limit(
    scheduler: RunningScheduler, node_factory: Any
) -> None:
    """600 ASR and TTS languages with an any-to-any model (the report that froze the loop): refused with
    INVALID_CAPABILITY_SCHEMA naming the list and its limit; nothing is registered; the socket stays
    open and registers once the report is within bounds."""
    node = node_factory(any_to_any(langs(600), langs(600)))
    await node.connect()
    refused = await node.register()
    assert refused["type"] == "error" and refused["code"] == "INVALID_CAPABILITY_SCHEMA"
    assert refused["details"]["field"] == "language_capabilities.asr_languages"
    assert refused["details"]["limit"] == 64 and refused["details"]["got"] == 600
    assert refused["details"]["key"] == "limits.max_languages_per_list"
    assert "64" in refused["message"]
    assert len(scheduler.state.registry) == 0
    node.profile = any_to_any(["en", "zh"], ["en", "zh"])
    assert (await node.register())["type"] == "node_register_ack"
    assert not node.closed

    # in a heartbeat: acknowledged (liveness counts), refused, and the capabilities stay as they were
    ack = node.wait_for(lambda m: m.get("type") == "error")
    big = any_to_any(langs(65), ["en"]).languages()
    await node.heartbeat(language_capabilities=big)
    error = await ack
    assert error["code"] == "INVALID_CAPABILITY_SCHEMA" and error["details"]["limit"] == 64
    detail = await scheduler.get_json(f"/api/v1/nodes/{node.node_id}")
    assert detail["languages"]["asr"] == ["en", "zh"]
    assert detail["heartbeats"] == 1 and not node.closed


async def test_translation_models_and_pair_lists_are_bounded(
    scheduler: RunningScheduler, node_factory: Any
) -> None:
    node = node_factory(any_to_any(["en", "zh"], ["en", "zh"]))
    await node.start()
    many_models = NodeLanguageCapabilities(
        asr_languages=["en", "zh"],
        tts_languages=["en", "zh"],
        nmt_capabilities=[
            NmtCapability(model_id=f"m{i}", languages=["en", "zh"], rule="any_to_any") for i in range(33)
        ],
    )
    ack = node.wait_for(lambda m: m.get("type") == "error")
    await node.heartbeat(language_capabilities=many_models)
    error = await ack
    assert error["code"] == "INVALID_CAPABILITY_SCHEMA"
    assert error["details"]["field"] == "language_capabilities.nmt_capabilities"
    assert error["details"]["key"] == "limits.max_translation_models" and error["details"]["limit"] == 32


async def test_served_pairs_are_bounded_by_configuration(
    scheduler: RunningScheduler, node_factory: Any
) -> None:
    """The largest accepted report serves exactly max_served_pairs_per_node pairs and the node joins
    exactly that many pools; one more language is refused whole, never cut short."""
    # 32 x 32 any-to-any: 32 x 31 directed pairs + 32 auto -> x = 1024 = the default limit
    at_limit = any_to_any(langs(32), langs(32))
    node = node_factory(at_limit)
    assert (await node.start())["type"] == "node_register_ack"
    state = scheduler.state
    await eventually(
        lambda: (nv := state.publisher.view.get(node.node_id or "")) is not None and bool(nv.pools)
    )
    nv = state.publisher.view.nodes[node.node_id or ""]
    assert len(nv.caps.served_pairs()) == 1024
    assert len({state.publisher.view.pools[p].group for p in nv.pools}) == 1024
    listing = await scheduler.get_json("/api/v1/pools")
    assert listing["pool_count"] == 1024

    over = any_to_any(langs(33), langs(32), langs(33))  # 32 x 31 + 32 + 32 auto = 1056
    other = node_factory(over)
    refused = await other.start()
    assert refused["type"] == "error" and refused["code"] == "INVALID_CAPABILITY_SCHEMA"
    assert refused["details"]["key"] == "limits.max_served_pairs_per_node"
    assert refused["details"]["limit"] == 1024 and refused["details"]["got"] > 1024
    assert len(state.registry) == 1
    assert (await scheduler.get_json("/api/v1/pools"))["pool_count"] == 1024


async def test_a_smaller_served_pairs_limit_applies(scheduler_factory: Any, node_factory: Any) -> None:
    rs = await scheduler_factory(limits={"max_served_pairs_per_node": 10})
    ok = node_factory(any_to_any(["en", "zh", "ja"], ["en", "zh", "ja"]), url=rs.node_url)  # 6 + 3 auto
    assert (await ok.start())["type"] == "node_register_ack"
    big = node_factory(any_to_any(["en", "zh", "ja", "ko"], ["en", "zh", "ja", "ko"]), url=rs.node_url)
    refused = await big.start()
    assert refused["code"] == "INVALID_CAPABILITY_SCHEMA" and refused["details"]["limit"] == 10


# --- capability change rate --------------------------------------------------------------------------


async def test_capability_changes_over_the_budget_are_deferred_and_the_latest_wins(
    scheduler_factory: Any, node_factory: Any
) -> None:
    """Budget 1 change per second, burst 1: the first change applies at once; two more within the
    second are deferred and coalesced: only the latest is applied, once the budget allows."""
    rs = await scheduler_factory(
        scheduler={"fleet_view_interval_ms": 10},
        node_health={"status_scan_interval_seconds": 0.05},
        limits={"capability_changes_per_minute": 60.0, "capability_change_burst": 1},
    )
    node = node_factory(any_to_any(["en", "zh"], ["en", "zh"]), url=rs.node_url)
    await node.start()
    await eventually(lambda: len(node.rtts) == 1)
    changes = await rs.metric("lingua_capability_changes_total")
    sets = [["en", "zh", "ja"], ["en", "zh", "ko"], ["en", "zh", "fr"]]
    reports = [any_to_any(s, s).languages() for s in sets]
    for report in reports:
        await node.heartbeat(language_capabilities=report)
    await eventually(lambda: len(node.rtts) == 4)
    detail = await rs.get_json(f"/api/v1/nodes/{node.node_id}")
    assert detail["languages"]["asr"] == ["en", "ja", "zh"]  # the first change: applied at once
    assert detail["capability_change_pending"] is True
    assert detail["capability_changes_deferred"] == 2
    assert await rs.metric("lingua_capability_changes_total") == changes + 1

    async def applied() -> bool:
        d = await rs.get_json(f"/api/v1/nodes/{node.node_id}")
        return bool(d["languages"]["asr"] == ["en", "fr", "zh"])

    deadline = asyncio.get_running_loop().time() + 5
    while not await applied():
        assert asyncio.get_running_loop().time() < deadline, "the deferred change was never applied"
        await asyncio.sleep(50 * MS)
    detail = await rs.get_json(f"/api/v1/nodes/{node.node_id}")
    assert detail["capability_change_pending"] is False
    # the middle set was never applied: two changes in all, not three
    assert await rs.metric("lingua_capability_changes_total") == changes + 2
    assert await rs.metric("lingua_capability_changes_deferred_total") == 2
    assert rs.state.registry.apply_deferred() == 0
    rs.state.registry.validate()


async def test_alternating_capability_sets_cost_only_the_budget(
    scheduler_factory: Any, node_factory: Any
) -> None:
    """A node alternating two max-size sets on every heartbeat: pool membership is rebuilt at most
    burst + rate x time times, however fast it alternates."""
    rs = await scheduler_factory(
        scheduler={"fleet_view_interval_ms": 10},
        limits={"capability_changes_per_minute": 6.0, "capability_change_burst": 2},
    )
    a = any_to_any(langs(32, "a"), langs(32, "a")).languages()
    b = any_to_any(langs(32, "b"), langs(32, "b")).languages()
    node = node_factory(any_to_any(["en", "zh"], ["en", "zh"]), url=rs.node_url)
    await node.start()
    changes = await rs.metric("lingua_capability_changes_total")
    for i in range(40):
        await node.heartbeat(language_capabilities=a if i % 2 == 0 else b)
    await eventually(lambda: len(node.rtts) == 41)
    applied = await rs.metric("lingua_capability_changes_total") - changes
    assert applied <= 3  # burst 2, plus at most one token refilled (0.1/s) while the test ran
    # every other report is back to the set that applies (nothing to defer); the others wait
    assert await rs.metric("lingua_capability_changes_deferred_total") >= 18


# --- node records ------------------------------------------------------------------------------------


async def test_a_registry_full_of_offline_records_evicts_the_oldest(
    scheduler_factory: Any, node_factory: Any
) -> None:
    rs = await scheduler_factory(limits={"max_node_records": 3})
    gone = []
    for name in ("n-a", "n-b", "n-c"):
        n = node_factory(url=rs.node_url, node_id=name)
        assert (await n.start())["type"] == "node_register_ack"
        await n.close()
        await eventually(lambda n=n: rs.state.registry.nodes[n.node_id or ""].conn is None)
        gone.append(n)
    assert len(rs.state.registry) == 3
    fresh = node_factory(url=rs.node_url, node_id="n-d")
    assert (await fresh.start())["type"] == "node_register_ack"
    assert await status_of(rs, "n-a") == 404  # the oldest offline record made room
    assert await status_of(rs, "n-b") == 200 and await status_of(rs, "n-c") == 200
    assert await rs.metric("lingua_node_records_evicted_total", '{reason="room"}') == 1
    # a known id coming back keeps its record and evicts nothing
    back = node_factory(url=rs.node_url, node_id="n-c")
    assert (await back.start())["type"] == "node_register_ack"
    assert await status_of(rs, "n-b") == 200
    # next: n-b is the only offline record left; then every record is connected and a new id is refused
    e = node_factory(url=rs.node_url, node_id="n-e")
    assert (await e.start())["type"] == "node_register_ack"
    assert await status_of(rs, "n-b") == 404
    refused = await node_factory(url=rs.node_url, node_id="n-f").start()
    assert refused["type"] == "error" and refused["code"] == "NODE_LIMIT_REACHED"
    assert sorted(rs.state.registry.nodes) == ["n-c", "n-d", "n-e"]
    rs.state.registry.validate()


async def test_offline_records_are_evicted_after_the_retention(
    scheduler_factory: Any, node_factory: Any
) -> None:
    rs = await scheduler_factory(
        scheduler={"fleet_view_interval_ms": 10},
        node_health={"status_scan_interval_seconds": 0.05},
        limits={"offline_record_retention_seconds": 0.3},
    )
    stays = node_factory(url=rs.node_url, node_id="n-stays", interval=0.05)
    leaves = node_factory(url=rs.node_url, node_id="n-leaves")
    await stays.start()
    await leaves.start()
    await leaves.close()
    await eventually(lambda: rs.state.registry.nodes["n-leaves"].conn is None)
    assert await status_of(rs, "n-leaves") == 200  # kept for a reconnect, for now
    await eventually(lambda: "n-leaves" not in rs.state.registry.nodes, timeout=5)
    await eventually(lambda: "n-leaves" not in rs.state.publisher.view.nodes)
    assert await status_of(rs, "n-leaves") == 404
    await asyncio.sleep(0.4)
    assert await status_of(rs, "n-stays") == 200  # a connected node is never evicted
    assert await rs.metric("lingua_node_records_evicted_total", '{reason="retention"}') == 1
    rs.state.publisher.validate()


# --- enrollment --------------------------------------------------------------------------------------


def from_source(address: str) -> aiohttp.ClientSession:
    """A client whose connections leave from ``address`` (any 127.0.0.x is a loopback address)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0), limit=0))


async def enroll(rs: RunningScheduler, http: aiohttp.ClientSession, secret: str = SECRET) -> dict[str, Any]:
    node = SimulatedNode(http, rs.node_url, NodeProfile(["en"], ["en"], ["en"]), enrollment_secret=secret)
    await node.connect()
    try:
        return await node.register()
    finally:
        await node.close()


async def test_enrollment_is_rate_limited_per_source(scheduler_factory: Any) -> None:
    rs = await scheduler_factory(
        auth={"node_enrollment_secret": SECRET},
        limits={"enrollments_per_second_per_source": 0.01, "enrollment_burst_per_source": 2},
    )
    one, two = from_source("127.0.0.2"), from_source("127.0.0.3")
    try:
        assert (await enroll(rs, one))["type"] == "node_register_ack"
        assert (await enroll(rs, one, "wrong-secret-0123456789"))["code"] == "UNAUTHORIZED"  # counts too
        refused = await enroll(rs, one)
        assert refused["type"] == "error" and refused["code"] == "RATE_LIMITED"
        assert "limits.enrollments_per_second_per_source" in refused["message"]
        assert refused["details"]["retry_after_ms"] > 0
        assert (await enroll(rs, two))["type"] == "node_register_ack"  # another address: its own budget
    finally:
        await one.close()
        await two.close()
    assert len(rs.state.registry) == 2
    assert (
        await rs.metric("lingua_auth_refusals_total", '{plane="node",reason="enrollment_source_rate"}') == 1
    )


async def test_enrollment_is_rate_limited_per_secret(scheduler_factory: Any) -> None:
    rs = await scheduler_factory(
        auth={"node_enrollment_secret": SECRET},
        limits={"enrollments_per_second_per_secret": 0.01, "enrollment_burst_per_secret": 2},
    )
    clients = [from_source(f"127.0.0.{i}") for i in range(4, 8)]
    try:
        first = await enroll(rs, clients[0])
        assert first["type"] == "node_register_ack"
        # a wrong secret does not use up the fleet's budget
        assert (await enroll(rs, clients[1], "wrong-secret-0123456789"))["code"] == "UNAUTHORIZED"
        assert (await enroll(rs, clients[2]))["type"] == "node_register_ack"
        refused = await enroll(rs, clients[3])
        assert refused["code"] == "RATE_LIMITED"
        assert "limits.enrollments_per_second_per_secret" in refused["message"]
        # an enrolled node reconnecting with its token is no enrollment: never limited
        node = SimulatedNode(
            clients[3],
            rs.node_url,
            NodeProfile(["en"], ["en"], ["en"]),
            node_id=first["node_id"],
            node_token=first["node_token"],
        )
        await node.connect()
        assert (await node.register())["type"] == "node_register_ack"
        await node.close()
    finally:
        for c in clients:
            await c.close()
    assert len(rs.state.registry) == 2


# --- the node listing --------------------------------------------------------------------------------


async def test_node_listing_pages_by_cursor_in_id_order(scheduler_factory: Any, node_factory: Any) -> None:
    rs = await scheduler_factory(scheduler={"fleet_view_interval_ms": 10})
    ids = [f"n-{c}" for c in "gbfadce"]
    nodes = [node_factory(url=rs.node_url, node_id=i) for i in ids]
    for n in nodes:
        await n.start()
    await nodes[0].close()  # n-g offline
    await eventually(lambda: rs.state.registry.nodes["n-g"].conn is None)

    async def walk(**params: str) -> list[list[str]]:
        pages: list[list[str]] = []
        after: str | None = None
        while True:
            q = {"limit": "3", **params, **({"after": after} if after else {})}
            body = await rs.get_json("/api/v1/nodes", params=q)
            pages.append([n["node_id"] for n in body["nodes"]])
            assert body["next_offset"] is None or after is None
            after = body["next_after"]
            if after is None:
                return pages
            assert after == pages[-1][-1]

    pages = await walk()
    assert pages == [["n-a", "n-b", "n-c"], ["n-d", "n-e", "n-f"], ["n-g"]]
    assert await walk() == pages  # stable
    ready = await walk(status="ready")
    assert ready == [["n-a", "n-b", "n-c"], ["n-d", "n-e", "n-f"]]
    body = await rs.get_json("/api/v1/nodes", params={"status": "offline", "limit": "3"})
    assert [n["node_id"] for n in body["nodes"]] == ["n-g"] and body["total"] == 1
    # a cursor need not be a current id: it is a position in id order
    body = await rs.get_json("/api/v1/nodes", params={"after": "n-cc", "limit": "2"})
    assert [n["node_id"] for n in body["nodes"]] == ["n-d", "n-e"] and body["next_after"] == "n-e"
    assert body["total"] == 7
    # a node joining between two pages appears in its place, not twice or never
    body = await rs.get_json("/api/v1/nodes", params={"limit": "2"})
    late = node_factory(url=rs.node_url, node_id="n-bb")
    await late.start()
    rest = await rs.get_json("/api/v1/nodes", params={"after": body["next_after"], "limit": "10"})
    assert [n["node_id"] for n in rest["nodes"]] == ["n-bb", "n-c", "n-d", "n-e", "n-f", "n-g"]
    # language filter: one pass, same order
    body = await rs.get_json("/api/v1/nodes", params={"language": "zh", "limit": "2", "after": "n-b"})
    assert [n["node_id"] for n in body["nodes"]] == ["n-bb", "n-c"] and body["total"] == 8
