"""Writers of the upload containers for tests: Ogg Opus (pages, lacing, CRC) and WAV, written here from
the formats' definitions, independently of the readers under test (the CRC is computed bit by bit)."""

from __future__ import annotations

import struct


def crc_bitwise(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) & 0xFFFFFFFF if crc & 0x80000000 else (crc << 1) & 0xFFFFFFFF
    return crc


def ogg_page(
    packets: list[bytes],
    *,
    serial: int = 7,
    sequence: int = 0,
    flags: int = 0,
    granule: int = 0,
    open_last: bool = False,
) -> bytes:
    """One page holding ``packets`` laced (the last left open, to continue on the next page, with
    ``open_last``: its lacing ends on 255)."""
    lacing = bytearray()
    for i, p in enumerate(packets):
        n = len(p)
        lacing += b"\xff" * (n // 255)
        if not (open_last and i == len(packets) - 1):
            lacing.append(n % 255)
        else:
            assert n % 255 == 0, "an open packet must fill whole segments"
    head = b"OggS" + struct.pack("<BBqIIIB", 0, flags, granule, serial, sequence, 0, len(lacing))
    page = bytearray(head + lacing + b"".join(packets))
    page[22:26] = struct.pack("<I", crc_bitwise(bytes(page)))
    return bytes(page)


def opus_head(channels: int = 1, rate: int = 48000) -> bytes:
    return b"OpusHead" + struct.pack("<BBHIhB", 1, channels, 312, rate, 0, 0)


OPUS_TAGS = b"OpusTags" + struct.pack("<I", 4) + b"test" + struct.pack("<I", 0)
#: a legal 20 ms CELT packet (TOC config 31, mono, one frame) and its payload
PACKET_20MS = bytes([0xF8]) + b"\x11" * 40


def ogg_opus(audio_packets: list[bytes], *, channels: int = 1, rate: int = 48000, per_page: int = 3) -> bytes:
    pages = [ogg_page([opus_head(channels, rate)], flags=0x02, sequence=0), ogg_page([OPUS_TAGS], sequence=1)]
    for i in range(0, len(audio_packets), per_page):
        last = i + per_page >= len(audio_packets)
        pages.append(
            ogg_page(audio_packets[i : i + per_page], sequence=len(pages), flags=0x04 if last else 0)
        )
    return b"".join(pages)


def wav(
    samples: bytes,
    *,
    rate: int = 16000,
    channels: int = 1,
    bits: int = 16,
    tag: int = 1,
    extra_chunk: bool = False,
) -> bytes:
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt
    if extra_chunk:  # an odd-sized chunk before the data: padded to an even length
        chunks += b"LIST" + struct.pack("<I", 3) + b"abc\0"
    chunks += b"data" + struct.pack("<I", len(samples)) + samples
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks
