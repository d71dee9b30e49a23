"""Stable hashing for pools: FNV-1a 64 of the key's UTF-8 bytes followed by the seed, as the reference does.

Owns: ``fnv1a64`` and the helpers built on it (bucket of a key, index of a key, probe and ring orders).
Bit-for-bit compatible with the reference scheduler (docs/design.md) so instances and tools agree on
buckets.

Must never: use Python's ``hash()`` (salted per process) or anything else that differs between runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import TypeVar

T = TypeVar("T")

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
_MASK = (1 << 64) - 1


def fnv1a64_bytes(data: bytes) -> int:
    """Plain FNV-1a 64 of ``data``."""
    h = FNV_OFFSET
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & _MASK
    return h


@lru_cache(maxsize=8192)
def fnv1a64(key: str, seed: int = 0) -> int:
    """FNV-1a 64 over ``UTF-8(key)`` followed by ``seed`` as 8 bytes little-endian.

    Cached: routing keys (tenants, sessions) repeat for every utterance, and pure Python costs ~50 ns
    per byte.
    """
    return fnv1a64_bytes(key.encode("utf-8") + (seed & _MASK).to_bytes(8, "little"))


def pool_id_for_key(pool_count: int, seed: int, key: str) -> int:
    """Hash bucket of ``key`` among ``pool_count`` buckets."""
    return fnv1a64(key, seed) % max(pool_count, 1)


def pick_index_for_key(n: int, seed: int, key: str) -> int:
    """Stable index of ``key`` into a list of ``n`` items (0 when the list is empty)."""
    return fnv1a64(key, seed) % max(n, 1)


def probe_order(pool_count: int, preferred: int) -> list[int]:
    """Buckets to try: the preferred one, then each following one, wrapping around."""
    if pool_count <= 0:
        return []
    start = preferred % pool_count
    return [(start + i) % pool_count for i in range(pool_count)]


def ring_order(items: Sequence[T], start: int) -> list[T]:
    """``items`` rotated so that ``items[start mod n]`` comes first."""
    return list(iter_ring(items, start))


def iter_ring(items: Sequence[T], start: int) -> Iterator[T]:
    """Lazy ``ring_order``: selection usually stops at the first item, so build nothing up front."""
    n = len(items)
    if n == 0:
        return
    s = start % n
    for i in range(n):
        yield items[(s + i) % n]
