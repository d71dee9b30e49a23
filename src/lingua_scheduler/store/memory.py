"""The embedded state store: one instance, everything in this process.

It implements the same interface as ``RedisStore`` so the cluster shell and the conformance tests can
use either; in embedded mode the engine never needs it on the hot path (local load accounting is
exact when there is one instance).
"""

from __future__ import annotations

import asyncio

from lingua_scheduler.clock import Clock, SystemClock
from lingua_scheduler.protocol.cluster import InboxMessage, LoadBatch, NodeRecord, ResumeRecord
from lingua_scheduler.store.base import (
    Change,
    JobRecord,
    PoolDelta,
    ReserveResult,
    TickResult,
    WriteBatch,
)


class MemoryStore:
    shared = False

    def __init__(self, instance_id: str = "local", clock: Clock | None = None) -> None:
        self.instance_id = instance_id
        self.clock: Clock = clock or SystemClock()
        self._resv: dict[str, dict[str, int]] = {}
        self._status: dict[str, str] = {}
        self._nodes: dict[str, NodeRecord] = {}
        self._pools: dict[str, set[str]] = {}
        self._jobs: dict[str, JobRecord] = {}
        self._revoked: set[str] = set()
        #: tenant id -> its admitted sessions
        self._sessions: dict[str, set[str]] = {}
        #: session id -> (record, expiry on the clock's monotonic seconds)
        self._resume: dict[str, tuple[ResumeRecord, float]] = {}
        #: session id -> the claim on its resume record (request id, then the outcome)
        self._claims: dict[str, str] = {}

    async def start(self, *, from_start: bool = False) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def publish(
        self, records: list[NodeRecord], gone: list[str], pools: list[PoolDelta], node_status: dict[str, str]
    ) -> None:
        for r in records:
            self._nodes[r.node_id] = r
        for node_id in gone:
            self._nodes.pop(node_id, None)
        for d in pools:
            for p in d.added:
                self._pools.setdefault(p, set()).add(d.node_id)
            for p in d.removed:
                self._pools.get(p, set()).discard(d.node_id)
        self._status.update(node_status)

    async def tick(
        self, owned: list[str], loads: LoadBatch | None, ttl_ms: int, tenant_sessions: dict[str, int]
    ) -> TickResult:
        return TickResult([], {})  # one instance: nobody else to die or to hold sessions

    async def changes(self, last_id: str, block_ms: int) -> list[Change]:
        await asyncio.sleep(block_ms / 1000)
        return []

    async def directory(self) -> tuple[list[NodeRecord], str]:
        return list(self._nodes.values()), "0-0"

    async def forget_instance(self, instance_id: str) -> list[str]:
        return []

    async def reserve(self, node_id: str, member: str, max_slots: int, ttl_ms: int) -> ReserveResult:
        now_ms = self.clock.wall_ms()
        slots = self._resv.setdefault(node_id, {})
        for m in [m for m, exp in slots.items() if exp <= now_ms]:
            del slots[m]
        if self._status.get(node_id) != "ready":
            return ReserveResult(False, "NOT_READY", len(slots))
        if member in slots:
            return ReserveResult(False, "EXISTS", len(slots))
        if len(slots) >= max_slots:
            return ReserveResult(False, "FULL", len(slots))
        slots[member] = now_ms + ttl_ms
        return ReserveResult(True, "OK", len(slots))

    async def release(self, node_id: str, member: str) -> None:
        await self.write(WriteBatch(releases=[(node_id, member)]))

    async def resync_reservations(self, held: dict[str, list[tuple[str, int]]]) -> tuple[int, int]:
        return 0, 0  # one instance, one process: nothing can be lost between it and its store

    async def admit_session(
        self, tenant_id: str, session_id: str, cap: int, ended: list[str]
    ) -> tuple[bool, int]:
        members = self._sessions.setdefault(tenant_id, set())
        members.difference_update(ended)
        if session_id not in members and len(members) >= cap:
            return False, len(members)
        members.add(session_id)
        return True, len(members)

    async def release_sessions(self, ended: dict[str, list[str]]) -> None:
        for tenant_id, ids in ended.items():
            self._sessions.get(tenant_id, set()).difference_update(ids)

    async def resync_sessions(self, live: dict[str, list[str]]) -> tuple[int, int]:
        return 0, 0  # one instance, one process: nothing can be lost between it and its store

    async def write(self, batch: WriteBatch) -> None:
        now_ms = self.clock.wall_ms()
        if batch.sends:
            raise LookupError(f"no instance {batch.sends[0][0]} in embedded mode")
        for node_id, member, ttl_ms in batch.commits:
            slots = self._resv.get(node_id, {})
            if slots.get(member, 0) <= now_ms:
                slots.pop(member, None)
            else:
                slots[member] = now_ms + ttl_ms
        for node_id, member in batch.releases:
            self._resv.get(node_id, {}).pop(member, None)

    async def save_jobs(self, records: list[JobRecord], ttl_s: int) -> None:
        for r in records:
            self._jobs[r.job_id] = r

    async def jobs_of(self, instance_id: str) -> list[JobRecord]:
        return [j for j in self._jobs.values() if j.owner == instance_id and not j.terminal]

    async def receive(self, block_ms: int, count: int) -> list[tuple[str, InboxMessage | None]]:
        await asyncio.sleep(block_ms / 1000)
        return []

    async def save_resume(self, record: ResumeRecord, ttl_ms: int) -> None:
        self._resume[record.session_id] = (record, self.clock.monotonic() + ttl_ms / 1000)
        self._claims.pop(record.session_id, None)

    async def load_resume(self, session_id: str) -> ResumeRecord | None:
        found = self._resume.get(session_id)
        if found is None or found[1] <= self.clock.monotonic():
            self._resume.pop(session_id, None)
            return None
        return found[0]

    async def drop_resume(self, session_id: str) -> None:
        self._resume.pop(session_id, None)
        self._claims.pop(session_id, None)

    async def claim_resume(self, session_id: str, request_id: str, ttl_ms: int) -> bool:
        if await self.load_resume(session_id) is None or session_id in self._claims:
            return False
        self._claims[session_id] = request_id
        return True

    async def settle_resume(
        self, session_id: str, request_id: str, outcome: str, ttl_ms: int, *, drop_record: bool
    ) -> str | None:
        held = self._claims.get(session_id)
        if held != request_id:
            return held
        if not outcome:
            del self._claims[session_id]
            return None
        self._claims[session_id] = outcome
        if drop_record:
            self._resume.pop(session_id, None)
        return outcome

    async def revoke_node(self, node_id: str) -> bool:
        if node_id in self._revoked:
            return False
        self._revoked.add(node_id)
        return True

    async def revoked_nodes(self) -> set[str]:
        return set(self._revoked)

    def pool_members(self, pool_id: str) -> set[str]:
        return set(self._pools.get(pool_id, ()))
