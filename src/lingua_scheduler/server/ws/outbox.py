"""A connection's outbound side: written from a loop callback while the socket keeps up, else a bounded
queue drained by one writer task.

``send()`` never blocks and never awaits. When nothing is queued and the transport's write buffer is
at or below its low-water mark (the socket keeps up), the frame joins this loop turn's frames for the
peer, written together in one ``transport.write`` by one loop callback at the end of the turn (for a
heartbeat, right after the read callback that handled it): an ack costs no task step and, with other
frames of the same turn, no write of its own. Otherwise (frames already waiting, or the buffer
filling) it is queued behind them, in order, and the writer task sends it with aiohttp's flow
control, waiting whenever the transport is over its high-water mark (``WRITER_LIMIT``). Frames keep
their order: a turn's frames start only into an empty queue, and nothing is queued while they wait.

A peer that stops reading first fills the transport's buffer (to the high-water mark), then the
queue; when the bound is reached the connection is closed as a slow consumer instead of buffering
without limit (no queue of the scheduler is unbounded). The bound is in messages (``limit``: queued,
or of one turn not yet written) and, optionally, in bytes (``max_bytes``, counting the transport's
unsent bytes as well as the queue's): a thousand results carrying synthesized audio would otherwise
be a gigabyte. A single message larger than ``max_bytes`` is still accepted into an empty queue.

Must never: raise into the caller (the receive path) because the socket went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections import deque

import msgspec
from aiohttp import WSCloseCode, WSMsgType, web

from lingua_scheduler.protocol.codec import encode

log = logging.getLogger(__name__)

#: longest a close handshake may take before the TCP connection is dropped
CLOSE_TIMEOUT = 2.0
#: close tasks in flight (asyncio keeps only weak references to tasks)
_closing: set[asyncio.Task[None]] = set()
#: ``writer_limit`` for the WebSocketResponse an Outbox writes to: aiohttp's writer checks the
#: transport's flow control only after this many bytes of its own output; 0 checks it after every
#: frame, so the writer task waits as soon as the transport is over its high-water mark (and the
#: queue, not the transport, takes what a peer that stops reading leaves unread)
WRITER_LIMIT = 0

_HEAD_SHORT = struct.Struct("!BB").pack
_HEAD_MEDIUM = struct.Struct("!BBH").pack
_HEAD_LONG = struct.Struct("!BBQ").pack


def text_frame(payload: bytes) -> bytes:
    """One final, unmasked, uncompressed text frame (RFC 6455 5.2): the bytes aiohttp's writer puts
    on the wire for ``send_frame(payload, TEXT)`` on a server socket opened with ``compress=False``."""
    n = len(payload)
    if n < 126:
        return _HEAD_SHORT(0x81, n) + payload
    if n < 65536:
        return _HEAD_MEDIUM(0x81, 126, n) + payload
    return _HEAD_LONG(0x81, 127, n) + payload


class Outbox:
    __slots__ = (
        "_bytes",
        "_closed",
        "_flushed",
        "_loop",
        "_queue",
        "_soon",
        "_task",
        "_wakeup",
        "limit",
        "max_bytes",
        "name",
        "slow_consumer",
        "transport",
        "ws",
    )

    def __init__(
        self,
        ws: web.WebSocketResponse,
        limit: int,
        name: str,
        *,
        max_bytes: int | None = None,
        transport: asyncio.Transport | None = None,
    ) -> None:
        self.ws = ws
        #: the TCP connection under ``ws``: frames are written into it inline while it keeps up, and
        #: it is dropped when a close handshake cannot complete. None: every frame goes by the queue.
        self.transport = transport
        self.limit = limit
        self.max_bytes = max_bytes
        self.name = name
        self._queue: deque[bytes] = deque()
        #: frames of this loop turn, written together at its end (``_write_soon``): nothing was queued
        #: and the transport kept up when the first of them was sent
        self._soon: list[bytes] = []
        self._loop = asyncio.get_running_loop()
        #: bytes in ``_queue`` and ``_soon`` (not yet handed to the socket)
        self._bytes = 0
        self._wakeup = asyncio.Event()
        self._flushed = asyncio.Event()
        self._closed = False
        self.slow_consumer = False
        self._task = asyncio.get_running_loop().create_task(self._writer(), name=f"outbox-{name}")

    def send(self, message: msgspec.Struct) -> bool:
        """Send one message; False if the connection is closed or was cut off as a slow consumer."""
        return self.send_raw(encode(message))

    def send_raw(self, data: bytes) -> bool:
        if self._closed:
            return False
        limit_bytes = self.max_bytes
        soon = self._soon
        if soon:  # this turn's frames are written together at its end: this one joins them, in order
            if len(soon) >= self.limit or (limit_bytes is not None and self._bytes + len(data) > limit_bytes):
                self._cut_off(0)
                return False
            soon.append(data)
            self._bytes += len(data)
            return True
        queue, transport = self._queue, self.transport
        buffered = 0
        if transport is not None:
            buffered = transport.get_write_buffer_size()
            # the limits are read only when bytes are pending: the common case allocates nothing
            if not queue and (not buffered or buffered <= transport.get_write_buffer_limits()[0]):
                soon.append(data)
                self._bytes += len(data)
                self._loop.call_soon(self._write_soon)  # one callback per turn, not a task step per frame
                return True
        over_bytes = limit_bytes is not None and queue and self._bytes + buffered + len(data) > limit_bytes
        if len(queue) >= self.limit or over_bytes:
            self._cut_off(buffered)
            return False
        queue.append(data)
        self._bytes += len(data)
        self._flushed.clear()
        self._wakeup.set()
        return True

    def _write_soon(self) -> None:
        """Write this turn's frames into the transport, in one write; never raises (it runs as a loop
        callback, and from ``flush``/``close``)."""
        soon, transport = self._soon, self.transport
        if not soon or transport is None:
            return
        data = text_frame(soon[0]) if len(soon) == 1 else b"".join([text_frame(d) for d in soon])
        self._bytes -= sum(len(d) for d in soon) if len(soon) > 1 else len(soon[0])
        soon.clear()
        if self.ws.closed or transport.is_closing():  # no data frame after a close frame
            self._closed = True
            return
        try:
            transport.write(data)
        except (ConnectionError, RuntimeError):  # closed under us: the reader sees it and cleans up
            self._closed = True

    def _cut_off(self, buffered: int) -> None:
        self.slow_consumer = True
        log.warning(
            "slow consumer disconnected",
            extra={
                "conn": self.name,
                "queued": len(self._queue),
                "queued_bytes": self._bytes,
                "transport_bytes": buffered,
            },
        )
        self._closed = True
        task = asyncio.get_running_loop().create_task(
            self.close_socket(WSCloseCode.POLICY_VIOLATION, b"slow consumer")
        )
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    @property
    def queued(self) -> int:
        """Messages not yet handed to the socket."""
        return len(self._queue) + len(self._soon)

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    async def _writer(self) -> None:
        queue, ws = self._queue, self.ws
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                while queue:
                    data = queue.popleft()
                    self._bytes -= len(data)
                    # written before its first await; then waits while the transport is over its
                    # high-water mark (WRITER_LIMIT), so an inline write never overtakes it
                    await ws.send_frame(data, WSMsgType.TEXT)
                self._flushed.set()
        except (ConnectionError, RuntimeError):
            pass  # the socket went away; the reader sees the close and cleans up
        finally:
            self._closed = True
            queue.clear()
            self._bytes = 0
            self._flushed.set()

    async def flush(self, timeout: float) -> bool:
        """Wait (at most ``timeout``) until everything queued has been written; True if it was.
        Used before a server-initiated close so the last messages (failures, acks) are not lost."""
        self._write_soon()  # this turn's frames first: a close frame must not overtake them
        if not self._queue or self._task.done():
            return not self._queue
        try:
            await asyncio.wait_for(self._flushed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close_socket(self, code: int = WSCloseCode.OK, message: bytes = b"") -> None:
        """Close the WebSocket: the close handshake for at most ``CLOSE_TIMEOUT``, then the TCP
        connection is dropped. Writing a close frame to a peer that no longer reads waits for buffer
        space that never comes; unbounded, it would keep the connection, and its session or node,
        alive for ever."""
        try:
            await asyncio.wait_for(self.ws.close(code=code, message=message), CLOSE_TIMEOUT)
        except (TimeoutError, ConnectionError, RuntimeError):
            if self.transport is not None:
                self.transport.abort()

    async def close(self) -> None:
        """Stop the writer after flushing what is queued (bounded: the queue is bounded)."""
        self._write_soon()
        self._closed = True
        if self._queue and not self.ws.closed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._flushed.wait(), 1.0)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
