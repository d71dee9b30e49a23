"""Connection-level limits of one scheduler instance, each with a defined behaviour.

Owns:
- ``InstanceLimits`` (one per instance, ``state.limits``): the counts of open WebSockets and of
  registered node sockets, the refusals made before a WebSocket upgrade (``Origin`` not allowed -> 403,
  too many connections -> 503), the capacity checks at ``node_register`` and ``session_init``
  (``NODE_LIMIT_REACHED``, ``SESSION_LIMIT_REACHED``) and the metrics of every limit hit.
- ``FrameGate`` (one per connection): the message-rate policy (``core.rate_limit``) applied to each
  inbound frame, and the handshake timeout (a socket that never registers or opens a session is closed).
  A node is told of its dropped frames by ``error{RATE_LIMITED}`` at most once a second, each carrying
  the exact count dropped since the previous one (a last one follows the burst, so every dropped frame
  is counted in some report); a session by ``backpressure``, and which of its utterances and chunks
  were lost by the endpoint (``server/ws/session_endpoint.py``).

The table of limits, defaults and behaviours is in ``docs/reliability.md`` ("Limits").

Must never: await on the per-frame path (``FrameGate.admit`` is synchronous and O(1)), count anything
per node id or per session id in metrics (labels are fixed small sets), or echo peer data in errors.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Literal

from aiohttp import WSCloseCode, web
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric

from lingua_scheduler.clock import Clock
from lingua_scheduler.config import LimitsConfig
from lingua_scheduler.core.rate_limit import TELL_EVERY, Decision, RateGuard
from lingua_scheduler.errors import ErrorCode, RegistrationError, RequestError, SessionError
from lingua_scheduler.protocol.common import ErrorMessage
from lingua_scheduler.protocol.session import Backpressure, BackpressureAction
from lingua_scheduler.server.http.http_io import error_response
from lingua_scheduler.server.ws.outbox import Outbox

log = logging.getLogger(__name__)

Endpoint = Literal["node", "session"]

#: WebSocket close reasons (at most 123 bytes by RFC 6455)
RATE_CLOSE_REASON = b"rate limit exceeded"
#: a session whose rate bucket falls below this share of its burst is told to slow down (backpressure)
SLOW_DOWN_BELOW = 0.5
#: at most one backpressure message per connection this often (the reference client debounces 500 ms)
BACKPRESSURE_EVERY = 1.0
HANDSHAKE_CLOSE_REASON = b"no registration in time"


def normalize_origin(origin: str) -> str:
    """``Origin`` header as compared with the allow-list: lower case, no trailing slash."""
    return origin.strip().lower().rstrip("/")


class InstanceLimits:
    """Per-instance counts and checks; see the module docstring."""

    def __init__(self, config: LimitsConfig, clock: Clock, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.clock = clock
        self.origins = frozenset(config.session_allowed_origins)
        #: open WebSockets on both endpoints (counted from the upgrade to the end of the handler)
        self.connections: dict[Endpoint, int] = {"node": 0, "session": 0}
        #: sockets of this instance that registered a node (a re-register on one socket counts once)
        self.nodes = 0
        registry = registry if registry is not None else CollectorRegistry(auto_describe=False)
        self.refusals = Counter(
            "lingua_limit_refusals",
            "Requests, connections and frames refused by a limit, by limit",
            ["limit"],
            registry=registry,
        )
        self.rate_limited = Counter(
            "lingua_rate_limited_frames",
            "Inbound frames dropped by the per-connection rate limit",
            ["endpoint"],
            registry=registry,
        )

    @property
    def open_connections(self) -> int:
        return self.connections["node"] + self.connections["session"]

    def live_metrics(self) -> list[Metric]:
        """Scrape-time gauges (registered by the state with ``Metrics.add_live``)."""
        ws = GaugeMetricFamily("lingua_websockets", "Open WebSockets, by endpoint", labels=["endpoint"])
        for endpoint, n in self.connections.items():
            ws.add_metric([endpoint], n)
        nodes = GaugeMetricFamily("lingua_node_sockets", "Sockets of this instance that registered a node")
        nodes.add_metric([], self.nodes)
        return [ws, nodes]

    # --- before the upgrade ---------------------------------------------------------------------

    def refuse_upgrade(self, request: web.Request, endpoint: Endpoint) -> web.Response | None:
        """An HTTP error response if this WebSocket upgrade must be refused, else None.

        Refusing before ``prepare()`` costs no WebSocket state and tells a browser (whose scripts cannot
        read WebSocket close reasons of a failed handshake) through the status code."""
        if endpoint == "session" and self.origins:
            origin = request.headers.get("Origin")
            # No Origin: not a browser (native apps, gateways, nodes); the check defends browsers'
            # users against cross-site pages opening sessions with their credentials.
            if origin is not None and normalize_origin(origin) not in self.origins:
                self.refusals.labels("origin").inc()
                return _http_error(
                    ErrorCode.ORIGIN_NOT_ALLOWED, "this Origin may not open sessions on this scheduler"
                )
        if self.open_connections >= self.config.max_connections:
            self.refusals.labels("connections").inc()
            response = _http_error(
                ErrorCode.TOO_MANY_CONNECTIONS,
                f"this instance holds its limit of {self.config.max_connections} WebSockets; retry later",
            )
            response.headers["Retry-After"] = "5"
            return response
        return None

    def opened(self, endpoint: Endpoint) -> None:
        self.connections[endpoint] += 1

    def closed(self, endpoint: Endpoint) -> None:
        self.connections[endpoint] -= 1

    # --- capacity at registration -----------------------------------------------------------------

    def check_node_register(self, known: Callable[[str], bool], records: int, node_id: str | None) -> None:
        """Refuse the first ``node_register`` of a socket when the instance is full.

        ``known(node_id)`` says whether the registry holds that id, ``records`` how many it holds. A
        re-register on an already registered socket is never refused here (it takes no new capacity)."""
        cfg = self.config
        if self.nodes >= cfg.max_nodes:
            self.refusals.labels("nodes").inc()
            raise RegistrationError(
                f"this instance holds its limit of {cfg.max_nodes} nodes; register with another "
                "instance or retry later",
                code=ErrorCode.NODE_LIMIT_REACHED,
            )
        if records >= cfg.max_node_records and (node_id is None or not known(node_id)):
            # Records of nodes that went offline are kept for their reconnect; new ids would grow them
            # without bound (a peer can invent ids), so past the bound only known ids come back.
            self.refusals.labels("node_records").inc()
            raise RegistrationError(
                f"this instance keeps its limit of {cfg.max_node_records} node records; only known "
                "node ids may register until operators raise limits.max_node_records",
                code=ErrorCode.NODE_LIMIT_REACHED,
            )

    def node_registered(self) -> None:
        self.nodes += 1

    def node_gone(self) -> None:
        self.nodes -= 1

    def check_session_init(self, open_sessions: int) -> None:
        """Refuse a ``session_init`` that would open one session more than ``max_sessions``.

        ``open_sessions`` excludes the session the same connection is replacing (it is closed first)."""
        limit = self.config.max_sessions
        if open_sessions >= limit:
            self.refusals.labels("sessions").inc()
            raise SessionError(
                f"this instance holds its limit of {limit} sessions; open the session on another "
                "instance or retry later",
                code=ErrorCode.SESSION_LIMIT_REACHED,
            )

    # --- per connection -------------------------------------------------------------------------

    def gate(
        self, endpoint: Endpoint, outbox: Outbox, ws: web.WebSocketResponse, ready: Callable[[], bool]
    ) -> FrameGate:
        """The frame gate of a new connection. ``ready()`` tells whether it has registered a node or
        opened a session; if not within ``handshake_timeout_seconds``, the socket is closed."""
        cfg = self.config
        if endpoint == "node":
            rate, burst = cfg.node_messages_per_second, cfg.node_message_burst
        else:
            rate, burst = cfg.session_messages_per_second, cfg.session_message_burst
        guard = RateGuard(rate, burst, cfg.rate_limit_close_after_seconds, self.clock)
        return FrameGate(self, endpoint, outbox, ws, guard, ready)


class FrameGate:
    """One connection's admission of inbound frames (rate limit) and its handshake deadline."""

    __slots__ = (
        "_closing",
        "_last_backpressure",
        "_report_timer",
        "_timer",
        "_untold",
        "endpoint",
        "guard",
        "limits",
        "must_close",
        "outbox",
        "ready",
        "ws",
    )

    def __init__(
        self,
        limits: InstanceLimits,
        endpoint: Endpoint,
        outbox: Outbox,
        ws: web.WebSocketResponse,
        guard: RateGuard,
        ready: Callable[[], bool],
    ) -> None:
        self.limits = limits
        self.endpoint = endpoint
        self.outbox = outbox
        self.ws = ws
        self.guard = guard
        self.ready = ready
        #: the connection stayed over its rate: the endpoint must close it (``close()``)
        self.must_close = False
        self._last_backpressure = float("-inf")
        #: frames dropped since the last RATE_LIMITED report (nodes), and the report still due for them
        self._untold = 0
        self._report_timer: asyncio.TimerHandle | None = None
        self._closing: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            limits.config.handshake_timeout_seconds, self._handshake_deadline
        )

    def admit(self) -> bool:
        """Whether to handle the frame that just arrived. False: it is dropped (and the peer told, at
        most once a second); check ``must_close`` then."""
        decision = self.guard.check()
        bucket = self.guard.bucket
        if decision is Decision.PASS:
            if self.endpoint == "session" and bucket.tokens < bucket.burst * SLOW_DOWN_BELOW:
                # Before anything is refused: the reference client sends slower when told to.
                self._backpressure(BackpressureAction.SLOW_DOWN, bucket.burst * SLOW_DOWN_BELOW)
            return True
        self.limits.rate_limited.labels(self.endpoint).inc()
        if self.endpoint == "node":
            self._untold += 1
        if decision is Decision.DROP_AND_TELL and self.endpoint == "session":
            # A client is told by backpressure (it pauses), not by an error it would show the user.
            self._backpressure(BackpressureAction.PAUSE, bucket.burst * SLOW_DOWN_BELOW, force=True)
        elif decision is Decision.DROP_AND_TELL:
            self._report_drops()
        elif decision is Decision.DROP and self.endpoint == "node" and self._report_timer is None:
            # told less than a second ago: the rest of this burst is counted in a report a second on
            self._report_timer = asyncio.get_running_loop().call_later(TELL_EVERY, self._report_drops)
        elif decision is Decision.CLOSE and not self.must_close:
            self.must_close = True
            self.limits.refusals.labels("rate_close").inc()
            log.warning(
                "connection closed: over its message rate",
                extra={"conn": self.outbox.name, "dropped": self.guard.dropped},
            )
        return False

    def _report_drops(self) -> None:
        """Tell a node how many of its frames were dropped since the last report (exactly)."""
        if self._report_timer is not None:
            self._report_timer.cancel()
            self._report_timer = None
        if not self._untold or self.ws.closed:
            return
        bucket = self.guard.bucket
        dropped, self._untold = self._untold, 0
        self.outbox.send(
            ErrorMessage(
                code=ErrorCode.RATE_LIMITED.value,
                message=(
                    f"more than {bucket.rate:g} messages per second (burst {bucket.burst:g}): "
                    f"{dropped} messages were dropped unread; the connection is closed if this goes "
                    f"on for {self.guard.close_after:g} s"
                ),
                details={
                    "limit_per_second": bucket.rate,
                    "burst": bucket.burst,
                    "dropped": dropped,
                    "dropped_total": self.guard.dropped,
                    "retry_after_ms": int(bucket.retry_after() * 1000) + 1,
                },
            )
        )

    def _backpressure(self, action: BackpressureAction, tokens: float, *, force: bool = False) -> None:
        """Tell the client to slow down or pause until the bucket holds ``tokens`` again."""
        now = self.limits.clock.monotonic()
        if not force and now - self._last_backpressure < BACKPRESSURE_EVERY:
            return
        self._last_backpressure = now
        resume_ms = int(self.guard.bucket.retry_after(tokens) * 1000) + 1
        self.outbox.send(Backpressure(action=action, resume_after_ms=resume_ms))

    async def close(self) -> None:
        """Close the socket for staying over its rate (1008 policy violation)."""
        await self.outbox.close_socket(WSCloseCode.POLICY_VIOLATION, RATE_CLOSE_REASON)

    def stop(self) -> None:
        """The connection ended: disarm the handshake deadline."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._report_timer is not None:
            self._report_timer.cancel()
            self._report_timer = None

    def _handshake_deadline(self) -> None:
        self._timer = None
        if self.ready() or self.ws.closed:
            return
        self.limits.refusals.labels("handshake_timeout").inc()
        log.info("connection closed: no registration in time", extra={"conn": self.outbox.name})
        # Closing from outside the handler's receive loop: aiohttp wakes the loop with a close message.
        self._closing = asyncio.get_running_loop().create_task(
            self.outbox.close_socket(WSCloseCode.POLICY_VIOLATION, HANDSHAKE_CLOSE_REASON)
        )


def _http_error(code: ErrorCode, message: str) -> web.Response:
    """The refusal as the HTTP API answers errors (its status is the code's)."""
    return error_response(RequestError(message, code=code))
