"""The node SDK: write ``async def handle(job) -> Result`` (or an async generator of ``Partial``s ending
with a ``Result``), declare languages, GPUs and capacity, and ``Node(handle, ...).run()``.

The SDK registers, keeps the node's id and token (``identity``), heartbeats at the interval it is told,
reconnects with backoff, acknowledges jobs, sends partials and results, honours ``job_cancel`` and
drains on SIGTERM (docs/node-sdk.md).
"""

from lingua_scheduler.node.backoff import Backoff
from lingua_scheduler.node.client import Node, Refused, Usage
from lingua_scheduler.node.declaration import Declaration
from lingua_scheduler.node.identity import Identity, IdentityStore
from lingua_scheduler.node.jobs import Handler, Job, JobFailed, Partial, Result, run_job

__all__ = [
    "Backoff",
    "Declaration",
    "Handler",
    "Identity",
    "IdentityStore",
    "Job",
    "JobFailed",
    "Node",
    "Partial",
    "Refused",
    "Result",
    "Usage",
    "run_job",
]
