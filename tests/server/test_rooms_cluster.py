"""One room with members on two instances (Redis mode, a real redis-server): membership, relayed
signalling and fan-out results cross the instances through their inboxes; the member limit holds
cluster-wide; an instance that dies (SIGKILL) takes its members out of the room, and the others are
told."""

from __future__ import annotations

import secrets
from typing import Any

import aiohttp
import pytest

from lingua_scheduler.sim.nodes import Executor
from lingua_scheduler.sim.profiles import NodeProfile
from tests.conftest import eventually
from tests.redis_support import RedisServer, cluster_cfg, has_redis, ready_in_view, start_instances
from tests.scheduler_process import SchedulerProcess
from tests.server.test_rooms_e2e import ask, create, heard, join, last_members, member, own

pytestmark = pytest.mark.skipif(not has_redis(), reason="no redis-server binary")
LANGS = ["en", "zh", "ja"]


def sections(url: str, **rooms: Any) -> dict[str, dict[str, Any]]:
    cfg = cluster_cfg(url, "rm" + secrets.token_hex(3))
    cfg["rooms"] = {"max_members": 3, **rooms}
    return cfg


async def test_a_room_across_two_instances(
    redis_server: RedisServer, scheduler_factory: Any, node_factory: Any, session_factory: Any
) -> None:
    a, b = await start_instances(scheduler_factory, 2, sections(redis_server.url))
    node = node_factory(
        NodeProfile(asr_languages=LANGS, tts_languages=LANGS, nmt_languages=LANGS),
        url=a.node_url,
        executor=Executor(latency=0.01),
    )
    await node.start()
    await eventually(lambda: ready_in_view(a, node.node_id) and ready_in_view(b, node.node_id), timeout=5)
    x = await member(session_factory, a, "zh", "en")  # on A
    y = await member(session_factory, b, "en", "ja")  # on B
    z = await member(session_factory, b, "ja", "zh")  # on B
    code = await create(x, "zh")
    assert (await join(y, code, "en"))["type"] == "room_members"
    assert (await join(z, code, "ja"))["type"] == "room_members"
    order = [x.session_id, y.session_id, z.session_id]
    await eventually(lambda: all(last_members(s) == order for s in (x, y, z)), timeout=5)
    # the limit holds across the instances
    w = await member(session_factory, a, "en", "zh")
    full = await join(w, code)
    assert (full["type"], full["code"]) == ("room_error", "ROOM_FULL")
    # a relay from B to A, `to` naming the sender
    got = x.wait_for(lambda m: m.get("type") == "webrtc_offer")
    await y.send({"type": "webrtc_offer", "room_code": code, "to": x.session_id, "sdp": {"sdp": "v=0"}})
    assert (await got)["to"] == y.session_id
    # fan-out both ways: x (A) speaks, y and z (B) hear it in their languages; z speaks, x hears it
    await x.speak(chunks=2)
    await z.speak(chunks=2)
    await eventually(
        lambda: (
            len(heard(y, x)) == 1
            and len(heard(z, x)) == 1
            and len(heard(x, z)) == 1
            and len(heard(y, z)) == 1
        ),
        timeout=10,
    )
    assert heard(y, x)[0]["text_translated"] == "en 0" and heard(z, x)[0]["text_translated"] == "ja 0"
    assert heard(x, z)[0]["text_translated"] == "zh 0"
    assert len(own(x)) == 1 and len(own(z)) == 1
    # a member on B leaves: A's member is told
    await y.send({"type": "room_leave", "room_code": code})
    await eventually(lambda: last_members(x) == [x.session_id, z.session_id], timeout=5)
    # now there is room for w, from A
    assert (await join(w, code))["type"] == "room_members"
    # a member on B whose connection drops leaves too: A's members are told
    await z.disconnect()
    await eventually(lambda: last_members(x) == [x.session_id, w.session_id], timeout=5)


async def test_a_dead_instance_takes_its_members_out(
    redis_server: RedisServer,
    scheduler_factory: Any,
    session_factory: Any,
    http: aiohttp.ClientSession,
    procs: list[SchedulerProcess],
) -> None:
    cfg = sections(redis_server.url)
    doomed = SchedulerProcess(**cfg).start()
    procs.append(doomed)
    await doomed.wait_ready(http)
    [b] = await start_instances(scheduler_factory, 1, cfg)
    x = await member(session_factory, b, "zh", "en")
    code = await create(x)
    y = session_factory(url=doomed.session_url, src_lang="en", tgt_lang="zh")
    await y.start()
    assert (await join(y, code))["type"] == "room_members"
    await eventually(lambda: last_members(x) == [x.session_id, y.session_id], timeout=5)
    doomed.kill()  # SIGKILL: its member cannot leave by itself
    await doomed.wait_exit(10)
    await eventually(lambda: last_members(x) == [x.session_id], timeout=10)
    # the room goes on: a new member joins it
    z = await member(session_factory, b, "en", "zh")
    answer = await ask(z, {"type": "room_join", "room_code": code}, "room_members", "room_error")
    assert answer["type"] == "room_members"
    assert [m["session_id"] for m in answer["members"]] == [x.session_id, z.session_id]


async def test_pairing_across_instances(
    redis_server: RedisServer, scheduler_factory: Any, node_factory: Any, session_factory: Any
) -> None:
    cfg = sections(redis_server.url)
    cfg["pairing"] = {"attempt_burst_per_connection": 5, "attempt_burst_per_source": 3}
    a, b = await start_instances(scheduler_factory, 2, cfg)
    nodes = [node_factory(url=rs.node_url, executor=Executor(latency=0.01)) for rs in (a, b)]
    for n in nodes:
        await n.start()
    target = nodes[0]  # on A
    await eventually(lambda: all(ready_in_view(b, n.node_id) for n in nodes), timeout=5)
    got = target.wait_for(lambda m: m.get("type") == "pairing_code")
    await target.send({"type": "request_pairing_code"})
    code = (await got)["code"]
    # redeemed on B: bound to the node on A, whose jobs it gets
    s = session_factory(url=b.session_url)
    await s.connect()
    ack = await s.init(pairing_code=code)
    assert ack["type"] == "session_init_ack" and ack["assigned_node_id"] == target.node_id
    for _ in range(3):
        await s.speak(chunks=2)
    await eventually(lambda: len(s.of_type("translation_result")) == 3, timeout=10)
    assert sum(1 for m in target.received if m["type"] == "job_assign") == 3
    assert not any(m["type"] == "job_assign" for m in nodes[1].received)
    # single use, cluster-wide: A refuses it too (2nd attempt of this address)
    t = session_factory(url=a.session_url)
    await t.connect()
    assert (await t.init(pairing_code=code))["code"] == "INVALID_PAIRING_CODE"
    # the address's bucket is shared: its 3rd attempt (on B) passes, the 4th (on A) is refused
    u = session_factory(url=b.session_url)
    await u.connect()
    assert (await u.init(pairing_code="000000"))["code"] == "INVALID_PAIRING_CODE"
    assert (await t.init(pairing_code="000000"))["code"] == "PAIRING_RATE_LIMITED"


async def test_expiry_across_instances(
    redis_server: RedisServer, scheduler_factory: Any, session_factory: Any
) -> None:
    a, b = await start_instances(scheduler_factory, 2, sections(redis_server.url, expire_after_seconds=0.5))
    x = await member(session_factory, a, "zh", "en")
    y = await member(session_factory, b, "en", "zh")
    code = await create(x)
    assert (await join(y, code))["type"] == "room_members"
    await eventually(lambda: bool(x.of_type("room_expired")) and bool(y.of_type("room_expired")), timeout=5)
    assert len(x.of_type("room_expired")) == len(y.of_type("room_expired")) == 1
    again = await join(y, code)
    assert (again["type"], again["code"]) == ("room_error", "ROOM_NOT_FOUND")
