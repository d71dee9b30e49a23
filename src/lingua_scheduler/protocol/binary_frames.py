"""The binary audio frames a session may send instead of JSON ``audio_chunk`` (reference client format).

Owns the layout, all integers little-endian:

- audio chunk (type 0x01): ``type u8, session_id_len u8, seq u32, timestamp u32, is_final u8,
  reserved u8``, then the session id (UTF-8) and the audio bytes (the rest of the frame);
- final (type 0x02): ``type u8, session_id_len u8, seq u32, timestamp u32``, then the session id: an
  empty chunk with ``is_final``.

A JSON text never starts with byte 0x01 or 0x02, so a frame is recognised by its first byte. A frame
that is too short, names an unknown type or an id that is not UTF-8 is refused with
``INVALID_MESSAGE`` naming what is wrong; its bytes are never echoed (they are audio).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from lingua_scheduler.errors import ErrorCode, ProtocolError, Reason

AUDIO_CHUNK = 0x01
FINAL = 0x02

_CHUNK_HEADER = struct.Struct("<BBIIBB")
_FINAL_HEADER = struct.Struct("<BBII")


@dataclass(frozen=True, slots=True)
class BinaryAudioFrame:
    session_id: str
    seq: int
    timestamp: int
    is_final: bool
    audio: bytes = field(repr=False)


def is_binary_frame(data: bytes) -> bool:
    """Whether ``data`` is meant as a binary audio frame (by its first byte)."""
    return bool(data) and data[0] in (AUDIO_CHUNK, FINAL)


def _refuse(message: str, reason: Reason, field: str = "$") -> ProtocolError:
    """``field``: ``$`` is the whole frame, ``$.session_id`` its id (the frame has no JSON paths)."""
    return ProtocolError(
        f"binary audio frame: {message}", code=ErrorCode.INVALID_MESSAGE, reason=reason, field=field
    )


def decode_binary_frame(data: bytes) -> BinaryAudioFrame:
    """Parse one binary frame; ``ProtocolError(INVALID_MESSAGE)`` if it is not a well-formed one."""
    kind = data[0] if data else None
    header = _CHUNK_HEADER if kind == AUDIO_CHUNK else _FINAL_HEADER if kind == FINAL else None
    if header is None:
        raise _refuse(
            f"unknown frame type {kind!r} (expected 1 = audio chunk or 2 = final)", Reason.UNKNOWN_TYPE
        )
    if len(data) < header.size:
        raise _refuse(
            f"{len(data)} bytes is shorter than its {header.size}-byte header", Reason.INVALID_VALUE
        )
    fields = header.unpack_from(data)
    id_len, seq, timestamp = fields[1], fields[2], fields[3]
    end = header.size + id_len
    if id_len == 0 or len(data) < end:
        raise _refuse(
            f"session id of {id_len} bytes does not fit a frame of {len(data)} bytes",
            Reason.INVALID_VALUE,
            "$.session_id",
        )
    try:
        session_id = data[header.size : end].decode("utf-8")
    except UnicodeDecodeError:
        raise _refuse("the session id is not UTF-8", Reason.INVALID_UTF8, "$.session_id") from None
    if kind == FINAL:
        return BinaryAudioFrame(session_id, seq, timestamp, True, b"")
    return BinaryAudioFrame(session_id, seq, timestamp, fields[4] != 0, bytes(data[end:]))


def encode_audio_frame(session_id: str, seq: int, timestamp: int, is_final: bool, audio: bytes) -> bytes:
    """The audio-chunk frame (for simulated clients and tests)."""
    sid = session_id.encode("utf-8")
    header = _CHUNK_HEADER.pack(AUDIO_CHUNK, len(sid), seq, timestamp & 0xFFFFFFFF, int(is_final), 0)
    return header + sid + audio


def encode_final_frame(session_id: str, seq: int, timestamp: int) -> bytes:
    sid = session_id.encode("utf-8")
    return _FINAL_HEADER.pack(FINAL, len(sid), seq, timestamp & 0xFFFFFFFF) + sid
