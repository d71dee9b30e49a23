"""Decoding and encoding of wire frames.

Decoding validates types and ranges (msgspec) and turns every failure into a ``ProtocolError`` whose
message names the field path, so the endpoint can answer ``INVALID_MESSAGE`` and keep the connection.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import msgspec

from lingua_scheduler.errors import ErrorCode, ProtocolError

T = TypeVar("T")

_encoder = msgspec.json.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    """Serialise one outbound message to JSON bytes."""
    return _encoder.encode(message)


class FrameDecoder(Generic[T]):
    """Decodes text frames into one of the protocol's message types; refuses frames over ``max_bytes``."""

    __slots__ = ("_decoder", "max_bytes")

    def __init__(self, message_type: Any, max_bytes: int) -> None:
        self._decoder: msgspec.json.Decoder[T] = msgspec.json.Decoder(message_type)
        self.max_bytes = max_bytes

    def decode(self, data: str | bytes) -> T:
        if len(data) > self.max_bytes:
            raise ProtocolError(
                f"frame of {len(data)} bytes exceeds the limit of {self.max_bytes} bytes",
                code=ErrorCode.MESSAGE_TOO_LARGE,
            )
        try:
            return self._decoder.decode(data)
        except msgspec.ValidationError as exc:
            raise ProtocolError(f"invalid message: {exc}") from None
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"malformed JSON: {exc}") from None
