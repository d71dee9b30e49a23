"""``server/ws/inline_frames.py`` on this aiohttp: data frames handled from the read callback, in order with
what the receive loop still handles (control frames, frames the handler sends back to the queue)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio
from aiohttp import WSMsgType, web

from lingua_scheduler.server.ws import inline_frames
from tests.redis_support import free_port
from tests.server.raw_ws import PING, TEXT, RawWebSocket


def text_frame(payload: bytes) -> bytes:
    """One short unmasked server text frame."""
    assert len(payload) < 126
    return bytes([0x81, len(payload)]) + payload


@pytest_asyncio.fixture
async def echo() -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """A server on 127.0.0.1 whose /ws socket answers "inline:<frame>" from the read callback and
    "loop:<frame>" from its receive loop (frames starting with "q" are sent back to the queue)."""
    seen: dict[str, Any] = {"installed": []}

    async def handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(autoping=False, decode_text=False)
        await ws.prepare(request)
        transport = request.transport
        assert transport is not None

        def handle(data: bytes) -> bool:
            if data.startswith(b"q"):
                return False
            transport.write(text_frame(b"inline:" + data))
            return True

        sink = inline_frames.install(ws, request, handle)
        seen["installed"].append(sink is not None)
        while True:
            msg = await ws.receive()
            if sink is not None:
                sink.taken(msg.type, msg.data)
            if msg.type is WSMsgType.PING:
                await ws.pong(msg.data)
            elif msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                await ws.send_bytes(b"loop:" + msg.data)
            else:
                break
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    yield port, seen
    await runner.cleanup()


async def test_data_frames_are_answered_inline_and_in_order(echo: tuple[int, dict[str, Any]]) -> None:
    port, seen = echo
    ws = await RawWebSocket.connect(f"ws://127.0.0.1:{port}/ws")
    try:
        # one write: data, a ping, data, a frame for the loop, then data queued behind it
        await ws.send_raw(
            b"".join(
                RawWebSocket.frame(p, op)
                for p, op in ((b"a", TEXT), (b"p", PING), (b"b", TEXT), (b"q1", TEXT), (b"c", TEXT))
            )
        )
        got = [await asyncio.wait_for(ws.receive(), 5) for _ in range(5)]
    finally:
        ws.close()
    assert seen["installed"] == [True]  # this aiohttp has what install() needs: frames go inline
    data = [payload for opcode, payload in got if opcode != 0xA]
    # a and b inline; q1 to the loop, and c, arriving while q1 waits there, after it
    assert data == [b"inline:a", b"inline:b", b"loop:q1", b"loop:c"]
    assert (0xA, b"p") in got
