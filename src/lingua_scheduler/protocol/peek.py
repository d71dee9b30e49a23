"""A bounded look at a session frame that is dropped unread: which utterance or chunk it was.

Owns ``peek_dropped``. The connection's rate limit drops frames before decoding them (decoding is the
cost it protects), yet the client must learn exactly what was lost: an ``utterance`` by its
``utterance_index``, an audio chunk by its ``seq``. So the dropped frame is only looked at: the binary
audio header's fixed fields, or for a JSON text its ``type`` and number found by a regular expression
in its first and last ``PEEK_BYTES`` (clients put ``type`` and the numbers before the audio, as the
reference web client does; the tail catches a client that puts them after it). Whatever the frame's
size, at most ``2 * PEEK_BYTES`` are scanned, and nothing is decoded, allocated per byte or kept.

Must never: decode the frame, scan more than its bound, or trust what it finds beyond telling the
client (a frame that lies about its number only mislabels its own refusal).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from lingua_scheduler.protocol.binary_frames import AUDIO_CHUNK, FINAL

#: bytes looked at from each end of a dropped text frame
PEEK_BYTES = 256

_TYPE = re.compile(rb'"type"\s*:\s*"([a-z_]{1,32})"')
_UTTERANCE_INDEX = re.compile(rb'"utterance_index"\s*:\s*(\d{1,15})\b')
_SEQ = re.compile(rb'"seq"\s*:\s*(\d{1,15})\b')

DroppedKind = Literal["utterance", "audio", "other", "unknown"]


@dataclass(frozen=True, slots=True)
class Dropped:
    """What a dropped frame was: an ``utterance`` (``number`` its utterance_index), ``audio`` (an
    audio_chunk or binary audio frame, ``number`` its seq), ``other`` (a message that carries no audio)
    or ``unknown`` (its type was not found); ``number`` None when not found."""

    kind: DroppedKind
    number: int | None = None


def peek_dropped(data: bytes | str) -> Dropped:
    """Look at a dropped frame within the bound (see the module docstring)."""
    if isinstance(data, str):  # aiohttp hands text frames over undecoded (bytes); keep both working
        data = data[:PEEK_BYTES].encode() + b" " + data[-PEEK_BYTES:].encode()
    if data[:1] in (bytes([AUDIO_CHUNK]), bytes([FINAL])):
        seq = int.from_bytes(data[2:6], "little") if len(data) >= 6 else None
        return Dropped("audio", seq)
    head = data[:PEEK_BYTES]
    tail = data[-PEEK_BYTES:] if len(data) > PEEK_BYTES else b""
    found = _TYPE.search(head) or _TYPE.search(tail)
    if found is None:
        return Dropped("unknown")
    kind = found.group(1)
    if kind == b"utterance":
        return Dropped("utterance", _number(_UTTERANCE_INDEX, head, tail))
    if kind == b"audio_chunk":
        return Dropped("audio", _number(_SEQ, head, tail))
    return Dropped("other")


def _number(pattern: re.Pattern[bytes], head: bytes, tail: bytes) -> int | None:
    found = pattern.search(head) or pattern.search(tail)
    return int(found.group(1)) if found is not None else None
