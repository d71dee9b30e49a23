"""Fixtures of the server tests that several test modules share: one real Redis server per module, an
HTTP client without a connection cap, and the scheduler processes a test started (closed after it)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
import pytest_asyncio

from tests.redis_support import RedisServer, has_redis
from tests.scheduler_process import SchedulerProcess


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server for the tests of one module (they keep apart by key prefix); skips without one."""
    if not has_redis():
        pytest.skip("no redis-server binary")
    server = RedisServer().start()
    yield server
    server.close()


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client whose connections are not capped (tests open many at once)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        yield client


@pytest.fixture
def procs() -> Iterator[list[SchedulerProcess]]:
    """Scheduler processes a test starts: closed after it, whatever happened."""
    started: list[SchedulerProcess] = []
    yield started
    for p in started:
        p.close()
