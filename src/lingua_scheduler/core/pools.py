"""Pools: which nodes belong together, as derived state of their capabilities and status.

Owns: ``Pool`` (one immutable published shard: members and readiness counts), ``PoolLayout`` (the pool
configuration compiled once: node -> groups, request -> eligible groups) and ``PoolIndex`` (the
publisher's private, mutable working copy of membership that it turns into new ``Pool`` objects).

A *group* is a logical pool: a directed language pair ``"zh->en"`` (language_pair mode), a configured
pool id (capability mode) or a hash bucket ``"hash-3"`` (hash mode). Every group is split into shards of
at most ``max_pool_size`` members, published as pools ``"<group>#<k>"``, in every mode: a change of a
node then re-copies only the shards holding it (at most ``max_pool_size`` entries each), never a whole
pool, and probing a pool in selection is bounded by the shard size. A node joins the lowest shard with
room and keeps it for as long as it stays in the group; an emptied shard is dropped and its index reused.

Offline nodes leave their pools (their record may be kept for hours for a reconnect); registering,
degraded and draining nodes stay members but are not counted ready, so selection skips them.

Must never: read the clock, do I/O, or touch nodes other than the ones it is told changed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from lingua_scheduler.config import PoolsConfig
from lingua_scheduler.core.capabilities import Capabilities
from lingua_scheduler.core.hashing import pick_index_for_key
from lingua_scheduler.core.node_view import NodeView
from lingua_scheduler.core.status import NodeStatus
from lingua_scheduler.protocol.common import CORE_SERVICE_TYPES, ServiceType

LANGUAGE_PAIR = "language_pair"
CAPABILITY = "capability"
HASH = "hash"


def pair_group(src: str, tgt: str) -> str:
    return f"{src}->{tgt}"


def hash_group(bucket: int) -> str:
    return f"hash-{bucket}"


def shard_id(group: str, k: int) -> str:
    return f"{group}#{k}"


@dataclass(frozen=True, slots=True)
class Pool:
    """One published shard of a group. ``members`` is a tuple so selection can index it at random;
    ``views`` holds the members' ``NodeView``s of the same fleet view, in the same order, so probing a
    member costs no map lookup."""

    pool_id: str
    group: str
    members: tuple[str, ...]
    views: tuple[NodeView, ...]
    #: members whose status is READY
    ready: int = 0
    #: READY members whose service of that type is ready
    asr_ready: int = 0
    nmt_ready: int = 0
    tts_ready: int = 0

    def core_ready(self, t: ServiceType) -> int | None:
        """Ready count for a core type; ``None`` for the types not counted (tone, semantic)."""
        if t is ServiceType.ASR:
            return self.asr_ready
        if t is ServiceType.NMT:
            return self.nmt_ready
        if t is ServiceType.TTS:
            return self.tts_ready
        return None


#: what a node adds to its shards' counts: (ready, asr ready, nmt ready, tts ready), each 0 or 1
Contribution = tuple[int, int, int, int]
NO_CONTRIBUTION: Contribution = (0, 0, 0, 0)


def contribution(status: NodeStatus, caps: Capabilities) -> Contribution:
    if status is not NodeStatus.READY:
        return NO_CONTRIBUTION
    rt = caps.ready_types
    return (1, int(ServiceType.ASR in rt), int(ServiceType.NMT in rt), int(ServiceType.TTS in rt))


def parse_service_types(names: Iterable[str]) -> frozenset[ServiceType]:
    """Configured type names, case-insensitive; unknown names are ignored (as by the reference)."""
    known = {t.value for t in ServiceType}
    return frozenset(ServiceType(n.strip().lower()) for n in names if n.strip().lower() in known)


@dataclass(frozen=True, slots=True)
class CapabilityPool:
    pool_id: str
    name: str
    #: empty = wildcard
    required: frozenset[ServiceType]


class PoolLayout:
    """The pool configuration compiled for the hot paths. Treated as immutable once built."""

    def __init__(self, config: PoolsConfig) -> None:
        self.config = config
        self.mode = config.mode
        self.capability_pools: tuple[CapabilityPool, ...] = tuple(
            sorted(
                (
                    CapabilityPool(p.pool_id, p.name, parse_service_types(p.required_services))
                    for p in config.pools
                ),
                key=lambda p: p.pool_id,
            )
        )
        self._by_id = {p.pool_id: p for p in self.capability_pools}
        self.tenant_overrides: Mapping[str, str] = MappingProxyType(
            {o.tenant_id: o.pool_id for o in config.tenant_overrides}
        )
        if self.mode == CAPABILITY:
            self.group_ids: tuple[str, ...] = tuple(p.pool_id for p in self.capability_pools)
        elif self.mode == HASH:
            self.group_ids = tuple(hash_group(b) for b in range(config.pool_count))
        else:
            self.group_ids = ()  # language pairs appear with the nodes that serve them
        # request scope -> eligible groups; a handful of distinct scopes exist, so this stays tiny
        self._eligible: dict[frozenset[ServiceType], tuple[str, ...]] = {}

    # --- node -> groups -------------------------------------------------------------------------

    def groups_for(self, node_id: str, status: NodeStatus, caps: Capabilities) -> frozenset[str]:
        """The groups a node belongs to. Offline nodes belong to none."""
        if status is NodeStatus.OFFLINE:
            return frozenset()
        if self.mode == CAPABILITY:
            match = self.capability_match(node_id, caps.installed_types)
            return frozenset() if match is None else frozenset((match,))
        if self.mode == HASH:
            return frozenset(
                (hash_group(pick_index_for_key(self.config.pool_count, self.config.hash_seed, node_id)),)
            )
        return frozenset(pair_group(s, t) for s, t in caps.served_pairs())

    def capability_match(self, node_id: str, installed: frozenset[ServiceType]) -> str | None:
        """The most specific pool whose required types are all installed (any status), as the reference
        matches; ties by stable hash of the node id."""
        best: list[str] = []
        best_spec = -1
        for p in self.capability_pools:  # sorted by id, so ``best`` stays sorted
            if not p.required <= installed:
                continue
            spec = len(p.required)
            if spec > best_spec:
                best, best_spec = [p.pool_id], spec
            elif spec == best_spec:
                best.append(p.pool_id)
        if not best:
            return None
        return best[pick_index_for_key(len(best), self.config.hash_seed, node_id)]

    def capability_pool(self, pool_id: str) -> CapabilityPool | None:
        return self._by_id.get(pool_id)

    # --- request -> groups (capability mode) ----------------------------------------------------

    def eligible_capability_groups(self, required: frozenset[ServiceType]) -> tuple[str, ...]:
        """Pools eligible for the required types (``pool_match_scope`` / ``pool_match_mode``, as in the
        reference); sorted ids. Empty only with strict eligibility."""
        scope = required if self.config.pool_match_scope == "all_required" else required & CORE_SERVICE_TYPES
        cached = self._eligible.get(scope)
        if cached is not None:
            return cached
        exact = self.config.pool_match_mode == "exact"
        out = tuple(
            p.pool_id
            for p in self.capability_pools
            if not scope or not p.required or (p.required == scope if exact else scope <= p.required)
        )
        if not out and not self.config.strict_pool_eligibility:
            out = self.group_ids
        self._eligible[scope] = out
        return out


DEFAULT_LAYOUT = PoolLayout(PoolsConfig())


class _Shard:
    __slots__ = ("counts", "members")

    def __init__(self) -> None:
        #: insertion-ordered; the value is the member's current NodeView (None until ``set_view``)
        self.members: dict[str, NodeView | None] = {}
        self.counts = [0, 0, 0, 0]

    def add_counts(self, c: Contribution, sign: int) -> None:
        for i in range(4):
            self.counts[i] += sign * c[i]


class _Group:
    __slots__ = ("not_full", "shards")

    def __init__(self) -> None:
        self.shards: dict[int, _Shard] = {}
        #: shard indices below the size cap, so placing a node does not scan every shard
        self.not_full: set[int] = set()


@dataclass(frozen=True, slots=True)
class PoolChanges:
    """What one drain of the index changed, for the publisher's copy-on-write."""

    pools: dict[str, Pool | None]  # None = shard removed
    groups: dict[str, tuple[str, ...] | None]  # None = group has no shard left


class PoolIndex:
    """Mutable membership, owned by the single publisher. Work is proportional to the nodes updated."""

    def __init__(self, max_pool_size: int) -> None:
        self.max_pool_size = max_pool_size
        self._groups: dict[str, _Group] = {}
        #: node -> {group: shard index}
        self._assigned: dict[str, dict[str, int]] = {}
        self._contrib: dict[str, Contribution] = {}
        self._touched: set[tuple[str, int]] = set()
        self._touched_groups: set[str] = set()

    def update(self, node_id: str, groups: frozenset[str], contrib: Contribution) -> bool:
        """Set a node's groups and counts contribution; returns whether its membership changed."""
        old = self._assigned.get(node_id, {})
        old_c = self._contrib.get(node_id, NO_CONTRIBUTION)
        new: dict[str, int] = {}
        for g, k in old.items():
            shard = self._groups[g].shards[k]
            if g in groups:
                new[g] = k
                if contrib != old_c:
                    shard.add_counts(old_c, -1)
                    shard.add_counts(contrib, 1)
                    self._touched.add((g, k))
            else:
                self._remove(node_id, g, k, old_c)
        for g in groups:
            if g not in new:
                new[g] = self._place(node_id, g, contrib)
        if new:
            self._assigned[node_id] = new
            self._contrib[node_id] = contrib
        else:
            self._assigned.pop(node_id, None)
            self._contrib.pop(node_id, None)
        return old.keys() != new.keys()

    def set_view(self, node_id: str, view: NodeView) -> None:
        """The node's new ``NodeView``: the shards holding it are republished with it."""
        for g, k in self._assigned.get(node_id, {}).items():
            self._groups[g].shards[k].members[node_id] = view
            self._touched.add((g, k))

    def pools_of(self, node_id: str) -> tuple[str, ...]:
        return tuple(sorted(shard_id(g, k) for g, k in self._assigned.get(node_id, {}).items()))

    def _place(self, node_id: str, g: str, c: Contribution) -> int:
        group = self._groups.get(g)
        if group is None:
            group = self._groups[g] = _Group()
        if group.not_full:
            k = min(group.not_full)
        else:  # every shard is full: open the lowest free index
            k = next(i for i in range(len(group.shards) + 1) if i not in group.shards)
            group.shards[k] = _Shard()
            group.not_full.add(k)
            self._touched_groups.add(g)
        shard = group.shards[k]
        shard.members[node_id] = None
        shard.add_counts(c, 1)
        if len(shard.members) >= self.max_pool_size:
            group.not_full.discard(k)
        self._touched.add((g, k))
        return k

    def _remove(self, node_id: str, g: str, k: int, c: Contribution) -> None:
        group = self._groups[g]
        shard = group.shards[k]
        del shard.members[node_id]
        shard.add_counts(c, -1)
        self._touched.add((g, k))
        if shard.members:
            group.not_full.add(k)
            return
        # An empty shard is dropped so listings and selection never see it; its index is reused.
        del group.shards[k]
        group.not_full.discard(k)
        self._touched_groups.add(g)
        if not group.shards:
            del self._groups[g]

    def drain(self) -> PoolChanges:
        """New ``Pool`` objects for the shards touched since the last drain, one copy per shard."""
        pools: dict[str, Pool | None] = {}
        for g, k in self._touched:
            sid = shard_id(g, k)
            group = self._groups.get(g)
            shard = group.shards.get(k) if group is not None else None
            if shard is None:
                pools[sid] = None
                continue
            r, a, n, t = shard.counts
            # every member has its view by now: the publisher calls set_view after each update
            views = tuple(shard.members.values())
            pools[sid] = Pool(sid, g, tuple(shard.members), views, r, a, n, t)  # type: ignore[arg-type]
        groups: dict[str, tuple[str, ...] | None] = {}
        for g in self._touched_groups:
            group = self._groups.get(g)
            groups[g] = tuple(shard_id(g, k) for k in sorted(group.shards)) if group is not None else None
        self._touched.clear()
        self._touched_groups.clear()
        return PoolChanges(pools, groups)

    def validate(self) -> None:
        """Invariants: every assignment points at a shard holding the node; shards within the cap."""
        for node_id, assigned in self._assigned.items():
            for g, k in assigned.items():
                assert node_id in self._groups[g].shards[k].members, f"{node_id} missing from {g}#{k}"
        for g, group in self._groups.items():
            assert group.shards, f"empty group {g} kept"
            for k, shard in group.shards.items():
                assert 0 < len(shard.members) <= self.max_pool_size, f"{g}#{k} has {len(shard.members)}"
                assert (k in group.not_full) == (len(shard.members) < self.max_pool_size), f"{g}#{k} room"
                counts = [0, 0, 0, 0]
                for m in shard.members:
                    assert self._assigned[m][g] == k
                    for i, v in enumerate(self._contrib[m]):
                        counts[i] += v
                assert counts == shard.counts, f"{g}#{k} counts {shard.counts} != {counts}"


def pool_listing(
    layout: PoolLayout,
    groups: Mapping[str, tuple[str, ...]],
    pools: Mapping[str, Pool],
    samples: int = 5,
) -> dict[str, object]:
    """JSON-ready listing for the HTTP API: each logical pool with its shards, counts and sample ids.

    Configured capability pools and hash buckets are listed even when empty.
    """
    out: list[dict[str, object]] = []
    for g in sorted(set(groups) | set(layout.group_ids)):
        shards = [pools[s] for s in groups.get(g, ())]
        sample: list[str] = []
        for p in shards:
            sample.extend(p.members[: samples - len(sample)])
        entry: dict[str, object] = {
            "pool_id": g,
            "shards": [p.pool_id for p in shards],
            "members": sum(len(p.members) for p in shards),
            "ready": sum(p.ready for p in shards),
            "asr_ready": sum(p.asr_ready for p in shards),
            "nmt_ready": sum(p.nmt_ready for p in shards),
            "tts_ready": sum(p.tts_ready for p in shards),
            "sample_node_ids": sample,
        }
        cap = layout.capability_pool(g)
        if cap is not None:
            entry["name"] = cap.name
            entry["required_services"] = sorted(t.value for t in cap.required)
        out.append(entry)
    return {
        "mode": layout.mode,
        "max_pool_size": layout.config.max_pool_size,
        "pool_count": len(out),
        "shard_count": len(pools),
        "pools": out,
    }
