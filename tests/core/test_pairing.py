"""Pairing codes in the core: issue, single use, expiry, replacement, and the guess limits per connection
and per source address, on a manual clock and a seeded randomness."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lingua_scheduler.clock import ManualClock
from lingua_scheduler.config import PairingConfig, load_config
from lingua_scheduler.core.pairing import NOT_ACCEPTED, Pairing, RedeemOutcome, source_key
from lingua_scheduler.errors import ConfigError, ErrorCode
from lingua_scheduler.protocol.codec import encode
from lingua_scheduler.protocol.node import PairingCode
from tests.core.test_rooms import Scripted, Seeded


def make(**config: Any) -> tuple[Pairing, ManualClock]:
    clock = ManualClock()
    return Pairing(PairingConfig(**config), clock, Seeded()), clock


def test_a_code_pairs_once_with_its_node() -> None:
    pairing, clock = make()
    issued = pairing.issue("node-1")
    assert issued is not None and len(issued.code) == 6 and issued.code.isdigit()
    assert issued.expires_at_ms == clock.wall_ms() + 300_000 and issued.replaced is None
    wire = json.loads(encode(PairingCode(code=issued.code, expires_at_ms=issued.expires_at_ms)))
    assert wire == {"type": "pairing_code", "code": issued.code, "expires_at_ms": issued.expires_at_ms}
    conn = pairing.connection_limiter()
    first = pairing.redeem(issued.code, connection=conn, source="192.0.2.1")
    assert (first.outcome, first.node_id, first.code) == (RedeemOutcome.PAIRED, "node-1", issued.code)
    again = pairing.redeem(issued.code, connection=pairing.connection_limiter(), source="192.0.2.2")
    assert (again.outcome, again.error, again.node_id) == (
        RedeemOutcome.NOT_ACCEPTED,
        ErrorCode.INVALID_PAIRING_CODE,
        None,
    )
    assert len(pairing) == 0


@pytest.mark.parametrize("case", ["wrong", "expired", "replaced", "revoked", "not digits", "empty"])
def test_every_refusal_is_the_same_answer(case: str) -> None:
    pairing, clock = make(ttl_seconds=300)
    issued = pairing.issue("node-1")
    assert issued is not None
    code = issued.code
    if case == "wrong":
        code = f"{(int(code) + 1) % 10**6:06d}"
    elif case == "expired":
        clock.advance(300)
    elif case == "replaced":
        newer = pairing.issue("node-1")
        assert newer is not None and newer.replaced == code and newer.code != code
    elif case == "revoked":
        assert pairing.revoke_node("node-1") == code
    elif case == "not digits":
        code = "abc"
    else:
        code = ""
    result = pairing.redeem(code, connection=pairing.connection_limiter(), source="192.0.2.1")
    assert (result.outcome, result.error, result.message, result.node_id) == (
        RedeemOutcome.NOT_ACCEPTED,
        ErrorCode.INVALID_PAIRING_CODE,
        NOT_ACCEPTED,
        None,
    )


def test_a_code_is_accepted_until_its_expiry() -> None:
    pairing, clock = make(ttl_seconds=300)
    issued = pairing.issue("node-1")
    assert issued is not None
    clock.advance(299.9)
    assert (
        pairing.redeem(issued.code, connection=pairing.connection_limiter(), source=None).node_id == "node-1"
    )


def test_expired_codes_are_forgotten() -> None:
    pairing, clock = make(ttl_seconds=10)
    a, b = pairing.issue("node-1"), None
    clock.advance(5)
    b = pairing.issue("node-2")
    assert a is not None and b is not None
    clock.advance(5)
    assert pairing.expire() == [a.code] and len(pairing) == 1
    clock.advance(5)
    assert pairing.expire() == [b.code] and len(pairing) == 0
    assert pairing.issue("node-1") is not None  # the node may ask again


def test_codes_are_unique_here_and_in_the_cluster() -> None:
    taken = {"000002"}
    pairing = Pairing(PairingConfig(), ManualClock(), Scripted([1, 1, 2, 3]), code_taken=taken.__contains__)
    codes = [pairing.issue("node-1"), pairing.issue("node-2")]
    assert [c.code for c in codes if c is not None] == ["000001", "000003"]
    full = Pairing(PairingConfig(), ManualClock(), Seeded(), code_taken=lambda code: True)
    assert full.issue("node-1") is None and len(full) == 0


@pytest.mark.parametrize("length", [4, 8, 12])
def test_code_length(length: int) -> None:
    pairing, _ = make(code_length=length)
    issued = pairing.issue("node-1")
    assert issued is not None and len(issued.code) == length and issued.code.isdigit()


def test_guesses_are_limited_per_connection() -> None:
    pairing, clock = make(attempts_per_minute_per_connection=6, attempt_burst_per_connection=3)
    issued = pairing.issue("node-1")
    assert issued is not None
    conn = pairing.connection_limiter()
    outcomes = [pairing.redeem("000000", connection=conn, source="192.0.2.1").outcome for _ in range(4)]
    assert outcomes == [RedeemOutcome.NOT_ACCEPTED] * 3 + [RedeemOutcome.RATE_LIMITED]
    limited = pairing.redeem(issued.code, connection=conn, source="192.0.2.1")
    # even the right code is refused while the connection is over its rate, and stays valid
    assert (limited.outcome, limited.error) == (RedeemOutcome.RATE_LIMITED, ErrorCode.PAIRING_RATE_LIMITED)
    assert limited.retry_after_s == pytest.approx(10.0) and "10 s" in limited.message
    clock.advance(10)
    assert pairing.redeem(issued.code, connection=conn, source="192.0.2.1").outcome is RedeemOutcome.PAIRED


@pytest.mark.parametrize(
    ("first", "second", "shared"),
    [
        ("192.0.2.1", "192.0.2.1", True),
        ("192.0.2.1", "192.0.2.2", False),
        ("2001:db8:1:2::1", "2001:db8:1:2:ffff::9", True),  # one /64
        ("2001:db8:1:2::1", "2001:db8:1:3::1", False),
        ("::ffff:192.0.2.1", "192.0.2.1", True),  # IPv4-mapped
    ],
)
def test_guesses_are_limited_per_source(first: str, second: str, shared: bool) -> None:
    pairing, _ = make(attempts_per_minute_per_source=6, attempt_burst_per_source=4)
    for _ in range(4):  # each from a new connection: reconnecting does not reset the source's budget
        assert pairing.redeem("1", connection=pairing.connection_limiter(), source=first).outcome is (
            RedeemOutcome.NOT_ACCEPTED
        )
    fifth = pairing.redeem("1", connection=pairing.connection_limiter(), source=second)
    assert fifth.outcome is (RedeemOutcome.RATE_LIMITED if shared else RedeemOutcome.NOT_ACCEPTED)
    assert (source_key(first) == source_key(second)) is shared


def test_a_six_digit_code_cannot_be_brute_forced_within_its_lifetime() -> None:
    """With the defaults, one source address trying as fast as it is let through, over as many
    connections as it likes, gets through at most a vanishing share of the code space in 5 minutes."""
    config = PairingConfig()
    pairing = Pairing(config, clock := ManualClock(), Seeded())
    tried = 0
    for _ in range(int(config.ttl_seconds)):  # one second at a time, ten fresh connections each second
        for _ in range(10):
            result = pairing.redeem("123456", connection=pairing.connection_limiter(), source="198.51.100.7")
            tried += result.outcome is RedeemOutcome.NOT_ACCEPTED
        clock.advance(1)
    assert tried <= 66
    assert tried / 10**config.code_length < 1e-4


def test_tracked_sources_are_bounded() -> None:
    pairing, _ = make(max_tracked_sources=3, attempt_burst_per_source=1)
    for i in range(5):
        pairing.redeem("1", connection=pairing.connection_limiter(), source=f"192.0.2.{i}")
    # the two longest idle were forgotten: they start from a full bucket again
    assert pairing.redeem("1", connection=pairing.connection_limiter(), source="192.0.2.0").outcome is (
        RedeemOutcome.NOT_ACCEPTED
    )
    assert pairing.redeem("1", connection=pairing.connection_limiter(), source="192.0.2.4").outcome is (
        RedeemOutcome.RATE_LIMITED
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [("code_length", 3), ("ttl_seconds", 0), ("attempt_burst_per_source", 0), ("max_tracked_sources", -1)],
)
def test_bad_pairing_config_names_the_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, env={f"LINGUA_PAIRING__{key.upper()}": json.dumps(value)})
    assert exc.value.key == f"pairing.{key}"
