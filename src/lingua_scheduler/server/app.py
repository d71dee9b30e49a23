"""Builds the aiohttp application of one scheduler instance and starts/stops its background tasks."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from lingua_scheduler.clock import Clock
from lingua_scheduler.config import Config
from lingua_scheduler.server import admin, auth, dashboard, http_api, openapi, shutdown, stats, tasks
from lingua_scheduler.server.cluster import Cluster, make_instance_id, make_store
from lingua_scheduler.server.connection_guard import setup as guard_connections
from lingua_scheduler.server.fd_limits import fit_descriptor_limit
from lingua_scheduler.server.listener import run_app as listen
from lingua_scheduler.server.node_endpoint import node_ws
from lingua_scheduler.server.session_endpoint import session_ws
from lingua_scheduler.server.state import STATE, SchedulerState
from lingua_scheduler.server.tls import server_ssl_context
from lingua_scheduler.store.redis_store import RedisStore

log = logging.getLogger(__name__)


def build_app(config: Config, clock: Clock | None = None) -> web.Application:
    app = web.Application(client_max_size=config.server.max_frame_bytes)
    store: RedisStore | None = None
    if config.cluster.redis_url:
        store = make_store(config.cluster, make_instance_id(config.cluster.instance_id), clock)
        clock = store.shared_clock  # one clock for every instance: wall times on Redis's (OffsetClock)
    state = SchedulerState(config, clock)
    app[STATE] = state
    # sockets' counts, caps, header deadline and pre-authentication bytes (installed by listener.py)
    state.metrics.add_live(guard_connections(app, config.limits, state.limits.refusals).live_metrics)
    app.router.add_get("/ws/node", node_ws)
    app.router.add_get("/ws/session", session_ws)
    http_api.add_routes(app)
    stats.setup(app)
    admin.add_routes(app)
    dashboard.add_routes(app)
    openapi.add_routes(app)
    if store is not None:
        cluster = Cluster(state, store, config.cluster)
        state.dispatcher.cluster = cluster
        state.readiness_checks.append(lambda: ("shared_store", not cluster.degraded))
    app.cleanup_ctx.append(_background)
    shutdown.setup(app)  # SIGTERM: drain, fail the rest explicitly, close with 1001 (last on_shutdown hook)
    auth.setup(app)  # start-up warning when left open; revocation sync in shared mode
    return app


async def _background(app: web.Application) -> AsyncIterator[None]:
    state: SchedulerState = app[STATE]
    running = [
        asyncio.create_task(state.loop_lag.run(), name="loop-lag"),
        asyncio.create_task(tasks.reconciler(state), name="reconciler"),
        asyncio.create_task(tasks.liveness_scan(state), name="liveness-scan"),
        asyncio.create_task(state.dispatcher.run(), name="job-deadlines"),
    ]
    cluster = state.dispatcher.cluster
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


def run(config: Config) -> None:
    """Serve until interrupted (``make run``)."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is optional on exotic platforms
        pass
    ssl_context = server_ssl_context(config.tls)  # before anything starts: a bad cert stops here
    fit_descriptor_limit(config.limits)  # raise RLIMIT_NOFILE; lower max_connections to what fits
    app = build_app(config)
    shutdown.handle_signals(app)  # SIGTERM drains in-flight work before aiohttp's own shutdown
    host, port = config.server.host, config.server.port
    scheme = "wss" if ssl_context is not None else "ws"
    log.info(
        "lingua-scheduler listening",
        extra={"host": host, "port": port, "node_ws": f"{scheme}://{host}:{port}/ws/node"},
    )
    # Objects alive at start (modules, config, routes) never become garbage: keep the collector off them.
    gc.freeze()
    listen(app, config, ssl_context)  # aiohttp's protocol behind the connection guard (listener.py)
