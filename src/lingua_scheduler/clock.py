"""Time sources for the core.

The core never reads time itself: it is handed a ``Clock``. ``monotonic()`` drives every timeout and
age (it never jumps); ``wall_ms()`` is only for timestamps shown to peers and operators.
``ManualClock`` lets tests move time by hand; ``OffsetClock`` is the shared clock of multi-instance
mode (the local wall clock corrected to the shared store's).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def wall_ms(self) -> int: ...


class SystemClock:
    """The real clock: ``time.monotonic`` for durations, ``time.time`` for wall timestamps."""

    __slots__ = ()

    def monotonic(self) -> float:
        return time.monotonic()

    def wall_ms(self) -> int:
        return time.time_ns() // 1_000_000


class OffsetClock:
    """``base``'s monotonic time, and its wall time plus ``offset_ms()``. In multi-instance mode the
    offset is the shared store's clock minus ours (measured every tick), so every instance stamps
    and compares wall times (node epochs, presence, reservations) on one clock even when the
    machines' clocks disagree."""

    __slots__ = ("_base", "_offset_ms")

    def __init__(self, base: Clock, offset_ms: Callable[[], int]) -> None:
        self._base = base
        self._offset_ms = offset_ms

    def monotonic(self) -> float:
        return self._base.monotonic()

    def wall_ms(self) -> int:
        return self._base.wall_ms() + self._offset_ms()


class ManualClock:
    """A clock that only moves when told to; for deterministic tests of the core."""

    __slots__ = ("_mono", "_wall_ms")

    def __init__(self, start: float = 1000.0, wall_ms: int = 1_700_000_000_000) -> None:
        self._mono = start
        self._wall_ms = wall_ms

    def monotonic(self) -> float:
        return self._mono

    def wall_ms(self) -> int:
        return self._wall_ms

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a monotonic clock cannot go backwards")
        self._mono += seconds
        self._wall_ms += int(seconds * 1000)
