"""The published fleet view: an immutable, versioned picture of the fleet that readers never wait for.

Owns ``FleetView`` (every ``NodeView`` of a version, see node_view.py, plus the pools, the group ->
shards index and the compiled pool layout) and ``FleetViewPublisher``, the single writer that turns the
registry's dirty set into a new view and keeps pool membership (derived state, see pools.py) current on
the way.

Readers (selection, HTTP API) take ``publisher.view`` -- one reference -- and use it without any lock.
Publication is incremental: only nodes whose version changed get a new ``NodeView``, and only the pool
shards holding those nodes get a new ``Pool``; everything else is shared with the previous view. The
node and pool maps are ``ChunkedMap``s, so a new version copies the chunks it changes, not the map. A node's
pools are recomputed only when its capabilities (by value) or its status changed, or when the pool
configuration changes (``set_pool_config``). A node's load is the live ``NodeLoad`` cell it points to,
so load changes need no publication at all.

Must never: be written by anyone but the publisher, mutate a published view, or read the clock other
than through the injected ``Clock``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from lingua_scheduler.clock import Clock
from lingua_scheduler.config import PoolsConfig
from lingua_scheduler.core.node_view import ChunkedMap, NodeView
from lingua_scheduler.core.pools import (
    DEFAULT_LAYOUT,
    Pool,
    PoolIndex,
    PoolLayout,
    contribution,
    pool_listing,
)
from lingua_scheduler.core.registry import NodeEntry, Registry
from lingua_scheduler.core.status import NodeStatus
from lingua_scheduler.protocol.common import ServiceType

CORE_ORDER = (ServiceType.ASR, ServiceType.NMT, ServiceType.TTS)
_EMPTY_POOLS: Mapping[str, Pool] = MappingProxyType({})
_EMPTY_GROUPS: Mapping[str, tuple[str, ...]] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class FleetView:
    version: int
    published_at: float
    nodes: Mapping[str, NodeView]
    #: pool (shard) id -> pool
    pools: Mapping[str, Pool] = field(default_factory=lambda: _EMPTY_POOLS)
    #: group (language pair, capability pool id, hash bucket) -> its shard ids, by shard index
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: _EMPTY_GROUPS)
    #: the pool configuration this view was built with
    layout: PoolLayout = field(default=DEFAULT_LAYOUT)

    def get(self, node_id: str) -> NodeView | None:
        return self.nodes.get(node_id)

    def pool_listing(self, samples: int = 5) -> dict[str, object]:
        """JSON-ready pools, counts and sample node ids for ``GET /api/v1/pools``."""
        return pool_listing(self.layout, self.groups, self.pools, samples)


EMPTY_VIEW = FleetView(version=0, published_at=0.0, nodes=MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class PublishStats:
    changed: int
    #: seconds between the oldest change in this batch and its publication
    lag: float
    #: nodes whose pool membership changed in this batch
    reassigned: int = 0


class FleetViewPublisher:
    """Single writer of the fleet view. ``publish()`` is called by the reconciler, never by readers."""

    def __init__(
        self,
        registry: Registry,
        clock: Clock,
        max_concurrent_jobs: int,
        *,
        pools_config: PoolsConfig | None = None,
    ) -> None:
        self.registry = registry
        self.clock = clock
        self.max_concurrent_jobs = max_concurrent_jobs
        self.layout = PoolLayout(pools_config) if pools_config is not None else DEFAULT_LAYOUT
        self._index = PoolIndex(self.layout.config.max_pool_size)
        self.view: FleetView = FleetView(0, 0.0, ChunkedMap(), layout=self.layout)
        self._nodes: ChunkedMap[NodeView] = ChunkedMap()
        self._pools: ChunkedMap[Pool] = ChunkedMap()
        self._groups: dict[str, tuple[str, ...]] = {}
        self.publishes = 0
        self.last_lag = 0.0
        #: node pool-membership changes (join, leave, move); exported as lingua_pool_reassignments_total
        self.reassignments = 0

    def node_view(self, entry: NodeEntry, pools: tuple[str, ...] = ()) -> NodeView:
        return NodeView(
            node_id=entry.node_id,
            version=entry.version_no,
            status=entry.status,
            caps=entry.caps,
            has_gpu=entry.has_gpu,
            accept_public_jobs=entry.accept_public_jobs,
            # the node's declared slots, else the scheduler's default
            max_concurrent_jobs=entry.max_concurrent_jobs or self.max_concurrent_jobs,
            load=entry.load,
            pools=pools,
            owner=entry.owner,
        )

    def view_age(self) -> float:
        """Staleness of the view: age of the oldest change not yet published (0 when current)."""
        oldest = self.registry.oldest_dirty()
        return 0.0 if oldest is None else max(0.0, self.clock.monotonic() - oldest)

    def publish(self) -> PublishStats | None:
        """Fold every dirty node into a new view; ``None`` when nothing changed (no new version)."""
        dirty = self.registry.take_dirty()
        if not dirty:
            return None
        now = self.clock.monotonic()
        nodes = self._nodes.evolver()  # copies only the chunks it writes; unchanged NodeViews are shared
        changed = reassigned = 0
        for node_id in dirty:
            entry = self.registry.nodes.get(node_id)
            old = nodes.get(node_id)
            if entry is None:
                if old is not None:
                    nodes.delete(node_id)
                    changed += 1
                    reassigned += self._index.update(node_id, frozenset(), (0, 0, 0, 0))
                continue
            if old is not None and old.version == entry.version_no and old.load is entry.load:
                continue
            pools = old.pools if old is not None else ()
            # Pool work only for a real change of what pools depend on: a reconnect that merely
            # replaced the load cell keeps the node's pools as they are.
            if (
                old is None
                or old.status is not entry.status
                or (old.caps is not entry.caps and old.caps != entry.caps)
            ):
                reassigned += self._assign(entry)
                pools = self._index.pools_of(node_id)
            nv = self.node_view(entry, pools)
            nodes.set(node_id, nv)
            self._index.set_view(node_id, nv)
            changed += 1
        lag = now - min(dirty.values())
        self.last_lag = lag
        self.reassignments += reassigned
        if changed:
            self._nodes = nodes.build()
            self._swap(now, self._apply_pool_changes())
        return PublishStats(changed, lag, reassigned)

    def set_pool_config(self, config: PoolsConfig) -> PublishStats:
        """Adopt a new pool configuration: rebuild every pool from scratch and publish at once.

        O(fleet): the one place where all nodes are reassigned, as a configuration change requires.
        """
        now = self.clock.monotonic()
        dirty = self.registry.take_dirty()
        self.layout = PoolLayout(config)
        self._index = PoolIndex(config.max_pool_size)
        self._pools, self._groups = ChunkedMap(), {}
        old_nodes = self._nodes
        nodes = ChunkedMap[NodeView]().evolver()
        reassigned = 0
        for entry in self.registry:
            self._assign(entry)
            pools = self._index.pools_of(entry.node_id)
            old = old_nodes.get(entry.node_id)
            reassigned += old is None or old.pools != pools
            nv = self.node_view(entry, pools)
            nodes.set(entry.node_id, nv)
            self._index.set_view(entry.node_id, nv)
        self._nodes = nodes.build()
        reassigned += sum(1 for nid, nv in old_nodes.items() if nv.pools and nid not in self._nodes)
        self.reassignments += reassigned
        self._apply_pool_changes()
        self._swap(now, True)
        lag = now - min(dirty.values()) if dirty else 0.0
        return PublishStats(len(self._nodes), lag, reassigned)

    def _assign(self, entry: NodeEntry) -> bool:
        groups = self.layout.groups_for(entry.node_id, entry.status, entry.caps)
        return self._index.update(entry.node_id, groups, contribution(entry.status, entry.caps))

    def _apply_pool_changes(self) -> bool:
        """Copy-on-write of the pool maps, only when some shard changed."""
        changes = self._index.drain()
        if not changes.pools and not changes.groups:
            return False
        pools = self._pools.evolver()
        for sid, pool in changes.pools.items():
            if pool is None:
                pools.delete(sid)
            else:
                pools.set(sid, pool)
        self._pools = pools.build()
        if changes.groups:
            groups = dict(self._groups)  # one entry per language pair or configured pool: small
            for g, shards in changes.groups.items():
                if shards is None:
                    groups.pop(g, None)
                else:
                    groups[g] = shards
            self._groups = groups
        return True

    def _swap(self, now: float, pools_changed: bool) -> None:
        prev = self.view
        self.publishes += 1
        self.view = FleetView(
            version=prev.version + 1,
            published_at=now,
            nodes=self._nodes,
            pools=self._pools if pools_changed else prev.pools,
            groups=MappingProxyType(self._groups) if pools_changed else prev.groups,
            layout=self.layout,
        )

    def age(self) -> float:
        """Seconds since the view was published (0 before the first publication)."""
        if self.view.version == 0:
            return 0.0
        return self.clock.monotonic() - self.view.published_at

    def validate(self) -> None:
        """Pool membership matches capabilities and status, and counts match members (tests call this)."""
        self._index.validate()
        view = self.view
        assert set(view.nodes) == set(self.registry.nodes), "view and registry disagree on the node set"
        members: dict[str, set[str]] = {}
        for sid, pool in view.pools.items():
            assert sid in view.groups.get(pool.group, ()), f"{sid} not indexed under {pool.group}"
            for nid, nv in zip(pool.members, pool.views, strict=True):
                members.setdefault(nid, set()).add(sid)
                assert nv is view.nodes[nid], f"{sid} holds a stale view of {nid}"
            ready = [view.nodes[m] for m in pool.members if view.nodes[m].status is NodeStatus.READY]
            expect = [len(ready)] + [sum(t in n.caps.ready_types for n in ready) for t in CORE_ORDER]
            assert [pool.ready, pool.asr_ready, pool.nmt_ready, pool.tts_ready] == expect, sid
        for nid, nv in view.nodes.items():
            assert set(nv.pools) == members.get(nid, set()), f"{nid}: pools {nv.pools} != members"
            groups = self.layout.groups_for(nid, nv.status, nv.caps)
            assert {self.view.pools[s].group for s in nv.pools} == groups, f"{nid} in the wrong groups"
            if not self.registry.dirty_count:
                assert nv.version == self.registry.nodes[nid].version_no, f"{nid} stale but not dirty"
