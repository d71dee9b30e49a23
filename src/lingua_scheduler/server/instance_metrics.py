"""The instance's own figures for ``/metrics``, computed at scrape time.

Owns ``InstanceMetrics``: node counts by status, fleet view version and age, event-loop lag, the
heartbeat interval, pool reassignments, open sessions, jobs in flight and waiting, and in Redis mode the
shared store's health and the batched writer's figures.

Must never: change what it reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from lingua_scheduler.core.fleet_view import FleetViewPublisher
from lingua_scheduler.core.jobs import JobStore
from lingua_scheduler.core.registry import Registry
from lingua_scheduler.core.status import NodeStatus
from lingua_scheduler.server.cluster.cluster import Cluster
from lingua_scheduler.server.loop_lag import LoopLagMonitor
from lingua_scheduler.server.metrics import counter, gauge


class InstanceMetrics:
    def __init__(
        self,
        registry: Registry,
        publisher: FleetViewPublisher,
        loop_lag: LoopLagMonitor,
        sessions: Mapping[str, object],
        jobs: JobStore,
        cluster: Callable[[], Cluster | None],
    ) -> None:
        """``cluster``: the multi-instance shell now (None embedded)."""
        self.registry = registry
        self.publisher = publisher
        self.loop_lag = loop_lag
        self.sessions = sessions
        self.jobs = jobs
        self.cluster = cluster

    def collect(self) -> Iterable[Metric]:
        counts = self.registry.counts()
        nodes = GaugeMetricFamily("lingua_nodes", "Nodes by status", labels=["status"])
        for s in NodeStatus:
            nodes.add_metric([s.value], counts[s])
        yield nodes
        yield counter(
            "lingua_capability_changes",
            "Capability changes detected by value",
            self.registry.capability_changes,
        )
        yield counter(
            "lingua_fleet_view_publishes", "Fleet view versions published", self.publisher.publishes
        )
        yield gauge(
            "lingua_fleet_view_age_seconds",
            "Age of the oldest change not yet in the published fleet view",
            self.publisher.view_age(),
        )
        yield gauge(
            "lingua_fleet_view_version", "Version of the published fleet view", self.publisher.view.version
        )
        yield gauge(
            "lingua_event_loop_lag_seconds",
            "Event loop lag (worst of the last 2 s)",
            self.loop_lag.recent_max,
        )
        yield gauge(
            "lingua_heartbeat_interval_seconds",
            "Heartbeat interval asked of nodes",
            self.registry.heartbeat_interval(),
        )
        yield counter(
            "lingua_pool_reassignments", "Node pool-membership changes", self.publisher.reassignments
        )
        yield gauge("lingua_sessions", "Open client sessions", len(self.sessions))
        yield gauge("lingua_jobs_inflight", "Jobs dispatched and not yet ended", self.jobs.inflight)
        yield gauge("lingua_jobs_waiting", "Jobs waiting for a node", self.jobs.waiting)
        cluster = self.cluster()
        yield gauge(
            "lingua_store_degraded",
            "1 while the shared store (Redis) is unreachable or refuses writes",
            1.0 if cluster is not None and cluster.degraded else 0.0,
        )
        if cluster is not None:
            failures = CounterMetricFamily(
                "lingua_store_failures",
                "Shared-store calls that failed: unreachable (no answer in time, no connection) or refused "
                "(Redis answered with an error, e.g. out of memory)",
                labels=["kind"],
            )
            for kind, n in cluster.store_failures.items():
                failures.add_metric([kind], n)
            yield failures
            resynced = CounterMetricFamily(
                "lingua_reservations_resynced",
                "Reservation members this instance removed or added when re-syncing them with its live "
                "jobs after a store failure",
                labels=["change"],
            )
            for change, n in cluster.resv_resynced.items():
                resynced.add_metric([change], n)
            yield resynced
            yield counter(
                "lingua_instance_takeovers", "Other instances declared dead and taken over", cluster.takeovers
            )
            yield counter(
                "lingua_store_stalls",
                "Stalls of the shared store found by a tick (no instance ticked): presences were extended",
                cluster.stalls,
            )
            w = cluster.writer
            yield counter(
                "lingua_store_write_batches",
                "Pipelines of small shared-store writes (messages, commits, releases, acks)",
                w.flushes,
            )
            yield counter("lingua_store_writes", "Small shared-store writes in those pipelines", w.writes)
            yield counter(
                "lingua_store_writes_lost",
                "Small shared-store writes lost (store unreachable or write queue full)",
                w.lost,
            )
