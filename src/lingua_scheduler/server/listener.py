"""The listening socket of ``serve`` and the process's event loop around it.

Owns: the aiohttp runner and the site (``GuardedSite``) that listens with aiohttp's protocol behind the
connection guard (``server/connection_guard.py``), with the TLS handshake bounded by
``limits.header_timeout_seconds``; and ``run_app``, which runs the loop until SIGTERM/SIGINT end it the
way ``aiohttp.web.run_app`` does (that function builds its own sites, with no hook for a protocol
wrapper or a handshake timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

from aiohttp import web
from aiohttp.web_runner import GracefulExit

from lingua_scheduler.config import Config
from lingua_scheduler.server.connection_guard import GUARD, ConnectionGuard

#: idle keep-alive connections are closed after this long (aiohttp's run_app default); a request head
#: that has started is bounded by limits.header_timeout_seconds instead
KEEPALIVE_TIMEOUT = 75.0


class GuardedSite(web.BaseSite):
    """A TCP site like aiohttp's ``TCPSite``, listening with the guard's protocol factory."""

    __slots__ = ("_guard", "_handshake_timeout", "_host", "_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        guard: ConnectionGuard,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        backlog: int,
        handshake_timeout: float,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._guard = guard
        self._host = host
        self._port = port
        self._handshake_timeout = handshake_timeout

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._guard.factory(server),
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            ssl_handshake_timeout=self._handshake_timeout if self._ssl_context is not None else None,
        )


async def _serve(app: web.Application, config: Config, ssl_context: ssl.SSLContext | None) -> None:
    runner = web.AppRunner(app, handle_signals=True, access_log=None, keepalive_timeout=KEEPALIVE_TIMEOUT)
    await runner.setup()
    try:
        site = GuardedSite(
            runner,
            app[GUARD],
            config.server.host,
            config.server.port,
            ssl_context=ssl_context,
            backlog=config.server.backlog,
            handshake_timeout=config.limits.header_timeout_seconds,
        )
        await site.start()
        await asyncio.Event().wait()  # until the signal handler raises GracefulExit
    finally:
        await runner.cleanup()


def run_app(app: web.Application, config: Config, ssl_context: ssl.SSLContext | None) -> None:
    """Serve ``app`` until SIGTERM/SIGINT, then run aiohttp's shutdown (as ``web.run_app`` does)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    main = loop.create_task(_serve(app, config, ssl_context))
    try:
        loop.run_until_complete(main)
    except (GracefulExit, KeyboardInterrupt):
        pass
    finally:
        if not main.done():
            main.cancel()
            with contextlib.suppress(asyncio.CancelledError, GracefulExit, KeyboardInterrupt):
                loop.run_until_complete(main)
        rest = asyncio.all_tasks(loop)
        for task in rest:
            task.cancel()
        if rest:
            loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        asyncio.set_event_loop(None)
        loop.close()
