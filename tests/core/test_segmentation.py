"""Segmentation state machine and audio estimates: fed by hand with a ManualClock, no event loop."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lingua_scheduler.clock import ManualClock
from lingua_scheduler.config import SessionConfig
from lingua_scheduler.core import opus
from lingua_scheduler.core.audio import (
    AudioFormat,
    AudioSpec,
    bytes_for_ms,
    duration_ms,
    negotiate,
)
from lingua_scheduler.core.opus import frame
from lingua_scheduler.core.segmentation import (
    TRANSITIONS,
    CutReason,
    IllegalSegmentTransition,
    Segmenter,
    SegState,
    Utterance,
    check_transition,
)
from lingua_scheduler.errors import ConfigError, ErrorCode, ProtocolError, Reason, SessionError

PCM16 = AudioSpec(AudioFormat.PCM16, 16000, declared=True)
OPUS = AudioSpec(AudioFormat.OPUS, 16000, declared=True)


def make(
    clock: ManualClock | None = None, spec: AudioSpec = PCM16, **overrides: int
) -> tuple[Segmenter, ManualClock]:
    clock = clock or ManualClock()
    cfg = SessionConfig(**{"pause_ms": 800, **overrides})
    return Segmenter(cfg, clock, spec), clock


def audio(n: int, fill: int = 1) -> bytes:
    return bytes([fill % 256]) * n


def opus20(packets: int, size: int = 40, fill: int = 1) -> bytes:
    """``packets`` length-prefixed Opus packets of 20 ms (TOC 0x48), ``size`` + 2 bytes each."""
    return frame([bytes([0x48]) + bytes([fill % 256]) * (size - 1)] * packets)


# --- audio estimates --------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "ms"), [(32000, 1000), (16000, 500), (12800, 400), (0, 0)])
def test_pcm16_duration(n: int, ms: int) -> None:
    assert duration_ms(n, "pcm16", 16000) == ms


def test_opus_duration_estimate_is_about_one_second_for_3000_bytes() -> None:
    assert 800 <= duration_ms(3000, "opus", 16000) <= 1200


def test_bytes_for_ms_inverts_duration() -> None:
    assert bytes_for_ms(20_000, "pcm16", 16000) == 640_000
    assert duration_ms(bytes_for_ms(1234, "pcm16", 16000), "pcm16", 16000) == 1234
    assert bytes_for_ms(3, "pcm16", 16000) % 2 == 0  # whole samples only


def test_negotiation_grants_supported_and_falls_back() -> None:
    cfg = SessionConfig()
    assert negotiate("opus", 48000, cfg) == AudioSpec(AudioFormat.OPUS, 48000, declared=True)
    # the default is what the reference web client sends without declaring it
    assert negotiate(None, None, cfg) == AudioSpec(AudioFormat.OPUS, 16000)
    assert negotiate("mp3", 44100, cfg) == AudioSpec(AudioFormat.OPUS, 16000)  # opus has no 44.1k
    assert negotiate("pcm16", 44100, cfg) == AudioSpec(AudioFormat.PCM16, 44100, declared=True)
    assert negotiate("opus", 44100, cfg) == AudioSpec(AudioFormat.OPUS, 16000, declared=True)
    pcm_default = SessionConfig(default_audio_format="pcm16")
    assert negotiate("mp3", 44100, pcm_default) == AudioSpec(AudioFormat.PCM16, 44100)
    with pytest.raises(ConfigError):
        negotiate(None, None, SessionConfig(default_audio_format="mp3"))


# --- the state table ------------------------------------------------------------------------------


@pytest.mark.parametrize("src", list(SegState))
@pytest.mark.parametrize("dst", list(SegState))
def test_transition_table(src: SegState, dst: SegState) -> None:
    if dst in TRANSITIONS[src]:
        check_transition(src, dst)
    else:
        with pytest.raises(IllegalSegmentTransition):
            check_transition(src, dst)


# --- cut rules ------------------------------------------------------------------------------------


def test_is_final_cuts_and_includes_the_chunk() -> None:
    seg, _ = make()
    assert seg.chunk(audio(100, 1), False) == []
    assert seg.state is SegState.COLLECTING
    [utt] = seg.chunk(audio(50, 2), True)
    assert (utt.index, utt.reason, utt.audio) == (0, CutReason.MANUAL_CUT, audio(100, 1) + audio(50, 2))
    assert utt.reason.is_manual_cut and not utt.reason.is_pause_triggered
    assert seg.state is SegState.IDLE and seg.next_index == 1 and seg.next_deadline() is None
    seg.validate()


def test_empty_finalize_does_not_advance_the_index() -> None:
    seg, _ = make()
    assert seg.chunk(b"", True) == []
    assert seg.next_index == 0 and seg.empty_cuts == 1
    [utt] = seg.chunk(audio(10), True)
    assert utt.index == 0
    assert seg.chunk(b"", True) == []
    assert seg.next_index == 1


def test_pause_is_detected_by_tick() -> None:
    seg, clock = make()
    seg.chunk(audio(3200), False)  # 100 ms: the silence starts when it would have finished playing
    deadline = seg.next_deadline()
    assert deadline == pytest.approx(clock.monotonic() + 0.1 + 0.8)
    clock.advance(0.1)
    clock.advance(0.5)
    assert seg.tick() == []
    clock.advance(0.3)
    [utt] = seg.tick()
    assert utt.reason is CutReason.PAUSE and utt.reason.is_pause_triggered
    assert seg.tick() == [] and seg.next_deadline() is None


def test_each_chunk_pushes_the_pause_deadline_but_an_empty_one_does_not() -> None:
    seg, clock = make()
    seg.chunk(audio(10), False)
    clock.advance(0.6)
    seg.chunk(audio(10), False)
    clock.advance(0.6)
    assert seg.tick() == []  # 1.2 s since the first chunk, 0.6 s since the last
    seg.chunk(b"", False)
    clock.advance(0.2 + 0.001)  # and the last chunk's 0.3 ms of audio
    [utt] = seg.tick()
    assert utt.size == 20


def test_late_chunk_after_a_pause_starts_the_next_utterance() -> None:
    seg, clock = make()
    seg.chunk(audio(100, 1), False)
    clock.advance(2.0)  # the shell's timer was late: no tick happened
    [first] = seg.chunk(audio(30, 2), False)
    assert (first.index, first.reason, first.audio) == (0, CutReason.PAUSE, audio(100, 1))
    assert seg.buffered_bytes == 30  # the late chunk is not cut off on its own
    [second] = seg.chunk(audio(20, 3), True)
    assert (second.index, second.audio) == (1, audio(30, 2) + audio(20, 3))


def test_late_final_chunk_after_a_pause_gives_two_utterances() -> None:
    seg, clock = make()
    seg.chunk(audio(100, 1), False)
    clock.advance(1.0)
    first, second = seg.chunk(audio(30, 2), True)
    assert (first.reason, second.reason) == (CutReason.PAUSE, CutReason.MANUAL_CUT)
    assert second.audio == audio(30, 2)


def test_max_duration_cuts_when_reached() -> None:
    seg, _ = make(max_duration_ms=1000)  # pcm16 16 kHz: 32000 bytes
    assert seg.limit_bytes == 32000
    assert seg.chunk(audio(16000), False) == []
    [utt] = seg.chunk(audio(16000), False)
    assert utt.reason is CutReason.MAX_DURATION and utt.duration_ms == 1000
    assert utt.reason.is_timeout_triggered
    assert seg.buffered_bytes == 0


def test_max_duration_with_opus_is_read_from_the_packets() -> None:
    seg, _ = make(spec=OPUS, max_duration_ms=2000)
    assert seg.chunk(opus20(60), False) == []  # 1.2 s, whatever its size
    [utt] = seg.chunk(opus20(60), False)  # would overflow: the earlier audio is cut first
    assert utt.duration_ms == 1200 and utt.reason is CutReason.MAX_DURATION
    assert utt.audio_format == "opus"
    assert seg.buffered_bytes == len(opus20(60))
    # 3 s in one chunk: the 1.2 s buffered is cut, then the chunk is split between packets at 2 s
    first, second = seg.chunk(opus20(150, size=10), False)
    assert (first.duration_ms, second.duration_ms) == (1200, 2000)
    assert second.reason is CutReason.MAX_DURATION and second.size == 100 * 12
    assert seg.buffered_bytes == 50 * 12
    seg.validate()


def test_max_bytes_cuts_before_overflowing() -> None:
    seg, _ = make(max_utterance_bytes=1000)
    seg.chunk(audio(600, 1), False)
    [utt] = seg.chunk(audio(600, 2), False)
    assert (utt.reason, utt.audio) == (CutReason.MAX_BYTES, audio(600, 1))
    assert seg.buffered_bytes == 600


def test_a_chunk_larger_than_the_limit_is_split_not_lost() -> None:
    seg, _ = make(max_utterance_bytes=1000)
    data = bytes(range(256)) * 10  # 2560 bytes
    out = seg.chunk(data, False)
    assert [u.size for u in out] == [1000, 1000]
    assert seg.buffered_bytes == 560
    out += seg.close()
    assert b"".join(u.audio for u in out) == data
    assert [u.index for u in out] == [0, 1, 2]
    assert out[-1].reason is CutReason.CLOSE


def test_session_buffer_bound_caps_the_utterance() -> None:
    seg, _ = make(max_utterance_bytes=5000, max_session_buffer_bytes=2001)
    assert seg.limit_bytes == 2000  # whole pcm16 samples


def test_close_flushes_and_refuses_more_audio() -> None:
    seg, _ = make()
    seg.chunk(audio(10), False)
    [utt] = seg.close()
    assert utt.reason is CutReason.CLOSE and utt.index == 0
    assert seg.state is SegState.CLOSED
    assert seg.close() == [] and seg.tick() == []
    with pytest.raises(SessionError) as exc:
        seg.chunk(audio(10), False)
    assert exc.value.code is ErrorCode.SESSION_CLOSED


def test_close_with_nothing_buffered_yields_nothing() -> None:
    seg, _ = make()
    assert seg.close() == []
    assert seg.next_index == 0


def test_a_silent_session_stays_open() -> None:
    seg, clock = make()
    clock.advance(3600)
    assert seg.tick() == []
    assert seg.state is SegState.IDLE
    [utt] = seg.chunk(audio(10), True)
    assert utt.index == 0


def test_complete_utterances_take_the_next_index() -> None:
    seg, _ = make(max_utterance_bytes=1000)
    seg.chunk(audio(10, 1), False)
    [whole] = seg.utterance(opus20(10, size=48), "opus", 48000)
    assert (whole.index, whole.reason, whole.audio_format, whole.sample_rate) == (
        0,
        CutReason.COMPLETE,
        "opus",
        48000,
    )
    assert seg.buffered_bytes == 10  # the stream in progress is untouched
    [streamed] = seg.chunk(b"", True)
    assert streamed.index == 1 and streamed.audio == audio(10, 1)
    assert seg.utterance(b"", "pcm16", 16000) == []
    assert seg.next_index == 2
    with pytest.raises(ProtocolError) as exc:
        seg.utterance(audio(1001), "pcm16", 16000)
    assert exc.value.code is ErrorCode.MESSAGE_TOO_LARGE


def test_client_timestamp_is_per_utterance() -> None:
    seg, _ = make()
    seg.chunk(audio(10), False, client_ts_ms=100)
    [a] = seg.chunk(audio(10), True, client_ts_ms=200)
    [b] = seg.chunk(audio(10), True, client_ts_ms=300)
    assert (a.first_client_ts_ms, b.first_client_ts_ms) == (100, 300)


def test_utterance_times_and_repr_without_audio() -> None:
    clock = ManualClock(start=50.0)
    seg, _ = make(clock)
    seg.chunk(b"\xab" * 64, False)
    clock.advance(0.25)
    [utt] = seg.chunk(b"\xab" * 64, True)
    assert (utt.started_at, utt.finalized_at) == (50.0, 50.25)
    assert utt.created_wall_ms == clock.wall_ms()
    assert "audio=" not in repr(utt) and "\\xab" not in repr(utt)


def test_explicit_now_overrides_the_clock() -> None:
    seg, clock = make()
    t0 = clock.monotonic()
    seg.chunk(audio(10), False, t0)
    assert seg.tick(t0 + 0.79) == []
    assert len(seg.tick(t0 + 0.801)) == 1  # 0.8 s of silence after its 0.3 ms of audio


# --- property: every byte in exactly one utterance, in order ---------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("chunk"), st.integers(0, 2500), st.booleans(), st.floats(0, 1.5)),
        st.tuples(st.just("tick"), st.just(0), st.just(False), st.floats(0, 1.5)),
        st.tuples(st.just("whole"), st.integers(0, 1200), st.just(False), st.floats(0, 0.5)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops=ops, fmt=st.sampled_from([PCM16, OPUS]), max_bytes=st.integers(1, 3000))
def test_every_byte_lands_in_exactly_one_utterance(
    ops: list[tuple[str, int, bool, float]], fmt: AudioSpec, max_bytes: int
) -> None:
    seg, clock = make(spec=fmt, max_utterance_bytes=max_bytes, max_duration_ms=700)
    streamed: list[bytes] = []
    wholes: list[bytes] = []
    out: list[Utterance] = []
    for i, (op, n, final, dt) in enumerate(ops):
        clock.advance(dt)
        if op == "chunk":
            data = audio(n - n % 2, i) if fmt is PCM16 else opus20(n // 40, size=1 + i % 60, fill=i)
            streamed.append(data)
            out += seg.chunk(data, final)
        elif op == "tick":
            out += seg.tick()
        elif n <= max_bytes:
            data = audio(n - n % 2, 1000 + i)
            if data:
                wholes.append(data)
            out += seg.utterance(data, "pcm16", 16000)
        seg.validate()
        deadline = seg.next_deadline()
        assert (deadline is None) == (seg.state is SegState.IDLE)
    out += seg.close()
    assert [u.index for u in out] == list(range(len(out)))
    assert all(u.size > 0 for u in out)
    # a single Opus packet is the smallest unit and may exceed a tiny byte limit on its own
    assert all(
        u.size <= seg.limit_bytes or (fmt is OPUS and u.size <= 62)
        for u in out
        if u.reason is not CutReason.COMPLETE
    )
    assert b"".join(u.audio for u in out if u.reason is not CutReason.COMPLETE) == b"".join(streamed)
    assert [u.audio for u in out if u.reason is CutReason.COMPLETE] == wholes
    assert seg.state is SegState.CLOSED and seg.buffered_bytes == 0


# --- bounded work per chunk -------------------------------------------------------------------------


def tiny60(packets: int) -> bytes:
    """``packets`` length-prefixed 3-byte Opus packets of 60 ms each (TOC 0x18, SILK NB 60 ms)."""
    return frame([b"\x18\x00\x00"] * packets)


def count_packet_parses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count calls to the real TOC reader that every packet parse goes through."""
    calls = [0]
    real = opus.packet_tenths

    def counting(packet: bytes | memoryview) -> int | None:
        calls[0] += 1
        return real(packet)

    monkeypatch.setattr(opus, "packet_tenths", counting)
    return calls


@pytest.mark.parametrize("n", [500, 2000, 8000])
def test_splitting_a_chunk_of_tiny_packets_parses_each_packet_a_bounded_number_of_times(
    n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 600 ms per utterance: the chunk is cut into n / 10 pieces; re-parsing the rest at each cut
    # would be about n * n / 10 packet reads
    seg, _ = make(spec=OPUS, max_duration_ms=600)
    data = tiny60(n)
    calls = count_packet_parses(monkeypatch)
    out = seg.chunk(data, is_final=True)
    assert b"".join(u.audio for u in out) == data
    assert len(out) == n // 10
    assert calls[0] <= 4 * n  # format check, one parse for the cuts, the duration of each utterance


def test_a_chunk_with_more_packets_than_the_limit_is_refused_without_parsing_it_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seg, _ = make(spec=OPUS, max_chunk_packets=1000)
    seg.chunk(tiny60(10), is_final=False)
    calls = count_packet_parses(monkeypatch)
    with pytest.raises(ProtocolError) as info:
        seg.chunk(tiny60(200_000), is_final=False)
    assert info.value.code is ErrorCode.INVALID_MESSAGE
    assert info.value.reason is Reason.TOO_LARGE
    assert "1000" in info.value.message
    assert calls[0] <= 1000
    assert seg.buffered_bytes == len(tiny60(10))  # the refused chunk changed nothing
    out = seg.chunk(tiny60(1000), is_final=True)  # exactly at the limit is accepted
    assert sum(u.size for u in out) == len(tiny60(10)) + len(tiny60(1000))


def test_an_undeclared_session_refuses_too_many_packets_too() -> None:
    seg, _ = make(spec=AudioSpec(AudioFormat.OPUS, 16000), max_chunk_packets=100)
    with pytest.raises(ProtocolError) as info:
        seg.chunk(tiny60(101), is_final=False)
    assert info.value.reason is Reason.TOO_LARGE
    assert seg.audio_format is None
    with pytest.raises(ProtocolError) as info:
        seg.utterance(tiny60(101), "opus", 16000)
    assert info.value.reason is Reason.TOO_LARGE


# --- property: the pause cut after the last chunk is never delayed by a backlog ---------------------


@settings(max_examples=300, deadline=None)
@given(
    cadence=st.lists(st.tuples(st.integers(1, 150), st.floats(0, 2.0)), min_size=1, max_size=40),
    fmt=st.sampled_from([PCM16, OPUS]),
)
def test_the_pause_cut_comes_pause_ms_after_the_last_chunks_audio_for_any_cadence(
    cadence: list[tuple[int, float]], fmt: AudioSpec
) -> None:
    """Chunks of 20 ms .. 3 s at any cadence, faster or slower than real time: the open utterance is
    cut for the pause no later than ``pause_ms`` after the end of the last chunk's own audio (the
    backlog a faster-than-real-time upload builds up never delays it), and a chunk sent within its
    predecessor's duration plus ``pause_ms`` is never cut off from it by a pause."""
    seg, clock = make(spec=fmt, max_duration_ms=20_000)
    pause = 0.8
    last_seconds = 0.0
    for packets, gap in cadence:
        clock.advance(gap)
        # at the boundary itself (within float error: 35 * 0.02 + 0.8 is 1.5000000000000002) either is right
        pause_cut_expected = gap > last_seconds + pause - 1e-9
        data = audio(packets * 640) if fmt is PCM16 else opus20(packets)
        out = seg.chunk(data, is_final=False)
        if not pause_cut_expected:
            assert all(u.reason is not CutReason.PAUSE for u in out)
        last_seconds = packets * 0.02
    if seg.state is SegState.IDLE:
        # the last chunk filled its utterance to a size limit exactly: cut at once, nothing is left
        # open for a pause to cut
        assert out and out[-1].reason in (CutReason.MAX_DURATION, CutReason.MAX_BYTES)
        assert seg.next_deadline() is None and seg.tick() == []
        return
    deadline = seg.next_deadline()
    assert deadline is not None
    assert deadline <= clock.monotonic() + last_seconds + pause + 1e-9
    clock.advance(last_seconds + pause + 1e-6)
    out = seg.tick()
    assert [u.reason for u in out] == [CutReason.PAUSE]
    assert seg.state is SegState.IDLE
