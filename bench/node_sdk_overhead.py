"""Benchmark: what one simulated node costs the load generator's process, the SDK's ``Node`` against
the load generator's ``LightNode`` (``loadtest/fleet.py``), at the same heartbeat rate.

For each kind, ``--nodes`` nodes register with ``lingua-scheduler serve`` (its own process, heartbeat
interval 1 s) from this process, then heartbeat for ``--seconds``; measured in this process: CPU
seconds per node-second (so nodes per core = 1 / that), and resident memory per node. No jobs run:
the heartbeat loop is what a fleet of thousands of idle nodes costs.

    .venv/bin/python bench/node_sdk_overhead.py [--nodes 300] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import cpu_seconds, local_scheduler, machine

from lingua_scheduler.loadtest.fleet import Fleet
from lingua_scheduler.node import Backoff, Job, Node, Result
from lingua_scheduler.sim.profiles import NodeProfile

ENV = {
    "LINGUA_NODE_HEALTH__HEARTBEAT_INTERVAL_SECONDS": "1.0",
    "LINGUA_NODE_HEALTH__HEARTBEAT_TIMEOUT_SECONDS": "30.0",
}


def rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


async def handle(job: Job) -> Result:
    return Result(text_asr="x")


async def run_sdk(base: str, n: int, seconds: float, state_dir: str) -> dict[str, Any]:
    url = base.replace("http", "ws", 1) + "/ws/node"
    rss0 = rss_kb()
    nodes = [
        Node(
            handle,
            languages=[("en", "zh")],
            gpus=[("GPU", 8.0)],
            url=url,
            state_file=f"{state_dir}/sdk-{i}.json",
            backoff=Backoff(base=0.2, cap=2.0),
        )
        for i in range(n)
    ]
    tasks = []
    for node in nodes:
        tasks.append(asyncio.create_task(node.serve()))
        await asyncio.sleep(0.002)  # a steady registration ramp, like the load generator's gate
    while sum(1 for x in nodes if x.registrations) < n:  # noqa: ASYNC110 - polling a counter
        await asyncio.sleep(0.1)
    out = await measure(seconds, rss0, n)
    for node in nodes:
        node.drain()
    await asyncio.gather(*tasks, return_exceptions=True)
    return out


async def run_light(base: str, n: int, seconds: float) -> dict[str, Any]:
    host, port = base.split("//", 1)[1].split(":")
    profile = NodeProfile(asr_languages=["en", "zh"], tts_languages=["en", "zh"], nmt_languages=["en", "zh"])
    rss0 = rss_kb()
    fleet = Fleet(host, int(port), [(f"light-{i}", profile) for i in range(n)])
    await fleet.start(concurrency=50)
    out = await measure(seconds, rss0, n)
    await fleet.stop(drain=0.5)
    return out


async def measure(seconds: float, rss0: int, n: int) -> dict[str, Any]:
    await asyncio.sleep(2.0)  # past the registration burst
    cpu0, t0 = cpu_seconds(os.getpid()), time.monotonic()
    await asyncio.sleep(seconds)
    cpu, wall = cpu_seconds(os.getpid()) - cpu0, time.monotonic() - t0
    per_node_second = cpu / (wall * n)
    return {
        "nodes": n,
        "cpu_ms_per_node_second": round(per_node_second * 1e3, 4),
        "nodes_per_core_at_1hz": int(1 / per_node_second) if per_node_second > 0 else None,
        "rss_kb_per_node": round((rss_kb() - rss0) / n, 1),
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results: dict[str, Any] = {"machine": machine(), "heartbeat_interval_s": 1.0}
    with local_scheduler(ENV) as (base, _):
        results["light_node"] = await run_light(base, args.nodes, args.seconds)
    with local_scheduler(ENV) as (base, _), tempfile.TemporaryDirectory() as state_dir:
        results["sdk_node"] = await run_sdk(base, args.nodes, args.seconds, state_dir)
    light, sdk = results["light_node"], results["sdk_node"]
    results["sdk_cpu_ratio"] = round(sdk["cpu_ms_per_node_second"] / light["cpu_ms_per_node_second"], 2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
