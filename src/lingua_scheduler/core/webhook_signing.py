"""Signatures of webhook deliveries: HMAC-SHA256 over ``"<timestamp>.<body>"``, with the timestamp.

Owns the ``Lingua-Signature`` header, ``t=<unix seconds>,v1=<hex>``: ``v1`` is the lowercase hex
HMAC-SHA256, keyed with the tenant's ``webhook_secret``, of the decimal timestamp, a dot and the exact
body bytes. Signing the timestamp with the body lets a receiver refuse a replayed delivery: it checks
the signature and that ``t`` is recent (``tolerance_seconds``, 5 minutes by default). During a
secret rotation a header may carry several ``v1`` values; a receiver accepts any that matches.

``verify`` is what a receiver runs (docs/integration.md shows it, and a copy in a few lines); it
compares in constant time and answers why a delivery does not check out.

Must never: read the time itself (callers pass ``now``), log or keep a secret.
"""

from __future__ import annotations

import hashlib
import hmac

HEADER = "Lingua-Signature"
SCHEME = "v1"
#: a delivery older (or newer) than this is refused by ``verify``: replays are bounded in time
DEFAULT_TOLERANCE_SECONDS = 300


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``"<timestamp>.<body>"``."""
    return hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``Lingua-Signature`` value of a delivery sent at ``timestamp`` (unix seconds)."""
    return f"t={timestamp},{SCHEME}={signature(secret, timestamp, body)}"


class SignatureError(ValueError):
    """Why a delivery does not check out: ``reason`` is malformed, stale or mismatch."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse(header: str) -> tuple[int, list[str]]:
    """The timestamp and the ``v1`` signatures of a header value."""
    timestamp: int | None = None
    signatures: list[str] = []
    for item in header.split(","):
        key, eq, value = item.strip().partition("=")
        if not eq:
            continue
        if key == "t" and value.isdigit() and len(value) <= 12:
            timestamp = int(value)
        elif key == SCHEME:
            signatures.append(value)
    if timestamp is None or not signatures:
        raise SignatureError("malformed", f"{HEADER} needs t=<unix seconds> and {SCHEME}=<hex>")
    return timestamp, signatures


def verify(
    secret: str, header: str, body: bytes, now: float, tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS
) -> int:
    """Check a received delivery; returns its timestamp, or raises ``SignatureError``."""
    timestamp, given = parse(header)
    expected = signature(secret, timestamp, body).encode()
    # every candidate is compared (no early exit): the time does not tell which one matched
    ok = False
    for candidate in given:
        ok |= hmac.compare_digest(candidate.encode(), expected)
    if not ok:
        raise SignatureError("mismatch", "no signature matches the body with this secret")
    if abs(now - timestamp) > tolerance_seconds:
        raise SignatureError(
            "stale", f"the delivery's timestamp is more than {tolerance_seconds:g} s from now"
        )
    return timestamp
