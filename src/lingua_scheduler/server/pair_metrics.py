"""Supply and demand per directed language pair in ``/metrics``, computed when it is scraped.

Owns ``PairMetrics``: the ``lingua_pair_*`` families (label ``pair="src->tgt"``, the same spelling as
the pools and ``/api/v1/stats``) and ``PairLabels``, the bounded set of pairs that get a label value of
their own.

- ``lingua_pair_ready_nodes``: ready members of the pair's pool shards (language_pair mode only);
- ``lingua_pair_free_slots``: ``max_concurrent_jobs_per_node`` minus the load of each ready member,
  summed (language_pair mode only);
- ``lingua_pair_waiting_jobs``: this instance's jobs queued for a node;
- ``lingua_pair_jobs_created_total``: jobs created by this instance;
- ``lingua_pairs_folded``: pairs with supply or demand that have no label value of their own.

Why bounded: sessions choose their languages, so label values must not be theirs to multiply. At most
``admin.max_metric_pairs`` pairs get a label; everything else is summed under ``pair="other"`` (always
exported, so the label set is the same from scrape to scrape). Labels are sticky: a pair keeps its label
while it has supply or demand, and an idle pair loses it only when a new pair needs the room -- so a
series does not come and go at the boundary, and counters stay monotonic: the jobs counter of a
labelled pair counts from the moment it got its label, jobs of unlabelled pairs are added to
``other`` as they happen, never moved out of it.

Cost: read from the published fleet view (pool shards' ready counts and their members' live load
cells), the job store's per-pair waiting counts and the engine's per-pair created counts; nothing
on the heartbeat or job paths, and O(pairs + shards) per scrape. The one figure that needs every pool
member is free slots (a node's load is not in the pool counts): ``FreeSlots`` walks the members in
slices between other work once the fleet is larger than a slice, so a scrape never holds the event
loop for it.

Must never: label by anything a client chose without the bound, or change scheduler state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from lingua_scheduler.core.fleet_view import FleetView
from lingua_scheduler.core.pools import LANGUAGE_PAIR
from lingua_scheduler.core.status import NodeStatus
from lingua_scheduler.server.metrics import gauge

if TYPE_CHECKING:
    from lingua_scheduler.server.state import SchedulerState

#: the label value of every pair without one of its own
OTHER = "other"
#: pool members whose load one event-loop turn reads when free slots are summed (~0.5 ms)
SLICE = 2000


class PairLabels:
    """Which pairs get a label value of their own: at most ``cap``, sticky while they are active."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        #: labelled pairs, in the order they got their label
        self._labelled: dict[str, None] = {}

    def __contains__(self, pair: str) -> bool:
        return pair in self._labelled

    def __iter__(self) -> Iterator[str]:
        return iter(self._labelled)

    def __len__(self) -> int:
        return len(self._labelled)

    def update(self, active: Mapping[str, tuple[int, int]]) -> list[str]:
        """Admit active pairs (pair -> (demand, supply); the most demanded first, then the best
        supplied) while there is room, making room by dropping labelled pairs not in ``active``;
        returns the pairs that lost their label."""
        new = sorted(
            (p for p in active if p not in self._labelled),
            key=lambda p: (-active[p][0], -active[p][1], p),
        )
        if not new:
            return []
        dropped: list[str] = []
        idle = (p for p in list(self._labelled) if p not in active)
        for pair in new:
            if len(self._labelled) >= self.cap:
                victim = next(idle, None)
                if victim is None:
                    break  # every label is in use: the rest stay in "other"
                del self._labelled[victim]
                dropped.append(victim)
            self._labelled[pair] = None
        return dropped


class PairMetrics:
    """Scrape-time collector of the ``lingua_pair_*`` families (register ``collect`` with add_live)."""

    def __init__(self, state: SchedulerState) -> None:
        self.state = state
        self.labels = PairLabels(state.config.admin.max_metric_pairs)
        #: the engine's cumulative per-pair created counts as of the last scrape
        self._seen: dict[str, int] = {}
        #: exported jobs counters: per labelled pair since it got its label, and "other"
        self._created: dict[str, int] = {}
        self._created_other = 0
        self.free_slots = FreeSlots()
        self._view: FleetView | None = None
        self._ready: dict[str, int] = {}
        self._members = 0

    def collect(self) -> Iterable[Metric]:
        state = self.state
        view = state.publisher.view
        if view is not self._view:  # pools change only with a new view: count them once per view
            self._view, self._ready, self._members = view, _ready(view), _memberships(view)
        ready = self._ready
        free = self.free_slots.read(view, self._members)
        waiting = state.engine.store.waiting_by_pair()
        deltas = self._created_deltas(state.engine.created_by_pair)
        # pairs with supply or demand -> (demand: queued jobs + jobs since the last scrape, ready nodes)
        active: dict[str, tuple[int, int]] = {pair: (0, n) for pair, n in ready.items()}
        for counts in (waiting, deltas):
            for pair, n in counts.items():
                demand, supply = active.get(pair, (0, 0))
                active[pair] = (demand + n, supply)
        active.pop(OTHER, None)  # the engine's own overflow bucket is not a pair
        for pair in self.labels.update(active):
            self._created.pop(pair, None)
        labels = self.labels
        for pair, n in deltas.items():
            if pair in labels:
                self._created[pair] = self._created.get(pair, 0) + n
            else:
                self._created_other += n

        def fold(values: Mapping[str, int]) -> dict[str, int]:
            out = dict.fromkeys(labels, 0)
            out[OTHER] = 0
            for pair, v in values.items():
                key = pair if pair in labels else OTHER
                out[key] += v
            return out

        if view.layout.mode == LANGUAGE_PAIR:
            yield _family(
                "lingua_pair_ready_nodes",
                "Ready nodes serving the directed language pair",
                fold(ready),
            )
        if free is not None:
            yield _family(
                "lingua_pair_free_slots",
                "Job slots free on the ready nodes serving the pair (max_concurrent_jobs_per_node - load)",
                fold({p: f for p, f in free.items() if p in ready}),
            )
        yield _family("lingua_pair_waiting_jobs", "Jobs of the pair waiting for a node", fold(waiting))
        created = CounterMetricFamily(
            "lingua_pair_jobs_created",
            "Jobs created for the pair (a labelled pair counts from when it got its label)",
            labels=["pair"],
        )
        for pair in labels:
            created.add_metric([pair], self._created.get(pair, 0))
        created.add_metric([OTHER], self._created_other)
        yield created
        yield gauge(
            "lingua_pairs_folded",
            'Language pairs with supply or demand counted under pair="other" (admin.max_metric_pairs)',
            sum(1 for p in active if p not in labels),
        )

    def _created_deltas(self, counts: Mapping[str, int]) -> dict[str, int]:
        """Jobs created per pair since the last scrape (the engine's counts only grow)."""
        out: dict[str, int] = {}
        seen = self._seen
        for pair, n in counts.items():
            d = n - seen.get(pair, 0)
            if d > 0:
                out[pair] = d
                seen[pair] = n
        return out


def _ready(view: FleetView) -> dict[str, int]:
    """Ready nodes per language-pair group, from the shards' counts (O(shards)); empty in the other
    pool modes (their pools are not pairs)."""
    if view.layout.mode != LANGUAGE_PAIR:
        return {}
    pools = view.pools
    return {
        group: sum(p.ready for p in (pools.get(sid) for sid in shard_ids) if p is not None)
        for group, shard_ids in view.groups.items()
    }


def _memberships(view: FleetView) -> int:
    return sum(len(p.members) for p in view.pools.values())


def _free_slots(view: FleetView) -> Iterator[dict[str, int] | None]:
    """Free job slots per language-pair group: ``max_concurrent_jobs - load`` of each ready member,
    summed. Yields None after every ``SLICE`` members walked (a point to give the loop back), then
    the result."""
    out: dict[str, int] = {}
    budget = SLICE
    ready_status = NodeStatus.READY
    for group, shard_ids in view.groups.items():
        free = 0
        for sid in shard_ids:
            pool = view.pools.get(sid)
            if pool is None or not pool.ready:
                continue
            for nv in pool.views:
                if nv.status is ready_status:
                    free += max(0, nv.max_concurrent_jobs - nv.load.effective)
            budget -= len(pool.views)
            if budget <= 0:
                yield None
                budget = SLICE
        out[group] = free
    yield out


class FreeSlots:
    """Free slots per pair without holding the event loop: a small fleet is walked during the scrape;
    a larger one in slices of ``SLICE`` members between other work, started by a scrape and read by
    the next (so its figures are one scrape old)."""

    def __init__(self) -> None:
        #: None until the first walk has finished (the family is left out rather than shown as 0)
        self.by_pair: dict[str, int] | None = None
        self._walking: asyncio.Task[None] | None = None

    def read(self, view: FleetView, memberships: int) -> dict[str, int] | None:
        """The latest figures; ``memberships``: pool members in ``view`` (decides inline or sliced)."""
        if view.layout.mode != LANGUAGE_PAIR:
            return None
        if memberships <= SLICE:
            for result in _free_slots(view):
                if result is not None:
                    self.by_pair = result
            return self.by_pair
        if self._walking is None or self._walking.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a direct call): nothing to slice the walk with
                for result in _free_slots(view):
                    if result is not None:
                        self.by_pair = result
                return self.by_pair
            self._walking = loop.create_task(self._walk(view), name="pair-free-slots")
        return self.by_pair

    async def _walk(self, view: FleetView) -> None:
        for result in _free_slots(view):
            if result is None:
                await asyncio.sleep(0)
            else:
                self.by_pair = result


def _family(name: str, doc: str, values: Mapping[str, int]) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=["pair"])
    for pair, v in values.items():
        g.add_metric([pair], v)
    return g
