"""The node status machine: states, the legal transitions as a table, and the health rule.

Everything that decides a node's status lives here or in ``registry.py`` which applies it; an illegal
transition raises ``IllegalTransition`` (tests provoke it on purpose).
"""

from __future__ import annotations

from enum import StrEnum

from lingua_scheduler.protocol.common import CORE_SERVICE_TYPES, ServiceStatus
from lingua_scheduler.protocol.node import InstalledService


class NodeStatus(StrEnum):
    REGISTERING = "registering"
    READY = "ready"
    DEGRADED = "degraded"
    DRAINING = "draining"
    OFFLINE = "offline"


S = NodeStatus

#: from-state -> states it may move to
TRANSITIONS: dict[NodeStatus, frozenset[NodeStatus]] = {
    S.REGISTERING: frozenset({S.READY, S.DEGRADED, S.DRAINING, S.OFFLINE}),
    S.READY: frozenset({S.DEGRADED, S.DRAINING, S.OFFLINE}),
    S.DEGRADED: frozenset({S.READY, S.DRAINING, S.OFFLINE}),
    S.DRAINING: frozenset({S.READY, S.DEGRADED, S.OFFLINE}),
    S.OFFLINE: frozenset({S.REGISTERING}),
}

#: only these take new jobs
SCHEDULABLE = frozenset({S.READY})


class IllegalTransition(Exception):
    def __init__(self, node_id: str, src: NodeStatus, dst: NodeStatus) -> None:
        super().__init__(f"node {node_id}: illegal status transition {src} -> {dst}")


def check_transition(node_id: str, src: NodeStatus, dst: NodeStatus) -> None:
    if dst not in TRANSITIONS[src]:
        raise IllegalTransition(node_id, src, dst)


def healthy(status: NodeStatus, has_gpu: bool, services: list[InstalledService]) -> bool:
    """The health rule of the reference scheduler, which nodes are built against.

    While registering, every installed core service type must have a running service; afterwards one
    running service is enough to stay healthy.
    """
    if not has_gpu or not services:
        return False
    running = {s.type for s in services if s.status is ServiceStatus.RUNNING}
    if status is S.REGISTERING:
        installed_core = {s.type for s in services} & CORE_SERVICE_TYPES
        return bool(installed_core) and installed_core <= running
    return bool(running)
