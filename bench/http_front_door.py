"""Benchmark: the integrators' HTTP front door (``POST /v1/speech/translate``) against the session path
(``/ws/session`` ``utterance``) of the same scheduler, in the same run, with instant nodes.

Three processes: ``lingua-scheduler serve``, the nodes (``--nodes`` simulated nodes answering at
once, in a child process of this script) and this process, the load generator. Every request is 1 s
of pcm16 audio (one utterance, one job).

1. **Overhead**: at ``--rate`` requests/s for ``--seconds``, one HTTP upload and one session utterance
   are sent per tick, interleaved, so both paths see the same load. Each latency runs from the send to
   the answer (HTTP) or the ``translation_result`` (session). The overhead of the front door is the
   difference of the two distributions' percentiles (p50, p99), in ms.
2. **Saturation**: ``--concurrency`` uploads in a closed loop for ``--seconds``: requests/s answered.

``failovers`` counts jobs that had to move to another node (``lingua_failovers_total``): with instant
nodes there should be none; a few ack/exec timeouts show as a tail of 15 s (``exec_timeout_min_ms``).

Prints one JSON object. Smoke run (seconds, small):

    .venv/bin/python bench/http_front_door.py --rate 20 --seconds 3 --concurrency 8 --nodes 4

Full scale (on a quiet machine): ``--rate 200 --seconds 30 --concurrency 64 --nodes 32``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
from bench._common import cpu_seconds, machine, percentiles, scheduler_process

from lingua_scheduler.sim.nodes import Executor, SimulatedNode
from lingua_scheduler.sim.profiles import NodeProfile

AUDIO = b"\x10\x00" * 16000  # 1 s of pcm16 at 16 kHz (not silence)
PROFILE = NodeProfile(asr_languages=["en", "zh"], tts_languages=["en", "zh"], nmt_languages=["en", "zh"])
ENV = {
    "LINGUA_SCHEDULER__MAX_CONCURRENT_JOBS_PER_NODE": "64",
    "LINGUA_SCHEDULER__FLEET_VIEW_INTERVAL_MS": "20",
    "LINGUA_SERVER__LOG_LEVEL": '"warning"',
    # the load test's sessions and nodes are few and busy: the per-connection frame rates are not measured
    "LINGUA_LIMITS__NODE_MESSAGES_PER_SECOND": "100000.0",
    "LINGUA_LIMITS__NODE_MESSAGE_BURST": "100000",
    "LINGUA_LIMITS__SESSION_MESSAGES_PER_SECOND": "100000.0",
    "LINGUA_LIMITS__SESSION_MESSAGE_BURST": "100000",
}


# --- the nodes' process ----------------------------------------------------------------------------


async def serve_nodes(port: int, n: int) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        nodes = [
            SimulatedNode(
                http,
                f"ws://127.0.0.1:{port}/ws/node",
                PROFILE,
                executor=Executor(latency=0.0, partials=0, send_started=False),
                seed=i,
            )
            for i in range(n)
        ]
        for node in nodes:
            await node.start()
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent ends


# --- the load generator ----------------------------------------------------------------------------


class SessionClient:
    """One /ws/session whose utterances are timed to their translation_result."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, session_id: str) -> None:
        self.ws = ws
        self.session_id = session_id
        self.sent: dict[int, float] = {}
        self.latencies: list[float] = []
        self.next = 0
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if data.get("type") == "translation_result":
                t0 = self.sent.pop(data["utterance_index"], None)
                if t0 is not None:
                    self.latencies.append(time.perf_counter() - t0)

    async def utterance(self) -> None:
        index, self.next = self.next, self.next + 1
        self.sent[index] = time.perf_counter()
        await self.ws.send_json(
            {
                "type": "utterance",
                "session_id": self.session_id,
                "utterance_index": index,
                "manual_cut": True,
                "src_lang": "en",
                "tgt_lang": "zh",
                "audio": base64.b64encode(AUDIO).decode(),
                "audio_format": "pcm16",
                "sample_rate": 16000,
            }
        )


async def open_session(http: aiohttp.ClientSession, base: str) -> SessionClient:
    ws = await http.ws_connect(base.replace("http", "ws", 1) + "/ws/session", max_msg_size=0)
    await ws.send_json(
        {
            "type": "session_init",
            "client_version": "bench",
            "platform": "web",
            "src_lang": "en",
            "tgt_lang": "zh",
            "audio_format": "pcm16",
        }
    )
    ack = await ws.receive_json()
    assert ack["type"] == "session_init_ack", ack
    return SessionClient(ws, ack["session_id"])


async def upload(http: aiohttp.ClientSession, url: str, out: list[float], errors: list[int]) -> None:
    t0 = time.perf_counter()
    async with http.post(url, data=AUDIO, headers={"Content-Type": "audio/l16; rate=16000"}) as r:
        await r.read()
        if r.status == 200:
            out.append(time.perf_counter() - t0)
        else:
            errors.append(r.status)


async def overhead(base: str, rate: float, seconds: float) -> dict[str, Any]:
    url = base + "/v1/speech/translate?src_lang=en&tgt_lang=zh"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        sessions = [await open_session(http, base) for _ in range(8)]
        http_lat: list[float] = []
        errors: list[int] = []
        tasks: set[asyncio.Task[None]] = set()
        interval = 1.0 / rate
        start = time.perf_counter()
        sent = 0
        while (now := time.perf_counter()) - start < seconds:
            due = start + sent * interval
            if now < due:
                await asyncio.sleep(due - now)
            task = asyncio.ensure_future(upload(http, url, http_lat, errors))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await sessions[sent % len(sessions)].utterance()
            sent += 1
        await asyncio.gather(*tasks)
        deadline = time.perf_counter() + 10
        while any(s.sent for s in sessions) and time.perf_counter() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # the last results of the sessions (polled: the run is over)
        session_lat = [x for s in sessions for x in s.latencies]
        for s in sessions:
            await s.ws.close()
            s.reader.cancel()
    h, s = percentiles(http_lat, 1000), percentiles(session_lat, 1000)

    def diff(q: str) -> float | None:
        a, b = h[q], s[q]
        return None if a is None or b is None else round(a - b, 3)

    return {
        "rate": rate,
        "sent_each": sent,
        "http_ms": h,
        "session_ms": s,
        "overhead_ms": {"p50": diff("p50"), "p99": diff("p99")},
        "http_errors": len(errors),
        "sessions_unanswered": sent - len(session_lat),
    }


async def saturation(base: str, concurrency: int, seconds: float) -> dict[str, Any]:
    url = base + "/v1/speech/translate?src_lang=en&tgt_lang=zh"
    lat: list[float] = []
    errors: list[int] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        end = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < end:
                await upload(http, url, lat, errors)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        took = time.perf_counter() - t0
    return {
        "concurrency": concurrency,
        "requests_per_second": round(len(lat) / took, 1),
        "latency_ms": percentiles(lat, 1000),
        "errors": len(errors),
    }


def failover_counts(base: str) -> dict[str, float]:
    """``lingua_failovers_total`` by reason: a job that had to move (it should not, with instant nodes)."""
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("lingua_failovers_total{"):
            labels, value = line.rsplit(" ", 1)
            out[labels[len("lingua_failovers_total") :]] = float(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=200.0, help="requests/s of each path in the overhead phase")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    ap.add_argument("--concurrency", type=int, default=64, help="uploads in flight in the saturation phase")
    ap.add_argument("--nodes", type=int, default=32)
    ap.add_argument("--role", choices=["bench", "nodes"], default="bench", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "nodes":
        asyncio.run(serve_nodes(args.port, args.nodes))
        return
    with scheduler_process(ENV) as (port, proc):
        base = f"http://127.0.0.1:{port}"
        nodes = subprocess.Popen(
            [sys.executable, __file__, "--role", "nodes", "--port", str(port), "--nodes", str(args.nodes)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            assert nodes.stdout is not None and nodes.stdout.readline().strip() == b"ready"
            time.sleep(0.5)  # the fleet view publishes the nodes
            cpu0 = cpu_seconds(proc.pid)
            over = asyncio.run(overhead(base, args.rate, args.seconds))
            sat = asyncio.run(saturation(base, args.concurrency, args.seconds))
            cpu = cpu_seconds(proc.pid) - cpu0
            failovers = failover_counts(base)
        finally:
            if nodes.stdin is not None:
                nodes.stdin.close()
            nodes.wait(10)
    print(
        json.dumps(
            {
                "benchmark": "http_front_door",
                "nodes": args.nodes,
                "utterance_seconds": 1.0,
                "overhead": over,
                "saturation": sat,
                "scheduler_cpu_seconds": round(cpu, 2),
                "failovers": failovers,
                "machine": machine(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
