"""The floor servers of ``bench/floor.py`` (benchmark-only): the least a heartbeat can cost.

Each answers ``/health`` and speaks just enough of the node protocol for the load generator: a
``node_register`` is answered ``node_register_ack``, a ``node_heartbeat`` is decoded with the product's
own decoder (``FrameDecoder(NodeInbound)``, so validation costs the same) and answered with an encoded
``node_heartbeat_ack`` written from the receive path. Nothing else: no registry, no metrics, no rate
limit. What the product spends above them is its own per-heartbeat work.

- ``aiohttp``: the same aiohttp as the product (``web.WebSocketResponse``, ``async for``), the ack
  written into the transport inline, without a writer task;
- ``raw``: an ``asyncio.Protocol`` on the event loop's socket: the HTTP upgrade and RFC 6455 framing
  parsed by hand, the ack written in ``data_received``.

    .venv/bin/python bench/floor_servers.py --kind aiohttp --port 5011
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import hashlib
import time
from typing import Any

from aiohttp import WSMsgType, web

from lingua_scheduler.protocol.codec import FrameDecoder, encode
from lingua_scheduler.protocol.node import (
    NodeHeartbeat,
    NodeHeartbeatAck,
    NodeInbound,
    NodeRegister,
    NodeRegisterAck,
)
from lingua_scheduler.server.ws.outbox import text_frame

MAX_FRAME = 1 << 20
INTERVAL_MS = 1000
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B65"


def answer(msg: object) -> bytes | None:
    """The encoded reply of the floor to one decoded message."""
    if type(msg) is NodeHeartbeat:
        return encode(
            NodeHeartbeatAck(
                node_id=msg.node_id,
                timestamp=msg.timestamp,
                server_ts_ms=int(time.time() * 1000),
                next_heartbeat_ms=INTERVAL_MS,
            )
        )
    if type(msg) is NodeRegister:
        return encode(
            NodeRegisterAck(
                node_id=msg.node_id or "floor",
                message="registered",
                status="registering",
                heartbeat_interval_ms=INTERVAL_MS,
            )
        )
    return None


# --- aiohttp ---------------------------------------------------------------------------------------------


async def _ws(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse(compress=False, max_msg_size=MAX_FRAME, heartbeat=None, autoping=False)
    await ws.prepare(request)
    transport = request.transport
    assert transport is not None
    decoder: FrameDecoder[Any] = FrameDecoder(NodeInbound, MAX_FRAME)
    async for frame in ws:
        if frame.type in (WSMsgType.TEXT, WSMsgType.BINARY):
            reply = answer(decoder.decode(frame.data))
            if reply is not None and not transport.is_closing():
                transport.write(text_frame(reply))
    return ws


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def run_aiohttp(port: int) -> None:
    app = web.Application()
    app.router.add_get("/ws/node", _ws)
    app.router.add_get("/health", _health)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# --- raw ---------------------------------------------------------------------------------------------------


class RawConnection(asyncio.Protocol):
    """One connection: an HTTP request head, then (after an upgrade) WebSocket frames."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded = False
        self.decoder: FrameDecoder[Any] = FrameDecoder(NodeInbound, MAX_FRAME)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.upgraded:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).decode("latin-1")
            del self.buf[: end + 4]
            self._http(head)
            if not self.upgraded:
                return
        self._frames()

    def _http(self, head: str) -> None:
        assert self.transport is not None
        lines = head.split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if lines[0].startswith("GET /health"):
            body = b'{"status": "ok"}'
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%b" % (len(body), body)
            )
            self.transport.close()
            return
        key = headers.get("sec-websocket-key", "").encode()
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: %b\r\n\r\n" % accept
        )
        self.upgraded = True

    def _frames(self) -> None:
        buf, transport = self.buf, self.transport
        assert transport is not None
        pos, size = 0, len(buf)
        while size - pos >= 6:
            b0, b1 = buf[pos], buf[pos + 1]
            n, head = b1 & 0x7F, 2
            if n == 126:
                n, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif n == 127:
                n, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if size - pos < head + 4 + n:
                break
            mask = buf[pos + head : pos + head + 4]
            payload = buf[pos + head + 4 : pos + head + 4 + n]
            pos += head + 4 + n
            if mask != b"\0\0\0\0":  # the load generator's key is zeros; honour any other
                payload = bytearray(c ^ mask[i & 3] for i, c in enumerate(payload))
            opcode = b0 & 0x0F
            if opcode == 0x8:
                transport.close()
                return
            if opcode in (0x1, 0x2):
                reply = answer(self.decoder.decode(bytes(payload)))
                if reply is not None:
                    transport.write(text_frame(reply))
        if pos:
            del buf[:pos]


def run_raw(port: int) -> None:
    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(
            RawConnection, "127.0.0.1", port, backlog=4096
        )
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", choices=["aiohttp", "raw"], required=True)
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    gc.freeze()
    (run_aiohttp if args.kind == "aiohttp" else run_raw)(args.port)


if __name__ == "__main__":
    main()
