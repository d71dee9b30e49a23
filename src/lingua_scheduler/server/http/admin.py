"""Admin actions behind a bearer token: drain, undrain, disconnect, forget and revoke a node, forget
offline nodes in bulk, cancel a job.

Owns the ``/api/v1/admin/...`` routes, their authentication and their audit trail. The token comes from
``admin.token`` (config file or ``LINGUA_ADMIN__TOKEN``) and is compared in constant time
(``hmac.compare_digest`` over bytes). No token configured = the admin API is disabled: every admin
route answers 403 ``ADMIN_DISABLED`` (there is no default password to forget to change); a missing or
wrong token is 401 ``UNAUTHORIZED``. Every admin request, refused or done, is logged with who (remote
address and the optional ``X-Operator`` header) and what, counted in ``lingua_admin_actions_total``,
and kept in the recent-events ring.

Must never: log or echo the token, act before the token checks out, or change node or job state other
than through the registry's and the engine's own operations (which tell the node and the session).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import WSCloseCode, web

from lingua_scheduler.core.events import CancelJob
from lingua_scheduler.core.status import NodeStatus
from lingua_scheduler.errors import ErrorCode, RequestError, SchedulerError
from lingua_scheduler.protocol import http as h
from lingua_scheduler.protocol.http import ErrorBody
from lingua_scheduler.server.auth import disconnect_revoked
from lingua_scheduler.server.events import ADMIN
from lingua_scheduler.server.http import routes
from lingua_scheduler.server.http.http_io import build, error_response, json_response, parse_query, status_of
from lingua_scheduler.server.state import STATE, SchedulerState
from lingua_scheduler.server.ws.outbox import Outbox
from lingua_scheduler.store.base import StoreUnavailable

log = logging.getLogger(__name__)

#: how long an action waits for its effect to show (view publication, socket close) before answering
EFFECT_TIMEOUT = 2.0
#: how long a node action forwarded to the node's instance may take (its own effect wait, plus two hops)
FORWARD_TIMEOUT = EFFECT_TIMEOUT + 1.0
MAX_REASON = 200
_PRINTABLE = re.compile(r"[^\x20-\x7e]")
#: result label of a refused action, by HTTP status (a fixed set: it labels a metric)
_RESULTS = {404: "not_found", 409: "conflict", 503: "unavailable", 504: "timeout"}

Handler = Callable[[web.Request], Awaitable[web.Response]]


def _refusal(code: ErrorCode, message: str) -> tuple[int, dict[str, Any]]:
    """A refusal as ``node_action`` returns it (also sent between instances): (status, error body)."""
    return status_of(code), msgspec.to_builtins(ErrorBody(code=code, message=message))


def _actor(request: web.Request) -> dict[str, str]:
    """Who asked: the peer address and what the operator calls themselves (``X-Operator``, cleaned)."""
    operator = _PRINTABLE.sub("", request.headers.get("X-Operator", ""))[:64] or "anonymous"
    return {"operator": operator, "remote": request.remote or "unknown"}


def _authorized(request: web.Request, token: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    # compare_digest over bytes: the time taken does not depend on where the strings differ
    return hmac.compare_digest(given.strip().encode(), token.encode())


def admin_action(action: str) -> Callable[[Handler], Handler]:
    """Wrap a handler: refuse unless the admin API is enabled and the bearer token matches; audit."""

    def wrap(handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.Response:
            state = request.app[STATE]
            token = state.config.admin.token
            who = _actor(request)
            target = dict(request.match_info)
            if not token:
                refused = RequestError(
                    "the admin API is disabled: no admin.token is configured", code=ErrorCode.ADMIN_DISABLED
                )
                result, response = "disabled", error_response(refused)
            elif not _authorized(request, token):
                refused = RequestError(
                    "missing or invalid admin token (Authorization: Bearer <token>)",
                    code=ErrorCode.UNAUTHORIZED,
                    headers={"WWW-Authenticate": 'Bearer realm="lingua-scheduler admin"'},
                )
                result, response = "unauthorized", error_response(refused)
            else:
                try:
                    response = await handler(request)
                except SchedulerError as exc:  # answered here, not by the middleware: the audit needs it
                    response = error_response(exc)
                result = _RESULTS.get(response.status, "ok" if response.status < 400 else "error")
            state.metrics.admin_actions.labels(action, result).inc()
            level = logging.WARNING if result in ("disabled", "unauthorized") else logging.INFO
            log.log(level, "admin action", extra={"action": action, "result": result, **who, **target})
            if result not in ("disabled", "unauthorized") and action != "check":
                state.events.add(ADMIN, action=action, result=result, operator=who["operator"], **target)
            return response

        guarded.__name__ = handler.__name__
        guarded.__doc__ = handler.__doc__
        return guarded

    return wrap


async def _reason(request: web.Request, default: str) -> str:
    """The optional ``{"reason": "..."}`` body, cleaned and bounded; the default when absent."""
    if not request.can_read_body:
        return default
    try:
        body: Any = await request.json()
    except ValueError:
        return default
    reason = body.get("reason") if isinstance(body, dict) else None
    if not isinstance(reason, str) or not reason.strip():
        return default
    return _PRINTABLE.sub("", reason)[:MAX_REASON]


# --- nodes ---------------------------------------------------------------------------------------


async def _published(state: SchedulerState, node_id: str) -> bool:
    """Wait (bounded) until the fleet view carries the node's latest version, so that once the action
    answers, selection no longer sees the old status. The reconciler stays the view's only writer."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + EFFECT_TIMEOUT
    step = state.config.scheduler.fleet_view_interval_ms / 1000.0
    while True:
        entry = state.registry.nodes.get(node_id)
        nv = state.publisher.view.get(node_id)
        if entry is None or nv is None or nv.version >= entry.version_no:
            return True
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(step)


def _node_body(
    state: SchedulerState, node_id: str, action: str, changed: bool, published: bool | None = None
) -> dict[str, Any]:
    entry = state.registry.nodes[node_id]
    body = h.NodeAction(
        action=action,  # type: ignore[arg-type]  # one of NODE_ACTIONS but forget (its own body)
        node_id=node_id,
        status=entry.status,
        drain_requested=entry.drain_requested,
        connected=entry.connected,
        changed=changed,
        published=msgspec.UNSET if published is None else published,
    )
    return msgspec.to_builtins(body)  # type: ignore[no-any-return]


NODE_ACTIONS = ("drain", "undrain", "disconnect", "forget")


async def node_action(
    state: SchedulerState, node_id: str, action: str, reason: str
) -> tuple[int, dict[str, Any]]:
    """Drain, undrain or disconnect a node connected to this instance: (HTTP status, body). Called by
    this instance's admin routes and, for a request another instance's admin API forwarded, by the
    cluster shell (server/cluster/cluster.py)."""
    entry = state.registry.nodes.get(node_id)
    if entry is None:
        return _refusal(ErrorCode.NOT_FOUND, f"no node {node_id!r}")
    if entry.owner is not None:
        # Its status is the owner's to change: a change made here would be overwritten by its next record.
        message = f"node {node_id!r} is connected to instance {entry.owner}: act there"
        return _refusal(ErrorCode.REMOTE_NODE, message)
    if action == "disconnect":
        return await _disconnect(state, node_id, reason)
    if action == "forget":
        return await _forget(state, node_id)
    registry = state.registry
    before = entry.drain_requested
    transitions = registry.drain(node_id) if action == "drain" else registry.undrain(node_id)
    # node_status to the node, counted; the event ring and the log get it through apply_transitions
    state.apply_transitions(transitions)
    published = await _published(state, node_id)
    changed = bool(transitions) or before != registry.nodes[node_id].drain_requested
    return 200, _node_body(state, node_id, action, changed, published)


async def _disconnect(state: SchedulerState, node_id: str, reason: str) -> tuple[int, dict[str, Any]]:
    entry = state.registry.nodes[node_id]
    outbox = entry.conn
    if not isinstance(outbox, Outbox):
        return _refusal(ErrorCode.NOT_CONNECTED, f"node {node_id!r} is not connected to this instance")
    # the close handshake is bounded: a node that does not answer it is cut off by the timeout
    with contextlib.suppress(TimeoutError, ConnectionError):
        await asyncio.wait_for(
            outbox.ws.close(code=WSCloseCode.GOING_AWAY, message=reason.encode()[:120]), EFFECT_TIMEOUT
        )
    # The endpoint's reader sees the close and runs the node's cleanup (offline, jobs fail over);
    # give it a bounded moment so the answer shows the result. No event exists for that cleanup.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + EFFECT_TIMEOUT
    while entry.conn is outbox and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    return 200, _node_body(state, node_id, "disconnect", True)


async def _forget(state: SchedulerState, node_id: str) -> tuple[int, dict[str, Any]]:
    """Forget one offline record held here; a node still connected is refused (409 NODE_CONNECTED)."""
    registry = state.registry
    since = registry.offline_since(node_id)
    if since is None or not registry.forget(node_id):
        entry = registry.nodes[node_id]
        return _refusal(
            ErrorCode.NODE_CONNECTED,
            f"node {node_id!r} is {entry.status.value} and connected: only an offline, "
            "disconnected node can be forgotten (disconnect it first)",
        )
    offline_for = round(state.clock.monotonic() - since, 3)
    shared = await _forget_in_store(state, [node_id])
    log.info("offline node forgotten", extra={"node_id": node_id, "offline_seconds": offline_for})
    body = h.NodeForgotten(action="forget", node_id=node_id, offline_seconds=offline_for, shared=shared)
    return 200, msgspec.to_builtins(body)


async def _forget_in_store(state: SchedulerState, node_ids: list[str]) -> bool:
    """Multi-instance mode: take forgotten records out of the shared directory too (the other instances
    drop them from their views on the change feed). False when the store could not be written: the
    records stay in the directory as offline ones until this instance's owner entries are cleaned."""
    cluster = state.cluster
    if cluster is None or not node_ids:
        return True
    try:
        await cluster.store.publish([], node_ids, [], {})
    except StoreUnavailable as exc:
        log.warning("forgotten nodes left in the shared directory", extra={"reason": str(exc)})
        return False
    return True


async def _node_route(request: web.Request, action: str, default_reason: str) -> web.Response:
    """A node action here, or, for a node connected to another instance, forwarded to that instance
    (multi-instance mode): the answer is the owner's, with ``instance`` naming it."""
    state = request.app[STATE]
    node_id = request.match_info["node_id"]
    reason = await _reason(request, default_reason)
    entry = state.registry.nodes.get(node_id)
    cluster = state.cluster
    if entry is not None and entry.owner is not None and cluster is not None:
        owner = entry.owner
        try:
            status, body = await cluster.node_action_at(
                owner, node_id, action, reason, _actor(request)["operator"], timeout=FORWARD_TIMEOUT
            )
        except TimeoutError:
            message = (
                f"instance {owner}, which holds node {node_id!r}, did not answer within "
                f"{FORWARD_TIMEOUT:g} s; the action may still take effect there"
            )
            raise RequestError(message, code=ErrorCode.OWNER_TIMEOUT) from None
        except StoreUnavailable:
            raise StoreUnavailable(f"could not reach instance {owner} through the store") from None
        return _answer(status, {**body, "instance": owner})
    return _answer(*await node_action(state, node_id, action, reason))


def _answer(status: int, body: dict[str, Any]) -> web.Response:
    """A node action's (status, body), checked against its type: an error, a forget or another action."""
    if status >= 400:
        return json_response(build(ErrorBody, body), status)
    kind = h.NodeForgotten if body.get("action") == "forget" else h.NodeAction
    return json_response(build(kind, body), status)


@admin_action("drain")
async def drain(request: web.Request) -> web.Response:
    """Drain a node: it takes no new job; its in-flight jobs finish; it hears ``node_status draining``.
    The request survives a reconnect (the node comes back draining) until undrained. A node connected
    to another instance is drained there (the request is forwarded; ``instance`` names it)."""
    return await _node_route(request, "drain", "")


@admin_action("undrain")
async def undrain(request: web.Request) -> web.Response:
    """Undo a drain: the node is schedulable again (``node_status ready``). Forwarded like drain."""
    return await _node_route(request, "undrain", "")


@admin_action("disconnect")
async def disconnect(request: web.Request) -> web.Response:
    """Close the node's WebSocket (1001 going away). It goes offline at once, its in-flight jobs fail
    over; a node client reconnects with its id and registers again (a drain is kept). Forwarded like
    drain."""
    return await _node_route(request, "disconnect", "disconnected by operator")


@admin_action("forget")
async def forget(request: web.Request) -> web.Response:
    """Forget an offline node's record (kept for a reconnect): it leaves the listing, the counts and,
    in multi-instance mode, the shared directory. A connected node is refused with 409
    ``NODE_CONNECTED``. A node held by another instance is forgotten there (forwarded like drain)."""
    return await _node_route(request, "forget", "")


@admin_action("forget_offline")
async def forget_offline(request: web.Request) -> web.Response:
    """Forget every offline record of this instance whose node disconnected at least
    ``older_than_seconds`` ago (query parameter, required). In multi-instance mode each instance holds
    the records of the nodes that were connected to it: call it on each (``GET /api/v1/cluster``);
    ``held_elsewhere`` counts the offline nodes in this instance's view that another instance holds."""
    state = request.app[STATE]
    older_than = parse_query(request.query, h.ForgetOfflineQuery).older_than_seconds
    forgotten = state.registry.forget_offline(older_than)
    shared = await _forget_in_store(state, forgotten)
    elsewhere = sum(1 for e in state.registry if e.owner is not None and e.status is NodeStatus.OFFLINE)
    if forgotten:
        log.info("offline nodes forgotten", extra={"count": len(forgotten), "older_than_seconds": older_than})
    return json_response(
        h.OfflineForgotten(
            action="forget_offline",
            older_than_seconds=older_than,
            forgotten=forgotten,
            count=len(forgotten),
            shared=shared,
            held_elsewhere=elsewhere,
        )
    )


#: what a node id may look like (protocol.node.NodeId); matched whole (``fullmatch``: a ``$`` would
#: also match before a trailing newline, and ``ID%0A`` would pass for ``ID``)
_NODE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


@admin_action("revoke")
async def revoke(request: web.Request) -> web.Response:
    """Revoke a node's token (docs/security.md): its registrations are refused from now on, on every
    instance, and its socket is closed (here at once; on the instance holding it within one cluster
    tick). The node must enroll again and gets a new id. 202 when the shared list could not be
    written yet: this instance enforces it already and writes it when the store answers."""
    state = request.app[STATE]
    node_id = request.match_info["node_id"]
    if not _NODE_ID.fullmatch(node_id):
        raise RequestError("not a node id", code=ErrorCode.INVALID_MESSAGE)
    if not state.auth.nodes_required:
        raise RequestError(
            "node authentication is not configured (auth.node_enrollment_secret): a revocation would "
            "have no effect",
            code=ErrorCode.NODE_AUTH_DISABLED,
        )
    cluster = state.cluster
    changed, shared = await state.auth.revoke(node_id, cluster.store if cluster is not None else None)
    if cluster is None:
        log.warning(
            "node token revoked in memory only: add the id to auth.revoked_node_ids to keep it across "
            "restarts",
            extra={"node_id": node_id},
        )
    entry = state.registry.nodes.get(node_id)
    outbox = entry.conn if entry is not None else None
    disconnected = disconnect_revoked(state.registry, node_id)
    # bounded wait for the endpoint's cleanup, so the answer shows the node offline (as disconnect does)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + EFFECT_TIMEOUT
    while disconnected and entry is not None and entry.conn is outbox:
        if loop.time() >= deadline:
            break
        await asyncio.sleep(0.01)
    body = h.NodeRevoked(
        action="revoke",
        node_id=node_id,
        changed=changed,
        disconnected=disconnected,
        shared=shared,
        scope="instance" if cluster is None else "cluster",
    )
    return json_response(body, 200 if shared else 202)


# --- jobs ------------------------------------------------------------------------------------------


@admin_action("cancel_job")
async def cancel_job(request: web.Request) -> web.Response:
    """Cancel a job: the node gets ``job_cancel``, the session ``error JOB_CANCELLED`` and
    ``missing_result(job_failed)`` for the utterance. Optional body ``{"reason": "..."}``."""
    state = request.app[STATE]
    job_id = request.match_info["job_id"]
    reason = await _reason(request, "cancelled by operator")
    job = state.engine.store.get(job_id)
    if job is None:
        raise RequestError(f"no job {job_id!r}", code=ErrorCode.NOT_FOUND)
    if job.terminal:
        raise RequestError(f"job {job_id!r} already ended ({job.state.value})", code=ErrorCode.JOB_ENDED)
    state.runtime.handle(CancelJob(job_id, reason))
    return json_response(
        h.JobCancelled(action="cancel_job", job_id=job_id, state="cancelled", attempt=job.attempt)
    )


@admin_action("check")
async def check(request: web.Request) -> web.Response:
    """200 when the token is right: lets a dashboard validate the token before offering actions."""
    return json_response(h.AdminCheck(ok=True))


def add_routes(app: web.Application) -> None:
    for op, handler in (
        ("admin_check", check),
        ("admin_drain", drain),
        ("admin_undrain", undrain),
        ("admin_disconnect", disconnect),
        ("admin_revoke_node", revoke),
        ("admin_forget_node", forget),
        ("admin_forget_offline", forget_offline),
        ("admin_cancel_job", cancel_job),
    ):
        routes.register(app, op, handler)
