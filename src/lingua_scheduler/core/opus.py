"""Opus packets as the platform's clients frame them: parsing, duration from the TOC byte, splitting.

Owns: the "length-prefixed" framing the reference web client and node use for Opus (each packet is
preceded by its length as a 2-byte little-endian integer, nothing else: no Ogg, no headers), and the
duration of a packet read from its table-of-contents byte (RFC 6716, section 3.1).

A chunk of audio is recognised as Opus in this framing only when the lengths chain exactly to the end
of the data, every packet is non-empty and every TOC describes a legal packet (at most 120 ms, a frame
count code 3 with its count byte). Random or pcm16 bytes almost never do all of that.

Must never: decode audio, log or echo packet bytes.
"""

from __future__ import annotations

#: frame duration in tenths of a millisecond per TOC configuration (``toc >> 3``): SILK 0-11
#: (10/20/40/60 ms per bandwidth), hybrid 12-15 (10/20 ms), CELT 16-31 (2.5/5/10/20 ms)
_FRAME_TENTHS: tuple[int, ...] = (100, 200, 400, 600) * 3 + (100, 200) * 2 + (25, 50, 100, 200) * 4

#: a packet may hold at most 120 ms of audio (RFC 6716, section 3.2.5)
MAX_PACKET_TENTHS = 1200

#: bytes of the length prefix in front of every packet
PREFIX_BYTES = 2


def frame_tenths(toc: int) -> int:
    """Duration of one frame of a packet with this TOC byte, in tenths of a millisecond."""
    return _FRAME_TENTHS[(toc >> 3) & 0x1F]


def packet_tenths(packet: bytes | memoryview) -> int | None:
    """Duration of one Opus packet in tenths of a millisecond, or None if it is not a legal packet."""
    if not packet:
        return None
    toc = packet[0]
    code = toc & 0x03
    if code == 0:
        frames = 1
    elif code in (1, 2):
        frames = 2
    else:
        if len(packet) < 2:
            return None
        frames = packet[1] & 0x3F
        if frames == 0:
            return None
    total = frames * frame_tenths(toc)
    return total if total <= MAX_PACKET_TENTHS else None


def packets(data: bytes) -> list[tuple[int, int, int]] | None:
    """The packets of length-prefixed Opus as ``(start, end, tenths)`` (``start`` is the offset of the
    length prefix, ``end`` one past the packet), or None when ``data`` is not in that framing. Empty data
    has no packets (an empty list)."""
    out: list[tuple[int, int, int]] = []
    view = memoryview(data)
    pos, n = 0, len(data)
    while pos < n:
        if n - pos < PREFIX_BYTES + 1:
            return None
        length = data[pos] | (data[pos + 1] << 8)
        end = pos + PREFIX_BYTES + length
        if length == 0 or end > n:
            return None
        tenths = packet_tenths(view[pos + PREFIX_BYTES : end])
        if tenths is None:
            return None
        out.append((pos, end, tenths))
        pos = end
    return out


def is_framed_opus(data: bytes) -> bool:
    """Whether non-empty ``data`` is whole packets of length-prefixed Opus."""
    return bool(data) and packets(data) is not None


def duration_tenths(data: bytes) -> int | None:
    """Total duration of length-prefixed Opus in tenths of a millisecond; None if not in that framing."""
    found = packets(data)
    return None if found is None else sum(t for _, _, t in found)


def split(data: bytes, max_bytes: int, max_tenths: int) -> tuple[bytes, bytes]:
    """The longest run of whole packets at the start of ``data`` within both bounds (at least one
    packet, however large), and the rest. ``data`` must be length-prefixed Opus."""
    found = packets(data)
    if not found:
        return data, b""
    cut, tenths = found[0][1], found[0][2]
    for _, end, t in found[1:]:
        if end > max_bytes or tenths + t > max_tenths:
            break
        cut, tenths = end, tenths + t
    return data[:cut], data[cut:]


def frame(packet_list: list[bytes]) -> bytes:
    """Length-prefix each packet (for clients and tests that produce this framing)."""
    out = bytearray()
    for p in packet_list:
        if not 0 < len(p) <= 0xFFFF:
            raise ValueError(f"an Opus packet must hold 1..65535 bytes, got {len(p)}")
        out += len(p).to_bytes(2, "little") + p
    return bytes(out)
