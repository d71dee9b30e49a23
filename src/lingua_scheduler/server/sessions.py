"""A client session in the shell: its connection, segmenter, result queue and timer, and its one close path.

Owns the per-session objects and the single ``close()`` used for an explicit ``session_close``, a
disconnect and a replacing ``session_init`` alike. A graceful close dispatches the last audio, waits
for the session's outstanding results (bounded by the job deadlines), then acknowledges and frees
everything; a close without a connection cancels the session's in-flight jobs and frees at once.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from enum import StrEnum
from typing import TYPE_CHECKING

import msgspec

from lingua_scheduler.core.audio import AudioSpec
from lingua_scheduler.core.languages import normalize
from lingua_scheduler.core.results import ResultQueue
from lingua_scheduler.core.segmentation import Segmenter
from lingua_scheduler.protocol.session import SessionCloseAck, SessionInit, TranslationResult
from lingua_scheduler.server.outbox import Outbox

if TYPE_CHECKING:
    from lingua_scheduler.server.state import SchedulerState

log = logging.getLogger(__name__)


class Phase(StrEnum):
    OPEN = "open"
    #: last audio dispatched, waiting for its results before the ack
    CLOSING = "closing"
    CLOSED = "closed"


def new_session_id(taken: object) -> str:
    while True:
        sid = "s-" + secrets.token_hex(4).upper()
        if sid not in taken:  # type: ignore[operator]
            return sid


class Session:
    def __init__(self, state: SchedulerState, outbox: Outbox, init: SessionInit, spec: AudioSpec) -> None:
        self.state = state
        self.outbox: Outbox | None = outbox
        self.init = init
        self.spec = spec
        self.session_id = new_session_id(state.sessions)
        self.trace_id = init.trace_id or f"trace-{secrets.token_hex(6)}"
        self.tenant_id = init.tenant_id
        self.src_lang = normalize(init.src_lang)
        self.targets = [normalize(init.tgt_lang)]
        self.segmenter = Segmenter(state.config.session, state.clock, spec)
        self.results: ResultQueue[TranslationResult] = ResultQueue(state.config.session, state.clock)
        self.phase = Phase.OPEN
        self._timer: asyncio.TimerHandle | None = None
        self._close_reason = ""

    def send(self, msg: msgspec.Struct) -> None:
        if self.outbox is not None:
            self.outbox.send(msg)

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
        delay = max(0.0, min(deadlines) - self.state.clock.monotonic())
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.phase is Phase.CLOSED:
            return
        dispatcher = self.state.dispatcher
        if self.phase is Phase.OPEN:
            dispatcher.submit(self, self.segmenter.tick())
        dispatcher.deliver(self, self.results.tick())
        self.rearm()

    # --- the one close path ---------------------------------------------------------------------

    def close(self, reason: str, *, connection_gone: bool) -> None:
        """Close the session. With the client still connected, the last audio is dispatched and its
        results delivered before ``session_close_ack``; without, in-flight jobs are cancelled."""
        if self.phase is Phase.CLOSED:
            return
        dispatcher = self.state.dispatcher
        if connection_gone:
            self.outbox = None
        if self.phase is Phase.OPEN:
            self._close_reason = reason
            tail = self.segmenter.close()
            self.phase = Phase.CLOSING
            if not connection_gone:
                dispatcher.submit(self, tail)
        if connection_gone:
            self._finish()
            return
        self.rearm()
        self.maybe_finish_close()

    def maybe_finish_close(self) -> None:
        """Called after deliveries: a closing session whose results are all out is acknowledged and freed."""
        if self.phase is not Phase.CLOSING or self.outbox is None:
            return
        if self.results.outstanding == 0 and self.state.dispatcher.live_jobs_of(self.session_id) == 0:
            self.send(SessionCloseAck(session_id=self.session_id))
            self._finish()

    def _finish(self) -> None:
        self.phase = Phase.CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.state.dispatcher.cancel_session(self.session_id, self._close_reason or "session closed")
        self.state.sessions.pop(self.session_id, None)
        log.info(
            "session closed",
            extra={"session_id": self.session_id, "trace_id": self.trace_id, "reason": self._close_reason},
        )
