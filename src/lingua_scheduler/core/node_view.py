"""One node as a published fleet view shows it, and the chunked map the views are built from.

Owns ``NodeView`` (one node's capabilities, status and pools at a version) and ``ChunkedMap`` with its
``ChunkedMapEvolver`` (an immutable map whose next version copies only the chunks it changes). Both sit
below pools.py and fleet_view.py, which use them; this module imports neither.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar, overload

from lingua_scheduler.core.capabilities import Capabilities
from lingua_scheduler.core.load import NodeLoad
from lingua_scheduler.core.status import NodeStatus

V = TypeVar("V")
T = TypeVar("T")
#: chunks of a ``ChunkedMap``: a publication copies ~fleet/256 entries per chunk it changes
CHUNKS = 256
_MASK = CHUNKS - 1
_EMPTY_CHUNKS: tuple[dict[str, object], ...] = tuple({} for _ in range(CHUNKS))


class ChunkedMap(Mapping[str, V]):
    """An immutable map split into chunks by key hash, so that a new version copies only the chunks
    that changed instead of the whole map (a 50,000-node dict copy takes ~1 ms of the event loop)."""

    __slots__ = ("_chunks", "_len")

    def __init__(self, chunks: tuple[dict[str, V], ...] | None = None, length: int = 0) -> None:
        # chunks are never written in place (the evolver copies first), so empty ones can be shared
        self._chunks: tuple[dict[str, V], ...] = chunks if chunks is not None else _EMPTY_CHUNKS  # type: ignore[assignment]
        self._len = length

    def __getitem__(self, key: str) -> V:
        return self._chunks[hash(key) & _MASK][key]

    @overload
    def get(self, key: str, /) -> V | None: ...
    @overload
    def get(self, key: str, /, default: V | T) -> V | T: ...
    def get(self, key: str, /, default: object = None) -> object:
        return self._chunks[hash(key) & _MASK].get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._chunks[hash(key) & _MASK]

    def __iter__(self) -> Iterator[str]:
        for chunk in self._chunks:
            yield from chunk

    def __len__(self) -> int:
        return self._len

    def evolver(self) -> ChunkedMapEvolver[V]:
        return ChunkedMapEvolver(self._chunks, self._len)


class ChunkedMapEvolver(Generic[V]):
    """Writes for the next version of a ``ChunkedMap``; a chunk is copied on its first write.

    Use once: ``build()`` hands the chunks over, so do not write through the evolver afterwards.
    """

    __slots__ = ("_chunks", "_copied", "_len")

    def __init__(self, chunks: tuple[dict[str, V], ...], length: int) -> None:
        self._chunks = list(chunks)
        self._copied: set[int] = set()
        self._len = length

    def _own(self, key: str) -> dict[str, V]:
        i = hash(key) & _MASK
        if i not in self._copied:
            self._chunks[i] = dict(self._chunks[i])
            self._copied.add(i)
        return self._chunks[i]

    def get(self, key: str) -> V | None:
        return self._chunks[hash(key) & _MASK].get(key)

    def set(self, key: str, value: V) -> None:
        chunk = self._own(key)
        self._len += key not in chunk
        chunk[key] = value

    def delete(self, key: str) -> None:
        chunk = self._own(key)
        if chunk.pop(key, None) is not None:
            self._len -= 1

    @property
    def changed(self) -> bool:
        return bool(self._copied)

    def build(self) -> ChunkedMap[V]:
        return ChunkedMap(tuple(self._chunks), self._len)


@dataclass(frozen=True, slots=True)
class NodeView:
    node_id: str
    version: int
    status: NodeStatus
    caps: Capabilities
    has_gpu: bool
    accept_public_jobs: bool
    max_concurrent_jobs: int
    #: live load cell shared with the registry (see load.py)
    load: NodeLoad
    #: pool (shard) ids this node is a member of in this view, sorted
    pools: tuple[str, ...] = ()
    #: instance owning the node's socket (None = this instance)
    owner: str | None = None
