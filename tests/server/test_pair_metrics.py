"""Supply and demand per language pair in /metrics, through a real scheduler, nodes and sessions: ready
nodes and free slots from the pools, waiting and created jobs from the dispatcher, the bounded label set
folding the rest into pair="other", and the counters staying monotonic when a pair changes label."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from lingua_scheduler.server import pair_metrics
from lingua_scheduler.sim.nodes import Behavior, Executor
from lingua_scheduler.sim.profiles import NodeProfile
from tests.conftest import RunningScheduler, eventually

EN_ZH = NodeProfile(asr_languages=["en", "zh"], tts_languages=["en", "zh"], nmt_languages=["en", "zh"])
#: the pairs an EN_ZH node serves: both directions, and auto-detected speech into either language
SERVED = ("en->zh", "zh->en", "auto->en", "auto->zh")
#: jobs wait long enough for a test to scrape them
SLOW_WAIT = {"pending_timeout_ms": 20_000, "ack_timeout_ms": 20_000}


async def scrape(rs: RunningScheduler) -> dict[str, dict[str, float]]:
    """metric sample name -> {pair label: value} of the lingua_pair_* samples, plus the folded gauge."""
    async with rs.http.get(rs.base + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "lingua_pairs_folded":
                out[s.name] = {"": s.value}
            elif s.name.startswith("lingua_pair_"):
                out.setdefault(s.name, {})[s.labels["pair"]] = s.value
    return out


def _ready(rs: RunningScheduler, n: int) -> bool:
    return sum(1 for nv in rs.state.publisher.view.nodes.values() if nv.status == "ready") == n


async def test_supply_and_demand_per_pair(
    scheduler_factory: Any, node_factory: Any, session_factory: Any
) -> None:
    rs: RunningScheduler = await scheduler_factory(scheduler={"fleet_view_interval_ms": 10}, jobs=SLOW_WAIT)
    # two nodes serving en->zh and zh->en (and auto->en, auto->zh); they hold every job (never
    # answer), so a job takes a slot
    nodes = [
        node_factory(profile=EN_ZH, url=rs.node_url, executor=Executor(behavior=Behavior.NEVER_ACK))
        for _ in range(2)
    ]
    for n in nodes:
        await n.start()
    await eventually(lambda: _ready(rs, 2))
    m = await scrape(rs)
    slots = 2 * rs.state.config.scheduler.max_concurrent_jobs_per_node
    zero = dict.fromkeys((*SERVED, "other"), 0)
    assert m["lingua_pair_ready_nodes"] == {**dict.fromkeys(SERVED, 2), "other": 0}
    assert m["lingua_pair_free_slots"] == {**dict.fromkeys(SERVED, slots), "other": 0}
    assert m["lingua_pair_waiting_jobs"] == zero
    assert m["lingua_pair_jobs_created_total"] == zero
    assert m["lingua_pairs_folded"] == {"": 0}

    # demand: one en->zh job placed (a slot of one node is taken: both pairs share that node),
    # two ja->en jobs that no node can take (waiting)
    served = session_factory(url=rs.session_url, src_lang="en", tgt_lang="zh")
    await served.start()
    await served.utterance()
    unserved = session_factory(url=rs.session_url, src_lang="ja", tgt_lang="en")
    await unserved.start()
    await unserved.utterance()
    await unserved.utterance()
    await eventually(lambda: rs.state.engine.store.waiting == 2 and rs.state.engine.store.inflight == 3)
    m = await scrape(rs)
    assert m["lingua_pair_ready_nodes"] == {**dict.fromkeys(SERVED, 2), "ja->en": 0, "other": 0}
    assert m["lingua_pair_free_slots"] == {**dict.fromkeys(SERVED, slots - 1), "ja->en": 0, "other": 0}
    assert m["lingua_pair_waiting_jobs"] == {**zero, "ja->en": 2}
    assert m["lingua_pair_jobs_created_total"] == {**zero, "en->zh": 1, "ja->en": 2}


async def test_the_label_set_is_capped_and_counters_stay_monotonic(
    scheduler_factory: Any, node_factory: Any, session_factory: Any
) -> None:
    rs: RunningScheduler = await scheduler_factory(
        scheduler={"fleet_view_interval_ms": 10}, jobs=SLOW_WAIT, admin={"max_metric_pairs": len(SERVED)}
    )
    nodes = [node_factory(profile=EN_ZH, url=rs.node_url) for _ in range(2)]
    for n in nodes:
        await n.start()
    await eventually(lambda: _ready(rs, 2))
    m = await scrape(rs)
    assert set(m["lingua_pair_ready_nodes"]) == {*SERVED, "other"}
    zero = dict.fromkeys(SERVED, 0)

    # a third pair with demand: no room, so it is summed into "other"
    unserved = session_factory(url=rs.session_url, src_lang="ja", tgt_lang="en")
    await unserved.start()
    await unserved.utterance()
    await eventually(lambda: rs.state.engine.store.waiting == 1)
    m = await scrape(rs)
    assert m["lingua_pair_waiting_jobs"] == {**zero, "other": 1}
    assert m["lingua_pair_ready_nodes"] == {**dict.fromkeys(SERVED, 2), "other": 0}
    assert m["lingua_pair_jobs_created_total"] == {**zero, "other": 1}
    assert m["lingua_pairs_folded"] == {"": 1}

    # the nodes leave: their pairs have neither supply nor demand, so the waiting pair takes a label;
    # the job it had while folded stays counted in "other" (no counter goes down)
    for n in nodes:
        await n.close()
    await eventually(lambda: not rs.state.publisher.view.groups)
    await unserved.utterance()
    await eventually(lambda: rs.state.engine.store.waiting == 2)
    m = await scrape(rs)
    assert "ja->en" in m["lingua_pair_waiting_jobs"] and len(m["lingua_pair_waiting_jobs"]) == len(SERVED) + 1
    assert m["lingua_pair_waiting_jobs"]["ja->en"] == 2 and m["lingua_pair_waiting_jobs"]["other"] == 0
    assert m["lingua_pair_ready_nodes"]["ja->en"] == 0
    assert m["lingua_pair_jobs_created_total"]["ja->en"] == 1  # counted from when it got its label
    assert m["lingua_pair_jobs_created_total"]["other"] == 1
    assert m["lingua_pairs_folded"] == {"": 0}


async def test_without_language_pair_pools_supply_is_not_exported(
    scheduler_factory: Any, node_factory: Any
) -> None:
    rs: RunningScheduler = await scheduler_factory(
        scheduler={"fleet_view_interval_ms": 10}, pools={"mode": "hash", "pool_count": 2}
    )
    node = node_factory(profile=EN_ZH, url=rs.node_url)
    await node.start()
    await eventually(lambda: _ready(rs, 1))
    m = await scrape(rs)
    assert "lingua_pair_ready_nodes" not in m and "lingua_pair_free_slots" not in m
    assert m["lingua_pair_waiting_jobs"] == {"other": 0}


async def test_free_slots_of_a_large_fleet_are_walked_between_scrapes(
    scheduler_factory: Any, node_factory: Any, monkeypatch: Any
) -> None:
    # a slice of one member: this fleet counts as large, so free slots are walked in slices after a
    # scrape and the next scrape reads them
    monkeypatch.setattr(pair_metrics, "SLICE", 1)
    rs: RunningScheduler = await scheduler_factory(scheduler={"fleet_view_interval_ms": 10})
    nodes = [node_factory(profile=EN_ZH, url=rs.node_url) for _ in range(2)]
    for n in nodes:
        await n.start()
    await eventually(lambda: _ready(rs, 2))
    first = await scrape(rs)
    assert first["lingua_pair_ready_nodes"]["en->zh"] == 2  # counted from the pools, always current
    assert "lingua_pair_free_slots" not in first  # not walked yet: absent rather than a false 0
    slots = 2 * rs.state.config.scheduler.max_concurrent_jobs_per_node
    second: dict[str, dict[str, float]] = {}

    async def walked() -> bool:
        second.update(await scrape(rs))
        return second["lingua_pair_free_slots"].get("en->zh") == slots

    for _ in range(100):
        if await walked():
            break
    assert second["lingua_pair_free_slots"] == {**dict.fromkeys(SERVED, slots), "other": 0}
