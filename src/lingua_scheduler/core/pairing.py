"""Pairing codes: a node hands one to its user, a client session presents it to be bound to that node.

Owns the live codes (each names its node and expires ``pairing.ttl_seconds`` after it was issued; a
node has at most one: a new one replaces it), their redemption (single use: a redeemed code is gone),
and the limits on guessing: every attempt takes a token from the connection's bucket
(``GuessLimiter``) and from its source address's (per IPv4 address, per IPv6 /64, whose addresses one
holder has by the billion), so that a code of ``code_length`` digits cannot be found by trying codes
within its lifetime. A refused attempt says nothing about why the code was not accepted (wrong, used
and expired are one answer): an attacker learns only "not this one".

Codes are drawn from the injected CSPRNG (``core/randomness.py``), unique among this book's live codes
and, through the injected ``code_taken`` check, the cluster's. They are looked up by their SHA-256
digest and compared in constant time, so the lookup's timing does not reveal how much of a guess was
right.

Must never: do I/O, read the wall clock (the injected ``Clock``'s monotonic time runs expiry and the
buckets; its wall time only stamps ``expires_at_ms`` for the node), or accept a code twice.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from lingua_scheduler.clock import Clock
from lingua_scheduler.config import PairingConfig
from lingua_scheduler.core.randomness import SYSTEM_RANDOMNESS, Randomness, digits
from lingua_scheduler.core.rate_limit import TokenBucket
from lingua_scheduler.errors import ErrorCode

#: fresh codes drawn before giving up on issuing one
CODE_ATTEMPTS = 32
#: the one answer to a code that is not accepted, whatever the reason
NOT_ACCEPTED = "the pairing code is not valid: it is wrong, was used already or has expired"


def _never_taken(code: str) -> bool:
    return False


def _digest(code: str) -> bytes:
    return hashlib.sha256(code.encode()).digest()


def source_key(address: str | None) -> str:
    """The key guesses from ``address`` are counted under: the IPv4 address, the /64 of an IPv6 one
    (an IPv4-mapped IPv6 address counts as its IPv4 address); an unreadable or unknown address is
    counted under its text (all unknown ones together)."""
    if not address:
        return "?"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(slots=True)
class _Live:
    code: str
    node_id: str
    expires_at: float
    expires_at_ms: int


@dataclass(frozen=True, slots=True)
class Issued:
    code: str
    expires_at_ms: int
    #: the node's earlier code, no longer valid (to be released where codes are registered)
    replaced: str | None


class RedeemOutcome(StrEnum):
    PAIRED = "paired"
    NOT_ACCEPTED = "not_accepted"
    RATE_LIMITED = "rate_limited"


@dataclass(frozen=True, slots=True)
class Redemption:
    outcome: RedeemOutcome
    #: PAIRED: the node the session is bound to
    node_id: str | None = None
    #: the code to answer with when not paired (INVALID_PAIRING_CODE, PAIRING_RATE_LIMITED)
    error: ErrorCode | None = None
    message: str = ""
    #: RATE_LIMITED: seconds until one more attempt is allowed
    retry_after_s: float = 0.0
    #: PAIRED: the code redeemed (to be released where codes are registered)
    code: str | None = None


class GuessLimiter:
    """The pairing attempts of one client connection."""

    __slots__ = ("bucket",)

    def __init__(self, config: PairingConfig, now: float) -> None:
        self.bucket = TokenBucket(
            config.attempts_per_minute_per_connection / 60, config.attempt_burst_per_connection, now
        )


class Pairing:
    """The live pairing codes of one authority (see the module docstring)."""

    __slots__ = ("_by_digest", "_by_node", "_clock", "_code_taken", "_rng", "_sources", "config")

    def __init__(
        self,
        config: PairingConfig,
        clock: Clock,
        rng: Randomness = SYSTEM_RANDOMNESS,
        code_taken: Callable[[str], bool] = _never_taken,
    ) -> None:
        self.config = config
        self._clock = clock
        self._rng = rng
        self._code_taken = code_taken
        self._by_digest: dict[bytes, _Live] = {}
        self._by_node: dict[str, bytes] = {}
        #: source key -> its bucket, least recently used first
        self._sources: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_digest)

    def connection_limiter(self) -> GuessLimiter:
        """The limiter a new client connection holds for its attempts."""
        return GuessLimiter(self.config, self._clock.monotonic())

    def issue(self, node_id: str) -> Issued | None:
        """A new code for ``node_id`` (replacing its earlier one); None when no free code was found."""
        for _ in range(CODE_ATTEMPTS):
            code = digits(self._rng, self.config.code_length)
            if _digest(code) not in self._by_digest and not self._code_taken(code):
                break
        else:
            return None
        replaced = self.revoke_node(node_id)
        now, wall = self._clock.monotonic(), self._clock.wall_ms()
        live = _Live(
            code=code,
            node_id=node_id,
            expires_at=now + self.config.ttl_seconds,
            expires_at_ms=wall + int(self.config.ttl_seconds * 1000),
        )
        digest = _digest(code)
        self._by_digest[digest] = live
        self._by_node[node_id] = digest
        return Issued(code=code, expires_at_ms=live.expires_at_ms, replaced=replaced)

    def revoke_node(self, node_id: str) -> str | None:
        """The node's code stops being valid (the node left, or asked for a new one); returns it."""
        digest = self._by_node.pop(node_id, None)
        if digest is None:
            return None
        return self._by_digest.pop(digest).code

    def expire(self) -> list[str]:
        """Forget the codes past their lifetime; returns them."""
        now = self._clock.monotonic()
        gone = [d for d, live in self._by_digest.items() if now >= live.expires_at]
        out = []
        for digest in gone:
            live = self._by_digest.pop(digest)
            del self._by_node[live.node_id]
            out.append(live.code)
        return out

    def redeem(self, code: str, *, connection: GuessLimiter, source: str | None) -> Redemption:
        """One attempt of a client connection from ``source`` (its address) to pair with ``code``."""
        now = self._clock.monotonic()
        limited = self._admit(connection, source_key(source), now)
        if limited is not None:
            return limited
        live = self._by_digest.get(_digest(code))
        if live is None or not hmac.compare_digest(live.code.encode(), code.encode()):
            return Redemption(
                RedeemOutcome.NOT_ACCEPTED, error=ErrorCode.INVALID_PAIRING_CODE, message=NOT_ACCEPTED
            )
        # single use: gone whatever happens next; an expired one is gone too
        del self._by_digest[_digest(code)]
        del self._by_node[live.node_id]
        if now >= live.expires_at:
            return Redemption(
                RedeemOutcome.NOT_ACCEPTED, error=ErrorCode.INVALID_PAIRING_CODE, message=NOT_ACCEPTED
            )
        return Redemption(RedeemOutcome.PAIRED, node_id=live.node_id, code=live.code)

    def _admit(self, connection: GuessLimiter, key: str, now: float) -> Redemption | None:
        """Takes one attempt from the connection's bucket, then from the source's; the refusal if either
        is empty (an attempt the connection's bucket refused takes nothing from the source's: one
        connection over its rate does not lock out the others of its address any sooner)."""
        cfg = self.config
        source = self._sources.get(key)
        if source is None:
            source = TokenBucket(cfg.attempts_per_minute_per_source / 60, cfg.attempt_burst_per_source, now)
            self._sources[key] = source
            while len(self._sources) > cfg.max_tracked_sources:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(key)
        if not connection.bucket.take(now):
            return self._limited(connection.bucket, "this connection")
        if not source.take(now):
            return self._limited(source, "this source address")
        return None

    def _limited(self, bucket: TokenBucket, who: str) -> Redemption:
        wait = bucket.retry_after()
        return Redemption(
            RedeemOutcome.RATE_LIMITED,
            error=ErrorCode.PAIRING_RATE_LIMITED,
            message=f"too many pairing codes tried from {who}: try again in {max(1, round(wait))} s",
            retry_after_s=wait,
        )
