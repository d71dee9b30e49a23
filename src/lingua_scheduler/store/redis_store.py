"""The Redis state store: shared state for several scheduler instances (single server or Redis Cluster).

Owns every Redis call of the project. Three kinds of connection, so that a blocking read never holds
up anything else (the reference serialised all traffic behind one connection that its stream reader
blocked for a second at a time): a pool for commands, one connection for the fleet change feed and
one for this instance's inbox. Every call has a deadline; a failure raises ``StoreUnavailable``.
Key names come from ``keys.py``; multi-key atomic operations are Lua scripts in ``lua/``, each given
all its keys through KEYS (and the keys of one script share a hash slot).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from importlib import resources
from typing import Any, TypeVar

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisError, ResponseError

from lingua_scheduler.clock import Clock, OffsetClock, SystemClock
from lingua_scheduler.protocol.cluster import InboxMessage, LoadBatch, NodeRecord, ResumeRecord
from lingua_scheduler.store.base import (
    Change,
    JobRecord,
    PoolDelta,
    ReserveResult,
    StoreUnavailable,
    TickResult,
    WriteBatch,
)
from lingua_scheduler.store.keys import Keys

log = logging.getLogger(__name__)
T = TypeVar("T")

GROUP = "scheduler"
#: consumer group of the webhook streams (each instance reads as its own consumer)
WEBHOOK_GROUP = "webhooks"
_inbox_dec: msgspec.json.Decoder[InboxMessage] = msgspec.json.Decoder(InboxMessage)
_record_dec = msgspec.json.Decoder(NodeRecord)
_load_dec = msgspec.json.Decoder(LoadBatch)
_enc = msgspec.json.Encoder()


def _lua(name: str) -> str:
    return resources.files("lingua_scheduler.store").joinpath("lua", name).read_text(encoding="utf-8")


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class RedisStore:
    shared = True

    def __init__(
        self,
        url: str | list[str],
        *,
        instance_id: str,
        prefix: str = "lingua",
        cluster: bool = False,
        op_timeout: float = 0.5,
        stream_maxlen: int = 100_000,
        max_deliveries: int = 5,
        clock: Clock | None = None,
    ) -> None:
        self.instance_id = instance_id
        self.clock: Clock = clock or SystemClock()
        #: Redis ``TIME`` minus our wall clock (ms), measured at start and at every tick
        self.clock_offset_ms = 0
        #: wall time on Redis's clock, as this instance estimates it (the scheduler's clock in Redis
        #: mode: node epochs, job retention; presence and reservations use TIME inside the scripts)
        self.shared_clock = OffsetClock(self.clock, lambda: self.clock_offset_ms)
        self.keys = Keys(prefix)
        self.cluster = cluster
        self.urls = [url] if isinstance(url, str) else list(url)
        self.op_timeout = op_timeout
        self.stream_maxlen = stream_maxlen
        self.max_deliveries = max_deliveries
        self.r: Any = self._client()
        self._feed: Any = self._client(single=True)
        self._inbox: Any = self._client(single=True)
        #: every script of lua/, loaded into Redis when the store joins (``start``): registered through
        #: ``_script``, so a new one cannot be left out of the load
        self._scripts: list[Any] = []
        self._reserve = self._script("reserve.lua")
        self._commit = self._script("commit.lua")
        self._tick = self._script("tick.lua")
        self._resync = self._script("resync.lua")
        self._admit = self._script("admit.lua")
        self._tenant_resync = self._script("tenant_resync.lua")
        self._resume = self._script("resume.lua")
        #: reservation members of this instance start with this (resync.lua tells ours from others')
        self._member_prefix = f"{instance_id}|"
        self._last_claim = 0.0
        #: commands sent, by kind, for observability and the command-count test
        self.calls = 0

    def _client(self, single: bool = False) -> Any:
        if self.cluster:
            return RedisCluster.from_url(self.urls[0], socket_connect_timeout=self.op_timeout)
        opts: dict[str, Any] = {
            "socket_connect_timeout": self.op_timeout,
            "retry_on_timeout": False,
            "health_check_interval": 0,
        }
        return aioredis.Redis.from_url(self.urls[0], single_connection_client=single, **opts)

    async def _do(self, aw: Awaitable[T], extra: float = 0.0) -> T:
        self.calls += 1
        try:
            return await asyncio.wait_for(aw, self.op_timeout + extra)
        except ResponseError as exc:  # Redis answered, and refused (out of memory, read-only, ...)
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}", refused=True) from None
        except (TimeoutError, RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from None

    def _m(self, member: str) -> str:
        """The stored form of a reservation member: ours, recognisably (see ``resync_reservations``)."""
        return self._member_prefix + member

    # --- lifecycle ----------------------------------------------------------------------------------

    def _script(self, name: str) -> Any:
        script = self.r.register_script(_lua(name))
        self._scripts.append(script)
        return script

    async def start(self, *, from_start: bool = False) -> None:
        """Read the shared clock and create this instance's inbox group. ``from_start``: the group is
        re-created after the store lost it (restarted empty), so the entries other instances sent in
        the meantime (the stream was re-created by their XADD) are read too, not skipped."""
        sent_ms = self.clock.wall_ms()
        sec, usec = await self._do(self.r.time())
        self._set_offset(int(sec) * 1000 + int(usec) // 1000, sent_ms)
        # Every script into Redis's cache now: one that is broken (or missing from an install) stops
        # the join here, not in the middle of the first outage recovery that needs it.
        for script in self._scripts:
            await self._do(self.r.script_load(script.script))
        try:
            await self._do(
                self.r.xgroup_create(
                    self.keys.inbox(self.instance_id), GROUP, id="0" if from_start else "$", mkstream=True
                )
            )
        except StoreUnavailable as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def close(self) -> None:
        for c in (self.r, self._feed, self._inbox):
            try:
                await asyncio.wait_for(c.aclose(), 1.0)
            except Exception:  # closing a broken connection may fail; nothing to do about it
                log.debug("redis client close failed", exc_info=True)

    async def ping(self) -> None:
        """Whether Redis answers *and accepts writes*: a Redis out of memory (``maxmemory`` with
        ``noeviction``) still answers PING but refuses every write, and is an outage all the same."""
        p = self.r.pipeline(transaction=False)
        p.set(self.keys.instance_probe(self.instance_id), self.clock.wall_ms(), px=60_000)
        results = await self._do(p.execute(raise_on_error=False))
        if isinstance(results[0], Exception):
            raise StoreUnavailable(f"redis: write refused: {results[0]}", refused=True)

    # --- the shared clock ---------------------------------------------------------------------------

    def now_ms(self) -> int:
        return self.shared_clock.wall_ms()

    def _set_offset(self, server_ms: int, sent_ms: int) -> None:
        """``server_ms`` is Redis ``TIME`` read in a round trip that began at ``sent_ms``: it was taken
        about half-way, which bounds the error by half a round trip."""
        self.clock_offset_ms = server_ms - (sent_ms + self.clock.wall_ms()) // 2

    # --- node directory, presence, pools ------------------------------------------------------------

    async def publish(
        self, records: list[NodeRecord], gone: list[str], pools: list[PoolDelta], node_status: dict[str, str]
    ) -> None:
        k = self.keys
        p = self.r.pipeline(transaction=False)
        for rec in records:
            data = _enc.encode(rec)
            p.hset(k.nodes, rec.node_id, data)
            p.xadd(k.changes, {"t": "node", "d": data}, maxlen=self.stream_maxlen, approximate=True)
        for node_id in gone:
            p.hdel(k.nodes, node_id)
            p.zrem(k.presence, node_id)
            p.xadd(k.changes, {"t": "gone", "d": node_id}, maxlen=self.stream_maxlen, approximate=True)
            p.delete(k.node_state(node_id))
        for d in pools:
            for pool in d.added:
                p.sadd(k.pool_members(pool), d.node_id)
            for pool in d.removed:
                p.srem(k.pool_members(pool), d.node_id)
        for node_id, status in node_status.items():
            p.hset(k.node_state(node_id), mapping={"status": status, "owner": self.instance_id})
        if len(p):
            await self._do(p.execute())

    async def tick(
        self, owned: list[str], loads: LoadBatch | None, ttl_ms: int, tenant_sessions: dict[str, int]
    ) -> TickResult:
        """``tick.lua``: presence of this instance and its nodes, the load batch, this instance's
        sessions per limited tenant; back: expired instances and the other live instances' sessions
        per tenant. All on Redis's clock, in one call that also re-reads the offset."""
        k = self.keys
        load = _enc.encode(loads) if loads is not None and loads.loads else b""
        sent_ms = self.clock.wall_ms()
        now, dead, totals, stalled, missing = await self._do(
            self._tick(
                keys=[k.instances, k.presence, k.changes, k.tenant_sessions, k.last_tick],
                args=[
                    self.instance_id,
                    ttl_ms,
                    load,
                    self.stream_maxlen,
                    _enc.encode(tenant_sessions),
                    # a silence of half the TTL is a stall: presence would expire before the next tick
                    ttl_ms // 2,
                    *owned,
                ],
            )
        )
        self._set_offset(int(now), sent_ms)
        elsewhere = {_s(totals[i]): int(totals[i + 1]) for i in range(0, len(totals), 2)}
        return TickResult([_s(i) for i in dead], elsewhere, int(stalled), presence_lost=bool(int(missing)))

    async def changes(self, last_id: str, block_ms: int) -> list[Change]:
        resp = await self._do(
            self._feed.xread({self.keys.changes: last_id}, count=1000, block=block_ms), extra=block_ms / 1000
        )
        out: list[Change] = []
        for _stream, entries in resp or ():
            for entry_id, fields in entries:
                eid = _s(entry_id)
                kind = _s(fields.get(b"t", b""))
                data = fields.get(b"d", b"")
                try:
                    if kind == "node":
                        out.append(Change(eid, kind, record=_record_dec.decode(data)))
                    elif kind == "load":
                        out.append(Change(eid, kind, loads=_load_dec.decode(data)))
                    elif kind == "gone":
                        out.append(Change(eid, kind, node_id=_s(data)))
                except msgspec.DecodeError:
                    log.warning("undecodable fleet change skipped", extra={"entry_id": eid})
                    out.append(Change(eid, "invalid"))
        return out

    async def directory(self) -> tuple[list[NodeRecord], str]:
        k = self.keys
        p = self.r.pipeline(transaction=False)
        p.xrevrange(k.changes, "+", "-", count=1)
        p.hgetall(k.nodes)
        last, raw = await self._do(p.execute(), extra=2.0)
        last_id = _s(last[0][0]) if last else "0-0"
        records = []
        for data in raw.values():
            try:
                records.append(_record_dec.decode(data))
            except msgspec.DecodeError:
                log.warning("undecodable node record skipped")
        return records, last_id

    async def forget_instance(self, instance_id: str) -> list[str]:
        """Remove a dead instance's presence, inbox and the directory entries it still owns."""
        k = self.keys
        records, _ = await self.directory()
        owned = [r.node_id for r in records if r.owner == instance_id]
        p = self.r.pipeline(transaction=False)
        p.zrem(k.instances, instance_id)
        p.hdel(k.instance_info, instance_id)
        p.delete(k.inbox(instance_id), k.dead_letters(instance_id))
        for node_id in owned:
            p.hdel(k.nodes, node_id)
            p.zrem(k.presence, node_id)
            p.delete(k.node_state(node_id))
            p.xadd(k.changes, {"t": "gone", "d": node_id}, maxlen=self.stream_maxlen, approximate=True)
        await self._do(p.execute())
        return owned

    # --- the operators' view of the instances (server/cluster/cluster_view.py) ----------------------------

    async def share_instance_info(self, info: bytes) -> tuple[int, list[tuple[str, int]], dict[str, bytes]]:
        """Write this instance's figures and read everybody's, in one round trip: (Redis TIME in ms,
        [(instance, presence expiry ms)], {instance: figures JSON})."""
        k = self.keys
        p = self.r.pipeline(transaction=False)
        p.hset(k.instance_info, self.instance_id, info)
        p.time()
        p.zrange(k.instances, 0, -1, withscores=True)
        p.hgetall(k.instance_info)
        _, (sec, usec), members, infos = await self._do(p.execute())
        now = int(sec) * 1000 + int(usec) // 1000
        return now, [(_s(m), int(score)) for m, score in members], {_s(i): bytes(v) for i, v in infos.items()}

    async def queue_depths(self, instance_ids: list[str]) -> dict[str, tuple[int, int]]:
        """Each instance's inbox length and dead letters (XLEN of both streams), in one round trip."""
        if not instance_ids:
            return {}
        k = self.keys
        p = self.r.pipeline(transaction=False)
        for i in instance_ids:
            p.xlen(k.inbox(i))
            p.xlen(k.dead_letters(i))
        out = await self._do(p.execute())
        return {i: (int(out[2 * n]), int(out[2 * n + 1])) for n, i in enumerate(instance_ids)}

    # --- capacity reservations ----------------------------------------------------------------------

    async def reserve(self, node_id: str, member: str, max_slots: int, ttl_ms: int) -> ReserveResult:
        k = self.keys
        ok, reason, used = await self._do(
            self._reserve(
                keys=[k.node_resv(node_id), k.node_state(node_id)], args=[self._m(member), max_slots, ttl_ms]
            )
        )
        return ReserveResult(bool(ok), _s(reason), int(used))

    async def release(self, node_id: str, member: str) -> None:
        await self.write(WriteBatch(releases=[(node_id, member)]))

    async def resync_reservations(self, held: dict[str, list[tuple[str, int]]]) -> tuple[int, int]:
        """``resync.lua`` on each node of ``held``: this instance's members there become exactly the
        ones listed (member, ttl ms), whatever releases, commits or reservations were lost or made
        unseen while the store was unreachable. One pipeline (script calls of their own on a Redis
        Cluster, as in ``write``). Returns (members removed, members added)."""
        if not held:
            return 0, 0
        k = self.keys
        calls: list[tuple[str, list[str | int]]] = []
        for node_id, members in held.items():
            args: list[str | int] = [self._member_prefix]
            for member, ttl in members:
                args += [self._m(member), ttl]
            calls.append((k.node_resv(node_id), args))
        if self.cluster:
            results = [await self._do(self._resync(keys=[key], args=args)) for key, args in calls]
        else:
            await self._do(self.r.script_load(self._resync.script))  # rare: after an outage only
            p = self.r.pipeline(transaction=False)
            for key, args in calls:
                p.evalsha(self._resync.sha, 1, key, *args)
            results = await self._do(p.execute(), extra=1.0)
        return sum(int(r[0]) for r in results), sum(int(r[1]) for r in results)

    async def slots_used(self, node_id: str, now_ms: int) -> int:
        return int(await self._do(self.r.zcount(self.keys.node_resv(node_id), now_ms, "+inf")))

    # --- sessions of tenants with a session cap (cluster-wide) ----------------------------------------

    async def admit_session(
        self, tenant_id: str, session_id: str, cap: int, ended: list[str]
    ) -> tuple[bool, int]:
        """``admit.lua``: the cap checked and the session counted in one step, against the counts of
        every live instance (docs/redis.md). Counts, not session ids: the script's work is
        O(instances) whatever the tenant's sessions, so ``session_id`` stays here."""
        k = self.keys
        ok, count = await self._do(
            self._admit(
                keys=[k.tenant_counts(tenant_id), k.instances], args=[self.instance_id, cap, len(ended)]
            )
        )
        return bool(ok), int(count)

    async def release_sessions(self, ended: dict[str, list[str]]) -> None:
        p = self.r.pipeline(transaction=False)
        for tenant_id, ids in ended.items():
            if ids:
                p.hincrby(self.keys.tenant_counts(tenant_id), self.instance_id, -len(ids))
        if len(p):
            await self._do(p.execute())

    async def resync_sessions(self, live: dict[str, list[str]]) -> tuple[int, int]:
        """``tenant_resync.lua`` per tenant (script calls, one each: rare, after a failure only)."""
        removed = added = 0
        for tenant_id, ids in live.items():
            r, a = await self._do(
                self._tenant_resync(
                    keys=[self.keys.tenant_counts(tenant_id)], args=[self.instance_id, len(ids)]
                )
            )
            removed, added = removed + int(r), added + int(a)
        return removed, added

    # --- job records --------------------------------------------------------------------------------

    async def save_jobs(self, records: list[JobRecord], ttl_s: int) -> None:
        """All job changes of a tick in a few commands per owner (not per job): live jobs in one HSET,
        ended ones out of the live hash and into a time-trimmed stream."""
        k = self.keys
        p = self.r.pipeline(transaction=False)
        by_owner: dict[str, list[JobRecord]] = {}
        for r in records:
            by_owner.setdefault(r.owner, []).append(r)
        now_ms = self.now_ms()
        for owner, recs in by_owner.items():
            live = {
                r.job_id: f"{r.state}|{r.attempt}|{r.node_id or ''}|{r.session_id}"
                for r in recs
                if not r.terminal
            }
            ended = [r for r in recs if r.terminal]
            if live:
                p.hset(k.instance_jobs(owner), mapping=live)
                p.expire(k.instance_jobs(owner), ttl_s * 10)
            if ended:
                p.hdel(k.instance_jobs(owner), *[r.job_id for r in ended])
                data = _enc.encode([[r.job_id, r.state, r.attempt, r.node_id, r.session_id] for r in ended])
                p.xadd(
                    k.instance_ended(owner), {"d": data}, minid=f"{now_ms - ttl_s * 1000}-0", approximate=True
                )
                p.expire(k.instance_ended(owner), ttl_s * 2)
        if len(p):
            await self._do(p.execute())

    async def jobs_of(self, instance_id: str) -> list[JobRecord]:
        raw = await self._do(self.r.hgetall(self.keys.instance_jobs(instance_id)))
        out = []
        for job_id, value in raw.items():
            state, attempt, node_id, session_id = _s(value).split("|", 3)
            out.append(
                JobRecord(_s(job_id), state, int(attempt), node_id or None, instance_id, session_id, False)
            )
        return out

    # --- node token revocation (docs/security.md) ---------------------------------------------------

    # --- resume records --------------------------------------------------------------------------

    async def save_resume(self, record: ResumeRecord, ttl_ms: int) -> None:
        data = msgspec.json.encode(record)
        sid = record.session_id
        p = self.r.pipeline(transaction=True)
        p.set(self.keys.resume(sid), data, px=max(1, ttl_ms))
        p.delete(self.keys.resume_claim(sid))  # a new record: a claim on the one it replaces is void
        await self._do(p.execute())

    async def load_resume(self, session_id: str) -> ResumeRecord | None:
        raw = await self._do(self.r.get(self.keys.resume(session_id)))
        if raw is None:
            return None
        try:
            return msgspec.json.decode(raw, type=ResumeRecord)
        except msgspec.DecodeError:
            log.warning("undecodable resume record ignored", extra={"session_id": session_id})
            return None

    async def drop_resume(self, session_id: str) -> None:
        await self._do(self.r.delete(self.keys.resume(session_id), self.keys.resume_claim(session_id)))

    def _resume_keys(self, session_id: str) -> list[str]:
        return [self.keys.resume(session_id), self.keys.resume_claim(session_id)]

    async def claim_resume(self, session_id: str, request_id: str, ttl_ms: int) -> bool:
        keys = self._resume_keys(session_id)
        return bool(await self._do(self._resume(keys=keys, args=["claim", request_id, max(1, ttl_ms)])))

    async def settle_resume(
        self, session_id: str, request_id: str, outcome: str, ttl_ms: int, *, drop_record: bool
    ) -> str | None:
        keys = self._resume_keys(session_id)
        args = ["settle", request_id, outcome, max(1, ttl_ms), "1" if drop_record else "0"]
        held = await self._do(self._resume(keys=keys, args=args))
        return None if held is None else _s(held)

    async def revoke_node(self, node_id: str) -> bool:
        return bool(await self._do(self.r.sadd(self.keys.revoked_nodes, node_id)))

    async def revoked_nodes(self) -> set[str]:
        return {_s(m) for m in await self._do(self.r.smembers(self.keys.revoked_nodes))}

    # --- messages between instances -----------------------------------------------------------------

    async def write(self, batch: WriteBatch) -> None:
        """One pipeline for the batch. Commits use EVALSHA directly: a script handed to a redis-py
        pipeline costs a SCRIPT EXISTS round trip on every execute; the rare NOSCRIPT (a restarted
        or new Redis) is answered by loading the script and committing again. redis-py refuses
        EVALSHA in a Redis Cluster pipeline (and the refusal would fail the whole batch): there the
        commits are script calls of their own, after the pipeline."""
        if not batch:
            return
        k = self.keys
        p = self.r.pipeline(transaction=False)
        for instance_id, message in batch.sends:
            p.xadd(k.inbox(instance_id), {"m": _enc.encode(message)}, maxlen=10_000, approximate=True)
        # commits made by script call after the pipeline: all in cluster mode, else those that met NOSCRIPT
        pipelined, apart = ([], list(batch.commits)) if self.cluster else (batch.commits, [])
        for node_id, member, ttl_ms in pipelined:
            p.evalsha(self._commit.sha, 1, k.node_resv(node_id), self._m(member), ttl_ms)
        for node_id, member in batch.releases:
            p.zrem(k.node_resv(node_id), self._m(member))
        if batch.acks:
            inbox = k.inbox(self.instance_id)
            p.xack(inbox, GROUP, *batch.acks)
            p.xdel(inbox, *batch.acks)
        results = await self._do(p.execute(raise_on_error=False)) if len(p) else []
        first = len(batch.sends)
        apart += [
            c
            for c, res in zip(pipelined, results[first : first + len(pipelined)], strict=True)
            if isinstance(res, NoScriptError)
        ]
        for node_id, member, ttl_ms in apart:
            await self._do(self._commit(keys=[k.node_resv(node_id)], args=[self._m(member), ttl_ms]))
        failed = [r for r in results if isinstance(r, Exception) and not isinstance(r, NoScriptError)]
        if failed:
            raise StoreUnavailable(
                f"redis: {len(failed)} of {len(results)} writes failed: {failed[0]}",
                refused=all(isinstance(r, ResponseError) for r in failed),
            )

    async def receive(self, block_ms: int, count: int) -> list[tuple[str, InboxMessage | None]]:
        inbox = self.keys.inbox(self.instance_id)
        out: list[tuple[str, InboxMessage | None]] = []
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_claim > 5.0:
            # Entries delivered to us earlier but never acknowledged (we crashed or failed mid-way).
            self._last_claim = loop.time()
            out += await self._reclaim(inbox, count)
        try:
            resp = await self._do(
                self._inbox.xreadgroup(GROUP, self.instance_id, {inbox: ">"}, count=count, block=block_ms),
                extra=block_ms / 1000,
            )
        except StoreUnavailable as exc:
            if "NOGROUP" in str(exc):  # the store lost our group (restarted empty): read what came since
                await self.start(from_start=True)
                return out
            raise
        for _stream, entries in resp or ():
            out += [(_s(eid), self._decode(fields)) for eid, fields in entries]
        return out

    async def _reclaim(self, inbox: str, count: int) -> list[tuple[str, InboxMessage | None]]:
        try:
            pending = await self._do(
                self.r.xpending_range(inbox, GROUP, min="-", max="+", count=count, idle=5000)
            )
        except StoreUnavailable:
            return []
        dead = [p for p in pending if int(p["times_delivered"]) >= self.max_deliveries]
        if dead:
            ids = [p["message_id"] for p in dead]
            entries = await self._do(self.r.xrange(inbox, ids[0], ids[-1]))
            p = self.r.pipeline(transaction=False)
            for eid, fields in entries:
                if eid in ids:
                    p.xadd(
                        self.keys.dead_letters(self.instance_id),
                        {**fields, "from": eid},
                        maxlen=10_000,
                        approximate=True,
                    )
            p.xack(inbox, GROUP, *ids)
            p.xdel(inbox, *ids)
            await self._do(p.execute())
            log.warning("inbox entries moved to the dead-letter stream", extra={"count": len(ids)})
        try:
            _next, claimed, *_ = await self._do(
                self.r.xautoclaim(inbox, GROUP, self.instance_id, min_idle_time=5000, count=count)
            )
        except (StoreUnavailable, ResponseError):
            return []
        return [(_s(eid), self._decode(fields)) for eid, fields in claimed if fields]

    @staticmethod
    def _decode(fields: dict[bytes, bytes]) -> InboxMessage | None:
        try:
            return _inbox_dec.decode(fields.get(b"m", b""))
        except msgspec.DecodeError:
            return None

    # --- webhook events (server/webhooks.py) ---------------------------------------------------------

    # --- integrator API: usage buckets and idempotent answers ----------------------------------------

    async def usage_add(self, increments: dict[str, dict[str, float]], ttl_s: int) -> None:
        """Add each key's field deltas (HINCRBYFLOAT) and renew its expiry, in one pipeline."""
        pipe = self.r.pipeline(transaction=False)
        for key, fields in increments.items():
            for name, delta in fields.items():
                pipe.hincrbyfloat(key, name, delta)
            pipe.expire(key, ttl_s)
        await self._do(pipe.execute())

    async def usage_read(self, keys: list[str]) -> list[dict[str, float]]:
        pipe = self.r.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        rows = await self._do(pipe.execute())
        return [{_s(k): float(v) for k, v in row.items()} for row in rows]

    async def idempotent_claim(self, key: str, ttl_ms: int) -> bytes | None:
        """Claim ``key`` for a first request (None), or the value already there (the stored answer, or
        ``b"pending"`` while the first request runs)."""
        ok = await self._do(self.r.set(key, b"pending", nx=True, px=ttl_ms))
        if ok:
            return None
        value = await self._do(self.r.get(key))
        return b"pending" if value is None else bytes(value)

    async def idempotent_store(self, key: str, value: bytes | None, ttl_ms: int) -> None:
        """The first request's answer (None: it failed before answering: a retry may run again)."""
        if value is None:
            await self._do(self.r.delete(key))
        else:
            await self._do(self.r.set(key, value, px=ttl_ms))

    async def webhook_join(self) -> None:
        """Create this instance's webhook stream and group, and list it among the streams."""
        k = self.keys
        try:
            await self._do(
                self.r.xgroup_create(k.webhooks(self.instance_id), WEBHOOK_GROUP, id="0", mkstream=True)
            )
        except StoreUnavailable as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        await self._do(self.r.sadd(k.webhook_streams, self.instance_id))

    async def webhook_add(self, fields: dict[str, str | bytes]) -> str:
        """Queue one event on this instance's stream (never trimmed: the queue's bound is enforced
        before, by the caller, so that nothing queued is lost to trimming)."""
        eid = await self._do(self.r.xadd(self.keys.webhooks(self.instance_id), fields))
        return _s(eid)

    async def webhook_read(
        self, owner: str, count: int, *, pending: bool = False
    ) -> list[tuple[str, dict[bytes, bytes]]]:
        """Entries of ``owner``'s stream for this instance: new ones, or (``pending``) those this
        instance read before and did not acknowledge (after a restart with the same id)."""
        stream = self.keys.webhooks(owner)
        got = await self._do(
            self.r.xreadgroup(WEBHOOK_GROUP, self.instance_id, {stream: "0" if pending else ">"}, count=count)
        )
        return [(_s(eid), fields) for _, entries in got or [] for eid, fields in entries if fields]

    async def webhook_claim_entries(
        self, owner: str, min_idle_ms: int, count: int
    ) -> list[tuple[str, dict[bytes, bytes]]]:
        """Take the entries of a dead instance's stream that its consumer read and never acknowledged."""
        _next, claimed, *_ = await self._do(
            self.r.xautoclaim(
                self.keys.webhooks(owner),
                WEBHOOK_GROUP,
                self.instance_id,
                min_idle_time=min_idle_ms,
                count=count,
            )
        )
        return [(_s(eid), fields) for eid, fields in claimed if fields]

    async def webhook_done(self, owner: str, entry_id: str) -> None:
        """An event was delivered or given up: acknowledged and deleted."""
        stream = self.keys.webhooks(owner)
        p = self.r.pipeline(transaction=False)
        p.xack(stream, WEBHOOK_GROUP, entry_id)
        p.xdel(stream, entry_id)
        await self._do(p.execute())

    async def webhook_orphans(self) -> list[str]:
        """Instances with a webhook stream whose presence has expired (or was removed): theirs to claim."""
        k = self.keys
        p = self.r.pipeline(transaction=False)
        p.smembers(k.webhook_streams)
        p.zrange(k.instances, 0, -1, withscores=True)
        members, live = await self._do(p.execute())
        now = self.now_ms()
        alive = {_s(m) for m, expiry in live if float(expiry) > now}
        return sorted(_s(m) for m in members if _s(m) not in alive and _s(m) != self.instance_id)

    async def webhook_lock(self, owner: str, ttl_ms: int) -> bool:
        """Hold (or renew) the claim of ``owner``'s stream for ``ttl_ms``; False when another holds it."""
        key = self.keys.webhook_claim(owner)
        got = await self._do(self.r.set(key, self.instance_id, nx=True, px=ttl_ms))
        if got:
            return True
        holder = await self._do(self.r.get(key))
        if holder is not None and _s(holder) == self.instance_id:
            await self._do(self.r.pexpire(key, ttl_ms))
            return True
        return False

    async def webhook_retire(self, owner: str) -> bool:
        """Drop a dead instance's stream once nothing is left in it; True when it was dropped."""
        k = self.keys
        stream = k.webhooks(owner)
        if int(await self._do(self.r.xlen(stream))) > 0:
            return False
        p = self.r.pipeline(transaction=False)
        p.delete(stream)
        p.srem(k.webhook_streams, owner)
        p.delete(k.webhook_claim(owner))
        await self._do(p.execute())
        return True
