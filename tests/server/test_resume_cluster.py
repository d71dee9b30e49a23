"""Resuming a session on another instance (Redis mode, a real redis-server): the token A issued works
on B within the window. With A alive, A hands the session over: the result still running there reaches
the client on B, and the numbering continues. With A dead (SIGKILL), B continues the session and
reports the utterance that died with A as ``missing_result(job_failed)`` -- never silently."""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
from typing import Any

import aiohttp
import pytest

from lingua_scheduler.core import opus
from lingua_scheduler.core.auth import hash_api_key
from lingua_scheduler.sim.nodes import Executor
from lingua_scheduler.sim.sessions import SimulatedSession
from tests.conftest import eventually
from tests.redis_support import RedisServer, cluster_cfg, has_redis, ready_in_view, start_instances
from tests.scheduler_process import SchedulerProcess

pytestmark = pytest.mark.skipif(not has_redis(), reason="no redis-server binary")

WINDOW_MS = 10_000


def sections(url: str, prefix: str) -> dict[str, dict[str, Any]]:
    cfg = cluster_cfg(url, prefix, jobs={"ack_timeout_ms": 1500, "pending_timeout_ms": 3000})
    cfg["session"] = {**cfg["session"], "resume_window_ms": WINDOW_MS}
    return cfg


def results(s: Any) -> list[dict[str, Any]]:
    return [m for m in s.messages if m.get("type") in ("translation_result", "missing_result")]


async def test_token_of_a_resumes_on_b_while_a_lives(
    redis_server: RedisServer, scheduler_factory: Any, node_factory: Any, session_factory: Any
) -> None:
    a, b = await start_instances(scheduler_factory, 2, sections(redis_server.url, "r" + secrets.token_hex(3)))
    node = node_factory(url=a.node_url, executor=Executor(latency=1.0, partials=0))
    await node.start()
    await eventually(lambda: ready_in_view(a, node.node_id) and ready_in_view(b, node.node_id), timeout=5)
    s = session_factory(url=a.session_url)
    ack = await s.start()
    sid = ack["session_id"]
    running = node.wait_for(lambda m: m.get("type") == "job_assign")
    await s.utterance()
    await running
    await s.disconnect()  # mid-utterance: its job runs on
    await eventually(lambda: a.state.sessions[sid].phase.value == "detached")
    moved = session_factory(url=b.session_url)
    await moved.connect()
    resumed = await moved.init(resume_token=ack["resume_token"])
    assert resumed["type"] == "session_init_ack", resumed
    assert resumed["session_id"] == sid and resumed["resumed"] is True
    assert resumed["resume_token"] and resumed["resume_token"] != ack["resume_token"]  # B's own now
    # the result of the utterance that ran on A reaches the client on B
    await eventually(lambda: len(results(moved)) == 1, timeout=5)
    assert [(r["type"], r["utterance_index"]) for r in results(moved)] == [("translation_result", 0)]
    # A let the session go once its last outcome was out
    await eventually(lambda: sid not in a.state.sessions, timeout=5)
    # the numbering continues on B
    moved.utterances_sent = 1
    await moved.utterance()
    await eventually(lambda: len(results(moved)) == 2, timeout=10)
    assert [r["utterance_index"] for r in results(moved)] == [0, 1]
    assert moved.of_type("error") == []
    # a second use of A's token opens a new session (the record went with the hand-over)
    again = session_factory(url=b.session_url)
    await again.connect()
    fresh = await again.init(resume_token=ack["resume_token"])
    assert fresh["resumed"] is False and fresh["session_id"] != sid


async def test_token_of_a_dead_instance_continues_on_b_with_the_loss_reported(
    redis_server: RedisServer,
    scheduler_factory: Any,
    node_factory: Any,
    session_factory: Any,
    http: aiohttp.ClientSession,
    procs: list[SchedulerProcess],
) -> None:
    cfg = sections(redis_server.url, "k" + secrets.token_hex(3))
    a = SchedulerProcess(**cfg).start()
    procs.append(a)
    await a.wait_ready(http)
    [b] = await start_instances(scheduler_factory, 1, cfg)
    slow = node_factory(url=a.node_url, executor=Executor(latency=30.0, partials=0))
    await slow.start()
    s = session_factory(url=a.session_url)
    ack = await s.start()
    running = slow.wait_for(lambda m: m.get("type") == "job_assign")
    await s.utterance()
    await running
    await s.disconnect()
    await asyncio.sleep(0.3)  # the detached session's record is written
    a.kill()  # SIGKILL: no hand-over, no goodbye
    await a.wait_exit(10)
    fast = node_factory(url=b.node_url, executor=Executor(latency=0.01, partials=0))
    await fast.start()
    await eventually(lambda: ready_in_view(b, fast.node_id), timeout=5)
    moved = session_factory(url=b.session_url)
    await moved.connect()
    resumed = await moved.init(resume_token=ack["resume_token"])
    assert resumed["session_id"] == ack["session_id"] and resumed["resumed"] is True
    # the utterance that died with A is reported, explicitly
    await eventually(lambda: len(results(moved)) == 1, timeout=5)
    [lost] = results(moved)
    assert (lost["type"], lost["utterance_index"], lost["reason"]) == ("missing_result", 0, "job_failed")
    # and the session goes on, numbered after it
    moved.utterances_sent = 1
    await moved.utterance()
    await eventually(lambda: len(results(moved)) == 2, timeout=10)
    assert [(r["type"], r["utterance_index"]) for r in results(moved)] == [
        ("missing_result", 0),
        ("translation_result", 1),
    ]


async def test_wrong_secret_takes_nothing_over(
    redis_server: RedisServer, scheduler_factory: Any, session_factory: Any
) -> None:
    a, b = await start_instances(scheduler_factory, 2, sections(redis_server.url, "w" + secrets.token_hex(3)))
    s = session_factory(url=a.session_url)
    ack = await s.start()
    sid = ack["session_id"]
    await s.disconnect()
    await eventually(lambda: a.state.sessions[sid].phase.value == "detached")
    await asyncio.sleep(0.2)
    thief = session_factory(url=b.session_url)
    await thief.connect()
    got = await thief.init(resume_token=f"{sid}.guessed-secret")
    assert got["resumed"] is False and got["session_id"] != sid
    assert a.state.sessions[sid].phase.value == "detached"  # still A's, still resumable
    owner = session_factory(url=b.session_url)
    await owner.connect()
    assert (await owner.init(resume_token=ack["resume_token"]))["session_id"] == sid


async def test_an_outcome_the_hand_over_itself_produces_reaches_the_client_on_b(
    redis_server: RedisServer, scheduler_factory: Any, session_factory: Any
) -> None:
    """The hand-over cuts the utterance in progress on A; a silent one is answered at once there
    (``missing_result(silence_detected)``), relayed before A's answer reaches B: B keeps it until the
    session opens there. Session ids are 128-bit (unique across the instances)."""
    a, b = await start_instances(scheduler_factory, 2, sections(redis_server.url, "o" + secrets.token_hex(3)))
    s = session_factory(url=a.session_url)
    ack = await s.start()
    sid = ack["session_id"]
    assert re.fullmatch(r"s-[0-9A-F]{32}", sid), sid
    silent = bytes.fromhex("4807c979c8c9c8c9")  # one 20 ms Opus frame of silence
    await s.chunk(payload=base64.b64encode(opus.frame([silent] * 10)).decode())
    await s.disconnect()
    await eventually(lambda: a.state.sessions[sid].phase.value == "detached")
    moved = session_factory(url=b.session_url)
    await moved.connect()
    assert (await moved.init(resume_token=ack["resume_token"]))["resumed"] is True
    await eventually(lambda: len(results(moved)) == 1, timeout=5)
    [lost] = results(moved)
    assert (lost["type"], lost["utterance_index"], lost["reason"]) == (
        "missing_result",
        0,
        "silence_detected",
    )


async def test_one_session_is_continued_once_when_two_instances_are_asked_at_once(
    redis_server: RedisServer,
    scheduler_factory: Any,
    node_factory: Any,
    session_factory: Any,
    http: aiohttp.ClientSession,
    procs: list[SchedulerProcess],
) -> None:
    """The token of a dead instance's session presented to B and C at the same moment: exactly one
    continues it (the claim on the record), the other opens a new session; a later try anywhere
    opens a new one too (the record went when the session opened)."""
    cfg = sections(redis_server.url, "c" + secrets.token_hex(3))
    a = SchedulerProcess(**cfg).start()
    procs.append(a)
    await a.wait_ready(http)
    b, c = await start_instances(scheduler_factory, 2, cfg)
    s = session_factory(url=a.session_url)
    ack = await s.start()
    await s.disconnect()
    await asyncio.sleep(0.3)  # the detached session's record is written
    a.kill()
    await a.wait_exit(10)
    tries = [session_factory(url=rs.session_url) for rs in (b, c)]
    for t in tries:
        await t.connect()
    got = await asyncio.gather(*(t.init(resume_token=ack["resume_token"]) for t in tries))
    assert sorted(g["resumed"] for g in got) == [False, True], got
    assert sorted(g["session_id"] == ack["session_id"] for g in got) == [False, True], got
    for rs in (b, c):
        late = session_factory(url=rs.session_url)
        await late.connect()
        again = await late.init(resume_token=ack["resume_token"])
        assert again["resumed"] is False and again["session_id"] != ack["session_id"]


CAP_KEY = "resume-cap-key-" + "r" * 32


async def test_a_refused_admission_leaves_the_session_with_its_owner(
    redis_server: RedisServer, scheduler_factory: Any, http: aiohttp.ClientSession
) -> None:
    """B admits the continued session before asking A: when the tenant's cap refuses it there, A
    still holds the session, detached and resumable (nothing was handed over to nobody)."""
    cfg = sections(redis_server.url, "t" + secrets.token_hex(3))
    cfg["auth"] = {
        "tenants": [{"tenant_id": "capped", "key_sha256": hash_api_key(CAP_KEY), "max_sessions": 2}]
    }
    a, b = await start_instances(scheduler_factory, 2, cfg)
    s = SimulatedSession(http, a.session_url, api_key=CAP_KEY)
    ack = await s.start()
    sid = ack["session_id"]
    other = SimulatedSession(http, b.session_url, api_key=CAP_KEY)
    assert (await other.start())["type"] == "session_init_ack"  # the cap is full now
    await s.disconnect()
    await eventually(lambda: a.state.sessions[sid].phase.value == "detached")
    await asyncio.sleep(0.3)  # the record is written
    moved = SimulatedSession(http, b.session_url, api_key=CAP_KEY)
    await moved.connect()
    refused = await moved.init(resume_token=ack["resume_token"])
    assert (refused["type"], refused["code"]) == ("error", "TENANT_LIMIT"), refused
    await asyncio.sleep(0.3)
    assert a.state.sessions[sid].phase.value == "detached"
    back = SimulatedSession(http, a.session_url, api_key=CAP_KEY)
    await back.connect()
    resumed = await back.init(resume_token=ack["resume_token"])
    assert (resumed["session_id"], resumed["resumed"]) == (sid, True)
    for conn in (other, moved, back):
        await conn.disconnect()
