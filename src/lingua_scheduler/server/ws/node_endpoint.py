"""``/ws/node``: the node WebSocket endpoint.

Turns frames into calls on the registry and answers. The heartbeat branch comes first and does only
O(1) work: decode, registry.heartbeat(), queue the ack. Errors become ``error`` frames and the
connection stays open; a connection's node id is fixed by its successful registration. A heartbeat
whose capability report is over a limit is acknowledged (it counts for liveness) and answered with
``error{INVALID_CAPABILITY_SCHEMA}``; the previous capabilities stay. A ``node_drain`` drains the node
as an operator's drain does (``Registry.drain``), and is answered with ``node_drain_ack``.

A node id never seen before gets a record even when the registry holds ``limits.max_node_records``:
the oldest offline records are evicted first (``Registry.make_room``); only a registry full of
connected or other instances' nodes refuses it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from aiohttp import web

from lingua_scheduler.core.audio import decode_base64
from lingua_scheduler.core.events import JobMessage
from lingua_scheduler.errors import AuthenticationError, ErrorCode, RegistrationError, SchedulerError
from lingua_scheduler.protocol.codec import FrameDecoder
from lingua_scheduler.protocol.common import ErrorMessage
from lingua_scheduler.protocol.node import (
    JobResult,
    NodeDrain,
    NodeDrainAck,
    NodeErrorReport,
    NodeHeartbeat,
    NodeHeartbeatAck,
    NodeInbound,
    NodeRegister,
    NodeRegisterAck,
    RequestPairingCode,
)
from lingua_scheduler.server.auth import close_refused
from lingua_scheduler.server.state import SchedulerState
from lingua_scheduler.server.ws.outbox import Outbox
from lingua_scheduler.server.ws.websocket_loop import serve_websocket

log = logging.getLogger(__name__)


class NodeConnection:
    """Per-socket handler state: the outbox and the node id this socket registered (if any)."""

    __slots__ = ("decoder", "node_id", "outbox", "state")

    @property
    def source(self) -> str | None:
        """The peer's address (enrollment is rate-limited per source), None when unknown."""
        transport = self.outbox.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else None

    def __init__(self, state: SchedulerState, outbox: Outbox) -> None:
        self.state = state
        self.outbox = outbox
        self.node_id: str | None = None
        self.decoder: FrameDecoder[Any] = FrameDecoder(NodeInbound, state.config.server.max_frame_bytes)

    def on_frame(self, data: bytes | str, t0: float) -> None:
        state = self.state
        try:
            msg = self.decoder.decode(data)
            if type(msg) is NodeHeartbeat:
                self._heartbeat(msg, t0)
            elif type(msg) is NodeRegister:
                self._register(msg)
            elif type(msg) is NodeDrain:
                self._drain(msg)
            elif type(msg) is RequestPairingCode:
                state.pairing.request(self.node_id, self.outbox.send)
            elif type(msg) is NodeErrorReport:
                state.registry.entry_for(self.outbox, msg.node_id)
                log.warning(
                    "node reported an error",
                    extra={"node_id": msg.node_id, "code": msg.code, "node_message": msg.message[:256]},
                )
            else:
                if type(msg) is JobResult and msg.tts_audio:
                    # Checked here, not passed on: a client must never receive audio it cannot decode.
                    decode_base64(msg.tts_audio, at="$.tts_audio")
                self.on_job_message(msg)
        except SchedulerError as exc:
            state.metrics.invalid_frames.labels("node", exc.code.value).inc()
            self.outbox.send(ErrorMessage(code=exc.code.value, message=exc.message, details=exc.details))
            if isinstance(exc, AuthenticationError):
                close_refused(self.outbox, "unauthorized")  # after the error frame is flushed

    def _heartbeat(self, msg: NodeHeartbeat, t0: float) -> None:
        state = self.state
        outcome = state.registry.heartbeat(self.outbox, msg)
        self.outbox.send(
            NodeHeartbeatAck(
                node_id=msg.node_id,
                timestamp=msg.timestamp,
                server_ts_ms=state.clock.wall_ms(),
                next_heartbeat_ms=int(state.registry.heartbeat_interval() * 1000),
            )
        )
        if outcome.transitions:
            state.apply_transitions(outcome.transitions)
        if outcome.capability_changed:
            self._count_unknown()
        if outcome.refused is not None:
            exc = outcome.refused
            state.metrics.invalid_frames.labels("node", exc.code.value).inc()
            self.outbox.send(ErrorMessage(code=exc.code.value, message=exc.message, details=exc.details))
        elapsed = time.perf_counter() - t0
        state.metrics.heartbeats.inc()
        state.metrics.heartbeat_handle.observe(elapsed)
        state.heartbeat_window.record(elapsed)

    def _register(self, msg: NodeRegister) -> None:
        state = self.state
        if self.node_id is not None and msg.node_id not in (None, self.node_id):
            raise RegistrationError(
                f"this connection is already registered as {self.node_id}", code=ErrorCode.NODE_ID_CONFLICT
            )
        # Credentials once per connection (server/auth.py): afterwards the bound connection is the credential.
        admitted = state.auth.check_node(msg, bound=self.node_id is not None, source=self.source)
        if self.node_id is not None and msg.node_id is None:
            msg.node_id = self.node_id
        first = self.node_id is None
        if first:  # a socket takes node capacity once, at its first registration (server/limits.py)
            registry, limits = state.registry, state.config.limits
            new_id = msg.node_id is None or msg.node_id not in registry.nodes
            if new_id and state.limits.nodes < limits.max_nodes:
                registry.make_room(limits.max_node_records)  # oldest offline records first
            state.limits.check_node_register(registry.nodes.__contains__, len(registry.nodes), msg.node_id)
        entry, transitions = state.registry.register(msg, self.outbox)
        self._count_unknown()
        if first:
            state.limits.node_registered()
            state.metrics.gc_policy.note_registration()
        self.node_id = entry.node_id
        self.outbox.send(
            NodeRegisterAck(
                node_id=entry.node_id,
                message="registered",
                status=entry.status.value,
                heartbeat_interval_ms=int(state.registry.heartbeat_interval() * 1000),
                node_token=state.auth.token_for(entry.node_id),
            )
        )
        state.apply_transitions(transitions)
        log.info(
            "node registered",
            extra={
                "node_id": entry.node_id,
                "platform": msg.platform,
                "node_version": msg.version,
                "auth": admitted,  # enrolled | token | connection | open: the audit trail of enrollments
                "sends_acks": entry.sends_acks,
                "turn_dialect": entry.turn_dialect,
            },
        )

    def _drain(self, msg: NodeDrain) -> None:
        """The node leaves: no new job, its running ones finish (then it may close)."""
        state = self.state
        entry = state.registry.entry_for(self.outbox, msg.node_id)
        transitions = state.registry.drain(entry.node_id, by_node=True)
        self.outbox.send(
            NodeDrainAck(node_id=entry.node_id, status=entry.status.value, running_jobs=entry.load.inflight)
        )
        state.apply_transitions(transitions)
        log.info(
            "node drains itself",
            extra={
                "node_id": entry.node_id,
                "reason": (msg.reason or "")[:256],
                "running": entry.load.inflight,
            },
        )

    def _count_unknown(self) -> None:
        for kind, n in self.state.registry.take_unknown_seen().items():
            self.state.metrics.unknown_node_values.labels(kind).inc(n)

    def on_job_message(self, msg: JobMessage) -> None:
        """Job messages (ack, started, partial, result) go to the engine, through the runtime."""
        self.state.registry.entry_for(self.outbox, msg.node_id)
        self.state.runtime.on_node_message(msg.node_id, msg)

    def ready(self) -> bool:
        return self.node_id is not None

    def closed(self) -> None:
        if self.node_id is not None:
            self.state.pairing.node_gone(self.node_id)
            self.state.limits.node_gone()
            transitions = self.state.registry.disconnect(self.node_id, self.outbox)
            self.state.apply_transitions(transitions)
            if transitions:
                log.info("node disconnected", extra={"node_id": self.node_id})
                self.state.runtime.node_lost(self.node_id)


async def node_ws(request: web.Request) -> web.StreamResponse:
    # inline: a heartbeat is handled from the socket's read callback, no coroutine per frame
    return await serve_websocket(
        request,
        "node",
        NodeConnection,
        log,
        failure_extra=lambda conn: {"node_id": conn.node_id},
        inline=True,
    )
