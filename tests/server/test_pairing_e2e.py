"""Pairing end to end: a node asks for a code on ``/ws/node``, a client presents it in ``session_init``
on ``/ws/session``, and that session's jobs go to that node (falling back to the pools, or failing,
by configuration); codes are single use, expire, and guessing them is rate-limited."""

from __future__ import annotations

import asyncio
from typing import Any

from lingua_scheduler.sim.nodes import Executor
from tests.conftest import RunningScheduler, eventually

FAST = {
    "jobs": {"ack_timeout_ms": 400, "pending_timeout_ms": 600, "retention_seconds": 0.2},
    "session": {"pause_ms": 300, "result_gap_timeout_ms": 3000},
    "scheduler": {"fleet_view_interval_ms": 10},
}


async def nodes(rs: RunningScheduler, node_factory: Any, n: int) -> list[Any]:
    started = [node_factory(url=rs.node_url, executor=Executor(latency=0.01)) for _ in range(n)]
    for node in started:
        await node.start()
    await eventually(
        lambda: sum(1 for v in rs.state.publisher.view.nodes.values() if v.status == "ready") >= n
    )
    return started


async def code_of(node: Any) -> dict[str, Any]:
    got = node.wait_for(lambda m: m.get("type") in ("pairing_code", "error"))
    await node.send({"type": "request_pairing_code"})
    answer: dict[str, Any] = await got
    assert answer["type"] == "pairing_code", answer
    return answer


async def open_with(session_factory: Any, rs: RunningScheduler, code: str) -> tuple[Any, dict[str, Any]]:
    s = session_factory(url=rs.session_url)
    await s.connect()
    return s, await s.init(pairing_code=code)


def assigned_to(node: Any) -> int:
    return sum(1 for m in node.received if m["type"] == "job_assign")


async def test_paired_session_goes_to_its_node_and_the_code_is_single_use(
    scheduler_factory: Any, node_factory: Any, session_factory: Any
) -> None:
    rs = await scheduler_factory(**FAST)
    a, b = await nodes(rs, node_factory, 2)
    issued = await code_of(b)
    assert len(issued["code"]) == 6 and issued["code"].isdigit()
    s, ack = await open_with(session_factory, rs, issued["code"])
    assert ack["type"] == "session_init_ack" and ack["assigned_node_id"] == b.node_id
    for _ in range(4):
        await s.speak(chunks=2)
    await eventually(lambda: len(s.of_type("translation_result")) == 4)
    assert (assigned_to(a), assigned_to(b)) == (0, 4)
    # single use: a second session with the same code is refused, and does not open
    _, again = await open_with(session_factory, rs, issued["code"])
    assert (again["type"], again["code"]) == ("error", "INVALID_PAIRING_CODE")
    assert len(rs.state.sessions) == 1
    # an unpaired session is placed as usual; its ack names no node
    u = session_factory(url=rs.session_url)
    assert (await u.start())["assigned_node_id"] is None
    assert await rs.metric("lingua_pairings_total", '{outcome="paired"}') == 1
    assert await rs.metric("lingua_pairings_total", '{outcome="not_accepted"}') == 1


async def test_fallback_to_the_pools_when_the_node_is_gone(
    scheduler_factory: Any, node_factory: Any, session_factory: Any
) -> None:
    rs = await scheduler_factory(**FAST)
    a, b = await nodes(rs, node_factory, 2)
    s, ack = await open_with(session_factory, rs, (await code_of(b))["code"])
    assert ack["assigned_node_id"] == b.node_id
    await b.close()
    await eventually(lambda: rs.state.publisher.view.nodes[b.node_id].status != "ready")
    await s.speak(chunks=2)
    await eventually(lambda: len(s.of_type("translation_result")) == 1)
    assert assigned_to(a) == 1


async def test_without_fallback_the_job_fails_explicitly(
    scheduler_factory: Any, node_factory: Any, session_factory: Any
) -> None:
    rs = await scheduler_factory(**FAST, pairing={"fallback_to_pools": False})
    a, b = await nodes(rs, node_factory, 2)
    s, ack = await open_with(session_factory, rs, (await code_of(b))["code"])
    assert ack["assigned_node_id"] == b.node_id
    await s.speak(chunks=2)
    await eventually(lambda: len(s.of_type("translation_result")) == 1)
    await b.close()
    await eventually(lambda: rs.state.publisher.view.nodes[b.node_id].status != "ready")
    await s.speak(chunks=2)
    await eventually(lambda: len(s.of_type("missing_result")) == 1, timeout=5)
    assert s.of_type("missing_result")[0]["reason"] == "job_failed"
    assert [e["code"] for e in s.of_type("error")] == ["NO_AVAILABLE_NODE"]
    assert assigned_to(a) == 0  # the user's audio never went to another machine


async def test_expired_and_revoked_codes_are_refused(
    scheduler_factory: Any, node_factory: Any, session_factory: Any
) -> None:
    rs = await scheduler_factory(**FAST, pairing={"ttl_seconds": 0.2})
    [a] = await nodes(rs, node_factory, 1)
    old = (await code_of(a))["code"]
    await asyncio.sleep(0.3)
    _, ack = await open_with(session_factory, rs, old)
    assert (ack["type"], ack["code"]) == ("error", "INVALID_PAIRING_CODE")
    # a new code replaces the earlier one
    first = (await code_of(a))["code"]
    second = (await code_of(a))["code"]
    if first != second:
        _, ack = await open_with(session_factory, rs, first)
        assert ack["code"] == "INVALID_PAIRING_CODE"


async def test_guessing_is_limited_per_connection_and_per_source(
    scheduler_factory: Any, node_factory: Any, session_factory: Any
) -> None:
    rs = await scheduler_factory(
        **FAST, pairing={"attempt_burst_per_connection": 2, "attempt_burst_per_source": 3}
    )
    [a] = await nodes(rs, node_factory, 1)
    real = (await code_of(a))["code"]
    wrong = "000000" if real != "000000" else "000001"
    s = session_factory(url=rs.session_url)
    await s.connect()
    answers = [(await s.init(pairing_code=wrong))["code"] for _ in range(3)]
    assert answers == ["INVALID_PAIRING_CODE", "INVALID_PAIRING_CODE", "PAIRING_RATE_LIMITED"]
    # the right code on this connection is refused too while it is limited
    assert (await s.init(pairing_code=real))["code"] == "PAIRING_RATE_LIMITED"
    # another connection from the same address: one try left of the source's 3, then limited
    t = session_factory(url=rs.session_url)
    await t.connect()
    assert (await t.init(pairing_code=wrong))["code"] == "INVALID_PAIRING_CODE"
    assert (await t.init(pairing_code=real))["code"] == "PAIRING_RATE_LIMITED"
    assert await rs.metric("lingua_pairings_total", '{outcome="rate_limited"}') == 3
    assert len(rs.state.sessions) == 0
