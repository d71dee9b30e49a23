"""The AsyncAPI documents of /ws/node and /ws/session: valid, complete, current, served, and true.

Valid: each validates against the official AsyncAPI 3.0.0 JSON Schema (tests/schemas/, no network).
Complete: every field of every message has a meaning, every error code and ``details.reason`` has one.
Current: the message reference committed in docs/protocol.md is what the generator writes now.
Served: ``/api/v1/asyncapi/{node,session}.json`` are the generated documents.
True: frames the platform's real apps sent (tests/conformance/recordings) validate against the
documented schemas, and the rules the document states beyond the types are the ones a real scheduler
enforces.
"""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest

from lingua_scheduler.errors import ErrorCode, Reason
from lingua_scheduler.protocol import asyncapi, binary_frames
from lingua_scheduler.protocol.node import NodeInbound
from lingua_scheduler.protocol.session import SessionInbound
from tests.conftest import RunningScheduler

ROOT = Path(__file__).resolve().parents[2]
ASYNCAPI_SCHEMA = ROOT / "tests" / "schemas" / "asyncapi-3.0.0.json"
RECORDINGS = ROOT / "tests" / "conformance" / "recordings"
PROTOCOL_MD = ROOT / "docs" / "protocol.md"
NAMES = sorted(asyncapi.CHANNELS)


def spec_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(ASYNCAPI_SCHEMA.read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@pytest.mark.parametrize("name", NAMES)
def test_document_validates_against_the_asyncapi_3_schema(name: str) -> None:
    errors = [
        f"{list(e.absolute_path)}: {e.message[:200]}"
        for e in spec_validator().iter_errors(asyncapi.document(name))
    ]
    assert errors == []


@pytest.mark.parametrize(
    "breaks",
    [
        lambda d: d.pop("info"),
        lambda d: d["operations"]["receive_node_register"].update(action="publish"),  # AsyncAPI 2 wording
        lambda d: d["channels"]["node"].update(servers="all"),
        lambda d: d["components"]["messages"]["node_register"].update(payload=[]),
    ],
)
def test_the_validation_catches_a_broken_document(breaks: Any) -> None:
    doc = copy.deepcopy(asyncapi.document("node"))
    breaks(doc)
    assert list(spec_validator().iter_errors(doc)) != []


def _properties(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (schema_name, prop_name, prop)
        for schema_name, schema in doc["components"]["schemas"].items()
        for prop_name, prop in schema.get("properties", {}).items()
    ]


@pytest.mark.parametrize("name", NAMES)
def test_every_field_and_message_has_a_meaning(name: str) -> None:
    doc = asyncapi.document(name)
    tags = {m["name"] for m in doc["components"]["messages"].values()}
    undescribed = [
        f"{schema}.{prop}"
        for schema, prop, body in _properties(doc)
        if not body.get("description") and not (prop == "type" and body.get("enum", [None])[0] in tags)
    ]
    assert undescribed == [], "fields without doc(...) in protocol/node.py, session.py or common.py"
    for tag, message in doc["components"]["messages"].items():
        assert message["summary"], tag
    # every message of both directions, each with an operation of the right action
    channel = asyncapi.CHANNELS[name]
    messages = doc["components"]["messages"]
    expected = {t.__struct_config__.tag for t in channel.inbound + channel.outbound}
    assert expected <= {m["name"] for m in messages.values()}
    # a message's wire name, by the key its operation refers to (a tag sent both ways has two keys)
    actions = {
        messages[op["messages"][0]["$ref"].rsplit("/", 1)[-1]]["name"]: op["action"]
        for op in doc["operations"].values()
        if op["action"] == "receive"
    }
    sends = {
        messages[op["messages"][0]["$ref"].rsplit("/", 1)[-1]]["name"]
        for op in doc["operations"].values()
        if op["action"] == "send"
    }
    assert {t.__struct_config__.tag for t in channel.inbound} == set(actions) - {asyncapi.BINARY_FRAME}
    assert {t.__struct_config__.tag for t in channel.outbound} == sends


def test_every_error_code_and_reason_has_a_meaning() -> None:
    assert set(asyncapi.ERROR_CODES) == set(ErrorCode)
    assert set(asyncapi.REASONS) == set(Reason)
    node, session = asyncapi.document("node"), asyncapi.document("session")
    assert set(node["x-invalid-message-reasons"]) == {r.value for r in Reason}
    # the error frame of each endpoint lists exactly the codes sent on it
    for doc, name in ((node, "node"), (session, "session")):
        listed = doc["components"]["messages"]["error"]["description"]
        for code, (_, where) in asyncapi.ERROR_CODES.items():
            assert (f"`{code.value}`" in listed) == (name in where), (name, code)
    assert "x-job-error-codes" in node and "MODEL_NOT_AVAILABLE" in node["x-job-error-codes"]


def test_rules_beyond_the_types_are_stated() -> None:
    node = asyncapi.document("node")
    register = node["components"]["schemas"]["NodeRegister"]
    assert "capability_schema_version" not in register["required"]  # optional in shape ...
    version = register["properties"]["capability_schema_version"]["description"]
    assert '"2.0"' in version and ErrorCode.INVALID_CAPABILITY_SCHEMA in version  # ... required by rule
    gpus = node["components"]["schemas"]["HardwareInfo"]["properties"]["gpus"]["description"]
    assert ErrorCode.NO_GPU_AVAILABLE in gpus
    channel = node["channels"]["node"]["description"]
    assert ErrorCode.INVALID_CAPABILITY_SCHEMA in channel and ErrorCode.NO_GPU_AVAILABLE in channel
    # the node id pattern is portable (no Python-only \Z)
    assert node["components"]["schemas"]["JobAck"]["properties"]["node_id"]["pattern"].endswith("]+$")
    frame = asyncapi.document("session")["components"]["messages"][asyncapi.BINARY_FRAME]
    assert frame["contentType"] == "application/octet-stream"
    # the layout table's offsets are the codec's: 12-byte chunk header, 10-byte final header
    sid = "s-1"
    chunk = binary_frames.encode_audio_frame(sid, 7, 9, True, b"\xaa\xbb")
    assert chunk[12 : 12 + len(sid)] == sid.encode() and chunk[12 + len(sid) :] == b"\xaa\xbb"
    assert binary_frames.encode_final_frame(sid, 7, 9)[10:] == sid.encode()
    assert "| 12 | N | the session id (UTF-8) |" in frame["description"]
    assert "| 10 | 1 | `is_final` (0 or 1) | the session id (N bytes, UTF-8) |" in frame["description"]


async def test_the_stated_registration_rules_are_enforced(scheduler: RunningScheduler) -> None:
    register = _recorded("register_74.jsonl", "node", "node_register")[0]  # "node" has a GPU
    documented = asyncapi.document("node")["x-error-codes"]
    cases = [
        ({**register, "capability_schema_version": None}, ErrorCode.INVALID_CAPABILITY_SCHEMA),
        ({**register, "capability_schema_version": "1.0"}, ErrorCode.INVALID_CAPABILITY_SCHEMA),
        ({**register, "hardware": {"cpu_cores": 2, "memory_gb": 24}}, ErrorCode.NO_GPU_AVAILABLE),
    ]
    async with scheduler.http.ws_connect(scheduler.node_url) as ws:
        for frame, code in cases:
            await ws.send_str(json.dumps(frame))
            answer = await ws.receive_json(timeout=5)
            assert (answer["type"], answer["code"]) == ("error", code)
            assert code in documented
        await ws.send_str(json.dumps(register))
        assert (await ws.receive_json(timeout=5))["type"] == "node_register_ack"


def test_protocol_md_holds_the_current_message_reference() -> None:
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    committed = asyncapi.generated_block(text)
    assert committed is not None, f"docs/protocol.md has no generated section: run {asyncapi.REGENERATE}"
    assert committed == asyncapi.generated_block(asyncapi.spliced(text)), (
        f"docs/protocol.md's message reference is out of date: run {asyncapi.REGENERATE}"
    )
    # the hand-written sections stay before it, untouched by the generator
    assert text.index("## Node protocol: deliberate differences") < text.index(asyncapi.BEGIN)


def test_write_replaces_only_the_generated_section(tmp_path: Path) -> None:
    md = tmp_path / "protocol.md"
    md.write_text("# Notes\n\nhand-written\n", encoding="utf-8")
    assert asyncapi.main(["--write", str(tmp_path)]) == 0
    once = md.read_text(encoding="utf-8")
    assert once.startswith("# Notes\n\nhand-written\n\n" + asyncapi.BEGIN) and once.endswith(
        asyncapi.END + "\n"
    )
    stale = once.replace("| `version` | string | yes |", "| `version` | integer | yes |", 1)
    assert stale != once
    md.write_text(stale + "\n## Later section\n", encoding="utf-8")
    assert asyncapi.main(["--write", str(tmp_path)]) == 0
    assert md.read_text(encoding="utf-8") == once + "## Later section\n"


@pytest.mark.parametrize("name", NAMES)
async def test_served_document_is_the_generated_one(scheduler: RunningScheduler, name: str) -> None:
    async with scheduler.http.get(f"{scheduler.base}/api/v1/asyncapi/{name}.json") as r:
        assert r.status == 200 and r.content_type == "application/json"
        assert await r.json() == asyncapi.document(name)


# --- real recorded frames against the documented schemas ----------------------------------------


def _recorded(file: str, who: str, message_type: str) -> list[dict[str, Any]]:
    frames = []
    for line in (RECORDINGS / file).read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        msg = event.get("msg")
        sent = event.get("who") == who and event.get("dir") == "send"
        if sent and isinstance(msg, dict) and msg.get("type") == message_type:
            frames.append(msg)
    assert frames, f"no {message_type} of {who} in {file}"
    return frames


def _unelided(payload: str) -> str:
    """A recording's ``"<N b64 chars, M bytes, head=XXXXXXXX>"`` as real base64 of M bytes with that head."""
    size = int(payload.split(" b64 chars, ")[1].split(" bytes")[0])
    head = bytes.fromhex(payload.split("head=")[1].rstrip(">"))
    data = (head + bytes(size))[:size]
    return base64.b64encode(data).decode()


def _message_validator(doc: dict[str, Any], tag: str) -> jsonschema.protocols.Validator:
    payload = doc["components"]["messages"][tag]["payload"]
    # draft 7: the schema format of AsyncAPI 3.0 payloads
    return jsonschema.Draft7Validator({**payload, "components": doc["components"]})


RECORDED = [
    ("register_74.jsonl", "node_nogpu", "node_register", NodeInbound),
    ("register_74.jsonl", "node", "node_register", NodeInbound),
    ("register_head.jsonl", "node", "node_register", NodeInbound),
    ("register_74.jsonl", "node", "node_heartbeat", NodeInbound),
    ("session_74_defaults.jsonl", "web", "session_init", SessionInbound),
    ("session_head_defaults.jsonl", "web", "audio_chunk", SessionInbound),
    ("ttsmsgs_head.jsonl", "web", "tts_play_ended", SessionInbound),
    ("rooms_74.jsonl", "webA", "room_create", SessionInbound),
    ("rooms_head.jsonl", "webA", "room_create", SessionInbound),
    ("rooms_74.jsonl", "webB", "room_join", SessionInbound),
    ("rooms_head.jsonl", "webB", "room_join", SessionInbound),
    ("rooms_74.jsonl", "webB", "webrtc_offer", SessionInbound),
    ("rooms_head.jsonl", "webB", "webrtc_ice", SessionInbound),
    ("rooms_74.jsonl", "webB", "room_raw_voice_preference", SessionInbound),
    ("pairing_74.jsonl", "node", "request_pairing_code", NodeInbound),
]


@pytest.mark.parametrize(("file", "who", "message_type", "union"), RECORDED)
def test_recorded_frames_validate_against_the_document(
    file: str, who: str, message_type: str, union: Any
) -> None:
    channel = "node" if union is NodeInbound else "session"
    validator = _message_validator(asyncapi.document(channel), message_type)
    frames = _recorded(file, who, message_type)
    for frame in frames[:3]:
        if isinstance(frame.get("payload"), str) and frame["payload"].startswith("<"):
            frame = {**frame, "payload": _unelided(frame["payload"])}
        errors = [f"{list(e.absolute_path)}: {e.message[:200]}" for e in validator.iter_errors(frame)]
        assert errors == [], frame.get("type")
        msgspec.json.decode(json.dumps(frame), type=union)  # and the decoder agrees


def test_an_invalid_frame_fails_the_documented_schema() -> None:
    """The message schemas refuse what the decoder refuses (the validation above can fail)."""
    doc = asyncapi.document("node")
    register = _recorded("register_74.jsonl", "node", "node_register")[0]
    validator = _message_validator(doc, "node_register")
    for bad in (
        {**register, "hardware": {"cpu_cores": -1, "memory_gb": 24}},
        {**register, "node_id": "bad id\n"},
        {k: v for k, v in register.items() if k != "platform"},
    ):
        assert list(validator.iter_errors(bad)) != []
        with pytest.raises(msgspec.ValidationError):
            msgspec.json.decode(json.dumps(bad), type=NodeInbound)
