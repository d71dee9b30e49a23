"""Every accepted socket, before aiohttp sees its bytes: counts, caps, header deadline, pre-auth bytes.

Owns:
- ``ConnectionGuard`` (one per instance, ``app[GUARD]``): the count of accepted sockets (plain HTTP and
  WebSocket alike) against ``limits.max_connections + limits.http_socket_reserve``, the count per
  source (an IPv4 address, an IPv6 /64: ``source_of``) against ``limits.max_connections_per_source``,
  and the budget of bytes received by
  sockets that have not authenticated yet (``limits.preauth_buffer_bytes``, and per socket
  ``limits.preauth_connection_bytes``).
- ``GuardedProtocol``: wraps aiohttp's request handler of one socket. It refuses the socket at accept
  (HTTP 503) when a cap is reached, charges every byte received before authentication and refuses the
  bytes that would go over a budget (they never reach aiohttp's buffers), and closes a socket whose
  request head is not complete within ``limits.header_timeout_seconds`` (HTTP 408).
- ``track_requests``: the middleware telling the guard that a request reached its handler (the head
  is complete: the header deadline ends; what the socket sent so far is released). While a plain HTTP
  request is in its handler, the bytes beyond its declared body are requests pipelined behind it,
  which aiohttp queues: they are charged (a handler may never end: the dashboard's event stream).
- ``authenticated(request)``: called by the WebSocket loop once the socket registered a node or
  opened a session; from then on its bytes are bounded by the frame limit, not by this budget.

Why at the protocol level: aiohttp parses (and buffers) what a socket sends before any handler or
middleware runs, so a bound on what unauthenticated peers make the server hold has to sit under it.
The guard is installed by ``server/listener.py`` (``serve``); an app run without it (tests' in-process
servers) only loses these checks, the middleware and the hook do nothing there.

Must never: await (everything runs in protocol callbacks), or write to a socket that aiohttp may be
writing a response to (refusals happen before a handler runs or on a WebSocket, whose frames aiohttp
writes whole).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import cast

import msgspec
from aiohttp import WSCloseCode, web
from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily, Metric

from lingua_scheduler.config import LimitsConfig
from lingua_scheduler.core.pairing import source_key
from lingua_scheduler.errors import ErrorCode
from lingua_scheduler.protocol.http import ErrorBody

log = logging.getLogger(__name__)


class Phase(Enum):
    #: reading a request head (from accept, or from the first byte after the previous response)
    HEAD = "head"
    #: a plain HTTP request is in its handler: its declared body is not charged (aiohttp's body
    #: limit bounds it), anything beyond (requests pipelined behind it) is
    HANDLER = "handler"
    #: between requests of a keep-alive connection: charged, the header deadline starts at a byte
    IDLE = "idle"
    #: a WebSocket upgrade whose peer has not authenticated: charged (the handshake deadline of
    #: ``server/limits.py`` closes it in time)
    PREAUTH = "preauth"
    #: a WebSocket that registered a node or opened a session: not charged
    AUTHENTICATED = "authenticated"
    #: refused: what it sends is dropped until the socket is gone
    REFUSED = "refused"


#: phases whose received bytes count against the pre-authentication budgets
CHARGED = frozenset({Phase.HEAD, Phase.HANDLER, Phase.IDLE, Phase.PREAUTH})


def source_of(peer: object) -> str:
    """The key a socket from ``peer`` (its ``peername``) counts under for the per-source cap: the IPv4
    address, the /64 of an IPv6 one (one host commonly holds a whole /64, so per address it would
    get an effectively unlimited number of sources)."""
    if not isinstance(peer, tuple) or not peer:
        return "?"
    return source_key(str(peer[0]))


class ConnectionGuard:
    """Per-instance counts and budgets of accepted sockets; see the module docstring."""

    def __init__(self, config: LimitsConfig, refusals: Counter, max_body_bytes: int = 0) -> None:
        #: the app's request-body limit (aiohttp's ``client_max_size``): what a chunked body may add
        self.max_body_bytes = max_body_bytes
        #: path -> the body limit of a route that reads larger bodies itself (the translate upload)
        self.body_limits: dict[str, int] = {}
        self.config = config
        #: ``lingua_limit_refusals_total`` of ``server/limits.py``: one metric for every limit hit
        self.refusals = refusals
        self.sockets = 0
        self.per_source: dict[str, int] = {}
        #: bytes received, and not yet released, by sockets in a charged phase
        self.preauth_bytes = 0
        self._protocols: dict[asyncio.BaseTransport, GuardedProtocol] = {}

    @property
    def max_sockets(self) -> int:
        return self.config.max_connections + self.config.http_socket_reserve

    def factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """The protocol factory to listen with: aiohttp's ``inner`` behind this guard."""
        return lambda: GuardedProtocol(self, inner)

    def protocol_of(self, transport: asyncio.BaseTransport | None) -> GuardedProtocol | None:
        return self._protocols.get(transport) if transport is not None else None

    def live_metrics(self) -> list[Metric]:
        sockets = GaugeMetricFamily("lingua_sockets", "Accepted sockets open (HTTP and WebSocket)")
        sockets.add_metric([], self.sockets)
        preauth = GaugeMetricFamily(
            "lingua_preauth_bytes", "Bytes received by sockets that have not authenticated yet"
        )
        preauth.add_metric([], self.preauth_bytes)
        return [sockets, preauth]

    # --- used by GuardedProtocol -----------------------------------------------------------------

    def _admit(self, source: str) -> str | None:
        """The refused limit's name, or None after counting the socket."""
        if self.sockets >= self.max_sockets:
            return "sockets"
        if self.per_source.get(source, 0) >= self.config.max_connections_per_source:
            return "per_source"
        self.sockets += 1
        self.per_source[source] = self.per_source.get(source, 0) + 1
        return None

    def _release(self, source: str) -> None:
        self.sockets -= 1
        left = self.per_source[source] - 1
        if left:
            self.per_source[source] = left
        else:
            del self.per_source[source]


class GuardedProtocol(asyncio.Protocol):
    """One accepted socket: aiohttp's protocol behind the guard's checks."""

    def __init__(self, guard: ConnectionGuard, inner: Callable[[], asyncio.Protocol]) -> None:
        self.guard = guard
        self._make_inner = inner
        self.inner: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self.source = ""
        self.phase = Phase.HEAD
        #: bytes charged to this socket (released when it leaves the charged phases or closes)
        self.charged = 0
        #: a request of this socket reached its handler: aiohttp may still be writing its response
        self.served = False
        #: in HANDLER: body bytes of the request still expected (not charged)
        self.body_left = 0
        self._timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        self.source = source_of(transport.get_extra_info("peername"))
        refused = self.guard._admit(self.source)
        if refused is not None:
            self.phase = Phase.REFUSED
            self.guard.refusals.labels(refused).inc()
            what = (
                f"this instance holds its limit of {self.guard.max_sockets} sockets"
                if refused == "sockets"
                else f"this source address holds its limit of {self.guard.config.max_connections_per_source} "
                "sockets"
            )
            self._http_refusal(503, ErrorCode.TOO_MANY_CONNECTIONS, f"{what}; retry later", retry_after=5)
            return
        self.guard._protocols[transport] = self
        self._arm_header_deadline()
        self.inner = self._make_inner()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.inner is None or self.phase is Phase.REFUSED:
            return
        n = len(data)
        if self.phase is Phase.HANDLER and self.body_left:
            free = min(n, self.body_left)
            self.body_left -= free
            n -= free
        if self.phase in CHARGED and n and not self._charge(n):
            return
        if self.phase is Phase.IDLE and self._timer is None:
            self.phase = Phase.HEAD  # the next request's first byte: its head has a deadline too
            self._arm_header_deadline()
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.inner is None:
            return
        self._uncharge()
        if self.transport is not None:
            self.guard._protocols.pop(self.transport, None)
        self.guard._release(self.source)
        inner, self.inner = self.inner, None
        inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    # --- phases (middleware, WebSocket loop) ---------------------------------------------------------

    def request_started(self, upgrade: bool, body_bytes: int = 0) -> None:
        """A request reached its handler: its head is complete. ``body_bytes``: what its body may
        still bring (its Content-Length, or aiohttp's body limit for a chunked one)."""
        self._disarm()
        self.served = True
        if upgrade:
            self.phase = Phase.PREAUTH
        else:
            # what aiohttp parsed so far (this head, maybe requests pipelined behind it) is released:
            # aiohttp keeps at most a few parsed requests queued, and pauses reading beyond them
            self._uncharge()
            self.phase = Phase.HANDLER
            self.body_left = body_bytes

    def request_ended(self) -> None:
        """Its handler returned: the connection waits for the next request (keep-alive)."""
        if self.phase in (Phase.HANDLER, Phase.PREAUTH):
            self._uncharge()
            self.phase = Phase.IDLE
            self.body_left = 0

    def authenticated(self) -> None:
        if self.phase is Phase.PREAUTH:
            self._uncharge()
            self.phase = Phase.AUTHENTICATED

    # --- internals -------------------------------------------------------------------------------------

    def _charge(self, n: int) -> bool:
        guard, cfg = self.guard, self.guard.config
        if self.charged + n > cfg.preauth_connection_bytes:
            self._refuse_bytes(
                "preauth_connection",
                f"more than {cfg.preauth_connection_bytes} bytes before authentication",
                413,
                WSCloseCode.MESSAGE_TOO_BIG,
            )
            return False
        if guard.preauth_bytes + n > cfg.preauth_buffer_bytes:
            self._refuse_bytes(
                "preauth_budget",
                "this instance holds its budget of bytes from unauthenticated connections; retry later",
                503,
                WSCloseCode.TRY_AGAIN_LATER,
            )
            return False
        self.charged += n
        guard.preauth_bytes += n
        return True

    def _uncharge(self) -> None:
        self.guard.preauth_bytes -= self.charged
        self.charged = 0

    def _refuse_bytes(self, limit: str, message: str, status: int, close_code: WSCloseCode) -> None:
        self.guard.refusals.labels(limit).inc()
        upgraded = self.phase is Phase.PREAUTH
        self._refused()
        log.info("connection closed: %s", message, extra={"source": self.source, "limit": limit})
        if upgraded:
            reason = message.encode()[:123]
            frame = struct.pack("!BBH", 0x88, 2 + len(reason), close_code) + reason
            self._close_with(frame)
        else:
            code = ErrorCode.MESSAGE_TOO_LARGE if status == 413 else ErrorCode.TOO_MANY_CONNECTIONS
            self._http_refusal(status, code, message, retry_after=5 if status == 503 else None)

    def _refused(self) -> None:
        self._disarm()
        self._uncharge()
        self.phase = Phase.REFUSED

    def _arm_header_deadline(self) -> None:
        self._disarm()
        self._timer = asyncio.get_running_loop().call_later(
            self.guard.config.header_timeout_seconds, self._header_deadline
        )

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _header_deadline(self) -> None:
        self._timer = None
        if self.phase is not Phase.HEAD:
            return
        self.guard.refusals.labels("header_timeout").inc()
        self._refused()
        seconds = self.guard.config.header_timeout_seconds
        self._http_refusal(408, ErrorCode.REQUEST_TIMEOUT, f"request head not complete within {seconds:g} s")

    def _http_refusal(
        self, status: int, code: ErrorCode, message: str, retry_after: int | None = None
    ) -> None:
        if self.served:
            # a later request of a keep-alive socket: aiohttp may be writing the previous response
            # still, so an answer of ours could land inside it; the socket is just closed
            if self.transport is not None:
                self.transport.close()
            return
        body = msgspec.json.encode(ErrorBody(code=code, message=message))
        reason = {408: "Request Timeout", 413: "Payload Too Large", 503: "Service Unavailable"}[status]
        head = [
            f"HTTP/1.1 {status} {reason}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        if retry_after is not None:
            head.append(f"Retry-After: {retry_after}")
        self._close_with(("\r\n".join(head) + "\r\n\r\n").encode() + body)

    def _close_with(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(data)
        transport.close()  # flushes what was written, then closes; connection_lost releases the rest


# --- hooks ------------------------------------------------------------------------------------------

GUARD = web.AppKey("connection_guard", ConnectionGuard)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def track_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    guard = request.app.get(GUARD)
    proto = guard.protocol_of(request.transport) if guard is not None else None
    if guard is None or proto is None:
        return await handler(request)
    upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
    body = request.content_length
    if body is None and request.body_exists:  # chunked: bounded by the app's body limit
        body = guard.body_limits.get(request.path, guard.max_body_bytes)
    proto.request_started(upgrade=upgrade, body_bytes=body or 0)
    try:
        return await handler(request)
    finally:
        proto.request_ended()


def authenticated(request: web.Request) -> None:
    """The WebSocket of ``request`` registered a node or opened a session."""
    guard = request.app.get(GUARD)
    proto = guard.protocol_of(request.transport) if guard is not None else None
    if proto is not None:
        proto.authenticated()


def setup(
    app: web.Application, config: LimitsConfig, refusals: Counter, max_body_bytes: int
) -> ConnectionGuard:
    """Install the guard's middleware; ``max_body_bytes`` is the app's request-body limit (aiohttp's
    ``client_max_size``), what a chunked body may add before its handler reads it."""
    guard = ConnectionGuard(config, refusals, max_body_bytes)
    app[GUARD] = guard
    app.middlewares.append(track_requests)
    return guard
