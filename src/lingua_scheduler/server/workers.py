"""``serve --workers N``: N scheduler instances on one host, behind one port, supervised by a parent.

One Python process uses one core; a host with more cores runs more instances. Each worker is an
ordinary ``serve`` in Redis mode (its own instance id, nodes and sessions; the shared state in Redis,
docs/design.md), listening on the same port with ``SO_REUSEPORT``: the kernel spreads new connections
over the workers' listening sockets, so nodes and sessions land on every worker and the cluster
routes jobs between them as it does between hosts. Without Redis the instances would not know about
each other: ``--workers`` above 1 requires ``--redis-url``.

The parent owns only the workers' lives:

- it reserves the port first (a bound, never listening ``SO_REUSEPORT`` socket: ``--port 0`` gives
  every worker the same port, and a port another program holds fails the start before any worker);
- it starts each worker as ``lingua-scheduler serve`` with the same flags and environment (its
  ``--instance-id``, when given, suffixed ``-1`` .. ``-N``), which dies with the parent
  (``PR_SET_PDEATHSIG``: a killed parent leaves no orphan serving the port);
- SIGTERM, SIGINT and SIGHUP are passed on to every worker (each drains or reloads on its own);
  it exits once they all have, with status 0, or the first failing worker's status;
- a worker that dies while serving is started again after ``RESTART_DELAY`` seconds; one that fails
  within ``START_GRACE`` seconds of its start (a configuration or environment error, already
  explained on stderr) stops them all, and the parent exits with its status.

Must never: serve a request itself, or hold state of the workers beyond their processes.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType

log = logging.getLogger(__name__)

#: a worker that exits within this many seconds of its start failed to start: stop everything
START_GRACE = 5.0
#: seconds before a worker that died while serving is started again
RESTART_DELAY = 1.0
#: how often the parent looks at its workers
POLL = 0.2
_PR_SET_PDEATHSIG = 1


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) with ``SO_REUSEPORT``, not listening: it holds the port (and
    chooses it, for port 0) for the workers, which bind it again. Raises ``OSError``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host or "0.0.0.0", port))
    except BaseException:
        s.close()
        raise
    return s


def worker_args(argv: Sequence[str], port: int, index: int) -> list[str]:
    """The ``serve`` arguments of worker ``index`` (1-based): the parent's without ``--workers``,
    on the reserved ``port``, with a suffixed ``--instance-id`` and ``--reuse-port``."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        name, eq, value = arg.partition("=")
        if name in ("--workers", "--port"):
            if not eq:
                next(it, None)
            continue
        if name == "--instance-id":
            value = value if eq else next(it, "")
            out += ["--instance-id", f"{value}-{index}"]
            continue
        out.append(arg)
    return [*out, "--port", str(port), "--reuse-port"]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class _Worker:
    index: int
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restart_at: float | None = None
    starts: int = field(default=0)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lingua_scheduler", "serve", *self.args], preexec_fn=_die_with_parent
        )
        self.started = time.monotonic()
        self.restart_at = None
        self.starts += 1


class Supervisor:
    """The parent of ``serve --workers N``."""

    def __init__(self, argv: Sequence[str], workers: int, port: int) -> None:
        self.workers = [_Worker(i, worker_args(argv, port, i)) for i in range(1, workers + 1)]
        self.port = port
        self.stopping = False
        self.status = 0

    def _signal(self, signum: int, frame: FrameType | None) -> None:
        if signum != signal.SIGHUP:
            self.stopping = True
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signum)

    def run(self) -> int:
        """Start the workers, keep them running until a signal stops them; the exit status."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._signal)
        for w in self.workers:
            w.start()
        log.info(
            "lingua-scheduler workers started",
            extra={
                "workers": len(self.workers),
                "port": self.port,
                "pids": [w.proc.pid for w in self.workers if w.proc],
            },
        )
        while True:
            now = time.monotonic()
            alive = 0
            for w in self.workers:
                assert w.proc is not None
                code = w.proc.poll()
                if code is None:
                    alive += 1
                    continue
                if self.stopping or w.restart_at is not None:
                    if w.restart_at is not None and not self.stopping and now >= w.restart_at:
                        w.start()
                        alive += 1
                    continue
                if now - w.started < START_GRACE:
                    log.error("worker failed to start: stopping", extra={"worker": w.index, "status": code})
                    self.status = code or 1
                    self._signal(signal.SIGTERM, None)
                    continue
                log.error("worker died: starting it again", extra={"worker": w.index, "status": code})
                w.restart_at = now + RESTART_DELAY
                alive += 1
            if self.stopping and not alive:
                return self.status
            time.sleep(POLL)
