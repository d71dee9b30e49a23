"""Benchmark: the product's heartbeat path against two floors, in one run.

One after the other, each in its own process, with the same paced load generator (its own processes,
``loadtest/fleet.py`` with ``paced=True``: sends spread evenly over each period):

- **product**: ``lingua-scheduler serve`` (embedded mode), told to ask for the chosen interval;
- **aiohttp floor**: the same aiohttp, our decoder, the ack written inline (``bench/floor_servers.py``);
- **raw floor**: an asyncio protocol on the event loop's socket, our decoder, the ack written inline.

Prints JSON: per server the heartbeat round trip (client, p50/p99/p999), the server's CPU per
heartbeat (``/proc/<pid>`` over the window divided by the heartbeats acked in it), and for the product
its garbage-collector figures over the window (``lingua_gc_*`` of ``/metrics``: pauses by generation,
the longest, their share of wall time, tracked objects per heartbeat found by young collections);
then the ratios product / aiohttp floor and product / raw floor, and the load generator's own
burstiness (busiest millisecond against the average) and CPU, per server.

    .venv/bin/python bench/floor.py [--nodes 2000] [--interval 1.0] [--seconds 20] [--only product]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_seconds, free_port, machine, percentiles, scheduler_process
from _loadgen import RESULTS, drive
from lingua_scheduler.loadtest.metrics import Scrape, delta
from lingua_scheduler.loadtest.runner import server_process

BENCH = Path(__file__).resolve().parent
KINDS = ("product", "aiohttp", "raw")


@contextlib.contextmanager
def start(kind: str, interval: float) -> Iterator[tuple[int, int]]:
    """The server ``kind`` in its own process; yields (port, pid)."""
    if kind == "product":
        env = {
            "LINGUA_NODE_HEALTH__HEARTBEAT_INTERVAL_SECONDS": repr(interval),
            "LINGUA_NODE_HEALTH__HEARTBEAT_BUDGET_PER_SECOND": "1000000",
            "LINGUA_LIMITS__MAX_NODES": "100000",
        }
        with scheduler_process(env) as (port, proc):
            yield port, proc.pid
        return
    port = free_port()
    args = [sys.executable, str(BENCH / "floor_servers.py"), "--kind", kind, "--port", str(port)]
    with server_process(args, port, failure=f"the {kind} floor did not start") as proc:
        yield port, proc.pid


def _cumulative(scrape: Scrape, generation: str) -> dict[float, float]:
    """le -> cumulative count of the pause histogram of one generation."""
    out = {}
    for labels, v in scrape.samples.get("lingua_gc_pause_seconds_bucket", {}).items():
        d = dict(labels)
        if d.get("generation") == generation:
            out[float("inf") if d["le"] == "+Inf" else float(d["le"])] = v
    return out


def gc_window(before: Scrape, after: Scrape, wall: float, heartbeats: int) -> dict[str, Any]:
    """The product's collector over the window, from two scrapes of ``/metrics``."""
    by_gen: dict[str, Any] = {}
    total = 0.0
    longest = 0.0  # upper bound of the bucket holding the window's longest pause
    for g in ("0", "1", "2"):
        n = delta(after, before, "lingua_gc_pause_seconds_count", generation=g)
        s = delta(after, before, "lingua_gc_pause_seconds_sum", generation=g)
        total += s
        by_gen[g] = {"collections": int(n), "pause_ms_total": round(s * 1e3, 2)}
        a, b = _cumulative(after, g), _cumulative(before, g)
        if n > 0:
            bound = min(le for le, c in a.items() if c - b.get(le, 0.0) >= n)
            longest = max(longest, bound)
    young = delta(after, before, "lingua_gc_young_objects_sampled_total")
    young_s = delta(after, before, "lingua_gc_young_seconds_sampled_total")
    rate = heartbeats / wall if wall else 0.0
    return {
        "by_generation": by_gen,
        "pause_share_of_wall_percent": round(100 * total / wall, 3) if wall else None,
        "pause_max_ms_window_at_most": round(longest * 1e3, 2),
        "pause_max_ms_since_start": round(after.value("lingua_gc_pause_max_seconds") * 1e3, 2),
        # objects alive in generation 0 per second of accumulation, per heartbeat of that second
        "young_objects_per_heartbeat": round(young / young_s / rate, 2) if young_s and rate else None,
        "frozen_objects": int(after.value("lingua_gc_frozen_objects")),
    }


def run_one(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    with start(kind, args.interval) as (port, pid):
        base = f"http://127.0.0.1:{port}"
        marks: dict[str, Any] = {}

        def window_start() -> None:
            marks["cpu0"], marks["t0"] = cpu_seconds(pid), time.perf_counter()
            if kind == "product":
                marks["scrape0"] = Scrape.fetch(base)

        def window_end() -> None:
            marks["cpu1"], marks["t1"] = cpu_seconds(pid), time.perf_counter()
            if kind == "product":
                marks["scrape1"] = Scrape.fetch(base)

        res = drive(
            port,
            nodes=args.nodes,
            sessions=0,
            rate=0.0,
            warmup=args.warmup,
            seconds=args.seconds,
            node_procs=args.procs,
            window_start=window_start,
            window_end=window_end,
            paced=True,
            fixed_interval=args.interval,
        )
    wall = marks["t1"] - marks["t0"]
    cpu = marks["cpu1"] - marks["cpu0"]
    acked = len(res["rtts"])
    out: dict[str, Any] = {
        "server": kind,
        "registration_s": res["registration_s"],
        "heartbeats_acked": acked,
        "heartbeats_per_s": round(acked / args.seconds, 1),
        "round_trip_ms": percentiles(res["rtts"], 1e3),
        "server_cpu_percent_of_one_core": round(100 * cpu / wall, 1),
        "server_cpu_us_per_heartbeat": round(1e6 * cpu / acked, 1) if acked else None,
        "load_generator": res["generator"],
        "load_generator_loop_lag_ms": res["client_loop_lag_ms"],
    }
    if kind == "product":
        out["gc"] = gc_window(marks["scrape0"], marks["scrape1"], wall, acked)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=2000)
    ap.add_argument("--interval", type=float, default=1.0, help="heartbeat interval, seconds")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--procs", type=int, default=2, help="load-generator processes")
    ap.add_argument("--only", choices=KINDS, action="append", help="run only these servers")
    ap.add_argument("--save", default=None, help="also write the JSON to bench/results/<name>.json")
    args = ap.parse_args()
    runs = {k: run_one(k, args) for k in (args.only or KINDS)}
    out: dict[str, Any] = {
        "benchmark": "floor",
        "machine": machine(),
        "nodes": args.nodes,
        "heartbeat_interval_s": args.interval,
        "offered_heartbeats_per_s": round(args.nodes / args.interval, 1),
        "measured_s": args.seconds,
        "load_generator_processes": args.procs,
        "servers": runs,
    }
    product = runs.get("product", {}).get("server_cpu_us_per_heartbeat")
    for floor in ("aiohttp", "raw"):
        other = runs.get(floor, {}).get("server_cpu_us_per_heartbeat")
        if product and other:
            out[f"cpu_ratio_product_over_{floor}_floor"] = round(product / other, 2)
    text = json.dumps(out, indent=2)
    print(text)
    if args.save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{args.save}.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
