"""Fixtures that start real servers: one place for all of them.

``scheduler`` starts a real aiohttp server of the scheduler on a free port (real sockets, real
WebSockets); ``node_factory`` creates simulated nodes speaking the real protocol. Timing constants
scale from ``MS`` so a slow machine can stretch them all at once (``LINGUA_TEST_TIME_FACTOR``).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer

from lingua_scheduler.clock import Clock
from lingua_scheduler.config import Config, load_config
from lingua_scheduler.server.app import build_app
from lingua_scheduler.server.state import STATE, SchedulerState
from lingua_scheduler.sim.nodes import SimulatedNode
from lingua_scheduler.sim.profiles import NodeProfile
from lingua_scheduler.sim.sessions import SimulatedSession

MS = 0.001 * float(os.environ.get("LINGUA_TEST_TIME_FACTOR", "1"))


@dataclass
class RunningScheduler:
    server: TestServer
    app: web.Application
    http: aiohttp.ClientSession

    @property
    def state(self) -> SchedulerState:
        state: SchedulerState = self.app[STATE]
        return state

    @property
    def base(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    @property
    def node_url(self) -> str:
        return self.base.replace("http", "ws", 1) + "/ws/node"

    @property
    def session_url(self) -> str:
        return self.base.replace("http", "ws", 1) + "/ws/session"

    async def get_json(self, path: str, **kw: Any) -> Any:
        async with self.http.get(self.base + path, **kw) as r:
            return await r.json()

    async def metric(self, name: str, labels: str = "") -> float:
        """Current value of one sample from /metrics (0 when absent)."""
        async with self.http.get(self.base + "/metrics") as r:
            text = await r.text()
        pattern = re.compile(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", re.M)
        m = pattern.search(text)
        return float(m.group(1)) if m else 0.0


def make_config(**sections: dict[str, Any]) -> Config:
    return load_config(env={}, overrides=sections)


@pytest_asyncio.fixture
async def scheduler_factory() -> AsyncIterator[Callable[..., Any]]:
    started: list[RunningScheduler] = []

    async def start(clock: Clock | None = None, **sections: dict[str, Any]) -> RunningScheduler:
        app = build_app(make_config(**sections), clock)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        rs = RunningScheduler(server, app, http)
        started.append(rs)
        return rs

    yield start
    for rs in started:
        await rs.http.close()
        # aiohttp waits up to its shutdown timeout for open handlers; a test must not hang on that
        try:
            await asyncio.wait_for(rs.server.close(), 15)
        except TimeoutError:
            tasks = [t.get_name() for t in asyncio.all_tasks() if not t.done()]
            raise AssertionError(f"scheduler did not shut down in 15 s; live tasks: {tasks}") from None


@pytest_asyncio.fixture
async def scheduler(scheduler_factory: Callable[..., Any]) -> RunningScheduler:
    rs: RunningScheduler = await scheduler_factory(scheduler={"fleet_view_interval_ms": 10})
    return rs


@pytest_asyncio.fixture
async def session_factory(scheduler: RunningScheduler) -> AsyncIterator[Callable[..., Any]]:
    sessions: list[SimulatedSession] = []
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    def make(url: str | None = None, **kw: Any) -> SimulatedSession:
        s = SimulatedSession(http, url or scheduler.session_url, **kw)
        sessions.append(s)
        return s

    yield make
    await asyncio.gather(*(s.disconnect() for s in sessions), return_exceptions=True)
    await http.close()


@pytest_asyncio.fixture
async def node_factory(scheduler: RunningScheduler) -> AsyncIterator[Callable[..., Any]]:
    nodes: list[SimulatedNode] = []
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    def make(profile: NodeProfile | None = None, url: str | None = None, **kw: Any) -> SimulatedNode:
        p = profile or NodeProfile(
            asr_languages=["en", "zh"], tts_languages=["en", "zh"], nmt_languages=["en", "zh"]
        )
        node = SimulatedNode(http, url or scheduler.node_url, p, **kw)
        nodes.append(node)
        return node

    yield make
    await asyncio.gather(*(n.close() for n in nodes), return_exceptions=True)
    await http.close()


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0, step: float = 5 * MS) -> None:
    """Wait until ``predicate()`` holds (for state that changes without a message to wait on)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(step)
