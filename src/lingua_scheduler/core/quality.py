"""Node quality: rolling job outcome figures per node, and the ejection of nodes that fail their jobs.

Owns ``Kind`` (how one attempt ended, as far as its node is to blame), ``Figures`` (a node's rolling
counts, success rate and latency), ``QualityState`` with the per-node state machine, ``Change`` (what
the shell reports as metrics, events and log lines), ``speech_expected`` and ``QualityTracker``.

The rules are those of passive health checking in service proxies (Envoy's outlier detection):

- consecutive errors, judged inline on the outcome that completes the run: ``consecutive_failures``
  failed or timed-out jobs in a row, or ``consecutive_timeouts`` timed-out ones, eject the node;
- success rate against the fleet, judged every ``interval``: among the nodes with at least
  ``request_volume`` jobs in the window since their last admission -- and only when there are at least
  ``success_rate_minimum_nodes`` of them -- a node below mean - ``stdev_factor`` x standard deviation
  of their success rates is ejected;
- failure percentage, same sweep: a node failing at least ``failure_percentage_threshold`` % of such
  jobs, when at least ``failure_percentage_minimum_nodes`` nodes have the volume;
- a cap: an ejection that would put more than ``max_ejection_percent`` of the fleet out is not made,
  except that one node may be ejected while none is (a small fleet could otherwise never eject), and
  the last node not ejected never is;
- ejection time: ``base_ejection_ms`` x 2^(ejections in a row), at most ``max_ejection_ms``; the count
  in a row drops by one per sweep the node spends healthy;
- probation: once its time is up a node is selectable again, on probation; ``probation_jobs`` successes
  in a row make it healthy, one error ejects it again for twice as long.

States: HEALTHY -> EJECTED(until) -> PROBATION -> HEALTHY, or PROBATION -> EJECTED(until, doubled).
Outcomes of attempts given before an ejection, arriving while the node is ejected, count in the figures
only. A node's record outlives its connection: reconnecting does not end an ejection.

Must never: read time except through the injected clock, do I/O, or keep entries older than the window
beyond the next sweep (memory is bounded by the jobs of one window, and at most ``window_max_jobs`` per
node; records of nodes the registry no longer knows are dropped by ``sweep``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final, NamedTuple

from lingua_scheduler.clock import Clock
from lingua_scheduler.config import QualityConfig
from lingua_scheduler.core.jobs import JobSpec
from lingua_scheduler.core.segmentation import CutReason


class Kind(StrEnum):
    """How one attempt ended on its node."""

    SUCCESS = "success"
    #: the node answered with a failure
    FAILURE = "failure"
    #: no ack or no result before the deadline
    TIMEOUT = "timeout"
    #: a success without recognised text for audio judged to hold speech
    EMPTY = "empty"


class QualityState(StrEnum):
    HEALTHY = "healthy"
    EJECTED = "ejected"
    PROBATION = "probation"


#: why a node was ejected (the ``reason`` label of ``lingua_node_ejections_total``)
CONSECUTIVE_FAILURES: Final = "consecutive_failures"
CONSECUTIVE_TIMEOUTS: Final = "consecutive_timeouts"
SUCCESS_RATE: Final = "success_rate"
FAILURE_PERCENTAGE: Final = "failure_percentage"
PROBATION_FAILED: Final = "probation_failed"
EJECTION_REASONS: Final = (
    CONSECUTIVE_FAILURES,
    CONSECUTIVE_TIMEOUTS,
    SUCCESS_RATE,
    FAILURE_PERCENTAGE,
    PROBATION_FAILED,
)
#: the other changes: an ejection ran out (-> probation), probation passed (-> healthy)
EJECTION_ENDED: Final = "ejection_ended"
PROBATION_PASSED: Final = "probation_passed"

#: cuts after which the speaker was still talking: their audio may be silence and still go to a node
_CHAIN_CUTS = frozenset({CutReason.MAX_DURATION, CutReason.MAX_BYTES})
#: failure codes are node-supplied text: kept this long at most
_MAX_CODE = 64


def speech_expected(spec: JobSpec) -> bool:
    """Whether an empty recognition of this job is the node's doing: its audio was judged to hold
    speech. Opus audio of silence alone never becomes a job unless it is a piece of a turn cut at its
    maximum length (the engine answers it itself), so an Opus job outside such a chain held speech;
    other formats are not judged, and a job not asking for ASR has no recognition to be empty."""
    if spec.pipeline is not None and not spec.pipeline.use_asr:
        return False
    return spec.audio_format == "opus" and not spec.continues_turn and spec.cut_reason not in _CHAIN_CUTS


class _Entry(NamedTuple):
    at: float
    kind: Kind
    latency_ms: float | None
    code: str | None


@dataclass(frozen=True, slots=True)
class Figures:
    """A node's outcomes over the rolling window."""

    jobs: int
    successes: int
    failures: int
    timeouts: int
    empty: int
    #: answered jobs (successes, and empty ones unless they count as failures) / jobs; None without jobs
    success_rate: float | None
    latency_ms_mean: float | None
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    #: failure codes and timeout kinds, with their counts
    codes: dict[str, int]

    def to_json(self) -> dict[str, object]:
        return {
            "jobs": self.jobs,
            "successes": self.successes,
            "failures": self.failures,
            "timeouts": self.timeouts,
            "empty_results": self.empty,
            "success_rate": None if self.success_rate is None else round(self.success_rate, 4),
            "latency_ms": {
                "mean": _round(self.latency_ms_mean),
                "p50": _round(self.latency_ms_p50),
                "p95": _round(self.latency_ms_p95),
            },
            "codes": dict(sorted(self.codes.items())),
        }


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


@dataclass(slots=True, eq=False)
class NodeQuality:
    node_id: str
    window: deque[_Entry]
    state: QualityState = QualityState.HEALTHY
    #: monotonic end of the current ejection (None unless EJECTED)
    ejected_until: float | None = None
    #: outcomes from this time on judge the node (its last admission)
    since: float = -math.inf
    consecutive_errors: int = 0
    consecutive_timeouts: int = 0
    probation_successes: int = 0
    #: ejections in a row not yet forgiven: the next one lasts base x 2^streak
    streak: int = 0
    #: ejections since the record was made
    ejections: int = 0
    last_reason: str | None = None
    last_ejected_at: float | None = None


@dataclass(frozen=True, slots=True)
class Change:
    """A node changed state: ``reason`` is an ``EJECTION_REASONS`` member for an ejection, else
    ``EJECTION_ENDED`` or ``PROBATION_PASSED``."""

    node_id: str
    state: QualityState
    reason: str
    #: length of the ejection (ejections only)
    ejection_ms: int | None = None
    ejections: int = 0


@dataclass(slots=True)
class _Volume:
    node_id: str
    jobs: int
    errors: int

    @property
    def rate(self) -> float:
        return (self.jobs - self.errors) / self.jobs


@dataclass(slots=True)
class QualityTracker:
    """Every node's record and the rules. ``fleet_size`` arguments are the nodes selection could use
    (not offline): the base of the ejection cap."""

    config: QualityConfig
    clock: Clock
    _nodes: dict[str, NodeQuality] = field(default_factory=dict)
    #: node id -> monotonic end of its ejection (the nodes selection skips: O(1) when absent)
    _ejected: dict[str, float] = field(default_factory=dict)
    #: ejections a rule asked for and the cap refused
    capped: int = 0

    # --- selection ---------------------------------------------------------------------------------

    def blocks(self, node_id: str) -> bool:
        """Whether selection must skip the node: it is ejected and its time is not up."""
        until = self._ejected.get(node_id)
        return until is not None and until > self.clock.monotonic()

    def __bool__(self) -> bool:
        # selection asks this per candidate: nothing ejected -> no lookup at all
        return bool(self._ejected)

    # --- outcomes ----------------------------------------------------------------------------------

    def record(
        self,
        node_id: str,
        kind: Kind,
        *,
        fleet_size: int,
        latency_ms: float | None = None,
        code: str | None = None,
    ) -> list[Change]:
        """One attempt of the node ended so; returns the changes it caused (a probation begun because
        the ejection ran out, then an ejection or the end of probation)."""
        cfg = self.config
        now = self.clock.monotonic()
        q = self._nodes.get(node_id)
        if q is None:
            q = self._nodes[node_id] = NodeQuality(node_id, deque(maxlen=cfg.window_max_jobs))
        changes: list[Change] = []
        self._readmit(q, now, changes)
        self._trim(q, now)
        q.window.append(_Entry(now, kind, latency_ms, code[:_MAX_CODE] if code else None))
        if q.state is QualityState.EJECTED:
            return changes  # an attempt given before the ejection: a figure, not a new verdict
        error = self._is_error(kind)
        q.consecutive_errors = q.consecutive_errors + 1 if error else 0
        q.consecutive_timeouts = q.consecutive_timeouts + 1 if kind is Kind.TIMEOUT else 0
        if q.state is QualityState.PROBATION:
            if error:
                self._eject(q, PROBATION_FAILED, now, fleet_size, changes)
            else:
                q.probation_successes += 1
                if q.probation_successes >= cfg.probation_jobs:
                    q.state = QualityState.HEALTHY
                    changes.append(Change(node_id, q.state, PROBATION_PASSED, ejections=q.ejections))
            return changes
        if cfg.consecutive_timeouts and q.consecutive_timeouts >= cfg.consecutive_timeouts:
            self._eject(q, CONSECUTIVE_TIMEOUTS, now, fleet_size, changes)
        elif cfg.consecutive_failures and q.consecutive_errors >= cfg.consecutive_failures:
            self._eject(q, CONSECUTIVE_FAILURES, now, fleet_size, changes)
        return changes

    def _is_error(self, kind: Kind) -> bool:
        return kind in (Kind.FAILURE, Kind.TIMEOUT) or (
            kind is Kind.EMPTY and self.config.empty_result_is_failure
        )

    # --- periodic ----------------------------------------------------------------------------------

    def readmit_due(self) -> list[Change]:
        """Ejected nodes whose time is up go on probation. O(ejected nodes)."""
        now = self.clock.monotonic()
        changes: list[Change] = []
        for node_id, until in list(self._ejected.items()):
            if until <= now:
                self._readmit(self._nodes[node_id], now, changes)
        return changes

    def next_readmission(self) -> float | None:
        """Monotonic time of the next ejection to run out (the shell sleeps until then at most)."""
        return min(self._ejected.values(), default=None)

    def sweep(self, fleet_size: int, known: Callable[[str], bool]) -> list[Change]:
        """Every ``interval``: forget nodes the registry no longer knows, re-admit nodes whose time is
        up, forgive one ejection in a row of each healthy node, drop old entries, and apply the
        success-rate and failure-percentage rules. O(nodes with a record + entries dropped)."""
        cfg = self.config
        now = self.clock.monotonic()
        for node_id in [n for n in self._nodes if not known(n)]:
            del self._nodes[node_id]
            self._ejected.pop(node_id, None)
        changes = self.readmit_due()
        volumes: list[_Volume] = []
        for q in self._nodes.values():
            self._trim(q, now)
            if q.state is QualityState.HEALTHY and q.streak:
                q.streak -= 1
            if q.state is QualityState.EJECTED:
                continue
            jobs = errors = 0
            for e in q.window:
                if e.at >= q.since:
                    jobs += 1
                    errors += self._is_error(e.kind)
            if jobs and jobs >= cfg.request_volume:
                volumes.append(_Volume(q.node_id, jobs, errors))
        if not cfg.ejection_enabled:
            return changes
        threshold = cfg.failure_percentage_threshold
        if threshold and len(volumes) >= max(1, cfg.failure_percentage_minimum_nodes):
            for v in sorted(volumes, key=lambda v: v.rate):
                if v.errors * 100 >= threshold * v.jobs:
                    self._eject(self._nodes[v.node_id], FAILURE_PERCENTAGE, now, fleet_size, changes)
        if len(volumes) >= max(1, cfg.success_rate_minimum_nodes):
            rates = [v.rate for v in volumes]
            mean = sum(rates) / len(rates)
            stdev = math.sqrt(sum((r - mean) ** 2 for r in rates) / len(rates))
            floor = mean - cfg.success_rate_stdev_factor * stdev
            for v in sorted(volumes, key=lambda v: v.rate):
                q = self._nodes[v.node_id]
                if v.rate < floor and q.state is not QualityState.EJECTED:
                    self._eject(q, SUCCESS_RATE, now, fleet_size, changes)
        return changes

    # --- reading -----------------------------------------------------------------------------------

    def get(self, node_id: str) -> NodeQuality | None:
        return self._nodes.get(node_id)

    def state_of(self, node_id: str) -> QualityState:
        """The node's state as selection sees it now (an ejection whose time is up reads as probation
        even before ``readmit_due`` ran)."""
        q = self._nodes.get(node_id)
        if q is None:
            return QualityState.HEALTHY
        if q.state is QualityState.EJECTED and not self.blocks(node_id):
            return QualityState.PROBATION
        return q.state

    def figures(self, node_id: str) -> Figures:
        q = self._nodes.get(node_id)
        horizon = self.clock.monotonic() - self.config.window_seconds
        entries = [e for e in q.window if e.at >= horizon] if q is not None else []
        by_kind = dict.fromkeys(Kind, 0)
        codes: dict[str, int] = {}
        latencies: list[float] = []
        for e in entries:
            by_kind[e.kind] += 1
            if e.code is not None:
                codes[e.code] = codes.get(e.code, 0) + 1
            if e.latency_ms is not None:
                latencies.append(e.latency_ms)
        jobs = len(entries)
        errors = sum(1 for e in entries if self._is_error(e.kind))
        latencies.sort()
        return Figures(
            jobs=jobs,
            successes=by_kind[Kind.SUCCESS],
            failures=by_kind[Kind.FAILURE],
            timeouts=by_kind[Kind.TIMEOUT],
            empty=by_kind[Kind.EMPTY],
            success_rate=(jobs - errors) / jobs if jobs else None,
            latency_ms_mean=sum(latencies) / len(latencies) if latencies else None,
            latency_ms_p50=_rank(latencies, 0.50),
            latency_ms_p95=_rank(latencies, 0.95),
            codes=codes,
        )

    @property
    def ejected(self) -> int:
        """Nodes ejected now (including those whose time is up but not yet re-admitted)."""
        return len(self._ejected)

    def counts(self) -> dict[QualityState, int]:
        """Nodes with a record, by effective state (O(nodes with a record): for scrapes)."""
        out = dict.fromkeys(QualityState, 0)
        for node_id in self._nodes:
            out[self.state_of(node_id)] += 1
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    # --- the state machine -------------------------------------------------------------------------

    def may_eject(self, fleet_size: int) -> bool:
        """The cap: one more ejection keeps at most ``max_ejection_percent`` of ``fleet_size`` out (or
        none is out yet), and leaves at least one node in."""
        out = len(self._ejected)
        if fleet_size - out <= 1:
            return False
        return out == 0 or (out + 1) * 100 <= fleet_size * self.config.max_ejection_percent

    def _eject(self, q: NodeQuality, reason: str, now: float, fleet_size: int, changes: list[Change]) -> None:
        cfg = self.config
        if not cfg.ejection_enabled:
            return
        if not self.may_eject(fleet_size):
            self.capped += 1
            return
        ms = min(cfg.max_ejection_ms, cfg.base_ejection_ms * 2 ** min(q.streak, 32))
        q.state = QualityState.EJECTED
        q.ejected_until = until = now + ms / 1000.0
        self._ejected[q.node_id] = until
        q.streak += 1
        q.ejections += 1
        q.last_reason = reason
        q.last_ejected_at = now
        q.consecutive_errors = q.consecutive_timeouts = q.probation_successes = 0
        changes.append(Change(q.node_id, q.state, reason, ejection_ms=ms, ejections=q.ejections))

    def _readmit(self, q: NodeQuality, now: float, changes: list[Change]) -> None:
        if q.state is not QualityState.EJECTED or q.ejected_until is None or q.ejected_until > now:
            return
        q.state = QualityState.PROBATION
        q.ejected_until = None
        q.since = now  # what it did before its ejection was judged already
        q.probation_successes = 0
        del self._ejected[q.node_id]
        changes.append(Change(q.node_id, q.state, EJECTION_ENDED, ejections=q.ejections))

    def _trim(self, q: NodeQuality, now: float) -> None:
        horizon = now - self.config.window_seconds
        window = q.window
        while window and window[0].at < horizon:
            window.popleft()


def _rank(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


__all__ = [
    "CONSECUTIVE_FAILURES",
    "CONSECUTIVE_TIMEOUTS",
    "EJECTION_ENDED",
    "EJECTION_REASONS",
    "FAILURE_PERCENTAGE",
    "PROBATION_FAILED",
    "PROBATION_PASSED",
    "SUCCESS_RATE",
    "Change",
    "Figures",
    "Kind",
    "NodeQuality",
    "QualityState",
    "QualityTracker",
    "speech_expected",
]
