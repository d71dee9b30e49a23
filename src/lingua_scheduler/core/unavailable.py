"""Temporary "model not available" marks: (node, service) pairs that selection avoids for a while.

Owns: the marks set when a node answers a job with MODEL_NOT_AVAILABLE, their expiry (TTL from
``PoolsConfig.unavailable_ttl_seconds``) and the question selection asks: "is a required service type
of this node marked?". A type counts as unavailable only when every installed service of that type on
the node is marked, so a second service of the same type keeps the node usable.

Must never: read time except through the injected ``Clock``, or grow without bound (a node has a
handful of services, and expired marks are dropped when looked at or purged).
"""

from __future__ import annotations

from collections.abc import Iterable

from lingua_scheduler.clock import Clock
from lingua_scheduler.core.capabilities import Capabilities
from lingua_scheduler.protocol.common import ServiceType


class UnavailableMarks:
    def __init__(self, clock: Clock, ttl_seconds: float) -> None:
        self.clock = clock
        self.ttl = ttl_seconds
        #: node id -> service id -> monotonic expiry
        self._marks: dict[str, dict[str, float]] = {}

    def mark(self, node_id: str, service_id: str) -> None:
        """Record a MODEL_NOT_AVAILABLE answer of ``node_id`` for ``service_id`` (re-marking extends)."""
        self._marks.setdefault(node_id, {})[service_id] = self.clock.monotonic() + self.ttl

    def clear(self, node_id: str, service_id: str | None = None) -> None:
        """Forget the marks of a node (or of one of its services), e.g. when it re-registers."""
        if service_id is None:
            self._marks.pop(node_id, None)
            return
        marks = self._marks.get(node_id)
        if marks is not None:
            marks.pop(service_id, None)
            if not marks:
                del self._marks[node_id]

    def marked_types(self, node_id: str, caps: Capabilities) -> frozenset[ServiceType]:
        """Service types of the node whose every installed service is marked right now."""
        marks = self._marks.get(node_id)
        if not marks:
            return frozenset()
        now = self.clock.monotonic()
        for sid in [s for s, exp in marks.items() if exp <= now]:
            del marks[sid]
        if not marks:
            del self._marks[node_id]
            return frozenset()
        by_type: dict[ServiceType, bool] = {}
        for sid, st in caps.service_types:
            by_type[st] = by_type.get(st, True) and sid in marks
        return frozenset(t for t, all_marked in by_type.items() if all_marked)

    def blocks(self, node_id: str, caps: Capabilities, required: Iterable[ServiceType]) -> bool:
        """Whether one of the ``required`` types is marked unavailable on the node. O(1) when unmarked."""
        if node_id not in self._marks:
            return False
        marked = self.marked_types(node_id, caps)
        return any(t in marked for t in required)

    def purge(self) -> int:
        """Drop every expired mark (a periodic task calls this); returns how many were dropped."""
        now = self.clock.monotonic()
        dropped = 0
        for node_id in list(self._marks):
            marks = self._marks[node_id]
            for sid in [s for s, exp in marks.items() if exp <= now]:
                del marks[sid]
                dropped += 1
            if not marks:
                del self._marks[node_id]
        return dropped

    def __len__(self) -> int:
        return sum(len(m) for m in self._marks.values())

    def __bool__(self) -> bool:
        # selection asks this per candidate: O(1), unlike len()
        return bool(self._marks)
