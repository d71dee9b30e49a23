"""Rooms: who is in which multi-party conversation, and what each room request decides.

Owns the room state of one authority (the instance that holds a room): rooms by code, members in join
order with their language and raw-voice preferences, the session -> room binding (a session is in at
most one room), the time of the room's last activity and its expiry. Every operation returns what it
decided as data: the messages to send and to whom (``Notice``), the room it opened and the rooms it
closed (whose codes the caller releases from the cluster-wide registry). Built on it:

- ``snapshot`` / ``fanout_plan``: a speaker's room as data, and (pure, run by the engine) the
  fan-out of one utterance from it, one target-language group per distinct ``preferred_lang``
  among the other members, each with its recipients, and the group whose result the speaker gets;
  ``recipients`` re-reads a group's recipients at delivery time (a member that left is dropped);
- ``relay``: whether a ``webrtc_*`` message is delivered (rewritten with ``to`` naming the sender),
  declined by the receiver's raw-voice preference, or refused, each refusal a ``room_error`` for the
  sender; ``RelayLimiter`` is the per-connection rate of relays;
- ``turn_credentials``: TURN credentials of the shared-secret kind coturn's ``use-auth-secret`` checks.

Codes are ``rooms.code_length`` digits from the injected CSPRNG (``core/randomness.py``), unique among
this authority's live rooms and, through the injected ``code_taken`` check, the cluster's; a caller that
claims codes asynchronously proposes one (``propose_code``) and passes it to ``create``.

Must never: do I/O, read the wall clock (the injected ``Clock`` stamps ``joined_at`` and credential
expiries; expiry runs on its monotonic time), leave a member in a room after it left or its connection
closed, or keep a room without members.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum

from lingua_scheduler.clock import Clock
from lingua_scheduler.config import RoomsConfig
from lingua_scheduler.core.languages import AUTO, normalize
from lingua_scheduler.core.randomness import SYSTEM_RANDOMNESS, Randomness, digits, uuid4
from lingua_scheduler.core.rate_limit import TokenBucket
from lingua_scheduler.errors import ErrorCode
from lingua_scheduler.protocol.session import (
    IceServer,
    RoomCreateAck,
    RoomError,
    RoomExpired,
    RoomMember,
    RoomMembers,
    WebRtcAnswer,
    WebRtcAnswerRelayed,
    WebRtcIce,
    WebRtcIceRelayed,
    WebRtcOffer,
    WebRtcOfferRelayed,
)

#: fresh codes drawn before giving up on creating a room (each collides with probability live/10^n)
CODE_ATTEMPTS = 32

RoomMessage = (
    RoomCreateAck
    | RoomMembers
    | RoomError
    | RoomExpired
    | WebRtcOfferRelayed
    | WebRtcAnswerRelayed
    | WebRtcIceRelayed
)
RelayMessage = WebRtcOffer | WebRtcAnswer | WebRtcIce


def _never_taken(code: str) -> bool:
    return False


@dataclass(slots=True)
class Member:
    session_id: str
    display_name: str | None
    preferred_lang: str
    joined_at_ms: int
    #: other member -> whether this member receives its voice (absent: it does)
    raw_voice: dict[str, bool] = field(default_factory=dict)

    def receives_voice_of(self, sender: str) -> bool:
        return self.raw_voice.get(sender, True)


@dataclass(slots=True)
class Room:
    code: str
    room_id: str
    #: by session id, in join order
    members: dict[str, Member]
    created_at: float
    #: monotonic time of the last speech (or creation, or join): the room expires from here
    last_activity: float


@dataclass(frozen=True, slots=True)
class Notice:
    """One message for one session."""

    to: str
    message: RoomMessage


@dataclass(slots=True)
class RoomChange:
    """What a room operation decided. ``error`` is set when the request was refused (its
    ``room_error`` is the one notice, for the requester) and nothing changed."""

    notices: list[Notice] = field(default_factory=list)
    #: the room created (its code is now live: claimed)
    opened: Room | None = None
    #: rooms that ended (their codes are free again)
    closed: list[Room] = field(default_factory=list)
    error: ErrorCode | None = None


@dataclass(frozen=True, slots=True)
class TargetGroup:
    """One job of an utterance: its target language and the members who get its result."""

    tgt_lang: str
    #: the other members who receive this job's result, in join order (the speaker is not listed)
    recipients: tuple[str, ...]
    #: the target is the source language: the members need the transcript, not a translation
    same_language: bool


@dataclass(frozen=True, slots=True)
class FanoutPlan:
    """The jobs of one utterance and who receives each result."""

    speaker: str
    #: the speaker's room when the plan was made (None: not in a room)
    room_id: str | None
    room_code: str | None
    groups: tuple[TargetGroup, ...]
    #: the group whose result the speaker receives as its own (exactly one)
    speaker_group: int
    #: that group's language is not the speaker's target: the speaker's copy is for its transcript
    #: (``text_asr``), the translation and speech in it are meant for the others
    speaker_transcript_only: bool


@dataclass(frozen=True, slots=True)
class RoomSnapshot:
    """A speaker's room at the moment its utterance was cut, as the engine receives it with the
    utterance: the other members and their languages (the speaker is never listed)."""

    speaker: str
    room_id: str
    room_code: str
    #: (session id, preferred_lang) of the other members, in join order (never empty)
    others: tuple[tuple[str, str], ...]


def fanout_plan(room: RoomSnapshot, *, src_lang: str, tgt_lang: str) -> FanoutPlan:
    """The jobs of an utterance of ``room.speaker`` (its session's ``src_lang`` -> ``tgt_lang``): one
    per distinct ``preferred_lang`` among the other members, in the order the languages joined. The
    speaker receives one result: the group of its own target language if there is one, else the first
    group (for the transcript)."""
    src, tgt = normalize(src_lang), normalize(tgt_lang)
    langs: dict[str, list[str]] = {}
    for member, lang in room.others:
        langs.setdefault(lang, []).append(member)
    groups = tuple(
        TargetGroup(tgt_lang=lang, recipients=tuple(members), same_language=lang == src and src != AUTO)
        for lang, members in langs.items()
    )
    own = next((i for i, g in enumerate(groups) if g.tgt_lang == tgt), None)
    return FanoutPlan(
        speaker=room.speaker,
        room_id=room.room_id,
        room_code=room.room_code,
        groups=groups,
        speaker_group=own if own is not None else 0,
        speaker_transcript_only=own is None,
    )


class RelayOutcome(StrEnum):
    DELIVER = "deliver"
    #: the receiver declined the sender's voice: not delivered, the sender is told
    DECLINED = "declined"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class RelayDecision:
    """DELIVER: ``notice`` is the rewritten message for the receiver; otherwise it is the
    ``room_error`` for the sender (``error`` its code)."""

    outcome: RelayOutcome
    notice: Notice
    error: ErrorCode | None = None


class RelayLimiter:
    """The relay rate of one connection (``rooms.relay_messages_per_second``, ``relay_burst``)."""

    __slots__ = ("_bucket", "_clock")

    def __init__(self, config: RoomsConfig, clock: Clock) -> None:
        self._clock = clock
        self._bucket = TokenBucket(config.relay_messages_per_second, config.relay_burst, clock.monotonic())

    def allow(self) -> bool:
        return self._bucket.take(self._clock.monotonic())


def turn_credentials(secret: str, participant: str, expires_at_s: int) -> tuple[str, str]:
    """The TURN user name and password of ``participant`` valid until ``expires_at_s`` (unix seconds),
    as a TURN server sharing ``secret`` checks them (coturn ``use-auth-secret``): the user name is
    ``<expiry>:<participant>``, the password the base64 of HMAC-SHA1(secret, user name)."""
    username = f"{expires_at_s}:{participant}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


class Rooms:
    """The rooms of one authority (see the module docstring)."""

    __slots__ = ("_by_session", "_clock", "_code_taken", "_rng", "_rooms", "config")

    def __init__(
        self,
        config: RoomsConfig,
        clock: Clock,
        rng: Randomness = SYSTEM_RANDOMNESS,
        code_taken: Callable[[str], bool] = _never_taken,
    ) -> None:
        self.config = config
        self._clock = clock
        self._rng = rng
        #: a code live elsewhere in the cluster (this authority's own rooms are checked here)
        self._code_taken = code_taken
        self._rooms: dict[str, Room] = {}
        self._by_session: dict[str, str] = {}

    # --- reading -----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._rooms)

    def __iter__(self) -> Iterator[Room]:
        return iter(list(self._rooms.values()))

    def get(self, code: str) -> Room | None:
        return self._rooms.get(code)

    @property
    def member_count(self) -> int:
        """Members of all rooms (O(1))."""
        return len(self._by_session)

    def room_of(self, session_id: str) -> Room | None:
        code = self._by_session.get(session_id)
        return self._rooms[code] if code is not None else None

    def valid_code(self, code: str) -> bool:
        """The code is of the rooms' format: exactly ``code_length`` ASCII digits."""
        return len(code) == self.config.code_length and code.isascii() and code.isdigit()

    def propose_code(self) -> str | None:
        """A fresh code free here and (by ``code_taken``) in the cluster; None when none was found."""
        for _ in range(CODE_ATTEMPTS):
            code = digits(self._rng, self.config.code_length)
            if code not in self._rooms and not self._code_taken(code):
                return code
        return None

    # --- membership --------------------------------------------------------------------------------

    def create(
        self,
        session_id: str,
        *,
        preferred_lang: str,
        display_name: str | None = None,
        code: str | None = None,
    ) -> RoomChange:
        """Create a room with ``session_id`` as its first member. ``preferred_lang``: the language the
        member asked for, or its session's target language when it named none. ``code``: one the
        caller claimed already (``propose_code``); drawn here otherwise."""
        if session_id in self._by_session:
            return self._refuse(
                session_id,
                ErrorCode.ALREADY_IN_ROOM,
                "this session is in a room already: leave it first",
                self._by_session[session_id],
            )
        if code is not None and (not self.valid_code(code) or code in self._rooms):
            return self._refuse(session_id, ErrorCode.INTERNAL_ERROR, "the proposed room code is not free")
        code = code if code is not None else self.propose_code()
        if code is None:
            return self._refuse(
                session_id, ErrorCode.INTERNAL_ERROR, "no free room code was found, try again"
            )
        now = self._clock.monotonic()
        room = Room(code=code, room_id=uuid4(self._rng), members={}, created_at=now, last_activity=now)
        self._rooms[code] = room
        self._add(room, session_id, display_name, preferred_lang)
        servers, expires = self._ice(session_id)
        ack = RoomCreateAck(
            room_code=code, room_id=room.room_id, ice_servers=servers, ice_expires_at_ms=expires
        )
        change = RoomChange(notices=[Notice(session_id, ack)], opened=room)
        change.notices += self._members_notices(room)
        return change

    def join(
        self,
        session_id: str,
        room_code: str,
        *,
        preferred_lang: str,
        display_name: str | None = None,
    ) -> RoomChange:
        """Join the room of ``room_code``; every member (the joiner too) gets ``room_members``."""
        if not self.valid_code(room_code):
            return self._refuse(session_id, ErrorCode.INVALID_ROOM_CODE, self._format_reason())
        if session_id in self._by_session:
            return self._refuse(
                session_id,
                ErrorCode.ALREADY_IN_ROOM,
                "this session is in a room already: leave it first",
                self._by_session[session_id],
            )
        room = self._rooms.get(room_code)
        if room is None:
            return self._refuse(session_id, ErrorCode.ROOM_NOT_FOUND, "no room has this code", room_code)
        if len(room.members) >= self.config.max_members:
            return self._refuse(
                session_id,
                ErrorCode.ROOM_FULL,
                f"the room holds its maximum of {self.config.max_members} members",
                room_code,
            )
        self._add(room, session_id, display_name, preferred_lang)
        room.last_activity = self._clock.monotonic()
        return RoomChange(notices=self._members_notices(room))

    def leave(self, session_id: str, room_code: str) -> RoomChange:
        """Leave the room; the remaining members get ``room_members``."""
        refused = self._check_member(session_id, room_code)
        if refused is not None:
            return refused
        return self._remove(session_id)

    def disconnect(self, session_id: str) -> RoomChange:
        """The session's connection closed or the session ended: it leaves its room, if it is in one
        (the others are told: no member stays behind)."""
        if session_id not in self._by_session:
            return RoomChange()
        return self._remove(session_id)

    def set_raw_voice(self, session_id: str, room_code: str, target: str, receive: bool) -> RoomChange:
        """Whether ``session_id`` receives ``target``'s voice; every member gets ``room_members``."""
        refused = self._check_member(session_id, room_code)
        if refused is not None:
            return refused
        room = self._rooms[room_code]
        if target == session_id or target not in room.members:
            return self._refuse(
                session_id,
                ErrorCode.PEER_NOT_IN_ROOM,
                "target_session_id is not another member of the room",
                room_code,
            )
        room.members[session_id].raw_voice[target] = receive
        return RoomChange(notices=self._members_notices(room))

    # --- activity and expiry -----------------------------------------------------------------------

    def spoke(self, session_id: str) -> None:
        """A member spoke: its room's expiry starts again."""
        room = self.room_of(session_id)
        if room is not None:
            room.last_activity = self._clock.monotonic()

    def next_expiry(self) -> float | None:
        """The monotonic time the next room expires at (None: no room)."""
        if not self._rooms:
            return None
        return min(r.last_activity for r in self._rooms.values()) + self.config.expire_after_seconds

    def expire(self) -> RoomChange:
        """Close every room in which nobody spoke for ``expire_after_seconds``; each member gets
        ``room_expired`` and is in no room any more."""
        now = self._clock.monotonic()
        change = RoomChange()
        minutes = self.config.expire_after_seconds / 60
        text = f"nobody spoke in this room for {minutes:g} minutes: the room is closed"
        for room in list(self._rooms.values()):
            if now - room.last_activity < self.config.expire_after_seconds:
                continue
            for member in room.members:
                change.notices.append(Notice(member, RoomExpired(room_code=room.code, message=text)))
                del self._by_session[member]
            room.members.clear()
            del self._rooms[room.code]
            change.closed.append(room)
        return change

    # --- fan-out -----------------------------------------------------------------------------------

    def snapshot(self, speaker: str) -> RoomSnapshot | None:
        """The speaker's room as it is now, for the fan-out of its utterance (None: in no room, or
        alone in it)."""
        room = self.room_of(speaker)
        if room is None:
            return None
        others = tuple(
            (m.session_id, m.preferred_lang) for m in room.members.values() if m.session_id != speaker
        )
        return RoomSnapshot(speaker, room.room_id, room.code, others) if others else None

    def plan(self, speaker: str, *, src_lang: str, tgt_lang: str) -> FanoutPlan:
        """The jobs of an utterance of ``speaker`` (see ``fanout_plan``)."""
        room = self.room_of(speaker)
        snap = self.snapshot(speaker)
        if snap is None:
            tgt = normalize(tgt_lang)
            src = normalize(src_lang)
            return FanoutPlan(
                speaker=speaker,
                room_id=room.room_id if room is not None else None,
                room_code=room.code if room is not None else None,
                groups=(TargetGroup(tgt_lang=tgt, recipients=(), same_language=tgt == src and src != AUTO),),
                speaker_group=0,
                speaker_transcript_only=False,
            )
        return fanout_plan(snap, src_lang=src_lang, tgt_lang=tgt_lang)

    def recipients(self, plan: FanoutPlan, group: int) -> tuple[str, ...]:
        """Who receives group ``group``'s result (or its ``missing_result``) now: the speaker for its
        group (whatever room it is in now), then the group's members still in the planned room."""
        room = self._rooms.get(plan.room_code) if plan.room_code is not None else None
        still = room.members if room is not None and room.room_id == plan.room_id else {}
        others = tuple(r for r in plan.groups[group].recipients if r in still)
        return (plan.speaker, *others) if group == plan.speaker_group else others

    # --- WebRTC signalling relay -------------------------------------------------------------------

    def relay(self, sender: str, msg: RelayMessage, limiter: RelayLimiter) -> RelayDecision:
        """Deliver, decline or refuse one ``webrtc_*`` message of ``sender`` (see the module docstring)."""
        code = msg.room_code
        if not limiter.allow():
            return self._relay_refused(
                sender,
                ErrorCode.RATE_LIMITED,
                f"more than {self.config.relay_messages_per_second:g} relays per second "
                f"(rooms.relay_messages_per_second): this one was not delivered",
                code,
            )
        if isinstance(msg, WebRtcIce):
            size, limit, what = len(msg.candidate), self.config.max_candidate_bytes, "candidate"
        else:
            size, limit, what = len(msg.sdp), self.config.max_sdp_bytes, "sdp"
        if size > limit:
            return self._relay_refused(
                sender,
                ErrorCode.MESSAGE_TOO_LARGE,
                f"{what} of {size} bytes is over the limit of {limit}",
                code,
            )
        refused = self._check_member(sender, code)
        if refused is not None:
            notice = refused.notices[0]
            return RelayDecision(RelayOutcome.REFUSED, notice, refused.error)
        room = self._rooms[code]
        receiver = room.members.get(msg.to) if msg.to != sender else None
        if receiver is None:
            return self._relay_refused(
                sender,
                ErrorCode.PEER_NOT_IN_ROOM,
                "`to` is not another member of the room: not delivered",
                code,
            )
        if not receiver.receives_voice_of(sender):
            error = RoomError(
                code=ErrorCode.RAW_VOICE_DECLINED.value,
                message="the receiver declined this member's voice: not delivered",
                room_code=code,
            )
            return RelayDecision(RelayOutcome.DECLINED, Notice(sender, error), ErrorCode.RAW_VOICE_DECLINED)
        relayed: RoomMessage
        if isinstance(msg, WebRtcOffer):
            relayed = WebRtcOfferRelayed(room_code=code, to=sender, sdp=msg.sdp)
        elif isinstance(msg, WebRtcAnswer):
            relayed = WebRtcAnswerRelayed(room_code=code, to=sender, sdp=msg.sdp)
        else:
            relayed = WebRtcIceRelayed(room_code=code, to=sender, candidate=msg.candidate)
        return RelayDecision(RelayOutcome.DELIVER, Notice(msg.to, relayed))

    # --- internals ---------------------------------------------------------------------------------

    def _format_reason(self) -> str:
        return f"a room code is exactly {self.config.code_length} digits"

    def _check_member(self, session_id: str, room_code: str) -> RoomChange | None:
        """The refusal when ``session_id`` is not a member of the room of ``room_code``."""
        if not self.valid_code(room_code):
            return self._refuse(session_id, ErrorCode.INVALID_ROOM_CODE, self._format_reason())
        if self._by_session.get(session_id) == room_code:
            return None
        if room_code not in self._rooms:
            return self._refuse(session_id, ErrorCode.ROOM_NOT_FOUND, "no room has this code", room_code)
        return self._refuse(session_id, ErrorCode.NOT_IN_ROOM, "this session is not in this room", room_code)

    def _refuse(
        self, session_id: str, code: ErrorCode, message: str, room_code: str | None = None
    ) -> RoomChange:
        error = RoomError(code=code.value, message=message, room_code=room_code)
        return RoomChange(notices=[Notice(session_id, error)], error=code)

    def _relay_refused(self, sender: str, code: ErrorCode, message: str, room_code: str) -> RelayDecision:
        error = RoomError(
            code=code.value, message=message, room_code=room_code if self.valid_code(room_code) else None
        )
        return RelayDecision(RelayOutcome.REFUSED, Notice(sender, error), code)

    def _add(self, room: Room, session_id: str, display_name: str | None, preferred_lang: str) -> None:
        room.members[session_id] = Member(
            session_id=session_id,
            display_name=display_name,
            preferred_lang=normalize(preferred_lang),
            joined_at_ms=self._clock.wall_ms(),
        )
        self._by_session[session_id] = room.code

    def _remove(self, session_id: str) -> RoomChange:
        code = self._by_session.pop(session_id)
        room = self._rooms[code]
        del room.members[session_id]
        for member in room.members.values():
            member.raw_voice.pop(session_id, None)  # a member that comes back starts from the default
        if not room.members:
            del self._rooms[code]
            return RoomChange(closed=[room])
        return RoomChange(notices=self._members_notices(room))

    def _members_notices(self, room: Room) -> list[Notice]:
        members = [
            RoomMember(
                participant_id=m.session_id,
                session_id=m.session_id,
                display_name=m.display_name,
                preferred_lang=m.preferred_lang,
                raw_voice_preferences=dict(m.raw_voice),
                joined_at=m.joined_at_ms,
            )
            for m in room.members.values()
        ]
        notices = []
        for to in room.members:
            servers, expires = self._ice(to)
            notices.append(
                Notice(
                    to,
                    RoomMembers(
                        room_code=room.code, members=members, ice_servers=servers, ice_expires_at_ms=expires
                    ),
                )
            )
        return notices

    def _ice(self, session_id: str) -> tuple[list[IceServer] | None, int | None]:
        """The ICE servers for ``session_id`` and when its TURN credentials expire (ms)."""
        cfg = self.config
        servers: list[IceServer] = []
        if cfg.stun_urls:
            servers.append(IceServer(urls=list(cfg.stun_urls)))
        expires_ms: int | None = None
        if cfg.turn_urls and cfg.turn_secret:
            expires_s = self._clock.wall_ms() // 1000 + cfg.turn_credential_ttl_seconds
            username, password = turn_credentials(cfg.turn_secret, session_id, expires_s)
            servers.append(IceServer(urls=list(cfg.turn_urls), username=username, credential=password))
            expires_ms = expires_s * 1000
        return (servers or None), expires_ms
