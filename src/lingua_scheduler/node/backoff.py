"""Reconnect delays: exponential, capped, with jitter (a fleet that lost its scheduler must not come back
in one wave when it restarts)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(slots=True)
class Backoff:
    """``next()`` gives the delay before the next attempt: ``base * 2**n`` capped at ``cap`` seconds,
    of which a random part (the upper half) is drawn, so the delays of many nodes spread out while each
    still grows. ``reset()`` after a success starts over."""

    base: float = 0.5
    cap: float = 15.0
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.base <= self.cap:
            raise ValueError(f"backoff needs 0 < base <= cap, got base={self.base} cap={self.cap}")

    def next(self) -> float:
        ceiling = min(self.cap, self.base * 2.0 ** min(self.attempts, 32))
        self.attempts += 1
        return ceiling / 2 + self.rng.uniform(0.0, ceiling / 2)

    def reset(self) -> None:
        self.attempts = 0
