"""Where a room lives: the ``RoomDirectory`` interface the room service and the fan-out relay use.

Owns the contract only. One implementation exists: ``core/rooms.py``'s ``Rooms``, in the memory of the
one instance that serves rooms (embedded mode). A shared implementation (room state in the store,
members on several instances) would sit behind the same methods; it is not built, which is why
multi-instance mode refuses rooms (server/room_service.py).
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
    def plan(self, speaker: str, *, src_lang: str, tgt_lang: str) -> FanoutPlan: ...
    def recipients(self, plan: FanoutPlan, group: int) -> tuple[str, ...]: ...
    def relay(self, sender: str, msg: RelayMessage, limiter: RelayLimiter) -> RelayDecision: ...
