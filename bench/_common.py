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
