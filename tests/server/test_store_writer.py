"""StoreWriter against a real Redis: one pipeline per loop turn, order kept, losses reported, bounded."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from lingua_scheduler.protocol.cluster import DispatchFailed
from lingua_scheduler.server.cluster.store_writer import StoreWriter
from lingua_scheduler.store.base import StoreUnavailable
from lingua_scheduler.store.redis_store import RedisStore
from tests.redis_support import RedisServer, free_port, has_redis

pytestmark = pytest.mark.skipif(not has_redis(), reason="no redis-server binary")


@pytest_asyncio.fixture
async def stores(redis_server: RedisServer) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    """Two instances' stores under a fresh prefix: ``a`` writes, ``b`` owns the inbox."""
    prefix = "w" + secrets.token_hex(3)
    a = RedisStore(redis_server.url, instance_id="a", prefix=prefix)
    b = RedisStore(redis_server.url, instance_id="b", prefix=prefix)
    await a.start()
    await b.start()
    yield a, b
    await a.close()
    await b.close()


def message(i: int) -> DispatchFailed:
    return DispatchFailed(job_id=f"job-{i}", attempt_id=1, node_id="n1", reason=f"r{i}")


async def received(store: RedisStore, want: int) -> list[DispatchFailed]:
    out: list[DispatchFailed] = []
    for _ in range(50):
        for _entry_id, msg in await store.receive(100, 1000):
            assert isinstance(msg, DispatchFailed)
            out.append(msg)
        if len(out) >= want:
            break
    return out


async def test_one_loop_turn_is_one_pipeline_and_order_is_kept(
    stores: tuple[RedisStore, RedisStore], redis_server: RedisServer
) -> None:
    a, b = stores
    errors: list[StoreUnavailable] = []
    w = StoreWriter(a, errors.append)
    await a.ping()  # the pool's connection is open (its handshake is not counted below)
    r = redis_server.client()
    r.config_resetstat()
    for i in range(50):  # all in one loop turn
        w.send("b", message(i))
    assert await w.drain(2.0)
    assert (w.flushes, w.writes, w.lost) == (1, 50, 0)
    # 50 XADDs and nothing else (a pipeline is one round trip, not one command each)
    calls = {k: v["calls"] for k, v in r.info("commandstats").items()}
    assert calls == {"cmdstat_xadd": 50, "cmdstat_config|resetstat": 1}
    # writes added while a batch is in flight go in the next one, still in order
    for i in range(50, 60):
        w.send("b", message(i))
        await asyncio.sleep(0)
    assert await w.drain(2.0)
    assert 2 <= w.flushes <= 11 and w.writes == 60
    got = await received(b, 60)
    assert [m.job_id for m in got] == [f"job-{i}" for i in range(60)]
    assert errors == []


async def test_commit_release_and_ack_in_the_same_batch(
    stores: tuple[RedisStore, RedisStore], redis_server: RedisServer
) -> None:
    a, b = stores
    await a.publish([], [], [], {"n1": "ready"})
    now = a.now_ms()
    assert (await a.reserve("n1", "j1:1", 4, 1_000)).ok
    assert (await a.reserve("n1", "j2:1", 4, 1_000)).ok
    w = StoreWriter(a, lambda _: None)
    # a fresh Redis without the script (NOSCRIPT) must still commit
    redis_server.client().script_flush()
    w.commit("n1", "j1:1", 60_000)
    w.release("n1", "j2:1")
    w.commit("n1", "gone:1", 60_000)  # released or expired: not revived
    assert await w.drain(2.0)
    resv = redis_server.client().zrange(a.keys.node_resv("n1"), 0, -1, withscores=True)
    assert [m for m, _ in resv] == [f"{a.instance_id}|j1:1".encode()]  # members name their instance
    assert resv[0][1] >= now + 59_000
    # b acknowledges what it handled through its own writer: the entries leave the inbox
    a_writer = StoreWriter(a, lambda _: None)
    a_writer.send("b", message(1))
    assert await a_writer.drain(2.0)
    entries = await b.receive(500, 10)
    assert len(entries) == 1
    bw = StoreWriter(b, lambda _: None)
    bw.ack([entries[0][0]])
    assert await bw.drain(2.0)
    r = redis_server.client()
    assert r.xlen(b.keys.inbox("b")) == 0
    assert r.xpending(b.keys.inbox("b"), "scheduler")["pending"] == 0


async def test_unreachable_store_reports_every_lost_send() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", instance_id="a", prefix="x", op_timeout=0.2)
    errors: list[StoreUnavailable] = []
    failed: list[int] = []
    w = StoreWriter(store, errors.append)
    for i in range(5):
        w.send("b", message(i), on_fail=lambda i=i: failed.append(i))
    w.release("n1", "j:1")
    assert await w.drain(3.0)
    assert failed == [0, 1, 2, 3, 4]
    assert w.lost == 6 and w.writes == 0
    assert len(errors) == 1 and "redis" in str(errors[0])
    await store.close()


async def test_the_queue_is_bounded(stores: tuple[RedisStore, RedisStore]) -> None:
    a, b = stores
    failed: list[int] = []
    w = StoreWriter(a, lambda _: None, limit=5)
    for i in range(8):
        w.send("b", message(i), on_fail=lambda i=i: failed.append(i))
    assert failed == [5, 6, 7]  # refused at once, not queued
    assert w.lost == 3
    assert await w.drain(2.0)
    assert [m.job_id for m in await received(b, 5)] == [f"job-{i}" for i in range(5)]
