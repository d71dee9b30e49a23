"""The route table of the HTTP API: one ``Route`` per operation, with its method, path, summary,
parameters, request and response types, error codes and authentication.

Handlers are routed from it (``register``: the path and method come from here, by operation id), and
``server/http/openapi.py`` generates the OpenAPI document from it and the Structs of ``protocol/http.py``, so
what is routed, what is answered and what is documented are one thing. Error codes are listed per route;
their HTTP statuses come from ``protocol.http.HTTP_STATUS``. Every route with a query Struct may also
answer ``INVALID_REQUEST``; every admin route ``UNAUTHORIZED`` and ``ADMIN_DISABLED``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

from lingua_scheduler.errors import ErrorCode as E
from lingua_scheduler.protocol import http as h
from lingua_scheduler.protocol import integrator as i

Schema = dict[str, Any]
JSON = "application/json"
STRING: Schema = {"type": "string"}
JSON_OBJECT: Schema = {"type": "object"}
#: a node id as nodes may present it (protocol.node.NodeId); revoke accepts ids no instance knows
NODE_ID_PATTERN = "^[A-Za-z0-9._:\\-]{1,128}$"


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    op: str
    tag: str
    summary: str
    #: the answer's Struct by status (JSON); ``media`` instead for other content (status -> type -> schema)
    responses: dict[int, type[msgspec.Struct]] = field(default_factory=dict)
    media: dict[int, dict[str, Schema]] = field(default_factory=dict)
    #: answers with no body (redirect, upgrade): status -> description
    bare: dict[int, str] = field(default_factory=dict)
    query: type[msgspec.Struct] | None = None
    #: path parameter -> (schema, description)
    path_params: dict[str, tuple[Schema, str]] = field(default_factory=dict)
    body: type[msgspec.Struct] | None = None
    #: a request body that is not one JSON Struct: media type -> its OpenAPI media object
    request: dict[str, Schema] = field(default_factory=dict)
    #: request headers the route reads: name -> description
    headers: dict[str, str] = field(default_factory=dict)
    errors: tuple[E, ...] = ()
    admin: bool = False

    def error_codes(self) -> tuple[E, ...]:
        out = list(self.errors)
        if self.query is not None:
            out.insert(0, E.INVALID_REQUEST)
        if self.admin:
            out[:0] = [E.UNAUTHORIZED, E.ADMIN_DISABLED]
        return tuple(dict.fromkeys(out))


NODE_ID = {"node_id": ({"type": "string", "minLength": 1}, "Node id (``node-XXXXXXXX``)")}
JOB_ID = {"job_id": ({"type": "string", "minLength": 1}, "Job id (``job-...``)")}
#: what an action on a node forwarded to its instance may answer besides its own codes (Redis mode)
FORWARDED = (E.STORE_UNAVAILABLE, E.OWNER_TIMEOUT)
#: refusals of a WebSocket upgrade before it is accepted
UPGRADE_REFUSALS = (E.TOO_MANY_CONNECTIONS, E.SCHEDULER_SHUTTING_DOWN)
_AUDIO_BODY: Schema = {"schema": {"type": "string", "format": "binary"}}
#: the translate route's bodies: the reference gateway's form, or the audio itself (fields in the query)
TRANSLATE_BODY: dict[str, Schema] = {
    "multipart/form-data": {
        "schema": {
            "type": "object",
            "required": ["audio"],
            "properties": {
                "audio": {"type": "string", "format": "binary", "description": "the recording"},
                "src_lang": {"type": "string", "description": "source language, or auto (default zh)"},
                "tgt_lang": {"type": "string", "description": "target language (default en)"},
                "audio_format": {"type": "string", "enum": ["pcm16", "opus", "wav", "ogg_opus"]},
                "sample_rate": {"type": "integer", "description": "Hz, for pcm16 and framed Opus"},
                "tts": {"type": "boolean", "description": "synthesize the translation (default true)"},
                "metadata": {
                    "type": "string",
                    "description": "a JSON object of at most 16 strings, passed to the node and back",
                },
            },
        }
    },
    "audio/ogg": _AUDIO_BODY,
    "audio/wav": _AUDIO_BODY,
    "audio/l16": _AUDIO_BODY,
    "application/octet-stream": _AUDIO_BODY,
}


def _admin_node(action: str, summary: str, errors: tuple[E, ...]) -> Route:
    return Route(
        "POST",
        f"/api/v1/admin/nodes/{{node_id}}/{action}",
        f"admin_{action}" if action != "forget" else "admin_forget_node",
        "admin",
        summary,
        {200: h.NodeForgotten if action == "forget" else h.NodeAction},
        path_params=NODE_ID,
        body=h.ReasonBody if action == "disconnect" else None,
        errors=(E.NOT_FOUND, *errors, *FORWARDED),
        admin=True,
    )


ROUTES: tuple[Route, ...] = (
    # --- health and metrics
    Route("GET", "/health", "health", "health", "Liveness: the process serves requests", {200: h.Health}),
    Route(
        "GET",
        "/ready",
        "ready",
        "health",
        "Readiness: registry loaded, fleet view current, not shutting down, shared store reachable; "
        "503 names the failing checks",
        {200: h.Ready, 503: h.Ready},
    ),
    Route(
        "GET",
        "/metrics",
        "metrics",
        "health",
        "Prometheus text exposition (no per-node or per-session labels)",
        media={200: {"text/plain": STRING}},
    ),
    # --- documents
    Route(
        "GET", "/api/v1/openapi.json", "openapi", "meta", "This document", media={200: {JSON: JSON_OBJECT}}
    ),
    Route(
        "GET",
        "/api/v1/asyncapi/node.json",
        "asyncapi_node",
        "meta",
        "AsyncAPI 3.0 document of /ws/node (every message, field, error code, from the code)",
        media={200: {JSON: JSON_OBJECT}},
    ),
    Route(
        "GET",
        "/api/v1/asyncapi/session.json",
        "asyncapi_session",
        "meta",
        "AsyncAPI 3.0 document of /ws/session (every message, field, error code, from the code)",
        media={200: {JSON: JSON_OBJECT}},
    ),
    # --- read API
    Route(
        "GET",
        "/api/v1/stats",
        "stats",
        "read",
        "Fleet and traffic summary: nodes by status, sessions, jobs/s, last-minute p50/p99, language pairs "
        "(the aggregate is rebuilt at most once a second)",
        {200: h.Stats},
    ),
    Route(
        "GET",
        "/api/v1/stats/series",
        "stats_series",
        "read",
        "The charts' per-second points over up to an hour, averaged into ``step_seconds`` buckets",
        {200: h.StatsSeries},
        query=h.SeriesQuery,
    ),
    Route(
        "GET",
        "/api/v1/cluster",
        "cluster",
        "read",
        "Every instance (address, presence age, nodes, sessions, jobs, inbox depth, dead letters) and the "
        "shared store's health; the embedded mode shows this instance alone",
        {200: h.Cluster},
        errors=(E.STORE_UNAVAILABLE,),
    ),
    Route(
        "GET",
        "/api/v1/events",
        "events",
        "read",
        "Recent failovers, job failures, node status trouble and admin actions, newest first",
        {200: h.Events},
        query=h.EventsQuery,
    ),
    Route(
        "GET",
        "/api/v1/nodes",
        "list_nodes",
        "read",
        "Nodes in id order, filtered and paginated",
        {200: h.NodePage},
        query=h.NodeListQuery,
    ),
    Route(
        "GET",
        "/api/v1/nodes/{node_id}",
        "get_node",
        "read",
        "One node: status, load, languages, pools, last heartbeat age, status history",
        {200: h.NodeDetail},
        path_params=NODE_ID,
        errors=(E.NOT_FOUND,),
    ),
    Route(
        "GET",
        "/api/v1/nodes/{node_id}/jobs",
        "node_jobs",
        "read",
        "A node's recent jobs on this instance (newest first) and their outcomes",
        {200: h.NodeJobs},
        path_params=NODE_ID,
        errors=(E.NOT_FOUND,),
    ),
    Route(
        "GET",
        "/api/v1/pools",
        "pools",
        "read",
        "Pools with member and ready counts and sample node ids",
        {200: h.Pools},
    ),
    Route(
        "GET",
        "/api/v1/pools/simulate",
        "simulate_selection",
        "read",
        "Dry-run node selection: nothing is dispatched, no load counted",
        {200: h.Simulation},
        query=h.SimulateQuery,
    ),
    Route(
        "GET",
        "/api/v1/jobs/{job_id}",
        "get_job",
        "read",
        "One job: state, attempts, timings, history (ended jobs are kept ``jobs.retention_seconds``)",
        {200: h.JobDetail},
        path_params=JOB_ID,
        errors=(E.NOT_FOUND,),
    ),
    Route(
        "GET",
        "/api/v1/sessions",
        "sessions",
        "read",
        "Session counts by phase and language pair (no ids, audio or text)",
        {200: h.Sessions},
    ),
    Route(
        "GET",
        "/api/v1/rooms",
        "rooms",
        "read",
        "Room counts, sizes and ages (no codes, member names or text)",
        {200: h.Rooms},
    ),
    Route(
        "GET",
        "/api/v1/tenants",
        "tenants",
        "read",
        "Per tenant on this instance: live sessions, jobs in the last minute (usage is not metered)",
        {200: h.Tenants},
    ),
    # --- dashboard
    Route("GET", "/", "root", "dashboard", "Redirects to the dashboard", bare={302: "To ``/dashboard``"}),
    Route(
        "GET",
        "/dashboard",
        "dashboard",
        "dashboard",
        "The live dashboard page",
        media={200: {"text/html": STRING}},
    ),
    Route(
        "GET",
        "/dashboard/static/{name}",
        "dashboard_asset",
        "dashboard",
        "The dashboard's script and style sheet",
        media={200: {"text/javascript": STRING, "text/css": STRING}},
        path_params={
            "name": (
                {"type": "string", "enum": ["dashboard.js", "dashboard-ops.js", "dashboard.css"]},
                "Asset",
            )
        },
        errors=(E.NOT_FOUND,),
    ),
    Route(
        "GET",
        "/api/v1/dashboard/stream",
        "dashboard_stream",
        "dashboard",
        "Server-sent events: one ``data:`` frame a second (Stats + ``series`` + ``events``)",
        media={200: {"text/event-stream": STRING}},
        errors=(E.TOO_MANY_CLIENTS,),
    ),
    # --- admin
    Route(
        "GET",
        "/api/v1/admin/check",
        "admin_check",
        "admin",
        "Check an admin token",
        {200: h.AdminCheck},
        admin=True,
    ),
    _admin_node(
        "drain",
        "Drain a node: no new jobs, in-flight jobs finish, the node hears node_status",
        (E.REMOTE_NODE,),
    ),
    _admin_node("undrain", "Undo a drain", (E.REMOTE_NODE,)),
    _admin_node(
        "disconnect",
        "Close the node's WebSocket: offline at once, its jobs fail over",
        (E.REMOTE_NODE, E.NOT_CONNECTED),
    ),
    _admin_node(
        "forget",
        "Forget an offline node's record (it leaves listings, counts and the directory)",
        (E.REMOTE_NODE, E.NODE_CONNECTED),
    ),
    Route(
        "POST",
        "/api/v1/admin/nodes/{node_id}/revoke",
        "admin_revoke_node",
        "admin",
        "Revoke a node's token: refused on every instance from now on, socket closed; 202 when the shared "
        "list is written once the store answers",
        {200: h.NodeRevoked, 202: h.NodeRevoked},
        path_params={
            "node_id": ({"type": "string", "pattern": NODE_ID_PATTERN}, "Node id (``node-XXXXXXXX``)")
        },
        errors=(E.INVALID_MESSAGE, E.NODE_AUTH_DISABLED),
        admin=True,
    ),
    Route(
        "POST",
        "/api/v1/admin/offline-nodes/forget",
        "admin_forget_offline",
        "admin",
        "Forget every offline record of this instance disconnected at least N seconds ago",
        {200: h.OfflineForgotten},
        query=h.ForgetOfflineQuery,
        admin=True,
    ),
    Route(
        "POST",
        "/api/v1/admin/jobs/{job_id}/cancel",
        "admin_cancel_job",
        "admin",
        "Cancel a job: job_cancel to the node, JOB_CANCELLED and missing_result to the session",
        {200: h.JobCancelled},
        path_params=JOB_ID,
        body=h.ReasonBody,
        errors=(E.NOT_FOUND, E.JOB_ENDED),
        admin=True,
    ),
    Route(
        "POST",
        "/api/v1/admin/webhooks/test",
        "admin_webhook_test",
        "admin",
        "Queue a signed test.ping event to a tenant's webhook endpoint (202: queued, delivered with the "
        "usual retries)",
        {202: i.WebhookTestQueued},
        query=i.WebhookTestQuery,
        errors=(E.NOT_FOUND, E.TOO_MANY_CLIENTS),
        admin=True,
    ),
    # --- integrator API
    Route(
        "GET",
        "/api/v1/usage",
        "usage",
        "integrator",
        "A tenant's usage by UTC hour and language pair (admin token: any tenant; a tenant key: its own)",
        {200: i.UsageReport},
        query=i.UsageQuery,
        errors=(E.UNAUTHORIZED, E.FORBIDDEN, E.NOT_FOUND, E.ADMIN_DISABLED),
    ),
    Route(
        "POST",
        "/v1/speech/translate",
        "speech_translate",
        "integrator",
        "Translate an uploaded recording (multipart form or the raw audio): transcript, translation, "
        "speech and timings, one job per utterance, answered in order (Authorization: Bearer <tenant key>)",
        {200: i.TranslateResponse},
        media={
            200: {
                "audio/l16": {"type": "string", "format": "binary", "description": "with Accept: audio/*"},
                "audio/opus": {"type": "string", "format": "binary", "description": "with Accept: audio/*"},
            }
        },
        query=i.TranslateParams,
        request=TRANSLATE_BODY,
        headers={
            "Idempotency-Key": "a retry with the same key (and tenant) gets the first answer",
            "Accept": "audio/* answers the synthesized speech alone (X-Job-Id, X-Session-Id headers)",
        },
        errors=(
            E.UNAUTHORIZED,
            E.MESSAGE_TOO_LARGE,
            E.UNSUPPORTED_MEDIA_TYPE,
            E.QUOTA_EXCEEDED,
            E.TENANT_LIMIT,
            E.TENANT_RATE_LIMITED,
            E.TOO_MANY_CLIENTS,
            E.JOB_CANCELLED,
            E.NO_AVAILABLE_NODE,
            E.NODE_OVERLOADED,
            E.MODEL_NOT_AVAILABLE,
            E.SESSION_LIMIT_REACHED,
            E.SCHEDULER_SHUTTING_DOWN,
            E.JOB_TIMEOUT,
            E.INTERNAL_ERROR,
        ),
    ),
    # --- WebSockets
    Route(
        "GET",
        "/v1/stream",
        "stream_websocket",
        "websocket",
        "Streaming translation WebSocket (start, audio, end -> started, partial, final, ended; "
        "Authorization: Bearer <tenant key>); docs/integration.md",
        bare={101: "Switching protocols", 400: "Not a WebSocket request"},
        errors=(E.ORIGIN_NOT_ALLOWED, *UPGRADE_REFUSALS),
    ),
    Route(
        "GET",
        "/ws/node",
        "node_websocket",
        "websocket",
        "Node WebSocket (register, heartbeats, jobs); its messages: /api/v1/asyncapi/node.json",
        bare={101: "Switching protocols", 400: "Not a WebSocket request"},
        errors=UPGRADE_REFUSALS,
    ),
    Route(
        "GET",
        "/ws/session",
        "session_websocket",
        "websocket",
        "Client session WebSocket (audio in, results out); its messages: /api/v1/asyncapi/session.json",
        bare={101: "Switching protocols", 400: "Not a WebSocket request"},
        errors=(E.ORIGIN_NOT_ALLOWED, *UPGRADE_REFUSALS),
    ),
)

BY_OP: dict[str, Route] = {r.op: r for r in ROUTES}
assert len(BY_OP) == len(ROUTES), "operation ids must be unique"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def register(app: web.Application, op: str, handler: Handler) -> None:
    """Route ``handler`` as operation ``op`` of the table (its method and path come from there)."""
    route = BY_OP[op]
    app.router.add_route(route.method, route.path, handler)
