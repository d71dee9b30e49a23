"""The fleet and traffic aggregate behind ``/api/v1/stats`` and the dashboard, built at most once a second.

Owns ``StatsAggregator``: a ring of once-a-second samples of the instance's counters and latency
histograms covering the last minute, the snapshot built from them and from the published fleet view,
and the encoded dashboard frame that every connected dashboard shares.

Why samples of the Prometheus histograms: the hot paths already observe them, so the last minute's
p50/p99 are the difference of two samples' bucket counts (what PromQL's
``histogram_quantile(0.99, rate(x[1m]))`` computes), interpolated inside a bucket. Nothing is added to
the heartbeat or job paths, and the cost of an aggregate depends on neither the traffic nor the fleet
size: node counts come from the registry's per-status counters, supply per language pair from the
pools' ready counts, demand from the sessions and the engine's per-pair job counters.

Must never: iterate the nodes of the fleet, block, or build the snapshot more than once per interval
however many dashboards and API clients ask.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web
from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from lingua_scheduler.core.jobs import JobState
from lingua_scheduler.core.pools import LANGUAGE_PAIR
from lingua_scheduler.core.status import NodeStatus
from lingua_scheduler.protocol.http import LATENCY_NAMES, SERIES_KEYS
from lingua_scheduler.server.metrics import LATENCY_BUCKETS, counter, gauge
from lingua_scheduler.server.state import STATE, SchedulerState

#: seconds between samples, and the shortest time between two snapshot builds
INTERVAL = 1.0
#: the "last minute" of rates and latencies
WINDOW = 60.0
#: language-pair rows in a snapshot (busiest first); 10 languages make 90 pairs
MAX_PAIR_ROWS = 100
#: events shipped in each dashboard frame
FRAME_EVENTS = 30
#: the longest window the dashboard can show: one point a second is kept this long (bounded memory:
#: one tuple of ``SERIES_KEYS`` floats a second, ~3,600 of them)
HISTORY_SECONDS = 3600
#: points in one answer of ``GET /api/v1/stats/series`` at most (a long window is averaged down)
MAX_SERIES_POINTS = 360

#: the four latencies an operator watches: name in the API -> histogram attribute of ``Metrics``
LATENCIES: dict[str, str] = {
    "heartbeat_handle": "heartbeat_handle",
    "selection": "selection_seconds",
    "dispatch": "job_dispatch",
    "end_to_end": "job_end_to_end",
}
_BOUNDS: tuple[float, ...] = (*LATENCY_BUCKETS, math.inf)
assert tuple(LATENCIES) == LATENCY_NAMES, "the API's latency names (protocol/http.py) are these"
_JOB_OUTCOMES = ("completed", "failed", "timed_out", "cancelled")
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class Sample:
    """Cumulative values at one moment. ``point`` is the rate and latency of the second before it."""

    at: float
    wall_ms: int
    counters: dict[str, float]
    #: histogram name -> cumulative bucket counts, one per bound of ``_BOUNDS``
    buckets: dict[str, tuple[float, ...]]
    pairs: dict[str, int]
    point: dict[str, float | None] = field(default_factory=dict)


def quantile(q: float, cumulative: Sequence[float]) -> float | None:
    """The ``q`` quantile (0..1) of a distribution given as cumulative counts per bound of ``_BOUNDS``;
    linear inside the bucket that holds it, like PromQL's ``histogram_quantile``. None without data."""
    total = cumulative[-1] if cumulative else 0.0
    if total <= 0:
        return None
    rank = q * total
    prev = 0.0
    for i, c in enumerate(cumulative):
        if c >= rank and c > prev:
            lo = _BOUNDS[i - 1] if i > 0 else 0.0
            hi = _BOUNDS[i]
            if math.isinf(hi):
                return lo  # beyond the last finite bound: report that bound, as Prometheus does
            return lo + (hi - lo) * (rank - prev) / (c - prev)
        prev = c
    return _BOUNDS[-2]


def _diff(a: Sequence[float], b: Sequence[float]) -> list[float]:
    return [x - y for x, y in zip(a, b, strict=True)]


def _counter_total(c: Counter) -> float:
    """Sum of a counter's ``_total`` samples over all its label values (public collect() API)."""
    return sum(s.value for m in c.collect() for s in m.samples if s.name.endswith("_total"))


def _by_label(c: Counter, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in c.collect():
        for s in m.samples:
            if s.name.endswith("_total"):
                key = s.labels.get(label, "")
                out[key] = out.get(key, 0.0) + s.value
    return out


def _cumulative(h: Histogram) -> tuple[float, ...]:
    return tuple(s.value for m in h.collect() for s in m.samples if s.name.endswith("_bucket"))


def window_percentiles(samples: list[float]) -> dict[str, float | None]:
    """p50, p99 and p99.9 of a latency window (ranks as ``LatencyWindow.percentiles``), cheaply.

    A full sort of a 65,536-sample window holds the event loop ~8 ms; this takes ~2 ms: p99 and p99.9
    are exact (from the top 1 %, ``heapq.nlargest``), p50 comes from an evenly strided subset of at most
    4,096 samples (rank error about 1 %; exact below 8,192 samples)."""
    n = len(samples)
    if n == 0:
        return {"p50": None, "p99": None, "p999": None}
    subset = sorted(samples[:: max(1, n // 4096)])
    out: dict[str, float | None] = {"p50": subset[min(len(subset) - 1, len(subset) // 2)]}
    ranks = {"p99": min(n - 1, int(0.99 * n)), "p999": min(n - 1, int(0.999 * n))}
    top = heapq.nlargest(n - min(ranks.values()), samples)  # descending
    for key, rank in ranks.items():
        out[key] = top[n - 1 - rank]
    return out


def _round(x: float | None, digits: int = 6) -> float | None:
    return None if x is None else round(x, digits)


class StatsAggregator:
    def __init__(self, state: SchedulerState, interval: float = INTERVAL, window: float = WINDOW) -> None:
        self.state = state
        self.interval = interval
        self.ring: deque[Sample] = deque(maxlen=max(2, round(window / interval) + 1))
        #: (wall ms, the point's values in ``SERIES_KEYS`` order), one a sample, for the last hour
        self.history: deque[tuple[int, tuple[float | None, ...]]] = deque(
            maxlen=max(2, round(HISTORY_SECONDS / interval))
        )
        self._snapshot: dict[str, Any] | None = None
        self._snapshot_at = -math.inf
        self._windows: dict[str, dict[str, float | None]] | None = None
        self._windows_at = -math.inf
        #: the dashboard frame, encoded once and shared by all dashboards; seq counts frames
        self.frame = b""
        self.frame_seq = 0
        self._frame_at = -math.inf
        self._new_frame = asyncio.Event()
        #: dashboards connected right now (frames are built only while there is one)
        self.clients = 0
        self.closing = False
        self.builds = 0
        #: sums over every instance (server/cluster/cluster_view.py), None in the embedded mode
        self.cluster_totals: Callable[[], dict[str, Any] | None] | None = None
        self.ring.append(self._sample())

    # --- sampling (once a second, O(counters + buckets)) ------------------------------------------

    def _sample(self) -> Sample:
        m = self.state.metrics
        jobs = _by_label(m.jobs, "outcome")
        counters = {
            "heartbeats": _counter_total(m.heartbeats),
            "created": _counter_total(m.jobs_created),
            "failovers": _counter_total(m.failovers),
            "fanout": float(self.state.rooms.relay.fanout_jobs),
            **{o: jobs.get(o, 0.0) for o in _JOB_OUTCOMES},
        }
        buckets = {name: _cumulative(getattr(m, attr)) for name, attr in LATENCIES.items()}
        clock = self.state.clock
        return Sample(
            clock.monotonic(), clock.wall_ms(), counters, buckets, dict(self.state.engine.created_by_pair)
        )

    def tick(self) -> None:
        """Take one sample; its ``point`` (per-second rates and latencies) feeds the dashboard's charts."""
        prev = self.ring[-1]
        cur = self._sample()
        dt = max(cur.at - prev.at, 1e-9)
        point: dict[str, float | None] = {
            f"{k}_per_s": (cur.counters[k] - prev.counters.get(k, 0.0)) / dt
            for k in ("heartbeats", "created", "completed", "failovers")
        }
        point["failed_per_s"] = (
            cur.counters["failed"]
            + cur.counters["timed_out"]
            - prev.counters.get("failed", 0.0)
            - prev.counters.get("timed_out", 0.0)
        ) / dt
        for name in LATENCIES:
            d = _diff(cur.buckets[name], prev.buckets[name])
            point[f"{name}_p50"] = quantile(0.50, d)
            point[f"{name}_p99"] = quantile(0.99, d)
        self.ring.append(Sample(cur.at, cur.wall_ms, cur.counters, cur.buckets, cur.pairs, point))
        self.history.append((cur.wall_ms, tuple(point.get(k) for k in SERIES_KEYS)))

    async def run(self) -> None:
        """Sample every ``interval``; while dashboards are connected, build and hand out a frame."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += self.interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at = max(next_at, loop.time() - self.interval)  # after a stall, do not catch up in a burst
            self.tick()
            if self.clients:
                self.build_frame(force=True)  # a new sample: rebuild even if the snapshot is <1 s old

    # --- the snapshot (at most once per interval) -------------------------------------------------

    def snapshot(self, *, force: bool = False) -> dict[str, Any]:
        """The aggregate for ``/api/v1/stats``; rebuilt only when the cached one is an interval old
        (``force``: now, for tests and benchmarks that just took a sample)."""
        now = self.state.clock.monotonic()
        if force or self._snapshot is None or now - self._snapshot_at >= self.interval:
            t0 = time.perf_counter()
            self._snapshot = self._build()
            self._snapshot_at = now
            self.builds += 1
            self.state.metrics.operator_render.labels("stats_aggregate").observe(time.perf_counter() - t0)
        return self._snapshot

    def api_body(self, *, force: bool = False) -> dict[str, Any]:
        """``GET /api/v1/stats``: the snapshot, the O(1) counts read now, and the exact-tail percentiles
        of the two hot paths' recent samples (benchmarks read them; cached like the snapshot, and
        left out of dashboard frames, which show the last-minute histogram percentiles instead)."""
        state = self.state
        now = state.clock.monotonic()
        if force or self._windows is None or now - self._windows_at >= self.interval:
            self._windows = {
                "heartbeat_handle_seconds": window_percentiles(state.heartbeat_window.samples()),
                "job_dispatch_seconds": window_percentiles(state.dispatch_window.samples()),
                "cross_instance_dispatch_seconds": window_percentiles(state.cross_instance_window.samples()),
                "room_fanout_seconds": window_percentiles(state.rooms.relay.fanout_window.samples()),
            }
            self._windows_at = now
        fresh = self.fresh()
        body = dict(self.snapshot(force=force))
        body.update(
            nodes=fresh["nodes"],
            nodes_total=fresh["nodes_total"],
            nodes_ejected=fresh["nodes_ejected"],
            sessions=fresh["sessions"],
        )
        body["jobs"] = {**body["jobs"], "inflight": fresh["jobs_inflight"], "waiting": fresh["jobs_waiting"]}
        body["rooms"] = {**body["rooms"], "rooms": fresh["rooms_live"], "members": fresh["room_members"]}
        body["latency"] = self._windows
        body["heartbeats_total"] = state.heartbeat_window.count
        body["jobs_dispatched_total"] = state.dispatch_window.count
        if (totals := self._cluster()) is not None:
            body["cluster"] = totals
        return body

    def _cluster(self) -> dict[str, Any] | None:
        return None if self.cluster_totals is None else self.cluster_totals()

    def fresh(self) -> dict[str, Any]:
        """Counts that are O(1) to read, so the API never shows them a second old."""
        state = self.state
        counts = state.registry.counts()
        store = state.engine.store
        return {
            "nodes": {s.value: counts[s] for s in NodeStatus},
            "nodes_total": len(state.registry),
            # node quality: ejected by this instance now (server/quality.py; O(1))
            "nodes_ejected": state.quality.tracker.ejected,
            "sessions": len(state.sessions),
            "jobs_inflight": store.inflight,
            "jobs_waiting": store.waiting,
            "rooms_live": len(state.rooms.rooms),
            "room_members": state.rooms.rooms.member_count,
        }

    def _build(self) -> dict[str, Any]:
        state = self.state
        latest, base = self.ring[-1], self.ring[0]
        span = latest.at - base.at
        window = span if span > 0 else None

        def rate(key: str) -> float | None:
            if window is None:
                return None
            return round((latest.counters[key] - base.counters.get(key, 0.0)) / window, 3)

        last_minute: dict[str, dict[str, float | None]] = {}
        for name in LATENCIES:
            d = _diff(latest.buckets[name], base.buckets[name])
            last_minute[name] = {
                "p50": _round(quantile(0.50, d)),
                "p99": _round(quantile(0.99, d)),
                "count": d[-1],
            }
        store = state.engine.store
        fresh = self.fresh()
        view = state.publisher.view
        pairs, pairs_total = self._pairs(latest, base, window)
        return {
            **{k: fresh[k] for k in ("nodes", "nodes_total", "nodes_ejected", "sessions")},
            "jobs": {
                "inflight": fresh["jobs_inflight"],
                "waiting": fresh["jobs_waiting"],
                "by_state": {s.value: n for s, n in store.counts().items()},
                "per_second": {
                    "created": rate("created"),
                    "completed": rate("completed"),
                    "failed": rate("failed"),
                    "timed_out": rate("timed_out"),
                    "cancelled": rate("cancelled"),
                    "failovers": rate("failovers"),
                },
            },
            "heartbeats_per_second": rate("heartbeats"),
            # cumulative since start, as of the last sample (what the rates are differences of)
            "totals": {k: int(v) for k, v in latest.counters.items()},
            "window_seconds": round(span, 3),
            "latency_last_minute": last_minute,
            "event_loop_lag_seconds": state.loop_lag.recent_max,
            "fleet_view": {"version": view.version, "age_seconds": round(state.publisher.view_age(), 4)},
            "pools": {"mode": view.layout.mode, "groups": len(view.groups), "shards": len(view.pools)},
            "language_pairs": pairs,
            "language_pairs_total": pairs_total,
            "rooms": {
                "rooms": fresh["rooms_live"],
                "members": fresh["room_members"],
                "fanout_jobs_per_second": rate("fanout"),
            },
            "computed_at_ms": state.clock.wall_ms(),
        }

    def _pairs(self, latest: Sample, base: Sample, window: float | None) -> tuple[list[dict[str, Any]], int]:
        """Demand (sessions, jobs/s) and supply (nodes, ready, job slots) per directed language pair.

        Supply comes from the language-pair pools' counts (one entry per shard, never per node); in the
        capability and hash modes pools are not pairs and supply is null."""
        state = self.state
        sessions: dict[str, int] = {}
        for s in state.sessions.values():
            for t in s.targets:
                key = f"{s.src_lang}->{t}"
                sessions[key] = sessions.get(key, 0) + 1
        view = state.publisher.view
        supply: dict[str, tuple[int, int]] = {}
        if view.layout.mode == LANGUAGE_PAIR:
            for group, shard_ids in view.groups.items():
                members = ready = 0
                for sid in shard_ids:
                    pool = view.pools.get(sid)
                    if pool is not None:
                        members += len(pool.members)
                        ready += pool.ready
                supply[group] = (members, ready)
        slots_per_node = state.publisher.max_concurrent_jobs
        rows: list[dict[str, Any]] = []
        for pair in set(sessions) | set(supply) | set(latest.pairs):
            jobs = latest.pairs.get(pair, 0) - base.pairs.get(pair, 0)
            members_ready = supply.get(pair)
            rows.append(
                {
                    "pair": pair,
                    "demand": {
                        "sessions": sessions.get(pair, 0),
                        "jobs_per_second": round(jobs / window, 3) if window else None,
                        "jobs_last_minute": jobs,
                    },
                    "supply": None
                    if members_ready is None
                    else {
                        "nodes": members_ready[0],
                        "ready": members_ready[1],
                        "slots": members_ready[1] * slots_per_node,
                    },
                }
            )
        rows.sort(
            key=lambda r: (
                -r["demand"]["sessions"],
                -r["demand"]["jobs_last_minute"],
                -(r["supply"] or {}).get("ready", 0),
                r["pair"],
            )
        )
        return rows[:MAX_PAIR_ROWS], len(rows)

    # --- the dashboard frame ------------------------------------------------------------------------

    def series(self) -> dict[str, list[Any]]:
        """The last minute, one point a second: what the dashboard's charts draw."""
        samples = list(self.ring)[1:]
        out: dict[str, list[Any]] = {"t": [s.wall_ms for s in samples]}
        keys = ["heartbeats_per_s", "created_per_s", "completed_per_s", "failed_per_s", "failovers_per_s"]
        keys += [f"{n}_{q}" for n in LATENCIES for q in ("p50", "p99")]
        for k in keys:
            out[k] = [_round(s.point.get(k), 7) for s in samples]
        return out

    def long_series(self, window: float, max_points: int = MAX_SERIES_POINTS) -> dict[str, Any]:
        """The last ``window`` seconds (up to an hour) of the per-second points, averaged into buckets
        of ``step`` seconds so that at most ``max_points`` come back. A rate averages exactly; a
        latency percentile averaged over seconds is an approximation (the mean of per-second p99s),
        which is what a chart of an hour can show."""
        points = [p for p in self.history if p[0] >= self.state.clock.wall_ms() - window * 1000]
        step = max(1, math.ceil(len(points) / max_points))
        out: dict[str, Any] = {"window_seconds": window, "step_seconds": step * self.interval, "t": []}
        columns: list[list[float | None]] = [[] for _ in SERIES_KEYS]
        for i in range(0, len(points), step):
            chunk = points[i : i + step]
            out["t"].append(chunk[-1][0])
            for k, column in enumerate(columns):
                values = [v for _, vals in chunk if (v := vals[k]) is not None]
                column.append(_round(sum(values) / len(values), 7) if values else None)
        for key, column in zip(SERIES_KEYS, columns, strict=True):
            out[key] = column
        return out

    def build_frame(self, *, force: bool = False) -> bytes:
        """Encode the dashboard frame (snapshot + series + recent events) and wake the dashboards."""
        t0 = time.perf_counter()
        state = self.state
        body = {
            **self.snapshot(force=force),
            **self.fresh(),
            "series": self.series(),
            "events": state.events.latest(FRAME_EVENTS),
            "admin_enabled": bool(state.config.admin.token),
            "instance": {"uptime_seconds": round(time.time() - state.started_at, 1)},
            "cluster": self._cluster(),
        }
        self.frame = _encode(body)
        self.frame_seq += 1
        self._frame_at = state.clock.monotonic()
        woken, self._new_frame = self._new_frame, asyncio.Event()
        woken.set()
        state.metrics.operator_render.labels("dashboard_frame").observe(time.perf_counter() - t0)
        return self.frame

    def current_frame(self) -> tuple[int, bytes]:
        """The latest frame, built now if none is younger than an interval (a dashboard just opened)."""
        if not self.frame or self.state.clock.monotonic() - self._frame_at >= self.interval:
            self.build_frame()
        return self.frame_seq, self.frame

    async def next_frame(self, after: int) -> tuple[int, bytes] | None:
        """Wait for a frame newer than ``after``; None when the server is shutting down."""
        while self.frame_seq <= after and not self.closing:
            await self._new_frame.wait()
        return None if self.closing else (self.frame_seq, self.frame)

    def close(self) -> None:
        self.closing = True
        self._new_frame.set()

    # --- metrics ------------------------------------------------------------------------------------

    def metrics(self) -> Iterable[Metric]:
        """Scrape-time metrics of the job table and the operator surface (O(1) reads)."""
        by_state = GaugeMetricFamily("lingua_job_states", "Jobs held by state", labels=["state"])
        counts = self.state.engine.store.counts()
        for s in JobState:
            by_state.add_metric([s.value], counts[s])
        yield by_state
        events = CounterMetricFamily(
            "lingua_operator_events", "Recent-events ring entries, by kind", labels=["kind"]
        )
        for kind, n in self.state.events.counts.items():
            events.add_metric([kind], n)
        yield events
        yield gauge("lingua_dashboard_clients", "Dashboards connected to the live stream", self.clients)


def registry_bound_metrics(state: SchedulerState) -> Iterable[Metric]:
    """Scrape-time counters of the per-node bounds the registry enforces (O(1) reads)."""
    reg = state.registry
    yield counter(
        "lingua_capability_changes_deferred",
        "Capability changes deferred for their node's budget (limits.capability_changes_per_minute)",
        reg.capability_deferred,
    )
    refused = CounterMetricFamily(
        "lingua_capability_reports_refused",
        "Capability reports over a limit: a node's own (refused with INVALID_CAPABILITY_SCHEMA) or "
        "another instance's record of one (the node routes nothing here)",
        labels=["origin"],
    )
    refused.add_metric(["node"], reg.capability_refused)
    refused.add_metric(["remote_record"], reg.remote_capability_refused)
    yield refused
    evicted = CounterMetricFamily(
        "lingua_node_records_evicted", "Offline node records evicted, by reason", labels=["reason"]
    )
    for reason, n in reg.evicted.items():
        evicted.add_metric([reason], n)
    yield evicted
    yield gauge(
        "lingua_offline_node_records", "Records of nodes offline and disconnected", reg.offline_records
    )


STATS: web.AppKey[StatsAggregator] = web.AppKey("stats", StatsAggregator)


def setup(app: web.Application) -> None:
    """Create the aggregator, export its metrics, and run its sampler while the app runs."""
    state = app[STATE]
    agg = StatsAggregator(state)
    app[STATS] = agg
    state.metrics.add_live(agg.metrics)
    state.metrics.add_live(lambda: registry_bound_metrics(state))

    async def on_shutdown(app: web.Application) -> None:
        agg.close()  # long-lived dashboard streams end now instead of holding the shutdown

    async def sampler(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(agg.run(), name="stats-sampler")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.on_shutdown.append(on_shutdown)
    app.cleanup_ctx.append(sampler)
