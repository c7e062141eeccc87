"""The embedded store: entries in this process, an LRU bounded in bytes, numpy/HNSW indexes."""

from __future__ import annotations

import heapq
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Mapping

from services.cache.store.base import COUNTERS, Entry, LocalIndexes, NamespaceCounters, StoreOptions, Vector


class MemoryStore:
    def __init__(self, options: StoreOptions) -> None:
        self.options = options
        self._entries: dict[str, Entry] = {}
        # Per tenant, least recently used first; and the bytes each tenant holds.
        self._lru: dict[str, OrderedDict[str, None]] = defaultdict(OrderedDict)
        self._tenant_bytes: Counter[str] = Counter()
        self._by_key: dict[str, str] = {}
        self._by_ns: dict[tuple[str, str], set[str]] = defaultdict(set)
        self._by_attr: dict[tuple[str, str, str], set[str]] = defaultdict(set)
        self._expiry: list[tuple[float, str]] = []
        self._counters: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
        self._versions: dict[tuple[str, str], int] = {}
        self._bytes = 0
        self.indexes = LocalIndexes(options.dim, options.ann)

    async def start(self) -> None:
        return None

    async def ping(self) -> None:
        """Always answers: this process is the backend."""

    async def close(self) -> None:
        return None

    @property
    def bytes(self) -> int:
        return self._bytes

    def _remove(self, entry_id: str) -> Entry | None:
        entry = self._entries.pop(entry_id, None)
        if entry is None:
            return None
        if self._by_key.get(entry.key) == entry_id:
            del self._by_key[entry.key]
        ns = self._by_ns.get((entry.tenant_id, entry.namespace))
        if ns is not None:
            ns.discard(entry_id)
        for k, v in entry.attributes.items():
            ids = self._by_attr.get((entry.tenant_id, k, v))
            if ids is not None:
                ids.discard(entry_id)
                if not ids:
                    del self._by_attr[(entry.tenant_id, k, v)]
        self.indexes.remove(entry_id)
        self._bytes -= entry.size
        lru = self._lru.get(entry.tenant_id)
        if lru is not None:
            lru.pop(entry_id, None)
            if not lru:
                del self._lru[entry.tenant_id]
        self._tenant_bytes[entry.tenant_id] -= entry.size
        if self._tenant_bytes[entry.tenant_id] <= 0:
            del self._tenant_bytes[entry.tenant_id]
        return entry

    def tenant_bytes(self, tenant_id: str) -> int:
        return self._tenant_bytes.get(tenant_id, 0)

    def _evict_oldest_of(self, tenant_id: str) -> bool:
        lru = self._lru.get(tenant_id)
        if not lru:
            return False
        victim = self._remove(next(iter(lru)))
        if victim is not None:
            self._counters[(victim.tenant_id, victim.namespace)]["evictions"] += 1
        return True

    def _expire(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            _, entry_id = heapq.heappop(self._expiry)
            entry = self._entries.get(entry_id)
            if entry is not None and entry.expires_at <= now:
                self._remove(entry_id)

    async def put(self, entry: Entry, now: float) -> None:
        self._expire(now)
        previous = self._by_key.get(entry.key)
        if previous is not None:
            self._remove(previous)
        self._entries[entry.id] = entry
        self._by_key[entry.key] = entry.id
        self._by_ns[(entry.tenant_id, entry.namespace)].add(entry.id)
        for k, v in entry.attributes.items():
            self._by_attr[(entry.tenant_id, k, v)].add(entry.id)
        heapq.heappush(self._expiry, (entry.expires_at, entry.id))
        if entry.vector is not None:
            self.indexes.add(entry.id, entry.partition, entry.vector)
        self._bytes += entry.size
        self._lru[entry.tenant_id][entry.id] = None
        self._tenant_bytes[entry.tenant_id] += entry.size
        quota = self.options.tenant_quota(entry.tenant_id)
        while quota and self._tenant_bytes.get(entry.tenant_id, 0) > quota:
            if not self._evict_oldest_of(entry.tenant_id):
                break
        # Over the whole bound, the heaviest tenant gives way: a tenant under its fair share
        # never loses entries to another's traffic.
        while self._bytes > self.options.max_bytes and self._tenant_bytes:
            heaviest, _ = self._tenant_bytes.most_common(1)[0]
            if not self._evict_oldest_of(heaviest):
                break

    def _live(self, entry_id: str, now: float) -> Entry | None:
        entry = self._entries.get(entry_id)
        if entry is None:
            return None
        if entry.expires_at <= now:
            self._remove(entry_id)
            return None
        return entry

    async def get(self, tenant_id: str, key: str, now: float) -> Entry | None:
        entry_id = self._by_key.get(key)
        if entry_id is None:
            return None
        entry = self._live(entry_id, now)
        if entry is not None and entry.tenant_id != tenant_id:
            return None
        if entry is not None:
            self._used(entry)
        return entry

    def _used(self, entry: Entry) -> None:
        lru = self._lru.get(entry.tenant_id)
        if lru is not None and entry.id in lru:
            lru.move_to_end(entry.id)

    def has_vectors(self, partition: str) -> bool:
        return self.indexes.has(partition)

    async def search(
        self, tenant_id: str, partition: str, vector: Vector, k: int, now: float
    ) -> list[tuple[Entry, float]]:
        out = []
        for entry_id, score in self.indexes.search(partition, vector, k):
            entry = self._live(entry_id, now)
            if entry is not None and entry.tenant_id == tenant_id:
                out.append((entry, score))
        return out

    async def touch(self, tenant_id: str, entry_id: str, now: float) -> None:
        entry = self._entries.get(entry_id)
        if entry is not None and entry.tenant_id == tenant_id:
            self._used(entry)

    async def delete_ids(self, tenant_id: str, ids: list[str]) -> int:
        deleted = 0
        for entry_id in ids:
            entry = self._entries.get(entry_id)
            if entry is not None and entry.tenant_id == tenant_id and self._remove(entry_id) is not None:
                deleted += 1
        return deleted

    async def delete_namespace(self, tenant_id: str, namespace: str) -> int:
        ids = list(self._by_ns.pop((tenant_id, namespace), set()))
        return await self.delete_ids(tenant_id, ids)

    async def delete_attribute(self, tenant_id: str, namespace: str | None, key: str, value: str) -> int:
        ids = [
            entry_id
            for entry_id in self._by_attr.get((tenant_id, key, value), set())
            if namespace is None or self._entries[entry_id].namespace == namespace
        ]
        return await self.delete_ids(tenant_id, ids)

    async def count(self, tenant_id: str, namespace: str, counters: Mapping[str, int]) -> None:
        bucket = self._counters[(tenant_id, namespace)]
        for name, value in counters.items():
            if name in COUNTERS and value:
                bucket[name] += value

    async def stats(self, tenant_id: str, namespace: str | None, now: float) -> list[NamespaceCounters]:
        self._expire(now)
        names = {ns for (t, ns) in self._counters if t == tenant_id} | {
            ns for (t, ns), ids in self._by_ns.items() if t == tenant_id and ids
        }
        if namespace is not None:
            names = {namespace}
        out = []
        for ns in sorted(names):
            counters = self._counters.get((tenant_id, ns), Counter())
            ids = self._by_ns.get((tenant_id, ns), set())
            out.append(
                NamespaceCounters(
                    namespace=ns,
                    entries=len(ids),
                    bytes=sum(self._entries[i].size for i in ids),
                    **{name: counters.get(name, 0) for name in COUNTERS},
                )
            )
        return out

    async def version(self, tenant_id: str, key: str) -> int:
        return self._versions.get((tenant_id, key), 0)

    async def bump_version(self, tenant_id: str, key: str) -> int:
        self._versions[(tenant_id, key)] = self._versions.get((tenant_id, key), 0) + 1
        return self._versions[(tenant_id, key)]
