"""Hostile frames for the fuzz tests of ``/ws/node`` and ``/ws/session``, and a client that sends them.

``FrameFuzzer`` draws frames from a ``random.Random`` (a seeded one in the bounded soak, one controlled by
hypothesis in the property tests): valid messages of the endpoint's protocol, the same messages mutated
(fields dropped, values replaced by wrong types, huge or negative numbers, long strings, deep nesting,
unknown types), their JSON bytes corrupted (truncated, NaN/Infinity tokens, invalid UTF-8, garbage
inserted) and plain random bytes; as TEXT or BINARY frames, now and then over the frame size limits.

``FuzzClient`` sends them over a real WebSocket and checks every reply: each is a JSON object with a
``type``, and each ``error`` carries a known code and a message of bounded length. ``probe()`` proves the
connection's task still serves (it answers a known-bad frame with the expected error).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import logging
import random
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import msgspec
import pytest

from lingua_scheduler.errors import ErrorCode, Reason
from lingua_scheduler.protocol.node import NodeHeartbeat, ResourceUsage
from lingua_scheduler.sim.profiles import NodeProfile
from tests.conftest import RunningScheduler, eventually

Endpoint = Literal["node", "session"]

NODE_TAGS = [
    "node_register",
    "node_heartbeat",
    "node_error",
    "job_ack",
    "job_started",
    "job_result",
    "asr_partial",
    "request_pairing_code",
]
SESSION_TAGS = [
    "session_init",
    "audio_chunk",
    "utterance",
    "client_heartbeat",
    "tts_play_ended",
    "session_close",
    "room_create",
    "room_join",
    "room_leave",
    "room_raw_voice_preference",
    "webrtc_offer",
    "webrtc_answer",
    "webrtc_ice",
]
JOB_TAGS = frozenset({"job_ack", "job_started", "job_result", "asr_partial"})
OUTBOUND_TAGS = ["node_register_ack", "job_assign", "translation_result", "session_init_ack", "error"]
KNOWN_CODES = frozenset(c.value for c in ErrorCode)
KNOWN_REASONS = frozenset(r.value for r in Reason)
#: the probe frame and the error it must get: a JSON array where an object is expected
PROBE = b"[]"
PROBE_DETAILS = {"reason": "wrong_type", "field": "$"}
#: errors are capped at 512 characters by the codec; other producers (limits, sessions) are shorter
MAX_ERROR_MESSAGE = 600

_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder()

# Values a hostile peer puts where something else belongs.
HOSTILE_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**31,
    2**53 + 1,
    2**63,
    -(2**63) - 1,
    10**30,
    -(10**30),
    1.5,
    -0.0,
    1e308,
    -1e308,
    5e-324,
    "",
    " ",
    "x" * 300,
    "auto",
    "\u0000",
    "\u202e\u200b",
    "😀" * 50,
    "../../etc/passwd",
    "***not base64***",
    "AAA=",
    [],
    {},
    [1, "a", None],
    {"a": {"b": {"c": []}}},
]


def hostile(rng: random.Random) -> Any:
    """One of ``HOSTILE_VALUES``, copied: mutations must never reach the shared list."""
    return copy.deepcopy(rng.choice(HOSTILE_VALUES))


def _b64(n: int) -> str:
    return base64.b64encode(bytes(i & 0xFF for i in range(n))).decode()


def node_templates(node_id: str) -> list[dict[str, Any]]:
    profile = NodeProfile(asr_languages=["en", "zh"], tts_languages=["en", "zh"], nmt_languages=["en", "zh"])
    register = msgspec.to_builtins(profile.register_message(node_id))
    heartbeat = msgspec.to_builtins(
        NodeHeartbeat(
            node_id=node_id,
            timestamp=1_700_000_000_000,
            resource_usage=ResourceUsage(cpu_percent=10.0, mem_percent=20.0, running_jobs=0),
            installed_services=profile.services(),
            capability_by_type=profile.capability_by_type(),
            language_capabilities=profile.languages(),
        )
    )
    ids = {"job_id": "job-FUZZ", "attempt_id": 1, "node_id": node_id, "session_id": "s-FUZZ", "trace_id": "t"}
    return [
        register,
        heartbeat,
        {"type": "node_error", "node_id": node_id, "code": "X", "message": "m", "details": {"k": [1, 2]}},
        {"type": "job_ack", **ids},
        {"type": "job_started", **ids},
        {
            "type": "job_result",
            **ids,
            "utterance_index": 0,
            "success": True,
            "text_asr": "a",
            "text_translated": "b",
            "tts_audio": "AAAA",
            "extra": {"service_timings": {"asr_ms": 1}, "language_probabilities": {"en": 0.9}},
            "error": {"code": "MODEL_NOT_AVAILABLE", "message": "m", "details": {"service_id": "x"}},
            "segments_meta": {"count": 1},
        },
        {
            "type": "asr_partial",
            "job_id": "job-FUZZ",
            "node_id": node_id,
            "session_id": "s-FUZZ",
            "utterance_index": 0,
            "text": "t",
            "is_final": False,
            "trace_id": "t",
            "attempt_id": 1,
        },
        {"type": "request_pairing_code"},
    ]


def session_templates(session_id: str) -> list[dict[str, Any]]:
    return [
        {
            "type": "session_init",
            "client_version": "fuzz",
            "platform": "web",
            "src_lang": "en",
            "tgt_lang": "zh",
            "mode": "one_way",
            "auto_langs": ["en", "zh"],
            "features": {"emotion_detection": True},
            "audio_format": "pcm16",
            "sample_rate": 16000,
        },
        {
            "type": "audio_chunk",
            "session_id": session_id,
            "seq": 1,
            "is_final": False,
            "payload": _b64(640),
            "client_timestamp_ms": 1,
        },
        {"type": "audio_chunk", "session_id": session_id, "seq": 2, "is_final": True, "payload": _b64(320)},
        {
            "type": "utterance",
            "session_id": session_id,
            "utterance_index": 0,
            "manual_cut": True,
            "src_lang": "en",
            "tgt_lang": "zh",
            "audio": _b64(1600),
            "audio_format": "pcm16",
            "sample_rate": 16000,
            "pipeline": {"use_asr": True, "use_nmt": True, "use_tts": False},
        },
        {"type": "client_heartbeat", "session_id": session_id, "timestamp": 1},
        {
            "type": "tts_play_ended",
            "session_id": session_id,
            "trace_id": "t",
            "group_id": "g",
            "ts_end_ms": 1,
        },
        {"type": "session_close", "session_id": session_id, "reason": "fuzz"},
        *room_templates(),
    ]


def room_templates() -> list[dict[str, Any]]:
    """The room and WebRTC messages, as the reference web client sends them."""
    return [
        {"type": "room_create", "client_ts": 1, "display_name": "A", "preferred_lang": "en"},
        {"type": "room_join", "room_code": "123456", "display_name": "B", "preferred_lang": "zh"},
        {"type": "room_leave", "room_code": "123456"},
        {
            "type": "room_raw_voice_preference",
            "room_code": "123456",
            "target_session_id": "s-OTHER",
            "receive_raw_voice": False,
        },
        {
            "type": "webrtc_offer",
            "room_code": "123456",
            "to": "s-OTHER",
            "sdp": {"type": "offer", "sdp": "v=0"},
        },
        {
            "type": "webrtc_answer",
            "room_code": "123456",
            "to": "s-OTHER",
            "sdp": {"type": "answer", "sdp": "v=0"},
        },
        {
            "type": "webrtc_ice",
            "room_code": "123456",
            "to": "s-OTHER",
            "candidate": {"candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host", "sdpMid": "0"},
        },
    ]


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths to the values inside ``value`` (dict keys and list indices), down to 12 levels."""
    out: list[tuple[Any, ...]] = []
    if len(prefix) >= 12:  # below that it is one of our own deep nestings: nothing new to mutate
        return out
    if isinstance(value, dict):
        for k, v in value.items():
            out.append((*prefix, k))
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.append((*prefix, i))
            out.extend(_paths(v, (*prefix, i)))
    return out


def _parent(doc: Any, path: tuple[Any, ...]) -> Any:
    for p in path[:-1]:
        doc = doc[p]
    return doc


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"n": value}
    return value


@dataclass
class Frame:
    data: bytes
    binary: bool = False
    #: what the fuzzer did (shown when a check fails)
    how: str = ""
    #: over the frame limit: the WebSocket layer closes the connection (1009) at its header, on purpose
    closes: bool = False


@dataclass
class FrameFuzzer:
    endpoint: Endpoint
    rng: random.Random
    max_frame: int
    node_id: str = "node-FUZZ0001"
    session_id: str = "s-FUZZ0001"
    #: probability of an oversized frame (over the limit: the socket is closed with 1009)
    oversize: float = 0.02
    #: job_assign messages this node connection received: job messages then often carry their real ids,
    #: so fuzzed acks and results reach the job state machine instead of stopping at "unknown job"
    jobs: list[dict[str, Any]] = field(default_factory=list)
    templates: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.endpoint == "node":
            self.templates = node_templates(self.node_id)
        else:
            self.templates = session_templates(self.session_id)

    def next(self) -> Frame:
        frame = self._next()
        frame.closes = len(frame.data) > self.max_frame
        return frame

    def _next(self) -> Frame:
        rng = self.rng
        roll = rng.random()
        if roll < self.oversize:
            return self._oversized()
        if roll < 0.15:
            return self._valid()
        if roll < 0.65:
            return self._mutated()
        if roll < 0.85:
            return self._corrupted()
        if roll < 0.95:
            return self._random_json()
        n = rng.choice([0, 1, 2, 16, 200, 3000])
        return Frame(rng.randbytes(n), binary=rng.random() < 0.5, how=f"random {n} bytes")

    # --- kinds of frames ----------------------------------------------------------------------------

    def _template(self) -> dict[str, Any]:
        doc: dict[str, Any] = copy.deepcopy(self.rng.choice(self.templates))
        if self.jobs and doc["type"] in JOB_TAGS and self.rng.random() < 0.7:
            job = self.rng.choice(self.jobs)
            for key in ("job_id", "attempt_id", "session_id", "utterance_index", "trace_id"):
                if key in doc:
                    doc[key] = job[key]
        return doc

    def _valid(self) -> Frame:
        doc = self._template()
        return Frame(_enc.encode(doc), binary=self.rng.random() < 0.1, how=f"valid {doc['type']}")

    def _mutated(self) -> Frame:
        rng = self.rng
        doc = self._template()
        steps = []
        for _ in range(rng.randint(1, 3)):
            paths = _paths(doc)
            op = rng.choice(["drop", "replace", "replace", "retag", "unknown_field", "deepen"])
            if op == "drop" and paths:
                path = rng.choice(paths)
                parent = _parent(doc, path)
                if isinstance(parent, dict):
                    parent.pop(path[-1], None)
                steps.append(f"drop {path}")
            elif op == "replace" and paths:
                path = rng.choice(paths)
                value = hostile(rng)
                _parent(doc, path)[path[-1]] = value
                steps.append(f"{path}={str(value)[:20]!r}")
            elif op == "retag":
                tag = rng.choice(NODE_TAGS + SESSION_TAGS + OUTBOUND_TAGS + ["", "x" * 200, "NODE_REGISTER"])
                doc["type"] = tag
                steps.append(f"type={tag[:20]}")
            elif op == "unknown_field":
                doc[rng.choice(["extra", "__proto__", "constructor", "type2"])] = hostile(rng)
                steps.append("unknown field")
            elif op == "deepen" and paths:
                path = rng.choice(paths)
                depth = rng.choice([10, 100, 600])  # under and near the decoder's recursion limit
                _parent(doc, path)[path[-1]] = nested(depth)
                steps.append(f"nest {path} x{depth}")
        try:
            data = _enc.encode(doc)
        except RecursionError:  # nestings stacked past what we can write: send a deep frame directly
            data = b'{"type":"node_error","details":' + b"[" * 2000 + b"]" * 2000 + b"}"
        return Frame(data, binary=rng.random() < 0.1, how="mutated: " + "; ".join(steps))

    def _corrupted(self) -> Frame:
        rng = self.rng
        data = bytearray(_enc.encode(self._template()))
        op = rng.choice(["truncate", "nan", "utf8", "insert", "flip", "deep", "wrap", "bom", "trailing"])
        if op == "truncate":
            del data[rng.randrange(len(data)) :]
        elif op == "nan":
            token = rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"9" * 400, b"0x10"])
            i = data.find(b":", rng.randrange(len(data)))
            if i >= 0:
                end = i + 1
                while end < len(data) and data[end : end + 1] not in (b",", b"}", b"]"):
                    end += 1
                data[i + 1 : end] = token
        elif op == "utf8":
            bad = rng.choice(
                [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\xe2\x82"]
            )
            i = data.find(b'":"', rng.randrange(len(data)))
            at = i + 3 if i >= 0 else rng.randrange(len(data))
            data[at:at] = bad
        elif op == "insert":
            at = rng.randrange(len(data))
            data[at:at] = rng.randbytes(rng.randint(1, 8))
        elif op == "flip":
            at = rng.randrange(len(data))
            data[at] ^= 1 << rng.randrange(8)
        elif op == "deep":
            depth = rng.choice([1000, 5000, 100_000])
            data = bytearray(b"[" * depth + bytes(data) + b"]" * depth)
        elif op == "wrap":
            data = bytearray(b"[" + bytes(data) + b"]")
        elif op == "bom":
            data[0:0] = b"\xef\xbb\xbf"
        elif op == "trailing":
            data += rng.choice([b" x", b"{}", b"\x00", b"]"])
        return Frame(bytes(data), binary=rng.random() < 0.2, how=f"corrupted: {op}")

    def _random_json(self) -> Frame:
        rng = self.rng

        def value(depth: int) -> Any:
            if depth > 3 or rng.random() < 0.4:
                return hostile(rng)
            if rng.random() < 0.5:
                return [value(depth + 1) for _ in range(rng.randint(0, 4))]
            return {
                rng.choice(["type", "node_id", "session_id", "a", ""]): value(depth + 1) for _ in range(3)
            }

        doc = value(0)
        if isinstance(doc, dict) and rng.random() < 0.7:
            doc["type"] = rng.choice(NODE_TAGS + SESSION_TAGS)
        return Frame(_enc.encode(doc), how="random json")

    def _oversized(self) -> Frame:
        rng = self.rng
        factor = rng.choice([1.01, 2, 4.5])  # over the limit the WebSocket layer closes the connection
        pad = "a" * int(self.max_frame * factor)
        doc = self._template()
        doc["pad"] = pad
        return Frame(_enc.encode(doc), how=f"oversized x{factor}")


class ProtocolViolation(AssertionError):
    pass


class FuzzClient:
    """One fuzzing connection: sends frames, checks every reply, reconnects when the server closed."""

    def __init__(
        self, http: aiohttp.ClientSession, url: str, endpoint: Endpoint, node_id: str = "node-FUZZ0001"
    ) -> None:
        self.http = http
        self.node_id = node_id
        self.url = url
        self.endpoint = endpoint
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        #: the last replies and the last frames sent (shown when a check fails)
        self.replies: deque[dict[str, Any]] = deque(maxlen=5)
        self.recent: deque[str] = deque(maxlen=5)
        self.codes: dict[str, int] = {}
        self.close_codes: list[int | None] = []
        self.sent = 0
        #: the last job_assign messages received (node connections)
        self.jobs: list[dict[str, Any]] = []
        self._probe: asyncio.Future[None] | None = None
        self._bound: asyncio.Future[str | None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self.last: Frame | None = None
        #: a frame that closes the connection was sent on the current connection
        self.provoked_close = False

    async def connect(self) -> None:
        self.ws = await self.http.ws_connect(self.url, max_msg_size=0)
        self.provoked_close = False
        self._reader = asyncio.create_task(self._read(self.ws))

    async def send(self, frame: Frame) -> None:
        if self.ws is None or self.ws.closed:
            await self.reconnect()
        assert self.ws is not None
        self.last = frame
        self.recent.append(f"{frame.how} ({len(frame.data)} B)")
        self.provoked_close |= frame.closes
        try:
            await self.ws.send_frame(
                frame.data, aiohttp.WSMsgType.BINARY if frame.binary else aiohttp.WSMsgType.TEXT
            )
        except (ConnectionError, RuntimeError):
            return  # closed under us (an oversized frame): reconnect on the next send
        self.sent += 1

    async def reconnect(self) -> None:
        await self.close()
        await self.connect()

    async def bind(self, timeout: float = 5.0) -> str | None:
        """Register a node / open a session on this connection with a valid message, so that the frames
        that follow also reach the paths behind the binding checks. Returns the bound id (None if the
        scheduler refused, which a fuzzed registration with the same id on another socket can cause)."""
        if self.ws is None or self.ws.closed or self.provoked_close:
            await self.reconnect()
        assert self.ws is not None
        template = node_templates(self.node_id)[0] if self.endpoint == "node" else session_templates("")[0]
        self._bound = asyncio.get_running_loop().create_future()
        await self.ws.send_bytes(_enc.encode(template))
        return await asyncio.wait_for(self._bound, timeout)

    async def probe(self, timeout: float = 5.0) -> None:
        """Prove the connection's task is alive: a known-bad frame gets its error back. A connection
        closed for a frame over the limit (1009, the one close the fuzzer provokes on purpose) is
        reopened and probed again; any other close is a failure."""
        for _ in range(2):
            if self.ws is None or self.ws.closed:
                await self.reconnect()
            assert self.ws is not None
            self._probe = asyncio.get_running_loop().create_future()
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.ws.send_bytes(PROBE)
            done, _ = await asyncio.wait(
                [self._probe, self._reader],  # type: ignore[list-item]
                timeout=timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if self._probe in done:
                return
            # closed for the oversized frame: the server's 1009, or our own 1006 when we wrote after it
            if self._reader in done and (
                self.ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG or self.provoked_close
            ):
                await self.close()
                continue
            break
        raise ProtocolViolation(
            f"{self.endpoint}: no answer to the probe (closed={self.ws.closed}, code={self.ws.close_code}, "
            f"exception={self.ws.exception()!r}, "
            f"last frames: {list(self.recent)}, last replies: {list(self.replies)})"
        )

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                raise ProtocolViolation(f"{self.endpoint}: unexpected frame type {msg.type}")
            reply = _dec.decode(msg.data)
            check_reply(reply, self.endpoint)
            self.replies.append(reply)
            bound = self._bound
            if bound is not None and not bound.done():
                if reply["type"] in ("node_register_ack", "session_init_ack"):
                    bound.set_result(reply.get("node_id") or reply.get("session_id"))
                elif reply["type"] == "error":
                    bound.set_result(None)
            if reply["type"] == "job_assign":
                self.jobs.append(
                    {
                        k: reply[k]
                        for k in ("job_id", "attempt_id", "session_id", "utterance_index", "trace_id")
                    }
                )
                del self.jobs[:-20]
            if reply["type"] == "error":
                self.codes[reply["code"]] = self.codes.get(reply["code"], 0) + 1
                if (
                    reply.get("details") == PROBE_DETAILS
                    and self._probe is not None
                    and not self._probe.done()
                ):
                    self._probe.set_result(None)
        self.close_codes.append(ws.close_code)

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            reader, self._reader = self._reader, None
            with contextlib.suppress(asyncio.CancelledError):
                await reader  # re-raises a ProtocolViolation found by the reader


def check_reply(reply: Any, endpoint: Endpoint) -> None:
    """Every frame the scheduler sends is a typed JSON object; every error has a known code and a
    message that says something and is not an echo of a huge frame; an ``INVALID_MESSAGE`` says why
    (``details.reason``) and where (``details.field``)."""
    if not isinstance(reply, dict) or not isinstance(reply.get("type"), str):
        raise ProtocolViolation(f"{endpoint}: reply is not a typed object: {str(reply)[:200]}")
    if reply["type"] == "error":
        code, message = reply.get("code"), reply.get("message")
        if code not in KNOWN_CODES:
            raise ProtocolViolation(f"{endpoint}: unknown error code {code!r}")
        if not isinstance(message, str) or not message or len(message) > MAX_ERROR_MESSAGE:
            raise ProtocolViolation(
                f"{endpoint}: bad error message ({len(message or '')} chars): {message!r:.200}"
            )
        details = reply.get("details")
        if code == ErrorCode.INVALID_MESSAGE and not (
            isinstance(details, dict)
            and details.get("reason") in KNOWN_REASONS
            and isinstance(details.get("field"), str)
            and details["field"].startswith("$")
        ):
            raise ProtocolViolation(
                f"{endpoint}: INVALID_MESSAGE without a reason and a field: {reply!r:.300}"
            )


# --- the scheduler under fuzzing, and the checks of every fuzz test ------------------------------------

MAX_FRAME = 16_384
FUZZ_CONFIG: dict[str, dict[str, Any]] = {
    "server": {"max_frame_bytes": MAX_FRAME},
    # rate limits have their own tests; here every frame must reach the decoder
    "limits": {
        "node_messages_per_second": 1e6,
        "node_message_burst": 1_000_000,
        "session_messages_per_second": 1e6,
        "session_message_burst": 1_000_000,
    },
    "jobs": {"ack_timeout_ms": 300, "pending_timeout_ms": 300, "retention_seconds": 0.2},
    "session": {"pause_ms": 100, "result_gap_timeout_ms": 500},
    "scheduler": {"fleet_view_interval_ms": 10},
}


class ConnectionCrashes(logging.Handler):
    """Collects the endpoints' "connection failed" records: a connection task that died of an exception."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(name="crashes")
def crashes_fixture() -> Iterator[ConnectionCrashes]:
    """Fails the test if a connection task died of an exception (logged by the endpoints' catch-all)."""
    handler = ConnectionCrashes()
    loggers = [
        logging.getLogger(f"lingua_scheduler.server.{m}") for m in ("node_endpoint", "session_endpoint")
    ]
    for lg in loggers:
        lg.addHandler(handler)
    yield handler
    for lg in loggers:
        lg.removeHandler(handler)
    assert not handler.records, [r.getMessage() for r in handler.records]


async def settled(rs: RunningScheduler) -> None:
    """Everything connections created is gone once they are: sockets, node bindings, sessions, jobs in
    flight or waiting, held audio. Then the core's own invariants hold."""
    state = rs.state
    store = state.engine.store
    await eventually(
        lambda: (
            state.limits.open_connections == 0
            and state.limits.nodes == 0
            and state.sessions == {}
            and store.inflight == 0
            and store.waiting == 0
            and store.audio_bytes == 0
            and not any(e.connected for e in state.registry)
        ),
        timeout=5,
    )
    store.validate()
    state.registry.validate()
