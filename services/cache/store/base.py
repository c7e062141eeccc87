"""The store contract, the entry record, and the per-replica vector indexes both stores use."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from services.cache.index import AnnParams, VectorIndex

Vector = npt.NDArray[np.float32]

KIND_ANSWER = "answer"
KIND_TOOL = "tool"
KIND_RETRIEVAL = "retrieval"

# Fixed cost counted for every entry on top of its payload (keys, bookkeeping).
ENTRY_OVERHEAD_BYTES = 256

COUNTERS = ("lookups", "exact_hits", "semantic_hits", "guard_rejections", "evictions")


@dataclass
class Entry:
    """One cached answer, tool result or retrieval result."""

    id: str
    kind: str
    tenant_id: str
    namespace: str
    # Exact key (unique among live entries); for answers it includes the partition.
    key: str
    payload: bytes
    created_at: float
    expires_at: float
    # Answers only: the hard partition, the user turn (for the guards) and its embedding
    # (standalone turns only).
    partition: str = ""
    text: str = ""
    vector: Vector | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        vector = 0 if self.vector is None else int(self.vector.nbytes)
        attrs = sum(len(k) + len(v) for k, v in self.attributes.items())
        return ENTRY_OVERHEAD_BYTES + len(self.payload) + len(self.text.encode()) + vector + attrs


@dataclass
class NamespaceCounters:
    namespace: str
    lookups: int = 0
    exact_hits: int = 0
    semantic_hits: int = 0
    guard_rejections: int = 0
    entries: int = 0
    bytes: int = 0
    evictions: int = 0


@dataclass(frozen=True)
class StoreOptions:
    max_bytes: int = 256 * 1024 * 1024
    # Bytes one tenant's entries may take (0 = no quota), and per-tenant overrides: a tenant at
    # its quota evicts its own least recently used entries, never another tenant's.
    max_tenant_bytes: int = 0
    tenant_max_bytes: Mapping[str, int] = field(default_factory=dict)
    dim: int = 384
    ann: AnnParams = field(default_factory=AnnParams)

    def tenant_quota(self, tenant_id: str) -> int:
        """The bytes `tenant_id` may hold; 0 when only the whole cache's bound applies."""
        return self.tenant_max_bytes.get(tenant_id, self.max_tenant_bytes)

    # Redis: blocking read of the change stream, and how much of it is kept.
    sync_block: float = 1.0
    stream_maxlen: int = 20_000
    # Redis: connections (a blocking pool: past them calls wait, up to `timeout`) and the longest
    # one call may take.
    pool_size: int = 128
    timeout: float = 2.0


class CacheStore(Protocol):
    """Entries by exact key and by vector, bounded in bytes (LRU), with TTLs and counters.

    `now` is wall-clock seconds from the caller's clock; expired entries are never returned.
    """

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Returns when the backend answers, raises when it does not (readiness checks it)."""
        ...

    async def put(self, entry: Entry, now: float) -> None:
        """Stores `entry`, replacing any live entry with the same key. Beyond its tenant's quota
        the tenant's own least recently used entries are evicted; beyond the whole cache's bound,
        those of the tenant holding the most bytes (evictions count in their namespaces)."""

    async def get(self, tenant_id: str, key: str, now: float) -> Entry | None:
        """The live entry stored under `key` by `tenant_id` (the tenant routes the call to its
        shard on a Redis Cluster; another tenant's entry under the same key is not returned)."""
        ...

    def has_vectors(self, partition: str) -> bool:
        """Whether this replica's index holds any vector of `partition` (if not, skip embedding)."""
        ...

    async def search(
        self, tenant_id: str, partition: str, vector: Vector, k: int, now: float
    ) -> list[tuple[Entry, float]]:
        """Up to k live entries of `tenant_id`'s `partition` nearest to `vector`, with cosine similarity."""
        ...

    async def touch(self, tenant_id: str, entry_id: str, now: float) -> None:
        """Marks an entry as recently used (a semantic hit)."""

    async def delete_ids(self, tenant_id: str, ids: list[str]) -> int:
        """Deletes those of `ids` that belong to `tenant_id`; returns how many were deleted."""
        ...

    async def delete_namespace(self, tenant_id: str, namespace: str) -> int: ...

    async def delete_attribute(self, tenant_id: str, namespace: str | None, key: str, value: str) -> int: ...

    async def count(self, tenant_id: str, namespace: str, counters: Mapping[str, int]) -> None:
        """Adds to the per-namespace counters (names from COUNTERS)."""

    async def stats(self, tenant_id: str, namespace: str | None, now: float) -> list[NamespaceCounters]: ...

    async def version(self, tenant_id: str, key: str) -> int: ...

    async def bump_version(self, tenant_id: str, key: str) -> int: ...


class LocalIndexes:
    """Per-partition vector indexes of one replica, addressed by entry id."""

    def __init__(self, dim: int, ann: AnnParams) -> None:
        self.dim = dim
        self.ann = ann
        self._indexes: dict[str, VectorIndex] = {}
        self._labels: dict[str, tuple[str, int]] = {}
        self._ids: dict[int, str] = {}
        self._next = itertools.count(1)

    def __len__(self) -> int:
        return len(self._labels)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._labels

    def add(self, entry_id: str, partition: str, vector: Vector) -> None:
        if entry_id in self._labels or vector.ndim != 1:
            return
        index = self._indexes.get(partition)
        if index is None:
            # The partition names the embedder, so its vectors share one dimension.
            index = self._indexes[partition] = VectorIndex(len(vector), self.ann)
        elif index.dim != len(vector):
            return
        label = next(self._next)
        index.add(label, vector)
        self._labels[entry_id] = (partition, label)
        self._ids[label] = entry_id

    def remove(self, entry_id: str) -> None:
        found = self._labels.pop(entry_id, None)
        if found is None:
            return
        partition, label = found
        self._ids.pop(label, None)
        index = self._indexes.get(partition)
        if index is not None:
            index.remove(label)
            if len(index) == 0:
                del self._indexes[partition]

    def search(self, partition: str, vector: Vector, k: int) -> list[tuple[str, float]]:
        index = self._indexes.get(partition)
        if index is None or index.dim != len(vector):
            return []
        out = []
        for label, score in index.search(vector, k):
            entry_id = self._ids.get(label)
            if entry_id is not None:
                out.append((entry_id, score))
        return out

    def has(self, partition: str) -> bool:
        return partition in self._indexes

    def index(self, partition: str) -> VectorIndex | None:
        return self._indexes.get(partition)

    def clear(self) -> None:
        self._indexes.clear()
        self._labels.clear()
        self._ids.clear()
