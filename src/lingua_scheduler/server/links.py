"""How this instance reaches a node or a session: the one place that knows a node's connection is an
``Outbox`` and that a node may be connected to another instance.

A node in the registry is either connected here (its entry's ``conn`` is the socket's ``Outbox``, its
``owner`` None) or connected to another instance (``owner`` names it; messages go there through the
cluster shell's batched writer). A session is reached through the instance's map of open sessions:
``Links.reach`` writes a message (already in the client's view: the engine put it there) to the
session's sink (an integrator front door), else to the instance it was handed over to, else to its
connection's outbox, else holds it while the session is detached. Everything that writes to a node or
a session asks ``local_outbox`` or ``Links`` instead of testing the connection's type itself.

Must never: decide whether a node or a session should be written to.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Protocol

import msgspec

from lingua_scheduler.core.registry import NodeEntry, Registry
from lingua_scheduler.protocol.cluster import CancelOnNode, Dispatch
from lingua_scheduler.protocol.node import JobAssign, JobCancel
from lingua_scheduler.server.cluster.store_writer import StoreWriter
from lingua_scheduler.server.ws.outbox import Outbox


def local_outbox(entry: NodeEntry | None) -> Outbox | None:
    """The outbox of a node whose socket is on this instance; None for an unknown node, one owned by
    another instance, or one whose socket is gone."""
    if entry is None or entry.owner is not None:
        return None
    conn = entry.conn
    return conn if isinstance(conn, Outbox) else None


class SessionPort(Protocol):
    """What is needed of a client session to reach it (server/sessions.py's ``Session`` is one): where
    its output goes, as plain attributes, and the two rare ways it keeps or forwards it itself."""

    #: an adapter session's receiver of everything it sends (None: the outbox's WebSocket)
    sink: Callable[[msgspec.Struct], None] | None
    #: the instance it was handed over to (its output is relayed there)
    relay_to: str | None
    #: its connection now (None while detached or gone)
    outbox: Outbox | None

    def relay(self, msg: msgspec.Struct) -> None:
        """Forward ``msg`` to the instance the session was handed over to."""

    def hold(self, msg: msgspec.Struct | bytes) -> None:
        """Keep ``msg`` for the client's reconnect (nothing unless the session is detached)."""

    def maybe_finish_close(self) -> None:
        """A closing session whose outstanding work is done finishes its close now."""


class Instances(Protocol):
    """The way to other instances (server/cluster/cluster.py's ``Cluster``): their inboxes, through our
    writer."""

    instance_id: str
    writer: StoreWriter


class Links:
    def __init__(self, registry: Registry, sessions: Mapping[str, SessionPort]) -> None:
        """``sessions``: the instance's open sessions by id (read only)."""
        self.registry = registry
        self.sessions = sessions
        #: the other instances (multi-instance mode); None embedded, where every node is local
        self.instances: Instances | None = None

    def assign(self, node_id: str, owner: str | None, assign: JobAssign, on_fail: Callable[[], None]) -> bool:
        """Hand ``job_assign`` to a local node's outbox (False if it did not take it), or to the node's
        instance (its inbox, in the writer's next pipeline; ``on_fail`` runs if that write is lost)."""
        instances = self.instances
        if owner is not None and instances is not None:
            dispatch = Dispatch(
                node_id=node_id, reply_to=instances.instance_id, assign=assign, sent_at_ns=time.time_ns()
            )
            instances.writer.send(owner, dispatch, on_fail=on_fail)
            return True
        outbox = local_outbox(self.registry.nodes.get(node_id))
        return outbox is not None and outbox.send(assign)

    def cancel(self, node_id: str, cancel: JobCancel) -> None:
        """``job_cancel`` to the node, wherever it is connected (nothing if it is gone)."""
        entry = self.registry.nodes.get(node_id)
        instances = self.instances
        if entry is not None and entry.owner is not None and instances is not None:
            instances.writer.send(entry.owner, CancelOnNode(node_id=node_id, cancel=cancel))
        elif (outbox := local_outbox(entry)) is not None:
            outbox.send(cancel)

    def session(self, session_id: str) -> SessionPort | None:
        """The open session (None once it is gone)."""
        return self.sessions.get(session_id)

    def to_session(self, session_id: str, msg: msgspec.Struct) -> None:
        """``msg`` (in the client's view) to the open session ``session_id`` (nothing once it is gone)."""
        session = self.sessions.get(session_id)
        if session is not None:
            reach(session, msg)


def reach(session: SessionPort, msg: msgspec.Struct) -> None:
    """Write ``msg`` (already in the client's view) to wherever ``session``'s client is reached now."""
    if session.sink is not None:
        session.sink(msg)
    elif session.relay_to is not None:
        session.relay(msg)
    elif session.outbox is not None:
        session.outbox.send(msg)
    else:
        session.hold(msg)


def reach_encoded(session: SessionPort, data: bytes) -> None:
    """A message already in the client's view and encoded (relayed from another instance)."""
    if session.outbox is not None:
        session.outbox.send_raw(data)
    else:
        session.hold(data)
