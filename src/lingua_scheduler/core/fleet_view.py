"""The published fleet view: an immutable, versioned picture of the fleet that readers never wait for.

Owns: ``NodeView`` (one node's capabilities, status and pools at a version), ``FleetView`` (all of them
plus the pool index) and ``FleetViewPublisher``, the single writer that turns the registry's dirty set
into a new view.

Readers (selection, HTTP API) take ``publisher.view`` -- one reference -- and use it without any lock.
Publication is incremental: only nodes whose version changed get a new ``NodeView``; everything else
is shared with the previous view. A node's load is the live ``NodeLoad`` cell it points to, so load
changes need no publication at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from lingua_scheduler.clock import Clock
from lingua_scheduler.core.capabilities import Capabilities
from lingua_scheduler.core.load import NodeLoad
from lingua_scheduler.core.registry import NodeEntry, Registry
from lingua_scheduler.core.status import NodeStatus


@dataclass(frozen=True, slots=True)
class NodeView:
    node_id: str
    version: int
    status: NodeStatus
    caps: Capabilities
    has_gpu: bool
    accept_public_jobs: bool
    max_concurrent_jobs: int
    #: live load cell shared with the registry (see load.py)
    load: NodeLoad
    #: pools this node is a member of in this view
    pools: tuple[str, ...] = ()
    #: instance owning the node's socket (None = this instance)
    owner: str | None = None


@dataclass(frozen=True, slots=True)
class FleetView:
    version: int
    published_at: float
    nodes: Mapping[str, NodeView]
    #: pool id -> pool, filled by the pool index (pools.py)
    pools: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))

    def get(self, node_id: str) -> NodeView | None:
        return self.nodes.get(node_id)


EMPTY_VIEW = FleetView(version=0, published_at=0.0, nodes=MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class PublishStats:
    changed: int
    #: seconds between the oldest change in this batch and its publication
    lag: float


class FleetViewPublisher:
    """Single writer of the fleet view. ``publish()`` is called by the reconciler, never by readers."""

    def __init__(self, registry: Registry, clock: Clock, max_concurrent_jobs: int) -> None:
        self.registry = registry
        self.clock = clock
        self.max_concurrent_jobs = max_concurrent_jobs
        self.view: FleetView = EMPTY_VIEW
        self._nodes: dict[str, NodeView] = {}
        self.publishes = 0
        self.last_lag = 0.0

    def node_view(self, entry: NodeEntry, pools: tuple[str, ...] = ()) -> NodeView:
        return NodeView(
            node_id=entry.node_id,
            version=entry.version_no,
            status=entry.status,
            caps=entry.caps,
            has_gpu=entry.has_gpu,
            accept_public_jobs=entry.accept_public_jobs,
            max_concurrent_jobs=self.max_concurrent_jobs,
            load=entry.load,
            pools=pools,
        )

    def publish(self) -> PublishStats | None:
        """Fold every dirty node into a new view; ``None`` when nothing changed (no new version)."""
        dirty = self.registry.take_dirty()
        if not dirty:
            return None
        now = self.clock.monotonic()
        nodes = dict(self._nodes)  # pointer copy; unchanged NodeViews are shared
        changed = 0
        for node_id in dirty:
            entry = self.registry.nodes.get(node_id)
            old = nodes.get(node_id)
            if entry is None:
                if old is not None:
                    del nodes[node_id]
                    changed += 1
                continue
            if old is not None and old.version == entry.version_no and old.load is entry.load:
                continue
            nodes[node_id] = self.node_view(entry)
            changed += 1
        lag = now - min(dirty.values())
        self.last_lag = lag
        if changed:
            self._nodes = nodes
            self.publishes += 1
            self.view = FleetView(version=self.view.version + 1, published_at=now,
                                  nodes=MappingProxyType(nodes))
        return PublishStats(changed, lag)

    def age(self) -> float:
        """Seconds since the view was published (0 before the first publication)."""
        if self.view.version == 0:
            return 0.0
        return self.clock.monotonic() - self.view.published_at
