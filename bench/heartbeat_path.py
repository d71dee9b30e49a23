"""Benchmark: the heartbeat path under a fleet of simulated nodes.

Starts the scheduler in its own process, then drives N simulated nodes (default 2,000) at one heartbeat
per second each from this process over real WebSockets, and prints JSON: client-side round trip
p50/p99 (heartbeat sent -> ack received) and server-side handle time p50/p99 (frame received -> ack
queued, from the server's own recent-latency window), plus server CPU use.

    .venv/bin/python bench/heartbeat_path.py [--nodes 2000] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import multiprocessing.queues
import random
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_seconds, get_json, machine, percentiles, scheduler_process
from lingua_scheduler.sim.nodes import SimulatedNode
from lingua_scheduler.sim.profiles import random_profile


async def drive(port: int, count: int, warmup: float, seconds: float, seed: int = 1) -> dict[str, object]:
    url = f"ws://127.0.0.1:{port}/ws/node"
    rng = random.Random(seed)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        nodes = [
            SimulatedNode(http, url, random_profile(rng), interval=1.0, seed=seed * 1_000_003 + i)
            for i in range(count)
        ]
        gate = asyncio.Semaphore(50)

        async def start(n: SimulatedNode) -> None:
            async with gate:
                await n.start()

        t0 = time.perf_counter()
        await asyncio.gather(*(start(n) for n in nodes))
        registered_in = time.perf_counter() - t0
        await asyncio.sleep(warmup)
        for n in nodes:
            n.rtts.clear()
        gc.freeze()  # the fleet is long-lived: keep the collector from rescanning it mid-measurement
        await asyncio.sleep(seconds)
        rtts = [r for n in nodes for r in n.rtts]
        await asyncio.gather(*(n.close() for n in nodes), return_exceptions=True)
    return {"registered_in_s": round(registered_in, 2), "rtts": rtts}


def _worker(
    port: int,
    count: int,
    warmup: float,
    seconds: float,
    seed: int,
    out: multiprocessing.queues.Queue[list[float]],
) -> None:
    _use_uvloop()
    result = asyncio.run(drive(port, count, warmup, seconds, seed))
    rtts = result["rtts"]
    assert isinstance(rtts, list)
    out.put(rtts)


def _use_uvloop() -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--procs", type=int, default=2, help="load-generator processes")
    args = ap.parse_args()
    env = {
        "LINGUA_NODE_HEALTH__HEARTBEAT_INTERVAL_SECONDS": "1",
        "LINGUA_NODE_HEALTH__HEARTBEAT_BUDGET_PER_SECOND": "100000",
    }
    with scheduler_process(env) as (port, proc):
        cpu0, wall0 = cpu_seconds(proc.pid), time.perf_counter()
        queue: multiprocessing.queues.Queue[list[float]] = multiprocessing.Queue()
        share = args.nodes // args.procs
        workers = [
            multiprocessing.Process(
                target=_worker, args=(port, share, args.warmup, args.seconds, i + 1, queue)
            )
            for i in range(args.procs)
        ]
        for w in workers:
            w.start()
        rtts = [r for _ in workers for r in queue.get()]
        for w in workers:
            w.join()
        cpu = (cpu_seconds(proc.pid) - cpu0) / (time.perf_counter() - wall0)
        stats = get_json(f"http://127.0.0.1:{port}/api/v1/stats")
        handle = stats["latency"]["heartbeat_handle_seconds"]
    out = {
        "benchmark": "heartbeat_path",
        "machine": machine(),
        "nodes": args.nodes,
        "heartbeat_interval_s": 1.0,
        "measured_s": args.seconds,
        "load_generator_processes": args.procs,
        "heartbeats_acked": len(rtts),
        "heartbeats_per_s": round(len(rtts) / args.seconds, 1),
        "round_trip_ms": percentiles(rtts, 1e3),
        "server_handle_us": {k: (round(v * 1e6, 1) if v is not None else None) for k, v in handle.items()},
        "server_handle_samples": stats["heartbeats_total"],
        "server_cpu_percent_of_one_core": round(100 * cpu, 1),
        "server_event_loop_lag_ms": round(stats["event_loop_lag_seconds"] * 1e3, 2),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
