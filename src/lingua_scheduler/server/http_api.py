"""HTTP routes: health, Prometheus metrics and the read API (JSON)."""

from __future__ import annotations

from aiohttp import web

from lingua_scheduler.server.state import STATE, SchedulerState


def _state(request: web.Request) -> SchedulerState:
    state: SchedulerState = request.app[STATE]
    return state


async def health(request: web.Request) -> web.Response:
    return web.json_response(_state(request).health())


async def metrics(request: web.Request) -> web.Response:
    body = _state(request).metrics.render()
    return web.Response(
        body=body, content_type="text/plain", charset="utf-8", headers={"X-Content-Type-Options": "nosniff"}
    )


async def stats(request: web.Request) -> web.Response:
    state = _state(request)
    return web.json_response(
        {
            "nodes": state.health()["nodes"],
            "latency": {"heartbeat_handle_seconds": state.heartbeat_window.percentiles(50, 99, 99.9)},
            "heartbeats_total": state.heartbeat_window.count,
            "event_loop_lag_seconds": state.loop_lag.recent_max,
        }
    )


def node_json(state: SchedulerState, node_id: str) -> dict[str, object] | None:
    entry = state.registry.nodes.get(node_id)
    if entry is None:
        return None
    view = state.publisher.view.get(node_id)
    caps, load = entry.caps, entry.load
    now = state.clock.monotonic()
    return {
        "node_id": entry.node_id,
        "name": entry.name,
        "status": entry.status.value,
        "connected": entry.connected,
        "version": entry.version,
        "platform": entry.platform,
        "accept_public_jobs": entry.accept_public_jobs,
        "gpus": [g.name for g in entry.hardware.gpus or ()],
        "last_heartbeat_age_seconds": round(now - entry.last_heartbeat, 3),
        "heartbeats": entry.heartbeats,
        "capability_version": entry.version_no,
        "load": {
            "cpu_percent": load.cpu,
            "gpu_percent": load.gpu,
            "mem_percent": load.mem,
            "reported_running_jobs": load.reported_running,
            "inflight_jobs": load.inflight,
            "effective_jobs": load.effective,
        },
        "languages": {
            "asr": sorted(caps.asr_languages),
            "tts": sorted(caps.tts_languages),
            "semantic": sorted(caps.semantic_languages),
            "language_id": caps.language_id,
        },
        "services": {"installed": sorted(caps.installed_types), "ready": sorted(caps.ready_types)},
        "pools": list(view.pools) if view is not None else [],
        "history": [{"age_seconds": round(now - t, 3), "event": e} for t, e in entry.history],
    }


async def node_detail(request: web.Request) -> web.Response:
    body = node_json(_state(request), request.match_info["node_id"])
    if body is None:
        return web.json_response({"code": "NOT_FOUND", "message": "no such node"}, status=404)
    return web.json_response(body)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/v1/stats", stats)
    app.router.add_get("/api/v1/nodes/{node_id}", node_detail)
