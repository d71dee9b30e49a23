"""Rooms in the running scheduler: the ``room_*`` and ``webrtc_*`` requests of ``/ws/session``, the
members' notices, the expiry timer, and the room side of the engine's fan-out.

Owns the instance's ``RoomDirectory`` (who is in which room: ``core/rooms.py``'s ``Rooms`` in memory,
the one implementation so far), the relay limiter of each member's connection, the timer that closes
rooms nobody spoke in (the core decides which rooms expired and when the next one does; this module
only arms a timer for that time), and the ``RoomRelay`` (server/room_relay.py) that delivers each
outcome the engine addresses to a language group of a room. As the runtime's ``RoomsPort`` it gives
the speaker's room, as data, with each utterance (the engine plans the fan-out from it), carries out
the engine's room actions, and is told of every session's end (a member whose session ends, or whose
connection closes, leaves its room: the others are told).

In multi-instance mode (``cluster.redis_url``) the directory is the replica of the shared rooms
(server/cluster/room_cluster.py's ``SharedRooms``, attached by ``share``): membership changes go through the
store, and messages for members connected to other instances through their inboxes; the decisions
(relay rules, room snapshots, recipients) are the same code on the replica.

Must never: block or await (every request is answered in the frame's own turn), keep a member after
its session ended, or log display names or text.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterator, Mapping
from typing import TYPE_CHECKING

import msgspec
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric

from lingua_scheduler.clock import Clock
from lingua_scheduler.config import RoomsConfig
from lingua_scheduler.core.rooms import (
    FanoutPlan,
    RelayLimiter,
    RelayOutcome,
    RoomChange,
    Rooms,
    RoomSnapshot,
)
from lingua_scheduler.protocol.session import (
    MissingResult,
    RoomCreate,
    RoomJoin,
    RoomLeave,
    RoomRawVoicePreference,
    TranslationResult,
    WebRtcAnswer,
    WebRtcIce,
    WebRtcOffer,
)
from lingua_scheduler.server.room_directory import RoomDirectory
from lingua_scheduler.server.room_relay import RoomRelay

if TYPE_CHECKING:
    from lingua_scheduler.server.cluster.room_cluster import SharedRooms
    from lingua_scheduler.server.sessions import Session

log = logging.getLogger(__name__)

RoomRequest = (
    RoomCreate | RoomJoin | RoomLeave | RoomRawVoicePreference | WebRtcOffer | WebRtcAnswer | WebRtcIce
)


class RoomService:
    __slots__ = (
        "_clock",
        "_encoder",
        "_limiters",
        "_sessions",
        "_shared",
        "_timer",
        "fanout_jobs",
        "relay",
        "relayed",
        "rooms",
    )

    def __init__(
        self,
        config: RoomsConfig,
        clock: Clock,
        sessions: Mapping[str, Session],
        registry: CollectorRegistry,
    ) -> None:
        """``sessions``: the instance's open sessions (the members are looked up there)."""
        self._clock = clock
        self._sessions = sessions
        self.rooms: RoomDirectory = Rooms(config, clock)
        self.relay = RoomRelay(self.rooms, self._send_encoded)
        #: session id -> its connection's relay rate (dropped when it leaves its room)
        self._limiters: dict[str, RelayLimiter] = {}
        self._timer: asyncio.TimerHandle | None = None
        #: the shared rooms in multi-instance mode (``share``); None embedded
        self._shared: SharedRooms | None = None
        self._encoder = msgspec.json.Encoder()
        self.fanout_jobs = Counter(
            "lingua_fanout_jobs", "Jobs created for room members' utterances", registry=registry
        )
        self.relayed = Counter(
            "lingua_webrtc_relayed",
            "webrtc_* signalling messages, by outcome (delivered, declined, refused)",
            ["outcome"],
            registry=registry,
        )

    def share(self, shared: SharedRooms) -> None:
        """Multi-instance mode: rooms are the shared ones, this instance's directory their replica."""
        self._shared = shared
        self.rooms = shared.rooms
        window = self.relay.fanout_window
        self.relay = RoomRelay(self.rooms, self._send_encoded)
        self.relay.fanout_window = window

    # --- requests ---------------------------------------------------------------------------------

    def handle(self, session: Session, msg: RoomRequest) -> Awaitable[None] | None:
        """One room or relay request of ``session`` (open, this connection's). In multi-instance mode a
        membership request returns the store call to await (the connection's next frames wait)."""
        sid = session.session_id
        rooms = self.rooms
        if isinstance(msg, (WebRtcOffer, WebRtcAnswer, WebRtcIce)):
            limiter = self._limiters.get(sid)
            if limiter is None:
                limiter = self._limiters[sid] = RelayLimiter(rooms.config, self._clock)
            decision = rooms.relay(sid, msg, limiter)
            outcome = {
                RelayOutcome.DELIVER: "delivered",
                RelayOutcome.DECLINED: "declined",
                RelayOutcome.REFUSED: "refused",
            }[decision.outcome]
            self.relayed.labels(outcome).inc()
            self._notify(decision.notice.to, decision.notice.message)
            return None
        if self._shared is not None:
            return self._shared.handle(session, msg)
        lang = session.targets[0]
        if isinstance(msg, RoomCreate):
            change = rooms.create(
                sid, preferred_lang=msg.preferred_lang or lang, display_name=msg.display_name
            )
        elif isinstance(msg, RoomJoin):
            change = rooms.join(
                sid, msg.room_code, preferred_lang=msg.preferred_lang or lang, display_name=msg.display_name
            )
        elif isinstance(msg, RoomLeave):
            change = rooms.leave(sid, msg.room_code)
        else:
            change = rooms.set_raw_voice(sid, msg.room_code, msg.target_session_id, msg.receive_raw_voice)
        self._apply(change)
        if change.opened is not None:
            log.info("room created", extra={"session_id": sid, "room_id": change.opened.room_id})
        return None

    def connection_closed(self, session_id: str) -> None:
        """The member's connection closed (its session may wait for a resume): it leaves its room."""
        self._limiters.pop(session_id, None)
        if self._shared is not None:
            self._shared.connection_closed(session_id)
            return
        self._apply(self.rooms.disconnect(session_id))

    # --- the runtime's RoomsPort ------------------------------------------------------------------

    def spoke(self, session_id: str) -> RoomSnapshot | None:
        """A member cut an utterance: its room's expiry starts again (alone in it or not); the room
        as it is now for the engine's fan-out (None: in no room, or alone)."""
        rooms = self.rooms
        if rooms.room_of(session_id) is None:
            return None
        rooms.spoke(session_id)
        self._arm()  # it spoke: the room's expiry moved
        return rooms.snapshot(session_id)

    def send_group(self, plan: FanoutPlan, group: int, message: TranslationResult | MissingResult) -> None:
        self.relay.send_group(plan, group, message)

    def fanout_created(self, jobs: int) -> None:
        self.relay.fanout_jobs += jobs
        self.fanout_jobs.inc(jobs)

    def fanout_dispatched(self, elapsed: float) -> None:
        self.relay.fanout_window.record(elapsed)

    def session_ended(self, session_id: str) -> None:
        """The session's book is gone: it leaves its room (the others are told)."""
        self.connection_closed(session_id)

    # --- operator view ----------------------------------------------------------------------------

    def snapshot(self) -> list[tuple[int, float]]:
        """(members, age in seconds) of every live room."""
        now = self._clock.monotonic()
        return [(len(r.members), max(0.0, now - r.created_at)) for r in self.rooms]

    def live_metrics(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "lingua_rooms", "Live rooms (with a member on this instance)", value=len(self.rooms)
        )
        yield GaugeMetricFamily(
            "lingua_room_members", "Members of those rooms", value=self.rooms.member_count
        )

    # --- internals --------------------------------------------------------------------------------

    def _apply(self, change: RoomChange) -> None:
        for notice in change.notices:
            self._notify(notice.to, notice.message)
        for room in change.closed:
            for member in room.members:
                self._limiters.pop(member, None)
        if change.notices or change.closed or change.opened is not None:
            self._arm()

    def notify_local(self, to: str, message: msgspec.Struct) -> None:
        """A message for a member connected here (none if its session is gone)."""
        session = self._sessions.get(to)
        if session is not None:
            session.send(message)

    def rearm(self) -> None:
        self._arm()

    def _notify(self, to: str, message: msgspec.Struct) -> None:
        session = self._sessions.get(to)
        if session is not None:
            session.send(message)
        elif self._shared is not None:  # a member connected to another instance
            self._shared.send_to(to, self._encoder.encode(message))

    def _send_encoded(self, to: str, data: bytes) -> None:
        session = self._sessions.get(to)
        if session is not None:
            session.send_encoded(data)
        elif self._shared is not None:
            self._shared.send_to(to, data)

    def _arm(self) -> None:
        """One timer for the next room's expiry (the core says when), at most
        ``rooms.sweep_interval_seconds`` away (a replica that missed a change is checked again
        in time); none without rooms."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        at = self.rooms.next_expiry()
        if at is None:
            return
        delay = max(0.0, min(at - self._clock.monotonic(), self.rooms.config.sweep_interval_seconds))
        self._timer = asyncio.get_running_loop().call_later(delay, self._expire)

    def _expire(self) -> None:
        self._timer = None
        if self._shared is not None:
            self._shared.expire_due()
            self._arm()
            return
        change = self.rooms.expire()
        for room in change.closed:
            log.info("room expired", extra={"room_id": room.room_id})
        self._apply(change)
        self._arm()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._shared is not None:
            self._shared.close()
