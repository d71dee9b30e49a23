"""Silence judged from Opus packet sizes: the web client's silence frames, DTX, speech, other audio."""

from __future__ import annotations

from lingua_scheduler.core import opus
from lingua_scheduler.core.silence import is_silent_opus

#: TOC 0x48: SILK wideband, one 20 ms frame
SILENT_20MS = bytes.fromhex("4807c979c8c9c8c9")


def test_the_web_clients_silence_frames_are_silent() -> None:
    assert is_silent_opus(opus.frame([SILENT_20MS] * 145))


def test_dtx_frames_are_silent() -> None:
    assert is_silent_opus(opus.frame([b"\x48", b"\x48\x00"] * 10))


def test_a_single_speech_packet_makes_it_speech() -> None:
    # 15 bytes per 20 ms is the least Opus spends on speech (6 kbit/s)
    speech = bytes([0x48]) + bytes(14)
    assert not is_silent_opus(opus.frame([SILENT_20MS] * 50 + [speech] + [SILENT_20MS] * 50))


def test_the_rate_scales_with_the_packet_duration() -> None:
    # TOC 0x58: SILK wideband 60 ms; 25 bytes in 60 ms is 3.3 kbit/s, 31 bytes 4.1 kbit/s
    assert is_silent_opus(opus.frame([bytes([0x58]) + bytes(24)]))
    assert not is_silent_opus(opus.frame([bytes([0x58]) + bytes(30)]))


def test_what_is_not_framed_opus_is_never_silent() -> None:
    assert not is_silent_opus(b"")
    assert not is_silent_opus(bytes(3200))  # pcm16 zeros: not length-prefixed Opus
    assert not is_silent_opus(opus.frame([SILENT_20MS])[:-1])  # a torn packet
