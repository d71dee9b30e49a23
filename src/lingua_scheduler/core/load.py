"""A node's live load: the one mutable cell that heartbeats and dispatches write in O(1).

Load is not capability: it never enters the published fleet view's versioning, so a heartbeat whose
load changed costs no publication. Selection reads this cell directly (single event loop, synchronous
code, so it never observes a half-written update).

Effective load = max(reported running jobs + jobs dispatched since that report arrived and still
running, jobs this scheduler has in flight on the node). A heartbeat therefore never erases the
scheduler's own recent assignments (otherwise a node just given jobs would look idle and draw more):
it only resets the "dispatched since report" count. Each dispatch is tagged with the report epoch it
happened in; when the job ends, it is taken off the count it was added to (dispatched since the current
report) or, if a report came in between, off the reported figure, which included it.

A node may also report its own load, 0..1 (``resource_usage.load``) and declare, at registration, the
threshold at or above which it takes no new job (``node_register.load_threshold``, 1 by default):
``over_threshold`` applies it next to the scheduler's resource thresholds.
"""

from __future__ import annotations


class NodeLoad:
    __slots__ = (
        "cpu",
        "dispatched_since_report",
        "epoch",
        "gpu",
        "gpu_mem",
        "inflight",
        "mem",
        "own",
        "own_threshold",
        "reported_at",
        "reported_running",
    )

    def __init__(self) -> None:
        self.cpu = 0.0
        self.gpu: float | None = None
        self.gpu_mem: float | None = None
        self.mem = 0.0
        self.reported_running = 0
        self.reported_at = 0.0
        self.dispatched_since_report = 0
        self.inflight = 0
        #: the node's own load (0..1) of its last report, None when it reports none
        self.own: float | None = None
        #: at or above this own load the node takes no new job (set at registration)
        self.own_threshold = 1.0
        #: bumped by every report; dispatch tokens name the epoch they were counted in
        self.epoch = 0

    def report(
        self,
        cpu: float,
        gpu: float | None,
        gpu_mem: float | None,
        mem: float,
        running: int,
        now: float,
        own: float | None = None,
    ) -> None:
        self.own = own
        self.cpu = cpu
        self.gpu = gpu
        self.gpu_mem = gpu_mem
        self.mem = mem
        self.reported_running = running
        self.reported_at = now
        self.dispatched_since_report = 0
        self.epoch += 1

    def dispatched(self) -> int:
        """Count one job placed here; returns the token to hand back to ``finished``."""
        self.dispatched_since_report += 1
        self.inflight += 1
        return self.epoch

    def finished(self, token: int | None = None) -> None:
        """One job placed here ended (``token`` from ``dispatched``; None: epoch unknown)."""
        if self.inflight > 0:
            self.inflight -= 1
        if token == self.epoch and self.dispatched_since_report > 0:
            self.dispatched_since_report -= 1
        elif self.reported_running > 0:
            self.reported_running -= 1

    def report_ended(self) -> None:
        """A job the node counted in its last report ended without being one of ours (a stale or
        unknown result). Messages on one connection keep their order, so a result that arrives after
        a report was sent after it: the job was running then and is not any more."""
        if self.reported_running > 0:
            self.reported_running -= 1

    @property
    def effective(self) -> int:
        return max(self.reported_running + self.dispatched_since_report, self.inflight)

    def over_threshold(self, threshold: float) -> bool:
        """Resource exclusion: cpu, gpu or memory at or above ``threshold`` percent, or the node's own
        load at or above its own threshold."""
        if self.cpu >= threshold or self.mem >= threshold:
            return True
        if self.own is not None and self.own >= self.own_threshold:
            return True
        return self.gpu is not None and self.gpu >= threshold
