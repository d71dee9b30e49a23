"""A client session in the shell: its connection, segmenter, result queue and timer, and its one close path.

Owns the per-session objects and the single ``close()`` used for an explicit ``session_close``, a
disconnect and a replacing ``session_init`` alike. A graceful close dispatches the last audio, waits
for the session's outstanding results (bounded by the job deadlines), then acknowledges and frees
everything; a close without a connection cancels the session's in-flight jobs and frees at once.

With ``session.resume_window_ms``, a dropped connection *detaches* the session instead: its jobs run
on, the utterance in progress waits (a pause cuts it as usual), what it would have sent is kept
(bounded), and a
``session_init`` carrying its resume token within the window attaches a new connection and receives
it; past the window it closes as a disconnect does. In multi-instance mode another instance may take
the session over (server/cluster/resume.py): the session is then *handed over*, relaying what it still sends
for its client to that instance until its utterances' outcomes are all out.

What the engine sends the session is already in its client's view (the engine's session book keeps
the client's numbering, its utterance groups and which utterances asked for no speech) and reaches it
through server/links.py, which reads where the client is now from the attributes here (``sink``,
``relay_to``, ``outbox``) and calls ``relay``/``hold`` in the rare cases; this module is off that path.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from collections import deque
from collections.abc import Callable
from enum import StrEnum
from typing import Protocol

import msgspec

from lingua_scheduler.clock import Clock
from lingua_scheduler.config import SessionConfig
from lingua_scheduler.core.audio import AudioSpec
from lingua_scheduler.core.events import SessionClosed, SessionClosing, SessionTick
from lingua_scheduler.core.languages import normalize
from lingua_scheduler.core.results import ResultQueue
from lingua_scheduler.core.segmentation import Segmenter, Utterance
from lingua_scheduler.protocol.node import PipelineConfig
from lingua_scheduler.protocol.session import SessionCloseAck, SessionInit, TranslationResult
from lingua_scheduler.server.links import reach, reach_encoded
from lingua_scheduler.server.runtime import Runtime
from lingua_scheduler.server.ws.outbox import Outbox

log = logging.getLogger(__name__)


class Phase(StrEnum):
    OPEN = "open"
    #: the connection dropped; resumable until the window ends (its jobs run on, output is kept)
    DETACHED = "detached"
    #: resumed on another instance: what it still sends goes there (server/cluster/resume.py)
    HANDED_OVER = "handed_over"
    #: last audio dispatched, waiting for its results before the ack
    CLOSING = "closing"
    CLOSED = "closed"


class Resuming(Protocol):
    """What a session needs of the cross-instance resume (server/cluster/resume.py's ``Resumer``): record its
    detachment, drop that record, relay output to the instance that took it over."""

    def detached(self, session: Session) -> None: ...
    def forget(self, session_id: str) -> None: ...
    def relay(self, to: str, session_id: str, msg: msgspec.Struct) -> None: ...


def new_session_id(taken: object) -> str:
    while True:
        sid = "s-" + secrets.token_hex(16).upper()  # 128 bits: unique across the instances
        if sid not in taken:  # type: ignore[operator]
            return sid


class Session:
    def __init__(
        self,
        clock: Clock,
        config: SessionConfig,
        runtime: Runtime,
        sessions: dict[str, Session],
        resumer: Callable[[], Resuming | None],
        outbox: Outbox | None,
        init: SessionInit,
        spec: AudioSpec,
        *,
        session_id: str | None = None,
        start_index: int = 0,
        sink: Callable[[msgspec.Struct], None] | None = None,
        via: str = "session",
    ) -> None:
        """``runtime``: where its utterances become jobs (the engine keeps its result queue from
        ``open``); ``sessions``: the instance's open sessions (it joins them at ``open``, leaves them
        when it is freed); ``resumer``: the cross-instance resume now (None when embedded);
        ``session_id`` and ``start_index``: a session continued from another instance; ``sink``
        (with no ``outbox``): what receives the session's output instead of a WebSocket (the
        integrator front doors, server/http/front_doors.py); ``via``: which front door opened it."""
        self.clock = clock
        self.config = config
        self.runtime = runtime
        self._start_index = start_index
        self.sessions = sessions
        self._resumer = resumer
        self.outbox: Outbox | None = outbox
        #: an adapter session's receiver of everything it sends (None: the outbox's WebSocket)
        self.sink = sink
        self.via = via
        #: monotonic time it opened (its usage's duration)
        self.opened_at = clock.monotonic()
        self.init = init
        self.spec = spec
        self.session_id = session_id or new_session_id(sessions)
        self.trace_id = init.trace_id or f"trace-{secrets.token_hex(6)}"
        self.tenant_id = init.tenant_id
        self.src_lang = normalize(init.src_lang)
        self.targets = [normalize(init.tgt_lang)]
        self.metadata = init.metadata
        self.segmenter = Segmenter(config, clock, spec, start_index=start_index)
        #: its result queue, kept by the engine (the one owner of its outstanding work); set by ``open``
        self._results: ResultQueue[TranslationResult] | None = None
        #: the client sends binary audio frames (negotiated in session_init)
        self.binary_frames = False
        self.phase = Phase.OPEN
        self._timer: asyncio.TimerHandle | None = None
        self._detach_timer: asyncio.TimerHandle | None = None
        self._close_reason = ""
        self._resume_secret = secrets.token_urlsafe(18)
        #: what the session would have sent while detached, oldest first (bounded); bytes: already
        #: encoded (relayed by the instance the session was handed over from)
        self._held: deque[msgspec.Struct | bytes] = deque(maxlen=config.max_detached_messages)
        #: the instance this session was handed over to (phase HANDED_OVER)
        self.relay_to: str | None = None
        #: a resume record of it is in the shared store
        self._recorded = False
        #: messages dropped from ``_held`` because it was full
        self.dropped_while_detached = 0
        #: the node a pairing code bound the session to, and whether only it may take its jobs
        #: (handed to the engine at ``open``)
        self.pinned: str | None = None
        self.pinned_only = False

    def open(self) -> None:
        """The session is admitted: it joins the instance's sessions and the engine opens its book."""
        self.sessions[self.session_id] = self
        self._results = self.runtime.open_session(
            self.session_id,
            tenant_id=self.tenant_id,
            trace_id=self.trace_id,
            init=self.init,
            src_lang=self.src_lang,
            targets=self.targets,
            start_index=self._start_index,
            pinned=self.pinned,
            pinned_only=self.pinned_only,
        )

    @property
    def results(self) -> ResultQueue[TranslationResult]:
        """The session's result queue (read only here: the engine alone changes it)."""
        if self._results is None:
            raise RuntimeError(f"session {self.session_id} is not open")
        return self._results

    def submit(
        self,
        utterances: list[Utterance],
        *,
        src_lang: str | None = None,
        tgt_lang: str | None = None,
        pipeline: PipelineConfig | None = None,
        received_at: float | None = None,
    ) -> None:
        """Finalized utterances of this session, to the engine; ``received_at`` (perf_counter): when
        the frame that finalized them arrived."""
        if utterances:
            self.runtime.submit(
                self.session_id,
                utterances,
                src_lang=src_lang,
                tgt_lang=tgt_lang,
                pipeline=pipeline,
                received_at=received_at,
            )

    # --- output ---------------------------------------------------------------------------------

    def send(self, msg: msgspec.Struct) -> None:
        """Send ``msg`` (as the client is to see it) to wherever the client is reached now."""
        reach(self, msg)

    def send_encoded(self, data: bytes) -> None:
        """A message already in the client's view and encoded (relayed from another instance)."""
        reach_encoded(self, data)

    def relay(self, msg: msgspec.Struct) -> None:
        """Handed over: ``msg`` goes to the instance that resumed the session."""
        resumer = self._resumer()
        if resumer is not None and self.relay_to is not None:
            resumer.relay(self.relay_to, self.session_id, msg)
        asyncio.get_running_loop().call_soon(self.maybe_finish_relay)

    def hold(self, msg: msgspec.Struct | bytes) -> None:
        """Detached: keep ``msg`` for the reconnect (bounded; the oldest go first). Otherwise the
        connection is gone and nothing is kept."""
        if self.phase is not Phase.DETACHED:
            return
        if len(self._held) == self._held.maxlen:
            self.dropped_while_detached += 1
        self._held.append(msg)

    def outstanding(self, *, with_buffered: bool = False) -> list[tuple[int, int]]:
        """(internal index, the client's index) of the utterances whose outcome is not out yet;
        ``with_buffered``: also the index the audio buffered now will get when it is cut."""
        end = self.segmenter.next_index + (1 if with_buffered and self.segmenter.buffered_bytes else 0)
        return self.runtime.engine.outstanding(self.session_id, end)

    # --- resume ---------------------------------------------------------------------------------

    @property
    def resume_token(self) -> str | None:
        """What the client presents to resume this session; None when resuming is off."""
        if self.config.resume_window_ms <= 0:
            return None
        return f"{self.session_id}.{self._resume_secret}"

    def token_matches(self, token: str) -> bool:
        own = self.resume_token
        return own is not None and hmac.compare_digest(own.encode(), token.encode())

    def detach(self, outbox: Outbox) -> None:
        """``outbox``'s connection dropped. With a resume window the session waits for a reconnect;
        without, or if ``outbox`` is no longer this session's, it closes as a disconnect (or stays)."""
        if self.outbox is not outbox:
            return  # another connection took the session over (resumed): nothing of ours to end
        window = self.config.resume_window_ms
        if window <= 0 or self.phase is not Phase.OPEN:
            self.close("connection closed", connection_gone=True)
            return
        self.outbox = None
        self.phase = Phase.DETACHED
        self._detach_timer = asyncio.get_running_loop().call_later(window / 1000.0, self._detach_expired)
        resumer = self._resumer()
        if resumer is not None:
            resumer.detached(self)
            self._recorded = True
        log.info("session detached", extra={"session_id": self.session_id, "trace_id": self.trace_id})

    def attach(self, outbox: Outbox) -> list[msgspec.Struct | bytes]:
        """A reconnect presented the token: ``outbox`` is the session's connection from now on. Returns
        the messages kept while detached, for the caller to send after its ack (in order)."""
        if self._detach_timer is not None:
            self._detach_timer.cancel()
            self._detach_timer = None
        self.outbox = outbox
        self.phase = Phase.OPEN
        held = list(self._held)
        self._held.clear()
        self._forget_record()
        self.rearm()
        log.info("session resumed", extra={"session_id": self.session_id, "trace_id": self.trace_id})
        return held

    def hand_over(self, to: str) -> tuple[int, list[tuple[int, int]], list[bytes]] | None:
        """Instance ``to`` resumes this detached session: from now on what it sends goes there. Returns
        the next utterance index, the utterances still in flight and what was kept for the client
        (encoded); None when the session is not detached (attached here again, or closing)."""
        if self.phase is not Phase.DETACHED:
            return None
        if self._detach_timer is not None:
            self._detach_timer.cancel()
            self._detach_timer = None
        self.phase = Phase.HANDED_OVER
        self.relay_to = to
        # the utterance in progress ends here: the next index is the new instance's
        self.submit(self.segmenter.close())
        self._recorded = False  # the resumer drops the record with the hand-over
        encoder = msgspec.json.Encoder()
        held = [m if isinstance(m, bytes) else encoder.encode(m) for m in self._held]
        self._held.clear()
        handover = (self.segmenter.next_index, self.outstanding(), held)
        asyncio.get_running_loop().call_soon(self.maybe_finish_relay)
        return handover

    def maybe_finish_relay(self) -> None:
        """A handed-over session whose utterances all have their outcome ends here (quietly: the
        instance it was handed over to holds it now)."""
        if self.phase is not Phase.HANDED_OVER:
            return
        if self.runtime.engine.settled(self.session_id):
            self._close_reason = "handed over"
            self._finish()

    def _forget_record(self) -> None:
        if self._recorded:
            self._recorded = False
            resumer = self._resumer()
            if resumer is not None:
                resumer.forget(self.session_id)

    def _detach_expired(self) -> None:
        self._detach_timer = None
        if self.phase is Phase.DETACHED:
            self.phase = Phase.OPEN  # closes below as any disconnect does
            self.close("resume window expired", connection_gone=True)

    # --- timers ---------------------------------------------------------------------------------

    def rearm(self) -> None:
        """Schedule one timer for the earliest of the segmenter's and the result queue's deadlines."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.phase is Phase.CLOSED:
            return
        deadlines = [
            d for d in (self.segmenter.next_deadline(), self.results.next_deadline()) if d is not None
        ]
        if not deadlines:
            return
        delay = max(0.0, min(deadlines) - self.clock.monotonic())
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.phase is Phase.CLOSED:
            return
        if self.phase in (Phase.OPEN, Phase.DETACHED):
            self.submit(self.segmenter.tick())
        self.runtime.handle(SessionTick(self.session_id))
        self.rearm()
        self.maybe_finish_relay()

    # --- the one close path ---------------------------------------------------------------------

    def close(self, reason: str, *, connection_gone: bool) -> None:
        """Close the session. With the client still connected, the last audio is dispatched and its
        results delivered before ``session_close_ack``; without, in-flight jobs are cancelled."""
        if self.phase is Phase.CLOSED:
            return
        if self.phase is Phase.HANDED_OVER:
            return  # it ends by itself once its last outcome is relayed (maybe_finish_relay)
        if self.phase is Phase.DETACHED:
            self.phase = Phase.OPEN  # a replaced or expired detached session ends like a disconnect
            connection_gone = True
        if connection_gone:
            self.outbox = None
        if self.phase is Phase.OPEN:
            self._close_reason = reason
            tail = self.segmenter.close()
            self.phase = Phase.CLOSING
            self.runtime.handle(SessionClosing(self.session_id))
            if not connection_gone:
                self.submit(tail)
        if connection_gone:
            self._finish()
            return
        self.rearm()
        self.maybe_finish_close()

    def maybe_finish_close(self) -> None:
        """Called after deliveries: a closing session whose results are all out is acknowledged and freed."""
        if self.phase is not Phase.CLOSING or (self.outbox is None and self.sink is None):
            return
        if self.runtime.engine.settled(self.session_id):
            self.send(SessionCloseAck(session_id=self.session_id))
            self._finish()

    def _finish(self) -> None:
        self.phase = Phase.CLOSED
        self._held.clear()
        self._forget_record()
        if self._detach_timer is not None:
            self._detach_timer.cancel()
            self._detach_timer = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.runtime.handle(SessionClosed(self.session_id, self._close_reason or "session closed"))
        self.sessions.pop(self.session_id, None)
        if (observer := self.runtime.observer) is not None:  # hook: usage, session.ended
            observer.session_ended(self, self._close_reason or "session closed")
        log.info(
            "session closed",
            extra={"session_id": self.session_id, "trace_id": self.trace_id, "reason": self._close_reason},
        )
