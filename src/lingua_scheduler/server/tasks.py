"""Background tasks of one instance: the fleet-view reconciler and the liveness scan.

The reconciler is the single writer of derived state: it drains the registry's dirty set at most every
``fleet_view_interval_ms`` (coalescing bursts) and publishes a new view. The scan applies heartbeat and
warm-up timeouts, unless our own event loop is lagging.
"""

from __future__ import annotations

import asyncio
import logging

from lingua_scheduler.server.state import SchedulerState

log = logging.getLogger(__name__)


async def reconciler(state: SchedulerState) -> None:
    interval = state.config.scheduler.fleet_view_interval_ms / 1000.0
    while True:
        await asyncio.sleep(interval)
        try:
            stats = state.publisher.publish()
        except Exception:
            log.exception("fleet view publication failed")
            continue
        if stats is not None:
            state.metrics.fleet_view_lag.observe(stats.lag)
            # Nodes may have become ready or joined pools: jobs waiting for capacity get another try.
            state.runtime.pump()
            if stats.changed:
                log.debug(
                    "fleet view published",
                    extra={"version": state.publisher.view.version, "changed": stats.changed},
                )


async def liveness_scan(state: SchedulerState) -> None:
    interval = state.config.node_health.status_scan_interval_seconds
    while True:
        await asyncio.sleep(interval)
        outcome = state.registry.scan(state.loop_lag.recent_max)
        if outcome.suppressed:
            state.metrics.offline_suppressed.inc(outcome.suppressed)
            log.warning(
                "offline marking suppressed: event loop lagging",
                extra={"nodes": outcome.suppressed, "loop_lag_s": state.loop_lag.recent_max},
            )
        if outcome.transitions:
            state.apply_transitions(outcome.transitions)
            for t in outcome.transitions:
                log.info(
                    "node status changed",
                    extra={"node_id": t.node_id, "from": t.old.value, "to": t.new.value, "reason": t.reason},
                )
