"""The fan-out of a room member's utterances: which jobs it gets, and who receives each outcome.

Owns, for every utterance of a room member whose jobs are running, its plan (``core/rooms.py``'s
``FanoutPlan``: one group per distinct ``preferred_lang`` among the other members) and which job
serves which group. The speaker's own session creates the jobs (one per target language, counted by
the tenant limits as any job) and its result queue releases their outcomes in utterance order; at each
release this relay decides the recipients:

- a translation job's result goes to the members of its language group that are still in the room
  (re-read at delivery: a member that left is dropped), as the speaker's utterance (``speaker_session_id``,
  the speaker's own ``utterance_index``);
- a group whose language is the speaker's own needs no job: it gets the transcript of the utterance
  (``text_asr``, also as ``text_translated``, no speech) from the job the speaker receives;
- the speaker gets exactly one of the outcomes: its own target language's if a group has it, else
  the first job's, with the translation stripped (the speaker's transcript, once);
- a failed job's ``missing_result`` goes to exactly that job's recipients.

Since the speaker's queue releases in utterance order, every recipient hears a speaker in order; the
price is that a slow group's job holds back the speaker's later results for the other groups too (at
most ``session.result_gap_timeout_ms``, as any result of the session).

Must never: hold a plan past the end of its jobs or its speaker (bounded by the speaker's live
utterances), send one outcome twice to a member, or log text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from lingua_scheduler.core.rooms import FanoutPlan
from lingua_scheduler.protocol.session import MissingResult, TranslationResult
from lingua_scheduler.server.latency import LatencyWindow
from lingua_scheduler.server.room_directory import RoomDirectory


@dataclass(slots=True)
class _Utterance:
    plan: FanoutPlan
    #: the speaker's own utterance_index (what the others see)
    client_index: int
    #: the target language of each job, by job id
    jobs: dict[str, str] = field(default_factory=dict)
    #: the job whose outcome the speaker receives (and the same-language groups' transcript)
    speaker_job: str | None = None
    #: the speaker's target is no job's: its copy carries the transcript only
    transcript_only: bool = False
    #: jobs whose first job_assign is not written yet, and the longest wait of those written
    unassigned: int = 0
    slowest: float = 0.0


#: sends an encoded message, already in its receiver's view, to a member by session id
Send = Callable[[str, bytes], None]


class RoomRelay:
    __slots__ = (
        "_by_job",
        "_by_speaker",
        "_encoder",
        "_pending",
        "_rooms",
        "_send",
        "fanout_jobs",
        "fanout_window",
    )

    def __init__(self, rooms: RoomDirectory, send: Send) -> None:
        self._rooms = rooms
        self._send = send
        #: per fan-out utterance: its arrival to the last of its jobs' job_assign written (seconds)
        self.fanout_window = LatencyWindow(65536)
        self._encoder = msgspec.json.Encoder()
        #: (speaker, index) -> the plan between ``plan`` and ``created``
        self._pending: dict[tuple[str, int], _Utterance] = {}
        self._by_job: dict[str, _Utterance] = {}
        #: speaker -> its jobs with a plan (dropped at its end)
        self._by_speaker: dict[str, set[str]] = {}
        #: jobs created for rooms' utterances since start
        self.fanout_jobs = 0

    def __len__(self) -> int:
        return len(self._by_job)

    def plan(
        self, speaker: str, index: int, client_index: int, src_lang: str, tgt_lang: str
    ) -> list[str] | None:
        """The jobs' target languages of utterance ``index`` of ``speaker``; None when it is in no room
        or alone in its room (its own target, delivered as any utterance)."""
        room = self._rooms.room_of(speaker)
        if room is None:
            return None
        self._rooms.spoke(speaker)  # the room's expiry starts again, alone in it or not
        if len(room.members) < 2:
            return None
        plan = self._rooms.plan(speaker, src_lang=src_lang, tgt_lang=tgt_lang)
        langs = [g.tgt_lang for g in plan.groups if not g.same_language] or [tgt_lang]
        self._pending[(speaker, index)] = _Utterance(
            plan=plan, client_index=client_index, transcript_only=tgt_lang not in langs
        )
        return langs

    def created(self, speaker: str, index: int, jobs: list[tuple[str, str]], own_target: str) -> None:
        utt = self._pending.pop((speaker, index), None)
        if utt is None or not jobs:
            return
        utt.jobs = {job_id: tgt for tgt, job_id in jobs}
        utt.unassigned = len(jobs)
        utt.speaker_job = next((j for t, j in jobs if t == own_target), jobs[0][1])
        self.fanout_jobs += len(jobs)
        mine = self._by_speaker.setdefault(speaker, set())
        for _, job_id in jobs:
            self._by_job[job_id] = utt
            mine.add(job_id)

    def assigned(self, job_id: str, elapsed: float) -> None:
        utt = self._by_job.get(job_id)
        if utt is None or utt.unassigned <= 0:
            return
        utt.slowest = max(utt.slowest, elapsed)
        utt.unassigned -= 1
        if utt.unassigned == 0:
            self.fanout_window.record(utt.slowest)

    def speaker_sees(self, job_id: str) -> bool:
        utt = self._by_job.get(job_id)
        return utt is None or utt.speaker_job == job_id

    def deliver(self, speaker: str, job_id: str | None, message: msgspec.Struct) -> msgspec.Struct | None:
        utt = self._by_job.get(job_id) if job_id is not None else None
        if utt is None or job_id is None:
            return message
        if isinstance(message, TranslationResult) or (
            isinstance(message, MissingResult) and message.reason.value != "gap_timeout"
        ):
            # its outcome is final (a gap_timeout part may still get its late result)
            self._forget(speaker, job_id)
        plan = utt.plan
        tgt = utt.jobs.get(job_id)
        for gi, group in enumerate(plan.groups):
            transcript = group.same_language
            if not (group.tgt_lang == tgt and not transcript) and not (
                transcript and job_id == utt.speaker_job
            ):
                continue
            members = [m for m in self._rooms.recipients(plan, gi) if m != speaker]
            if not members:
                continue
            data = self._encoder.encode(self._for_listener(message, utt, transcript=transcript))
            for member in members:
                self._send(member, data)
        if job_id != utt.speaker_job:
            return None
        if utt.transcript_only and isinstance(message, TranslationResult):
            return msgspec.structs.replace(
                message, text_translated="", tts_audio="", room_code=plan.room_code
            )
        if isinstance(message, TranslationResult):
            return msgspec.structs.replace(message, room_code=plan.room_code)
        return message

    def _for_listener(self, message: msgspec.Struct, utt: _Utterance, *, transcript: bool) -> msgspec.Struct:
        """The outcome as another member sees it: the speaker's utterance, by the speaker's number."""
        plan = utt.plan
        if isinstance(message, TranslationResult):
            changes: dict[str, object] = {
                "utterance_index": utt.client_index,
                "speaker_session_id": plan.speaker,
                "room_code": plan.room_code,
                "audio_lost": bool(message.text_translated and not message.tts_audio),
            }
            if transcript:
                changes.update(text_translated=message.text_asr, tts_audio="", audio_lost=False)
            return msgspec.structs.replace(message, **changes)
        if isinstance(message, MissingResult):
            return msgspec.structs.replace(
                message,
                utterance_index=utt.client_index,
                speaker_session_id=plan.speaker,
                room_code=plan.room_code,
            )
        return message

    def _forget(self, speaker: str, job_id: str) -> None:
        self._by_job.pop(job_id, None)
        mine = self._by_speaker.get(speaker)
        if mine is not None:
            mine.discard(job_id)
            if not mine:
                del self._by_speaker[speaker]

    def speaker_ended(self, speaker: str) -> None:
        for job_id in self._by_speaker.pop(speaker, set()):
            self._by_job.pop(job_id, None)
        for key in [k for k in self._pending if k[0] == speaker]:
            del self._pending[key]
