"""The cache's logic: exact then semantic lookups, what may be stored, TTLs, tool and
retrieval results, deletion and counters. No gRPC here; time comes from an injected clock."""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from services.cache import guards
from services.cache.config import CacheSettings
from services.cache.embedder import Embedder
from services.cache.keys import (
    ChatRequest,
    Message,
    NotCacheableError,
    RequestKeys,
    ScopeId,
    index_version_key,
    is_deterministic,
    request_keys,
    retrieval_key,
    tool_key,
)
from services.cache.store import CacheStore, Entry, NamespaceCounters
from services.cache.store.base import KIND_ANSWER, KIND_RETRIEVAL, KIND_TOOL, Vector

K = TypeVar("K")
V = TypeVar("V")

FINISH_STOP = "stop"

TIER_EXACT = "exact"
TIER_SEMANTIC = "semantic"


@dataclass(frozen=True)
class Answer:
    """What Store is asked to keep: the serialized answer and what decides if it may be kept."""

    payload: bytes
    finish_reason: str
    has_tool_calls: bool
    content: str


@dataclass(frozen=True)
class LookupResult:
    hit: bool
    tier: str = ""
    similarity: float = 0.0
    entry: Entry | None = None
    miss_reason: str = ""


@dataclass(frozen=True)
class StoreResult:
    stored: bool
    entry_id: str = ""
    not_stored_reason: str = ""


@dataclass(frozen=True)
class ValueResult:
    payload: bytes
    created_at: float
    expires_at: float


def _message_bytes(message: Message) -> int:
    """About what a message held in memory costs: its texts plus a fixed cost."""
    return 128 + len(message.content) + sum(len(c.arguments_json) for c in message.tool_calls)


def _text_bytes(request: ChatRequest) -> int:
    """About what a request held in memory costs: its texts plus a fixed cost per message."""
    size = 256 + len(request.model) + sum(_message_bytes(message) for message in request.messages)
    for tool in request.tools:
        size += 128 + len(tool.description) + len(tool.parameters_json_schema)
    return size


class _Remembered(Generic[K, V]):
    """Recent results by their input, least recently used first out, within a budget of bytes
    that the inputs hold (0: nothing is remembered)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.held = 0
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K) -> V | None:
        found = self._items.get(key)
        if found is None:
            return None
        self._items.move_to_end(key)
        return found[0]

    def put(self, key: K, value: V, size: int) -> None:
        if size > self.budget or key in self._items:
            return
        self._items[key] = (value, size)
        self.held += size
        while self.held > self.budget:
            _, (_, dropped) = self._items.popitem(last=False)
            self.held -= dropped


class CacheEngine:
    def __init__(
        self,
        settings: CacheSettings,
        store: CacheStore,
        embedder: Embedder,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.embedder = embedder
        self.clock = clock
        self._embeddings: OrderedDict[str, Vector] = OrderedDict()
        # Recent requests' keys (keys_cache_bytes), and recent turns' normalised forms
        # (turns_cache_bytes): a session's next chat repeats its earlier turns.
        self._keys: _Remembered[ChatRequest, RequestKeys] = _Remembered(settings.keys_cache_bytes)
        self._turns: _Remembered[Message, list[Any]] = _Remembered(settings.turns_cache_bytes)

    async def _embed(self, text: str) -> Vector:
        # Store usually follows a Lookup of the same turn: remember recent embeddings.
        cached = self._embeddings.get(text)
        if cached is not None:
            self._embeddings.move_to_end(text)
            return cached
        vector: Vector = (await self.embedder.embed([text]))[0]
        self._embeddings[text] = vector
        while len(self._embeddings) > self.settings.embed_cache_entries:
            self._embeddings.popitem(last=False)
        return vector

    # --- policy -------------------------------------------------------------

    def threshold(self, scope: ScopeId, override: float) -> float:
        if override > 0:
            return override
        policy = self.settings.policy.namespaces
        for key in (f"{scope.tenant_id}/{scope.namespace}", scope.namespace):
            found = policy.get(key)
            if found is not None and found.threshold is not None:
                return found.threshold
        return self.settings.threshold

    def ttl(self, scope: ScopeId, requested: float | None, default: float | None = None) -> float:
        """Requested TTL, else the default (namespace's, then the service's), capped per tenant."""
        if default is None:
            default = self.settings.default_ttl
            policy = self.settings.policy.namespaces
            for key in (f"{scope.tenant_id}/{scope.namespace}", scope.namespace):
                found = policy.get(key)
                if found is not None and found.default_ttl is not None:
                    default = found.default_ttl
                    break
        ttl = requested if requested is not None and requested > 0 else default
        cap = self.settings.policy.tenant_max_ttl.get(scope.tenant_id, self.settings.max_ttl)
        return min(ttl, cap)

    def keys(self, request: ChatRequest) -> RequestKeys:
        """The request's keys; raises NotCacheableError. A Store usually follows the Lookup of the
        same request: its keys are remembered (comparing two requests costs a twentieth of
        normalising and hashing a session's context again). A session's next chat sends its
        earlier turns again: their normalised forms are remembered too, so only the new turns
        are normalised."""
        keys = self._keys.get(request)
        if keys is None:
            keys = request_keys(request, space=self.embedder.name, canonical=self._canonical)
            self._keys.put(request, keys, _text_bytes(request))
        return keys

    def _canonical(self, message: Message) -> list[Any]:
        form = self._turns.get(message)
        if form is None:
            form = message.canonical()
            self._turns.put(message, form, _message_bytes(message))
        return form

    # --- answers ------------------------------------------------------------

    async def lookup(
        self, request: ChatRequest, *, semantic: bool, allow_nondeterministic: bool, threshold: float = 0.0
    ) -> LookupResult:
        scope = request.scope
        counts = {"lookups": 1}
        try:
            result = await self._lookup(request, semantic, allow_nondeterministic, threshold, counts)
        finally:
            await self.store.count(scope.tenant_id, scope.namespace, counts)
        return result

    async def _lookup(
        self,
        request: ChatRequest,
        semantic: bool,
        allow_nondeterministic: bool,
        threshold: float,
        counts: dict[str, int],
    ) -> LookupResult:
        if not allow_nondeterministic and not is_deterministic(request.params):
            return LookupResult(
                False, miss_reason="temperature > 0 (set allow_nondeterministic to use the cache)"
            )
        try:
            keys = self.keys(request)
        except NotCacheableError as exc:
            return LookupResult(False, miss_reason=f"not cacheable: {exc}")
        now = self.clock()
        entry = await self.store.get(request.scope.tenant_id, keys.exact, now)
        if (
            entry is not None
            and entry.partition == keys.partition
            and entry.tenant_id == request.scope.tenant_id
        ):
            counts["exact_hits"] = 1
            return LookupResult(True, TIER_EXACT, 1.0, entry)
        if not semantic:
            return LookupResult(False, miss_reason="no exact match (semantic tier not requested)")
        if not keys.standalone and not self.settings.semantic_follow_ups:
            return LookupResult(
                False, miss_reason="no exact match; follow-up turns are served by the exact tier only"
            )
        if len(keys.text) > self.settings.semantic_max_chars:
            # The embedding only sees the first ~256 tokens: two long turns that differ later
            # would look identical to it.
            return LookupResult(
                False, miss_reason="no exact match; the turn is too long for the semantic tier"
            )
        if not self.store.has_vectors(keys.partition):
            # Nothing to compare with in this partition: skip the embedding.
            return LookupResult(False, miss_reason="no similar entry")
        vector = await self._embed(keys.text)
        needed = self.threshold(request.scope, threshold)
        candidates = await self.store.search(
            request.scope.tenant_id, keys.partition, vector, self.settings.candidates, self.clock()
        )
        best = 0.0
        rejected = ""
        for candidate, similarity in candidates:
            # The index is per partition already; checking again makes a leak impossible
            # even if an index were out of sync with its store.
            if candidate.partition != keys.partition or candidate.tenant_id != request.scope.tenant_id:
                continue
            best = max(best, similarity)
            if similarity < needed:
                continue
            verdict = guards.check(keys.text, candidate.text)
            if not verdict.ok:
                counts["guard_rejections"] = counts.get("guard_rejections", 0) + 1
                rejected = rejected or verdict.guard
                continue
            counts["semantic_hits"] = 1
            await self.store.touch(candidate.tenant_id, candidate.id, self.clock())
            return LookupResult(True, TIER_SEMANTIC, similarity, candidate)
        if rejected:
            return LookupResult(
                False, similarity=best, miss_reason=f"similar entry rejected by the {rejected} guard"
            )
        if candidates:
            return LookupResult(
                False, similarity=best, miss_reason=f"best similarity {best:.3f} below {needed:.3f}"
            )
        return LookupResult(False, miss_reason="no similar entry")

    async def store_answer(
        self,
        request: ChatRequest,
        answer: Answer,
        *,
        ttl: float | None,
        attributes: Mapping[str, str],
        allow_nondeterministic: bool,
        semantic: bool = True,
    ) -> StoreResult:
        if answer.finish_reason != FINISH_STOP:
            return StoreResult(False, not_stored_reason=f"finish reason is {answer.finish_reason}, not stop")
        if answer.has_tool_calls:
            return StoreResult(False, not_stored_reason="the answer calls tools")
        if not answer.content.strip():
            return StoreResult(False, not_stored_reason="the answer is empty")
        if not allow_nondeterministic and not is_deterministic(request.params):
            return StoreResult(
                False, not_stored_reason="temperature > 0 (set allow_nondeterministic to store)"
            )
        try:
            keys = self.keys(request)
        except NotCacheableError as exc:
            return StoreResult(False, not_stored_reason=f"not cacheable: {exc}")
        now = self.clock()
        entry = Entry(
            id=uuid.uuid4().hex,
            kind=KIND_ANSWER,
            tenant_id=request.scope.tenant_id,
            namespace=request.scope.namespace,
            key=keys.exact,
            payload=answer.payload,
            created_at=now,
            expires_at=now + self.ttl(request.scope, ttl),
            partition=keys.partition,
            text=keys.text,
            attributes=dict(attributes),
        )
        if entry.size > self.settings.max_entry_bytes:
            return StoreResult(
                False, not_stored_reason=f"entry of {entry.size} bytes exceeds the per-entry limit"
            )
        if (
            semantic
            and (keys.standalone or self.settings.semantic_follow_ups)
            and len(keys.text) <= self.settings.semantic_max_chars
        ):
            entry.vector = await self._embed(keys.text)
        await self.store.put(entry, now)
        return StoreResult(True, entry_id=entry.id)

    # --- tool and retrieval results ----------------------------------------

    def tool_ttl(self, scope: ScopeId, tool_name: str, requested: float | None) -> float:
        default = self.settings.policy.tool_ttl.get(tool_name, self.settings.tool_ttl)
        if default <= 0 and (requested is None or requested <= 0):
            return 0.0
        return self.ttl(scope, requested, default)

    async def get_value(self, scope: ScopeId, key: str) -> ValueResult | None:
        entry = await self.store.get(scope.tenant_id, key, self.clock())
        if entry is None:
            return None
        return ValueResult(entry.payload, entry.created_at, entry.expires_at)

    async def put_value(self, scope: ScopeId, kind: str, key: str, payload: bytes, ttl: float) -> bool:
        if ttl <= 0:
            return False
        now = self.clock()
        entry = Entry(
            id=uuid.uuid4().hex,
            kind=kind,
            tenant_id=scope.tenant_id,
            namespace=scope.namespace,
            key=key,
            payload=payload,
            created_at=now,
            expires_at=now + ttl,
        )
        if entry.size > self.settings.max_entry_bytes:
            return False
        await self.store.put(entry, now)
        return True

    async def get_tool(self, scope: ScopeId, tool_name: str, arguments_json: str) -> ValueResult | None:
        return await self.get_value(scope, tool_key(scope, tool_name, arguments_json))

    async def put_tool(
        self,
        scope: ScopeId,
        tool_name: str,
        arguments_json: str,
        payload: bytes,
        ttl: float | None,
        *,
        is_error: bool = False,
    ) -> bool:
        key = tool_key(scope, tool_name, arguments_json)
        seconds = self.tool_ttl(scope, tool_name, ttl)
        if is_error:
            # A failure is worth remembering briefly (no retry storm), not for the tool's full TTL.
            seconds = min(seconds, self.settings.tool_error_ttl)
        return await self.put_value(scope, KIND_TOOL, key, payload, seconds)

    async def current_version(self, scope: ScopeId, index_name: str) -> str:
        return f"v{await self.store.version(scope.tenant_id, index_version_key(scope, index_name))}"

    async def bump_version(self, scope: ScopeId, index_name: str) -> str:
        return f"v{await self.store.bump_version(scope.tenant_id, index_version_key(scope, index_name))}"

    async def get_retrieval(
        self, scope: ScopeId, index_name: str, version: str, query: str, top_k: int
    ) -> tuple[ValueResult | None, str]:
        version = version or await self.current_version(scope, index_name)
        found = await self.get_value(scope, retrieval_key(scope, index_name, version, query, top_k))
        return found, version

    async def put_retrieval(
        self,
        scope: ScopeId,
        index_name: str,
        version: str,
        query: str,
        top_k: int,
        payload: bytes,
        ttl: float | None,
    ) -> tuple[bool, str]:
        version = version or await self.current_version(scope, index_name)
        key = retrieval_key(scope, index_name, version, query, top_k)
        stored = await self.put_value(
            scope, KIND_RETRIEVAL, key, payload, self.ttl(scope, ttl, self.settings.retrieval_ttl)
        )
        return stored, version

    # --- lifecycle ------------------------------------------------------------

    async def delete_namespace(self, tenant_id: str, namespace: str) -> int:
        return await self.store.delete_namespace(tenant_id, namespace)

    async def delete_entry(self, tenant_id: str, entry_id: str) -> int:
        return await self.store.delete_ids(tenant_id, [entry_id])

    async def delete_attribute(self, tenant_id: str, namespace: str | None, key: str, value: str) -> int:
        return await self.store.delete_attribute(tenant_id, namespace, key, value)

    async def stats(self, tenant_id: str, namespace: str | None) -> list[NamespaceCounters]:
        return await self.store.stats(tenant_id, namespace, self.clock())
