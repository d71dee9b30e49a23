"""Opus payloads in "Plan A" framing, built to the shape the recordings kept, and read back.

The recordings keep only each payload's size and first 8 bytes (``<N b64 chars, M bytes, head=...>``).
Plan A framing is, per Opus packet, a 2-byte little-endian length then the packet (first byte: the
TOC byte). A payload is rebuilt with the recorded size and head: the recorded first packet, then more
packets of the same length and TOC. A payload whose head is the web client's silence frame is rebuilt
from silence frames only.

Speech packets carry a marker (sentence number, packet number within the sentence) after their first
6 bytes, so the emulated node's "ASR" can tell which part of which spoken sentence a job's audio holds,
however the scheduler cut or joined the chunks. Silence packets carry no marker.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

#: the web client's frame for a silent 20 ms: length 8, then the packet (TOC 0x48)
SILENCE_HEAD = bytes.fromhex("08004807c979c8c9")
SILENCE_PACKET = SILENCE_HEAD[2:] + b"\xc8\xc9"
SPEECH_MAGIC = b"\xa5\x5a"
#: TOC + 5 bytes + magic + sentence (1 byte) + packet number (2 bytes)
MIN_SPEECH_PACKET = 11

_ELISION = re.compile(r"^<(\d+) b64 chars, (\d+) bytes, head=([0-9a-f]*)>$")


@dataclass(frozen=True)
class Elided:
    """A payload the recording elided: its decoded size and its first bytes."""

    size: int
    head: bytes

    @property
    def is_speech(self) -> bool:
        return self.size > 0 and self.head != SILENCE_HEAD[: len(self.head)]


def parse_elision(text: str) -> Elided | None:
    """``"<11424 b64 chars, 8566 bytes, head=3800...>"`` -> Elided; ``""`` -> size 0; else None."""
    if text == "":
        return Elided(0, b"")
    m = _ELISION.match(text)
    if m is None:
        return None
    return Elided(int(m.group(2)), bytes.fromhex(m.group(3)))


def silence(size: int) -> bytes:
    """``size`` bytes of silence frames (a last odd-sized frame when size is not a multiple of 10)."""
    frame = struct.pack("<H", len(SILENCE_PACKET)) + SILENCE_PACKET
    whole, rest = divmod(size, len(frame))
    if rest and whole:
        # widen the last frame rather than leave a torn length prefix
        wide = SILENCE_PACKET + b"\x00" * rest
        return frame * (whole - 1) + struct.pack("<H", len(wide)) + wide
    if rest:
        return struct.pack("<H", rest - 2) + b"\x00" * (rest - 2) if rest > 2 else b"\x00" * rest
    return frame * whole


class SpeechWriter:
    """Numbers the speech packets of one sentence across the chunks that carry it."""

    def __init__(self, sentence: int) -> None:
        self.sentence = sentence
        self.packets = 0

    def _packet(self, length: int, toc: int, lead: bytes) -> bytes:
        marker = SPEECH_MAGIC + bytes([self.sentence]) + struct.pack("<H", self.packets)
        self.packets += 1
        body = bytes([toc]) + lead[:5].ljust(5, b"\x11") + marker
        return body + bytes((i * 37 + 11) & 0xFF for i in range(length - len(body)))

    def chunk(self, shape: Elided) -> bytes:
        """A payload of exactly ``shape.size`` bytes whose first packet matches ``shape.head``."""
        head = shape.head
        length = max(head[0] | (head[1] << 8), MIN_SPEECH_PACKET) if len(head) >= 2 else 60
        toc = head[2] if len(head) >= 3 else 0x48
        lead = head[3:8]
        lengths: list[int] = []
        remaining = shape.size
        while remaining >= 2 + length:
            lengths.append(length)
            remaining -= 2 + length
        if remaining >= 2 + MIN_SPEECH_PACKET:
            lengths.append(remaining - 2)
        elif remaining and lengths:
            lengths[-1] += remaining
        elif remaining:
            return b"\x00" * remaining
        out = bytearray()
        for i, n in enumerate(lengths):
            out += struct.pack("<H", n) + self._packet(n, toc, lead if i == 0 else lead[::-1])
        return bytes(out)


@dataclass(frozen=True)
class Heard:
    """What a Plan A payload holds: marked speech packets as (sentence, packet number), and silence."""

    speech: list[tuple[int, int]]
    silence_packets: int
    valid: bool


def listen(payload: bytes) -> Heard:
    """Parse Plan A framing; a payload that is not well-framed is reported as not valid."""
    speech: list[tuple[int, int]] = []
    quiet = 0
    pos = 0
    while pos < len(payload):
        if pos + 2 > len(payload):
            return Heard(speech, quiet, False)
        (n,) = struct.unpack_from("<H", payload, pos)
        packet = payload[pos + 2 : pos + 2 + n]
        if n == 0 or len(packet) != n:
            return Heard(speech, quiet, False)
        if n >= MIN_SPEECH_PACKET and packet[6:8] == SPEECH_MAGIC:
            speech.append((packet[8], struct.unpack_from("<H", packet, 9)[0]))
        else:
            quiet += 1
        pos += 2 + n
    return Heard(speech, quiet, True)


__all__ = [
    "SILENCE_HEAD",
    "Elided",
    "Heard",
    "SpeechWriter",
    "listen",
    "parse_elision",
    "silence",
]
