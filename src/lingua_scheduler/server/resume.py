"""Resuming a session on another instance than the one it ran on (multi-instance mode).

Owns the resume records in the shared store and the hand-over between instances:

- A session whose connection drops writes a ``ResumeRecord`` (owner instance, a digest of its token,
  its next utterance index and the utterances still without an outcome) that expires with the
  resume window; attaching again or closing drops it.
- A ``session_init`` with a token naming a session that is not here reads the record. With none (or
  the digest or tenant not matching) a new session opens, as for any unknown token. Otherwise the
  owner is asked (``ResumeRequest`` through its inbox) to hand the session over: it finalizes the
  session there, answers with what it kept for the client and the utterances still in flight
  (``ResumeHandover``), and from then on relays every message for the client of those utterances
  (``SessionOutput``) until their outcomes are all out; the asking instance opens the session with
  the same id and the numbering continued.
- An owner that does not answer within ``ASK_TIMEOUT_S`` is taken for dead: the session opens with the
  numbering continued from the record and every utterance the record names as in flight gets an
  explicit ``missing_result(job_failed)`` -- its result died with that instance. An owner that gets
  the request after the asker's deadline refuses it, so a session is never continued twice.

Must never: hand a session over to a token that does not match, or lose an utterance silently.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import Awaitable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from lingua_scheduler.clock import Clock
from lingua_scheduler.config import SessionConfig
from lingua_scheduler.protocol.cluster import ResumeHandover, ResumeRecord, ResumeRequest, SessionOutput
from lingua_scheduler.server.store_writer import StoreWriter
from lingua_scheduler.store.base import StateStore, StoreUnavailable

if TYPE_CHECKING:
    from lingua_scheduler.server.sessions import Session

log = logging.getLogger(__name__)

#: how long an instance waits for a session's owner to hand it over before taking the owner for dead
ASK_TIMEOUT_S = 1.5
#: hand-over requests waiting for an answer at once (a bound; each is one reconnecting client)
MAX_WAITING = 1024

_encoder = msgspec.json.Encoder()


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Resumer:
    """The resume side of one instance's cluster shell."""

    def __init__(
        self,
        clock: Clock,
        config: SessionConfig,
        sessions: Mapping[str, Session],
        instance_id: str,
        store: StateStore,
        writer: StoreWriter,
    ) -> None:
        """``sessions``: this instance's open sessions by id; ``store`` and ``writer``: the cluster's
        shared store and its batched writer."""
        self.clock = clock
        self.config = config
        self.sessions = sessions
        self.instance_id = instance_id
        self.store = store
        self.writer = writer
        self._waiting: dict[str, asyncio.Future[ResumeHandover]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # --- the owner's side -------------------------------------------------------------------------

    def detached(self, session: Session) -> None:
        """``session`` lost its connection: its record goes to the store for the resume window."""
        token = session.resume_token
        if token is None:
            return
        record = ResumeRecord(
            session_id=session.session_id,
            owner=self.instance_id,
            token_digest=token_digest(token),
            tenant_id=session.tenant_id,
            trace_id=session.trace_id,
            # the audio buffered now becomes an utterance there (a pause or the hand-over cuts it)
            next_index=session.segmenter.next_index + (1 if session.segmenter.buffered_bytes else 0),
            outstanding=session.outstanding(with_buffered=True),
        )
        ttl = self.config.resume_window_ms
        self._spawn(self._store_call(self.store.save_resume(record, ttl), session.session_id))

    def forget(self, session_id: str) -> None:
        """The session attached again or ended: nobody may resume it from the record any more."""
        self._spawn(self._store_call(self.store.drop_resume(session_id), session_id))

    def on_request(self, msg: ResumeRequest) -> None:
        session = self.sessions.get(msg.session_id)
        late = self.clock.wall_ms() > msg.deadline_ms
        token = session.resume_token if session is not None else None
        if session is None or late or token is None or token_digest(token) != msg.token_digest:
            self.writer.send(
                msg.reply_to, ResumeHandover(request_id=msg.request_id, session_id=msg.session_id, ok=False)
            )
            return
        handover = session.hand_over(msg.reply_to)
        if handover is None:
            self.writer.send(
                msg.reply_to, ResumeHandover(request_id=msg.request_id, session_id=msg.session_id, ok=False)
            )
            return
        next_index, outstanding, held = handover
        self.writer.send(
            msg.reply_to,
            ResumeHandover(
                request_id=msg.request_id,
                session_id=msg.session_id,
                ok=True,
                next_index=next_index,
                outstanding=outstanding,
                held=held,
            ),
        )
        self.forget(msg.session_id)
        log.info("session handed over", extra={"session_id": msg.session_id, "to": msg.reply_to})

    def relay(self, to: str, session_id: str, msg: msgspec.Struct) -> None:
        """A message for the client of a session handed over to instance ``to``."""
        self.writer.send(to, SessionOutput(session_id=session_id, data=_encoder.encode(msg)))

    # --- the resuming side ------------------------------------------------------------------------

    async def lookup(self, token: str, tenant_id: str | None) -> ResumeRecord | None:
        """The record ``token`` names if it matches (digest and tenant), else None."""
        session_id = token.split(".", 1)[0]
        try:
            record = await self.store.load_resume(session_id)
        except StoreUnavailable:
            return None  # a new session, as for an unknown token (the client is not kept waiting)
        if record is None or record.token_digest != token_digest(token) or record.tenant_id != tenant_id:
            return None
        if record.owner == self.instance_id:
            return None  # ours, and no longer here: it ended
        return record

    async def ask(self, record: ResumeRecord, token: str) -> ResumeHandover | None:
        """Ask the owner to hand the session over; None when it did not answer in time."""
        if len(self._waiting) >= MAX_WAITING:
            return None
        request_id = secrets.token_hex(8)
        answer: asyncio.Future[ResumeHandover] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = answer
        try:
            self.writer.send(
                record.owner,
                ResumeRequest(
                    request_id=request_id,
                    reply_to=self.instance_id,
                    session_id=record.session_id,
                    token_digest=token_digest(token),
                    deadline_ms=self.clock.wall_ms() + int(ASK_TIMEOUT_S * 1000),
                ),
            )
            return await asyncio.wait_for(answer, ASK_TIMEOUT_S)
        except TimeoutError:
            return None
        finally:
            del self._waiting[request_id]

    def on_handover(self, msg: ResumeHandover) -> None:
        waiting = self._waiting.get(msg.request_id)
        if waiting is not None and not waiting.done():
            waiting.set_result(msg)

    def on_output(self, msg: SessionOutput) -> None:
        session = self.sessions.get(msg.session_id)
        if session is None:
            log.info("relayed message for a session that ended dropped", extra={"session_id": msg.session_id})
            return
        session.send_encoded(msg.data)

    # --- helpers ----------------------------------------------------------------------------------

    async def _store_call(self, call: Awaitable[None], session_id: str) -> None:
        try:
            await call
        except StoreUnavailable:
            log.warning("resume record not written", extra={"session_id": session_id})

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
