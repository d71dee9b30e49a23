"""Pool membership as derived state: hashing, the three modes, shards, incremental publication."""

from __future__ import annotations

from lingua_scheduler.config import CapabilityPoolConfig, PoolsConfig, TenantOverride
from lingua_scheduler.core.hashing import (
    fnv1a64,
    fnv1a64_bytes,
    iter_ring,
    pick_index_for_key,
    pool_id_for_key,
    probe_order,
    ring_order,
)
from lingua_scheduler.core.pools import PoolLayout, hash_group
from lingua_scheduler.core.status import NodeStatus
from lingua_scheduler.protocol.common import ServiceType
from tests.core.conftest import Fleet, FleetFactory, spec

T = ServiceType
CORE_TYPES = (T.ASR, T.NMT, T.TTS)

# --- hashing -----------------------------------------------------------------------------------------


def test_fnv1a64_standard_vectors() -> None:
    assert fnv1a64_bytes(b"") == 0xCBF29CE484222325
    assert fnv1a64_bytes(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a64_bytes(b"foobar") == 0x85944171F73967E8


def test_fnv1a64_appends_seed_little_endian() -> None:
    assert fnv1a64("node-1", 0) == fnv1a64_bytes(b"node-1" + bytes(8))
    assert fnv1a64("n\u00e9", 258) == fnv1a64_bytes("n\u00e9".encode() + b"\x02\x01" + bytes(6))


def test_hash_helpers_stable_and_seed_sensitive() -> None:
    keys = [f"tenant-{i}" for i in range(200)]
    assert [pool_id_for_key(16, 7, k) for k in keys] == [pool_id_for_key(16, 7, k) for k in keys]
    assert [pool_id_for_key(16, 7, k) for k in keys] != [pool_id_for_key(16, 8, k) for k in keys]
    assert all(0 <= pick_index_for_key(5, 0, k) < 5 for k in keys)
    assert len({pool_id_for_key(16, 0, k) for k in keys}) == 16  # spreads over every bucket
    assert pick_index_for_key(0, 0, "x") == 0 and pool_id_for_key(0, 0, "x") == 0


def test_probe_and_ring_order() -> None:
    assert probe_order(4, 6) == [2, 3, 0, 1]
    assert probe_order(0, 3) == []
    assert ring_order(["a", "b", "c"], 4) == ["b", "c", "a"]
    assert list(iter_ring([], 3)) == []


# --- language_pair mode ------------------------------------------------------------------------------


def test_language_pair_membership_covers_every_served_pair(make_fleet: FleetFactory) -> None:
    f = make_fleet()
    f.add("tri", spec(["de", "en", "zh"]))
    f.add("mono", spec(["en"], asr=("en",), tts=("en", "de"), nmt=("en", "de")))
    v = f.view
    groups = {v.pools[s].group for s in v.nodes["tri"].pools}
    pairs = {f"{a}->{b}" for a in ("de", "en", "zh") for b in ("de", "en", "zh") if a != b}
    assert groups == pairs | {"auto->de", "auto->en", "auto->zh"}  # 3 ASR languages: language id
    # one ASR language: no language identification, so no auto pools
    assert {v.pools[s].group for s in v.nodes["mono"].pools} == {"en->de"}
    assert set(v.pools["en->de#0"].members) == {"tri", "mono"}
    f.validate()


def test_node_with_three_languages_serves_each_pair(make_fleet: FleetFactory) -> None:
    f = make_fleet()
    f.add("tri", spec(["de", "en", "zh"]))
    f.add("other", spec(["fr", "es"]))
    for src, tgt in [("zh", "en"), ("en", "de"), ("de", "zh"), ("zh-CN", "EN")]:
        r = f.select(src, tgt)
        assert r.node_id == "tri", (src, tgt, r.to_json())
    assert f.select("fr", "zh").node_id is None


def test_src_auto_routes_to_nodes_with_language_identification(make_fleet: FleetFactory) -> None:
    f = make_fleet()
    f.add("single", spec(["ja"], tts=("en",), nmt=("ja", "en")))  # one ASR language: no language id
    assert f.select("auto", "en").node_id is None
    f.add("multi", spec(["ja", "en", "ko"]))
    r = f.select("auto", "en")
    assert r.node_id == "multi" and r.pool_id == "auto->en#0"


def test_shards_split_at_max_pool_size_and_stay_stable(make_fleet: FleetFactory) -> None:
    f = make_fleet(max_pool_size=3)
    ids = f.add_many("n", 7, spec(["zh", "en"]))
    v = f.view
    assert v.groups["zh->en"] == ("zh->en#0", "zh->en#1", "zh->en#2")
    assert [len(v.pools[s].members) for s in v.groups["zh->en"]] == [3, 3, 1]
    where = {n: v.nodes[n].pools for n in ids}
    # two members of shard 0 leave: nobody else moves, and the next node fills shard 0 first
    f.disconnect("n0")
    f.disconnect("n1")
    v = f.publish()
    assert all(v.nodes[n].pools == where[n] for n in ids[2:])
    assert v.nodes["n0"].pools == ()
    f.add("late", spec(["zh", "en"]))
    assert "zh->en#0" in f.view.nodes["late"].pools
    # a shard that empties is dropped, and its index is reused
    f.disconnect("n6")
    v = f.publish()
    assert v.groups["zh->en"] == ("zh->en#0", "zh->en#1") and "zh->en#2" not in v.pools
    f.validate()


def test_many_nodes_many_shards_each_pool_bounded(make_fleet: FleetFactory) -> None:
    f = make_fleet(max_pool_size=10)
    f.add_many("n", 95, spec(["zh", "en", "de"]))
    v = f.view
    assert len(v.groups["zh->en"]) == 10
    assert all(len(p.members) <= 10 for p in v.pools.values())
    assert sum(p.ready for p in v.pools.values() if p.group == "zh->en") == 95
    f.validate()


def test_reassignment_counter_ignores_load_and_counts_language_change(make_fleet: FleetFactory) -> None:
    f = make_fleet()
    f.add("a", spec(["zh", "en"]))
    base, version = f.publisher.reassignments, f.view.version
    assert base == 1  # joining counts
    for running in range(4):  # load-only heartbeats do not even dirty the node
        f.heartbeat("a", running=running, cpu=10.0 * running)
    assert f.publisher.publish() is None
    assert f.publisher.reassignments == base and f.view.version == version
    assert f.view.nodes["a"].load.reported_running == 3
    f.heartbeat("a", spec(["zh", "en", "de"]))  # a language is added: real capability change
    stats = f.publisher.publish()
    assert stats is not None and stats.reassigned == 1
    assert f.publisher.reassignments == base + 1
    assert "de->en#0" in f.view.nodes["a"].pools
    f.validate()


def test_status_change_updates_counts_not_membership(make_fleet: FleetFactory) -> None:
    f = make_fleet()
    f.add("a")
    f.add("b")
    before = f.publisher.reassignments
    f.registry.drain("a")
    v = f.publish()
    assert f.publisher.reassignments == before
    assert v.nodes["a"].status is NodeStatus.DRAINING
    assert v.nodes["a"].pools == ("auto->en#0", "auto->zh#0", "en->zh#0", "zh->en#0")
    assert v.pools["zh->en#0"].ready == 1 and len(v.pools["zh->en#0"].members) == 2
    f.validate()


def test_offline_nodes_leave_pools_and_rejoin(make_fleet: FleetFactory) -> None:
    f = make_fleet()
    f.add("a")
    f.disconnect("a")
    v = f.publish()
    assert v.nodes["a"].pools == () and "zh->en" not in v.groups
    assert f.select("zh", "en").node_id is None
    f.reconnect("a")
    v = f.publish()
    assert v.nodes["a"].pools == ("auto->en#0", "auto->zh#0", "en->zh#0", "zh->en#0")
    assert f.select("zh", "en").node_id == "a"
    f.validate()


def test_core_readiness_counts(make_fleet: FleetFactory) -> None:
    f = make_fleet()
    f.add("full")
    f.add("no-tts", spec(not_ready=frozenset({T.TTS})))
    p = f.view.pools["zh->en#0"]
    assert (len(p.members), p.ready, p.asr_ready, p.nmt_ready, p.tts_ready) == (2, 2, 2, 2, 1)
    assert p.core_ready(T.TTS) == 1 and p.core_ready(T.TONE) is None


def test_publication_is_copy_on_write_per_shard(make_fleet: FleetFactory) -> None:
    f = make_fleet()
    f.add("zh", spec(["zh", "en"]))
    f.add("de", spec(["de", "fr"]))
    v1 = f.view
    f.heartbeat("zh", spec(["zh", "en", "ja"]))
    v2 = f.publish()
    assert v2.pools["de->fr#0"] is v1.pools["de->fr#0"]  # untouched shard shared
    assert v2.nodes["de"] is v1.nodes["de"]
    assert "ja->en#0" in v2.pools and "ja->en#0" not in v1.pools  # old view unchanged
    f.validate()


# --- capability mode ---------------------------------------------------------------------------------

CAP_POOLS = [
    CapabilityPoolConfig(pool_id="any", required_services=[]),
    CapabilityPoolConfig(pool_id="asr", required_services=["ASR"]),
    CapabilityPoolConfig(pool_id="full-a", required_services=["asr", "nmt", "tts"]),
    CapabilityPoolConfig(pool_id="full-b", required_services=["asr", "nmt", "tts", "bogus"]),
    CapabilityPoolConfig(pool_id="tone", required_services=["asr", "nmt", "tts", "tone"]),
]


def cap_fleet(make_fleet: FleetFactory, **kw: object) -> Fleet:
    return make_fleet(mode="capability", pools=CAP_POOLS, **kw)


def test_capability_membership_most_specific_with_stable_tie_break(make_fleet: FleetFactory) -> None:
    f = cap_fleet(make_fleet)
    layout = f.publisher.layout
    f.add("asr-only", spec(services=(T.ASR,)))
    f.add("toned", spec(services=(*CORE_TYPES, T.TONE)))
    full = [f.add(f"full{i}", publish=False) for i in range(40)]
    v = f.publish()
    assert v.nodes["asr-only"].pools == ("asr#0",)
    assert v.nodes["toned"].pools == ("tone#0",)
    # "bogus" is ignored, so full-a and full-b tie at 3: stable hash of the node id over sorted ids
    for n in full:
        expect = ["full-a", "full-b"][pick_index_for_key(2, 0, n)]
        assert v.nodes[n].pools == (f"{expect}#0",)
        assert layout.capability_match(n, frozenset(CORE_TYPES)) == expect
    assert {v.pools[s].group for n in full for s in v.nodes[n].pools} == {"full-a", "full-b"}
    f.validate()


def test_capability_eligibility_scope_and_mode() -> None:
    base = PoolsConfig(mode="capability", pools=CAP_POOLS)
    lay = PoolLayout(base)
    core = frozenset(CORE_TYPES)
    assert lay.eligible_capability_groups(core) == ("any", "full-a", "full-b", "tone")
    assert lay.eligible_capability_groups(frozenset({T.ASR})) == ("any", "asr", "full-a", "full-b", "tone")
    # core_only ignores tone; all_required keeps it
    assert lay.eligible_capability_groups(core | {T.TONE}) == ("any", "full-a", "full-b", "tone")
    all_req = PoolLayout(PoolsConfig(mode="capability", pools=CAP_POOLS, pool_match_scope="all_required"))
    assert all_req.eligible_capability_groups(core | {T.TONE}) == ("any", "tone")
    exact = PoolLayout(PoolsConfig(mode="capability", pools=CAP_POOLS, pool_match_mode="exact"))
    assert exact.eligible_capability_groups(core) == ("any", "full-a", "full-b")
    assert exact.eligible_capability_groups(frozenset()) == ("any", "asr", "full-a", "full-b", "tone")


def test_capability_no_eligible_pool_strict_fails_else_all(make_fleet: FleetFactory) -> None:
    pools = [CapabilityPoolConfig(pool_id="asr", required_services=["asr"])]
    for strict in (True, False):
        f = make_fleet(
            mode="capability", pools=pools, pool_match_mode="exact", strict_pool_eligibility=strict
        )
        f.add("a", spec(services=(T.ASR,)))
        r = f.select("zh", "zh", required=frozenset({T.ASR, T.TTS}))
        if strict:
            assert r.node_id is None and r.pool_count == 0 and r.attempts == ()
            assert r.best_reason == "no_nodes"
        else:  # every pool is tried; this node lacks TTS, so it is excluded for that reason
            assert r.node_id is None and r.pool_count == 1
            assert r.best_reason == "model_not_available"
            assert f.select("zh", "zh", required=frozenset({T.ASR})).node_id == "a"


def test_capability_tenant_override_and_fallback(make_fleet: FleetFactory) -> None:
    pools = [
        CapabilityPoolConfig(pool_id="p1", required_services=["asr", "nmt", "tts"]),
        CapabilityPoolConfig(pool_id="p2", required_services=["asr", "nmt", "tts", "tone"]),
    ]
    overrides = [TenantOverride(tenant_id="acme", pool_id="p2")]
    f = make_fleet(mode="capability", pools=pools, tenant_overrides=overrides)
    f.add("plain")
    f.add("toned", spec(services=(*CORE_TYPES, T.TONE)))
    for _ in range(20):
        r = f.select("zh", "en", routing_key="acme")
        assert r.node_id == "toned" and r.preferred_pool == "p2#0" and not r.fallback_used
        assert f.select("zh", "en", routing_key="x", tenant_id="acme").node_id == "toned"
    # preferred pool cannot serve: fallback moves on to the next pool in ring order
    f.heartbeat("toned", running=4)
    r = f.select("zh", "en", routing_key="acme")
    assert r.node_id == "plain" and r.fallback_used
    assert [a.outcome for a in r.attempts] == ["capacity_exceeded", "ok"]
    f.publisher.set_pool_config(
        PoolsConfig(mode="capability", pools=pools, tenant_overrides=overrides, fallback=False)
    )
    assert f.select("zh", "en", routing_key="acme").node_id is None
    f.validate()


def test_capability_affinity_is_stable(make_fleet: FleetFactory) -> None:
    pools = [CapabilityPoolConfig(pool_id=f"p{i}", required_services=[]) for i in range(4)]
    f = make_fleet(mode="capability", pools=pools, session_affinity=True)
    for i in range(40):
        f.add(f"n{i}", publish=False)
    f.publish()
    for key in ("s1", "s2", "s3"):
        first = {f.select("zh", "en", routing_key=key).pool_id for _ in range(10)}
        assert first == {f"p{pick_index_for_key(4, 0, key)}#0"}


# --- hash mode ---------------------------------------------------------------------------------------


def test_hash_mode_buckets_and_returns_nodes(make_fleet: FleetFactory) -> None:
    f = make_fleet(mode="hash", pool_count=4, hash_seed=99)
    ids = f.add_many("n", 30)
    v = f.view
    for n in ids:
        assert v.nodes[n].pools == (f"{hash_group(pool_id_for_key(4, 99, n))}#0",)
    assert sum(len(p.members) for p in v.pools.values()) == 30
    seen = {f.select("zh", "en").node_id for _ in range(200)}
    assert None not in seen and len(seen) > 10
    # language filters apply in hash pools: nobody speaks fr
    r = f.select("fr", "en")
    assert r.node_id is None and r.best_reason == "asr_lang_unsupported"
    assert len(r.attempts) == 4
    f.validate()


def test_hash_mode_affinity_prefers_key_bucket(make_fleet: FleetFactory) -> None:
    f = make_fleet(mode="hash", pool_count=4, session_affinity=True)
    f.add_many("n", 40)
    b = pool_id_for_key(4, 0, "sess-1")
    assert f.select("zh", "en", routing_key="sess-1").preferred_pool == f"hash-{b}#0"


# --- configuration changes and listings --------------------------------------------------------------


def test_set_pool_config_rebuilds_everything(make_fleet: FleetFactory) -> None:
    f = make_fleet()
    f.add_many("n", 10)
    before = f.publisher.reassignments
    stats = f.publisher.set_pool_config(PoolsConfig(mode="hash", pool_count=2))
    v = f.view
    assert stats.reassigned == 10 and f.publisher.reassignments == before + 10
    assert set(v.groups) <= {"hash-0", "hash-1"} and v.layout.mode == "hash"
    assert f.select("zh", "en").node_id is not None
    f.validate()
    f.publisher.set_pool_config(PoolsConfig(max_pool_size=4))
    assert len(f.view.groups["zh->en"]) == 3
    f.validate()


def test_pool_listing(make_fleet: FleetFactory) -> None:
    f = make_fleet(mode="capability", pools=CAP_POOLS)
    f.add_many("n", 8)
    f.add("half", spec(not_ready=frozenset({T.TTS})))
    listing = f.view.pool_listing(samples=3)
    assert listing["mode"] == "capability" and listing["pool_count"] == 5
    by_id = {p["pool_id"]: p for p in listing["pools"]}  # type: ignore[attr-defined]
    assert by_id["any"]["members"] == 0 and by_id["any"]["shards"] == []
    total = sum(by_id[g]["members"] for g in ("full-a", "full-b"))
    assert total == 9 and sum(by_id[g]["tts_ready"] for g in ("full-a", "full-b")) == 8
    assert all(len(p["sample_node_ids"]) <= 3 for p in by_id.values())
    assert by_id["tone"]["required_services"] == ["asr", "nmt", "tone", "tts"]
