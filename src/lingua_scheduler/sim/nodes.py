"""Simulated nodes speaking the real node protocol over real WebSockets.

A library for tests and benchmarks (``SimulatedNode``, ``run_fleet``) and the engine behind
``lingua-scheduler simulate-nodes``. Each node registers with a realistic profile, then heartbeats at
the interval the scheduler asks for (or a fixed one), varying its reported load. Its jobs run through
the node SDK's job runner (``node/jobs.py``): the simulated work is an SDK ``handle``; what a test needs
beyond a well-behaved node (no acks, crashes, hung readers, raw frames, waiting on any message) stays
here, around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import random
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import aiohttp
import msgspec

from lingua_scheduler.node.jobs import Job, JobFailed, Partial, Result, ack, result_message, run_job
from lingua_scheduler.protocol.node import JobAssign, NodeHeartbeat, ResourceUsage
from lingua_scheduler.sim.profiles import NodeProfile, random_profile
from lingua_scheduler.sim.reach import Tally, safe_url, start_bounded
from lingua_scheduler.sim.sockets import drop_connection

_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder()


class Behavior(StrEnum):
    """How a simulated node answers ``job_assign`` (for tests of failover)."""

    NORMAL = "normal"
    #: never acknowledges nor answers (optionally answers late: ``late_result_after``)
    NEVER_ACK = "never_ack"
    #: acknowledges, then its connection dies mid-job
    CRASH_MID_JOB = "crash_mid_job"
    #: answers every job with MODEL_NOT_AVAILABLE for its ASR service
    MODEL_NOT_AVAILABLE = "model_not_available"
    #: answers every job with success and nothing recognised (a node whose ASR hears nothing)
    EMPTY_RESULT = "empty_result"


@dataclass(slots=True)
class Executor:
    """Job execution of a simulated node: latency, random failures, streaming partials, behaviours."""

    latency: float = 0.05
    #: jitter added uniformly in [0, jitter]
    jitter: float = 0.0
    failure_rate: float = 0.0
    #: answer every n-th job (counted from the first) with a failure, whatever ``failure_rate`` says:
    #: 2 fails half the jobs, alternately (deterministic, unlike the rate)
    fail_every: int = 0
    partials: int = 1
    #: send job_started before working (the reference client does; a minimal node may not)
    send_started: bool = True
    behavior: Behavior = Behavior.NORMAL
    late_result_after: float | None = None
    #: stop a job on job_cancel; the published node clients finish it and send the result anyway
    honours_cancel: bool = True


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
        executor: Executor | None = None,
        fallback_urls: tuple[str, ...] = (),
        reconnect: bool = False,
        enrollment_secret: str | None = None,
        node_token: str | None = None,
    ) -> None:
        self.http = http
        #: credentials (docs/security.md): the enrollment secret is sent while the node has no id, the
        #: token from then on; the token of every node_register_ack is kept
        self.enrollment_secret = enrollment_secret
        self.node_token = node_token
        self.url = url
        #: with ``reconnect``, a lost connection is re-established (with backoff) on these in turn
        self.urls = (url, *fallback_urls)
        self.reconnect = reconnect
        self.reconnects = 0
        self._closing = False
        self._connected = asyncio.Event()
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
        self._reader_task: asyncio.Task[None] | None = None
        #: called for every message that is not a heartbeat ack
        self.on_message: Callable[[dict[str, Any]], None] | None = None
        self.executor = executor or Executor()
        self.jobs_received = 0
        self.jobs_done = 0
        #: jobs this node has come to answer (``Executor.fail_every`` counts them)
        self._answered = 0
        self._jobs: dict[str, asyncio.Task[None]] = {}
        #: most jobs this node ran at once (tests of over-commitment)
        self.max_running = 0

    # --- connection -----------------------------------------------------------------------------

    async def connect(self) -> None:
        self.ws = await self.http.ws_connect(self.url, autoping=True, max_msg_size=64 * 1024 * 1024)
        self._connected.set()
        self._reader_task = asyncio.create_task(self._reader())
        self._tasks.append(self._reader_task)

    async def register(self, timeout: float = 10.0) -> dict[str, Any]:
        """Send node_register and wait for the ack (or an error, which is returned as is)."""
        waiter = self.wait_for(lambda m: m.get("type") in ("node_register_ack", "error"), timeout)
        msg = self.profile.register_message(self.node_id)
        if self.node_id is None and self.enrollment_secret is not None:
            msg.enrollment_secret = self.enrollment_secret
        if self.node_id is not None and self.node_token is not None:
            msg.node_token = self.node_token
        await self.send(msg)
        reply = await waiter
        if reply["type"] == "node_register_ack":
            self.node_id = reply["node_id"]
            self.node_token = reply.get("node_token") or self.node_token
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
        self._closing = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        if self.ws is not None:
            await self.ws.close()

    async def kill(self, *, restart: bool = False) -> None:
        """Drop the TCP connection without a close handshake (a crashed node). With ``restart`` (and
        ``reconnect``) the node comes back like a supervised process: its reader sees the connection
        die and reconnects with the same id; jobs it was running may still answer, late (fault tests)."""
        if not restart:
            self._closing = True
            for t in self._tasks:
                t.cancel()
        if self.ws is not None:
            drop_connection(self.ws)

    def stop_reading(self) -> None:
        """The node's process hangs: nothing reads what the scheduler sends any more, while the node
        can still send. Once the WebSocket client's buffer is full it stops reading the TCP
        connection, and the kernel buffers fill (backpressure tests)."""
        if self._reader_task is not None:
            self._reader_task.cancel()

    # --- messages -------------------------------------------------------------------------------

    async def send(self, msg: msgspec.Struct | dict[str, Any]) -> None:
        if self.reconnect and not self._connected.is_set():
            await asyncio.wait_for(self._connected.wait(), 15)
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
        try:
            await self._read(self.ws)
        finally:
            self._connected.clear()
            if self.reconnect and not self._closing:
                asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        """Connect again (next URL each try, backoff up to 1 s), re-register with our id, heartbeat."""
        delay = 0.05
        for t in [t for t in self._tasks if not t.done() and t is not asyncio.current_task()]:
            t.cancel()
        self._tasks.clear()
        attempt = 0
        while not self._closing:
            self.url = self.urls[attempt % len(self.urls)]
            attempt += 1
            try:
                await self.connect()
                reply = await self.register()
                if reply["type"] != "node_register_ack":
                    raise ConnectionError(reply.get("code", "register refused"))
            except (TimeoutError, OSError, aiohttp.ClientError, ConnectionError):
                if self.ws is not None:
                    await self.ws.close()
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)
                continue
            self.reconnects += 1
            # the new connection may die at once too (fault tests): its reader reconnects again
            with contextlib.suppress(ConnectionError):
                await self.heartbeat()
            self._tasks.append(asyncio.create_task(self._heartbeat_loop()))
            return

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for frame in ws:
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
                kind = msg.get("type")
                if kind == "job_assign":
                    self.jobs_received += 1
                    self._jobs[msg["job_id"]] = asyncio.create_task(self._execute(msg))
                elif kind == "job_cancel":
                    task = self._jobs.pop(msg.get("job_id", ""), None)
                    ex = self.executor
                    if task is not None and ex.behavior is not Behavior.NEVER_ACK and ex.honours_cancel:
                        task.cancel()
                if self.on_message is not None:
                    self.on_message(msg)
            for pred, fut in list(self._waiters):
                if not fut.done() and pred(msg):
                    fut.set_result(msg)
                    self._waiters.remove((pred, fut))

    async def _execute(self, raw: dict[str, Any]) -> None:
        """Run one job: the simulated work is an SDK ``handle`` (``handle``) run by the SDK's job
        runner; the faults (no ack, a crash, acks only when the profile declares them) are around it."""
        ex = self.executor
        try:
            assign = msgspec.convert(raw, JobAssign)
        except msgspec.ValidationError:
            return  # not a job this simulator can read (fault tests send their own frames)
        try:
            if ex.behavior is Behavior.NEVER_ACK:
                if ex.late_result_after is None:
                    return
                await asyncio.sleep(ex.late_result_after)
                await self.send_job(result_message(assign, self.node_id or "", _ok(assign), 5))
                return
            self.running_jobs += 1
            self.max_running = max(self.max_running, self.running_jobs)
            acks = self.profile.sends_acks
            if acks:
                await self.send_job(ack(assign, self.node_id or ""))
            if ex.behavior is Behavior.CRASH_MID_JOB:
                await asyncio.sleep(ex.latency / 2)
                await self.kill()
                return
            if ex.send_started and acks and ex.behavior is not Behavior.MODEL_NOT_AVAILABLE:
                await self.send({"type": "job_started", **_ids(assign, self.node_id)})
            await run_job(self.handle, assign, lambda: self.node_id or "", self.send_job)
            self.jobs_done += 1
        except (ConnectionError, RuntimeError):
            pass
        finally:
            self._jobs.pop(assign.job_id, None)
            if ex.behavior is not Behavior.NEVER_ACK:
                self.running_jobs = max(0, self.running_jobs - 1)

    async def send_job(self, msg: msgspec.Struct) -> None:
        """A job message, handed to ``send`` as a plain dict: tests intercept job messages by their
        fields (fault injection at a chosen message of a chosen job)."""
        await self.send(msgspec.to_builtins(msg))

    async def handle(self, job: Job) -> AsyncIterator[Partial | Result]:
        """The simulated work, as a node author writes it with the SDK: partials, a latency, a result
        (or a failure)."""
        ex = self.executor
        if ex.behavior is Behavior.MODEL_NOT_AVAILABLE:
            raise JobFailed("MODEL_NOT_AVAILABLE", "asr model missing", {"service_id": "faster-whisper-vad"})
        # A node without acks streams partials only when the job asks for them, as the real ones do.
        for i in range(ex.partials if self.profile.sends_acks or job.streaming else 0):
            yield Partial(f"partial {i}")
        if ex.latency or ex.jitter:
            await asyncio.sleep(ex.latency + self.rng.uniform(0, ex.jitter))
        self._answered += 1
        if ex.behavior is Behavior.EMPTY_RESULT:
            yield Result(text_asr="", text_translated="", tts_audio=b"", tts_format="pcm16")
            return
        if (ex.fail_every and self._answered % ex.fail_every == 0) or self.rng.random() < ex.failure_rate:
            raise JobFailed("NODE_OVERLOADED", "simulated failure")
        yield _ok(job.assign)

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


def _ok(assign: JobAssign) -> Result:
    return Result(
        text_asr=f"asr {assign.utterance_index}",
        text_translated=f"{assign.tgt_lang} {assign.utterance_index}",
        tts_audio=b"\0\0\0",
        tts_format="pcm16",
    )


def _ids(assign: JobAssign, node_id: str | None) -> dict[str, Any]:
    return {
        "job_id": assign.job_id,
        "attempt_id": assign.attempt_id,
        "node_id": node_id,
        "session_id": assign.session_id,
        "trace_id": assign.trace_id,
    }


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_fleet(
    url: str,
    count: int,
    *,
    duration: float | None = None,
    interval: float | None = None,
    seed: int = 0,
    report: Callable[[str], None] | None = None,
    enrollment_secret: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Start ``count`` nodes (20 registrations in flight at a time) and keep the registered ones
    heartbeating for ``duration`` seconds (forever without).

    ``report`` gets one JSON line once registration is over (how many registered, how many were
    refused and why, how many could not reach it) and one when the fleet stops; the first summary is
    returned (``registered`` 0: nothing to keep alive, it returns at once). Each registration is
    bounded by ``timeout``; the first node is started alone, and if it cannot reach the scheduler at
    all ``Unreachable`` is raised with the reason."""
    rng = random.Random(seed)
    connector = aiohttp.TCPConnector(limit=0, ssl=ssl_context if ssl_context is not None else True)
    async with aiohttp.ClientSession(connector=connector) as http:
        nodes = [
            SimulatedNode(
                http,
                url,
                random_profile(rng),
                interval=interval,
                seed=seed * 100003 + i,
                enrollment_secret=enrollment_secret,
            )
            for i in range(count)
        ]
        tally = Tally()
        gate = asyncio.Semaphore(20)
        t0 = time.monotonic()

        async def start(n: SimulatedNode, probe: bool = False) -> None:
            async with gate:
                if not await start_bounded(url, timeout, tally, n.start, probe=probe):
                    await n.close()

        try:
            if nodes:
                await start(nodes[0], probe=True)
            await asyncio.gather(*(start(n) for n in nodes[1:]))
            summary = {
                "event": "registered",
                "url": safe_url(url),
                "nodes": count,
                **tally.as_dict("registered"),
                "seconds": round(time.monotonic() - t0, 2),
            }
            if report:
                report(json.dumps(summary))
            if tally.ok:
                live = [n for n in nodes if n.node_id is not None and not n.closed]
                try:
                    await asyncio.sleep(duration if duration is not None else float("inf"))
                finally:
                    rtts = [r for n in live for r in n.rtts]
                    p50 = _percentile(rtts, 0.5)
                    stopped = {
                        "event": "stopped",
                        "registered": tally.ok,
                        "still_connected": sum(1 for n in live if not n.closed),
                        "heartbeats_acked": len(rtts),
                        "heartbeat_rtt_ms_p50": round(p50 * 1e3, 2) if p50 is not None else None,
                        "jobs_received": sum(n.jobs_received for n in live),
                    }
                    if report:
                        report(json.dumps(stopped))
            return summary
        finally:
            await asyncio.gather(*(n.close() for n in nodes), return_exceptions=True)
