"""Audio facts the core needs: formats, duration estimates, strict base64, format negotiation.

Owns: the supported session audio formats and sample rates, the byte <-> duration estimate used for
segmentation limits and job timeouts, and the base64 codec for audio carried in JSON frames.

Must never: log or echo audio bytes (error messages name sizes, never content), decode audio, or
silently turn bad input into empty audio (the reference did that with invalid base64).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from enum import StrEnum

from lingua_scheduler.config import SessionConfig
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

    pcm16 at 16000 Hz: 32000 B = 1000 ms. opus: 3000 B = 1000 ms.
    """
    return n_bytes * 1000 // bytes_per_second(audio_format, sample_rate)


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
    if requested_format in _FORMAT_NAMES:
        fmt = AudioFormat(requested_format)
    rates = SUPPORTED_RATES[fmt]
    if requested_rate is not None and requested_rate in rates:
        rate = requested_rate
    elif config.default_sample_rate in rates:
        rate = config.default_sample_rate
    else:
        rate = 16000
    return AudioSpec(fmt, rate)
