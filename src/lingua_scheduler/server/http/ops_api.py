"""Read routes of the operator's dashboard that look back: the last hour of the charts, a node's
recent jobs and the tenants.

Owns ``GET /api/v1/stats/series`` (the per-second points of ``stats.py``'s hour ring, averaged down to
at most ``MAX_SERIES_POINTS``), ``GET /api/v1/nodes/{node_id}/jobs`` (the jobs this instance holds that
ran on a node: live, and ended within ``jobs.retention_seconds``, with their outcomes) and
``GET /api/v1/tenants`` (per tenant: live sessions and the jobs created in the last minute on this
instance). Each request walks what it reports on (the job table, the session table): these are
operator requests, one a click or a few seconds, never on a hot path. Usage is not metered by the
scheduler: ``metered`` says so and no usage figure is invented.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from lingua_scheduler.core.jobs import JobState
from lingua_scheduler.errors import ErrorCode, RequestError
from lingua_scheduler.protocol import http as h
from lingua_scheduler.server.http import routes
from lingua_scheduler.server.http.http_io import build, json_response, parse_query
from lingua_scheduler.server.http.stats import STATS
from lingua_scheduler.server.state import STATE

#: jobs listed for one node at most (newest first)
NODE_JOBS = 50
#: tenants listed at most (busiest first); sessions without a tenant count as ``null``
MAX_TENANTS = 200
#: the span of ``jobs_per_second`` in the tenant view
TENANT_WINDOW = 60.0
_ENDED = {JobState.COMPLETED, JobState.FAILED, JobState.TIMED_OUT, JobState.CANCELLED}


async def series(request: web.Request) -> web.Response:
    """The charts' points over ``window`` seconds (60..3600, default 3600)."""
    q = parse_query(request.query, h.SeriesQuery)
    return json_response(build(h.StatsSeries, request.app[STATS].long_series(q.window)))


async def node_jobs(request: web.Request) -> web.Response:
    """The node's recent jobs on this instance (newest first) and how many ended in each outcome."""
    state = request.app[STATE]
    node_id = request.match_info["node_id"]
    if node_id not in state.registry.nodes:
        raise RequestError(f"no node {node_id!r}", code=ErrorCode.NOT_FOUND)
    now = state.clock.monotonic()
    jobs = [j for j in state.engine.store if j.node_id == node_id or node_id in j.tried_nodes]
    outcomes: dict[str, int] = {}
    for j in jobs:
        if j.state in _ENDED:
            # a job that failed over elsewhere did not end on this node
            key = j.state.value if j.node_id == node_id else "failed_over"
            outcomes[key] = outcomes.get(key, 0) + 1
    jobs.sort(key=lambda j: j.created_at, reverse=True)
    rows = [
        h.NodeJob(
            job_id=j.job_id,
            state=j.state.value if j.node_id == node_id else "failed_over",
            attempt=j.attempt,
            src_lang=j.spec.src_lang,
            tgt_lang=j.tgt_lang,
            error_code=j.error_code if j.node_id == node_id else None,
            age_seconds=round(now - j.created_at, 3),
            duration_seconds=None
            if j.finished_at is None or j.dispatched_at is None
            else round(j.finished_at - j.dispatched_at, 4),
        )
        for j in jobs[:NODE_JOBS]
    ]
    return json_response(
        h.NodeJobs(
            node_id=node_id,
            retention_seconds=state.config.jobs.retention_seconds,
            total=len(jobs),
            outcomes=outcomes,
            jobs=rows,
        )
    )


async def tenants(request: web.Request) -> web.Response:
    """Per tenant on this instance: live sessions and jobs created in the last minute."""
    state = request.app[STATE]
    rows: dict[str | None, dict[str, Any]] = {}

    def row(tenant: str | None) -> dict[str, Any]:
        if tenant not in rows:
            rows[tenant] = {"tenant_id": tenant, "sessions": 0, "jobs_last_minute": 0}
        return rows[tenant]

    for s in state.sessions.values():
        row(s.tenant_id)["sessions"] += 1
    horizon = state.clock.monotonic() - TENANT_WINDOW
    for j in state.engine.store:
        if j.created_at >= horizon:
            row(j.spec.tenant_id)["jobs_last_minute"] += 1
    limits = state.auth.limits
    out = []
    for r in rows.values():
        r["jobs_per_second"] = round(r["jobs_last_minute"] / TENANT_WINDOW, 3)
        tid = r["tenant_id"]
        r["sessions_elsewhere"] = limits.elsewhere.get(tid, 0) if tid is not None else 0
        out.append(r)
    out.sort(key=lambda r: (-r["sessions"], -r["jobs_last_minute"], str(r["tenant_id"])))
    configured = sorted({t.tenant_id for t in state.config.auth.tenants})
    return json_response(
        h.Tenants(
            window_seconds=TENANT_WINDOW,
            configured=configured,
            metered=False,
            total=len(out),
            tenants=[build(h.TenantRow, r) for r in out[:MAX_TENANTS]],
        )
    )


def add_routes(app: web.Application) -> None:
    routes.register(app, "stats_series", series)
    routes.register(app, "node_jobs", node_jobs)
    routes.register(app, "tenants", tenants)
