"""Benchmark: job dispatch throughput and scheduler overhead.

Three processes: the scheduler; 200 simulated nodes that answer every job at once (job_ack then
job_result); and sessions sending complete ``utterance`` messages at a fixed offered rate (open loop).
Prints JSON: jobs/s completed, and the scheduler's overhead from the utterance frame arriving to its
``job_assign`` being written (server-side window, p50/p99), plus client-side end-to-end latency.

    .venv/bin/python bench/dispatch.py [--rate 1200] [--seconds 15] [--nodes 200] [--sessions 40]
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
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    cpu_seconds,
    get_json,
    machine,
    percentiles,
    run_instant_nodes,
    scheduler_process,
    use_uvloop,
)
from lingua_scheduler.sim.sessions import SimulatedSession

LANGS = ["en", "zh", "de", "fr", "es", "ja"]


def run_sessions(
    port: int,
    sessions: int,
    rate: float,
    warmup: float,
    seconds: float,
    out: multiprocessing.queues.Queue[dict[str, Any]],
) -> None:
    use_uvloop()

    async def main() -> dict[str, Any]:
        url = f"ws://127.0.0.1:{port}/ws/session"
        rng = random.Random(3)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            ss = []
            for i in range(sessions):
                src = LANGS[i % len(LANGS)]
                tgt = LANGS[(i + 1) % len(LANGS)]
                ss.append(SimulatedSession(http, url, src_lang=src, tgt_lang=tgt))
            await asyncio.gather(*(s.start() for s in ss))
            gc.freeze()
            per_session = rate / sessions
            t_end = time.perf_counter() + warmup + seconds
            measure_from = time.perf_counter() + warmup

            async def talk(s: SimulatedSession) -> None:
                nxt = time.perf_counter() + rng.uniform(0, 1 / per_session)
                while nxt < t_end:
                    await asyncio.sleep(max(0.0, nxt - time.perf_counter()))
                    await s.utterance(n_bytes=3200)
                    nxt += 1 / per_session

            await asyncio.gather(*(talk(s) for s in ss))
            await asyncio.sleep(1.0)  # let the last results come back
            lat: list[float] = []
            done = 0
            for s in ss:
                for m in s.of_type("translation_result"):
                    sent = s.sent_at.get(m["utterance_index"])
                    if sent is not None and sent >= measure_from:
                        done += 1
                lat += [x for x in s.latencies]
            failures = sum(len(s.of_type("missing_result")) for s in ss)
            for s in ss:
                await s.disconnect()
            return {"completed_in_window": done, "e2e": lat, "failures": failures}

    out.put(asyncio.run(main()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=1200.0, help="offered utterances per second")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--nodes", type=int, default=200)
    ap.add_argument("--sessions", type=int, default=40)
    args = ap.parse_args()
    env = {"LINGUA_SCHEDULER__MAX_CONCURRENT_JOBS_PER_NODE": "8"}
    with scheduler_process(env) as (port, proc):
        ready, stop = multiprocessing.Event(), multiprocessing.Event()
        nodes = multiprocessing.Process(target=run_instant_nodes, args=(port, args.nodes, ready, stop, LANGS))
        nodes.start()
        ready.wait(60)
        time.sleep(1.0)
        before = get_json(f"http://127.0.0.1:{port}/api/v1/stats")
        queue: multiprocessing.queues.Queue[dict[str, Any]] = multiprocessing.Queue()
        talker = multiprocessing.Process(
            target=run_sessions, args=(port, args.sessions, args.rate, args.warmup, args.seconds, queue)
        )
        cpu0, wall0 = cpu_seconds(proc.pid), time.perf_counter()
        talker.start()
        result = queue.get()
        talker.join()
        cpu = (cpu_seconds(proc.pid) - cpu0) / (time.perf_counter() - wall0)
        stats = get_json(f"http://127.0.0.1:{port}/api/v1/stats")
        stop.set()
        nodes.join(30)
    dispatch = stats["latency"]["job_dispatch_seconds"]
    out = {
        "benchmark": "dispatch",
        "machine": machine(),
        "nodes": args.nodes,
        "sessions": args.sessions,
        "offered_rate_per_s": args.rate,
        "measured_s": args.seconds,
        "jobs_completed_per_s": round(result["completed_in_window"] / args.seconds, 1),
        "jobs_dispatched_total": stats["jobs_dispatched_total"] - before["jobs_dispatched_total"],
        "failures": result["failures"],
        "scheduler_overhead_ms": {
            k: (round(v * 1e3, 3) if v is not None else None) for k, v in dispatch.items()
        },
        "end_to_end_client_ms": percentiles(result["e2e"], 1e3),
        "server_cpu_percent_of_one_core": round(100 * cpu, 1),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
