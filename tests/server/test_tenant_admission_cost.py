"""The cost of a cluster-wide tenant admission (admit.lua) against a real Redis: bounded by the number of
instances, not by the tenant's sessions, since it runs inside Redis's single thread on every
session_init of the tenant."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from lingua_scheduler.store.redis_store import RedisStore
from tests.redis_support import RedisServer, has_redis

pytestmark = pytest.mark.skipif(not has_redis(), reason="no redis-server binary")

INSTANCES = ("a", "b", "c")


@pytest_asyncio.fixture
async def stores(redis_server: RedisServer) -> AsyncIterator[dict[str, RedisStore]]:
    """Three live instances' stores under a fresh prefix."""
    prefix = "adm" + secrets.token_hex(3)
    out = {i: RedisStore(redis_server.url, instance_id=i, prefix=prefix) for i in INSTANCES}
    for s in out.values():
        await s.start()
        await s.tick([], None, 60_000, {})  # presence: its sessions count
    yield out
    for s in out.values():
        await s.close()


async def fill(stores: dict[str, RedisStore], tenant: str, n: int) -> None:
    for i in range(n):
        ok, _ = await stores[INSTANCES[i % len(INSTANCES)]].admit_session(tenant, f"s{i}", 1_000_000, [])
        assert ok


def commands_of(redis_server: RedisServer) -> dict[str, int]:
    """The commands Redis executed (those inside scripts included), minus our own bookkeeping."""
    stats = redis_server.client().info("commandstats")
    return {
        k: int(v["calls"]) for k, v in stats.items() if k not in ("cmdstat_config|resetstat", "cmdstat_info")
    }


async def test_admission_work_does_not_grow_with_the_tenants_sessions(
    stores: dict[str, RedisStore], redis_server: RedisServer
) -> None:
    r = redis_server.client()
    a = stores["a"]
    seen: dict[int, dict[str, int]] = {}
    for n in (10, 1000):
        tenant = f"t{n}"
        await fill(stores, tenant, n)
        await a.ping()  # the pool's connection is open (its handshake is not counted)
        r.config_resetstat()
        ok, count = await a.admit_session(tenant, "new", 1_000_000, [])
        assert (ok, count) == (True, n + 1)
        seen[n] = commands_of(redis_server)
        # what Redis keeps for the tenant is per instance, not per session: the script reads all of it
        sizes = {}
        for key in r.scan_iter(match=f"*:tenant:{tenant}:*"):
            kind = r.type(key)
            sizes[key] = r.hlen(key) if kind == b"hash" else r.scard(key) if kind == b"set" else r.zcard(key)
        assert sizes and max(sizes.values()) <= len(INSTANCES), sizes
    assert seen[10] == seen[1000], seen
    assert sum(seen[1000].values()) <= 2 + 2 * len(INSTANCES), seen[1000]


async def test_releasing_ended_sessions_at_admission_is_one_step(
    stores: dict[str, RedisStore], redis_server: RedisServer
) -> None:
    """An admission first releases this instance's sessions of the tenant that ended: 1 or 500 of
    them cost the same, and they stop counting."""
    r = redis_server.client()
    a = stores["a"]
    seen: dict[int, dict[str, int]] = {}
    for ended in (1, 500):
        tenant = f"e{ended}"
        for i in range(ended):
            assert (await a.admit_session(tenant, f"s{i}", 1_000_000, []))[0]
        await a.ping()
        r.config_resetstat()
        ok, count = await a.admit_session(tenant, "new", 1_000_000, [f"s{i}" for i in range(ended)])
        assert (ok, count) == (True, 1)
        seen[ended] = commands_of(redis_server)
    assert seen[1] == seen[500], seen


async def test_cap_counts_live_instances_only_and_resync_is_exact(
    stores: dict[str, RedisStore], redis_server: RedisServer
) -> None:
    """The guarantees kept with counters: the cap holds, a dead instance stops counting once its
    presence lapses (and is dropped once it leaves the instances), the re-sync sets ours exactly."""
    a, b, c = (stores[i] for i in INSTANCES)
    assert (await b.admit_session("t", "b1", 3, []))[0]
    assert (await c.admit_session("t", "c1", 3, []))[0]
    assert await a.admit_session("t", "a1", 3, []) == (True, 3)
    assert await a.admit_session("t", "a2", 3, []) == (False, 3)
    # c's presence lapses: its session no longer counts
    await c.tick([], None, 1, {})
    await asyncio.sleep(0.01)  # Redis's clock passes c's 1 ms presence (a tick alone may not take 1 ms)
    await b.tick([], None, 60_000, {})
    assert await a.admit_session("t", "a2", 3, []) == (True, 3)
    # re-sync: ours become exactly the live ones (a2 only), so there is room again
    assert await a.resync_sessions({"t": ["a2"]}) == (1, 0)
    assert await a.admit_session("t", "a3", 3, []) == (True, 3)
    # released sessions stop counting
    await a.release_sessions({"t": ["a2", "a3"]})
    assert await b.admit_session("t", "b2", 3, []) == (True, 2)
