"""Reading the scheduler's own figures: ``/metrics`` scrapes, histogram quantiles, ``/proc`` of a pid.

A ``Scrape`` is one parse of the Prometheus text. Two scrapes give the deltas of a measurement window:
counters by subtraction, histogram quantiles by linear interpolation inside the bucket that holds the
rank (what Prometheus' ``histogram_quantile`` does), so a quantile is only as fine as the buckets.
Percentiles of raw samples use the nearest-rank method.

Must never: talk to anything but the scheduler's address it is given.
"""

from __future__ import annotations

import json
import math
import os
import ssl
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


def http_get(url: str, timeout: float = 10.0, ssl_context: ssl.SSLContext | None = None) -> bytes:
    """GET ``url`` (https:// verified with ``ssl_context``, else the system's store)."""
    with urllib.request.urlopen(url, timeout=timeout, context=ssl_context) as r:
        body: bytes = r.read()
        return body


def get_json(url: str, timeout: float = 10.0, ssl_context: ssl.SSLContext | None = None) -> Any:
    return json.loads(http_get(url, timeout, ssl_context))


@dataclass(frozen=True)
class Scrape:
    """One ``/metrics`` scrape: sample name -> {sorted label items -> value}."""

    samples: dict[str, dict[tuple[tuple[str, str], ...], float]]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = float(s.value)
        return cls(samples)

    @classmethod
    def fetch(cls, base_url: str, ssl_context: ssl.SSLContext | None = None) -> Scrape:
        return cls.parse(http_get(base_url.rstrip("/") + "/metrics", ssl_context=ssl_context).decode())

    def has(self, name: str) -> bool:
        return name in self.samples

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (0 when absent)."""
        want = set(labels.items())
        return sum(v for k, v in self.samples.get(name, {}).items() if want <= set(k))

    def by_label(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for k, v in self.samples.get(name, {}).items():
            key = dict(k).get(label)
            if key is not None:
                out[key] = out.get(key, 0.0) + v
        return out

    def buckets(self, name: str) -> list[tuple[float, float]]:
        """(upper bound, cumulative count) of histogram ``name``, ascending."""
        out = []
        for k, v in self.samples.get(name + "_bucket", {}).items():
            le = dict(k).get("le")
            if le is not None:
                out.append((math.inf if le == "+Inf" else float(le), v))
        return sorted(out)


def delta(after: Scrape, before: Scrape | None, name: str, **labels: str) -> float:
    return after.value(name, **labels) - (before.value(name, **labels) if before else 0.0)


def delta_by_label(after: Scrape, before: Scrape | None, name: str, label: str) -> dict[str, float]:
    a = after.by_label(name, label)
    b = before.by_label(name, label) if before else {}
    return {k: v - b.get(k, 0.0) for k, v in a.items() if v - b.get(k, 0.0)}


def histogram_quantiles(
    after: Scrape, before: Scrape | None, name: str, qs: Sequence[float] = (0.5, 0.99, 0.999)
) -> dict[str, Any]:
    """Quantiles (seconds) of the observations of histogram ``name`` between two scrapes."""
    a = after.buckets(name)
    b = dict(before.buckets(name)) if before else {}
    cum = [(le, c - b.get(le, 0.0)) for le, c in a]
    total = cum[-1][1] if cum else 0.0
    out: dict[str, Any] = {"count": int(total)}
    for q in qs:
        key = f"p{q * 100:g}".replace(".", "")
        out[key] = _quantile(cum, total, q) if total > 0 else None
    return out


def _quantile(cum: list[tuple[float, float]], total: float, q: float) -> float:
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in cum:
        if c >= rank:
            if math.isinf(le):
                return prev_le  # beyond the last finite bucket: its bound is all we know
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return prev_le


def percentiles(samples: Sequence[float], scale: float = 1.0, digits: int = 3) -> dict[str, Any]:
    """Nearest-rank p50/p99/p999/max of raw samples, multiplied by ``scale``."""
    data = sorted(samples)
    if not data:
        return {"p50": None, "p99": None, "p999": None, "max": None, "count": 0}

    def q(p: float) -> float:
        return round(data[min(len(data) - 1, int(p * len(data)))] * scale, digits)

    return {
        "p50": q(0.5),
        "p99": q(0.99),
        "p999": q(0.999),
        "max": round(data[-1] * scale, digits),
        "count": len(data),
    }


def scaled(d: dict[str, Any], scale: float, digits: int = 3) -> dict[str, Any]:
    """The same quantile dict with every non-count value multiplied by ``scale``."""
    return {
        k: (round(v * scale, digits) if isinstance(v, float) and k != "count" else v) for k, v in d.items()
    }


# --- /proc ---------------------------------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a local process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_memory_mb(pid: int) -> dict[str, float]:
    """Resident and peak resident memory (MiB) of a local process."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key = "rss_mb" if line.startswith("VmRSS") else "peak_rss_mb"
                out[key] = round(int(line.split()[1]) / 1024.0, 1)
    return out


def machine() -> dict[str, Any]:
    """CPU model, core count and Python of this machine (where client and server both run)."""
    import platform

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = None
    try:
        with open("/proc/meminfo") as f:
            mem_gb = round(int(f.readline().split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": mem_gb,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
