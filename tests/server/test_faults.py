"""Fault injection, one scheduler (embedded mode): nodes killed at chosen points of a job's life, a node
that stops reading, wall-clock jumps, and the scheduler process itself killed with SIGKILL.

Each test states what must hold. The common core, checked by ``check_sessions``:
- no result lost: every utterance a session sent gets an outcome -- its result, or an explicit failure
  (``error`` naming the utterance + ``missing_result``) -- unless the session's own connection died
  with the scheduler, which the client sees;
- none delivered twice: at most one outcome per utterance, and outcomes come in utterance order;
- nothing stuck: afterwards no job is live, every node's in-flight count is back to 0, nodes are ready
  again and sessions can still be used and closed.

Randomness is seeded (the seed is in the test id); the bounded variants run in ``make test``, the
soak variants (``-m long``) run longer with more seeds.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import random
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from lingua_scheduler.core.status import NodeStatus
from lingua_scheduler.server.app import build_app
from lingua_scheduler.server.state import SchedulerState
from lingua_scheduler.sim.nodes import Behavior, Executor, SimulatedNode
from lingua_scheduler.sim.profiles import NodeProfile
from lingua_scheduler.sim.sessions import SimulatedSession
from lingua_scheduler.sim.sockets import shrink_receive_buffer
from tests.conftest import RunningScheduler, eventually, make_config
from tests.scheduler_process import SchedulerProcess


def profile() -> NodeProfile:
    return NodeProfile(asr_languages=["en", "zh"], tts_languages=["en", "zh"], nmt_languages=["en", "zh"])


def check_sessions(sessions: list[SimulatedSession], *, lost_ok: bool = False) -> Counter[str]:
    """The invariants above for each session; returns how the utterances ended (for the report)."""
    tally: Counter[str] = Counter()
    for s in sessions:
        outcomes = s.outcomes()
        order = [
            m["utterance_index"] for m in s.messages if m["type"] in ("translation_result", "missing_result")
        ]
        assert order == sorted(order), f"{s.session_id}: outcomes out of order {order}"
        errors = {(m.get("details") or {}).get("utterance_index") for m in s.messages if m["type"] == "error"}
        for i in range(s.utterances_sent):
            got = outcomes.get(i, [])
            assert len(got) <= 1, f"{s.session_id} utterance {i} delivered twice: {got}"
            if not got:
                assert lost_ok and s.ws is not None and s.ws.closed, f"{s.session_id} utterance {i} lost"
                tally["lost_with_connection"] += 1
                continue
            if got[0] != "result":
                # an explicit failure names the utterance in an error frame first
                assert got[0] == "missing:job_failed" and i in errors, (s.session_id, i, got)
            tally[got[0]] += 1
    return tally


def assert_nothing_stuck(state: SchedulerState) -> None:
    store = state.engine.store
    assert store.inflight == 0 and store.waiting == 0, store.counts()
    for entry in state.registry.local_nodes():
        assert entry.load.inflight == 0, (entry.node_id, entry.load.inflight)
    store.validate()


# --- nodes killed at random points of the job lifecycle ------------------------------------------------

#: where a node dies: instead of sending its ack, or right after sending ack / partial / result
KILL_POINTS = ("before_ack", "after_ack", "after_partial", "after_result")
_KILL_AT = {
    "before_ack": ("job_ack", False),
    "after_ack": ("job_ack", True),
    "after_partial": ("asr_partial", True),
    "after_result": ("job_result", True),
}


class Chaos:
    """Decides, per job assignment (in arrival order, from a seeded generator), whether and where the
    node running it dies. Points are taken from a shuffled cycle so every point is exercised."""

    def __init__(self, seed: int, rate: float) -> None:
        self.rng = random.Random(seed)
        self.rate = rate
        self.enabled = True
        self._cycle: list[str] = []
        self.plan: dict[tuple[str, int], str] = {}
        self.injected: Counter[str] = Counter()

    def on_assign(self, job_id: str, attempt: int) -> None:
        if not self.enabled or self.rng.random() >= self.rate:
            return
        if not self._cycle:
            self._cycle = list(KILL_POINTS)
            self.rng.shuffle(self._cycle)
            # a planned point the job never reached (its attempt timed out first on a slow machine)
            # comes first in the next cycle, so every point is still exercised
            self._cycle.sort(key=lambda point: self.injected[point] == 0)
        self.plan[(job_id, attempt)] = self._cycle.pop()


class CrashingNode(SimulatedNode):
    """A simulated node whose process dies (socket dropped, no close) where ``Chaos`` says, then comes
    back like a supervised process: reconnects and registers again with its id."""

    def __init__(self, *args: Any, chaos: Chaos, **kw: Any) -> None:
        super().__init__(*args, reconnect=True, **kw)
        self.chaos = chaos
        self.crashes = 0
        self.on_message = self._seen

    def _seen(self, msg: dict[str, Any]) -> None:
        if msg.get("type") == "job_assign":
            self.chaos.on_assign(msg["job_id"], msg["attempt_id"])

    async def send(self, msg: Any) -> None:
        point = None
        if isinstance(msg, dict) and "job_id" in msg:
            point = self.chaos.plan.get((msg["job_id"], msg.get("attempt_id", 0)))
        if point is None or _KILL_AT[point][0] != msg["type"]:
            await super().send(msg)
            return
        del self.chaos.plan[(msg["job_id"], msg["attempt_id"])]
        if _KILL_AT[point][1]:
            await super().send(msg)
        self.chaos.injected[point] += 1
        self.crashes += 1
        await self.kill(restart=True)
        raise ConnectionError(f"node killed {point}")


CHAOS_CFG: dict[str, dict[str, Any]] = {
    "jobs": {"ack_timeout_ms": 1000, "pending_timeout_ms": 4000, "retention_seconds": 1.0},
    "session": {"pause_ms": 300, "result_gap_timeout_ms": 8000},
    "scheduler": {"fleet_view_interval_ms": 10},
}


async def run_chaos(
    scheduler_factory: Callable[..., Any],
    http: aiohttp.ClientSession,
    seed: int,
    *,
    sessions: int,
    utterances: int,
    rate: float,
) -> tuple[Chaos, Counter[str]]:
    """Sessions talk while nodes die at the chosen points; then check everything ended exactly once."""
    rs: RunningScheduler = await scheduler_factory(**CHAOS_CFG)
    chaos = Chaos(seed, rate)
    nodes = [
        CrashingNode(
            http, rs.node_url, profile(), chaos=chaos, seed=seed * 10 + i, executor=Executor(latency=0.05)
        )
        for i in range(3)
    ]
    clients = [SimulatedSession(http, rs.session_url) for _ in range(sessions)]
    try:
        for n in nodes:
            await n.start()
        for c in clients:
            await c.start()
        rng = random.Random(seed)

        async def talk(c: SimulatedSession) -> None:
            for _ in range(utterances):
                if rng.random() < 0.5:
                    await c.utterance()
                else:
                    await c.speak(chunks=2)
                await asyncio.sleep(rng.uniform(0.0, 0.08))

        await asyncio.gather(*(talk(c) for c in clients))
        try:
            await eventually(lambda: all(c.settled() for c in clients), timeout=30)
        except AssertionError:
            raise AssertionError({c.session_id: c.outcomes() for c in clients}) from None
        tally = check_sessions(clients)
        for c in clients:
            for m in c.of_type("error"):
                tally["error:" + m["code"]] += 1
        # nothing stuck: no live job, no load left; every node is back and ready
        await eventually(lambda: rs.state.engine.store.inflight == 0, timeout=10)
        await eventually(
            lambda: all(
                (e := rs.state.registry.nodes.get(n.node_id or "")) is not None
                and e.connected
                and e.status is NodeStatus.READY
                for n in nodes
            ),
            timeout=10,
        )
        assert_nothing_stuck(rs.state)
        # ...and the scheduler still serves: one more utterance each, no faults, all answered
        chaos.enabled = False
        for c in clients:
            await c.utterance()
        await eventually(lambda: all(c.settled() for c in clients), timeout=10)
        assert all(c.outcomes()[c.utterances_sent - 1] == ["result"] for c in clients)
        acks = await asyncio.gather(*(c.close() for c in clients))
        assert all(a["type"] == "session_close_ack" for a in acks)
        await eventually(lambda: rs.state.sessions == {}, timeout=5)
        assert_nothing_stuck(rs.state)
        tally["failovers"] = rs.state.engine.store.failovers
        tally["stale_dropped"] = rs.state.engine.store.stale_messages
        return chaos, tally
    finally:
        await asyncio.gather(
            *(n.close() for n in nodes), *(c.disconnect() for c in clients), return_exceptions=True
        )


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_nodes_killed_at_random_points_of_the_job_lifecycle(
    scheduler_factory: Callable[..., Any], http: aiohttp.ClientSession, seed: int
) -> None:
    """Nodes die before the ack, after the ack, after a partial or right after the result (3 nodes,
    3 sessions x 10 utterances, 30 % of assignments end in a kill). Must hold: every utterance gets
    exactly one outcome, in order, failures explicit; stale answers of killed attempts are dropped;
    afterwards no job live, no load left, every node reconnected and ready, sessions usable."""
    chaos, tally = await run_chaos(scheduler_factory, http, seed, sessions=3, utterances=10, rate=0.3)
    assert set(chaos.injected) == set(KILL_POINTS), chaos.injected  # every point was exercised
    print(f"seed {seed}: kills {dict(chaos.injected)}, outcomes {dict(tally)}")


@pytest.mark.long
@pytest.mark.parametrize("seed", range(10, 20))
async def test_nodes_killed_soak(
    scheduler_factory: Callable[..., Any], http: aiohttp.ClientSession, seed: int
) -> None:
    chaos, tally = await run_chaos(scheduler_factory, http, seed, sessions=6, utterances=40, rate=0.1)
    assert set(chaos.injected) == set(KILL_POINTS), chaos.injected
    print(f"seed {seed}: kills {dict(chaos.injected)}, outcomes {dict(tally)}")


# --- a peer that stops reading (backpressure) ------------------------------------------------------


#: the peers below send as fast as they can until the buffers between us fill (a client library keeps
#: reading into its own buffer for a while); rate limits have their own tests
UNLIMITED_RATE = {
    "node_messages_per_second": 1e6,
    "node_message_burst": 1_000_000,
    "session_messages_per_second": 1e6,
    "session_message_burst": 1_000_000,
}


def stop_reading(peer: SimulatedNode | SimulatedSession) -> None:
    """The peer's process hangs: nothing reads its socket any more. Its receive buffer is made small
    so that the kernel buffers between us fill within a few hundred messages, not megabytes."""
    assert peer.ws is not None
    shrink_receive_buffer(peer.ws, 4096)
    peer.stop_reading()


def small_send_buffer(outbox: Any) -> None:
    """Same on the scheduler's side of that connection (a slow link instead of a fast loopback)."""
    transport = outbox.transport
    transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    transport.set_write_buffer_limits(high=8192)


async def test_node_that_stops_reading_is_cut_off_and_its_jobs_fail_over(
    scheduler_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """A node with jobs running stops reading and keeps sending (heartbeats). Must hold: its outbound
    queue never grows past ``server.outbound_queue``; it is disconnected as a slow consumer, goes
    offline at once, and its jobs fail over to another node: each utterance gets its result once."""
    rs: RunningScheduler = await scheduler_factory(
        server={"outbound_queue": 16},
        scheduler={"fleet_view_interval_ms": 10},
        limits=UNLIMITED_RATE,
        **{"jobs": {"ack_timeout_ms": 1000}},
    )
    stuck = SimulatedNode(http, rs.node_url, profile(), executor=Executor(latency=30.0), seed=1)
    good = SimulatedNode(http, rs.node_url, profile(), executor=Executor(latency=0.05), seed=2)
    s = SimulatedSession(http, rs.session_url)
    try:
        await stuck.start()
        await s.start()
        for _ in range(3):
            await s.utterance()
        await eventually(lambda: stuck.running_jobs == 3, timeout=5)
        await good.start()
        entry = rs.state.registry.nodes[stuck.node_id or ""]
        outbox = entry.conn
        assert outbox is not None
        assert stuck.ws is not None
        stop_reading(stuck)
        small_send_buffer(outbox)
        peak = 0
        t0 = time.monotonic()
        while entry.conn is outbox and time.monotonic() - t0 < 10:
            await stuck.heartbeat()  # every heartbeat is answered: the answers pile up
            peak = max(peak, outbox.queued)
            await asyncio.sleep(0)
        assert entry.conn is None and entry.status is NodeStatus.OFFLINE, (
            peak,
            outbox.queued,
            outbox.slow_consumer,
        )
        assert outbox.slow_consumer and peak <= 16, peak
        await eventually(lambda: s.settled(), timeout=10)
        assert s.outcomes() == {0: ["result"], 1: ["result"], 2: ["result"]}
        assert len([m for m in good.received if m["type"] == "job_assign"]) == 3
        assert await rs.metric("lingua_failovers_total", '{reason="node_lost"}') == 3
        assert_nothing_stuck(rs.state)
    finally:
        await asyncio.gather(stuck.close(), good.close(), s.disconnect(), return_exceptions=True)


async def test_session_that_stops_reading_is_cut_off_and_its_jobs_cancelled(
    scheduler_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """A client stops reading while it keeps sending. Must hold: it is disconnected as a slow
    consumer, its session is freed, its running job is cancelled on the node (``job_cancel``, load
    back to 0), and other sessions are served meanwhile."""
    rs: RunningScheduler = await scheduler_factory(
        server={"outbound_queue": 16}, scheduler={"fleet_view_interval_ms": 10}, limits=UNLIMITED_RATE
    )
    node = SimulatedNode(http, rs.node_url, profile(), executor=Executor(latency=30.0), seed=1)
    fast = SimulatedNode(http, rs.node_url, profile(), executor=Executor(latency=0.05), seed=2)
    hung, other = SimulatedSession(http, rs.session_url), SimulatedSession(http, rs.session_url)
    try:
        await node.start()
        await hung.start()
        await other.start()
        got = node.wait_for(lambda m: m.get("type") == "job_assign")
        await hung.utterance()
        job = await got
        await fast.start()
        await eventually(lambda: rs.state.publisher.view.get(fast.node_id or "") is not None)
        cancelled = node.wait_for(lambda m: m.get("type") == "job_cancel", timeout=10)
        assert hung.ws is not None
        session = rs.state.sessions[hung.session_id or ""]
        stop_reading(hung)
        small_send_buffer(session.outbox)
        t0 = time.monotonic()
        while hung.session_id in rs.state.sessions and time.monotonic() - t0 < 10:
            await hung.send({"type": "client_heartbeat", "session_id": hung.session_id, "timestamp": 1})
            await asyncio.sleep(0)
        assert hung.session_id not in rs.state.sessions
        assert (await cancelled)["job_id"] == job["job_id"]
        await eventually(lambda: rs.state.registry.nodes[node.node_id or ""].load.inflight == 0)
        await node.close()  # the other session's job goes to the fast node
        await eventually(lambda: rs.state.publisher.view.get(node.node_id or "").status == "offline")
        await other.utterance()
        await eventually(lambda: other.outcomes() == {0: ["result"]}, timeout=5)
        assert_nothing_stuck(rs.state)
    finally:
        await asyncio.gather(
            node.close(), fast.close(), hung.disconnect(), other.disconnect(), return_exceptions=True
        )


# --- wall-clock jumps ---------------------------------------------------------------------------------

HOURS_6 = 6 * 3600 * 1000


class JumpingClock:
    """Real monotonic time; a wall clock the test steps by hours (NTP step, VM resume, operator)."""

    def __init__(self) -> None:
        self.offset_ms = 0

    def monotonic(self) -> float:
        return time.monotonic()

    def wall_ms(self) -> int:
        return time.time_ns() // 1_000_000 + self.offset_ms


@pytest.fixture
async def jumping() -> AsyncIterator[tuple[RunningScheduler, JumpingClock]]:
    clock = JumpingClock()
    config = make_config(
        node_health={
            "heartbeat_interval_seconds": 0.2,
            "heartbeat_timeout_seconds": 1.0,
            "status_scan_interval_seconds": 0.1,
        },
        jobs={"ack_timeout_ms": 500, "pending_timeout_ms": 3000},
        session={"pause_ms": 300, "result_gap_timeout_ms": 2000},
        scheduler={"fleet_view_interval_ms": 10},
    )
    app = build_app(config, clock)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    http = aiohttp.ClientSession()
    yield RunningScheduler(server, app, http), clock
    await http.close()
    await asyncio.wait_for(server.close(), 15)


async def test_wall_clock_jumps_neither_fire_nor_suppress_timeouts(
    jumping: tuple[RunningScheduler, JumpingClock], http: aiohttp.ClientSession
) -> None:
    """The wall clock jumps 6 h forward, then 12 h back, while monotonic time runs on. Must hold:
    heartbeating nodes stay ready (no heartbeat timeout fires); an ack timeout fires after its 0.5 s,
    no sooner and no later; the pause timer still cuts utterances after 0.3 s; results are delivered;
    timestamps shown to peers do follow the wall clock (the jump was real)."""
    rs, clock = jumping
    mute = SimulatedNode(http, rs.node_url, profile(), executor=Executor(behavior=Behavior.NEVER_ACK), seed=1)
    good = SimulatedNode(http, rs.node_url, profile(), executor=Executor(latency=0.05), seed=2)
    s = SimulatedSession(http, rs.session_url)
    statuses: list[NodeStatus] = []

    async def watch() -> None:
        while True:
            statuses.extend(e.status for e in rs.state.registry.local_nodes())
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    try:
        await mute.start()
        await s.start()
        await eventually(lambda: rs.state.publisher.view.get(mute.node_id or "") is not None)
        statuses.clear()
        # forward jump while a job waits for an ack that never comes
        assigned = mute.wait_for(lambda m: m.get("type") == "job_assign")
        await s.speak(chunks=1)
        await assigned
        t_assign = time.monotonic()
        clock.offset_ms += HOURS_6
        await good.start()
        retried = good.wait_for(lambda m: m.get("type") == "job_assign", timeout=5)
        retry = await retried
        waited = time.monotonic() - t_assign
        assert retry["attempt_id"] == 2 and 0.4 <= waited <= 1.5, waited
        await eventually(lambda: s.outcomes() == {0: ["result"]}, timeout=3)
        hb = s.wait_for(lambda m: m.get("type") == "server_heartbeat")
        await s.send({"type": "client_heartbeat", "session_id": s.session_id, "timestamp": 1})
        assert abs((await hb)["timestamp"] - (time.time() * 1000 + HOURS_6)) < 5000
        # backward jump (to 6 h in the past): the pause timer and the ack timeout still run on time
        clock.offset_ms -= 2 * HOURS_6
        t0 = time.monotonic()
        await s.chunk()  # no is_final: only the 300 ms pause can cut it
        await eventually(lambda: 1 in s.outcomes(), timeout=3)
        assert time.monotonic() - t0 < 1.5
        statuses_at_close = len(statuses)  # until here, nobody was offline; then the good node leaves
        await good.close()
        await eventually(lambda: rs.state.registry.nodes[good.node_id or ""].status is NodeStatus.OFFLINE)
        cancel = mute.wait_for(lambda m: m.get("type") == "job_cancel", timeout=5)
        assigned = mute.wait_for(lambda m: m.get("type") == "job_assign")
        await s.speak(chunks=1)
        await assigned
        t_assign = time.monotonic()
        await cancel  # the ack timeout abandoned the attempt (and told the node)
        waited = time.monotonic() - t_assign
        assert 0.4 <= waited <= 1.5, waited
        # the heartbeating node never went offline, whatever the wall clock said
        await asyncio.sleep(1.5)
        mute_entry = rs.state.registry.nodes[mute.node_id or ""]
        assert mute_entry.status is NodeStatus.READY
        assert not any("heartbeat timeout" in what for _, what in mute_entry.history), mute_entry.history
        assert NodeStatus.OFFLINE not in statuses[:statuses_at_close], "a node went offline"
    finally:
        watcher.cancel()
        await asyncio.gather(mute.close(), good.close(), s.disconnect(), return_exceptions=True)


#: every place that reads the wall clock, and why that is not a timeout. A new one fails the test:
#: timeouts and ages must use ``clock.monotonic()`` (or the event loop's time), which never jumps.
WALL_CLOCK_READS: dict[tuple[str, str], str] = {
    ("clock.py", "SystemClock.wall_ms"): "the wall clock itself",
    ("clock.py", "OffsetClock.wall_ms"): "the shared clock of multi-instance mode (wall + offset)",
    ("server/app.py", "build_state"): "start time, shown as uptime",
    ("server/http/http_api.py", "health_of"): "uptime shown on /health",
    ("server/node_status.py", "NodeStatusNotices.apply"): "node_status.timestamp",
    ("server/http/stats.py", "StatsAggregator._sample"): "chart timestamps",
    ("server/http/stats.py", "StatsAggregator._build"): "computed_at_ms shown",
    ("server/http/stats.py", "StatsAggregator.build_frame"): "uptime shown on the dashboard",
    ("server/events.py", "RecentEvents.add"): "event timestamps",
    ("server/ws/node_endpoint.py", "NodeConnection._heartbeat"): "heartbeat ack server_ts_ms",
    ("server/ws/session_endpoint.py", "SessionConnection.on_frame"): "server_heartbeat.timestamp",
    ("core/engine.py", "SchedulerEngine._translation"): "translation_result.scheduler_sent_at_ms",
    ("core/engine.py", "SchedulerEngine._deliver"): "missing_result.created_at_ms",
    ("server/ws/session_endpoint.py", "SessionConnection._resume_remote_run"): "missing_result.created_at_ms",
    ("server/links.py", "Links.assign"): "cross-instance hop latency (metric only)",
    ("server/cluster/cluster.py", "Cluster.handle"): "cross-instance hop latency (metric only)",
    ("server/quality.py", "QualityMonitor.node_json"): "ejected_until_ms shown (the end is monotonic)",
    # Shared expiries in Redis: instances on different hosts share no monotonic clock. A wall-clock
    # step on one instance moves these (docs/reliability.md, "Clock jumps").
    ("server/cluster/resume.py", "Resumer.ask"): "hand-over request deadline, checked by another instance",
    ("server/cluster/resume.py", "Resumer.on_request"): "hand-over request deadline (shared)",
    ("store/memory.py", "MemoryStore.reserve"): "reservation expiry (the embedded store's clock)",
    ("store/memory.py", "MemoryStore.write"): "reservation expiry (the embedded store's clock)",
    ("store/redis_store.py", "RedisStore.now_ms"): "the shared clock (wall + offset to Redis TIME)",
    ("store/redis_store.py", "RedisStore.start"): "measures the offset to Redis TIME",
    ("store/redis_store.py", "RedisStore.tick"): "measures the offset to Redis TIME",
    ("store/redis_store.py", "RedisStore._set_offset"): "measures the offset to Redis TIME",
    ("core/jobs.py", "JobStore.create"): "job created_wall_ms (API)",
    ("core/registry.py", "Registry.register"): "registered_wall_ms: epoch of a node's records",
    ("core/segmentation.py", "Segmenter._emit"): "utterance created_wall_ms",
    ("core/engine.py", "SchedulerEngine._for_client"): "group_id names its creation (window: monotonic)",
    ("store/redis_store.py", "RedisStore.ping"): "the probe key's value: when it was written (for operators)",
    (
        "server/cluster/cluster_view.py",
        "ClusterView.figures",
    ): "at_ms: when the figures were taken (shared clock)",
    ("core/engine.py", "SchedulerEngine._refuse"): "missing_result.created_at_ms",
    ("server/ws/session_endpoint.py", "SessionConnection._missing_whole"): "missing_result.created_at_ms",
    ("server/http/stats.py", "StatsAggregator.long_series"): "the chart's points are stamped for operators",
    # rooms and pairing: times peers are told (joined_at, a code's expiry, TURN credentials' expiry
    # for coturn, which checks them against its own clock); their deadlines run on monotonic time
    ("core/pairing.py", "Pairing.issue"): "pairing_code.expires_at_ms",
    ("core/rooms.py", "Rooms._add"): "member joined_at",
    ("core/rooms.py", "Rooms._ice"): "TURN username's expiry (unix time, coturn's use-auth-secret)",
    ("server/pairing_service.py", "PairingService._issue_shared"): "pairing_code.expires_at_ms (Redis mode)",
    (
        "server/cluster/room_cluster.py",
        "SharedRooms._create",
    ): "the creator's joined_at (Redis mode, shared clock)",
    # usage and quotas are billed by UTC hour, day and month: calendar periods, not timeouts
    ("core/quota.py", "QuotaBook.used"): "the UTC day/month period",
    ("core/quota.py", "QuotaBook.allowance"): "the UTC day/month period",
    ("core/quota.py", "QuotaBook.consume"): "the UTC day/month period",
    ("core/quota.py", "QuotaBook.share"): "the UTC day/month period",
    ("core/usage.py", "UsageMeter._bucket"): "the UTC hour bucket",
    ("server/http/integrator_api.py", "usage"): "the default 'to' of a usage query: now",
    ("server/http/integrator_api.py", "webhook_test"): "the event's created timestamp",
    # webhooks: an event's times travel with it to another instance (shared clock in Redis mode)
    ("server/usage_recorder.py", "UsageRecorder.audio_admitted"): "the UTC day/month quota period",
    ("server/usage_recorder.py", "UsageRecorder._share"): "the UTC hour bucket of the shared usage",
    ("server/usage_recorder.py", "UsageRecorder._sharer"): "the UTC day/month quota period",
    ("server/usage_recorder.py", "UsageRecorder.cluster_records"): "the retention horizon of usage hours",
    ("server/usage_recorder.py", "_created"): "a webhook event's created timestamp",
    ("server/webhooks.py", "WebhookService.emit"): "queued_ms of the event",
    ("server/webhooks.py", "WebhookService._deliver"): "the give-up deadline from queued_ms (any instance)",
    ("server/webhooks.py", "WebhookService._post"): "the signature's timestamp (receivers check it)",
    ("server/ws/session_endpoint.py", "SessionConnection._report_lost"): "missing_result.created_at_ms",
    # the node SDK: timestamps a node sends, never a timeout
    ("node/client.py", "Node._heartbeat"): "node_heartbeat.timestamp (the node's clock)",
    ("node/jobs.py", "result_message"): "job_result.node_completed_at_ms",
}


def _wall_reads(path: Path, root: Path) -> Iterator[tuple[str, str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    rel = path.relative_to(root).as_posix()

    def visit(node: ast.AST, scope: list[str]) -> Iterator[tuple[str, str, int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                yield from visit(child, [*scope, child.name])
                continue
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute):
                attr, base = child.func.attr, child.func.value
                base_name = base.id if isinstance(base, ast.Name) else ""
                if (
                    (base_name == "time" and attr in ("time", "time_ns"))
                    or attr == "wall_ms"
                    or (attr in ("now", "utcnow") and base_name == "datetime")
                ):
                    yield rel, ".".join(scope), child.lineno
            yield from visit(child, scope)

    yield from visit(tree, [])


def test_no_timeout_reads_the_wall_clock() -> None:
    """Static half of the clock-jump check: every wall-clock read in the scheduler (simulators and
    the load generator are clients, not the scheduler) is a timestamp or a listed shared expiry."""
    import lingua_scheduler

    root = Path(lingua_scheduler.__file__).parent
    found: dict[tuple[str, str], int] = {}
    for path in sorted(root.rglob("*.py")):
        if path.relative_to(root).parts[0] in ("sim", "loadtest"):
            continue
        for rel, scope, line in _wall_reads(path, root):
            found.setdefault((rel, scope), line)
    unknown = {
        f"{rel}:{line} in {scope}"
        for (rel, scope), line in found.items()
        if (rel, scope) not in WALL_CLOCK_READS
    }
    assert not unknown, (
        f"wall-clock reads not known to be timestamps: {sorted(unknown)} -- timeouts must use "
        "clock.monotonic(); a timestamp for peers or operators goes into WALL_CLOCK_READS with its reason"
    )


# --- a backlog drains as soon as there is capacity --------------------------------------------------


async def test_backlog_drains_as_soon_as_slots_are_free(
    scheduler_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """Utterances queue while no node is connected (as after a scheduler restart: the sessions are back
    before the nodes), more than the node that comes back can take at once. Must hold: every one is
    answered within the pending timeout -- the queue drains as slots free up, several jobs of one
    session per placement, none fails with NO_AVAILABLE_NODE while a slot is free. (The dispatcher
    placed one job per session per pass and retried waiting jobs only on its 1 s timer: here the
    fifth and sixth utterances failed after 3 s while the node was idle.)"""
    rs: RunningScheduler = await scheduler_factory(
        jobs={"pending_timeout_ms": 3000},
        scheduler={"fleet_view_interval_ms": 10, "max_concurrent_jobs_per_node": 2},
    )
    s = SimulatedSession(http, rs.session_url)
    node = SimulatedNode(http, rs.node_url, profile(), executor=Executor(latency=0.2), seed=1)
    try:
        await s.start()
        for _ in range(6):
            await s.utterance()
        await eventually(lambda: rs.state.engine.store.waiting == 6)
        await node.start()
        await eventually(s.settled, timeout=10)
        errors = [(m.get("code"), m.get("message")) for m in s.of_type("error")]
        assert s.outcomes() == {i: ["result"] for i in range(6)}, errors
        assert node.max_running == 2  # both slots used, never more
        assert_nothing_stuck(rs.state)
    finally:
        await asyncio.gather(node.close(), s.disconnect(), return_exceptions=True)


# --- the scheduler killed with SIGKILL and restarted ----------------------------------------------


class Client:
    """A client app: one session per connection; when the connection drops it reconnects (backoff)
    and opens a new session, then carries on. ``incarnations`` keeps every session it had."""

    def __init__(self, http: aiohttp.ClientSession, url: str, *fallback_urls: str) -> None:
        self.http = http
        #: tried in turn, like the node's fallback URLs (another instance behind another address)
        self.urls = (url, *fallback_urls)
        self.incarnations: list[SimulatedSession] = []

    @property
    def current(self) -> SimulatedSession | None:
        return self.incarnations[-1] if self.incarnations else None

    async def connect(self) -> SimulatedSession:
        delay = 0.05
        attempt = 0
        while True:
            s = SimulatedSession(self.http, self.urls[attempt % len(self.urls)])
            attempt += 1
            try:
                ack = await s.start()
                if ack["type"] == "session_init_ack":
                    self.incarnations.append(s)
                    return s
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass
            await s.disconnect()
            await asyncio.sleep(delay)
            delay = min(0.5, delay * 2)

    async def talk(self, utterances: int, pause: float) -> None:
        s = self.current or await self.connect()
        for _ in range(utterances):
            if s.ws is None or s.ws.closed:
                s = await self.connect()  # the client saw its connection drop: a new session
            # a send that fails is not counted as sent: the next turn reconnects
            with contextlib.suppress(ConnectionError, aiohttp.ClientError, RuntimeError):
                await s.utterance()
            await asyncio.sleep(pause)


SIGKILL_CFG: dict[str, dict[str, Any]] = {
    "jobs": {"ack_timeout_ms": 1000, "pending_timeout_ms": 3000},
    "session": {"pause_ms": 300},
    "scheduler": {"fleet_view_interval_ms": 10},
}


async def run_sigkill_restart(http: aiohttp.ClientSession, *, kills: int, utterances: int) -> Counter[str]:
    sched = SchedulerProcess(**SIGKILL_CFG).start()
    nodes: list[SimulatedNode] = []
    clients = [Client(http, sched.session_url) for _ in range(3)]
    try:
        await sched.wait_ready(http)
        nodes = [
            SimulatedNode(
                http, sched.node_url, profile(), executor=Executor(latency=0.3), reconnect=True, seed=i
            )
            for i in range(3)
        ]
        for n in nodes:
            await n.start()
        for c in clients:
            await c.connect()
        talking = [asyncio.create_task(c.talk(utterances, 0.1)) for c in clients]
        for k in range(kills):
            await asyncio.sleep(1.0)  # traffic flowing, jobs in flight
            sched.kill()  # SIGKILL: no goodbye, every connection reset
            await asyncio.sleep(0.3)
            sched.start()  # same port: clients and nodes find it again
            await sched.wait_ready(http)
            # every node comes back (reconnect with its id) and is ready again
            await eventually(lambda k=k: all(n.reconnects == k + 1 for n in nodes), timeout=15)
        await asyncio.gather(*talking)
        tally: Counter[str] = Counter()
        for c in clients:
            last = c.incarnations[-1]
            await eventually(last.settled, timeout=10)
            # before the last kill: the utterances in flight died with the connection, which the client
            # saw (its socket closed); nothing was delivered twice or out of order
            tally += check_sessions(c.incarnations[:-1], lost_ok=True)
            # after the restart: a new session, every utterance answered with its result
            failed = {i: o for i, o in last.outcomes().items() if o != ["result"]}
            assert not failed, (failed, [(m.get("code"), m.get("message")) for m in last.of_type("error")])
            tally += check_sessions([last])
            assert len(c.incarnations) >= kills + 1
        async with http.get(sched.base + "/api/v1/nodes") as r:
            listed = await r.json()
        body = listed["nodes"] if isinstance(listed, dict) else listed
        assert sorted(n["node_id"] for n in body if n["status"] == "ready") == sorted(
            n.node_id or "" for n in nodes
        )
        acks = await asyncio.gather(*(c.incarnations[-1].close() for c in clients))
        assert all(a["type"] == "session_close_ack" for a in acks)
        return tally
    finally:
        await asyncio.gather(
            *(n.close() for n in nodes),
            *(s.disconnect() for c in clients for s in c.incarnations),
            return_exceptions=True,
        )
        sched.close()


async def test_scheduler_sigkill_and_restart(http: aiohttp.ClientSession) -> None:
    """The scheduler process dies by SIGKILL mid-traffic (3 nodes, 3 sessions talking) and is
    restarted on the same port. Must hold: the in-flight utterances of the killed process end with
    the connection, which each client sees (its socket closes); nothing is delivered twice; nodes
    reconnect with their ids and are ready again; clients open new sessions and every utterance sent
    to the restarted scheduler is answered; sessions close cleanly."""
    tally = await run_sigkill_restart(http, kills=1, utterances=25)
    print(f"outcomes {dict(tally)}")


@pytest.mark.long
async def test_scheduler_sigkill_and_restart_soak(http: aiohttp.ClientSession) -> None:
    tally = await run_sigkill_restart(http, kills=5, utterances=80)
    print(f"outcomes {dict(tally)}")
