"""The operators' view of a multi-instance deployment: every instance's figures, and their sums.

Owns ``ClusterView`` and ``GET /api/v1/cluster``. Once a second each instance writes its figures
(address, its own nodes by status, sessions, jobs in flight and waiting, its last-minute rates) into
one field of the ``{P:fleet}:instance_info`` hash and, in the same round trip, reads every instance's
figures and presence (``RedisStore.share_instance_info``). From that cached reading:

- ``/api/v1/stats`` gains ``cluster`` (Redis mode only): the instances alive and the sums of their
  sessions, jobs and rates. The rest of a stats body is this instance's: its heartbeats per second
  are those of the nodes connected to it, which on an instance whose nodes are all on another one is
  next to nothing;
- ``GET /api/v1/cluster`` lists each instance (id, address, presence age, nodes, sessions, jobs in
  flight, inbox depth and dead letters: read fresh, one pipelined XLEN pair per instance) and the
  store's health (this instance's reading of it: reachable, round trip, failures, stalls).

In the embedded mode the view is this one instance and no store. Must never: read anything per node,
or make the tick wait (it runs on its own timer; a failed write is retried the next second).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from aiohttp import web

from lingua_scheduler.core.status import NodeStatus
from lingua_scheduler.protocol import http as h
from lingua_scheduler.server.http import routes
from lingua_scheduler.server.http.http_io import build, json_response
from lingua_scheduler.server.http.stats import STATS, StatsAggregator
from lingua_scheduler.server.state import STATE, SchedulerState
from lingua_scheduler.store.base import StoreUnavailable
from lingua_scheduler.store.redis_store import RedisStore

log = logging.getLogger(__name__)

#: seconds between two writes of this instance's figures (and readings of the others')
INTERVAL = 1.0


class InstanceInfo(msgspec.Struct, kw_only=True):
    """One instance's figures, as it writes them (JSON in ``{P:fleet}:instance_info``)."""

    instance_id: str
    address: str
    #: wall time (ms, the shared clock) when written, and when the instance started
    at_ms: int
    started_at_ms: int
    #: its presence TTL (ms): a presence expiry minus it is the time of the instance's last tick
    presence_ttl_ms: int
    degraded: bool
    #: the nodes connected to it, by status
    nodes: dict[str, int]
    sessions: int
    jobs_inflight: int
    jobs_waiting: int
    heartbeats_per_second: float | None
    jobs_created_per_second: float | None
    jobs_completed_per_second: float | None


_dec = msgspec.json.Decoder(InstanceInfo)
_enc = msgspec.json.Encoder()


class ClusterView:
    def __init__(self, state: SchedulerState, stats: StatsAggregator) -> None:
        self.state = state
        self.stats = stats
        cluster = state.cluster
        self.store: RedisStore | None = (
            cluster.store if cluster is not None and isinstance(cluster.store, RedisStore) else None
        )
        self.instance_id = cluster.instance_id if cluster is not None else "embedded"
        #: the port bound and whether TLS is on: set by ``serve`` once bound (for the default address)
        self.port = state.config.server.port
        self.tls = bool(state.config.tls.cert_file)
        #: the last reading: (Redis TIME ms, [(instance, presence expiry ms)], {instance: figures})
        self.reading: tuple[int, list[tuple[str, int]], dict[str, InstanceInfo]] | None = None
        self.read_at = 0.0
        #: round trip of the last successful write-and-read, seconds
        self.round_trip: float | None = None

    @property
    def address(self) -> str:
        configured = self.state.config.cluster.advertise_address
        if configured:
            return configured
        host = self.state.config.server.host
        if host in ("", "0.0.0.0", "::"):
            host = socket.gethostname()
        shown = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls else 'http'}://{shown}:{self.port}"

    def figures(self) -> InstanceInfo:
        """This instance's figures now (O(statuses): counters only)."""
        state = self.state
        local = dict.fromkeys((s.value for s in NodeStatus), 0)
        for entry in state.registry.local_nodes():
            local[entry.status.value] += 1
        snap = self.stats.snapshot()
        per_s = snap["jobs"]["per_second"]
        cluster = state.cluster
        ttl = state.config.cluster.presence_ttl_seconds
        return InstanceInfo(
            instance_id=self.instance_id,
            address=self.address,
            at_ms=state.clock.wall_ms(),
            started_at_ms=int(state.started_at * 1000),
            presence_ttl_ms=int(ttl * 1000),
            degraded=cluster is not None and cluster.degraded,
            nodes=local,
            sessions=len(state.sessions),
            jobs_inflight=state.engine.store.inflight,
            jobs_waiting=state.engine.store.waiting,
            heartbeats_per_second=snap["heartbeats_per_second"],
            jobs_created_per_second=per_s["created"],
            jobs_completed_per_second=per_s["completed"],
        )

    async def share(self) -> None:
        """Write our figures, read everybody's (one round trip); raises ``StoreUnavailable``."""
        assert self.store is not None
        t0 = time.perf_counter()
        now, presence, raw = await self.store.share_instance_info(_enc.encode(self.figures()))
        self.round_trip = time.perf_counter() - t0
        infos: dict[str, InstanceInfo] = {}
        for instance, data in raw.items():
            try:
                infos[instance] = _dec.decode(data)
            except msgspec.DecodeError:
                log.warning("undecodable instance figures skipped", extra={"instance": instance})
        self.reading = (now, presence, infos)
        self.read_at = self.state.clock.monotonic()

    async def run(self) -> None:
        while True:
            cluster = self.state.cluster
            if cluster is not None and not cluster.degraded:
                try:
                    await self.share()
                except StoreUnavailable as exc:
                    log.debug("instance figures not shared: %s", exc)
            await asyncio.sleep(INTERVAL)

    def _alive(self) -> list[tuple[str, int, InstanceInfo | None]]:
        """(instance, presence expiry ms, figures) of the instances alive at the last reading."""
        if self.reading is None:
            return []
        now, presence, infos = self.reading
        return [(i, expiry, infos.get(i)) for i, expiry in presence if expiry > now]

    def totals(self) -> dict[str, Any] | None:
        """``/api/v1/stats`` ``cluster``: sums over the live instances (Redis mode; None otherwise)."""
        if self.store is None:
            return None
        alive = self._alive()
        figures = [f for _, _, f in alive if f is not None]

        def total(name: str) -> float | None:
            values = [getattr(f, name) for f in figures]
            return None if not values or None in values else round(sum(values), 3)

        return {
            "instances": len(alive),
            "age_seconds": None
            if self.reading is None
            else round(self.state.clock.monotonic() - self.read_at, 3),
            "sessions": sum(f.sessions for f in figures),
            "jobs_inflight": sum(f.jobs_inflight for f in figures),
            "jobs_waiting": sum(f.jobs_waiting for f in figures),
            "heartbeats_per_second": total("heartbeats_per_second"),
            "jobs_created_per_second": total("jobs_created_per_second"),
            "jobs_completed_per_second": total("jobs_completed_per_second"),
        }

    async def body(self) -> dict[str, Any]:
        """``GET /api/v1/cluster``; in Redis mode a fresh reading (raises ``StoreUnavailable``)."""
        state = self.state
        cluster = state.cluster
        if self.store is None or cluster is None:
            me = self.figures()
            return {
                "mode": "embedded",
                "instance_id": None,
                "instances": [self._row(me, 0.0, None, None)],
                "store": None,
                "totals": None,
            }
        await self.share()
        alive = self._alive()
        depths = await self.store.queue_depths([i for i, _, _ in alive])
        assert self.reading is not None
        now = self.reading[0]
        rows = []
        for instance, expiry, fig in alive:
            ttl = (
                fig.presence_ttl_ms
                if fig is not None
                else int(state.config.cluster.presence_ttl_seconds * 1000)
            )
            age = max(0.0, (now - (expiry - ttl)) / 1000)
            inbox, dlq = depths.get(instance, (0, 0))
            rows.append(self._row(fig, age, inbox, dlq, instance))
        return {
            "mode": "redis",
            "instance_id": cluster.instance_id,
            "instances": rows,
            "store": {
                "status": "degraded" if cluster.degraded else "ok",
                "reason": cluster.degraded_reason or None,
                "round_trip_seconds": None if self.round_trip is None else round(self.round_trip, 6),
                "failures": dict(cluster.store_failures),
                "stalls": cluster.stalls,
                "takeovers": cluster.takeovers,
                "degraded_episodes": cluster.degraded_episodes,
            },
            "totals": self.totals(),
        }

    def _row(
        self,
        fig: InstanceInfo | None,
        presence_age: float,
        inbox: int | None,
        dlq: int | None,
        instance: str | None = None,
    ) -> dict[str, Any]:
        """One instance; an instance alive but whose figures are not written yet shows nulls."""
        return {
            "instance_id": fig.instance_id if fig is not None else instance,
            "self": (fig.instance_id if fig is not None else instance) == self.instance_id,
            "address": fig.address if fig is not None else None,
            "presence_age_seconds": round(presence_age, 3),
            "degraded": fig.degraded if fig is not None else None,
            "uptime_seconds": None if fig is None else round(max(0, fig.at_ms - fig.started_at_ms) / 1000, 1),
            "nodes": fig.nodes if fig is not None else None,
            "nodes_total": sum(fig.nodes.values()) if fig is not None else None,
            "sessions": fig.sessions if fig is not None else None,
            "jobs_inflight": fig.jobs_inflight if fig is not None else None,
            "jobs_waiting": fig.jobs_waiting if fig is not None else None,
            "heartbeats_per_second": fig.heartbeats_per_second if fig is not None else None,
            "jobs_created_per_second": fig.jobs_created_per_second if fig is not None else None,
            "inbox_depth": inbox,
            "dead_letters": dlq,
        }


CLUSTER_VIEW: web.AppKey[ClusterView] = web.AppKey("cluster_view", ClusterView)


async def cluster(request: web.Request) -> web.Response:
    """Every instance and the store's health (see the module docstring)."""
    try:
        body = await request.app[CLUSTER_VIEW].body()
    except StoreUnavailable as exc:
        raise StoreUnavailable(f"the shared store did not answer: {exc}") from exc
    return json_response(build(h.Cluster, body))


def setup(app: web.Application) -> None:
    """The view, its route, the ``cluster`` totals of ``/api/v1/stats`` and (Redis mode) the loop that
    shares this instance's figures. After ``stats.setup`` and after the cluster shell exists."""
    view = ClusterView(app[STATE], app[STATS])
    app[CLUSTER_VIEW] = view
    app[STATS].cluster_totals = view.totals
    routes.register(app, "cluster", cluster)
    if view.store is None:
        return

    async def sharing(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(view.run(), name="cluster-view")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(sharing)
