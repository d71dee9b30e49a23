"""Resuming a session on another instance than the one it ran on (multi-instance mode).

Owns the resume records in the shared store and the hand-over between instances:

- A session whose connection drops writes a ``ResumeRecord`` (owner instance, a digest of its token,
  its next utterance index and the utterances still without an outcome) that expires with the
  resume window; attaching again or closing drops it.
- A ``session_init`` with a token naming a session that is not here reads the record. With none (or
  the digest or tenant not matching) a new session opens, as for any unknown token. Otherwise the
  asking instance *claims* the record (one atomic step in the store, ``resume.lua``: one claim per
  record, so two instances reached at once cannot both continue it; the loser opens a new session),
  admits the session against its tenant's cap, and asks the owner (``ResumeRequest`` through its
  inbox). The owner hands the session over only if it can turn the claim into ``handed`` (the claim
  still being that request's): it finalizes the session, answers with what it kept for the client and
  the utterances still in flight (``ResumeHandover``), and from then on relays every message for the
  client of those utterances (``SessionOutput``) until their outcomes are all out. Messages relayed
  before the session opens on the asking instance are kept there (bounded) and sent after the ack.
- An owner that does not answer within ``ASK_TIMEOUT_S`` is taken for dead once the asker has turned
  the claim into ``dead`` (the same compare-and-set, so no clock decides it): the session opens with
  the numbering continued from the record and every utterance the record names as in flight gets an
  explicit ``missing_result(job_failed)``. An owner that gets the request after that refuses it.
- Once the session is open on the asking instance the record and the claim are dropped (or replaced,
  if its connection is already gone again): nobody else may continue it from the old record.

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
from lingua_scheduler.server.cluster.store_writer import StoreWriter
from lingua_scheduler.store.base import StateStore, StoreUnavailable

if TYPE_CHECKING:
    from lingua_scheduler.server.sessions import Session

log = logging.getLogger(__name__)

#: how long an instance waits for a session's owner to hand it over before taking the owner for dead
ASK_TIMEOUT_S = 1.5
#: hand-over requests waiting for an answer at once (a bound; each is one reconnecting client)
MAX_WAITING = 1024

#: the claim's outcomes (resume.lua): the owner handed the session over / the asker gave up waiting
HANDED = "handed"
DEAD = "dead"

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
        #: session id -> messages its owner relayed before the session opened here (bounded)
        self._relayed: dict[str, list[bytes]] = {}

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
        if self._handing(msg) is None:
            self._refuse(msg)
            return
        self._spawn(self._hand_over(msg))

    def _handing(self, msg: ResumeRequest) -> Session | None:
        """The detached session ``msg`` may take over, if its token matches."""
        session = self.sessions.get(msg.session_id)
        token = session.resume_token if session is not None else None
        if session is None or token is None or token_digest(token) != msg.token_digest:
            return None
        return session

    async def _hand_over(self, msg: ResumeRequest) -> None:
        # Only while the asker's claim is still the winner: an asker that gave up waiting marked it
        # abandoned (and continues the session itself), so the session is never continued twice --
        # whatever the two instances' clocks say.
        handed = f"{HANDED}:{msg.request_id}"
        try:
            won = handed == await self.store.settle_resume(
                msg.session_id, msg.request_id, handed, self._ttl_ms(), drop_record=True
            )
        except StoreUnavailable:
            won = False
        session = self._handing(msg) if won else None
        handover = session.hand_over(msg.reply_to) if session is not None else None
        if handover is None:
            self._refuse(msg)
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
        log.info("session handed over", extra={"session_id": msg.session_id, "to": msg.reply_to})

    def _refuse(self, msg: ResumeRequest) -> None:
        answer = ResumeHandover(request_id=msg.request_id, session_id=msg.session_id, ok=False)
        self.writer.send(msg.reply_to, answer)

    def relay(self, to: str, session_id: str, msg: msgspec.Struct) -> None:
        """A message for the client of a session handed over to instance ``to``."""
        self.writer.send(to, SessionOutput(session_id=session_id, data=_encoder.encode(msg)))

    # --- the resuming side ------------------------------------------------------------------------

    async def claim(self, token: str, tenant_id: str | None) -> tuple[ResumeRecord, str] | None:
        """The record ``token`` names if it matches (digest and tenant) and this instance won the one
        claim on it, with the claim's request id; else None (a new session, as for an unknown token).
        From here on what the owner relays for the session is kept until ``opened`` / ``finish``."""
        session_id = token.split(".", 1)[0]
        if len(self._waiting) >= MAX_WAITING:
            return None
        request_id = secrets.token_hex(16)
        try:
            record = await self.store.load_resume(session_id)
            if record is None or record.token_digest != token_digest(token) or record.tenant_id != tenant_id:
                return None
            if record.owner == self.instance_id:
                return None  # ours, and no longer here: it ended
            if not await self.store.claim_resume(session_id, request_id, self._ttl_ms()):
                log.info("session is being resumed elsewhere", extra={"session_id": session_id})
                return None
        except StoreUnavailable:
            return None  # the client is not kept waiting
        # before the owner is asked: its hand-over may relay messages before its answer arrives
        self._relayed[session_id] = []
        return record, request_id

    async def ask(self, record: ResumeRecord, token: str, request_id: str) -> ResumeHandover | None:
        """Ask the owner to hand the session over. None: it did not answer in time and the claim is
        marked abandoned, so the session is this instance's to continue; ``ok`` False: neither."""
        answer: asyncio.Future[ResumeHandover] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = answer
        refused = ResumeHandover(request_id=request_id, session_id=record.session_id, ok=False)
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
            try:
                return await asyncio.wait_for(asyncio.shield(answer), ASK_TIMEOUT_S)
            except TimeoutError:
                pass
            dead = f"{DEAD}:{request_id}"
            try:
                held = await self.store.settle_resume(
                    record.session_id, request_id, dead, self._ttl_ms(), drop_record=False
                )
            except StoreUnavailable:
                return refused  # undecided: a new session rather than perhaps a second continuation
            if held == dead:
                return None
            if held == f"{HANDED}:{request_id}":
                # the owner took the claim first: its answer is on the way
                try:
                    return await asyncio.wait_for(answer, ASK_TIMEOUT_S)
                except TimeoutError:
                    return None  # it died right after: what it had in flight died with it
            return refused  # the record went (attached again there, or closed)
        finally:
            del self._waiting[request_id]

    def opened(self, session_id: str) -> list[bytes]:
        """The continued session is open here: what the owner relayed before, in order; the record
        and the claim are dropped (the session is live here, nobody else may continue it)."""
        self.forget(session_id)
        return self.take_relayed(session_id)

    def take_relayed(self, session_id: str) -> list[bytes]:
        """What the owner relayed before the session opened here, in order."""
        return self._relayed.pop(session_id, [])

    def finish(self, session_id: str, request_id: str) -> None:
        """The resume attempt is over: a claim still held is released, relayed messages not taken are
        dropped (the session did not open here)."""
        lost = self._relayed.pop(session_id, None)
        if lost:
            log.warning("relayed messages dropped", extra={"session_id": session_id, "dropped": len(lost)})
        self._spawn(self._store_call(self._release(session_id, request_id), session_id))

    async def _release(self, session_id: str, request_id: str) -> None:
        await self.store.settle_resume(session_id, request_id, "", self._ttl_ms(), drop_record=False)

    def on_handover(self, msg: ResumeHandover) -> None:
        waiting = self._waiting.get(msg.request_id)
        if waiting is not None and not waiting.done():
            waiting.set_result(msg)

    def on_output(self, msg: SessionOutput) -> None:
        session = self.sessions.get(msg.session_id)
        if session is not None:
            session.send_encoded(msg.data)
            return
        kept = self._relayed.get(msg.session_id)
        if kept is None:
            log.info("relayed message for a session that ended dropped", extra={"session_id": msg.session_id})
        elif len(kept) < self.config.max_detached_messages:
            kept.append(msg.data)  # the session opens here in a moment (``opened``)
        else:
            log.warning(
                "relayed message dropped: too many before the session opened",
                extra={"session_id": msg.session_id},
            )

    def _ttl_ms(self) -> int:
        return self.config.resume_window_ms

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
