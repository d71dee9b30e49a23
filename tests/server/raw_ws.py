"""A raw WebSocket client over a plain socket, for peers no real client library would be.

It sends any frame bytes (invalid UTF-8 in a TEXT frame, any opcode) and reads only when asked, so a
test can play a peer that stops reading: nothing drains the socket behind the test's back (an asyncio
stream or aiohttp client would keep reading into their own buffers).
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
from urllib.parse import urlsplit

TEXT = 0x1
BINARY = 0x2
CLOSE = 0x8
PING = 0x9


class RawWebSocket:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""

    @classmethod
    async def connect(
        cls, url: str, *, rcvbuf: int | None = None, headers: dict[str, str] | None = None
    ) -> RawWebSocket:
        """Open the TCP connection and complete the upgrade (raises ``ConnectionError`` if refused)."""
        parts = urlsplit(url)
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect, so the advertised window is small from the start
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await loop.sock_connect(sock, (parts.hostname or "127.0.0.1", parts.port or 80))
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {parts.path or '/'} HTTP/1.1",
            f"Host: {parts.hostname}:{parts.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *(f"{k}: {v}" for k, v in (headers or {}).items()),
        ]
        await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode())
        ws = cls(sock)
        head = await ws._read_until(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status:
            sock.close()
            raise ConnectionError(f"upgrade refused: {status.decode(errors='replace')}")
        return ws

    async def _read_until(self, marker: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        while marker not in self._buf:
            data = await loop.sock_recv(self.sock, 65536)
            if not data:
                raise ConnectionError("connection closed during the handshake")
            self._buf += data
        head, _, self._buf = self._buf.partition(marker)
        return head

    async def _read_exact(self, n: int) -> bytes:
        loop = asyncio.get_running_loop()
        while len(self._buf) < n:
            data = await loop.sock_recv(self.sock, 65536)
            if not data:
                raise ConnectionError("connection closed")
            self._buf += data
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    @staticmethod
    def frame(payload: bytes, opcode: int = TEXT, *, fin: bool = True) -> bytes:
        """One client frame (masked, as RFC 6455 requires of clients)."""
        head = bytes([(0x80 if fin else 0) | opcode])
        n = len(payload)
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return head + mask + masked

    async def send(self, payload: bytes, opcode: int = TEXT) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, self.frame(payload, opcode))

    async def send_raw(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def receive(self) -> tuple[int, bytes]:
        """The next frame from the server: (opcode, payload). Server frames are not masked."""
        b0, b1 = await self._read_exact(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self._read_exact(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self._read_exact(8))
        return b0 & 0x0F, await self._read_exact(n)

    async def close_code(self, timeout: float = 5.0) -> int | None:
        """Read until the server's close frame; its status code (None if the TCP connection just ended)."""

        async def until_close() -> int | None:
            while True:
                try:
                    opcode, payload = await self.receive()
                except ConnectionError:
                    return None
                if opcode == CLOSE:
                    return int(struct.unpack("!H", payload[:2])[0]) if len(payload) >= 2 else None

        return await asyncio.wait_for(until_close(), timeout)

    def close(self) -> None:
        self.sock.close()
