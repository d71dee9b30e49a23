"""Helpers of the load-driven benchmarks (seed_scenario, scaling, peer_celery).

``drive`` runs one measured load against a scheduler on 127.0.0.1 with the load generator of
``lingua_scheduler.loadtest`` (cheap simulated nodes and sessions in their own processes);
``redis_server`` and ``baseline_process`` start the other servers a benchmark needs; ``plot`` draws
with matplotlib when it is installed (``make bench-deps``) and says so when it is not.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from _common import free_port
from lingua_scheduler.loadtest.crowd import SessionPlan
from lingua_scheduler.loadtest.fleet import JobBehaviour
from lingua_scheduler.loadtest.runner import server_process
from lingua_scheduler.loadtest.workers import (
    LoadGenerator,
    NodeWorkerSpec,
    SessionWorkerSpec,
    fleet_plan,
    session_plans,
    split,
)
from lingua_scheduler.sim.profiles import NodeProfile

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A throw-away redis-server on a free 127.0.0.1 port (nothing kept on disk); yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="bench-redis-")
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([*args, "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def baseline_process(
    redis_url: str, round_trips: int, interval: float = 1.0
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """The pre-fix baseline server (bench/baseline/server.py) in its own process."""
    port = free_port()
    args = [
        sys.executable,
        str(BENCH / "baseline" / "server.py"),
        "--port",
        str(port),
        "--redis-url",
        redis_url,
        "--round-trips",
        str(round_trips),
        "--heartbeat-interval",
        str(interval),
    ]
    with server_process(args, port, start_timeout=20, failure="baseline server did not start") as proc:
        yield port, proc


def drive(
    port: int,
    *,
    nodes: int,
    sessions: int,
    rate: float,
    warmup: float,
    seconds: float,
    behaviour: JobBehaviour | None = None,
    utterance_ms: int = 100,
    mode: str = "utterance",
    window: int = 0,
    node_procs: int = 1,
    session_procs: int = 1,
    record: bool = False,
    plans: list[SessionPlan] | None = None,
    node_plans: list[tuple[str, NodeProfile]] | None = None,
    window_start: Callable[[], Any] | None = None,
    window_end: Callable[[], Any] | None = None,
    seed: int = 1,
    paced: bool = False,
    fixed_interval: float | None = None,
) -> dict[str, Any]:
    """Register ``nodes``, open ``sessions``, warm up, measure ``seconds``; return the client's figures
    (round trips, latencies, counters; starts/sends with ``record``) and what the hooks returned.
    ``node_plans`` replaces the random fleet of ``nodes`` nodes; ``plans`` the generated sessions.
    ``paced``: one pacer per node worker spreads the heartbeats evenly (``loadtest/fleet.py``);
    ``out["generator"]`` reports how smooth they were and what the node workers' CPU was."""
    fleet = node_plans if node_plans is not None else fleet_plan(nodes, seed, f"b{seed}")
    if plans is None:
        plans = (
            session_plans(
                sessions,
                [p for _, p in fleet],
                mode=mode,
                total_rate=rate,
                utterance_ms=utterance_ms,
                seed=seed + 1,
            )
            if sessions
            else []
        )
    behaviour = behaviour or JobBehaviour(record_starts=record)
    node_specs = [
        NodeWorkerSpec(
            "127.0.0.1",
            port,
            part,
            behaviour,
            fixed_interval=fixed_interval,
            seed=seed * 31 + i,
            concurrency=max(10, 100 // node_procs),
            paced=paced,
        )
        for i, part in enumerate(split(fleet, node_procs))
        if part
    ]
    session_specs = [
        SessionWorkerSpec("127.0.0.1", port, part, window=window, record_sends=record, seed=seed * 37 + i)
        for i, part in enumerate(split(plans, session_procs))
        if part
    ]
    out: dict[str, Any] = {}
    with LoadGenerator(node_specs, session_specs) as gen:
        t0 = time.monotonic()
        gen.start_nodes()
        gen.wait_for(gen.nodes_ready, 120 + nodes / 50)
        out["registration_s"] = round(time.monotonic() - t0, 2)
        gen.start_sessions()
        gen.wait_for(gen.sessions_ready, 120)
        _sleep(gen, warmup)
        out["start"] = window_start() if window_start else None
        t1 = time.monotonic()
        gen.go()
        _sleep(gen, seconds)
        gen.end()
        out["window_s"] = time.monotonic() - t1
        out["end"] = window_end() if window_end else None
        gen.stop_sessions(90)
        gen.stop_nodes(60)
        node_r, sess_r = gen.role_results("nodes"), gen.role_results("sessions")
    out["rtts"] = [x for r in node_r for x in r["rtts"]]
    out["latencies"] = [x for r in sess_r for x in r["latencies"]]
    out["starts"] = [x for r in node_r for x in r["starts"]]
    out["sends"] = [x for r in sess_r for x in r["sends"]]
    out["node_counters"] = _sum([r["counters"] for r in node_r])
    out["session_counters"] = _sum([r["counters"] for r in sess_r])
    out["unanswered"] = sum(r["unanswered"] for r in sess_r)
    out["generator"] = generator_figures(node_r)
    out["client_loop_lag_ms"] = round(1e3 * max([r["loop_lag_max"] for r in node_r + sess_r] or [0.0]), 2)
    return out


def generator_figures(node_results: list[dict[str, Any]]) -> dict[str, Any]:
    """The node workers' own figures over the window: heartbeats written per millisecond (each
    worker's busiest millisecond, summed: an upper bound of the fleet's; the averages, summed) and
    their CPU per heartbeat sent."""
    burst = [r["burstiness"] for r in node_results]
    cpu = sum(r["cpu_seconds"] for r in node_results)
    sent = sum(len(r["rtts"]) for r in node_results)
    wall = max([r["window_seconds"] for r in node_results] or [0.0])
    return {
        "sends_max_per_ms": sum(b["max_per_ms"] for b in burst),
        "sends_p99_per_ms": sum(b["p99_per_ms"] for b in burst),
        "sends_mean_per_ms": round(sum(b["mean_per_ms"] for b in burst), 3),
        "cpu_seconds": round(cpu, 3),
        "cpu_percent_of_one_core": round(100 * cpu / wall, 1) if wall else None,
        "cpu_us_per_heartbeat": round(1e6 * cpu / sent, 1) if sent else None,
        "paced_skipped": sum(r["counters"].get("paced_skipped", 0) for r in node_results),
    }


def _sleep(gen: LoadGenerator, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        gen.poll(min(0.5, max(0.01, end - time.monotonic())))


def _sum(counters: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in counters:
        for k, v in c.items():
            if isinstance(v, int | float):
                out[k] = out.get(k, 0) + v
    return out


def plot(draw: Callable[[Any], None], path: Path) -> str | None:
    """Draw with matplotlib (Agg) into ``path``; returns the path, or None with a message when
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed (make bench-deps): skipping {path.name}", file=sys.stderr)
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    draw(plt)
    plt.savefig(path, dpi=110, bbox_inches="tight")
    plt.close("all")
    return str(path.relative_to(BENCH.parent))
