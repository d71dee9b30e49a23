"""The read API, health, readiness and metrics through real HTTP: every route, its errors and pagination."""

from __future__ import annotations

from typing import Any

import pytest

from lingua_scheduler.server.http.stats import STATS
from lingua_scheduler.sim.nodes import Executor
from lingua_scheduler.sim.profiles import NodeProfile
from tests.conftest import RunningScheduler, eventually

FAST = {"scheduler": {"fleet_view_interval_ms": 10}, "session": {"pause_ms": 300}}
EN_ZH = NodeProfile(asr_languages=["en", "zh"], tts_languages=["en", "zh"], nmt_languages=["en", "zh"])
EN_DE = NodeProfile(asr_languages=["en", "de"], tts_languages=["en", "de"], nmt_languages=["en", "de"])


@pytest.fixture
async def fleet(scheduler_factory: Any, node_factory: Any) -> tuple[RunningScheduler, list[Any]]:
    """A scheduler with five ready nodes: three en/zh, two en/de."""
    rs: RunningScheduler = await scheduler_factory(**FAST)
    nodes = [
        node_factory(profile=p, url=rs.node_url, executor=Executor(latency=0.01))
        for p in (EN_ZH, EN_ZH, EN_ZH, EN_DE, EN_DE)
    ]
    for n in nodes:
        await n.start()
    await eventually(lambda: rs.state.publisher.view.pools and _ready(rs) == 5)
    return rs, nodes


def _ready(rs: RunningScheduler) -> int:
    return sum(1 for nv in rs.state.publisher.view.nodes.values() if nv.status == "ready")


async def get(rs: RunningScheduler, path: str) -> tuple[int, Any]:
    async with rs.http.get(rs.base + path) as r:
        assert r.content_type == "application/json", path
        return r.status, await r.json()


async def bad_request(rs: RunningScheduler, path: str) -> str:
    status, body = await get(rs, path)
    assert status == 400 and body["code"] == "INVALID_REQUEST", (path, body)
    return str(body["message"])


async def talk(rs: RunningScheduler, session_factory: Any, utterances: int) -> Any:
    s = session_factory(url=rs.session_url)
    await s.start()
    for _ in range(utterances):
        await s.utterance()
    await eventually(lambda: len(s.of_type("translation_result")) == utterances)
    return s


# --- health, readiness, metrics -----------------------------------------------------------------------


async def test_health(fleet: Any) -> None:
    rs, _ = fleet
    status, body = await get(rs, "/health")
    assert (
        status == 200 and body["status"] == "ok" and body["nodes"]["ready"] == 5 and body["nodes_total"] == 5
    )


async def test_ready_and_its_checks(scheduler: RunningScheduler) -> None:
    status, body = await get(scheduler, "/ready")
    assert status == 200
    assert body == {"status": "ready", "checks": {"registry": True, "fleet_view": True, "accepting": True}}
    checks = scheduler.state.readiness_checks
    checks.append(lambda: ("redis", False))

    def broken() -> tuple[str, bool]:
        raise RuntimeError("boom")

    checks.append(broken)
    status, body = await get(scheduler, "/ready")
    assert status == 503 and body["status"] == "not_ready"
    assert body["checks"]["redis"] is False and body["checks"]["broken"] is False
    assert body["checks"]["registry"] is True
    status, _ = await get(scheduler, "/health")  # liveness does not depend on readiness
    assert status == 200


async def test_metrics(fleet: Any, session_factory: Any) -> None:
    rs, nodes = fleet
    await talk(rs, session_factory, 2)
    for _ in range(2):  # the second scrape also shows how long the first took to render
        async with rs.http.get(rs.base + "/metrics") as r:
            assert r.status == 200 and r.content_type == "text/plain"
            text = await r.text()
    for name in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "python_info",
        "lingua_heartbeats_total",
        'lingua_heartbeat_handle_seconds_bucket{le="1e-05"}',
        'lingua_job_end_to_end_seconds_bucket{le="30.0"}',
        "lingua_jobs_submitted_total 2.0",
        'lingua_jobs_total{outcome="completed"} 2.0',
        'lingua_job_states{state="completed"}',
        "lingua_sessions 1.0",
        "lingua_jobs_inflight",
        "lingua_pool_reassignments_total",
        'lingua_operator_events_total{kind="failover"} 0.0',
        "lingua_dashboard_clients 0.0",
        'lingua_operator_render_seconds_count{endpoint="metrics"}',
    ):
        assert name in text, name
    # no per-node or per-session labels, and each series exactly once
    assert not any(n.node_id in text for n in nodes)
    samples = [line.split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")]
    assert len(samples) == len(set(samples))


# --- stats --------------------------------------------------------------------------------------------


async def test_stats(fleet: Any, session_factory: Any) -> None:
    rs, _ = fleet
    await talk(rs, session_factory, 3)
    agg = rs.app[STATS]
    agg.tick()
    agg.snapshot(force=True)
    status, body = await get(rs, "/api/v1/stats")
    assert status == 200
    assert body["nodes"] == {"registering": 0, "ready": 5, "degraded": 0, "draining": 0, "offline": 0}
    assert body["nodes_total"] == 5 and body["sessions"] == 1
    assert body["jobs"]["by_state"]["completed"] == 3 and body["jobs"]["inflight"] == 0
    assert body["jobs"]["per_second"]["created"] > 0 and body["totals"]["created"] == 3
    assert body["totals"]["completed"] == 3 and body["totals"]["heartbeats"] >= 5
    lm = body["latency_last_minute"]
    assert lm["dispatch"]["count"] == 3 and lm["end_to_end"]["count"] == 3 and lm["selection"]["count"] >= 3
    assert lm["heartbeat_handle"]["count"] >= 5
    for name in ("heartbeat_handle", "selection", "dispatch", "end_to_end"):
        assert 0 < lm[name]["p50"] <= lm[name]["p99"] <= 30, name
    assert body["latency"]["job_dispatch_seconds"]["p50"] > 0
    pairs = {p["pair"]: p for p in body["language_pairs"]}
    # en<->zh, en<->de, and auto->en/zh/de (language identification)
    assert body["language_pairs_total"] == len(pairs) == 7
    demand = pairs["en->zh"]["demand"]
    assert demand["sessions"] == 1 and demand["jobs_last_minute"] == 3 and demand["jobs_per_second"] > 0
    assert pairs["en->zh"]["supply"] == {"nodes": 3, "ready": 3, "slots": 12}
    assert pairs["de->en"]["supply"]["ready"] == 2 and pairs["de->en"]["demand"]["sessions"] == 0
    assert body["language_pairs"][0]["pair"] == "en->zh"  # the busiest first
    assert body["pools"]["mode"] == "language_pair" and body["pools"]["groups"] == 7


async def test_stats_cached_but_counts_current(fleet: Any, node_factory: Any) -> None:
    rs, _ = fleet
    agg = rs.app[STATS]
    first = await rs.get_json("/api/v1/stats")
    builds = agg.builds
    extra = node_factory(profile=EN_DE, url=rs.node_url)
    await extra.start()
    second = await rs.get_json("/api/v1/stats")
    assert agg.builds == builds  # the aggregate was not rebuilt within the interval
    assert second["computed_at_ms"] == first["computed_at_ms"]
    assert second["nodes_total"] == 6  # but the O(1) counts are current
    assert sum(second["nodes"].values()) == 6


# --- events -------------------------------------------------------------------------------------------


async def test_events(fleet: Any) -> None:
    rs, nodes = fleet
    await nodes[0].close()
    await eventually(lambda: rs.state.registry.nodes[nodes[0].node_id].status == "offline")
    status, body = await get(rs, "/api/v1/events")
    assert status == 200 and body["last_seq"] >= 1
    [ev] = [e for e in body["events"] if e["node_id"] == nodes[0].node_id]
    assert ev["kind"] == "node_status" and (ev["old"], ev["new"]) == ("ready", "offline")
    assert ev["reason"] == "connection closed" and ev["at_ms"] > 0
    assert (await rs.get_json("/api/v1/events?kind=failover,admin"))["events"] == []
    assert len((await rs.get_json("/api/v1/events?kind=node_status&limit=1"))["events"]) == 1
    assert "unknown event kind" in await bad_request(rs, "/api/v1/events?kind=bogus")
    for limit in ("0", "501", "x"):
        assert "limit" in await bad_request(rs, f"/api/v1/events?limit={limit}")


# --- nodes --------------------------------------------------------------------------------------------


async def test_nodes_pagination(fleet: Any) -> None:
    rs, nodes = fleet
    ids = sorted(n.node_id for n in nodes)
    seen: list[str] = []
    offset: int | None = 0
    while offset is not None:
        page = await rs.get_json(f"/api/v1/nodes?limit=2&offset={offset}")
        assert page["total"] == 5 and page["limit"] == 2 and page["offset"] == offset
        assert 1 <= len(page["nodes"]) <= 2
        seen += [n["node_id"] for n in page["nodes"]]
        offset = page["next_offset"]
    assert seen == ids
    past = await rs.get_json("/api/v1/nodes?offset=10")
    assert past["nodes"] == [] and past["next_offset"] is None and past["total"] == 5
    default = await rs.get_json("/api/v1/nodes")
    assert default["limit"] == 100 and len(default["nodes"]) == 5 and default["next_offset"] is None
    for q in ("limit=0", "limit=501", "limit=ten", "offset=-1", "offset=1.5"):
        await bad_request(rs, f"/api/v1/nodes?{q}")


async def test_nodes_filters(fleet: Any) -> None:
    rs, nodes = fleet
    zh = {n.node_id for n in nodes[:3]}
    de = {n.node_id for n in nodes[3:]}

    async def ids(query: str) -> set[str]:
        return {n["node_id"] for n in (await rs.get_json(f"/api/v1/nodes?{query}"))["nodes"]}

    assert await ids("language=zh") == zh
    assert await ids("language=de") == de
    assert await ids("language=en") == zh | de
    assert await ids("language=fr") == set()
    assert await ids("pool=en->zh") == zh
    assert await ids("pool=de->en%230") == de  # a shard id
    assert await ids("pool=nope") == set()
    assert await ids("status=ready") == zh | de
    assert await ids("status=draining") == set()
    assert await ids("status=draining,ready&language=de") == de
    assert await ids("status=offline&status=ready") == zh | de
    assert "unknown status" in await bad_request(rs, "/api/v1/nodes?status=asleep")


async def test_node_detail(fleet: Any) -> None:
    rs, nodes = fleet
    status, body = await get(rs, f"/api/v1/nodes/{nodes[3].node_id}")
    assert status == 200
    assert body["node_id"] == nodes[3].node_id and body["status"] == "ready" and body["connected"]
    assert body["languages"]["asr"] == ["de", "en"] and body["drain_requested"] is False
    assert sorted(p.split("#")[0] for p in body["pools"]) == ["auto->de", "auto->en", "de->en", "en->de"]
    assert body["load"]["effective_jobs"] == 0 and body["history"][0]["event"] == "registered"
    status, body = await get(rs, "/api/v1/nodes/node-NOPE")
    assert status == 404 and body == {"code": "NOT_FOUND", "message": "no node 'node-NOPE'"}


# --- pools --------------------------------------------------------------------------------------------


async def test_pools(fleet: Any) -> None:
    rs, _ = fleet
    status, body = await get(rs, "/api/v1/pools")
    assert status == 200 and body["mode"] == "language_pair" and body["pool_count"] == 7
    pools = {p["pool_id"]: p for p in body["pools"]}
    assert pools["en->zh"]["members"] == 3 and pools["en->zh"]["ready"] == 3
    assert len(pools["en->de"]["sample_node_ids"]) == 2


async def test_simulate(fleet: Any) -> None:
    rs, nodes = fleet
    status, body = await get(rs, "/api/v1/pools/simulate?src_lang=en&tgt_lang=de&routing_key=t1")
    assert status == 200 and body["selected_node_id"] in {n.node_id for n in nodes[3:]}
    assert body["request"]["routing_key"] == "t1" and body["best_reason"] == "ok"
    excluded = ",".join(n.node_id for n in nodes[3:])
    body = await rs.get_json(f"/api/v1/pools/simulate?src_lang=en&tgt_lang=de&exclude_node_id={excluded}")
    assert body["selected_node_id"] is None
    body = await rs.get_json("/api/v1/pools/simulate?src_lang=fr&tgt_lang=ja")
    assert body["selected_node_id"] is None
    assert "required" in await bad_request(rs, "/api/v1/pools/simulate?src_lang=en")
    assert "unknown service" in await bad_request(
        rs, "/api/v1/pools/simulate?src_lang=en&tgt_lang=zh&required=gpu"
    )
    assert "accept_public" in await bad_request(
        rs, "/api/v1/pools/simulate?src_lang=en&tgt_lang=zh&accept_public=maybe"
    )


# --- jobs and sessions --------------------------------------------------------------------------------


async def test_job_detail(fleet: Any, session_factory: Any) -> None:
    rs, nodes = fleet
    s = await talk(rs, session_factory, 1)
    job_id = s.of_type("translation_result")[0]["job_id"]
    status, body = await get(rs, f"/api/v1/jobs/{job_id}")
    assert status == 200
    assert body["job_id"] == job_id and body["session_id"] == s.session_id and body["state"] == "completed"
    assert body["attempt"] == 1 and body["node_id"] in {n.node_id for n in nodes[:3]}
    assert (body["src_lang"], body["tgt_lang"]) == ("en", "zh")
    assert [h["to"] for h in body["history"]][:2] == ["created", "dispatched"]
    assert body["history"][-1]["to"] == "completed"
    ages = body["age_seconds"]
    assert ages["created"] >= ages["dispatched"] >= ages["finished"] >= 0
    assert "text" not in str(body).lower().replace("context", "")  # no transcript in the job view
    status, body = await get(rs, "/api/v1/jobs/job-nope")
    assert status == 404 and body["code"] == "NOT_FOUND"


async def test_sessions(fleet: Any, session_factory: Any) -> None:
    rs, _ = fleet
    s = await talk(rs, session_factory, 1)
    status, body = await get(rs, "/api/v1/sessions")
    assert status == 200
    assert body == {"total": 1, "by_phase": {"open": 1}, "by_language_pair": {"en->zh": 1}}
    assert s.session_id not in str(body)


# --- routing errors -----------------------------------------------------------------------------------


async def test_unknown_route_and_method(scheduler: RunningScheduler) -> None:
    status, body = await get(scheduler, "/api/v1/nope")
    assert status == 404 and body["code"] == "NOT_FOUND"
    async with scheduler.http.post(scheduler.base + "/api/v1/stats") as r:
        assert r.status == 405 and (await r.json())["code"] == "METHOD_NOT_ALLOWED"
    async with scheduler.http.get(scheduler.base + "/nowhere") as r:
        assert r.status == 404  # outside /api the default 404 page is fine
