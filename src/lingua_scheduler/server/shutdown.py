"""Graceful shutdown of one instance: stop taking work, let in-flight jobs finish up to a deadline, fail
the rest explicitly, tell every peer to go elsewhere, leave the cluster, and let the process exit 0.

How it is triggered. ``serve`` installs ``handle_signals``: SIGTERM (or SIGINT) starts ``drain`` while
the server still reads every connection, and only when the drain is over is aiohttp's own shutdown
started (``GracefulExit``, as its default signal handler would). aiohttp's shutdown cannot host the
drain itself: from its first step (``pre_shutdown``) every connection discards what it receives, so no
job result could come in. A second signal cuts the wait short. Any other stop (``TestServer.close()``,
an exception) reaches the ``on_shutdown`` hook, which runs the same sequence without the wait.

The listening socket stays open during the drain, so the orchestrator and load balancers can still
read ``/health``, ``/metrics`` and ``/ready`` (503 from the first moment: ``accepting`` is false); new
WebSocket connections are refused with HTTP 503 and code SCHEDULER_SHUTTING_DOWN.

The sequence (docs/reliability.md, "Graceful shutdown"):

1. Stop accepting: ``state.shutting_down`` makes a ``session_init`` close its connection with 1012
   (service restart: the client reconnects, to another instance or to this one restarted) and
   ``job_assign`` from other instances bounce back to their owner (``DispatchFailed``: it fails over at
   once). In Redis mode this instance's nodes are marked not ready for reservations, so the other
   instances stop placing work on them while the jobs already there go on.
2. Tell every session without an ``error`` (the web client shows every error it is not told to
   ignore as a popup, and a restart is no error of its user's): ``backpressure{PAUSE}`` for the drain
   time, so the client holds its audio, then the session is closed the graceful way: audio it had
   buffered is dispatched, results are delivered as they come, ``session_close_ack`` follows the last
   one and the socket is closed with 1012 at once. Audio that still arrives is answered with the same
   ``PAUSE`` (at most twice a second), not with an error.
3. Wait until nothing is left -- no live job of ours, no open session, no job of another instance
   running on one of our nodes -- or ``shutdown.drain_timeout_seconds``. In Redis mode nodes that are
   idle are released early (closed with 1001) so that another instance can use them at once.
4. What is still live then is failed explicitly: each session gets ``error{SCHEDULER_SHUTTING_DOWN}`` +
   ``ui_event ERROR`` + ``missing_result(job_failed)`` for every unfinished utterance, in order (that
   utterance is lost: an error is what it is), and the node ``job_cancel``.
5. Every remaining WebSocket is closed once its queued messages are written (bounded by
   ``shutdown.close_timeout_seconds``): sessions with 1012 (service restart), nodes with 1001 (going
   away) after ``error{SCHEDULER_SHUTTING_DOWN}``. Clients and nodes reconnect, to another instance
   when there is one.
6. Redis mode: final node statuses and job records are written and the instance removes itself from
   the shared state, so the others fail over what of theirs ran on its nodes without waiting for the
   presence TTL.

Must never: block the event loop, wait longer than the drain deadline plus the close bound, or let an
exception escape (a failed step is logged and the exit goes on: an instance that cannot stop is worse).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from aiohttp import WSCloseCode, web
from aiohttp.web_runner import GracefulExit

from lingua_scheduler.core.events import DrainBegan, SessionFlush
from lingua_scheduler.errors import ErrorCode, RequestError
from lingua_scheduler.protocol.common import ErrorMessage
from lingua_scheduler.protocol.session import Backpressure, BackpressureAction
from lingua_scheduler.server.http.http_io import error_response
from lingua_scheduler.server.links import local_outbox
from lingua_scheduler.server.sessions import Phase, Session
from lingua_scheduler.server.state import STATE, SchedulerState
from lingua_scheduler.server.ws.outbox import Outbox

log = logging.getLogger(__name__)

#: how often the drain looks whether everything ended (only while shutting down; a few dict lookups)
POLL_SECONDS = 0.05
#: reason sent with the close frame (at most 123 bytes by the WebSocket protocol)
CLOSE_REASON = b"scheduler shutting down"
#: close code for sessions: 1012 "service restart" (reconnect); nodes get 1001 "going away"
SERVICE_RESTART = 1012


class GracefulShutdown:
    """Runs the sequence above once. ``sockets`` holds every WebSocket this app accepted (weakly: a
    closed connection drops out by itself), so that connections which never registered or opened a
    session are closed too."""

    def __init__(self, state: SchedulerState) -> None:
        self.state = state
        self.sockets: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()
        self.started = False
        #: what the run did (logged)
        self.failed_at_deadline = 0
        self.nodes_released_early = 0
        self._released: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        #: session sockets still to close with 1012 once their session is closed
        self._session_sockets: dict[Outbox, Session] = {}
        #: the tracked sockets that are /ws/session connections
        self._session_paths: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()
        #: set by a second signal: stop waiting for in-flight work
        self._hurry = asyncio.Event()
        self._signalled: asyncio.Task[None] | None = None

    # --- aiohttp hooks --------------------------------------------------------------------------

    async def track(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        """``on_response_prepare``: remember every WebSocket (the endpoints need not know)."""
        if isinstance(response, web.WebSocketResponse):
            self.sockets.add(response)
            if request.path.startswith("/ws/session"):
                self._session_paths.add(response)

    def _is_session(self, ws: web.WebSocketResponse) -> bool:
        return ws in self._session_paths

    async def on_shutdown(self, app: web.Application) -> None:
        """aiohttp's shutdown. After a signal the drain is over already; any other way here, the
        connections no longer read (``pre_shutdown``), so waiting would be pointless: no drain time."""
        await self._drain_safely(0.0)

    @web.middleware
    async def refuse_when_draining(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """New WebSocket connections are refused during the drain (HTTP routes keep answering)."""
        if self.state.shutting_down and request.path.startswith("/ws/"):
            refusal = RequestError(
                "the scheduler is shutting down",
                code=ErrorCode.SCHEDULER_SHUTTING_DOWN,
                headers={"Retry-After": "1"},
            )
            return error_response(refusal)
        return await handler(request)

    def on_signal(self) -> None:
        """SIGTERM / SIGINT while serving: the first starts the drain, then the exit; the next ones
        cut the drain's wait short."""
        if self._signalled is not None:
            log.warning("graceful shutdown: signalled again, giving up on in-flight work now")
            self._hurry.set()
            return
        self._signalled = asyncio.get_running_loop().create_task(self._drain_then_exit(), name="shutdown")

    async def _drain_then_exit(self) -> None:
        await self._drain_safely(None)
        # What aiohttp's own signal handler does: GracefulExit out of the loop makes run_app run its
        # shutdown and cleanup (listener closed, handlers awaited, background tasks stopped), exit 0.
        asyncio.get_running_loop().call_soon(_raise_graceful_exit)

    async def _drain_safely(self, drain_seconds: float | None) -> None:
        try:
            await self.drain(drain_seconds)
        except Exception:  # the process must still exit: log and let aiohttp finish the shutdown
            log.exception("graceful shutdown failed; closing anyway")

    # --- the sequence ---------------------------------------------------------------------------

    async def drain(self, drain_seconds: float | None = None) -> None:
        """Run the sequence once (later calls return at once). ``drain_seconds`` overrides
        ``shutdown.drain_timeout_seconds`` (0: fail what is in flight without waiting)."""
        if self.started:
            return
        self.started = True
        state = self.state
        cfg = state.config.shutdown
        store = state.engine.store
        cluster = state.cluster
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        drain_s = cfg.drain_timeout_seconds if drain_seconds is None else drain_seconds
        deadline = t0 + drain_s
        live_at_start = store.inflight
        log.warning(
            "graceful shutdown: draining",
            extra={
                "sessions": len(state.sessions),
                "jobs": live_at_start,
                "drain_timeout_s": drain_s,
            },
        )
        # 1. stop accepting
        state.shutting_down = True
        state.runtime.handle(DrainBegan())
        state.shutdown_deadline = state.clock.monotonic() + drain_s
        if cluster is not None:
            await cluster.refuse_new_work()
        # 2. tell every session to hold its audio (no error: see above), and close it the graceful
        # way (last audio dispatched, results kept); its socket closes with 1012 once it is done
        drain_ms = max(1, int(drain_s * 1000))
        session_outboxes: list[Outbox] = []
        for session in list(state.sessions.values()):
            if session.outbox is not None:
                session_outboxes.append(session.outbox)
                self._session_sockets[session.outbox] = session
            session.send(pause_for_shutdown(session.session_id, drain_ms))
            session.close("scheduler shutting down", connection_gone=False)
        # 3. wait for the work in flight (polling: nothing else happens here, and the bound is short)
        while self._busy() and loop.time() < deadline and not self._hurry.is_set():
            self._close_finished_sessions()
            if cluster is not None and not cluster.degraded:
                self._release_idle_nodes()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hurry.wait(), POLL_SECONDS)
        # 4. fail what is left, explicitly
        self.failed_at_deadline = state.runtime.fail_all(
            ErrorCode.SCHEDULER_SHUTTING_DOWN, "the scheduler shut down before this job finished"
        )
        for session in list(state.sessions.values()):
            # Results held back behind an unresolved index go out now (the index as gap_timeout); a
            # session still open after that has nothing left to wait for.
            state.runtime.handle(SessionFlush(session.session_id))
            session.close("scheduler shutting down", connection_gone=True)
        # 5. nodes are told why, then every socket is closed once its queue is written
        node_outboxes = [o for e in state.registry.local_nodes() if (o := local_outbox(e)) is not None]
        for outbox in node_outboxes:
            outbox.send(self._node_notice())
        self._close_finished_sessions()
        await self._close_all(session_outboxes + node_outboxes, cfg.close_timeout_seconds, session_outboxes)
        # 6. leave the cluster
        if cluster is not None:
            await cluster.leave()
        log.warning(
            "graceful shutdown: done",
            extra={
                "seconds": round(loop.time() - t0, 3),
                "jobs_at_start": live_at_start,
                "jobs_failed": self.failed_at_deadline,
                "nodes_released_early": self.nodes_released_early,
            },
        )

    def _close_finished_sessions(self) -> None:
        """A session whose last result and ``session_close_ack`` are queued: its socket closes now
        (1012), so the client reconnects without waiting for the other sessions' work."""
        timeout = self.state.config.shutdown.close_timeout_seconds
        for outbox, session in list(self._session_sockets.items()):
            if session.phase is Phase.CLOSED:
                del self._session_sockets[outbox]
                self._spawn(self._close_one(outbox, timeout, SERVICE_RESTART))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _busy(self) -> bool:
        state = self.state
        if state.engine.store.inflight or state.sessions:
            return True
        cluster = state.cluster
        if cluster is None or not cluster.remote_jobs:
            return False
        # jobs of other instances running on our nodes (an entry whose node left is not waited for)
        nodes = state.registry.nodes
        return any(
            (entry := nodes.get(node_id)) is not None and entry.owner is None and entry.conn is not None
            for _, node_id, _ in cluster.remote_jobs.values()
        )

    def _release_idle_nodes(self) -> None:
        """Redis mode: a node with no work here goes now, so another instance can give it work."""
        state = self.state
        cluster = state.cluster
        busy = {node_id for _, node_id, _ in cluster.remote_jobs.values()} if cluster else set()
        for entry in state.registry.local_nodes():
            conn = local_outbox(entry)
            if (
                entry.node_id in self._released
                or conn is None
                or entry.node_id in busy
                or state.engine.store.inflight_on(entry.node_id)
            ):
                continue
            self._released.add(entry.node_id)
            self.nodes_released_early += 1
            conn.send(self._node_notice())
            self._spawn(self._close_one(conn, state.config.shutdown.close_timeout_seconds))

    @staticmethod
    def _node_notice() -> ErrorMessage:
        return ErrorMessage(
            code=ErrorCode.SCHEDULER_SHUTTING_DOWN.value,
            message="the scheduler is shutting down: reconnect (to another instance) with the same node id",
        )

    async def _close_one(self, outbox: Outbox, timeout: float, code: int = WSCloseCode.GOING_AWAY) -> None:
        await outbox.flush(timeout)
        await self._close_ws(outbox.ws, timeout, code)

    @staticmethod
    async def _close_ws(
        ws: web.WebSocketResponse, timeout: float, code: int = WSCloseCode.GOING_AWAY
    ) -> None:
        # close() waits for the peer's close frame; a peer that does not answer is cut off by the bound
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(code=code, message=CLOSE_REASON), timeout)

    async def _close_all(self, outboxes: list[Outbox], timeout: float, sessions: list[Outbox]) -> None:
        """Flush the given queues, then close every tracked socket; all at once, bounded. Session
        sockets (and any socket on /ws/session) get 1012, the others 1001."""
        await asyncio.gather(*(o.flush(timeout) for o in outboxes))
        session_ws = {o.ws for o in sessions}
        sockets = [ws for ws in list(self.sockets) if not ws.closed]
        await asyncio.gather(
            *(
                self._close_ws(
                    ws, timeout, SERVICE_RESTART if ws in session_ws or self._is_session(ws) else 1001
                )
                for ws in sockets
            )
        )
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


SHUTDOWN: web.AppKey[GracefulShutdown] = web.AppKey("shutdown", GracefulShutdown)


def pause_for_shutdown(session_id: str, resume_after_ms: int) -> Backpressure:
    """What a session is told while the scheduler drains: hold your audio (the connection will close
    with 1012 and the client reconnects). Backpressure, not an error: nothing for its user to see."""
    return Backpressure(
        action=BackpressureAction.PAUSE, resume_after_ms=resume_after_ms, session_id=session_id
    )


def _raise_graceful_exit() -> None:
    raise GracefulExit()


def setup(app: web.Application) -> None:
    """Install the graceful shutdown: socket tracking, the refusal of new WebSockets during the drain
    and the ``on_shutdown`` hook (run last). ``/ready`` fails its ``accepting`` check meanwhile."""
    state = app[STATE]
    shutdown = GracefulShutdown(state)
    app[SHUTDOWN] = shutdown
    app.on_response_prepare.append(shutdown.track)
    app.middlewares.append(shutdown.refuse_when_draining)
    app.on_shutdown.append(shutdown.on_shutdown)


def handle_signals(app: web.Application) -> None:
    """For ``serve`` only (a test process keeps its own signals): SIGTERM and SIGINT drain first.
    Installed at start-up, over the handlers of ``web.run_app``, which raise ``GracefulExit`` at once."""
    shutdown = app[SHUTDOWN]

    async def install(app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, shutdown.on_signal)

    app.on_startup.append(install)
