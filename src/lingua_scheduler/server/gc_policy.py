"""The garbage collector's policy for a running scheduler, and its measurements.

Why a policy at all: CPython's collector is triggered by tracked-object allocations, and a full
(generation-2) collection examines every tracked object alive. A scheduler holds one long-lived record
per node (entries, capability structs, sockets, aiohttp's per-connection objects: ~100 tracked objects
each), so with 10,000 nodes a full collection examined about a million objects and paused the event
loop for up to a second while heartbeats queued behind it; young collections were rare but examined
whatever had been promoted since. Nothing the scheduler keeps forms garbage cycles at a useful rate
(wire structs are ``gc=False``, the hot path allocates and frees), so the collector's job here is small
and its cost is almost all rescanning live objects.

What the policy does:

- **Freeze what is long-lived.** ``gc.freeze()`` moves every tracked object into the permanent
  generation, which no collection examines: once after start-up (``start``) and again after a burst
  of registrations (``note_registration`` counts them; the periodic tick freezes once a burst is
  over). A garbage cycle frozen by mistake is never collected: a bounded leak of what was in flight at
  that instant, accepted in exchange for never rescanning the fleet.
- **Young collections small and on a cadence.** Generation 0's threshold is raised so that allocation
  bursts (a frame of 200 heartbeats) do not trigger a collection each, and the tick collects
  generation 0 itself every ``YOUNG_EVERY`` seconds, when there is anything to collect: each
  collection examines only what survived since the previous one (milliseconds' worth), never a
  backlog.
- **Measure every collection.** A ``gc.callbacks`` hook times each collection: the pause histogram
  ``lingua_gc_pause_seconds{generation}``, the longest pause, and the tracked objects young
  collections found (``lingua_gc_young_objects_total``: divided by heartbeats, the tracked objects
  per heartbeat that survive long enough to be examined). ``bench/floor.py`` reads them.

Must never: run a full collection while serving (only ``start`` does, before any socket is accepted).
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: generation-0 threshold (CPython's default is 700): an allocation burst is not a collection each
YOUNG_THRESHOLD = 20_000
#: generations 1 and 2 thresholds (collections of the younger generation before the next one runs)
OLDER_THRESHOLDS = (20, 100)
#: seconds between the policy's own young collections
YOUNG_EVERY = 0.25
#: registrations since the last freeze that make a burst worth freezing
BURST = 50
#: seconds without a registration after which a burst is over
BURST_QUIET = 1.0
#: pause buckets (seconds): 10 µs .. 1 s
PAUSE_BUCKETS = (0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0)


class GcPolicy(Collector):
    """The collector's thresholds, freezes and cadence for one process, with their metrics."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.pause = Histogram(
            "lingua_gc_pause_seconds",
            "Garbage-collector pauses, by generation collected",
            ["generation"],
            buckets=PAUSE_BUCKETS,
            registry=registry,
        )
        self._by_gen = [self.pause.labels(str(g)) for g in range(3)]
        self.pause_max = 0.0
        self.pause_total = 0.0
        self.collections = [0, 0, 0]
        self.young_objects = 0
        self.freezes = 0
        self.registrations = 0
        self._last_registration = 0.0
        self._t0 = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._installed = False
        if registry is not None:
            registry.register(self)

    # --- life ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Once the application is built, before it accepts: collect fully, freeze, take over the
        young generation's cadence."""
        gc.collect()
        gc.freeze()
        self.freezes += 1
        gc.set_threshold(YOUNG_THRESHOLD, *OLDER_THRESHOLDS)
        if not self._installed:
            gc.callbacks.append(self._on_gc)
            self._installed = True
        self._schedule()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._installed:
            gc.callbacks.remove(self._on_gc)
            self._installed = False

    def note_registration(self) -> None:
        """A node registered: long-lived objects were made (frozen once the burst is over). O(1)."""
        self.registrations += 1
        self._last_registration = time.monotonic()

    # --- the cadence -----------------------------------------------------------------------------------

    def _schedule(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(YOUNG_EVERY, self._tick)

    def _tick(self) -> None:
        try:
            if self.registrations >= BURST and time.monotonic() - self._last_registration >= BURST_QUIET:
                gc.freeze()  # the burst's records, sockets and structs leave the scanned generations
                self.freezes += 1
                self.registrations = 0
            elif gc.get_count()[0]:
                gc.collect(0)
        finally:
            self._schedule()

    # --- measurement -----------------------------------------------------------------------------------

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.young_objects += gc.get_count()[0]
            self._t0 = time.perf_counter()
            return
        elapsed = time.perf_counter() - self._t0
        gen = int(info.get("generation", 0))
        self.collections[gen] += 1
        self.pause_total += elapsed
        if elapsed > self.pause_max:
            self.pause_max = elapsed
        self._by_gen[gen].observe(elapsed)

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "lingua_gc_pause_max_seconds", "Longest garbage-collector pause since start", value=self.pause_max
        )
        yield CounterMetricFamily(
            "lingua_gc_young_objects",
            "Tracked objects found in generation 0 when a collection started",
            value=self.young_objects,
        )
        yield CounterMetricFamily("lingua_gc_freezes", "gc.freeze() calls since start", value=self.freezes)
        yield GaugeMetricFamily(
            "lingua_gc_frozen_objects", "Objects in the permanent generation", value=gc.get_freeze_count()
        )

    def snapshot(self) -> dict[str, Any]:
        """The figures as plain data (``/api/v1/stats``)."""
        return {
            "collections": list(self.collections),
            "pause_max_seconds": self.pause_max,
            "pause_total_seconds": self.pause_total,
            "young_objects": self.young_objects,
            "freezes": self.freezes,
            "frozen_objects": gc.get_freeze_count(),
        }
