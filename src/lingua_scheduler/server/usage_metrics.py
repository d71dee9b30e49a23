"""Prometheus counters of the usage meter: per configured tenant (a bounded label set), never per
session or language pair.

Owns the collector over ``core/usage.py``'s running totals: ``lingua_usage_audio_received_seconds``,
``lingua_usage_audio_translated_seconds``, ``lingua_usage_tts_seconds`` and ``lingua_usage_jobs``
(``outcome`` label), each with a ``tenant`` label that takes only the configured tenants' ids, and
``lingua_usage_unmetered`` (calls for no or an unknown tenant). The figures move when the job engine
calls the meter's ``record_*`` functions (see ``core/usage.py``).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, Metric

from lingua_scheduler.core.usage import OUTCOMES, UsageMeter


class UsageMetrics:
    def __init__(self, meter: UsageMeter) -> None:
        self.meter = meter

    def collect(self) -> Iterable[Metric]:
        totals = sorted(self.meter.totals.items())
        figures = (
            (
                "lingua_usage_audio_received_seconds",
                "Seconds of audio accepted for translation",
                "audio_seconds_received",
            ),
            (
                "lingua_usage_audio_translated_seconds",
                "Seconds of audio whose job completed",
                "audio_seconds_translated",
            ),
            ("lingua_usage_tts_seconds", "Seconds of synthesized speech returned", "tts_seconds"),
        )
        for name, text, attr in figures:
            family = CounterMetricFamily(name, text, labels=["tenant"])
            for tenant, counts in totals:
                family.add_metric([tenant], getattr(counts, attr))
            yield family
        jobs = CounterMetricFamily(
            "lingua_usage_jobs", "Jobs that ended, by tenant and outcome", labels=["tenant", "outcome"]
        )
        for tenant, counts in totals:
            for outcome in OUTCOMES:
                jobs.add_metric([tenant, outcome], counts.jobs.get(outcome, 0))
        yield jobs
        yield CounterMetricFamily(
            "lingua_usage_unmetered",
            "Usage records for no or an unconfigured tenant (dropped)",
            value=self.meter.unmetered,
        )
