"""Decoding and encoding of wire frames, and the one place that interprets the decoder's errors.

Decoding validates types and ranges (msgspec). Every failure becomes a ``ProtocolError`` carrying a
``Reason``, the path of the field at fault (``$.resource_usage.cpu_percent``; ``$`` is the whole frame)
and a message in our own words, so that the endpoint answers ``INVALID_MESSAGE`` and keeps the
connection. The decoding library's wording is never passed on nor parsed: it changes between versions.
Of a validation error only the path it reports is used; what is wrong there is found by looking at the
value itself (the frame decoded without a schema) against the expected type (``msgspec.inspect``).
``explain`` does the same for the configuration (``config.load_config``).

Invalid UTF-8 is found by checking the bytes ourselves; nesting deeper than the interpreter's recursion
limit is refused. JSON has no NaN or Infinity and a number too large for a float is refused, so every
decoded float is finite; integer fields that may hold anything are bounded by the protocol types
(``protocol.common.SafeInt``).

Error messages never echo more than ``MAX_QUOTED`` characters of a peer's value: an unknown message type
of a megabyte is not sent back, and audio is never echoed.
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import msgspec
import msgspec.inspect as mi

from lingua_scheduler.errors import ErrorCode, InvalidField, ProtocolError, Reason

T = TypeVar("T")

_encoder = msgspec.json.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    """Serialise one outbound message to JSON bytes."""
    return _encoder.encode(message)


#: longest part of a peer's value quoted in an error message
MAX_QUOTED = 64
#: most allowed values listed in an error message
MAX_LISTED = 12
#: longest error message built from a decode failure
MAX_ERROR_MESSAGE = 512

# The path msgspec appends to a validation error (`` - at `$.a[0].b` ``), the one part of its text we
# use; ``[...]`` stands for a key of a dict.
_AT = re.compile(r" - at `(\$[^`]*)`$")
_SEGMENT = re.compile(r"\.([^.\[]+)|\[(\d+)\]|\[\.\.\.\]")


class _Missing(enum.Enum):
    MISSING = enum.auto()


#: a value the frame does not hold, or that could not be read
MISSING: Final = _Missing.MISSING


@dataclass(frozen=True, slots=True)
class Problem:
    """What was wrong with a decoded document: the reason, the field's path and a short explanation."""

    reason: Reason
    #: ``$`` for the whole document, ``$.a.b[2]`` for a field inside it
    field: str
    #: in our words, without the path: "expected an integer, got a string", "must be >= 0"
    detail: str

    @property
    def message(self) -> str:
        match self.reason:
            case Reason.MISSING_FIELD:
                text = f"missing required field {self.field}"
            case Reason.UNKNOWN_FIELD:
                text = f"unknown field {self.field}"
            case Reason.WRONG_TYPE:
                text = f"wrong type at {self.field}: {self.detail}"
            case Reason.INVALID_VALUE:
                text = f"invalid value at {self.field}: {self.detail}"
            case _:
                text = self.detail
        return _cap(text)


def _cap(text: str) -> str:
    return text if len(text) <= MAX_ERROR_MESSAGE else text[: MAX_ERROR_MESSAGE - 3] + "..."


def _quote(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= MAX_QUOTED:
        return f"'{text}'"
    return f"'{text[:MAX_QUOTED]}...' ({len(text)} characters)"


def _listed(values: list[Any]) -> str:
    shown = ", ".join(_quote(v) for v in values[:MAX_LISTED])
    return shown + (f" and {len(values) - MAX_LISTED} more" if len(values) > MAX_LISTED else "")


# --- the expected type, walked along the path ------------------------------------------------------


def _members(t: mi.Type) -> tuple[mi.Type, ...]:
    while isinstance(t, mi.Metadata):
        t = t.type
    if isinstance(t, mi.UnionType):
        return tuple(m for u in t.types for m in _members(u))
    return (t,)


def _tagged(t: mi.Type) -> tuple[str, dict[Any, mi.StructType]] | None:
    """The tag field and the tagged structs of a union of tagged structs (the message types)."""
    structs = [m for m in _members(t) if isinstance(m, mi.StructType) and m.tag_field is not None]
    if not structs:
        return None
    return str(structs[0].tag_field), {s.tag: s for s in structs}


_ARRAYS = (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType, mi.TupleType)


def _kind_ok(t: mi.Type, value: Any) -> bool:
    """The value is of a JSON kind the type can hold (its constraints aside)."""
    for m in _members(t):
        if isinstance(m, mi.AnyType):
            return True
        if isinstance(m, mi.NoneType):
            ok = value is None
        elif isinstance(m, mi.BoolType):
            ok = isinstance(value, bool)
        elif isinstance(m, mi.IntType):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(m, mi.FloatType):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        elif isinstance(m, mi.EnumType | mi.LiteralType):
            ok = any(type(v) is type(value) for v in _allowed(m))
        elif isinstance(m, _ARRAYS):
            ok = isinstance(value, list)
        elif isinstance(m, mi.DictType | mi.TypedDictType | mi.DataclassType):
            ok = isinstance(value, dict)
        elif isinstance(m, mi.StructType):
            ok = isinstance(value, list) if m.array_like else isinstance(value, dict)
        elif isinstance(m, mi.StrType | mi.BytesType | mi.ByteArrayType):
            ok = isinstance(value, str)
        else:
            return True  # a type this interpreter does not model: do not claim a wrong type
        if ok:
            return True
    return False


def _allowed(t: mi.EnumType | mi.LiteralType) -> list[Any]:
    if isinstance(t, mi.LiteralType):
        return list(t.values)
    return [m.value for m in t.cls]


def _describe(t: mi.Type) -> str:
    """The expected type in words: "an integer", "a string or null"."""
    words: list[str] = []
    for m in _members(t):
        if isinstance(m, mi.NoneType):
            w = "null"
        elif isinstance(m, mi.BoolType):
            w = "true or false"
        elif isinstance(m, mi.IntType):
            w = "an integer"
        elif isinstance(m, mi.FloatType):
            w = "a number"
        elif isinstance(m, mi.StrType):
            w = "a string"
        elif isinstance(m, mi.EnumType | mi.LiteralType):
            w = "a string" if all(isinstance(v, str) for v in _allowed(m)) else "a value"
        elif isinstance(m, mi.BytesType | mi.ByteArrayType):
            w = "a base64 string"
        elif isinstance(m, _ARRAYS) or (isinstance(m, mi.StructType) and m.array_like):
            w = "an array"
        elif isinstance(m, mi.DictType | mi.TypedDictType | mi.DataclassType | mi.StructType):
            w = "an object"
        else:
            w = "a value"
        if w not in words:
            words.append(w)
    return " or ".join(words)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _constraint(t: mi.Type, value: Any) -> str:
    """Why a value of the right kind is refused, from the type's declared constraints."""
    for m in _members(t):
        if not _kind_ok(m, value):
            continue
        if isinstance(m, mi.IntType | mi.FloatType):
            bounds = [
                f"{op} {b}"
                for op, b in (
                    (">", m.gt),
                    (">=", m.ge),
                    ("<", m.lt),
                    ("<=", m.le),
                    ("a multiple of", m.multiple_of),
                )
                if b is not None
            ]
            return ("must be " + " and ".join(bounds)) if bounds else "number out of range"
        if isinstance(m, mi.StrType):
            rules = [
                rule
                for rule, present in (
                    (f"be at least {_characters(m.min_length)} long", m.min_length is not None),
                    (f"be at most {_characters(m.max_length)} long", m.max_length is not None),
                    (f"match the pattern {m.pattern}", m.pattern is not None),
                )
                if present
            ]
            if rules:
                return "must " + " and ".join(rules)
        if isinstance(m, mi.EnumType | mi.LiteralType):
            return f"must be one of: {_listed(_allowed(m))}"
        if isinstance(m, mi.ListType | mi.SetType | mi.FrozenSetType | mi.VarTupleType | mi.DictType):
            limits = [
                f"{word} {n} items"
                for word, n in (("at least", m.min_length), ("at most", m.max_length))
                if n is not None
            ]
            if limits:
                return "must hold " + " and ".join(limits)
    return "value not accepted"


def _characters(n: int | None) -> str:
    return f"{n} character" if n == 1 else f"{n} characters"


def _segments(path: str) -> list[str | int | None]:
    """``$.a[0][...]`` -> ``["a", 0, None]`` (None: some key of a dict)."""
    out: list[str | int | None] = []
    for m in _SEGMENT.finditer(path[1:]):
        out.append(m.group(1) if m.group(1) is not None else int(m.group(2)) if m.group(2) else None)
    return out


def _shape(path: str) -> list[int | None]:
    return [seg if isinstance(seg, int) else None for seg in _segments(path)]


def _resolve(t: mi.Type, value: Any) -> mi.Type | None:
    """The member of a union this value is meant for (by tag, then by kind); None if none fits."""
    members = _members(t)
    tagged = _tagged(t)
    if tagged is not None and isinstance(value, dict):
        tag_field, by_tag = tagged
        tag = value.get(tag_field, MISSING)
        if tag is not MISSING:
            return by_tag.get(tag)
    for m in members:
        if _kind_ok(m, value):
            return m
    return None


def _step(t: mi.Type, value: Any, seg: str | int | None) -> tuple[mi.Type | None, Any]:
    """One segment down: the type and the value there (``MISSING`` when the value is not known)."""
    if isinstance(t, mi.StructType) and isinstance(seg, str):
        fields = {f.encode_name: f for f in t.fields}
        field = fields.get(seg)
        inner = value.get(seg, MISSING) if isinstance(value, dict) else MISSING
        return (field.type if field is not None else None), inner
    if isinstance(t, mi.DictType):
        inner = value.get(seg, MISSING) if isinstance(value, dict) and isinstance(seg, str) else MISSING
        return t.value_type, inner
    if isinstance(seg, int):
        inner = value[seg] if isinstance(value, list) and seg < len(value) else MISSING
        if isinstance(t, mi.ListType | mi.SetType | mi.FrozenSetType | mi.VarTupleType):
            return t.item_type, inner
        if isinstance(t, mi.TupleType) and seg < len(t.item_types):
            return t.item_types[seg], inner
    return None, MISSING


def _join(path: str, name: str) -> str:
    return f"{path}.{name}"


def _tag_problem(t: mi.Type, value: Any, seg: str | int | None, at: str) -> Problem | None:
    """The path goes through the ``type`` tag of a union of messages: the tag is what is wrong."""
    tagged = _tagged(t)
    if tagged is None or seg != tagged[0] or not isinstance(value, dict):
        return None
    field = _join(at, seg)
    tag = value.get(seg, MISSING)
    if not isinstance(tag, str):
        return Problem(Reason.WRONG_TYPE, field, f"expected a string, got {_kind(tag)}")
    if tag in tagged[1]:
        return None
    tags = ", ".join(str(k) for k in tagged[1])
    return Problem(
        Reason.UNKNOWN_TYPE, field, f"unknown message type {_quote(tag)} at {field} (expected one of: {tags})"
    )


def error_path(exc: msgspec.ValidationError) -> str:
    """The path of the value a validation error refused (``$`` when it names none)."""
    found = _AT.search(str(exc))
    return found.group(1) if found else "$"


def explain(
    exc: msgspec.ValidationError, document: Any, expected: mi.Type, unreadable: str | None = None
) -> Problem:
    """What a validation error means, in our terms.

    ``document`` is what was validated, decoded without a schema (``MISSING`` if it could not be),
    ``expected`` the type it was validated against (``msgspec.inspect.type_info``); ``unreadable`` is
    the path of the number that even the schemaless decoding refused (out of range for any number).
    The error's path locates the field; the value there, read against the expected type, says what
    is wrong."""
    path = error_path(exc)
    # a schemaless decoding names every object key ``[...]``: compare the paths' shapes
    if unreadable is not None and _shape(unreadable) == _shape(path):
        return Problem(Reason.INVALID_VALUE, path, "number out of range")
    cause = exc.__cause__
    if isinstance(cause, InvalidField):
        # a struct's own check (``__post_init__``) named its field and said why, in our words
        return Problem(Reason.INVALID_VALUE, _join(path, cause.field), cause.reason)
    t: mi.Type | None = expected
    value: Any = document
    walked = "$"
    for seg in _segments(path):
        if t is None:
            break
        tag_problem = _tag_problem(t, value, seg, walked)
        if tag_problem is not None:
            return tag_problem
        if value is MISSING:
            resolved = _members(t)[0] if len(_members(t)) == 1 else None
        else:
            resolved = _resolve(t, value)
        if resolved is None:
            t = None
            break
        t, value = _step(resolved, value, seg)
        walked += f"[{seg}]" if isinstance(seg, int) else "[...]" if seg is None else f".{seg}"
    if t is None:
        return Problem(Reason.INVALID_VALUE, path, "value not accepted")
    if value is MISSING:
        # not found in the document (a value under some key of a dict): the path is all we know
        return Problem(Reason.INVALID_VALUE, path, "value not accepted")
    tagged = _tagged(t)
    if tagged is not None and isinstance(value, dict) and tagged[0] not in value:
        return Problem(Reason.MISSING_FIELD, _join(path, tagged[0]), "required")
    resolved = _resolve(t, value)
    if resolved is None:
        return Problem(Reason.WRONG_TYPE, path, f"expected {_describe(t)}, got {_kind(value)}")
    if isinstance(resolved, mi.StructType) and isinstance(value, dict):
        for f in resolved.fields:
            if f.required and f.encode_name not in value:
                return Problem(Reason.MISSING_FIELD, _join(path, f.encode_name), "required")
        if resolved.forbid_unknown_fields:
            known = {f.encode_name for f in resolved.fields} | {resolved.tag_field}
            for key in value:
                if key not in known:
                    return Problem(Reason.UNKNOWN_FIELD, _join(path, str(key)), "not allowed")
        if cause is not None:
            # a struct's own check that named no field: its text is ours
            return Problem(Reason.INVALID_VALUE, path, str(cause))
    return Problem(Reason.INVALID_VALUE, path, _constraint(resolved, value))


# --- frames ----------------------------------------------------------------------------------------


def _unreadable(data: str | bytes) -> ProtocolError:
    """A frame that is not one JSON value: invalid UTF-8 (checked here), or malformed JSON."""
    if isinstance(data, bytes | bytearray | memoryview):
        try:
            bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            return ProtocolError(
                f"text is not valid UTF-8 (byte {exc.start})", reason=Reason.INVALID_UTF8, field="$"
            )
    return ProtocolError(
        "malformed JSON: the frame is not one complete JSON value", reason=Reason.MALFORMED_JSON, field="$"
    )


def _too_deep() -> ProtocolError:
    return ProtocolError("JSON nested too deeply", reason=Reason.TOO_DEEP, field="$")


class FrameDecoder(Generic[T]):
    """Decodes text frames into one of the protocol's message types; refuses frames over ``max_bytes``."""

    __slots__ = ("_decoder", "_type", "max_bytes")

    def __init__(self, message_type: Any, max_bytes: int) -> None:
        # One decoder per message type for the process: every connection makes a FrameDecoder, and
        # building a msgspec decoder and the type's description took ~20 ms per connection (1,000
        # nodes registering spent 20 s of the event loop in it). Decoders are stateless.
        self._decoder: msgspec.json.Decoder[T] = _shared_decoder(message_type)
        self._type = message_type
        self.max_bytes = max_bytes

    def decode(self, data: str | bytes) -> T:
        if len(data) > self.max_bytes:
            raise ProtocolError(
                f"frame of {len(data)} bytes exceeds the limit of {self.max_bytes} bytes",
                code=ErrorCode.MESSAGE_TOO_LARGE,
                reason=Reason.TOO_LARGE,
                field="$",
            )
        try:
            return self._decoder.decode(data)
        except msgspec.ValidationError as exc:
            error = exc
        except (msgspec.DecodeError, UnicodeError):
            raise _unreadable(data) from None
        except RecursionError:
            raise _too_deep() from None
        try:
            document, unreadable = _untyped(data)
        except RecursionError:
            # refused before the nesting was reached (a frame that is a deep array)
            raise _too_deep() from None
        problem = explain(error, document, _type_info(self._type), unreadable)
        raise ProtocolError(problem.message, reason=problem.reason, field=problem.field)


@functools.cache
def _shared_decoder(message_type: Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(message_type)


@functools.cache
def _type_info(message_type: Any) -> Any:
    """What ``message_type`` expects, described (error path only, built once per type)."""
    return mi.type_info(message_type)


_untyped_decoder = msgspec.json.Decoder()


def _untyped(data: str | bytes) -> tuple[Any, str | None]:
    """The frame without a schema, to look at what a validation error refused (error path only), or
    ``MISSING`` and the path of a number too large for any type. Raises ``RecursionError`` on
    nesting deeper than the interpreter allows."""
    try:
        return _untyped_decoder.decode(data), None
    except msgspec.ValidationError as exc:
        return MISSING, error_path(exc)
    except (msgspec.DecodeError, UnicodeError):
        return MISSING, None  # bytes in a field the schema skipped
