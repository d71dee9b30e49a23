"""Prometheus metrics of one scheduler instance.

Hot paths touch only plain counters and histograms; gauges that describe the fleet (nodes by status,
view age, loop lag) are computed when ``/metrics`` is scraped, by a collector reading the core.
No per-node or per-session labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lingua_scheduler.server.gc_policy import GcPolicy

#: 2 µs .. 30 s: resolves the heartbeat path and the end-to-end latency alike
LATENCY_BUCKETS = (
    0.000002,
    0.000005,
    0.00001,
    0.00002,
    0.00005,
    0.0001,
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    30.0,
)


class _Live(Collector):
    """Scrape-time gauges and counters read from the core."""

    def __init__(self, read: Callable[[], Iterable[Metric]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        return self._read()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.heartbeats = Counter("lingua_heartbeats", "Heartbeats accepted", registry=r)
        self.heartbeat_handle = Histogram(
            "lingua_heartbeat_handle_seconds",
            "Heartbeat frame received -> ack queued",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.invalid_frames = Counter(
            "lingua_invalid_frames", "Frames refused", ["endpoint", "code"], registry=r
        )
        self.status_transitions = Counter(
            "lingua_node_status_transitions", "Node status changes", ["to"], registry=r
        )
        self.offline_suppressed = Counter(
            "lingua_offline_suppressed",
            "Nodes kept online because the event loop lagged when they timed out",
            registry=r,
        )
        self.fleet_view_lag = Histogram(
            "lingua_fleet_view_publish_lag_seconds",
            "Oldest change in a batch -> its publication",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

        self.selection_seconds = Histogram(
            "lingua_selection_seconds", "One node selection", buckets=LATENCY_BUCKETS, registry=r
        )
        self.selections = Counter("lingua_selections", "Node selections", ["result"], registry=r)
        self.job_dispatch = Histogram(
            "lingua_job_dispatch_seconds",
            "Utterance finalized -> job_assign written",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.job_end_to_end = Histogram(
            "lingua_job_end_to_end_seconds",
            "Job created -> result delivered to the session",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.jobs = Counter("lingua_jobs", "Jobs ended, by outcome", ["outcome"], registry=r)
        self.failovers = Counter(
            "lingua_failovers", "Attempts abandoned for another node", ["reason"], registry=r
        )
        self.cross_instance_dispatch = Histogram(
            "lingua_cross_instance_dispatch_seconds",
            "job_assign written by the session's instance -> delivered by the node's instance",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stale_messages = Counter(
            "lingua_stale_job_messages",
            "Job messages of an old attempt, another node or a job unknown here, dropped",
            registry=r,
        )
        self.unknown_node_values = Counter(
            "lingua_node_unknown_values",
            "Service types / device kinds a node reported that this scheduler does not know (kept, not "
            "routed on), once per node and value",
            ["kind"],
            registry=r,
        )
        self.early_results = Counter(
            "lingua_early_attempt_results",
            "Results of an abandoned attempt delivered because the utterance was still unanswered",
            registry=r,
        )
        self.silent_utterances = Counter(
            "lingua_silent_utterances",
            "Utterances of Opus silence only, answered missing_result(silence_detected) without a job",
            registry=r,
        )
        self.refused_utterances = Counter(
            "lingua_refused_utterances",
            "Utterances refused with missing_result and no job, by reason (queue_full: the session's "
            "result queue is full; rate_limited: frames of it were dropped by the rate limit)",
            ["reason"],
            registry=r,
        )
        self.late_results = Counter(
            "lingua_late_results",
            "Results delivered after their utterance was given up (missing_result gap_timeout), marked late",
            registry=r,
        )
        self.affinity = Counter(
            "lingua_session_affinity",
            "Jobs of a session that went to the node of its previous job (hit) or elsewhere (moved)",
            ["result"],
            registry=r,
        )
        self.jobs_created = Counter(
            "lingua_jobs_submitted", "Jobs created (one per utterance and target language)", registry=r
        )

        # Operator surface. Labels are fixed small sets (actions, results, endpoints), never ids.
        self.admin_actions = Counter(
            "lingua_admin_actions",
            "Admin API requests, by action and result",
            ["action", "result"],
            registry=r,
        )
        self.operator_render = Histogram(
            "lingua_operator_render_seconds",
            "Event-loop time spent building an operator response (metrics, stats, dashboard frame)",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Process metrics (CPU, memory, open fds, start time) and the Python version, on this registry
        # so that one scrape of /metrics has them; they read /proc at scrape time only.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        #: the garbage collector's policy and pauses (started by ``serve`` only: it is process-wide)
        self.gc_policy = GcPolicy(r)

    def add_live(self, read: Callable[[], Iterable[Metric]]) -> None:
        self.registry.register(_Live(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def gauge(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> GaugeMetricFamily:
    if labels:
        g = GaugeMetricFamily(name, doc, labels=list(labels))
        g.add_metric(list(labels.values()), value)
        return g
    return GaugeMetricFamily(name, doc, value=value)


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
