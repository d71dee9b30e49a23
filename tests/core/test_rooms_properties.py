"""Room membership under any order of create, join, leave, disconnect, preference, speech and expiry
(a hypothesis state machine against a plain model): after every step every member of a changed room is
told the new member list exactly once, nobody else is told, a refused request tells only its sender,
no session is a ghost (bound to a room it is not in, or in two), and no room is left without members."""

from __future__ import annotations

from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from lingua_scheduler.clock import ManualClock
from lingua_scheduler.config import RoomsConfig
from lingua_scheduler.core.rooms import RoomChange, Rooms
from lingua_scheduler.protocol.session import RoomCreateAck, RoomError, RoomExpired, RoomMembers
from tests.core.test_rooms import Seeded

SESSIONS = [f"s-{i}" for i in range(6)]
MAX_MEMBERS = 3
EXPIRE_AFTER = 100.0
session = st.sampled_from(SESSIONS)
#: an index into the live rooms (sorted by code), or past them: a code nobody has
pick = st.integers(0, 4)


class RoomMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock()
        self.rooms = Rooms(
            RoomsConfig(max_members=MAX_MEMBERS, expire_after_seconds=EXPIRE_AFTER), self.clock, Seeded()
        )
        #: the model: code -> members in join order
        self.model: dict[str, list[str]] = {}
        self.activity: dict[str, float] = {}

    # --- helpers ---------------------------------------------------------------------------------

    def _code(self, index: int) -> str:
        codes = sorted(self.model)
        return codes[index] if index < len(codes) else "000000" if "000000" not in self.model else "999999"

    def _room_of(self, sid: str) -> str | None:
        return next((c for c, m in self.model.items() if sid in m), None)

    def _refused(self, change: RoomChange, sender: str) -> None:
        assert change.error is not None
        assert [(n.to, type(n.message)) for n in change.notices] == [(sender, RoomError)]
        assert change.opened is None and change.closed == []

    def _told(self, change: RoomChange, code: str) -> None:
        """Every member of ``code`` got one room_members with the model's list; nobody else got one."""
        lists = [n for n in change.notices if isinstance(n.message, RoomMembers)]
        assert Counter(n.to for n in lists) == Counter(self.model[code])
        for n in lists:
            assert isinstance(n.message, RoomMembers) and n.message.room_code == code
            assert [m.session_id for m in n.message.members] == self.model[code]

    # --- rules -----------------------------------------------------------------------------------

    @rule(sid=session)
    def create(self, sid: str) -> None:
        change = self.rooms.create(sid, preferred_lang="en")
        if self._room_of(sid) is not None:
            return self._refused(change, sid)
        assert change.opened is not None
        code = change.opened.code
        assert code not in self.model
        self.model[code] = [sid]
        self.activity[code] = self.clock.monotonic()
        assert isinstance(change.notices[0].message, RoomCreateAck) and change.notices[0].to == sid
        self._told(change, code)
        return None

    @rule(sid=session, index=pick, lang=st.sampled_from(["en", "zh", "fr"]))
    def join(self, sid: str, index: int, lang: str) -> None:
        code = self._code(index)
        change = self.rooms.join(sid, code, preferred_lang=lang)
        if self._room_of(sid) is not None or code not in self.model or len(self.model[code]) >= MAX_MEMBERS:
            return self._refused(change, sid)
        self.model[code].append(sid)
        self.activity[code] = self.clock.monotonic()
        self._told(change, code)
        return None

    @rule(sid=session, index=pick)
    def leave(self, sid: str, index: int) -> None:
        code = self._code(index)
        change = self.rooms.leave(sid, code)
        if self._room_of(sid) != code:
            return self._refused(change, sid)
        self._removed(change, sid, code)
        return None

    @rule(sid=session)
    def disconnect(self, sid: str) -> None:
        change = self.rooms.disconnect(sid)
        code = self._room_of(sid)
        if code is None:
            assert change.notices == [] and change.closed == []
            return
        self._removed(change, sid, code)

    def _removed(self, change: RoomChange, sid: str, code: str) -> None:
        self.model[code].remove(sid)
        if not self.model[code]:
            del self.model[code]
            assert [r.code for r in change.closed] == [code] and change.notices == []
        else:
            assert change.closed == []
            self._told(change, code)

    @rule(sid=session, other=session, receive=st.booleans())
    def preference(self, sid: str, other: str, receive: bool) -> None:
        target = other
        code = self._room_of(sid)
        change = self.rooms.set_raw_voice(sid, code or "000000", target, receive)
        if code is None or target == sid or target not in self.model[code]:
            return self._refused(change, sid)
        self._told(change, code)
        for n in change.notices:
            assert isinstance(n.message, RoomMembers)
            [me] = [m for m in n.message.members if m.session_id == sid]
            assert me.raw_voice_preferences[target] is receive
        return None

    @rule(sid=session)
    def speak(self, sid: str) -> None:
        self.rooms.spoke(sid)
        code = self._room_of(sid)
        if code is not None:
            self.activity[code] = self.clock.monotonic()

    @rule(seconds=st.sampled_from([1.0, 30.0, 99.0, 100.0]))
    def expire(self, seconds: float) -> None:
        self.clock.advance(seconds)
        change = self.rooms.expire()
        now = self.clock.monotonic()
        due = {c for c, at in self.activity.items() if c in self.model and now - at >= EXPIRE_AFTER}
        assert {r.code for r in change.closed} == due
        told = Counter(
            (n.to, n.message.room_code) for n in change.notices if isinstance(n.message, RoomExpired)
        )
        assert told == Counter((m, c) for c in due for m in self.model[c])
        assert len(change.notices) == sum(told.values())
        for c in due:
            del self.model[c]

    # --- invariants ------------------------------------------------------------------------------

    @invariant()
    def matches_the_model(self) -> None:
        live = {r.code: list(r.members) for r in self.rooms}
        assert live == self.model
        assert all(members for members in live.values())  # no room without members
        for sid in SESSIONS:
            room = self.rooms.room_of(sid)
            expected = self._room_of(sid)
            assert (room.code if room is not None else None) == expected  # no ghost, one room at most
        for room in self.rooms:
            for member in room.members.values():
                assert set(member.raw_voice) <= set(room.members) - {member.session_id}


RoomMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestRoomMembership = RoomMachine.TestCase
