"""Node quality through real WebSockets: a node that never answers and a node failing half its jobs are
ejected within a few of their jobs, traffic goes to the healthy nodes meanwhile, both come back on
probation and are healthy again after it; the cap holds in a small fleet; empty recognitions are
counted. What an operator sees is checked on the way: ``/api/v1/nodes``, ``/api/v1/events``,
``/metrics`` and the selection dry run."""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

import pytest

from lingua_scheduler.sim.nodes import Behavior, Executor, SimulatedNode
from lingua_scheduler.sim.profiles import NodeProfile
from lingua_scheduler.sim.sessions import SimulatedSession
from tests.conftest import MS, RunningScheduler, eventually
from tests.redis_support import RedisServer, cluster_cfg, has_redis, ready_in_view, start_instances

TOKEN = "quality-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROFILE = NodeProfile(asr_languages=["en", "zh"], tts_languages=["en", "zh"], nmt_languages=["en", "zh"])


def ms(n: float) -> int:
    """``n`` milliseconds, stretched like every test timing (``LINGUA_TEST_TIME_FACTOR``)."""
    return int(n * MS * 1000)


async def start(rs: RunningScheduler, node_factory: Any, executor: Executor) -> SimulatedNode:
    node: SimulatedNode = node_factory(profile=PROFILE, url=rs.node_url, executor=executor)
    await node.start()
    return node


async def round_of(session_factory: Any, rs: RunningScheduler, n: int) -> list[SimulatedSession]:
    """``n`` fresh sessions (no affinity yet: each job goes where selection puts it) send one
    utterance each and wait for its outcome."""
    sessions = [session_factory(url=rs.session_url) for _ in range(n)]
    await asyncio.gather(*(s.start() for s in sessions))
    for s in sessions:
        await s.utterance()
    await eventually(lambda: all(s.settled() for s in sessions), timeout=30 * MS * 1000)
    await asyncio.gather(*(s.disconnect() for s in sessions))
    return sessions


async def dashboard_shows_ejected(rs: RunningScheduler) -> int:
    """The dashboard's fleet panel has the tile, and its live frames the count (a frame may be up to a
    second old: the last of three)."""
    async with rs.http.get(rs.base + "/dashboard") as r:
        assert 'id="nodes-ejected"' in await r.text()
    frames: list[dict[str, Any]] = []
    async with rs.http.get(rs.base + "/api/v1/dashboard/stream") as r:
        while len(frames) < 3:
            line = await asyncio.wait_for(r.content.readline(), 5)
            assert line, "stream ended"
            if line.startswith(b"data: "):
                frames.append(json.loads(line[6:]))
    count: int = frames[-1]["nodes_ejected"]
    return count


def state_of(rs: RunningScheduler, node: SimulatedNode) -> str:
    assert node.node_id is not None
    return rs.state.quality.node_state(node.node_id)


async def test_silent_and_half_failing_nodes_are_ejected_then_readmitted_after_probation(
    scheduler_factory: Any, node_factory: Any, session_factory: Any
) -> None:
    rs: RunningScheduler = await scheduler_factory(
        admin={"token": TOKEN},
        scheduler={"fleet_view_interval_ms": 10},
        jobs={"ack_timeout_ms": ms(300)},
        quality={
            "interval_ms": ms(200),
            "base_ejection_ms": ms(5000),
            "probation_jobs": 2,
            "request_volume": 4,
            "success_rate_minimum_nodes": 3,
            "success_rate_stdev_factor": 1.0,
            "failure_percentage_threshold": 0,  # the success rate against the fleet must do it
            "max_ejection_percent": 50,
        },
    )
    silent = await start(rs, node_factory, Executor(behavior=Behavior.NEVER_ACK))
    half = await start(rs, node_factory, Executor(latency=0.02, fail_every=2))
    good = [await start(rs, node_factory, Executor(latency=0.02)) for _ in range(2)]
    await eventually(lambda: len(rs.state.publisher.view.nodes) == 4)

    # --- ejection: rounds of traffic until both bad nodes are out ------------------------------------
    jobs_at_ejection: dict[str, int] = {}
    for _ in range(30):
        await round_of(session_factory, rs, 4)
        for node in (silent, half):
            if state_of(rs, node) == "ejected" and node.node_id not in jobs_at_ejection:
                assert node.node_id is not None
                jobs_at_ejection[node.node_id] = node.jobs_received
        if len(jobs_at_ejection) == 2:
            break
    assert silent.node_id is not None and half.node_id is not None
    assert set(jobs_at_ejection) == {silent.node_id, half.node_id}, "both bad nodes ejected"
    # a silent node is out after 3 unanswered jobs (and whatever it was holding at that moment)
    assert 3 <= jobs_at_ejection[silent.node_id] <= 3 + 4
    # the half-failing node at the first sweep after it had enough jobs to be judged against the fleet
    # and the silent node (a success rate of 0 widens the spread) was out of the statistics
    assert 4 <= jobs_at_ejection[half.node_id] <= 24
    silent_q = (await rs.get_json(f"/api/v1/nodes/{silent.node_id}"))["quality"]
    half_q = (await rs.get_json(f"/api/v1/nodes/{half.node_id}"))["quality"]
    assert silent_q["state"] == "ejected" and silent_q["last_ejection_reason"] == "consecutive_timeouts"
    assert silent_q["ejections"] == 1 and silent_q["ejected_until_ms"] is not None
    assert silent_q["timeouts"] >= 3 and silent_q["codes"]["ack_timeout"] >= 3
    assert half_q["state"] == "ejected" and half_q["last_ejection_reason"] == "success_rate"
    assert half_q["failures"] >= 2 and half_q["codes"]["NODE_OVERLOADED"] >= 2
    assert 0.3 <= half_q["success_rate"] <= 0.7 and half_q["latency_ms"]["p50"] is not None
    for g in good:
        gq = (await rs.get_json(f"/api/v1/nodes/{g.node_id}"))["quality"]
        assert gq["state"] == "healthy" and gq["failures"] == 0 and gq["successes"] > 0
    listing = {n["node_id"]: n["quality_state"] for n in (await rs.get_json("/api/v1/nodes"))["nodes"]}
    assert listing == {
        silent.node_id: "ejected",
        half.node_id: "ejected",
        good[0].node_id: "healthy",
        good[1].node_id: "healthy",
    }
    assert await rs.metric("lingua_node_ejections_total", '{reason="consecutive_timeouts"}') == 1
    assert await rs.metric("lingua_node_ejections_total", '{reason="success_rate"}') == 1
    assert await rs.metric("lingua_nodes_ejected") == 2
    events = (await rs.get_json("/api/v1/events?kind=node_quality"))["events"]
    assert {(e["node_id"], e["state"], e["reason"]) for e in events} == {
        (silent.node_id, "ejected", "consecutive_timeouts"),
        (half.node_id, "ejected", "success_rate"),
    }
    assert (await rs.get_json("/api/v1/stats"))["nodes_ejected"] == 2
    assert await dashboard_shows_ejected(rs) == 2
    dry = await rs.get_json(f"/api/v1/pools/simulate?src_lang=en&tgt_lang=zh&preferred_node={silent.node_id}")
    assert dry["preferred_node"] == "ejected" and dry["selected_node_id"] in {g.node_id for g in good}

    # --- while they are out, traffic goes to the healthy nodes -------------------------------------------
    before = (silent.jobs_received, half.jobs_received)
    sessions = await round_of(session_factory, rs, 4)
    assert all(s.outcomes() == {0: ["result"]} for s in sessions)
    assert (silent.jobs_received, half.jobs_received) == before
    assert state_of(rs, silent) == "ejected" and state_of(rs, half) == "ejected"  # still within their time

    # --- they recover; once their time is up they come back on probation and pass it --------------------
    silent.executor = Executor(latency=0.02)
    half.executor = Executor(latency=0.02)
    for g in good:  # only the returning nodes may take jobs now
        async with rs.http.post(f"{rs.base}/api/v1/admin/nodes/{g.node_id}/drain", headers=AUTH) as r:
            assert r.status == 200
    await eventually(
        lambda: state_of(rs, silent) == "probation" and state_of(rs, half) == "probation",
        timeout=20 * MS * 1000,
    )
    for _ in range(10):
        await round_of(session_factory, rs, 2)
        if state_of(rs, silent) == "healthy" and state_of(rs, half) == "healthy":
            break
    assert state_of(rs, silent) == "healthy" and state_of(rs, half) == "healthy"
    events = (await rs.get_json("/api/v1/events?kind=node_quality"))["events"]
    changes = [(e["node_id"], e["state"], e["reason"]) for e in reversed(events)]
    for node in (silent, half):
        mine = [(state, reason) for n, state, reason in changes if n == node.node_id]
        assert mine[1:] == [("probation", "ejection_ended"), ("healthy", "probation_passed")], mine
    assert await rs.metric("lingua_nodes_ejected") == 0
    assert await rs.metric("lingua_nodes_on_probation") == 0


async def test_the_cap_keeps_most_of_a_small_fleet_in(
    scheduler_factory: Any, node_factory: Any, session_factory: Any
) -> None:
    # default max_ejection_percent (20): in a fleet of 3 one node may be out, not two
    rs: RunningScheduler = await scheduler_factory(
        scheduler={"fleet_view_interval_ms": 10},
        jobs={"ack_timeout_ms": ms(300)},
        quality={"interval_ms": ms(200), "base_ejection_ms": ms(60_000)},
    )
    silent = [await start(rs, node_factory, Executor(behavior=Behavior.NEVER_ACK)) for _ in range(2)]
    await start(rs, node_factory, Executor(latency=0.02))
    await eventually(lambda: len(rs.state.publisher.view.nodes) == 3)
    for _ in range(30):
        await round_of(session_factory, rs, 3)
        if rs.state.quality.tracker.capped:
            break
    states = sorted(state_of(rs, n) for n in silent)
    assert states == ["ejected", "healthy"]
    assert await rs.metric("lingua_node_ejections_capped_total") >= 1
    assert await rs.metric("lingua_nodes_ejected") == 1
    # the one kept in still gets its share of work: the cap is what keeps it there
    [kept] = [n for n in silent if state_of(rs, n) == "healthy"]
    before = kept.jobs_received
    for _ in range(10):
        await round_of(session_factory, rs, 3)
        if kept.jobs_received > before:
            break
    assert kept.jobs_received > before
    assert sorted(state_of(rs, n) for n in silent) == ["ejected", "healthy"]


async def test_empty_recognitions_are_counted_not_ejected_by_default(
    scheduler: RunningScheduler, node_factory: Any, session_factory: Any
) -> None:
    deaf = await start(scheduler, node_factory, Executor(latency=0.01, behavior=Behavior.EMPTY_RESULT))
    await eventually(lambda: len(scheduler.state.publisher.view.nodes) == 1)
    s = session_factory()
    await s.start()
    for _ in range(6):
        await s.utterance()
    await eventually(lambda: s.settled(), timeout=10)
    q = (await scheduler.get_json(f"/api/v1/nodes/{deaf.node_id}"))["quality"]
    assert (q["jobs"], q["empty_results"], q["successes"], q["failures"]) == (6, 6, 0, 0)
    assert q["state"] == "healthy" and q["success_rate"] == 1.0


@pytest.mark.skipif(not has_redis(), reason="no redis-server binary")
async def test_each_instance_judges_from_its_own_jobs(
    redis_server: RedisServer, scheduler_factory: Any, node_factory: Any, session_factory: Any
) -> None:
    """Redis mode: the sessions of A place jobs on a silent node connected to B. A ejects it after
    three of its own jobs (the outcomes reach A, which owns the jobs); B, which placed none, does not."""
    sections = cluster_cfg(
        redis_server.url,
        "q" + secrets.token_hex(3),
        jobs={"ack_timeout_ms": ms(300), "pending_timeout_ms": ms(3000)},
    )
    sections["quality"] = {"interval_ms": ms(200), "base_ejection_ms": ms(60_000)}
    a, b = await start_instances(scheduler_factory, 2, sections)
    silent: SimulatedNode = node_factory(
        profile=PROFILE, url=b.node_url, executor=Executor(behavior=Behavior.NEVER_ACK)
    )
    good: SimulatedNode = node_factory(profile=PROFILE, url=b.node_url, executor=Executor(latency=0.02))
    for n in (silent, good):
        await n.start()
    await eventually(lambda: ready_in_view(a, silent.node_id) and ready_in_view(a, good.node_id), timeout=5)
    for _ in range(20):
        await round_of(session_factory, a, 2)
        if state_of(a, silent) == "ejected":
            break
    assert state_of(a, silent) == "ejected"
    assert 3 <= silent.jobs_received <= 3 + 4
    assert state_of(b, silent) == "healthy" and state_of(b, good) == "healthy"
    on_a = (await a.get_json(f"/api/v1/nodes/{silent.node_id}"))["quality"]
    on_b = (await b.get_json(f"/api/v1/nodes/{silent.node_id}"))["quality"]
    assert on_a["state"] == "ejected" and on_a["timeouts"] >= 3
    assert on_b["state"] == "healthy" and on_b["jobs"] == 0
    before = silent.jobs_received
    sessions = await round_of(session_factory, a, 2)
    assert all(s.outcomes() == {0: ["result"]} for s in sessions)
    assert silent.jobs_received == before
