"""Audio segmentation: one state machine per session that cuts a stream of chunks into utterances.

Owns: the session's open utterance buffer, the utterance index counter, the pause deadline and the cut
rules. Everything that decides where an utterance ends lives in this file:

- ``is_final`` on a chunk cuts after that chunk (manual cut);
- silence of ``pause_ms`` beyond the audio already received cuts (``tick()`` at ``next_deadline()``).
  Audio is timed as if it played from the moment it arrived: a chunk arriving while earlier audio
  would still be playing extends that playback, one arriving after it starts a new one. The silence
  starts where that playback ends, so a client that sends one chunk per 2.56 s of audio (or per
  256 ms) is never cut between chunks, and one that sends faster than real time is not cut either.
  The playback still owed is capped at the duration of the latest chunk, so a client that uploads a
  long recording faster than real time has its last utterance cut ``pause_ms`` after its last chunk's
  audio, not only once the whole recording would have played.
  While the client plays synthesized speech (``tts_started`` .. ``tts_ended``, at most
  ``tts_guard_max_ms``) no pause cut happens; after it, the silence counts from its end. When the
  shell is late and the next chunk arrives after the deadline, the *previous* audio is cut first and
  the new chunk starts the next utterance: a chunk after a pause is never cut off on its own, never
  lost;
- the utterance reaches its size limit: ``max_duration_ms`` of audio or ``max_utterance_bytes``,
  whichever comes first (reason says which). A chunk that would overflow the buffer cuts the audio
  before it; a single chunk larger than the limit is split at the limit (between Opus packets);
- ``close()`` finalizes whatever is buffered;
- a chunk dropped unread (``drop()``: the connection's rate limit) leaves a hole in the open utterance:
  it is never spliced. The next chunk that arrives, the pause deadline or ``close()`` cuts the open
  utterance there, carrying the hole (``Utterance.dropped_chunks`` and the dropped ``seq`` numbers),
  for the shell to refuse; the audio after the hole starts the next utterance. A hole takes an index
  even when nothing was buffered before it (the dropped chunk began that utterance).

The audio format: a session that declared one streams that; one that did not is locked to the format
of its first audio (``core.audio.detect_format``), and every later chunk must be in it. A chunk in no
acceptable format is refused (``ProtocolError``) and changes nothing. Durations are exact for pcm16
and for length-prefixed Opus (from the packets' TOC bytes).

Indices are given when an utterance is finalized: contiguous from ``start_index``; an empty buffer never
produces an utterance nor consumes an index. Whole utterances (the ``utterance`` message) take the
next index too. The buffer never holds more than ``limit_bytes`` (which is also capped by
``max_session_buffer_bytes``), so the per-session bound on buffered audio is a cut, never a drop.

Must never: sleep, start timers, do I/O, create or dispatch jobs, or log audio. It returns finalized
``Utterance`` objects; the shell turns them into jobs. A silent session stays open indefinitely: there
is no idle self-termination here. Time comes from the injected ``Clock`` (or an explicit ``now``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum

from lingua_scheduler.clock import Clock
from lingua_scheduler.config import SessionConfig
from lingua_scheduler.core import opus
from lingua_scheduler.core.audio import (
    AudioFormat,
    AudioSpec,
    audio_duration_ms,
    audio_tenths,
    bytes_for_ms,
    detect_format,
    frame_bytes,
)
from lingua_scheduler.errors import ErrorCode, ProtocolError, Reason, SchedulerError, SessionError

#: ``seq`` numbers of dropped chunks kept per utterance (all are counted)
MAX_HOLE_SEQS = 64


class SegState(StrEnum):
    IDLE = "idle"  # nothing buffered
    COLLECTING = "collecting"  # audio buffered for the next utterance; a pause deadline is armed
    CLOSED = "closed"  # terminal: close() flushed the buffer


#: from-state -> states it may move to (finalizing is instantaneous: COLLECTING -> IDLE)
TRANSITIONS: dict[SegState, frozenset[SegState]] = {
    SegState.IDLE: frozenset({SegState.COLLECTING, SegState.CLOSED}),
    SegState.COLLECTING: frozenset({SegState.IDLE, SegState.CLOSED}),
    SegState.CLOSED: frozenset(),
}


class CutReason(StrEnum):
    MANUAL_CUT = "manual_cut"
    PAUSE = "pause"
    MAX_DURATION = "max_duration"
    MAX_BYTES = "max_bytes"
    CLOSE = "close"
    #: a whole utterance sent by the client in one ``utterance`` message
    COMPLETE = "complete"
    #: cut at a hole: a chunk of it was dropped unread (``Segmenter.drop``)
    HOLE = "hole"

    # The three job_assign trigger flags, derived in one place.
    @property
    def is_manual_cut(self) -> bool:
        return self is CutReason.MANUAL_CUT

    @property
    def is_pause_triggered(self) -> bool:
        return self is CutReason.PAUSE

    @property
    def is_timeout_triggered(self) -> bool:
        return self is CutReason.MAX_DURATION


class IllegalSegmentTransition(SchedulerError):
    """A bug in this module, never a peer's fault: a transition not in ``TRANSITIONS``."""

    def __init__(self, src: SegState, dst: SegState) -> None:
        super().__init__(f"illegal segmentation transition {src} -> {dst}", code=ErrorCode.INTERNAL_ERROR)
        self.src = src
        self.dst = dst


def check_transition(src: SegState, dst: SegState) -> None:
    if dst not in TRANSITIONS[src]:
        raise IllegalSegmentTransition(src, dst)


@dataclass(frozen=True, slots=True)
class Utterance:
    """A finalized utterance. ``audio`` is left out of the repr so it cannot end up in a log line."""

    index: int
    audio: bytes = field(repr=False)
    reason: CutReason
    audio_format: str
    sample_rate: int
    duration_ms: int
    #: monotonic time of the first audio of this utterance
    started_at: float
    #: monotonic time it was finalized
    finalized_at: float
    #: wall-clock time it was finalized (for peers and operators)
    created_wall_ms: int
    #: client timestamp of this utterance's first chunk (reset per utterance, unlike the reference)
    first_client_ts_ms: int | None = None
    #: the index the client gave a whole utterance (``utterance.utterance_index``); None when streamed
    client_index: int | None = None
    #: chunks of it dropped unread (a hole: the shell refuses it), and the first ``MAX_HOLE_SEQS`` of
    #: their ``seq`` numbers (those known)
    dropped_chunks: int = 0
    dropped_seqs: tuple[int, ...] = ()

    @property
    def size(self) -> int:
        return len(self.audio)


class Segmenter:
    """Per-session segmentation. Feed ``chunk``/``utterance``/``tick``/``close``; each returns the
    utterances finalized by that call, in index order. Call ``tick()`` at ``next_deadline()``."""

    def __init__(
        self, config: SessionConfig, clock: Clock, audio: AudioSpec, *, start_index: int = 0
    ) -> None:
        self._clock = clock
        self._config = config
        self._spec = audio
        self._pause = config.pause_ms / 1000.0
        self._tts_guard = config.tts_guard_max_ms / 1000.0
        #: the format streamed audio must be in: the declared one, else the first audio's (None: not yet)
        self._format: AudioFormat | None = audio.audio_format if audio.declared else None
        self._limit = 0
        self._limit_tenths: int | None = None
        self._limit_reason = CutReason.MAX_BYTES
        self._set_limits(audio.audio_format)
        self._max_complete = min(config.max_utterance_bytes, config.max_session_buffer_bytes)
        self._max_packets = config.max_chunk_packets
        self._state = SegState.IDLE
        self._next_index = start_index
        self._parts: list[bytes] = []
        self._size = 0
        self._tenths = 0
        self._started_at = 0.0
        #: when the audio received so far would end if played from its arrival
        self._covered_until = float("-inf")
        #: when the client said it started playing synthesized speech (None: not playing)
        self._tts_since: float | None = None
        self._tts_ended_at = float("-inf")
        self._client_ts: int | None = None
        #: is_final (or an empty utterance) that found nothing to finalize; the index did not move
        self.empty_cuts = 0
        #: the open utterance's hole: chunks dropped unread, their known seqs, when the first was
        self._hole_chunks = 0
        self._hole_seqs: list[int] = []
        self._hole_at = 0.0

    def _set_limits(self, fmt: AudioFormat) -> None:
        """Size limits of the open utterance for audio in ``fmt``: pcm16 in bytes (its duration is its
        size), Opus in bytes and in duration read from the packets."""
        config = self._config
        by_size = min(config.max_utterance_bytes, config.max_session_buffer_bytes)
        if fmt is AudioFormat.PCM16:
            frame = frame_bytes(fmt)
            by_size -= by_size % frame
            by_duration = bytes_for_ms(config.max_duration_ms, fmt, self._spec.sample_rate)
            if by_duration <= by_size:
                limit, self._limit_reason = by_duration, CutReason.MAX_DURATION
            else:
                limit, self._limit_reason = by_size, CutReason.MAX_BYTES
            self._limit = max(limit, frame)
            self._limit_tenths = None
        else:
            self._limit = max(by_size, 1)
            self._limit_reason = CutReason.MAX_BYTES
            self._limit_tenths = config.max_duration_ms * 10

    # --- inspection -----------------------------------------------------------------------------

    @property
    def state(self) -> SegState:
        return self._state

    @property
    def next_index(self) -> int:
        return self._next_index

    @property
    def buffered_bytes(self) -> int:
        return self._size

    @property
    def limit_bytes(self) -> int:
        return self._limit

    @property
    def audio_format(self) -> AudioFormat | None:
        """The format streamed audio is in (declared, or detected from the first audio); None before."""
        return self._format

    @property
    def tts_playing(self) -> bool:
        return self._tts_since is not None

    @property
    def holed(self) -> bool:
        """The open utterance has a hole (chunks of it were dropped); it is refused when cut."""
        return self._hole_chunks > 0

    def next_deadline(self) -> float | None:
        """Monotonic time at which ``tick()`` will cut the open utterance for silence; None if idle."""
        if self._state is not SegState.COLLECTING:
            # a hole with nothing buffered around it is cut once the stream has been silent as long
            return self._hole_at + self._pause if self._hole_chunks else None
        silence_from = self._covered_until
        if self._tts_since is not None:
            silence_from = max(silence_from, self._tts_since + self._tts_guard)
        else:
            silence_from = max(silence_from, self._tts_ended_at)
        return silence_from + self._pause

    # --- inputs ---------------------------------------------------------------------------------

    def chunk(
        self, data: bytes, is_final: bool, now: float | None = None, *, client_ts_ms: int | None = None
    ) -> list[Utterance]:
        """One ``audio_chunk`` (decoded). An empty non-final chunk changes nothing, not even the pause
        deadline: it carries no audio. Raises ``SessionError(SESSION_CLOSED)`` after ``close()``."""
        now = self._now(now)
        self._require_open()
        if data:
            # Refused before anything changes: a chunk in the wrong format is not audio of this session.
            fmt = detect_format(data, self._format, self._spec.audio_format, self._max_packets)
            if self._format is None:
                self._format = fmt
                self._set_limits(fmt)
        out: list[Utterance] = []
        if self._hole_chunks:  # the stream goes on after a hole: what came before it is not spliced
            out.append(self._cut(CutReason.HOLE, now))
        deadline = self.next_deadline()
        # only a chunk *after* the deadline finds the pause: one arriving at it exactly (a client
        # keeping real time to the millisecond, pause_ms after the last audio) still continues it
        if deadline is not None and now > deadline:
            out.append(self._cut(CutReason.PAUSE, now))
        if data:
            pieces = self._pieces(data)
            tenths = sum(t for _, t in pieces)
            if self._size and (reason := self._over(self._size + len(data), self._tenths + tenths)):
                out.append(self._cut(reason, now))
            # every piece but the last fills an empty utterance: cut after it, for the limit that the
            # rest of the chunk (this piece included) would have passed
            size = len(data)
            for piece, piece_tenths in pieces[:-1]:
                reason = self._over(size, tenths) or self._limit_reason
                self._append(piece, piece_tenths, now, client_ts_ms)
                out.append(self._cut(reason, now))
                size, tenths = size - len(piece), tenths - piece_tenths
            self._append(pieces[-1][0], pieces[-1][1], now, client_ts_ms)
            # A backlog never outlasts the chunk that just came: a client keeping real time sends the
            # next one within this chunk's duration (plus pause_ms of jitter), and one uploading faster
            # than real time gets its last utterance cut pause_ms after its last chunk's audio, not
            # after the whole upload would have played.
            self._covered_until = min(self._covered_until, now + sum(t for _, t in pieces) / 10_000)
        if is_final:
            if self._size:
                out.append(self._cut(CutReason.MANUAL_CUT, now))
            else:
                self.empty_cuts += 1
        elif self._size and (reason := self._full(self._size, self._tenths)):
            out.append(self._cut(reason, now))
        return out

    def drop(self, seq: int | None, now: float | None = None) -> None:
        """A chunk of this stream was dropped unread (``seq`` when known): the open utterance has a
        hole. Nothing is cut yet, so that consecutive dropped chunks make one hole."""
        if self._state is SegState.CLOSED:
            return
        if not self._hole_chunks:
            self._hole_at = self._now(now)
        self._hole_chunks += 1
        if seq is not None and len(self._hole_seqs) < MAX_HOLE_SEQS:
            self._hole_seqs.append(seq)

    def hole_has(self, seq: int) -> bool:
        """Whether the open hole already names ``seq``."""
        return seq in self._hole_seqs

    def tts_started(self, now: float | None = None) -> None:
        """The client started playing synthesized speech: no pause cut until ``tts_ended`` (or until
        ``tts_guard_max_ms`` have passed, for a client that never says it ended)."""
        self._tts_since = self._now(now)

    def tts_ended(self, now: float | None = None) -> None:
        """The client's playback ended: silence counts from now."""
        self._tts_since = None
        self._tts_ended_at = self._now(now)

    def utterance(
        self,
        audio: bytes,
        audio_format: str,
        sample_rate: int,
        now: float | None = None,
        *,
        client_ts_ms: int | None = None,
        client_index: int | None = None,
    ) -> list[Utterance]:
        """A whole utterance (the ``utterance`` message): it takes the next index; the open streaming
        buffer, if any, is untouched and gets its index when it is cut. Empty audio gives nothing.
        Audio over ``max_utterance_bytes`` is refused (``MESSAGE_TOO_LARGE``), not split; pcm16 or Opus
        audio not in its named format is refused (``INVALID_MESSAGE``)."""
        now = self._now(now)
        self._require_open()
        if not audio:
            self.empty_cuts += 1
            return []
        if len(audio) > self._max_complete:
            raise ProtocolError(
                f"utterance audio of {len(audio)} bytes exceeds the limit of {self._max_complete} bytes",
                code=ErrorCode.MESSAGE_TOO_LARGE,
                reason=Reason.TOO_LARGE,
                field="$.audio",
            )
        if audio_format in (AudioFormat.PCM16, AudioFormat.OPUS):
            detect_format(audio, AudioFormat(audio_format), self._spec.audio_format, self._max_packets)
        return [
            self._emit(
                audio, CutReason.COMPLETE, audio_format, sample_rate, now, now, client_ts_ms, client_index
            )
        ]

    def tick(self, now: float | None = None) -> list[Utterance]:
        """Timer check: cuts the open utterance once ``next_deadline()`` has passed. Safe to call any
        time, also after ``close()``."""
        now = self._now(now)
        deadline = self.next_deadline()
        if deadline is not None and now >= deadline:
            return [self._cut(CutReason.HOLE if self._hole_chunks else CutReason.PAUSE, now)]
        return []

    def close(self, now: float | None = None) -> list[Utterance]:
        """Finalize what is buffered (reason ``close``) and refuse further audio. Idempotent."""
        if self._state is SegState.CLOSED:
            return []
        now = self._now(now)
        out = [self._cut(CutReason.CLOSE, now)] if self._size or self._hole_chunks else []
        self._move(SegState.CLOSED)
        return out

    def validate(self) -> None:
        """Raise ``AssertionError`` if an invariant does not hold (tests call it after each step)."""
        problems: list[str] = []
        if self._size != sum(len(p) for p in self._parts):
            problems.append("buffered size differs from the sum of parts")
        if (self._state is SegState.COLLECTING) != (self._size > 0):
            problems.append(f"state {self._state} with {self._size} bytes buffered")
        # one Opus packet is the smallest unit: a single one may exceed a (tiny) byte limit
        if self._size > self._limit and not (self._limit_tenths is not None and len(self._parts) == 1):
            problems.append(f"{self._size} bytes buffered over the limit {self._limit}")
        if self._limit_tenths is not None and self._tenths > self._limit_tenths and len(self._parts) > 1:
            problems.append(f"{self._tenths / 10} ms buffered over the limit {self._limit_tenths / 10}")
        if problems:
            raise AssertionError("; ".join(problems))

    # --- internals ------------------------------------------------------------------------------

    def _now(self, now: float | None) -> float:
        return self._clock.monotonic() if now is None else now

    def _require_open(self) -> None:
        if self._state is SegState.CLOSED:
            raise SessionError(
                "the session is closed; no more audio is accepted", code=ErrorCode.SESSION_CLOSED
            )

    def _move(self, dst: SegState) -> None:
        check_transition(self._state, dst)
        self._state = dst

    def _measure(self, data: bytes) -> int:
        return audio_tenths(data, self._format or self._spec.audio_format, self._spec.sample_rate)

    def _over(self, size: int, tenths: int) -> CutReason | None:
        """The limit that ``size`` bytes / ``tenths`` of audio would exceed, if any."""
        if self._limit_tenths is not None and tenths > self._limit_tenths:
            return CutReason.MAX_DURATION
        return self._limit_reason if size > self._limit else None

    def _full(self, size: int, tenths: int) -> CutReason | None:
        """The limit that ``size`` bytes / ``tenths`` of audio reach, if any."""
        if self._limit_tenths is not None and tenths >= self._limit_tenths:
            return CutReason.MAX_DURATION
        return self._limit_reason if size >= self._limit else None

    def _pieces(self, data: bytes) -> list[tuple[bytes, int]]:
        """``data`` (in the session's format) as consecutive pieces with their durations: each but the
        last is the largest that fits an empty utterance, the last is the rest (one piece when the whole
        fits). Opus is parsed once and cut by packet index, so the work is linear in the packets."""
        if self._limit_tenths is not None:
            found = opus.packets(data, self._max_packets)
            if found:  # the format check made sure it is length-prefixed Opus
                out: list[tuple[bytes, int]] = []
                first, total = 0, sum(t for _, _, t in found)
                while True:
                    start = found[first][0]
                    if found[-1][1] - start <= self._limit and total <= self._limit_tenths:
                        out.append((data[start:], total))  # the rest fits: it is the last piece
                        return out
                    stop = opus.cut_index(found, first, self._limit, self._limit_tenths)
                    if stop == len(found):  # one packet over the limit: the smallest unit, kept whole
                        out.append((data[start:], total))
                        return out
                    piece_tenths = sum(t for _, _, t in found[first:stop])
                    out.append((data[start : found[stop][0]], piece_tenths))
                    first, total = stop, total - piece_tenths
        fmt = self._format or self._spec.audio_format
        rate = self._spec.sample_rate
        cuts = range(0, len(data), self._limit)
        return [(data[i : i + self._limit], audio_tenths(data[i : i + self._limit], fmt, rate)) for i in cuts]

    def _append(self, data: bytes, tenths: int, now: float, client_ts_ms: int | None) -> None:
        if self._state is SegState.IDLE:
            self._move(SegState.COLLECTING)
            self._started_at = now
            self._client_ts = client_ts_ms
        self._parts.append(data)
        self._size += len(data)
        self._tenths += tenths
        # Played from its arrival, or right after the audio still playing when it arrived.
        self._covered_until = max(self._covered_until, now) + tenths / 10_000

    def _cut(self, reason: CutReason, now: float) -> Utterance:
        audio = b"".join(self._parts)
        started_at, client_ts = self._started_at, self._client_ts
        self._parts.clear()
        self._size = 0
        self._tenths = 0
        self._client_ts = None
        if self._state is SegState.COLLECTING:  # a hole alone is cut from IDLE
            self._move(SegState.IDLE)
        else:
            started_at = self._hole_at
        spec = self._spec
        fmt = self._format or spec.audio_format
        utt = self._emit(audio, reason, fmt, spec.sample_rate, started_at, now, client_ts)
        if self._hole_chunks:
            utt = replace(utt, dropped_chunks=self._hole_chunks, dropped_seqs=tuple(self._hole_seqs))
            self._hole_chunks = 0
            self._hole_seqs = []
        return utt

    def _emit(
        self,
        audio: bytes,
        reason: CutReason,
        audio_format: str,
        sample_rate: int,
        started_at: float,
        now: float,
        client_ts: int | None,
        client_index: int | None = None,
    ) -> Utterance:
        utt = Utterance(
            index=self._next_index,
            audio=audio,
            reason=reason,
            audio_format=audio_format,
            sample_rate=sample_rate,
            duration_ms=audio_duration_ms(audio, audio_format, sample_rate),
            started_at=started_at,
            finalized_at=now,
            created_wall_ms=self._clock.wall_ms(),
            first_client_ts_ms=client_ts,
            client_index=client_index,
        )
        self._next_index += 1
        return utt
