"""The shared state of rooms in Redis (multi-instance mode): one script, ``lua/room.lua``, per change.

Owns the calls only; what they mean is in the script's header and in server/cluster/room_cluster.py. Every
change returns the room's members as stored (``MemberRecord``: with the instance each is connected to),
so the caller tells every instance holding a member without reading again.

Must never: change a room except through the script (the member limit and the code's uniqueness hold
only because each change is one atomic step).
"""

from __future__ import annotations

from typing import Any

import msgspec

from lingua_scheduler.protocol.cluster import MemberRecord
from lingua_scheduler.store.redis_store import RedisStore

_dec = msgspec.json.Decoder(MemberRecord)
_enc = msgspec.json.Encoder()


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class RoomStore:
    __slots__ = ("_script", "_store", "ttl_ms")

    def __init__(self, store: RedisStore, ttl_ms: int) -> None:
        """``ttl_ms``: how long a room's keys outlive its last change (longer than its expiry)."""
        self._store = store
        self._script = store._script("room.lua")
        self.ttl_ms = ttl_ms

    async def _call(self, code: str, *args: object) -> tuple[str, str | None, list[MemberRecord]]:
        """(status, room_id, members in join order) of one operation."""
        store = self._store
        meta, members = store.keys.room(code)
        out = await store._do(self._script(keys=[meta, members], args=[args[0], self.ttl_ms, *args[1:]]))
        status = _s(out[0])
        if status in ("alive",):
            return status, _s(out[1]), []
        room_id = _s(out[1]) if len(out) > 1 and out[1] is not None else None
        records = sorted((_dec.decode(v) for v in out[2:]), key=lambda m: m.seq)
        return status, room_id, records

    async def create(self, code: str, room_id: str, first: MemberRecord) -> bool:
        status, _, _ = await self._call(code, "create", room_id, _enc.encode(first))
        return status == "ok"

    async def join(
        self, code: str, member: MemberRecord, max_members: int
    ) -> tuple[str, str | None, list[MemberRecord]]:
        return await self._call(code, "join", _enc.encode(member), max_members)

    async def leave(self, code: str, session_id: str) -> tuple[str, str | None, list[MemberRecord]]:
        return await self._call(code, "leave", session_id)

    async def set_raw_voice(
        self, code: str, session_id: str, target: str, receive: bool
    ) -> tuple[str, str | None, list[MemberRecord]]:
        return await self._call(code, "pref", session_id, target, "1" if receive else "0")

    async def spoke(self, code: str) -> None:
        await self._call(code, "spoke")

    async def expire(self, code: str, idle_ms: int) -> tuple[str, str | None, list[MemberRecord]]:
        """("expired", room_id, its members) | ("alive", ms left as text, []) | ("not_found", ...)."""
        return await self._call(code, "expire", idle_ms)

    async def drop_instance(self, code: str, instance: str) -> tuple[str, str | None, list[MemberRecord]]:
        return await self._call(code, "drop", instance)
