"""Load-generator processes: fleets and crowds run apart from the scheduler and from the orchestrator.

``LoadGenerator`` starts worker processes (``spawn``: nothing of the parent's state is inherited), each
running one ``Fleet`` (a share of the nodes) or one ``Crowd`` (a share of the sessions) on its own
event loop (uvloop when available). The orchestrator steers them through the phases of a run with
events -- registered, ``go`` (start measuring and talking), ``end`` (close the window), ``stop_sessions``
(stop talking, drain outstanding utterances), ``stop_nodes`` -- and they report progress every second
and their results at the end through one queue. Each worker also measures its own event-loop lag, so
a saturated load generator shows in the report instead of passing for a slow scheduler.

Must never: run in the scheduler's process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import multiprocessing
import queue
import random
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lingua_scheduler.loadtest.crowd import Crowd, SessionPlan
from lingua_scheduler.loadtest.fleet import Fleet, JobBehaviour
from lingua_scheduler.loadtest.wsclient import HandshakeError, Refused
from lingua_scheduler.sim.profiles import NodeProfile, random_profile
from lingua_scheduler.sim.reach import client_ssl_context, describe

T = TypeVar("T")
_ctx = multiprocessing.get_context("spawn")


# --- planning ----------------------------------------------------------------------------------------


def fleet_plan(count: int, seed: int, prefix: str) -> list[tuple[str, NodeProfile]]:
    """``count`` node ids with realistic, seeded capability profiles."""
    rng = random.Random(seed)
    return [(f"{prefix}-{i:05d}", random_profile(rng)) for i in range(count)]


def served_pairs(profiles: Sequence[NodeProfile]) -> dict[tuple[str, str], int]:
    """Directed language pairs -> how many public nodes serve them (ASR src, NMT any-to-any, TTS tgt)."""
    out: dict[tuple[str, str], int] = {}
    for p in profiles:
        if not p.accept_public_jobs or not p.services_running:
            continue
        nmt = set(p.nmt_languages)
        for src in p.asr_languages:
            if src not in nmt:
                continue
            for tgt in p.tts_languages:
                if tgt != src and tgt in nmt:
                    out[(src, tgt)] = out.get((src, tgt), 0) + 1
    return out


def session_plans(
    count: int,
    profiles: Sequence[NodeProfile],
    *,
    mode: str,
    total_rate: float,
    utterance_ms: int,
    seed: int,
) -> list[SessionPlan]:
    """Sessions on language pairs drawn in proportion to how many nodes serve them (so the traffic
    follows the fleet, mostly English pairs, and every pair is servable). ``mode`` "mixed" alternates
    streaming and one-shot sessions."""
    pairs = served_pairs(profiles)
    if not pairs:
        raise ValueError("no node of the fleet serves any language pair")
    rng = random.Random(seed)
    keys = sorted(pairs)
    weights = [pairs[k] for k in keys]
    per_session = total_rate / max(1, count)
    out = []
    for i in range(count):
        src, tgt = rng.choices(keys, weights)[0]
        m = mode if mode != "mixed" else ("stream" if i % 2 == 0 else "utterance")
        out.append(SessionPlan(src, tgt, m, per_session, utterance_ms))
    return out


def split(items: Sequence[T], parts: int) -> list[list[T]]:
    """``items`` in ``parts`` contiguous, nearly equal slices (no empty slice unless items run out)."""
    parts = max(1, min(parts, len(items))) if items else 1
    q, r = divmod(len(items), parts)
    out, i = [], 0
    for k in range(parts):
        n = q + (k < r)
        out.append(list(items[i : i + n]))
        i += n
    return out


# --- worker specs and control ------------------------------------------------------------------------


@dataclass(frozen=True)
class Access:
    """How the load generator reaches the scheduler and proves who it is (docs/security.md).

    Plain data, so it crosses into the spawned workers; each builds its own TLS context from it."""

    #: wss:// and https:// instead of ws:// and http://
    tls: bool = False
    #: PEM file of the CA (or self-signed certificate) to trust; None: the system's store
    ca_file: str | None = None
    #: do not verify the certificate (self-signed test certificates)
    insecure: bool = False
    #: fleet enrollment secret: nodes enrol and use the ids and tokens the scheduler issues
    enrollment_secret: str | None = None
    #: tenant API key every session presents
    api_key: str | None = None

    def ssl_context(self) -> ssl.SSLContext | None:
        return client_ssl_context(self.ca_file, self.insecure) if self.tls else None


@dataclass(frozen=True)
class NodeWorkerSpec:
    host: str
    port: int
    nodes: list[tuple[str, NodeProfile]]
    behaviour: JobBehaviour = field(default_factory=JobBehaviour)
    fixed_interval: float | None = None
    seed: int = 0
    concurrency: int = 100
    access: Access = field(default_factory=Access)
    #: one pacer spreads the heartbeats evenly instead of a timer per node (loadtest/fleet.py)
    paced: bool = False


@dataclass(frozen=True)
class SessionWorkerSpec:
    host: str
    port: int
    plans: list[SessionPlan]
    window: int = 0
    chunk_ms: int = 100
    record_sends: bool = False
    seed: int = 0
    drain_seconds: float = 10.0
    access: Access = field(default_factory=Access)
    #: members per room (1: no rooms)
    room_size: int = 1


@dataclass
class Control:
    go: Any = field(default_factory=_ctx.Event)
    end: Any = field(default_factory=_ctx.Event)
    stop_sessions: Any = field(default_factory=_ctx.Event)
    stop_nodes: Any = field(default_factory=_ctx.Event)


class _LagProbe:
    """Lag of this worker's event loop: how late a 20 ms sleep wakes up."""

    def __init__(self) -> None:
        self.max = 0.0

    async def run(self) -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.02)
            self.max = max(self.max, time.monotonic() - t - 0.02)


def _uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()


async def _until(event: Any, poll: float = 0.02) -> None:
    while not event.is_set():  # noqa: ASYNC110 - bounded poll
        await asyncio.sleep(poll)


async def _report_progress(out: Any, kind: str, wid: int, read: Callable[[], dict[str, Any]]) -> None:
    while True:
        await asyncio.sleep(1.0)
        out.put(("progress", kind, wid, read()))


def _reason(exc: BaseException, spec: NodeWorkerSpec | SessionWorkerSpec, path: str) -> str:
    """One line saying why a worker's start failed: the scheduler's refusal, or why it was unreachable."""
    if isinstance(exc, Refused):
        return str(exc)
    if isinstance(exc, HandshakeError):
        return f"{path}: not a WebSocket endpoint ({exc})"
    scheme = "wss" if spec.access.tls else "ws"
    return describe(f"{scheme}://{spec.host}:{spec.port}{path}", exc, 30.0)


def node_worker(spec: NodeWorkerSpec, wid: int, ctl: Control, out: Any) -> None:
    """Process entry point: one fleet through the phases of a run."""
    _uvloop()
    asyncio.run(_node_main(spec, wid, ctl, out))


async def _node_main(spec: NodeWorkerSpec, wid: int, ctl: Control, out: Any) -> None:
    fleet = Fleet(
        spec.host,
        spec.port,
        spec.nodes,
        spec.behaviour,
        fixed_interval=spec.fixed_interval,
        seed=spec.seed,
        enrollment_secret=spec.access.enrollment_secret,
        ssl_context=spec.access.ssl_context(),
        paced=spec.paced,
    )
    lag = _LagProbe()
    lag_task = asyncio.ensure_future(lag.run())
    try:
        seconds = await fleet.start(spec.concurrency)
    except Exception as exc:  # report, the orchestrator stops the run
        out.put(("failed", "nodes", wid, f"registration failed: {_reason(exc, spec, '/ws/node')}"))
        return
    gc.collect()
    gc.freeze()  # the fleet is long-lived: keep the collector from rescanning it mid-measurement
    out.put(("ready", "nodes", wid, {"registered": fleet.counters.registered, "seconds": seconds}))
    await _until(ctl.go)
    fleet.mark()
    lag.max = 0.0

    def progress() -> dict[str, Any]:
        return dataclasses.asdict(fleet.counters)

    prog = asyncio.ensure_future(_report_progress(out, "nodes", wid, progress))
    await _until(ctl.end)
    fleet.end_window()
    window_lag = lag.max
    intervals = fleet.intervals()
    await _until(ctl.stop_nodes)
    prog.cancel()
    await fleet.stop()
    lag_task.cancel()
    out.put(
        (
            "result",
            "nodes",
            wid,
            {
                "counters": dataclasses.asdict(fleet.counters),
                "rtts": fleet.rtts,
                "starts": fleet.starts,
                "registration_seconds": seconds,
                "interval_min": min(intervals) if intervals else None,
                "interval_max": max(intervals) if intervals else None,
                "loop_lag_max": window_lag,
                "burstiness": fleet.burstiness(),
                "window_seconds": fleet.window_cost[0],
                "cpu_seconds": fleet.window_cost[1],
            },
        )
    )


def session_worker(spec: SessionWorkerSpec, wid: int, ctl: Control, out: Any) -> None:
    """Process entry point: one crowd through the phases of a run."""
    _uvloop()
    asyncio.run(_session_main(spec, wid, ctl, out))


async def _session_main(spec: SessionWorkerSpec, wid: int, ctl: Control, out: Any) -> None:
    crowd = Crowd(
        spec.host,
        spec.port,
        spec.plans,
        window=spec.window,
        chunk_ms=spec.chunk_ms,
        record_sends=spec.record_sends,
        seed=spec.seed,
        api_key=spec.access.api_key,
        ssl_context=spec.access.ssl_context(),
        room_size=spec.room_size,
    )
    lag = _LagProbe()
    lag_task = asyncio.ensure_future(lag.run())
    try:
        seconds = await crowd.start()
    except Exception as exc:
        out.put(("failed", "sessions", wid, f"session start failed: {_reason(exc, spec, '/ws/session')}"))
        return
    gc.collect()
    gc.freeze()
    out.put(("ready", "sessions", wid, {"sessions": crowd.counters.sessions, "seconds": seconds}))
    await _until(ctl.go)
    crowd.mark()
    lag.max = 0.0

    def progress() -> dict[str, Any]:
        return dataclasses.asdict(crowd.counters)

    prog = asyncio.ensure_future(_report_progress(out, "sessions", wid, progress))
    await _until(ctl.end)
    crowd.end_window()
    window_lag = lag.max
    await _until(ctl.stop_sessions)
    prog.cancel()
    unanswered = await crowd.stop(spec.drain_seconds)
    lag_task.cancel()
    out.put(
        (
            "result",
            "sessions",
            wid,
            {
                "counters": dataclasses.asdict(crowd.counters),
                "latencies": crowd.latencies,
                "sends": crowd.sends,
                "unanswered": unanswered,
                "loop_lag_max": window_lag,
            },
        )
    )


# --- the orchestrator's side ---------------------------------------------------------------------------


class LoadGeneratorError(RuntimeError):
    """A worker failed or did not answer in time."""


class LoadGenerator:
    """Starts and steers the worker processes of one run."""

    def __init__(
        self, node_specs: Sequence[NodeWorkerSpec], session_specs: Sequence[SessionWorkerSpec]
    ) -> None:
        self.ctl = Control()
        self.out: Any = _ctx.Queue()
        self.node_specs = list(node_specs)
        self.session_specs = list(session_specs)
        self.procs: list[Any] = []
        self.ready: dict[tuple[str, int], dict[str, Any]] = {}
        self.progress: dict[tuple[str, int], dict[str, Any]] = {}
        self.results: dict[tuple[str, int], dict[str, Any]] = {}

    def start_nodes(self) -> None:
        for i, spec in enumerate(self.node_specs):
            p = _ctx.Process(target=node_worker, args=(spec, i, self.ctl, self.out), daemon=True)
            p.start()
            self.procs.append(p)

    def start_sessions(self) -> None:
        for i, spec in enumerate(self.session_specs):
            p = _ctx.Process(target=session_worker, args=(spec, i, self.ctl, self.out), daemon=True)
            p.start()
            self.procs.append(p)

    def poll(self, timeout: float = 0.0) -> None:
        """Take every message waiting (blocking up to ``timeout`` for the first one)."""
        block = timeout > 0
        while True:
            try:
                msg = self.out.get(block, timeout) if block else self.out.get_nowait()
            except queue.Empty:
                return
            block = False
            kind, role, wid, body = msg
            key = (role, wid)
            if kind == "failed":
                raise LoadGeneratorError(f"{role} worker {wid}: {body}")
            if kind == "ready":
                self.ready[key] = body
            elif kind == "progress":
                self.progress[key] = body
            elif kind == "result":
                self.results[key] = body

    def wait_for(
        self, what: Callable[[], bool], timeout: float, tick: Callable[[], None] | None = None
    ) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            if time.monotonic() > deadline:
                raise LoadGeneratorError("load generator workers did not answer in time")
            dead = [p for p in self.procs if p.exitcode not in (None, 0)]
            if dead:
                raise LoadGeneratorError(f"a load generator worker died (exit code {dead[0].exitcode})")
            self.poll(0.2)
            if tick is not None:
                tick()

    def nodes_ready(self) -> bool:
        return all(("nodes", i) in self.ready for i in range(len(self.node_specs)))

    def sessions_ready(self) -> bool:
        return all(("sessions", i) in self.ready for i in range(len(self.session_specs)))

    def sum_progress(self, role: str, name: str) -> int:
        return sum(int(v.get(name, 0)) for (r, _), v in self.progress.items() if r == role)

    def go(self) -> None:
        self.ctl.go.set()

    def end(self) -> None:
        self.ctl.end.set()

    def stop_sessions(self, timeout: float = 60.0, tick: Callable[[], None] | None = None) -> None:
        self.ctl.stop_sessions.set()
        n = len(self.session_specs)
        self.wait_for(lambda: all(("sessions", i) in self.results for i in range(n)), timeout, tick)

    def stop_nodes(self, timeout: float = 60.0, tick: Callable[[], None] | None = None) -> None:
        self.ctl.stop_nodes.set()
        n = len(self.node_specs)
        self.wait_for(lambda: all(("nodes", i) in self.results for i in range(n)), timeout, tick)

    def role_results(self, role: str) -> list[dict[str, Any]]:
        return [v for (r, _), v in sorted(self.results.items()) if r == role]

    def close(self) -> None:
        for ev in (self.ctl.go, self.ctl.end, self.ctl.stop_sessions, self.ctl.stop_nodes):
            ev.set()
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join(5)

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
