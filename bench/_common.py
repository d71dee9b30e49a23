"""Helpers shared by the benchmarks: start a scheduler in its own process, machine facts, percentiles."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

# free_port is re-exported: the benchmarks take it from here
from lingua_scheduler.loadtest.runner import free_port as free_port
from lingua_scheduler.loadtest.runner import local_scheduler


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def percentiles(samples: Sequence[float], scale: float = 1.0) -> dict[str, float | None]:
    data = sorted(samples)
    if not data:
        return {"p50": None, "p99": None, "p999": None, "max": None, "count": 0}

    def q(p: float) -> float:
        return round(data[min(len(data) - 1, int(p * len(data)))] * scale, 3)

    return {
        "p50": q(0.50),
        "p99": q(0.99),
        "p999": q(0.999),
        "max": round(data[-1] * scale, 3),
        "count": len(data),
    }


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def scheduler_process(env: dict[str, str] | None = None) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """Run ``lingua-scheduler serve`` in a separate process on a free port until the block ends."""
    # the load test's own starter: one place that knows how to start a scheduler and wait until it answers
    with local_scheduler(env or {}) as (base, proc):
        yield int(base.rsplit(":", 1)[1]), proc


def use_uvloop() -> None:
    """Run this process's event loop on uvloop, as the scheduler does, when it is installed."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass


def run_instant_nodes(port: int, count: int, ready: Any, stop: Any, langs: Sequence[str]) -> None:
    """A load-generator process: ``count`` simulated nodes serving every pair of ``langs`` that answer
    each job at once; ``ready`` is set once all registered, and they close when ``stop`` is set."""
    import asyncio
    import gc

    import aiohttp

    from lingua_scheduler.sim.nodes import Executor, SimulatedNode
    from lingua_scheduler.sim.profiles import NodeProfile

    use_uvloop()

    async def main() -> None:
        url = f"ws://127.0.0.1:{port}/ws/node"
        profile = NodeProfile(asr_languages=list(langs), tts_languages=list(langs), nmt_languages=list(langs))
        ex = Executor(latency=0.0, partials=0, send_started=False)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            nodes = [
                SimulatedNode(http, url, profile, interval=5.0, seed=i, executor=ex) for i in range(count)
            ]
            for i in range(0, count, 50):
                await asyncio.gather(*(n.start() for n in nodes[i : i + 50]))
            gc.freeze()
            ready.set()
            await asyncio.get_running_loop().run_in_executor(None, stop.wait)
            await asyncio.gather(*(n.close() for n in nodes), return_exceptions=True)

    asyncio.run(main())
