"""Node status changes told to the node and to operators.

Owns ``NodeStatusNotices``: for each registry ``Transition`` it counts the new status
(``lingua_status_transitions_total``), records the notable ones in the operators' recent events and
sends the node its ``node_status`` (when its socket is here).

Must never: change a node's status itself (the registry does), or block.
"""

from __future__ import annotations

from collections.abc import Iterable

from lingua_scheduler.clock import Clock
from lingua_scheduler.core.registry import Registry, Transition
from lingua_scheduler.core.status import NodeStatus
from lingua_scheduler.protocol.node import NodeStatusMessage
from lingua_scheduler.server.events import NODE_STATUS, RecentEvents
from lingua_scheduler.server.links import local_outbox
from lingua_scheduler.server.metrics import Metrics

#: node status changes worth an operator's attention (joins and recoveries to ready are not)
_NOTABLE = frozenset({NodeStatus.OFFLINE, NodeStatus.DEGRADED, NodeStatus.DRAINING})


class NodeStatusNotices:
    def __init__(self, clock: Clock, registry: Registry, metrics: Metrics, events: RecentEvents) -> None:
        self.clock = clock
        self.registry = registry
        self.metrics = metrics
        self.events = events

    def apply(self, transitions: Iterable[Transition]) -> None:
        """Tell each node about its status change (``node_status``) and count it."""
        for t in transitions:
            self.metrics.status_transitions.labels(t.new.value).inc()
            if t.new in _NOTABLE or t.old in _NOTABLE - {NodeStatus.OFFLINE}:
                self.events.add(
                    NODE_STATUS, node_id=t.node_id, old=t.old.value, new=t.new.value, reason=t.reason
                )
            outbox = local_outbox(self.registry.nodes.get(t.node_id))
            if outbox is not None:
                outbox.send(
                    NodeStatusMessage(
                        node_id=t.node_id,
                        status=t.new.value,
                        reason=t.reason,
                        timestamp=self.clock.wall_ms() // 1000,
                    )
                )
