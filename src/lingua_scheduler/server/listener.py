"""The listening sockets of ``serve``, behind the connection guard.

Owns ``GuardedSockSite``: an aiohttp site over a socket that ``serve`` bound beforehand (so a busy port
fails the start before anything runs, server/startup.py), listening with aiohttp's protocol wrapped by
the connection guard (``server/connection_guard.py``: every accepted socket counted and capped, request
heads and pre-authentication bytes bounded) and with the TLS handshake bounded by
``limits.header_timeout_seconds``. aiohttp's own sites have no hook for either.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

from aiohttp import web

from lingua_scheduler.server.connection_guard import ConnectionGuard


class GuardedSockSite(web.BaseSite):
    """Like aiohttp's ``SockSite``, listening with the guard's protocol factory."""

    __slots__ = ("_guard", "_handshake_timeout", "_sock")

    def __init__(
        self,
        runner: web.BaseRunner,
        guard: ConnectionGuard,
        sock: socket.socket,
        *,
        ssl_context: ssl.SSLContext | None,
        backlog: int,
        handshake_timeout: float,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._guard = guard
        self._sock = sock
        self._handshake_timeout = handshake_timeout

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        host, port = self._sock.getsockname()[:2]
        return f"{scheme}://{host}:{port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._guard.factory(server),
            sock=self._sock,
            ssl=self._ssl_context,
            backlog=self._backlog,
            ssl_handshake_timeout=self._handshake_timeout if self._ssl_context is not None else None,
        )
