"""The running instance's objects, as the endpoints and HTTP handlers reach them through the app.

``SchedulerState`` holds what ``app.build_state`` (the composition root) built for one instance -- the
registry, fleet view, engine and runtime, auth, limits, metrics, sessions, the cluster shell in Redis
mode -- and the instance's shutdown flags. It decides nothing and computes nothing beyond reading two
of its own fields; each service was given what it uses when it was built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from lingua_scheduler.clock import Clock
from lingua_scheduler.config import Config
from lingua_scheduler.core.engine import SchedulerEngine
from lingua_scheduler.core.fleet_view import FleetViewPublisher
from lingua_scheduler.core.registry import Registry, Transition
from lingua_scheduler.server.auth import AuthService
from lingua_scheduler.server.events import RecentEvents
from lingua_scheduler.server.latency import LatencyWindow
from lingua_scheduler.server.limits import InstanceLimits
from lingua_scheduler.server.links import Links
from lingua_scheduler.server.loop_lag import LoopLagMonitor
from lingua_scheduler.server.metrics import Metrics
from lingua_scheduler.server.pairing_service import PairingService
from lingua_scheduler.server.quality import QualityMonitor
from lingua_scheduler.server.room_service import RoomService
from lingua_scheduler.server.runtime import Runtime

if TYPE_CHECKING:
    from lingua_scheduler.server.cluster.cluster import Cluster
    from lingua_scheduler.server.cluster.resume import Resumer
    from lingua_scheduler.server.sessions import Session

#: one readiness check for ``GET /ready``: returns (name, ok); must be cheap and must not block
ReadinessCheck = Callable[[], tuple[str, bool]]


@dataclass(eq=False)
class SchedulerState:
    config: Config
    clock: Clock
    #: wall-clock start, shown as uptime
    started_at: float
    registry: Registry
    publisher: FleetViewPublisher
    metrics: Metrics
    loop_lag: LoopLagMonitor
    heartbeat_window: LatencyWindow
    dispatch_window: LatencyWindow
    cross_instance_window: LatencyWindow
    #: the instance's open sessions by id
    sessions: dict[str, Session]
    #: credentials of nodes and sessions, revocation, per-tenant limits (server/auth.py)
    auth: AuthService
    #: per-instance limits: open sockets, node and session capacity, rate limits (server/limits.py)
    limits: InstanceLimits
    #: recent failovers, job failures, node trouble and admin actions (bounded; dashboard, API)
    events: RecentEvents
    #: per-node job outcome figures and the ejection of failing nodes (server/quality.py)
    quality: QualityMonitor
    #: every decision about sessions, nodes and jobs (core/engine.py)
    engine: SchedulerEngine
    #: how nodes and sessions are reached (server/links.py)
    links: Links
    #: feeds the engine and carries out its actions (server/runtime.py)
    runtime: Runtime
    #: tell nodes and operators about status changes (server/node_status.py)
    apply_transitions: Callable[[Iterable[Transition]], None]
    #: rooms, their signalling and the delivery of members' fan-out (server/room_service.py); shared
    #: through the store in multi-instance mode (the app attaches server/cluster/room_cluster.py)
    rooms: RoomService
    #: pairing codes of nodes, redeemed by sessions (server/pairing_service.py); shared through the
    #: store in multi-instance mode (the app attaches store/pairing_store.py)
    pairing: PairingService
    #: ``GET /ready`` is 200 only when all of these pass (the Redis store adds its own)
    readiness_checks: list[ReadinessCheck] = field(default_factory=list)
    #: set when a graceful shutdown begins (server/shutdown.py): no new session, no job taken from
    #: another instance; in-flight work is allowed to finish
    shutting_down: bool = False
    #: when the drain's wait ends (the clock's monotonic seconds), once shutting down
    shutdown_deadline: float | None = None
    #: the multi-instance shell (server/cluster/cluster.py), set by the app in Redis mode; None embedded
    cluster: Cluster | None = None

    def resumer(self) -> Resumer | None:
        """The cross-instance resume of this instance (None when embedded)."""
        cluster = self.cluster
        return cluster.resumer if cluster is not None else None

    def shutdown_remaining_ms(self) -> int:
        """What is left of the shutdown drain, in ms (at least 1: a client told to hold its audio)."""
        if self.shutdown_deadline is None:
            return 1
        return max(1, int((self.shutdown_deadline - self.clock.monotonic()) * 1000))


STATE: web.AppKey[SchedulerState] = web.AppKey("state", SchedulerState)
