"""A job as a node author sees it, what the author's ``handle`` gives back, and running one job.

``handle(job)`` is either a coroutine function returning a ``Result``, or an async generator yielding
``Partial``s (text recognized so far, sent as ``asr_partial``) and then one ``Result``. Raising
``JobFailed`` answers the job with an error code the scheduler acts on (``MODEL_NOT_AVAILABLE`` and
``NODE_OVERLOADED`` move it to another node); any other exception answers ``INTERNAL_ERROR`` (its text is
not sent: it may hold what the user said). Cancellation (``job_cancel``) stops the handler and sends
nothing.

The messages are the wire structs of ``protocol/node.py``; this module only fills them in.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from lingua_scheduler.protocol.common import ExtraResult, JobError
from lingua_scheduler.protocol.node import JobAck, JobAssign, JobResult, NodeAsrPartial, PipelineConfig

log = logging.getLogger(__name__)

#: error code of a job whose handler raised something else than ``JobFailed``
INTERNAL_ERROR = "INTERNAL_ERROR"


@dataclass(frozen=True, slots=True)
class Job:
    """One utterance to process. ``audio`` is decoded; ``assign`` is the ``job_assign`` as received."""

    job_id: str
    session_id: str
    utterance_index: int
    src_lang: str
    tgt_lang: str
    audio: bytes
    audio_format: str
    sample_rate: int
    pipeline: PipelineConfig
    #: the session wants ``asr_partial`` while recognizing (yield ``Partial``s)
    streaming: bool
    assign: JobAssign = field(repr=False)

    @property
    def metadata(self) -> dict[str, str]:
        """The integrator's metadata of the job (domain, glossary id, ...; empty when it gave none)."""
        return dict(self.assign.metadata or {})

    @classmethod
    def from_assign(cls, assign: JobAssign) -> Job:
        try:
            audio = base64.b64decode(assign.audio, validate=True)
        except (binascii.Error, ValueError):
            audio = b""  # the scheduler only sends audio it decoded; a handler still gets a Job
        return cls(
            job_id=assign.job_id,
            session_id=assign.session_id,
            utterance_index=assign.utterance_index,
            src_lang=assign.src_lang,
            tgt_lang=assign.tgt_lang,
            audio=audio,
            audio_format=assign.audio_format,
            sample_rate=assign.sample_rate,
            pipeline=assign.pipeline,
            streaming=bool(assign.enable_streaming_asr),
            assign=assign,
        )


@dataclass(frozen=True, slots=True)
class Partial:
    """Text recognized so far."""

    text: str
    is_final: bool = False


@dataclass(frozen=True, slots=True)
class Result:
    """A job's outcome: the recognized text, its translation and the synthesized speech (raw bytes,
    base64-encoded on the wire)."""

    text_asr: str | None = None
    text_translated: str | None = None
    tts_audio: bytes | None = None
    tts_format: str = "pcm16"
    extra: ExtraResult | None = None


class JobFailed(Exception):
    """Raise from ``handle`` to answer the job with an error ``code`` (the scheduler's codes are acted
    on, any other string is passed to the session) and a ``message`` for people."""

    def __init__(self, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details


#: what a node author writes
Handler = Callable[[Job], Awaitable[Result] | AsyncIterator[Partial | Result]]
#: sends one message to the scheduler
Send = Callable[[Any], Awaitable[None]]


def ack(assign: JobAssign, node_id: str) -> JobAck:
    return JobAck(
        job_id=assign.job_id,
        attempt_id=assign.attempt_id,
        node_id=node_id,
        session_id=assign.session_id,
        trace_id=assign.trace_id,
    )


def partial_message(assign: JobAssign, node_id: str, partial: Partial) -> NodeAsrPartial:
    return NodeAsrPartial(
        job_id=assign.job_id,
        node_id=node_id,
        session_id=assign.session_id,
        utterance_index=assign.utterance_index,
        text=partial.text,
        is_final=partial.is_final,
        trace_id=assign.trace_id,
        attempt_id=assign.attempt_id,
    )


def result_message(
    assign: JobAssign, node_id: str, outcome: Result | JobFailed, processing_ms: int
) -> JobResult:
    failed = isinstance(outcome, JobFailed)
    audio = None if isinstance(outcome, JobFailed) else outcome.tts_audio
    ok = outcome if isinstance(outcome, Result) else Result()
    return JobResult(
        job_id=assign.job_id,
        attempt_id=assign.attempt_id,
        node_id=node_id,
        session_id=assign.session_id,
        utterance_index=assign.utterance_index,
        trace_id=assign.trace_id,
        processing_time_ms=max(0, processing_ms),
        node_completed_at_ms=int(time.time() * 1000),
        success=not failed,
        error=(
            JobError(code=outcome.code, message=outcome.message, details=outcome.details)
            if isinstance(outcome, JobFailed)
            else None
        ),
        text_asr=ok.text_asr,
        text_translated=ok.text_translated,
        tts_audio=base64.b64encode(audio).decode("ascii") if audio is not None else None,
        tts_format=ok.tts_format if audio is not None else None,
        extra=ok.extra,
    )


class _SendFailed(Exception):
    """Sending failed (the connection went away): not the handler's fault, re-raised as its cause."""


async def run_job(handle: Handler, assign: JobAssign, node_id: Callable[[], str], send: Send) -> None:
    """Run ``handle`` on one job and send its partials and its result (``node_id()`` is read at each
    send: a reconnect may happen meanwhile). Cancellation propagates and sends nothing; an error of
    ``send`` propagates as it was raised."""
    t0 = time.perf_counter()
    job = Job.from_assign(assign)

    async def forward(partial: Partial) -> None:
        try:
            await send(partial_message(assign, node_id(), partial))
        except Exception as exc:
            raise _SendFailed from exc

    outcome: Result | JobFailed
    try:
        produced = handle(job)
        if inspect.isawaitable(produced):
            value: object = await produced
        else:
            value = None
            try:
                async for item in produced:
                    if isinstance(item, Partial):
                        await forward(item)
                    else:
                        value = item
                        break
            finally:
                aclose = getattr(produced, "aclose", None)
                if aclose is not None:
                    await aclose()
        if not isinstance(value, Result):
            raise TypeError(f"handle gave {type(value).__name__}, not a Result")
        outcome = value
    except _SendFailed as exc:
        assert exc.__cause__ is not None
        raise exc.__cause__ from None
    except JobFailed as exc:
        outcome = exc
    except Exception as exc:  # the author's code failed: the session is told, the node goes on
        log.exception("job handler failed", extra={"job_id": assign.job_id})
        outcome = JobFailed(INTERNAL_ERROR, f"the node's handler raised {type(exc).__name__}")
    elapsed = int((time.perf_counter() - t0) * 1000)
    await send(result_message(assign, node_id(), outcome, elapsed))
