"""Recent operator-relevant events: a bounded ring of failovers, job failures, node trouble, node
ejections and admin actions.

Owns ``RecentEvents``. Producers (the engine's failure and failover paths, node status changes, admin
actions) call ``add()``: O(1), never blocks, never grows: the oldest event falls off. Readers (the
dashboard stream, ``GET /api/v1/events``) copy the newest few.

Must never: hold audio, transcript or translated text (ids, codes and reasons only), or be used as a
durable audit trail -- admin actions are also logged; the ring is for a quick look.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Final

from lingua_scheduler.clock import Clock

#: event kinds; the dashboard colours rows by kind
FAILOVER: Final = "failover"
JOB_FAILED: Final = "job_failed"
NODE_STATUS: Final = "node_status"
ADMIN: Final = "admin"
#: a node ejected for failing its jobs, back on probation, or healthy again (server/quality.py)
NODE_QUALITY: Final = "node_quality"
KINDS: Final = (FAILOVER, JOB_FAILED, NODE_STATUS, ADMIN, NODE_QUALITY)

Scalar = str | int | float | bool | None


class RecentEvents:
    """The last ``size`` events, each a flat JSON-ready dict with ``seq``, ``at_ms`` and ``kind``."""

    __slots__ = ("_clock", "_ring", "_seq", "counts")

    def __init__(self, clock: Clock, size: int = 256) -> None:
        self._clock = clock
        self._ring: deque[dict[str, Scalar]] = deque(maxlen=size)
        self._seq = 0
        #: events ever added, by kind (they outlive the ring; exported as a counter)
        self.counts: dict[str, int] = dict.fromkeys(KINDS, 0)

    def add(self, kind: str, **fields: Scalar) -> None:
        self._seq += 1
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self._ring.append({"seq": self._seq, "at_ms": self._clock.wall_ms(), "kind": kind, **fields})

    def latest(self, limit: int, kinds: Iterable[str] = ()) -> list[dict[str, Scalar]]:
        """The newest ``limit`` events (newest first), optionally only of the given kinds."""
        wanted = frozenset(kinds)
        out: list[dict[str, Scalar]] = []
        for ev in reversed(self._ring):
            if wanted and ev["kind"] not in wanted:
                continue
            out.append(dict(ev))
            if len(out) >= limit:
                break
        return out

    @property
    def last_seq(self) -> int:
        return self._seq

    def __len__(self) -> int:
        return len(self._ring)
