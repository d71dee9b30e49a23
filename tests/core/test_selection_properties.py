"""Property tests: random fleets (built and then changed through real messages) and random requests.

Checked against an oracle written independently of selection.py:
- a returned node passes every filter;
- a node is returned whenever some node of the eligible pools (or the paired node) passes every filter;
- the breakdown adds up; incremental pool maintenance equals what the capabilities say (validate());
- a node reachable by several language pairs is found for each of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hypothesis import given, settings
from hypothesis import strategies as st

from lingua_scheduler.config import CapabilityPoolConfig, PoolsConfig
from lingua_scheduler.core.node_view import NodeView
from lingua_scheduler.core.selection import REASONS, SelectionRequest, SelectionResult
from lingua_scheduler.core.status import NodeStatus
from lingua_scheduler.protocol.common import ServiceType
from tests.core.conftest import SERVICE_IDS, Fleet, Spec

T = ServiceType
LANGS = ("en", "zh", "de", "fr")
CORE = frozenset({T.ASR, T.NMT, T.TTS})
THRESHOLD = 85.0
MAX_JOBS = 3

langs = st.lists(st.sampled_from(LANGS), max_size=3, unique=True).map(tuple)
types = st.sets(st.sampled_from([T.ASR, T.NMT, T.TTS, T.TONE]))


@st.composite
def random_specs(draw: st.DrawFn) -> Spec:
    return Spec(
        asr=draw(langs),
        tts=draw(langs),
        nmt=draw(langs),
        nmt_rule=draw(st.sampled_from(["any_to_any", "any_to_en", "en_to_any"])),
        services=tuple(sorted(draw(types))),
        not_ready=frozenset(draw(st.sets(st.sampled_from([T.ASR, T.NMT, T.TTS]), max_size=1))),
        accept_public=draw(st.booleans()),
        features=frozenset(draw(st.sets(st.sampled_from(["emotion_detection", "speaker_identification"])))),
    )


@st.composite
def capable_specs(draw: st.DrawFn) -> Spec:
    """Nodes that serve several pairs end to end: most requests then have candidates to find."""
    return Spec(
        langs=tuple(draw(st.lists(st.sampled_from(LANGS), min_size=2, max_size=4, unique=True))),
        tts=draw(
            st.none() | st.lists(st.sampled_from(LANGS), min_size=1, max_size=3, unique=True).map(tuple)
        ),
        services=(T.ASR, T.NMT, T.TTS, T.TONE) if draw(st.booleans()) else (T.ASR, T.NMT, T.TTS),
        accept_public=draw(st.sampled_from([True, True, False])),
        features=frozenset(draw(st.sets(st.sampled_from(["emotion_detection", "speaker_identification"])))),
    )


specs = st.one_of(capable_specs(), capable_specs(), random_specs())


@dataclass(frozen=True)
class NodePlan:
    spec: Spec
    state: str  # ready | registering | draining | offline
    running: int
    cpu: float
    marked: ServiceType | None


node_plans = st.builds(
    NodePlan,
    spec=specs,
    state=st.sampled_from(["ready"] * 5 + ["registering", "draining", "offline"]),
    running=st.integers(0, MAX_JOBS + 1),
    cpu=st.sampled_from([5.0, 50.0, 90.0]),
    marked=st.sampled_from([None, None, None, None, None, T.ASR, T.NMT, T.TTS]),
)


@st.composite
def pool_configs(draw: st.DrawFn) -> PoolsConfig:
    modes: list[Literal["language_pair", "capability", "hash"]] = [
        "language_pair",
        "language_pair",
        "hash",
        "capability",
    ]
    mode = draw(st.sampled_from(modes))
    pools = [
        CapabilityPoolConfig(pool_id=f"p{i}", required_services=sorted(t.value for t in draw(types)))
        for i in range(draw(st.integers(1, 3)))
    ]
    return PoolsConfig(
        mode=mode,
        max_pool_size=draw(st.sampled_from([1, 2, 3, 100])),
        pool_count=draw(st.integers(1, 4)),
        hash_seed=draw(st.integers(0, 2**64 - 1)),
        pools=pools,
        pool_match_mode=draw(st.sampled_from(["contains", "exact"])),
        session_affinity=draw(st.booleans()),
        choices=draw(st.integers(1, 3)),
        fallback=True,
    )


requests = st.builds(
    SelectionRequest,
    src_lang=st.sampled_from((*LANGS, "auto")),
    tgt_lang=st.sampled_from(LANGS),
    required=st.sampled_from([CORE, CORE, frozenset({T.ASR, T.NMT}), frozenset({T.ASR}), CORE | {T.TONE}]),
    features=st.sampled_from([frozenset(), frozenset({"emotion_detection"})]),
    routing_key=st.sampled_from(["t1", "t2", "s-42"]),
    preferred_node=st.none() | st.sampled_from([f"n{i}" for i in range(4)]),
    exclude=st.frozensets(st.sampled_from([f"n{i}" for i in range(10)]), max_size=2),
    accept_public=st.booleans(),
)


def build(
    config: PoolsConfig, plans: list[NodePlan], changes: list[tuple[int, NodePlan]], seed: int
) -> Fleet:
    """Register everything, publish, then apply changes (capabilities, status, load) and publish again."""
    f = Fleet(pools=config, max_jobs=MAX_JOBS, seed=seed)
    for i, p in enumerate(plans):
        apply(f, f"n{i}", p, new=True)
    f.publish()
    for i, p in changes:
        if i < len(plans):
            apply(f, f"n{i}", p, new=False)
    f.publish()
    f.validate()
    return f


def apply(f: Fleet, nid: str, p: NodePlan, new: bool) -> None:
    if new:
        f.add(nid, p.spec, ready=False, publish=False)
    elif f.registry.nodes[nid].status is NodeStatus.OFFLINE:
        f.specs[nid] = p.spec
        f.reconnect(nid)
    if p.state != "registering" or not new:
        f.heartbeat(nid, p.spec, running=p.running, cpu=p.cpu)
    if p.state == "draining":
        f.registry.drain(nid)
    elif p.state == "offline":
        f.disconnect(nid)
    if p.marked is not None:
        f.mark(nid, SERVICE_IDS[p.marked])


def passes(f: Fleet, nv: NodeView, req: SelectionRequest) -> bool:
    """The oracle: every filter, written from the documented rules rather than from selection.py."""
    caps, load = nv.caps, nv.load
    marked = {sid for nid, sid in f.marked if nid == nv.node_id}
    fully_marked = {
        t
        for t in T
        if any(s == t for _, s in caps.service_types)
        and all(sid in marked for sid, s in caps.service_types if s == t)
    }
    return (
        nv.node_id not in req.exclude
        and f.registry.nodes[nv.node_id].status is NodeStatus.READY
        and nv.has_gpu
        and (nv.accept_public_jobs or not req.accept_public)
        and req.required <= caps.ready_types
        and req.features <= caps.features
        and not (fully_marked & req.required)
        and speaks(nv, req)
        and load.effective < MAX_JOBS
        and max(load.cpu, load.mem, load.gpu or 0.0) < THRESHOLD
    )


def speaks(nv: NodeView, req: SelectionRequest) -> bool:
    """Language filters, stage by stage, for the stages the request needs."""
    caps, src, tgt = nv.caps, req.src_lang, req.tgt_lang
    auto = src == "auto"
    if T.ASR in req.required:
        if auto and not (caps.language_id and caps.asr_languages):
            return False
        if not auto and src not in caps.asr_languages:
            return False
    if T.NMT in req.required:
        sources = caps.asr_languages if auto else {src}
        if not any(caps.translates(s, tgt) for s in sources):
            return False
    return T.TTS not in req.required or tgt in caps.tts_languages


def eligible_members(f: Fleet, req: SelectionRequest) -> set[str]:
    v, layout = f.view, f.view.layout
    if layout.mode == "language_pair":
        groups: tuple[str, ...] = (f"{req.src_lang}->{req.tgt_lang}",)
    elif layout.mode == "capability":
        groups = layout.eligible_capability_groups(req.required)
    else:
        groups = layout.group_ids
    return {m for g in groups for s in v.groups.get(g, ()) for m in v.pools[s].members}


def check_result(f: Fleet, req: SelectionRequest, r: SelectionResult) -> None:
    bd = r.breakdown
    assert bd.total_nodes == sum(bd.counts) + bd.eligible
    assert sum(a.candidates for a in r.attempts) == bd.total_nodes
    assert all(a.outcome in (*REASONS, "ok", "unknown", "excluded", "no_nodes") for a in r.attempts)
    assert r.to_json()["breakdown"]["total_nodes"] == bd.total_nodes  # type: ignore[index]
    view = f.view
    if r.node_id is not None:
        assert passes(f, view.nodes[r.node_id], req), r.to_json()
        assert r.node_id == req.preferred_node or r.node_id in eligible_members(f, req)
    pref = view.nodes.get(req.preferred_node) if req.preferred_node else None
    if pref is not None and passes(f, pref, req):
        assert r.node_id == req.preferred_node
    if any(passes(f, view.nodes[m], req) for m in eligible_members(f, req)):
        assert r.node_id is not None, r.to_json()
    else:
        assert r.node_id is None or r.node_id == req.preferred_node


@settings(max_examples=150, deadline=None)
@given(
    config=pool_configs(),
    plans=st.lists(node_plans, min_size=1, max_size=10),
    changes=st.lists(st.tuples(st.integers(0, 9), node_plans), max_size=4),
    reqs=st.lists(requests, min_size=1, max_size=6),
    seed=st.integers(0, 1000),
)
def test_selection_is_sound_and_complete(
    config: PoolsConfig,
    plans: list[NodePlan],
    changes: list[tuple[int, NodePlan]],
    reqs: list[SelectionRequest],
    seed: int,
) -> None:
    f = build(config, plans, changes, seed)
    for req in reqs:
        check_result(f, req, f.selector.select(f.view, req))


@settings(max_examples=60, deadline=None)
@given(
    star=st.lists(st.sampled_from(LANGS), min_size=2, max_size=4, unique=True),
    plans=st.lists(node_plans, max_size=6),
    max_pool_size=st.sampled_from([1, 2, 100]),
    seed=st.integers(0, 1000),
)
def test_node_reachable_by_several_pairs_is_found_for_each(
    star: list[str], plans: list[NodePlan], max_pool_size: int, seed: int
) -> None:
    f = build(PoolsConfig(max_pool_size=max_pool_size), plans, [], seed)
    f.add("star", Spec(langs=tuple(star), accept_public=True))
    caps = f.view.nodes["star"].caps
    pairs = caps.served_pairs()
    assert len(pairs) >= len(star) * (len(star) - 1)  # every ordered pair, plus auto -> each
    for src, tgt in pairs:
        groups = {f.view.pools[s].group for s in f.view.nodes["star"].pools}
        assert f"{src}->{tgt}" in groups
        req = SelectionRequest(src, tgt, exclude=frozenset(f"n{i}" for i in range(len(plans))))
        r = f.selector.select(f.view, req)
        assert r.node_id == "star", (src, tgt, r.to_json())
        check_result(f, req, r)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(9, 40),
    free=st.sets(st.integers(0, 39), max_size=3),
    exclude=st.sets(st.integers(0, 39), max_size=2),
    max_pool_size=st.sampled_from([7, 100]),
    choices=st.integers(1, 3),
    seed=st.integers(0, 1000),
)
def test_large_pools_with_rare_free_nodes(
    n: int, free: set[int], exclude: set[int], max_pool_size: int, choices: int, seed: int
) -> None:
    """Random probing alone would miss a lone free node in a big shard; the bounded scan must not."""
    f = Fleet(pools=PoolsConfig(max_pool_size=max_pool_size, choices=choices), max_jobs=MAX_JOBS, seed=seed)
    for i in range(n):
        f.add(f"n{i}", publish=False, running=0 if i in free else MAX_JOBS)
    f.publish()
    req = SelectionRequest("zh", "en", exclude=frozenset(f"n{i}" for i in exclude))
    r = f.selector.select(f.view, req)
    check_result(f, req, r)
    reachable = {f"n{i}" for i in free if i < n} - req.exclude
    assert (r.node_id is not None) == bool(reachable)
    assert r.node_id is None or r.node_id in reachable
