"""Decoding and encoding of wire frames.

Decoding validates types and ranges (msgspec) and turns every failure into a ``ProtocolError`` whose
message names the field path, so the endpoint can answer ``INVALID_MESSAGE`` and keep the connection.
That includes what msgspec reports with other exceptions: invalid UTF-8 inside a string
(``UnicodeDecodeError``) and nesting deeper than the interpreter's recursion limit (``RecursionError``).
JSON has no NaN or Infinity (msgspec refuses the tokens) and a number too large for a float is refused
("Number out of range"), so every decoded float is finite; integer fields that may hold anything are
bounded by the protocol types (``protocol.common.SafeInt``).

Error messages never echo more than ``MAX_QUOTED`` characters of a peer's value: an unknown message type
of a megabyte is not sent back, and audio is never echoed.
"""

from __future__ import annotations

import re
import typing
from typing import Any, Generic, TypeVar

import msgspec

from lingua_scheduler.errors import ErrorCode, ProtocolError

T = TypeVar("T")

_encoder = msgspec.json.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    """Serialise one outbound message to JSON bytes."""
    return _encoder.encode(message)


#: longest part of a peer's value quoted in an error message
MAX_QUOTED = 64
#: longest error message built from a decode failure
MAX_ERROR_MESSAGE = 512
_QUOTED = re.compile("'([^']{" + str(MAX_QUOTED + 1) + ",})'")
_BAD_TAG = re.compile(r"^Invalid value '(.*)' - at `\$\.type`$", re.S)


def _shorten(text: str) -> str:
    """Elide long quoted values, then cap the whole message."""
    text = _QUOTED.sub(lambda m: f"'{m.group(1)[:MAX_QUOTED]}...' ({len(m.group(1))} characters)", text)
    return text if len(text) <= MAX_ERROR_MESSAGE else text[: MAX_ERROR_MESSAGE - 3] + "..."


def _tags(message_type: Any) -> list[str]:
    """The ``type`` tags of a union of tagged structs (for "unknown message type" errors)."""
    members = typing.get_args(message_type) or (message_type,)
    return [str(m.__struct_config__.tag) for m in members if getattr(m, "__struct_config__", None)]


class FrameDecoder(Generic[T]):
    """Decodes text frames into one of the protocol's message types; refuses frames over ``max_bytes``."""

    __slots__ = ("_decoder", "_expected", "max_bytes")

    def __init__(self, message_type: Any, max_bytes: int) -> None:
        self._decoder: msgspec.json.Decoder[T] = msgspec.json.Decoder(message_type)
        self.max_bytes = max_bytes
        self._expected = ", ".join(_tags(message_type))

    def decode(self, data: str | bytes) -> T:
        if len(data) > self.max_bytes:
            raise ProtocolError(
                f"frame of {len(data)} bytes exceeds the limit of {self.max_bytes} bytes",
                code=ErrorCode.MESSAGE_TOO_LARGE,
            )
        try:
            return self._decoder.decode(data)
        except msgspec.ValidationError as exc:
            tag = _BAD_TAG.match(str(exc))
            if tag is not None:
                raise ProtocolError(
                    _shorten(f"unknown message type '{tag.group(1)}' (expected one of: {self._expected})")
                ) from None
            raise ProtocolError(_shorten(f"invalid message: {exc}")) from None
        except msgspec.DecodeError as exc:
            raise ProtocolError(_shorten(f"malformed JSON: {exc}")) from None
        except UnicodeDecodeError as exc:
            # msgspec validates UTF-8 only in the strings it decodes (unknown fields are skipped unread)
            raise ProtocolError(f"text is not valid UTF-8 (byte {exc.start} of a string value)") from None
        except RecursionError:
            raise ProtocolError("JSON nested too deeply") from None
