"""Rooms across instances (multi-instance mode): the rooms' state in Redis, their messages through the
instances' inboxes.

Owns the shared side of the room service (server/room_service.py) when ``cluster.redis_url`` is set:

- the state of every room lives in Redis (``store/room_store.py``, one atomic script per change):
  its members with the instance each is connected to, their languages and raw-voice preferences, its
  last speech; a code is taken cluster-wide by creating its keys only if they do not exist, and the
  member limit holds because a join counts and adds in one step;
- after each change the instance that made it tells every instance holding a member (``RoomState``
  through their inboxes; itself directly); each instance then sends ``room_members`` (with ICE
  servers) to its own members. So every instance keeps a *replica* of the rooms it has members in
  (``ReplicaRooms``: ``core/rooms.py``'s ``Rooms`` holding that state), from which the WebRTC relay
  and the fan-out decide as in embedded mode;
- relayed signalling and fan-out outcomes for a member on another instance go to that instance's
  inbox (``RoomOutput``: already encoded in that client's view), in order;
- expiry: each instance arms a timer from its replica; when it fires the store decides (a member of
  another instance may have spoken since: the store answers how long is left) and the instance that
  ended the room tells the others;
- an instance that dies: the survivors that took it over remove its members from the rooms they
  share with it (the others are told); rooms left with no live instance end with their keys' TTL.

An inbox entry delivered twice (a lost acknowledgement) could show one relayed message twice.

Must never: change a room's shared state except through the store's script, block the loop (store
calls run in tasks; a request's answer waits for its call, later frames of its connection wait in
order), or log names or text.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING

import msgspec

from lingua_scheduler.clock import Clock
from lingua_scheduler.config import RoomsConfig
from lingua_scheduler.core.randomness import SYSTEM_RANDOMNESS, uuid4
from lingua_scheduler.core.rooms import Member, Notice, Room, Rooms
from lingua_scheduler.errors import ErrorCode
from lingua_scheduler.protocol.cluster import InboxMessage, MemberRecord, RoomOutput, RoomState
from lingua_scheduler.protocol.session import (
    RoomCreate,
    RoomCreateAck,
    RoomError,
    RoomExpired,
    RoomJoin,
    RoomLeave,
    RoomRawVoicePreference,
)
from lingua_scheduler.store.base import StoreUnavailable
from lingua_scheduler.store.room_store import RoomStore

if TYPE_CHECKING:
    from lingua_scheduler.server.sessions import Session

log = logging.getLogger(__name__)

#: codes drawn before a create gives up (each is taken with probability live rooms / 10^length)
CREATE_ATTEMPTS = 8
#: a room's keys outlive its last change by this many expiry periods
KEY_TTL_PERIODS = 2

Send = Callable[[str, InboxMessage], None]
ALREADY = "this session is in a room already: leave it first"


class ReplicaRooms(Rooms):
    """The rooms this instance has members in, as the store last said (see the module docstring)."""

    __slots__ = ("_on_spoke", "instance_of")

    def __init__(self, config: RoomsConfig, clock: Clock, on_spoke: Callable[[str], None]) -> None:
        super().__init__(config, clock)
        #: member session id -> the instance it is connected to
        self.instance_of: dict[str, str] = {}
        self._on_spoke = on_spoke

    def install(self, code: str, room_id: str, records: list[MemberRecord]) -> Room:
        """The room's members are now ``records`` (join order)."""
        old = self._rooms.get(code)
        if old is not None:
            for sid in old.members:
                if self._by_session.get(sid) == code:
                    del self._by_session[sid]
                self.instance_of.pop(sid, None)
        now = self._clock.monotonic()
        same = old is not None and old.room_id == room_id
        room = Room(
            code=code,
            room_id=room_id,
            members={},
            created_at=old.created_at if same and old is not None else now,
            last_activity=old.last_activity if same and old is not None else now,
        )
        for r in records:
            room.members[r.session_id] = Member(
                session_id=r.session_id,
                display_name=r.display_name,
                preferred_lang=r.preferred_lang,
                joined_at_ms=r.joined_at,
                raw_voice=dict(r.raw_voice),
            )
            self._by_session[r.session_id] = code
            self.instance_of[r.session_id] = r.instance
        self._rooms[code] = room
        return room

    def drop(self, code: str) -> Room | None:
        room = self._rooms.pop(code, None)
        if room is not None:
            for sid in room.members:
                if self._by_session.get(sid) == code:
                    del self._by_session[sid]
                self.instance_of.pop(sid, None)
        return room

    def spoke(self, session_id: str) -> None:
        super().spoke(session_id)
        room = self.room_of(session_id)
        if room is not None:
            self._on_spoke(room.code)

    def members_notices(self, room: Room) -> list[Notice]:
        return self._members_notices(room)

    def ack_for(self, room: Room, session_id: str) -> RoomCreateAck:
        servers, expires = self._ice(session_id)
        return RoomCreateAck(
            room_code=room.code, room_id=room.room_id, ice_servers=servers, ice_expires_at_ms=expires
        )


class SharedRooms:
    """The shared side of the room service (see the module docstring)."""

    __slots__ = (
        "_clock",
        "_config",
        "_notify",
        "_rearm",
        "_send",
        "_sessions",
        "_store",
        "_tasks",
        "instance_id",
        "rooms",
    )

    def __init__(
        self,
        config: RoomsConfig,
        clock: Clock,
        store: RoomStore,
        instance_id: str,
        sessions: Mapping[str, Session],
        send: Send,
        notify: Callable[[str, msgspec.Struct], None],
        rearm: Callable[[], None],
    ) -> None:
        """``send``: to another instance's inbox; ``notify``: to a member on this instance;
        ``rearm``: the expiry timer, after the replica changed."""
        self._config = config
        self._clock = clock
        self._store = store
        self.instance_id = instance_id
        self._sessions = sessions
        self._send = send
        self._notify = notify
        self._rearm = rearm
        self._tasks: set[asyncio.Task[None]] = set()
        self.rooms = ReplicaRooms(config, clock, self._spoke)

    # --- requests of this instance's sessions -------------------------------------------------------

    def handle(
        self, session: Session, msg: RoomCreate | RoomJoin | RoomLeave | RoomRawVoicePreference
    ) -> Awaitable[None]:
        return self._spawn(self._handle(session, msg))

    async def _handle(
        self, session: Session, msg: RoomCreate | RoomJoin | RoomLeave | RoomRawVoicePreference
    ) -> None:
        sid = session.session_id
        try:
            if isinstance(msg, RoomCreate):
                await self._create(session, msg)
            elif isinstance(msg, RoomJoin):
                await self._join(session, msg)
            elif isinstance(msg, RoomLeave):
                if self._member_of(sid, msg.room_code):
                    await self._leave(sid, msg.room_code)
            elif self._member_of(sid, msg.room_code):
                status, room_id, records = await self._store.set_raw_voice(
                    msg.room_code, sid, msg.target_session_id, msg.receive_raw_voice
                )
                if status == "ok" and room_id is not None:
                    self._publish(msg.room_code, room_id, records)
                else:
                    self._refuse(
                        sid,
                        ErrorCode.PEER_NOT_IN_ROOM,
                        "target_session_id is not another member of the room",
                        msg.room_code,
                    )
        except StoreUnavailable as exc:
            log.warning("room request failed: shared store unreachable", extra={"session_id": sid})
            self._refuse(sid, ErrorCode.INTERNAL_ERROR, f"the shared store did not answer, try again ({exc})")

    def _member_of(self, sid: str, code: str) -> bool:
        """The session is in the room of ``code`` (else it was refused)."""
        rooms = self.rooms
        if not rooms.valid_code(code):
            self._refuse(
                sid, ErrorCode.INVALID_ROOM_CODE, f"a room code is exactly {self._config.code_length} digits"
            )
            return False
        room = rooms.room_of(sid)
        if room is None or room.code != code:
            self._refuse(sid, ErrorCode.NOT_IN_ROOM, "this session is not in this room", code)
            return False
        return True

    async def _create(self, session: Session, msg: RoomCreate) -> None:
        sid = session.session_id
        if self.rooms.room_of(sid) is not None:
            self._refuse(sid, ErrorCode.ALREADY_IN_ROOM, ALREADY)
            return
        record = MemberRecord(
            session_id=sid,
            instance=self.instance_id,
            display_name=msg.display_name,
            preferred_lang=msg.preferred_lang or session.targets[0],
            joined_at=self._clock.wall_ms(),
            seq=1,
        )
        for _ in range(CREATE_ATTEMPTS):
            code = self.rooms.propose_code()
            if code is None:
                break
            room_id = uuid4(SYSTEM_RANDOMNESS)
            if await self._store.create(code, room_id, record):
                if self.rooms.room_of(sid) is not None or sid not in self._sessions:
                    await self._store.leave(code, sid)  # it joined elsewhere or left meanwhile
                    return
                room = self.rooms.install(code, room_id, [record])
                self._notify(sid, self.rooms.ack_for(room, sid))
                self._members(room)
                log.info("room created", extra={"session_id": sid, "room_id": room_id})
                return
        self._refuse(sid, ErrorCode.INTERNAL_ERROR, "no free room code was found, try again")

    async def _join(self, session: Session, msg: RoomJoin) -> None:
        sid, code = session.session_id, msg.room_code
        if not self.rooms.valid_code(code):
            self._refuse(
                sid, ErrorCode.INVALID_ROOM_CODE, f"a room code is exactly {self._config.code_length} digits"
            )
            return
        if self.rooms.room_of(sid) is not None:
            self._refuse(
                sid, ErrorCode.ALREADY_IN_ROOM, "this session is in a room already: leave it first", code
            )
            return
        record = MemberRecord(
            session_id=sid,
            instance=self.instance_id,
            display_name=msg.display_name,
            preferred_lang=msg.preferred_lang or session.targets[0],
        )
        status, room_id, records = await self._store.join(code, record, self._config.max_members)
        if status == "ok" and room_id is not None and sid not in self._sessions:
            await self._leave(sid, code)  # its session ended while the store answered: no ghost
        elif status == "ok" and room_id is not None:
            self._publish(code, room_id, records)
        elif status == "full":
            self._refuse(
                sid,
                ErrorCode.ROOM_FULL,
                f"the room holds its maximum of {self._config.max_members} members",
                code,
            )
        elif status == "already":
            self._refuse(
                sid, ErrorCode.ALREADY_IN_ROOM, "this session is in a room already: leave it first", code
            )
        else:
            self._refuse(sid, ErrorCode.ROOM_NOT_FOUND, "no room has this code", code)

    async def _leave(self, sid: str, code: str) -> None:
        status, room_id, records = await self._store.leave(code, sid)
        if status == "ok" and room_id is not None:
            self._publish(code, room_id, records, also={self.instance_id})
        elif status == "closed":  # it was the last member
            self.rooms.drop(code)
            self._rearm()

    def connection_closed(self, session_id: str) -> None:
        """A member of this instance whose connection closed (or session ended) leaves its room."""
        room = self.rooms.room_of(session_id)
        if room is not None and self.rooms.instance_of.get(session_id) == self.instance_id:
            self._spawn(self._safely(self._leave(session_id, room.code)))

    # --- changes made anywhere ------------------------------------------------------------------------

    def _publish(
        self,
        code: str,
        room_id: str,
        records: list[MemberRecord],
        *,
        closed: bool = False,
        expired: bool = False,
        also: set[str] | None = None,
    ) -> None:
        """Tell every instance holding a member (and ``also``) the room's state; this one at once."""
        state = RoomState(room_code=code, room_id=room_id, members=records, closed=closed, expired=expired)
        instances = {r.instance for r in records} | (also or set())
        for instance in instances - {self.instance_id}:
            self._send(instance, state)
        self.apply(state)

    def apply(self, state: RoomState) -> None:
        """A room's new state (from the inbox, or from this instance): the replica follows, and this
        instance's members are told."""
        mine = [r.session_id for r in state.members if r.instance == self.instance_id]
        if state.closed:
            # told once: the members the replica still holds (an ending seen twice finds none)
            room = self.rooms.get(state.room_code)
            held = room.members if room is not None and room.room_id == state.room_id else {}
            local = [sid for sid in held if self.rooms.instance_of.get(sid) == self.instance_id]
            if held:
                self.rooms.drop(state.room_code)
            if state.expired:
                minutes = self._config.expire_after_seconds / 60
                text = f"nobody spoke in this room for {minutes:g} minutes: the room is closed"
                for sid in local:
                    self._notify(sid, RoomExpired(room_code=state.room_code, message=text))
            self._rearm()
            return
        if not mine:  # no member here any more: nothing to keep
            self.rooms.drop(state.room_code)
            self._rearm()
            return
        room = self.rooms.install(state.room_code, state.room_id, state.members)
        self._members(room)
        self._rearm()

    def output(self, message: RoomOutput) -> None:
        session = self._sessions.get(message.session_id)
        if session is not None:
            session.send_encoded(message.data)

    def send_to(self, to: str, data: bytes) -> bool:
        """An encoded message for a member on another instance: True if it went to that instance."""
        instance = self.rooms.instance_of.get(to)
        if instance is None or instance == self.instance_id:
            return False
        self._send(instance, RoomOutput(session_id=to, data=data))
        return True

    def instance_dead(self, instance: str) -> None:
        """Its members leave the rooms this instance shares with it (the others are told)."""
        for room in list(self.rooms):
            if any(self.rooms.instance_of.get(sid) == instance for sid in room.members):
                self._spawn(self._safely(self._drop(room.code, instance)))

    async def _drop(self, code: str, instance: str) -> None:
        status, room_id, records = await self._store.drop_instance(code, instance)
        if status == "ok" and room_id is not None:
            log.warning("room members of a dead instance removed", extra={"instance": instance})
            self._publish(code, room_id, records)

    # --- expiry ---------------------------------------------------------------------------------------

    def expire_due(self) -> None:
        """The timer fired: the store decides for each room whose replica says it is due."""
        now = self._clock.monotonic()
        for room in list(self.rooms):
            if now - room.last_activity >= self._config.expire_after_seconds:
                room.last_activity = now  # asked once per period, whatever the answer
                self._spawn(self._safely(self._expire(room.code)))

    async def _expire(self, code: str) -> None:
        idle_ms = int(self._config.expire_after_seconds * 1000)
        status, info, records = await self._store.expire(code, idle_ms)
        room = self.rooms.get(code)
        if status == "expired" and info is not None:
            log.info("room expired", extra={"room_id": info})
            self._publish(code, info, records, closed=True, expired=True)
        elif status == "alive" and info is not None and room is not None:
            left = int(info) / 1000
            room.last_activity = self._clock.monotonic() - (self._config.expire_after_seconds - left)
            self._rearm()
        elif status == "not_found" and room is not None:  # its keys lapsed: it ended
            self.apply(RoomState(room_code=code, room_id=room.room_id, closed=True, expired=True))

    def _spoke(self, code: str) -> None:
        self._spawn(self._safely(self._store.spoke(code)))

    # --- internals ------------------------------------------------------------------------------------

    def _members(self, room: Room) -> None:
        for notice in self.rooms.members_notices(room):
            if self.rooms.instance_of.get(notice.to) == self.instance_id:
                self._notify(notice.to, notice.message)

    def _format(self) -> str:
        return f"a room code is exactly {self._config.code_length} digits"

    def _refuse(self, sid: str, code: ErrorCode, message: str, room_code: str | None = None) -> None:
        self._notify(sid, RoomError(code=code.value, message=message, room_code=room_code))

    async def _safely(self, aw: Awaitable[object]) -> None:
        try:
            await aw
        except StoreUnavailable:
            log.warning("room update lost: shared store unreachable")

    def _spawn(self, coro: Coroutine[object, object, None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
