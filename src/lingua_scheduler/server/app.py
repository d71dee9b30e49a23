"""The composition root: builds one scheduler instance's objects (``build_state``), each given what it
uses, and its aiohttp application (``build_app``), and starts/stops its background tasks.

Binding, the "listening" line and start-up failures are server/startup.py's (``serve``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator

from aiohttp import web

from lingua_scheduler.clock import Clock, SystemClock
from lingua_scheduler.config import Config
from lingua_scheduler.core.engine import SchedulerEngine
from lingua_scheduler.core.fleet_view import FleetViewPublisher
from lingua_scheduler.core.registry import Registry
from lingua_scheduler.protocol.cluster import RoomOutput, RoomState
from lingua_scheduler.server import auth, shutdown, tasks
from lingua_scheduler.server.auth import AuthService
from lingua_scheduler.server.cluster import cluster_view
from lingua_scheduler.server.cluster.cluster import Cluster, make_instance_id, make_store
from lingua_scheduler.server.cluster.room_cluster import KEY_TTL_PERIODS, SharedRooms
from lingua_scheduler.server.connection_guard import setup as guard_connections
from lingua_scheduler.server.events import RecentEvents
from lingua_scheduler.server.http import (
    admin,
    dashboard,
    front_doors,
    http_api,
    integrator_api,
    openapi,
    ops_api,
    routes,
    stats,
)
from lingua_scheduler.server.instance_metrics import InstanceMetrics
from lingua_scheduler.server.latency import LatencyWindow
from lingua_scheduler.server.limits import InstanceLimits
from lingua_scheduler.server.links import Links
from lingua_scheduler.server.loop_lag import LoopLagMonitor
from lingua_scheduler.server.metrics import Metrics
from lingua_scheduler.server.node_status import NodeStatusNotices
from lingua_scheduler.server.pair_metrics import PairMetrics
from lingua_scheduler.server.pairing_service import PairingService
from lingua_scheduler.server.quality import QualityMonitor
from lingua_scheduler.server.room_service import RoomService
from lingua_scheduler.server.runtime import Runtime
from lingua_scheduler.server.sessions import Session
from lingua_scheduler.server.state import STATE, SchedulerState
from lingua_scheduler.server.ws.node_endpoint import node_ws
from lingua_scheduler.server.ws.session_endpoint import session_ws
from lingua_scheduler.server.ws.stream_endpoint import stream_ws
from lingua_scheduler.store.pairing_store import PairingStore
from lingua_scheduler.store.redis_store import RedisStore
from lingua_scheduler.store.room_store import RoomStore


def build_app(config: Config, clock: Clock | None = None) -> web.Application:
    app = web.Application(client_max_size=config.server.max_frame_bytes)
    store: RedisStore | None = None
    if config.cluster.redis_url:
        store = make_store(config.cluster, make_instance_id(config.cluster.instance_id), clock)
        clock = store.shared_clock  # one clock for every instance: wall times on Redis's (OffsetClock)
    state = build_state(config, clock)
    app[STATE] = state
    routes.register(app, "root", root)
    # sockets' counts, caps, header deadline and pre-authentication bytes (server/listener.py uses it)
    state.metrics.add_live(
        guard_connections(
            app, config.limits, state.limits.refusals, config.server.max_frame_bytes
        ).live_metrics
    )
    routes.register(app, "node_websocket", node_ws)
    routes.register(app, "session_websocket", session_ws)
    http_api.add_routes(app)
    ops_api.add_routes(app)  # the dashboard's look-backs: an hour of charts, a node's jobs, tenants
    stats.setup(app)
    state.metrics.add_live(PairMetrics(state).collect)  # supply and demand per language pair
    admin.add_routes(app)
    # usage metering, quotas and webhooks (started after the cluster: its presence is written first)
    integrator_api.setup(app, config, state.clock, store)
    front_doors.setup(app)  # POST /v1/speech/translate: uploads as adapter sessions
    routes.register(app, "stream_websocket", stream_ws)  # /v1/stream: a socket as an adapter session
    dashboard.add_routes(app)
    openapi.add_routes(app)
    if store is not None:
        cluster = Cluster(
            store,
            config.cluster,
            config=config,
            clock=state.clock,
            registry=state.registry,
            publisher=state.publisher,
            auth=state.auth,
            metrics=state.metrics,
            sessions=state.sessions,
            runtime=state.runtime,
            cross_instance_window=state.cross_instance_window,
            node_actions=admin.NODE_ACTIONS,
            node_action=functools.partial(admin.node_action, state),
        )
        state.cluster = cluster
        state.runtime.cluster = cluster
        state.links.instances = cluster
        _share_rooms(state, cluster, store)
        state.pairing.share(PairingStore(store))
        state.readiness_checks.append(lambda: ("shared_store", not cluster.degraded))
    cluster_view.setup(app)  # GET /api/v1/cluster; cluster totals in /api/v1/stats (Redis mode)
    app.cleanup_ctx.append(_background)
    app.cleanup_ctx.append(integrator_api.delivery)
    shutdown.setup(app)  # SIGTERM: drain, fail the rest explicitly, close with 1001 (last on_shutdown hook)
    # start-up warning when left open; revocation sync in shared mode
    cluster_now = state.cluster
    auth.setup(
        app,
        state.auth,
        state.registry,
        state.metrics,
        cluster_now.store if cluster_now is not None else None,
        config.cluster.tick_interval_seconds,
    )
    return app


def _share_rooms(state: SchedulerState, cluster: Cluster, store: RedisStore) -> None:
    """Multi-instance mode: rooms live in the store, their messages go through the inboxes."""
    rooms = state.rooms
    cfg = state.config.rooms
    ttl_ms = int(cfg.expire_after_seconds * 1000) * KEY_TTL_PERIODS + 60_000
    shared = SharedRooms(
        cfg,
        state.clock,
        RoomStore(store, ttl_ms),
        cluster.instance_id,
        state.sessions,
        cluster.writer.send,
        rooms.notify_local,
        rooms.rearm,
    )
    rooms.share(shared)

    def on_message(message: RoomState | RoomOutput) -> None:
        if isinstance(message, RoomState):
            shared.apply(message)
        else:
            shared.output(message)

    cluster.on_room_message = on_message
    cluster.on_instance_dead = shared.instance_dead


def build_state(config: Config, clock: Clock | None = None) -> SchedulerState:
    """Build one instance's objects, each given what it uses (the cluster shell is added in Redis mode)."""
    clock = clock or SystemClock()
    registry = Registry(config.node_health, clock, config.limits)
    publisher = FleetViewPublisher(
        registry,
        clock,
        max_concurrent_jobs=config.scheduler.max_concurrent_jobs_per_node,
        pools_config=config.pools,
    )
    metrics = Metrics()
    loop_lag = LoopLagMonitor()
    sessions: dict[str, Session] = {}
    auth_service = AuthService(config.auth, clock, config.limits)
    limits = InstanceLimits(config.limits, clock, metrics.registry)
    metrics.add_live(limits.live_metrics)
    events = RecentEvents(clock)
    quality = QualityMonitor(config.quality, clock, registry, metrics, events)
    engine = SchedulerEngine(
        config, clock, registry=registry, publisher=publisher, quality=quality.tracker, tenants=auth_service
    )
    links = Links(registry, sessions)
    dispatch_window = LatencyWindow(65536)
    runtime = Runtime(
        engine, links=links, metrics=metrics, events=events, quality=quality, dispatch_window=dispatch_window
    )
    quality.on_readmitted = runtime.pump
    rooms = RoomService(config.rooms, clock, sessions, metrics.registry)
    metrics.add_live(rooms.live_metrics)
    runtime.rooms = rooms
    state = SchedulerState(
        config=config,
        clock=clock,
        started_at=time.time(),
        registry=registry,
        publisher=publisher,
        metrics=metrics,
        loop_lag=loop_lag,
        heartbeat_window=LatencyWindow(65536),
        dispatch_window=dispatch_window,
        cross_instance_window=LatencyWindow(65536),
        sessions=sessions,
        auth=auth_service,
        limits=limits,
        events=events,
        quality=quality,
        engine=engine,
        links=links,
        runtime=runtime,
        apply_transitions=NodeStatusNotices(clock, registry, metrics, events).apply,
        rooms=rooms,
        pairing=PairingService(config.pairing, clock, metrics.registry),
    )
    metrics.add_live(
        InstanceMetrics(registry, publisher, loop_lag, sessions, engine.store, lambda: state.cluster).collect
    )
    return state


async def root(request: web.Request) -> web.StreamResponse:
    """``GET /``: a browser pointed at the scheduler lands on the dashboard."""
    raise web.HTTPFound("/dashboard")


async def _background(app: web.Application) -> AsyncIterator[None]:
    state: SchedulerState = app[STATE]
    running = [
        asyncio.create_task(state.loop_lag.run(), name="loop-lag"),
        asyncio.create_task(tasks.reconciler(state), name="reconciler"),
        asyncio.create_task(tasks.liveness_scan(state), name="liveness-scan"),
        asyncio.create_task(state.runtime.run(), name="job-deadlines"),
        asyncio.create_task(state.quality.run(), name="node-quality"),
    ]
    cluster = state.cluster
    if cluster is not None:
        await cluster.start()
    yield
    if cluster is not None:
        await cluster.stop()
    for t in running:
        t.cancel()
    for t in running:
        with contextlib.suppress(asyncio.CancelledError):
            await t
