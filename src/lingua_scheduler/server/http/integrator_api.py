"""The integrator API's shell: the usage meter, the quota book and the webhook service of an instance,
the routes that do not run jobs (``GET /api/v1/usage``, ``POST /api/v1/admin/webhooks/test``), and
their metrics.

Owns the app keys ``USAGE``, ``QUOTAS`` and ``WEBHOOKS`` (the job engine reaches the meter, the book
and ``emit`` through them), the credential check of the usage route (the admin token sees every
tenant; a tenant's API key sees its own and is refused another's with ``FORBIDDEN``), and the start
and stop of the webhook delivery.

Must never: echo a presented credential, or answer one tenant's usage to another tenant's key.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from aiohttp import web

from lingua_scheduler.clock import Clock
from lingua_scheduler.config import Config
from lingua_scheduler.core.quota import QuotaBook, QuotaLimits
from lingua_scheduler.core.usage import HOUR_MS, UsageCounts, UsageMeter, UsageRecord, report
from lingua_scheduler.errors import ErrorCode, RequestError
from lingua_scheduler.protocol import integrator as i
from lingua_scheduler.server.http import routes
from lingua_scheduler.server.http.admin import admin_action
from lingua_scheduler.server.http.http_io import json_response, parse_query
from lingua_scheduler.server.state import STATE
from lingua_scheduler.server.usage_metrics import UsageMetrics
from lingua_scheduler.server.usage_recorder import UsageRecorder
from lingua_scheduler.server.webhooks import WebhookService, new_event_id
from lingua_scheduler.store.redis_store import RedisStore

USAGE = web.AppKey("usage", UsageMeter)
RECORDER = web.AppKey("usage_recorder", UsageRecorder)
QUOTAS = web.AppKey("quotas", QuotaBook)
WEBHOOKS = web.AppKey("webhooks", WebhookService)
#: the range of a usage query when the request names none
DEFAULT_SPAN_MS = 24 * HOUR_MS


def tenant_ids(config: Config) -> list[str]:
    return sorted({t.tenant_id for t in config.auth.tenants})


def quota_limits(config: Config) -> dict[str, QuotaLimits]:
    return {
        t.tenant_id: QuotaLimits(t.daily_audio_minutes * 60, t.monthly_audio_minutes * 60)
        for t in config.auth.tenants
        if t.daily_audio_minutes or t.monthly_audio_minutes
    }


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_instant(value: str, name: str) -> int:
    """ISO 8601 (a zone-less value is UTC) or unix seconds, as ms since the epoch."""
    v = value.strip()
    try:
        if v.isdigit():
            return int(v) * 1000
        t = datetime.fromisoformat(v)
    except (ValueError, OverflowError):
        raise RequestError(
            f"query parameter {name!r} must be ISO 8601 (2025-01-31T00:00:00Z) or unix seconds, "
            f"got {value[:40]!r}"
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return int(t.timestamp() * 1000)


def _bearer(request: web.Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


def _figures(c: UsageCounts) -> dict[str, object]:
    return {
        "audio_seconds_received": round(c.audio_seconds_received, 3),
        "audio_seconds_translated": round(c.audio_seconds_translated, 3),
        "tts_seconds": round(c.tts_seconds, 3),
        "jobs": i.JobsByOutcome(**c.jobs),
    }


def _bucket(r: UsageRecord) -> i.UsageBucket:
    return i.UsageBucket(hour=iso(r.hour_ms), src_lang=r.src_lang, tgt_lang=r.tgt_lang, **_figures(r.counts))  # type: ignore[arg-type]


async def usage(request: web.Request) -> web.Response:
    """``GET /api/v1/usage``: who may see which tenant, then the meter's buckets."""
    state = request.app[STATE]
    config = state.config
    given = _bearer(request)
    admin_token = config.admin.token
    if not admin_token and not config.auth.tenants:
        raise RequestError(
            "usage needs a credential: no admin.token and no [[auth.tenants]] keys are configured",
            code=ErrorCode.ADMIN_DISABLED,
        )
    is_admin = bool(admin_token and given and hmac.compare_digest(given.encode(), admin_token.encode()))
    own = None if is_admin or given is None else state.auth.tenants.lookup(given)
    if not is_admin and own is None:
        raise RequestError(
            "missing or invalid credential (Authorization: Bearer <tenant API key or admin token>)",
            code=ErrorCode.UNAUTHORIZED,
            headers={"WWW-Authenticate": 'Bearer realm="lingua-scheduler"'},
        )
    q = parse_query(request.query, i.UsageQuery)
    tenant = q.tenant if isinstance(q.tenant, str) else None
    if own is not None:
        if tenant is not None and tenant != own.tenant_id:
            raise RequestError("a tenant key sees only its own tenant's usage", code=ErrorCode.FORBIDDEN)
        tenant = own.tenant_id
    if tenant is None:
        raise RequestError("query parameter 'tenant' is required with the admin token")
    if tenant not in tenant_ids(config):
        raise RequestError(f"no tenant {tenant[:64]!r} is configured", code=ErrorCode.NOT_FOUND)
    meter = request.app[USAGE]
    now = meter.clock.wall_ms()
    to_ms = parse_instant(q.to, "to") if isinstance(q.to, str) else now
    from_ms = parse_instant(q.from_, "from") if isinstance(q.from_, str) else to_ms - DEFAULT_SPAN_MS
    if from_ms >= to_ms:
        raise RequestError("query parameter 'from' must be before 'to'")
    recorder = request.app[RECORDER]
    if recorder.store is not None:  # Redis mode: every instance's counts, as they were written
        rep = report(await recorder.cluster_records(tenant, from_ms, to_ms), tenant, from_ms, to_ms)
    else:
        rep = meter.query(tenant, from_ms, to_ms)
    body = i.UsageReport(
        tenant_id=tenant,
        from_=iso(from_ms - from_ms % HOUR_MS),
        to=iso(to_ms),
        total=i.UsageFigures(**_figures(rep.total)),  # type: ignore[arg-type]
        buckets=[_bucket(b) for b in rep.buckets],
        instance_only=False,
    )
    return json_response(body)


@admin_action("webhook_test")
async def webhook_test(request: web.Request) -> web.Response:
    """``POST /api/v1/admin/webhooks/test?tenant=``: queue a ``test.ping`` to the tenant's endpoint."""
    q = parse_query(request.query, i.WebhookTestQuery)
    service = request.app[WEBHOOKS]
    endpoint = service.endpoints.get(q.tenant)
    if endpoint is None:
        raise RequestError(
            f"tenant {q.tenant[:64]!r} has no webhook_url configured", code=ErrorCode.NOT_FOUND
        )
    event = i.PingEvent(
        id=new_event_id(),
        created=int(time.time()),
        tenant_id=q.tenant,
        data=i.PingData(message="a test event sent by an operator"),
    )
    if not service.emit(event):
        raise RequestError(
            "the webhook queue is full (webhooks.max_queued): the ping was dropped",
            code=ErrorCode.TOO_MANY_CLIENTS,
        )
    return json_response(
        i.WebhookTestQueued(
            tenant_id=q.tenant, event_id=event.id, webhook_url=endpoint.url, durable=service.durable
        ),
        status=202,
    )


def setup(app: web.Application, config: Config, clock: Clock, store: RedisStore | None) -> None:
    """The meter, the quota book and the webhook service of this instance, its routes and metrics."""
    ic = config.integrator
    meter = UsageMeter(
        tenant_ids(config),
        clock,
        retention_hours=ic.usage_retention_hours,
        max_pairs=ic.usage_max_pairs_per_tenant,
    )
    app[USAGE] = meter
    app[QUOTAS] = QuotaBook(clock, quota_limits(config), warn_fraction=ic.quota_warn_fraction)
    service = WebhookService(config, clock, store)
    app[WEBHOOKS] = service
    recorder = UsageRecorder(
        meter, app[QUOTAS], service, clock, store, retention_hours=ic.usage_retention_hours
    )
    app[RECORDER] = recorder
    app[STATE].runtime.observer = recorder  # the engine's decisions feed usage, quotas, webhooks

    async def recording(app: web.Application) -> AsyncIterator[None]:
        async for _ in recorder.run():
            yield

    app.cleanup_ctx.append(recording)
    metrics = app[STATE].metrics
    metrics.add_live(UsageMetrics(meter).collect)
    metrics.add_live(service.metrics)
    routes.register(app, "usage", usage)
    routes.register(app, "admin_webhook_test", webhook_test)


def reloaded(app: web.Application, config: Config) -> None:
    """After a SIGHUP reload of ``[auth]``: metered tenants, quotas and webhook endpoints follow it."""
    app[USAGE].set_tenants(tenant_ids(config))
    app[QUOTAS].set_limits(quota_limits(config))
    app[WEBHOOKS].reload(config)


async def delivery(app: web.Application) -> AsyncIterator[None]:
    """The webhook delivery's start and stop (a cleanup context, after the cluster's: in Redis mode the
    instance's presence is written before its stream is read, so no survivor takes it for dead)."""
    service = app[WEBHOOKS]
    await service.start()
    yield
    await service.stop()
