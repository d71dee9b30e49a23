"""Start-up of ``serve``: check what can be checked, bind, announce, and explain a failure in one line.

Owns the order of a start and its failures:

1. the Redis URL is checked (a malformed URL is a configuration error, not a Redis outage) and the
   TLS context is loaded (server/tls.py) before anything runs;
2. the listening sockets are bound before the application starts, so a busy port or an address that
   is not this machine's stops the start with nothing to undo;
3. "lingua-scheduler listening" is logged once they are bound, with the port really bound
   (``--port 0``), the dashboard and endpoint URLs and the mode (embedded, or Redis and the
   instance id);
4. the application starts (background tasks, cluster loops), the sockets start accepting, and in
   Redis mode the store is asked once: unreachable is not fatal (the instance serves its own nodes
   and sessions, degraded, until Redis answers) but it is said in the log, not only on ``/ready``.

A start that cannot go on raises ``StartupError`` (environment: exit status 1) or ``ConfigError``
(configuration: exit status 2); the CLI prints ``explain(exc)``, one line, and exits with
``exit_code(exc)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import signal
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import SplitResult, urlsplit

from aiohttp import web
from aiohttp.web_runner import GracefulExit

from lingua_scheduler.config import Config
from lingua_scheduler.errors import ConfigError, SchedulerError
from lingua_scheduler.server import shutdown
from lingua_scheduler.server.app import build_app
from lingua_scheduler.server.cluster.cluster import Cluster
from lingua_scheduler.server.cluster.cluster_view import CLUSTER_VIEW
from lingua_scheduler.server.connection_guard import GUARD
from lingua_scheduler.server.fd_limits import Lowered, fit_descriptor_limit
from lingua_scheduler.server.http import integrator_api
from lingua_scheduler.server.listener import GuardedSockSite
from lingua_scheduler.server.reload import Reloader
from lingua_scheduler.server.state import STATE
from lingua_scheduler.server.tls import server_ssl_context
from lingua_scheduler.store.base import StoreUnavailable

log = logging.getLogger(__name__)

#: exit status of a start stopped by its configuration (flags, file, environment variables)
EXIT_CONFIG = 2
#: exit status of a start stopped by the machine it runs on (a port taken, no permission)
EXIT_ENVIRONMENT = 1
#: what aiohttp's ``run_app`` keeps an idle HTTP connection open for
KEEPALIVE_SECONDS = 75.0
REDIS_SCHEMES = ("redis", "rediss", "unix")


class StartupError(SchedulerError):
    """The machine does not let this start go on; ``message`` says what and what to do about it."""

    def __init__(self, message: str, exit_code: int = EXIT_ENVIRONMENT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def explain(exc: StartupError | ConfigError) -> str:
    """The one line the CLI prints for a start that stopped."""
    if isinstance(exc, ConfigError):
        return f"lingua-scheduler: invalid configuration: {exc}"
    return f"lingua-scheduler: cannot start: {exc.message}"


def exit_code(exc: StartupError | ConfigError) -> int:
    return EXIT_CONFIG if isinstance(exc, ConfigError) else exc.exit_code


# --- the Redis URL ----------------------------------------------------------------------------------


def redacted(url: str) -> str:
    """``url`` without its password, for logs and error lines."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.netloc.rpartition("@")[2]
        return parts._replace(netloc=f"{user}:***@{host}").geturl()
    except ValueError:
        return "<unparsable URL>"


def check_redis_url(url: str) -> None:
    """Raise ``ConfigError("cluster.redis_url", ...)`` unless ``url`` is a Redis URL we can connect to."""
    if not url:
        return
    shown = redacted(url)
    try:
        parts = urlsplit(url)
    except ValueError:
        raise _bad_url(shown, "it cannot be parsed as a URL") from None
    if parts.scheme not in REDIS_SCHEMES:
        got = f"'{parts.scheme}://'" if parts.scheme else "no scheme"
        raise _bad_url(shown, f"it must start with redis://, rediss:// or unix:// ({got})")
    if parts.scheme == "unix":
        if not parts.path:
            raise _bad_url(shown, "unix:// needs the socket path, e.g. unix:///run/redis.sock")
        return
    _check_host_and_db(parts, shown)


def _check_host_and_db(parts: SplitResult, shown: str) -> None:
    if not parts.hostname:
        raise _bad_url(shown, "it names no host, e.g. redis://127.0.0.1:6379/0")
    try:
        parts.port  # noqa: B018 - the property parses the port and raises on a bad one
    except ValueError:
        raise _bad_url(shown, "its port is not a number in 0..65535") from None
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise _bad_url(shown, f"the database after the host must be a number, e.g. /0 (got '/{db}')")


def _bad_url(shown: str, why: str) -> ConfigError:
    return ConfigError("cluster.redis_url", f"{shown} is not a Redis URL: {why}")


# --- binding ----------------------------------------------------------------------------------------


def bind(host: str, port: int, backlog: int, reuse_port: bool = False) -> list[socket.socket]:
    """Listening sockets on every address ``host`` resolves to (one port for all, even for port 0);
    with ``reuse_port``, shared with the other workers of ``serve --workers`` (SO_REUSEPORT)."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        raise StartupError(
            f"cannot listen on --host {host}: no such address or host name. Use an address of this "
            "machine, 127.0.0.1 (this machine only) or 0.0.0.0 (every IPv4 interface).",
            EXIT_CONFIG,
        ) from None
    socks: list[socket.socket] = []
    seen: set[tuple[int, str]] = set()
    try:
        for family, _, _, _, addr in infos:
            if (family, str(addr[0])) in seen:
                continue
            seen.add((family, str(addr[0])))
            bound_port = socks[0].getsockname()[1] if socks else port
            where = (addr[0], bound_port, *addr[2:])
            socks.append(_bind_one(family, where, host, port, backlog, reuse_port))
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def _bind_one(
    family: int, addr: tuple[Any, ...], host: str, port: int, backlog: int, reuse_port: bool
) -> socket.socket:
    try:
        return socket.create_server(addr, family=family, backlog=backlog, reuse_port=reuse_port)
    except OSError as exc:
        raise _bind_failure(exc, host, port) from None


def _bind_failure(exc: OSError, host: str, port: int) -> StartupError:
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return StartupError(
            f"port {port} on {host} is already in use: another process holds it. Stop that process "
            "or choose another --port (--port 0 takes a free one)."
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return StartupError(
            f"cannot listen on --host {host}: it is not an address of this machine. Use one of its "
            "addresses, 127.0.0.1 (this machine only) or 0.0.0.0 (every IPv4 interface).",
            EXIT_CONFIG,
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return StartupError(
            f"not allowed to listen on {where}: ports below 1024 need privileges. "
            "Choose --port 1024 or above."
        )
    reason = errno.errorcode.get(exc.errno or 0, "error")
    return StartupError(f"cannot listen on {where}: {exc.strerror or reason} ({reason})")


# --- the run ----------------------------------------------------------------------------------------


def serve(config: Config, reload: Callable[[], Config] | None = None, reuse_port: bool = False) -> None:
    """Serve until SIGTERM/SIGINT (drained by server/shutdown.py). Raises ``StartupError`` or
    ``ConfigError`` when the start cannot go on; nothing is left running then. ``reload`` builds the
    configuration again as the start did: with it, SIGHUP reloads ``[auth]`` and the TLS certificate
    (server/reload.py). ``reuse_port``: a worker of ``serve --workers`` (server/workers.py)."""
    check_redis_url(config.cluster.redis_url)
    ssl_context = server_ssl_context(config.tls)  # before anything starts: a bad cert stops here
    lowered = fit_descriptor_limit(config.limits)  # raise RLIMIT_NOFILE; max_connections to what fits
    socks = bind(config.server.host, config.server.port, config.server.backlog, reuse_port)
    try:
        app = build_app(config)
    except BaseException:
        for s in socks:
            s.close()
        raise
    shutdown.handle_signals(app)  # SIGTERM drains in-flight work before aiohttp's own shutdown
    _run(_serve(app, config, socks, ssl_context, lowered, reload))


def _run(main: Coroutine[Any, Any, None]) -> None:
    """What ``aiohttp.web.run_app`` does around its coroutine: its own loop (uvloop when installed),
    GracefulExit (raised by the shutdown once drained) ends it, every task is cancelled after."""
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is optional on exotic platforms
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    task = loop.create_task(main)
    try:
        loop.run_until_complete(task)
    except (GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(task)
        finally:
            rest = asyncio.all_tasks(loop)
            for t in rest:
                t.cancel()
            loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


async def _serve(
    app: web.Application,
    config: Config,
    socks: list[socket.socket],
    ssl_context: ssl.SSLContext | None,
    lowered: Lowered | None,
    reload: Callable[[], Config] | None = None,
) -> None:
    cluster = app[STATE].cluster
    # The sockets are bound and listening: a connection made from now on waits in the backlog until
    # the application has started, it is not refused. So the line goes first, before the start-up
    # warnings, where an operator (and a script reading the first line) looks for it.
    announce(config, socks[0].getsockname()[1], ssl_context is not None, cluster)
    app[CLUSTER_VIEW].port = socks[0].getsockname()[1]  # the address shown in GET /api/v1/cluster
    if lowered is not None:
        lowered.log()
    runner = web.AppRunner(app, handle_signals=True, access_log=None, keepalive_timeout=KEEPALIVE_SECONDS)
    try:
        await runner.setup()
        for s in socks:
            site = GuardedSockSite(
                runner,
                app[GUARD],
                s,
                ssl_context=ssl_context,
                backlog=config.server.backlog,
                handshake_timeout=config.limits.header_timeout_seconds,
            )
            await site.start()
        if cluster is not None:
            await _check_store(cluster, config)
        if reload is not None:
            reloader = Reloader(app[STATE], reload, ssl_context)
            reloader.after.append(functools.partial(integrator_api.reloaded, app))
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reloader.reload)
        # Objects alive at start (modules, config, routes) never become garbage: frozen, and the young
        # generation collected on the policy's cadence from now on (server/gc_policy.py)
        app[STATE].metrics.gc_policy.start()
        await asyncio.Event().wait()  # until cancelled: GracefulExit (shutdown.py) ends the loop
    finally:
        app[STATE].metrics.gc_policy.stop()
        await runner.cleanup()
        for s in socks:
            s.close()


async def _check_store(cluster: Cluster, config: Config) -> None:
    """Redis mode: ask the store once. Unreachable is not fatal, but it is said: the instance serves
    only its own nodes and sessions until Redis answers (the cluster logs when it does)."""
    try:
        await cluster.store.ping()
    except Exception as exc:  # any failure means "does not answer": StoreUnavailable, and in Redis
        # Cluster mode the client's "cannot be connected" error, which is not one of its RedisErrors
        reason = str(exc) if isinstance(exc, StoreUnavailable) else f"redis: {type(exc).__name__}: {exc}"
        log.warning(
            "Redis unreachable at start: serving degraded (only the nodes and sessions connected to "
            "this instance) until it answers",
            extra={
                "redis_url": redacted(config.cluster.redis_url),
                "reason": reason,
                "instance": cluster.instance_id,
                "degraded": True,
            },
        )


def announce(config: Config, port: int, tls: bool, cluster: Cluster | None) -> None:
    """The "listening" line: where to point a browser, a client and a node, and in which mode."""
    host = config.server.host or "0.0.0.0"
    shown = f"[{host}]" if ":" in host else host
    http, ws = ("https", "wss") if tls else ("http", "ws")
    extra: dict[str, Any] = {
        "host": host,
        "port": port,
        "dashboard": f"{http}://{shown}:{port}/dashboard",
        "session_ws": f"{ws}://{shown}:{port}/ws/session",
        "node_ws": f"{ws}://{shown}:{port}/ws/node",
        "mode": "embedded" if cluster is None else "redis",
    }
    if cluster is not None:
        extra["instance"] = cluster.instance_id
        extra["redis_url"] = redacted(config.cluster.redis_url)
    log.info("lingua-scheduler listening", extra=extra)


__all__ = [
    "EXIT_CONFIG",
    "EXIT_ENVIRONMENT",
    "StartupError",
    "announce",
    "bind",
    "check_redis_url",
    "exit_code",
    "explain",
    "redacted",
    "serve",
]
