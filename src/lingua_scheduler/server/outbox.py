"""A connection's outbound side: a bounded queue drained by one writer task.

``send()`` never blocks and never awaits: it encodes and enqueues. A peer that stops reading fills its
queue; when the bound is reached the connection is closed as a slow consumer instead of buffering
without limit (ARCHITECTURE.md section 2.8).
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


class Outbox:
    __slots__ = ("_closed", "_flushed", "_queue", "_task", "_wakeup", "limit", "name", "slow_consumer", "ws")

    def __init__(self, ws: web.WebSocketResponse, limit: int, name: str) -> None:
        self.ws = ws
        self.limit = limit
        self.name = name
        self._queue: deque[bytes] = deque()
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
        if len(self._queue) >= self.limit:
            self.slow_consumer = True
            log.warning("slow consumer disconnected", extra={"conn": self.name, "queued": len(self._queue)})
            self._closed = True
            asyncio.get_running_loop().create_task(
                self.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"slow consumer")
            )
            return False
        self._queue.append(data)
        self._flushed.clear()
        self._wakeup.set()
        return True

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def _writer(self) -> None:
        queue, ws = self._queue, self.ws
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                while queue:
                    await ws.send_frame(queue.popleft(), WSMsgType.TEXT)
                self._flushed.set()
        except (ConnectionError, RuntimeError):
            pass  # the socket went away; the reader sees the close and cleans up
        finally:
            self._closed = True
            queue.clear()
            self._flushed.set()

    async def close(self) -> None:
        """Stop the writer after flushing what is queued (bounded: the queue is bounded)."""
        self._closed = True
        if self._queue and not self.ws.closed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._flushed.wait(), 1.0)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
