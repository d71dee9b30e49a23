"""A connection's outbound side: a bounded queue drained by one writer task.

``send()`` never blocks and never awaits: it encodes and enqueues. A peer that stops reading fills its
queue; when the bound is reached the connection is closed as a slow consumer instead of buffering
without limit (no queue of the scheduler is unbounded). The bound is in messages (``limit``) and,
optionally, in bytes (``max_bytes``): a thousand results carrying synthesized audio would otherwise be a
gigabyte. A single message larger than ``max_bytes`` is still accepted into an empty queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

import msgspec
from aiohttp import WSCloseCode, WSMsgType, web

from lingua_scheduler.protocol.codec import encode

log = logging.getLogger(__name__)

#: longest a close handshake may take before the TCP connection is dropped
CLOSE_TIMEOUT = 2.0
#: close tasks in flight (asyncio keeps only weak references to tasks)
_closing: set[asyncio.Task[None]] = set()


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
