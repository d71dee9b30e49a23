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


class TooManyPackets(ValueError):
    """Length-prefixed Opus with more packets than the caller allows (``limit``). Raised while parsing,
    as soon as the count is passed, so that the work spent on hostile data stays bounded."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} Opus packets")
        self.limit = limit


def packets(data: bytes, max_packets: int | None = None) -> list[tuple[int, int, int]] | None:
    """The packets of length-prefixed Opus as ``(start, end, tenths)`` (``start`` is the offset of the
    length prefix, ``end`` one past the packet), or None when ``data`` is not in that framing. Empty data
    has no packets (an empty list). Raises ``TooManyPackets`` at packet ``max_packets + 1``."""
    out: list[tuple[int, int, int]] = []
    view = memoryview(data)
    pos, n = 0, len(data)
    while pos < n:
        if max_packets is not None and len(out) >= max_packets:
            raise TooManyPackets(max_packets)
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


def is_framed_opus(data: bytes, max_packets: int | None = None) -> bool:
    """Whether non-empty ``data`` is whole packets of length-prefixed Opus (``TooManyPackets`` past
    ``max_packets``)."""
    return bool(data) and packets(data, max_packets) is not None


def duration_tenths(data: bytes) -> int | None:
    """Total duration of length-prefixed Opus in tenths of a millisecond; None if not in that framing."""
    found = packets(data)
    return None if found is None else sum(t for _, _, t in found)


def cut_index(found: list[tuple[int, int, int]], first: int, max_bytes: int, max_tenths: int) -> int:
    """Index one past the longest run of whole packets of ``found`` (from ``packets``) that starts at
    ``first`` and stays within both bounds (at least one packet, however large). The run's bytes are
    ``data[found[first][0]:found[last][1]]``. Cutting a parsed chunk by index keeps splitting it into
    many pieces linear in its packets: nothing is parsed again."""
    base = found[first][0]
    tenths = found[first][2]
    i = first + 1
    while i < len(found):
        _, end, t = found[i]
        if end - base > max_bytes or tenths + t > max_tenths:
            break
        tenths += t
        i += 1
    return i


def split(data: bytes, max_bytes: int, max_tenths: int) -> tuple[bytes, bytes]:
    """The longest run of whole packets at the start of ``data`` within both bounds (at least one
    packet, however large), and the rest. ``data`` must be length-prefixed Opus."""
    found = packets(data)
    if not found:
        return data, b""
    last = cut_index(found, 0, max_bytes, max_tenths) - 1
    cut = found[last][1]
    return data[:cut], data[cut:]


def frame(packet_list: list[bytes]) -> bytes:
    """Length-prefix each packet (for clients and tests that produce this framing)."""
    out = bytearray()
    for p in packet_list:
        if not 0 < len(p) <= 0xFFFF:
            raise ValueError(f"an Opus packet must hold 1..65535 bytes, got {len(p)}")
        out += len(p).to_bytes(2, "little") + p
    return bytes(out)
