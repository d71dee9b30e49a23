"""The WebSocket receive loop shared by ``/ws/node`` and ``/ws/session``.

Owns one connection's life around its frames: the refusals made before the upgrade, the socket and its
outbox, the frame gate (rate limit, handshake deadline) in front of every text or binary frame, the
catch-all of the connection task and the cleanup after the loop, in this order: gate, connection count,
the connection's own state, outbox, socket. What a frame means belongs to the endpoint
(``server/ws/node_endpoint.py``, ``server/ws/session_endpoint.py``). With ``inline`` (``/ws/node``), data
frames pass the same gate and reach the endpoint from the socket's read callback
(``server/ws/inline_frames.py``: no coroutine per frame); the loop then waits for control frames,
failures and the frames that queue behind a pending step.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

from aiohttp import WSMsgType, web

from lingua_scheduler.server import connection_guard
from lingua_scheduler.server.limits import Endpoint
from lingua_scheduler.server.state import STATE, SchedulerState
from lingua_scheduler.server.ws import inline_frames
from lingua_scheduler.server.ws.outbox import WRITER_LIMIT, Outbox

#: frames that count against the connection's message rate: data, and control frames a peer could flood
METERED = frozenset({WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.PING, WSMsgType.PONG})
#: what ends the loop (``async for`` over the socket stops at the same three)
ENDED = frozenset({WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED})


class Connection(Protocol):
    """An endpoint's per-socket handler, as the receive loop drives it."""

    def on_frame(self, data: bytes | str, t0: float) -> Awaitable[object] | None:
        """Handle one admitted frame; ``t0`` is ``time.perf_counter()`` when it was received. What it
        returns (a step that waits for the shared store) is awaited before the next frame is read."""

    def ready(self) -> bool:
        """Whether the socket did its handshake (registered a node, opened a session)."""

    def closed(self) -> None:
        """The socket is gone: release what the connection holds."""


C = TypeVar("C", bound=Connection)


async def serve_websocket(
    request: web.Request,
    endpoint: Endpoint,
    connect: Callable[[SchedulerState, Outbox], C],
    log: logging.Logger,
    failure_extra: Callable[[C], Mapping[str, object]] | None = None,
    dropped: Callable[[C, bytes | str], None] | None = None,
    inline: bool = False,
) -> web.StreamResponse:
    """Run one ``endpoint`` socket until it ends. ``connect`` builds the connection once the socket is
    upgraded; ``log`` is the endpoint's logger (its records keep the endpoint's name, and its level);
    ``failure_extra`` gives the fields logged with a connection that failed; ``dropped`` is shown each
    data frame the rate limit dropped, unread (to tell the peer which; it must stay cheap and bounded).
    ``inline``: data frames are handled from the socket's read callback (``server/ws/inline_frames.py``),
    the loop only sees control frames, failures and frames queued behind a pending step."""
    state = request.app[STATE]
    # Origin allow-list and connection cap, before any WebSocket state exists (server/limits.py)
    refused = state.limits.refuse_upgrade(request, endpoint)
    if refused is not None:
        return refused
    max_frame = state.config.server.max_frame_bytes
    # A message over the limit is closed with 1009 as soon as its frame header announces its length
    # (aiohttp refuses max_msg_size and more before buffering a byte of it): nothing larger is held.
    # autoping off: pings are answered here, after the frame gate, so that a ping flood costs the peer
    # its message rate like any other frame (aiohttp would answer every one of them unmetered).
    ws = web.WebSocketResponse(
        compress=False,
        max_msg_size=max_frame + 1,
        decode_text=False,
        heartbeat=None,
        autoping=False,
        writer_limit=WRITER_LIMIT,  # the outbox's queued frames wait while the transport is full
    )
    await ws.prepare(request)
    outbox = Outbox(
        ws,
        state.config.server.outbound_queue,
        f"{endpoint}@{request.remote}",
        max_bytes=state.config.limits.outbound_queue_bytes,
        transport=request.transport,
    )
    conn = connect(state, outbox)
    state.limits.opened(endpoint)
    gate = state.limits.gate(endpoint, outbox, ws, conn.ready)
    preauth = True  # until the handshake: bytes count against the pre-authentication budget
    sink: Any = None  # the socket's InlineFrames, with ``inline``

    def note_handshake() -> None:
        """Once the connection is through its handshake, its bytes stop counting as pre-auth."""
        nonlocal preauth
        if preauth and conn.ready():
            preauth = False
            connection_guard.authenticated(request)

    def on_data(data: bytes) -> bool:
        """One data frame, from the read callback: what the loop below does with one, but awaiting."""
        if not gate.admit():
            if gate.must_close:
                return False  # the loop closes
            if dropped is not None:
                dropped(conn, data)
            return True
        pending = conn.on_frame(data, time.perf_counter())
        if pending is not None:  # the loop awaits it; the next frames queue behind it
            sink.wake(inline_frames.PendingStep(pending))
        note_handshake()
        return True

    sink = inline_frames.install(ws, request, on_data) if inline else None
    try:
        while True:
            # receive(), not ``async for``: one coroutine fewer alive per connection between frames
            # (each is a tracked object the garbage collector examines, server/gc_policy.py)
            frame = await ws.receive()
            kind = frame.type
            if sink is not None:
                sink.taken(kind, frame.data)
                if kind is WSMsgType.ERROR and isinstance(frame.data, inline_frames.PendingStep):
                    await frame.data.step
                    continue
                if kind is WSMsgType.ERROR and isinstance(frame.data, inline_frames.HandlerFailed):
                    raise frame.data.error
            if kind in ENDED:
                break
            if kind in METERED:
                if gate.admit():  # per-connection rate limit: over it the frame is dropped
                    if kind is WSMsgType.PING:
                        with contextlib.suppress(ConnectionError):  # the peer went away meanwhile
                            await ws.pong(frame.data)
                    elif kind is not WSMsgType.PONG:  # an unsolicited pong (we send no pings): nothing to do
                        pending = conn.on_frame(frame.data, time.perf_counter())
                        if pending is not None:  # this connection's next frames wait for it
                            await pending
                        note_handshake()
                elif gate.must_close:
                    await gate.close()
                    break
                elif dropped is not None and kind in (WSMsgType.TEXT, WSMsgType.BINARY):
                    dropped(conn, frame.data)
            elif kind is WSMsgType.ERROR:
                break
    except Exception:  # one catch-all per connection task: log, close, clean up below
        failed = f"{endpoint} connection failed"
        log.exception(failed, extra=failure_extra(conn) if failure_extra is not None else None)
    finally:
        gate.stop()
        state.limits.closed(endpoint)
        conn.closed()
        await outbox.close()
        if not ws.closed:
            await outbox.close_socket()
    return ws
