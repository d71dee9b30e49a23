"""Pairing codes in Redis (multi-instance mode): one script, ``lua/pairing.lua``, per call.

Owns the calls only: a code issued on one instance is redeemed on any, once (the redemption deletes
it in the same step that reads it); the guesses of one source address are counted in one token bucket
all instances share. Codes are stored by their SHA-256 digest, never in clear.
"""

from __future__ import annotations

import hashlib
from typing import Any

from lingua_scheduler.store.redis_store import RedisStore


def _digest(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


class PairingStore:
    __slots__ = ("_script", "_store", "_tag")

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self._script = store._script("pairing.lua")
        self._tag = f"{{{store.keys.prefix}:pair}}"

    def _code_key(self, code: str) -> str:
        return f"{self._tag}:code:{_digest(code)}"

    def _node_key(self, node_id: str) -> str:
        return f"{self._tag}:node:{node_id}"

    async def _run(self, keys: list[str], *args: object) -> Any:
        return await self._store._do(self._script(keys=keys, args=list(args)))

    async def issue(self, code: str, node_id: str, ttl_ms: int) -> bool:
        """Make ``code`` the node's (its earlier one goes); False when the code is live already."""
        keys = [self._code_key(code), self._node_key(node_id)]
        return bool(await self._run(keys, "issue", node_id, ttl_ms, _digest(code)))

    async def redeem(self, code: str) -> str | None:
        """The node the code names, once; None when it is wrong, used or expired."""
        node = await self._run([self._code_key(code), self._node_key("-")], "redeem")
        if not node:
            return None
        return node.decode() if isinstance(node, bytes) else str(node)

    async def revoke(self, node_id: str) -> None:
        await self._run([self._code_key("-"), self._node_key(node_id)], "revoke")

    async def attempt(self, source_key: str, per_minute: float, burst: int) -> float:
        """Take one attempt of ``source_key``'s shared bucket: 0 when allowed, else seconds to wait."""
        out = await self._run([f"{self._tag}:src:{source_key}"], "attempt", per_minute / 60_000, burst)
        return 0.0 if int(out[0]) == 1 else int(out[1]) / 1000
