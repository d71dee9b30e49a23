"""Benchmark: how the scheduler's costs grow with the fleet and with the sessions.

Part 1, fleet size: for each size (default 500, 1,000, 2,000, 5,000, 10,000 nodes) a fresh scheduler
asks for 1 s heartbeats while 20 sessions create 100 jobs/s (instant execution) so that selection is
exercised; reported per size: heartbeats/s, heartbeat round trip p50/p99/p999 (client), server handle
p99, selection p50/p99 (``lingua_selection_seconds``), server CPU and the load generator's own loop lag.
Nodes are the cheap raw-WebSocket nodes of ``lingua_scheduler.loadtest``, split over processes.

Part 2, sessions: 200 nodes answering at once; closed loop, each session keeps one utterance in flight
(sends the next when the result of the last arrives); for each session count, jobs completed per
second and end-to-end latency p50/p99.

    .venv/bin/python bench/scaling.py [--sizes 500,1000,2000,5000,10000] [--sessions 1,5,10,25,50,100,200]

Prints JSON; writes bench/results/scaling.json and, with matplotlib, scaling_fleet.png and
scaling_sessions.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_seconds, machine, percentiles, scheduler_process
from _loadgen import RESULTS, drive, plot
from lingua_scheduler.loadtest.crowd import SessionPlan
from lingua_scheduler.loadtest.metrics import Scrape, histogram_quantiles
from lingua_scheduler.sim.profiles import NodeProfile

ENV = {
    "LINGUA_NODE_HEALTH__HEARTBEAT_INTERVAL_SECONDS": "1",
    "LINGUA_NODE_HEALTH__HEARTBEAT_BUDGET_PER_SECOND": "1000000",
}


def _us(d: dict[str, Any], k: str) -> float | None:
    v = d.get(k)
    return None if v is None else round(v * 1e6, 1)


def fleet_point(nodes: int, args: argparse.Namespace) -> dict[str, Any]:
    with scheduler_process(ENV) as (port, proc):
        base = f"http://127.0.0.1:{port}"

        def mark() -> tuple[Scrape, float, float]:
            return Scrape.fetch(base), cpu_seconds(proc.pid), time.monotonic()

        r = drive(
            port,
            nodes=nodes,
            sessions=20,
            rate=args.jobs_per_second,
            warmup=args.warmup,
            seconds=args.seconds,
            node_procs=1 if nodes <= 2000 else 2,
            window_start=mark,
            window_end=mark,
            seed=nodes,
        )
    (m1, c1, t1), (m2, c2, t2) = r["start"], r["end"]
    sel = histogram_quantiles(m2, m1, "lingua_selection_seconds", (0.5, 0.99))
    handle = histogram_quantiles(m2, m1, "lingua_heartbeat_handle_seconds", (0.5, 0.99))
    window = r["window_s"]
    point = {
        "nodes": nodes,
        "registration_s": r["registration_s"],
        "heartbeats_per_s": round(len(r["rtts"]) / window, 1),
        "heartbeat_rtt_ms": percentiles(r["rtts"], 1e3),
        "server_handle_us": {"p50": _us(handle, "p50"), "p99": _us(handle, "p99")},
        "selection_us": {"p50": _us(sel, "p50"), "p99": _us(sel, "p99"), "count": sel["count"]},
        "jobs_completed_per_s": round(r["session_counters"]["window_completed"] / window, 1),
        "server_cpu_percent_of_one_core": round(100 * (c2 - c1) / (t2 - t1), 1),
        "load_generator_loop_lag_ms": r["client_loop_lag_ms"],
    }
    print(json.dumps(point), file=sys.stderr)
    return point


def session_point(sessions: int, args: argparse.Namespace) -> dict[str, Any]:
    langs = ["en", "zh", "de", "fr", "es", "ja"]
    plans = [SessionPlan(langs[i % 6], langs[(i + 1) % 6], "utterance", 0.0, 100) for i in range(sessions)]
    with scheduler_process({"LINGUA_SCHEDULER__MAX_CONCURRENT_JOBS_PER_NODE": "8"}) as (port, proc):

        def mark() -> tuple[float, float]:
            return cpu_seconds(proc.pid), time.monotonic()

        r = drive(
            port,
            nodes=0,
            sessions=sessions,
            rate=0.0,
            warmup=1.0,
            seconds=args.session_seconds,
            window=1,
            plans=plans,
            window_start=mark,
            window_end=mark,
            node_plans=[
                (f"d{i:04d}", NodeProfile(asr_languages=langs, tts_languages=langs, nmt_languages=langs))
                for i in range(args.dispatch_nodes)
            ],
        )
    (c1, t1), (c2, t2) = r["start"], r["end"]
    window = r["window_s"]
    point = {
        "sessions": sessions,
        "jobs_completed_per_s": round(r["session_counters"]["window_completed"] / window, 1),
        "end_to_end_ms": percentiles(r["latencies"], 1e3),
        "server_cpu_percent_of_one_core": round(100 * (c2 - c1) / (t2 - t1), 1),
        "load_generator_loop_lag_ms": r["client_loop_lag_ms"],
    }
    print(json.dumps(point), file=sys.stderr)
    return point


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="500,1000,2000,5000,10000")
    ap.add_argument("--sessions", default="1,5,10,25,50,100,200")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--jobs-per-second", type=float, default=100.0)
    ap.add_argument("--session-seconds", type=float, default=8.0)
    ap.add_argument("--dispatch-nodes", type=int, default=200)
    ap.add_argument(
        "--replot", action="store_true", help="only redraw the plots of bench/results/scaling.json"
    )
    args = ap.parse_args()
    if args.replot:
        saved = json.loads((RESULTS / "scaling.json").read_text())
        print([_plot_fleet(saved["fleet"]["points"]), _plot_sessions(saved["sessions"]["points"])])
        return
    fleet = [fleet_point(int(n), args) for n in args.sizes.split(",") if n]
    sessions = [session_point(int(s), args) for s in args.sessions.split(",") if s]
    out = {
        "benchmark": "scaling",
        "machine": machine(),
        "fleet": {"heartbeat_interval_s": 1.0, "jobs_per_second": args.jobs_per_second, "points": fleet},
        "sessions": {
            "nodes": args.dispatch_nodes,
            "closed_loop_in_flight_per_session": 1,
            "job_execution": "instant",
            "points": sessions,
        },
    }
    out["plots"] = [p for p in (_plot_fleet(fleet), _plot_sessions(sessions)) if p]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scaling.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


def _plot_fleet(points: list[dict[str, Any]]) -> str | None:
    if not points:
        return None

    def draw(plt: Any) -> None:
        n = [p["nodes"] for p in points]
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        a.plot(n, [p["heartbeat_rtt_ms"]["p50"] for p in points], "o-", label="round trip p50 (client)")
        a.plot(n, [p["heartbeat_rtt_ms"]["p99"] for p in points], "o-", label="round trip p99 (client)")
        a.plot(n, [p["server_handle_us"]["p99"] / 1e3 for p in points], "s--", label="server handle p99")
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlabel("nodes (1 heartbeat/s each)")
        a.set_ylabel("ms (log)")
        a.set_title("heartbeat")
        a.legend(fontsize=8)
        b.plot(n, [p["selection_us"]["p50"] for p in points], "o-", label="selection p50")
        b.plot(n, [p["selection_us"]["p99"] for p in points], "o-", label="selection p99")
        b.set_xscale("log")
        b.set_xlabel("nodes")
        b.set_ylabel("µs")
        b.set_ylim(bottom=0)
        b.set_title("selection (lingua_selection_seconds)")
        b.legend(loc="upper center", fontsize=8)
        c = b.twinx()
        c.plot(n, [p["server_cpu_percent_of_one_core"] for p in points], "^:", color="grey")
        c.set_ylabel("server CPU, % of one core (grey)")
        fig.suptitle("scaling with the fleet (2-core machine: scheduler and load generator share it)")

    return plot(draw, RESULTS / "scaling_fleet.png")


def _plot_sessions(points: list[dict[str, Any]]) -> str | None:
    if not points:
        return None

    def draw(plt: Any) -> None:
        s = [p["sessions"] for p in points]
        _fig, a = plt.subplots(figsize=(6.5, 4))
        a.plot(s, [p["jobs_completed_per_s"] for p in points], "o-", label="jobs completed/s")
        a.set_xscale("log")
        a.set_xlabel("sessions (closed loop, 1 utterance in flight each)")
        a.set_ylabel("jobs/s")
        b = a.twinx()
        b.plot(s, [p["end_to_end_ms"]["p99"] for p in points], "s--", color="tab:red", label="e2e p99")
        b.plot(s, [p["end_to_end_ms"]["p50"] for p in points], "s:", color="tab:orange", label="e2e p50")
        b.set_ylabel("end-to-end ms")
        a.legend(loc="upper left", fontsize=8)
        b.legend(loc="lower right", fontsize=8)
        a.set_title("dispatch throughput vs sessions (200 instant nodes)")

    return plot(draw, RESULTS / "scaling_sessions.png")


if __name__ == "__main__":
    main()
