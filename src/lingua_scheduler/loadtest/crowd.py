"""A crowd of cheap simulated client sessions for load tests, over ``wsclient``.

Each ``LightSession`` opens ``/ws/session``, sends ``session_init`` with its language pair and then
speaks, in one of two modes:

- ``utterance``: one-shot ``utterance`` messages (a whole utterance's audio at once);
- ``stream``: ``audio_chunk`` frames paced in real time (one ``chunk_ms`` chunk every ``chunk_ms``),
  the last chunk of an utterance flagged ``is_final``.

Arrivals are open loop (Poisson at the session's rate: the offered load does not bend to the
scheduler's speed) or, with ``window``, closed loop (each session keeps ``window`` utterances
outstanding, which measures throughput). Every utterance ends in exactly one outcome the session
sees -- ``translation_result`` or ``missing_result`` -- and its latency is measured from the frame that
completed it (the ``utterance`` message, or the ``is_final`` chunk) to the ``translation_result``.

Must never: keep per-message state beyond one entry per outstanding utterance.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from lingua_scheduler.loadtest.wsclient import Refused, WebSocketClient, connect

_enc = msgspec.json.Encoder()

#: bytes of pcm16 mono audio per millisecond at 16 kHz
BYTES_PER_MS = 32


class SessionInbound(msgspec.Struct):
    """The fields of scheduler -> session messages the crowd needs."""

    type: str
    session_id: str | None = None
    utterance_index: int | None = None
    reason: str | None = None
    code: str | None = None
    message: str | None = None
    #: rooms: another member's utterance (the speaker), the room's code
    speaker_session_id: str | None = None
    room_code: str | None = None


_dec = msgspec.json.Decoder(SessionInbound)
#: rooms: how long the crowd still reads after its own last outcome, before it disconnects
ROOM_SETTLE_S = 0.5


def pcm_b64(ms: int) -> str:
    """Base64 of ``ms`` milliseconds of a synthetic 16 kHz pcm16 tone."""
    n = max(2, ms * BYTES_PER_MS)
    return base64.b64encode(bytes((i * 7) & 0xFF for i in range(n))).decode()


@dataclass(frozen=True, slots=True)
class SessionPlan:
    """What one session does."""

    src_lang: str
    tgt_lang: str
    #: "utterance" or "stream"
    mode: str = "utterance"
    #: offered utterances per second (open loop); ignored with a closed-loop window
    rate: float = 0.5
    #: audio per utterance, milliseconds
    utterance_ms: int = 1000


@dataclass(slots=True)
class CrowdCounters:
    """Totals since the crowd started (``window_*``: utterances completed since ``Crowd.mark()``)."""

    sessions: int = 0
    init_errors: int = 0
    utterances_sent: int = 0
    completed: int = 0
    failed: int = 0
    duplicates: int = 0
    window_sent: int = 0
    window_completed: int = 0
    window_failed: int = 0
    error_frames: int = 0
    #: missing_result reasons
    failure_reasons: dict[str, int] = field(default_factory=dict)
    #: error frame codes
    error_codes: dict[str, int] = field(default_factory=dict)
    #: rooms formed (``room_size`` > 1), and the outcomes of other members' utterances received
    rooms: int = 0
    room_heard: int = 0
    room_missing: int = 0


class LightSession:
    __slots__ = (
        "_init",
        "_room",
        "_slots",
        "busy",
        "chunk_seq",
        "crowd",
        "next_index",
        "plan",
        "rng",
        "sent_at",
        "session_id",
        "ws",
    )

    def __init__(self, crowd: Crowd, plan: SessionPlan, seed: int) -> None:
        self.crowd = crowd
        self.plan = plan
        self.rng = random.Random(seed)
        self.ws: WebSocketClient | None = None
        self.session_id = ""
        #: utterance index -> (monotonic time its last frame was written, in the window)
        self.sent_at: dict[int, tuple[float, bool]] = {}
        self.next_index = 0
        self.chunk_seq = 0
        self._init: asyncio.Future[SessionInbound] | None = None
        #: the answer to this session's room request, while one is out
        self._room: asyncio.Future[SessionInbound] | None = None
        self._slots: asyncio.Semaphore | None = None
        #: in the middle of streaming an utterance (stopping waits for it to end)
        self.busy = False

    async def start(self) -> None:
        crowd = self.crowd
        # the tenant API key goes on the upgrade request, where gateways and native apps put it
        headers = {"Authorization": f"Bearer {crowd.api_key}"} if crowd.api_key else None
        self.ws = await connect(
            crowd.host,
            crowd.port,
            "/ws/session",
            self.on_message,
            headers=headers,
            ssl_context=crowd.ssl_context,
        )
        self._init = asyncio.get_running_loop().create_future()
        self.ws.send(
            _enc.encode(
                {
                    "type": "session_init",
                    "client_version": "loadtest-1.0",
                    "platform": "web",
                    "src_lang": self.plan.src_lang,
                    "tgt_lang": self.plan.tgt_lang,
                    "audio_format": "pcm16",  # it streams pcm16 (the default is Opus)
                    "sample_rate": 16000,
                }
            )
        )
        ack = await asyncio.wait_for(self._init, 30.0)
        if ack.type != "session_init_ack" or not ack.session_id:
            self.crowd.counters.init_errors += 1
            hint = "" if self.crowd.api_key else " (does the scheduler require --api-key?)"
            raise Refused(f"session_init refused: {ack.code}: {ack.message}{hint}")
        self.session_id = ack.session_id
        self.crowd.counters.sessions += 1

    async def room_request(self, msg: dict[str, Any]) -> SessionInbound:
        """Send a room request; its answer (``room_create_ack``, ``room_members`` or ``room_error``)."""
        assert self.ws is not None
        self._room = asyncio.get_running_loop().create_future()
        self.ws.send(_enc.encode(msg))
        return await asyncio.wait_for(self._room, 30.0)

    # --- speaking -----------------------------------------------------------------------------------

    def _sent(self, index: int) -> None:
        c = self.crowd.counters
        c.utterances_sent += 1
        measuring = self.crowd.measuring
        if measuring:
            c.window_sent += 1
        self.sent_at[index] = (time.monotonic(), measuring)

    def send_utterance(self) -> None:
        assert self.ws is not None
        index = self.next_index
        self.next_index += 1
        frame = self.crowd.utterance_frame(self.session_id, index, self.plan)
        if self.ws.send(frame):
            self._sent(index)
            self.crowd.on_record(self.session_id, index)

    async def stream_utterance(self) -> None:
        """Stream one utterance in real time: ``chunk_ms`` chunks, the last one ``is_final``."""
        assert self.ws is not None
        crowd = self.crowd
        chunks = max(1, self.plan.utterance_ms // crowd.chunk_ms)
        payload = crowd.chunk_payload
        index = self.next_index
        self.next_index += 1
        loop = asyncio.get_running_loop()
        t = loop.time()
        self.busy = True
        try:
            await self._stream(index, chunks, payload, t, loop)
        finally:
            self.busy = False

    async def _stream(
        self, index: int, chunks: int, payload: bytes, t: float, loop: asyncio.AbstractEventLoop
    ) -> None:
        assert self.ws is not None
        crowd = self.crowd
        for i in range(chunks):
            last = i == chunks - 1
            self.chunk_seq += 1
            body = (
                b'{"type":"audio_chunk","session_id":"%s","seq":%d,"is_final":%s,"payload":"%s",'
                b'"client_timestamp_ms":%d}'
                % (
                    self.session_id.encode(),
                    self.chunk_seq,
                    b"true" if last else b"false",
                    payload,
                    int(time.time() * 1000),
                )
            )
            if not self.ws.send(body):
                return
            if last:
                self._sent(index)
                crowd.on_record(self.session_id, index)
            else:
                t += crowd.chunk_ms / 1000.0
                await asyncio.sleep(max(0.0, t - loop.time()))

    async def talk(self) -> None:
        """Speak until the crowd stops: open-loop Poisson arrivals, or a closed-loop window."""
        crowd = self.crowd
        plan = self.plan
        loop = asyncio.get_running_loop()
        if crowd.window:
            self._slots = asyncio.Semaphore(crowd.window)
            while not crowd.stopping:
                await self._slots.acquire()
                if crowd.stopping:
                    break
                if plan.mode == "stream":
                    await self.stream_utterance()
                else:
                    self.send_utterance()
            return
        rate = max(plan.rate, 1e-6)
        nxt = loop.time() + self.rng.expovariate(rate)
        while True:
            await asyncio.sleep(max(0.0, nxt - loop.time()))
            if crowd.stopping:
                return
            if plan.mode == "stream":
                await self.stream_utterance()
            else:
                self.send_utterance()
            # Poisson arrivals; a stream that overran its slot starts the next utterance right away
            nxt = max(nxt + self.rng.expovariate(rate), loop.time())

    # --- inbound ------------------------------------------------------------------------------------

    def on_message(self, data: bytes) -> None:
        msg = _dec.decode(data)
        kind = msg.type
        c = self.crowd.counters
        if msg.speaker_session_id is not None and msg.speaker_session_id != self.session_id:
            if kind == "translation_result":
                c.room_heard += 1
            elif kind == "missing_result":
                c.room_missing += 1
            return
        if kind in ("room_create_ack", "room_members", "room_error"):
            if self._room is not None and not self._room.done():
                self._room.set_result(msg)
            return
        if kind == "translation_result" or kind == "missing_result":
            entry = self.sent_at.pop(msg.utterance_index if msg.utterance_index is not None else -1, None)
            if entry is None:
                c.duplicates += 1
                return
            sent, in_window = entry
            if kind == "translation_result":
                c.completed += 1
                if in_window:
                    c.window_completed += 1
                    self.crowd.latencies.append(time.monotonic() - sent)
            else:
                c.failed += 1
                if in_window:
                    c.window_failed += 1
                reason = msg.reason or "unknown"
                c.failure_reasons[reason] = c.failure_reasons.get(reason, 0) + 1
            if self._slots is not None:
                self._slots.release()
        elif kind == "session_init_ack" or (kind == "error" and self._init and not self._init.done()):
            if self._init is not None and not self._init.done():
                self._init.set_result(msg)
        elif kind == "error":
            c.error_frames += 1
            code = msg.code or "unknown"
            c.error_codes[code] = c.error_codes.get(code, 0) + 1

    @property
    def outstanding(self) -> int:
        return len(self.sent_at)


class Crowd:
    """Many ``LightSession``s in one event loop."""

    def __init__(
        self,
        host: str,
        port: int,
        plans: list[SessionPlan],
        *,
        window: int = 0,
        chunk_ms: int = 100,
        record_sends: bool = False,
        seed: int = 0,
        api_key: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        room_size: int = 1,
    ) -> None:
        """``room_size`` > 1: the sessions form rooms of that many members before they talk."""
        self.host = host
        self.room_size = room_size
        self.port = port
        #: tenant API key presented by every session (docs/security.md)
        self.api_key = api_key
        #: TLS (wss://) when set
        self.ssl_context = ssl_context
        self.window = window
        self.chunk_ms = chunk_ms
        self.counters = CrowdCounters()
        #: end-to-end latencies (seconds) of utterances sent since ``mark()``
        self.latencies: list[float] = []
        #: (session_id, utterance_index, monotonic) of every utterance's completing frame, when recorded
        self.sends: list[tuple[str, int, float]] = []
        self.record_sends = record_sends
        self.measuring = False
        self.stopping = False
        self.chunk_payload = pcm_b64(chunk_ms).encode()
        self._audio: dict[int, str] = {}
        self.sessions = [LightSession(self, p, seed * 1_000_003 + i) for i, p in enumerate(plans)]
        self._tasks: list[asyncio.Task[None]] = []

    def utterance_frame(self, session_id: str, index: int, plan: SessionPlan) -> bytes:
        audio = self._audio.get(plan.utterance_ms)
        if audio is None:
            audio = self._audio[plan.utterance_ms] = pcm_b64(plan.utterance_ms)
        return _enc.encode(
            {
                "type": "utterance",
                "session_id": session_id,
                "utterance_index": index,
                "manual_cut": True,
                "src_lang": plan.src_lang,
                "tgt_lang": plan.tgt_lang,
                "audio": audio,
                "audio_format": "pcm16",
                "sample_rate": 16000,
            }
        )

    def on_record(self, session_id: str, index: int) -> None:
        if self.record_sends:
            self.sends.append((session_id, index, time.monotonic()))

    async def start(self, concurrency: int = 50) -> float:
        gate = asyncio.Semaphore(concurrency)
        t0 = time.monotonic()

        async def one(s: LightSession) -> None:
            async with gate:
                await s.start()

        await asyncio.gather(*(one(s) for s in self.sessions))
        if self.room_size > 1:
            await self._form_rooms()
        return time.monotonic() - t0

    async def _form_rooms(self) -> None:
        """Rooms of ``room_size`` members that all ask for the first member's target language: every
        utterance still makes exactly one job (the totals stay comparable with the server's), whose
        result reaches every other member."""
        size = self.room_size
        groups = [self.sessions[i : i + size] for i in range(0, len(self.sessions), size)]

        async def one(members: list[LightSession]) -> None:
            lang = members[0].plan.tgt_lang
            ack = await members[0].room_request(
                {"type": "room_create", "client_ts": 0, "preferred_lang": lang}
            )
            if ack.type != "room_create_ack" or not ack.room_code:
                raise Refused(f"room_create refused: {ack.code}: {ack.message}")
            for s in members[1:]:
                answer = await s.room_request(
                    {"type": "room_join", "room_code": ack.room_code, "preferred_lang": lang}
                )
                if answer.type != "room_members":
                    raise Refused(f"room_join refused: {answer.code}: {answer.message}")
            self.counters.rooms += 1

        await asyncio.gather(*(one(g) for g in groups if len(g) > 1))

    def mark(self) -> None:
        """Start the measurement window and start talking (once)."""
        self.latencies.clear()
        self.measuring = True
        if not self._tasks:
            self._tasks = [asyncio.ensure_future(s.talk()) for s in self.sessions]

    def end_window(self) -> None:
        self.measuring = False

    @property
    def outstanding(self) -> int:
        return sum(s.outstanding for s in self.sessions)

    async def stop(self, drain: float = 10.0) -> int:
        """Stop speaking, wait (bounded) for every outstanding utterance's outcome, disconnect.

        Returns how many utterances were still unanswered at the end."""
        self.stopping = True
        for s in self.sessions:
            if s._slots is not None:
                s._slots.release()
        for s, t in zip(self.sessions, self._tasks, strict=True):
            if not s.busy:
                t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(t, 30.0)
        deadline = time.monotonic() + drain
        while self.outstanding and time.monotonic() < deadline:  # noqa: ASYNC110 - bounded poll
            await asyncio.sleep(0.05)
        unanswered = self.outstanding
        if self.room_size > 1:
            # the other members' copies of the last outcomes leave the scheduler with the speaker's
            await asyncio.sleep(ROOM_SETTLE_S)
        for s in self.sessions:
            if s.ws is not None:
                s.ws.close()
        await asyncio.sleep(0.2)
        return unanswered
