"""A minimal WebSocket client (RFC 6455) on an asyncio ``Protocol``, cheap enough for 10,000 sockets.

A full client (aiohttp) costs a reader task, a response object and several layers per message; a load
generator that must keep ten thousand simulated nodes heartbeating from one or two processes cannot
afford that without its own cost polluting the figures it measures. This client does the handshake,
sends text frames and calls back with every complete text or binary message it receives.

Deliberate shortcuts, acceptable for a load generator driving a scheduler directly: the masking key
of client frames is all zeros (the framing is legal -- the mask bit is set and a key is sent -- but the
payload is left as is instead of XOR-ing every byte), the handshake's ``Sec-WebSocket-Accept`` is not
verified, and no extensions or subprotocols are negotiated.

TLS (wss://) is the event loop's own transport; the client is then as cheap as before but for the
encryption. The zero masking key is harmless to the scheduler, but masking exists to protect proxies
that cache: drive a scheduler directly, not through such a proxy.

Must never: be used as a general-purpose client (it exists to measure the scheduler).
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import struct
from collections.abc import Callable, Mapping
from typing import cast

_MASK = b"\x00\x00\x00\x00"
_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def frame(payload: bytes, opcode: int = _OP_TEXT) -> bytes:
    """One final, masked (zero key) client frame."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + _MASK + payload


class HandshakeError(ConnectionError):
    """The server did not switch protocols."""


class Refused(ConnectionError):
    """The scheduler answered a node's or session's first request with an error frame."""


class WebSocketClient(asyncio.Protocol):
    """One client connection. ``on_message(payload)`` runs for each complete data message;
    ``on_close()`` once when the connection is gone (either side)."""

    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        on_message: Callable[[bytes], None],
        on_close: Callable[[], None] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
        ).encode()
        self.on_message = on_message
        self.on_close = on_close
        self.transport: asyncio.Transport | None = None
        self.open = False
        self._buf = bytearray()
        self._fragments: list[bytes] = []
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # --- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        was_open = self.open or not self._ready.done()
        self.open = False
        if not self._ready.done():
            self._ready.set_exception(exc or ConnectionError("connection closed during the handshake"))
        if was_open and self.on_close is not None:
            self.on_close()

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if not self._ready.done():
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[:end]).split(b"\r\n", 1)[0]
            del buf[: end + 4]
            if b" 101 " not in status + b" ":
                self._ready.set_exception(HandshakeError(status.decode(errors="replace")))
                assert self.transport is not None
                self.transport.close()
                return
            self.open = True
            self._ready.set_result(None)
        self._parse()

    # --- frames -----------------------------------------------------------------------------------

    def _parse(self) -> None:
        buf = self._buf
        pos = 0
        size = len(buf)
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n = b1 & 0x7F
            head = 2
            if n == 126:
                if size - pos < 4:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                head = 4
            elif n == 127:
                if size - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            mask = b""
            if b1 & 0x80:  # servers do not mask, but honour it if one does
                if size - pos < head + 4:
                    break
                mask = bytes(buf[pos + head : pos + head + 4])
                head += 4
            if size - pos < head + n:
                break
            payload = bytes(buf[pos + head : pos + head + n])
            pos += head + n
            if mask:
                payload = bytes(c ^ mask[i & 3] for i, c in enumerate(payload))
            self._on_frame(b0 & 0x80 != 0, b0 & 0x0F, payload)
        if pos:
            del buf[:pos]

    def _on_frame(self, fin: bool, opcode: int, payload: bytes) -> None:
        if opcode in (_OP_TEXT, _OP_BINARY, _OP_CONT):
            if not fin:
                self._fragments.append(payload)
                return
            if self._fragments:
                self._fragments.append(payload)
                payload = b"".join(self._fragments)
                self._fragments.clear()
            self.on_message(payload)
        elif opcode == _OP_PING:
            self._write(frame(payload, _OP_PONG))
        elif opcode == _OP_CLOSE:
            self._write(frame(payload[:2], _OP_CLOSE))
            self.open = False
            if self.transport is not None:
                self.transport.close()

    # --- API ----------------------------------------------------------------------------------------

    async def wait_open(self) -> None:
        await self._ready

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send(self, payload: bytes) -> bool:
        """Queue one text message; False when the connection is gone."""
        if not self.open or self.transport is None or self.transport.is_closing():
            return False
        self.transport.write(frame(payload))
        return True

    def close(self) -> None:
        """Close handshake, then the socket (the server answers and closes too)."""
        if self.open:
            self._write(frame(struct.pack("!H", 1000), _OP_CLOSE))
        self.open = False
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the TCP connection without a close handshake (a crashed peer)."""
        self.open = False
        if self.transport is not None:
            self.transport.abort()


async def connect(
    host: str,
    port: int,
    path: str,
    on_message: Callable[[bytes], None],
    on_close: Callable[[], None] | None = None,
    timeout: float = 30.0,
    *,
    headers: Mapping[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> WebSocketClient:
    """Open a connection (TLS with ``ssl_context``: wss://) and complete the handshake, sending
    ``headers`` with the upgrade request (``Authorization`` for a tenant API key)."""
    loop = asyncio.get_running_loop()
    _, proto = await asyncio.wait_for(
        loop.create_connection(
            lambda: WebSocketClient(host, port, path, on_message, on_close, headers),
            host,
            port,
            ssl=ssl_context,
            server_hostname=host if ssl_context is not None else None,
        ),
        timeout,
    )
    await asyncio.wait_for(proto.wait_open(), timeout)
    return proto
