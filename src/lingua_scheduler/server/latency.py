"""Recent-latency windows: the last N samples of a path, for p50/p99 over roughly the last minute.

A fixed-size ring buffer: recording is O(1) and allocation-free; percentiles are computed only when an
operator asks (``/api/v1/stats``) or a benchmark reads them.
"""

from __future__ import annotations


class LatencyWindow:
    __slots__ = ("_buf", "_i", "_n", "count")

    def __init__(self, size: int = 8192) -> None:
        self._buf = [0.0] * size
        self._i = 0
        self._n = size
        self.count = 0

    def record(self, seconds: float) -> None:
        self._buf[self._i] = seconds
        self._i = (self._i + 1) % self._n
        self.count += 1

    def samples(self) -> list[float]:
        return self._buf[: self.count] if self.count < self._n else list(self._buf)

    def percentiles(self, *qs: float) -> dict[str, float | None]:
        data = sorted(self.samples())
        out: dict[str, float | None] = {}
        for q in qs:
            key = f"p{q:g}".replace(".", "")
            out[key] = data[min(len(data) - 1, int(q / 100.0 * len(data)))] if data else None
        return out
