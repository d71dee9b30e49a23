"""The OpenAPI 3.1 document of every HTTP route, served at ``GET /api/v1/openapi.json``.

Owns the description of the routes, their parameters and their response schemas. Tests keep it honest:
every route of the app's router is documented here and every path here is routed; the document
validates as OpenAPI 3.1; and schemathesis drives the running server with requests generated from it,
checking each response against its schema.

Response objects do not forbid extra properties: adding a field to a response is compatible, removing
or retyping one is not. Must never: describe a route the server does not have.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from aiohttp import web

from lingua_scheduler import __version__
from lingua_scheduler.core.jobs import JobState
from lingua_scheduler.core.selection import REASONS
from lingua_scheduler.core.status import NodeStatus
from lingua_scheduler.protocol.common import ServiceType
from lingua_scheduler.server.events import KINDS

JSON = "application/json"
Schema = dict[str, Any]

STATUSES = [s.value for s in NodeStatus]
JOB_STATES = [s.value for s in JobState]
LATENCY_NAMES = ("heartbeat_handle", "selection", "dispatch", "end_to_end")


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def obj(required: list[str] | None = None, /, **props: Schema) -> Schema:
    """An object with these properties, all required unless ``required`` says otherwise (positional:
    a property may itself be called "required")."""
    return {"type": "object", "required": list(props) if required is None else required, "properties": props}


INT: Schema = {"type": "integer"}
NUM: Schema = {"type": "number"}
STR: Schema = {"type": "string"}
BOOL: Schema = {"type": "boolean"}
NONNEG: Schema = {"type": "integer", "minimum": 0}


def json_response(description: str, schema: Schema) -> Schema:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def error(description: str) -> Schema:
    return json_response(description, ref("Error"))


def param(name: str, where: str, schema: Schema, description: str, required: bool = False) -> Schema:
    out: Schema = {"name": name, "in": where, "schema": schema, "description": description}
    if required or where == "path":
        out["required"] = True
    return out


def list_param(name: str, items: Schema, description: str) -> Schema:
    """A repeatable query parameter (``?x=a&x=b``; the server also splits ``x=a,b``)."""
    return {
        "name": name,
        "in": "query",
        "schema": {"type": "array", "items": items},
        "style": "form",
        "explode": True,
        "description": description,
    }


NODE_ID = param("node_id", "path", {"type": "string", "minLength": 1}, "Node id (``node-XXXXXXXX``)")
#: a node id as nodes may present it (protocol.node.NodeId); revoke accepts ids no instance knows
NODE_ID_STRICT = param(
    "node_id",
    "path",
    {"type": "string", "pattern": "^[A-Za-z0-9._:\\-]{1,128}$"},
    "Node id (``node-XXXXXXXX``)",
)
JOB_ID = param("job_id", "path", {"type": "string", "minLength": 1}, "Job id (``job-...``)")
LIMIT = param(
    "limit", "query", {"type": "integer", "minimum": 1, "maximum": 500, "default": 100}, "Page size"
)
OFFSET = param("offset", "query", {"type": "integer", "minimum": 0, "maximum": 10**9, "default": 0}, "Skip")

ADMIN_ERRORS = {
    "401": error("Missing or invalid token (``UNAUTHORIZED``; ``WWW-Authenticate: Bearer``)"),
    "403": error("The admin API is disabled: no ``admin.token`` configured (``ADMIN_DISABLED``)"),
}


def _schemas() -> dict[str, Schema]:
    node_counts = obj(**{s: NONNEG for s in STATUSES})
    percentiles = obj(p50=nullable(NUM), p99=nullable(NUM), p999=nullable(NUM))
    rate = nullable(NUM)
    return {
        "Error": obj(
            code={"type": "string", "description": "Stable machine-readable code, e.g. NOT_FOUND"},
            message={"type": "string", "description": "What went wrong, for a human"},
        ),
        "NodeCounts": node_counts,
        "Health": obj(
            status={"type": "string", "enum": ["ok"]},
            version=STR,
            uptime_seconds=NUM,
            nodes=ref("NodeCounts"),
            nodes_total=NONNEG,
            fleet_view_version=NONNEG,
        ),
        "Ready": obj(
            status={"type": "string", "enum": ["ready", "not_ready"]},
            checks={
                "type": "object",
                "additionalProperties": BOOL,
                "description": "Each readiness check by name: registry, fleet_view, accepting, ...",
            },
        ),
        "LatencyWindow": obj(p50=nullable(NUM), p99=nullable(NUM), count={"type": "number", "minimum": 0}),
        "LanguagePair": obj(
            pair={"type": "string", "description": "Directed pair ``src->tgt``"},
            demand=obj(sessions=NONNEG, jobs_per_second=rate, jobs_last_minute=NONNEG),
            supply=nullable(
                obj(
                    nodes={**NONNEG, "description": "Pool members (any status but offline)"},
                    ready={**NONNEG, "description": "Members ready to take jobs"},
                    slots={**NONNEG, "description": "ready x max_concurrent_jobs_per_node"},
                )
            ),
        ),
        "Stats": obj(
            nodes=ref("NodeCounts"),
            nodes_total=NONNEG,
            sessions=NONNEG,
            jobs=obj(
                inflight=NONNEG,
                waiting=NONNEG,
                by_state=obj(**{s: NONNEG for s in JOB_STATES}),
                per_second=obj(
                    created=rate, completed=rate, failed=rate, timed_out=rate, cancelled=rate, failovers=rate
                ),
            ),
            heartbeats_per_second=rate,
            totals={"type": "object", "additionalProperties": NONNEG},
            window_seconds={**NUM, "description": "Span the rates and latencies cover (up to 60 s)"},
            latency_last_minute=obj(**{n: ref("LatencyWindow") for n in LATENCY_NAMES}),
            latency=obj(heartbeat_handle_seconds=percentiles, job_dispatch_seconds=percentiles),
            heartbeats_total=NONNEG,
            jobs_dispatched_total=NONNEG,
            event_loop_lag_seconds=NUM,
            fleet_view=obj(version=NONNEG, age_seconds=NUM),
            pools=obj(mode=STR, groups=NONNEG, shards=NONNEG),
            language_pairs={"type": "array", "items": ref("LanguagePair")},
            language_pairs_total=NONNEG,
            computed_at_ms=INT,
        ),
        "Event": {
            **obj(
                seq=INT,
                at_ms=INT,
                kind={"type": "string", "enum": list(KINDS)},
            ),
            "description": "One recent event; other fields (node_id, job_id, reason, code, ...) by kind",
        },
        "Events": obj(last_seq=NONNEG, events={"type": "array", "items": ref("Event")}),
        "Node": obj(
            node_id=STR,
            name=STR,
            status={"type": "string", "enum": STATUSES},
            drain_requested=BOOL,
            connected=BOOL,
            version=STR,
            platform=STR,
            accept_public_jobs=BOOL,
            gpus={"type": "array", "items": STR},
            last_heartbeat_age_seconds=NUM,
            heartbeats=NONNEG,
            capability_version=INT,
            capability_change_pending=BOOL,
            capability_changes_deferred=NONNEG,
            load=obj(
                cpu_percent=NUM,
                gpu_percent=nullable(NUM),
                mem_percent=NUM,
                reported_running_jobs=INT,
                inflight_jobs=INT,
                effective_jobs=INT,
            ),
            languages=obj(
                asr={"type": "array", "items": STR},
                tts={"type": "array", "items": STR},
                semantic={"type": "array", "items": STR},
                language_id=BOOL,
            ),
            services=obj(
                installed={"type": "array", "items": STR},
                ready={"type": "array", "items": STR},
                unknown_types={"type": "array", "items": STR},
                unknown_devices={"type": "array", "items": STR},
            ),
            supported_language_pairs=nullable({"type": "array", "items": STR}),
            protocol=obj(sends_acks=BOOL, turn_dialect=BOOL),
            pools={"type": "array", "items": STR},
            history={"type": "array", "items": obj(age_seconds=NUM, event=STR)},
        ),
        "NodePage": obj(
            total=NONNEG,
            offset=NONNEG,
            limit=NONNEG,
            next_offset=nullable(NONNEG),
            next_after=nullable(STR),
            nodes={"type": "array", "items": ref("Node")},
        ),
        "Pools": obj(
            mode=STR,
            max_pool_size=NONNEG,
            pool_count=NONNEG,
            shard_count=NONNEG,
            pools={
                "type": "array",
                "items": obj(
                    ["pool_id", "shards", "members", "ready", "asr_ready", "nmt_ready", "tts_ready"],
                    pool_id=STR,
                    shards={"type": "array", "items": STR},
                    members=NONNEG,
                    ready=NONNEG,
                    asr_ready=NONNEG,
                    nmt_ready=NONNEG,
                    tts_ready=NONNEG,
                    sample_node_ids={"type": "array", "items": STR},
                    name=STR,
                    required_services={"type": "array", "items": STR},
                ),
            },
        ),
        "Simulation": obj(
            selected_node_id=nullable(STR),
            best_reason=STR,
            preferred_node=nullable(STR),
            debug=obj(
                mode=STR,
                pool_count=NONNEG,
                preferred_pool=nullable(STR),
                selected_pool=nullable(STR),
                fallback_used=BOOL,
                truncated=BOOL,
                attempts={
                    "type": "array",
                    "description": "[pool_id, outcome, candidates] per pool tried",
                    "items": {"type": "array", "minItems": 3, "maxItems": 3},
                },
            ),
            breakdown=obj(
                **{
                    "total_nodes": NONNEG,
                    **{r: NONNEG for r in REASONS},
                    "eligible": NONNEG,
                    "excluded": NONNEG,
                }
            ),
            request=obj(
                src_lang=STR,
                tgt_lang=STR,
                required={"type": "array", "items": STR},
                routing_key=STR,
                tenant_id=nullable(STR),
            ),
            fleet_view_version=NONNEG,
        ),
        "Job": obj(
            job_id=STR,
            session_id=STR,
            utterance_index=NONNEG,
            src_lang=STR,
            tgt_lang=STR,
            state={"type": "string", "enum": JOB_STATES},
            attempt=NONNEG,
            node_id=nullable(STR),
            tried_nodes={"type": "array", "items": STR},
            error_code=nullable(STR),
            audio_ms=NONNEG,
            age_seconds=obj(
                created=nullable(NUM),
                dispatched=nullable(NUM),
                accepted=nullable(NUM),
                started=nullable(NUM),
                finished=nullable(NUM),
            ),
            history={
                "type": "array",
                "items": obj(
                    age_seconds=nullable(NUM),
                    to={"type": "string", "enum": JOB_STATES},
                    reason=STR,
                    attempt=NONNEG,
                    node_id=nullable(STR),
                    **{"from": nullable({"type": "string", "enum": JOB_STATES})},
                ),
            },
        ),
        "Sessions": obj(
            total=NONNEG,
            by_phase={"type": "object", "additionalProperties": NONNEG},
            by_language_pair={"type": "object", "additionalProperties": NONNEG},
        ),
        "NodeAction": obj(
            ["action", "node_id", "status", "drain_requested", "connected", "changed"],
            action={"type": "string", "enum": ["drain", "undrain", "disconnect"]},
            node_id=STR,
            status={"type": "string", "enum": STATUSES},
            drain_requested=BOOL,
            connected=BOOL,
            changed={**BOOL, "description": "False when the node already was in the asked state"},
            published={
                **BOOL,
                "description": "drain/undrain: the fleet view selection reads already has the change",
            },
            instance={
                **STR,
                "description": "Multi-instance mode: the instance holding the node, which did the action",
            },
        ),
        "NodeRevoked": obj(
            action={"type": "string", "enum": ["revoke"]},
            node_id=STR,
            changed={**BOOL, "description": "False when the id was revoked already"},
            disconnected={**BOOL, "description": "The node was connected here and its socket is closed"},
            shared={**BOOL, "description": "Written to the shared revocation list (false: 202, pending)"},
            scope={"type": "string", "enum": ["instance", "cluster"]},
        ),
        "JobCancelled": obj(
            action={"type": "string", "enum": ["cancel_job"]},
            job_id=STR,
            state={"type": "string", "enum": ["cancelled"]},
            attempt=NONNEG,
        ),
        "Reason": {
            "type": "object",
            "properties": {"reason": {"type": "string", "maxLength": 200}},
            "description": "Optional reason, shown to the peer and in the log",
        },
    }


def _admin_node(action: str, summary: str) -> Schema:
    return {
        "post": {
            "tags": ["admin"],
            "summary": summary,
            "operationId": f"admin_{action}",
            "security": [{"bearerAuth": []}],
            "parameters": [NODE_ID],
            "responses": {
                "200": json_response("Done (or nothing to do: ``changed`` false)", ref("NodeAction")),
                **ADMIN_ERRORS,
                "404": error("No such node"),
                "409": error(
                    "Embedded mode: the node is marked as another instance's (``REMOTE_NODE``); "
                    "disconnect: the node is not connected (``NOT_CONNECTED``)"
                ),
                "503": error(
                    "Multi-instance mode: the request could not be sent to the node's instance "
                    "(``STORE_UNAVAILABLE``)"
                ),
                "504": error(
                    "Multi-instance mode: the node's instance did not answer in time (``OWNER_TIMEOUT``); "
                    "the action may still take effect"
                ),
            },
            **(
                {"requestBody": {"required": False, "content": {JSON: {"schema": ref("Reason")}}}}
                if action == "disconnect"
                else {}
            ),
        }
    }


def _get(
    tag: str, op: str, summary: str, responses: dict[str, Schema], params: list[Schema] | None = None
) -> Schema:
    out: Schema = {"tags": [tag], "summary": summary, "operationId": op, "responses": responses}
    if params:
        out["parameters"] = params
    return {"get": out}


def _paths() -> dict[str, Schema]:
    bad = error("Invalid query parameter (``INVALID_REQUEST``)")
    return {
        "/health": _get(
            "health",
            "health",
            "Liveness: the process serves requests",
            {"200": json_response("Alive", ref("Health"))},
        ),
        "/ready": _get(
            "health",
            "ready",
            "Readiness: registry loaded, fleet view current, not shutting down, shared store reachable",
            {
                "200": json_response("Ready to take nodes and sessions", ref("Ready")),
                "503": json_response("Not ready; ``checks`` names the failing ones", ref("Ready")),
            },
        ),
        "/metrics": _get(
            "health",
            "metrics",
            "Prometheus text exposition (no per-node or per-session labels)",
            {"200": {"description": "Metrics", "content": {"text/plain": {"schema": STR}}}},
        ),
        "/api/v1/openapi.json": _get(
            "meta",
            "openapi",
            "This document",
            {"200": json_response("OpenAPI 3.1 document", {"type": "object"})},
        ),
        "/api/v1/stats": _get(
            "read",
            "stats",
            "Fleet and traffic summary: nodes by status, sessions, jobs/s, last-minute p50/p99, "
            "language pairs",
            {"200": json_response("Summary (aggregate rebuilt at most once a second)", ref("Stats"))},
        ),
        "/api/v1/events": _get(
            "read",
            "events",
            "Recent failovers, job failures, node status trouble and admin actions, newest first",
            {"200": json_response("Events", ref("Events")), "400": bad},
            [list_param("kind", {"type": "string", "enum": list(KINDS)}, "Only these kinds"), LIMIT],
        ),
        "/api/v1/nodes": _get(
            "read",
            "list_nodes",
            "Nodes in id order, filtered and paginated",
            {"200": json_response("One page", ref("NodePage")), "400": bad},
            [
                list_param("status", {"type": "string", "enum": STATUSES}, "Only nodes in these states"),
                param(
                    "pool", "query", STR, "Only members of this pool (group ``en->zh`` or shard ``en->zh#0``)"
                ),
                param("language", "query", STR, "Only nodes speaking this language (ASR, TTS or semantic)"),
                LIMIT,
                OFFSET,
                param(
                    "after",
                    "query",
                    STR,
                    "Cursor: only nodes with ids after this one (``next_after`` of the previous page); "
                    "``offset`` then skips matches after it",
                ),
            ],
        ),
        "/api/v1/nodes/{node_id}": _get(
            "read",
            "get_node",
            "One node: status, load, languages, pools, last heartbeat age, status history",
            {"200": json_response("The node", ref("Node")), "404": error("No such node")},
            [NODE_ID],
        ),
        "/api/v1/pools": _get(
            "read",
            "pools",
            "Pools with member and ready counts and sample node ids",
            {"200": json_response("Pools", ref("Pools"))},
        ),
        "/api/v1/pools/simulate": _get(
            "read",
            "simulate_selection",
            "Dry-run node selection: nothing is dispatched, no load counted",
            {"200": json_response("What selection would do and why", ref("Simulation")), "400": bad},
            [
                param("src_lang", "query", {"type": "string", "minLength": 1}, "Source language", True),
                param("tgt_lang", "query", {"type": "string", "minLength": 1}, "Target language", True),
                list_param(
                    "required", {"type": "string", "enum": [t.value for t in ServiceType]}, "Services"
                ),
                list_param("features", STR, "Feature flags the node must support"),
                param("routing_key", "query", STR, "Affinity key (else tenant_id, else session_id)"),
                param("tenant_id", "query", STR, "Tenant (tenant pool overrides)"),
                param("session_id", "query", STR, "Session id, as a routing key"),
                param("preferred_node", "query", STR, "Paired node to try first"),
                list_param("exclude_node_id", STR, "Nodes not to pick"),
                param(
                    "accept_public",
                    "query",
                    {"type": "string", "enum": ["true", "false"]},
                    "Public nodes only",
                ),
            ],
        ),
        "/api/v1/jobs/{job_id}": _get(
            "read",
            "get_job",
            "One job: state, attempts, timings, history (ended jobs are kept ``jobs.retention_seconds``)",
            {"200": json_response("The job", ref("Job")), "404": error("No such job (or evicted)")},
            [JOB_ID],
        ),
        "/api/v1/sessions": _get(
            "read",
            "sessions",
            "Session counts by phase and language pair (no ids, audio or text)",
            {"200": json_response("Counts", ref("Sessions"))},
        ),
        "/api/v1/dashboard/stream": _get(
            "dashboard",
            "dashboard_stream",
            "Server-sent events: one ``data:`` frame a second (Stats + ``series`` + ``events``)",
            {
                "200": {"description": "Event stream", "content": {"text/event-stream": {"schema": STR}}},
                "503": error("Too many dashboards connected (``TOO_MANY_CLIENTS``)"),
            },
        ),
        "/": _get(
            "dashboard",
            "root",
            "Redirects to the dashboard",
            {
                "302": {
                    "description": "To ``/dashboard``",
                    "headers": {"Location": {"schema": {"type": "string", "const": "/dashboard"}}},
                }
            },
        ),
        "/dashboard": _get(
            "dashboard",
            "dashboard",
            "The live dashboard page",
            {"200": {"description": "HTML page", "content": {"text/html": {"schema": STR}}}},
        ),
        "/dashboard/static/{name}": _get(
            "dashboard",
            "dashboard_asset",
            "The dashboard's script and style sheet",
            {
                "200": {
                    "description": "The asset",
                    "content": {"text/javascript": {"schema": STR}, "text/css": {"schema": STR}},
                },
                "404": error("No such asset"),
            },
            [param("name", "path", {"type": "string", "enum": ["dashboard.js", "dashboard.css"]}, "Asset")],
        ),
        "/api/v1/admin/check": {
            "get": {
                "tags": ["admin"],
                "summary": "Check an admin token",
                "operationId": "admin_check",
                "security": [{"bearerAuth": []}],
                "responses": {"200": json_response("The token is valid", obj(ok=BOOL)), **ADMIN_ERRORS},
            }
        },
        "/api/v1/admin/nodes/{node_id}/drain": _admin_node(
            "drain", "Drain a node: no new jobs, in-flight jobs finish, the node hears node_status"
        ),
        "/api/v1/admin/nodes/{node_id}/undrain": _admin_node("undrain", "Undo a drain"),
        "/api/v1/admin/nodes/{node_id}/disconnect": _admin_node(
            "disconnect", "Close the node's WebSocket: offline at once, its jobs fail over"
        ),
        "/api/v1/admin/nodes/{node_id}/revoke": {
            "post": {
                "tags": ["admin"],
                "summary": "Revoke a node's token: refused on every instance from now on, socket closed",
                "operationId": "admin_revoke_node",
                "security": [{"bearerAuth": []}],
                "parameters": [NODE_ID_STRICT],
                "responses": {
                    "200": json_response("Revoked", ref("NodeRevoked")),
                    "202": json_response(
                        "Revoked on this instance; the shared list is written when the store answers",
                        ref("NodeRevoked"),
                    ),
                    "400": error("Not a node id"),
                    **ADMIN_ERRORS,
                    "409": error("Node authentication is not configured (``NODE_AUTH_DISABLED``)"),
                },
            }
        },
        "/api/v1/admin/jobs/{job_id}/cancel": {
            "post": {
                "tags": ["admin"],
                "summary": "Cancel a job: job_cancel to the node, JOB_CANCELLED and missing_result to the "
                "session",
                "operationId": "admin_cancel_job",
                "security": [{"bearerAuth": []}],
                "parameters": [JOB_ID],
                "requestBody": {"required": False, "content": {JSON: {"schema": ref("Reason")}}},
                "responses": {
                    "200": json_response("Cancelled", ref("JobCancelled")),
                    **ADMIN_ERRORS,
                    "404": error("No such job"),
                    "409": error("The job already ended (``JOB_ENDED``)"),
                },
            }
        },
        "/ws/node": _get(
            "websocket",
            "node_websocket",
            "Node WebSocket (register, heartbeats, jobs); see docs/design.md",
            {
                "101": {"description": "Switching protocols"},
                "400": {"description": "Not a WebSocket request"},
            },
        ),
        "/ws/session": _get(
            "websocket",
            "session_websocket",
            "Client session WebSocket (audio in, results out)",
            {
                "101": {"description": "Switching protocols"},
                "400": {"description": "Not a WebSocket request"},
            },
        ),
    }


@cache
def document() -> dict[str, Any]:
    """The OpenAPI document (built once; treat as read-only)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "lingua-scheduler",
            "version": __version__,
            "description": (
                "Central scheduler of a speech-translation GPU fleet. Read API, health, metrics, the live "
                "dashboard and admin actions. Every error is JSON ``{code, message}``."
            ),
        },
        "tags": [
            {"name": "health", "description": "Liveness, readiness, Prometheus"},
            {"name": "read", "description": "Read API (JSON, no authentication)"},
            {"name": "admin", "description": "Admin actions (``Authorization: Bearer <admin.token>``)"},
            {"name": "dashboard", "description": "The live dashboard"},
            {"name": "websocket", "description": "WebSocket upgrades (not plain HTTP)"},
            {"name": "meta", "description": "This document"},
        ],
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "description": "The admin.token"}
            },
        },
    }


async def serve(request: web.Request) -> web.Response:
    return web.json_response(document())


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/openapi.json", serve)
