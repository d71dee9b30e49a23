"""``/v1/stream``: the integrators' simple streaming socket, as an adapter session.

The reference gateway's messages (``start`` -> ``started``, ``audio {chunk}`` -> ``final {text,
audio}``, ``error {message}``) plus ours (``end`` -> ``ended`` with the usage, ``partial``). The
socket is a session of the session machinery (server/http/front_doors.py ``open_adapter_session``): the
same admission, tenant cap and quota, segmentation (a chunk with ``is_final`` is a manual cut; without,
pauses and the utterance limits cut), job rate, placement and failover, result order and usage. Its
sink turns the session's output into stream messages on this socket's outbox; the socket runs in the
session endpoint's receive loop (server/ws/websocket_loop.py: frame gate, connection caps, Origin check).

Must never: open a second session on one socket, or keep the session after the socket is gone (a
disconnect ends it as one of /ws/session: the jobs are cancelled on their nodes).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec
from aiohttp import web

from lingua_scheduler.core.audio import AudioFormat, decode_base64, negotiate
from lingua_scheduler.errors import AuthenticationError, ErrorCode, ProtocolError, Reason, SchedulerError
from lingua_scheduler.protocol import integrator as i
from lingua_scheduler.protocol.codec import FrameDecoder
from lingua_scheduler.protocol.common import ErrorMessage
from lingua_scheduler.protocol.node import PipelineConfig
from lingua_scheduler.protocol.session import (
    AsrPartial,
    MissingReason,
    MissingResult,
    SessionCloseAck,
    SessionInit,
    TranslationResult,
)
from lingua_scheduler.server.auth import close_refused
from lingua_scheduler.server.http.front_doors import open_adapter_session, timings_of
from lingua_scheduler.server.http.integrator_api import RECORDER
from lingua_scheduler.server.sessions import Phase, Session
from lingua_scheduler.server.state import SchedulerState
from lingua_scheduler.server.usage_recorder import UsageRecorder
from lingua_scheduler.server.ws.outbox import Outbox
from lingua_scheduler.server.ws.websocket_loop import serve_websocket

log = logging.getLogger(__name__)

#: the code a refused utterance's ``error`` carries, by the ``missing_result`` reason that refused it
#: (a failed job's own error was sent already)
LOST: dict[MissingReason, ErrorCode] = {
    MissingReason.RATE_LIMITED: ErrorCode.RATE_LIMITED,
    MissingReason.QUEUE_FULL: ErrorCode.TOO_MANY_CLIENTS,
    MissingReason.GAP_TIMEOUT: ErrorCode.JOB_TIMEOUT,
}
_closing: set[asyncio.Task[None]] = set()


class StreamConnection:
    def __init__(
        self, state: SchedulerState, outbox: Outbox, credential: str | None, recorder: UsageRecorder
    ) -> None:
        self.state = state
        self.outbox = outbox
        self.credential = credential
        self.recorder = recorder
        self.session: Session | None = None
        self.partials = False
        self.tts = True
        self._opening = False
        self.decoder: FrameDecoder[Any] = FrameDecoder(i.StreamInbound, state.config.server.max_frame_bytes)

    # --- the session's output, as stream messages -------------------------------------------------

    def sink(self, msg: msgspec.Struct) -> None:
        out: msgspec.Struct | None = None
        if isinstance(msg, TranslationResult):
            out = i.StreamFinal(
                text=msg.text_translated,
                audio=msg.tts_audio,
                utterance_index=msg.utterance_index,
                transcript=msg.text_asr,
                translation=msg.text_translated,
                tts_format=msg.tts_format,
                job_id=msg.job_id,
                timings=timings_of(msg.service_timings),
            )
        elif isinstance(msg, AsrPartial):
            if self.partials and not msg.is_final:
                out = i.StreamPartial(utterance_index=msg.utterance_index, text=msg.text)
        elif isinstance(msg, ErrorMessage):
            details = msg.details if isinstance(msg.details, dict) else None
            index = details.get("utterance_index") if details else None
            out = i.StreamError(
                message=msg.message,
                code=msg.code,
                utterance_index=index if isinstance(index, int) else None,
                details=details,
            )
        elif isinstance(msg, MissingResult) and msg.reason in LOST:
            out = i.StreamError(
                message=f"utterance {msg.utterance_index} was lost ({msg.reason.value})",
                code=LOST[msg.reason].value,
                utterance_index=msg.utterance_index,
            )
        elif isinstance(msg, SessionCloseAck):
            self._end(i.StreamEnded(session_id=msg.session_id, usage=self.recorder.usage_of(msg.session_id)))
        if out is not None:
            self.outbox.send(out)

    def _end(self, ended: i.StreamEnded) -> None:
        """``ended`` once the stream's usage is written (Redis mode: counted cluster-wide before the
        client hears it ended), then the socket closes."""
        outbox, recorder = self.outbox, self.recorder

        async def run() -> None:
            await recorder.flushed()
            outbox.send(ended)
            await outbox.close()
            await outbox.close_socket()

        task = asyncio.get_running_loop().create_task(run())
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    # --- frames -------------------------------------------------------------------------------------

    def on_frame(self, data: bytes | str, t0: float) -> asyncio.Future[None] | None:
        try:
            msg = self.decoder.decode(data)
            if isinstance(msg, i.StreamStart):
                if self.session is not None or self._opening:
                    raise ProtocolError(
                        "the stream is started already", reason=Reason.INVALID_VALUE, field="$.type"
                    )
                self._opening = True
                return asyncio.ensure_future(self._start(msg))
            session = self.session
            if session is None:
                raise SchedulerError("send start first", code=ErrorCode.INVALID_SESSION)
            if session.phase is not Phase.OPEN:
                raise SchedulerError("the stream has ended", code=ErrorCode.SESSION_CLOSED)
            if isinstance(msg, i.StreamAudio):
                utts = session.segmenter.chunk(decode_base64(msg.chunk, at="$.chunk"), msg.is_final)
                session.submit(
                    utts,
                    received_at=t0,
                    pipeline=None if self.tts else PipelineConfig(use_tts=False),
                )
                session.rearm()
            elif isinstance(msg, i.StreamEnd):
                session.close("client ended the stream", connection_gone=False)
        except SchedulerError as exc:
            self._refuse(exc)
        return None

    async def _start(self, msg: i.StreamStart) -> None:
        state = self.state
        try:
            init = SessionInit(
                client_version="stream",
                platform="api-gateway",
                src_lang=msg.src_lang,
                tgt_lang=msg.tgt_lang,
                audio_format=msg.audio_format,
                sample_rate=msg.sample_rate,
                enable_streaming_asr=True if msg.partials else None,
                metadata=msg.metadata,
            )
            init.tenant_id = state.auth.session_tenant(self.credential, init)
            spec = negotiate(msg.audio_format, msg.sample_rate, state.config.session)
            if spec.audio_format is not AudioFormat(msg.audio_format) or spec.sample_rate != msg.sample_rate:
                raise ProtocolError(
                    f"{msg.audio_format} at {msg.sample_rate} Hz is not streamed by this scheduler",
                    reason=Reason.INVALID_VALUE,
                    field="$.sample_rate",
                )
            self.partials, self.tts = msg.partials, msg.tts
            session = await open_adapter_session(state, init, spec, self.sink, "stream")
        except SchedulerError as exc:
            self._refuse(exc)
            return
        finally:
            self._opening = False
        self.session = session
        if self.outbox.ws.closed:  # the client left while it was admitted
            session.close("connection closed", connection_gone=True)
            return
        self.outbox.send(
            i.StreamStarted(
                session_id=session.session_id,
                audio_format=session.spec.audio_format.value,
                sample_rate=session.spec.sample_rate,
            )
        )

    def _refuse(self, exc: SchedulerError) -> None:
        self.state.metrics.invalid_frames.labels("session", exc.code.value).inc()
        self.outbox.send(i.StreamError(message=exc.message, code=exc.code.value, details=exc.details))
        if isinstance(exc, AuthenticationError):
            close_refused(self.outbox, "unauthorized")

    def ready(self) -> bool:
        return self.session is not None

    def closed(self) -> None:
        if self.session is not None:
            self.session.close("connection closed", connection_gone=True)


async def stream_ws(request: web.Request) -> web.StreamResponse:
    recorder = request.app[RECORDER]
    return await serve_websocket(
        request,
        "session",
        lambda state, outbox: StreamConnection(state, outbox, state.auth.credential(request), recorder),
        log,
    )
