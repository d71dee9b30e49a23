"""Reaching a scheduler from a client tool: the TLS context, and why a connection attempt failed.

Shared by the simulators and the load test. ``client_ssl_context`` is what ``--ca-file`` and
``--insecure`` mean: trust the system's CA store, or a given CA file (the scheduler's own certificate
when it is self-signed), or nothing at all (a test certificate, never verified). ``describe`` turns
what a failed connection attempt raised into one line naming the URL and what to do, instead of a
traceback: a user pointing a simulator at the wrong place needs to read which place and why.
``start_bounded`` runs one client's start (connect + first request) within a time limit and files
its outcome in a ``Tally``: accepted, refused by the scheduler (its error code and message), or failed.

Must never: put a credential into a description (a URL with ``?api_key=`` is shown without its query).
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import yarl

#: what a client tool prints when a TLS handshake is refused for want of trust
TLS_HINT = (
    "pass --ca-file FILE (the CA or self-signed certificate of the scheduler), "
    "or --insecure for a test certificate"
)


class Unreachable(Exception):
    """The scheduler could not be reached at all: ``str()`` is the one line to show."""


def client_ssl_context(ca_file: str | None = None, insecure: bool = False) -> ssl.SSLContext:
    """The client context for wss:// and https://: verified against ``ca_file`` (else the system's
    store), or not verified at all with ``insecure``. A CA file that cannot be read is ``Unreachable``."""
    if insecure:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    try:
        return ssl.create_default_context(cafile=ca_file)
    except FileNotFoundError:
        raise Unreachable(f"--ca-file {ca_file}: file not found") from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise Unreachable(f"--ca-file {ca_file}: not a readable PEM certificate file ({exc})") from None


def safe_url(url: str) -> str:
    """``url`` without its query string and user info (where credentials may be)."""
    try:
        u = yarl.URL(url)
    except ValueError:
        return url.split("?", 1)[0]
    return str(u.with_query(None).with_user(None)) if u.is_absolute() else str(u.with_query(None))


def describe(url: str, exc: BaseException, timeout: float) -> str:
    """One line saying why connecting to ``url`` failed."""
    where = safe_url(url)
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        if exc.status in (403, 429, 503):
            return f"{where}: the scheduler refused the WebSocket upgrade (HTTP {exc.status})"
        return (
            f"{where}: not a WebSocket endpoint (HTTP {exc.status}); "
            "the scheduler serves /ws/node and /ws/session"
        )
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        exc = exc.certificate_error
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"{where}: TLS certificate not trusted ({exc.verify_message}); {TLS_HINT}"
    if isinstance(exc, (aiohttp.ClientSSLError, ssl.SSLError)):
        cause = getattr(exc, "os_error", exc)
        reason = getattr(cause, "reason", None) or cause
        return f"{where}: TLS handshake failed ({reason}); does the scheduler serve TLS on this port?"
    if isinstance(exc, TimeoutError):
        return f"{where}: no answer within {timeout:g} s (wrong host or port, or not a lingua scheduler?)"
    if isinstance(exc, aiohttp.InvalidURL):
        return f"{where}: not a valid URL"
    if isinstance(exc, aiohttp.ClientConnectorError):
        err = exc.os_error
        reason = os.strerror(err.errno) if err.errno else str(err)
        return f"{where}: cannot connect ({reason}); is the scheduler running there?"
    if isinstance(exc, (aiohttp.ServerDisconnectedError, ConnectionResetError)):
        return (
            f"{where}: the server closed the connection during the handshake "
            "(a plain ws:// or http:// URL for a TLS listener?)"
        )
    if isinstance(exc, OSError) and exc.errno and not isinstance(exc, aiohttp.ClientError):
        return f"{where}: cannot connect ({os.strerror(exc.errno)}); is the scheduler running there?"
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        return f"{where}: cannot connect ({exc.__class__.__name__}: {exc})"
    return f"{where}: {exc.__class__.__name__}: {exc}"


class Tally:
    """How the start of many simulated clients went: registered/opened, refused (by code), or
    unreachable (no answer from the scheduler: the one-line reason)."""

    def __init__(self) -> None:
        self.ok = 0
        #: error code -> [count, first message]
        self.refusals: dict[str, list[Any]] = {}
        #: one-line failure description -> count
        self.failures: dict[str, int] = {}

    def refused(self, code: str, message: str) -> None:
        entry = self.refusals.setdefault(code, [0, message])
        entry[0] += 1

    def failed(self, line: str) -> None:
        self.failures[line] = self.failures.get(line, 0) + 1

    def as_dict(self, ok_name: str) -> dict[str, Any]:
        return {
            ok_name: self.ok,
            "refused": sum(c for c, _ in self.refusals.values()),
            "refusals": [{"code": k, "count": c, "message": m} for k, (c, m) in self.refusals.items()],
            "unreachable": sum(self.failures.values()),
            "unreachable_reasons": [{"reason": k, "count": c} for k, c in self.failures.items()],
        }


async def start_bounded(
    url: str,
    timeout: float,
    tally: Tally,
    start: Callable[[], Awaitable[dict[str, Any]]],
    *,
    probe: bool = False,
) -> bool:
    """Run ``start()`` (connect + the first request, returning the reply) within ``timeout`` and file
    its outcome in ``tally``. With ``probe``, a connection-level failure raises ``Unreachable`` (the
    first client of a run: the rest would fail the same way)."""
    try:
        async with asyncio.timeout(timeout):
            reply: dict[str, Any] = await start()
    except (aiohttp.ClientError, OSError, TimeoutError, ssl.SSLError) as exc:
        if isinstance(exc, aiohttp.WSServerHandshakeError) and exc.status in (403, 429, 503):
            tally.refused(f"HTTP_{exc.status}", describe(url, exc, timeout))
            return False
        if probe:
            raise Unreachable(describe(url, exc, timeout)) from None
        tally.failed(describe(url, exc, timeout))
        return False
    if reply.get("type") == "error":
        tally.refused(str(reply.get("code")), str(reply.get("message", "")))
        return False
    tally.ok += 1
    return True
