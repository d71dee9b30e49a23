"""The integrator API's wire types: ``POST /v1/speech/translate``, the ``/v1/stream`` messages, usage
records and the webhook event bodies.

The translate answer keeps the reference gateway's three fields (``text``: the translation,
``audio_tts``: synthesized speech in standard base64, ``duration_ms``: processing time) so that a
client written for it works unchanged, and adds ours: the transcript, the translation under its own
name, the TTS format, the job id, the node's stage timings and, for audio long enough to be cut into
several utterances, one entry per utterance. The stream keeps the reference's ``start`` ->
``started``, ``audio {chunk}`` -> ``final {text, audio}`` and ``error {message}``, and adds ``end``,
``partial`` and the fields of ours. Webhook events are one envelope (``id``, ``type``, ``created``,
``tenant_id``, ``data``) whose ``data`` depends on ``type``.

Every field has a description (it reaches the OpenAPI document and docs/integration.md). Adding a
field is compatible; renaming or retyping one is not.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from lingua_scheduler.protocol.common import Metadata, doc

Lang = Annotated[str, Meta(min_length=1, max_length=32, description="A language code (``auto``: detect it)")]
Seconds = Annotated[float, Meta(ge=0)]
NonNeg = Annotated[int, Meta(ge=0)]


class Timings(Struct, kw_only=True, forbid_unknown_fields=True):
    """How long each stage took on the node, in milliseconds (a stage the node did not report is null)."""

    asr_ms: Annotated[int | None, doc("speech recognition")] = None
    nmt_ms: Annotated[int | None, doc("translation")] = None
    tts_ms: Annotated[int | None, doc("speech synthesis")] = None
    total_ms: Annotated[int | None, doc("the whole job on the node")] = None


# --- POST /v1/speech/translate -----------------------------------------------------------------------


class TranslateParams(Struct, kw_only=True, forbid_unknown_fields=True):
    """The form fields of a translate request (multipart form fields, or query parameters with a raw
    audio body). Unknown fields are ignored, as the reference gateway did."""

    src_lang: Annotated[
        str, doc("source language; ``auto`` detects it (default ``zh``, as the reference)")
    ] = "zh"
    tgt_lang: Annotated[str, doc("target language (default ``en``, as the reference)")] = "en"
    audio_format: Annotated[
        str | None,
        doc(
            "``pcm16`` (raw 16-bit little-endian mono), ``opus`` (packets in 2-byte length framing), "
            "``wav`` or ``ogg_opus``; absent: from the audio's Content-Type, else its first bytes, else pcm16"
        ),
    ] = None
    sample_rate: Annotated[
        int | None, doc("sample rate of raw pcm16 or framed Opus, in Hz (default 16000)")
    ] = None
    tts: Annotated[bool, doc("synthesize the translation as speech (default true)")] = True
    metadata: Annotated[
        str | None,
        doc("a JSON object of at most 16 strings: the job's metadata, passed to the node and back"),
    ] = None


class UtteranceResult(Struct, kw_only=True, forbid_unknown_fields=True):
    """One utterance of the upload (long audio is cut into several, at the sessions' limits)."""

    index: Annotated[NonNeg, doc("position of the utterance in the upload, from 0")]
    job_id: Annotated[str, doc("the job that translated it")]
    start_ms: Annotated[NonNeg, doc("where the utterance starts in the upload's audio")]
    duration_ms: Annotated[NonNeg, doc("how long the utterance's audio is")]
    transcript: Annotated[str, doc("the recognized text")]
    translation: Annotated[str, doc("the translation")]
    tts_audio: Annotated[str, doc('synthesized speech, standard base64 ("" without TTS)')]
    timings: Annotated[Timings | None, doc("the node's stage timings")] = None
    error: Annotated[
        str | None,
        doc(
            "why this utterance has no translation (the others are still answered): an error code "
            "(NO_AVAILABLE_NODE, JOB_TIMEOUT, QUOTA_EXCEEDED, ...) or silence_detected"
        ),
    ] = None


class TranslateResponse(Struct, kw_only=True, forbid_unknown_fields=True):
    """The answer of ``POST /v1/speech/translate``: the whole upload, translated."""

    text: Annotated[str, doc("the translation (the reference gateway's field; equal to ``translation``)")]
    audio_tts: Annotated[
        str, doc('synthesized speech of the whole translation, standard base64 ("" without)')
    ]
    duration_ms: Annotated[NonNeg, doc("processing time from the upload's arrival to this answer, in ms")]
    transcript: Annotated[str, doc("the recognized text (utterances joined by a space)")]
    translation: Annotated[str, doc("the translation (utterances joined by a space)")]
    tts_format: Annotated[
        str, doc('format of ``audio_tts`` as the node named it ("pcm16" when it named none)')
    ]
    src_lang: Annotated[str, doc("the source language (as detected, when ``auto`` was asked)")]
    tgt_lang: Annotated[str, doc("the target language")]
    audio_duration_ms: Annotated[NonNeg, doc("how long the uploaded audio is")]
    job_id: Annotated[str, doc("the job of the first utterance (``utterances`` lists every job)")]
    session_id: Annotated[str, doc("the scheduler session the upload ran in (for support requests)")]
    timings: Annotated[Timings | None, doc("the node's stage timings, summed over the utterances")] = None
    utterances: Annotated[list[UtteranceResult], doc("every utterance, in order")] = []
    metadata: Annotated[Metadata | None, doc("the request's metadata, as the node was given it")] = None


# --- /v1/stream --------------------------------------------------------------------------------------


class StreamStart(Struct, tag="start", tag_field="type", kw_only=True, forbid_unknown_fields=True):
    """Opens the stream's session (the first message)."""

    src_lang: Annotated[str, doc("source language; ``auto`` detects it")]
    tgt_lang: Annotated[str, doc("target language")]
    audio_format: Annotated[
        Literal["pcm16", "opus"], doc("what the chunks are: raw pcm16, or Opus in 2-byte length framing")
    ] = "pcm16"
    sample_rate: Annotated[int, doc("sample rate of the chunks, in Hz")] = 16000
    tts: Annotated[bool, doc("synthesize each translation as speech")] = True
    partials: Annotated[bool, doc("send ``partial`` messages with the text recognized so far")] = False
    metadata: Annotated[Metadata | None, doc("the jobs' metadata, passed to the node")] = None


class StreamAudio(Struct, tag="audio", tag_field="type", kw_only=True, forbid_unknown_fields=True):
    """Audio. As in the reference, a chunk is a whole utterance unless ``is_final`` is false."""

    chunk: Annotated[str, doc("audio in the started format, standard base64")]
    is_final: Annotated[
        bool,
        doc(
            "true (default): this chunk ends the utterance; false: more of it follows, and the "
            "scheduler cuts utterances at pauses and the sessions' size limits"
        ),
    ] = True


class StreamEnd(Struct, tag="end", tag_field="type", kw_only=True, forbid_unknown_fields=True):
    """No more audio: the pending utterances are answered, then ``ended`` and the socket closes."""


StreamInbound = StreamStart | StreamAudio | StreamEnd


class StreamStarted(Struct, tag="started", tag_field="type", kw_only=True, forbid_unknown_fields=True):
    """The session is open: audio may follow."""

    session_id: Annotated[str, doc("the scheduler session of this stream")]
    audio_format: Annotated[str, doc("the format the chunks must be in")]
    sample_rate: Annotated[int, doc("their sample rate, in Hz")]


class StreamPartial(Struct, tag="partial", tag_field="type", kw_only=True, forbid_unknown_fields=True):
    """Text recognized so far in an utterance (with ``start.partials``)."""

    utterance_index: Annotated[NonNeg, doc("the utterance, from 0 in this stream")]
    text: Annotated[str, doc("the text recognized so far")]


class StreamFinal(Struct, tag="final", tag_field="type", kw_only=True, forbid_unknown_fields=True):
    """An utterance's result, in utterance order."""

    text: Annotated[str, doc("the translation (the reference gateway's field)")]
    audio: Annotated[str, doc('synthesized speech, standard base64 ("" without TTS)')]
    utterance_index: Annotated[NonNeg, doc("the utterance, from 0 in this stream")]
    transcript: Annotated[str, doc("the recognized text")]
    translation: Annotated[str, doc("the translation (equal to ``text``)")]
    tts_format: Annotated[str, doc("format of ``audio``")]
    job_id: Annotated[str, doc("the job that produced it")]
    timings: Annotated[Timings | None, doc("the node's stage timings")] = None


class StreamError(Struct, tag="error", tag_field="type", kw_only=True, forbid_unknown_fields=True):
    """Something was refused or failed; with ``utterance_index`` only that utterance is lost."""

    message: Annotated[str, doc("what went wrong, for a human (the reference gateway's field)")]
    code: Annotated[str, doc("stable machine-readable code (QUOTA_EXCEEDED, INVALID_MESSAGE, ...)")]
    utterance_index: Annotated[int | None, doc("the utterance it concerns, when one")] = None
    details: Annotated[dict[str, object] | None, doc("structured particulars, when the code has any")] = None


class StreamEnded(Struct, tag="ended", tag_field="type", kw_only=True, forbid_unknown_fields=True):
    """The stream's session ended; the socket closes after this message."""

    session_id: Annotated[str, doc("the session that ended")]
    usage: Annotated[SessionUsage, doc("what the stream used")]


# --- usage -------------------------------------------------------------------------------------------


class JobsByOutcome(Struct, kw_only=True, forbid_unknown_fields=True):
    """Jobs that ended, by outcome."""

    completed: Annotated[NonNeg, doc("translated")] = 0
    failed: Annotated[NonNeg, doc("failed on every node tried")] = 0
    timed_out: Annotated[NonNeg, doc("no result in time")] = 0
    cancelled: Annotated[NonNeg, doc("cancelled (by an operator or the client)")] = 0


class UsageFigures(Struct, kw_only=True, forbid_unknown_fields=True):
    """What was used: audio in, audio translated, speech out, jobs."""

    audio_seconds_received: Annotated[Seconds, doc("seconds of audio accepted for translation")]
    audio_seconds_translated: Annotated[Seconds, doc("seconds of audio whose job completed")]
    tts_seconds: Annotated[Seconds, doc("seconds of synthesized speech returned")]
    jobs: Annotated[JobsByOutcome, doc("jobs that ended, by outcome")]


class SessionUsage(UsageFigures, kw_only=True, forbid_unknown_fields=True):
    """What one session (a stream, an upload, a WebSocket session) used."""

    duration_seconds: Annotated[Seconds, doc("how long the session was open")]


class UsageBucket(UsageFigures, kw_only=True, forbid_unknown_fields=True):
    """One UTC hour of one language pair (pairs past the metered number are summed as other->other)."""

    hour: Annotated[str, doc("start of the UTC hour, ISO 8601 (``2025-01-31T14:00:00Z``)")]
    src_lang: Annotated[str, doc("source language")]
    tgt_lang: Annotated[str, doc("target language")]


class UsageReport(Struct, kw_only=True, forbid_unknown_fields=True):
    """``GET /api/v1/usage``: a tenant's usage over a time range, hour by hour and summed."""

    tenant_id: Annotated[str, doc("the tenant")]
    from_: Annotated[str, doc("start of the range (its hour), ISO 8601 UTC")] = msgspec.field(name="from")
    to: Annotated[str, doc("end of the range (exclusive), ISO 8601 UTC")]
    total: Annotated[UsageFigures, doc("the range summed")]
    buckets: Annotated[list[UsageBucket], doc("the hours with any use, oldest first")]
    instance_only: Annotated[
        bool,
        doc(
            "always false: in Redis mode the figures are every instance's, as each wrote them to Redis "
            "(kept for clients of the first version of this answer)"
        ),
    ] = False


class UsageQuery(Struct, kw_only=True, forbid_unknown_fields=True):
    tenant: Annotated[
        str | UnsetType, doc("the tenant (required with the admin token; a tenant key sees only its own)")
    ] = UNSET
    from_: Annotated[
        str | UnsetType,
        doc("start, ISO 8601 (``2025-01-31T00:00:00Z``) or unix seconds; default: 24 h before ``to``"),
    ] = msgspec.field(default=UNSET, name="from")
    to: Annotated[str | UnsetType, doc("end (exclusive), ISO 8601 or unix seconds; default: now")] = UNSET


# --- webhooks ----------------------------------------------------------------------------------------


class SessionStartedData(Struct, kw_only=True, forbid_unknown_fields=True):
    session_id: Annotated[str, doc("the session")]
    src_lang: Annotated[str, doc("source language")]
    tgt_lang: Annotated[str, doc("target language")]
    via: Annotated[
        Literal["session", "stream", "translate"],
        doc("how it was opened: /ws/session, /v1/stream, or a POST /v1/speech/translate upload"),
    ]
    metadata: Annotated[Metadata | None, doc("the session's metadata (session_init's or the request's)")] = (
        None
    )


class SessionEndedData(Struct, kw_only=True, forbid_unknown_fields=True):
    session_id: Annotated[str, doc("the session")]
    reason: Annotated[str, doc("why it ended: client_close, disconnected, idle, shutdown, completed, ...")]
    usage: Annotated[SessionUsage, doc("what the session used")]
    metadata: Annotated[Metadata | None, doc("the session's metadata")] = None


class JobFailedData(Struct, kw_only=True, forbid_unknown_fields=True):
    job_id: Annotated[str, doc("the job")]
    session_id: Annotated[str, doc("its session")]
    utterance_index: Annotated[int, doc("its utterance")]
    code: Annotated[str, doc("the error code the session was sent (NO_AVAILABLE_NODE, JOB_TIMEOUT, ...)")]
    message: Annotated[str, doc("what went wrong, for a human")]
    metadata: Annotated[Metadata | None, doc("the job's metadata")] = None


class QuotaWarningData(Struct, kw_only=True, forbid_unknown_fields=True):
    period: Annotated[Literal["daily", "monthly"], doc("the quota's period (UTC day or calendar month)")]
    used_seconds: Annotated[Seconds, doc("audio seconds used in the period so far")]
    limit_seconds: Annotated[Seconds, doc("the period's quota, in seconds")]
    reset_at: Annotated[str, doc("when the period ends and the quota resets, ISO 8601 UTC")]


class PingData(Struct, kw_only=True, forbid_unknown_fields=True):
    message: Annotated[
        str, doc("sent by an operator (POST /api/v1/admin/webhooks/test) to check the endpoint")
    ]


class _Event(Struct, tag_field="type", kw_only=True, forbid_unknown_fields=True):
    id: Annotated[str, doc("unique event id (``evt-...``): the same on every retry, for deduplication")]
    created: Annotated[int, doc("when the event happened, unix seconds")]
    tenant_id: Annotated[str, doc("the tenant it concerns")]


class SessionStarted(_Event, tag="session.started", kw_only=True):
    """A session of the tenant opened."""

    data: SessionStartedData


class SessionEnded(_Event, tag="session.ended", kw_only=True):
    """A session of the tenant ended, with what it used."""

    data: SessionEndedData


class JobFailed(_Event, tag="job.failed", kw_only=True):
    """A job of the tenant failed for good (every retry was spent)."""

    data: JobFailedData


class QuotaWarningEvent(_Event, tag="quota.warning", kw_only=True):
    """The tenant used the warning fraction of a quota (once per period)."""

    data: QuotaWarningData


class PingEvent(_Event, tag="test.ping", kw_only=True):
    """An operator's check of the endpoint."""

    data: PingData


WebhookEvent = SessionStarted | SessionEnded | JobFailed | QuotaWarningEvent | PingEvent
WEBHOOK_EVENT_TYPES: tuple[str, ...] = (
    "session.started",
    "session.ended",
    "job.failed",
    "quota.warning",
    "test.ping",
)


class WebhookTestQueued(Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /api/v1/admin/webhooks/test``: the ping is queued for delivery."""

    tenant_id: Annotated[str, doc("the tenant")]
    event_id: Annotated[str, doc("the queued event's id (its deliveries carry it in Lingua-Event-Id)")]
    webhook_url: Annotated[str, doc("where it will be delivered")]
    durable: Annotated[bool, doc("true in Redis mode: the event survives this instance's death")]


class WebhookTestQuery(Struct, kw_only=True, forbid_unknown_fields=True):
    tenant: Annotated[str, doc("the tenant whose endpoint to ping"), Meta(min_length=1)]
