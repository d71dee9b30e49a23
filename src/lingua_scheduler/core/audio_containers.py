"""Audio containers an integrator may upload, opened into the audio a session streams.

Owns the readers of the three uploads of ``POST /v1/speech/translate``:

- **Ogg Opus** (``audio/ogg; codecs=opus``): Ogg pages (RFC 3533: capture pattern, version 0, header
  flags, granule position, serial number, page sequence, CRC-32 over the page with the CRC field
  zeroed, segment table) carry packets laced in 255-byte segments, a packet possibly continued on the
  next page. The first packet is the ``OpusHead`` identification header, the second ``OpusTags``
  (RFC 7845, section 5); the rest are Opus packets, which come out in the 2-byte length framing the
  sessions stream (``core/opus.py``).
- **WAV** (``audio/wav``): a RIFF ``WAVE`` file with a ``fmt`` chunk of 16-bit PCM (format 1, or
  extensible format with the PCM sub-format), one channel, and a ``data`` chunk; its sample rate comes
  from the header.
- **raw pcm16**: little-endian 16-bit mono samples at a sample rate the request names.

Every reader takes bytes already bounded by the caller, walks them with explicit bounds (no length
read from the data is trusted before it is checked against what is there) and raises
``RequestError`` with a code, a message naming the field (``audio``) and ``details`` holding the field
and a reason of its own (``AUDIO_REASONS``). Arbitrary bytes never make it raise anything else.

Must never: decode audio, log or echo audio bytes (messages name sizes and positions only).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from lingua_scheduler.core import opus
from lingua_scheduler.core.audio import SUPPORTED_RATES, AudioFormat
from lingua_scheduler.errors import ErrorCode, RequestError

#: ``details.reason`` of a refused upload, with what each means (docs/integration.md lists them)
AUDIO_REASONS: dict[str, str] = {
    "empty": "the audio holds no samples or packets",
    "not_ogg": "the bytes are not Ogg pages (no capture pattern where a page must start)",
    "ogg_page": "an Ogg page is truncated or its header is invalid",
    "ogg_crc": "an Ogg page's CRC does not match its bytes",
    "ogg_streams": "the Ogg file holds more than one logical stream (multiplexed or chained)",
    "opus_head": "the first packet is not a valid OpusHead identification header",
    "opus_tags": "the second packet is not an OpusTags comment header",
    "opus_channels": "the Opus stream is not mono",
    "opus_packet": "an audio packet is not a legal Opus packet, or is larger than 65535 bytes",
    "not_wav": "the bytes are not a RIFF WAVE file",
    "wav_chunk": "a WAV chunk is truncated, or the fmt or data chunk is missing",
    "wav_format": "the WAV audio is not 16-bit integer PCM",
    "wav_channels": "the WAV audio is not mono",
    "sample_rate": "the sample rate is not one a session supports",
    "pcm_length": "pcm16 audio is not a whole number of 16-bit samples",
}

_OGG_CAPTURE = b"OggS"
_OGG_HEADER = 27
_FLAG_CONTINUED = 0x01
_FLAG_BOS = 0x02
_OPUS_HEAD = b"OpusHead"
_OPUS_TAGS = b"OpusTags"
#: the framing's 2-byte length prefix bounds a packet
_MAX_PACKET = 0xFFFF
#: sample rate given to an Ogg Opus stream whose header names one sessions do not use (Opus decodes
#: at any of the five rates; 48 kHz is its native one)
OPUS_FALLBACK_RATE = 48000
#: WAVE_FORMAT_PCM and WAVE_FORMAT_EXTENSIBLE
_WAV_PCM = 1
_WAV_EXTENSIBLE = 0xFFFE
#: a streaming writer's data size when it did not know the length (the data runs to the end)
_WAV_UNKNOWN_SIZES = (0, 0xFFFFFFFF)


@dataclass(frozen=True, slots=True)
class DecodedAudio:
    """An upload as a session would stream it: pcm16 samples, or length-prefixed Opus packets."""

    audio_format: AudioFormat
    sample_rate: int
    data: bytes
    duration_ms: int
    #: what the upload was (``ogg_opus``, ``wav``, ``pcm16``, ``opus``): for usage and logs
    container: str


def audio_error(message: str, reason: str, field: str = "audio") -> RequestError:
    assert reason in AUDIO_REASONS, reason
    return RequestError(
        f"{field}: {message}", code=ErrorCode.INVALID_REQUEST, details={"field": field, "reason": reason}
    )


# --- Ogg ---------------------------------------------------------------------------------------------


def _crc_table() -> tuple[int, ...]:
    # CRC-32 of Ogg: polynomial 0x04C11DB7, not reflected, initial value 0, no final xor
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return tuple(table)


_CRC = _crc_table()


def ogg_crc(data: bytes | bytearray | memoryview) -> int:
    crc = 0
    for b in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _CRC[((crc >> 24) ^ b) & 0xFF]
    return crc


@dataclass(frozen=True, slots=True)
class OggPage:
    flags: int
    granule: int
    serial: int
    sequence: int
    #: the segment table's lacing values
    lacing: bytes
    body: bytes

    @property
    def continued(self) -> bool:
        return bool(self.flags & _FLAG_CONTINUED)


def ogg_pages(data: bytes) -> list[OggPage]:
    """The pages of ``data``, each checked (capture pattern, version, sizes, CRC)."""
    pages: list[OggPage] = []
    view = memoryview(data)
    pos, n = 0, len(data)
    while pos < n:
        if data[pos : pos + 4] != _OGG_CAPTURE:
            if pos == 0:
                raise audio_error("not an Ogg stream (no OggS capture pattern at its start)", "not_ogg")
            raise audio_error(f"no Ogg page starts at byte {pos}", "not_ogg")
        if n - pos < _OGG_HEADER:
            raise audio_error(f"the Ogg page at byte {pos} is truncated in its header", "ogg_page")
        version, flags, granule, serial, sequence, crc, count = struct.unpack_from("<BBqIIIB", data, pos + 4)
        if version != 0:
            raise audio_error(f"the Ogg page at byte {pos} has version {version} (only 0 exists)", "ogg_page")
        if flags & ~0x07:
            raise audio_error(f"the Ogg page at byte {pos} has unknown header flags", "ogg_page")
        table_end = pos + _OGG_HEADER + count
        if table_end > n:
            raise audio_error(f"the Ogg page at byte {pos} is truncated in its segment table", "ogg_page")
        lacing = data[pos + _OGG_HEADER : table_end]
        end = table_end + sum(lacing)
        if end > n:
            raise audio_error(f"the Ogg page at byte {pos} is truncated in its body", "ogg_page")
        page = bytearray(view[pos:end])
        page[22:26] = b"\0\0\0\0"
        if ogg_crc(page) != crc:
            raise audio_error(f"the Ogg page at byte {pos} fails its CRC check", "ogg_crc")
        pages.append(OggPage(flags, granule, serial, sequence, bytes(lacing), bytes(view[table_end:end])))
        pos = end
    return pages


def ogg_packets(pages: list[OggPage], max_packet: int = _MAX_PACKET) -> list[bytes]:
    """The packets of one logical stream, joined across segments and pages. A packet left open by
    the last page is incomplete and dropped (an encoder cut off mid-packet); a continuation with no
    packet to continue, or a second stream, is refused."""
    packets: list[bytes] = []
    partial: bytearray | None = None
    serial = pages[0].serial if pages else 0
    for index, page in enumerate(pages):
        if page.serial != serial:
            raise audio_error(
                "the Ogg file holds more than one logical stream: upload a single Opus stream", "ogg_streams"
            )
        if index == 0 and not page.flags & _FLAG_BOS:
            raise audio_error("the first Ogg page is not marked as the beginning of a stream", "ogg_page")
        if page.continued and partial is None:
            raise audio_error(f"Ogg page {page.sequence} continues a packet that was never begun", "ogg_page")
        if not page.continued and partial is not None:
            raise audio_error(f"Ogg page {page.sequence} drops a packet the page before began", "ogg_page")
        pos = 0
        for lace in page.lacing:
            if partial is None:
                partial = bytearray()
            partial += page.body[pos : pos + lace]
            pos += lace
            if len(partial) > max_packet:
                raise audio_error(f"an Ogg packet is larger than {max_packet} bytes", "opus_packet")
            if lace < 255:
                packets.append(bytes(partial))
                partial = None
    return packets


def open_ogg_opus(data: bytes) -> DecodedAudio:
    """Ogg Opus as length-prefixed Opus packets, at the header's input rate when sessions use it."""
    packets = ogg_packets(ogg_pages(data))
    if not packets:
        raise audio_error("the Ogg stream holds no packets", "empty")
    head = packets[0]
    if len(head) < 19 or head[:8] != _OPUS_HEAD:
        raise audio_error("the first Ogg packet is not an OpusHead header", "opus_head")
    if head[8] >> 4 != 0:
        raise audio_error(f"OpusHead version {head[8]} is not one this reader knows (0.x)", "opus_head")
    channels = head[9]
    if channels != 1:
        raise audio_error(
            f"the Opus stream has {channels} channels: only mono is translated", "opus_channels"
        )
    (input_rate,) = struct.unpack_from("<I", head, 12)
    if len(packets) < 2 or packets[1][:8] != _OPUS_TAGS:
        raise audio_error("the second Ogg packet is not an OpusTags header", "opus_tags")
    audio = [p for p in packets[2:] if p]  # an empty packet is a lost one (RFC 7845 section 3): skipped
    tenths = 0
    for i, p in enumerate(audio):
        t = opus.packet_tenths(p)
        if t is None:
            raise audio_error(f"Opus packet {i} is not a legal Opus packet", "opus_packet")
        tenths += t
    if not audio:
        raise audio_error("the Ogg Opus stream holds no audio packets", "empty")
    rate = input_rate if input_rate in SUPPORTED_RATES[AudioFormat.OPUS] else OPUS_FALLBACK_RATE
    return DecodedAudio(AudioFormat.OPUS, rate, opus.frame(audio), tenths // 10, "ogg_opus")


# --- WAV ---------------------------------------------------------------------------------------------


def open_wav(data: bytes) -> DecodedAudio:
    """A RIFF WAVE file of 16-bit mono PCM as its samples and its header's sample rate."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise audio_error("not a WAV file (no RIFF WAVE header)", "not_wav")
    pos, n = 12, len(data)
    fmt: tuple[int, int, int, int] | None = None
    samples: bytes | None = None
    while pos + 8 <= n and samples is None:
        chunk_id = data[pos : pos + 4]
        (size,) = struct.unpack_from("<I", data, pos + 4)
        start = pos + 8
        if chunk_id == b"data":
            if fmt is None:
                raise audio_error("the WAV data chunk comes before its fmt chunk", "wav_chunk")
            if start + size > n:
                if size not in _WAV_UNKNOWN_SIZES:
                    raise audio_error(
                        f"the WAV data chunk says {size} bytes but {n - start} follow", "wav_chunk"
                    )
                size = n - start
            samples = data[start : start + size]
            break
        if start + size > n:
            raise audio_error(f"the WAV chunk at byte {pos} is truncated", "wav_chunk")
        if chunk_id == b"fmt ":
            if size < 16:
                raise audio_error("the WAV fmt chunk is shorter than 16 bytes", "wav_chunk")
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", data, start)
            if tag == _WAV_EXTENSIBLE:
                if size < 40:
                    raise audio_error("the extensible WAV fmt chunk is shorter than 40 bytes", "wav_chunk")
                (tag,) = struct.unpack_from("<H", data, start + 24)  # the sub-format GUID's first field
            fmt = (tag, channels, rate, bits)
        pos = start + size + (size & 1)  # chunks are padded to an even length
    if fmt is None or samples is None:
        raise audio_error("the WAV file has no fmt or no data chunk", "wav_chunk")
    tag, channels, rate, bits = fmt
    if tag != _WAV_PCM or bits != 16:
        raise audio_error(f"WAV audio of format {tag} with {bits}-bit samples: only 16-bit PCM", "wav_format")
    if channels != 1:
        raise audio_error(f"WAV audio has {channels} channels: only mono is translated", "wav_channels")
    return _pcm(samples, rate, "wav")


# --- raw ---------------------------------------------------------------------------------------------


def _pcm(samples: bytes, rate: int, container: str, rate_field: str = "audio") -> DecodedAudio:
    if rate not in SUPPORTED_RATES[AudioFormat.PCM16]:
        allowed = ", ".join(str(r) for r in sorted(SUPPORTED_RATES[AudioFormat.PCM16]))
        raise audio_error(
            f"sample rate {rate} Hz is not supported (one of {allowed})", "sample_rate", rate_field
        )
    if len(samples) % 2:
        raise audio_error(f"{len(samples)} bytes of pcm16 are not whole 16-bit samples", "pcm_length")
    if not samples:
        raise audio_error("the audio holds no samples", "empty")
    return DecodedAudio(AudioFormat.PCM16, rate, samples, len(samples) * 1000 // (2 * rate), container)


def open_pcm16(data: bytes, sample_rate: int) -> DecodedAudio:
    """Raw little-endian 16-bit mono samples at ``sample_rate`` (named by the request)."""
    return _pcm(data, sample_rate, "pcm16", rate_field="sample_rate")


def open_framed_opus(data: bytes, sample_rate: int) -> DecodedAudio:
    """Opus already in the sessions' 2-byte length framing (what the platform's clients send)."""
    if sample_rate not in SUPPORTED_RATES[AudioFormat.OPUS]:
        allowed = ", ".join(str(r) for r in sorted(SUPPORTED_RATES[AudioFormat.OPUS]))
        raise audio_error(
            f"Opus sample rate {sample_rate} Hz is not one of {allowed}", "sample_rate", "sample_rate"
        )
    tenths = opus.duration_tenths(data)
    if not data:
        raise audio_error("the audio holds no packets", "empty")
    if tenths is None:
        raise audio_error(
            f"{len(data)} bytes are not Opus packets each preceded by its 2-byte little-endian length",
            "opus_packet",
        )
    return DecodedAudio(AudioFormat.OPUS, sample_rate, data, tenths // 10, "opus")
