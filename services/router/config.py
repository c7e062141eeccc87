"""Settings of the router service, from BALLAST_ROUTER_* environment variables and the catalog file."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.kit.config import PREFIX, Env, ServerSettings
from services.router.catalog import Catalog, CatalogError, default_catalog_path, load_catalog
from services.router.providers.http11 import MAX_HEAD_BYTES

P = f"{PREFIX}ROUTER_"


@dataclass(frozen=True)
class RetrySettings:
    # Attempts across all candidates (breaker skips do not count); RoutingHints.max_attempts overrides.
    max_attempts: int = 4
    backoff_base: float = 0.05
    backoff_max: float = 2.0
    # A retry-after longer than this is not waited for: the next candidate is tried, or the caller
    # gets RESOURCE_EXHAUSTED with the retry-after.
    max_retry_after: float = 5.0
    # A 429 without retry-after cools the target down until the exhausted limit's reset time
    # (x-ratelimit-reset-*, anthropic-ratelimit-*-reset), but never longer than this.
    max_reset_wait: float = 60.0


@dataclass(frozen=True)
class TimeoutSettings:
    # Used when the caller set no gRPC deadline.
    request: float = 120.0
    # Cap on one attempt (the caller's remaining deadline caps it further).
    attempt: float = 60.0
    connect: float = 3.0
    # Streaming: the first content must come within this, then each chunk within idle.
    first_token: float = 30.0
    stream_idle: float = 30.0
    # Stall detection: while a fallback exists, an attempt on a target with a known latency gets at
    # most stall_factor x its EWMA (never less than stall_floor). 0 turns it off.
    stall_factor: float = 8.0
    stall_floor: float = 2.0


@dataclass(frozen=True)
class BreakerSettings:
    failure_threshold: int = 5
    open_for: float = 30.0
    half_open_probes: int = 1
    # Weight of the newest sample in the EWMA latency and error rate.
    ewma_alpha: float = 0.2
    # With no new calls the error rate halves every this many seconds, so a target that lost its
    # traffic to an error streak is tried again instead of staying behind the others for good.
    error_half_life: float = 10.0
    # A provider out of rotation (bad key, out of credit) lets one request through as a probe this
    # often; a probe that succeeds puts it back.
    rotation_probe_interval: float = 300.0


@dataclass(frozen=True)
class RouterSettings:
    server: ServerSettings
    catalog: Catalog | None = None
    catalog_file: str = ""
    retry: RetrySettings = field(default_factory=RetrySettings)
    timeouts: TimeoutSettings = field(default_factory=TimeoutSettings)
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    max_connections: int = 200
    # Largest response head (status line and headers), chunk-size line or trailer section a
    # provider may send; past it the answer is refused as a transport error (16 KiB, h11's limit).
    max_response_head_bytes: int = MAX_HEAD_BYTES
    # Text a provider streams within this long after a delta went out leaves as one delta
    # (services/router/coalesce.py); 0 relays every provider chunk as its own message.
    stream_flush_interval: float = 0.02
    default_max_output_tokens: int = 4096
    report_headroom: bool = True
    # Share of a provider's request/token limit kept for high-priority calls once its headroom
    # runs that low: lower priorities route to other candidates first. 0 = no reserve.
    headroom_reserve: float = 0.2
    headroom_interval: float = 1.0
    # Multiplies every sim latency (0 makes the embedded sims answer at once: tests, benchmarks).
    sim_latency_scale: float = 1.0
    # Where replicas share breaker and back-off hints: memory:// (this replica only) or redis://.
    store_url: str = "memory://"
    hints_interval: float = 1.0

    @classmethod
    def from_env(cls, env: Env) -> RouterSettings:
        # Each default is the field's own (cls.<field>, RetrySettings.<field>, ...), written once above.
        catalog_file = env.string(f"{P}CATALOG_FILE", str(default_catalog_path()))
        catalog: Catalog | None = None
        try:
            catalog = load_catalog(catalog_file, env.raw)
        except CatalogError as exc:
            env.problems.append(f"{P}CATALOG_FILE={catalog_file!r}: " + "; ".join(exc.problems))
        return cls(
            server=ServerSettings.from_env("router", env),
            catalog=catalog,
            catalog_file=catalog_file,
            retry=RetrySettings(
                max_attempts=env.integer(
                    f"{P}MAX_ATTEMPTS", RetrySettings.max_attempts, minimum=1, maximum=20
                ),
                backoff_base=env.duration(f"{P}BACKOFF_BASE", RetrySettings.backoff_base),
                backoff_max=env.duration(f"{P}BACKOFF_MAX", RetrySettings.backoff_max),
                max_retry_after=env.duration(f"{P}MAX_RETRY_AFTER", RetrySettings.max_retry_after),
                max_reset_wait=env.duration(f"{P}MAX_RESET_WAIT", RetrySettings.max_reset_wait),
            ),
            timeouts=TimeoutSettings(
                request=env.duration(f"{P}REQUEST_TIMEOUT", TimeoutSettings.request, minimum=0.001),
                attempt=env.duration(f"{P}ATTEMPT_TIMEOUT", TimeoutSettings.attempt, minimum=0.001),
                connect=env.duration(f"{P}CONNECT_TIMEOUT", TimeoutSettings.connect, minimum=0.001),
                first_token=env.duration(
                    f"{P}FIRST_TOKEN_TIMEOUT", TimeoutSettings.first_token, minimum=0.001
                ),
                stream_idle=env.duration(
                    f"{P}STREAM_IDLE_TIMEOUT", TimeoutSettings.stream_idle, minimum=0.001
                ),
                stall_factor=env.number(f"{P}STALL_FACTOR", TimeoutSettings.stall_factor, minimum=0.0),
                stall_floor=env.duration(f"{P}STALL_FLOOR", TimeoutSettings.stall_floor, minimum=0.001),
            ),
            breaker=BreakerSettings(
                failure_threshold=env.integer(
                    f"{P}BREAKER_FAILURES", BreakerSettings.failure_threshold, minimum=1
                ),
                open_for=env.duration(f"{P}BREAKER_OPEN_FOR", BreakerSettings.open_for),
                half_open_probes=env.integer(
                    f"{P}BREAKER_HALF_OPEN_PROBES", BreakerSettings.half_open_probes, minimum=1
                ),
                ewma_alpha=env.number(
                    f"{P}EWMA_ALPHA", BreakerSettings.ewma_alpha, minimum=0.001, maximum=1.0
                ),
                error_half_life=env.duration(
                    f"{P}ERROR_HALF_LIFE", BreakerSettings.error_half_life, minimum=0.001
                ),
                rotation_probe_interval=env.duration(
                    f"{P}ROTATION_PROBE_INTERVAL", BreakerSettings.rotation_probe_interval, minimum=0.001
                ),
            ),
            max_connections=env.integer(f"{P}MAX_CONNECTIONS", cls.max_connections, minimum=1),
            max_response_head_bytes=env.integer(
                f"{P}MAX_RESPONSE_HEAD_BYTES", cls.max_response_head_bytes, minimum=1024, maximum=1024 * 1024
            ),
            stream_flush_interval=env.duration(f"{P}STREAM_FLUSH_INTERVAL", cls.stream_flush_interval),
            default_max_output_tokens=env.integer(
                f"{P}DEFAULT_MAX_OUTPUT_TOKENS", cls.default_max_output_tokens, minimum=1
            ),
            report_headroom=env.boolean(f"{P}REPORT_HEADROOM", cls.report_headroom),
            headroom_reserve=env.number(
                f"{P}HEADROOM_RESERVE", cls.headroom_reserve, minimum=0.0, maximum=0.9
            ),
            headroom_interval=env.duration(f"{P}HEADROOM_INTERVAL", cls.headroom_interval, minimum=0.01),
            sim_latency_scale=env.number(f"{P}SIM_LATENCY_SCALE", cls.sim_latency_scale, minimum=0.0),
            store_url=env.url(f"{P}STORE", cls.store_url, ["memory", "redis", "rediss", "unix"]),
            hints_interval=env.duration(f"{P}HINTS_INTERVAL", cls.hints_interval, minimum=0.01),
        )
