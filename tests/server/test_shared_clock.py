"""Instances whose wall clocks disagree still agree on shared expiries: the store runs on Redis TIME."""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from lingua_scheduler.clock import SystemClock
from lingua_scheduler.store.redis_store import RedisStore
from tests.conftest import eventually
from tests.redis_support import RedisServer, cluster_cfg, has_redis, ready_in_view, start_instances

pytestmark = pytest.mark.skipif(not has_redis(), reason="no redis-server binary")

SKEW_MS = 120_000


class SkewedClock:
    """The system clock with its wall time shifted (a host whose clock is wrong)."""

    def __init__(self, skew_ms: int) -> None:
        self.skew_ms = skew_ms
        self._base = SystemClock()

    def monotonic(self) -> float:
        return self._base.monotonic()

    def wall_ms(self) -> int:
        return self._base.wall_ms() + self.skew_ms


def redis_ms(server: RedisServer) -> int:
    sec, usec = server.client().time()
    return int(sec) * 1000 + int(usec) // 1000


async def test_skewed_instances_agree_on_presence_and_reservations(redis_server: RedisServer) -> None:
    prefix = "c" + secrets.token_hex(3)
    ahead_clock, behind_clock = SkewedClock(SKEW_MS), SkewedClock(-SKEW_MS)
    ahead = RedisStore(redis_server.url, instance_id="ahead", prefix=prefix, clock=ahead_clock)
    behind = RedisStore(redis_server.url, instance_id="behind", prefix=prefix, clock=behind_clock)
    try:
        await ahead.start()
        await behind.start()
        # both read Redis's clock, not their own (two minutes apart)
        assert abs(ahead.now_ms() - redis_ms(redis_server)) < 100
        assert abs(behind.now_ms() - redis_ms(redis_server)) < 100
        # presence: with its own clock, "ahead" would find "behind" expired two minutes ago
        assert (await behind.tick(["n-behind"], None, 1_000, {})).dead == []
        assert (await ahead.tick(["n-ahead"], None, 1_000, {})).dead == []
        assert (await behind.tick(["n-behind"], None, 1_000, {})).dead == []
        # a reservation taken by "behind" is not reaped by "ahead" (which would over-commit the node)
        await behind.publish([], [], [], {"n1": "ready"})
        assert (await behind.reserve("n1", "j1:1", 1, 5_000)).ok
        refused = await ahead.reserve("n1", "j2:1", 1, 5_000)
        assert not refused.ok and refused.reason == "FULL"
        # a step of the local clock is absorbed at the next tick
        ahead_clock.skew_ms += 60_000
        assert ahead.now_ms() - redis_ms(redis_server) > 50_000
        assert (await ahead.tick(["n-ahead"], None, 1_000, {})).dead == []
        assert abs(ahead.now_ms() - redis_ms(redis_server)) < 100
    finally:
        await ahead.close()
        await behind.close()


async def test_a_node_moving_off_a_fast_clocked_instance_is_seen_on_its_new_one(
    redis_server: RedisServer, scheduler_factory: Any, node_factory: Any
) -> None:
    """Node records are ordered by (epoch, version), the epoch taken when the node registers. Had
    ``fast`` stamped it with its own clock (two minutes ahead), the record of the node's next
    registration, on ``b``, would look two minutes older than ``fast``'s last one and ``c`` would
    ignore it as stale: the node would stay offline in ``c``'s view while it serves on ``b``."""
    sections = cluster_cfg(redis_server.url, "k" + secrets.token_hex(3))
    [fast] = await start_instances(
        lambda **kw: scheduler_factory(clock=SkewedClock(SKEW_MS), **kw), 1, sections
    )
    b, c = await start_instances(scheduler_factory, 2, sections)
    assert abs(fast.state.clock.wall_ms() - redis_ms(redis_server)) < 100
    first = node_factory(url=fast.node_url)
    await first.start()
    node_id = first.node_id
    await eventually(lambda: ready_in_view(c, node_id), timeout=5)
    await first.close()
    await eventually(lambda: not ready_in_view(c, node_id), timeout=5)
    moved = node_factory(url=b.node_url, node_id=node_id)
    await moved.start()
    await eventually(lambda: ready_in_view(c, node_id), timeout=5)
    entry = c.state.registry.nodes[node_id]
    assert entry.owner == b.state.cluster.instance_id
