"""Selection: filters and their breakdown, power-of-d, paired node, exclusions, marks, JSON shapes."""

from __future__ import annotations

import random

from lingua_scheduler.core.selection import REASONS, Breakdown, SelectionRequest, Selector, commit
from lingua_scheduler.protocol.common import ServiceType
from tests.core.conftest import FleetFactory, Spec, spec

T = ServiceType


def test_each_filter_is_counted(make_fleet: FleetFactory) -> None:
    f = make_fleet()
    f.add("registering", ready=False)
    f.add("draining")
    f.registry.drain("draining")
    f.add("private", spec(accept_public=False))
    f.add("no-tts", spec(not_ready=frozenset({T.TTS})))
    f.add("full", running=4)
    f.add("hot", cpu=90.0)
    f.add("marked")
    f.marks.mark("marked", "nmt-m2m100")
    f.publish()
    r = f.select("zh", "en")
    assert r.node_id is None
    bd = r.breakdown.to_json()
    assert bd["total_nodes"] == 7 and bd["eligible"] == 0
    expect = {
        "status_not_ready": 2,
        "not_in_public_pool": 1,
        "model_not_available": 1,
        "service_unavailable": 1,
        "capacity_exceeded": 1,
        "resource_threshold_exceeded": 1,
    }
    assert {k: v for k, v in bd.items() if k in REASONS and v} == expect
    assert r.best_reason == "status_not_ready"  # largest count
    # a private job may use the private node
    assert f.select("zh", "en", accept_public=False).node_id == "private"


def test_breakdown_adds_up_and_ties_keep_reference_order() -> None:
    bd = Breakdown()
    assert bd.best_reason() == "no_nodes"
    bd.counts[REASONS.index("capacity_exceeded")] = 2
    bd.counts[REASONS.index("not_in_public_pool")] = 2
    bd.eligible = 1
    assert bd.total_nodes == 5 and bd.best_reason() == "not_in_public_pool"
    out = bd.to_json()
    assert list(out)[:3] == ["total_nodes", "offline", "status_not_ready"]
    assert out["total_nodes"] == sum(out[r] for r in REASONS) + out["eligible"]
    only_excluded = Breakdown()
    only_excluded.excluded = 1
    assert only_excluded.best_reason() == "excluded"


def test_quick_skip_of_a_pool_without_ready_nodes(make_fleet: FleetFactory) -> None:
    f = make_fleet()
    for i in range(5):
        f.add(f"r{i}", ready=False)
    r = f.select("zh", "en")
    assert r.node_id is None and r.breakdown.count("status_not_ready") == 5
    assert [(a.pool_id, a.outcome, a.candidates) for a in r.attempts] == [("zh->en#0", "status_not_ready", 5)]


def test_power_of_d_prefers_lower_load(make_fleet: FleetFactory) -> None:
    f = make_fleet()
    f.add("busy", running=3)
    f.add("idle", running=0)
    assert {f.select("zh", "en").node_id for _ in range(50)} == {"idle"}
    f.heartbeat("idle", running=3, cpu=50.0)  # equal load: lower cpu wins
    assert {f.select("zh", "en").node_id for _ in range(50)} == {"busy"}


def test_power_of_d_spreads_over_a_large_pool(make_fleet: FleetFactory) -> None:
    f = make_fleet()
    f.add_many("n", 60)
    picks = [f.select("zh", "en").node_id for _ in range(600)]
    assert len(set(picks)) > 40
    r = f.select("zh", "en")
    assert r.attempts[0].candidates == 2  # d = 2 passed at once: no more visits than needed


def test_commit_counts_a_dispatch_and_selection_never_does(make_fleet: FleetFactory) -> None:
    f = make_fleet(max_jobs=2)
    f.add("a")
    for _ in range(5):
        f.select("zh", "en")
    assert f.view.nodes["a"].load.effective == 0
    for _ in range(2):
        r = f.select("zh", "en")
        assert r.node_id == "a" and commit(f.view, "a") is not None
    r = f.select("zh", "en")
    assert r.node_id is None and r.best_reason == "capacity_exceeded"
    assert commit(f.view, "ghost") is None


def test_paired_node_used_only_when_it_passes_every_filter(make_fleet: FleetFactory) -> None:
    f = make_fleet()
    f.add("a")
    f.add("b")
    for _ in range(10):
        r = f.select("zh", "en", preferred_node="b")
        assert r.node_id == "b" and r.preferred_node == "used" and r.attempts == ()
    f.heartbeat("b", running=4)
    r = f.select("zh", "en", preferred_node="b")
    assert r.node_id == "a" and r.preferred_node == "capacity_exceeded"
    r = f.select("fr", "en", preferred_node="a")
    assert r.node_id is None and r.preferred_node == "asr_lang_unsupported"
    assert f.select("zh", "en", preferred_node="nope").preferred_node == "unknown_node"
    r = f.select("zh", "en", preferred_node="a", exclude=frozenset({"a"}))
    assert r.preferred_node == "excluded" and r.node_id is None


def test_excluded_nodes_are_skipped_and_counted_apart(make_fleet: FleetFactory) -> None:
    f = make_fleet()
    f.add("a")
    f.add("b")
    for _ in range(10):
        r = f.select("zh", "en", exclude=frozenset({"a"}))
        assert r.node_id == "b"
    r = f.select("zh", "en", exclude=frozenset({"a", "b"}))
    assert r.node_id is None and r.best_reason == "excluded"
    assert r.breakdown.excluded == 2 and r.breakdown.total_nodes == 0


def test_refused_nodes_are_counted_only_when_the_selection_comes_upon_them(make_fleet: FleetFactory) -> None:
    """A node refused elsewhere (another language pair's pool) is not this request's busy node: only
    the excluded nodes named as refused that the selection examined count as ``refused``."""
    f = make_fleet()
    f.add("a")
    f.add("b")
    f.add("fr", Spec(langs=("fr", "de")))
    r = f.select("zh", "en", exclude=frozenset({"a", "b", "fr"}), refused=frozenset({"fr"}))
    assert r.node_id is None and r.breakdown.excluded == 2 and r.breakdown.refused == 0
    r = f.select("zh", "en", exclude=frozenset({"a", "b", "fr"}), refused=frozenset({"b", "fr"}))
    assert r.node_id is None and r.breakdown.excluded == 2 and r.breakdown.refused == 1


def test_unavailable_mark_excludes_then_expires(make_fleet: FleetFactory) -> None:
    f = make_fleet(unavailable_ttl_seconds=30.0)
    f.add("a")
    f.marks.mark("a", "tts-piper")
    r = f.select("zh", "en")
    assert r.node_id is None and r.best_reason == "service_unavailable"
    # a request that does not need TTS is not affected
    assert f.select("zh", "en", required=frozenset({T.ASR, T.NMT})).node_id == "a"
    f.clock.advance(29.9)
    assert f.select("zh", "en").node_id is None
    f.clock.advance(0.2)
    assert f.select("zh", "en").node_id == "a"
    assert len(f.marks) == 0


def test_unavailable_marks_need_every_service_of_the_type() -> None:
    from lingua_scheduler.clock import ManualClock
    from lingua_scheduler.core.capabilities import Capabilities
    from lingua_scheduler.core.unavailable import UnavailableMarks

    clock = ManualClock()
    marks = UnavailableMarks(clock, 10.0)
    caps = Capabilities(service_types=(("asr-1", T.ASR), ("asr-2", T.ASR), ("tts-1", T.TTS)))
    marks.mark("n", "asr-1")
    assert not marks.blocks("n", caps, {T.ASR})
    marks.mark("n", "asr-2")
    assert marks.blocks("n", caps, {T.ASR}) and not marks.blocks("n", caps, {T.TTS})
    marks.mark("other", "x")
    clock.advance(11)
    assert marks.purge() == 3 and len(marks) == 0
    marks.mark("n", "tts-1")
    marks.clear("n", "tts-1")
    marks.mark("m", "tts-1")
    marks.clear("m")
    assert len(marks) == 0


def test_features_are_required(make_fleet: FleetFactory) -> None:
    f = make_fleet()
    f.add("plain", spec(features=frozenset()))
    r = f.select("zh", "en", features=frozenset({"emotion_detection"}))
    assert r.node_id is None and r.best_reason == "model_not_available"
    f.add("emo")
    assert f.select("zh", "en", features=frozenset({"emotion_detection"})).node_id == "emo"


def test_fallback_over_shards_of_the_pair(make_fleet: FleetFactory) -> None:
    f = make_fleet(max_pool_size=2)
    f.add_many("n", 6, running=4)  # all full
    f.heartbeat("n5", running=0)
    for _ in range(10):
        r = f.select("zh", "en")
        assert r.node_id == "n5"
        assert r.pool_id == "zh->en#2" and len(r.attempts) <= 3
    r = f.select("zh", "en", exclude=frozenset({"n5"}))
    assert r.node_id is None and len(r.attempts) == 3
    assert r.breakdown.total_nodes == 5 and r.breakdown.excluded == 1


def test_scan_budget_stops_a_failing_selection_early(make_fleet: FleetFactory) -> None:
    f = make_fleet(max_pool_size=5)
    f.add_many("n", 50, running=4)  # ten full shards
    r = f.select("zh", "en")
    assert r.node_id is None and len(r.attempts) == 10 and not r.truncated
    r = Selector(scan_budget=12).select(f.view, SelectionRequest("zh", "en"))
    assert r.node_id is None and r.truncated and len(r.attempts) == 3
    assert r.to_json()["debug"]["truncated"] is True  # type: ignore[index]


def test_language_pair_affinity_picks_a_stable_shard(make_fleet: FleetFactory) -> None:
    f = make_fleet(max_pool_size=2, session_affinity=True)
    f.add_many("n", 8)
    assert len({f.select("zh", "en", routing_key="s").pool_id for _ in range(20)}) == 1


def test_dry_run_json_shape(make_fleet: FleetFactory) -> None:
    f = make_fleet()
    f.add("a")
    out = f.select("zh", "en").to_json()
    assert out["selected_node_id"] == "a" and out["best_reason"] == "ok"
    debug = out["debug"]
    assert debug == {
        "mode": "language_pair",
        "pool_count": 1,
        "preferred_pool": "zh->en#0",
        "selected_pool": "zh->en#0",
        "fallback_used": False,
        "truncated": False,
        "attempts": [["zh->en#0", "ok", 1]],
    }
    none = f.select("ja", "en").to_json()
    assert none["selected_node_id"] is None and none["best_reason"] == "no_nodes"
    assert none["breakdown"]["total_nodes"] == 0  # type: ignore[index]


def test_resource_threshold_is_the_selectors(make_fleet: FleetFactory) -> None:
    """Strict, the threshold excludes. Soft (the dispatcher's), a node over the threshold is passed
    over for one under it, but chosen when every node is over it (a load spike fails no utterance);
    capacity stays a hard limit."""
    f = make_fleet()
    f.add("a", cpu=10.0)
    f.add("b", cpu=90.0)
    req = SelectionRequest("zh", "en")
    assert Selector(resource_threshold=5.0).select(f.view, req).best_reason == "resource_threshold_exceeded"
    for seed in range(20):
        assert Selector(rng=random.Random(seed), soft_threshold=True).select(f.view, req).node_id == "a"
    hot = make_fleet()
    hot.add("x", cpu=95.0)
    hot.add("y", cpu=88.0)
    soft = Selector(rng=random.Random(1), soft_threshold=True)
    assert soft.select(hot.view, req).node_id == "y"  # the least loaded
    hot.heartbeat("y", running=4, cpu=88.0)
    hot.heartbeat("x", running=4, cpu=95.0)
    r = soft.select(hot.view, req)
    assert r.node_id is None and r.best_reason == "capacity_exceeded"


def test_bound_preferred_node_keeps_a_chain_even_at_capacity(make_fleet: FleetFactory) -> None:
    f = make_fleet()
    f.add("a")
    f.add("b")
    f.heartbeat("b", running=4)
    assert f.select("zh", "en", preferred_node="b").node_id == "a"  # soft affinity gives way
    r = f.select("zh", "en", preferred_node="b", bind_preferred=True)
    assert r.node_id == "b" and r.preferred_node == "used"
    # bound or not, a node that cannot serve the pair is not used
    r = f.select("fr", "en", preferred_node="b", bind_preferred=True)
    assert r.node_id is None and r.preferred_node == "asr_lang_unsupported"


def test_also_serves_needs_both_directions(make_fleet: FleetFactory) -> None:
    f = make_fleet(mode="hash", pool_count=1)
    f.add("en-tts-only", spec(asr=("zh", "en"), tts=("en",)))
    f.add("both", spec())
    for _ in range(10):
        r = f.select("zh", "en", also_serves=(("en", "zh"),))
        assert r.node_id == "both"
    assert f.select("zh", "en", exclude=frozenset({"both"})).node_id == "en-tts-only"
    r = f.select("zh", "en", also_serves=(("en", "zh"),), exclude=frozenset({"both"}))
    assert r.node_id is None and r.breakdown.count("tts_lang_unsupported") == 1
