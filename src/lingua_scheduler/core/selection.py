"""Two-level node selection over the immutable fleet view: pick pools, then a node inside a pool.

Owns: ``SelectionRequest``, the filters and their order, ``Breakdown`` (why nodes were excluded),
``SelectionResult`` (node or None, pools tried, breakdown, JSON for the dry-run endpoint), ``Selector``
and ``commit`` (the only place a choice touches load).

Flow: the paired node (or the session's previous node: affinity) if it passes every filter -- with
``bind_preferred`` its capacity is not checked, since the job continues audio that node already holds --;
else the eligible groups (the request's language pair;
capability pools eligible for the required types; hash buckets), the preferred one first (tenant override,
else stable hash of the routing key with ``session_affinity``, else random), the others after it when
``fallback`` is on. The shards of one group are one logical pool and are always all tried, starting at a
random (or, with affinity, hashed) shard.

Inside a shard: power-of-d choices. Members are visited in a random permutation (random start, random
stride coprime with the shard size, reading the shard's tuple of ``NodeView``s: no map lookups); after
``max(d, 8)`` visits with at least one node passing every filter, or as soon as ``d`` pass, the least
loaded of those that passed wins (effective load, then cpu). When no node passed yet the walk simply
continues over the rest of the shard: a shard holds at most ``max_pool_size`` members, so this is
bounded by the shard size, never by the fleet, and it makes selection complete -- if any member of the
pools tried passes every filter, a node is returned. Cost is O(d) per successful shard and
O(max_pool_size) per shard that yields nothing; a shard whose published ready count is 0 costs O(1).
A selection that finds nothing therefore costs O(shards tried x max_pool_size): bounded by the pools
of the request, not by the fleet -- but a pair served by 50,000 nodes has 500 shards. ``scan_budget``
caps that cost (selection then stops early and says so in ``truncated``), at the price of completeness.

With ``soft_threshold`` (the engine's) the resource threshold is a preference: nodes over it are
chosen only when no node under it passes (a second pass, taken only when the first one found nothing
and refused some node for its load).

Must never: mutate the view or any load (``commit`` does that, explicitly), read the clock (the
unavailable marks and the quality tracker carry their own), or iterate the whole fleet.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from math import gcd
from typing import NamedTuple

from lingua_scheduler.core.fleet_view import FleetView
from lingua_scheduler.core.hashing import iter_ring, pick_index_for_key, pool_id_for_key, probe_order
from lingua_scheduler.core.languages import AUTO, normalize
from lingua_scheduler.core.node_view import NodeView
from lingua_scheduler.core.pools import CAPABILITY, HASH, LANGUAGE_PAIR, Pool, hash_group, pair_group
from lingua_scheduler.core.quality import QualityTracker
from lingua_scheduler.core.status import NodeStatus
from lingua_scheduler.core.unavailable import UnavailableMarks
from lingua_scheduler.protocol.common import CORE_SERVICE_TYPES, ServiceType

#: exclusion reasons; this order breaks ties for the dominant reason (the reference's order, plus
#: service_unavailable next to its sibling model_not_available, and ejected -- node quality, checked
#: right after the status -- last)
REASONS = (
    "offline",
    "status_not_ready",
    "not_in_public_pool",
    "gpu_unavailable",
    "model_not_available",
    "service_unavailable",
    "capacity_exceeded",
    "resource_threshold_exceeded",
    "lang_pair_unsupported",
    "asr_lang_unsupported",
    "tts_lang_unsupported",
    "src_auto_no_candidate",
    "ejected",
)
(
    OFFLINE,
    STATUS_NOT_READY,
    NOT_IN_PUBLIC_POOL,
    GPU_UNAVAILABLE,
    MODEL_NOT_AVAILABLE,
    SERVICE_UNAVAILABLE,
    CAPACITY_EXCEEDED,
    RESOURCE_THRESHOLD_EXCEEDED,
    LANG_PAIR_UNSUPPORTED,
    ASR_LANG_UNSUPPORTED,
    TTS_LANG_UNSUPPORTED,
    SRC_AUTO_NO_CANDIDATE,
    EJECTED,
) = range(len(REASONS))

#: random visits in a shard before settling for fewer than d passing candidates
SAMPLE_TRIES = 8
#: a threshold no load reaches (percentages end at 100): the fallback pass of ``Selector.select``
OVER_ANY_LOAD = 101.0


@dataclass(frozen=True, slots=True)
class SelectionRequest:
    src_lang: str
    tgt_lang: str
    required: frozenset[ServiceType] = CORE_SERVICE_TYPES
    #: feature flags the node must support (emotion_detection, ...); missing = model_not_available
    features: frozenset[str] = frozenset()
    #: tenant id, else session id: drives affinity and tenant overrides
    routing_key: str = "default"
    tenant_id: str | None = None
    #: paired node, or the node of the session's previous job: used if it passes every filter
    preferred_node: str | None = None
    #: the preferred node keeps the job even at capacity (a max-duration chain: it holds the turn)
    bind_preferred: bool = False
    #: only the preferred node may take the job (a session paired with its node, without fallback to
    #: the pools): when it does not pass, no node is selected
    preferred_only: bool = False
    #: further directed pairs a node must serve end to end too (a two-way session: both directions)
    also_serves: tuple[tuple[str, str], ...] = ()
    exclude: frozenset[str] = frozenset()
    #: the part of ``exclude`` passed over only for now (a reservation just refused: busy, not unfit);
    #: ``Breakdown.refused`` counts those the selection actually came upon
    refused: frozenset[str] = frozenset()
    #: a public job: only nodes that accept public jobs
    accept_public: bool = True


class Breakdown:
    """Counts of nodes examined, by the first filter that excluded them, summed over the pools tried.

    ``total_nodes == sum(reason counts) + eligible``. Excluded ids are counted apart, not in the total
    (except in a shard skipped whole because none of its members is READY, where every member counts
    as ``status_not_ready`` without being looked at). The paired node is not counted: its outcome is
    ``SelectionResult.preferred_node``.
    """

    __slots__ = ("counts", "eligible", "excluded", "refused")

    def __init__(self) -> None:
        self.counts = [0] * len(REASONS)
        self.eligible = 0
        self.excluded = 0
        #: of ``excluded``, the nodes in ``SelectionRequest.refused``
        self.refused = 0

    @property
    def total_nodes(self) -> int:
        return sum(self.counts) + self.eligible

    def count(self, reason: str) -> int:
        return self.counts[REASONS.index(reason)]

    def add(self, other: Breakdown) -> None:
        for i, c in enumerate(other.counts):
            self.counts[i] += c
        self.eligible += other.eligible
        self.excluded += other.excluded
        self.refused += other.refused

    def best_reason(self) -> str:
        """As the reference: ``no_nodes`` if none was examined, else the largest count, earliest on ties."""
        if self.total_nodes == 0:
            return "excluded" if self.excluded else "no_nodes"
        best = max(self.counts)
        return REASONS[self.counts.index(best)] if best else "unknown"

    def to_json(self) -> dict[str, int]:
        out = {"total_nodes": self.total_nodes}
        out.update(zip(REASONS, self.counts, strict=True))
        out["eligible"] = self.eligible
        out["excluded"] = self.excluded
        return out


class Attempt(NamedTuple):
    pool_id: str
    #: "ok" or the pool's dominant exclusion reason
    outcome: str
    #: members examined
    candidates: int


class SelectionResult(NamedTuple):
    """Immutable (a named tuple: cheap to build on the hot path)."""

    node_id: str | None
    mode: str
    #: pool the node came from (None when none, or when the paired node was used)
    pool_id: str | None
    #: the preferred pool: its first shard tried, or its group id when it has no member (so that
    #: falling back from an empty preferred pool shows as a fallback); None when no pool is eligible
    preferred_pool: str | None
    #: eligible groups (logical pools) for the request
    pool_count: int
    attempts: tuple[Attempt, ...]
    breakdown: Breakdown
    #: the paired node's fate: "used", an exclusion reason, "unknown_node", "excluded" or None
    preferred_node: str | None
    #: pools were left untried because the selector's scan budget ran out
    truncated: bool = False

    @property
    def best_reason(self) -> str:
        return "ok" if self.node_id is not None else self.breakdown.best_reason()

    @property
    def fallback_used(self) -> bool:
        return self.pool_id is not None and self.pool_id != self.preferred_pool

    def to_json(self) -> dict[str, object]:
        """The dry-run endpoint's body (the reference's breakdown and debug shapes, plus the paired node)."""
        return {
            "selected_node_id": self.node_id,
            "best_reason": self.best_reason,
            "preferred_node": self.preferred_node,
            "debug": {
                "mode": self.mode,
                "pool_count": self.pool_count,
                "preferred_pool": self.preferred_pool,
                "selected_pool": self.pool_id,
                "fallback_used": self.fallback_used,
                "truncated": self.truncated,
                "attempts": [[a.pool_id, a.outcome, a.candidates] for a in self.attempts],
            },
            "breakdown": self.breakdown.to_json(),
        }


@lru_cache(maxsize=1024)
def _strides(n: int) -> tuple[int, ...]:
    """Strides that visit every index of a ring of ``n`` exactly once."""
    return tuple(s for s in range(1, max(n, 2)) if gcd(s, n) == 1)


class Selector:
    """Runs selections. Holds only injected collaborators; the fleet comes with each call."""

    def __init__(
        self,
        *,
        rng: random.Random | None = None,
        marks: UnavailableMarks | None = None,
        resource_threshold: float = 85.0,
        scan_budget: int | None = None,
        soft_threshold: bool = False,
        quality: QualityTracker | None = None,
    ) -> None:
        self.rng = rng or random.Random()
        self.marks = marks
        #: nodes ejected for failing their jobs are skipped (core/quality.py)
        self.quality = quality
        self.resource_threshold = resource_threshold
        #: nodes over the threshold are chosen when no node under it passes (see ``select``)
        self.soft_threshold = soft_threshold
        #: stop trying further pools once this many members were looked at (None: try every eligible
        #: pool, which keeps selection complete; a budget bounds the cost of failing at saturation)
        self.scan_budget = scan_budget

    def select(self, view: FleetView, req: SelectionRequest) -> SelectionResult:
        """The node for ``req``. With ``soft_threshold`` the resource threshold is a preference, not a
        bar: when nothing passed and some nodes were refused for being over it, selection runs again
        the normal way (the same sampling and ranking) with the threshold lifted, so one of those nodes
        is chosen (a node's host CPU spikes while it loads models; failing the utterance for that helps
        nobody, and the node's own concurrency limit still holds)."""
        result = self._select(view, req)
        if (
            self.soft_threshold
            and result.node_id is None
            and not result.truncated
            and result.breakdown.counts[RESOURCE_THRESHOLD_EXCEEDED]
            and self.resource_threshold <= 100.0
        ):
            saved = self.resource_threshold
            self.resource_threshold = OVER_ANY_LOAD
            try:
                relaxed = self._select(view, req)
            finally:
                self.resource_threshold = saved
            if relaxed.node_id is not None:
                return relaxed
        return result

    def _select(self, view: FleetView, req: SelectionRequest) -> SelectionResult:
        src, tgt = normalize(req.src_lang), normalize(req.tgt_lang)
        layout = view.layout
        mode = layout.mode
        bd = Breakdown()
        preferred_outcome: str | None = None
        if req.preferred_node is not None:
            preferred_outcome = self._preferred(view, req, src, tgt)
            if preferred_outcome == "used":
                return SelectionResult(req.preferred_node, mode, None, None, 0, (), bd, "used")
            if req.preferred_only:
                return SelectionResult(None, mode, None, None, 0, (), bd, preferred_outcome)
        groups, pool_count, preferred = self._plan(view, req, src, tgt)
        # Pool members serve their pair by construction: the language check only applies elsewhere.
        check_lang = mode != LANGUAGE_PAIR
        attempts: list[Attempt] = []
        # ``view.groups`` holds only groups with a shard: an empty preferred group is named as such
        first: str | None = None if preferred is None or preferred in view.groups else preferred
        d = layout.config.choices
        for sid in self._shards(view, req, groups):
            first = first or sid
            node, attempt = self._try_pool(view.pools[sid], req, src, tgt, check_lang, d, bd)
            attempts.append(attempt)
            if node is not None:
                return SelectionResult(
                    node.node_id, mode, sid, first, pool_count, tuple(attempts), bd, preferred_outcome
                )
            if self.scan_budget is not None and bd.total_nodes + bd.excluded >= self.scan_budget:
                return SelectionResult(
                    None, mode, None, first, pool_count, tuple(attempts), bd, preferred_outcome, True
                )
        return SelectionResult(None, mode, None, first, pool_count, tuple(attempts), bd, preferred_outcome)

    # --- which pools ----------------------------------------------------------------------------

    def _plan(
        self, view: FleetView, req: SelectionRequest, src: str, tgt: str
    ) -> tuple[Iterable[str], int, str | None]:
        """Groups to try (preferred first), how many groups are eligible, and the preferred group."""
        layout = view.layout
        cfg = layout.config
        override = layout.tenant_overrides.get(req.tenant_id or req.routing_key)
        if layout.mode == LANGUAGE_PAIR:
            g = pair_group(src, tgt)
            return ((g,), 1, g) if g in view.groups else ((), 0, None)
        if layout.mode == CAPABILITY:
            eligible = layout.eligible_capability_groups(req.required)
            if not eligible:
                return (), 0, None
            if override is not None and override in eligible:
                idx = eligible.index(override)
            elif cfg.session_affinity:
                idx = pick_index_for_key(len(eligible), cfg.hash_seed, req.routing_key)
            else:
                idx = int(self.rng.random() * len(eligible))
            ring = iter_ring(eligible, idx) if cfg.fallback else (eligible[idx],)
            return ring, len(eligible), eligible[idx]
        assert layout.mode == HASH
        n = cfg.pool_count
        if override is not None and override in layout.group_ids:
            b = layout.group_ids.index(override)
        elif cfg.session_affinity:
            b = pool_id_for_key(n, cfg.hash_seed, req.routing_key)
        else:
            b = int(self.rng.random() * n)
        order = probe_order(n, b) if cfg.fallback else [b]
        return (hash_group(i) for i in order), n, hash_group(b)

    def _shards(self, view: FleetView, req: SelectionRequest, groups: Iterable[str]) -> Iterator[str]:
        cfg = view.layout.config
        override = view.layout.tenant_overrides.get(req.tenant_id or req.routing_key)
        for g in groups:
            shards = view.groups.get(g)
            if not shards:
                continue
            if override is not None and override in shards:
                start = shards.index(override)
            elif cfg.session_affinity:
                start = pick_index_for_key(len(shards), cfg.hash_seed, req.routing_key)
            else:
                start = int(self.rng.random() * len(shards))
            yield from iter_ring(shards, start)

    # --- inside a pool --------------------------------------------------------------------------

    def _try_pool(
        self,
        pool: Pool,
        req: SelectionRequest,
        src: str,
        tgt: str,
        check_lang: bool,
        d: int,
        total: Breakdown,
    ) -> tuple[NodeView | None, Attempt]:
        views = pool.views
        n = len(views)
        if pool.ready == 0:
            # Published counts say no member is READY (offline nodes are never members): skip in O(1).
            total.counts[STATUS_NOT_READY] += n
            return None, Attempt(pool.pool_id, REASONS[STATUS_NOT_READY], n)
        tries = max(d, SAMPLE_TRIES)
        rand = self.rng.random
        idx = int(rand() * n)
        strides = _strides(n)
        step = strides[int(rand() * len(strides))]
        exclude = req.exclude
        reject = self._reject
        best: NodeView | None = None
        best_key = (0, 0.0)
        passed = visited = excluded = refused = 0
        rejected: list[int] = []
        for _ in range(n):
            nv = views[idx]
            idx += step
            if idx >= n:
                idx -= n
            visited += 1
            if exclude and nv.node_id in exclude:
                excluded += 1
                if nv.node_id in req.refused:
                    refused += 1
                continue
            reason = reject(nv, req, src, tgt, check_lang)
            if reason is None:
                load = nv.load
                key = (load.effective, load.cpu)
                if best is None or key < best_key:
                    best, best_key = nv, key
                passed += 1
                if passed >= d:
                    break
            else:
                rejected.append(reason)
            if passed and visited >= tries:
                break
        total.eligible += passed
        total.excluded += excluded
        total.refused += refused
        counts = total.counts
        for r in rejected:
            counts[r] += 1
        candidates = visited - excluded
        if best is not None:
            return best, Attempt(pool.pool_id, "ok", candidates)
        if not rejected:
            return None, Attempt(pool.pool_id, "excluded", 0)
        local = [0] * len(REASONS)
        for r in rejected:
            local[r] += 1
        return None, Attempt(pool.pool_id, REASONS[local.index(max(local))], candidates)

    def _preferred(self, view: FleetView, req: SelectionRequest, src: str, tgt: str) -> str:
        nid = req.preferred_node
        assert nid is not None
        if nid in req.exclude:
            return "excluded"
        nv = view.nodes.get(nid)
        if nv is None:
            return "unknown_node"
        reason = self._reject(nv, req, src, tgt, True, req.bind_preferred)
        return "used" if reason is None else REASONS[reason]

    def _reject(
        self,
        nv: NodeView,
        req: SelectionRequest,
        src: str,
        tgt: str,
        check_lang: bool,
        ignore_capacity: bool = False,
    ) -> int | None:
        """The first filter ``nv`` fails (an index into ``REASONS``), or None when it passes them all."""
        st = nv.status
        if st is not NodeStatus.READY:
            return OFFLINE if st is NodeStatus.OFFLINE else STATUS_NOT_READY
        if self.quality and self.quality.blocks(nv.node_id):
            return EJECTED
        if not nv.has_gpu:
            return GPU_UNAVAILABLE
        if req.accept_public and not nv.accept_public_jobs:
            return NOT_IN_PUBLIC_POOL
        caps = nv.caps
        if not req.required <= caps.ready_types or (req.features and not req.features <= caps.features):
            return MODEL_NOT_AVAILABLE
        if self.marks and self.marks.blocks(nv.node_id, caps, req.required):
            return SERVICE_UNAVAILABLE
        if check_lang:
            reason = _language_reason(nv, req.required, src, tgt)
            if reason is not None:
                return reason
        for a, b in req.also_serves:
            reason = _language_reason(nv, req.required, a, b)
            if reason is not None:
                return reason
        load = nv.load
        if not ignore_capacity and load.effective >= nv.max_concurrent_jobs:
            return CAPACITY_EXCEEDED
        if load.over_threshold(self.resource_threshold):
            return RESOURCE_THRESHOLD_EXCEEDED
        return None


def _language_reason(nv: NodeView, required: frozenset[ServiceType], src: str, tgt: str) -> int | None:
    """Language filters for the required stages; with all three this equals ``Capabilities.serves_pair``."""
    caps = nv.caps
    auto = src == AUTO
    if ServiceType.ASR in required:
        if auto:
            if not (caps.language_id and caps.asr_languages):
                return SRC_AUTO_NO_CANDIDATE
        elif src not in caps.asr_languages:
            return ASR_LANG_UNSUPPORTED
    if ServiceType.NMT in required:
        ok = caps.translates_into(tgt) if auto else caps.translates(src, tgt)
        if not ok:
            return LANG_PAIR_UNSUPPORTED
    if ServiceType.TTS in required and tgt not in caps.tts_languages:
        return TTS_LANG_UNSUPPORTED
    return None


def commit(view: FleetView, node_id: str) -> int | None:
    """Count a dispatch on the chosen node's live load (selection itself never does).

    Returns the load token to pass to ``NodeLoad.finished`` when the job ends; None for an unknown node.
    """
    nv = view.nodes.get(node_id)
    if nv is None:
        return None
    return nv.load.dispatched()
