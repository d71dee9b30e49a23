"""Benchmark: the seed document's scenario -- heartbeats and job creation at the same time.

The seed document is the write-up of the reference scheduler's heartbeat fix that this project started
from (docs/design.md, "The reference system and what we do differently").

2,000 nodes heartbeat once a second while sessions create 200 jobs a second (one-shot utterances,
nodes answer at once). The same load, from the same load generator (own processes), runs against

- the PRODUCT: ``lingua-scheduler serve`` as built, told to ask for 1 s heartbeats;
- the BASELINE: ``bench/baseline/server.py``, the pre-fix design (post-heartbeat work inline in the
  heartbeat handler under a lock that selection also needs, with sequential round trips to a real
  redis-server started here), built on the product's own parser, registry, fleet view and selector.

Reported side by side, with ratios baseline / product: heartbeat round trip p50/p99 (client: sent ->
ack), selection p50/p99 (product: ``lingua_selection_seconds``; baseline: from asking for the lock to
the selection's end, so lock wait included), their split into lock wait and selection proper for the
baseline, end-to-end job latency and server CPU. ``symptom_reproduced`` says whether the baseline's
selections spent their time waiting for the lock (the seed's "management lock read wait too long").

    .venv/bin/python bench/seed_scenario.py [--nodes 2000] [--jobs-per-second 200] [--seconds 20]
        [--round-trips 7]

Prints JSON; also writes bench/results/seed_scenario.json and seed_scenario.png (with matplotlib).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_seconds, get_json, machine, percentiles, scheduler_process
from _loadgen import RESULTS, baseline_process, drive, plot, redis_server
from lingua_scheduler.loadtest.metrics import Scrape, histogram_quantiles


def _ms(d: dict[str, Any] | None, key: str) -> float | None:
    v = (d or {}).get(key)
    return None if v is None else round(v * 1e3, 3)


def _drive(
    port: int, args: argparse.Namespace, window_start: Callable[[], Any], window_end: Callable[[], Any]
) -> dict[str, Any]:
    """The scenario's load against the server on ``port``: the same for the product and the baseline, so
    that only the hooks reading each server's own figures at the window's start and end differ."""
    return drive(
        port,
        nodes=args.nodes,
        sessions=args.sessions,
        rate=args.jobs_per_second,
        warmup=args.warmup,
        seconds=args.seconds,
        node_procs=args.node_procs,
        window_start=window_start,
        window_end=window_end,
    )


def run_product(args: argparse.Namespace) -> dict[str, Any]:
    env = {
        "LINGUA_NODE_HEALTH__HEARTBEAT_INTERVAL_SECONDS": "1",
        "LINGUA_NODE_HEALTH__HEARTBEAT_BUDGET_PER_SECOND": "1000000",
    }
    with scheduler_process(env) as (port, proc):
        base = f"http://127.0.0.1:{port}"

        def mark() -> tuple[Scrape, float, float]:
            return Scrape.fetch(base), cpu_seconds(proc.pid), time.monotonic()

        r = _drive(port, args, mark, mark)
    (m1, c1, t1), (m2, c2, t2) = r["start"], r["end"]
    sel = histogram_quantiles(m2, m1, "lingua_selection_seconds", (0.5, 0.99, 0.999))
    handle = histogram_quantiles(m2, m1, "lingua_heartbeat_handle_seconds", (0.5, 0.99))
    return _common_figures(r, args) | {
        "heartbeats_server": int(m2.value("lingua_heartbeats_total") - m1.value("lingua_heartbeats_total")),
        "selection_ms": {"p50": _ms(sel, "p50"), "p99": _ms(sel, "p99"), "p999": _ms(sel, "p999")},
        "selection_source": "lingua_selection_seconds histogram (interpolated in buckets); no lock",
        "heartbeat_handle_ms": {"p50": _ms(handle, "p50"), "p99": _ms(handle, "p99")},
        "server_cpu_percent_of_one_core": round(100 * (c2 - c1) / (t2 - t1), 1),
    }


def run_baseline(args: argparse.Namespace) -> dict[str, Any]:
    with redis_server() as redis_url, baseline_process(redis_url, args.round_trips) as (port, proc):
        base = f"http://127.0.0.1:{port}"

        def start() -> tuple[float, float]:
            urllib.request.urlopen(urllib.request.Request(base + "/stats/reset", method="POST"), timeout=10)
            return cpu_seconds(proc.pid), time.monotonic()

        def end() -> tuple[dict[str, Any], float, float]:
            return get_json(base + "/stats"), cpu_seconds(proc.pid), time.monotonic()

        r = _drive(port, args, start, end)
    (c1, t1), (st, c2, t2) = r["start"], r["end"]

    def q(name: str) -> dict[str, float | None]:
        d = st[name]
        return {"p50": _ms(d, "p50"), "p99": _ms(d, "p99"), "p999": _ms(d, "p999")}

    return _common_figures(r, args) | {
        "heartbeats_server": st["heartbeat_handle_seconds"]["count"],
        "selection_ms": q("selection_seconds"),
        "selection_source": "baseline /stats: asking for the lock -> selection done (lock wait included)",
        "selection_lock_wait_ms": q("selection_lock_wait_seconds"),
        "selection_compute_ms": q("selection_compute_seconds"),
        "heartbeat_handle_ms": q("heartbeat_handle_seconds"),
        "heartbeat_lock_wait_ms": q("heartbeat_lock_wait_seconds"),
        "heartbeat_lock_hold_ms": q("heartbeat_lock_hold_seconds"),
        "slow_lock_waits": st["slow_lock_waits"],
        "slow_wait_threshold_ms": st["slow_wait_threshold_seconds"] * 1e3,
        "redis_round_trips_per_heartbeat": args.round_trips,
        "server_cpu_percent_of_one_core": round(100 * (c2 - c1) / (t2 - t1), 1),
    }


def _common_figures(r: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    window = r["window_s"]
    sc = r["session_counters"]
    return {
        "registration_s": r["registration_s"],
        "heartbeats_acked_per_s": round(len(r["rtts"]) / window, 1),
        "heartbeat_rtt_ms": percentiles(r["rtts"], 1e3),
        "jobs_created_per_s": round(sc["window_sent"] / window, 1),
        "jobs_completed_per_s": round(sc["window_completed"] / window, 1),
        "jobs_failed": sc["failed"],
        "jobs_unanswered_at_end": r["unanswered"],
        "end_to_end_ms": percentiles(r["latencies"], 1e3),
        "load_generator_loop_lag_ms": r["client_loop_lag_ms"],
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return round(a / b, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=2000)
    ap.add_argument("--jobs-per-second", type=float, default=200.0)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--round-trips", type=int, default=7, help="baseline: Redis round trips per heartbeat")
    ap.add_argument("--node-procs", type=int, default=1)
    ap.add_argument("--only", choices=["product", "baseline"], default=None)
    args = ap.parse_args()
    product = run_product(args) if args.only != "baseline" else None
    baseline = run_baseline(args) if args.only != "product" else None
    out: dict[str, Any] = {
        "benchmark": "seed_scenario",
        "machine": machine(),
        "workload": {
            "nodes": args.nodes,
            "heartbeat_interval_s": 1.0,
            "jobs_per_second": args.jobs_per_second,
            "sessions": args.sessions,
            "measured_s": args.seconds,
            "job_execution": "instant",
        },
        "product": product,
        "baseline": baseline,
    }
    if product and baseline:
        ratios = {
            "heartbeat_rtt_p50": _ratio(
                baseline["heartbeat_rtt_ms"]["p50"], product["heartbeat_rtt_ms"]["p50"]
            ),
            "heartbeat_rtt_p99": _ratio(
                baseline["heartbeat_rtt_ms"]["p99"], product["heartbeat_rtt_ms"]["p99"]
            ),
            "selection_p50": _ratio(baseline["selection_ms"]["p50"], product["selection_ms"]["p50"]),
            "selection_p99": _ratio(baseline["selection_ms"]["p99"], product["selection_ms"]["p99"]),
        }
        out["ratios_baseline_over_product"] = ratios
        out["product_at_least_20x_lower"] = all(
            (ratios[k] or 0) >= 20 for k in ("heartbeat_rtt_p99", "selection_p99")
        )
        wait, comp = baseline["selection_lock_wait_ms"]["p99"], baseline["selection_compute_ms"]["p99"]
        out["symptom_reproduced"] = bool(
            wait is not None and comp is not None and wait > 10 * comp and baseline["slow_lock_waits"] > 0
        )
        out["symptom"] = (
            f"baseline selections waited p99 {wait} ms for the lock to do p99 {comp} ms of selection; "
            f"{baseline['slow_lock_waits']} lock waits over {baseline['slow_wait_threshold_ms']:g} ms"
        )
        _plot(product, baseline)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = (
        "seed_scenario.json" if args.only is None else f"seed_scenario_{args.only}_rt{args.round_trips}.json"
    )
    (RESULTS / name).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


def _plot(product: dict[str, Any], baseline: dict[str, Any]) -> None:
    def draw(plt: Any) -> None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key, title in (
            (axes[0], "heartbeat_rtt_ms", "heartbeat round trip (client)"),
            (axes[1], "selection_ms", "selection (baseline: incl. lock wait)"),
        ):
            labels = ["p50", "p99"]
            xs = range(len(labels))
            pv = [product[key][k] or 0 for k in labels]
            bv = [baseline[key][k] or 0 for k in labels]
            ax.bar([x - 0.2 for x in xs], pv, 0.4, label="product")
            ax.bar([x + 0.2 for x in xs], bv, 0.4, label="baseline (pre-fix)")
            ax.set_xticks(list(xs), labels)
            ax.set_yscale("log")
            ax.set_ylabel("ms (log)")
            ax.set_title(title)
            for x, v in zip(xs, pv, strict=True):
                ax.annotate(f"{v:g}", (x - 0.2, v), ha="center", va="bottom", fontsize=8)
            for x, v in zip(xs, bv, strict=True):
                ax.annotate(f"{v:g}", (x + 0.2, v), ha="center", va="bottom", fontsize=8)
            ax.legend()
        fig.suptitle("seed scenario: 2,000 nodes at 1 heartbeat/s + 200 jobs/s")

    plot(draw, RESULTS / "seed_scenario.png")


if __name__ == "__main__":
    main()
