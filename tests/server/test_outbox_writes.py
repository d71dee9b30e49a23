"""The outbox's two write paths over a real WebSocket: frames of a loop turn written together at its
end, and the writer task behind a full transport. Order holds across both, and a peer that stops
reading is cut off by transport backpressure, not only by a burst within one turn."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from lingua_scheduler.server.ws.outbox import WRITER_LIMIT, Outbox
from tests.server.raw_ws import RawWebSocket


async def _serve(handler: object) -> TestServer:
    app = web.Application()
    app.router.add_get("/ws", handler)  # type: ignore[arg-type]
    server = TestServer(app)
    await server.start_server()
    return server


async def test_frames_arrive_in_order_across_both_write_paths() -> None:
    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False, writer_limit=WRITER_LIMIT)
        await ws.prepare(request)
        transport = request.transport
        assert transport is not None
        # a small kernel buffer: the big frames stay in the transport's buffer, the next frames queue
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        transport.set_write_buffer_limits(high=8192)
        outbox = Outbox(ws, 100_000, "test", transport=transport)
        queued_seen = 0
        big = b"x" * 70_000  # over the transport's low-water mark: the frames after it queue
        n = 0
        for turn in range(200):
            for _ in range(turn % 7):
                payload = b'"%d"' % n if n % 50 else b'"%d%s"' % (n, big)
                assert outbox.send_raw(payload)
                queued_seen = max(queued_seen, len(outbox._queue))
                n += 1
            await asyncio.sleep(0)
        assert queued_seen > 0  # the writer task's path was taken too
        assert outbox.send_raw(b'"end"')
        assert await outbox.flush(10)
        await outbox.close()
        await ws.close()
        return ws

    server = await _serve(handler)
    try:
        async with aiohttp.ClientSession() as http, http.ws_connect(server.make_url("/ws")) as ws:
            got = []
            async for msg in ws:
                text = msg.data.strip('"').rstrip("x")
                if text == "end":
                    break
                got.append(int(text))
        assert got == list(range(len(got))) and len(got) > 500
    finally:
        await server.close()


async def test_peer_that_stops_reading_is_cut_off_by_transport_backpressure() -> None:
    result: dict[str, object] = {}

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False, writer_limit=WRITER_LIMIT)
        await ws.prepare(request)
        transport = request.transport
        assert transport is not None
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        transport.set_write_buffer_limits(high=8192)
        outbox = Outbox(ws, 16, "test", transport=transport)
        sent = 0
        while sent < 100_000 and outbox.send_raw(b'"' + b"y" * 1000 + b'"'):
            sent += 1
            await asyncio.sleep(0)  # one frame per turn: never a burst of 16 in one turn
        result.update(sent=sent, slow=outbox.slow_consumer)
        await outbox.close()
        return ws

    server = await _serve(handler)
    try:
        # a raw peer with a small window that never reads: nothing drains the socket behind the test
        peer = await RawWebSocket.connect(str(server.make_url("/ws")), rcvbuf=4096)
        for _ in range(1000):
            if result:
                break
            await asyncio.sleep(0.01)
        peer.sock.close()
        assert result.get("slow") is True and isinstance(result["sent"], int) and result["sent"] < 100_000
    finally:
        await server.close()
