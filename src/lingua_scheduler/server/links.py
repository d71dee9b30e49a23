"""How this instance reaches a node: the one place that knows a node's connection is an ``Outbox``.

A node in the registry is either connected here (its entry's ``conn`` is the socket's ``Outbox``, its
``owner`` None) or connected to another instance (``owner`` names it; messages go there through the
cluster shell's batched writer). Everything that writes to a node asks ``local_outbox`` instead of
testing the connection's type itself.

Must never: send anything itself or decide whether a node should be written to.
"""

from __future__ import annotations

from lingua_scheduler.core.registry import NodeEntry
from lingua_scheduler.server.outbox import Outbox


def local_outbox(entry: NodeEntry | None) -> Outbox | None:
    """The outbox of a node whose socket is on this instance; None for an unknown node, one owned by
    another instance, or one whose socket is gone."""
    if entry is None or entry.owner is not None:
        return None
    conn = entry.conn
    return conn if isinstance(conn, Outbox) else None


def reachable(entry: NodeEntry) -> bool:
    """Whether a message can be addressed to the node now: through its local outbox or its owner."""
    return entry.owner is not None or local_outbox(entry) is not None
