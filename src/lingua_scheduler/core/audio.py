"""Audio facts the core needs: formats, durations, format detection, strict base64, negotiation.

Owns: the supported session audio formats and sample rates, the duration of audio (exact for pcm16 and
for length-prefixed Opus, read from the packets' TOC bytes; an estimate for anything else) used for
segmentation limits, pause timing and job timeouts, which format a chunk of audio is in
(``detect_format``), and the base64 codec for audio carried in JSON frames.

Must never: log or echo audio bytes (error messages name sizes, never content), decode audio, or
silently turn bad input into empty audio (the reference did that with invalid base64).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from enum import StrEnum

from lingua_scheduler.config import SessionConfig
from lingua_scheduler.core import opus
from lingua_scheduler.errors import ConfigError, ErrorCode, ProtocolError, Reason


class AudioFormat(StrEnum):
    PCM16 = "pcm16"
    OPUS = "opus"


#: estimate for compressed audio: 3000 B per second (reference: 60-byte frames of 20 ms, ~24 kbit/s)
OPUS_BYTES_PER_SECOND = 3000

#: sample rates a session may negotiate, per format (Opus only runs at these five rates)
SUPPORTED_RATES: dict[AudioFormat, frozenset[int]] = {
    AudioFormat.PCM16: frozenset({8000, 16000, 22050, 24000, 32000, 44100, 48000}),
    AudioFormat.OPUS: frozenset({8000, 12000, 16000, 24000, 48000}),
}

_FORMAT_NAMES = frozenset(f.value for f in AudioFormat)

#: sessions are mono; the ack says so explicitly
CHANNELS = 1


def bytes_per_second(audio_format: str, sample_rate: int) -> int:
    """Bytes of one second of audio. Unknown formats use the compressed estimate.

    The compressed estimate yields the *longer* duration for a given size, which keeps execution
    timeouts generous rather than cutting a job short.
    """
    if audio_format == AudioFormat.PCM16:
        return 2 * CHANNELS * sample_rate
    return OPUS_BYTES_PER_SECOND


def duration_ms(n_bytes: int, audio_format: str, sample_rate: int) -> int:
    """Estimated duration of ``n_bytes`` of audio, in whole milliseconds (rounded down).

    pcm16 at 16000 Hz: 32000 B = 1000 ms. opus: 3000 B = 1000 ms (``audio_tenths`` reads the real
    duration of length-prefixed Opus from its packets).
    """
    return n_bytes * 1000 // bytes_per_second(audio_format, sample_rate)


def audio_tenths(data: bytes, audio_format: str, sample_rate: int) -> int:
    """Duration of ``data`` in tenths of a millisecond: from the packets' TOC bytes for length-prefixed
    Opus, from the sample count for pcm16, else the byte-rate estimate of ``duration_ms``."""
    if audio_format == AudioFormat.OPUS:
        tenths = opus.duration_tenths(data)
        if tenths is not None:
            return tenths
    return len(data) * 10_000 // bytes_per_second(audio_format, sample_rate)


def audio_duration_ms(data: bytes, audio_format: str, sample_rate: int) -> int:
    """``audio_tenths`` in whole milliseconds (rounded down)."""
    return audio_tenths(data, audio_format, sample_rate) // 10


def detect_format(
    data: bytes, expected: AudioFormat | None, default: AudioFormat, max_packets: int | None = None
) -> AudioFormat:
    """The format of a non-empty chunk of session audio.

    ``expected`` is what the session's audio must be (the format the client declared, or the one its
    first audio was in); None lets the bytes decide: length-prefixed Opus (what the reference web
    client always sends, whatever it was told) is Opus, anything else is pcm16 only when that is the
    configured default. Audio in no acceptable format raises ``ProtocolError(INVALID_MESSAGE)``: guessing
    would have a node decode it as the wrong thing and hear noise. Opus with more than ``max_packets``
    packets raises ``ProtocolError(INVALID_MESSAGE, too_large)``, found without parsing past the limit.
    """
    try:
        return _detect_format(data, expected, default, max_packets)
    except opus.TooManyPackets as exc:
        raise ProtocolError(
            f"audio chunk of {len(data)} bytes holds more than {exc.limit} Opus packets, the limit per "
            "chunk (session.max_chunk_packets)",
            code=ErrorCode.INVALID_MESSAGE,
            reason=Reason.TOO_LARGE,
            field="$.payload",
        ) from None


def _detect_format(
    data: bytes, expected: AudioFormat | None, default: AudioFormat, max_packets: int | None
) -> AudioFormat:
    if expected is AudioFormat.PCM16 or (expected is None and not opus.is_framed_opus(data, max_packets)):
        if expected is None and default is not AudioFormat.PCM16:
            raise ProtocolError(
                f"audio chunk of {len(data)} bytes is not Opus in 2-byte length framing, and the session "
                'declared no audio_format: declare audio_format "pcm16" in session_init to stream pcm16',
                code=ErrorCode.INVALID_MESSAGE,
                reason=Reason.AUDIO_FORMAT,
                field="$.payload",
                expected=AudioFormat.OPUS.value,
            )
        if len(data) % frame_bytes(AudioFormat.PCM16):
            raise ProtocolError(
                f"pcm16 audio chunk of {len(data)} bytes is not a whole number of 16-bit samples",
                code=ErrorCode.INVALID_MESSAGE,
                reason=Reason.AUDIO_FORMAT,
                field="$.payload",
                expected=AudioFormat.PCM16.value,
            )
        return AudioFormat.PCM16
    if not opus.is_framed_opus(data, max_packets):
        raise ProtocolError(
            f"audio chunk of {len(data)} bytes is not Opus in 2-byte length framing (a little-endian "
            "length before each packet), which this session streams",
            code=ErrorCode.INVALID_MESSAGE,
            reason=Reason.AUDIO_FORMAT,
            field="$.payload",
            expected=AudioFormat.OPUS.value,
        )
    return AudioFormat.OPUS


def bytes_for_ms(ms: int, audio_format: str, sample_rate: int) -> int:
    """Inverse of ``duration_ms``: bytes that hold ``ms`` of audio (whole frames for pcm16)."""
    n = ms * bytes_per_second(audio_format, sample_rate) // 1000
    return n - n % frame_bytes(audio_format)


def frame_bytes(audio_format: str) -> int:
    """Smallest unit a cut may not split: one pcm16 sample (per channel); one byte otherwise."""
    return 2 * CHANNELS if audio_format == AudioFormat.PCM16 else 1


def decode_base64(text: str | None, at: str | None = None) -> bytes:
    """Strict standard base64 (with padding). Absent or empty means no audio.

    Raises ``ProtocolError(INVALID_MESSAGE)`` on anything else that is not valid base64; ``at`` names
    the field (``$.tts_audio``), as the decoder names the fields it refuses.
    """
    if not text:
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        # the text itself is never echoed: it is (corrupt) audio
        where = f" at {at}" if at else ""
        raise ProtocolError(
            f"audio payload{where} of {len(text)} characters is not valid base64",
            code=ErrorCode.INVALID_MESSAGE,
            reason=Reason.INVALID_BASE64,
            field=at,
        ) from None


def encode_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True, slots=True)
class AudioSpec:
    """What a session streams, as agreed in ``session_init_ack``."""

    audio_format: AudioFormat
    sample_rate: int
    channels: int = CHANNELS
    #: the client named this format in session_init (else it is the default, and the audio decides)
    declared: bool = False

    @property
    def codec(self) -> str:
        return self.audio_format.value


def negotiate(requested_format: str | None, requested_rate: int | None, config: SessionConfig) -> AudioSpec:
    """Grant the client's format and rate when supported, else fall back to the configured defaults.

    Negotiation never fails: the ack tells the client what the scheduler will assume.
    """
    try:
        default_format = AudioFormat(config.default_audio_format)
    except ValueError:
        raise ConfigError(
            "session.default_audio_format",
            f"{config.default_audio_format!r} is not one of {[f.value for f in AudioFormat]}",
        ) from None
    fmt = default_format
    declared = requested_format is not None and requested_format in _FORMAT_NAMES
    if requested_format is not None and declared:
        fmt = AudioFormat(requested_format)
    rates = SUPPORTED_RATES[fmt]
    if requested_rate is not None and requested_rate in rates:
        rate = requested_rate
    elif config.default_sample_rate in rates:
        rate = config.default_sample_rate
    else:
        rate = 16000
    return AudioSpec(fmt, rate, declared=declared)
