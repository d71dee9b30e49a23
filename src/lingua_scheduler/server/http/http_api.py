"""HTTP routes: health, readiness, Prometheus metrics and the read API (JSON).

Each answer is a ``protocol.http`` Struct; a refusal is a raised ``RequestError`` that the error
boundary (``server/http/http_io.py``) answers as ``{"code", "message"}``. Handlers read the published fleet
view or the core's counters; none of them blocks on anything.
"""

from __future__ import annotations

import logging
import time

from aiohttp import web
from msgspec import structs

from lingua_scheduler import __version__
from lingua_scheduler.core.selection import SelectionRequest
from lingua_scheduler.core.status import NodeStatus
from lingua_scheduler.errors import ErrorCode, RequestError
from lingua_scheduler.protocol import http as h
from lingua_scheduler.protocol.common import CORE_SERVICE_TYPES
from lingua_scheduler.server.http import routes
from lingua_scheduler.server.http.http_io import build, error_boundary, json_response, parse_query
from lingua_scheduler.server.http.stats import STATS
from lingua_scheduler.server.state import STATE, SchedulerState

MAX_PAGE = 500
#: the fleet view is "stale" for readiness when a change has waited this long to be published
STALE_VIEW_SECONDS = 5.0

log = logging.getLogger(__name__)


def _state(request: web.Request) -> SchedulerState:
    return request.app[STATE]


# --- health and metrics ----------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    return json_response(build(h.Health, health_of(_state(request))))


def health_of(state: SchedulerState) -> dict[str, object]:
    """The ``GET /health`` document: version, uptime, nodes by status, the mode and its store."""
    counts = state.registry.counts()
    cluster = state.cluster
    mode: dict[str, object] = {"mode": "embedded"}
    if cluster is not None:
        mode = {
            "mode": "redis",
            "instance_id": cluster.instance_id,
            "store": "degraded" if cluster.degraded else "ok",
            "status": "degraded" if cluster.degraded else "ok",
            **({"store_reason": cluster.degraded_reason} if cluster.degraded else {}),
        }
    return {
        "status": "ok",
        "version": __version__,
        "uptime_seconds": round(time.time() - state.started_at, 3),
        "nodes": {s.value: counts[s] for s in NodeStatus},
        "nodes_total": len(state.registry),
        "fleet_view_version": state.publisher.view.version,
        **mode,
    }


async def ready(request: web.Request) -> web.Response:
    """Readiness: 200 when every check of ``state.readiness_checks`` passes, else 503 naming them."""
    results: dict[str, bool] = {}
    for check in _state(request).readiness_checks:
        try:
            name, ok = check()
        except Exception:  # a broken check means "not ready", never a 500
            name, ok = getattr(check, "__name__", "check"), False
            log.exception("readiness check failed", extra={"check": name})
        results[name] = results.get(name, True) and ok
    ok = all(results.values())
    return json_response(h.Ready(status="ready" if ok else "not_ready", checks=results), 200 if ok else 503)


def default_readiness_checks(app: web.Application) -> None:
    """Checks every instance has: the registry is loaded (in the embedded mode, as soon as the app has
    started), the fleet view keeps up, and the instance is not shutting down."""
    state = app[STATE]
    stopping = False

    def registry() -> tuple[str, bool]:
        return "registry", True

    def fleet_view() -> tuple[str, bool]:
        return "fleet_view", state.publisher.view_age() < STALE_VIEW_SECONDS

    def accepting() -> tuple[str, bool]:
        # false from SIGTERM on: the graceful drain (server/shutdown.py) runs before aiohttp's shutdown
        return "accepting", not stopping and not state.shutting_down

    async def on_shutdown(app: web.Application) -> None:
        nonlocal stopping
        stopping = True  # a load balancer polling /ready stops sending before the sockets close

    state.readiness_checks.extend((registry, fleet_view, accepting))
    app.on_shutdown.insert(0, on_shutdown)


async def metrics(request: web.Request) -> web.Response:
    t0 = time.perf_counter()
    state = _state(request)
    body = state.metrics.render()
    state.metrics.operator_render.labels("metrics").observe(time.perf_counter() - t0)
    return web.Response(
        body=body, content_type="text/plain", charset="utf-8", headers={"X-Content-Type-Options": "nosniff"}
    )


async def stats(request: web.Request) -> web.Response:
    """Fleet and traffic summary. The aggregate (rates, latencies, language pairs) is rebuilt at most
    once a second (see stats.py); the O(1) counts on top of it are always current."""
    t0 = time.perf_counter()
    response = json_response(build(h.Stats, request.app[STATS].api_body()))
    _state(request).metrics.operator_render.labels("stats").observe(time.perf_counter() - t0)
    return response


async def events(request: web.Request) -> web.Response:
    """Recent failovers, job failures, node trouble and admin actions, newest first (bounded ring)."""
    q = parse_query(request.query, h.EventsQuery)
    ring = _state(request).events
    return json_response(h.Events(last_seq=ring.last_seq, events=ring.latest(q.limit, q.kind)))


# --- nodes -------------------------------------------------------------------------------------------


def node_json(state: SchedulerState, node_id: str) -> h.NodeDetail | None:
    entry = state.registry.nodes.get(node_id)
    if entry is None:
        return None
    view = state.publisher.view.get(node_id)
    caps, load = entry.caps, entry.load
    now = state.clock.monotonic()
    return h.NodeDetail(
        node_id=entry.node_id,
        name=entry.name,
        status=entry.status,
        drain_requested=entry.drain_requested,
        connected=entry.connected,
        version=entry.version,
        platform=entry.platform,
        accept_public_jobs=entry.accept_public_jobs,
        gpus=[g.name for g in entry.hardware.gpus or ()],
        last_heartbeat_age_seconds=round(now - entry.last_heartbeat, 3),
        heartbeats=entry.heartbeats,
        capability_version=entry.version_no,
        # changes over the node's budget (limits.capability_changes_per_minute) wait; the latest wins
        capability_change_pending=entry.pending_caps is not None,
        capability_changes_deferred=entry.deferred_changes,
        load=h.NodeLoad(
            cpu_percent=load.cpu,
            gpu_percent=load.gpu,
            mem_percent=load.mem,
            reported_running_jobs=load.reported_running,
            inflight_jobs=load.inflight,
            effective_jobs=load.effective,
            # the node's declared slots and its own load against its threshold (protocol additions)
            max_jobs=entry.max_concurrent_jobs or state.config.scheduler.max_concurrent_jobs_per_node,
            node_load=load.own,
            node_load_threshold=load.own_threshold,
        ),
        languages=h.NodeLanguages(
            asr=sorted(caps.asr_languages),
            tts=sorted(caps.tts_languages),
            semantic=sorted(caps.semantic_languages),
            language_id=caps.language_id,
        ),
        services=h.NodeServices(
            installed=sorted(caps.installed_types),
            ready=sorted(caps.ready_types),
            # reported kinds this scheduler does not know: kept and shown, ignored for routing
            unknown_types=sorted(caps.unknown_types),
            unknown_devices=sorted(caps.unknown_devices),
        ),
        models=[
            h.NodeModel(model_id=m.model_id, kind=m.kind, version=m.version, enabled=m.enabled)
            for m in entry.models
        ],
        supported_language_pairs=(
            None if caps.declared_pairs is None else sorted(f"{s}->{t}" for s, t in caps.declared_pairs)
        ),
        protocol=h.NodeProtocol(sends_acks=entry.sends_acks, turn_dialect=entry.turn_dialect),
        # the instance holding the node's socket (multi-instance mode; null in the embedded mode)
        instance=entry.owner or (cluster.instance_id if (cluster := state.cluster) else None),
        # node quality (server/quality.py): healthy, ejected (skipped by selection) or probation
        quality_state=state.quality.tracker.state_of(node_id),
        pools=list(view.pools) if view is not None else [],
        history=[h.NodeHistoryEntry(age_seconds=round(now - t, 3), event=e) for t, e in entry.history],
    )


async def node_detail(request: web.Request) -> web.Response:
    state = _state(request)
    node_id = request.match_info["node_id"]
    body = node_json(state, node_id)
    if body is None:
        raise RequestError(f"no node {node_id!r}", code=ErrorCode.NOT_FOUND)
    # rolling figures: one node's window, not a page's
    quality = build(h.NodeQuality, state.quality.node_json(node_id))
    return json_response(structs.replace(body, quality=quality))


async def node_list(request: web.Request) -> web.Response:
    """Nodes, filtered by ``status``, ``pool`` and ``language`` (any role), in id order, paginated by
    ``limit`` with ``after`` (a cursor: the last id of the previous page, ``next_after``) or ``offset``
    (with ``after``, it skips that many matches after the cursor).

    Nothing is sorted per request: the registry keeps its ids sorted, and a page walks them from the
    cursor until ``limit`` nodes matched. ``total`` is read from counters without a filter or with a
    status filter only; with a pool or language filter it takes one pass over the records."""
    state = _state(request)
    q = parse_query(request.query, h.NodeListQuery)
    pool, language, limit, offset, after = q.pool, q.language, q.limit, q.offset, q.after
    registry = state.registry
    view = state.publisher.view
    wanted = frozenset(q.status)

    def matches(node_id: str) -> bool:
        entry = registry.nodes[node_id]
        if wanted and entry.status not in wanted:
            return False
        if pool is not None:
            nv = view.get(node_id)
            if nv is None or not any(p == pool or p.split("#")[0] == pool for p in nv.pools):
                return False
        if language is not None:
            c = entry.caps
            if language not in c.asr_languages and language not in c.tts_languages:
                return language in c.semantic_languages
        return True

    filtered = bool(wanted) or pool is not None or language is not None
    if not filtered:
        total = len(registry)
    elif pool is None and language is None:
        counts = registry.counts()
        total = sum(counts[s] for s in wanted)
    else:
        total = sum(1 for n in registry.ids_after() if matches(n))
    page: list[str] = []
    more = False
    if not filtered and after is None:
        ids = registry.ids_after(start=offset)  # no filter: the offset is a position, no walk to it
        skip = 0
    else:
        ids = registry.ids_after(after)
        skip = offset
    for node_id in ids:
        if filtered and not matches(node_id):
            continue
        if skip:
            skip -= 1
            continue
        if len(page) == limit:
            more = True
            break
        page.append(node_id)
    nodes = [node_json(state, n) for n in page]
    return json_response(
        h.NodePage(
            total=total,
            offset=offset,
            limit=limit,
            next_offset=offset + limit if more and after is None else None,
            next_after=page[-1] if more else None,
            nodes=[n for n in nodes if n is not None],
        )
    )


# --- pools ---------------------------------------------------------------------------------------------


async def pools(request: web.Request) -> web.Response:
    return json_response(build(h.Pools, _state(request).publisher.view.pool_listing()))


async def simulate(request: web.Request) -> web.Response:
    """Dry run of a selection: nothing is dispatched and no load is counted."""
    state = _state(request)
    q = parse_query(request.query, h.SimulateQuery)
    src, tgt = q.src_lang, q.tgt_lang
    routing_key = q.routing_key or q.tenant_id or q.session_id or "default"
    req = SelectionRequest(
        src_lang=src,
        tgt_lang=tgt,
        required=frozenset(q.required) or CORE_SERVICE_TYPES,
        features=frozenset(q.features),
        routing_key=routing_key,
        tenant_id=q.tenant_id,
        preferred_node=q.preferred_node,
        exclude=frozenset(q.exclude_node_id),
        accept_public=q.accept_public,
    )
    result = state.engine.selector.select(state.publisher.view, req)
    body = result.to_json()
    body["request"] = h.SimulationRequest(
        src_lang=src,
        tgt_lang=tgt,
        required=sorted(req.required),
        routing_key=routing_key,
        tenant_id=req.tenant_id,
    )
    body["fleet_view_version"] = state.publisher.view.version
    return json_response(build(h.Simulation, body))


# --- jobs and sessions ---------------------------------------------------------------------------------


async def job_detail(request: web.Request) -> web.Response:
    state = _state(request)
    job = state.engine.store.get(request.match_info["job_id"])
    if job is None:
        raise RequestError(
            f"no job {request.match_info['job_id']!r} (ended jobs are kept "
            f"{state.config.jobs.retention_seconds:g} s)",
            code=ErrorCode.NOT_FOUND,
        )
    now = state.clock.monotonic()

    def age(t: float | None) -> float | None:
        return None if t is None else round(now - t, 4)

    return json_response(
        h.JobDetail(
            job_id=job.job_id,
            session_id=job.session_id,
            utterance_index=job.utterance_index,
            src_lang=job.spec.src_lang,
            tgt_lang=job.tgt_lang,
            state=job.state,
            attempt=job.attempt,
            node_id=job.node_id,
            tried_nodes=list(job.tried_nodes),
            error_code=job.error_code,
            audio_ms=job.spec.audio_ms,
            age_seconds=h.JobAges(
                created=age(job.created_at),
                dispatched=age(job.dispatched_at),
                accepted=age(job.accepted_at),
                started=age(job.started_at),
                finished=age(job.finished_at),
            ),
            history=[
                h.JobTransition(
                    age_seconds=age(t.at),
                    from_=t.src,
                    to=t.dst,
                    reason=t.reason,
                    attempt=t.attempt,
                    node_id=t.node_id,
                )
                for t in job.history
            ],
        )
    )


async def sessions(request: web.Request) -> web.Response:
    """Session counts only: no audio, no text, no ids of other tenants' sessions."""
    state = _state(request)
    by_phase: dict[str, int] = {}
    by_pair: dict[str, int] = {}
    for s in state.sessions.values():
        by_phase[s.phase.value] = by_phase.get(s.phase.value, 0) + 1
        for t in s.targets:
            key = f"{s.src_lang}->{t}"
            by_pair[key] = by_pair.get(key, 0) + 1
    return json_response(h.Sessions(total=len(state.sessions), by_phase=by_phase, by_language_pair=by_pair))


async def rooms(request: web.Request) -> web.Response:
    """Room counts, sizes and ages only: what an operator sizes by, nothing of what is said."""
    service = _state(request).rooms
    snapshot = service.snapshot()
    by_size: dict[str, int] = {}
    for members, _ in snapshot:
        by_size[str(members)] = by_size.get(str(members), 0) + 1
    ages = sorted(age for _, age in snapshot)
    return json_response(
        h.Rooms(
            rooms=len(snapshot),
            members=sum(n for n, _ in snapshot),
            max_members=service.rooms.config.max_members,
            by_size=by_size,
            age_seconds=h.RoomAges(
                p50=round(ages[len(ages) // 2], 3) if ages else None,
                max=round(ages[-1], 3) if ages else None,
            ),
            fanout_jobs_total=service.relay.fanout_jobs,
        )
    )


def add_routes(app: web.Application) -> None:
    app.middlewares.append(error_boundary)
    default_readiness_checks(app)
    for op, handler in (
        ("health", health),
        ("ready", ready),
        ("metrics", metrics),
        ("stats", stats),
        ("events", events),
        ("list_nodes", node_list),
        ("get_node", node_detail),
        ("pools", pools),
        ("simulate_selection", simulate),
        ("get_job", job_detail),
        ("sessions", sessions),
        ("rooms", rooms),
    ):
        routes.register(app, op, handler)
