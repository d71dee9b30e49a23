"""Hostile input on both endpoints through real WebSockets: every decode path refuses it with a clear
error, the connection's task survives, and nothing is left behind.

First a table of named cases (wrong types, missing fields, huge numbers, NaN/Infinity, deep nesting,
oversized frames, invalid base64, invalid UTF-8 in TEXT frames, unknown types), then property-based fuzz
tests (hypothesis) feeding arbitrary frames: mutated valid messages, corrupted JSON, arbitrary JSON values
and arbitrary bytes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple

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
    room_templates,
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


class Case(NamedTuple):
    """A hostile frame and the error it must get: the code, and for ``INVALID_MESSAGE`` the reason and
    the field path (``details``), which the message names too. ``names`` is a text our own message must
    contain when there is no field to name (an id, a limit)."""

    name: str
    frame: bytes
    code: str
    reason: str | None = None
    field: str | None = None
    names: str | None = None


def invalid(name: str, frame: bytes, reason: str, field: str = "$") -> Case:
    return Case(name, frame, "INVALID_MESSAGE", reason, field)


COMMON_CASES: list[Case] = [
    invalid("unknown type", b'{"type":"bogus"}', "unknown_type", "$.type"),
    invalid("type not a string", b'{"type":5}', "wrong_type", "$.type"),
    invalid("missing type", b'{"node_id":"x"}', "missing_field", "$.type"),
    invalid("not an object", b"[1,2]", "wrong_type"),
    invalid("a bare string", b'"node_register"', "wrong_type"),
    invalid("empty frame", b"", "malformed_json"),
    invalid("binary garbage", b"\x00\x01\xfe\xff", "invalid_utf8"),
    invalid("ASCII garbage", b"\x00\x01{", "malformed_json"),
    invalid("UTF-8 byte order mark", b'\xef\xbb\xbf{"type":"bogus"}', "malformed_json"),
    invalid("huge unknown type", b'{"type":"' + b"x" * 5000 + b'"}', "unknown_type", "$.type"),
]

NODE_CASES: list[Case] = [
    invalid("wrong type", hb(cpu_percent="x"), "wrong_type", "$.resource_usage.cpu_percent"),
    invalid("missing field", b'{"type":"node_heartbeat","node_id":"n-1"}', "missing_field", "$.timestamp"),
    invalid("huge integer", hb(timestamp=10**30), "invalid_value", "$.timestamp"),
    invalid(
        "integer of 5000 digits",
        hb().replace(b'"timestamp":1700000000000', b'"timestamp":' + b"9" * 5000),
        "invalid_value",
        "$.timestamp",
    ),
    invalid(
        "float out of range",
        hb().replace(b'"cpu_percent":10.0', b'"cpu_percent":1e400'),
        "invalid_value",
        "$.resource_usage.cpu_percent",
    ),
    invalid("NaN", hb().replace(b'"cpu_percent":10.0', b'"cpu_percent":NaN'), "malformed_json"),
    invalid("Infinity", hb().replace(b'"cpu_percent":10.0', b'"cpu_percent":Infinity'), "malformed_json"),
    invalid("percent over 100", hb(cpu_percent=100.5), "invalid_value", "$.resource_usage.cpu_percent"),
    invalid("negative count", hb(running_jobs=-1), "invalid_value", "$.resource_usage.running_jobs"),
    invalid(
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
        "invalid_value",
        "$.attempt_id",
    ),
    invalid(
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
        "invalid_base64",
        "$.tts_audio",
    ),
    invalid("node id with slashes", hb(node_id="../etc"), "invalid_value", "$.node_id"),
    invalid("nested 7000 deep", deep(7000), "too_deep"),
    invalid(
        "invalid UTF-8 in a string",
        node_error().replace(b'"message":"m"', b'"message":"\xff\xfe"'),
        "invalid_utf8",
    ),
    invalid(
        "lone surrogate escape",
        node_error().replace(b'"message":"m"', b'"message":"\\ud800"'),
        "malformed_json",
    ),
    invalid("scheduler-to-node type", b'{"type":"job_assign"}', "unknown_type", "$.type"),
    invalid("session type on the node socket", b'{"type":"session_init"}', "unknown_type", "$.type"),
    invalid("trailing garbage", hb() + b" x", "malformed_json"),
    Case("heartbeat before registering", hb(), "NOT_REGISTERED", names="node-HOSTILE"),
]


def session_cases(sid: str) -> list[Case]:
    chunk = {"type": "audio_chunk", "session_id": sid, "seq": 1, "is_final": False, "payload": "AAAA"}
    utt = session_templates(sid)[3]

    def enc(doc: dict[str, Any], **changes: Any) -> bytes:
        return msgspec.json.encode({**doc, **changes})

    init = session_templates(sid)[0]
    return [
        invalid("trailing garbage", enc(chunk) + b"{}", "malformed_json"),
        invalid(
            "invalid base64 payload", enc(chunk, payload="***not base64***"), "invalid_base64", "$.payload"
        ),
        invalid("base64 without padding", enc(chunk, payload="AAA"), "invalid_base64", "$.payload"),
        invalid("invalid base64 utterance", enc(utt, audio="%%%"), "invalid_base64", "$.audio"),
        invalid("payload of the wrong type", enc(chunk, payload=5), "wrong_type", "$.payload"),
        invalid(
            "missing is_final",
            enc({k: v for k, v in chunk.items() if k != "is_final"}),
            "missing_field",
            "$.is_final",
        ),
        invalid("negative seq", enc(chunk, seq=-1), "invalid_value", "$.seq"),
        invalid(
            "huge client timestamp",
            enc(chunk, client_timestamp_ms=10**20),
            "invalid_value",
            "$.client_timestamp_ms",
        ),
        invalid("huge sample rate", enc(utt, sample_rate=10**12), "invalid_value", "$.sample_rate"),
        invalid("float where an int belongs", enc(chunk, seq=1.5), "wrong_type", "$.seq"),
        invalid("NaN token", enc(chunk).replace(b'"seq":1', b'"seq":NaN'), "malformed_json"),
        invalid("long enum value", enc(init, mode="y" * 400), "invalid_value", "$.mode"),
        invalid("language code too long", enc(init, src_lang="x" * 33), "invalid_value", "$.src_lang"),
        invalid("languages of the wrong type", enc(init, auto_langs="en"), "wrong_type", "$.auto_langs"),
        invalid(
            "invalid UTF-8 in a string",
            enc(init).replace(b'"platform":"web"', b'"platform":"w\xc3\x28"'),
            "invalid_utf8",
        ),
        invalid(
            "deep nesting",
            b'{"type":"client_heartbeat","x":' + b"[" * 7000 + b"]" * 7000 + b"}",
            "too_deep",
        ),
        invalid("scheduler-to-client type", b'{"type":"translation_result"}', "unknown_type", "$.type"),
        invalid("node type on the session socket", b'{"type":"node_heartbeat"}', "unknown_type", "$.type"),
        Case(
            "another session's id", enc(chunk, session_id="s-SOMEONE"), "INVALID_SESSION", names="s-SOMEONE"
        ),
    ]


KINDS = [aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY]
SESSION_CASE_NAMES = [c.name for c in session_cases("s-X")]


async def expect_error(ws: aiohttp.ClientWebSocketResponse, case: Case) -> None:
    """The reply is the case's error: its code, reason and field; the message names the field and
    quotes no long value of the frame back."""
    msg = await ws.receive(5)
    assert msg.type is aiohttp.WSMsgType.TEXT, msg
    reply = msgspec.json.decode(msg.data)
    assert reply["type"] == "error", reply
    assert reply["code"] == case.code, reply
    details = reply.get("details") or {}
    assert (details.get("reason"), details.get("field")) == (case.reason, case.field), reply
    if case.field not in (None, "$"):
        assert case.field in reply["message"], reply
    if case.names is not None:
        assert case.names in reply["message"], reply
    assert len(reply["message"]) <= 600
    assert "x" * 100 not in reply["message"] and "y" * 100 not in reply["message"]


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
@pytest.mark.parametrize("case", COMMON_CASES + NODE_CASES, ids=lambda c: c.name)
async def test_node_refuses_hostile_frame(
    fuzz_rs: RunningScheduler, crashes: ConnectionCrashes, case: Case, kind: aiohttp.WSMsgType
) -> None:
    async with fuzz_rs.http.ws_connect(fuzz_rs.node_url) as ws:
        await ws.send_frame(case.frame, kind)
        await expect_error(ws, case)
    await settled(fuzz_rs)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
@pytest.mark.parametrize("name", [c.name for c in COMMON_CASES] + SESSION_CASE_NAMES)
async def test_session_refuses_hostile_frame(
    fuzz_rs: RunningScheduler, crashes: ConnectionCrashes, name: str, kind: aiohttp.WSMsgType
) -> None:
    async with fuzz_rs.http.ws_connect(fuzz_rs.session_url) as ws:
        await ws.send_bytes(msgspec.json.encode(session_templates("")[0]))
        sid = msgspec.json.decode((await ws.receive(5)).data)["session_id"]
        [case] = [c for c in COMMON_CASES + session_cases(sid) if c.name == name]
        await ws.send_frame(case.frame, kind)
        await expect_error(ws, case)
        assert list(fuzz_rs.state.sessions) == [sid]
        assert len(fuzz_rs.state.engine.store) == 0  # no refused frame created a job
    await settled(fuzz_rs)


async def test_node_socket_serves_after_every_hostile_frame(
    fuzz_rs: RunningScheduler, crashes: ConnectionCrashes
) -> None:
    """All the refused frames on one connection, then it registers and heartbeats like any other."""
    async with fuzz_rs.http.ws_connect(fuzz_rs.node_url) as ws:
        for case in COMMON_CASES + NODE_CASES:
            await ws.send_frame(case.frame, aiohttp.WSMsgType.BINARY)
            assert msgspec.json.decode((await ws.receive(5)).data)["code"] == case.code, case.name
        profile = NodeProfile(asr_languages=["en"], tts_languages=["en"], nmt_languages=["en"])
        await ws.send_bytes(msgspec.json.encode(profile.register_message("node-HOSTILE")))
        assert msgspec.json.decode((await ws.receive(5)).data)["type"] == "node_register_ack"
        await ws.send_bytes(hb())
        assert msgspec.json.decode((await ws.receive(5)).data)["type"] == "node_heartbeat_ack"
        assert len(fuzz_rs.state.registry) == 1
    await settled(fuzz_rs)


async def test_session_socket_serves_after_every_hostile_frame(
    fuzz_rs: RunningScheduler, crashes: ConnectionCrashes
) -> None:
    async with fuzz_rs.http.ws_connect(fuzz_rs.session_url) as ws:
        await ws.send_bytes(msgspec.json.encode(session_templates("")[0]))
        sid = msgspec.json.decode((await ws.receive(5)).data)["session_id"]
        for case in COMMON_CASES + session_cases(sid):
            await ws.send_frame(case.frame, aiohttp.WSMsgType.TEXT)
            assert msgspec.json.decode((await ws.receive(5)).data)["code"] == case.code, case.name
        assert list(fuzz_rs.state.sessions) == [sid]
        assert len(fuzz_rs.state.engine.store) == 0  # no refused frame created a job
        hb_frame = msgspec.json.encode({"type": "client_heartbeat", "session_id": sid, "timestamp": 7})
        await ws.send_bytes(hb_frame)
        assert msgspec.json.decode((await ws.receive(5)).data)["type"] == "server_heartbeat"
    await settled(fuzz_rs)


async def test_room_and_pairing_messages_are_answered_in_their_own_terms(
    fuzz_rs: RunningScheduler, crashes: ConnectionCrashes
) -> None:
    """The room and WebRTC messages the reference client sends are answered with room frames, never an
    ``error`` (the client would show it): the create with ``room_create_ack`` + ``room_members``, each
    request naming another room with ``room_error``. A pairing request of a node that did not register
    is refused naming it; both sockets serve on."""
    async with fuzz_rs.http.ws_connect(fuzz_rs.session_url) as ws:
        await ws.send_bytes(msgspec.json.encode(session_templates("")[0]))
        sid = msgspec.json.decode((await ws.receive(5)).data)["session_id"]
        create, *others = room_templates()
        await ws.send_bytes(msgspec.json.encode(create))
        ack = msgspec.json.decode((await ws.receive(5)).data)
        members = msgspec.json.decode((await ws.receive(5)).data)
        assert (ack["type"], members["type"]) == ("room_create_ack", "room_members")
        assert [m["session_id"] for m in members["members"]] == [sid]
        for doc in others:
            await ws.send_bytes(msgspec.json.encode(doc))
            reply = msgspec.json.decode((await ws.receive(5)).data)
            assert reply["type"] == "room_error", doc["type"]
            assert reply["code"] in ("ALREADY_IN_ROOM", "NOT_IN_ROOM", "ROOM_NOT_FOUND"), doc["type"]
        assert list(fuzz_rs.state.sessions) == [sid]
        await ws.send_bytes(
            msgspec.json.encode({"type": "client_heartbeat", "session_id": sid, "timestamp": 7})
        )
        assert msgspec.json.decode((await ws.receive(5)).data)["type"] == "server_heartbeat"
    async with fuzz_rs.http.ws_connect(fuzz_rs.node_url) as ws:
        await ws.send_bytes(msgspec.json.encode({"type": "request_pairing_code"}))
        reply = msgspec.json.decode((await ws.receive(5)).data)
        assert (reply["code"], reply["message"].split(":")[0]) == ("NOT_REGISTERED", "request_pairing_code")
        await ws.send_bytes(hb())
        assert msgspec.json.decode((await ws.receive(5)).data)["code"] == "NOT_REGISTERED"
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
