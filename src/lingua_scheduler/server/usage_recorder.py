"""Usage, quotas and lifecycle webhooks fed from the job engine's real decisions.

Owns ``UsageRecorder``, the runtime's ``JobObserver`` (server/runtime.py): every session and front
door runs on the session machinery, so these hooks see all of them alike.

- ``allowance`` (asked by the runtime with a session's utterances): the tenant's quota as it stands;
  the engine refuses an utterance past it (``QUOTA_EXCEEDED`` with the period and its reset time: it
  gets no job).
- ``audio_admitted`` (the engine's ``AudioAdmitted``: an utterance got past the job rate and the
  quota): its audio is spent from the quota (``quota.warning`` at the warning fraction, once per
  period) and metered as received.
- ``job_ended`` (the engine's ``JobEnded``): the job's outcome is metered (a completed job's source
  audio as translated, its speech as TTS seconds); a failed or timed-out job sends ``job.failed``.
- ``session_opened`` / ``session_ended``: ``session.started`` and ``session.ended`` (with what the
  session used, kept here per live session: bounded by the open sessions).
- **Redis mode**: each count is also queued as a delta of the tenant's hourly hash (``store/keys.py``
  ``usage``) and of its quota periods' hashes, written by one flush task as soon as the loop is free
  (one pipeline for everything counted meanwhile; on an outage the deltas are kept and retried, never
  lost while the instance lives). The HTTP front door awaits ``flushed()`` before it answers, so an
  answered upload is counted cluster-wide even if this instance dies next; the quota use of the other
  instances is read back once a second (``QuotaBook.share``). ``cluster_records`` reads the cluster's
  buckets for ``GET /api/v1/usage``.

Must never: await inside a hook (they are called from the runtime's action ladder), or raise out of
one (``check_quota``'s refusal aside).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from lingua_scheduler.clock import Clock
from lingua_scheduler.core.actions import AudioAdmitted, JobEnded
from lingua_scheduler.core.quota import Allowance, Period, QuotaBook, QuotaWarning, period_bounds
from lingua_scheduler.core.usage import (
    HOUR_MS,
    OTHER,
    UsageCounts,
    UsageMeter,
    UsageRecord,
    hour_of,
)
from lingua_scheduler.errors import ErrorCode
from lingua_scheduler.protocol import integrator as i
from lingua_scheduler.server.runtime import ObservedSession
from lingua_scheduler.server.webhooks import WebhookService, new_event_id
from lingua_scheduler.store.base import StoreUnavailable
from lingua_scheduler.store.redis_store import RedisStore

log = logging.getLogger(__name__)

#: a failed flush is retried after this long, in seconds
RETRY_SECONDS = 0.5
#: how often the other instances' quota use is read back, in seconds
SHARE_SECONDS = 1.0
#: figure names in the shared hashes
RECEIVED, TRANSLATED, TTS = "received", "translated", "tts"
VIAS: dict[str, Literal["session", "stream", "translate"]] = {
    "session": "session",
    "stream": "stream",
    "translate": "translate",
}


@dataclass(slots=True)
class _Live:
    tenant_id: str | None
    src: str
    tgt: str
    opened_at: float
    counts: UsageCounts = field(default_factory=UsageCounts)


class UsageRecorder:
    def __init__(
        self,
        meter: UsageMeter,
        quotas: QuotaBook,
        webhooks: WebhookService,
        clock: Clock,
        store: RedisStore | None = None,
        *,
        retention_hours: int = 32 * 24,
    ) -> None:
        self.meter = meter
        self.quotas = quotas
        self.webhooks = webhooks
        self.clock = clock
        self.store = store
        self.retention_hours = retention_hours
        #: session id -> what it used so far (dropped at its end)
        self._live: dict[str, _Live] = {}
        #: Redis mode: key -> field -> delta not yet written
        self._pending: dict[str, dict[str, float]] = {}
        self._queued = 0
        self._written = 0
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.flush_failures = 0

    # --- the runtime's hooks (JobObserver) -----------------------------------------------------------

    def check_quota(self, tenant_id: str | None) -> None:
        decision = self.quotas.check(tenant_id)
        if not decision.allowed and tenant_id is not None:
            raise decision.error(tenant_id)

    def allowance(self, tenant_id: str | None) -> Allowance | None:
        return self.quotas.allowance(tenant_id)

    def audio_admitted(self, admitted: AudioAdmitted) -> None:
        tenant, src, tgt, seconds = admitted.tenant_id, admitted.src_lang, admitted.tgt_lang, admitted.seconds
        for warning in self.quotas.consume(tenant, seconds):
            self._warn(warning)
        self.meter.record_audio_received(tenant, src, tgt, seconds)
        live = self._live.get(admitted.session_id)
        if live is None:  # a session continued from another instance: opened here unannounced
            live = self._live[admitted.session_id] = _Live(tenant, src, tgt, self.clock.monotonic())
        live.counts.audio_seconds_received += seconds
        self._share(tenant, src, tgt, RECEIVED, seconds)
        if tenant is not None and tenant in self.quotas.limits and self.store is not None:
            now = self.clock.wall_ms()
            for period in Period:
                start, _ = period_bounds(period, now)
                self._add(
                    self.store.keys.quota_use(tenant, period.value, start), self.store.instance_id, seconds
                )
        return None

    def job_ended(self, ended: JobEnded) -> None:
        tenant, src, tgt, kind = ended.tenant_id, ended.src_lang, ended.tgt_lang, ended.outcome
        audio, speech = ended.audio_seconds, ended.tts_seconds
        self.meter.record_job(tenant, src, tgt, kind, audio_seconds=audio, tts_seconds=speech)
        live = self._live.get(ended.session_id)
        if live is not None:
            c = live.counts
            c.jobs[kind] = c.jobs.get(kind, 0) + 1
            c.audio_seconds_translated += audio
            c.tts_seconds += speech
        self._share(tenant, src, tgt, f"jobs.{kind}", 1)
        if audio:
            self._share(tenant, src, tgt, TRANSLATED, audio)
        if speech:
            self._share(tenant, src, tgt, TTS, speech)
        if kind in ("failed", "timed_out") and tenant is not None:
            self.webhooks.emit(
                i.JobFailed(
                    id=new_event_id(),
                    created=_created(),
                    tenant_id=tenant,
                    data=i.JobFailedData(
                        job_id=ended.job_id,
                        session_id=ended.session_id,
                        utterance_index=ended.utterance_index,
                        code=ended.code or ErrorCode.JOB_TIMEOUT.value,
                        message=ended.message or "the job failed",
                        metadata=ended.metadata,
                    ),
                )
            )

    def session_opened(self, session: ObservedSession) -> None:
        live = self._live.get(session.session_id)
        if live is None:
            live = self._live[session.session_id] = _Live(
                session.tenant_id, session.src_lang, session.targets[0], session.opened_at
            )
        if live.tenant_id is None:
            return
        via = VIAS.get(session.via, "session")
        self.webhooks.emit(
            i.SessionStarted(
                id=new_event_id(),
                created=_created(),
                tenant_id=live.tenant_id,
                data=i.SessionStartedData(
                    session_id=session.session_id,
                    src_lang=session.src_lang,
                    tgt_lang=session.targets[0],
                    via=via,
                    metadata=session.metadata,
                ),
            )
        )

    def session_ended(self, session: ObservedSession, reason: str) -> None:
        live = self._live.pop(session.session_id, None)
        if live is None or live.tenant_id is None or session.relay_to is not None:
            return  # a session handed over to another instance ends there
        live.opened_at = session.opened_at  # its duration runs from its opening here, whatever came first
        self.webhooks.emit(
            i.SessionEnded(
                id=new_event_id(),
                created=_created(),
                tenant_id=live.tenant_id,
                data=i.SessionEndedData(
                    session_id=session.session_id,
                    reason=reason,
                    usage=self.usage_of(session.session_id, live),
                    metadata=session.metadata,
                ),
            )
        )

    def usage_of(self, session_id: str, live: _Live | None = None) -> i.SessionUsage:
        """What a live session used so far (zeros for one not known here)."""
        live = live or self._live.get(session_id)
        c = live.counts if live is not None else UsageCounts()
        opened = live.opened_at if live is not None else self.clock.monotonic()
        return i.SessionUsage(
            audio_seconds_received=round(c.audio_seconds_received, 3),
            audio_seconds_translated=round(c.audio_seconds_translated, 3),
            tts_seconds=round(c.tts_seconds, 3),
            jobs=i.JobsByOutcome(**c.jobs),
            duration_seconds=round(max(0.0, self.clock.monotonic() - opened), 3),
        )

    def _warn(self, w: QuotaWarning) -> None:
        self.webhooks.emit(
            i.QuotaWarningEvent(
                id=new_event_id(),
                created=_created(),
                tenant_id=w.tenant_id,
                data=i.QuotaWarningData(
                    period=w.period.value,
                    used_seconds=round(w.used_seconds, 3),
                    limit_seconds=w.limit_seconds,
                    reset_at=_iso(w.reset_at_ms),
                ),
            )
        )

    # --- Redis mode: the cluster's figures ------------------------------------------------------------

    def _share(self, tenant: str | None, src: str, tgt: str, figure: str, delta: float) -> None:
        store = self.store
        if store is None or tenant is None or tenant not in self.meter.tenants or delta <= 0:
            return
        pair = self.meter.pair_of(tenant, src, tgt)
        key = store.keys.usage(tenant, hour_of(self.clock.wall_ms()))
        self._add(key, f"{pair[0]}|{pair[1]}|{figure}", delta)

    def _add(self, key: str, name: str, delta: float) -> None:
        fields = self._pending.setdefault(key, {})
        fields[name] = fields.get(name, 0.0) + delta
        self._queued += 1
        self._wake.set()

    async def flushed(self, timeout: float = 5.0) -> bool:
        """Wait until what was counted so far is written to the shared store (True; at once when
        embedded), or ``timeout`` passed (False: the counts are kept and written later)."""
        if self.store is None:
            return True
        target = self._queued
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self._written < target:
                    self._progress.clear()
                    await self._progress.wait()
        return self._written >= target

    async def _flusher(self) -> None:
        assert self.store is not None
        ttl = self.retention_hours * 3600 + 3600
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._pending:
                continue
            batch, self._pending = self._pending, {}
            upto = self._queued
            try:
                await self.store.usage_add(batch, ttl)
            except StoreUnavailable as exc:
                self.flush_failures += 1
                log.warning("usage not written to the shared store yet", extra={"reason": str(exc)})
                for key, fields in batch.items():  # kept, ahead of what came meanwhile
                    for name, delta in fields.items():
                        mine = self._pending.setdefault(key, {})
                        mine[name] = mine.get(name, 0.0) + delta
                await asyncio.sleep(RETRY_SECONDS)
                self._wake.set()
                continue
            self._written = upto
            self._progress.set()

    async def _sharer(self) -> None:
        """Once a second: the other instances' use of the current quota periods."""
        store = self.store
        assert store is not None
        while True:
            await asyncio.sleep(SHARE_SECONDS)
            tenants = sorted(self.quotas.limits)
            if not tenants:
                continue
            now = self.clock.wall_ms()
            starts = [(t, p, period_bounds(p, now)[0]) for t in tenants for p in Period]
            keys = [store.keys.quota_use(t, p.value, s) for t, p, s in starts]
            try:
                rows = await store.usage_read(keys)
            except StoreUnavailable:
                continue
            for (tenant, period, start), row in zip(starts, rows, strict=True):
                others = sum(v for k, v in row.items() if k != store.instance_id)
                self.quotas.share(tenant, period, start, others)

    async def cluster_records(self, tenant_id: str, from_ms: int, to_ms: int) -> list[UsageRecord]:
        """The cluster's hourly buckets of a tenant in [from, to) (within the retention)."""
        store = self.store
        assert store is not None
        now = self.clock.wall_ms()
        start = max(hour_of(from_ms), hour_of(now) - self.retention_hours * HOUR_MS)
        hours = list(range(start, min(to_ms, now + HOUR_MS), HOUR_MS))
        rows = await store.usage_read([store.keys.usage(tenant_id, h) for h in hours])
        out = []
        for hour, row in zip(hours, rows, strict=True):
            pairs: dict[tuple[str, str], UsageCounts] = {}
            for name, value in row.items():
                src, _, rest = name.partition("|")
                tgt, _, figure = rest.partition("|")
                c = pairs.setdefault((src or OTHER, tgt or OTHER), UsageCounts())
                if figure == RECEIVED:
                    c.audio_seconds_received += value
                elif figure == TRANSLATED:
                    c.audio_seconds_translated += value
                elif figure == TTS:
                    c.tts_seconds += value
                elif figure.startswith("jobs."):
                    kind = figure[5:]
                    c.jobs[kind] = c.jobs.get(kind, 0) + round(value)
            out += [UsageRecord(tenant_id, s, t, hour, c) for (s, t), c in sorted(pairs.items())]
        return out

    async def run(self) -> AsyncIterator[None]:
        """The flush and share tasks (Redis mode), as a cleanup context; the last counts are written
        at a graceful stop."""
        if self.store is not None:
            self._tasks = [
                asyncio.create_task(self._flusher(), name="usage-flush"),
                asyncio.create_task(self._sharer(), name="usage-share"),
            ]
        yield
        if self.store is not None:
            await self.flushed(2.0)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _created() -> int:
    return int(time.time())
