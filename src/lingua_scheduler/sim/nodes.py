"""Simulated nodes speaking the real node protocol over real WebSockets.

A library for tests and benchmarks (``SimulatedNode``, ``run_fleet``) and the engine behind
``lingua-scheduler simulate-nodes``. Each node registers with a realistic profile, then heartbeats at
the interval the scheduler asks for (or a fixed one), varying its reported load.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec

from lingua_scheduler.protocol.node import NodeHeartbeat, ResourceUsage
from lingua_scheduler.sim.profiles import NodeProfile, random_profile

_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder()


class SimulatedNode:
    def __init__(
        self,
        http: aiohttp.ClientSession,
        url: str,
        profile: NodeProfile,
        *,
        node_id: str | None = None,
        interval: float | None = None,
        seed: int = 0,
    ) -> None:
        self.http = http
        self.url = url
        self.profile = profile
        self.node_id = node_id
        self.fixed_interval = interval
        self.interval = interval or 15.0
        self.rng = random.Random(seed)
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.received: deque[dict[str, Any]] = deque(maxlen=1000)
        self.rtts: list[float] = []
        self.running_jobs = 0
        self._sent_at: dict[int, float] = {}
        self._cached: tuple[NodeProfile, NodeProfile, tuple[Any, Any, Any]] | None = None
        self._last_ts = 0
        self._waiters: list[tuple[Callable[[dict[str, Any]], bool], asyncio.Future[dict[str, Any]]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        #: called for every message that is not a heartbeat ack (job executors hook in here)
        self.on_message: Callable[[dict[str, Any]], None] | None = None

    # --- connection -----------------------------------------------------------------------------

    async def connect(self) -> None:
        self.ws = await self.http.ws_connect(self.url, autoping=True, max_msg_size=64 * 1024 * 1024)
        self._tasks.append(asyncio.create_task(self._reader()))

    async def register(self, timeout: float = 10.0) -> dict[str, Any]:
        """Send node_register and wait for the ack (or an error, which is returned as is)."""
        waiter = self.wait_for(lambda m: m.get("type") in ("node_register_ack", "error"), timeout)
        await self.send(self.profile.register_message(self.node_id))
        reply = await waiter
        if reply["type"] == "node_register_ack":
            self.node_id = reply["node_id"]
            if self.fixed_interval is None and reply.get("heartbeat_interval_ms"):
                self.interval = reply["heartbeat_interval_ms"] / 1000.0
        return reply

    async def start(self) -> dict[str, Any]:
        """Connect, register, and start heartbeating."""
        await self.connect()
        reply = await self.register()
        if reply["type"] == "node_register_ack":
            await self.heartbeat()
            self._tasks.append(asyncio.create_task(self._heartbeat_loop()))
        return reply

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        if self.ws is not None:
            await self.ws.close()

    async def kill(self) -> None:
        """Drop the TCP connection without a close handshake (a crashed node)."""
        for t in self._tasks:
            t.cancel()
        if self.ws is not None:
            transport = self.ws._response.connection.transport if self.ws._response.connection else None
            if transport is not None:
                transport.abort()

    # --- messages -------------------------------------------------------------------------------

    async def send(self, msg: msgspec.Struct | dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send_str(_enc.encode(msg).decode())

    def heartbeat_message(self, **changes: Any) -> NodeHeartbeat:
        ts = max(int(time.time() * 1000), self._last_ts + 1)
        self._last_ts = ts
        self._sent_at[ts] = time.perf_counter()
        services, by_type, languages = self._reported()
        hb = NodeHeartbeat(
            node_id=self.node_id or "",
            timestamp=ts,
            resource_usage=ResourceUsage(
                cpu_percent=round(self.rng.uniform(5, 60), 1),
                mem_percent=round(self.rng.uniform(20, 70), 1),
                gpu_percent=round(self.rng.uniform(0, 70), 1),
                running_jobs=self.running_jobs,
            ),
            installed_services=services,
            capability_by_type=by_type,
            installed_models=[],
            language_capabilities=languages,
        )
        return msgspec.structs.replace(hb, **changes) if changes else hb

    def _reported(self) -> tuple[Any, Any, Any]:
        """The capability part of a heartbeat, built once per profile (it rarely changes)."""
        p = self.profile
        if self._cached is None or self._cached[0] is not p or self._cached[1] != p:
            self._cached = (p, copy.copy(p), (p.services(), p.capability_by_type(), p.languages()))
        return self._cached[2]

    async def heartbeat(self, **changes: Any) -> None:
        await self.send(self.heartbeat_message(**changes))

    async def _heartbeat_loop(self) -> None:
        # Spread the fleet's heartbeats over the interval instead of sending them all at once.
        await asyncio.sleep(self.rng.uniform(0, self.interval))
        while True:
            with contextlib.suppress(ConnectionError):
                await self.heartbeat()
            await asyncio.sleep(self.interval)

    async def _reader(self) -> None:
        assert self.ws is not None
        async for frame in self.ws:
            if frame.type is not aiohttp.WSMsgType.TEXT:
                continue
            msg = _dec.decode(frame.data)
            if msg.get("type") == "node_heartbeat_ack":
                sent = self._sent_at.pop(msg.get("timestamp"), None)
                if sent is not None:
                    self.rtts.append(time.perf_counter() - sent)
                if self.fixed_interval is None and msg.get("next_heartbeat_ms"):
                    self.interval = msg["next_heartbeat_ms"] / 1000.0
            else:
                self.received.append(msg)
                if self.on_message is not None:
                    self.on_message(msg)
            for pred, fut in list(self._waiters):
                if not fut.done() and pred(msg):
                    fut.set_result(msg)
                    self._waiters.remove((pred, fut))

    def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> asyncio.Future[dict[str, Any]]:
        """A future resolved by the next received message matching ``pred`` (set before sending)."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.append((pred, fut))
        return asyncio.ensure_future(asyncio.wait_for(fut, timeout))

    @property
    def closed(self) -> bool:
        return self.ws is None or self.ws.closed


async def run_fleet(
    url: str,
    count: int,
    *,
    duration: float | None = None,
    interval: float | None = None,
    seed: int = 0,
    report: Callable[[str], None] | None = None,
) -> list[SimulatedNode]:
    """Start ``count`` nodes (20 registrations in flight at a time) and keep them alive."""
    rng = random.Random(seed)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        nodes = [
            SimulatedNode(http, url, random_profile(rng), interval=interval, seed=seed * 100003 + i)
            for i in range(count)
        ]
        gate = asyncio.Semaphore(20)

        async def start(n: SimulatedNode) -> None:
            async with gate:
                await n.start()

        await asyncio.gather(*(start(n) for n in nodes))
        if report:
            report(f"{count} nodes registered")
        try:
            await asyncio.sleep(duration if duration is not None else float("inf"))
        finally:
            await asyncio.gather(*(n.close() for n in nodes), return_exceptions=True)
        return nodes
