"""Data frames handed to the endpoint from the socket's read callback, without a coroutine per frame.

aiohttp's WebSocket reader parses frames in the protocol's ``data_received`` and puts each message in
a queue that the connection's handler awaits (``ws.receive()``). While it waits for the next frame,
every connection keeps about nine tracked objects alive (the ``receive()`` and queue ``read()``
coroutines, the read's scope and wrapper, a ``Future``, its iterator and wake-up method, the message):
made for every frame, alive for a heartbeat interval, examined by the garbage collector (its
generation-1 collections grow with the fleet, ``server/gc_policy.py``), and two task steps per frame.

``InlineFrames`` replaces that queue for one socket (``install``): a text or binary message is given
to ``handle`` at once, inside ``data_received``; everything else (ping, pong, close, errors) and a data
message that must wait (an earlier frame's step is still pending: order is kept) goes into the queue
as before, where the connection's receive loop finds it. ``handle`` returns False to have the message
queued instead (the receive loop then does what it always did with it). Data frames keep their order:
behind a queued data frame or step, the next ones are queued too, until the loop has taken them.
Control frames are not ordered with data (a pong may follow the answer to a later frame).

Depends on aiohttp's reader: ``aiohttp._websocket.reader.WebSocketDataQueue`` (subclassed; its
``feed_data`` is the one hook) and ``WebSocketReader`` (a new one on the new queue, set as the
protocol's parser). ``install`` returns None when they are not what it expects (another aiohttp),
and the socket keeps aiohttp's own queue: the frames are then handled by the receive loop, correctly
and only less cheaply.

Must never: await, or let an exception escape into aiohttp's ``data_received``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from aiohttp import WSMessage, WSMsgType, web

log = logging.getLogger(__name__)

try:  # aiohttp >= 3.11 layout
    from aiohttp._websocket import reader as _aiohttp_reader

    WebSocketDataQueue: Any = _aiohttp_reader.WebSocketDataQueue
    WebSocketReader: Any = _aiohttp_reader.WebSocketReader
except (ImportError, AttributeError):  # pragma: no cover - another aiohttp: the loop handles every frame
    WebSocketDataQueue = WebSocketReader = None

_DATA = (WSMsgType.TEXT, WSMsgType.BINARY)


class HandlerFailed(Exception):
    """``handle`` raised ``error``: the receive loop raises it in its own context."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class PendingStep(Exception):
    """``handle`` returned a step (an awaitable) the receive loop must await before the next frame."""

    def __init__(self, step: Any) -> None:
        super().__init__("pending step")
        self.step = step


if WebSocketDataQueue is not None:

    class InlineFrames(WebSocketDataQueue):  # type: ignore[misc]
        """aiohttp's message queue of one socket, with data messages handled on arrival."""

        def __init__(self, protocol: Any, limit: int, *, loop: Any, handle: Callable[[bytes], bool]) -> None:
            super().__init__(protocol, limit, loop=loop)
            self.handle = handle
            #: messages queued (not handled inline) and not yet taken by the receive loop
            self.queued = 0

        def feed_data(self, data: Any, size: int) -> None:
            if data[0] not in _DATA:  # control frames and errors: the loop's, in no order with data
                super().feed_data(data, size)
                return
            if not self.queued:
                try:
                    if self.handle(data[1]):
                        return
                except Exception as exc:  # the receive loop raises it: logged, connection closed
                    self.wake(HandlerFailed(exc))
                    return
            self.queued += 1  # behind a queued data frame or step: queued too, to keep the order
            super().feed_data(data, size)

        def wake(self, reason: Exception) -> None:
            """Queue an ``ERROR`` message carrying ``reason`` for the receive loop (a step to await,
            a failure to raise); data frames queue behind it until the loop has taken it."""
            self.queued += 1
            super().feed_data(WSMessage(WSMsgType.ERROR, reason, None), 0)

        def taken(self, kind: WSMsgType, data: Any) -> None:
            """The receive loop took a message: a queued data frame or step no longer holds the
            next data frames back once none is left."""
            if self.queued and (kind in _DATA or isinstance(data, PendingStep | HandlerFailed)):
                self.queued -= 1


def install(ws: web.WebSocketResponse, request: web.Request, handle: Callable[[bytes], bool]) -> Any:
    """Swap ``ws``'s message queue for an ``InlineFrames`` calling ``handle``; None if this aiohttp
    does not have the parts it needs (the socket then stays as it was)."""
    if WebSocketDataQueue is None or WebSocketReader is None:
        return None
    old = getattr(ws, "_reader", None)
    protocol = request.protocol
    if not isinstance(old, WebSocketDataQueue) or getattr(protocol, "_payload_parser", None) is None:
        return None
    try:
        queue = InlineFrames(protocol, len_limit(old), loop=ws._loop, handle=handle)
        reader = WebSocketReader(queue, ws._max_msg_size, compress=False, decode_text=False)
    except (AttributeError, TypeError):  # pragma: no cover - another aiohttp
        return None
    # Called right after prepare(), before the loop has read from the socket again: the client cannot
    # have sent a frame yet (it waits for the 101), so the old parser holds no partial frame.
    # messages the old queue already holds stay first, in order, for the receive loop
    for message, size in list(old._buffer):
        queue.queued += 1
        WebSocketDataQueue.feed_data(queue, message, size)
    old._buffer.clear()
    ws._reader = queue
    ws._parser = reader
    protocol._payload_parser = None  # set_parser() refuses to replace a parser
    protocol.set_parser(reader)
    return queue


def len_limit(queue: Any) -> int:
    """The queue's flow-control limit as its constructor takes it (it stores twice the argument)."""
    return max(1, int(getattr(queue, "_limit", 2 * 2**16)) // 2)
