"""The codec's reading of decode failures: reasons and field paths in our terms, whatever the JSON
library's wording. Each case is its own test, so a change of the library fails the one it affects."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
import msgspec.inspect
import pytest

from lingua_scheduler.errors import InvalidField, ProtocolError, Reason
from lingua_scheduler.protocol.codec import MISSING, FrameDecoder, explain
from lingua_scheduler.protocol.node import NodeInbound

NODE = msgspec.inspect.type_info(NodeInbound)
HEARTBEAT: dict[str, Any] = {
    "type": "node_heartbeat",
    "node_id": "n-1",
    "timestamp": 1,
    "resource_usage": {"cpu_percent": 10.0, "mem_percent": 10.0, "running_jobs": 0},
    "installed_services": [],
}


def with_usage(**usage: Any) -> dict[str, Any]:
    return {**HEARTBEAT, "resource_usage": {**HEARTBEAT["resource_usage"], **usage}}


def reworded(path: str | None) -> msgspec.ValidationError:
    """A validation error as some other version of the library might word it: only the path suffix,
    which the codec reads, is kept."""
    return msgspec.ValidationError("a wording no version used" + (f" - at `{path}`" if path else ""))


@pytest.mark.parametrize(
    ("document", "path", "reason", "field"),
    [
        pytest.param(with_usage(cpu_percent="x"), "$.resource_usage.cpu_percent", "wrong_type",
                     "$.resource_usage.cpu_percent", id="wrong type"),
        pytest.param(with_usage(cpu_percent=101.0), "$.resource_usage.cpu_percent", "invalid_value",
                     "$.resource_usage.cpu_percent", id="over the bound"),
        pytest.param(with_usage(running_jobs=-1), "$.resource_usage.running_jobs", "invalid_value",
                     "$.resource_usage.running_jobs", id="negative count"),
        pytest.param({k: v for k, v in HEARTBEAT.items() if k != "timestamp"}, None, "missing_field",
                     "$.timestamp", id="missing field"),
        pytest.param({**HEARTBEAT, "resource_usage": {"cpu_percent": 1.0}}, "$.resource_usage",
                     "missing_field", "$.resource_usage.mem_percent", id="missing nested field"),
        pytest.param({"type": "bogus"}, "$.type", "unknown_type", "$.type", id="unknown type"),
        pytest.param({"type": 5}, "$.type", "wrong_type", "$.type", id="type not a string"),
        pytest.param({"node_id": "x"}, None, "missing_field", "$.type", id="missing type"),
        pytest.param([1, 2], None, "wrong_type", "$", id="not an object"),
        pytest.param({**HEARTBEAT, "node_id": "../x"}, "$.node_id", "invalid_value", "$.node_id",
                     id="pattern"),
        pytest.param({**HEARTBEAT, "installed_services": [5]}, "$.installed_services[0]", "wrong_type",
                     "$.installed_services[0]", id="array item"),
    ],
)  # fmt: skip
def test_reason_and_field_do_not_depend_on_the_wording(
    document: Any, path: str | None, reason: str, field: str
) -> None:
    problem = explain(reworded(path), document, NODE)
    assert (problem.reason, problem.field) == (reason, field)
    if field != "$":
        assert field in problem.message


def test_a_number_too_large_to_read_is_out_of_range() -> None:
    path = "$.resource_usage.cpu_percent"
    problem = explain(reworded(path), MISSING, NODE, unreadable="$[...][...]")
    assert (problem.reason, problem.field, problem.detail) == ("invalid_value", path, "number out of range")


class Probabilities(msgspec.Struct):
    by_language: dict[str, float]


def test_a_value_under_some_dict_key_is_reported_at_its_path() -> None:
    document = {"by_language": {"en": "high"}}
    with pytest.raises(msgspec.ValidationError) as exc:
        msgspec.convert(document, Probabilities)
    problem = explain(exc.value, document, msgspec.inspect.type_info(Probabilities))
    assert (problem.reason, problem.field) == ("invalid_value", "$.by_language[...]")


class Limits(msgspec.Struct, forbid_unknown_fields=True):
    low: int = 0
    high: Annotated[int, msgspec.Meta(le=10)] = 10

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise InvalidField("low", "must be <= high")


class Outer(msgspec.Struct, forbid_unknown_fields=True):
    limits: Limits = msgspec.field(default_factory=Limits)


@pytest.mark.parametrize(
    ("document", "reason", "field", "detail"),
    [
        pytest.param({"limits": {"low": 5, "high": 1}}, "invalid_value", "$.limits.low", "must be <= high",
                     id="a struct's own check"),
        pytest.param({"limits": {"nope": 1}}, "unknown_field", "$.limits.nope", "not allowed", id="unknown"),
        pytest.param({"limits": {"high": 11}}, "invalid_value", "$.limits.high", "must be <= 10",
                     id="declared bound"),
        pytest.param({"limits": {"high": "x"}}, "wrong_type", "$.limits.high",
                     "expected an integer, got a string", id="wrong type"),
    ],
)  # fmt: skip
def test_structs_checks_are_reported_at_their_field(
    document: dict[str, Any], reason: str, field: str, detail: str
) -> None:
    with pytest.raises(msgspec.ValidationError) as exc:
        msgspec.convert(document, Outer)
    problem = explain(exc.value, document, msgspec.inspect.type_info(Outer))
    assert (problem.reason, problem.field, problem.detail) == (reason, field, detail)


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        pytest.param(b'{"type":"node_error","message":"\xff"}', Reason.INVALID_UTF8, id="invalid UTF-8"),
        pytest.param(b'{"type":', Reason.MALFORMED_JSON, id="truncated"),
        pytest.param(b"[" * 5000 + b"]" * 5000, Reason.TOO_DEEP, id="deep"),
    ],
)
def test_unreadable_frames(frame: bytes, reason: Reason) -> None:
    with pytest.raises(ProtocolError) as exc:
        FrameDecoder[Any](NodeInbound, max_bytes=1 << 20).decode(frame)
    assert (exc.value.reason, exc.value.field) == (reason, "$")
    assert exc.value.details == {"reason": reason, "field": "$"}
