"""Settings of the limiter service, from BALLAST_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.kit.config import Env, ServerSettings

FAIL_MODES = ("local", "open", "closed")
DEFAULT_TIERS_FILE = "config/limiter_tiers.yaml"


@dataclass(frozen=True)
class LimiterSettings:
    server: ServerSettings
    # Counters and buckets: memory:// (one process) or redis://host:6379/0 (shared by replicas).
    store_url: str = "memory://"
    # The tiers file (YAML); re-read when its modification time changes.
    tiers_file: str = DEFAULT_TIERS_FILE
    # envoyproxy/ratelimit config: one YAML file or a directory of them; empty = no Envoy limits.
    envoy_config: str = ""
    # How often the tiers and Envoy files are checked for changes.
    reload_interval: float = 1.0
    # A store call slower than this counts as a store failure (the fail mode decides).
    store_timeout: float = 0.25
    # Connections to Redis per replica (per cluster node); past them a call waits for one.
    redis_pool_size: int = 64
    # After a store failure, decide by the fail mode for this long before trying the store again.
    store_retry_interval: float = 1.0
    # What to do while the shared store is unreachable: a local per-replica limit, allow, or deny.
    fail_mode: str = "local"
    # Replicas sharing the store: the local fallback enforces limit/replicas per replica.
    replicas: int = 1
    # This replica's share of each limit while it decides alone (0 = 1/replicas).
    local_share: float = 0.0
    # Most limits remembered (what the store last said was left) and most local charges kept
    # for write-back during an outage: bounds the replica's memory.
    outage_memory: int = 100_000
    # Sub-buckets per sliding window (precision: a window is counted over W..W+W/buckets).
    window_buckets: int = 20
    # How long a Check's request_id is remembered (retries within it are not counted twice).
    idempotency_ttl: float = 600.0
    # How often each replica re-reads the provider headroom shared through the store.
    headroom_refresh: float = 1.0
    # Input bounds ("absurd sizes" are rejected with INVALID_ARGUMENT).
    max_requests: int = 10_000
    max_tokens: int = 100_000_000
    max_tool_calls: int = 10_000
    max_id_length: int = 256
    max_descriptors: int = 64
    max_entries: int = 32

    @classmethod
    def from_env(cls, env: Env) -> LimiterSettings:
        p = "BALLAST_LIMITER_"
        settings = cls._read(env, p)
        # The files are validated with the variables, so a bad file stops start-up with the
        # same one-line-per-problem report (the service re-reads them when they change).
        from services.limiter.envoy_config import EnvoyConfigError, load_envoy_config
        from services.limiter.tiers import TiersError, load_tiers

        try:
            load_tiers(tiers_path(settings.tiers_file))
        except TiersError as exc:
            env.problems.extend(
                f"{p}TIERS_FILE={settings.tiers_file!r} is invalid: {problem}" for problem in exc.problems
            )
        if not settings.store_url.startswith("memory:"):
            from services.kit.redisconn import cluster_option, split_key_prefix
            from services.limiter.store.library import check_url

            try:
                check_url(cluster_option(split_key_prefix(settings.store_url)[0])[0])
            except ValueError as exc:
                env.problems.append(f"{p}STORE={settings.store_url!r} is invalid: {exc}")
        if settings.envoy_config:
            try:
                load_envoy_config(Path(settings.envoy_config))
            except EnvoyConfigError as exc:
                env.problems.append(f"{p}ENVOY_CONFIG={settings.envoy_config!r} is invalid: {exc}")
        return settings

    @classmethod
    def _read(cls, env: Env, p: str) -> LimiterSettings:
        # Each default is the field's own (cls.<field>), written once above.
        return cls(
            server=ServerSettings.from_env("limiter", env),
            store_url=env.url(f"{p}STORE", cls.store_url, ["memory", "redis", "rediss", "unix"]),
            tiers_file=env.string(f"{p}TIERS_FILE", cls.tiers_file),
            envoy_config=env.string(f"{p}ENVOY_CONFIG", cls.envoy_config),
            reload_interval=env.duration(f"{p}RELOAD_INTERVAL", cls.reload_interval, minimum=0.01),
            store_timeout=env.duration(f"{p}STORE_TIMEOUT", cls.store_timeout, minimum=0.001),
            redis_pool_size=env.integer(
                f"{p}REDIS_POOL_SIZE", cls.redis_pool_size, minimum=1, maximum=10_000
            ),
            store_retry_interval=env.duration(
                f"{p}STORE_RETRY_INTERVAL", cls.store_retry_interval, minimum=0.0
            ),
            fail_mode=env.choice(f"{p}FAIL_MODE", cls.fail_mode, FAIL_MODES),
            replicas=env.integer(f"{p}REPLICAS", cls.replicas, minimum=1, maximum=10_000),
            local_share=env.number(f"{p}LOCAL_SHARE", cls.local_share, minimum=0.0, maximum=1.0),
            outage_memory=env.integer(f"{p}OUTAGE_MEMORY", cls.outage_memory, minimum=1, maximum=100_000_000),
            window_buckets=env.integer(f"{p}WINDOW_BUCKETS", cls.window_buckets, minimum=1, maximum=600),
            idempotency_ttl=env.duration(f"{p}IDEMPOTENCY_TTL", cls.idempotency_ttl, minimum=1.0),
            headroom_refresh=env.duration(f"{p}HEADROOM_REFRESH", cls.headroom_refresh, minimum=0.01),
            max_requests=env.integer(f"{p}MAX_REQUESTS", cls.max_requests, minimum=1),
            max_tokens=env.integer(f"{p}MAX_TOKENS", cls.max_tokens, minimum=1),
            max_tool_calls=env.integer(f"{p}MAX_TOOL_CALLS", cls.max_tool_calls, minimum=1),
            max_id_length=env.integer(f"{p}MAX_ID_LENGTH", cls.max_id_length, minimum=8, maximum=4096),
            max_descriptors=env.integer(f"{p}MAX_DESCRIPTORS", cls.max_descriptors, minimum=1, maximum=4096),
            max_entries=env.integer(f"{p}MAX_ENTRIES", cls.max_entries, minimum=1, maximum=1024),
        )


def tiers_path(configured: str) -> Path:
    """The configured file; the default relative path also resolves from the source tree, so
    `ballast up` works from any directory (containers run from /app, where config/ is)."""
    path = Path(configured)
    if configured == DEFAULT_TIERS_FILE and not path.exists():
        bundled = Path(__file__).resolve().parents[2] / DEFAULT_TIERS_FILE
        if bundled.exists():
            return bundled
    return path
