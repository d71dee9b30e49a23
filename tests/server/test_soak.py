"""Bounded soak: 50 sessions, 20 nodes of which some fail at random; nothing lost, nothing doubled."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from lingua_scheduler.sim.nodes import Behavior, Executor
from tests.conftest import RunningScheduler, eventually

SESSIONS = 50
UTTERANCES = 6


async def test_soak_every_utterance_ends_once(
    scheduler_factory: Any, node_factory: Any, session_factory: Any
) -> None:
    rs: RunningScheduler = await scheduler_factory(
        jobs={"ack_timeout_ms": 500, "pending_timeout_ms": 2000, "retention_seconds": 0.5, "max_attempts": 3},
        session={"pause_ms": 400, "result_gap_timeout_ms": 8000},
        scheduler={"fleet_view_interval_ms": 10, "max_concurrent_jobs_per_node": 8},
    )
    rng = random.Random(7)
    executors = (
        [Executor(latency=0.02, jitter=0.08)] * 12
        + [Executor(latency=0.02, jitter=0.05, failure_rate=0.3)] * 4
        + [Executor(latency=0.05, behavior=Behavior.CRASH_MID_JOB)] * 2
        + [Executor(behavior=Behavior.NEVER_ACK)] * 2
    )
    nodes = [node_factory(url=rs.node_url, executor=ex, seed=i) for i, ex in enumerate(executors)]
    await asyncio.gather(*(n.start() for n in nodes))
    await eventually(
        lambda: sum(1 for n in rs.state.publisher.view.nodes.values() if n.status == "ready") == 20
    )

    sessions = [session_factory(url=rs.session_url) for _ in range(SESSIONS)]
    await asyncio.gather(*(s.start() for s in sessions))

    async def talk(s: Any) -> None:
        for _ in range(UTTERANCES):
            await s.speak(chunks=rng.randint(1, 3))
            await asyncio.sleep(rng.uniform(0.0, 0.1))
        await eventually(s.settled, timeout=30)
        await s.close(timeout=30)

    await asyncio.wait_for(asyncio.gather(*(talk(s) for s in sessions)), 50)

    delivered = failed = 0
    for s in sessions:
        outcomes = s.outcomes()
        assert sorted(outcomes) == list(range(UTTERANCES)), f"{s.session_id}: {outcomes}"
        for index, got in outcomes.items():
            assert len(got) == 1, f"{s.session_id} utterance {index} ended {got}"
            delivered += got[0] == "result"
            failed += got[0] != "result"
        results = [m["utterance_index"] for m in s.of_type("translation_result")]
        assert results == sorted(results), "results out of order"
        # every failure was explained to the client
        assert len(s.of_type("error")) >= sum(1 for g in outcomes.values() if g[0] != "result")
    assert delivered + failed == SESSIONS * UTTERANCES
    codes = [e["code"] for s in sessions for e in s.of_type("error")]
    assert delivered >= 0.9 * SESSIONS * UTTERANCES, {c: codes.count(c) for c in set(codes)}

    state = rs.state
    store = state.engine.store
    assert state.sessions == {}
    assert store.inflight == 0 and store.waiting == 0 and store.audio_bytes == 0
    await eventually(lambda: len(store) == 0, timeout=5)
    assert state.engine.tracked_jobs() == 0
    store.validate()
    for entry in state.registry:
        assert entry.load.inflight == 0 and entry.load.dispatched_since_report == 0, entry.node_id
