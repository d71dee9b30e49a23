"""Benchmark: what ``/metrics``, ``/api/v1/stats``, a node page and the dashboard frame cost the event loop.

Runs a real scheduler app (aiohttp, real HTTP) in this process and registers ``--nodes`` nodes
straight into its registry (fake connection objects, real ``node_register``/``node_heartbeat``
structs with mixed capabilities, so every node is ready and in its language-pair pools). The
latency windows and histograms are filled to their worst case (65,536 samples per window) and
``--sessions`` sessions spread over language pairs add demand. A probe task measures the event
loop's lag (how late a 1 ms sleep wakes up), first with no requests (baseline), then while a client
in another process requests each endpoint ``--rate`` times a second. Server-side times are measured
around each handler (the handlers never await, so that is exactly the time they hold the loop).
The cold build of ``/api/v1/stats`` (aggregate, exact-tail window percentiles and JSON; the server
does it at most once a second) and of the dashboard frame are also timed directly. Prints one JSON
document; it asserts nothing.

    .venv/bin/python bench/operator_endpoints.py [--nodes 5000] [--seconds 10] [--rate 10]
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
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, machine, percentiles
from lingua_scheduler.config import load_config
from lingua_scheduler.protocol.node import NodeHeartbeat, ResourceUsage
from lingua_scheduler.server.app import build_app
from lingua_scheduler.server.http.stats import STATS
from lingua_scheduler.server.state import STATE
from lingua_scheduler.sim.profiles import LANGUAGES, random_profile

#: what a Prometheus scrape, an API poller and a dashboard's node table request
ENDPOINTS = ("/metrics", "/api/v1/stats", "/api/v1/nodes?limit=20")


def populate(app: web.Application, nodes: int, sessions: int, seed: int) -> None:
    """Register ``nodes`` ready nodes and ``sessions`` sessions; fill windows and histograms."""
    state = app[STATE]
    rng = random.Random(seed)
    registry = state.registry
    for i in range(nodes):
        profile = random_profile(rng)
        conn = object()  # a connection the registry binds the node to (no socket: nothing is sent)
        entry, _ = registry.register(profile.register_message(f"node-{i:06d}"), conn)
        registry.heartbeat(
            conn,
            NodeHeartbeat(
                node_id=entry.node_id,
                timestamp=1,
                resource_usage=ResourceUsage(
                    cpu_percent=rng.uniform(5, 60), mem_percent=40.0, running_jobs=0
                ),
                installed_services=profile.services(),
                capability_by_type=profile.capability_by_type(),
                installed_models=[],
                language_capabilities=profile.languages(),
            ),
        )
    state.publisher.publish()
    # worst case for the exact percentiles /api/v1/stats reports: full 65,536-sample windows
    for window in (state.heartbeat_window, state.dispatch_window):
        for _ in range(65_536):
            window.record(rng.lognormvariate(-10, 0.5))
    m = state.metrics
    for _ in range(20_000):
        m.heartbeat_handle.observe(rng.lognormvariate(-10, 0.5))
        m.selection_seconds.observe(rng.lognormvariate(-10, 0.7))
        m.job_dispatch.observe(rng.lognormvariate(-8, 0.7))
        m.job_end_to_end.observe(rng.lognormvariate(-1, 0.5))
    # sessions only need what the aggregate reads (language pair); the sockets are not part of this
    for i in range(sessions):
        src, tgt = rng.sample(LANGUAGES[:6], 2)
        state.sessions[f"s-{i:08X}"] = SimpleNamespace(src_lang=src, targets=[tgt])  # type: ignore[assignment]
        state.engine.created_by_pair[f"{src}->{tgt}"] = rng.randint(1, 1000)


def client(port: int, rate: float, seconds: float, out: multiprocessing.queues.Queue[Any]) -> None:
    """Request each endpoint ``rate`` times a second, spread evenly; report client-side latencies."""
    lat: dict[str, list[float]] = {e: [] for e in ENDPOINTS}
    sizes: dict[str, int] = {}
    step = 1.0 / (rate * len(ENDPOINTS))
    end = time.perf_counter() + seconds
    nxt = time.perf_counter()
    i = 0
    while time.perf_counter() < end:
        path = ENDPOINTS[i % len(ENDPOINTS)]
        i += 1
        t0 = time.perf_counter()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
            sizes[path] = len(r.read())
        lat[path].append(time.perf_counter() - t0)
        nxt += step
        time.sleep(max(0.0, nxt - time.perf_counter()))
    out.put({"latency": lat, "sizes": sizes})


class LagProbe:
    """How late a 1 ms sleep wakes up: the loop's responsiveness as any other task would feel it."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.running = True

    async def run(self) -> None:
        while self.running:
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            self.samples.append(max(0.0, time.perf_counter() - t0 - 0.001))

    def take(self) -> list[float]:
        out, self.samples = self.samples, []
        return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    config = load_config(env={}, overrides={"server": {"log_level": "warning"}})
    app = build_app(config)
    handler_times: dict[str, list[float]] = {e: [] for e in ENDPOINTS}
    by_path = {e.split("?")[0]: e for e in ENDPOINTS}

    @web.middleware
    async def timed(request: web.Request, handler: Any) -> web.StreamResponse:
        t0 = time.perf_counter()
        response: web.StreamResponse = await handler(request)
        if request.path in by_path:
            handler_times[by_path[request.path]].append(time.perf_counter() - t0)
        return response

    app.middlewares.insert(0, timed)
    t0 = time.perf_counter()
    populate(app, args.nodes, args.sessions, args.seed)
    populate_s = time.perf_counter() - t0
    gc.collect()
    gc.freeze()  # the fleet is long-lived; keep full collections from rescanning it mid-measurement
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    state, agg = app[STATE], app[STATS]

    probe = LagProbe()
    probe_task = asyncio.create_task(probe.run())
    await asyncio.sleep(1.0)
    probe.take()
    await asyncio.sleep(args.baseline)
    baseline = probe.take()

    queue: multiprocessing.queues.Queue[Any] = multiprocessing.Queue()
    proc = multiprocessing.Process(target=client, args=(port, args.rate, args.seconds, queue))
    proc.start()
    loop = asyncio.get_running_loop()
    result = await loop.run_in_executor(None, queue.get)
    proc.join()
    loaded = probe.take()

    # cold builds, timed directly (the server does each at most once a second)
    builds, frames = [], []
    for _ in range(args.builds):
        t0 = time.perf_counter()
        body = agg.api_body(force=True)
        web.json_response(body)
        builds.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        frame = agg.build_frame()
        frames.append(time.perf_counter() - t0)
    probe.running = False
    await probe_task
    await runner.cleanup()

    ms = 1e3
    return {
        "benchmark": "operator_endpoints",
        "machine": machine(),
        "nodes": len(state.registry),
        "nodes_ready": state.registry.counts()["ready"],
        "pools": len(state.publisher.view.pools),
        "language_pairs": len(state.publisher.view.groups),
        "sessions": args.sessions,
        "populate_s": round(populate_s, 2),
        "requests_per_s_per_endpoint": args.rate,
        "measured_s": args.seconds,
        "server_handler_ms": {e: percentiles(v, ms) for e, v in handler_times.items()},
        "client_round_trip_ms": {e: percentiles(v, ms) for e, v in result["latency"].items()},
        "body_bytes": result["sizes"],
        # what one /api/v1/stats costs when its once-a-second cache has expired (aggregate + JSON)
        "stats_cold_build_ms": percentiles(builds, ms),
        "dashboard_frame_build_ms": percentiles(frames, ms),
        "dashboard_frame_bytes": len(frame),
        "event_loop_lag_ms": {
            "probe": "1 ms sleeps; lag = wake-up delay",
            "baseline_no_requests": percentiles(baseline, ms),
            "while_scraped": percentiles(loaded, ms),
        },
    }


def cli() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=5000)
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--baseline", type=float, default=3.0)
    ap.add_argument("--rate", type=float, default=10.0, help="requests per second to each endpoint")
    ap.add_argument("--builds", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(main(args)), indent=2))


if __name__ == "__main__":
    cli()
