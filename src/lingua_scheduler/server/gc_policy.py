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
  generation, which no collection examines: once after start-up (``start``) and, during a burst of
  registrations, at every tick that follows ``BURST`` of them (``note_registration`` counts them):
  the fleet's records, sockets and structs are never rescanned. A garbage cycle frozen by mistake
  is never collected: a bounded leak of what was in flight at that instant, accepted in exchange
  for never rescanning the fleet. The generation-1 collections that remain (about once a minute)
  collect the cycles that outlived a young collection.
- **Young collections small and on a cadence.** Generation 0's threshold is raised so that allocation
  bursts (a frame of 200 heartbeats) do not trigger a collection each, and the tick collects
  generation 0 itself every ``YOUNG_EVERY`` seconds: each collection examines only what was made
  since the previous one and is still alive (a tenth of a second's worth), never a backlog.
- **Measure every collection.** A ``gc.callbacks`` hook times each collection: the pause histogram
  ``lingua_gc_pause_seconds{generation}`` and the longest pause. Every ``SAMPLE_EVERY``-th tick also
  counts the objects in generation 0 before collecting it (``gc.get_count()`` does not: an object
  tracked after its allocation is not counted), with the seconds they accumulated over
  (``lingua_gc_young_objects_sampled_total`` / ``lingua_gc_young_seconds_sampled_total``: young
  objects per second; divided by the heartbeat rate, tracked objects per heartbeat that live long
  enough to be examined). ``bench/floor.py`` reads them.

What the young generation holds: aiohttp's receive path keeps about nine tracked objects per
connection alive while it waits for the next frame (the ``receive()`` and queue ``read()``
coroutines, the read's scope and wrapper, a ``Future``, its iterator and wake-up method, the
``WSMessage``), made for each frame and alive for a heartbeat interval: at 2,000 nodes x 1/s, 8-9
per heartbeat reached a young collection, and a generation-1 collection examined every waiting
connection's. Node sockets are therefore read inline (``server/ws/inline_frames.py``: no coroutine per
frame; about 4 tracked objects per heartbeat left, the outbox writer's wait between acks); session
sockets, far fewer, keep the receive loop.
Generation 1 stays rare all the same.

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
#: generations 1 and 2 thresholds (collections of the younger generation before the next one runs):
#: a generation-1 collection examines every receive loop waiting for its next frame (below), so it
#: runs about once a minute, not every few seconds
OLDER_THRESHOLDS = (600, 10)
#: seconds between the policy's own young collections
YOUNG_EVERY = 0.1
#: registrations since the last freeze that make a burst worth freezing
BURST = 50
#: every this many ticks, generation 0 is counted before it is collected
SAMPLE_EVERY = 10
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
        self.young_sampled = 0
        self.young_seconds = 0.0
        self._ticks = 0
        self._last_collect = 0.0
        self.freezes = 0
        self.registrations = 0
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
        self._last_collect = time.monotonic()
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

    # --- the cadence -----------------------------------------------------------------------------------

    def _schedule(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(YOUNG_EVERY, self._tick)

    def _tick(self) -> None:
        try:
            if self.registrations >= BURST:
                gc.freeze()  # the burst's records, sockets and structs leave the scanned generations
                self.freezes += 1
                self.registrations = 0
            else:
                self._ticks += 1
                now = time.monotonic()
                if self._ticks % SAMPLE_EVERY == 0:
                    self.young_sampled += len(gc.get_objects(0))
                    self.young_seconds += now - self._last_collect
                self._last_collect = now
                gc.collect(0)
        finally:
            self._schedule()

    # --- measurement -----------------------------------------------------------------------------------

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
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
            "lingua_gc_young_objects_sampled",
            "Objects in generation 0 before the policy's sampled young collections",
            value=self.young_sampled,
        )
        yield CounterMetricFamily(
            "lingua_gc_young_seconds_sampled",
            "Seconds the sampled young generations accumulated over",
            value=self.young_seconds,
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
            "young_objects_sampled": self.young_sampled,
            "young_seconds_sampled": self.young_seconds,
            "freezes": self.freezes,
            "frozen_objects": gc.get_freeze_count(),
        }
