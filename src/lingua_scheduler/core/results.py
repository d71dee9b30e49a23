"""Per-session result ordering: results reach the client in utterance order, and gaps are explicit.

Owns: one session's delivery cursor, the utterances still expected, and the releases held back.

Policy (what a client can rely on):
- Releases come out in utterance-index order. An index has one part per job (one per target language);
  a part is resolved as RESULT (deliver it), FAILED (the caller already sent error + ui_event; the
  release unblocks later indices and may become missing_result(job_failed)), SILENCE (no speech:
  missing_result(silence_detected)) or GAP (given up: missing_result(gap_timeout)).
- Parts of the head index are released the moment they resolve; parts of later indices are held until
  every earlier index is fully resolved.
- An unresolved index that has held back a later release for ``result_gap_timeout_ms`` is given up
  (GAP) so later results flow. A result that turns up afterwards is still released, marked ``late``
  (finished work is never thrown away); the given-up parts waiting for one are remembered, at most
  ``MAX_GAPPED_PER_SLOT`` times the bound (past it the oldest is forgotten and counted).
- Duplicates are dropped: a part already resolved (same job, any attempt), an index already released.
- At most ``max_pending_results`` indices are outstanding (expected, not yet fully released): the caller
  asks ``has_room`` before it creates an utterance's jobs and, when there is none, ``refuse``s the
  index instead. A refused index takes no slot (it is answered at once by the caller, out of order:
  a refusal answers the request, it is no result) and the cursor steps over it.

Must never: know about sockets, wire frames or job internals (the payload is opaque), give up a part to
make room, or hold more than its bound. Time comes from the injected ``Clock`` (or an explicit ``now``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, TypeVar

from lingua_scheduler.clock import Clock
from lingua_scheduler.config import SessionConfig
from lingua_scheduler.protocol.session import MissingReason

P = TypeVar("P")

#: part key of an index expected with no job (its jobs could not be created); resolved by fail(index)
_NO_JOB = ""
#: given-up parts remembered for their late result: this many per outstanding index allowed
MAX_GAPPED_PER_SLOT = 4


class ReleaseKind(StrEnum):
    RESULT = "result"
    FAILED = "failed"
    SILENCE = "silence"
    GAP = "gap"


_MISSING: dict[ReleaseKind, MissingReason | None] = {
    ReleaseKind.RESULT: None,
    ReleaseKind.FAILED: MissingReason.JOB_FAILED,
    ReleaseKind.SILENCE: MissingReason.SILENCE_DETECTED,
    ReleaseKind.GAP: MissingReason.GAP_TIMEOUT,
}


@dataclass(frozen=True, slots=True)
class Release(Generic[P]):
    """One part of one index, ready to send now (in the order given)."""

    index: int
    kind: ReleaseKind
    job_id: str | None
    payload: P | None = None
    attempt: int | None = None
    #: a RESULT of a part given up earlier (the client already got missing_result(gap_timeout))
    late: bool = False

    @property
    def missing_reason(self) -> MissingReason | None:
        """The ``missing_result.reason`` to send, or None for a RESULT (send the payload)."""
        return _MISSING[self.kind]


@dataclass(slots=True)
class _Slot(Generic[P]):
    index: int
    open: set[str]
    held: list[Release[P]] = field(default_factory=list)
    #: when this unresolved index first held back a later release (starts its gap timer)
    blocking_since: float | None = None
    #: refused indices right after this one (they take no slot; the cursor steps over them)
    skip_after: int = 0


class ResultQueue(Generic[P]):
    """Ordering for one session. ``expect`` each index as its utterance is created, then feed
    ``offer`` / ``fail``; call ``tick()`` at ``next_deadline()``. Every call returns releases to send."""

    def __init__(self, config: SessionConfig, clock: Clock, *, start_index: int = 0) -> None:
        self._clock = clock
        self._gap = config.result_gap_timeout_ms / 1000.0
        self._max_held = config.max_pending_results
        self._cursor = start_index
        self._next_expected = start_index
        self._slots: dict[int, _Slot[P]] = {}
        #: the slot of the highest index expected (refused indices after it are counted on it)
        self._tail: _Slot[P] | None = None
        self._held = 0
        #: (index, job id) of parts given up, oldest first, until their late result or failure
        self._gapped: dict[tuple[int, str], None] = {}
        self._max_gapped = MAX_GAPPED_PER_SLOT * self._max_held
        self.dropped_duplicates = 0
        self.dropped_late = 0
        self.dropped_unknown = 0
        self.gaps = 0
        self.late = 0
        self.refused = 0
        #: given-up parts forgotten (over the bound) before their late result came
        self.forgotten_gaps = 0

    # --- inputs ---------------------------------------------------------------------------------

    def expect(self, index: int, job_ids: Iterable[str]) -> None:
        """Announce utterance ``index`` and its jobs (one per target). Indices are expected in order,
        contiguously; no jobs (they could not be created) leaves one part for ``fail(index)``."""
        self._check_next(index)
        if not self.has_room:
            raise ValueError(f"no room for utterance {index}: {self._max_held} are outstanding (refuse it)")
        parts = set(job_ids) or {_NO_JOB}
        self._tail = self._slots[index] = _Slot(index, parts)
        self._next_expected += 1

    def refuse(self, index: int) -> None:
        """Utterance ``index`` is refused (no room, or its audio was dropped): it takes no slot and
        nothing is released for it here; the caller answers it at once."""
        self._check_next(index)
        self.refused += 1
        self._next_expected += 1
        if self._tail is not None:
            self._tail.skip_after += 1
        else:  # nothing outstanding: the cursor is at this index
            self._cursor = self._next_expected

    def _check_next(self, index: int) -> None:
        if index != self._next_expected:
            raise ValueError(f"expected utterance index {self._next_expected}, got {index}")

    def offer(
        self,
        index: int,
        job_id: str,
        attempt: int | None,
        payload: P,
        now: float | None = None,
        *,
        silent: bool = False,
    ) -> list[Release[P]]:
        """A job's result; ``silent`` when it carries no speech (becomes missing_result(silence))."""
        kind = ReleaseKind.SILENCE if silent else ReleaseKind.RESULT
        return self._resolve(index, job_id, Release(index, kind, job_id, payload, attempt), self._now(now))

    def fail(self, index: int, job_id: str | None = None, now: float | None = None) -> list[Release[P]]:
        """A job of ``index`` failed for good (``job_id`` None: every part still open)."""
        now = self._now(now)
        slot = self._slots.get(index)
        keys = sorted(slot.open) if job_id is None and slot is not None else [job_id or _NO_JOB]
        out: list[Release[P]] = []
        for key in keys:
            out += self._resolve(index, key, Release(index, ReleaseKind.FAILED, key or None), now)
        return out

    def silence(self, index: int, now: float | None = None) -> list[Release[P]]:
        """Utterance ``index``, expected with no job, held no speech (missing_result(silence))."""
        return self._resolve(index, _NO_JOB, Release(index, ReleaseKind.SILENCE, None), self._now(now))

    def tick(self, now: float | None = None) -> list[Release[P]]:
        """Give up head indices whose gap timer ran out."""
        now = self._now(now)
        out: list[Release[P]] = []
        while (deadline := self.next_deadline()) is not None and now >= deadline:
            out += self._give_up()
        return out

    def flush(self) -> list[Release[P]]:
        """Release everything now, in order; what is unresolved is given up (session teardown)."""
        out: list[Release[P]] = []
        while self._cursor in self._slots:
            out += self._give_up()
        return out

    # --- inspection -----------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        head = self._slots.get(self._cursor)
        if head is None or head.blocking_since is None:
            return None
        return head.blocking_since + self._gap

    @property
    def cursor(self) -> int:
        """The lowest index not fully released."""
        return self._cursor

    @property
    def held(self) -> int:
        return self._held

    @property
    def next_expected(self) -> int:
        """The index the next utterance gets."""
        return self._next_expected

    def outstanding_indices(self) -> list[int]:
        """The indices expected and not yet fully released, in order (refused ones are not)."""
        return sorted(self._slots)

    @property
    def has_room(self) -> bool:
        """Whether one more utterance may be expected (else it must be refused)."""
        return len(self._slots) < self._max_held

    @property
    def oldest_unsettled(self) -> int:
        """The lowest index something may still be released for (a late result included)."""
        # given up in index order, so the first one remembered is the lowest
        return min(next(iter(self._gapped))[0], self._cursor) if self._gapped else self._cursor

    @property
    def outstanding(self) -> int:
        """Indices expected and not yet fully released."""
        return len(self._slots)

    def validate(self) -> None:
        p: list[str] = []
        skipped = {i for s in self._slots.values() for i in range(s.index + 1, s.index + 1 + s.skip_after)}
        if set(self._slots) | skipped != set(range(self._cursor, self._next_expected)) or (
            set(self._slots) & skipped
        ):
            p.append("slots and refused indices are not exactly those between cursor and next expected")
        if len(self._slots) > self._max_held:
            p.append("outstanding indices over the bound")
        if len(self._gapped) > self._max_gapped:
            p.append("given-up parts remembered over the bound")
        head = self._slots.get(self._cursor)
        if head is not None and (not head.open or head.held):
            p.append("head index is resolved or holds releases")
        if self._held != sum(len(s.held) for s in self._slots.values()):
            p.append("held count out of step")
        if p:
            raise AssertionError("; ".join(p))

    # --- internals ------------------------------------------------------------------------------

    def _now(self, now: float | None) -> float:
        return self._clock.monotonic() if now is None else now

    def _resolve(self, index: int, key: str, rel: Release[P], now: float) -> list[Release[P]]:
        slot = self._slots.get(index)
        if slot is None:
            if (index, key) in self._gapped:
                del self._gapped[(index, key)]
                if rel.kind is ReleaseKind.RESULT:  # a failure or silence adds nothing to the gap told
                    self.late += 1
                    return [Release(index, rel.kind, rel.job_id, rel.payload, rel.attempt, late=True)]
                return []
            if index < self._cursor:
                self.dropped_late += 1
            else:
                self.dropped_unknown += 1
            return []
        if key not in slot.open:
            self.dropped_duplicates += 1
            return []
        slot.open.discard(key)
        if index == self._cursor:
            return [rel] if slot.open else [rel, *self._advance()]
        slot.held.append(rel)
        self._held += 1
        for k in range(self._cursor, index):
            earlier = self._slots.get(k)  # None: a refused index
            if earlier is not None and earlier.open and earlier.blocking_since is None:
                earlier.blocking_since = now
        return []

    def _give_up(self) -> list[Release[P]]:
        """Release the head: held parts, then its open parts as GAP; then move on."""
        slot = self._slots[self._cursor]
        self.gaps += 1
        gap = ReleaseKind.GAP
        out: list[Release[P]] = [Release(slot.index, gap, key or None) for key in sorted(slot.open)]
        for key in slot.open:
            if key != _NO_JOB:  # its job may still finish: its result then goes out late
                self._gapped[(slot.index, key)] = None
        while len(self._gapped) > self._max_gapped:
            del self._gapped[next(iter(self._gapped))]
            self.forgotten_gaps += 1
        slot.open.clear()
        return out + self._advance()

    def _advance(self) -> list[Release[P]]:
        """The head is resolved: drop it and release what the following indices held, stopping at the
        first index still open."""
        out: list[Release[P]] = []
        self._pop_head()
        while (slot := self._slots.get(self._cursor)) is not None:
            out += slot.held
            self._held -= len(slot.held)
            slot.held = []
            if slot.open:
                break
            self._pop_head()
        return out

    def _pop_head(self) -> None:
        slot = self._slots.pop(self._cursor)
        self._cursor += 1 + slot.skip_after
        if slot is self._tail:
            self._tail = None
