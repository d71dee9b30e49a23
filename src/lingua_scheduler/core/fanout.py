"""The fan-out of a room member's utterances, as the engine decides it: which jobs an utterance
gets, which job's progress the speaker sees, and who receives each outcome.

Owns, for every utterance of a room member whose jobs are running, its plan (``core/rooms.py``'s
``FanoutPlan``: one group per distinct ``preferred_lang`` among the other members) and which job
serves which group. The speaker's own session creates the jobs (one per target language, counted by
the tenant limits as any job) and its result queue releases their outcomes in utterance order; at each
release ``deliver`` decides:

- a translation job's result goes to its language group, as the speaker's utterance
  (``speaker_session_id``, the speaker's own ``utterance_index``); the runtime resolves the group to the
  members still in the room when it delivers (a member that left is dropped);
- a group whose language is the speaker's own needs no job: it gets the transcript of the utterance
  (``text_asr``, also as ``text_translated``, no speech) from the job the speaker receives;
- the speaker gets exactly one of the outcomes: its own target language's if a group has it, else
  the first job's, with the translation stripped (the speaker's transcript, once);
- a failed job's ``missing_result`` goes to exactly that job's recipients.

Since the speaker's queue releases in utterance order, every recipient hears a speaker in order; the
price is that a slow group's job holds back the speaker's later results for the other groups too (at
most ``session.result_gap_timeout_ms``, as any result of the session).

Must never: do I/O, hold a plan past the end of its jobs or its speaker (bounded by the speaker's live
utterances), or send one outcome twice to a group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from lingua_scheduler.core.rooms import FanoutPlan, RoomSnapshot, fanout_plan
from lingua_scheduler.protocol.session import MissingReason, MissingResult, TranslationResult

#: a released outcome of a job
Outcome = TranslationResult | MissingResult


@dataclass(slots=True)
class FanoutUtterance:
    plan: FanoutPlan
    #: the speaker's own utterance_index (what the others see)
    client_index: int
    #: the target language of each job, by job id
    jobs: dict[str, str] = field(default_factory=dict)
    #: the job whose outcome the speaker receives (and the same-language groups' transcript)
    speaker_job: str = ""
    #: the speaker's target is no job's: its copy carries the transcript only
    transcript_only: bool = False
    #: jobs whose first job_assign is not written yet
    unassigned: int = 0


@dataclass(frozen=True, slots=True)
class Delivery:
    """What one released outcome becomes: the speaker's copy (None: none) and each group's."""

    speaker: Outcome | None
    #: the utterance's plan (None: no fan-out)
    plan: FanoutPlan | None = None
    #: (group index in the plan, the message as that group's members see it)
    groups: tuple[tuple[int, Outcome], ...] = ()


def targets_of(room: RoomSnapshot, *, src_lang: str, tgt_lang: str) -> tuple[FanoutPlan, list[str]]:
    """The plan of an utterance in ``room`` and its jobs' target languages (one per group that needs
    a translation; the speaker's own target when every group only needs the transcript)."""
    plan = fanout_plan(room, src_lang=src_lang, tgt_lang=tgt_lang)
    langs = [g.tgt_lang for g in plan.groups if not g.same_language] or [tgt_lang]
    return plan, langs


class Fanout:
    __slots__ = ("_by_job", "_by_speaker")

    def __init__(self) -> None:
        self._by_job: dict[str, FanoutUtterance] = {}
        #: speaker -> its jobs with a plan (dropped at its end)
        self._by_speaker: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._by_job)

    def created(
        self,
        plan: FanoutPlan,
        client_index: int,
        jobs: list[tuple[str, str]],
        own_target: str,
        *,
        transcript_only: bool,
    ) -> None:
        """The (target language, job id) pairs created for an utterance planned as ``plan``;
        ``transcript_only``: no job is for the speaker's own target."""
        if not jobs:
            return
        utt = FanoutUtterance(
            plan=plan,
            client_index=client_index,
            jobs={job_id: tgt for tgt, job_id in jobs},
            speaker_job=next((j for t, j in jobs if t == own_target), jobs[0][1]),
            transcript_only=transcript_only,
            unassigned=len(jobs),
        )
        mine = self._by_speaker.setdefault(plan.speaker, set())
        for _, job_id in jobs:
            self._by_job[job_id] = utt
            mine.add(job_id)

    def assigned(self, job_id: str) -> bool:
        """The job's first ``job_assign`` is written; True when it was its utterance's last one."""
        utt = self._by_job.get(job_id)
        if utt is None or utt.unassigned <= 0:
            return False
        utt.unassigned -= 1
        return utt.unassigned == 0

    def speaker_sees(self, job_id: str) -> bool:
        """The speaker's session gets this job's progress (ui events, partials, errors)."""
        utt = self._by_job.get(job_id)
        return utt is None or utt.speaker_job == job_id

    def deliver(self, job_id: str | None, message: Outcome) -> Delivery:
        """A released outcome of a job of the speaker's (``job_id`` None: an utterance without a job)."""
        utt = self._by_job.get(job_id) if job_id is not None else None
        if utt is None or job_id is None:
            return Delivery(message)
        if isinstance(message, TranslationResult) or message.reason is not MissingReason.GAP_TIMEOUT:
            # its outcome is final (a gap_timeout part may still get its late result)
            self._forget(utt.plan.speaker, job_id)
        plan = utt.plan
        tgt = utt.jobs.get(job_id)
        groups: list[tuple[int, Outcome]] = []
        for gi, group in enumerate(plan.groups):
            transcript = group.same_language
            if transcript:
                if job_id != utt.speaker_job:
                    continue
            elif group.tgt_lang != tgt:
                continue
            groups.append((gi, self._for_listener(message, utt, transcript=transcript)))
        if job_id != utt.speaker_job:
            return Delivery(None, plan, tuple(groups))
        own: Outcome = message
        if isinstance(message, TranslationResult):
            if utt.transcript_only:
                own = msgspec.structs.replace(
                    message, text_translated="", tts_audio="", room_code=plan.room_code
                )
            else:
                own = msgspec.structs.replace(message, room_code=plan.room_code)
        return Delivery(own, plan, tuple(groups))

    def _for_listener(self, message: Outcome, utt: FanoutUtterance, *, transcript: bool) -> Outcome:
        """The outcome as another member sees it: the speaker's utterance, by the speaker's number."""
        plan = utt.plan
        if isinstance(message, TranslationResult):
            if transcript:
                return msgspec.structs.replace(
                    message,
                    utterance_index=utt.client_index,
                    speaker_session_id=plan.speaker,
                    room_code=plan.room_code,
                    text_translated=message.text_asr,
                    tts_audio="",
                    audio_lost=False,
                )
            return msgspec.structs.replace(
                message,
                utterance_index=utt.client_index,
                speaker_session_id=plan.speaker,
                room_code=plan.room_code,
                audio_lost=bool(message.text_translated and not message.tts_audio),
            )
        return msgspec.structs.replace(
            message,
            utterance_index=utt.client_index,
            speaker_session_id=plan.speaker,
            room_code=plan.room_code,
        )

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

    def jobs_of(self, speaker: str) -> frozenset[str]:
        return frozenset(self._by_speaker.get(speaker, ()))

    def speakers(self) -> frozenset[str]:
        return frozenset(self._by_speaker)

    def validate(self) -> None:
        """Every job with a plan is listed under its speaker and the reverse; a plan's speaker job is
        one of its jobs."""
        listed = {j for jobs in self._by_speaker.values() for j in jobs}
        assert listed == self._by_job.keys(), "fan-out jobs and speakers' jobs differ"
        for speaker, jobs in self._by_speaker.items():
            assert jobs, f"speaker {speaker} listed without jobs"
            for job_id in jobs:
                utt = self._by_job[job_id]
                assert utt.plan.speaker == speaker, f"job {job_id} listed under another speaker"
                assert utt.speaker_job in utt.jobs, f"job {job_id}'s utterance has no speaker job"
