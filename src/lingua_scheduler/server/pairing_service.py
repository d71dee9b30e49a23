"""Pairing in the running scheduler: a node's ``request_pairing_code``, a client's
``session_init.pairing_code``, and the binding of that session's jobs to the node.

Owns the instance's ``Pairing`` book (``core/pairing.py``: live codes, single use, expiry, the guessing
limits per connection and per source address) and the outcome counters. A redeemed code pins the
session in the engine's routing memory (``SessionOpened.pinned``, core/engine.py): its jobs are
offered to that node first and, with ``pairing.fallback_to_pools`` false, to no other node.

In multi-instance mode (``cluster.redis_url``) the codes live in Redis (``store/pairing_store.py``,
attached by ``share``): a code a node got from one instance is redeemed on any, once, and the guesses
of one source address are counted in one bucket shared by the instances; the connection's own limit
stays with the connection. The paired node may be connected to another instance: its jobs are placed
there as any job on a remote node.

Must never: tell a guesser why a code was refused (wrong, used and expired are one answer), log a
code, or accept one twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine

import msgspec
from prometheus_client import CollectorRegistry, Counter

from lingua_scheduler.clock import Clock
from lingua_scheduler.config import PairingConfig
from lingua_scheduler.core.pairing import (
    CODE_ATTEMPTS,
    NOT_ACCEPTED,
    GuessLimiter,
    Pairing,
    RedeemOutcome,
    source_key,
)
from lingua_scheduler.core.randomness import SYSTEM_RANDOMNESS, digits
from lingua_scheduler.errors import ErrorCode, SchedulerError
from lingua_scheduler.protocol.common import ErrorMessage
from lingua_scheduler.protocol.node import PairingCode
from lingua_scheduler.store.base import StoreUnavailable
from lingua_scheduler.store.pairing_store import PairingStore

log = logging.getLogger(__name__)


class PairingService:
    __slots__ = ("_clock", "_shared", "_tasks", "book", "config", "outcomes")

    def __init__(self, config: PairingConfig, clock: Clock, registry: CollectorRegistry) -> None:
        self.config = config
        self._clock = clock
        self.book = Pairing(config, clock)
        #: the shared codes in multi-instance mode (``share``); None embedded
        self._shared: PairingStore | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.outcomes = Counter(
            "lingua_pairings",
            "Pairing codes: issued, then each redemption paired, not_accepted or rate_limited",
            ["outcome"],
            registry=registry,
        )

    def share(self, store: PairingStore) -> None:
        self._shared = store

    def connection_limiter(self) -> GuessLimiter:
        return self.book.connection_limiter()

    def request(self, node_id: str | None, send: Callable[[msgspec.Struct], object]) -> None:
        """A node's ``request_pairing_code``: ``send`` gets its ``pairing_code`` (at once embedded,
        when the store answered otherwise)."""
        if node_id is None:
            raise SchedulerError(
                "request_pairing_code: register first (node_register)", code=ErrorCode.NOT_REGISTERED
            )
        store = self._shared
        if store is None:
            send(self.issue(node_id))
            return
        self._spawn(self._issue_shared(store, node_id, send))

    async def _issue_shared(
        self, store: PairingStore, node_id: str, send: Callable[[msgspec.Struct], object]
    ) -> None:
        ttl_ms = int(self.config.ttl_seconds * 1000)
        try:
            for _ in range(CODE_ATTEMPTS):
                code = digits(SYSTEM_RANDOMNESS, self.config.code_length)
                if await store.issue(code, node_id, ttl_ms):
                    self.outcomes.labels("issued").inc()
                    log.info("pairing code issued", extra={"node_id": node_id})
                    send(PairingCode(code=code, expires_at_ms=self._clock.wall_ms() + ttl_ms))
                    return
            why = "no free pairing code was found, try again"
        except StoreUnavailable:
            why = "the shared store did not answer, try again"
        send(ErrorMessage(code=ErrorCode.INTERNAL_ERROR.value, message=f"request_pairing_code: {why}"))

    def issue(self, node_id: str) -> PairingCode:
        """A new code for the registered node ``node_id`` (replacing its earlier one; embedded)."""
        self.book.expire()
        issued = self.book.issue(node_id)
        if issued is None:
            raise SchedulerError("no free pairing code was found, try again", code=ErrorCode.INTERNAL_ERROR)
        self.outcomes.labels("issued").inc()
        log.info("pairing code issued", extra={"node_id": node_id})
        return PairingCode(code=issued.code, expires_at_ms=issued.expires_at_ms)

    def node_gone(self, node_id: str) -> None:
        """The node's connection closed: its code is no longer valid."""
        self.book.revoke_node(node_id)
        if self._shared is not None:
            self._spawn(self._revoke_shared(self._shared, node_id))

    async def _revoke_shared(self, store: PairingStore, node_id: str) -> None:
        try:
            await store.revoke(node_id)
        except StoreUnavailable:
            log.warning("pairing code not revoked: shared store unreachable", extra={"node_id": node_id})

    async def redeem(self, code: str, limiter: GuessLimiter, source: str | None) -> str:
        """The node ``code`` binds a session to; refused (INVALID_PAIRING_CODE, PAIRING_RATE_LIMITED)
        otherwise, nothing changed."""
        if self._shared is not None:
            return await self._redeem_shared(self._shared, code, limiter, source)
        self.book.expire()
        out = self.book.redeem(code, connection=limiter, source=source)
        self.outcomes.labels(out.outcome.value).inc()
        if out.outcome is RedeemOutcome.PAIRED and out.node_id is not None:
            return out.node_id
        details = {"retry_after_ms": int(out.retry_after_s * 1000)} if out.retry_after_s else None
        raise SchedulerError(out.message, code=out.error or ErrorCode.INVALID_PAIRING_CODE, details=details)

    async def _redeem_shared(
        self, store: PairingStore, code: str, limiter: GuessLimiter, source: str | None
    ) -> str:
        """As ``redeem``, with the codes and the source's bucket in the store (the connection's first:
        an attempt it refuses takes nothing from the source's)."""
        cfg = self.config
        if not limiter.bucket.take(self._clock.monotonic()):
            self._limited(limiter.bucket.retry_after(), "this connection")
        try:
            wait = await store.attempt(
                source_key(source), cfg.attempts_per_minute_per_source, cfg.attempt_burst_per_source
            )
            if wait > 0:
                self._limited(wait, "this source address")
            node_id = await store.redeem(code)
        except StoreUnavailable as exc:
            raise SchedulerError(
                "the pairing code could not be checked: the shared store did not answer, try again",
                code=ErrorCode.INTERNAL_ERROR,
            ) from exc
        if node_id is None:
            self.outcomes.labels(RedeemOutcome.NOT_ACCEPTED.value).inc()
            raise SchedulerError(NOT_ACCEPTED, code=ErrorCode.INVALID_PAIRING_CODE)
        self.outcomes.labels(RedeemOutcome.PAIRED.value).inc()
        return node_id

    def _limited(self, wait: float, who: str) -> None:
        self.outcomes.labels(RedeemOutcome.RATE_LIMITED.value).inc()
        raise SchedulerError(
            f"too many pairing codes tried from {who}: try again in {max(1, round(wait))} s",
            code=ErrorCode.PAIRING_RATE_LIMITED,
            details={"retry_after_ms": int(wait * 1000)},
        )

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
