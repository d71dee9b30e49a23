"""Every limit of docs/reliability.md ("Limits") hit through real sockets, with its defined behaviour."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from typing import Any

import aiohttp
import msgspec
import pytest

from lingua_scheduler.errors import ConfigError
from lingua_scheduler.sim.nodes import Executor
from tests.conftest import MS, RunningScheduler, eventually, make_config
from tests.server.raw_ws import RawWebSocket

INIT = {"type": "session_init", "client_version": "t", "platform": "web", "src_lang": "en", "tgt_lang": "zh"}
FAST_JOBS = {"ack_timeout_ms": 400, "pending_timeout_ms": 600, "retention_seconds": 0.2}
#: LINGUA_TEST_TIME_FACTOR: the tests' sleeps stretch by it, so the rates they race shrink by it
FACTOR = MS * 1000


def per_second(rate: float) -> float:
    """A configured rate for a test whose pauses are ``MS``-scaled (the same test on a slower clock)."""
    return rate / FACTOR


def is_type(t: str) -> Any:
    return lambda m: m.get("type") == t


def error_with(code: str) -> Any:
    return lambda m: m.get("type") == "error" and m.get("code") == code


async def receive_json(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> dict[str, Any]:
    msg = await ws.receive(timeout)
    assert msg.type is aiohttp.WSMsgType.TEXT, msg
    out: dict[str, Any] = msgspec.json.decode(msg.data)
    return out


async def drain(ws: aiohttp.ClientWebSocketResponse, quiet: float = 0.2) -> list[dict[str, Any]]:
    """Every message until none has come for ``quiet`` seconds."""
    out: list[dict[str, Any]] = []
    while True:
        try:
            out.append(await receive_json(ws, quiet))
        except TimeoutError:
            return out


async def close_code(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> int | None:
    """Read until the server closes; the close code it sent."""
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.receive()
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                return ws.close_code


async def ready_nodes(rs: RunningScheduler, node_factory: Any, n: int, **kw: Any) -> list[Any]:
    nodes = [node_factory(url=rs.node_url, executor=Executor(latency=0.01), **kw) for _ in range(n)]
    for node in nodes:
        assert (await node.start())["type"] == "node_register_ack"
    await eventually(
        lambda: sum(1 for v in rs.state.publisher.view.nodes.values() if v.status == "ready") >= n
    )
    return nodes


# --- configuration ------------------------------------------------------------------------------


def test_limits_config_is_validated() -> None:
    cfg = make_config(limits={"session_allowed_origins": [" https://App.Example.com/ "]})
    assert cfg.limits.session_allowed_origins == ["https://app.example.com"]
    for bad, key in (
        ({"session_allowed_origins": ["app.example.com"]}, "limits.session_allowed_origins"),
        ({"session_allowed_origins": ["https://a.example/path"]}, "limits.session_allowed_origins"),
        ({"max_sessions": 0}, "limits.max_sessions"),
        ({"node_messages_per_second": -1}, "limits.node_messages_per_second"),
    ):
        with pytest.raises(ConfigError) as exc:
            make_config(limits=bad)
        assert exc.value.key == key


# --- frame size -----------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["node", "session"])
async def test_frame_over_the_limit_closes_with_1009(scheduler_factory: Any, endpoint: str) -> None:
    """Up to max_frame_bytes a frame is handled; one byte more and the socket is closed (1009)."""
    rs = await scheduler_factory(server={"max_frame_bytes": 4096})
    url = rs.node_url if endpoint == "node" else rs.session_url
    async with rs.http.ws_connect(url) as ws:
        await ws.send_str('{"type":"x","pad":"' + "a" * (4096 - 21) + '"}')  # exactly 4096 bytes
        assert (await receive_json(ws))["code"] == "INVALID_MESSAGE"
        await ws.send_str("x" * 4097)
        assert await close_code(ws) == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    await eventually(lambda: rs.state.limits.open_connections == 0)


# --- message rate ---------------------------------------------------------------------------------


async def test_node_flood_is_dropped_told_then_closed(scheduler_factory: Any, node_factory: Any) -> None:
    rs = await scheduler_factory(
        limits={
            "node_messages_per_second": per_second(20),
            "node_message_burst": 20,
            "rate_limit_close_after_seconds": 0.6 * FACTOR,
        },
        scheduler={"fleet_view_interval_ms": 10},
    )
    node = node_factory(url=rs.node_url, interval=3600)
    await node.start()  # register + one heartbeat: 2 tokens
    await asyncio.sleep(1100 * MS)  # the bucket refills to its burst
    told = node.wait_for(error_with("RATE_LIMITED"))
    for _ in range(60):
        await node.heartbeat()
    error = await told
    assert f"{per_second(20):g} messages per second" in error["message"]
    assert error["details"]["limit_per_second"] == per_second(20) and error["details"]["retry_after_ms"] > 0
    await eventually(lambda: rs.state.registry.nodes[node.node_id].heartbeats >= 21)
    await asyncio.sleep(50 * MS)
    heartbeats = rs.state.registry.nodes[node.node_id].heartbeats
    assert 21 <= heartbeats <= 25, heartbeats  # the burst (20) and the refill of those few ms
    assert len([m for m in node.received if m.get("code") == "RATE_LIMITED"]) == 1  # told once, not 40x
    # a pause ends the episode: the node is served again, it was not closed
    await asyncio.sleep(1100 * MS)
    # and the rest of the burst was reported a second on: the reports add up to every dropped frame
    reports = [m["details"]["dropped"] for m in node.received if m.get("code") == "RATE_LIMITED"]
    dropped = await rs.metric("lingua_rate_limited_frames_total", '{endpoint="node"}')
    assert len(reports) == 2 and sum(reports) == dropped, (reports, dropped)
    before = len(node.rtts)
    await node.heartbeat()
    await eventually(lambda: len(node.rtts) == before + 1)
    # sustained excess (twice the rate, for longer than close_after) closes with 1008
    assert node.ws is not None
    for _ in range(200):
        if node.ws.closed:
            break
        await node.heartbeat()
        await asyncio.sleep(25 * MS)
    await eventually(lambda: node.ws is not None and node.ws.closed, timeout=3000 * MS)
    assert node.ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
    await eventually(lambda: not rs.state.registry.nodes[node.node_id].connected)
    assert await rs.metric("lingua_limit_refusals_total", '{limit="rate_close"}') == 1
    assert await rs.metric("lingua_rate_limited_frames_total", '{endpoint="node"}') > 40
    assert rs.state.limits.nodes == 0


async def test_session_streaming_at_50_per_second_is_never_limited(
    scheduler_factory: Any, node_factory: Any, session_factory: Any
) -> None:
    """Default limits: a client streaming 20 ms chunks (50/s) with heartbeats is never limited."""
    rs = await scheduler_factory(jobs=FAST_JOBS, scheduler={"fleet_view_interval_ms": 10})
    await ready_nodes(rs, node_factory, 1)
    s = session_factory(url=rs.session_url, audio_format="pcm16")
    await s.start()
    loop = asyncio.get_running_loop()
    start = loop.time()
    sent = 0
    while loop.time() - start < 1.5:
        sent += 1
        await s.chunk(payload=base64.b64encode(bytes(640)).decode(), is_final=sent % 25 == 0)
        if sent % 50 == 0:
            await s.send({"type": "client_heartbeat", "session_id": s.session_id, "timestamp": sent})
        # paced by the clock, like a microphone: 20 ms per chunk whatever the loop's jitter
        await asyncio.sleep(max(0.0, start + sent * 0.02 - loop.time()))
    await eventually(lambda: len(s.of_type("translation_result")) >= sent // 25)
    assert not s.of_type("error")
    assert await rs.metric("lingua_rate_limited_frames_total", '{endpoint="session"}') == 0


async def test_session_flood_is_dropped_then_closed(scheduler_factory: Any) -> None:
    rs = await scheduler_factory(
        limits={
            "session_messages_per_second": per_second(50),
            "session_message_burst": 10,
            "rate_limit_close_after_seconds": 0.5 * FACTOR,
        }
    )
    async with rs.http.ws_connect(rs.session_url) as ws:
        await ws.send_str(msgspec.json.encode(INIT).decode())
        sid = (await receive_json(ws))["session_id"]
        hb = msgspec.json.encode({"type": "client_heartbeat", "session_id": sid, "timestamp": 1}).decode()
        for _ in range(30):
            await ws.send_str(hb)
        replies = await drain(ws)
        kinds = [r["type"] for r in replies]
        # the burst is served (9 tokens left after the init); the client is told to slow down before
        # anything is dropped, then to pause (backpressure, not an error it would show its user)
        assert 9 <= kinds.count("server_heartbeat") <= 12, kinds
        assert [r for r in replies if r["type"] == "error"] == []
        actions = [r["action"] for r in replies if r["type"] == "backpressure"]
        assert actions[0] == "SLOW_DOWN" and actions[-1] == "PAUSE", actions
        assert kinds.index("backpressure") < len(kinds) - 1
        assert all(r["resume_after_ms"] > 0 for r in replies if r["type"] == "backpressure")

        # keep flooding: closed with 1008 once the excess has lasted 0.5 s
        async def flood() -> None:  # twice the rate, never slowing down
            with contextlib.suppress(ConnectionError, RuntimeError):  # the close may race a send
                while not ws.closed:
                    await ws.send_str(hb)
                    await asyncio.sleep(10 * MS)

        flooding = asyncio.create_task(flood())
        assert await close_code(ws, 5000 * MS) == aiohttp.WSCloseCode.POLICY_VIOLATION
        await flooding
    await eventually(lambda: rs.state.sessions == {} and rs.state.limits.open_connections == 0)


async def test_pings_are_answered_and_count_against_the_rate(scheduler_factory: Any) -> None:
    """WebSocket pings are answered, but after the frame gate: a ping flood is dropped, told and
    closed with 1008 like a flood of messages (aiohttp's own autoping would answer every one)."""
    rs = await scheduler_factory(
        limits={
            "session_messages_per_second": per_second(50),
            "session_message_burst": 10,
            "rate_limit_close_after_seconds": 0.5 * FACTOR,
        }
    )
    async with rs.http.ws_connect(rs.session_url, autoping=False) as ws:
        await ws.ping(b"are you there")
        pong = await ws.receive(5)
        assert pong.type is aiohttp.WSMsgType.PONG and pong.data == b"are you there"

        async def flood() -> None:  # twice the rate, never slowing down
            with contextlib.suppress(ConnectionError, RuntimeError):  # the close may race a send
                while not ws.closed:
                    await ws.ping(b"x")
                    await asyncio.sleep(10 * MS)

        flooding = asyncio.create_task(flood())
        errors: list[str] = []
        pongs = 0
        async with asyncio.timeout(5000 * MS):
            while True:
                msg = await ws.receive()
                if msg.type is aiohttp.WSMsgType.PONG:
                    pongs += 1
                elif msg.type is aiohttp.WSMsgType.TEXT:
                    told = msgspec.json.decode(msg.data)
                    errors.append(told.get("code") or f"{told['type']}:{told['action']}")
                else:
                    break
        await flooding
        assert ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
        assert errors and set(errors) <= {"backpressure:SLOW_DOWN", "backpressure:PAUSE"}
        assert "backpressure:PAUSE" in errors
        assert pongs < 60  # ~0.5 s of excess at 100 pings/s: many were not answered
    assert await rs.metric("lingua_rate_limited_frames_total", '{endpoint="session"}') > 10
    await eventually(lambda: rs.state.limits.open_connections == 0)


# --- audio per utterance and per session ------------------------------------------------------------


async def test_audio_per_utterance_is_cut_or_refused(
    scheduler_factory: Any, node_factory: Any, session_factory: Any
) -> None:
    """Streamed audio over max_utterance_bytes is cut (nothing lost); a whole ``utterance`` over it is
    refused with MESSAGE_TOO_LARGE and the session goes on."""
    rs = await scheduler_factory(
        jobs=FAST_JOBS,
        session={"max_utterance_bytes": 16_000, "pause_ms": 5000},
        scheduler={"fleet_view_interval_ms": 10},
    )
    [node] = await ready_nodes(rs, node_factory, 1)
    s = session_factory(url=rs.session_url, audio_format="pcm16")
    await s.start()
    for i in range(6):  # 6 x 6400 B = 38400 B streamed as one "utterance" of the client's
        await s.chunk(payload=base64.b64encode(bytes([i]) * 6400).decode(), is_final=i == 5)
    await eventually(lambda: len(s.of_type("translation_result")) == 3)
    sizes = [len(base64.b64decode(m["audio"])) for m in node.received if m["type"] == "job_assign"]
    assert sizes == [12_800, 12_800, 12_800] and max(sizes) <= 16_000
    err = s.wait_for(is_type("error"))
    await s.utterance(n_bytes=16_002)
    e = await err
    assert e["code"] == "MESSAGE_TOO_LARGE" and "16000" in e["message"]
    await s.speak(chunks=1)  # the session still works, and the refused utterance took no index
    await eventually(lambda: len(s.of_type("translation_result")) == 4)
    assert s.of_type("translation_result")[-1]["utterance_index"] == 3


async def test_audio_backlog_per_session_is_bounded(
    scheduler_factory: Any, node_factory: Any, session_factory: Any
) -> None:
    """Audio held for a session's undelivered jobs never exceeds max_session_buffer_bytes: the job that
    would exceed it fails at once (NODE_OVERLOADED + missing_result), the earlier ones go on."""
    rs = await scheduler_factory(
        jobs={**FAST_JOBS, "pending_timeout_ms": 5000},
        session={"max_utterance_bytes": 16_000, "max_session_buffer_bytes": 40_000},
        scheduler={"fleet_view_interval_ms": 10},
    )
    s = session_factory(url=rs.session_url, audio_format="pcm16")
    await s.start()
    err = s.wait_for(is_type("error"))
    for _ in range(3):  # no node yet: the jobs wait, holding their audio
        await s.utterance(n_bytes=16_000)
    e = await err
    assert e["code"] == "NODE_OVERLOADED" and "backlog" in e["message"]
    assert e["details"]["utterance_index"] == 2
    store = rs.state.engine.store
    assert store.session_audio_bytes(s.session_id) == 32_000 <= 40_000
    await ready_nodes(rs, node_factory, 1)
    await eventually(lambda: s.settled())
    assert s.outcomes() == {0: ["result"], 1: ["result"], 2: ["missing:job_failed"]}
    await eventually(lambda: store.audio_bytes == 0)


# --- nodes and sessions per instance --------------------------------------------------------------------


async def test_max_sessions_per_instance(scheduler_factory: Any, session_factory: Any) -> None:
    rs = await scheduler_factory(limits={"max_sessions": 2})
    a, b, c = (session_factory(url=rs.session_url) for _ in range(3))
    await a.start()
    await b.start()
    refused = await c.start()
    assert refused["type"] == "error" and refused["code"] == "SESSION_LIMIT_REACHED"
    assert "2 sessions" in refused["message"] and len(rs.state.sessions) == 2
    # replacing a session on a full instance is fine: it takes no new capacity
    assert (await b.init())["type"] == "session_init_ack"
    await a.close()
    assert (await c.init())["type"] == "session_init_ack"  # the same connection, once there is room
    assert len(rs.state.sessions) == 2
    assert await rs.metric("lingua_limit_refusals_total", '{limit="sessions"}') == 1


async def test_max_nodes_per_instance(scheduler_factory: Any, node_factory: Any) -> None:
    rs = await scheduler_factory(limits={"max_nodes": 2})
    a, b, c = (node_factory(url=rs.node_url) for _ in range(3))
    await a.start()
    await b.start()
    refused = await c.start()
    assert refused["type"] == "error" and refused["code"] == "NODE_LIMIT_REACHED"
    assert len(rs.state.registry) == 2 and not c.closed
    assert (await b.register())["type"] == "node_register_ack"  # re-register: no new capacity
    await a.close()
    await eventually(lambda: rs.state.limits.nodes == 1)
    assert (await c.register())["type"] == "node_register_ack"
    assert rs.state.limits.nodes == 2


async def test_node_records_bound_refuses_new_ids_only(scheduler_factory: Any, node_factory: Any) -> None:
    """Past max_node_records an offline record makes room for a new id (oldest first); a never-seen id
    is refused only when every record is a connected node's, and known ids still reconnect."""
    rs = await scheduler_factory(limits={"max_node_records": 2})
    a, b = node_factory(url=rs.node_url), node_factory(url=rs.node_url)
    await a.start()
    await b.start()
    await a.close()
    await eventually(lambda: rs.state.limits.nodes == 1)
    stranger = node_factory(url=rs.node_url)
    assert (await stranger.start())["type"] == "node_register_ack"  # a's record was evicted
    assert a.node_id not in rs.state.registry.nodes
    refused = await node_factory(url=rs.node_url).start()
    assert refused["type"] == "error" and refused["code"] == "NODE_LIMIT_REACHED"
    assert "node records" in refused["message"]
    await b.close()
    await eventually(lambda: rs.state.limits.nodes == 1)
    again = node_factory(url=rs.node_url, node_id=b.node_id)
    assert (await again.start())["type"] == "node_register_ack"
    assert len(rs.state.registry) == 2


async def test_max_connections_refused_before_upgrade(scheduler_factory: Any) -> None:
    rs = await scheduler_factory(limits={"max_connections": 2})
    first = await rs.http.ws_connect(rs.session_url)
    second = await rs.http.ws_connect(rs.node_url)
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await rs.http.ws_connect(rs.session_url)
    assert exc.value.status == 503
    async with rs.http.get(rs.node_url) as r:  # the refusal is a plain HTTP response with a code
        assert r.status == 503 and (await r.json())["code"] == "TOO_MANY_CONNECTIONS"
        assert r.headers["Retry-After"]
    await first.close()
    await eventually(lambda: rs.state.limits.open_connections == 1)
    third = await rs.http.ws_connect(rs.session_url)
    await third.close()
    await second.close()
    await eventually(lambda: rs.state.limits.open_connections == 0)


async def test_handshake_timeout_closes_idle_sockets(scheduler_factory: Any) -> None:
    rs = await scheduler_factory(limits={"handshake_timeout_seconds": 0.2})
    idle_node = await rs.http.ws_connect(rs.node_url)
    idle_session = await rs.http.ws_connect(rs.session_url)
    busy = await rs.http.ws_connect(rs.session_url)
    await busy.send_str(msgspec.json.encode(INIT).decode())
    assert (await receive_json(busy))["type"] == "session_init_ack"
    assert await close_code(idle_node) == aiohttp.WSCloseCode.POLICY_VIOLATION
    assert await close_code(idle_session) == aiohttp.WSCloseCode.POLICY_VIOLATION
    await asyncio.sleep(0.2)
    assert not busy.closed
    await busy.close()
    await eventually(lambda: rs.state.limits.open_connections == 0 and rs.state.sessions == {})


# --- Origin -------------------------------------------------------------------------------------


async def test_origin_allow_list(scheduler_factory: Any) -> None:
    rs = await scheduler_factory(limits={"session_allowed_origins": ["https://app.example.com"]})
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await rs.http.ws_connect(rs.session_url, origin="https://evil.example")
    assert exc.value.status == 403
    async with rs.http.get(rs.session_url, headers={"Origin": "null"}) as r:
        assert r.status == 403 and (await r.json())["code"] == "ORIGIN_NOT_ALLOWED"
    for origin in ("https://app.example.com", "HTTPS://APP.EXAMPLE.COM/", None):  # None: not a browser
        ws = await rs.http.ws_connect(rs.session_url, origin=origin)
        await ws.close()
    ws = await rs.http.ws_connect(rs.node_url, origin="https://evil.example")  # nodes are not browsers
    await ws.close()
    assert await rs.metric("lingua_limit_refusals_total", '{limit="origin"}') == 2
    await eventually(lambda: rs.state.limits.open_connections == 0)


# --- outbound queue -------------------------------------------------------------------------------


@pytest.mark.parametrize(("messages", "max_bytes"), [(32, 16 * 1024 * 1024), (100_000, 4096)])
async def test_a_peer_that_stops_reading_is_cut_off(
    scheduler_factory: Any, messages: int, max_bytes: int
) -> None:
    """Requests keep coming, replies are never read: the reply queue stays within outbound_queue messages
    and outbound_queue_bytes, and the connection is closed as a slow consumer instead of buffering on."""
    rs = await scheduler_factory(
        server={"outbound_queue": messages},
        limits={
            "session_messages_per_second": 1e6,
            "session_message_burst": 1_000_000,
            "outbound_queue_bytes": max_bytes,
        },
    )
    # a small receive window: the server's socket fills after a few kilobytes instead of megabytes
    ws = await RawWebSocket.connect(rs.session_url, rcvbuf=4096)
    await ws.send(msgspec.json.encode(INIT))
    await eventually(lambda: len(rs.state.sessions) == 1)
    [session] = rs.state.sessions.values()
    outbox = session.outbox
    assert outbox is not None
    hb = RawWebSocket.frame(
        msgspec.json.encode({"type": "client_heartbeat", "session_id": session.session_id, "timestamp": 1})
    )
    high_water = high_water_bytes = sent = 0
    while not outbox.slow_consumer and sent < 100_000:
        await ws.send_raw(hb * 8)  # a few requests at a time, as a client would pipeline them
        sent += 8
        high_water = max(high_water, outbox.queued)
        high_water_bytes = max(high_water_bytes, outbox.queued_bytes)
        await asyncio.sleep(1 * MS)
    assert outbox.slow_consumer, f"not cut off after {sent} requests"
    assert high_water <= messages and high_water_bytes <= max_bytes
    await eventually(lambda: rs.state.sessions == {} and rs.state.limits.open_connections == 0)
    assert outbox.queued == 0 and outbox.queued_bytes == 0  # dropped with the connection
    ws.close()
