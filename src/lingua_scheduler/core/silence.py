"""Whether an utterance's Opus audio holds nothing but silence, judged from packet sizes alone.

An Opus encoder spends almost nothing on a silent frame: a few bytes of comfort noise, or 1-2 bytes
when it skips the frame (DTX); the web client's own silence frame is 8 bytes per 20 ms. Speech costs
far more: Opus does not encode speech below 6 kbit/s (15 bytes per 20 ms), and voice at usual
settings takes 30-80 bytes per 20 ms. A packet carrying at most ``SILENT_BITS_PER_SECOND`` of its own
duration is therefore silence, and an utterance made only of such packets holds no speech a node
could recognise: the engine resolves it as ``missing_result(silence_detected)`` at once instead of
queueing a job that a slow node would spend seconds on, in front of the session's next real sentence.

The rule errs one way only: an encoder that pads silence (constant bitrate) yields large packets, so
such audio is judged speech and goes to a node as before. Audio that is not length-prefixed Opus is
never judged silent.

Must never: decode audio, log or echo packet bytes.
"""

from __future__ import annotations

from lingua_scheduler.core.opus import PREFIX_BYTES, packets

#: at most this rate (a third below the lowest rate Opus codes speech at) is silence
SILENT_BITS_PER_SECOND = 4000


def is_silent_opus(data: bytes) -> bool:
    """True when ``data`` is non-empty length-prefixed Opus whose every packet is a silent one."""
    found = packets(data) if data else None
    if not found:
        return False
    for start, end, tenths in found:
        size = end - start - PREFIX_BYTES
        # bits <= rate x duration, with the duration in tenths of a millisecond
        if size * 8 * 10_000 > SILENT_BITS_PER_SECOND * tenths:
            return False
    return True


__all__ = ["SILENT_BITS_PER_SECOND", "is_silent_opus"]
