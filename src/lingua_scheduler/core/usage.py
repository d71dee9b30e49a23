"""Usage metering: audio minutes and jobs per tenant and language pair, in hourly UTC buckets.

Owns ``UsageMeter`` (one per instance), what it counts and how it is read:

- **What**: per (tenant, source language, target language, UTC hour) the seconds of audio received
  for translation, the seconds of audio translated (jobs that produced a result), the seconds of
  synthesized speech produced, and the jobs by outcome (completed, failed, timed_out, cancelled).
- **Who calls it** (the job engine, at these points; each call is O(1) and never raises):
  ``record_audio_received`` when an utterance's audio is accepted (a session utterance, a translate
  upload's utterance, a stream utterance); ``record_job`` when a job ends, with its outcome and, for a
  completed job, the seconds of source audio it translated and the seconds of TTS audio it returned.
- **Bounds**: only configured tenants are metered (a call for another tenant, or none, is counted in
  ``unmetered`` and dropped), so the label set of the metrics is the configured tenants; at most
  ``max_pairs`` language pairs per tenant are kept apart, the others are summed under
  ``other->other``; buckets older than ``retention_hours`` are dropped. Memory is bounded by tenants x
  (max_pairs + 1) x retention_hours buckets.
- **Reading**: ``query(tenant, from, to)`` gives the buckets of one tenant whose hour starts in
  [from, to) with their sum; ``records()`` exports the buckets for sharing between instances, and
  ``merge`` sums the records of several instances (Redis mode: each instance meters what it served,
  a reader adds them up); ``totals`` are running counters per tenant for Prometheus (never pruned).

Must never: read the time itself (the ``Clock`` is injected), do I/O, or grow without bound.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from lingua_scheduler.clock import Clock
from lingua_scheduler.core.audio import audio_duration_ms
from lingua_scheduler.core.languages import normalize

Outcome = Literal["completed", "failed", "timed_out", "cancelled"]
OUTCOMES: tuple[Outcome, ...] = ("completed", "failed", "timed_out", "cancelled")
HOUR_MS = 3_600_000
#: the pair a tenant's pairs beyond ``max_pairs`` are summed under
OTHER = "other"
#: longest language code metered as itself (longer ones are ``other``)
_MAX_LANG = 32
#: the sample rate assumed for a node's pcm16 speech (the nodes synthesize at 16 kHz)
TTS_PCM_RATE = 16000


def tts_seconds(tts_audio: str | None, tts_format: str | None) -> float:
    """Seconds of speech in a node's result (base64 pcm16 at ``TTS_PCM_RATE``, or framed Opus)."""
    if not tts_audio:
        return 0.0
    if (tts_format or "pcm16") == "opus":
        try:
            data = base64.b64decode(tts_audio)
        except ValueError:
            return 0.0
        return audio_duration_ms(data, "opus", TTS_PCM_RATE) / 1000
    # pcm16 (or a format we cannot measure, counted as such): from the base64 length, without decoding
    size = len(tts_audio) * 3 // 4 - tts_audio[-2:].count("=")
    return size / (2 * TTS_PCM_RATE)


@dataclass(slots=True)
class UsageCounts:
    audio_seconds_received: float = 0.0
    audio_seconds_translated: float = 0.0
    tts_seconds: float = 0.0
    jobs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))

    def add(self, other: UsageCounts) -> None:
        self.audio_seconds_received += other.audio_seconds_received
        self.audio_seconds_translated += other.audio_seconds_translated
        self.tts_seconds += other.tts_seconds
        for k, v in other.jobs.items():
            self.jobs[k] = self.jobs.get(k, 0) + v

    def copy(self) -> UsageCounts:
        out = UsageCounts()
        out.add(self)
        return out


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One hourly bucket: the unit exported, shared between instances and merged."""

    tenant_id: str
    src_lang: str
    tgt_lang: str
    #: start of the UTC hour, in ms since the epoch
    hour_ms: int
    counts: UsageCounts


@dataclass(frozen=True, slots=True)
class UsageReport:
    tenant_id: str
    from_ms: int
    to_ms: int
    #: the tenant's buckets in the range, by hour then pair
    buckets: list[UsageRecord]
    total: UsageCounts


def hour_of(wall_ms: int) -> int:
    return wall_ms - wall_ms % HOUR_MS


class UsageMeter:
    def __init__(
        self, tenants: Iterable[str], clock: Clock, *, retention_hours: int = 32 * 24, max_pairs: int = 32
    ) -> None:
        self.clock = clock
        self.retention_hours = retention_hours
        self.max_pairs = max_pairs
        self.tenants: frozenset[str] = frozenset(tenants)
        self._buckets: dict[tuple[str, str, str, int], UsageCounts] = {}
        #: tenant -> the pairs metered apart (at most ``max_pairs``)
        self._pairs: dict[str, set[tuple[str, str]]] = {}
        #: tenant -> running totals since start (Prometheus counters)
        self.totals: dict[str, UsageCounts] = {t: UsageCounts() for t in self.tenants}
        #: calls for a tenant that is not configured (or no tenant): dropped
        self.unmetered = 0
        self._pruned_at = 0

    def set_tenants(self, tenants: Iterable[str]) -> None:
        """The configured tenants changed (reload): new ones are metered from now; the buckets of a
        removed one stay readable until they age out, its totals stay (counters never go back)."""
        self.tenants = frozenset(tenants)
        for t in self.tenants:
            self.totals.setdefault(t, UsageCounts())

    # --- recording (called by the job engine) -----------------------------------------------------

    def record_audio_received(
        self, tenant_id: str | None, src_lang: str, tgt_lang: str, seconds: float
    ) -> None:
        """Audio of an utterance accepted for translation (before any job ran)."""
        counts = self._bucket(tenant_id, src_lang, tgt_lang)
        if counts is not None and tenant_id is not None and seconds > 0:
            counts.audio_seconds_received += seconds
            self.totals[tenant_id].audio_seconds_received += seconds

    def record_job(
        self,
        tenant_id: str | None,
        src_lang: str,
        tgt_lang: str,
        outcome: Outcome,
        *,
        audio_seconds: float = 0.0,
        tts_seconds: float = 0.0,
    ) -> None:
        """A job ended with ``outcome``; a completed one translated ``audio_seconds`` of source audio
        and returned ``tts_seconds`` of synthesized speech (both ignored for other outcomes)."""
        counts = self._bucket(tenant_id, src_lang, tgt_lang)
        if counts is None or tenant_id is None:
            return
        total = self.totals[tenant_id]
        counts.jobs[outcome] += 1
        total.jobs[outcome] += 1
        if outcome == "completed":
            counts.audio_seconds_translated += max(0.0, audio_seconds)
            counts.tts_seconds += max(0.0, tts_seconds)
            total.audio_seconds_translated += max(0.0, audio_seconds)
            total.tts_seconds += max(0.0, tts_seconds)

    def _bucket(self, tenant_id: str | None, src_lang: str, tgt_lang: str) -> UsageCounts | None:
        if tenant_id is None or tenant_id not in self.tenants:
            self.unmetered += 1
            return None
        hour = hour_of(self.clock.wall_ms())
        if hour != self._pruned_at:
            self._prune(hour)
        pair = (_lang(src_lang), _lang(tgt_lang))
        known = self._pairs.setdefault(tenant_id, set())
        if pair not in known:
            if len(known) >= self.max_pairs or OTHER in pair:
                pair = (OTHER, OTHER)
            else:
                known.add(pair)
        key = (tenant_id, pair[0], pair[1], hour)
        counts = self._buckets.get(key)
        if counts is None:
            counts = self._buckets[key] = UsageCounts()
        return counts

    def pair_of(self, tenant_id: str, src_lang: str, tgt_lang: str) -> tuple[str, str]:
        """The pair a tenant's (src, tgt) is metered under (``other->other`` past ``max_pairs``)."""
        pair = (_lang(src_lang), _lang(tgt_lang))
        return pair if pair in self._pairs.get(tenant_id, ()) else (OTHER, OTHER)

    def _prune(self, hour: int) -> None:
        self._pruned_at = hour
        horizon = hour - self.retention_hours * HOUR_MS
        for key in [k for k in self._buckets if k[3] <= horizon]:
            del self._buckets[key]

    # --- reading ----------------------------------------------------------------------------------

    def records(self) -> list[UsageRecord]:
        """Every bucket kept (copies), for sharing with other instances."""
        return [UsageRecord(t, s, g, h, c.copy()) for (t, s, g, h), c in sorted(self._buckets.items())]

    def query(self, tenant_id: str, from_ms: int, to_ms: int) -> UsageReport:
        return report(self.records(), tenant_id, from_ms, to_ms)


def _lang(code: str) -> str:
    c = normalize(code)
    return c if 0 < len(c) <= _MAX_LANG and c.isprintable() else OTHER


def merge(instances: Iterable[Iterable[UsageRecord]]) -> list[UsageRecord]:
    """The records of several instances summed per (tenant, pair, hour)."""
    out: dict[tuple[str, str, str, int], UsageCounts] = {}
    for records in instances:
        for r in records:
            key = (r.tenant_id, r.src_lang, r.tgt_lang, r.hour_ms)
            counts = out.get(key)
            if counts is None:
                counts = out[key] = UsageCounts()
            counts.add(r.counts)
    return [UsageRecord(t, s, g, h, c) for (t, s, g, h), c in sorted(out.items())]


def report(records: Iterable[UsageRecord], tenant_id: str, from_ms: int, to_ms: int) -> UsageReport:
    """The buckets of ``tenant_id`` whose hour starts in [hour_of(from_ms), to_ms), and their sum."""
    start = hour_of(from_ms)
    buckets = sorted(
        (r for r in records if r.tenant_id == tenant_id and start <= r.hour_ms < to_ms),
        key=lambda r: (r.hour_ms, r.src_lang, r.tgt_lang),
    )
    total = UsageCounts()
    for r in buckets:
        total.add(r.counts)
    return UsageReport(tenant_id, from_ms, to_ms, buckets, total)
