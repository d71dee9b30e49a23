"""The randomness the core draws codes and ids from, injected like the clock.

Owns ``Randomness`` (what the core needs: a uniform integer below a bound, and random bytes) and
``SystemRandomness``, the default, backed by the operating system's CSPRNG (``secrets``). Codes a
person types (room and pairing codes) and the ids that name rooms must not be predictable: a code
guessed from earlier ones would let a stranger into a room or pair a session with someone else's node.
Tests inject a seeded source to get the same codes on every run.

Must never: fall back to a non-cryptographic generator in the default.
"""

from __future__ import annotations

import secrets
import uuid
from typing import Protocol


class Randomness(Protocol):
    def randbelow(self, n: int) -> int:
        """A uniform integer in ``0 .. n-1``."""
        ...

    def token_bytes(self, n: int) -> bytes:
        """``n`` uniform random bytes."""
        ...


class SystemRandomness:
    """The operating system's CSPRNG."""

    __slots__ = ()

    def randbelow(self, n: int) -> int:
        return secrets.randbelow(n)

    def token_bytes(self, n: int) -> bytes:
        return secrets.token_bytes(n)


SYSTEM_RANDOMNESS = SystemRandomness()


def digits(rng: Randomness, length: int) -> str:
    """A code of ``length`` decimal digits, every one of the 10^length codes equally likely (leading
    zeros included: the whole code space counts against guessing)."""
    return f"{rng.randbelow(10**length):0{length}d}"


def uuid4(rng: Randomness) -> str:
    """A version 4 UUID made from ``rng``'s bytes."""
    return str(uuid.UUID(bytes=rng.token_bytes(16), version=4))
