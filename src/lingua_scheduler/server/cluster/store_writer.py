"""Coalesces the small fire-and-forget writes of multi-instance mode into one round trip.

Owns ``StoreWriter``. Every job crossing instances costs a few small shared-store writes nobody
waits for: the ``job_assign`` for the node's instance, the node's ack and result on their way back,
the commit and release of the node's reservation, the acknowledgement of handled inbox entries.
Sent one command per task they cost a round trip and a redis-py call each and, on different pooled
connections, could even overtake one another. Here they are gathered over one event-loop turn and
written as one pipeline; while a batch is in flight the next one gathers, so there is at most one
flush at a time (writes keep their order) and the batch size follows the load on its own.

Bounded: past ``limit`` pending writes new ones are refused as if the store had failed them (their
``on_fail`` runs), rather than queueing without end while the store is unreachable. The nodes whose
reservation commits or releases were lost are remembered (``unsure_nodes``): the cluster re-syncs
this instance's reservations there once the store answers again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from lingua_scheduler.protocol.cluster import InboxMessage
from lingua_scheduler.store.base import StateStore, StoreUnavailable, WriteBatch

log = logging.getLogger(__name__)

#: pending writes at most (about ten seconds of a busy instance's traffic)
DEFAULT_LIMIT = 10_000


class StoreWriter:
    def __init__(
        self, store: StateStore, on_error: Callable[[StoreUnavailable], None], limit: int = DEFAULT_LIMIT
    ) -> None:
        self.store = store
        #: called with the failure when a flush fails (the cluster checks whether the store is down)
        self.on_error = on_error
        self.limit = limit
        self._batch = WriteBatch()
        #: failure callbacks of the sends in ``_batch``
        self._on_fail: list[Callable[[], None]] = []
        self._flushing: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        #: writes refused because ``limit`` was reached or lost because the store failed
        self.lost = 0
        #: nodes whose reservation commits or releases were lost since the cluster last took this set
        self.unsure_nodes: set[str] = set()
        #: batches written and writes in them (the mean batch size is ``writes / flushes``)
        self.flushes = 0
        self.writes = 0

    @property
    def pending(self) -> int:
        return len(self._batch)

    # --- what callers add -----------------------------------------------------------------------

    def send(
        self, instance_id: str, message: InboxMessage, on_fail: Callable[[], None] | None = None
    ) -> None:
        """Put ``message`` in another instance's inbox; ``on_fail`` runs if that cannot be done."""
        if not self._room():
            if on_fail is not None:
                on_fail()
            return
        self._batch.sends.append((instance_id, message))
        if on_fail is not None:
            self._on_fail.append(on_fail)
        self._schedule()

    def commit(self, node_id: str, member: str, ttl_ms: int) -> None:
        if self._room():
            self._batch.commits.append((node_id, member, ttl_ms))
            self._schedule()
        else:
            self.unsure_nodes.add(node_id)

    def release(self, node_id: str, member: str) -> None:
        # A lost release or commit is re-synced by the cluster (``unsure_nodes``), else it would hold
        # a slot until the reservation expires (an execution timeout, a minute by default).
        if self._room():
            self._batch.releases.append((node_id, member))
            self._schedule()
        else:
            self.unsure_nodes.add(node_id)

    def ack(self, entry_ids: list[str]) -> None:
        # A lost ack only means a re-delivery, and handling an inbox entry twice is harmless.
        if entry_ids and self._room():
            self._batch.acks.extend(entry_ids)
            self._schedule()

    async def drain(self, timeout: float) -> bool:
        """Wait until every pending write is flushed (graceful shutdown); False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # --- flushing -------------------------------------------------------------------------------

    def _room(self) -> bool:
        if len(self._batch) < self.limit:
            self._idle.clear()
            return True
        self.lost += 1
        if self.lost == 1 or self.lost % 1000 == 0:
            log.warning("shared-store write queue full: writes dropped", extra={"dropped": self.lost})
        return False

    def _schedule(self) -> None:
        if self._flushing is None:
            # The task's first step runs on the next loop turn: everything added in this turn
            # goes into its first pipeline.
            self._flushing = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while self._batch:
                batch, on_fail = self._batch, self._on_fail
                self._batch, self._on_fail = WriteBatch(), []
                await self._flush(batch, on_fail)
        finally:
            self._flushing = None
            if not self._batch:
                self._idle.set()

    async def _flush(self, batch: WriteBatch, on_fail: list[Callable[[], None]]) -> None:
        try:
            await self.store.write(batch)
            self.flushes += 1
            self.writes += len(batch)
        except Exception as exc:  # the writes are lost either way: say so, and tell the senders
            self.lost += len(batch)
            self.unsure_nodes.update(n for n, _, _ in batch.commits)
            self.unsure_nodes.update(n for n, _ in batch.releases)
            if isinstance(exc, StoreUnavailable):
                log.warning(
                    "shared-store writes lost",
                    extra={"reason": str(exc), "messages": len(batch.sends), "writes": len(batch)},
                )
                self.on_error(exc)
            else:
                log.exception("shared-store write failed", extra={"writes": len(batch)})
            for callback in on_fail:
                callback()
