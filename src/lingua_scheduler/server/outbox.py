"""A connection's outbound side: written inline when the socket keeps up, else a bounded queue drained
by one writer task.

``send()`` never blocks and never awaits. When nothing is queued and the transport holds no unsent
bytes (the socket is writable), the frame is written into the transport at once, from the receive
loop that produced it: a heartbeat's ack costs one write and no task step (the writer task used to
wake for every ack: two task steps and an event per heartbeat, a fifth of the heartbeat's cost).
Otherwise (backpressure, or frames already waiting) it is queued behind them, in order, and the
writer task sends it with aiohttp's flow control. A peer that stops reading fills its
queue; when the bound is reached the connection is closed as a slow consumer instead of buffering
without limit (no queue of the scheduler is unbounded). The bound is in messages (``limit``) and,
optionally, in bytes (``max_bytes``): a thousand results carrying synthesized audio would otherwise be a
gigabyte. A single message larger than ``max_bytes`` is still accepted into an empty queue.
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


_HEAD_SHORT = struct.Struct("!BB").pack
_HEAD_MEDIUM = struct.Struct("!BBH").pack
_HEAD_LONG = struct.Struct("!BBQ").pack


def text_frame(payload: bytes) -> bytes:
    """One final, unmasked, uncompressed text frame (RFC 6455 5.2): what aiohttp writes for
    ``send_frame(payload, TEXT)`` on a socket opened with ``compress=False``."""
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
        "_queue",
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
        #: the TCP connection under ``ws``, dropped when a close handshake cannot complete
        self.transport = transport
        self.limit = limit
        self.max_bytes = max_bytes
        self.name = name
        self._queue: deque[bytes] = deque()
        #: bytes in ``_queue`` (not yet handed to the socket)
        self._bytes = 0
        self._wakeup = asyncio.Event()
        self._flushed = asyncio.Event()
        self._closed = False
        self.slow_consumer = False
        self._task = asyncio.get_running_loop().create_task(self._writer(), name=f"outbox-{name}")

    def send(self, message: msgspec.Struct) -> bool:
        """Queue one message; False if the connection is closed or was cut off as a slow consumer."""
        return self.send_raw(encode(message))

    def send_raw(self, data: bytes) -> bool:
        if self._closed:
            return False
        over_bytes = self.max_bytes is not None and self._queue and self._bytes + len(data) > self.max_bytes
        if len(self._queue) >= self.limit or over_bytes:
            self.slow_consumer = True
            log.warning(
                "slow consumer disconnected",
                extra={"conn": self.name, "queued": len(self._queue), "queued_bytes": self._bytes},
            )
            self._closed = True
            task = asyncio.get_running_loop().create_task(
                self.close_socket(WSCloseCode.POLICY_VIOLATION, b"slow consumer")
            )
            _closing.add(task)
            task.add_done_callback(_closing.discard)
            return False
        transport = self.transport
        if (
            not self._queue
            and transport is not None
            and not transport.get_write_buffer_size()
            and not transport.is_closing()
            and not self.ws.closed
        ):
            transport.write(text_frame(data))  # writable and nothing ahead of it: no task step
            return True
        self._queue.append(data)
        self._bytes += len(data)
        self._flushed.clear()
        self._wakeup.set()
        return True

    @property
    def queued(self) -> int:
        return len(self._queue)

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
        self._closed = True
        if self._queue and not self.ws.closed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._flushed.wait(), 1.0)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
