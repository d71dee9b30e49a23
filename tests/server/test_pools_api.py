"""Pools and two-level selection through the real server.

Every scheduler here is a real aiohttp server started with the pool configuration under test; nodes
register through the real ``/ws/node`` endpoint with profiles chosen so that each node's pools are known
in advance, and everything is observed through the HTTP API (``/api/v1/pools``, ``/api/v1/pools/simulate``,
``/api/v1/nodes``, ``/metrics``). The one job of these tests goes through a real ``/ws/session``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from lingua_scheduler.core.hashing import pick_index_for_key, pool_id_for_key, probe_order
from lingua_scheduler.core.status import NodeStatus
from lingua_scheduler.sim.nodes import Behavior, Executor, SimulatedNode
from lingua_scheduler.sim.profiles import NodeProfile
from tests.conftest import MS, RunningScheduler, eventually

NodeFactory = Callable[..., SimulatedNode]

FAST_VIEW = {"fleet_view_interval_ms": 10}
#: a simulated node heartbeats on its own only this rarely: load changes happen when a test sends them
QUIET = 3600.0

#: capability mode with three configured pools; ``pool_match_scope = all_required`` so that a request
#: needing semantic repair (or tone) is eligible only for the pool that requires it
CAPABILITY_POOLS: dict[str, Any] = {
    "mode": "capability",
    "pool_match_scope": "all_required",
    "pools": [
        {"pool_id": "core", "name": "Core", "required_services": ["asr", "nmt", "tts"]},
        {"pool_id": "repair", "name": "Repair", "required_services": ["asr", "nmt", "tts", "semantic"]},
        {"pool_id": "tone", "name": "Tone", "required_services": ["asr", "nmt", "tts", "tone"]},
    ],
}


# --- helpers ---------------------------------------------------------------------------------------------


def speaks(*langs: str, asr: Iterable[str] | None = None, semantic: bool = False) -> NodeProfile:
    """ASR, any-to-any translation and TTS in ``langs``; ``asr`` narrows the ASR languages.

    With two ASR languages or more, the node can identify the spoken language (``src_lang = auto``).
    ``semantic`` adds a semantic-repair service.
    """
    return NodeProfile(
        asr_languages=list(asr) if asr is not None else list(langs),
        tts_languages=list(langs),
        nmt_languages=list(langs),
        with_semantic=semantic,
    )


async def start_ready(
    rs: RunningScheduler,
    node_factory: NodeFactory,
    *profiles: NodeProfile,
    executor: Executor | None = None,
    node_ids: list[str] | None = None,
) -> list[SimulatedNode]:
    """Register one node per profile on ``rs`` and wait until the published view has them all ready."""
    ids_in: list[str | None] = list(node_ids) if node_ids else [None] * len(profiles)
    nodes = [
        node_factory(p, url=rs.node_url, interval=QUIET, executor=executor, node_id=i)
        for p, i in zip(profiles, ids_in, strict=True)
    ]
    replies = await asyncio.gather(*(n.start() for n in nodes))
    assert all(r["type"] == "node_register_ack" for r in replies), replies
    ids = [n.node_id for n in nodes]

    def published() -> bool:
        view = rs.state.publisher.view
        return all((nv := view.get(i)) is not None and nv.status is NodeStatus.READY for i in ids if i)

    await eventually(published)
    return nodes


def node_id(node: SimulatedNode) -> str:
    assert node.node_id is not None
    return node.node_id


async def api(rs: RunningScheduler, path: str, **params: str | int) -> tuple[int, Any]:
    """GET a JSON endpoint; ``r.json()`` itself checks that the answer is JSON (errors included)."""
    async with rs.http.get(rs.base + path, params={k: str(v) for k, v in params.items()}) as r:
        return r.status, await r.json()


async def simulate(rs: RunningScheduler, src: str, tgt: str, **params: str) -> dict[str, Any]:
    status, body = await api(rs, "/api/v1/pools/simulate", src_lang=src, tgt_lang=tgt, **params)
    assert status == 200, body
    assert isinstance(body, dict)
    return body


async def until_selected(
    rs: RunningScheduler, src: str, tgt: str, expected: str, timeout: float = 5.0, **params: str
) -> dict[str, Any]:
    """Repeat a dry run until it selects ``expected`` (for state that expires on its own)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        body = await simulate(rs, src, tgt, **params)
        if body["selected_node_id"] == expected:
            return body
        if loop.time() > deadline:
            raise AssertionError(f"{expected} not selected in time: {body}")
        await asyncio.sleep(10 * MS)


async def pools_by_id(rs: RunningScheduler) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    status, listing = await api(rs, "/api/v1/pools")
    assert status == 200
    return listing, {p["pool_id"]: p for p in listing["pools"]}


async def node_pools(rs: RunningScheduler, node: SimulatedNode) -> list[str]:
    status, detail = await api(rs, f"/api/v1/nodes/{node_id(node)}")
    assert status == 200
    pools: list[str] = detail["pools"]
    return pools


async def set_running_jobs(rs: RunningScheduler, node: SimulatedNode, jobs: int) -> None:
    """Report ``jobs`` running jobs in a heartbeat (capabilities unchanged) and wait until it is applied."""
    node.running_jobs = jobs
    await node.heartbeat()
    load = rs.state.registry.nodes[node_id(node)].load
    await eventually(lambda: load.reported_running == jobs)


# --- language-pair pools (the default mode) ------------------------------------------------------------


async def test_language_pair_pools_by_directed_pair_not_by_language_set(
    scheduler_factory: Any, node_factory: NodeFactory
) -> None:
    rs: RunningScheduler = await scheduler_factory(scheduler=FAST_VIEW)
    tri, duo = await start_ready(rs, node_factory, speaks("de", "en", "zh"), speaks("en", "fr"))

    listing, pools = await pools_by_id(rs)
    assert listing["mode"] == "language_pair"
    tri_pairs = {f"{s}->{t}" for s in ("de", "en", "zh") for t in ("de", "en", "zh") if s != t}
    auto_pairs = {"auto->de", "auto->en", "auto->zh", "auto->fr"}
    assert set(pools) == tri_pairs | {"en->fr", "fr->en"} | auto_pairs
    zh_en = pools["zh->en"]
    assert zh_en["shards"] == ["zh->en#0"]
    assert (zh_en["members"], zh_en["ready"]) == (1, 1)
    assert (zh_en["asr_ready"], zh_en["nmt_ready"], zh_en["tts_ready"]) == (1, 1, 1)
    assert zh_en["sample_node_ids"] == [tri.node_id]
    assert pools["en->fr"]["sample_node_ids"] == [duo.node_id]
    # both identify languages and both can speak English: both serve auto->en
    assert pools["auto->en"]["members"] == 2
    assert sorted(pools["auto->en"]["sample_node_ids"]) == sorted([node_id(tri), node_id(duo)])

    # The de/en/zh node serves every directed pair among its languages (the reference matched the exact
    # language set, so a three-language node never served zh->en).
    for src, tgt, pool, node in (
        ("zh", "en", "zh->en", tri),
        ("en", "de", "en->de", tri),
        ("de", "zh", "de->zh", tri),
        ("zh-CN", "en", "zh->en", tri),  # regional variants fold onto the base language
        ("en", "fr", "en->fr", duo),
        ("fr", "en", "fr->en", duo),
    ):
        body = await simulate(rs, src, tgt)
        assert body["selected_node_id"] == node.node_id, (src, tgt, body)
        assert body["best_reason"] == "ok"
        assert body["debug"]["selected_pool"] == f"{pool}#0"
        assert body["debug"]["attempts"] == [[f"{pool}#0", "ok", 1]]
        assert body["breakdown"]["eligible"] == 1

    # A pair nobody serves end to end: no pool, no node, and the breakdown says so.
    body = await simulate(rs, "fr", "de")
    assert body["selected_node_id"] is None
    assert body["best_reason"] == "no_nodes"
    assert body["debug"]["pool_count"] == 0 and body["debug"]["attempts"] == []
    assert body["breakdown"]["total_nodes"] == 0

    status, detail = await api(rs, f"/api/v1/nodes/{node_id(tri)}")
    assert status == 200
    assert detail["status"] == "ready" and detail["connected"] is True
    assert detail["languages"]["asr"] == ["de", "en", "zh"]
    assert detail["languages"]["language_id"] is True
    assert set(detail["pools"]) == {f"{p}#0" for p in tri_pairs | {"auto->de", "auto->en", "auto->zh"}}
    assert detail["last_heartbeat_age_seconds"] >= 0


async def test_src_auto_routes_to_nodes_that_identify_the_language(
    scheduler_factory: Any, node_factory: NodeFactory
) -> None:
    rs: RunningScheduler = await scheduler_factory(scheduler=FAST_VIEW)
    # ASR in English only: serves en->zh but cannot tell which language is spoken
    [mono] = await start_ready(rs, node_factory, speaks("en", "zh", asr=["en"]))
    body = await simulate(rs, "auto", "zh")
    assert body["selected_node_id"] is None and body["debug"]["pool_count"] == 0
    _, pools = await pools_by_id(rs)
    assert set(pools) == {"en->zh"}

    [multi] = await start_ready(rs, node_factory, speaks("en", "zh"))
    _, pools = await pools_by_id(rs)
    assert pools["auto->zh"]["sample_node_ids"] == [multi.node_id]
    assert pools["en->zh"]["members"] == 2
    for _ in range(10):
        body = await simulate(rs, "auto", "zh")
        assert body["selected_node_id"] == multi.node_id
        assert body["debug"]["selected_pool"] == "auto->zh#0"
    status, detail = await api(rs, f"/api/v1/nodes/{node_id(mono)}")
    assert status == 200 and detail["languages"]["language_id"] is False

    # Outside language-pair pools the language filters apply per node, and say why a node was skipped.
    cap: RunningScheduler = await scheduler_factory(
        scheduler=FAST_VIEW, pools={"mode": "capability", "pools": [{"pool_id": "all"}]}
    )
    [mono2] = await start_ready(cap, node_factory, speaks("en", "zh", asr=["en"]))
    body = await simulate(cap, "auto", "zh")
    assert body["selected_node_id"] is None
    assert body["best_reason"] == "src_auto_no_candidate"
    assert body["breakdown"]["src_auto_no_candidate"] == 1
    [multi2] = await start_ready(cap, node_factory, speaks("en", "zh"))
    for _ in range(5):
        body = await simulate(cap, "auto", "zh")
        assert body["selected_node_id"] == multi2.node_id
    body = await simulate(cap, "en", "zh")
    assert body["selected_node_id"] in (mono2.node_id, multi2.node_id)


# --- capability pools ------------------------------------------------------------------------------------


async def test_capability_pools_listing_and_required_services(
    scheduler_factory: Any, node_factory: NodeFactory
) -> None:
    rs: RunningScheduler = await scheduler_factory(scheduler=FAST_VIEW, pools=CAPABILITY_POOLS)
    plain, sem = await start_ready(rs, node_factory, speaks("en", "zh"), speaks("en", "zh", semantic=True))

    listing, pools = await pools_by_id(rs)
    assert listing["mode"] == "capability"
    assert [p["pool_id"] for p in listing["pools"]] == ["core", "repair", "tone"]
    assert pools["core"]["required_services"] == ["asr", "nmt", "tts"]
    assert pools["repair"]["required_services"] == ["asr", "nmt", "semantic", "tts"]
    assert pools["repair"]["name"] == "Repair"
    # the most specific matching pool wins: the node with semantic repair is in "repair" only
    assert pools["core"]["sample_node_ids"] == [plain.node_id]
    assert pools["repair"]["sample_node_ids"] == [sem.node_id]
    for p in ("core", "repair"):
        assert (pools[p]["members"], pools[p]["ready"], pools[p]["tts_ready"]) == (1, 1, 1)
    # a configured pool nobody matches is listed, empty
    assert (pools["tone"]["members"], pools["tone"]["ready"], pools["tone"]["shards"]) == (0, 0, [])
    assert await node_pools(rs, plain) == ["core#0"]
    assert await node_pools(rs, sem) == ["repair#0"]

    # needs semantic repair: only "repair" is eligible
    body = await simulate(rs, "en", "zh", required="asr,nmt,tts,semantic")
    assert body["selected_node_id"] == sem.node_id
    assert body["debug"]["selected_pool"] == "repair#0"
    assert body["debug"]["pool_count"] == 1
    assert body["request"]["required"] == ["asr", "nmt", "semantic", "tts"]
    # needs tone: only the empty "tone" pool is eligible
    body = await simulate(rs, "en", "zh", required="asr,nmt,tts,tone")
    assert body["selected_node_id"] is None and body["best_reason"] == "no_nodes"
    assert body["debug"]["pool_count"] == 1
    # core services only: every pool is eligible, and the node comes from the pool it is listed in
    for _ in range(10):
        body = await simulate(rs, "en", "zh")
        assert body["debug"]["pool_count"] == 3
        chosen = {plain.node_id: plain, sem.node_id: sem}[body["selected_node_id"]]
        assert await node_pools(rs, chosen) == [body["debug"]["selected_pool"]]
    # capability pools do not encode languages: the per-node language filter applies, in every pool
    body = await simulate(rs, "fr", "en")
    assert body["selected_node_id"] is None
    assert body["best_reason"] == "asr_lang_unsupported"
    assert body["breakdown"]["asr_lang_unsupported"] == 2 == body["breakdown"]["total_nodes"]


async def test_tenant_override_picks_the_preferred_pool(
    scheduler_factory: Any, node_factory: NodeFactory
) -> None:
    pools = {
        **CAPABILITY_POOLS,
        "tenant_overrides": [
            {"tenant_id": "acme", "pool_id": "core"},
            {"tenant_id": "globex", "pool_id": "repair"},
        ],
    }
    rs: RunningScheduler = await scheduler_factory(scheduler=FAST_VIEW, pools=pools)
    plain, sem = await start_ready(rs, node_factory, speaks("en", "zh"), speaks("en", "zh", semantic=True))
    for _ in range(15):
        for tenant, node, pool in (("acme", plain, "core#0"), ("globex", sem, "repair#0")):
            body = await simulate(rs, "en", "zh", tenant_id=tenant)
            assert body["selected_node_id"] == node.node_id, (tenant, body)
            assert body["debug"]["preferred_pool"] == pool
            assert body["debug"]["selected_pool"] == pool
            assert body["debug"]["fallback_used"] is False
            assert body["request"]["tenant_id"] == tenant
    # the override also applies when the tenant is the routing key
    body = await simulate(rs, "en", "zh", routing_key="globex")
    assert body["selected_node_id"] == sem.node_id
    # without an override the preferred pool is random (no session affinity): both nodes get picked
    seen = {(await simulate(rs, "en", "zh", routing_key=f"s-{i}"))["selected_node_id"] for i in range(40)}
    assert seen == {plain.node_id, sem.node_id}


@pytest.mark.parametrize("fallback", [True, False])
async def test_fallback_to_the_next_pool(
    scheduler_factory: Any, node_factory: NodeFactory, fallback: bool
) -> None:
    pools = {
        **CAPABILITY_POOLS,
        "fallback": fallback,
        "tenant_overrides": [
            {"tenant_id": "acme", "pool_id": "core"},
            {"tenant_id": "tonal", "pool_id": "tone"},
        ],
    }
    rs: RunningScheduler = await scheduler_factory(
        scheduler={**FAST_VIEW, "max_concurrent_jobs_per_node": 2}, pools=pools
    )
    plain, sem = await start_ready(rs, node_factory, speaks("en", "zh"), speaks("en", "zh", semantic=True))

    # Preferred pool empty ("tone" has no member). Pools are tried in ring order: tone, core, repair.
    body = await simulate(rs, "en", "zh", tenant_id="tonal")
    assert body["debug"]["preferred_pool"] == "tone"
    if fallback:
        assert body["selected_node_id"] == plain.node_id
        assert body["debug"]["selected_pool"] == "core#0"
        assert body["debug"]["fallback_used"] is True
    else:
        assert body["selected_node_id"] is None
        assert body["best_reason"] == "no_nodes"
        assert body["debug"]["attempts"] == []

    # Preferred pool full: its only node reports as many running jobs as it may run.
    await set_running_jobs(rs, plain, 2)
    body = await simulate(rs, "en", "zh", tenant_id="acme")
    assert body["debug"]["preferred_pool"] == "core#0"
    assert body["breakdown"]["capacity_exceeded"] == 1
    if fallback:
        assert body["selected_node_id"] == sem.node_id
        assert body["debug"]["selected_pool"] == "repair#0"
        assert body["debug"]["fallback_used"] is True
        assert body["debug"]["attempts"] == [["core#0", "capacity_exceeded", 1], ["repair#0", "ok", 1]]
    else:
        assert body["selected_node_id"] is None
        assert body["best_reason"] == "capacity_exceeded"
        assert body["debug"]["attempts"] == [["core#0", "capacity_exceeded", 1]]

    # Load is live: once the node reports room again it is chosen from its own pool.
    await set_running_jobs(rs, plain, 1)
    body = await simulate(rs, "en", "zh", tenant_id="acme")
    assert body["selected_node_id"] == plain.node_id
    assert body["debug"]["fallback_used"] is False


# --- hash buckets ----------------------------------------------------------------------------------------


async def test_hash_buckets_place_stably_and_return_nodes(
    scheduler_factory: Any, node_factory: NodeFactory
) -> None:
    count, seed = 4, 7
    cfg = {"mode": "hash", "pool_count": count, "hash_seed": seed, "session_affinity": True}
    rs: RunningScheduler = await scheduler_factory(scheduler=FAST_VIEW, pools=cfg)
    # Persisted node ids chosen so that bucket 2 stays empty: 2 nodes in bucket 0, 1 in 1, 3 in 3.
    wanted = {0: 2, 1: 1, 3: 3}
    ids: list[str] = []
    for i in range(1000):
        candidate = f"node-H{i:04d}"
        b = pick_index_for_key(count, seed, candidate)
        if sum(1 for x in ids if pick_index_for_key(count, seed, x) == b) < wanted.get(b, 0):
            ids.append(candidate)
    assert len(ids) == 6
    nodes = await start_ready(rs, node_factory, *[speaks("en", "zh") for _ in ids], node_ids=ids)
    assert [n.node_id for n in nodes] == ids
    # placement is the documented FNV-1a 64 bucket of the node id
    bucket = {node_id(n): pick_index_for_key(count, seed, node_id(n)) for n in nodes}
    assert sorted(bucket.values()) == [0, 0, 1, 3, 3, 3]

    listing, pools = await pools_by_id(rs)
    assert listing["mode"] == "hash"
    assert sorted(pools) == [f"hash-{b}" for b in range(count)]  # empty buckets are listed too
    for b in range(count):
        members = sorted(n for n, nb in bucket.items() if nb == b)
        assert pools[f"hash-{b}"]["members"] == len(members) == pools[f"hash-{b}"]["ready"]
        assert sorted(pools[f"hash-{b}"]["sample_node_ids"]) == members
    for n in nodes:
        assert await node_pools(rs, n) == [f"hash-{bucket[node_id(n)]}#0"]

    # With affinity the preferred bucket is the routing key's; an empty one falls back in probe order.
    # (The reference's hash mode never returned a node.)
    occupied = set(bucket.values())
    fallbacks = 0
    for i in range(32):
        key = f"session-{i}"
        preferred = pool_id_for_key(count, seed, key)
        expected = next(b for b in probe_order(count, preferred) if b in occupied)
        body = await simulate(rs, "en", "zh", routing_key=key)
        assert body["debug"]["selected_pool"] == f"hash-{expected}#0", (key, body)
        assert bucket[body["selected_node_id"]] == expected
        assert body["debug"]["fallback_used"] is (expected != preferred)
        assert body["debug"]["preferred_pool"] == f"hash-{preferred}" + (
            "#0" if preferred in occupied else ""
        )
        fallbacks += expected != preferred
        # same key, same bucket
        again = await simulate(rs, "en", "zh", routing_key=key)
        assert again["debug"]["selected_pool"] == body["debug"]["selected_pool"]
    assert fallbacks > 0  # some keys hash to the empty bucket 2
    # hash buckets do not encode languages: the language filter runs over every bucket tried
    body = await simulate(rs, "fr", "en", routing_key="k")
    assert body["selected_node_id"] is None
    assert body["best_reason"] == "asr_lang_unsupported"
    assert body["breakdown"]["asr_lang_unsupported"] == len(nodes)

    # Without fallback only the routing key's bucket is tried.
    strict: RunningScheduler = await scheduler_factory(scheduler=FAST_VIEW, pools={**cfg, "fallback": False})
    [only] = await start_ready(strict, node_factory, speaks("en", "zh"))
    home = pick_index_for_key(count, seed, node_id(only))
    keys = [f"k{i}" for i in range(64)]
    hit = next(k for k in keys if pool_id_for_key(count, seed, k) == home)
    miss = next(k for k in keys if pool_id_for_key(count, seed, k) != home)
    assert (await simulate(strict, "en", "zh", routing_key=hit))["selected_node_id"] == only.node_id
    body = await simulate(strict, "en", "zh", routing_key=miss)
    assert body["selected_node_id"] is None and body["best_reason"] == "no_nodes"


# --- the unavailable-service mark ------------------------------------------------------------------------


async def test_model_not_available_marks_the_service_until_it_expires(
    scheduler_factory: Any, node_factory: NodeFactory, session_factory: Any
) -> None:
    ttl = 600 * MS
    rs: RunningScheduler = await scheduler_factory(
        scheduler=FAST_VIEW,
        pools={"unavailable_ttl_seconds": ttl},
        jobs={"ack_timeout_ms": 400, "pending_timeout_ms": 600, "retention_seconds": 0.2},
        session={"pause_ms": 300},
    )
    [bad] = await start_ready(
        rs, node_factory, speaks("en", "zh"), executor=Executor(behavior=Behavior.MODEL_NOT_AVAILABLE)
    )
    assert (await simulate(rs, "en", "zh"))["selected_node_id"] == bad.node_id

    # A real job: the node answers MODEL_NOT_AVAILABLE for its ASR service.
    session = session_factory(url=rs.session_url)  # en -> zh
    await session.start()
    assigned = bad.wait_for(lambda m: m.get("type") == "job_assign")
    await session.speak(chunks=1)
    await assigned
    marks = rs.state.engine.marks
    await eventually(lambda: len(marks) == 1)
    marked_at = time.monotonic()

    body = await simulate(rs, "en", "zh")
    assert body["selected_node_id"] is None
    assert body["best_reason"] == "service_unavailable"
    assert body["breakdown"]["service_unavailable"] == 1
    assert body["debug"]["attempts"] == [["en->zh#0", "service_unavailable", 1]]
    # only the ASR service is marked: a request that needs no ASR may still use the node
    body = await simulate(rs, "en", "zh", required="nmt,tts")
    assert body["selected_node_id"] == bad.node_id
    # the node itself is untouched: still ready, still in its pool
    _, pools = await pools_by_id(rs)
    assert pools["en->zh"]["ready"] == 1

    # After the TTL the node is selectable again, and not before.
    await until_selected(rs, "en", "zh", node_id(bad))
    assert time.monotonic() - marked_at >= ttl - 0.05
    assert len(marks) == 0


# --- nodes listing, errors, metrics ----------------------------------------------------------------------


async def test_nodes_listing_pagination_and_filters(
    scheduler_factory: Any, node_factory: NodeFactory
) -> None:
    rs: RunningScheduler = await scheduler_factory(scheduler=FAST_VIEW, pools={"max_pool_size": 2})
    a, b, c, d, e = await start_ready(
        rs,
        node_factory,
        speaks("en", "zh"),
        speaks("en", "zh"),
        speaks("en", "zh"),
        speaks("de", "en"),
        speaks("es", "fr"),
    )
    _, pools = await pools_by_id(rs)
    assert pools["en->zh"]["members"] == 3
    assert len(pools["en->zh"]["shards"]) == 2  # at most 2 nodes per shard
    await c.close()
    await eventually(lambda: rs.state.publisher.view.nodes[node_id(c)].status is NodeStatus.OFFLINE)
    everyone = sorted(node_id(n) for n in (a, b, c, d, e))

    async def ids(**params: str | int) -> list[str]:
        status, body = await api(rs, "/api/v1/nodes", **params)
        assert status == 200, body
        return [n["node_id"] for n in body["nodes"]]

    pages: list[list[str]] = []
    offset: int | None = 0
    while offset is not None:
        status, body = await api(rs, "/api/v1/nodes", limit=2, offset=offset)
        assert status == 200 and body["total"] == 5 and body["limit"] == 2 and body["offset"] == offset
        pages.append([n["node_id"] for n in body["nodes"]])
        offset = body["next_offset"]
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [n for p in pages for n in p] == everyone
    assert await ids(offset=5) == []

    assert await ids(status="offline") == [c.node_id]
    assert await ids(status="ready") == sorted(set(everyone) - {node_id(c)})
    assert await ids(status="ready,offline") == everyone
    # an offline node leaves its pools; a pool filter takes the logical pool or one shard
    assert await ids(pool="en->zh") == sorted([node_id(a), node_id(b)])
    shard = next(p for p in await node_pools(rs, a) if p.startswith("en->zh#"))
    in_shard = await ids(pool=shard)
    assert node_id(a) in in_shard
    for other in in_shard:
        assert shard in (await api(rs, f"/api/v1/nodes/{other}"))[1]["pools"]
    assert await ids(pool="de->en") == [d.node_id]
    assert await ids(language="fr") == [e.node_id]
    assert await ids(language="en") == sorted(node_id(n) for n in (a, b, c, d))
    assert await ids(language="en", status="ready") == sorted(node_id(n) for n in (a, b, d))

    status, detail = await api(rs, f"/api/v1/nodes/{node_id(c)}")
    assert status == 200
    assert detail["status"] == "offline" and detail["connected"] is False and detail["pools"] == []


async def test_api_errors_are_json_with_a_code(scheduler: RunningScheduler) -> None:
    simulate_errors: list[tuple[dict[str, str], str]] = [
        ({"tgt_lang": "en"}, "src_lang"),
        ({"src_lang": "en"}, "tgt_lang"),
        ({"src_lang": "en", "tgt_lang": "zh", "required": "asr,bogus"}, "bogus"),
        ({"src_lang": "en", "tgt_lang": "zh", "accept_public": "maybe"}, "accept_public"),
    ]
    for params, fragment in simulate_errors:
        status, body = await api(scheduler, "/api/v1/pools/simulate", **params)
        assert status == 400, (params, body)
        assert body["code"] == "INVALID_REQUEST" and fragment in body["message"]

    status, body = await api(scheduler, "/api/v1/nodes/node-NOPE")
    assert status == 404 and body["code"] == "NOT_FOUND" and "node-NOPE" in body["message"]
    list_errors: list[tuple[dict[str, str | int], str]] = [
        ({"status": "sleepy"}, "sleepy"),
        ({"limit": 0}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"offset": -1}, "offset"),
    ]
    for list_params, fragment in list_errors:
        status, body = await api(scheduler, "/api/v1/nodes", **list_params)
        assert status == 400, (list_params, body)
        assert body["code"] == "INVALID_REQUEST" and fragment in body["message"]
    status, body = await api(scheduler, "/api/v1/no-such-thing")
    assert status == 404 and body["code"] == "NOT_FOUND"


async def test_selection_and_pool_metrics(
    scheduler_factory: Any, node_factory: NodeFactory, session_factory: Any
) -> None:
    rs: RunningScheduler = await scheduler_factory(
        scheduler=FAST_VIEW, session={"pause_ms": 300}, jobs={"pending_timeout_ms": 300}
    )
    async with rs.http.get(rs.base + "/metrics") as r:
        text = await r.text()
    assert "# TYPE lingua_selection_seconds histogram" in text
    assert "# TYPE lingua_selections_total counter" in text
    assert "# TYPE lingua_pool_reassignments_total counter" in text
    assert await rs.metric("lingua_pool_reassignments_total") == 0

    [node] = await start_ready(rs, node_factory, speaks("en", "zh"), executor=Executor(latency=0.01))
    # joining its pools is one reassignment; becoming ready changes no membership
    assert await rs.metric("lingua_pool_reassignments_total") == 1

    session = session_factory(url=rs.session_url)
    await session.start()
    result = session.wait_for(lambda m: m.get("type") == "translation_result")
    await session.speak(chunks=1)
    await result
    assert await rs.metric("lingua_selections_total", '{result="ok"}') == 1
    assert await rs.metric("lingua_selection_seconds_count") == 1

    # leaving the pools (offline) is another; a job with no node left is counted as such
    await node.close()
    await eventually(lambda: rs.state.publisher.reassignments == 2)
    assert await rs.metric("lingua_pool_reassignments_total") == 2
    failed = session.wait_for(lambda m: m.get("type") == "missing_result")
    await session.speak(chunks=1)
    await failed
    assert await rs.metric("lingua_selections_total", '{result="no_node"}') >= 1
    assert await rs.metric("lingua_selection_seconds_count") >= 2
