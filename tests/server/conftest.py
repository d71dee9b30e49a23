"""Fixtures of the server tests that several test modules share: one real Redis server per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.redis_support import RedisServer, has_redis


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server for the tests of one module (they keep apart by key prefix); skips without one."""
    if not has_redis():
        pytest.skip("no redis-server binary")
    server = RedisServer().start()
    yield server
    server.close()
