"""A tenant's session cap holds across instances at admission (Redis mode): the shared store checks
the cap and counts the session in one atomic step (``admit.lua``), so sessions opened at the same
moment on several instances cannot pass it; a session that ends gives its place back."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from lingua_scheduler.core.auth import hash_api_key
from lingua_scheduler.sim.sessions import SimulatedSession
from tests.redis_support import RedisServer, cluster_section, has_redis, start_instances

pytestmark = pytest.mark.skipif(not has_redis(), reason="no redis-server binary")

KEY = "tenant-cap-key-" + "c" * 32
CAP = 5


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        yield client


def sections(url: str) -> dict[str, Any]:
    return {
        "auth": {"tenants": [{"tenant_id": "capped", "key_sha256": hash_api_key(KEY), "max_sessions": CAP}]},
        "cluster": cluster_section(url, "cap" + secrets.token_hex(3)),
    }


async def open_at_once(http: aiohttp.ClientSession, urls: list[str]) -> list[tuple[SimulatedSession, str]]:
    sessions = [SimulatedSession(http, url, api_key=KEY) for url in urls]
    for s in sessions:
        await s.connect()
    replies = await asyncio.gather(*(s.init() for s in sessions))
    return [
        (s, r["type"] if r["type"] == "session_init_ack" else r["code"])
        for s, r in zip(sessions, replies, strict=True)
    ]


async def test_tenant_cap_holds_across_instances_under_concurrent_admissions(
    redis_server: RedisServer, scheduler_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """Cap 5, two instances: 10 sessions of the tenant open at once, 5 on each. Must hold: exactly 5
    admitted, the other 5 refused with TENANT_LIMIT; closing an admitted session gives its place back
    (on the same instance at once, on the other within a tick), and the cap still holds after."""
    a, b = await start_instances(scheduler_factory, 2, sections(redis_server.url))
    opened: list[SimulatedSession] = []
    try:
        got = await open_at_once(http, [a.session_url] * CAP + [b.session_url] * CAP)
        opened = [s for s, _ in got]
        verdicts = [v for _, v in got]
        assert verdicts.count("session_init_ack") == CAP, verdicts
        assert verdicts.count("TENANT_LIMIT") == CAP, verdicts
        admitted = [s for s, v in got if v == "session_init_ack"]
        # a place freed on one instance can be taken on the same one at once
        on_a = [s for s, v in got[:CAP] if v == "session_init_ack"]
        on_b = [s for s, v in got[CAP:] if v == "session_init_ack"]
        assert on_a or on_b
        closer, same = (on_a[0], a) if on_a else (on_b[0], b)
        await closer.close()
        again = SimulatedSession(http, same.session_url, api_key=KEY)
        opened.append(again)
        assert (await again.start())["type"] == "session_init_ack"
        # full again: both instances refuse
        for rs in (a, b):
            extra = SimulatedSession(http, rs.session_url, api_key=KEY)
            opened.append(extra)
            assert (await extra.start())["code"] == "TENANT_LIMIT"
        # a place freed on one instance is taken on the other within a tick or two
        other = b if same is a else a
        await admitted[-1 if admitted[-1] is not closer else 0].close()
        deadline = time.monotonic() + 5
        while True:
            late = SimulatedSession(http, other.session_url, api_key=KEY)
            opened.append(late)
            reply = await late.start()
            if reply["type"] == "session_init_ack":
                break
            assert reply["code"] == "TENANT_LIMIT" and time.monotonic() < deadline, reply
            await asyncio.sleep(0.1)
        live = sum(len(rs.state.sessions) for rs in (a, b))
        assert live == CAP, live
    finally:
        await asyncio.gather(*(s.disconnect() for s in opened), return_exceptions=True)
