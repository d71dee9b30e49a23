"""``/ws/session``: the client session WebSocket endpoint.

A connection owns at most one session: the one its last ``session_init`` created. Every message that
names a session must name that one; anything else is refused with ``INVALID_SESSION`` and changes
nothing (the reference let any client inject audio into another session). Invalid frames get
``INVALID_MESSAGE`` and the connection stays open.

Binary WebSocket frames are the binary audio protocol (``protocol/binary_frames.py``) when the session
negotiated it; JSON never starts with their type bytes, so the two cannot be confused. A
``session_init`` with a valid resume token re-attaches its detached session (``server/sessions.py``).
A ``session_init`` with a ``pairing_code`` is bound to the code's node (``server/pairing_service.py``);
``room_*`` and ``webrtc_*`` requests go to the rooms (``server/room_service.py``), and a connection
that closes takes its session out of its room.

Frames the rate limit drops are looked at within a bound (``protocol/peek.py``) so that the client
learns exactly what was lost: a dropped ``utterance`` is answered ``missing_result(rate_limited)`` with
its own ``utterance_index``; a dropped audio chunk leaves a hole in the stream, and the utterance it
belonged to is refused (``core/segmentation.py``), not spliced. A dropped frame whose type is not
found still counts: the next accepted chunk's ``seq`` (or utterance's ``utterance_index``) jumping
over numbers shows what it was.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

from aiohttp import web

from lingua_scheduler.core.audio import decode_base64, negotiate
from lingua_scheduler.core.events import PlaybackEnded
from lingua_scheduler.core.languages import normalize
from lingua_scheduler.core.pairing import GuessLimiter
from lingua_scheduler.errors import (
    AuthenticationError,
    ErrorCode,
    ProtocolError,
    Reason,
    SchedulerError,
    SessionError,
)
from lingua_scheduler.protocol.binary_frames import decode_binary_frame, is_binary_frame
from lingua_scheduler.protocol.cluster import ResumeRecord
from lingua_scheduler.protocol.codec import FrameDecoder
from lingua_scheduler.protocol.common import ErrorMessage
from lingua_scheduler.protocol.peek import peek_dropped
from lingua_scheduler.protocol.session import (
    ROOM_MESSAGES,
    AudioChunk,
    ClientHeartbeat,
    MissingReason,
    MissingResult,
    ServerHeartbeat,
    SessionClose,
    SessionCloseAck,
    SessionInbound,
    SessionInit,
    SessionInitAck,
    TtsPlayEnded,
    TtsStarted,
    UtteranceCancel,
    UtteranceMessage,
)
from lingua_scheduler.server.auth import close_refused
from lingua_scheduler.server.sessions import Phase, Session
from lingua_scheduler.server.shutdown import CLOSE_REASON, SERVICE_RESTART, pause_for_shutdown
from lingua_scheduler.server.state import SchedulerState
from lingua_scheduler.server.ws.outbox import Outbox
from lingua_scheduler.server.ws.websocket_loop import serve_websocket

log = logging.getLogger(__name__)


#: frames kept while a resume is answered by another instance (the client waits for its ack anyway)
MAX_QUEUED_WHILE_RESUMING = 64
#: a draining session is told to hold its audio at most this often
HOLD_NOTICE_INTERVAL_S = 0.5
#: numbers a jump in seq / utterance_index may account for after dropped frames of unknown type
MAX_JUMP_REPORTED = 64
_closing: set[asyncio.Task[None]] = set()


class _Draining(Exception):
    """A frame for a session the graceful shutdown is closing (answered with backpressure)."""

    def __init__(self, session: Session) -> None:
        super().__init__(session.session_id)
        self.session = session


class SessionConnection:
    __slots__ = (
        "_held_told_at",
        "_last_index",
        "_last_seq",
        "_pair_limiter",
        "_queued",
        "_unknown_drops",
        "credential",
        "decoder",
        "outbox",
        "session",
        "state",
    )

    def __init__(self, state: SchedulerState, outbox: Outbox, credential: str | None = None) -> None:
        self.state = state
        self.outbox = outbox
        #: the API key presented at connect (header or query), checked at session_init
        self.credential = credential
        self.session: Session | None = None
        self._held_told_at = -HOLD_NOTICE_INTERVAL_S
        #: frames that came while a resume is looked up on another instance (None: not resuming)
        self._queued: list[tuple[bytes | str, float]] | None = None
        self.decoder: FrameDecoder[Any] = FrameDecoder(SessionInbound, state.config.server.max_frame_bytes)
        #: frames dropped by the rate limit whose type the peek did not find, since the last audio
        self._unknown_drops = 0
        #: the last accepted chunk's seq and utterance's utterance_index (to see jumps over drops)
        self._last_seq: int | None = None
        self._last_index: int | None = None
        #: this connection's pairing attempts (made at its first one)
        self._pair_limiter: GuessLimiter | None = None

    # --- frames the rate limit dropped ------------------------------------------------------------

    def dropped(self, data: bytes | str) -> None:
        """A frame the rate limit dropped unread: tell the client exactly which utterance or chunk."""
        session = self.session
        if session is None or session.phase is not Phase.OPEN or session.outbox is not self.outbox:
            return  # no session of this connection to report to (nothing of it is lost)
        seen = peek_dropped(data)
        if seen.kind == "utterance" and seen.number is not None:
            self._missing_whole(session, [seen.number])
        elif seen.kind == "audio":
            session.segmenter.drop(seen.number)
            session.rearm()
        elif seen.kind != "other":
            self._unknown_drops += 1

    def _missing_whole(self, session: Session, client_indices: list[int]) -> None:
        """``utterance`` messages that were dropped whole, named by the client's own indices."""
        now = self.state.clock.wall_ms()
        for index in client_indices:
            self.state.metrics.refused_utterances.labels(MissingReason.RATE_LIMITED.value).inc()
            session.send(
                MissingResult(
                    session_id=session.session_id,
                    utterance_index=index,
                    reason=MissingReason.RATE_LIMITED,
                    created_at_ms=now,
                    trace_id=session.trace_id,
                ),
            )

    def _chunk_accepted(self, session: Session, seq: int) -> None:
        """Before an accepted chunk: dropped frames of unknown type that its seq jumps over were
        chunks of the stream (a hole)."""
        last, self._last_seq = self._last_seq, seq
        if self._unknown_drops and last is not None and seq > last + 1:
            cap = min(self._unknown_drops, MAX_JUMP_REPORTED)
            for missing in range(last + 1, min(seq, last + 1 + cap)):
                if not session.segmenter.hole_has(missing):
                    session.segmenter.drop(missing)
        self._unknown_drops = 0

    def _utterance_accepted(self, session: Session, index: int) -> None:
        """Before an accepted utterance: dropped frames of unknown type that its index jumps over were
        utterances of the client's."""
        last, self._last_index = self._last_index, index
        if self._unknown_drops and last is not None and index > last + 1:
            skipped = range(last + 1, min(index, last + 1 + min(self._unknown_drops, MAX_JUMP_REPORTED)))
            self._missing_whole(session, list(skipped))
        self._unknown_drops = 0

    def on_frame(self, data: bytes | str, t0: float) -> Awaitable[object] | None:
        """Handle one frame. A ``session_init`` whose tenant's cap is shared by the instances returns
        the admission to await: the connection's next frames wait for it, in order."""
        if self._queued is not None:
            if len(self._queued) < MAX_QUEUED_WHILE_RESUMING:
                self._queued.append((data, t0))
            else:
                self.outbox.send(
                    ErrorMessage(
                        code=ErrorCode.INVALID_SESSION.value,
                        message="frame refused: the session_init with a resume token is still being answered",
                    )
                )
            return None
        try:
            if isinstance(data, bytes) and is_binary_frame(data):
                self._binary(data, t0)
                return None
            msg = self.decoder.decode(data)
            if isinstance(msg, SessionInit):
                return self._init(msg)
            if isinstance(msg, ROOM_MESSAGES):
                if self.session is None:
                    raise SessionError("no session on this connection: send session_init first")
                return self.state.rooms.handle(self._own(self.session.session_id), msg)
            session = self._own(msg.session_id, closing_ok=isinstance(msg, ClientHeartbeat))
            if isinstance(msg, AudioChunk):
                self._chunk_accepted(session, msg.seq)
                utts = session.segmenter.chunk(
                    decode_base64(msg.payload, at="$.payload"),
                    msg.is_final,
                    client_ts_ms=msg.client_timestamp_ms,
                )
                self.state.runtime.submit(session.session_id, utts, received_at=t0)
                session.rearm()
            elif isinstance(msg, UtteranceMessage):
                self._utterance_accepted(session, msg.utterance_index)
                audio = decode_base64(msg.audio, at="$.audio")
                utts = session.segmenter.utterance(
                    audio, msg.audio_format, msg.sample_rate, client_index=msg.utterance_index
                )
                self.state.runtime.submit(
                    session.session_id,
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
            elif isinstance(msg, UtteranceCancel):
                self._cancel_utterance(session, msg.utterance_index)
            elif isinstance(msg, TtsStarted):
                session.segmenter.tts_started()  # no pause cut while the client plays speech
                session.rearm()
            elif isinstance(msg, TtsPlayEnded):
                session.segmenter.tts_ended()
                self.state.runtime.handle(PlaybackEnded(session.session_id, msg.group_id))
                session.rearm()
        except _Draining as draining:
            self._hold_audio(draining.session)
        except SchedulerError as exc:
            self._refuse(exc)
        return None

    def _cancel_utterance(self, session: Session, index: int) -> None:
        """``utterance_cancel``: the client's number is translated to ours (whole utterances it
        numbered), its jobs cancelled; none in flight is refused and changes nothing."""
        internal = self.state.runtime.engine.internal_index(session.session_id, index)
        if not self.state.runtime.cancel_utterance(session.session_id, internal, "cancelled by the client"):
            raise ProtocolError(
                f"utterance {index} has no job in flight to cancel",
                reason=Reason.INVALID_VALUE,
                field="$.utterance_index",
            )

    def _refuse(self, exc: SchedulerError) -> None:
        self.state.metrics.invalid_frames.labels("session", exc.code.value).inc()
        self.outbox.send(ErrorMessage(code=exc.code.value, message=exc.message, details=exc.details))
        if isinstance(exc, AuthenticationError):
            close_refused(self.outbox, "unauthorized")  # after the error frame is flushed

    def _binary(self, data: bytes, t0: float) -> None:
        """One binary audio frame: the same as an ``audio_chunk``, for a session that negotiated it."""
        frame = decode_binary_frame(data)
        session = self._own(frame.session_id)
        if not session.binary_frames:
            raise ProtocolError(
                "binary audio frames were not negotiated: send session_init with use_binary_frame true",
                reason=Reason.INVALID_VALUE,
                field="$",
            )
        self._chunk_accepted(session, frame.seq)
        utts = session.segmenter.chunk(frame.audio, frame.is_final)
        self.state.runtime.submit(session.session_id, utts, received_at=t0)
        session.rearm()

    def _own(self, session_id: str, *, closing_ok: bool = False) -> Session:
        session = self.session
        if session is None:
            raise SessionError("no session on this connection: send session_init first")
        if session_id != session.session_id:
            raise SessionError(f"session_id {session_id!r} is not this connection's session")
        if session.phase is Phase.CLOSING and closing_ok:
            return session
        if session.phase is not Phase.OPEN:
            if session.phase is Phase.CLOSING and self.state.shutting_down:
                raise _Draining(session)
            raise SessionError(f"session {session_id} is closing", code=ErrorCode.SESSION_CLOSED)
        if session.outbox is not self.outbox:
            raise SessionError(f"session {session_id} was resumed on another connection")
        return session

    def _hold_audio(self, session: Session) -> None:
        """Audio for a session the shutdown is closing: told again to hold it (at most twice a second),
        not refused with an error the client would show (server/shutdown.py)."""
        now = self.state.clock.monotonic()
        if now - self._held_told_at < HOLD_NOTICE_INTERVAL_S:
            return
        self._held_told_at = now
        self.outbox.send(pause_for_shutdown(session.session_id, self.state.shutdown_remaining_ms()))

    def _init(self, msg: SessionInit) -> Awaitable[object] | None:
        state = self.state
        if state.shutting_down:
            # Refused before anything else (a replaced session would lose its in-flight results), by
            # closing with 1012 "service restart": the client reconnects, to an instance that is up.
            self._close_for_restart()
            return None
        # The tenant comes from the API key, never from the body (server/auth.py); refused -> closed.
        msg.tenant_id = state.auth.session_tenant(self.credential, msg)
        if (observer := state.runtime.observer) is not None:
            observer.check_quota(msg.tenant_id)  # hook: the tenant's audio-minute quota (QUOTA_EXCEEDED)
        resumable = self._resumable(msg)
        if resumable is None:
            # Instance capacity (server/limits.py); the session this init replaces does not count.
            replacing = self.session is not None and self.session.session_id in state.sessions
            state.limits.check_session_init(len(state.sessions) - replacing)
        if self.session is not None and self.session is not resumable:
            # One session per connection: the previous one ends cleanly before the new one starts.
            old = self.session
            old.close("replaced by a new session_init", connection_gone=True)
            self.outbox.send(SessionCloseAck(session_id=old.session_id))
        if resumable is not None:
            self._resume(resumable)
            return None
        self.session = None  # the replaced session (if any) is closed; the new one is not open yet
        if self._resumable_elsewhere(msg):
            self._resume_remote(msg)
            return None
        return self._admit_and_open(msg, resumed=False)

    def _make(self, msg: SessionInit, *, session_id: str | None = None, start_index: int = 0) -> Session:
        """A session for this connection, not yet admitted (``session_id`` / ``start_index``: one
        continued from another instance)."""
        spec = negotiate(msg.audio_format, msg.sample_rate, self.state.config.session)
        state = self.state
        return Session(
            state.clock,
            state.config.session,
            state.runtime,
            state.sessions,
            state.resumer,
            self.outbox,
            msg,
            spec,
            session_id=session_id,
            start_index=start_index,
        )

    async def _admit(self, tenant_id: str | None, session_id: str) -> bool:
        """Count a new session against its tenant's cap: by one atomic step in the shared store when
        the cap holds across the instances (server/auth.py), else here. Whether it was admitted (a
        refusal is answered)."""
        state = self.state
        try:
            if state.auth.admission_is_shared(tenant_id):
                await state.auth.admit_shared(tenant_id, session_id, state.sessions.__contains__)
                if state.shutting_down:  # began while the store answered: its place is given back next tick
                    self._close_for_restart()
                    return False
            else:
                state.auth.admit_session(tenant_id, session_id, state.sessions.__contains__)
        except SchedulerError as exc:
            self._refuse(exc)
            return False
        return True

    async def _admit_and_open(
        self,
        msg: SessionInit,
        *,
        session_id: str | None = None,
        start_index: int = 0,
        resumed: bool,
        admitted: bool = False,
    ) -> Session | None:
        """``_make``, admission (unless ``admitted`` already) and ``_open``: the session, or None if
        refused. A connection that went away meanwhile gets its session detached at once (or closed,
        without a resume window): nothing else would ever end it."""
        try:
            session = self._make(msg, session_id=session_id, start_index=start_index)
            if not admitted and not await self._admit(session.tenant_id, session.session_id):
                return None
            if msg.pairing_code and not resumed:
                node_id = await self._pair(msg.pairing_code)
                # the engine's routing memory of the session starts with its node (at its opening)
                session.pinned = node_id
                session.pinned_only = not self.state.config.pairing.fallback_to_pools
            self._open(session, msg, resumed=resumed)
        except SchedulerError as exc:
            self._refuse(exc)
            return None
        if self.outbox.ws.closed:  # closed() ran during an await, before this session was the connection's
            session.detach(self.outbox)
        return session

    async def _pair(self, code: str) -> str:
        """The node ``code`` binds the new session to (refused: INVALID_PAIRING_CODE or
        PAIRING_RATE_LIMITED, and the session does not open)."""
        pairing = self.state.pairing
        if self._pair_limiter is None:
            self._pair_limiter = pairing.connection_limiter()
        transport = self.outbox.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        source = str(peer[0]) if isinstance(peer, tuple) and peer else None
        return await pairing.redeem(code, self._pair_limiter, source)

    def _open(self, session: Session, msg: SessionInit, *, resumed: bool) -> None:
        """Register an admitted session on this connection and acknowledge it."""
        state = self.state
        taken = state.sessions.get(session.session_id)
        if taken is not None and taken is not session:  # never overwrite another client's session
            raise SessionError(
                f"session {session.session_id} is live on this instance: it cannot be continued here"
            )
        session.binary_frames = bool(msg.use_binary_frame)
        session.open()
        self.session = session
        self._last_seq = self._last_index = None  # a new session numbers from scratch
        self._unknown_drops = 0
        self.outbox.send(self._ack(session, resumed=resumed))
        if not resumed and (observer := state.runtime.observer) is not None:
            observer.session_opened(session)  # hook: session.started webhook
        log.info(
            "session resumed from another instance" if resumed else "session created",
            extra={
                "session_id": session.session_id,
                "trace_id": session.trace_id,
                "platform": msg.platform,
                "tenant_id": session.tenant_id,
                "src_lang": session.src_lang,
                "tgt_lang": session.targets[0],
            },
        )

    # --- resuming a session another instance held (server/cluster/resume.py) ------------------------------

    def _resumable_elsewhere(self, msg: SessionInit) -> bool:
        token = msg.resume_token
        cluster = self.state.cluster
        return (
            bool(token)
            and self.state.config.session.resume_window_ms > 0
            and cluster is not None
            and not cluster.degraded
            and (token or "").split(".", 1)[0] not in self.state.sessions
        )

    def _resume_remote(self, msg: SessionInit) -> None:
        """Look the token up in the shared store and ask its owner; frames that arrive meanwhile wait
        (bounded) and are handled after the answer, in order."""
        self._queued = []
        task = asyncio.get_running_loop().create_task(self._resume_remote_run(msg))
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    async def _resume_remote_run(self, msg: SessionInit) -> None:
        cluster = self.state.cluster
        assert cluster is not None and msg.resume_token is not None
        resumer = cluster.resumer
        token = msg.resume_token
        claimed: tuple[ResumeRecord, str] | None = None
        try:
            negotiate(msg.audio_format, msg.sample_rate, self.state.config.session)  # refused before asking
            claimed = await resumer.claim(token, msg.tenant_id)
            if claimed is None:  # an unknown or expired token (or being resumed elsewhere): a new session
                await self._admit_and_open(msg, resumed=False)
                return
            record, request_id = claimed
            # Admitted before the owner is asked: a refusal leaves the session with its owner.
            if not await self._admit(msg.tenant_id, record.session_id) or self.outbox.ws.closed:
                return
            handover = await resumer.ask(record, token, request_id)
            if handover is not None and not handover.ok:
                await self._admit_and_open(msg, resumed=False)
                return
            session = await self._admit_and_open(
                msg,
                session_id=record.session_id,
                start_index=handover.next_index if handover is not None else record.next_index,
                resumed=True,
                admitted=True,
            )
            if session is None:
                return
            if session.outbox is self.outbox:
                relayed = resumer.opened(record.session_id)
            else:  # detached at once (the client left): its new record replaces the old one
                relayed = resumer.take_relayed(record.session_id)
            for data in [*(handover.held if handover is not None else ()), *relayed]:
                session.send_encoded(data)
            if handover is None:
                self._report_lost(session, record)
        except SchedulerError as exc:
            self._refuse(exc)
        finally:
            if claimed is not None:
                resumer.finish(claimed[0].session_id, claimed[1])
            queued, self._queued = self._queued or [], None
            for frame, t0 in queued:
                pending = self.on_frame(frame, t0)
                if pending is not None:  # a session_init: in order, as the loop does
                    await pending

    def _report_lost(self, session: Session, record: ResumeRecord) -> None:
        """The owner did not answer: taken for dead. Its utterances in flight died with it."""
        now = self.state.clock.wall_ms()
        for _, client_index in record.outstanding:
            session.send(
                MissingResult(
                    session_id=session.session_id,
                    utterance_index=client_index,
                    reason=MissingReason.JOB_FAILED,
                    created_at_ms=now,
                    trace_id=session.trace_id,
                )
            )
        log.warning(
            "session resumed after its instance was lost",
            extra={"session_id": record.session_id, "owner": record.owner, "lost": len(record.outstanding)},
        )

    def _ack(self, session: Session, *, resumed: bool) -> SessionInitAck:
        spec = session.spec
        return SessionInitAck(
            session_id=session.session_id,
            trace_id=session.trace_id,
            use_binary_frame=session.binary_frames,
            negotiated_codec=spec.codec,
            negotiated_audio_format=spec.audio_format,
            negotiated_sample_rate=spec.sample_rate,
            negotiated_channel_count=spec.channels,
            resume_token=session.resume_token,
            resumed=resumed,
            assigned_node_id=self._pinned_node(session.session_id),
        )

    def _pinned_node(self, session_id: str) -> str | None:
        """The node the engine's routing memory of the session is bound to (a pairing code)."""
        route = self.state.engine.route_of(session_id)
        return route.pinned if route is not None else None

    def _resumable(self, msg: SessionInit) -> Session | None:
        """The session ``msg.resume_token`` names, if it can be resumed by this client; else None (an
        unknown or expired token opens a new session, as a reconnect without one does)."""
        token = msg.resume_token
        if not token or self.state.config.session.resume_window_ms <= 0:
            return None
        session = self.state.sessions.get(token.split(".", 1)[0])
        if session is None or not session.token_matches(token) or session.tenant_id != msg.tenant_id:
            return None
        if session.phase not in (Phase.OPEN, Phase.DETACHED):
            return None
        return session

    def _resume(self, session: Session) -> None:
        held = session.attach(self.outbox)
        self.session = session
        self.outbox.send(self._ack(session, resumed=True))
        for message in held:  # already in the client's view (``Session.send`` shaped them)
            if isinstance(message, bytes):
                self.outbox.send_raw(message)
            else:
                self.outbox.send(message)
        if session.dropped_while_detached:
            log.warning(
                "resumed session lost messages kept while detached",
                extra={"session_id": session.session_id, "dropped": session.dropped_while_detached},
            )

    def _close_for_restart(self) -> None:
        outbox = self.outbox

        async def run() -> None:
            await outbox.close()
            await outbox.close_socket(SERVICE_RESTART, CLOSE_REASON)

        task = asyncio.get_running_loop().create_task(run())
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    def ready(self) -> bool:
        return self.session is not None

    def closed(self) -> None:
        session = self.session
        if session is not None:
            if session.outbox is self.outbox:  # a member whose connection closed leaves its room
                self.state.rooms.connection_closed(session.session_id)
            session.detach(self.outbox)


async def session_ws(request: web.Request) -> web.StreamResponse:
    return await serve_websocket(
        request,
        "session",
        lambda state, outbox: SessionConnection(state, outbox, state.auth.credential(request)),
        log,
        dropped=SessionConnection.dropped,
    )
