"""Measures the event loop's own lag: how late a short sleep wakes up.

The registry consults it before declaring nodes dead: silence during our own stall is not the nodes'
fault, and a stall of ours must not declare a healthy fleet offline.
"""

from __future__ import annotations

import asyncio
import time


class LoopLagMonitor:
    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        #: lag of the most recent tick, seconds
        self.current = 0.0
        #: worst lag over the last ~2 seconds, seconds
        self.recent_max = 0.0
        self._window: list[float] = []

    async def run(self) -> None:
        window_len = max(1, int(2.0 / self.interval))
        while True:
            start = time.perf_counter()
            await asyncio.sleep(self.interval)
            lag = max(0.0, time.perf_counter() - start - self.interval)
            self.current = lag
            self._window.append(lag)
            if len(self._window) > window_len:
                del self._window[0]
            self.recent_max = max(self._window)
