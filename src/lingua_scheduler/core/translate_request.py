"""A ``POST /v1/speech/translate`` request, from its Content-Type, body and query string to what the
job engine runs: languages, whether to synthesize speech, and the audio as a session streams it.

Owns ``parse_translate_request``, pure. Two shapes are accepted:

- **multipart/form-data** (the reference gateway's): a part ``audio`` (required) and the text fields
  ``src_lang``, ``tgt_lang``, ``audio_format``, ``sample_rate``, ``tts``; other parts are ignored;
- **a raw body** of audio (``audio/ogg; codecs=opus``, ``audio/wav``, ``audio/l16; rate=16000``,
  ``application/octet-stream`` or no Content-Type), the fields coming from the query string.

The container is the ``audio_format`` field when given, else the audio's media type, else what its
first bytes are (``OggS``, ``RIFF....WAVE``), else raw pcm16 (the reference's default). Bounds: the
body (``max_body_bytes``, MESSAGE_TOO_LARGE), the audio's duration (``max_audio_ms``,
MESSAGE_TOO_LARGE), the form (``core/multipart.py``). Every refusal is a ``RequestError`` whose
``details.field`` names the field at fault.

Must never: do I/O, log or echo audio bytes or field values longer than a language code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import msgspec

from lingua_scheduler.core import audio_containers as ac
from lingua_scheduler.core.languages import AUTO, normalize
from lingua_scheduler.core.multipart import FormPart, form_parts, media_type
from lingua_scheduler.errors import ErrorCode, RequestError
from lingua_scheduler.protocol.common import (
    MAX_METADATA_ENTRIES,
    MAX_METADATA_KEY,
    MAX_METADATA_VALUE,
    Metadata,
)

#: the text fields of the form (and of the query string with a raw body)
FIELDS = ("src_lang", "tgt_lang", "audio_format", "sample_rate", "tts", "metadata")
#: longest ``metadata`` field (a JSON object of at most 16 short strings)
MAX_METADATA_BYTES = 8192
#: ``audio_format`` values: what the audio is
CONTAINERS = ("pcm16", "opus", "wav", "ogg_opus")
#: media types of audio and the container each means
AUDIO_MEDIA: dict[str, str] = {
    "audio/ogg": "ogg_opus",
    "audio/opus": "ogg_opus",
    "application/ogg": "ogg_opus",
    "audio/wav": "wav",
    "audio/wave": "wav",
    "audio/x-wav": "wav",
    "audio/vnd.wave": "wav",
    "audio/l16": "pcm16",
    "audio/pcm": "pcm16",
}
#: media types that say nothing of the audio (its bytes, then the fields decide)
GENERIC_MEDIA = frozenset({"", "application/octet-stream"})
DEFAULT_SRC = "zh"
DEFAULT_TGT = "en"
DEFAULT_RATE = 16000
_MAX_FIELD = 64


@dataclass(frozen=True, slots=True)
class TranslateLimits:
    max_body_bytes: int
    max_audio_ms: int


@dataclass(frozen=True, slots=True)
class TranslateRequest:
    src_lang: str
    tgt_lang: str
    tts: bool
    audio: ac.DecodedAudio
    metadata: dict[str, str] | None = None


def _bad(
    field: str, message: str, code: ErrorCode = ErrorCode.INVALID_REQUEST, reason: str = "value"
) -> RequestError:
    return RequestError(f"{field}: {message}", code=code, details={"field": field, "reason": reason})


def parse_translate_request(
    content_type: str | None, body: bytes, query: Mapping[str, str], limits: TranslateLimits
) -> TranslateRequest:
    if len(body) > limits.max_body_bytes:
        raise _bad(
            "body",
            f"{len(body)} bytes is over the limit of {limits.max_body_bytes} "
            "(integrator.translate_max_body_bytes)",
            ErrorCode.MESSAGE_TOO_LARGE,
            "too_large",
        )
    kind, params = media_type(content_type)
    fields: dict[str, str]
    if kind == "multipart/form-data":
        boundary = params.get("boundary")
        if not boundary:
            raise _bad("Content-Type", "multipart/form-data needs a boundary parameter", reason="form")
        audio_part, fields = _form(form_parts(body, boundary))
        audio, audio_type = audio_part.data, audio_part.content_type
    elif kind in GENERIC_MEDIA or kind in AUDIO_MEDIA:
        fields = {k: v for k, v in query.items() if k in FIELDS}
        audio, audio_type = body, content_type
    else:
        raise _bad(
            "Content-Type",
            f"{kind} is not taken: send multipart/form-data, or the audio itself as audio/ogg, "
            "audio/wav, audio/l16 or application/octet-stream",
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            "media_type",
        )
    src = _language(fields.get("src_lang", DEFAULT_SRC), "src_lang")
    tgt = _language(fields.get("tgt_lang", DEFAULT_TGT), "tgt_lang")
    if tgt == AUTO:
        raise _bad("tgt_lang", "the target language cannot be auto")
    tts = _boolean(fields.get("tts", "true"), "tts")
    metadata = _metadata(fields.get("metadata"))
    audio_kind, audio_params = media_type(audio_type, "audio Content-Type")
    rate = _rate(fields.get("sample_rate") or audio_params.get("rate"))
    container = _container(fields.get("audio_format"), audio_kind, audio)
    if container == "ogg_opus":
        decoded = ac.open_ogg_opus(audio)
    elif container == "wav":
        decoded = ac.open_wav(audio)
    elif container == "opus":
        decoded = ac.open_framed_opus(audio, rate)
    else:
        decoded = ac.open_pcm16(audio, rate)
    if decoded.duration_ms > limits.max_audio_ms:
        raise _bad(
            "audio",
            f"{decoded.duration_ms} ms of audio is over the limit of {limits.max_audio_ms} ms "
            "(integrator.translate_max_audio_seconds)",
            ErrorCode.MESSAGE_TOO_LARGE,
            "too_large",
        )
    return TranslateRequest(src, tgt, tts, decoded, metadata)


def _form(parts: list[FormPart]) -> tuple[FormPart, dict[str, str]]:
    audio: FormPart | None = None
    fields: dict[str, str] = {}
    for part in parts:
        if part.name == "audio":
            if audio is not None:
                raise _bad("audio", "the form has more than one audio part", reason="form")
            audio = part
        elif part.name in FIELDS:
            if part.name in fields:
                raise _bad(part.name, "the form gives this field twice", reason="form")
            if len(part.data) > (MAX_METADATA_BYTES if part.name == "metadata" else _MAX_FIELD):
                raise _bad(part.name, f"longer than {_MAX_FIELD} bytes")
            try:
                fields[part.name] = part.data.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise _bad(part.name, "is not UTF-8 text") from None
    if audio is None:
        raise _bad("audio", "the form has no audio part (a file field named audio)", reason="missing")
    return audio, fields


def _metadata(value: str | None) -> dict[str, str] | None:
    """The ``metadata`` field: a JSON object of strings, bounded as the wire's ``Metadata``."""
    if value is None or not value.strip():
        return None
    if len(value) > MAX_METADATA_BYTES:
        raise _bad("metadata", f"longer than {MAX_METADATA_BYTES} bytes")
    try:
        return msgspec.json.decode(value.encode(), type=Metadata)
    except msgspec.DecodeError as exc:
        raise _bad(
            "metadata",
            f"must be a JSON object of at most {MAX_METADATA_ENTRIES} strings (keys up to "
            f"{MAX_METADATA_KEY}, values up to {MAX_METADATA_VALUE} characters): {str(exc)[:120]}",
        ) from None


def _language(value: str, field: str) -> str:
    code = normalize(value)
    if not code:
        raise _bad(field, "must not be empty")
    if len(code) > 32 or not all(c.isalnum() or c == "-" for c in code):
        raise _bad(field, "is not a language code (letters, digits and -, at most 32)")
    return code


def _boolean(value: str, field: str) -> bool:
    v = value.strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise _bad(field, "must be true or false")


def _rate(value: str | None) -> int:
    if value is None or not value.strip():
        return DEFAULT_RATE
    v = value.strip()
    if not v.isdigit() or len(v) > 6:
        raise _bad("sample_rate", "must be a whole number of Hz")
    return int(v)


def _container(declared: str | None, audio_kind: str, audio: bytes) -> str:
    if declared:
        d = declared.strip().lower()
        if d not in CONTAINERS:
            raise _bad("audio_format", f"must be one of {', '.join(CONTAINERS)}")
        return d
    if audio_kind in AUDIO_MEDIA:
        return AUDIO_MEDIA[audio_kind]
    if audio[:4] == b"OggS":
        return "ogg_opus"
    if audio[:4] == b"RIFF" and audio[8:12] == b"WAVE":
        return "wav"
    return "pcm16"
