"""Selection latency at 1k / 10k / 50k nodes, idle and while the registry absorbs 10,000 heartbeats/s.

Builds each fleet in-process through the real ``Registry`` and ``FleetViewPublisher`` (realistic mixed
capabilities from ``lingua_scheduler.sim.profiles``), then times ``Selector.select`` one call at a time.
Under load, time is simulated: between two selections the registry takes the heartbeats due at the
configured rate (load varies; one in ``--change-every`` heartbeats also changes a node's languages, so
pools are maintained incrementally), and ``publish()`` runs every 50 ms of simulated time, as the
server's reconciler would. Idle and loaded blocks of ``--block`` selections alternate. Only selection
is timed (publish time is reported apart). Prints one JSON document; it asserts nothing.

    .venv/bin/python bench/selection.py [--sizes 1000,10000,50000] [--selections 40000]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass

from _common import machine
from lingua_scheduler.clock import ManualClock
from lingua_scheduler.config import NodeHealthConfig, PoolsConfig
from lingua_scheduler.core.fleet_view import FleetViewPublisher
from lingua_scheduler.core.registry import Registry
from lingua_scheduler.core.selection import SelectionRequest, Selector
from lingua_scheduler.protocol.node import (
    CapabilityByType,
    InstalledService,
    NodeHeartbeat,
    NodeLanguageCapabilities,
    ResourceUsage,
)
from lingua_scheduler.sim.profiles import NodeProfile, random_profile

MAX_JOBS = 4
PUBLISH_EVERY = 0.050


@dataclass(slots=True)
class SimNode:
    node_id: str
    conn: object
    profile: NodeProfile
    # the lists a node sends unchanged in every heartbeat (built once, as a client would)
    services: list[InstalledService]
    by_type: list[CapabilityByType]
    languages: NodeLanguageCapabilities


def build_fleet(
    n: int, rng: random.Random
) -> tuple[Registry, FleetViewPublisher, ManualClock, list[SimNode]]:
    clock = ManualClock()
    registry = Registry(NodeHealthConfig(health_check_count=1), clock)
    publisher = FleetViewPublisher(registry, clock, MAX_JOBS, pools_config=PoolsConfig())
    nodes: list[SimNode] = []
    for i in range(n):
        p = random_profile(rng)
        conn = object()
        node_id = f"node-{i:06d}"
        registry.register(p.register_message(node_id), conn)
        sim = SimNode(node_id, conn, p, p.services(), p.capability_by_type(), p.languages())
        nodes.append(sim)
        heartbeat(registry, sim, rng, clock)  # healthy heartbeat: registering -> ready
    publisher.publish()
    return registry, publisher, clock, nodes


def heartbeat(registry: Registry, node: SimNode, rng: random.Random, clock: ManualClock) -> None:
    registry.heartbeat(
        node.conn,
        NodeHeartbeat(
            node_id=node.node_id,
            timestamp=clock.wall_ms(),
            resource_usage=ResourceUsage(
                cpu_percent=rng.uniform(5.0, 80.0),
                mem_percent=rng.uniform(20.0, 70.0),
                running_jobs=rng.randint(0, MAX_JOBS - 1),
                gpu_percent=rng.uniform(10.0, 80.0),
            ),
            installed_services=node.services,
            capability_by_type=node.by_type,
            language_capabilities=node.languages,
        ),
    )


def change_languages(node: SimNode, rng: random.Random) -> None:
    """A node installs or drops a language: a real capability change (pools move)."""
    langs = list(node.profile.asr_languages)
    extra = rng.choice(("it", "pt", "ru"))
    langs = [lang for lang in langs if lang != extra] if extra in langs else [*langs, extra]
    node.profile = NodeProfile(asr_languages=langs, tts_languages=langs, nmt_languages=langs)
    node.languages = node.profile.languages()


def requests(rng: random.Random, count: int) -> list[SelectionRequest]:
    langs = ("en", "zh", "de", "fr", "es", "ja", "ko", "ru", "pt", "it")
    out = []
    for i in range(count):
        src = "auto" if rng.random() < 0.1 else rng.choice(langs)
        tgt = rng.choice([lang for lang in langs if lang != src])
        if rng.random() < 0.6:  # most traffic involves English
            src, tgt = ("en", tgt) if rng.random() < 0.5 and tgt != "en" else (src, "en")
            if src == tgt:
                src = "zh"
        out.append(SelectionRequest(src, tgt, routing_key=f"session-{i % 500}"))
    return out


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    s = sorted(samples_ns)

    def pick(q: float) -> float:
        return s[min(len(s) - 1, int(q * len(s)))] / 1000.0

    return {
        "p50_us": round(pick(0.50), 1),
        "p90_us": round(pick(0.90), 1),
        "p99_us": round(pick(0.99), 1),
        "max_us": round(s[-1] / 1000.0, 1),
        "mean_us": round(statistics.fmean(s) / 1000.0, 1),
    }


def run_size(
    n: int, selections: int, sel_rate: float, hb_rate: float, change_every: int, block: int, seed: int
) -> dict[str, object]:
    rng = random.Random(seed)
    t0 = time.perf_counter()
    registry, publisher, clock, nodes = build_fleet(n, rng)
    build_s = time.perf_counter() - t0
    selector = Selector(rng=random.Random(seed + 1))
    reqs = requests(rng, selections)
    view = publisher.view
    for r in reqs[:2000]:  # warm-up
        selector.select(view, r)

    # Idle and loaded phases alternate in blocks, so slow drift of the machine (frequency, neighbours)
    # hits both alike; a loaded block lasts block / selection_rate seconds of simulated time.
    idle: list[int] = []
    loaded: list[int] = []
    publish_ns: list[int] = []
    per_selection = hb_rate / sel_rate
    owed = 0.0
    next_publish = clock.monotonic() + PUBLISH_EVERY
    heartbeats = changes = found = 0
    for i, r in enumerate(reqs):
        under_load = (i // block) % 2 == 1
        if under_load:
            clock.advance(1.0 / sel_rate)
            owed += per_selection
            while owed >= 1.0:
                owed -= 1.0
                node = nodes[int(rng.random() * n)]
                heartbeats += 1
                if change_every and heartbeats % change_every == 0:
                    change_languages(node, rng)
                    changes += 1
                heartbeat(registry, node, rng, clock)
            if clock.monotonic() >= next_publish:
                next_publish += PUBLISH_EVERY
                t = time.perf_counter_ns()
                publisher.publish()
                publish_ns.append(time.perf_counter_ns() - t)
        view = publisher.view
        t = time.perf_counter_ns()
        res = selector.select(view, r)
        (loaded if under_load else idle).append(time.perf_counter_ns() - t)
        found += res.node_id is not None

    view = publisher.view
    idle_p = percentiles(idle)
    loaded_p = percentiles(loaded)
    return {
        "nodes": n,
        "build_seconds": round(build_s, 2),
        "pools": len(view.pools),
        "pairs": len(view.groups),
        "largest_pair_shards": max(len(s) for s in view.groups.values()),
        "found_ratio": round(found / len(reqs), 4),
        "idle": idle_p,
        "heartbeats": {
            **loaded_p,
            "heartbeats_per_second": hb_rate,
            "heartbeats_applied": heartbeats,
            "capability_changes": changes,
            "publish": percentiles(publish_ns) if publish_ns else {},
            "reassignments": publisher.reassignments,
        },
        "p99_change": round(loaded_p["p99_us"] / idle_p["p99_us"] - 1.0, 3),
        "p99_target_met": max(idle_p["p99_us"], loaded_p["p99_us"]) <= 100.0,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000,10000,50000")
    ap.add_argument("--selections", type=int, default=40_000, help="timed selections, idle + loaded")
    ap.add_argument("--selection-rate", type=float, default=1_000.0, help="simulated selections/s")
    ap.add_argument("--heartbeat-rate", type=float, default=10_000.0, help="simulated heartbeats/s")
    ap.add_argument("--change-every", type=int, default=2_000, help="one capability change per N heartbeats")
    ap.add_argument("--block", type=int, default=1_000, help="selections per idle / loaded block")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    results = [
        run_size(
            int(n),
            args.selections,
            args.selection_rate,
            args.heartbeat_rate,
            args.change_every,
            args.block,
            args.seed,
        )
        for n in args.sizes.split(",")
    ]
    json.dump(
        {
            "benchmark": "selection",
            "machine": machine(),
            "selection_rate_per_second": args.selection_rate,
            "results": results,
        },
        sys.stdout,
        indent=2,
    )
    print()


if __name__ == "__main__":
    main()
