"""Length-prefixed Opus: recognition, durations from TOC bytes, splitting; groups; binary frames."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lingua_scheduler.clock import ManualClock
from lingua_scheduler.config import SessionConfig
from lingua_scheduler.core import opus
from lingua_scheduler.core.audio import AudioFormat, AudioSpec, audio_duration_ms, detect_format
from lingua_scheduler.core.groups import GroupTracker
from lingua_scheduler.core.segmentation import CutReason, Segmenter
from lingua_scheduler.errors import ErrorCode, ProtocolError
from lingua_scheduler.protocol.binary_frames import (
    decode_binary_frame,
    encode_audio_frame,
    encode_final_frame,
    is_binary_frame,
)


def packet(toc: int, size: int = 20) -> bytes:
    return bytes([toc]) + bytes(range(1, size))


@pytest.mark.parametrize(
    ("toc", "tenths"),
    [
        (0x48, 200),  # config 9: SILK WB 20 ms, one frame (what the reference client sends)
        (0x00, 100),  # config 0: SILK NB 10 ms
        (0x18, 600),  # config 3: SILK NB 60 ms
        (0x60, 100),  # config 12: hybrid 10 ms
        (0x80, 25),  # config 16: CELT 2.5 ms
        (0xF8, 200),  # config 31: CELT 20 ms
        (0x49, 400),  # code 1: two frames of 20 ms
        (0x4A, 400),  # code 2: two frames of 20 ms
    ],
)
def test_packet_duration_from_the_toc(toc: int, tenths: int) -> None:
    assert opus.packet_tenths(packet(toc)) == tenths


def test_code_3_counts_its_frames_and_refuses_illegal_packets() -> None:
    assert opus.packet_tenths(bytes([0x4B, 0x03, 0, 0])) == 600  # 3 x 20 ms
    assert opus.packet_tenths(bytes([0x4B, 0x00])) is None  # zero frames
    assert opus.packet_tenths(bytes([0x4B])) is None  # count byte missing
    assert opus.packet_tenths(bytes([0x1B, 0x03])) is None  # 3 x 60 ms > 120 ms
    assert opus.packet_tenths(b"") is None


def test_recorded_client_chunk_shape() -> None:
    # the 74 client's silence chunks: 130 bytes = 13 packets of 8 bytes (head 08 00 48 ...), 260 ms
    chunk = opus.frame([packet(0x48, 8)] * 13)
    assert len(chunk) == 130 and chunk[:3] == bytes([0x08, 0x00, 0x48])
    assert audio_duration_ms(chunk, "opus", 16000) == 260


def test_framing_must_chain_to_the_end() -> None:
    good = opus.frame([packet(0x48), packet(0x48)])
    assert opus.is_framed_opus(good)
    assert not opus.is_framed_opus(good[:-1])  # truncated packet
    assert not opus.is_framed_opus(good + b"\x01")  # trailing byte
    assert not opus.is_framed_opus(b"\x00\x00" + good)  # zero-length packet
    assert not opus.is_framed_opus(b"")


@given(st.binary(min_size=1, max_size=400))
def test_random_bytes_rarely_look_framed_and_never_crash(data: bytes) -> None:
    found = opus.packets(data)
    if found is not None:  # then it really chains: every byte is in a packet, in order
        assert found[0][0] == 0 and found[-1][1] == len(data)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(found))


@given(st.lists(st.integers(1, 80), min_size=1, max_size=40), st.integers(1, 4000), st.integers(1, 5000))
def test_split_keeps_whole_packets_within_bounds(sizes: list[int], max_bytes: int, max_tenths: int) -> None:
    data = opus.frame([packet(0x48, n) for n in sizes])
    head, rest = opus.split(data, max_bytes, max_tenths)
    assert head + rest == data and opus.is_framed_opus(head)
    assert rest == b"" or opus.is_framed_opus(rest)
    first = sizes[0] + 2
    assert len(head) <= max(max_bytes, first)
    assert (opus.duration_tenths(head) or 0) <= max(max_tenths, 200)


def test_detect_format_prefers_what_the_session_declared() -> None:
    framed = opus.frame([packet(0x48)])
    assert detect_format(framed, None, AudioFormat.OPUS) is AudioFormat.OPUS
    assert detect_format(framed, None, AudioFormat.PCM16) is AudioFormat.OPUS  # recognised anyway
    assert detect_format(b"\x00\x00" * 10, None, AudioFormat.PCM16) is AudioFormat.PCM16
    assert detect_format(framed, AudioFormat.PCM16, AudioFormat.OPUS) is AudioFormat.PCM16  # declared
    for data, expected in (
        (b"\x00\x00" * 10, None),
        (b"\x01" * 11, AudioFormat.PCM16),
        (b"\x00" * 4, AudioFormat.OPUS),
    ):
        with pytest.raises(ProtocolError) as exc:
            detect_format(data, expected, AudioFormat.OPUS)
        assert exc.value.code is ErrorCode.INVALID_MESSAGE and exc.value.details["field"] == "$.payload"


def make_segmenter(**cfg: int) -> tuple[Segmenter, ManualClock]:
    clock = ManualClock()
    config = SessionConfig(**{"pause_ms": 800, **cfg})
    return Segmenter(config, clock, AudioSpec(AudioFormat.OPUS, 16000)), clock


def seconds_of_opus(s: float) -> bytes:
    return opus.frame([packet(0x48, 60)] * round(s / 0.02))


def test_the_74_client_cadence_is_never_cut_by_the_pause() -> None:
    """One chunk per 2.56 s of audio, arriving a little before or after the previous one ran out."""
    seg, clock = make_segmenter()
    out = []
    for gap in (0.0, 2.45, 2.55, 2.6, 2.5):  # arrival intervals, as recorded (jitter included)
        clock.advance(gap)
        out += seg.chunk(seconds_of_opus(2.56), False)
        out += seg.tick()
    assert out == []
    # the audio received runs until 12.7 s + 2.56 s; the silence after it cuts 0.8 s later
    deadline = seg.next_deadline()
    assert deadline is not None
    clock.advance(deadline - clock.monotonic() - 0.01)
    assert seg.tick() == []
    clock.advance(0.02)
    [utt] = seg.tick()
    assert utt.reason is CutReason.PAUSE and utt.duration_ms == 5 * 2560


def test_the_head_client_cadence_is_never_cut_by_the_pause() -> None:
    seg, clock = make_segmenter()
    for _ in range(40):
        assert seg.chunk(seconds_of_opus(0.26), False) == []
        clock.advance(0.26)
        assert seg.tick() == []


def test_no_pause_cut_while_the_client_plays_speech() -> None:
    seg, clock = make_segmenter(tts_guard_max_ms=5000)
    seg.chunk(seconds_of_opus(0.2), False)
    seg.tts_started()
    clock.advance(3.0)
    assert seg.tick() == [] and seg.tts_playing
    seg.tts_ended()
    clock.advance(0.79)
    assert seg.tick() == []  # the silence counts from the end of the playback
    clock.advance(0.02)
    assert [u.reason for u in seg.tick()] == [CutReason.PAUSE]
    # a client that never reports the end: the guard gives up after tts_guard_max_ms
    seg.chunk(seconds_of_opus(0.2), False)
    seg.tts_started()
    clock.advance(5.0 + 0.81)
    assert [u.reason for u in seg.tick()] == [CutReason.PAUSE]


def test_a_session_is_locked_to_the_format_of_its_first_audio() -> None:
    seg, _ = make_segmenter()
    assert seg.audio_format is None
    seg.chunk(seconds_of_opus(0.1), False)
    assert seg.audio_format is AudioFormat.OPUS
    with pytest.raises(ProtocolError):
        seg.chunk(b"\x01\x02" * 50, False)  # not Opus: refused, nothing changes
    assert seg.buffered_bytes == len(seconds_of_opus(0.1))


def test_groups_follow_the_playback_window() -> None:
    """The window runs on the monotonic clock; the wall clock only names a new group."""
    groups = GroupTracker("s-1", window_ms=2000)
    g0, p0 = groups.part(1000, 1_796_000_000_000)
    assert g0 == "group_s-1_1796000000000" and p0 == 0
    assert groups.part(2500, 1_700_000_000_000) == (g0, 1)  # a wall-clock step back changes nothing
    assert groups.playback_ended(g0, 4000)
    assert not groups.playback_ended("group_other", 4000)
    assert groups.part(5900) == (g0, 2)  # within the window of the playback's end
    g1, p1 = groups.part(8000)
    assert g1 != g0 and p1 == 0


def test_binary_frames_round_trip_and_refuse_garbage() -> None:
    data = encode_audio_frame("s-ABC", 7, 123, False, b"\x08\x00\x48" + b"x" * 8)
    assert is_binary_frame(data) and not is_binary_frame(b'{"type":"x"}')
    frame = decode_binary_frame(data)
    assert (frame.session_id, frame.seq, frame.timestamp, frame.is_final, frame.audio[:3]) == (
        "s-ABC",
        7,
        123,
        False,
        b"\x08\x00\x48",
    )
    final = decode_binary_frame(encode_final_frame("s-ABC", 8, 124))
    assert final.is_final and final.audio == b""
    for bad in (
        b"\x01\x05",
        b"\x01\x09" + bytes(10) + b"s",
        b"\x02\x02" + bytes(8) + b"\xff\xfe",
        b"\x03" * 12,
    ):
        with pytest.raises(ProtocolError) as exc:
            decode_binary_frame(bad)
        assert exc.value.code is ErrorCode.INVALID_MESSAGE
