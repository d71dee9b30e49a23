"""Delivery of the tenants' webhook events: signed POSTs, in order per tenant, retried with backoff for
a bounded time, durable across an instance's death in Redis mode.

Owns ``WebhookService`` (one per instance). ``emit(event)`` is synchronous and never blocks the event
loop: it encodes the event, and queues it for the tenant's endpoint (``[[auth.tenants]] webhook_url``)
or drops it, counted, when ``webhooks.max_queued`` events wait already. A tenant without an endpoint
gets nothing (counted as ``unrouted``).

- **Delivery**: one worker per tenant posts that tenant's events one at a time, in the order they were
  queued, with ``Content-Type: application/json``, ``Lingua-Event-Id``, ``Lingua-Event-Type`` and
  ``Lingua-Signature: t=<unix>,v1=<hex>`` (``core/webhook_signing.py``). A 2xx answer delivers it;
  anything else (an error status, a refused connection, ``webhooks.timeout_seconds`` passing) is
  retried after ``backoff_initial_seconds`` doubled per attempt up to ``backoff_max_seconds``, each
  wait drawn in [half, all] of that (jitter: many failing events do not retry in step). An event that
  could not be delivered within ``give_up_after_seconds`` of being queued is given up (counted,
  logged). Delivery is at least once: a receiver deduplicates by ``Lingua-Event-Id``.
- **Embedded mode**: the queue is in memory (an instance's death loses what it held).
- **Redis mode**: an event is written to this instance's stream (``store/keys.py`` ``webhooks``)
  before it is delivered, read back through the stream's group, and acknowledged and deleted once
  delivered or given up. Every second the instance looks for streams of instances whose presence has
  expired; it takes the claim of one (a lock, so that one instance delivers it and the order per
  tenant holds), claims the entries the dead one had read (XAUTOCLAIM) and reads the ones it had not,
  delivers them in order, and drops the stream once it is empty. An instance restarted with the same
  id reads its own unacknowledged entries first.

Must never: block the event loop on a delivery, log a secret or an event body, or let a receiver that
never answers hold more than ``max_queued`` events here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp
import msgspec
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from lingua_scheduler import __version__
from lingua_scheduler.clock import Clock
from lingua_scheduler.config import Config, WebhooksConfig
from lingua_scheduler.core import webhook_signing
from lingua_scheduler.protocol.integrator import WebhookEvent
from lingua_scheduler.store.base import StoreUnavailable
from lingua_scheduler.store.redis_store import RedisStore

log = logging.getLogger(__name__)
_encode = msgspec.json.Encoder().encode
#: how often the stream reader looks for new entries and for dead instances' streams, in seconds
POLL_SECONDS = 0.25
CLAIM_EVERY_SECONDS = 1.0
READ_BATCH = 100


def new_event_id() -> str:
    return "evt-" + secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class Endpoint:
    url: str
    secret: str


@dataclass(slots=True)
class Pending:
    tenant_id: str
    event_id: str
    event_type: str
    body: bytes
    queued_ms: int
    #: Redis mode: the stream (its instance id) and entry that hold the event
    owner: str | None = None
    entry_id: str | None = None


def endpoints_of(config: Config) -> dict[str, Endpoint]:
    return {
        t.tenant_id: Endpoint(t.webhook_url, t.webhook_secret) for t in config.auth.tenants if t.webhook_url
    }


class WebhookService:
    def __init__(self, config: Config, clock: Clock, store: RedisStore | None = None) -> None:
        self.config: WebhooksConfig = config.webhooks
        self.clock = clock
        self.store = store
        self.endpoints = endpoints_of(config)
        self._queues: dict[str, deque[Pending]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        #: Redis mode: events encoded and counted, waiting for their XADD (in emit order)
        self._outgoing: deque[Pending] = deque()
        self._written = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._http: aiohttp.ClientSession | None = None
        #: entry ids of other instances' streams being delivered here (not read twice)
        self._claimed: set[tuple[str, str]] = set()
        self.queued = 0
        self.delivered: dict[str, int] = {}
        self.given_up: dict[str, int] = {}
        self.failed_attempts: dict[str, int] = {}
        self.dropped = 0
        self.unrouted = 0
        self.taken_over = 0

    @property
    def durable(self) -> bool:
        return self.store is not None

    def reload(self, config: Config) -> None:
        """New endpoints and secrets apply to the next attempt; a removed endpoint's queue gives up."""
        self.config = config.webhooks
        self.endpoints = endpoints_of(config)

    # --- queueing ---------------------------------------------------------------------------------

    def emit(self, event: WebhookEvent) -> bool:
        """Queue ``event`` for its tenant's endpoint; False when it has none or the queue is full."""
        if event.tenant_id not in self.endpoints:
            self.unrouted += 1
            return False
        if self.queued >= self.config.max_queued:
            self.dropped += 1
            log.warning(
                "webhook event dropped: queue full",
                extra={"tenant_id": event.tenant_id, "event_type": type(event).__struct_config__.tag},
            )
            return False
        tag = type(event).__struct_config__.tag
        pending = Pending(event.tenant_id, event.id, str(tag), _encode(event), self.clock.wall_ms())
        self.queued += 1
        if self.store is None:
            self._enqueue(pending)
        else:
            self._outgoing.append(pending)
            self._written.set()
        return True

    def _enqueue(self, pending: Pending) -> None:
        self._queues.setdefault(pending.tenant_id, deque()).append(pending)
        wake = self._wake.setdefault(pending.tenant_id, asyncio.Event())
        wake.set()
        worker = self._workers.get(pending.tenant_id)
        if worker is None or worker.done():
            self._workers[pending.tenant_id] = asyncio.get_running_loop().create_task(
                self._worker(pending.tenant_id), name=f"webhooks-{pending.tenant_id}"
            )

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(headers={"User-Agent": f"lingua-scheduler/{__version__} webhooks"})
        # Redis mode with at least one tenant's endpoint: the durable stream. Without endpoints no event
        # is ever queued, and polling the streams would cost every instance Redis commands for nothing.
        if self.store is not None and self.endpoints:
            loop = asyncio.get_running_loop()
            self._tasks = [
                loop.create_task(self._writer(), name="webhooks-writer"),
                loop.create_task(self._reader(), name="webhooks-reader"),
            ]

    async def stop(self) -> None:
        tasks = [*self._tasks, *self._workers.values()]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._http is not None:
            await self._http.close()

    # --- Redis mode: the stream -------------------------------------------------------------------

    async def _writer(self) -> None:
        assert self.store is not None
        joined = False
        while True:
            await self._written.wait()
            self._written.clear()
            while self._outgoing:
                p = self._outgoing[0]
                try:
                    if not joined:
                        await self.store.webhook_join()
                        joined = True
                    await self.store.webhook_add(
                        {
                            "tenant": p.tenant_id,
                            "event": p.event_id,
                            "type": p.event_type,
                            "queued_ms": str(p.queued_ms),
                            "body": p.body,
                        }
                    )
                except StoreUnavailable as exc:
                    log.warning("webhook events wait for the store: %s", exc)
                    await asyncio.sleep(0.5)
                    continue
                self._outgoing.popleft()
                self.queued -= 1  # counted again when the reader takes it from the stream

    def _take(self, owner: str, entries: list[tuple[str, dict[bytes, bytes]]]) -> None:
        for entry_id, fields in entries:
            if (owner, entry_id) in self._claimed:
                continue
            try:
                pending = Pending(
                    fields[b"tenant"].decode(),
                    fields[b"event"].decode(),
                    fields[b"type"].decode(),
                    fields[b"body"],
                    int(fields[b"queued_ms"]),
                    owner,
                    entry_id,
                )
            except (KeyError, ValueError, UnicodeDecodeError):
                log.warning("malformed webhook entry skipped", extra={"owner": owner, "entry_id": entry_id})
                continue
            self._claimed.add((owner, entry_id))
            self.queued += 1
            if owner != (self.store.instance_id if self.store else None):
                self.taken_over += 1
            self._enqueue(pending)

    async def _reader(self) -> None:
        store = self.store
        assert store is not None
        me = store.instance_id
        own_pending_read = False
        last_claim = 0.0
        while True:
            try:
                room = self.config.max_queued - self.queued
                if not own_pending_read:
                    await store.webhook_join()
                    self._take(me, await store.webhook_read(me, READ_BATCH, pending=True))
                    own_pending_read = True
                if room > 0:
                    self._take(me, await store.webhook_read(me, min(room, READ_BATCH)))
                now = self.clock.monotonic()
                if now - last_claim >= CLAIM_EVERY_SECONDS and room > 0:
                    last_claim = now
                    await self._claim_orphans(store)
            except StoreUnavailable as exc:
                log.debug("webhook stream read skipped: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._written.wait(), POLL_SECONDS)

    async def _claim_orphans(self, store: RedisStore) -> None:
        lock_ms = int(max(10.0, self.config.claim_idle_seconds * 4) * 1000)
        for owner in await store.webhook_orphans():
            if not await store.webhook_lock(owner, lock_ms):
                continue
            claimed = await store.webhook_claim_entries(
                owner, int(self.config.claim_idle_seconds * 1000), READ_BATCH
            )
            self._take(owner, claimed)
            fresh = await store.webhook_read(owner, READ_BATCH)
            self._take(owner, fresh)
            idle = not claimed and not fresh and not any(o == owner for o, _ in self._claimed)
            if idle and await store.webhook_retire(owner):
                log.info("webhook stream of a dead instance delivered and dropped", extra={"owner": owner})

    # --- delivery ---------------------------------------------------------------------------------

    async def _worker(self, tenant_id: str) -> None:
        queue = self._queues[tenant_id]
        wake = self._wake[tenant_id]
        while True:
            if not queue:
                wake.clear()
                await wake.wait()
                continue
            pending = queue[0]
            await self._deliver(pending)
            queue.popleft()
            self.queued -= 1
            await self._done(pending)

    async def _deliver(self, p: Pending) -> None:
        attempt = 0
        while True:
            endpoint = self.endpoints.get(p.tenant_id)
            if endpoint is None:
                self._give_up(p, "the tenant no longer has a webhook_url")
                return
            attempt += 1
            status = await self._post(endpoint, p)
            if status is not None and 200 <= status < 300:
                self.delivered[p.tenant_id] = self.delivered.get(p.tenant_id, 0) + 1
                return
            self.failed_attempts[p.tenant_id] = self.failed_attempts.get(p.tenant_id, 0) + 1
            cfg = self.config
            delay = min(cfg.backoff_max_seconds, cfg.backoff_initial_seconds * 2 ** (attempt - 1))
            delay *= random.uniform(0.5, 1.0)
            waited = (self.clock.wall_ms() - p.queued_ms) / 1000
            if waited + delay > cfg.give_up_after_seconds:
                self._give_up(p, f"not delivered within {cfg.give_up_after_seconds:g} s ({attempt} attempts)")
                return
            log.info(
                "webhook delivery failed, retrying",
                extra={
                    "tenant_id": p.tenant_id,
                    "event_id": p.event_id,
                    "status": status,
                    "attempt": attempt,
                },
            )
            await asyncio.sleep(delay)

    def _give_up(self, p: Pending, why: str) -> None:
        self.given_up[p.tenant_id] = self.given_up.get(p.tenant_id, 0) + 1
        log.warning(
            "webhook event given up: %s", why, extra={"tenant_id": p.tenant_id, "event_id": p.event_id}
        )

    async def _post(self, endpoint: Endpoint, p: Pending) -> int | None:
        assert self._http is not None
        timestamp = self.clock.wall_ms() // 1000
        headers = {
            "Content-Type": "application/json",
            "Lingua-Event-Id": p.event_id,
            "Lingua-Event-Type": p.event_type,
            webhook_signing.HEADER: webhook_signing.sign(endpoint.secret, timestamp, p.body),
        }
        try:
            async with self._http.post(
                endpoint.url,
                data=p.body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.config.timeout_seconds),
                allow_redirects=False,
            ) as r:
                await r.read()
                return r.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.debug("webhook post failed: %s", type(exc).__name__)
            return None

    async def _done(self, p: Pending) -> None:
        if p.owner is None or p.entry_id is None or self.store is None:
            return
        for _ in range(20):  # the entry would be delivered again (at least once): try a while
            try:
                await self.store.webhook_done(p.owner, p.entry_id)
                break
            except StoreUnavailable:
                await asyncio.sleep(0.5)
        self._claimed.discard((p.owner, p.entry_id))

    # --- metrics ----------------------------------------------------------------------------------

    def metrics(self) -> Iterable[Metric]:
        events = CounterMetricFamily(
            "lingua_webhook_events",
            "Webhook events by result (delivered, given_up)",
            labels=["tenant", "result"],
        )
        for tenant in sorted(self.endpoints):
            events.add_metric([tenant, "delivered"], self.delivered.get(tenant, 0))
            events.add_metric([tenant, "given_up"], self.given_up.get(tenant, 0))
        yield events
        failed = CounterMetricFamily(
            "lingua_webhook_failed_attempts",
            "Webhook delivery attempts that failed (retried)",
            labels=["tenant"],
        )
        for tenant in sorted(self.endpoints):
            failed.add_metric([tenant], self.failed_attempts.get(tenant, 0))
        yield failed
        yield CounterMetricFamily(
            "lingua_webhook_dropped",
            "Webhook events dropped: webhooks.max_queued were waiting",
            value=self.dropped,
        )
        yield CounterMetricFamily(
            "lingua_webhook_unrouted", "Webhook events of tenants without a webhook_url", value=self.unrouted
        )
        yield CounterMetricFamily(
            "lingua_webhook_taken_over",
            "Webhook events of dead instances delivered here",
            value=self.taken_over,
        )
        yield GaugeMetricFamily(
            "lingua_webhook_queued", "Webhook events waiting for delivery here", value=self.queued
        )
