"""Hostile input on both endpoints through real WebSockets: every decode path refuses it with a clear
error, the connection's task survives, and nothing is left behind.

First a table of named cases (wrong types, missing fields, huge numbers, NaN/Infinity, deep nesting,
oversized frames, invalid base64, invalid UTF-8 in TEXT frames, unknown types), then property-based fuzz
tests (hypothesis) feeding arbitrary frames: mutated valid messages, corrupted JSON, arbitrary JSON values
and arbitrary bytes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lingua_scheduler.sim.profiles import NodeProfile
from tests.conftest import RunningScheduler
from tests.server.fuzz_frames import (
    FUZZ_CONFIG,
    MAX_FRAME,
    NODE_TAGS,
    SESSION_TAGS,
    ConnectionCrashes,
    Endpoint,
    Frame,
    FrameFuzzer,
    FuzzClient,
    crashes_fixture,
    node_templates,
    session_templates,
    settled,
)

crashes = crashes_fixture  # the fixture, under its name


@pytest.fixture
async def fuzz_rs(scheduler_factory: Any) -> RunningScheduler:
    rs: RunningScheduler = await scheduler_factory(**FUZZ_CONFIG)
    return rs


HYPOTHESIS = settings(
    max_examples=100,
    # a failure here is a server bug: report the first example found instead of spending minutes shrinking
    report_multiple_bugs=False,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# --- named cases ----------------------------------------------------------------------------------

HB = node_templates("node-HOSTILE")[1]


def hb(**changes: Any) -> bytes:
    doc = msgspec.json.decode(msgspec.json.encode(HB))
    for k, v in changes.items():
        if k in doc["resource_usage"]:
            doc["resource_usage"][k] = v
        else:
            doc[k] = v
    return msgspec.json.encode(doc)


def node_error(**changes: Any) -> bytes:
    return msgspec.json.encode(
        {"type": "node_error", "node_id": "n-1", "code": "c", "message": "m", **changes}
    )


def deep(depth: int) -> bytes:
    return (
        b'{"type":"node_error","node_id":"n","code":"c","message":"m","details":'
        + b"[" * depth
        + b"]" * depth
        + b"}"
    )


COMMON_CASES: list[tuple[str, bytes, str, str]] = [
    ("unknown type", b'{"type":"bogus"}', "INVALID_MESSAGE", "unknown message type 'bogus' (expected one of"),
    ("type not a string", b'{"type":5}', "INVALID_MESSAGE", "Expected `str` - at `$.type`"),
    ("missing type", b'{"node_id":"x"}', "INVALID_MESSAGE", "missing required field `type`"),
    ("not an object", b"[1,2]", "INVALID_MESSAGE", "Expected `object`, got `array`"),
    ("a bare string", b'"node_register"', "INVALID_MESSAGE", "Expected `object`, got `str`"),
    ("empty frame", b"", "INVALID_MESSAGE", "malformed JSON"),
    ("binary garbage", b"\x00\x01\xfe\xff", "INVALID_MESSAGE", "malformed JSON"),
    ("UTF-8 byte order mark", b'\xef\xbb\xbf{"type":"bogus"}', "INVALID_MESSAGE", "malformed JSON"),
    ("huge unknown type", b'{"type":"' + b"x" * 5000 + b'"}', "INVALID_MESSAGE", "(5000 characters)"),
]

NODE_CASES: list[tuple[str, bytes, str, str]] = [
    (
        "wrong type",
        hb(cpu_percent="x"),
        "INVALID_MESSAGE",
        "Expected `float`, got `str` - at `$.resource_usage.cpu_percent`",
    ),
    (
        "missing field",
        b'{"type":"node_heartbeat","node_id":"n-1"}',
        "INVALID_MESSAGE",
        "missing required field `timestamp`",
    ),
    ("huge integer", hb(timestamp=10**30), "INVALID_MESSAGE", "`$.timestamp`"),
    (
        "integer of 5000 digits",
        hb().replace(b'"timestamp":1700000000000', b'"timestamp":' + b"9" * 5000),
        "INVALID_MESSAGE",
        "out of range",
    ),
    (
        "float out of range",
        hb().replace(b'"cpu_percent":10.0', b'"cpu_percent":1e400'),
        "INVALID_MESSAGE",
        "Number out of range",
    ),
    ("NaN", hb().replace(b'"cpu_percent":10.0', b'"cpu_percent":NaN'), "INVALID_MESSAGE", "malformed JSON"),
    (
        "Infinity",
        hb().replace(b'"cpu_percent":10.0', b'"cpu_percent":Infinity'),
        "INVALID_MESSAGE",
        "malformed JSON",
    ),
    ("percent over 100", hb(cpu_percent=100.5), "INVALID_MESSAGE", "<= 100.0"),
    ("negative count", hb(running_jobs=-1), "INVALID_MESSAGE", "`$.resource_usage.running_jobs`"),
    (
        "attempt id too large",
        msgspec.json.encode(
            {
                "type": "job_ack",
                "job_id": "j",
                "attempt_id": 2**60,
                "node_id": "n",
                "session_id": "s",
                "trace_id": "t",
            }
        ),
        "INVALID_MESSAGE",
        "`$.attempt_id`",
    ),
    (
        "TTS audio that is not base64",
        msgspec.json.encode(
            {
                "type": "job_result",
                "job_id": "j",
                "attempt_id": 1,
                "node_id": "n",
                "session_id": "s",
                "utterance_index": 0,
                "success": True,
                "trace_id": "t",
                "tts_audio": "not base64 at all!",
            }
        ),
        "INVALID_MESSAGE",
        "not valid base64 - at `$.tts_audio`",
    ),
    ("node id with slashes", hb(node_id="../etc"), "INVALID_MESSAGE", "`$.node_id`"),
    ("nested 7000 deep", deep(7000), "INVALID_MESSAGE", "JSON nested too deeply"),
    (
        "invalid UTF-8 in a string",
        node_error().replace(b'"message":"m"', b'"message":"\xff\xfe"'),
        "INVALID_MESSAGE",
        "not valid UTF-8",
    ),
    (
        "lone surrogate escape",
        node_error().replace(b'"message":"m"', b'"message":"\\ud800"'),
        "INVALID_MESSAGE",
        "malformed JSON",
    ),
    (
        "scheduler-to-node type",
        b'{"type":"job_assign"}',
        "INVALID_MESSAGE",
        "unknown message type 'job_assign'",
    ),
    (
        "session type on the node socket",
        b'{"type":"session_init"}',
        "INVALID_MESSAGE",
        "unknown message type 'session_init'",
    ),
    ("trailing garbage", hb() + b" x", "INVALID_MESSAGE", "malformed JSON"),
    ("heartbeat before registering", hb(), "NOT_REGISTERED", "node-HOSTILE"),
]


def session_cases(sid: str) -> list[tuple[str, bytes, str, str]]:
    chunk = {"type": "audio_chunk", "session_id": sid, "seq": 1, "is_final": False, "payload": "AAAA"}
    utt = session_templates(sid)[3]

    def enc(doc: dict[str, Any], **changes: Any) -> bytes:
        return msgspec.json.encode({**doc, **changes})

    init = session_templates(sid)[0]
    return [
        ("trailing garbage", enc(chunk) + b"{}", "INVALID_MESSAGE", "malformed JSON"),
        (
            "invalid base64 payload",
            enc(chunk, payload="***not base64***"),
            "INVALID_MESSAGE",
            "not valid base64",
        ),
        ("base64 without padding", enc(chunk, payload="AAA"), "INVALID_MESSAGE", "not valid base64"),
        ("invalid base64 utterance", enc(utt, audio="%%%"), "INVALID_MESSAGE", "not valid base64"),
        ("payload of the wrong type", enc(chunk, payload=5), "INVALID_MESSAGE", "`$.payload`"),
        (
            "missing is_final",
            enc({k: v for k, v in chunk.items() if k != "is_final"}),
            "INVALID_MESSAGE",
            "`is_final`",
        ),
        ("negative seq", enc(chunk, seq=-1), "INVALID_MESSAGE", "`$.seq`"),
        (
            "huge client timestamp",
            enc(chunk, client_timestamp_ms=10**20),
            "INVALID_MESSAGE",
            "`$.client_timestamp_ms`",
        ),
        ("huge sample rate", enc(utt, sample_rate=10**12), "INVALID_MESSAGE", "`$.sample_rate`"),
        ("float where an int belongs", enc(chunk, seq=1.5), "INVALID_MESSAGE", "Expected `int`, got `float`"),
        ("NaN token", enc(chunk).replace(b'"seq":1', b'"seq":NaN'), "INVALID_MESSAGE", "malformed JSON"),
        ("long enum value", enc(init, mode="y" * 400), "INVALID_MESSAGE", "(400 characters)"),
        ("language code too long", enc(init, src_lang="x" * 33), "INVALID_MESSAGE", "`$.src_lang`"),
        ("languages of the wrong type", enc(init, auto_langs="en"), "INVALID_MESSAGE", "`$.auto_langs`"),
        (
            "invalid UTF-8 in a string",
            enc(init).replace(b'"platform":"web"', b'"platform":"w\xc3\x28"'),
            "INVALID_MESSAGE",
            "not valid UTF-8",
        ),
        (
            "deep nesting",
            b'{"type":"client_heartbeat","x":' + b"[" * 7000 + b"]" * 7000 + b"}",
            "INVALID_MESSAGE",
            "nested too deeply",
        ),
        (
            "scheduler-to-client type",
            b'{"type":"translation_result"}',
            "INVALID_MESSAGE",
            "unknown message type 'translation_result'",
        ),
        (
            "node type on the session socket",
            b'{"type":"node_heartbeat"}',
            "INVALID_MESSAGE",
            "unknown message type 'node_heartbeat'",
        ),
        ("another session's id", enc(chunk, session_id="s-SOMEONE"), "INVALID_SESSION", "s-SOMEONE"),
    ]


async def expect_error(ws: aiohttp.ClientWebSocketResponse, name: str, code: str, fragment: str) -> None:
    msg = await ws.receive(5)
    assert msg.type is aiohttp.WSMsgType.TEXT, (name, msg)
    reply = msgspec.json.decode(msg.data)
    assert reply["type"] == "error", (name, reply)
    assert reply["code"] == code, (name, reply)
    assert fragment in reply["message"], (name, reply["message"])
    assert len(reply["message"]) <= 600, name


async def test_node_decode_paths_refuse_hostile_frames(
    fuzz_rs: RunningScheduler, crashes: ConnectionCrashes
) -> None:
    async with fuzz_rs.http.ws_connect(fuzz_rs.node_url) as ws:
        for name, frame, code, fragment in COMMON_CASES + NODE_CASES:
            for kind in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                await ws.send_frame(frame, kind)
                await expect_error(ws, f"{name} ({kind.name})", code, fragment)
        # after all of it the socket registers and heartbeats like any other
        profile = NodeProfile(asr_languages=["en"], tts_languages=["en"], nmt_languages=["en"])
        await ws.send_bytes(msgspec.json.encode(profile.register_message("node-HOSTILE")))
        assert msgspec.json.decode((await ws.receive(5)).data)["type"] == "node_register_ack"
        await ws.send_bytes(hb())
        assert msgspec.json.decode((await ws.receive(5)).data)["type"] == "node_heartbeat_ack"
        assert len(fuzz_rs.state.registry) == 1
    await settled(fuzz_rs)


async def test_session_decode_paths_refuse_hostile_frames(
    fuzz_rs: RunningScheduler, crashes: ConnectionCrashes
) -> None:
    async with fuzz_rs.http.ws_connect(fuzz_rs.session_url) as ws:
        await ws.send_bytes(msgspec.json.encode(session_templates("")[0]))
        sid = msgspec.json.decode((await ws.receive(5)).data)["session_id"]
        for name, frame, code, fragment in COMMON_CASES + session_cases(sid):
            for kind in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                await ws.send_frame(frame, kind)
                await expect_error(ws, f"{name} ({kind.name})", code, fragment)
        assert list(fuzz_rs.state.sessions) == [sid]
        assert len(fuzz_rs.state.dispatcher.store) == 0  # no refused frame created a job
        hb_frame = msgspec.json.encode({"type": "client_heartbeat", "session_id": sid, "timestamp": 7})
        await ws.send_bytes(hb_frame)
        assert msgspec.json.decode((await ws.receive(5)).data)["type"] == "server_heartbeat"
    await settled(fuzz_rs)


async def test_close_frame_with_invalid_utf8_reason(
    fuzz_rs: RunningScheduler, crashes: ConnectionCrashes
) -> None:
    """The one place aiohttp checks UTF-8 itself is a close reason: it answers 1007, we clean up."""
    from tests.server.raw_ws import CLOSE, RawWebSocket

    ws = await RawWebSocket.connect(fuzz_rs.session_url)
    await ws.send(b"\x03\xe8\xff\xfe", CLOSE)
    assert await ws.close_code() == aiohttp.WSCloseCode.INVALID_TEXT
    ws.close()
    await settled(fuzz_rs)


# --- property-based fuzzing ------------------------------------------------------------------------------


@pytest.fixture
async def clients(fuzz_rs: RunningScheduler) -> AsyncIterator[dict[Endpoint, FuzzClient]]:
    """One fuzzing connection per endpoint, shared by the examples of a test (reconnected when closed)."""
    made = {
        "node": FuzzClient(fuzz_rs.http, fuzz_rs.node_url, "node"),
        "session": FuzzClient(fuzz_rs.http, fuzz_rs.session_url, "session"),
    }
    yield made  # type: ignore[misc]
    for c in made.values():
        await c.close()
    await settled(fuzz_rs)


async def run_frames(client: FuzzClient, frames: Callable[[str | None], list[Frame]], bind: bool) -> None:
    """Send ``frames(bound_id)``, optionally after binding the socket (a registered node, an open session)
    so that they also reach the paths behind the binding checks; then prove the connection still serves.
    One fresh connection per example, so that a failing example reproduces on its own."""
    await client.reconnect()
    bound = await client.bind() if bind else None
    for frame in frames(bound):
        await client.send(frame)
    await client.probe()


# the endpoint is a parameter, not drawn by hypothesis: each endpoint keeps a full run of examples of its own
@pytest.mark.parametrize("endpoint", ["node", "session"])
@HYPOTHESIS
@given(rnd=st.randoms(use_true_random=False), n=st.integers(1, 12), bind=st.booleans())
async def test_fuzz_frames(
    fuzz_rs: RunningScheduler,
    clients: dict[Endpoint, FuzzClient],
    crashes: ConnectionCrashes,
    endpoint: Endpoint,
    rnd: Any,
    n: int,
    bind: bool,
) -> None:
    def frames(bound: str | None) -> list[Frame]:
        fuzzer = (
            FrameFuzzer("node", rnd, MAX_FRAME, node_id=bound or "node-FUZZ0001")
            if endpoint == "node"
            else FrameFuzzer("session", rnd, MAX_FRAME, session_id=bound or "s-FUZZ0001")
        )
        return [fuzzer.next() for _ in range(n)]

    await run_frames(clients[endpoint], frames, bind)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=30,
)


@st.composite
def typed_objects(draw: st.DrawFn, tags: list[str]) -> dict[str, Any]:
    """Arbitrary objects that claim to be a message of the protocol: the type is right, the rest is not."""
    doc: dict[str, Any] = draw(st.dictionaries(st.text(max_size=20), JSON, max_size=8))
    doc["type"] = draw(st.sampled_from(tags))
    return doc


@HYPOTHESIS
@given(
    endpoint=st.sampled_from(["node", "session"]),
    values=st.lists(JSON | typed_objects(NODE_TAGS) | typed_objects(SESSION_TAGS), min_size=1, max_size=6),
    binary=st.booleans(),
)
async def test_fuzz_arbitrary_json(
    fuzz_rs: RunningScheduler,
    clients: dict[Endpoint, FuzzClient],
    crashes: ConnectionCrashes,
    endpoint: Endpoint,
    values: list[Any],
    binary: bool,
) -> None:
    await run_frames(
        clients[endpoint], lambda _: [Frame(msgspec.json.encode(v), binary=binary) for v in values], True
    )


@HYPOTHESIS
@given(
    endpoint=st.sampled_from(["node", "session"]),
    blobs=st.lists(st.binary(max_size=300), min_size=1, max_size=6),
)
async def test_fuzz_arbitrary_bytes(
    fuzz_rs: RunningScheduler,
    clients: dict[Endpoint, FuzzClient],
    crashes: ConnectionCrashes,
    endpoint: Endpoint,
    blobs: list[bytes],
) -> None:
    """Random bytes in TEXT frames (invalid UTF-8 included: we read TEXT frames as bytes) and BINARY."""
    await run_frames(
        clients[endpoint], lambda _: [Frame(b, binary=i % 2 == 1) for i, b in enumerate(blobs)], False
    )
