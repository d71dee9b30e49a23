"""``serve --workers N``: N instances behind one port on a real redis-server, supervised by a parent."""

from __future__ import annotations

import asyncio
import secrets
import signal
import subprocess
import sys
from typing import Any

import aiohttp
import pytest

from lingua_scheduler.server.workers import worker_args
from lingua_scheduler.sim.nodes import Executor, SimulatedNode
from lingua_scheduler.sim.profiles import NodeProfile
from lingua_scheduler.sim.sessions import SimulatedSession
from tests.conftest import eventually
from tests.redis_support import RedisServer, cluster_section, free_port
from tests.scheduler_process import SchedulerProcess, env_for

#: enough connections that the kernel's SO_REUSEPORT hash puts some on each of two workers (all on
#: one: probability 2 ** -(NODES - 1))
NODES = 16
SESSIONS = 6


def _profile() -> NodeProfile:
    return NodeProfile(asr_languages=["en", "zh"], tts_languages=["en", "zh"], nmt_languages=["en", "zh"])


async def _cluster(http: aiohttp.ClientSession, proc: SchedulerProcess) -> dict[str, Any]:
    async with http.get(proc.base + "/api/v1/cluster") as r:
        body: dict[str, Any] = await r.json()
        return body


async def test_two_workers_serve_nodes_and_sessions_on_one_port(
    redis_server: RedisServer, http: aiohttp.ClientSession, procs: list[SchedulerProcess]
) -> None:
    proc = SchedulerProcess(
        args=["--workers", "2", "--instance-id", "w"],
        cluster=cluster_section(redis_server.url, f"wk{secrets.token_hex(3)}"),
        node_health={"heartbeat_interval_seconds": 0.5},
    )
    procs.append(proc.start())
    await proc.wait_ready(http, timeout=30)
    for _ in range(200):  # each worker announces itself in Redis; both are seen from either
        if {r["instance_id"] for r in (await _cluster(http, proc))["instances"]} == {"w-1", "w-2"}:
            break
        await asyncio.sleep(0.05)
    assert {r["instance_id"] for r in (await _cluster(http, proc))["instances"]} == {"w-1", "w-2"}

    nodes = [
        SimulatedNode(http, proc.node_url, _profile(), executor=Executor(latency=0.01), seed=i)
        for i in range(NODES)
    ]
    sessions = [SimulatedSession(http, proc.session_url) for _ in range(SESSIONS)]
    try:
        for n in nodes:
            await n.start()
        rows: dict[str, Any] = {}
        for _ in range(200):
            rows = {r["instance_id"]: r for r in (await _cluster(http, proc))["instances"]}
            if sum(r["nodes_total"] or 0 for r in rows.values()) == NODES:
                break
            await asyncio.sleep(0.05)
        # every node is held by one worker, and both workers hold some
        assert sum(r["nodes_total"] for r in rows.values()) == NODES
        assert all((r["nodes_total"] or 0) > 0 for r in rows.values()), rows
        for s in sessions:
            await s.start()
            await s.speak(chunks=1)
        await eventually(lambda: all(s.of_type("translation_result") for s in sessions), timeout=15)
        assert all(len(s.of_type("translation_result")) == 1 for s in sessions)
        served = sum(len([m for m in n.received if m["type"] == "job_assign"]) for n in nodes)
        assert served == SESSIONS
    finally:
        await asyncio.gather(*(s.disconnect() for s in sessions), return_exceptions=True)
        await asyncio.gather(*(n.close() for n in nodes), return_exceptions=True)

    # SIGTERM reaches both workers: they drain and exit, then the parent exits 0
    proc.signal(signal.SIGTERM)
    assert await proc.wait_exit(30) == 0


def test_workers_without_redis_is_a_configuration_error() -> None:
    env = {**env_for({"server": {"log_level": "warning"}}), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "lingua_scheduler", "serve", "--port", str(free_port()), "--workers", "2"],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert b"--redis-url" in done.stderr


def test_worker_arguments_drop_workers_and_suffix_the_instance_id() -> None:
    args = worker_args(
        ["--workers", "3", "--port=0", "--instance-id", "x", "--redis-url", "redis://h"], 5011, 2
    )
    assert args == ["--instance-id", "x-2", "--redis-url", "redis://h", "--port", "5011", "--reuse-port"]
    assert worker_args(["--workers=2", "--instance-id=y"], 7, 1) == [
        "--instance-id",
        "y-1",
        "--port",
        "7",
        "--reuse-port",
    ]


@pytest.mark.parametrize("flag", ["--workers=0", "--workers=-1"])
def test_workers_below_one_is_refused(flag: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lingua_scheduler", "serve", flag], capture_output=True, timeout=60
    )
    assert done.returncode == 2
