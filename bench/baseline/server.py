"""BASELINE for bench/seed_scenario.py: the scheduler's heartbeat path as it was BEFORE the seed fix.

This is a benchmark fixture, never part of the product. It reproduces the design the seed document
(the write-up of the reference scheduler's heartbeat fix this project started from; docs/design.md)
describes: ``handle_node_heartbeat`` before the fix, on the product's own parsing, registry, fleet
view and selector so that the comparison differs in the design only:

    handle_node_heartbeat
    ├─> management lock (one asyncio.Lock that node selection also needs, as the RwLock was)
    ├─> update_node_heartbeat()                 Registry.heartbeat, O(1)
    ├─> update_node_snapshot()                  O(N) copy of the fleet snapshot, every heartbeat
    ├─> phase3_core_cache_upsert_node()         publish the fleet view
    └─> phase3_upsert_node_to_pool_index()      every heartbeat (``is_some()`` taken for a change):
        ├─> pool re-assignment                  PoolLayout.groups_for over the node's capabilities
        └─> --round-trips sequential Redis round trips, awaited while the lock is held

Job creation (an ``utterance`` from a session) selects a node under the same lock. The time a
selection takes is measured from the moment it asks for the lock, so it includes the wait; ``GET
/stats`` reports it split into lock wait and selection proper, with the heartbeat figures and the
count of lock waits over ``--slow-wait-ms`` (the reference's "management lock ... wait too long").

The Redis commands are deliberately cheap (HGET, SISMEMBER, SADD, HSET, EXPIRE on small keys): only
the round trips count, which makes this baseline a conservative one.

    python bench/baseline/server.py --port P --redis-url redis://127.0.0.1:R/0 [--round-trips 7]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import redis.asyncio as aioredis
from aiohttp import WSMsgType, web

from lingua_scheduler.clock import SystemClock
from lingua_scheduler.config import NodeHealthConfig, PoolsConfig
from lingua_scheduler.core.fleet_view import FleetViewPublisher
from lingua_scheduler.core.node_view import NodeView
from lingua_scheduler.core.registry import Registry
from lingua_scheduler.core.selection import SelectionRequest, Selector
from lingua_scheduler.errors import SchedulerError
from lingua_scheduler.protocol.codec import FrameDecoder
from lingua_scheduler.protocol.node import JobResult, NodeHeartbeat, NodeInbound, NodeRegister
from lingua_scheduler.protocol.session import SessionInbound, SessionInit, UtteranceMessage
from lingua_scheduler.server.latency import LatencyWindow

_enc = msgspec.json.Encoder()
MAX_JOBS = 4


class Baseline:
    def __init__(self, redis_url: str, round_trips: int, interval: float, slow_wait: float) -> None:
        self.clock = SystemClock()
        self.registry = Registry(
            NodeHealthConfig(heartbeat_interval_seconds=interval, heartbeat_budget_per_second=1e9),
            self.clock,
        )
        self.publisher = FleetViewPublisher(self.registry, self.clock, MAX_JOBS, pools_config=PoolsConfig())
        self.selector = Selector(scan_budget=2000)
        self.lock = asyncio.Lock()
        self.snapshot: dict[str, NodeView] = {}
        self.redis = aioredis.Redis.from_url(redis_url)
        self.round_trips = round_trips
        self.interval_ms = int(interval * 1000)
        self.slow_wait = slow_wait
        self.node_ws: dict[str, web.WebSocketResponse] = {}
        self.sessions: dict[str, web.WebSocketResponse] = {}
        #: job id -> (session id, utterance index, node id, load token)
        self.jobs: dict[str, tuple[str, int, str, int]] = {}
        self._ids = itertools.count(1)
        self.reset()

    def reset(self) -> None:
        self.hb_total = LatencyWindow(1 << 17)
        self.hb_wait = LatencyWindow(1 << 17)
        self.hb_hold = LatencyWindow(1 << 17)
        self.sel_total = LatencyWindow(1 << 17)
        self.sel_wait = LatencyWindow(1 << 17)
        self.sel_compute = LatencyWindow(1 << 17)
        self.slow_waits = 0
        self.no_node = 0

    # --- the pre-fix heartbeat path -------------------------------------------------------------------

    async def heartbeat(self, conn: object, msg: NodeHeartbeat, t0: float) -> bytes:
        async with self.lock:  # the management write lock
            t1 = time.perf_counter()
            self.registry.heartbeat(conn, msg)  # update_node_heartbeat()
            entry = self.registry.nodes[msg.node_id]
            # update_node_snapshot(): the whole snapshot copied to change one node
            snapshot = dict(self.snapshot)
            old = snapshot.get(entry.node_id)
            snapshot[entry.node_id] = self.publisher.node_view(entry, old.pools if old else ())
            self.snapshot = snapshot
            # phase3_core_cache_upsert_node(): the view selection reads
            self.publisher.publish()
            # phase3_upsert_node_to_pool_index_with_runtime(): language_capabilities.is_some() is true
            # on every heartbeat, so pool assignment runs every time, with its Redis round trips
            groups = sorted(self.publisher.layout.groups_for(entry.node_id, entry.status, entry.caps))
            await self._pool_sync(entry.node_id, groups)
            t2 = time.perf_counter()
        self.hb_wait.record(t1 - t0)
        self.hb_hold.record(t2 - t1)
        if t1 - t0 > self.slow_wait:
            self.slow_waits += 1
        ack = _enc.encode(
            {
                "type": "node_heartbeat_ack",
                "node_id": msg.node_id,
                "timestamp": msg.timestamp,
                "server_ts_ms": self.clock.wall_ms(),
                "next_heartbeat_ms": self.interval_ms,
            }
        )
        self.hb_total.record(time.perf_counter() - t0)
        return ack

    async def _pool_sync(self, node_id: str, groups: list[str]) -> None:
        r = self.redis
        g = groups[0] if groups else "none"
        key = f"lingua:node:{node_id}"
        members = f"lingua:pool:{g}:members"
        for i in range(self.round_trips):
            op = i % 5
            if op == 0:
                await r.hget(key, "pools")
            elif op == 1:
                await r.sismember(members, node_id)
            elif op == 2:
                await r.sadd(members, node_id)
            elif op == 3:
                await r.hset(key, "pools", ",".join(groups))
            else:
                await r.expire(key, 3600)

    # --- job creation: selection under the same lock ---------------------------------------------------

    async def create_job(self, session_id: str, msg: UtteranceMessage) -> None:
        t0 = time.perf_counter()
        async with self.lock:  # the management read lock
            t1 = time.perf_counter()
            result = self.selector.select(
                self.publisher.view, SelectionRequest(msg.src_lang, msg.tgt_lang, routing_key=session_id)
            )
            t2 = time.perf_counter()
        self.sel_total.record(t2 - t0)
        self.sel_wait.record(t1 - t0)
        self.sel_compute.record(t2 - t1)
        if t1 - t0 > self.slow_wait:
            self.slow_waits += 1
        node_id = result.node_id
        ws = self.node_ws.get(node_id) if node_id else None
        session = self.sessions.get(session_id)
        if node_id is None or ws is None:
            self.no_node += 1
            if session is not None:
                await session.send_bytes(
                    _enc.encode(
                        {
                            "type": "missing_result",
                            "session_id": session_id,
                            "utterance_index": msg.utterance_index,
                            "reason": "job_failed",
                            "created_at_ms": self.clock.wall_ms(),
                        }
                    )
                )
            return
        job_id = f"job-{next(self._ids)}"
        token = self.registry.nodes[node_id].load.dispatched()
        self.jobs[job_id] = (session_id, msg.utterance_index, node_id, token)
        await ws.send_str(
            _enc.encode(
                {
                    "type": "job_assign",
                    "job_id": job_id,
                    "attempt_id": 1,
                    "session_id": session_id,
                    "utterance_index": msg.utterance_index,
                    "src_lang": msg.src_lang,
                    "tgt_lang": msg.tgt_lang,
                    "pipeline": {"use_asr": True, "use_nmt": True, "use_tts": True},
                    "audio": msg.audio,
                    "audio_format": msg.audio_format,
                    "sample_rate": msg.sample_rate,
                    "trace_id": job_id,
                }
            ).decode()
        )

    async def job_result(self, msg: JobResult) -> None:
        job = self.jobs.pop(msg.job_id, None)
        if job is None:
            return
        session_id, index, node_id, token = job
        entry = self.registry.nodes.get(node_id)
        if entry is not None:
            entry.load.finished(token)
        session = self.sessions.get(session_id)
        if session is not None and not session.closed:
            await session.send_bytes(
                _enc.encode(
                    {
                        "type": "translation_result",
                        "session_id": session_id,
                        "utterance_index": index,
                        "job_id": msg.job_id,
                        "text_asr": msg.text_asr or "",
                        "text_translated": msg.text_translated or "",
                    }
                )
            )

    def stats(self) -> dict[str, Any]:
        def q(w: LatencyWindow) -> dict[str, Any]:
            return {**w.percentiles(50, 99, 99.9), "count": w.count}

        return {
            "heartbeat_handle_seconds": q(self.hb_total),
            "heartbeat_lock_wait_seconds": q(self.hb_wait),
            "heartbeat_lock_hold_seconds": q(self.hb_hold),
            "selection_seconds": q(self.sel_total),
            "selection_lock_wait_seconds": q(self.sel_wait),
            "selection_compute_seconds": q(self.sel_compute),
            "slow_lock_waits": self.slow_waits,
            "slow_wait_threshold_seconds": self.slow_wait,
            "no_node": self.no_node,
            "nodes": len(self.registry.nodes),
            "redis_round_trips_per_heartbeat": self.round_trips,
        }


BASELINE: web.AppKey[Baseline] = web.AppKey("baseline", Baseline)


async def node_ws(request: web.Request) -> web.WebSocketResponse:
    b = request.app[BASELINE]
    ws = web.WebSocketResponse(max_msg_size=4 * 1024 * 1024)
    await ws.prepare(request)
    decoder: FrameDecoder[Any] = FrameDecoder(NodeInbound, 4 * 1024 * 1024)
    node_id: str | None = None
    try:
        async for frame in ws:
            if frame.type is not WSMsgType.TEXT:
                continue
            t0 = time.perf_counter()
            try:
                msg = decoder.decode(frame.data)
                if type(msg) is NodeHeartbeat:
                    await ws.send_bytes(await b.heartbeat(ws, msg, t0))
                elif type(msg) is NodeRegister:
                    async with b.lock:
                        entry, _ = b.registry.register(msg, ws)
                        b.publisher.publish()
                    node_id = entry.node_id
                    b.node_ws[node_id] = ws
                    await ws.send_bytes(
                        _enc.encode(
                            {
                                "type": "node_register_ack",
                                "node_id": node_id,
                                "message": "registered",
                                "status": entry.status.value,
                                "heartbeat_interval_ms": b.interval_ms,
                            }
                        )
                    )
                elif type(msg) is JobResult:
                    await b.job_result(msg)
            except SchedulerError as exc:
                await ws.send_bytes(
                    _enc.encode({"type": "error", "code": exc.code.value, "message": exc.message})
                )
    finally:
        if node_id is not None:
            b.node_ws.pop(node_id, None)
            async with b.lock:
                b.registry.disconnect(node_id, ws)
                b.publisher.publish()
    return ws


async def session_ws(request: web.Request) -> web.WebSocketResponse:
    b = request.app[BASELINE]
    ws = web.WebSocketResponse(max_msg_size=4 * 1024 * 1024)
    await ws.prepare(request)
    decoder: FrameDecoder[Any] = FrameDecoder(SessionInbound, 4 * 1024 * 1024)
    session_id = f"s-{next(b._ids)}"
    try:
        async for frame in ws:
            if frame.type is not WSMsgType.TEXT:
                continue
            msg = decoder.decode(frame.data)
            if isinstance(msg, SessionInit):
                b.sessions[session_id] = ws
                await ws.send_bytes(
                    _enc.encode(
                        {"type": "session_init_ack", "session_id": session_id, "trace_id": session_id}
                    )
                )
            elif isinstance(msg, UtteranceMessage):
                await b.create_job(session_id, msg)
    finally:
        b.sessions.pop(session_id, None)
    return ws


async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[BASELINE].stats())


async def reset(request: web.Request) -> web.Response:
    request.app[BASELINE].reset()
    return web.json_response({"reset": True})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "baseline": True})


def build(args: argparse.Namespace) -> web.Application:
    app = web.Application()
    app[BASELINE] = Baseline(
        args.redis_url, args.round_trips, args.heartbeat_interval, args.slow_wait_ms / 1000
    )

    async def redis_lifetime(app: web.Application) -> AsyncIterator[None]:
        yield
        with contextlib.suppress(Exception):
            await app[BASELINE].redis.aclose()

    app.cleanup_ctx.append(redis_lifetime)
    app.router.add_get("/ws/node", node_ws)
    app.router.add_get("/ws/session", session_ws)
    app.router.add_get("/stats", stats)
    app.router.add_post("/stats/reset", reset)
    app.router.add_get("/health", health)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description="pre-fix baseline scheduler (benchmark fixture)")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--round-trips", type=int, default=7, help="sequential Redis round trips per heartbeat")
    ap.add_argument("--heartbeat-interval", type=float, default=1.0)
    ap.add_argument(
        "--slow-wait-ms", type=float, default=100.0, help="lock waits longer than this are logged"
    )
    args = ap.parse_args()
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    web.run_app(build(args), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
