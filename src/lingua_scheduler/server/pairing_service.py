"""Pairing in the running scheduler: a node's ``request_pairing_code``, a client's
``session_init.pairing_code``, and the binding of that session's jobs to the node.

Owns the instance's ``Pairing`` book (``core/pairing.py``: live codes, single use, expiry, the guessing
limits per connection and per source address) and the outcome counters. A redeemed code pins the
session in the dispatch (``Dispatcher.pin``): its jobs are offered to that node first and, with
``pairing.fallback_to_pools`` false, to no other node.

Codes are held by one instance: in multi-instance mode (``cluster.redis_url``) a code is only known
to the instance its node asked, so both requests are refused with UNSUPPORTED_FEATURE there rather
than answered with codes other instances would reject.

Must never: tell a guesser why a code was refused (wrong, used and expired are one answer), log a
code, or accept one twice.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter

from lingua_scheduler.clock import Clock
from lingua_scheduler.config import PairingConfig
from lingua_scheduler.core.pairing import GuessLimiter, Pairing, RedeemOutcome
from lingua_scheduler.errors import ErrorCode, SchedulerError
from lingua_scheduler.protocol.node import PairingCode

log = logging.getLogger(__name__)


class PairingService:
    __slots__ = ("book", "config", "enabled", "outcomes")

    def __init__(
        self, config: PairingConfig, clock: Clock, registry: CollectorRegistry, *, enabled: bool = True
    ) -> None:
        self.config = config
        self.enabled = enabled
        self.book = Pairing(config, clock)
        self.outcomes = Counter(
            "lingua_pairings",
            "Pairing codes: issued, then each redemption paired, not_accepted or rate_limited",
            ["outcome"],
            registry=registry,
        )

    def _check_enabled(self, what: str) -> None:
        if not self.enabled:
            raise SchedulerError(
                f"{what}: pairing is served in single-instance mode only (this scheduler runs with "
                "cluster.redis_url)",
                code=ErrorCode.UNSUPPORTED_FEATURE,
            )

    def connection_limiter(self) -> GuessLimiter:
        return self.book.connection_limiter()

    def issue(self, node_id: str | None) -> PairingCode:
        """A new code for the registered node ``node_id`` (replacing its earlier one)."""
        self._check_enabled("request_pairing_code")
        if node_id is None:
            raise SchedulerError(
                "request_pairing_code: register first (node_register)", code=ErrorCode.NOT_REGISTERED
            )
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

    def redeem(self, code: str, limiter: GuessLimiter, source: str | None) -> str:
        """The node ``code`` binds a session to; refused (INVALID_PAIRING_CODE, PAIRING_RATE_LIMITED)
        otherwise, nothing changed."""
        self._check_enabled("session_init.pairing_code")
        self.book.expire()
        out = self.book.redeem(code, connection=limiter, source=source)
        self.outcomes.labels(out.outcome.value).inc()
        if out.outcome is RedeemOutcome.PAIRED and out.node_id is not None:
            return out.node_id
        details = {"retry_after_ms": int(out.retry_after_s * 1000)} if out.retry_after_s else None
        raise SchedulerError(out.message, code=out.error or ErrorCode.INVALID_PAIRING_CODE, details=details)
