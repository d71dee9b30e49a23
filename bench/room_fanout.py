"""Benchmark: the fan-out overhead of rooms.

For each room size K (2, 5, 10 by default): a scheduler in its own process; simulated nodes that
answer every job at once (another process); ROOMS rooms of K members, each member asking for its own
language (K distinct languages: K-1 jobs per utterance), whose members speak complete ``utterance``
messages at a fixed offered rate (a third process). The overhead is measured by the scheduler itself
(``/api/v1/stats`` latency.room_fanout_seconds): from the speaker's utterance frame arriving to the
last ``job_assign`` of its fan-out being written. Prints JSON (p50/p99 in ms per room size, jobs per
utterance, failures, the machine).

    .venv/bin/python bench/room_fanout.py [--rooms 200] [--sizes 2,5,10] [--rate 100] [--seconds 15]

Smoke run (seconds): ``--rooms 4 --sizes 2,5 --seconds 2 --warmup 0.5 --rate 10 --nodes 10``.
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
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import get_json, machine, run_instant_nodes, scheduler_process, use_uvloop
from lingua_scheduler.sim.sessions import SimulatedSession

#: the members' languages, in turn (the nodes serve every pair of them)
LANGS = ["en", "zh", "de", "fr", "es", "ja", "ko", "ru", "pt", "it"]


def run_rooms(
    port: int,
    rooms: int,
    size: int,
    rate: float,
    warmup: float,
    seconds: float,
    out: multiprocessing.queues.Queue[dict[str, Any]],
) -> None:
    use_uvloop()

    async def main() -> dict[str, Any]:
        url = f"ws://127.0.0.1:{port}/ws/session"
        rng = random.Random(5)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            groups: list[list[SimulatedSession]] = []
            for _ in range(rooms):
                members = [
                    SimulatedSession(
                        http, url, src_lang=LANGS[i % len(LANGS)], tgt_lang=LANGS[(i + 1) % len(LANGS)]
                    )
                    for i in range(size)
                ]
                groups.append(members)
            everyone = [s for g in groups for s in g]
            for i in range(0, len(everyone), 100):
                await asyncio.gather(*(s.start() for s in everyone[i : i + 100]))
            for members in groups:
                head = members[0]
                acked = head.wait_for(lambda m: m.get("type") == "room_create_ack", 30)
                await head.send({"type": "room_create", "client_ts": 0, "preferred_lang": LANGS[0]})
                code = (await acked)["room_code"]
                for i, s in enumerate(members[1:], 1):
                    joined = s.wait_for(lambda m: m.get("type") in ("room_members", "room_error"), 30)
                    await s.send(
                        {"type": "room_join", "room_code": code, "preferred_lang": LANGS[i % len(LANGS)]}
                    )
                    await joined
            gc.freeze()
            per_room = rate / rooms
            t_end = time.perf_counter() + warmup + seconds

            async def talk(members: list[SimulatedSession]) -> None:
                nxt = time.perf_counter() + rng.uniform(0, 1 / per_room)
                turn = 0
                while nxt < t_end:
                    await asyncio.sleep(max(0.0, nxt - time.perf_counter()))
                    await members[turn % len(members)].utterance(n_bytes=3200)
                    turn += 1
                    nxt += 1 / per_room

            await asyncio.gather(*(talk(g) for g in groups))
            await asyncio.sleep(1.0)  # the last results
            sent = sum(s.utterances_sent for s in everyone)
            failures = sum(len(s.of_type("missing_result")) for s in everyone)
            for s in everyone:
                await s.disconnect()
            return {"utterances": sent, "failures": failures}

    out.put(asyncio.run(main()))


def measure(size: int, args: argparse.Namespace) -> dict[str, Any]:
    env = {
        "LINGUA_SCHEDULER__MAX_CONCURRENT_JOBS_PER_NODE": "16",
        "LINGUA_ROOMS__MAX_MEMBERS": str(max(size, 2)),
        # every member and node connects from 127.0.0.1: 200 rooms of 10 are 2,000 sockets
        "LINGUA_LIMITS__MAX_CONNECTIONS_PER_SOURCE": str(args.rooms * size + args.nodes + 100),
    }
    with scheduler_process(env) as (port, _proc):
        ready, stop = multiprocessing.Event(), multiprocessing.Event()
        nodes = multiprocessing.Process(target=run_instant_nodes, args=(port, args.nodes, ready, stop, LANGS))
        nodes.start()
        ready.wait(60)
        time.sleep(1.0)
        queue: multiprocessing.queues.Queue[dict[str, Any]] = multiprocessing.Queue()
        talker = multiprocessing.Process(
            target=run_rooms, args=(port, args.rooms, size, args.rate, args.warmup, args.seconds, queue)
        )
        talker.start()
        result = queue.get()
        talker.join()
        stats = get_json(f"http://127.0.0.1:{port}/api/v1/stats")
        rooms = get_json(f"http://127.0.0.1:{port}/api/v1/rooms")
        stop.set()
        nodes.join(30)
    fanout = stats["latency"]["room_fanout_seconds"]
    utterances = result["utterances"] or 1
    return {
        "room_size": size,
        "rooms": args.rooms,
        "utterances": result["utterances"],
        "jobs_per_utterance": round(rooms["fanout_jobs_total"] / utterances, 2),
        "failures": result["failures"],
        "fanout_overhead_ms": {k: (round(v * 1e3, 3) if v is not None else None) for k, v in fanout.items()},
        "job_dispatch_ms": {
            k: (round(v * 1e3, 3) if v is not None else None)
            for k, v in stats["latency"]["job_dispatch_seconds"].items()
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rooms", type=int, default=200)
    ap.add_argument("--sizes", default="2,5,10", help="comma-separated room sizes")
    ap.add_argument("--rate", type=float, default=100.0, help="offered utterances per second, all rooms")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--nodes", type=int, default=100)
    args = ap.parse_args()
    results = [measure(int(k), args) for k in args.sizes.split(",") if k.strip()]
    print(
        json.dumps(
            {
                "benchmark": "room_fanout",
                "machine": machine(),
                "offered_rate_per_s": args.rate,
                "measured_s": args.seconds,
                "target_p99_ms": 2.0,
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
