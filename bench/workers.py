"""Benchmark: scale-out on one host, ``serve --workers N`` behind one port, N = 1, 2, ...

For each worker count a fresh ``lingua-scheduler serve --workers N --redis-url ...`` (Redis mode even
for N = 1, so the figures differ in the number of workers only) against a throw-away redis-server:

- **heartbeat capacity**: for each step of ``--hb-steps`` (nodes heartbeating once a second, the paced
  load generator of ``loadtest/fleet.py``, connections spread over the workers by the kernel), the
  heartbeats acked per second, the round trip p50/p99 and the CPU of every worker together; the
  capacity is the largest step acked in full (>= 99 %) with p99 <= ``--p99-ms``;
- **dispatch throughput**: ``--dispatch-nodes`` instant nodes, ``--sessions`` closed-loop sessions
  (``--window`` utterances in flight each); jobs completed per second and end-to-end p50/p99. Nodes
  and sessions land on either worker, so about half the jobs cross workers through Redis.

    .venv/bin/python bench/workers.py [--workers 1,2] [--hb-steps 2000,4000,6000] [--sessions 50]

Prints JSON (and writes bench/results/workers.json with ``--save``). The host's cores bound what N
can show: on the 2-core development VM the load generator and Redis share the cores with the workers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_seconds, free_port, machine, percentiles
from _loadgen import RESULTS, drive, redis_server
from lingua_scheduler.loadtest.crowd import SessionPlan
from lingua_scheduler.loadtest.runner import server_process
from lingua_scheduler.sim.profiles import NodeProfile

LANGS = ["en", "zh", "de", "fr", "es", "ja"]


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the supervisor and its workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
    return out


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for p in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(p)
    return total


@contextlib.contextmanager
def workers(redis_url: str, count: int) -> Iterator[tuple[int, list[int]]]:
    """``serve --workers count`` on a free port; yields (port, pids of the supervisor and workers)."""
    port = free_port()
    args = [sys.executable, "-m", "lingua_scheduler", "serve", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--workers", str(count), "--redis-url", redis_url]
    env = {
        **os.environ,
        "LINGUA_SERVER__LOG_LEVEL": '"warning"',
        "LINGUA_LIMITS__MAX_CONNECTIONS_PER_SOURCE": "1000000",
        "LINGUA_LIMITS__MAX_NODES": "100000",
        "LINGUA_CLUSTER__KEY_PREFIX": f'"bw{secrets.token_hex(3)}"',
        "LINGUA_NODE_HEALTH__HEARTBEAT_INTERVAL_SECONDS": "1",
        "LINGUA_NODE_HEALTH__HEARTBEAT_BUDGET_PER_SECOND": "1000000",
        "LINGUA_SCHEDULER__MAX_CONCURRENT_JOBS_PER_NODE": "8",
    }
    failure = "serve --workers did not start"
    with server_process(args, port, env=env, start_timeout=60, failure=failure) as proc:
        deadline = time.monotonic() + 30
        while len(_tree(proc.pid)) < count + 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.0)  # every worker up and announced in Redis
        yield port, _tree(proc.pid)


def heartbeat_step(redis_url: str, count: int, nodes: int, args: argparse.Namespace) -> dict[str, Any]:
    with workers(redis_url, count) as (port, pids):
        marks: dict[str, float] = {}

        def start() -> None:
            marks["c0"], marks["t0"] = _cpu(pids), time.monotonic()

        def end() -> None:
            marks["c1"], marks["t1"] = _cpu(pids), time.monotonic()

        r = drive(
            port,
            nodes=nodes,
            sessions=0,
            rate=0.0,
            warmup=args.warmup,
            seconds=args.seconds,
            node_procs=args.procs,
            window_start=start,
            window_end=end,
            paced=True,
            fixed_interval=1.0,
            seed=nodes,
        )
    acked = len(r["rtts"])
    wall = marks["t1"] - marks["t0"]
    cpu = marks["c1"] - marks["c0"]
    return {
        "nodes": nodes,
        "heartbeats_per_s": round(acked / args.seconds, 1),
        "round_trip_ms": percentiles(r["rtts"], 1e3),
        "workers_cpu_percent_of_one_core": round(100 * cpu / wall, 1),
        "workers_cpu_us_per_heartbeat": round(1e6 * cpu / acked, 1) if acked else None,
        "load_generator": r["generator"],
    }


def dispatch_point(redis_url: str, count: int, args: argparse.Namespace) -> dict[str, Any]:
    plans = [
        SessionPlan(LANGS[i % 6], LANGS[(i + 1) % 6], "utterance", 0.0, 100) for i in range(args.sessions)
    ]
    profile = NodeProfile(asr_languages=LANGS, tts_languages=LANGS, nmt_languages=LANGS)
    with workers(redis_url, count) as (port, pids):
        marks: dict[str, float] = {}

        def start() -> None:
            marks["c0"], marks["t0"] = _cpu(pids), time.monotonic()

        def end() -> None:
            marks["c1"], marks["t1"] = _cpu(pids), time.monotonic()

        r = drive(
            port,
            nodes=0,
            sessions=args.sessions,
            rate=0.0,
            warmup=2.0,
            seconds=args.seconds,
            window=args.window,
            plans=plans,
            node_plans=[(f"w{i:04d}", profile) for i in range(args.dispatch_nodes)],
            window_start=start,
            window_end=end,
        )
    window = r["window_s"]
    return {
        "sessions": args.sessions,
        "window": args.window,
        "jobs_completed_per_s": round(r["session_counters"]["window_completed"] / window, 1),
        "jobs_failed": r["session_counters"]["window_failed"],
        "end_to_end_ms": percentiles(r["latencies"], 1e3),
        "workers_cpu_percent_of_one_core": round(100 * (marks["c1"] - marks["c0"]) / window, 1),
        "load_generator_loop_lag_ms": r["client_loop_lag_ms"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", default="1,2", help="worker counts to measure")
    ap.add_argument("--hb-steps", default="2000,4000,6000", help="nodes heartbeating once a second")
    ap.add_argument("--p99-ms", type=float, default=20.0, help="round trip p99 a step must keep")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--warmup", type=float, default=4.0)
    ap.add_argument("--procs", type=int, default=2, help="load-generator processes for the nodes")
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--window", type=int, default=2, help="utterances in flight per session")
    ap.add_argument("--dispatch-nodes", type=int, default=200)
    ap.add_argument("--save", action="store_true", help="also write bench/results/workers.json")
    args = ap.parse_args()
    out: dict[str, Any] = {"benchmark": "workers", "machine": machine(), "p99_bound_ms": args.p99_ms}
    with redis_server() as url:
        for count in [int(x) for x in args.workers.split(",")]:
            steps = [heartbeat_step(url, count, int(n), args) for n in args.hb_steps.split(",")]
            kept = [
                s["heartbeats_per_s"]
                for s in steps
                if s["heartbeats_per_s"] >= 0.99 * s["nodes"]
                and (s["round_trip_ms"]["p99"] or 1e9) <= args.p99_ms
            ]
            out[f"workers_{count}"] = {
                "heartbeat_steps": steps,
                "heartbeat_capacity_per_s": max(kept) if kept else None,
                "dispatch": dispatch_point(url, count, args),
            }
            print(json.dumps(out[f"workers_{count}"]), file=sys.stderr)
    text = json.dumps(out, indent=2)
    print(text)
    if args.save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "workers.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
