"""Where a room lives: the ``RoomDirectory`` interface the room service and the fan-out relay use.

Owns the contract only. Two implementations: ``core/rooms.py``'s ``Rooms``, in the memory of the one
instance (embedded mode), and server/cluster/room_cluster.py's ``ReplicaRooms``, this instance's replica of
the rooms shared through the store (multi-instance mode).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from lingua_scheduler.config import RoomsConfig
from lingua_scheduler.core.rooms import (
    FanoutPlan,
    RelayDecision,
    RelayLimiter,
    RelayMessage,
    Room,
    RoomChange,
    RoomSnapshot,
)


class RoomDirectory(Protocol):
    """Who is in which room, and what each room request decides (see ``core/rooms.py``)."""

    config: RoomsConfig

    def __len__(self) -> int: ...
    @property
    def member_count(self) -> int: ...
    def __iter__(self) -> Iterator[Room]: ...
    def room_of(self, session_id: str) -> Room | None: ...
    def create(
        self,
        session_id: str,
        *,
        preferred_lang: str,
        display_name: str | None = None,
        code: str | None = None,
    ) -> RoomChange: ...
    def join(
        self, session_id: str, room_code: str, *, preferred_lang: str, display_name: str | None = None
    ) -> RoomChange: ...
    def leave(self, session_id: str, room_code: str) -> RoomChange: ...
    def disconnect(self, session_id: str) -> RoomChange: ...
    def set_raw_voice(self, session_id: str, room_code: str, target: str, receive: bool) -> RoomChange: ...
    def spoke(self, session_id: str) -> None: ...
    def next_expiry(self) -> float | None: ...
    def expire(self) -> RoomChange: ...
    def snapshot(self, speaker: str) -> RoomSnapshot | None: ...
    def plan(self, speaker: str, *, src_lang: str, tgt_lang: str) -> FanoutPlan: ...
    def recipients(self, plan: FanoutPlan, group: int) -> tuple[str, ...]: ...
    def relay(self, sender: str, msg: RelayMessage, limiter: RelayLimiter) -> RelayDecision: ...
