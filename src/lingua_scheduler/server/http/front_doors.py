"""The integrator front doors' adapter sessions, and ``POST /v1/speech/translate``.

An upload (and a ``/v1/stream`` socket, server/ws/stream_endpoint.py) is a *session* of the session
machinery (server/sessions.py): the same admission and tenant cap, quota, segmentation, job rate,
placement, failover, result ordering, usage and webhooks. Only its sink differs: instead of a
WebSocket outbox, the session's output goes to a ``Collector`` (here) that keeps each utterance's
outcome until the session's close is acknowledged, which the session machinery does once every
utterance has its outcome.

Owns ``open_adapter_session`` (admit and register a sink-backed session), ``Collector``, the translate
handler (body bound, deadline, ``Accept: audio/*``, the answer built in utterance order) and the
``Idempotency-Key`` memory: a bounded in-memory map when embedded, a Redis key (SET NX, the answer,
a TTL) in Redis mode, so that a retry on any instance gets the first answer. A caller that closes its
connection ends its session as a disconnect does: the jobs are cancelled on their nodes.

Must never: answer a failure with anything but a JSON error of the session protocol's codes, keep a
session after its request ended, or hold more than ``integrator.idempotency_max_entries`` answers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
from aiohttp import web

from lingua_scheduler.core.audio import AudioFormat, AudioSpec
from lingua_scheduler.core.translate_request import TranslateLimits, parse_translate_request
from lingua_scheduler.errors import ErrorCode, RequestError, SchedulerError
from lingua_scheduler.protocol import integrator as i
from lingua_scheduler.protocol.common import ErrorMessage, ServiceTimings
from lingua_scheduler.protocol.node import PipelineConfig
from lingua_scheduler.protocol.session import (
    MissingReason,
    MissingResult,
    SessionCloseAck,
    SessionInit,
    TranslationResult,
)
from lingua_scheduler.server.connection_guard import GUARD
from lingua_scheduler.server.http import routes
from lingua_scheduler.server.http.integrator_api import RECORDER
from lingua_scheduler.server.sessions import Session
from lingua_scheduler.server.state import STATE, SchedulerState
from lingua_scheduler.store.base import StoreUnavailable
from lingua_scheduler.store.redis_store import RedisStore

log = logging.getLogger(__name__)

#: how often a waiting upload looks whether its caller is still connected, in seconds
DISCONNECT_POLL_S = 0.05
#: longest Idempotency-Key taken
MAX_IDEMPOTENCY_KEY = 128
_encode = msgspec.json.Encoder().encode


# --- adapter sessions ------------------------------------------------------------------------------


class Collector:
    """The sink of an adapter session: each utterance's result or refusal by index, ``done`` once the
    session's close is acknowledged. ``forward``: also shown every message (the stream's socket)."""

    def __init__(self, forward: Callable[[msgspec.Struct], None] | None = None) -> None:
        self.results: dict[int, TranslationResult] = {}
        self.errors: dict[int, ErrorMessage] = {}
        self.missing: dict[int, MissingResult] = {}
        #: errors about no utterance (a refused session, ...)
        self.general: list[ErrorMessage] = []
        self.done = asyncio.Event()
        self.forward = forward

    def __call__(self, msg: msgspec.Struct) -> None:
        if isinstance(msg, TranslationResult):
            self.results[msg.utterance_index] = msg
        elif isinstance(msg, ErrorMessage):
            index = msg.details.get("utterance_index") if isinstance(msg.details, dict) else None
            if isinstance(index, int):
                self.errors.setdefault(index, msg)
            else:
                self.general.append(msg)
        elif isinstance(msg, MissingResult):
            self.missing[msg.utterance_index] = msg
        elif isinstance(msg, SessionCloseAck):
            self.done.set()
        if self.forward is not None:
            self.forward(msg)


async def open_adapter_session(
    state: SchedulerState,
    init: SessionInit,
    spec: AudioSpec,
    sink: Callable[[msgspec.Struct], None],
    via: str,
) -> Session:
    """Admit (the tenant's cap, in the shared store when it holds across instances) and register a
    session whose output goes to ``sink``; ``session.started`` is emitted. Raises the refusal."""
    if state.shutting_down:
        raise SchedulerError("the scheduler is shutting down", code=ErrorCode.SCHEDULER_SHUTTING_DOWN)
    observer = state.runtime.observer
    if observer is not None:
        observer.check_quota(init.tenant_id)
    state.limits.check_session_init(len(state.sessions))
    session = Session(
        state.clock,
        state.config.session,
        state.runtime,
        state.sessions,
        state.resumer,
        None,
        init,
        spec,
        sink=sink,
        via=via,
    )
    live = state.sessions.__contains__
    if state.auth.admission_is_shared(session.tenant_id):
        await state.auth.admit_shared(session.tenant_id, session.session_id, live)
    else:
        state.auth.admit_session(session.tenant_id, session.session_id, live)
    session.open()
    if observer is not None:
        observer.session_opened(session)
    log.info(
        "session created",
        extra={"session_id": session.session_id, "trace_id": session.trace_id, "platform": via},
    )
    return session


def tenant_of(state: SchedulerState, request: web.Request, init: SessionInit) -> str | None:
    """The tenant of the key presented (``Authorization: Bearer``), as ``/ws/session`` decides it."""
    return state.auth.session_tenant(state.auth.credential(request), init)


# --- idempotency -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()

    def response(self, replayed: bool = False) -> web.Response:
        headers = dict(self.headers)
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        return web.Response(
            status=self.status, body=self.body, content_type=self.content_type, headers=headers
        )


_ANSWER = msgspec.json.Decoder(tuple[int, str, list[tuple[str, str]], str])


def _pack(a: Answer) -> bytes:
    return _encode((a.status, a.content_type, list(a.headers), base64.b64encode(a.body).decode()))


def _unpack(data: bytes) -> Answer:
    status, ctype, headers, body = _ANSWER.decode(data)
    return Answer(status, base64.b64decode(body), ctype, tuple(headers))


class Idempotency:
    """First answers by (tenant, Idempotency-Key): in memory (bounded, oldest out, TTL), or in Redis."""

    PENDING = b"pending"

    def __init__(self, state: SchedulerState, max_entries: int, ttl_s: float) -> None:
        self.state = state
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._local: OrderedDict[str, tuple[float, asyncio.Future[Answer | None]]] = OrderedDict()

    def _redis(self) -> RedisStore | None:
        cluster = self.state.cluster
        store = cluster.store if cluster is not None and not cluster.degraded else None
        return store if isinstance(store, RedisStore) else None

    async def claim(self, tenant: str | None, key: str) -> Answer | asyncio.Future[Answer | None] | None:
        """None: this request is the first (run it, then ``finish``); an Answer: the first one's; a
        future: the first one still runs (await it; None means it failed: run again)."""
        store = self._redis()
        if store is not None:
            rkey = store.keys.idempotency(tenant or "-", key)
            deadline = time.monotonic() + self.state.config.integrator.translate_deadline_seconds + 5
            while True:
                try:
                    value = await store.idempotent_claim(rkey, int(self.ttl_s * 1000))
                except StoreUnavailable:
                    break  # degraded: this instance's memory only
                if value is None:
                    return None
                if value != self.PENDING:
                    return _unpack(value)
                if time.monotonic() > deadline:
                    raise RequestError(
                        "a request with this Idempotency-Key is still running",
                        code=ErrorCode.TOO_MANY_CLIENTS,
                    )
                await asyncio.sleep(0.05)
        now = time.monotonic()
        k = f"{tenant}\0{key}"
        entry = self._local.get(k)
        if entry is not None and now - entry[0] < self.ttl_s:
            fut = entry[1]
            if fut.done() and fut.result() is not None:
                return fut.result()
            if not fut.done():
                return fut
        self._local[k] = (now, asyncio.get_running_loop().create_future())
        self._local.move_to_end(k)
        while len(self._local) > self.max_entries:
            _, (_, old) = self._local.popitem(last=False)
            if not old.done():
                old.set_result(None)
        return None

    async def finish(self, tenant: str | None, key: str, answer: Answer | None) -> None:
        """The first request's answer (None: it failed; a retry runs it again)."""
        k = f"{tenant}\0{key}"
        entry = self._local.get(k)
        if entry is not None and not entry[1].done():
            entry[1].set_result(answer)
            if answer is None:
                self._local.pop(k, None)
        store = self._redis()
        if store is not None:
            with contextlib.suppress(StoreUnavailable):
                await store.idempotent_store(
                    store.keys.idempotency(tenant or "-", key),
                    None if answer is None else _pack(answer),
                    int(self.ttl_s * 1000),
                )


IDEMPOTENCY = web.AppKey("idempotency", Idempotency)


# --- POST /v1/speech/translate ---------------------------------------------------------------------


async def read_body(request: web.Request, limit: int) -> bytes:
    """The body, refused (MESSAGE_TOO_LARGE) past ``limit`` bytes without buffering more of it."""
    if request.content_length is not None and request.content_length > limit:
        raise RequestError(
            f"body: {request.content_length} bytes is over the limit of {limit} "
            "(integrator.translate_max_body_bytes)",
            code=ErrorCode.MESSAGE_TOO_LARGE,
            details={"field": "body", "reason": "too_large"},
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise RequestError(
                f"body: over the limit of {limit} bytes (integrator.translate_max_body_bytes)",
                code=ErrorCode.MESSAGE_TOO_LARGE,
                details={"field": "body", "reason": "too_large"},
            )
        chunks.append(chunk)
    return b"".join(chunks)


def wants_audio(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    kinds = [part.split(";", 1)[0].strip().lower() for part in accept.split(",")]
    return any(k.startswith("audio/") for k in kinds) and "application/json" not in kinds


def timings_of(t: ServiceTimings | None) -> i.Timings | None:
    if t is None:
        return None
    return i.Timings(asr_ms=t.asr_ms, nmt_ms=t.nmt_ms, tts_ms=t.tts_ms, total_ms=t.total_ms)


def _sum_timings(all_t: list[i.Timings]) -> i.Timings | None:
    if not all_t:
        return None

    def total(name: str) -> int | None:
        values = [getattr(t, name) for t in all_t if getattr(t, name) is not None]
        return sum(values) if values else None

    return i.Timings(
        asr_ms=total("asr_ms"), nmt_ms=total("nmt_ms"), tts_ms=total("tts_ms"), total_ms=total("total_ms")
    )


async def _until_done(request: web.Request, session: Session, collector: Collector, deadline: float) -> None:
    """Wait for the session's close ack; the caller leaving ends the session as a disconnect (its
    jobs cancelled on the nodes), the deadline as well, with JOB_TIMEOUT."""
    loop = asyncio.get_running_loop()
    while not collector.done.is_set():
        transport = request.transport
        if transport is None or transport.is_closing():
            session.close("the caller closed its connection", connection_gone=True)
            raise RequestError("the caller closed its connection", code=ErrorCode.JOB_CANCELLED)
        left = deadline - loop.time()
        if left <= 0:
            session.close("the request's deadline passed", connection_gone=True)
            raise RequestError(
                "the translation did not finish within integrator.translate_deadline_seconds",
                code=ErrorCode.JOB_TIMEOUT,
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(collector.done.wait(), min(left, DISCONNECT_POLL_S))


def _answer(
    session: Session,
    collector: Collector,
    durations: dict[int, int],
    started: float,
    audio_ms: int,
    want_audio: bool,
) -> Answer:
    """The upload's answer from its utterances' outcomes, in order; an upload of which no utterance
    got a result answers the first refusal (its code and status)."""
    utts: list[i.UtteranceResult] = []
    timings: list[i.Timings] = []
    speech: list[bytes] = []
    tts_format = "pcm16"
    start_ms = 0
    indices = sorted(set(collector.results) | set(collector.errors) | set(collector.missing))
    first: TranslationResult | None = None
    for index in indices:
        res = collector.results.get(index)
        length = durations.get(index, 0)
        if res is not None:
            first = first or res
            t = timings_of(res.service_timings)
            if t is not None:
                timings.append(t)
            if res.tts_audio:
                speech.append(base64.b64decode(res.tts_audio))
                tts_format = res.tts_format
            utts.append(
                i.UtteranceResult(
                    index=index,
                    job_id=res.job_id,
                    start_ms=start_ms,
                    duration_ms=length,
                    transcript=res.text_asr,
                    translation=res.text_translated,
                    tts_audio=res.tts_audio,
                    timings=t,
                )
            )
        else:
            err = collector.errors.get(index)
            missing = collector.missing.get(index)
            code = err.code if err is not None else (missing.reason.value if missing else "JOB_FAILED")
            utts.append(
                i.UtteranceResult(
                    index=index,
                    job_id=str(err.details.get("job_id", ""))
                    if err and isinstance(err.details, dict)
                    else "",
                    start_ms=start_ms,
                    duration_ms=length,
                    transcript="",
                    translation="",
                    tts_audio="",
                    error=code,
                )
            )
        start_ms += length
    if first is None:
        err = next(iter(collector.errors.values()), None) or next(iter(collector.general), None)
        if err is not None:
            raise _as_error(err)
        if not indices:
            raise RequestError(
                "audio: no speech in the upload", details={"field": "audio", "reason": "empty"}
            )
        silent = all(m.reason is MissingReason.SILENCE_DETECTED for m in collector.missing.values())
        if not silent:
            raise SchedulerError("no utterance of the upload got a result", code=ErrorCode.NO_AVAILABLE_NODE)
        # only silence (Opus that carries no speech): answered as such, with no job to name
    audio = b"".join(speech)
    first_job = first.job_id if first is not None else ""
    headers = (("X-Job-Id", first_job), ("X-Session-Id", session.session_id))
    if want_audio:
        ctype = "audio/opus" if tts_format == "opus" else "audio/l16"
        return Answer(200, audio, ctype, headers)
    detected = session.src_lang
    if first is not None and first.extra is not None and first.extra.language_probabilities:
        detected = max(first.extra.language_probabilities.items(), key=lambda kv: kv[1])[0]
    translation = " ".join(u.translation for u in utts if u.translation)
    body = i.TranslateResponse(
        text=translation,
        audio_tts=base64.b64encode(audio).decode() if audio else "",
        duration_ms=int((time.perf_counter() - started) * 1000),
        transcript=" ".join(u.transcript for u in utts if u.transcript),
        translation=translation,
        tts_format=tts_format,
        src_lang=detected,
        tgt_lang=session.targets[0],
        audio_duration_ms=audio_ms,
        job_id=first_job,
        session_id=session.session_id,
        timings=_sum_timings(timings),
        utterances=utts,
        metadata=session.metadata,
    )
    return Answer(200, _encode(body), "application/json", headers)


def _as_error(err: ErrorMessage) -> SchedulerError:
    try:
        code = ErrorCode(err.code)
    except ValueError:  # a node's own code: the job failed on the node
        return SchedulerError(err.message, code=ErrorCode.INTERNAL_ERROR, details={"node_code": err.code})
    details = err.details if isinstance(err.details, dict) else None
    return SchedulerError(err.message, code=code, details=details)


async def translate(request: web.Request) -> web.StreamResponse:
    """``POST /v1/speech/translate``: the upload as one session's utterances, answered in order."""
    started = time.perf_counter()
    state = request.app[STATE]
    probe = SessionInit(client_version="http", platform="api-gateway", src_lang="auto", tgt_lang="en")
    tenant = tenant_of(state, request, probe)  # 401 before the body is read
    key = request.headers.get("Idempotency-Key", "").strip()
    if len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable():
        raise RequestError(
            f"Idempotency-Key: at most {MAX_IDEMPOTENCY_KEY} printable characters",
            details={"field": "Idempotency-Key", "reason": "value"},
        )
    idem = request.app[IDEMPOTENCY]
    if key:
        first = await idem.claim(tenant, key)
        if isinstance(first, asyncio.Future):
            first = await asyncio.shield(first)
            if first is None:
                first = await idem.claim(tenant, key)
                if isinstance(first, asyncio.Future):
                    raise RequestError(
                        "a request with this Idempotency-Key is still running",
                        code=ErrorCode.TOO_MANY_CLIENTS,
                    )
        if isinstance(first, Answer):
            return first.response(replayed=True)
    answer: Answer | None = None
    try:
        answer = await _translate(request, state, tenant, started)
        return answer.response()
    finally:
        if key:
            await idem.finish(tenant, key, answer)


async def _translate(
    request: web.Request, state: SchedulerState, tenant: str | None, started: float
) -> Answer:
    cfg = state.config.integrator
    body = await read_body(request, cfg.translate_max_body_bytes)
    req = parse_translate_request(
        request.headers.get("Content-Type"),
        body,
        request.query,
        TranslateLimits(cfg.translate_max_body_bytes, int(cfg.translate_max_audio_seconds * 1000)),
    )
    want_audio = wants_audio(request)
    if want_audio and not req.tts:
        raise RequestError(
            "Accept: audio/* asks for the speech, and tts is false",
            details={"field": "tts", "reason": "value"},
        )
    audio = req.audio
    init = SessionInit(
        client_version="http",
        platform="api-gateway",
        src_lang=req.src_lang,
        tgt_lang=req.tgt_lang,
        tenant_id=tenant,
        audio_format=audio.audio_format,
        sample_rate=audio.sample_rate,
        metadata=req.metadata,
    )
    collector = Collector()
    spec = AudioSpec(AudioFormat(audio.audio_format), audio.sample_rate, declared=True)
    session = await open_adapter_session(state, init, spec, collector, "translate")
    try:
        # the sessions' segmentation: cut at the utterance limits, the end of the upload as a final cut
        utts = session.segmenter.chunk(audio.data, True)
        durations = {u.index: u.duration_ms for u in utts}
        pipeline = None if req.tts else PipelineConfig(use_tts=False)
        session.submit(utts, pipeline=pipeline)
        session.close("completed", connection_gone=False)
        deadline = asyncio.get_running_loop().time() + cfg.translate_deadline_seconds
        await _until_done(request, session, collector, deadline)
    except BaseException:
        session.close("request ended", connection_gone=True)
        raise
    await request.app[RECORDER].flushed()  # Redis mode: counted cluster-wide before the answer
    return _answer(session, collector, durations, started, audio.duration_ms, want_audio)


def setup(app: web.Application) -> None:
    """The translate route and the idempotency memory (after server/http/integrator_api.py's setup)."""
    cfg = app[STATE].config.integrator
    app[IDEMPOTENCY] = Idempotency(app[STATE], cfg.idempotency_max_entries, cfg.idempotency_ttl_seconds)
    routes.register(app, "speech_translate", translate)
    # a chunked upload may bring up to the route's own bound before the pre-authentication budgets
    # count its bytes (the route reads and bounds it itself: read_body)
    app[GUARD].body_limits[routes.BY_OP["speech_translate"].path] = cfg.translate_max_body_bytes
