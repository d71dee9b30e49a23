"""The running scheduler's state: the core objects one instance holds, wired together.

``SchedulerState`` is created by ``app.build_app`` and shared by the endpoints and background tasks. It
holds no I/O itself beyond the per-connection outboxes the endpoints attach to nodes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from lingua_scheduler import __version__
from lingua_scheduler.clock import Clock, SystemClock
from lingua_scheduler.config import Config
from lingua_scheduler.core.fleet_view import FleetViewPublisher
from lingua_scheduler.core.registry import Registry, Transition
from lingua_scheduler.core.status import NodeStatus
from lingua_scheduler.protocol.node import NodeStatusMessage
from lingua_scheduler.server.auth import AuthService
from lingua_scheduler.server.dispatcher import Dispatcher
from lingua_scheduler.server.events import NODE_STATUS, RecentEvents
from lingua_scheduler.server.latency import LatencyWindow
from lingua_scheduler.server.limits import InstanceLimits
from lingua_scheduler.server.links import local_outbox
from lingua_scheduler.server.loop_lag import LoopLagMonitor
from lingua_scheduler.server.metrics import Metrics, counter, gauge
from lingua_scheduler.server.pairing_service import PairingService
from lingua_scheduler.server.quality import QualityMonitor
from lingua_scheduler.server.room_service import RoomService

if TYPE_CHECKING:
    from lingua_scheduler.server.cluster import Cluster
    from lingua_scheduler.server.resume import Resumer
    from lingua_scheduler.server.sessions import Session

#: one readiness check for ``GET /ready``: returns (name, ok); must be cheap and must not block
ReadinessCheck = Callable[[], tuple[str, bool]]
#: node status changes worth an operator's attention (joins and recoveries to ready are not)
_NOTABLE = frozenset({NodeStatus.OFFLINE, NodeStatus.DEGRADED, NodeStatus.DRAINING})


class SchedulerState:
    def __init__(self, config: Config, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.started_at = time.time()
        self.registry = Registry(config.node_health, self.clock, config.limits)
        self.publisher = FleetViewPublisher(
            self.registry,
            self.clock,
            max_concurrent_jobs=config.scheduler.max_concurrent_jobs_per_node,
            pools_config=config.pools,
        )
        self.metrics = Metrics()
        self.loop_lag = LoopLagMonitor()
        self.heartbeat_window = LatencyWindow(65536)
        self.dispatch_window = LatencyWindow(65536)
        self.cross_instance_window = LatencyWindow(65536)
        self.metrics.add_live(self._live_metrics)
        self.sessions: dict[str, Session] = {}
        #: credentials of nodes and sessions, revocation, per-tenant limits (server/auth.py)
        self.auth = AuthService(config.auth, self.clock, config.limits)
        #: per-instance limits: open sockets, node and session capacity, rate limits (server/limits.py)
        self.limits = InstanceLimits(config.limits, self.clock, self.metrics.registry)
        self.metrics.add_live(self.limits.live_metrics)
        #: recent failovers, job failures, node trouble and admin actions (bounded; dashboard, API)
        self.events = RecentEvents(self.clock)
        #: ``GET /ready`` is 200 only when all of these pass (the Redis store adds its own)
        self.readiness_checks: list[ReadinessCheck] = []
        #: set when a graceful shutdown begins (server/shutdown.py): no new session, no job taken
        #: from another instance; in-flight work is allowed to finish
        self.shutting_down = False
        #: when the drain's wait ends (the clock's monotonic seconds), once shutting down
        self.shutdown_deadline: float | None = None
        #: per-node job outcome figures and the ejection of failing nodes (server/quality.py)
        self.quality = QualityMonitor(config.quality, self.clock, self.registry, self.metrics, self.events)
        self.dispatcher = Dispatcher(
            config,
            self.clock,
            registry=self.registry,
            publisher=self.publisher,
            metrics=self.metrics,
            auth=self.auth,
            quality=self.quality,
            events=self.events,
            sessions=self.sessions,
            dispatch_window=self.dispatch_window,
            shutting_down=lambda: self.shutting_down,
        )
        self.quality.on_readmitted = self.dispatcher.pump
        #: rooms, their signalling and the fan-out of members' utterances (server/room_service.py);
        #: shared through the store in multi-instance mode (the app attaches server/room_cluster.py)
        self.rooms = RoomService(config.rooms, self.clock, self.sessions, self.metrics.registry)
        self.metrics.add_live(self.rooms.live_metrics)
        self.dispatcher.fanout = self.rooms
        #: pairing codes of nodes, redeemed by sessions (server/pairing_service.py)
        #: (shared through the store in multi-instance mode: the app attaches store/pairing_store.py)
        self.pairing = PairingService(config.pairing, self.clock, self.metrics.registry)
        #: the multi-instance shell (server/cluster.py), set by the app in Redis mode; None embedded
        self.cluster: Cluster | None = None
        #: handles job messages from a node (node_id, message)
        self.job_handler: Callable[[str, object], None] | None = self.dispatcher.on_node_message

    def resumer(self) -> Resumer | None:
        """The cross-instance resume of this instance (None when embedded)."""
        cluster = self.cluster
        return cluster.resumer if cluster is not None else None

    # --- node notifications ---------------------------------------------------------------------

    def apply_transitions(self, transitions: Iterable[Transition]) -> None:
        """Tell each node about its status change (``node_status``) and count it."""
        for t in transitions:
            self.metrics.status_transitions.labels(t.new.value).inc()
            if t.new in _NOTABLE or t.old in _NOTABLE - {NodeStatus.OFFLINE}:
                self.events.add(
                    NODE_STATUS, node_id=t.node_id, old=t.old.value, new=t.new.value, reason=t.reason
                )
            outbox = local_outbox(self.registry.nodes.get(t.node_id))
            if outbox is not None:
                outbox.send(
                    NodeStatusMessage(
                        node_id=t.node_id,
                        status=t.new.value,
                        reason=t.reason,
                        timestamp=self.clock.wall_ms() // 1000,
                    )
                )

    # --- observability --------------------------------------------------------------------------

    def view_age(self) -> float:
        """Staleness of the fleet view: age of the oldest change not yet published (0 when current)."""
        oldest = self.registry.oldest_dirty()
        return 0.0 if oldest is None else max(0.0, self.clock.monotonic() - oldest)

    def shutdown_remaining_ms(self) -> int:
        """What is left of the shutdown drain, in ms (at least 1: a client told to hold its audio)."""
        if self.shutdown_deadline is None:
            return 1
        return max(1, int((self.shutdown_deadline - self.clock.monotonic()) * 1000))

    def health(self) -> dict[str, object]:
        counts = self.registry.counts()
        return {
            "status": "ok",
            "version": __version__,
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "nodes": {s.value: counts[s] for s in NodeStatus},
            "nodes_total": len(self.registry),
            "fleet_view_version": self.publisher.view.version,
            **self._cluster_health(),
        }

    def _cluster_health(self) -> dict[str, object]:
        cluster = self.cluster
        if cluster is None:
            return {"mode": "embedded"}
        return {
            "mode": "redis",
            "instance_id": cluster.instance_id,
            "store": "degraded" if cluster.degraded else "ok",
            "status": "degraded" if cluster.degraded else "ok",
            **({"store_reason": cluster.degraded_reason} if cluster.degraded else {}),
        }

    def _live_metrics(self) -> Iterable[Metric]:
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
            self.view_age(),
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
        yield gauge(
            "lingua_jobs_inflight", "Jobs dispatched and not yet ended", self.dispatcher.store.inflight
        )
        yield gauge("lingua_jobs_waiting", "Jobs waiting for a node", self.dispatcher.store.waiting)
        cluster = self.cluster
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


STATE: web.AppKey[SchedulerState] = web.AppKey("state", SchedulerState)
