"""A fleet of cheap simulated nodes for load tests: thousands per process over ``wsclient``.

Each ``LightNode`` registers with a realistic profile (``sim.profiles``), heartbeats at the interval the
scheduler tells it (``heartbeat_interval_ms`` of the register ack, then ``next_heartbeat_ms`` of every
heartbeat ack) unless a fixed interval is forced, and executes jobs: ``job_ack`` at once, then after a
latency drawn from a log-normal distribution an optional ASR partial and the ``job_result``. Failure
injection: a share of jobs answered with a retryable error (``NODE_OVERLOADED``: the scheduler fails
over), and a share of jobs during which the node crashes (TCP connection dropped, no close handshake)
and comes back after a downtime under the same node id.

Timers are ``loop.call_later`` handles, not tasks: a node costs a socket, a protocol object and one
timer. Heartbeat round trips are measured from the frame written to the ack parsed, in this process.

Paced (``Fleet(paced=True)``): instead of one timer per node, one pacer sends the fleet's heartbeats on
a fixed schedule spread evenly over the interval (send ``k`` due at ``t0 + k * interval / N``), so the
offered load is as smooth as the event loop allows and a late loop catches up without compounding
bursts. Per-node timers drift into clumps: the busiest milliseconds carried 66-93 sends against an
average of 3-5, and part of the measured tail was the generator's own. Either way the fleet counts its
sends per millisecond in the window (``burstiness()``: busiest millisecond against the average) and its
own CPU, so a report says how smooth the load really was and what generating it cost.

Why not the node SDK's ``Node`` (``lingua_scheduler.node``): measured with ``bench/node_sdk_overhead.py``
(1,000 idle nodes heartbeating at 1 Hz, docs/performance.md), a ``Node`` costs this process about twice
the CPU and twice the memory of a ``LightNode`` (an aiohttp session, tasks for its reader, heartbeats
and drain, a heartbeat struct built and encoded each time); the load generator exists to put more load
on the scheduler than one process of real nodes could, so its hot loop stays its own. What it shares
with the SDK is the protocol: the wire structs, the registration message of ``sim.profiles`` and the
job messages (``job_ack``, ``asr_partial``, ``job_result``) built by the SDK's ``node/jobs.py``.

Must never: block, or keep unbounded per-message state (pending acks are dropped on reconnect).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import ssl
import time
from collections import Counter
from dataclasses import dataclass

import msgspec

from lingua_scheduler.loadtest.wsclient import Refused, WebSocketClient, connect
from lingua_scheduler.node.jobs import JobFailed, Partial, Result, ack, partial_message, result_message
from lingua_scheduler.protocol.node import JobAssign, NodeHeartbeat, ResourceUsage
from lingua_scheduler.sim.profiles import NodeProfile

_enc = msgspec.json.Encoder()
#: heartbeat encodings kept per node (reported load varies between them)
TEMPLATE_VARIANTS = 4
_TS_SENTINEL = 987654321987654


class Inbound(msgspec.Struct):
    """The fields of scheduler -> node messages a simulated node needs (the rest is skipped)."""

    type: str
    timestamp: int | None = None
    next_heartbeat_ms: int | None = None
    heartbeat_interval_ms: int | None = None
    node_id: str | None = None
    code: str | None = None
    message: str | None = None
    node_token: str | None = None


_dec = msgspec.json.Decoder(Inbound)
#: job_assign frames are decoded again in full (the SDK's message builders read them); heartbeat acks,
#: the hot path, never are
_assign_dec = msgspec.json.Decoder(JobAssign)
_FAILED = JobFailed("NODE_OVERLOADED", "simulated failure")


@dataclass(frozen=True, slots=True)
class JobBehaviour:
    """How simulated nodes execute jobs."""

    #: median execution latency, milliseconds (0: answer at once, in the same callback)
    latency_ms: float = 0.0
    #: sigma of the log-normal latency distribution (0: always the median)
    latency_sigma: float = 0.0
    #: latency cap, milliseconds
    max_latency_ms: float = 10_000.0
    #: share of jobs answered with a retryable NODE_OVERLOADED error
    failure_rate: float = 0.0
    #: share of jobs during which the node crashes (connection dropped) and reconnects later
    crash_rate: float = 0.0
    #: seconds a crashed node stays away before reconnecting under the same id
    crash_downtime: float = 2.0
    #: ASR partials sent before the result
    partials: int = 0
    #: keep (session_id, utterance_index, monotonic time) of every job_assign received
    record_starts: bool = False

    def latency(self, rng: random.Random) -> float:
        """One execution latency in seconds."""
        if self.latency_ms <= 0:
            return 0.0
        ms = self.latency_ms
        if self.latency_sigma > 0:
            ms *= math.exp(rng.gauss(0.0, self.latency_sigma))
        return min(ms, self.max_latency_ms) / 1000.0


@dataclass(slots=True)
class FleetCounters:
    """Totals since the fleet started (``window_*``: since ``Fleet.mark()``)."""

    registered: int = 0
    register_errors: int = 0
    connect_retries: int = 0
    heartbeats_sent: int = 0
    heartbeats_acked: int = 0
    window_heartbeats_acked: int = 0
    jobs_received: int = 0
    jobs_answered_ok: int = 0
    jobs_answered_failed: int = 0
    crashes: int = 0
    #: heartbeats in flight when their node crashed (the server may have counted them, no ack came)
    heartbeats_lost_in_crash: int = 0
    reconnects: int = 0
    #: paced heartbeats skipped because the event loop was more than an interval late
    paced_skipped: int = 0
    error_frames: int = 0
    disconnects: int = 0


class LightNode:
    """One simulated node on one ``WebSocketClient``."""

    __slots__ = (
        "_by_type",
        "_languages",
        "_last_ts",
        "_services",
        "_tpl",
        "_tpl_jobs",
        "crashed",
        "fleet",
        "interval",
        "node_id",
        "node_token",
        "pending",
        "profile",
        "registered",
        "rng",
        "running_jobs",
        "timer",
        "ws",
    )

    def __init__(self, fleet: Fleet, node_id: str, profile: NodeProfile, seed: int) -> None:
        self.fleet = fleet
        #: with an enrollment secret, the planned id is replaced by the one the scheduler issues
        self.node_id = node_id
        #: the token of the latest node_register_ack (docs/security.md): presented on reconnect
        self.node_token: str | None = None
        self.profile = profile
        self.rng = random.Random(seed)
        self.ws: WebSocketClient | None = None
        self.interval = fleet.fixed_interval or 15.0
        self.timer: asyncio.TimerHandle | None = None
        #: heartbeat timestamp -> monotonic time it was written
        self.pending: dict[int, float] = {}
        self.running_jobs = 0
        self.registered: asyncio.Future[Inbound] | None = None
        self.crashed = False
        self._last_ts = 0
        # what a node reports unchanged in every heartbeat: built once, as a real client would
        self._services = profile.services()
        self._by_type = profile.capability_by_type()
        self._languages = profile.languages()
        self._tpl: list[tuple[bytes, bytes]] = []
        self._tpl_jobs = -1

    # --- connection ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, register, send the first heartbeat (it makes the node ready), start the timer."""
        fleet = self.fleet
        loop = asyncio.get_running_loop()
        self.ws = await connect(
            fleet.host, fleet.port, "/ws/node", self.on_message, self.on_close, ssl_context=fleet.ssl_context
        )
        self.registered = loop.create_future()
        if fleet.enrollment_secret is not None and self.node_token is None:
            # enrol: no id, the fleet secret; the scheduler issues the id and its token
            msg = self.profile.register_message(None)
            msg.enrollment_secret = fleet.enrollment_secret
        else:
            msg = self.profile.register_message(self.node_id)
            msg.node_token = self.node_token
        self.send(msg)
        reply = await asyncio.wait_for(self.registered, 30.0)
        if reply.type != "node_register_ack":
            fleet.counters.register_errors += 1
            hint = "" if fleet.enrollment_secret else " (does the scheduler require --enrollment-secret?)"
            raise Refused(f"registration refused: {reply.code}: {reply.message}{hint}")
        if reply.node_id:
            self.node_id = reply.node_id
        self.node_token = reply.node_token or self.node_token
        if fleet.fixed_interval is None and reply.heartbeat_interval_ms:
            self.interval = reply.heartbeat_interval_ms / 1000.0
        self.heartbeat()
        if not fleet.paced:  # spread the fleet's heartbeats over the interval
            self.timer = loop.call_later(self.rng.uniform(0.0, self.interval), self._tick)

    def on_close(self) -> None:
        self.fleet.counters.disconnects += 1
        self.pending.clear()
        self.running_jobs = 0

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def close(self) -> None:
        self.stop()
        if self.ws is not None:
            self.ws.close()

    def crash(self) -> None:
        """Drop the connection without a close handshake; reconnect after the downtime."""
        fleet = self.fleet
        fleet.counters.crashes += 1
        self.crashed = True
        self.stop()
        fleet.counters.heartbeats_lost_in_crash += len(self.pending)
        self.pending.clear()
        self.running_jobs = 0
        if self.ws is not None:
            self.ws.abort()
        if not fleet.stopping:
            asyncio.get_running_loop().call_later(fleet.behaviour.crash_downtime, self._reconnect)

    def _reconnect(self) -> None:
        if self.fleet.stopping:
            return
        task = asyncio.ensure_future(self._come_back())
        self.fleet.background.add(task)
        task.add_done_callback(self.fleet.background.discard)

    async def _come_back(self) -> None:
        try:
            await self.start()
            self.crashed = False
            self.fleet.counters.reconnects += 1
        except (OSError, TimeoutError, ConnectionError):
            if not self.fleet.stopping:
                asyncio.get_running_loop().call_later(1.0, self._reconnect)

    # --- heartbeats ---------------------------------------------------------------------------------

    def _tick(self) -> None:
        self.heartbeat()
        self.timer = asyncio.get_running_loop().call_later(self.interval, self._tick)

    def _templates(self) -> list[tuple[bytes, bytes]]:
        """Encoded heartbeats split around the timestamp, a few load variants per running-jobs value:
        a heartbeat then costs one bytes join instead of building and encoding a message."""
        rng = self.rng
        out = []
        for _ in range(TEMPLATE_VARIANTS):
            msg = NodeHeartbeat(
                node_id=self.node_id,
                timestamp=_TS_SENTINEL,
                resource_usage=ResourceUsage(
                    cpu_percent=round(rng.uniform(5, 60), 1),
                    mem_percent=round(rng.uniform(20, 70), 1),
                    gpu_percent=round(rng.uniform(0, 70), 1),
                    running_jobs=self.running_jobs,
                ),
                installed_services=self._services,
                capability_by_type=self._by_type,
                installed_models=[],
                language_capabilities=self._languages,
            )
            head, tail = _enc.encode(msg).split(b"%d" % _TS_SENTINEL, 1)
            out.append((head, tail))
        return out

    def heartbeat(self) -> None:
        ts = max(int(time.time() * 1000), self._last_ts + 1)
        self._last_ts = ts
        if self._tpl_jobs != self.running_jobs or not self._tpl:
            self._tpl = self._templates()
            self._tpl_jobs = self.running_jobs
        head, tail = self._tpl[ts % TEMPLATE_VARIANTS]
        if self.ws is not None and self.ws.send(b"%b%d%b" % (head, ts, tail)):
            now = time.monotonic()
            self.pending[ts] = now
            fleet = self.fleet
            fleet.counters.heartbeats_sent += 1
            if fleet.measuring:
                fleet.sends_per_ms[int(now * 1000)] += 1

    def send(self, msg: object) -> bool:
        return self.ws is not None and self.ws.send(_enc.encode(msg))

    # --- inbound ------------------------------------------------------------------------------------

    def on_message(self, data: bytes) -> None:
        msg = _dec.decode(data)
        kind = msg.type
        fleet = self.fleet
        if kind == "node_heartbeat_ack":
            sent = self.pending.pop(msg.timestamp or 0, None)
            if sent is not None:
                c = fleet.counters
                c.heartbeats_acked += 1
                if fleet.measuring:
                    c.window_heartbeats_acked += 1
                    fleet.rtts.append(time.monotonic() - sent)
            if fleet.fixed_interval is None and msg.next_heartbeat_ms:
                self.interval = msg.next_heartbeat_ms / 1000.0
        elif kind == "job_assign":
            self._job(_assign_dec.decode(data))
        elif kind in ("node_register_ack", "error") and self.registered and not self.registered.done():
            self.registered.set_result(msg)
        elif kind == "error":
            fleet.counters.error_frames += 1

    # --- jobs ---------------------------------------------------------------------------------------

    def _job(self, job: JobAssign) -> None:
        fleet = self.fleet
        fleet.counters.jobs_received += 1
        if fleet.behaviour.record_starts:
            fleet.starts.append((job.session_id, job.utterance_index, time.monotonic()))
        b = fleet.behaviour
        self.running_jobs += 1
        self.send(ack(job, self.node_id))
        rng = self.rng
        if b.crash_rate and rng.random() < b.crash_rate:
            self.crash()
            return
        fail = bool(b.failure_rate) and rng.random() < b.failure_rate
        delay = b.latency(rng)
        if delay <= 0:
            self._finish(job, fail)
        else:
            asyncio.get_running_loop().call_later(delay, self._finish, job, fail)

    def _finish(self, job: JobAssign, fail: bool) -> None:
        if self.ws is None or not self.ws.open:
            return  # crashed meanwhile: the scheduler fails the attempt over
        b = self.fleet.behaviour
        for i in range(b.partials):
            self.send(partial_message(job, self.node_id, Partial(f"partial {i}")))
        outcome: Result | JobFailed
        if fail:
            outcome = _FAILED
            self.fleet.counters.jobs_answered_failed += 1
        else:
            outcome = Result(
                text_asr=f"asr {job.utterance_index}",
                text_translated=f"{job.tgt_lang} {job.utterance_index}",
                tts_audio=b"\0\0\0",
                tts_format="pcm16",
            )
            self.fleet.counters.jobs_answered_ok += 1
        self.send(result_message(job, self.node_id, outcome, 5))
        self.running_jobs = max(0, self.running_jobs - 1)


class Fleet:
    """Many ``LightNode``s in one event loop."""

    def __init__(
        self,
        host: str,
        port: int,
        nodes: list[tuple[str, NodeProfile]],
        behaviour: JobBehaviour | None = None,
        *,
        fixed_interval: float | None = None,
        seed: int = 0,
        enrollment_secret: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        paced: bool = False,
    ) -> None:
        self.host = host
        #: one pacer for the fleet's heartbeats instead of a timer per node (see the module docstring)
        self.paced = paced
        self._pacer: asyncio.Handle | None = None
        self._pace_t0 = 0.0
        self._pace_seq = 0
        #: window: heartbeats written per millisecond (monotonic ms -> count)
        self.sends_per_ms: Counter[int] = Counter()
        self._window_t0 = 0.0
        self._window_cpu0 = 0.0
        #: window: (seconds, this process's CPU seconds), set by ``end_window``
        self.window_cost: tuple[float, float] = (0.0, 0.0)
        self.port = port
        #: fleet enrollment secret: nodes enrol (the scheduler issues ids and tokens) instead of
        #: registering under their planned ids
        self.enrollment_secret = enrollment_secret
        #: TLS (wss://) when set
        self.ssl_context = ssl_context
        self.behaviour = behaviour or JobBehaviour()
        self.fixed_interval = fixed_interval
        self.counters = FleetCounters()
        #: heartbeat round trips (seconds) measured since ``mark()``
        self.rtts: list[float] = []
        #: (session_id, utterance_index, monotonic) of job_assign frames, when recorded
        self.starts: list[tuple[str, int, float]] = []
        self.measuring = False
        self.stopping = False
        self.background: set[asyncio.Future[None]] = set()
        self.nodes = [LightNode(self, nid, p, seed * 1_000_003 + i) for i, (nid, p) in enumerate(nodes)]

    async def start(self, concurrency: int = 100) -> float:
        """Register every node (``concurrency`` registrations in flight); returns the seconds it took."""
        gate = asyncio.Semaphore(concurrency)
        t0 = time.monotonic()

        async def one(n: LightNode) -> None:
            async with gate:
                for attempt in range(5):  # as a real node client, retry a refused or reset connection
                    try:
                        await n.start()
                        break
                    except (OSError, TimeoutError) as exc:
                        if attempt == 4 or self.counters.register_errors:
                            raise
                        self.counters.connect_retries += 1
                        if n.ws is not None:
                            n.ws.abort()
                        await asyncio.sleep(0.2 * 2**attempt + n.rng.random() * 0.1)
                        del exc
                self.counters.registered += 1

        # every registration's outcome is collected (a refusal usually hits them all), then the first
        # failure is raised: gathering without it left the others' exceptions unretrieved at shutdown
        outcomes = await asyncio.gather(*(one(n) for n in self.nodes), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        if self.paced and self.nodes:
            self._pace_t0 = time.monotonic()
            self._pace_seq = 0
            self._pacer = asyncio.get_running_loop().call_soon(self._pace)
        return time.monotonic() - t0

    def pace_interval(self) -> float:
        """The paced fleet's heartbeat interval: the forced one, else what the scheduler told the first
        node (every node is told the same)."""
        return self.fixed_interval or self.nodes[0].interval

    def _pace(self) -> None:
        """Send every heartbeat due by now, in order, then sleep until the next one is due."""
        nodes = self.nodes
        n = len(nodes)
        step = self.pace_interval() / n
        now = time.monotonic()
        seq = self._pace_seq
        due = self._pace_t0 + seq * step
        budget = n  # at most one interval's worth in one go: a stalled loop skips, it does not burst
        while due <= now and budget:
            nodes[seq % n].heartbeat()
            seq += 1
            budget -= 1
            due = self._pace_t0 + seq * step
        if due <= now:
            behind = int((now - due) / step) + 1
            self.counters.paced_skipped += behind
            seq += behind
            due = self._pace_t0 + seq * step
        self._pace_seq = seq
        if not self.stopping:
            self._pacer = asyncio.get_running_loop().call_later(max(0.0, due - time.monotonic()), self._pace)

    def burstiness(self) -> dict[str, float]:
        """Heartbeats written per millisecond of the window: the busiest millisecond, the 99th
        percentile of milliseconds and the average (over every millisecond of the window)."""
        seconds = self.window_cost[0]
        total = sum(self.sends_per_ms.values())
        busiest = sorted(self.sends_per_ms.values())
        ms = max(len(busiest), int(seconds * 1000), 1)
        idle = ms - len(busiest)  # milliseconds without a send rank first
        rank = min(ms - 1, int(0.99 * ms))
        p99 = busiest[rank - idle] if rank >= idle else 0
        return {
            "max_per_ms": float(busiest[-1]) if busiest else 0.0,
            "p99_per_ms": float(p99),
            "mean_per_ms": round(total / ms, 3),
        }

    def mark(self) -> None:
        """Start the measurement window: round trips are collected from now on."""
        self.rtts.clear()
        self.sends_per_ms.clear()
        self.counters.window_heartbeats_acked = 0
        self._window_t0 = time.monotonic()
        self._window_cpu0 = time.process_time()
        self.measuring = True

    def end_window(self) -> None:
        self.measuring = False
        self.window_cost = (time.monotonic() - self._window_t0, time.process_time() - self._window_cpu0)

    def intervals(self) -> list[float]:
        return [n.interval for n in self.nodes]

    async def stop(self, drain: float = 2.0) -> None:
        """Stop heartbeating, wait (bounded) for the acks still due, close every connection."""
        self.stopping = True
        if self._pacer is not None:
            self._pacer.cancel()
            self._pacer = None
        for n in self.nodes:
            n.stop()
        deadline = time.monotonic() + drain
        while time.monotonic() < deadline and any(n.pending for n in self.nodes if n.ws and n.ws.open):  # noqa: ASYNC110 - bounded poll
            await asyncio.sleep(0.02)
        for t in list(self.background):
            t.cancel()
        for n in self.nodes:
            n.close()
        with contextlib.suppress(Exception):
            await asyncio.sleep(0.2)  # let the close handshakes go out
