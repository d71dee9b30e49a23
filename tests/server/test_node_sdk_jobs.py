"""The node SDK against an in-process scheduler: partials, failures, cancellation, declared load."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from lingua_scheduler.node import Backoff, Job, JobFailed, Node, Partial, Result
from tests.conftest import RunningScheduler, eventually

TOKEN = "test-admin-token-0123456789abcdef"


@pytest.fixture
async def sched(scheduler_factory: Any) -> RunningScheduler:
    rs: RunningScheduler = await scheduler_factory(
        admin={"token": TOKEN},
        jobs={"ack_timeout_ms": 2000, "pending_timeout_ms": 1500, "retention_seconds": 0.2},
        scheduler={"fleet_view_interval_ms": 10},
        node_health={"heartbeat_interval_seconds": 0.2},
    )
    return rs


@pytest.fixture
async def run_node(sched: RunningScheduler, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    tasks: list[tuple[Node, asyncio.Task[None]]] = []

    async def start(handle: Any, **kw: Any) -> Node:
        node = Node(
            handle,
            languages=[("en", "zh")],
            gpus=[("GPU", 8.0)],
            url=sched.node_url,
            state_file=tmp_path / f"node{len(tasks)}.json",
            backoff=Backoff(base=0.05, cap=0.2),
            **kw,
        )
        tasks.append((node, asyncio.create_task(node.serve())))
        await eventually(lambda: node.node_id is not None and _ready(sched, node.node_id))
        return node

    yield start
    for node, task in tasks:
        node.drain()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)


def _ready(rs: RunningScheduler, node_id: str) -> bool:
    nv = rs.state.publisher.view.get(node_id)
    return nv is not None and nv.status == "ready"


async def test_partials_then_result(sched: RunningScheduler, run_node: Any, session_factory: Any) -> None:
    async def handle(job: Job) -> AsyncIterator[Partial | Result]:
        yield Partial("hel")
        yield Partial("hello", is_final=True)
        yield Result(text_asr="hello", text_translated=f"{job.tgt_lang}:{len(job.audio)}", tts_audio=b"\1\2")

    node = await run_node(handle)
    s = session_factory(url=sched.session_url)
    await s.start()
    await s.utterance()
    await eventually(lambda: bool(s.of_type("translation_result")))
    (r,) = s.of_type("translation_result")
    assert r["text_asr"] == "hello" and r["text_translated"].startswith("zh:") and r["tts_audio"] == "AQI="
    assert [p["text"] for p in s.of_type("asr_partial")] == ["hel", "hello"]
    assert node.jobs_done == 1


async def test_failures_are_answered_with_their_code(
    sched: RunningScheduler, run_node: Any, session_factory: Any
) -> None:
    seen: list[str] = []

    async def handle(job: Job) -> Result:
        seen.append(job.job_id)
        if len(seen) == 1:
            raise JobFailed("ASR_EMPTY", "nothing recognized")
        raise RuntimeError("a bug in the node, with the user's words in it")

    await run_node(handle)
    s = session_factory(url=sched.session_url)
    await s.start()
    await s.utterance()
    await s.utterance()
    await eventually(lambda: len(s.of_type("error")) == 2)
    assert len(seen) == 2
    errors = {e["details"]["utterance_index"]: e for e in s.of_type("error")}
    assert errors[0]["code"] == "ASR_EMPTY"
    assert errors[1]["code"] == "INTERNAL_ERROR" and "user's words" not in errors[1]["message"]


async def test_job_cancel_stops_the_handler(
    sched: RunningScheduler, run_node: Any, session_factory: Any
) -> None:
    started: list[str] = []
    cancelled: list[str] = []

    async def handle(job: Job) -> Result:
        started.append(job.job_id)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(job.job_id)
            raise
        return Result(text_asr="late")

    node = await run_node(handle)
    s = session_factory(url=sched.session_url)
    await s.start()
    await s.utterance()
    await eventually(lambda: bool(started))
    async with sched.http.post(
        f"{sched.base}/api/v1/admin/jobs/{started[0]}/cancel", headers={"Authorization": f"Bearer {TOKEN}"}
    ) as r:
        assert r.status == 200, await r.text()
    await eventually(lambda: cancelled == started)
    assert node.jobs == {} and node.jobs_done == 0


async def test_declared_load_keeps_new_jobs_away(sched: RunningScheduler, run_node: Any) -> None:
    level = [0.9]

    async def handle(job: Job) -> Result:
        return Result(text_asr="x")

    node = await run_node(handle, load=lambda: level[0], load_threshold=0.8, max_concurrent_jobs=3)
    entry = sched.state.registry.nodes[node.node_id]
    assert entry.max_concurrent_jobs == 3 and entry.sends_acks
    body = await sched.get_json("/api/v1/pools/simulate?src_lang=en&tgt_lang=zh")
    assert body["breakdown"]["resource_threshold_exceeded"] == 1


async def test_heartbeats_follow_the_interval_told(sched: RunningScheduler, run_node: Any) -> None:
    async def handle(job: Job) -> Result:
        return Result(text_asr="x")

    node = await run_node(handle)
    assert node.interval == pytest.approx(0.2)
    entry = sched.state.registry.nodes[node.node_id]
    before, t0 = entry.heartbeats, asyncio.get_running_loop().time()
    await asyncio.sleep(1.0)
    rate = (entry.heartbeats - before) / (asyncio.get_running_loop().time() - t0)
    assert 3.5 <= rate <= 6.5, rate  # 1 / 0.2 s, up to 10 % early; never the 15 s default
