"""The upload readers: Ogg Opus demuxed into length-prefixed packets, WAV into pcm16 with its rate, raw
pcm16; refusals name the field and a reason of ours; arbitrary bytes never crash them."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lingua_scheduler.core import audio_containers as ac
from lingua_scheduler.core import opus
from lingua_scheduler.core.audio import AudioFormat
from lingua_scheduler.errors import ErrorCode, RequestError
from tests.core.audio_files import OPUS_TAGS, PACKET_20MS, crc_bitwise, ogg_opus, ogg_page, opus_head, wav


def reason(exc: pytest.ExceptionInfo[RequestError]) -> str:
    assert exc.value.code is ErrorCode.INVALID_REQUEST
    assert exc.value.details["field"] in ("audio", "sample_rate")
    return str(exc.value.details["reason"])


def test_ogg_crc_is_the_ogg_variant_of_crc32() -> None:
    # CRC-32/POSIX without its final inversion (Ogg: initial 0, no xor out): check value of "123456789"
    assert ac.ogg_crc(b"123456789") == 0x765E7680 ^ 0xFFFFFFFF
    assert ac.ogg_crc(b"123456789") == crc_bitwise(b"123456789")


def test_ogg_opus_becomes_length_prefixed_packets() -> None:
    packets = [PACKET_20MS[:1] + bytes([i]) * 30 for i in range(10)]
    out = ac.open_ogg_opus(ogg_opus(packets, rate=16000))
    assert out.audio_format is AudioFormat.OPUS and out.sample_rate == 16000
    assert out.data == opus.frame(packets) and out.duration_ms == 200 and out.container == "ogg_opus"


def test_ogg_opus_rate_outside_the_sessions_falls_back_to_48k() -> None:
    assert ac.open_ogg_opus(ogg_opus([PACKET_20MS], rate=44100)).sample_rate == 48000


def test_a_packet_continued_on_the_next_page_and_long_lacing() -> None:
    big = PACKET_20MS[:1] + b"\x22" * 509  # 510 bytes: two full segments and its end on the next page
    first, rest = big[:510], b""
    pages = [
        ogg_page([opus_head()], flags=0x02),
        ogg_page([OPUS_TAGS], sequence=1),
        ogg_page([PACKET_20MS, first], sequence=2, open_last=True),
        ogg_page([rest], sequence=3, flags=0x01 | 0x04),
        ogg_page([PACKET_20MS + b"\x33" * 600], sequence=4),  # lacing 255, 255, 91
    ]
    out = ac.open_ogg_opus(b"".join(pages))
    assert opus.packets(out.data) is not None
    sizes = [end - start - 2 for start, end, _ in opus.packets(out.data) or []]
    assert sizes == [len(PACKET_20MS), 510, len(PACKET_20MS) + 600]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "empty"),
        (b"RIFF0000WAVE", "not_ogg"),
        (b"OggS\x00", "ogg_page"),
        (ogg_opus([PACKET_20MS], channels=2), "opus_channels"),
        (ogg_page([b"NotOpusHead" + b"\0" * 12], flags=0x02), "opus_head"),
        (ogg_page([opus_head()], flags=0x02) + ogg_page([b"nottags"], sequence=1), "opus_tags"),
        (ogg_page([opus_head()], flags=0x02) + ogg_page([OPUS_TAGS], sequence=1), "empty"),
        (ogg_opus([bytes([0x03])]), "opus_packet"),  # code 3 without its frame-count byte
        (ogg_page([opus_head()], flags=0x02) + ogg_page([OPUS_TAGS], serial=9, sequence=1), "ogg_streams"),
        (ogg_page([opus_head()], flags=0) + ogg_page([OPUS_TAGS], sequence=1), "ogg_page"),
        (ogg_page([opus_head()], flags=0x02) + ogg_page([OPUS_TAGS], sequence=1, flags=0x01), "ogg_page"),
    ],
)
def test_ogg_refusals(data: bytes, expected: str) -> None:
    with pytest.raises(RequestError) as exc:
        ac.open_ogg_opus(data)
    assert reason(exc) == expected


def test_a_corrupt_byte_fails_the_crc() -> None:
    data = bytearray(ogg_opus([PACKET_20MS] * 3))
    data[-5] ^= 0x01
    with pytest.raises(RequestError) as exc:
        ac.open_ogg_opus(bytes(data))
    assert reason(exc) == "ogg_crc"


def test_a_truncated_file_is_refused() -> None:
    data = ogg_opus([PACKET_20MS] * 3)
    with pytest.raises(RequestError) as exc:
        ac.open_ogg_opus(data[:-3])
    assert reason(exc) == "ogg_page"


def test_wav_gives_its_samples_and_rate() -> None:
    samples = struct.pack("<4h", 1, -1, 300, -300)
    for extra in (False, True):
        out = ac.open_wav(wav(samples, rate=24000, extra_chunk=extra))
        assert (out.audio_format, out.sample_rate, out.data, out.container) == (
            AudioFormat.PCM16,
            24000,
            samples,
            "wav",
        )


def test_wav_of_unknown_length_runs_to_the_end() -> None:
    data = bytearray(wav(b"\x01\x00" * 160))
    data[40:44] = b"\xff\xff\xff\xff"  # the data chunk's size as a streaming writer leaves it
    assert ac.open_wav(bytes(data)).duration_ms == 10


def test_extensible_wav_with_the_pcm_subformat() -> None:
    fmt = struct.pack("<HHIIHH", 0xFFFE, 1, 16000, 32000, 2, 16) + struct.pack("<HHI", 22, 16, 4)
    fmt += struct.pack("<H", 1) + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
    body = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", 4) + b"\0\0\0\0"
    data = b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body
    assert ac.open_wav(data).sample_rate == 16000


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"OggS", "not_wav"),
        (wav(b"\0\0", channels=2), "wav_channels"),
        (wav(b"\0", bits=8), "wav_format"),
        (wav(b"\0\0\0\0", tag=3, bits=32), "wav_format"),
        (wav(b"\0\0", rate=11025), "sample_rate"),
        (wav(b"\0\0\0"), "pcm_length"),
        (wav(b""), "empty"),
        (wav(b"\0\0" * 10)[:-4], "wav_chunk"),
        (b"RIFF\x04\x00\x00\x00WAVE", "wav_chunk"),
    ],
)
def test_wav_refusals(data: bytes, expected: str) -> None:
    with pytest.raises(RequestError) as exc:
        ac.open_wav(data)
    assert reason(exc) == expected


def test_raw_pcm16_and_framed_opus() -> None:
    assert ac.open_pcm16(b"\0\0" * 8000, 16000).duration_ms == 500
    with pytest.raises(RequestError) as exc:
        ac.open_pcm16(b"\0\0", 12345)
    assert exc.value.details == {"field": "sample_rate", "reason": "sample_rate"}
    assert ac.open_framed_opus(opus.frame([PACKET_20MS] * 5), 16000).duration_ms == 100
    with pytest.raises(RequestError) as exc:
        ac.open_framed_opus(b"\x05\x00abc", 16000)
    assert reason(exc) == "opus_packet"


def test_every_reason_is_described() -> None:
    assert all(text for text in ac.AUDIO_REASONS.values())


# --- never crash on arbitrary bytes --------------------------------------------------------------


def _opens(fn: object, data: bytes) -> None:
    try:
        out = fn(data)  # type: ignore[operator]
    except RequestError as exc:
        assert exc.details["reason"] in ac.AUDIO_REASONS
        return
    assert isinstance(out, ac.DecodedAudio) and out.data


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_crash_the_readers(data: bytes) -> None:
    for fn in (
        ac.open_ogg_opus,
        ac.open_wav,
        lambda d: ac.open_pcm16(d, 16000),
        lambda d: ac.open_framed_opus(d, 16000),
    ):
        _opens(fn, data)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_valid_files_never_crash(data: st.DataObject) -> None:
    base = data.draw(st.sampled_from([ogg_opus([PACKET_20MS] * 4, per_page=2), wav(b"\x01\x02" * 50)]))
    pos = data.draw(st.integers(0, len(base) - 1))
    edit = data.draw(st.sampled_from(["flip", "cut", "insert"]))
    if edit == "flip":
        mutated = base[:pos] + bytes([base[pos] ^ data.draw(st.integers(1, 255))]) + base[pos + 1 :]
    elif edit == "cut":
        mutated = base[:pos]
    else:
        mutated = base[:pos] + data.draw(st.binary(min_size=1, max_size=8)) + base[pos:]
    _opens(ac.open_ogg_opus, mutated)
    _opens(ac.open_wav, mutated)
