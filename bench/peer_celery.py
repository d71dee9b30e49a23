"""Benchmark: the same dispatch workload through Celery (Redis broker) and through this scheduler.

Workload: 200 workers, each able to serve the directed language pairs of a realistic capability
profile (``sim.profiles``, the same 200 profiles on both sides); jobs on language pairs drawn in
proportion to how many workers serve them; instant execution. Measured, in one run on one machine:

- submit -> worker start latency p50/p99 at an offered open-loop rate (default 200 jobs/s): the
  client's clock when it wrote the job (``apply_async`` / the ``utterance`` frame) to the worker's clock
  when the job reached it (task body entered / ``job_assign`` parsed). Both clocks are
  ``time.monotonic()`` (CLOCK_MONOTONIC, shared by all processes of the machine);
- jobs/s at saturation: Celery, a burst of jobs submitted back to back, counted from the first
  submission to the last start; the scheduler, 50 sessions each keeping 4 jobs in flight (its client
  protocol is a session, not a queue), counted over the window.

Celery side: a Redis broker (redis-server started here), one queue per directed language pair
(``pair.en-zh``), and the 200 workers emulated by ``--celery-procs`` worker processes (default 4), each
with a thread pool of 200 / procs slots consuming the union of the queues its share of the 200
workers can serve (worker i belongs to process i mod procs). Running 200 separate worker processes on
2 cores would measure the operating system's scheduler, not Celery's routing; docs/performance.md
explains the choice. Scheduler side: ``lingua-scheduler serve`` with 200 simulated nodes of the same
profiles (the cheap load-test nodes, answering at once) and simulated sessions.

Needs Celery: ``make bench-deps``. Then:

    .venv/bin/python bench/peer_celery.py [--rate 200] [--seconds 15] [--burst 5000]

Prints JSON; writes bench/results/peer_celery.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

WORKERS = 200
STARTS_KEY = "peer:starts"
_redis_client: Any = None

try:  # the Celery app is module-level so that worker processes (celery -A peer_celery) find it
    from celery import Celery

    app: Any = Celery("peer", broker=os.environ.get("PEER_BROKER_URL", "redis://127.0.0.1:6379/0"))
    app.conf.update(
        task_ignore_result=True,
        worker_prefetch_multiplier=4,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_serializer="json",
        accept_content=["json"],
    )

    @app.task(name="peer.start")  # type: ignore[untyped-decorator]
    def start(job_id: int, submitted_at: float, payload: str) -> None:
        """Instant execution: note when the job reached a worker."""
        started = time.monotonic()
        global _redis_client
        if _redis_client is None:
            import redis

            _redis_client = redis.Redis.from_url(os.environ["PEER_BROKER_URL"])
        _redis_client.rpush(STARTS_KEY, f"{job_id} {submitted_at!r} {started!r}")

except ImportError:  # reported by main()
    Celery = None  # type: ignore[assignment,misc]


def _queue(pair: tuple[str, str]) -> str:
    return f"pair.{pair[0]}-{pair[1]}"


def _jobs(n: int, seed: int, profiles: list[Any]) -> list[tuple[str, str]]:
    """``n`` job language pairs, drawn in proportion to how many workers serve each pair."""
    import random

    from lingua_scheduler.loadtest.workers import served_pairs

    pairs = served_pairs(profiles)
    keys = sorted(pairs)
    return random.Random(seed).choices(keys, [pairs[k] for k in keys], k=n)


# --- Celery -----------------------------------------------------------------------------------------------


def run_celery(args: argparse.Namespace, fleet: list[Any], payload: str) -> dict[str, Any]:
    import redis

    from _loadgen import BENCH, redis_server
    from lingua_scheduler.loadtest.workers import served_pairs

    profiles = [p for _, p in fleet]
    with redis_server() as url:
        os.environ["PEER_BROKER_URL"] = url
        app.conf.broker_url = url
        r = redis.Redis.from_url(url)
        procs = []
        env = dict(os.environ, PEER_BROKER_URL=url, PYTHONPATH=str(BENCH))
        all_queues: set[str] = set()
        for k in range(args.celery_procs):
            mine = [profiles[i] for i in range(WORKERS) if i % args.celery_procs == k]
            queues = sorted({_queue(p) for p in served_pairs(mine)})
            all_queues |= set(queues)
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "celery",
                        "-A",
                        "peer_celery",
                        "worker",
                        "--pool=threads",
                        f"--concurrency={WORKERS // args.celery_procs}",
                        "-Q",
                        ",".join(queues),
                        "-n",
                        f"peer{k}@bench",
                        "--without-gossip",
                        "--without-mingle",
                        "--without-heartbeat",
                        "--loglevel=WARNING",
                    ],
                    env=env,
                    cwd=str(BENCH),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        try:
            # ready: one job through every queue
            for i, q in enumerate(sorted(all_queues)):
                start.apply_async((-(i + 1), time.monotonic(), payload), queue=q)
            _wait_count(r, len(all_queues), 120)
            r.delete(STARTS_KEY)
            # latency at the offered rate (open loop)
            jobs = _jobs(int(args.rate * args.seconds), args.seed, profiles)
            t0 = time.monotonic()
            for i, pair in enumerate(jobs):
                due = t0 + i / args.rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                start.apply_async((i, time.monotonic(), payload), queue=_queue(pair))
            _wait_count(r, len(jobs), 60)
            lat = _latencies(r)
            span = max(s for _, s in lat) - t0
            r.delete(STARTS_KEY)
            # saturation: a burst submitted back to back
            burst = _jobs(args.burst, args.seed + 1, profiles)
            b0 = time.monotonic()
            for i, pair in enumerate(burst):
                start.apply_async((i, time.monotonic(), payload), queue=_queue(pair))
            submit_s = time.monotonic() - b0
            _wait_count(r, len(burst), 120)
            blat = _latencies(r)
            burst_span = max(s for _, s in blat) - b0
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
            r.close()
    from _common import percentiles

    return {
        "worker_processes": args.celery_procs,
        "threads_per_process": WORKERS // args.celery_procs,
        "queues": len(all_queues),
        "submit_to_start_ms": percentiles([x for x, _ in lat], 1e3),
        "jobs_per_s_at_offered_rate": round(len(lat) / span, 1),
        "saturation": {
            "jobs": len(blat),
            "jobs_per_s": round(len(blat) / burst_span, 1),
            "producer_submit_per_s": round(len(burst) / submit_s, 1),
            "submit_to_start_ms": percentiles([x for x, _ in blat], 1e3),
        },
    }


def _wait_count(r: Any, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while r.llen(STARTS_KEY) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {r.llen(STARTS_KEY)} of {n} Celery jobs started in {timeout:g} s")
        time.sleep(0.05)


def _latencies(r: Any) -> list[tuple[float, float]]:
    """(submit -> start seconds, start time) of every recorded start."""
    out = []
    for raw in r.lrange(STARTS_KEY, 0, -1):
        _, sub, st = raw.decode().split()
        out.append((float(st) - float(sub), float(st)))
    return out


# --- this scheduler ---------------------------------------------------------------------------------------


def run_scheduler(args: argparse.Namespace, fleet: list[Any], utterance_ms: int) -> dict[str, Any]:
    from _common import percentiles, scheduler_process
    from _loadgen import drive
    from lingua_scheduler.loadtest.crowd import SessionPlan
    from lingua_scheduler.loadtest.fleet import JobBehaviour

    profiles = [p for _, p in fleet]
    sessions = 50
    pairs = _jobs(sessions, args.seed, profiles)
    plans = [SessionPlan(s, t, "utterance", args.rate / sessions, utterance_ms) for s, t in pairs]
    with scheduler_process() as (port, _):
        r = drive(
            port,
            nodes=0,
            sessions=sessions,
            rate=args.rate,
            warmup=2.0,
            seconds=args.seconds,
            plans=plans,
            node_plans=fleet,
            behaviour=JobBehaviour(record_starts=True),
            record=True,
        )
    starts = {(sid, idx): t for sid, idx, t in r["starts"]}
    lat = [starts[(sid, idx)] - t for sid, idx, t in r["sends"] if (sid, idx) in starts]
    closed = [SessionPlan(s, t, "utterance", 0.0, utterance_ms) for s, t in pairs]
    with scheduler_process() as (port, _):
        sat = drive(
            port,
            nodes=0,
            sessions=sessions,
            rate=0.0,
            warmup=1.0,
            seconds=min(args.seconds, 8.0),
            plans=closed,
            node_plans=fleet,
            window=4,
            behaviour=JobBehaviour(record_starts=True),
            record=True,
        )
    sstarts = {(sid, idx): t for sid, idx, t in sat["starts"]}
    slat = [sstarts[(sid, idx)] - t for sid, idx, t in sat["sends"] if (sid, idx) in sstarts]
    return {
        "nodes": len(fleet),
        "sessions": sessions,
        "submit_to_start_ms": percentiles(lat, 1e3),
        "jobs_per_s_at_offered_rate": round(r["session_counters"]["window_completed"] / r["window_s"], 1),
        "saturation": {
            "in_flight": sessions * 4,
            "jobs_per_s": round(sat["session_counters"]["window_completed"] / sat["window_s"], 1),
            "submit_to_start_ms": percentiles(slat, 1e3),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=200.0, help="offered jobs/s for the latency phase")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--burst", type=int, default=5000, help="Celery jobs submitted back to back")
    ap.add_argument("--celery-procs", type=int, default=4, help="Celery worker processes (threads pool)")
    ap.add_argument("--utterance-ms", type=int, default=10, help="audio per job (same bytes to Celery)")
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()
    if Celery is None:
        sys.exit("Celery is not installed: run `make bench-deps` first")
    from _common import machine
    from _loadgen import RESULTS
    from lingua_scheduler.loadtest.crowd import pcm_b64
    from lingua_scheduler.loadtest.workers import fleet_plan

    fleet = fleet_plan(WORKERS, args.seed, "peer")
    payload = pcm_b64(args.utterance_ms)
    celery = run_celery(args, fleet, payload)
    scheduler = run_scheduler(args, fleet, args.utterance_ms)
    import celery as celery_pkg

    out = {
        "benchmark": "peer_celery",
        "machine": machine(),
        "workload": {
            "workers": WORKERS,
            "offered_rate_per_s": args.rate,
            "seconds": args.seconds,
            "job_execution": "instant",
            "payload_bytes": len(payload),
        },
        "celery": {"version": celery_pkg.__version__, "broker": "redis", **celery},
        "lingua_scheduler": scheduler,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "peer_celery.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
