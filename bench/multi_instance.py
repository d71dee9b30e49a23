"""Benchmark: one and two scheduler instances behind one Redis.

For each layout (1 instance; 2 instances with every node on B and every session on A, so every
dispatch crosses instances), in separate server processes with a load generator in this one:

- dispatch jobs/s: 20 sessions send complete utterances, evenly spread, at ``--rate``/s in all to
  200 instant-answering nodes (measured first, on a settled fleet);
- heartbeats/s absorbed: ``--hb-nodes`` light nodes heartbeating every 0.5 s, split across instances;
- dispatch latency: utterance sent -> job_assign received by the node (client clock, one process),
  p50/p99, in both layouts;
- the cross-instance hop, measured by the servers themselves: job_assign handed to Redis by the
  session's instance -> delivered to the node by the node's instance
  (``lingua_cross_instance_dispatch_seconds``).

    .venv/bin/python bench/multi_instance.py [--rate 300] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import get_json, machine, percentiles, scheduler_process
from _loadgen import redis_server
from lingua_scheduler.sim.nodes import Executor, SimulatedNode
from lingua_scheduler.sim.profiles import NodeProfile
from lingua_scheduler.sim.sessions import SimulatedSession

LANGS = ["en", "zh", "de", "fr"]
PROFILE = NodeProfile(asr_languages=LANGS, tts_languages=LANGS, nmt_languages=LANGS)


@contextlib.contextmanager
def instances(redis_url: str, count: int, prefix: str) -> Iterator[list[int]]:
    env = {
        "LINGUA_CLUSTER__REDIS_URL": redis_url,
        "LINGUA_CLUSTER__KEY_PREFIX": prefix,
        "LINGUA_SCHEDULER__MAX_CONCURRENT_JOBS_PER_NODE": "8",
        "LINGUA_NODE_HEALTH__HEARTBEAT_BUDGET_PER_SECOND": "100000",
    }
    with contextlib.ExitStack() as stack:
        ports = [stack.enter_context(scheduler_process(env))[0] for _ in range(count)]
        for port in ports:
            deadline = time.time() + 10
            while get_json(f"http://127.0.0.1:{port}/health").get("store") != "ok":
                if time.time() > deadline:
                    raise RuntimeError("instance did not reach the store")
                time.sleep(0.1)
        yield ports


async def run_layout(ports: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """Drive one layout: dispatch first (on a settled fleet), then the heartbeat phase."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        out = await dispatch_phase(http, ports, args)
        out.update(await heartbeat_phase(http, ports, args))
    return out


async def dispatch_phase(
    http: aiohttp.ClientSession, ports: list[int], args: argparse.Namespace
) -> dict[str, Any]:
    """Sessions on the first instance, 200 instant nodes on the last one."""
    node_port, session_port = ports[-1], ports[0]
    assign_at: dict[tuple[str, int], float] = {}
    ex = Executor(latency=0.0, partials=0, send_started=False)
    nodes = [
        SimulatedNode(
            http, f"ws://127.0.0.1:{node_port}/ws/node", PROFILE, interval=5.0, seed=1000 + i, executor=ex
        )
        for i in range(200)
    ]

    def on_message(msg: dict[str, Any]) -> None:
        if msg.get("type") == "job_assign":
            assign_at[(msg["session_id"], msg["utterance_index"])] = time.perf_counter()

    for n in nodes:
        n.on_message = on_message
    for i in range(0, 200, 50):
        await asyncio.gather(*(n.start() for n in nodes[i : i + 50]))
    await asyncio.sleep(1.0)  # let every instance see every node
    sessions = [
        SimulatedSession(
            http,
            f"ws://127.0.0.1:{session_port}/ws/session",
            src_lang=LANGS[i % 4],
            tgt_lang=LANGS[(i + 1) % 4],
        )
        for i in range(20)
    ]
    await asyncio.gather(*(s.start() for s in sessions))
    gc.freeze()
    per_session = args.rate / len(sessions)
    t_end = time.perf_counter() + args.seconds

    async def talk(i: int, s: SimulatedSession) -> None:
        # Sessions are phase-shifted so that utterances arrive evenly at ``--rate``, not in bursts
        # of one per session at the same instant (which would measure the burst's queueing).
        nxt = time.perf_counter() + i / args.rate
        while nxt < t_end:
            await asyncio.sleep(max(0.0, nxt - time.perf_counter()))
            await s.utterance(n_bytes=3200)
            nxt += 1 / per_session

    await asyncio.gather(*(talk(i, s) for i, s in enumerate(sessions)))
    await asyncio.sleep(1.0)
    latencies, done = [], 0
    for s in sessions:
        done += len(s.of_type("translation_result"))
        for index, sent in s.sent_at.items():
            got = assign_at.get((s.session_id or "", index))
            if got is not None:
                latencies.append(got - sent)
    failures = sum(len(s.of_type("missing_result")) for s in sessions)
    await asyncio.gather(*(s.disconnect() for s in sessions))
    await asyncio.gather(*(n.close() for n in nodes))
    gc.unfreeze()
    stats = get_json(f"http://127.0.0.1:{node_port}/api/v1/stats")["latency"]
    hop = stats.get("cross_instance_dispatch_seconds") or {}
    return {
        "cross_instance_hop_ms": {k: round(v * 1e3, 3) for k, v in hop.items() if v is not None},
        "jobs_completed_per_s": round(done / args.seconds, 1),
        "failures": failures,
        "utterance_to_assign_ms": percentiles(latencies, 1e3),
    }


async def heartbeat_phase(
    http: aiohttp.ClientSession, ports: list[int], args: argparse.Namespace
) -> dict[str, Any]:
    """``--hb-nodes`` light nodes heartbeating every 0.5 s, split across the instances."""
    hb_nodes = [
        SimulatedNode(http, f"ws://127.0.0.1:{ports[i % len(ports)]}/ws/node", PROFILE, interval=0.5, seed=i)
        for i in range(args.hb_nodes)
    ]
    for i in range(0, len(hb_nodes), 100):
        await asyncio.gather(*(n.start() for n in hb_nodes[i : i + 100]))
    await asyncio.sleep(1.0)
    for n in hb_nodes:
        n.rtts.clear()
    await asyncio.sleep(args.hb_seconds)
    acked = sum(len(n.rtts) for n in hb_nodes)
    hb_rtt = [r for n in hb_nodes for r in n.rtts]
    await asyncio.gather(*(n.close() for n in hb_nodes))
    return {
        "heartbeats_per_s": round(acked / args.hb_seconds, 1),
        "heartbeat_rtt_ms": percentiles(hb_rtt, 1e3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=300.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--hb-nodes", type=int, default=1000)
    ap.add_argument("--hb-seconds", type=float, default=5.0)
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    out: dict[str, Any] = {
        "benchmark": "multi_instance",
        "machine": machine(),
        "offered_rate_per_s": args.rate,
    }
    with redis_server() as url:
        for count in (1, 2):
            with instances(url, count, f"bench{count}") as ports:
                out[f"instances_{count}"] = asyncio.run(run_layout(ports, args))
    one, two = out["instances_1"]["utterance_to_assign_ms"], out["instances_2"]["utterance_to_assign_ms"]
    out["cross_instance_overhead_ms"] = {
        q: round(two[q] - one[q], 3) for q in ("p50", "p99") if two[q] is not None and one[q] is not None
    }
    print(json.dumps(out, indent=2))
    (Path(__file__).resolve().parent / "results" / "multi_instance.json").write_text(
        json.dumps(out, indent=2)
    )


if __name__ == "__main__":
    main()
