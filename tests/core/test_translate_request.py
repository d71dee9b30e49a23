"""The translate request as a pure function: multipart forms (as curl -F and aiohttp send them) and raw
bodies, the container chosen, defaults of the reference gateway, bounds, and refusals naming the field."""

from __future__ import annotations

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lingua_scheduler.core import opus
from lingua_scheduler.core.audio import AudioFormat
from lingua_scheduler.core.multipart import form_parts, media_type
from lingua_scheduler.core.translate_request import TranslateLimits, parse_translate_request
from lingua_scheduler.errors import ErrorCode, RequestError
from tests.core.audio_files import PACKET_20MS, ogg_opus, wav

LIMITS = TranslateLimits(max_body_bytes=1 << 20, max_audio_ms=60_000)
PCM = b"\x01\x00" * 1600  # 100 ms at 16 kHz


async def form_body(fields: dict[str, str], audio: bytes, audio_type: str | None) -> tuple[str, bytes]:
    """A form exactly as aiohttp's client writes it."""
    form = aiohttp.FormData()
    for k, v in fields.items():
        form.add_field(k, v)
    form.add_field("audio", audio, filename="clip", content_type=audio_type or "application/octet-stream")
    payload = form()
    chunks: list[bytes] = []

    class Sink:
        async def write(self, data: bytes) -> None:
            chunks.append(bytes(data))

    await payload.write(Sink())  # type: ignore[arg-type]
    return payload.content_type, b"".join(chunks)


def refused(ct: str | None, body: bytes, query: dict[str, str] | None = None) -> RequestError:
    with pytest.raises(RequestError) as exc:
        parse_translate_request(ct, body, query or {}, LIMITS)
    return exc.value


async def test_multipart_with_reference_fields() -> None:
    ct, body = await form_body({"src_lang": "en", "tgt_lang": "zh-CN", "sample_rate": "16000"}, PCM, None)
    req = parse_translate_request(ct, body, {}, LIMITS)
    assert (req.src_lang, req.tgt_lang, req.tts) == ("en", "zh", True)
    assert (
        req.audio.audio_format is AudioFormat.PCM16 and req.audio.data == PCM and req.audio.duration_ms == 100
    )


async def test_multipart_defaults_are_the_reference_gateways() -> None:
    ct, body = await form_body({}, PCM, None)
    req = parse_translate_request(ct, body, {}, LIMITS)
    assert (req.src_lang, req.tgt_lang, req.audio.sample_rate) == ("zh", "en", 16000)


@pytest.mark.parametrize("audio_type", ["audio/ogg; codecs=opus", None])
async def test_multipart_ogg_by_type_or_by_its_bytes(audio_type: str | None) -> None:
    ct, body = await form_body({"tts": "false"}, ogg_opus([PACKET_20MS] * 3, rate=16000), audio_type)
    req = parse_translate_request(ct, body, {}, LIMITS)
    assert req.tts is False and req.audio.audio_format is AudioFormat.OPUS
    assert req.audio.data == opus.frame([PACKET_20MS] * 3)


def test_raw_bodies() -> None:
    ogg = parse_translate_request(
        "audio/ogg; codecs=opus", ogg_opus([PACKET_20MS]), {"tgt_lang": "de"}, LIMITS
    )
    assert ogg.tgt_lang == "de" and ogg.audio.container == "ogg_opus"
    w = parse_translate_request("audio/wav", wav(PCM, rate=8000), {}, LIMITS)
    assert (w.audio.sample_rate, w.audio.data) == (8000, PCM)
    l16 = parse_translate_request("audio/L16; rate=24000", PCM, {}, LIMITS)
    assert l16.audio.sample_rate == 24000
    raw = parse_translate_request(None, PCM, {"sample_rate": "48000", "audio_format": "pcm16"}, LIMITS)
    assert raw.audio.sample_rate == 48000
    framed = parse_translate_request(
        "application/octet-stream", opus.frame([PACKET_20MS]), {"audio_format": "opus"}, LIMITS
    )
    assert framed.audio.audio_format is AudioFormat.OPUS


@pytest.mark.parametrize(
    ("ct", "body", "query", "code", "field"),
    [
        ("text/html", PCM, {}, ErrorCode.UNSUPPORTED_MEDIA_TYPE, "Content-Type"),
        ("multipart/form-data", PCM, {}, ErrorCode.INVALID_REQUEST, "Content-Type"),
        ("multipart/form-data; boundary=x", b"--x--", {}, ErrorCode.INVALID_REQUEST, "audio"),
        (None, PCM, {"tgt_lang": "auto"}, ErrorCode.INVALID_REQUEST, "tgt_lang"),
        (None, PCM, {"src_lang": "e n"}, ErrorCode.INVALID_REQUEST, "src_lang"),
        (None, PCM, {"tts": "maybe"}, ErrorCode.INVALID_REQUEST, "tts"),
        (None, PCM, {"sample_rate": "fast"}, ErrorCode.INVALID_REQUEST, "sample_rate"),
        (None, PCM, {"sample_rate": "11025"}, ErrorCode.INVALID_REQUEST, "sample_rate"),
        (None, PCM, {"audio_format": "mp3"}, ErrorCode.INVALID_REQUEST, "audio_format"),
        (None, PCM + b"\0", {}, ErrorCode.INVALID_REQUEST, "audio"),
        (None, b"", {}, ErrorCode.INVALID_REQUEST, "audio"),
        (None, b"\0" * (LIMITS.max_body_bytes + 1), {}, ErrorCode.MESSAGE_TOO_LARGE, "body"),
        (None, b"\0\0" * 8000 * 61, {"sample_rate": "8000"}, ErrorCode.MESSAGE_TOO_LARGE, "audio"),
        ("audio/ogg", wav(PCM), {}, ErrorCode.INVALID_REQUEST, "audio"),
    ],
)
def test_refusals_name_the_field(
    ct: str | None, body: bytes, query: dict[str, str], code: ErrorCode, field: str
) -> None:
    exc = refused(ct, body, query)
    assert exc.code is code and exc.details["field"] == field
    assert exc.message.startswith(field)


async def test_form_field_twice_and_audio_twice() -> None:
    ct, body = await form_body({"src_lang": "en"}, PCM, None)
    boundary = media_type(ct)[1]["boundary"]
    twice = (
        body.replace(f"--{boundary}--".encode(), b"")
        + (
            f'--{boundary}\r\nContent-Disposition: form-data; name="src_lang"\r\n\r\nde\r\n--{boundary}--\r\n'
        ).encode()
    )
    assert refused(ct, twice).details["field"] == "src_lang"


def test_form_parts_reads_quoted_names_and_no_header_parts() -> None:
    body = (
        b'preamble\r\n--B\r\nContent-Disposition: form-data; name="a\\"b"; filename="f.wav"\r\n'
        b"Content-Type: audio/wav\r\n\r\nxy\r\n--B  \r\n"
        b"Content-Disposition: form-data; name=c\r\n\r\n\r\n--B--"
    )
    parts = form_parts(body, "B")
    assert [(p.name, p.filename, p.content_type, p.data) for p in parts] == [
        ('a"b', "f.wav", "audio/wav", b"xy"),
        ("c", None, None, b""),
    ]


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=400),
    st.sampled_from(["multipart/form-data; boundary=B", None, "audio/ogg", "audio/wav"]),
)
def test_arbitrary_bodies_never_crash(body: bytes, ct: str | None) -> None:
    for data in (
        body,
        b"--B\r\n" + body,
        b"--B\r\nContent-Disposition: form-data; name=audio\r\n\r\n" + body,
    ):
        try:
            parse_translate_request(ct, data, {}, LIMITS)
        except RequestError as exc:
            assert exc.code in (ErrorCode.INVALID_REQUEST, ErrorCode.MESSAGE_TOO_LARGE)
            assert isinstance(exc.details["field"], str)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_content_types_never_crash(ct: str) -> None:
    try:
        parse_translate_request(ct, PCM, {}, LIMITS)
    except RequestError as exc:
        assert exc.details["field"] in ("Content-Type", "body", "audio", "sample_rate")
