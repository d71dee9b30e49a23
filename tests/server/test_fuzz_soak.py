"""The scheduler under a fuzzer for a bounded time, then: it still serves correct traffic, and every
memory counter is back to its baseline (sessions, jobs, held audio, node sockets, outboxes, tasks).

``make test`` runs a few seconds; the ``long`` variant (``make test-long``) a minute with more clients.
Set ``LINGUA_FUZZ_SECONDS`` to stretch the bounded one.
"""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from lingua_scheduler.sim.nodes import Executor
from tests.conftest import RunningScheduler, eventually
from tests.server.fuzz_frames import (
    FUZZ_CONFIG,
    MAX_FRAME,
    ConnectionCrashes,
    Endpoint,
    FrameFuzzer,
    FuzzClient,
    crashes_fixture,
    settled,
)

crashes = crashes_fixture  # the fixture, under its name

SECONDS = float(os.environ.get("LINGUA_FUZZ_SECONDS", "3"))


@dataclass
class FuzzStats:
    frames: int = 0
    probes: int = 0
    reconnects: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    close_codes: dict[int | None, int] = field(default_factory=dict)


async def fuzz(rs: RunningScheduler, seconds: float, clients: int, seed: int) -> FuzzStats:
    """``clients`` fuzzing connections per endpoint for ``seconds``; each keeps proving it is served."""
    stats = FuzzStats()
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds

    async def run(endpoint: Endpoint, index: int, http: aiohttp.ClientSession) -> None:
        rng = random.Random(seed * 1000 + index * 2 + (endpoint == "node"))
        url = rs.node_url if endpoint == "node" else rs.session_url
        client = FuzzClient(http, url, endpoint, node_id=f"node-FUZZ{index:04d}")
        try:
            while loop.time() < end:
                if client.ws is None or client.ws.closed or rng.random() < 0.2:
                    await client.reconnect()
                    stats.reconnects += 1
                bound = await client.bind() if rng.random() < 0.7 else None
                fuzzer = FrameFuzzer(
                    endpoint,
                    rng,
                    MAX_FRAME,
                    node_id=bound or client.node_id,
                    session_id=bound or "s-FUZZ0001",
                    jobs=client.jobs,
                )
                for _ in range(rng.randint(1, 40)):
                    await client.send(fuzzer.next())
                if rng.random() < 0.3:  # let timers (pauses, acks, results) fire between bursts
                    await asyncio.sleep(rng.uniform(0, 0.05))
                await client.probe()
                stats.probes += 1
        finally:
            await client.close()
            stats.frames += client.sent
            for code, n in client.codes.items():
                stats.codes[code] = stats.codes.get(code, 0) + n
            for cc in client.close_codes:
                stats.close_codes[cc] = stats.close_codes.get(cc, 0) + 1

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(
            *(run(ep, i, http) for ep in ("node", "session") for i in range(clients))  # type: ignore[arg-type]
        )
    return stats


def task_count() -> int:
    return len([t for t in asyncio.all_tasks() if not t.done()])


async def serves_correct_traffic(rs: RunningScheduler, node_factory: Any, session_factory: Any) -> None:
    """A well-behaved node registers and gets ready; a session gets its translation, in order."""
    node = node_factory(url=rs.node_url, executor=Executor(latency=0.01))
    assert (await node.start())["type"] == "node_register_ack"
    await eventually(
        lambda: (
            rs.state.publisher.view.nodes.get(node.node_id) is not None
            and rs.state.publisher.view.nodes[node.node_id].status == "ready"
        )
    )
    session = session_factory(url=rs.session_url)
    assert (await session.start())["type"] == "session_init_ack"
    for _ in range(3):
        await session.speak(chunks=2)
    await eventually(lambda: len(session.of_type("translation_result")) == 3)
    assert [r["utterance_index"] for r in session.of_type("translation_result")] == [0, 1, 2]
    assert not session.of_type("error")
    await session.close()
    await session.disconnect()
    await node.close()


async def soak(
    rs: RunningScheduler, node_factory: Any, session_factory: Any, seconds: float, clients: int, seed: int
) -> FuzzStats:
    state = rs.state
    await serves_correct_traffic(rs, node_factory, session_factory)  # warm: lazily created things exist
    await settled(rs)
    baseline_tasks = task_count()

    stats = await fuzz(rs, seconds, clients, seed)

    # nothing the fuzzers did outlives their connections
    await settled(rs)
    store = state.engine.store
    await eventually(lambda: len(store) == 0, timeout=5)  # terminal jobs evicted after retention
    assert state.engine.tracked_jobs() == 0  # no per-job bookkeeping outlives its job
    state.engine.validate()
    await eventually(lambda: task_count() <= baseline_tasks, timeout=5)
    assert not [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("outbox-")]

    # and it still does its job
    await serves_correct_traffic(rs, node_factory, session_factory)
    await settled(rs)
    await eventually(lambda: task_count() <= baseline_tasks, timeout=5)

    # the fuzzers got through to the decoders and beyond, and were answered every time
    assert stats.probes > 0 and stats.frames > 100
    assert stats.codes.get("INVALID_MESSAGE", 0) > 0
    # connections ended by us (OK), by an oversized frame (1009 from the server, or 1006 when the client
    # wrote after it), never by a crash or any other policy
    expected = {
        None,
        aiohttp.WSCloseCode.OK,
        aiohttp.WSCloseCode.MESSAGE_TOO_BIG,
        aiohttp.WSCloseCode.ABNORMAL_CLOSURE,
    }
    assert set(stats.close_codes) <= expected, stats
    return stats


async def test_fuzz_soak_bounded(
    scheduler_factory: Any, node_factory: Any, session_factory: Any, crashes: ConnectionCrashes
) -> None:
    rs = await scheduler_factory(**FUZZ_CONFIG)
    stats = await soak(rs, node_factory, session_factory, SECONDS, clients=3, seed=1)
    print(f"fuzz soak {SECONDS:g} s: {stats}")


@pytest.mark.long
@pytest.mark.timeout(300)
async def test_fuzz_soak_long(
    scheduler_factory: Any, node_factory: Any, session_factory: Any, crashes: ConnectionCrashes
) -> None:
    rs = await scheduler_factory(**FUZZ_CONFIG)
    stats = await soak(rs, node_factory, session_factory, max(SECONDS, 60.0), clients=8, seed=2)
    print(f"fuzz soak long: {stats}")
