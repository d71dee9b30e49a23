"""Node quality in the running scheduler: holds the core tracker, sweeps it and reports its changes.

Owns ``QualityMonitor``: the ``core.quality`` tracker the engine (core/engine.py) judges job outcomes
with (a result: success, failure with its code, or an empty recognition; an expired ack or execution
deadline: a timeout -- a node's lost connection, a cancelled or aborted job are nobody's verdict on the
node), the periodic sweep, and the report of every change as a metric
(``lingua_node_ejections_total{reason}``, ``lingua_nodes_ejected``), an event (``node_quality`` in
``/api/v1/events``) and a log line. The engine's selector reads the tracker to skip ejected nodes
(``ejected`` in the selection breakdown).

Each instance judges from its own observations (in Redis mode too: docs/operations.md says why).

Must never: await in ``report`` (it runs inside the runtime's synchronous execution of the engine's
actions), log or keep text a node returned (only the error code).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily, Metric

from lingua_scheduler.clock import Clock
from lingua_scheduler.config import QualityConfig
from lingua_scheduler.core.jobs import DeadlineKind
from lingua_scheduler.core.quality import (
    EJECTION_REASONS,
    Change,
    QualityState,
    QualityTracker,
)
from lingua_scheduler.core.registry import Registry
from lingua_scheduler.core.status import NodeStatus
from lingua_scheduler.server.events import NODE_QUALITY, RecentEvents
from lingua_scheduler.server.metrics import Metrics, counter

log = logging.getLogger(__name__)

#: the code a timeout is counted under in a node's figures, by the deadline that passed
_TIMEOUT_CODES = {DeadlineKind.ACK: "ack_timeout", DeadlineKind.EXEC: "exec_timeout"}


class QualityMonitor:
    def __init__(
        self, config: QualityConfig, clock: Clock, registry: Registry, metrics: Metrics, events: RecentEvents
    ) -> None:
        self.config = config
        self.clock = clock
        self.registry = registry
        self.events = events
        self.tracker = QualityTracker(config, clock)
        #: gives jobs waiting for a node to a readmitted one (the composition root sets the runtime's pump)
        self.on_readmitted: Callable[[], None] = _nothing
        self.ejections = Counter(
            "lingua_node_ejections",
            "Nodes ejected from selection for failing their jobs, by the rule that ejected them",
            ["reason"],
            registry=metrics.registry,
        )
        for reason in EJECTION_REASONS:
            self.ejections.labels(reason)  # every reason present from the start, at 0
        metrics.add_live(self._live_metrics)

    def report(self, changes: Iterable[Change]) -> None:
        """Changes the engine's judgement of a job outcome made (core/engine.py): counted, logged and
        recorded; no pump (the engine places waiting jobs itself)."""
        self._report(changes)

    # --- periodic ------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Sweep every ``interval_ms``, and wake up when an ejection runs out to put the node on
        probation at once (and give waiting jobs to it)."""
        clock = self.clock
        interval = self.config.interval_ms / 1000.0
        next_sweep = clock.monotonic() + interval
        while True:
            now = clock.monotonic()
            due = self.tracker.next_readmission()
            wake = next_sweep if due is None else min(next_sweep, due)
            await asyncio.sleep(max(0.0, wake - now) + 0.001)
            try:
                if clock.monotonic() >= next_sweep:
                    next_sweep = clock.monotonic() + interval
                    self.sweep()
                else:
                    self._report(self.tracker.readmit_due(), pump=True)
            except Exception:
                log.exception("node quality sweep failed")

    def sweep(self) -> None:
        nodes = self.registry.nodes
        self._report(self.tracker.sweep(self.fleet_size(), nodes.__contains__), pump=True)

    def fleet_size(self) -> int:
        """The base of the ejection cap: nodes not offline."""
        counts = self.registry.counts()
        return sum(n for s, n in counts.items() if s is not NodeStatus.OFFLINE)

    def _report(self, changes: Iterable[Change], *, pump: bool = False) -> None:
        """Count, log and record each change; ``pump``: not inside the engine's own handling, so
        jobs waiting for a node may be given to a returning one now."""
        readmitted = False
        for ch in changes:
            if ch.state is QualityState.EJECTED:
                self.ejections.labels(ch.reason).inc()
                log.warning(
                    "node ejected",
                    extra={
                        "node_id": ch.node_id,
                        "reason": ch.reason,
                        "ejection_ms": ch.ejection_ms,
                        "ejections": ch.ejections,
                    },
                )
            else:
                readmitted = True
                log.info("node quality changed", extra={"node_id": ch.node_id, "to": ch.state.value})
            self.events.add(
                NODE_QUALITY,
                node_id=ch.node_id,
                state=ch.state.value,
                reason=ch.reason,
                ejection_ms=ch.ejection_ms,
                ejections=ch.ejections,
            )
        if readmitted and pump:
            self.on_readmitted()

    # --- reading -------------------------------------------------------------------------------------

    def node_state(self, node_id: str) -> str:
        return self.tracker.state_of(node_id).value

    def node_json(self, node_id: str) -> dict[str, object]:
        """The ``quality`` object of ``GET /api/v1/nodes/{id}``."""
        tracker = self.tracker
        clock = self.clock
        q = tracker.get(node_id)
        state = tracker.state_of(node_id)
        until = q.ejected_until if q is not None and state is QualityState.EJECTED else None
        now = clock.monotonic()
        return {
            "state": state.value,
            "ejected_until_ms": None if until is None else clock.wall_ms() + int((until - now) * 1000),
            "ejected_for_seconds": None if until is None else round(max(0.0, until - now), 3),
            "ejections": q.ejections if q is not None else 0,
            "last_ejection_reason": q.last_reason if q is not None else None,
            "consecutive_errors": q.consecutive_errors if q is not None else 0,
            "probation_successes": q.probation_successes if q is not None else 0,
            "window_seconds": self.config.window_seconds,
            **tracker.figures(node_id).to_json(),
        }

    def _live_metrics(self) -> Iterable[Metric]:
        counts = self.tracker.counts()
        yield GaugeMetricFamily(
            "lingua_nodes_ejected",
            "Nodes ejected from selection now for failing their jobs (this instance's judgement)",
            value=counts[QualityState.EJECTED],
        )
        yield GaugeMetricFamily(
            "lingua_nodes_on_probation",
            "Nodes back from an ejection that have not yet passed their probation",
            value=counts[QualityState.PROBATION],
        )
        yield counter(
            "lingua_node_ejections_capped",
            "Ejections a rule asked for and the cap (quality.max_ejection_percent) refused",
            self.tracker.capped,
        )


def _nothing() -> None:
    return None
