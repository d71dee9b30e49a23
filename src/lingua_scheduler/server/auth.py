"""Authentication in the shell: credentials of nodes and sessions, revocation, per-tenant limits.

Owns ``AuthService`` (one per instance, ``SchedulerState.auth``), which the endpoints and the
engine ask:

- ``check_node(msg, bound, source)`` before a ``node_register`` reaches the registry, and
  ``token_for(id)`` for the ``node_register_ack``; enrollments (a new node presenting the fleet secret)
  are rate-limited per source address and per secret (``core/enrollment.py``) and refused with
  ``RATE_LIMITED`` (the connection stays open: the node retries after ``details.retry_after_ms``);
- ``credential(request)`` at WebSocket connect and ``session_tenant(...)`` at ``session_init``: the
  tenant of a session comes from its API key, never from the message body;
- ``admit_session`` (concurrent sessions per tenant) and ``admit_jobs`` (job rate per tenant);

and the I/O around them: the revocation list (a local copy refreshed from the state store every
cluster tick, so a registration never waits on Redis), disconnecting revoked nodes, closing a
connection after a refused credential, and the loud start-up warning when anything is left open.
The pure decisions (HMAC tokens, key hashes, buckets) are in ``core/auth.py``.

Must never: log, echo or keep a presented secret (the fields are cleared from the decoded message
before anything else sees it), await on the registration or session path, or let a store outage
undo a revocation already known here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import NoReturn

from aiohttp import WSCloseCode, web
from prometheus_client.core import CounterMetricFamily, Metric

from lingua_scheduler.clock import Clock
from lingua_scheduler.config import AuthConfig, LimitsConfig
from lingua_scheduler.core.auth import NodeAuthenticator, Tenant, TenantKeys, TenantLimits, derive_signing_key
from lingua_scheduler.core.enrollment import EnrollmentLimiter
from lingua_scheduler.core.registry import Registry
from lingua_scheduler.errors import AuthenticationError, ErrorCode, RegistrationError, SessionError
from lingua_scheduler.protocol.common import ErrorMessage
from lingua_scheduler.protocol.node import NodeRegister
from lingua_scheduler.protocol.session import SessionInit
from lingua_scheduler.server.links import local_outbox
from lingua_scheduler.server.metrics import Metrics
from lingua_scheduler.server.ws.outbox import Outbox
from lingua_scheduler.store.base import StateStore, StoreUnavailable

log = logging.getLogger(__name__)

#: close code after a refused credential (RFC 6455 1008 policy violation)
AUTH_CLOSE_CODE = WSCloseCode.POLICY_VIOLATION
#: refusal reasons, a fixed set (they label ``lingua_auth_refusals_total``): missing, invalid, revoked,
#: tenant_mismatch, tenant_limit, rate_limited, enrollment_source_rate, enrollment_secret_rate

#: refusals are logged at most once a second per (plane, reason)
LOG_EVERY = 1.0
#: close tasks in flight (asyncio keeps only weak references to tasks)
_closing: set[asyncio.Task[None]] = set()


class AuthService:
    """This instance's authentication state: the verifier of node tokens, the tenant keys, the local
    copy of the revocation list, the tenant limits and the refusal counters. Synchronous: the endpoints
    call it from their frame handlers without awaiting."""

    def __init__(self, config: AuthConfig, clock: Clock, limits: LimitsConfig | None = None) -> None:
        self.enrollment = EnrollmentLimiter(limits if limits is not None else LimitsConfig(), clock)
        #: revoked node ids known here: configured | read from the shared list | revoked here. Only
        #: grows (ids are never reused, a revocation is never undone); the sync task writes what the
        #: shared list lacks, which also heals a Redis that lost its data
        self.revoked: set[str] = set()
        self._load(config)
        self.limits = TenantLimits(clock)
        #: multi-instance mode (server/cluster/cluster.py): the cluster-wide admission of a session of a
        #: tenant with a session cap -- (tenant, session, cap) -> admitted, or None when the store is unusable
        self.shared_admission: Callable[[str, str, int], Awaitable[bool | None]] | None = None
        self.refusals: dict[tuple[str, str], int] = {}
        #: (plane, reason) -> (monotonic time of its last log line, refusals not logged since)
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}
        self.clock = clock
        self.tokens_issued = 0

    def _load(self, config: AuthConfig) -> None:
        """Take the credentials of ``config``: node token keys, tenant keys, configured revocations."""
        self.config = config
        self.nodes_required = config.nodes_required
        self.sessions_required = config.sessions_required
        self.revoked |= set(config.revoked_node_ids)
        self.node_auth: NodeAuthenticator | None = None
        if self.nodes_required:
            current = config.node_token_secret or config.node_enrollment_secret
            keys = [derive_signing_key(current)] + [
                derive_signing_key(s) for s in config.node_token_previous_secrets if s != current
            ]
            self.node_auth = NodeAuthenticator(config.node_enrollment_secret, keys, self.is_revoked)
        tenants = [
            (
                t.key_sha256,
                Tenant(t.tenant_id, t.max_sessions, t.max_jobs_per_second, t.jobs_burst),
            )
            for t in config.tenants
        ]
        self.tenants = TenantKeys(tenants)
        # several keys of one tenant carry the same limits (checked by the config)
        self._tenant_by_id = {t.tenant_id: t for _, t in tenants}

    def reload(self, config: AuthConfig) -> None:
        """Replace the credentials with a new ``[auth]`` section (SIGHUP, server/reload.py). New
        registrations and sessions are checked against it at once; connections already admitted stay
        (a removed key ends no session). Revocations only grow: an id dropped from
        ``revoked_node_ids`` stays revoked. Session counts and job buckets of tenants are kept."""
        before = dict(self._tenant_by_id)
        self._load(config)
        for tenant_id, tenant in self._tenant_by_id.items():
            if before.get(tenant_id, tenant) != tenant:
                self.limits.reset_bucket(tenant_id)

    # --- nodes --------------------------------------------------------------------------------------

    def is_revoked(self, node_id: str) -> bool:
        return node_id in self.revoked

    def check_node(self, msg: NodeRegister, *, bound: bool, source: str | None = None) -> str:
        """Refuse a ``node_register`` whose credentials do not check out (``AuthenticationError``), or
        an enrollment over its rate (``RegistrationError(RATE_LIMITED)``: per ``source`` address for
        every attempt, per secret for the enrollments the secret admitted). Returns how it was
        admitted, for the registration log: "enrolled", "token", "connection" (``bound``: the
        connection registered before, its id is fixed, no credential is needed again) or "open"
        (node authentication off)."""
        enrollment, token = msg.enrollment_secret, msg.node_token
        msg.enrollment_secret = msg.node_token = None  # nothing downstream keeps or logs them
        if self.node_auth is None:
            return "open"
        if bound:
            return "connection"
        enrolling = msg.node_id is None
        if enrolling and source is not None:
            wait = self.enrollment.admit_source(source)
            if wait is not None:  # before the secret is compared: guessing it is throttled too
                self._refused("node", "enrollment_source_rate")
                cfg = self.enrollment.config
                raise _enrollment_rate(
                    f"more than {cfg.enrollments_per_second_per_source:g} enrollments per second (burst "
                    f"{cfg.enrollment_burst_per_source}) from this address "
                    "(limits.enrollments_per_second_per_source)",
                    wait,
                )
        try:
            how = self.node_auth.check(msg.node_id, enrollment, token).how
        except AuthenticationError as exc:
            self._refused("node", exc.reason, msg.node_id)
            raise
        if enrolling:
            wait = self.enrollment.admit_secret()
            if wait is not None:
                self._refused("node", "enrollment_secret_rate")
                cfg = self.enrollment.config
                raise _enrollment_rate(
                    f"more than {cfg.enrollments_per_second_per_secret:g} enrollments per second (burst "
                    f"{cfg.enrollment_burst_per_secret}) with the fleet secret "
                    "(limits.enrollments_per_second_per_secret)",
                    wait,
                )
        return how

    def token_for(self, node_id: str) -> str | None:
        """The token to send in ``node_register_ack`` (None with node auth off). Re-issued at every
        registration, so a node that registered with a previous key's token moves to the current key."""
        if self.node_auth is None:
            return None
        self.tokens_issued += 1
        return self.node_auth.issue(node_id)

    def merge_revoked(self, shared: Iterable[str]) -> set[str]:
        """Take in the shared list; returns the ids that were not revoked here before."""
        fresh = set(shared) - self.revoked
        self.revoked |= fresh
        return fresh

    async def revoke(self, node_id: str, store: StateStore | None) -> tuple[bool, bool]:
        """Revoke ``node_id`` here at once and in the shared list. Returns (changed, shared): shared is
        False when the store could not be written (this instance enforces it already; the sync task
        writes it when the store answers)."""
        changed = node_id not in self.revoked
        self.revoked.add(node_id)
        if store is None:
            return changed, True
        try:
            changed = await store.revoke_node(node_id) or changed
        except StoreUnavailable:
            return changed, False
        return changed, True

    # --- sessions -----------------------------------------------------------------------------------

    def credential(self, request: web.Request) -> str | None:
        """The API key presented at connect: ``Authorization: Bearer``, ``X-Api-Key``, or ``?api_key=``
        (when ``auth.api_key_query_param``). Checked at ``session_init``, together with
        ``session_init.api_key``."""
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        key = request.headers.get("X-Api-Key", "").strip()
        if key:
            return key
        if self.config.api_key_query_param:
            return request.query.get("api_key", "").strip() or None
        return None

    def session_tenant(self, connect_key: str | None, msg: SessionInit) -> str | None:
        """The tenant of a new session. With tenant keys configured it is the key's tenant: a key is
        required, and a ``tenant_id`` in the body must name that same tenant (a client cannot pick
        another tenant's pools or limits). With none configured, the body's claim is kept (open mode)."""
        init_key = msg.api_key
        msg.api_key = None  # the Session keeps the init message: never the key
        if not self.sessions_required:
            return msg.tenant_id
        keys = [k for k in (connect_key, init_key) if k]
        if not keys:
            self._refused("session", "missing")
            raise AuthenticationError(
                "an API key is required: Authorization: Bearer <key> or X-Api-Key at connect, "
                "?api_key=<key> on the URL, or session_init.api_key",
                reason="missing",
            )
        found = [self.tenants.lookup(k) for k in keys]
        tenants = {t.tenant_id for t in found if t is not None}
        if None in found or len(tenants) != 1:
            self._refused("session", "invalid")
            raise AuthenticationError("invalid API key")
        (tenant_id,) = tenants
        if msg.tenant_id is not None and msg.tenant_id != tenant_id:
            self._refused("session", "tenant_mismatch", tenant_id)
            raise AuthenticationError(
                f"session_init.tenant_id {msg.tenant_id!r} does not match the tenant of the API key",
                reason="tenant_mismatch",
            )
        return tenant_id

    def admission_is_shared(self, tenant_id: str | None) -> bool:
        """Whether a new session of this tenant is admitted by the shared store (``admit_shared``):
        multi-instance mode and a tenant with a session cap."""
        tenant = self._limited(tenant_id)
        return self.shared_admission is not None and tenant is not None and tenant.max_sessions > 0

    async def admit_shared(
        self, tenant_id: str | None, session_id: str, is_live: Callable[[str], bool]
    ) -> None:
        """``admit_session`` against the cap across all instances, checked and counted in one atomic
        step of the shared store: simultaneous openings on several instances cannot pass it. With the
        store unusable it falls back to ``admit_session`` (the others' sessions as last known)."""
        tenant = self._limited(tenant_id)
        if tenant is None or self.shared_admission is None:
            self.admit_session(tenant_id, session_id, is_live)
            return
        admitted = await self.shared_admission(tenant.tenant_id, session_id, tenant.max_sessions)
        if admitted is None:
            self.admit_session(tenant_id, session_id, is_live)
        elif admitted:
            self.limits.count_session(tenant, session_id, is_live)
        else:
            self._refuse_session(tenant, "across the instances")

    def admit_session(self, tenant_id: str | None, session_id: str, is_live: Callable[[str], bool]) -> None:
        """Count a new session against its tenant's cap; ``SessionError(TENANT_LIMIT)`` when full."""
        tenant = self._limited(tenant_id)
        if tenant is None or self.limits.admit_session(tenant, session_id, is_live):
            return
        where = "across the instances" if self.limits.elsewhere.get(tenant.tenant_id) else "on this instance"
        self._refuse_session(tenant, where)

    def _refuse_session(self, tenant: Tenant, where: str) -> NoReturn:
        self._refused("session", "tenant_limit", tenant.tenant_id)
        raise SessionError(
            f"tenant {tenant.tenant_id} already has {tenant.max_sessions} sessions open {where}: "
            "close one or try later",
            code=ErrorCode.TENANT_LIMIT,
        )

    def tenant_sessions(self, tenant_ids: Iterable[str | None]) -> dict[str, int]:
        """Live sessions per tenant with limits (every such tenant, zeros included), from the tenant
        ids of this instance's sessions."""
        counts = dict.fromkeys(self._tenant_by_id, 0)
        for tenant_id in tenant_ids:
            if tenant_id is not None and tenant_id in counts:
                counts[tenant_id] += 1
        return counts

    def share_limits(self, here: dict[str, int], elsewhere: dict[str, int]) -> None:
        """Multi-instance mode, once a tick: the tenants' sessions on the other instances count against
        their caps here, and this instance takes its part of their job rates (``TenantLimits.share``)."""
        self.limits.share(self._tenant_by_id.values(), here, elsewhere)

    def admit_jobs(self, tenant_id: str | None, n: int) -> bool:
        """Take ``n`` jobs from the tenant's bucket; False = over its rate (the caller refuses them)."""
        tenant = self._limited(tenant_id)
        if tenant is None or self.limits.admit_jobs(tenant, n):
            return True
        self._refused("session", "rate_limited", tenant_id)
        return False

    def rate_limited(self, tenant_id: str | None, utterance_index: int, shown_index: int) -> ErrorMessage:
        """The refusal of one utterance over the tenant's rate. ``details.utterance_index`` is the
        internal index (the session translates it to the client's once, on sending); the text names
        ``shown_index``, the number the client gave the utterance."""
        tenant = self._tenant_by_id.get(tenant_id or "")
        rate = tenant.max_jobs_per_second if tenant is not None else 0
        return ErrorMessage(
            code=ErrorCode.TENANT_RATE_LIMITED.value,
            message=f"utterance {shown_index} refused: the tenant is over its rate of {rate:g} jobs/s",
            details={"utterance_index": utterance_index},
        )

    def _limited(self, tenant_id: str | None) -> Tenant | None:
        if not self.sessions_required or tenant_id is None:
            return None
        return self._tenant_by_id.get(tenant_id)

    # --- observability ------------------------------------------------------------------------------

    def _refused(self, plane: str, reason: str, subject: str | None = None) -> None:
        """Count a refusal; log it, at most once a second per (plane, reason) so that a peer hammering
        wrong credentials cannot flood the log (the count of the others is in the next line)."""
        key = (plane, reason)
        self.refusals[key] = self.refusals.get(key, 0) + 1
        now = self.clock.monotonic()
        last, quiet = self._logged.get(key, (float("-inf"), 0))
        if now - last < LOG_EVERY:
            self._logged[key] = (last, quiet + 1)
            return
        self._logged[key] = (now, 0)
        log.warning(
            "auth refused",
            extra={"plane": plane, "reason": reason, "subject": subject, "not_logged_since": quiet},
        )

    def metrics(self) -> Iterable[Metric]:
        refused = CounterMetricFamily(
            "lingua_auth_refusals", "Credentials or tenant limits refused", labels=["plane", "reason"]
        )
        for (plane, reason), n in sorted(self.refusals.items()):
            refused.add_metric([plane, reason], n)
        yield refused
        yield CounterMetricFamily("lingua_node_tokens_issued", "Node tokens issued", value=self.tokens_issued)

    def open_planes(self) -> list[str]:
        """What is left unauthenticated, for the start-up warning."""
        out = []
        if not self.nodes_required:
            out.append("nodes (/ws/node): any node may register with any id")
        if not self.sessions_required:
            out.append("sessions (/ws/session): any client may open sessions and pick its tenant_id")
        return out


def _enrollment_rate(what: str, wait: float) -> RegistrationError:
    return RegistrationError(
        f"enrollment refused: {what}; retry later",
        code=ErrorCode.RATE_LIMITED,
        details={"retry_after_ms": int(wait * 1000) + 1},
    )


# --- connection helpers --------------------------------------------------------------------------------


def close_refused(outbox: Outbox, reason: str) -> None:
    """Close a connection whose credential was refused, after the error frame queued before this call
    has been flushed (bounded). A refused peer does not keep a connection to retry on."""

    async def run() -> None:
        await outbox.close()
        await outbox.close_socket(AUTH_CLOSE_CODE, reason.encode()[:120])

    task = asyncio.get_running_loop().create_task(run())
    _closing.add(task)
    task.add_done_callback(_closing.discard)


def disconnect_revoked(registry: Registry, node_id: str) -> bool:
    """Tell a revoked node connected to this instance why, and close its socket. True if it was here."""
    outbox = local_outbox(registry.nodes.get(node_id))
    if outbox is None:
        return False
    outbox.send(
        ErrorMessage(
            code=ErrorCode.UNAUTHORIZED.value,
            message=f"the node token of {node_id} has been revoked; enroll again",
        )
    )
    close_refused(outbox, "node token revoked")
    log.warning("revoked node disconnected", extra={"node_id": node_id})
    return True


# --- background: revocation sync, start-up warning ---------------------------------------------------


async def revocation_sync(auth: AuthService, store: StateStore, registry: Registry, interval: float) -> None:
    """Shared mode: once per cluster tick, read the shared list, write back what it lacks (revoked here
    while the store was away, configured here, or lost by a Redis restart), and disconnect newly revoked
    nodes connected here. A failed call keeps the local copy: a known revocation is never forgotten
    because Redis is away. The list is small (one id per revoked node), so it is read whole."""
    while True:
        try:
            listed = await store.revoked_nodes()
            for node_id in sorted(auth.revoked - listed):
                await store.revoke_node(node_id)
            for node_id in auth.merge_revoked(listed):
                log.info("node token revoked by another instance", extra={"node_id": node_id})
                disconnect_revoked(registry, node_id)
        except StoreUnavailable as exc:
            log.debug("revocation sync skipped: %s", exc)
        await asyncio.sleep(interval)


def setup(
    app: web.Application,
    auth: AuthService,
    registry: Registry,
    metrics: Metrics,
    store: StateStore | None,
    interval: float,
) -> None:
    """Register the start-up warning and, with a shared ``store``, the revocation sync (every
    ``interval`` seconds) on ``app``."""
    metrics.add_live(auth.metrics)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        for plane in auth.open_planes():
            log.warning(
                "AUTHENTICATION DISABLED for %s%s. Do not expose this instance: configure [auth] "
                "(docs/security.md).",
                plane,
                " (--insecure-dev)" if auth.config.insecure_dev else "",
                extra={"security": "insecure"},
            )
        if store is None:
            yield
            return
        task = asyncio.get_running_loop().create_task(
            revocation_sync(auth, store, registry, interval), name="revocation-sync"
        )
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(lifecycle)
