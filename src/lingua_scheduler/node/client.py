"""``Node``: one node's life with the scheduler, around the author's ``handle``.

Connects to ``/ws/node`` (TLS with a CA file when given), registers with its persisted id and token
(an enrollment secret the first time, when the fleet uses one), stores what the ack gives it, then
heartbeats at the interval the scheduler tells it (``heartbeat_interval_ms``, then each ack's
``next_heartbeat_ms``), a little early by a random share so a fleet spreads out. Every ``job_assign``
is acknowledged at once (the node declares ``job_ack``) and run as a task: partials and the result go
back on whatever connection is current when they are ready; ``job_cancel`` cancels the task. A lost
connection is re-established with capped, jittered backoff, under the same id.

Draining (SIGTERM, SIGINT, or ``drain()``): the node sends ``node_drain`` (no new job for it), lets the
running jobs finish (at most ``drain_timeout`` seconds), closes, and ``serve`` returns. A registration
the scheduler refuses for good (credentials, schema, no GPU) raises ``Refused``.

Outside the hot path of the scheduler, not of a fleet: one node per process is the intended use. The
load generator (``loadtest/fleet.py``) keeps its own loop for thousands of nodes per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from lingua_scheduler.node.backoff import Backoff
from lingua_scheduler.node.declaration import Declaration
from lingua_scheduler.node.identity import Identity, IdentityStore
from lingua_scheduler.node.jobs import Handler, ack, run_job
from lingua_scheduler.protocol.codec import encode
from lingua_scheduler.protocol.common import ErrorMessage, FeatureFlags
from lingua_scheduler.protocol.node import (
    JobAssign,
    JobCancel,
    NodeDrain,
    NodeDrainAck,
    NodeHeartbeat,
    NodeHeartbeatAck,
    NodeOutbound,
    NodeRegisterAck,
    NodeStatusMessage,
    ResourceUsage,
)

log = logging.getLogger("lingua_scheduler.node")

#: registration refusals a retry cannot fix: the node stops and says why
FATAL_CODES = frozenset({"UNAUTHORIZED", "INVALID_CAPABILITY_SCHEMA", "NO_GPU_AVAILABLE", "INVALID_MESSAGE"})
#: share of the interval a heartbeat may come early by (spreads a fleet; never late)
HEARTBEAT_JITTER = 0.1
#: used until the scheduler says otherwise
DEFAULT_HEARTBEAT_S = 15.0
ENV_URL = "LINGUA_NODE_URL"
ENV_STATE_FILE = "LINGUA_NODE_STATE_FILE"
ENV_ENROLLMENT_SECRET = "LINGUA_NODE_ENROLLMENT_SECRET"
ENV_CA_FILE = "LINGUA_NODE_CA_FILE"
DEFAULT_URL = "ws://127.0.0.1:9000/ws/node"

_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(NodeOutbound)


class Refused(Exception):
    """The scheduler refused the registration for a reason a retry cannot fix."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"registration refused: {code}: {message}")
        self.code = code


@dataclass(frozen=True, slots=True)
class Usage:
    """The machine's load for heartbeats (percentages); the SDK does not measure it itself."""

    cpu_percent: float = 0.0
    mem_percent: float = 0.0
    gpu_percent: float | None = None
    gpu_mem_percent: float | None = None


class _Closed(Exception):
    """The connection ended (or its registration must be retried)."""


class Node:
    """A node around ``handle``. Options not given come from the environment: ``LINGUA_NODE_URL``
    (default ``ws://127.0.0.1:9000/ws/node``), ``LINGUA_NODE_STATE_FILE`` (default under the user's state
    directory, ``identity.default_path``), ``LINGUA_NODE_ENROLLMENT_SECRET``, ``LINGUA_NODE_CA_FILE``.

    ``load`` returns the node's own load (0..1), sent in heartbeats; with ``load_threshold`` the
    scheduler sends no new job while it is at or above it. ``usage`` returns the machine's figures."""

    def __init__(
        self,
        handle: Handler,
        *,
        languages: Sequence[tuple[str, str]],
        gpus: Sequence[tuple[str, float]],
        services: Sequence[str] = ("asr", "nmt", "tts"),
        max_concurrent_jobs: int = 1,
        load: Callable[[], float] | None = None,
        load_threshold: float | None = None,
        usage: Callable[[], Usage] | None = None,
        url: str | None = None,
        state_file: str | os.PathLike[str] | None = None,
        enrollment_secret: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        features: FeatureFlags | None = None,
        accept_public_jobs: bool = True,
        drain_timeout: float = 60.0,
        backoff: Backoff | None = None,
    ) -> None:
        self.handle = handle
        self.declaration = Declaration(
            languages=languages,
            gpus=gpus,
            services=services,
            max_concurrent_jobs=max_concurrent_jobs,
            load_threshold=load_threshold,
            accept_public_jobs=accept_public_jobs,
            features=features or FeatureFlags(),
        )
        env = os.environ
        self.url = url or env.get(ENV_URL) or DEFAULT_URL
        self.identity_store = IdentityStore(state_file or env.get(ENV_STATE_FILE) or None)
        self.enrollment_secret = enrollment_secret or env.get(ENV_ENROLLMENT_SECRET) or None
        ca = ca_file or env.get(ENV_CA_FILE) or None
        self.ssl_context: ssl.SSLContext | None = ssl.create_default_context(cafile=str(ca)) if ca else None
        self.load = load
        self.usage = usage
        self.drain_timeout = drain_timeout
        self.backoff = backoff or Backoff()
        self.identity: Identity | None = self.identity_store.load()
        self.interval = DEFAULT_HEARTBEAT_S
        self.status: str | None = None
        #: job id -> its task
        self.jobs: dict[str, asyncio.Task[None]] = {}
        self.registrations = 0
        self.jobs_done = 0
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._draining = asyncio.Event()
        self._drain_acked = False
        self._rng = random.Random()
        self._last_ts = 0
        d = self.declaration
        #: the capability part of every heartbeat, built once (the scheduler compares it by value)
        self._reported = (d.services_report(), d.by_type(), d.language_report())

    @property
    def node_id(self) -> str | None:
        return self.identity.node_id if self.identity is not None else None

    @property
    def state_file(self) -> Path:
        return self.identity_store.path

    # --- running ----------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until drained: SIGTERM and SIGINT drain the node, then the process can exit 0."""
        asyncio.run(self._run_with_signals())

    async def _run_with_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not on this platform
                loop.add_signal_handler(sig, self.drain)
        await self.serve()

    def drain(self) -> None:
        """Leave: no new job (``node_drain``), finish the running ones, close; ``serve`` then returns."""
        if not self._draining.is_set():
            log.info("node draining", extra={"node_id": self.node_id, "running": len(self.jobs)})
            self._draining.set()

    async def serve(self) -> None:
        """Connect, register and work until drained, reconnecting whenever the connection is lost."""
        connector = aiohttp.TCPConnector(ssl=self.ssl_context if self.ssl_context is not None else True)
        async with aiohttp.ClientSession(connector=connector) as http:
            while not self._draining.is_set():
                try:
                    await self._connection(http)
                except Refused:
                    raise
                except (_Closed, OSError, aiohttp.ClientError, TimeoutError) as exc:
                    if self._draining.is_set():
                        break
                    delay = self.backoff.next()
                    log.info(
                        "scheduler connection lost; reconnecting",
                        extra={
                            "node_id": self.node_id,
                            "reason": type(exc).__name__,
                            "delay_s": round(delay, 2),
                        },
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._draining.wait(), delay)
            await self._finish_jobs()

    async def _connection(self, http: aiohttp.ClientSession) -> None:
        async with http.ws_connect(self.url, max_msg_size=64 * 1024 * 1024, heartbeat=30.0) as ws:
            self._ws = ws
            try:
                await self._register(ws)
                self.backoff.reset()
                beat = asyncio.create_task(self._heartbeats())
                drain = asyncio.create_task(self._drain_when_asked(ws))
                try:
                    await self._read(ws)
                finally:
                    beat.cancel()
                    drain.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await beat
                    with contextlib.suppress(asyncio.CancelledError):
                        await drain
            finally:
                self._ws = None
        if not self._draining.is_set():
            raise _Closed("connection closed")

    async def _register(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        ident = self.identity
        if ident is not None and ident.node_token is None and self.enrollment_secret is not None:
            ident = None  # an id from an open scheduler: enrol (the fleet now asks for credentials)
        msg = self.declaration.register_message(
            ident.node_id if ident else None,
            node_token=ident.node_token if ident else None,
            enrollment_secret=self.enrollment_secret,
        )
        await ws.send_str(encode(msg).decode())
        while True:
            frame = await asyncio.wait_for(ws.receive(), 30.0)
            if frame.type is not aiohttp.WSMsgType.TEXT:
                raise _Closed("closed during registration")
            reply = _decoder.decode(frame.data)
            if isinstance(reply, NodeRegisterAck):
                break
            if isinstance(reply, ErrorMessage):
                if reply.code in FATAL_CODES:
                    raise Refused(reply.code, reply.message)
                raise _Closed(f"registration refused: {reply.code}")  # e.g. NODE_ID_CONFLICT: retry
        token = reply.node_token or (ident.node_token if ident else None)
        new = Identity(reply.node_id, token)
        if new != self.identity:
            self.identity_store.save(new)
            self.identity = new
        if reply.heartbeat_interval_ms:
            self.interval = reply.heartbeat_interval_ms / 1000.0
        self.status = reply.status
        self.registrations += 1
        self._drain_acked = False
        log.info("node registered", extra={"node_id": reply.node_id, "status": reply.status})

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for frame in ws:
            if frame.type is not aiohttp.WSMsgType.TEXT:
                continue
            try:
                msg = _decoder.decode(frame.data)
            except msgspec.DecodeError:  # a newer scheduler's message: ignore, as the protocol says
                continue
            if isinstance(msg, JobAssign):
                await self._send(ack(msg, self._id()))
                self._start_job(msg)
            elif isinstance(msg, JobCancel):
                running = self.jobs.get(msg.job_id)
                if running is not None:
                    running.cancel()
            elif isinstance(msg, NodeHeartbeatAck):
                if msg.next_heartbeat_ms > 0:
                    self.interval = msg.next_heartbeat_ms / 1000.0
            elif isinstance(msg, NodeStatusMessage):
                self.status = msg.status
                log.info("node status", extra={"node_id": msg.node_id, "status": msg.status})
            elif isinstance(msg, NodeDrainAck):
                self._drain_acked = True
                self.status = msg.status
            elif isinstance(msg, ErrorMessage):
                log.warning("scheduler reported an error", extra={"code": msg.code, "error": msg.message})

    def _start_job(self, assign: JobAssign) -> None:
        job_id = assign.job_id
        task = asyncio.create_task(run_job(self.handle, assign, self._id, self._send))
        self.jobs[job_id] = task
        task.add_done_callback(lambda t: self._job_done(job_id, t))

    def _job_done(self, job_id: str, task: asyncio.Task[None]) -> None:
        if self.jobs.get(job_id) is task:
            del self.jobs[job_id]
        if not task.cancelled() and task.exception() is None:
            self.jobs_done += 1

    async def _heartbeats(self) -> None:
        while True:
            await self._send(self._heartbeat())
            await asyncio.sleep(self.interval * (1.0 - HEARTBEAT_JITTER * self._rng.random()))

    def _heartbeat(self) -> NodeHeartbeat:
        ts = max(int(time.time() * 1000), self._last_ts + 1)
        self._last_ts = ts
        u = self.usage() if self.usage is not None else Usage()
        own = min(1.0, max(0.0, float(self.load()))) if self.load is not None else None
        services, by_type, languages = self._reported
        return NodeHeartbeat(
            node_id=self._id(),
            timestamp=ts,
            resource_usage=ResourceUsage(
                cpu_percent=u.cpu_percent,
                mem_percent=u.mem_percent,
                gpu_percent=u.gpu_percent,
                gpu_mem_percent=u.gpu_mem_percent,
                running_jobs=len(self.jobs),
                load=own,
            ),
            installed_services=services,
            capability_by_type=by_type,
            language_capabilities=languages,
        )

    async def _drain_when_asked(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """On drain: tell the scheduler, wait for the running jobs, then close this connection."""
        await self._draining.wait()
        await self._send(NodeDrain(node_id=self._id(), reason="the node is shutting down"))
        await self._finish_jobs()
        await ws.close()

    async def _finish_jobs(self) -> None:
        if not self.jobs:
            return
        _, late = await asyncio.wait(list(self.jobs.values()), timeout=self.drain_timeout)
        for task in late:  # past the drain timeout: the scheduler moves these jobs elsewhere
            task.cancel()

    # --- sending ----------------------------------------------------------------------------------

    def _id(self) -> str:
        assert self.identity is not None, "registered before any job or heartbeat"
        return self.identity.node_id

    async def _send(self, msg: msgspec.Struct) -> None:
        """Send on the current connection; without one the message is dropped (the scheduler has moved
        the job on, or takes a result of an earlier attempt on the next connection)."""
        ws = self._ws
        if ws is None or ws.closed:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.send_str(encode(msg).decode())
