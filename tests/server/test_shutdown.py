"""Graceful shutdown (SIGTERM) of a scheduler running in its own process.

What must hold, every time:
- the process stops accepting at once (new connections refused with HTTP 503, a ``session_init`` on a
  connection opened before closes it with 1012, so the client reconnects) and exits 0;
- every open session is told to hold its audio (``backpressure{PAUSE}``, never an ``error``: the web
  client shows errors as popups) and every utterance it sent gets exactly one outcome before the
  socket closes: its result when the job finishes within ``shutdown.drain_timeout_seconds``, else
  ``error`` + ``missing_result(job_failed)`` (a lost utterance is an error);
- session sockets are closed with 1012 (service restart) after their last message, node sockets with
  1001 (going away), so peers reconnect; a node whose job was given up gets ``job_cancel``;
- Redis mode: a job of another instance running on a node of the stopping one is not lost: the
  other instance fails it over as soon as the node leaves, and the result reaches its session once.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import time
from typing import Any

import aiohttp
import pytest

from lingua_scheduler.sim.nodes import Executor, SimulatedNode
from lingua_scheduler.sim.profiles import NodeProfile
from lingua_scheduler.sim.sessions import SimulatedSession
from tests.conftest import eventually
from tests.redis_support import RedisServer, cluster_section, has_redis
from tests.scheduler_process import SchedulerProcess

FAST = {
    "jobs": {"ack_timeout_ms": 1000, "pending_timeout_ms": 2000},
    "session": {"pause_ms": 300},
    "scheduler": {"fleet_view_interval_ms": 10},
}
GOING_AWAY = 1001
SERVICE_RESTART = 1012


def profile() -> NodeProfile:
    return NodeProfile(asr_languages=["en", "zh"], tts_languages=["en", "zh"], nmt_languages=["en", "zh"])


async def start_process(
    procs: list[SchedulerProcess], http: aiohttp.ClientSession, **sections: dict[str, Any]
) -> SchedulerProcess:
    p = SchedulerProcess(**{**FAST, **sections}).start()
    procs.append(p)
    await p.wait_ready(http)
    return p


def kinds(messages: list[dict[str, Any]]) -> list[str]:
    return [m["type"] + (f":{m['code']}" if m["type"] == "error" else "") for m in messages]


async def test_sigterm_lets_running_job_finish_then_exits_0(
    procs: list[SchedulerProcess], http: aiohttp.ClientSession
) -> None:
    sched = await start_process(procs, http, shutdown={"drain_timeout_seconds": 8.0})
    node = SimulatedNode(http, sched.node_url, profile(), executor=Executor(latency=1.5))
    await node.start()
    s = SimulatedSession(http, sched.session_url)
    await s.start()
    idle = SimulatedSession(http, sched.session_url)
    await idle.connect()  # connected before the SIGTERM, no session yet
    try:
        assigned = node.wait_for(lambda m: m.get("type") == "job_assign")
        await s.speak(chunks=2)  # utterance 0: complete
        await s.chunk()  # utterance 1: buffered, not finalized yet -- the close must not lose it
        s.utterances_sent += 1
        await assigned
        t0 = time.monotonic()
        sched.signal(signal.SIGTERM)
        notice = await s.wait_for(lambda m: m.get("type") == "backpressure", timeout=5)
        assert notice["action"] == "PAUSE" and notice["session_id"] == s.session_id
        assert 7000 < notice["resume_after_ms"] <= 8000  # the drain time
        # nobody new gets in (the HTTP routes still answer: /ready says why)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused_ws:
            await http.ws_connect(sched.session_url)
        assert refused_ws.value.status == 503
        async with http.get(sched.base + "/ready") as r:
            assert r.status == 503 and (await r.json())["checks"]["accepting"] is False
        # a connection opened before cannot start a session any more: it is closed with 1012, so
        # the client reconnects (to an instance that is up) instead of showing an error
        assert idle.ws is not None
        init = {
            "type": "session_init",
            "client_version": "t",
            "platform": "web",
            "src_lang": "en",
            "tgt_lang": "zh",
        }
        await idle.ws.send_json(init)
        await eventually(lambda: idle.ws is not None and idle.ws.closed, timeout=2)  # not the drain's end
        assert idle.ws.close_code == SERVICE_RESTART
        assert not [m for m in idle.messages if m.get("type") in ("session_init_ack", "error")]
        # audio sent now is not taken, and the client is told again to hold it (no error)
        told = len(s.of_type("backpressure"))
        again = s.wait_for(
            lambda m: m.get("type") == "backpressure" and len(s.of_type("backpressure")) > told
        )
        await s.chunk(is_final=True)
        assert (await again)["action"] == "PAUSE"
        try:
            ack = await s.wait_for(lambda m: m.get("type") == "session_close_ack", timeout=10)
        except TimeoutError:
            raise AssertionError((kinds(s.messages), sched.log_tail())) from None
        assert ack["session_id"] == s.session_id
        code = await sched.wait_exit(10)
        elapsed = time.monotonic() - t0
        assert code == 0, sched.log_tail()
        # both utterances answered, in order, before the ack; nothing failed
        assert s.outcomes() == {0: ["result"], 1: ["result"]}, kinds(s.messages)
        assert s.of_type("error") == []  # nothing the web client would show as a popup
        after_ack = kinds(s.messages[s.messages.index(ack) + 1 :])
        assert after_ack == [], after_ack
        await eventually(lambda: s.ws is not None and s.ws.closed, timeout=3)
        assert s.ws is not None and s.ws.close_code == SERVICE_RESTART
        await eventually(lambda: node.closed, timeout=3)
        assert node.ws is not None and node.ws.close_code == GOING_AWAY
        assert any(m["type"] == "error" and m["code"] == "SCHEDULER_SHUTTING_DOWN" for m in node.received)
        assert not any(m["type"] == "job_cancel" for m in node.received)
        assert elapsed < 6, f"drain took {elapsed:.1f} s for 2 jobs of 1.5 s"
    finally:
        await asyncio.gather(node.close(), s.disconnect(), idle.disconnect(), return_exceptions=True)


async def test_job_past_the_deadline_is_failed_explicitly_before_exit(
    procs: list[SchedulerProcess], http: aiohttp.ClientSession
) -> None:
    sched = await start_process(
        procs, http, shutdown={"drain_timeout_seconds": 1.0}, jobs={"exec_timeout_min_ms": 30_000}
    )
    node = SimulatedNode(http, sched.node_url, profile(), executor=Executor(latency=20.0))
    fast = SimulatedNode(http, sched.node_url, profile(), executor=Executor(latency=0.05))
    await node.start()
    s = SimulatedSession(http, sched.session_url)
    await s.start()
    try:
        assigned = node.wait_for(lambda m: m.get("type") == "job_assign")
        await s.utterance()
        job = await assigned
        await fast.start()  # a node that would answer at once: no new work may go to it
        t0 = time.monotonic()
        sched.signal(signal.SIGTERM)
        cancel = node.wait_for(lambda m: m.get("type") == "job_cancel", timeout=10)
        ack = await s.wait_for(lambda m: m.get("type") == "session_close_ack", timeout=10)
        assert (await cancel)["job_id"] == job["job_id"]
        assert await sched.wait_exit(10) == 0, sched.log_tail()
        elapsed = time.monotonic() - t0
        assert 0.9 < elapsed < 5, elapsed
        # the client was told, in this order: hold your audio, the job failed, the utterance is missing
        i_notice = s.messages.index(s.of_type("backpressure")[0])
        failures = [m for m in s.of_type("error") if (m.get("details") or {}).get("job_id") == job["job_id"]]
        assert len(failures) == 1 and failures[0]["code"] == "SCHEDULER_SHUTTING_DOWN"
        assert s.outcomes() == {0: ["missing:job_failed"]}
        missing = s.of_type("missing_result")[0]
        assert i_notice < s.messages.index(failures[0]) < s.messages.index(missing) < s.messages.index(ack)
        assert any(
            m["event"] == "ERROR" and m["error_code"] == "SCHEDULER_SHUTTING_DOWN"
            for m in s.of_type("ui_event")
        )
        assert not any(m["type"] == "job_assign" for m in fast.received)
        await eventually(lambda: s.ws is not None and s.ws.closed and node.closed and fast.closed, timeout=3)
        assert s.ws is not None and s.ws.close_code == SERVICE_RESTART
    finally:
        await asyncio.gather(node.close(), fast.close(), s.disconnect(), return_exceptions=True)


async def test_sigterm_without_traffic_exits_at_once(
    procs: list[SchedulerProcess], http: aiohttp.ClientSession
) -> None:
    sched = await start_process(procs, http, shutdown={"drain_timeout_seconds": 30.0})
    nodes = [SimulatedNode(http, sched.node_url, profile(), seed=i) for i in range(3)]
    for n in nodes:
        await n.start()
    try:
        t0 = time.monotonic()
        sched.signal(signal.SIGTERM)
        assert await sched.wait_exit(10) == 0, sched.log_tail()
        assert time.monotonic() - t0 < 3  # nothing in flight: the 30 s drain deadline is not waited for
        await eventually(lambda: all(n.closed for n in nodes), timeout=3)
        assert all(n.ws is not None and n.ws.close_code == GOING_AWAY for n in nodes)
    finally:
        await asyncio.gather(*(n.close() for n in nodes), return_exceptions=True)


# --- Redis mode ------------------------------------------------------------------------------------

redis_only = pytest.mark.skipif(not has_redis(), reason="no redis-server binary")


def cluster_sections(url: str, prefix: str) -> dict[str, dict[str, Any]]:
    return {
        # long presence TTL: the hand-back must come from the leaving instance, not from its presence expiring
        "cluster": cluster_section(url, prefix, presence_ttl_seconds=30.0),
        "jobs": {"ack_timeout_ms": 1500, "pending_timeout_ms": 5000, "exec_timeout_min_ms": 30_000},
    }


@redis_only
async def test_redis_mode_stopping_instance_hands_jobs_back(
    redis_server: RedisServer,
    procs: list[SchedulerProcess],
    http: aiohttp.ClientSession,
    scheduler_factory: Any,
) -> None:
    """A session on A, its job running on a node connected to B; B gets SIGTERM with a short drain.
    The node is released by B and reconnects to A; A fails the job over when B leaves; the session
    gets exactly one result. Meanwhile B's own session with a quick job is answered before B exits."""
    prefix = "g" + secrets.token_hex(3)
    sections = cluster_sections(redis_server.url, prefix)
    a = await scheduler_factory(**{**sections, "scheduler": {"fleet_view_interval_ms": 10}})
    await eventually(lambda: not a.state.cluster.degraded, timeout=5)
    b = await start_process(procs, http, **sections, shutdown={"drain_timeout_seconds": 1.5})
    slow = SimulatedNode(
        http,
        b.node_url,
        profile(),
        executor=Executor(latency=3.0),
        reconnect=True,
        fallback_urls=(a.node_url,),
    )
    await slow.start()
    await eventually(
        lambda: (nv := a.state.publisher.view.get(slow.node_id or "")) is not None and nv.status == "ready",
        timeout=5,
    )
    spare = SimulatedNode(http, a.node_url, profile(), executor=Executor(latency=0.05), seed=1)
    s = SimulatedSession(http, a.session_url)
    await s.start()
    try:
        first = slow.wait_for(lambda m: m.get("type") == "job_assign")
        await s.utterance()
        job = await first
        assert job["attempt_id"] == 1
        # a node on A for the next attempt (the failover never goes back to a node already tried)
        await spare.start()
        await eventually(lambda: a.state.publisher.view.get(spare.node_id or "") is not None, timeout=5)
        t0 = time.monotonic()
        b.signal(signal.SIGTERM)
        assert await b.wait_exit(10) == 0, b.log_tail()
        # the job's next attempt ran on A's node; the released node came to A (its fallback)
        await eventually(lambda: s.settled(), timeout=15)
        assert time.monotonic() - t0 < 5  # drain 1.5 s + hand-back, far below the presence TTL
        assert s.outcomes() == {0: ["result"]}, kinds(s.messages)
        [result] = s.of_type("translation_result")
        assert result["job_id"] == job["job_id"]
        assert a.state.engine.store.get(job["job_id"]).attempt == 2
        assert [m["attempt_id"] for m in spare.received if m["type"] == "job_assign"] == [2]
        await eventually(lambda: slow.reconnects == 1, timeout=5)
        # B left the shared state at once: no presence, no node records, no live job records
        store = a.state.cluster.store
        records, _ = await store.directory()
        assert {r.owner for r in records} == {a.state.cluster.instance_id}
        await eventually(lambda: a.state.engine.store.inflight == 0, timeout=5)
    finally:
        await asyncio.gather(slow.close(), spare.close(), s.disconnect(), return_exceptions=True)


async def test_stop_without_signal_fails_in_flight_work_at_once(
    scheduler_factory: Any, http: aiohttp.ClientSession
) -> None:
    """Any other stop (here ``TestServer.close()``, i.e. aiohttp's shutdown without our signal
    handler) cannot wait for results -- aiohttp has stopped reading -- so the work in flight is
    failed explicitly at once, and every peer still gets its messages and its close (1012 for
    sessions, 1001 for nodes)."""
    rs = await scheduler_factory(scheduler={"fleet_view_interval_ms": 10})
    node = SimulatedNode(http, rs.node_url, profile(), executor=Executor(latency=20.0))
    s = SimulatedSession(http, rs.session_url)
    try:
        await node.start()
        await s.start()
        assigned = node.wait_for(lambda m: m.get("type") == "job_assign")
        await s.utterance()
        job = await assigned
        t0 = time.monotonic()
        await rs.server.close()
        assert time.monotonic() - t0 < 3
        await eventually(lambda: s.ws is not None and s.ws.closed and node.closed, timeout=3)
        assert s.outcomes() == {0: ["missing:job_failed"]}
        assert kinds(s.messages)[-4:] == [
            "error:SCHEDULER_SHUTTING_DOWN",
            "ui_event",
            "missing_result",
            "session_close_ack",
        ]
        assert s.ws is not None and s.ws.close_code == SERVICE_RESTART
        assert any(m["type"] == "job_cancel" and m["job_id"] == job["job_id"] for m in node.received)
        assert node.ws is not None and node.ws.close_code == GOING_AWAY
    finally:
        await asyncio.gather(node.close(), s.disconnect(), return_exceptions=True)
