"""The cluster shell: keeps this instance's view of the fleet in step with the other instances.

Owns the background tasks of multi-instance mode and the degraded state:

- publisher: owned nodes whose capabilities or status changed go to the store in one pipeline,
  coalesced every ``publish_interval_ms`` (a heartbeat that changes nothing costs no Redis call);
- ticker: once per ``tick_interval_seconds`` one call refreshes this instance's presence, the
  presence of all its nodes, a load summary of the nodes whose load moved and its sessions per
  limited tenant; it learns which instances died and takes over from them (their nodes leave the
  view; their jobs fail explicitly), and how many sessions each tenant holds elsewhere (the tenant
  limits count them);
- feed: applies other instances' node records and load batches as they arrive (blocking stream read
  on its own connection), with a full directory resync every ``resync_interval_seconds``;
- inbox: executes messages addressed to this instance (dispatches to its nodes, cancellations,
  forwarded job messages) and acknowledges them;
- writer (server/cluster/store_writer.py): the small writes nobody waits for (messages to other instances,
  reservation commits and releases, inbox acks) leave in one pipeline per event-loop turn.

When the store is unreachable, or answers but refuses writes (Redis out of memory), the instance is
*degraded*: it keeps serving the nodes and sessions connected to it with local state only (remote
nodes are taken out of the view, dispatch skips reservations), reports it on /health, /ready and in
``lingua_store_degraded``, and resynchronises everything when the store answers again -- including
its reservations: releases and commits lost meanwhile, and reservations taken by calls whose answer
never came, are replaced by the ones its live jobs hold (``_resync_reservations``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from lingua_scheduler.clock import Clock
from lingua_scheduler.config import ClusterConfig, Config
from lingua_scheduler.core.events import JobMessage, RemoteDispatchFailed
from lingua_scheduler.core.fleet_view import FleetViewPublisher
from lingua_scheduler.core.registry import NodeEntry, Registry
from lingua_scheduler.core.status import NodeStatus
from lingua_scheduler.protocol.cluster import (
    CancelOnNode,
    Dispatch,
    DispatchFailed,
    InboxMessage,
    LoadBatch,
    NodeAdminReply,
    NodeAdminRequest,
    NodeJobMessage,
    NodeRecord,
    ResumeHandover,
    ResumeRequest,
    RoomOutput,
    RoomState,
    SessionOutput,
)
from lingua_scheduler.protocol.node import JobResult
from lingua_scheduler.server.auth import AuthService
from lingua_scheduler.server.cluster.resume import Resumer
from lingua_scheduler.server.cluster.store_writer import StoreWriter
from lingua_scheduler.server.latency import LatencyWindow
from lingua_scheduler.server.metrics import Metrics
from lingua_scheduler.server.runtime import Runtime
from lingua_scheduler.server.sessions import Session
from lingua_scheduler.store.base import JobRecord, PoolDelta, StateStore, StoreUnavailable
from lingua_scheduler.store.redis_store import RedisStore

#: carries out an operator's node action here: (node id, action, reason) -> (HTTP status, body)
NodeAction = Callable[[str, str, str], Awaitable[tuple[int, dict[str, Any]]]]

log = logging.getLogger(__name__)

RETRY_DELAY = 0.25
#: node actions this instance may be waiting for at once (operators, not traffic: a small bound)
ADMIN_WAITING = 64
#: request ids of forwarded node actions remembered to ignore a re-delivered inbox entry
ADMIN_SEEN = 1024
#: a load figure must move this much (percentage points) to be worth a load-batch entry
LOAD_EPSILON = 5.0


def make_instance_id(configured: str) -> str:
    if configured and configured != "auto":
        return configured
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def make_store(cfg: ClusterConfig, instance_id: str, clock: Clock | None = None) -> RedisStore:
    return RedisStore(
        cfg.redis_url,
        instance_id=instance_id,
        prefix=cfg.key_prefix,
        cluster=cfg.redis_cluster,
        op_timeout=cfg.op_timeout_seconds,
        max_deliveries=cfg.inbox_max_deliveries,
        clock=clock,
    )


class Cluster:
    def __init__(
        self,
        store: StateStore,
        cfg: ClusterConfig,
        *,
        config: Config,
        clock: Clock,
        registry: Registry,
        publisher: FleetViewPublisher,
        auth: AuthService,
        metrics: Metrics,
        sessions: Mapping[str, Session],
        runtime: Runtime,
        cross_instance_window: LatencyWindow,
        node_actions: tuple[str, ...],
        node_action: NodeAction,
    ) -> None:
        """Each keyword argument is one thing of the instance the cluster shell reads or feeds:
        ``sessions`` this instance's open sessions (read only), ``runtime`` its job engine's runtime,
        ``node_actions``/``node_action`` the operators' node actions it carries out for other instances
        (server/http/admin.py's: admin reaches the cluster, not the other way round)."""
        self.config = config
        self.clock = clock
        self.registry = registry
        self.publisher = publisher
        self.auth = auth
        self.metrics = metrics
        self.sessions = sessions
        self.runtime = runtime
        self.cross_instance_window = cross_instance_window
        self.node_actions = node_actions
        self.node_action = node_action
        self.store = store
        self.cfg = cfg
        self.instance_id = store.instance_id
        self.degraded = True  # until the first successful sync
        self.degraded_since: float | None = clock.monotonic()
        self._wake = asyncio.Event()
        self._feed_id = "$"
        #: node id -> pools last published for it (to send SADD/SREM deltas only)
        self._published_pools: dict[str, tuple[str, ...]] = {}
        #: node id -> load figures last sent in a batch
        self._sent_loads: dict[str, tuple[int, float, float, float]] = {}
        #: job records waiting to be written (latest state per job)
        self._job_writes: dict[str, JobRecord] = {}
        #: attempts given to our nodes on behalf of another instance, running (counted as load on
        #: their node; a graceful shutdown waits for them): (job id, attempt) -> (reply_to, node, since)
        self.remote_jobs: dict[tuple[str, int], tuple[str, str, float]] = {}
        #: attempts of that kind whose owner cancelled them: kept (not counted as load) so that a late
        #: success still reaches the owner, who decides whether it wins (the first valid result does)
        self._cancelled_routes: dict[tuple[str, int], tuple[str, str, float]] = {}
        #: job id -> its attempts in either table (a job's routes found without a scan)
        self._route_attempts: dict[str, set[int]] = {}
        #: job messages of our nodes dropped here: no route for that (job, attempt) from that node
        self.stale_routes = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._resynced = asyncio.Event()
        self.degraded_episodes = 0
        #: why the store was last found unusable (shown on /health while degraded)
        self.degraded_reason = ""
        #: store calls that failed: "unreachable" (no answer in time, connection refused) or
        #: "refused" (Redis answered with an error: out of memory, read-only, ...)
        self.store_failures: dict[str, int] = {"unreachable": 0, "refused": 0}
        #: dead instances taken over (their presence expired)
        self.takeovers = 0
        #: stalls of the store found by tick.lua (no instance ticked), which extended every presence
        self.stalls = 0
        #: successful ticks still to re-sync this instance's reservations (after a store failure: two,
        #: the second for calls Redis ran late, after it came back)
        self._resv_resync_ticks = 0
        #: nodes where a reservation of ours may be wrong in the store (a call failed)
        self._resv_unsure: set[str] = set()
        #: members removed / added by the re-syncs
        self.resv_resynced = {"removed": 0, "added": 0}
        self.writer = StoreWriter(store, self.suspect_soon)
        #: node actions forwarded to other instances and not answered yet: request id -> answer
        self._admin_waiting: dict[str, asyncio.Future[tuple[int, dict[str, Any]]]] = {}
        #: ids of node actions other instances asked of us lately (an inbox entry can come twice)
        self._admin_seen: OrderedDict[str, None] = OrderedDict()
        self._admin_tasks: set[asyncio.Task[None]] = set()
        #: tenant id -> this instance's sessions of it admitted in the shared store (a session that
        #: ended is released at the next tick, or by the next admission of its tenant here)
        self._tenant_members: dict[str, set[str]] = {}
        #: sessions whose admission is in flight
        self._admitting: set[str] = set()
        #: sessions removed / added by the re-syncs of the tenants' counts
        self.sessions_resynced = {"removed": 0, "added": 0}
        #: times a tick found this instance's presence gone from the store (restarted empty, or taken
        #: over while it lived) and published everything it owns again
        self.republished = 0
        #: whether a tick has succeeded since the last (re)connection (a missing presence before
        #: that is the normal start, not a loss)
        self._ticked = False
        registry.on_local_change = self._wake.set
        auth.shared_admission = self.admit_session
        #: resuming sessions across instances (server/cluster/resume.py)
        self.resumer = Resumer(clock, config.session, sessions, self.instance_id, store, self.writer)
        #: the shared rooms (server/cluster/room_cluster.py), set by the app: room messages of the inbox, and
        #: an instance that died (its members leave their rooms)
        self.on_room_message: Callable[[RoomState | RoomOutput], None] | None = None
        self.on_instance_dead: Callable[[str], None] | None = None

    # --- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        # named "cluster-<instance>-<loop>": shown when a shutdown hangs, and found by name in tests
        self._tasks = [
            asyncio.create_task(self._supervise(body, name), name=self.task_name(name))
            for body, name in (
                (self._publisher, "publisher"),
                (self._ticker, "ticker"),
                (self._feed, "feed"),
                (self._inbox, "inbox"),
            )
        ]

    def task_name(self, loop: str) -> str:
        """The asyncio task name of one of this instance's loops (publisher, ticker, feed, inbox)."""
        return f"cluster-{self.instance_id}-{loop}"

    async def stop(self) -> None:
        await self._stop_loops()
        await self.writer.drain(self.cfg.op_timeout_seconds)
        await self.store.close()

    async def _stop_loops(self) -> None:
        """Cancel the loops and wait until they are gone. A cancellation can be lost: on Python 3.11
        ``asyncio.wait_for`` returns the inner result when it completes just as the outer task is
        cancelled (gh-86296), and a store call is a ``wait_for``; the loop then goes on (possibly
        to wait for a resync that never comes). So cancel again until each loop has ended."""
        pending = set(self._tasks)
        self._tasks = []
        while pending:
            for t in pending:
                t.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.5)

    # --- graceful shutdown (server/shutdown.py) ------------------------------------------------------

    async def refuse_new_work(self) -> None:
        """A graceful shutdown began: mark this instance's nodes not ready in the shared reservation
        state, so other instances stop placing work on them (their reservations are refused with
        NOT_READY and they pick another node) while the jobs already running there go on. The node
        records are not republished: a status change there would make the others fail those jobs
        over at once. Best effort: with the store unreachable there is nothing to tell."""
        if self.degraded:
            return
        status = {
            e.node_id: NodeStatus.DRAINING.value
            for e in self.registry.local_nodes()
            if e.status is not NodeStatus.OFFLINE
        }
        try:
            await self.store.publish([], [], [], status)
        except StoreUnavailable as exc:
            log.warning("could not mark nodes draining for shutdown", extra={"reason": str(exc)})

    async def leave(self) -> None:
        """Last step of a graceful shutdown: stop the loops, write the final node statuses and job
        records, and remove this instance from the shared state now. The other instances then drop
        its nodes at once (failing over whatever of theirs still ran there) instead of waiting
        ``presence_ttl_seconds`` to notice a silent instance."""
        await self._stop_loops()
        if self.degraded:
            log.warning("leaving with the shared store unreachable: other instances take over on expiry")
            return
        # Results on their way to other instances and the last releases go out first.
        await self.writer.drain(self.cfg.op_timeout_seconds)
        try:
            await self._publish_changes()
            if self._job_writes:
                writes, self._job_writes = list(self._job_writes.values()), {}
                await self.store.save_jobs(writes, int(self.config.jobs.retention_seconds) + 60)
            await self.store.forget_instance(self.instance_id)
        except StoreUnavailable as exc:
            log.warning("could not leave the shared store cleanly", extra={"reason": str(exc)})
        else:
            log.info("instance left the cluster", extra={"instance": self.instance_id})

    async def _supervise(self, body: object, name: str) -> None:
        """Run one loop forever: a failing store makes the instance degraded, never kills the task."""
        while True:
            try:
                await body()  # type: ignore[operator]
            except asyncio.CancelledError:
                raise
            except StoreUnavailable as exc:
                await self.suspect(f"{name}: {exc}", refused=exc.refused)
                await asyncio.sleep(RETRY_DELAY)
            except Exception:
                log.exception("cluster task failed", extra={"task": name})
                await asyncio.sleep(RETRY_DELAY)

    async def suspect(self, why: str, refused: bool = False) -> None:
        """A store call failed. Degrade only if the store really is unusable: after a Redis restart
        every pooled connection fails once, and that alone is not an outage. The probe is a write
        (``StateStore.ping``): a Redis that answers but refuses writes is an outage too. Either way
        our reservations may be wrong in the store now: re-sync them on the next ticks."""
        self.store_failures["refused" if refused else "unreachable"] += 1
        self._resv_resync_ticks = 2
        if self.degraded:
            return
        try:
            await self.store.ping()
        except StoreUnavailable as exc:
            self._set_degraded(why if refused or not exc.refused else f"{why}; {exc}")
        else:
            log.info("transient store error", extra={"reason": why})

    def suspect_soon(self, exc: StoreUnavailable) -> None:
        asyncio.get_running_loop().create_task(self.suspect(str(exc), refused=exc.refused))

    def reservation_unsure(self, node_id: str) -> None:
        """A reservation call for ``node_id`` failed: whether it was taken is not known."""
        self._resv_unsure.add(node_id)

    def _set_degraded(self, why: str) -> None:
        if self.degraded:
            return
        self.degraded = True
        self.degraded_since = self.clock.monotonic()
        self.degraded_episodes += 1
        self.degraded_reason = why
        self._resynced.clear()
        log.warning("shared store unusable: serving local traffic only (%s)", why, extra={"reason": why})
        # Remote nodes cannot be reached or reserved now: take them out of the view.
        for node_id in [e.node_id for e in self.registry if e.owner is not None]:
            self._drop_remote(node_id)

    async def _recover(self) -> None:
        """The store answers and takes writes (again): register our inbox, republish everything we
        own, resync. Reservations and tenant sessions are re-synced by the next ticks."""
        await self.store.ping()
        await self.store.start()
        await self._republish()
        records, last_id = await self.store.directory()
        self._apply_directory(records)
        self._feed_id = last_id
        self._ticked = False
        if self.degraded:
            log.info("shared store reachable: multi-instance mode", extra={"instance": self.instance_id})
        self.degraded = False
        self.degraded_since = None
        self.degraded_reason = ""
        self._resv_resync_ticks = max(self._resv_resync_ticks, 2)
        self._resynced.set()

    async def _republish(self) -> None:
        """Publish every node we own again, whole (records, status for reservations, pool sets)."""
        registry = self.registry
        registry.changed_local.update(e.node_id for e in registry.local_nodes())
        self._published_pools.clear()
        await self._publish_changes()

    async def _store_lost_us(self) -> None:
        """A tick found our presence gone while we lived: the store restarted empty (it lost every
        key), or another instance took us over. Put back what we own -- the inbox group (reading what
        was sent to it since), our nodes, and on the next two ticks our reservations and tenant
        sessions -- instead of waiting for the next change of each."""
        self.republished += 1
        log.warning("shared store lost this instance's state: publishing it again")
        await self.store.start(from_start=True)
        await self._republish()
        self._resv_resync_ticks = 2

    # --- publisher ----------------------------------------------------------------------------------

    async def _publisher(self) -> None:
        interval = self.cfg.publish_interval_ms / 1000
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self.degraded:
                await self._publish_changes()
            await asyncio.sleep(interval)  # coalesce bursts of changes into one pipeline

    def record_of(self, entry: NodeEntry) -> NodeRecord:
        return NodeRecord(
            node_id=entry.node_id,
            owner=self.instance_id,
            epoch_ms=entry.registered_wall_ms,
            version=entry.version_no,
            status=entry.status.value,
            hardware=entry.hardware,
            accept_public_jobs=entry.accept_public_jobs,
            features=sorted(entry.features),
            services=entry.services,
            by_type=entry.by_type,
            models=entry.models,
            languages=entry.languages,
            sends_acks=entry.sends_acks,
            turn_dialect=entry.turn_dialect,
            max_concurrent_jobs=entry.max_concurrent_jobs,
        )

    async def _publish_changes(self) -> None:
        registry = self.registry
        changed, registry.changed_local = registry.changed_local, set()
        if not changed:
            return
        records: list[NodeRecord] = []
        pools: list[PoolDelta] = []
        status: dict[str, str] = {}
        view = self.publisher.view
        for node_id in changed:
            entry = registry.nodes.get(node_id)
            if entry is None or entry.owner is not None:
                continue
            records.append(self.record_of(entry))
            status[node_id] = entry.status.value
            nv = view.get(node_id)
            now_pools = nv.pools if nv is not None and entry.status is not NodeStatus.OFFLINE else ()
            before = self._published_pools.get(node_id, ())
            if now_pools != before:
                pools.append(
                    PoolDelta(
                        node_id,
                        tuple(p for p in now_pools if p not in before),
                        tuple(p for p in before if p not in now_pools),
                    )
                )
                self._published_pools[node_id] = now_pools
        try:
            await self.store.publish(records, [], pools, status)
        except StoreUnavailable:
            registry.changed_local |= changed  # publish again once the store is back
            raise

    # --- ticker -------------------------------------------------------------------------------------

    async def _ticker(self) -> None:
        while True:
            if self.degraded:
                await self._recover()
            owned = [e.node_id for e in self.registry.local_nodes() if e.status is not NodeStatus.OFFLINE]
            ttl_ms = int(self.cfg.presence_ttl_seconds * 1000)
            auth = self.auth
            here = auth.tenant_sessions(s.tenant_id for s in self.sessions.values())
            tick = await self.store.tick(owned, self._load_batch(), ttl_ms, here)
            if tick.presence_lost and self._ticked:
                await self._store_lost_us()
            self._ticked = True
            if tick.stalled_ms:
                self.stalls += 1
                log.warning(
                    "shared store stalled: no instance could tick, every presence extended",
                    extra={"stalled_ms": tick.stalled_ms},
                )
            auth.share_limits(here, tick.tenant_sessions)
            for instance in tick.dead:
                await self._take_over(instance)
            if self._resv_resync_ticks:
                await self._resync_sessions()  # before the reservations: they count the pass down
            else:
                await self._release_ended_sessions()
            if self._resv_resync_ticks or self._resv_unsure or self.writer.unsure_nodes:
                await self._resync_reservations()
            if self._job_writes:
                writes, self._job_writes = list(self._job_writes.values()), {}
                await self.store.save_jobs(writes, int(self.config.jobs.retention_seconds) + 60)
            await asyncio.sleep(self.cfg.tick_interval_seconds)

    async def _resync_reservations(self) -> None:
        """Make the store hold exactly the reservations our live attempts hold, on every node where
        they run and every node where a reservation call of ours failed. Runs on the ticks after a
        store failure: a release lost then would otherwise hold its slot until the reservation
        expired (the execution timeout: a minute by default), and every instance would see a full
        node that is idle."""
        held = self.runtime.engine.held_reservations()
        unsure = self._resv_unsure | self.writer.unsure_nodes
        self._resv_unsure, self.writer.unsure_nodes = set(), set()
        for node_id in unsure:
            held.setdefault(node_id, [])
        self._resv_resync_ticks = max(0, self._resv_resync_ticks - 1)
        try:
            removed, added = await self.store.resync_reservations(held)
        except StoreUnavailable:
            self._resv_unsure |= unsure
            raise
        self.resv_resynced["removed"] += removed
        self.resv_resynced["added"] += added
        if removed or added:
            log.info(
                "reservations re-synced with the live jobs",
                extra={"nodes": len(held), "removed": removed, "added": added},
            )
            self.runtime.pump()  # slots freed for jobs waiting here

    # --- sessions of tenants with a cluster-wide session cap -----------------------------------------

    async def admit_session(self, tenant_id: str, session_id: str, cap: int) -> bool | None:
        """Admit a session of ``tenant_id`` under its cluster-wide ``cap`` (server/auth.py): one atomic
        step of the store, which also releases our sessions of the tenant that ended. None when the
        store is unusable (the caller then decides with what it last learnt)."""
        if self.degraded:
            return None
        members = self._tenant_members.setdefault(tenant_id, set())
        if session_id in members:
            return True  # counted already
        ended = [s for s in members if s not in self.sessions and s not in self._admitting]
        # released by this call only: the store counts, so a release running meanwhile must not see
        # them again (if the call fails, the re-sync after it repairs the count)
        members.difference_update(ended)
        # Counted as ours from now on: a re-sync meanwhile keeps it, and if it was admitted by a call
        # whose answer never came, the re-sync after the failure removes it unless it opened.
        members.add(session_id)
        self._admitting.add(session_id)
        try:
            admitted, _ = await self.store.admit_session(tenant_id, session_id, cap, ended)
        except StoreUnavailable as exc:
            await self.suspect(str(exc), refused=exc.refused)
            return None
        finally:
            self._admitting.discard(session_id)
        if not admitted:
            members.discard(session_id)
        return admitted

    def _ended_sessions(self) -> dict[str, list[str]]:
        live = self.sessions
        return {
            t: [s for s in m if s not in live and s not in self._admitting]
            for t, m in self._tenant_members.items()
        }

    async def _release_ended_sessions(self) -> None:
        ended = {t: ids for t, ids in self._ended_sessions().items() if ids}
        if not ended:
            return
        # forgotten before the call: released once (a failure is repaired by the re-sync after it)
        for tenant_id, ids in ended.items():
            self._tenant_members[tenant_id].difference_update(ids)
        await self.store.release_sessions(ended)

    async def _resync_sessions(self) -> None:
        """Make the store's session sets hold exactly our live sessions of each capped tenant: after a
        store failure (an admission whose answer never came, a release lost) or a store that lost its
        data (every admission then has to be put back, or the cap would admit past them)."""
        auth = self.auth
        live: dict[str, list[str]] = {t: [] for t in self._tenant_members}
        for session in self.sessions.values():
            if auth.admission_is_shared(session.tenant_id) and session.tenant_id is not None:
                live.setdefault(session.tenant_id, []).append(session.session_id)
        # an admission in flight may be counted already: keep it (released next tick if refused)
        for tenant_id, members in self._tenant_members.items():
            live[tenant_id] += [s for s in members if s in self._admitting]
        if not live:
            return
        removed, added = await self.store.resync_sessions(live)
        self._tenant_members = {t: set(ids) for t, ids in live.items()}
        self.sessions_resynced["removed"] += removed
        self.sessions_resynced["added"] += added
        if removed or added:
            log.info("tenant sessions re-synced", extra={"removed": removed, "added": added})

    def _load_batch(self) -> LoadBatch | None:
        """Load of owned nodes that moved: our own jobs plus those we run for other instances."""
        loads: dict[str, tuple[int, float, float, float]] = {}
        for_others: dict[str, int] = {}
        now = self.clock.monotonic()
        exec_max = self.config.jobs.exec_timeout_max_ms / 1000
        for key, (_, node_id, since) in list(self.remote_jobs.items()):
            if since < now - 2 * exec_max:
                self._drop_route(*key)  # its result never came: the owner has failed it over long ago
            else:
                for_others[node_id] = for_others.get(node_id, 0) + 1
        for key, (_, _, since) in list(self._cancelled_routes.items()):
            if since < now - exec_max:
                self._drop_route(*key)  # a result this late would find the job answered long ago
        local = self.registry.local_nodes()
        if len(self._sent_loads) > len(local):
            # Nodes removed, forgotten or now owned by another instance: their figures go with them.
            here = {entry.node_id for entry in local}
            for node_id in [n for n in self._sent_loads if n not in here]:
                del self._sent_loads[node_id]
        for entry in local:
            if entry.status is NodeStatus.OFFLINE:
                continue
            ld = entry.load
            fig = (
                ld.effective + for_others.get(entry.node_id, 0),
                ld.cpu,
                ld.gpu if ld.gpu is not None else -1.0,
                ld.mem,
            )
            last = self._sent_loads.get(entry.node_id)
            if (
                last is None
                or last[0] != fig[0]
                or any(abs(a - b) >= LOAD_EPSILON for a, b in zip(last[1:], fig[1:], strict=True))
            ):
                loads[entry.node_id] = fig
                self._sent_loads[entry.node_id] = fig
        return LoadBatch(owner=self.instance_id, loads=loads) if loads else None

    async def _take_over(self, instance: str) -> None:
        """Another instance died: its nodes leave the view, its live jobs end explicitly."""
        log.warning("instance presence expired: taking over", extra={"instance": instance})
        self.takeovers += 1
        if self.on_instance_dead is not None:
            self.on_instance_dead(instance)
        for node_id in self.registry.remote_nodes_of(instance):
            self._drop_remote(node_id)
        # Jobs our nodes run for it have nobody to answer to: stop them, and forget them, or they would
        # count as load on our nodes (in the load batches) until the horizon of ``_load_batch``. This
        # covers jobs too recent to be in its job records (those are written once per tick).
        # The cancels go out once the dead instance's records say failed (finally: even if the store
        # fails meanwhile), so a node that sees its cancel never finds the job still live in the store.
        cancels: list[tuple[str, str]] = []
        for (job_id, attempt), (reply_to, node_id, _) in list(self.remote_jobs.items()):
            if reply_to == instance:
                self._drop_route(job_id, attempt)
                cancels.append((node_id, job_id))
        for key, (reply_to, _, _) in list(self._cancelled_routes.items()):
            if reply_to == instance:
                self._drop_route(*key)
        try:
            await self.store.forget_instance(instance)
            orphans = await self.store.jobs_of(instance)
            failed = []
            for job in orphans:
                if job.node_id is not None:
                    entry = self.registry.nodes.get(job.node_id)
                    if entry is not None and entry.owner is None:
                        cancels.append((job.node_id, job.job_id))
                failed.append(
                    JobRecord(job.job_id, "failed", job.attempt, job.node_id, instance, job.session_id, True)
                )
            if failed:
                await self.store.save_jobs(failed, int(self.config.jobs.retention_seconds) + 60)
                log.warning(
                    "jobs of a dead instance failed explicitly",
                    extra={"instance": instance, "jobs": len(failed)},
                )
        finally:
            for node_id, job_id in dict.fromkeys(cancels):
                self.runtime.cancel_on_local_node(node_id, job_id, "owner instance died")

    def _drop_remote(self, node_id: str) -> None:
        if self.registry.remove_remote(node_id) is not None:
            self.runtime.node_lost(node_id)

    # --- feed ---------------------------------------------------------------------------------------

    async def _feed(self) -> None:
        while True:
            if self.degraded:
                await self._resynced.wait()
            loop = asyncio.get_running_loop()
            next_resync = loop.time() + self.cfg.resync_interval_seconds
            while loop.time() < next_resync:
                for change in await self.store.changes(self._feed_id, self.cfg.stream_block_ms):
                    self._feed_id = change.entry_id
                    self._apply(change.kind, change.record, change.loads, change.node_id)
            records, last_id = await self.store.directory()
            self._apply_directory(records)
            self._feed_id = last_id

    def _apply(
        self, kind: str, record: NodeRecord | None, loads: LoadBatch | None, node_id: str | None
    ) -> None:
        registry = self.registry
        if kind == "node" and record is not None and record.owner != self.instance_id:
            change = registry.upsert_remote(record)
            if change is not None and change[1] is not NodeStatus.READY:
                self.runtime.node_lost(record.node_id)
        elif kind == "load" and loads is not None and loads.owner != self.instance_id:
            for nid, (running, cpu, gpu, mem) in loads.loads.items():
                registry.remote_load(nid, running, cpu, gpu, mem)
            self.runtime.pump()  # capacity may have freed up for jobs waiting here
        elif kind == "gone" and node_id is not None:
            entry = registry.nodes.get(node_id)
            if entry is not None and entry.owner is None:
                registry.changed_local.add(node_id)  # still ours: put it back in the directory
                self._wake.set()
            else:
                self._drop_remote(node_id)

    def _apply_directory(self, records: list[NodeRecord]) -> None:
        seen = set()
        for rec in records:
            seen.add(rec.node_id)
            self._apply("node", rec, None, None)
        for entry in [e for e in self.registry if e.owner is not None and e.node_id not in seen]:
            self._drop_remote(entry.node_id)

    # --- inbox --------------------------------------------------------------------------------------

    async def _inbox(self) -> None:
        while True:
            if self.degraded:
                await self._resynced.wait()
            entries = await self.store.receive(self.cfg.stream_block_ms, 256)
            done = []
            for entry_id, message in entries:
                if message is None:
                    log.warning("undecodable inbox entry dropped", extra={"entry_id": entry_id})
                else:
                    self.handle(message)
                done.append(entry_id)
            self.writer.ack(done)

    def handle(self, message: InboxMessage) -> None:
        runtime = self.runtime
        if isinstance(message, Dispatch):
            if message.sent_at_ns:
                hop = max(0.0, (time.time_ns() - message.sent_at_ns) / 1e9)
                self.metrics.cross_instance_dispatch.observe(hop)
                self.cross_instance_window.record(hop)
            if runtime.deliver_to_local_node(message.node_id, message.assign):
                self._add_route(
                    message.assign.job_id, message.assign.attempt_id, message.reply_to, message.node_id
                )
            else:
                self.writer.send(
                    message.reply_to,
                    DispatchFailed(
                        job_id=message.assign.job_id,
                        attempt_id=message.assign.attempt_id,
                        node_id=message.node_id,
                        reason=f"node {message.node_id} is not connected to {self.instance_id}",
                    ),
                )
        elif isinstance(message, CancelOnNode):
            self._cancel_routes(message.cancel.job_id, message.node_id)
            runtime.deliver_to_local_node(message.node_id, message.cancel)
        elif isinstance(message, DispatchFailed):
            runtime.handle(
                RemoteDispatchFailed(message.job_id, message.attempt_id, message.node_id, message.reason)
            )
        elif isinstance(message, NodeJobMessage):
            runtime.on_node_message(message.node_id, message.message)
        elif isinstance(message, NodeAdminRequest):
            if message.request_id not in self._admin_seen:
                self._admin_seen[message.request_id] = None
                if len(self._admin_seen) > ADMIN_SEEN:
                    self._admin_seen.popitem(last=False)
                task = asyncio.get_running_loop().create_task(self._node_admin(message))
                self._admin_tasks.add(task)
                task.add_done_callback(self._admin_tasks.discard)
        elif isinstance(message, ResumeRequest):
            self.resumer.on_request(message)
        elif isinstance(message, ResumeHandover):
            self.resumer.on_handover(message)
        elif isinstance(message, SessionOutput):
            self.resumer.on_output(message)
        elif isinstance(message, (RoomState, RoomOutput)):
            if self.on_room_message is not None:
                self.on_room_message(message)
        elif isinstance(message, NodeAdminReply):
            waiting = self._admin_waiting.get(message.request_id)
            if waiting is not None and not waiting.done():
                waiting.set_result((message.status, dict(message.body)))

    # --- node actions of operators, across instances (server/http/admin.py) ------------------------------

    async def node_action_at(
        self, owner: str, node_id: str, action: str, reason: str, operator: str, timeout: float
    ) -> tuple[int, dict[str, Any]]:
        """Ask instance ``owner`` to drain / undrain / disconnect its node ``node_id``; its answer.
        Raises ``TimeoutError`` when it does not answer in time, ``StoreUnavailable`` when the request
        could not be sent."""
        if len(self._admin_waiting) >= ADMIN_WAITING:
            raise StoreUnavailable("too many node actions waiting for other instances")
        request_id = secrets.token_hex(8)
        answer: asyncio.Future[tuple[int, dict[str, Any]]] = asyncio.get_running_loop().create_future()

        def lost() -> None:
            if not answer.done():
                answer.set_exception(StoreUnavailable("the request could not be written"))

        self._admin_waiting[request_id] = answer
        try:
            request = NodeAdminRequest(
                request_id=request_id,
                reply_to=self.instance_id,
                node_id=node_id,
                action=action,
                reason=reason,
                operator=operator,
            )
            self.writer.send(owner, request, on_fail=lost)
            return await asyncio.wait_for(answer, timeout)
        finally:
            del self._admin_waiting[request_id]

    async def _node_admin(self, message: NodeAdminRequest) -> None:
        if message.action in self.node_actions:
            log.info(
                "node action asked by another instance",
                extra={
                    "action": message.action,
                    "node_id": message.node_id,
                    "from": message.reply_to,
                    "operator": message.operator,
                },
            )
            status, body = await self.node_action(
                message.node_id, message.action, message.reason or "disconnected by operator"
            )
        else:
            status, body = (
                400,
                {"code": "INVALID_ACTION", "message": f"unknown node action {message.action!r}"},
            )
        self.writer.send(
            message.reply_to, NodeAdminReply(request_id=message.request_id, status=status, body=body)
        )

    # --- routes of other instances' attempts on our nodes ------------------------------------------

    def _add_route(self, job_id: str, attempt: int, reply_to: str, node_id: str) -> None:
        key = (job_id, attempt)
        self._cancelled_routes.pop(key, None)
        self.remote_jobs[key] = (reply_to, node_id, self.clock.monotonic())
        self._route_attempts.setdefault(job_id, set()).add(attempt)

    def _drop_route(self, job_id: str, attempt: int) -> None:
        key = (job_id, attempt)
        self.remote_jobs.pop(key, None)
        self._cancelled_routes.pop(key, None)
        attempts = self._route_attempts.get(job_id)
        if attempts is not None:
            attempts.discard(attempt)
            if not attempts:
                del self._route_attempts[job_id]

    def _route(self, job_id: str, attempt: int) -> tuple[str, str, float] | None:
        key = (job_id, attempt)
        return self.remote_jobs.get(key) or self._cancelled_routes.get(key)

    def _cancel_routes(self, job_id: str, node_id: str) -> None:
        """The owner cancelled the job on ``node_id`` (that attempt was abandoned, or the job ended):
        the attempt no longer counts as load here, and its route stays for a late result only."""
        now = self.clock.monotonic()
        for attempt in list(self._route_attempts.get(job_id, ())):
            route = self.remote_jobs.get((job_id, attempt))
            if route is not None and route[1] == node_id:
                del self.remote_jobs[(job_id, attempt)]
                self._cancelled_routes[(job_id, attempt)] = (route[0], node_id, now)

    def forward(self, node_id: str, message: JobMessage) -> None:
        """A job message from our node ``node_id`` for a job this instance does not own. It goes to
        the job's owner only through the route of an attempt given to that very node, and a result
        removes that route alone: nothing a node sends touches the route of an attempt on another
        node (a late result of an abandoned attempt once took the new attempt's route with it, and
        the new node's answers were dropped). A late result of an earlier attempt still reaches the
        owner, which decides whether it counts (the first valid result wins). Anything else -- an
        attempt of another node, one never given to this node, a job never routed here -- is dropped
        here as stale and counted. (The engine has taken the result off the node's reported load.)"""
        job_id = message.job_id
        attempt: int | None = message.attempt_id
        if attempt is None:  # asr_partial may leave it out: this node's latest attempt of the job
            mine = [
                a
                for a in self._route_attempts.get(job_id, ())
                if (r := self._route(job_id, a)) is not None and r[1] == node_id
            ]
            attempt = max(mine, default=None)
        route = self._route(job_id, attempt) if attempt is not None else None
        is_result = isinstance(message, JobResult)
        if route is None or route[1] != node_id or attempt is None:
            self.stale_routes += 1
            self.metrics.stale_messages.inc()
            log.info(
                "job message without a route from its node dropped",
                extra={"node_id": node_id, "job_id": job_id, "attempt": attempt},
            )
            return
        if is_result:
            self._drop_route(job_id, attempt)
        self.writer.send(route[0], NodeJobMessage(node_id=node_id, message=message))

    def job_changed(self, record: JobRecord) -> None:
        self._job_writes[record.job_id] = record
