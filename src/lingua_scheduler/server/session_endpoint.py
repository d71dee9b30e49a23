"""``/ws/session``: the client session WebSocket endpoint.

A connection owns at most one session: the one its last ``session_init`` created. Every message that
names a session must name that one; anything else is refused with ``INVALID_SESSION`` and changes
nothing (the reference let any client inject audio into another session). Invalid frames get
``INVALID_MESSAGE`` and the connection stays open.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from aiohttp import WSMsgType, web

from lingua_scheduler.core.audio import decode_base64, negotiate
from lingua_scheduler.core.languages import normalize
from lingua_scheduler.errors import ErrorCode, SchedulerError, SessionError
from lingua_scheduler.protocol.codec import FrameDecoder
from lingua_scheduler.protocol.common import ErrorMessage
from lingua_scheduler.protocol.session import (
    AudioChunk,
    ClientHeartbeat,
    ServerHeartbeat,
    SessionClose,
    SessionCloseAck,
    SessionInbound,
    SessionInit,
    SessionInitAck,
    TtsPlayEnded,
    UtteranceMessage,
)
from lingua_scheduler.server.outbox import Outbox
from lingua_scheduler.server.sessions import Phase, Session
from lingua_scheduler.server.state import STATE, SchedulerState

log = logging.getLogger(__name__)


class SessionConnection:
    __slots__ = ("decoder", "outbox", "session", "state")

    def __init__(self, state: SchedulerState, outbox: Outbox) -> None:
        self.state = state
        self.outbox = outbox
        self.session: Session | None = None
        self.decoder: FrameDecoder[Any] = FrameDecoder(SessionInbound, state.config.server.max_frame_bytes)

    def on_frame(self, data: bytes | str, t0: float) -> None:
        try:
            msg = self.decoder.decode(data)
            if isinstance(msg, SessionInit):
                self._init(msg)
                return
            session = self._own(msg.session_id)
            if isinstance(msg, AudioChunk):
                utts = session.segmenter.chunk(
                    decode_base64(msg.payload), msg.is_final, client_ts_ms=msg.client_timestamp_ms
                )
                self.state.dispatcher.submit(session, utts, received_at=t0)
                session.rearm()
            elif isinstance(msg, UtteranceMessage):
                audio = decode_base64(msg.audio)
                utts = session.segmenter.utterance(audio, msg.audio_format, msg.sample_rate)
                self.state.dispatcher.submit(
                    session,
                    utts,
                    received_at=t0,
                    src_lang=normalize(msg.src_lang),
                    tgt_lang=normalize(msg.tgt_lang),
                    pipeline=msg.pipeline,
                )
                session.rearm()
            elif isinstance(msg, ClientHeartbeat):
                session.send(
                    ServerHeartbeat(session_id=session.session_id, timestamp=self.state.clock.wall_ms())
                )
            elif isinstance(msg, SessionClose):
                session.close(msg.reason or "client closed", connection_gone=False)
            elif isinstance(msg, TtsPlayEnded):
                pass  # playback telemetry: nothing to schedule
        except SchedulerError as exc:
            self.state.metrics.invalid_frames.labels("session", exc.code.value).inc()
            self.outbox.send(ErrorMessage(code=exc.code.value, message=exc.message, details=exc.details))

    def _own(self, session_id: str) -> Session:
        session = self.session
        if session is None:
            raise SessionError("no session on this connection: send session_init first")
        if session_id != session.session_id:
            raise SessionError(f"session_id {session_id!r} is not this connection's session")
        if session.phase is not Phase.OPEN:
            raise SessionError(f"session {session_id} is closing", code=ErrorCode.SESSION_CLOSED)
        return session

    def _init(self, msg: SessionInit) -> None:
        state = self.state
        if self.session is not None:
            # One session per connection: the previous one ends cleanly before the new one starts.
            old = self.session
            old.close("replaced by a new session_init", connection_gone=True)
            self.outbox.send(SessionCloseAck(session_id=old.session_id))
        spec = negotiate(msg.audio_format, msg.sample_rate, state.config.session)
        session = Session(state, self.outbox, msg, spec)
        state.sessions[session.session_id] = session
        self.session = session
        self.outbox.send(
            SessionInitAck(
                session_id=session.session_id,
                trace_id=session.trace_id,
                negotiated_codec=spec.codec,
                negotiated_audio_format=spec.audio_format,
                negotiated_sample_rate=spec.sample_rate,
                negotiated_channel_count=spec.channels,
            )
        )
        log.info(
            "session created",
            extra={
                "session_id": session.session_id,
                "trace_id": session.trace_id,
                "platform": msg.platform,
                "src_lang": session.src_lang,
                "tgt_lang": session.targets[0],
            },
        )

    def closed(self) -> None:
        if self.session is not None:
            self.session.close("connection closed", connection_gone=True)


async def session_ws(request: web.Request) -> web.WebSocketResponse:
    state = request.app[STATE]
    max_frame = state.config.server.max_frame_bytes
    ws = web.WebSocketResponse(compress=False, max_msg_size=max_frame * 4, decode_text=False, heartbeat=None)
    await ws.prepare(request)
    outbox = Outbox(ws, state.config.server.outbound_queue, f"session@{request.remote}")
    conn = SessionConnection(state, outbox)
    try:
        async for frame in ws:
            if frame.type is WSMsgType.TEXT or frame.type is WSMsgType.BINARY:
                conn.on_frame(frame.data, time.perf_counter())
            elif frame.type is WSMsgType.ERROR:
                break
    except Exception:  # one catch-all per connection task: log, close, clean up below
        log.exception("session connection failed")
    finally:
        conn.closed()
        await outbox.close()
        if not ws.closed:
            await ws.close()
    return ws
