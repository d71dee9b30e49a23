"""Benchmark: what one node's capability change costs, at the largest capability report accepted.

The largest accepted report (default ``[limits]``): 64 ASR, 64 TTS and 64 semantic languages, 32
translation models of 64 languages each (any-to-any, 100 blocked pairs each) and 960 declared
``supported_language_pairs``, so that the node serves exactly ``max_served_pairs_per_node`` = 1,024
directed pairs (960 + 64 ``auto -> x``) and joins 1,024 pools. Two such reports, A and B, share no
language, so a change from one to the other moves the node out of 1,024 pools and into 1,024 others:
the worst case for pool derivation.

Three measurements, printed as one JSON object:

- ``absorb_in_process``: one change absorbed by the real core objects (registry heartbeat, which
  validates and derives the capabilities, plus the fleet-view publication that rebuilds the pools),
  timed alone in this process: median and p99 over ``--changes`` changes;
- ``absorb_server``: the same seen from outside, against ``lingua-scheduler serve`` in its own process
  with the change budget lifted: a probe node heartbeats back to back on another connection, and the
  loop time one change takes is the probe's round-trip excess over its idle median, summed over the
  round trips beyond its idle p99, in the 300 ms after the change (client-side work in this process
  is included: an upper bound);
- ``alternating``: a node alternating A and B every 0.5 s for ``--seconds`` (the attack), with the
  default change budget and with the budget lifted: the probe's round trips (every 20 ms) and the event
  loop lag the server reports (``/api/v1/stats``), and how many changes the server applied.

    .venv/bin/python bench/capability_change.py [--changes 200] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import get_json, machine, percentiles, scheduler_process
from lingua_scheduler.clock import ManualClock
from lingua_scheduler.config import LimitsConfig, NodeHealthConfig, PoolsConfig
from lingua_scheduler.core.fleet_view import FleetViewPublisher
from lingua_scheduler.core.registry import Registry
from lingua_scheduler.protocol.node import LanguagePair, NmtCapability, NodeLanguageCapabilities, NodeRegister
from lingua_scheduler.sim.nodes import SimulatedNode
from lingua_scheduler.sim.profiles import NodeProfile

LIFTED = {
    "LINGUA_LIMITS__CAPABILITY_CHANGES_PER_MINUTE": "1e9",
    "LINGUA_LIMITS__CAPABILITY_CHANGE_BURST": "1000000000",
}
#: the back-to-back probe sends thousands of heartbeats a second: over the default message rate
FAST_PROBE = {
    "LINGUA_LIMITS__NODE_MESSAGES_PER_SECOND": "1e6",
    "LINGUA_LIMITS__NODE_MESSAGE_BURST": "1000000",
}


def largest_report(prefix: str) -> NodeLanguageCapabilities:
    """The largest report the default limits accept; ``prefix`` makes its languages its own."""
    langs = [f"{prefix}{i:02d}" for i in range(64)]
    # 100 distinct pairs: (i, i+1) for every language, then (i, i+2) for the first 36
    blocked = [LanguagePair(src=langs[i % 64], tgt=langs[(i % 64 + 1 + i // 64) % 64]) for i in range(100)]
    declared = [LanguagePair(src=s, tgt=t) for s in langs for t in langs if s != t][:960]
    return NodeLanguageCapabilities(
        asr_languages=langs,
        tts_languages=langs,
        semantic_languages=langs,
        nmt_capabilities=[
            NmtCapability(model_id=f"m{k}", languages=langs, rule="any_to_any", blocked_pairs=blocked)
            for k in range(32)
        ],
        supported_language_pairs=declared,
    )


REPORTS = (largest_report("a"), largest_report("b"))
PROFILE = NodeProfile(asr_languages=["en", "zh"], tts_languages=["en", "zh"], nmt_languages=["en", "zh"])


def big_register(node_id: str = "n-big") -> NodeRegister:
    msg = PROFILE.register_message(node_id)
    msg.language_capabilities = REPORTS[0]
    return msg


# --- in process ----------------------------------------------------------------------------------------


def absorb_in_process(changes: int) -> dict[str, Any]:
    clock = ManualClock()
    limits = LimitsConfig(capability_changes_per_minute=1e9, capability_change_burst=1_000_000_000)
    registry = Registry(NodeHealthConfig(health_check_count=1), clock, limits)
    publisher = FleetViewPublisher(registry, clock, 4, pools_config=PoolsConfig())
    conn = object()
    registry.register(big_register(), conn)
    publisher.publish()
    node = SimulatedNode(None, "", PROFILE, node_id="n-big")  # type: ignore[arg-type]  # messages only
    beats = [node.heartbeat_message(language_capabilities=r) for r in REPORTS]
    derive_s, publish_s, total_s = [], [], []
    for i in range(changes):
        clock.advance(0.5)
        t0 = time.perf_counter()
        outcome = registry.heartbeat(conn, beats[(i + 1) % 2])
        t1 = time.perf_counter()
        publisher.publish()
        t2 = time.perf_counter()
        assert outcome.capability_changed and outcome.refused is None
        derive_s.append(t1 - t0)
        publish_s.append(t2 - t1)
        total_s.append(t2 - t0)
    nv = publisher.view.nodes["n-big"]
    return {
        "pools_joined": len(nv.pools),
        "served_pairs": len(nv.caps.served_pairs()),
        "heartbeat_with_change_ms": percentiles(derive_s, 1000),
        "publication_ms": percentiles(publish_s, 1000),
        "total_ms": percentiles(total_s, 1000),
    }


# --- against the server process ------------------------------------------------------------------------


class Probe:
    """A small node that heartbeats and records (send time, round trip) of every ack."""

    def __init__(self, node: SimulatedNode) -> None:
        self.node = node
        self.samples: list[tuple[float, float]] = []

    async def beat(self) -> None:
        msg = self.node.heartbeat_message()
        ack = self.node.wait_for(
            lambda m: m.get("type") == "node_heartbeat_ack" and m.get("timestamp") == msg.timestamp, 30
        )
        t0 = time.perf_counter()
        await self.node.send(msg)
        await ack
        self.samples.append((t0, time.perf_counter() - t0))

    async def run(self, every: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.beat()
            if every:
                await asyncio.sleep(every)


async def connect(http: aiohttp.ClientSession, url: str, node_id: str, big: bool) -> SimulatedNode:
    node = SimulatedNode(http, url, PROFILE, node_id=node_id, interval=3600)
    await node.connect()
    if big:
        ack = node.wait_for(lambda m: m.get("type") in ("node_register_ack", "error"))
        await node.send(big_register(node_id))
        reply = await ack
        assert reply["type"] == "node_register_ack", reply
    else:
        assert (await node.register())["type"] == "node_register_ack"
    return node


async def absorb_server(port: int, changes: int) -> dict[str, Any]:
    url = f"ws://127.0.0.1:{port}/ws/node"
    async with aiohttp.ClientSession() as http:
        big = await connect(http, url, "n-big", True)
        probe = Probe(await connect(http, url, "n-probe", False))
        stop = asyncio.Event()
        task = asyncio.create_task(probe.run(0.0, stop))
        await asyncio.sleep(1.0)
        idle = sorted(r for _, r in probe.samples)
        baseline = statistics.median(idle)
        # only round trips beyond the idle p99 count: thousands of tiny deviations are no blocked loop
        noise = idle[int(0.99 * len(idle))]
        costs: list[float] = []
        for i in range(changes):
            start = time.perf_counter()
            await big.heartbeat(language_capabilities=REPORTS[(i + 1) % 2])
            await asyncio.sleep(0.3)
            costs.append(sum(r - baseline for t, r in probe.samples if t >= start and r > noise))
        stop.set()
        await task
        detail = get_json(f"http://127.0.0.1:{port}/api/v1/nodes/n-big")
        await big.close()
        await probe.node.close()
    return {
        "probe_rtt_baseline_ms": round(baseline * 1000, 3),
        "probe_rtt_idle_p99_ms": round(noise * 1000, 3),
        "pools_joined": len(detail["pools"]),
        "loop_time_per_change_ms": percentiles(costs, 1000),
    }


async def alternating(port: int, seconds: float) -> dict[str, Any]:
    url = f"ws://127.0.0.1:{port}/ws/node"
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        big = await connect(http, url, "n-big", True)
        probe = Probe(await connect(http, url, "n-probe", False))
        stop = asyncio.Event()
        task = asyncio.create_task(probe.run(0.02, stop))
        lags: list[float] = []
        t_end = time.perf_counter() + seconds
        i = 0
        while time.perf_counter() < t_end:
            await big.heartbeat(language_capabilities=REPORTS[(i + 1) % 2])
            i += 1
            await asyncio.sleep(0.5)
            if i % 2 == 0:
                lag = get_json(base + "/api/v1/stats")["event_loop_lag_seconds"]
                if lag is not None:
                    lags.append(lag)
        stop.set()
        await task
        await big.close()
        await probe.node.close()
    metrics = await _metrics(base)
    return {
        "changes_sent": i,
        "changes_applied": metrics.get("lingua_capability_changes_total", 0.0),
        "changes_deferred": metrics.get("lingua_capability_changes_deferred_total", 0.0),
        "probe_rtt_ms": percentiles([r for _, r in probe.samples], 1000),
        "server_loop_lag_max_ms": round(max(lags) * 1000, 3) if lags else None,
    }


async def _metrics(base: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as http, http.get(base + "/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            out[name] = float(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--changes", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    result: dict[str, Any] = {
        "benchmark": "capability_change",
        "machine": machine(),
        "report": {
            "languages_per_list": 64,
            "translation_models": 32,
            "blocked_pairs_per_model": 100,
            "declared_pairs": 960,
            "served_pairs": 1024,
            "register_frame_bytes": len(msgspec.json.encode(big_register())),
        },
    }
    result["absorb_in_process"] = absorb_in_process(args.changes)
    with scheduler_process(LIFTED | FAST_PROBE) as (port, _):
        result["absorb_server"] = asyncio.run(absorb_server(port, min(args.changes, 60)))
    with scheduler_process() as (port, _):
        result["alternating_default_budget"] = asyncio.run(alternating(port, args.seconds))
    with scheduler_process(LIFTED) as (port, _):
        result["alternating_budget_lifted"] = asyncio.run(alternating(port, args.seconds))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
