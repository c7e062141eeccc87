"""Settings of the edge service, from BALLAST_EDGE_* environment variables."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from services.edge import auth
from services.kit.config import Env, ServerSettings
from services.kit.redisconn import cluster_option
from services.kit.tls import is_loopback

_HOST_NAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})$")

PRIORITIES = ("low", "normal", "high", "critical")

# The queue worker role (`ballast serve worker`) listens next to the five services' ports.
WORKER_PORT = 50056
WORKER_METRICS_PORT = 9456

# Tier -> queued jobs per user, and tier -> queue priority, when BALLAST_EDGE_TIER_MAX_QUEUED and
# BALLAST_EDGE_TIER_PRIORITIES are unset (the dataclass fields below start from these too).
_TIER_MAX_QUEUED: Mapping[str, int] = {"free": 100}
_TIER_PRIORITIES: Mapping[str, str] = {"free": "low", "paid": "normal", "enterprise": "high"}


def _parse_webhook_allowed(env: Env, name: str) -> tuple[str, ...]:
    raw = env.string(name, "")
    out: list[str] = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            if not _HOST_NAME.match(item):
                env.problems.append(
                    f"{name}={raw!r} is invalid: {item!r} is neither a CIDR (10.0.0.0/8, fd00::/8) nor a host name"
                )
                return ()
        out.append(item)
    return tuple(out)


def _parse_tier_caps(env: Env, name: str, default: Mapping[str, int]) -> dict[str, int]:
    raw = env.raw(name)
    if raw is None:
        return dict(default)
    out: dict[str, int] = {}
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        tier, sep, count = item.partition("=")
        if not sep or not tier.strip() or not count.strip().isdigit():
            env.problems.append(
                f"{name}={raw!r} is invalid: expected tier=count pairs separated by commas "
                "(for example free=100,paid=1000; 0 = no cap)"
            )
            return {}
        out[tier.strip()] = int(count)
    return out


def _parse_tier_priorities(env: Env, name: str, default: Mapping[str, str]) -> dict[str, str]:
    raw = env.raw(name)
    if raw is None:
        return dict(default)
    out: dict[str, str] = {}
    for item in raw.split(","):
        tier, sep, priority = item.partition("=")
        tier, priority = tier.strip(), priority.strip().lower()
        if not sep or not tier or priority not in PRIORITIES:
            env.problems.append(
                f"{name}={raw!r} is invalid: expected tier=priority pairs separated by commas, "
                f"priority one of {', '.join(PRIORITIES)} (for example free=low,paid=normal,enterprise=high)"
            )
            return {}
        out[tier] = priority
    return out


@dataclass(frozen=True)
class EdgeSettings:
    server: ServerSettings
    # Job queue, job records and API keys created through the admin RPC:
    # memory:// (one process) or redis://host:6379/2 (Redis Streams, shared by replicas).
    store_url: str = "memory://"
    # API keys (hashes only) mapped to tenant, user and tier; see services/edge/README.md. None by
    # default: the shipped config/edge_keys.yaml holds the demo keys, loaded only when named here.
    keys_file: str = ""
    # Guards EdgeAdminService; empty disables the admin RPCs.
    admin_key: str = ""
    # Requests served at once by this replica; beyond it callers get RESOURCE_EXHAUSTED at once.
    max_in_flight: int = 512
    # Per-request bounds on what a caller may send.
    max_messages: int = 256
    max_content_chars: int = 200_000
    max_tools: int = 128
    # Deepest nesting of a JSON field (tool arguments, schemas): checked before parsing, so a
    # deeply nested value is a named INVALID_ARGUMENT, not a RecursionError.
    max_json_depth: int = 64
    # Largest context_token_budget and max_output_tokens a request may ask for (their sum is
    # reserved against the limiter's int64 budgets).
    max_context_tokens: int = 1_000_000
    max_output_tokens: int = 1_000_000
    # Session context budget when the request does not set one.
    context_tokens: int = 4000
    # Output tokens reserved against the budget when the request sets no max_output_tokens.
    reserve_output_tokens: int = 1024
    # Timeout of each limiter, cache and sessions call of a low-priority caller (the router gets
    # the caller's deadline; callers of normal or higher priority get priority_call_timeout).
    downstream_timeout: float = 2.0
    # The longest internal call (limiter, sessions, cache) of a chat of normal or higher priority
    # (paid, enterprise): it takes its time from the caller's deadline, up to this, rather than
    # the short downstream timeout, so a replica short of CPU delays those chats instead of
    # failing them. Low priority (free) keeps BALLAST_EDGE_DOWNSTREAM_TIMEOUT and gives way.
    priority_call_timeout: float = 10.0
    # Settlement after the model answered (settlement.py): the longest a response waits for the
    # limiter's Commit (its first try), and how long failed tries are retried in the background
    # (backing off from settle_backoff) before the Commit is recorded in the edge store and
    # applied later; how often recorded ones are retried (backing
    # off up to settle_retry_max while the limiter stays down), and how many per pass.
    settle_wait: float = 2.0
    settle_backoff: float = 0.05
    settle_interval: float = 1.0
    settle_retry_max: float = 30.0
    settle_batch: int = 100
    # What a limiter outage does to a chat: "open" lets it through, "closed" fails it UNAVAILABLE.
    limiter_failure: str = "open"
    # Longest adaptive-throttling delay a synchronous chat waits before giving up with RESOURCE_EXHAUSTED.
    max_throttle_wait: float = 30.0
    # Queue: workers per replica (enough that the limiter, not the worker count, paces the queue), how
    # long a job may wait for quota, and when a silent worker's job is reclaimed.
    workers: int = 32
    # Redis connections per replica for the edge store. Each queue worker holds one while it
    # waits for a job (a blocking read), so there must be more than BALLAST_EDGE_WORKERS; past the
    # pool, calls wait for a connection (up to BALLAST_EDGE_DOWNSTREAM_TIMEOUT) instead of failing.
    store_pool_size: int = 256
    # High priority first (pacing.py): while the event loop runs later than pacing_target_lag
    # (the process is short of CPU), queue workers back off towards queue_min_workers, then
    # low-priority chats towards paced_free_min, then normal-priority ones towards
    # paced_chats_min; 0 = no pacing. A chat crosses the loop
    # some twenty times (each downstream call, each await), waiting up to the lag at each, so the
    # target is a few milliseconds: at 20 ms the front-page benchmark's enterprise chats spent
    # 0.3-0.7 s queued inside the edge at p50; at 5 ms 0.1-0.2 s.
    pacing_target_lag: float = 0.005
    pacing_interval: float = 0.1
    queue_min_workers: int = 2
    paced_chats_min: int = 8
    # Low-priority (free) synchronous chats have a lane of their own, below paid chats: it gives
    # way after the queue and before them, down to paced_free_min; a low-priority chat that would
    # wait longer than free_chat_max_wait for a slot is refused with RESOURCE_EXHAUSTED and a retry
    # hint instead (it comes back when the replica has CPU to spare, or goes to another replica).
    paced_free_min: int = 2
    free_chat_max_wait: float = 2.0
    job_max_wait: float = 3600.0
    # Tries of a job whose backends were unavailable before it is failed, and the first pause
    # between them (doubling, at most 30 s).
    job_attempts: int = 5
    job_retry_backoff: float = 0.5
    job_claim_idle: float = 30.0
    # A consumer of the queue's group idle this long and holding no job (a worker that died; its
    # jobs were reclaimed) is removed by a live worker. A clean shutdown removes its own at once.
    consumer_idle: float = 600.0
    job_ttl: float = 86400.0
    # Webhooks: HMAC-SHA256 secret, attempts and the first backoff (doubles each attempt).
    webhook_secret: str = ""
    webhook_attempts: int = 6
    webhook_backoff: float = 0.5
    webhook_timeout: float = 5.0
    # Internal webhook targets an operator opens on purpose (CIDRs and host names); every other
    # non-public address is refused (webhooks.py).
    webhook_allowed: tuple[str, ...] = ()
    # How often queue depth and the oldest job's age are sampled for the metrics.
    queue_sample_interval: float = 2.0
    # Caps on jobs per tenant and per user (0 = none): queued counts jobs not yet ended, stored
    # every record kept for BALLAST_EDGE_JOB_TTL. Beyond one, SubmitChat is RESOURCE_EXHAUSTED.
    max_queued_per_tenant: int = 10_000
    max_queued_per_user: int = 1_000
    max_stored_per_tenant: int = 100_000
    max_stored_per_user: int = 10_000
    # Tier -> queued jobs per user (admission by tier), on top of max_queued_per_user.
    tier_max_queued: Mapping[str, int] = field(default_factory=lambda: dict(_TIER_MAX_QUEUED))
    # Tier -> queue priority for SubmitChat.
    tier_priorities: Mapping[str, str] = field(default_factory=lambda: dict(_TIER_PRIORITIES))
    # The OpenAI-compatible HTTP face (openai_http.py), served beside the gRPC port by the same
    # process: its port (0 picks a free one), the largest request body, how long one request may
    # take end to end (the gRPC face takes the caller's deadline; HTTP clients send none), and how
    # long an idle keep-alive connection stays open.
    http_enabled: bool = True
    http_port: int = 8080
    http_max_body_bytes: int = 4 * 1024 * 1024
    http_request_timeout: float = 600.0
    http_keep_alive: float = 75.0
    # A 429 whose retry-after is longer than this tells OpenAI SDKs not to retry (x-should-retry:
    # false): the Node SDK would otherwise sleep out any retry-after, even until midnight.
    http_max_retry_wait: float = 60.0
    # Connections the kernel queues for the HTTP port before uvicorn accepts them.
    http_backlog: int = 2048

    @classmethod
    def from_env(cls, env: Env) -> EdgeSettings:
        settings = cls._read(env)
        if settings.store_pool_size <= settings.workers:
            env.problems.append(
                f"BALLAST_EDGE_STORE_POOL_SIZE={settings.store_pool_size} is invalid: it must exceed "
                f"BALLAST_EDGE_WORKERS={settings.workers} (each worker holds a connection while it waits for a job)"
            )
        if settings.store_url.startswith(("redis://", "rediss://")):
            try:
                cluster_option(settings.store_url)
            except ValueError as exc:
                env.problems.append(f"BALLAST_EDGE_STORE={settings.store_url!r} is invalid: {exc}")
        demo_keys = auth.demo_keys_in(settings.keys_file) if settings.keys_file else []
        if demo_keys and not is_loopback(settings.server.host):
            env.problems.append(
                f"BALLAST_EDGE_KEYS_FILE={settings.keys_file!r} holds the demo keys {', '.join(demo_keys)}, whose "
                f"secrets are published, and the edge would listen on BALLAST_HOST={settings.server.host!r}: "
                "anyone reaching it could use them. Remove them from the file (make your own keys: "
                "services/edge/README.md) or listen on 127.0.0.1"
            )
        return settings

    @classmethod
    def _read(cls, env: Env) -> EdgeSettings:
        # Each default is the field's own (cls.<field>), written once above.
        return cls(
            server=ServerSettings.from_env("edge", env),
            store_url=env.url("BALLAST_EDGE_STORE", cls.store_url, ["memory", "redis", "rediss"]),
            keys_file=env.string("BALLAST_EDGE_KEYS_FILE", cls.keys_file),
            admin_key=env.string("BALLAST_EDGE_ADMIN_KEY", cls.admin_key),
            max_in_flight=env.integer(
                "BALLAST_EDGE_MAX_IN_FLIGHT", cls.max_in_flight, minimum=1, maximum=1_000_000
            ),
            max_messages=env.integer(
                "BALLAST_EDGE_MAX_MESSAGES", cls.max_messages, minimum=1, maximum=100_000
            ),
            max_content_chars=env.integer(
                "BALLAST_EDGE_MAX_CONTENT_CHARS", cls.max_content_chars, minimum=1, maximum=100_000_000
            ),
            max_tools=env.integer("BALLAST_EDGE_MAX_TOOLS", cls.max_tools, minimum=0, maximum=10_000),
            # Python's own parser gives up near 1000 levels; stay well inside it.
            max_json_depth=env.integer(
                "BALLAST_EDGE_MAX_JSON_DEPTH", cls.max_json_depth, minimum=1, maximum=500
            ),
            max_context_tokens=env.integer(
                "BALLAST_EDGE_MAX_CONTEXT_TOKENS", cls.max_context_tokens, minimum=1, maximum=100_000_000
            ),
            max_output_tokens=env.integer(
                "BALLAST_EDGE_MAX_OUTPUT_TOKENS", cls.max_output_tokens, minimum=1, maximum=100_000_000
            ),
            context_tokens=env.integer(
                "BALLAST_EDGE_CONTEXT_TOKENS", cls.context_tokens, minimum=0, maximum=10_000_000
            ),
            reserve_output_tokens=env.integer(
                "BALLAST_EDGE_RESERVE_OUTPUT_TOKENS", cls.reserve_output_tokens, minimum=0, maximum=10_000_000
            ),
            downstream_timeout=env.duration(
                "BALLAST_EDGE_DOWNSTREAM_TIMEOUT", cls.downstream_timeout, minimum=0.01
            ),
            priority_call_timeout=env.duration(
                "BALLAST_EDGE_PRIORITY_CALL_TIMEOUT", cls.priority_call_timeout, minimum=0.01
            ),
            settle_wait=env.duration("BALLAST_EDGE_SETTLE_WAIT", cls.settle_wait, minimum=0.01),
            settle_backoff=env.duration("BALLAST_EDGE_SETTLE_BACKOFF", cls.settle_backoff, minimum=0.001),
            settle_interval=env.duration("BALLAST_EDGE_SETTLE_INTERVAL", cls.settle_interval, minimum=0.01),
            settle_retry_max=env.duration(
                "BALLAST_EDGE_SETTLE_RETRY_MAX", cls.settle_retry_max, minimum=0.01
            ),
            settle_batch=env.integer(
                "BALLAST_EDGE_SETTLE_BATCH", cls.settle_batch, minimum=1, maximum=100_000
            ),
            limiter_failure=env.choice(
                "BALLAST_EDGE_LIMITER_FAILURE", cls.limiter_failure, ["open", "closed"]
            ),
            max_throttle_wait=env.duration("BALLAST_EDGE_MAX_THROTTLE_WAIT", cls.max_throttle_wait),
            workers=env.integer("BALLAST_EDGE_WORKERS", cls.workers, minimum=0, maximum=1024),
            store_pool_size=env.integer(
                "BALLAST_EDGE_STORE_POOL_SIZE", cls.store_pool_size, minimum=2, maximum=100_000
            ),
            pacing_target_lag=env.duration(
                "BALLAST_EDGE_PACING_TARGET_LAG", cls.pacing_target_lag, minimum=0.0
            ),
            pacing_interval=env.duration("BALLAST_EDGE_PACING_INTERVAL", cls.pacing_interval, minimum=0.01),
            queue_min_workers=env.integer(
                "BALLAST_EDGE_QUEUE_MIN_WORKERS", cls.queue_min_workers, minimum=1, maximum=1024
            ),
            paced_chats_min=env.integer(
                "BALLAST_EDGE_PACED_CHATS_MIN", cls.paced_chats_min, minimum=1, maximum=1_000_000
            ),
            paced_free_min=env.integer(
                "BALLAST_EDGE_PACED_FREE_MIN", cls.paced_free_min, minimum=1, maximum=1_000_000
            ),
            free_chat_max_wait=env.duration(
                "BALLAST_EDGE_FREE_CHAT_MAX_WAIT", cls.free_chat_max_wait, minimum=0.0
            ),
            job_max_wait=env.duration("BALLAST_EDGE_JOB_MAX_WAIT", cls.job_max_wait, minimum=1.0),
            job_attempts=env.integer("BALLAST_EDGE_JOB_ATTEMPTS", cls.job_attempts, minimum=1, maximum=1000),
            job_retry_backoff=env.duration(
                "BALLAST_EDGE_JOB_RETRY_BACKOFF", cls.job_retry_backoff, minimum=0.0
            ),
            job_claim_idle=env.duration("BALLAST_EDGE_JOB_CLAIM_IDLE", cls.job_claim_idle, minimum=0.1),
            consumer_idle=env.duration("BALLAST_EDGE_CONSUMER_IDLE", cls.consumer_idle, minimum=1.0),
            job_ttl=env.duration("BALLAST_EDGE_JOB_TTL", cls.job_ttl, minimum=1.0),
            webhook_secret=env.string("BALLAST_EDGE_WEBHOOK_SECRET", cls.webhook_secret),
            webhook_attempts=env.integer(
                "BALLAST_EDGE_WEBHOOK_ATTEMPTS", cls.webhook_attempts, minimum=1, maximum=100
            ),
            webhook_backoff=env.duration("BALLAST_EDGE_WEBHOOK_BACKOFF", cls.webhook_backoff, minimum=0.0),
            webhook_timeout=env.duration("BALLAST_EDGE_WEBHOOK_TIMEOUT", cls.webhook_timeout, minimum=0.1),
            webhook_allowed=_parse_webhook_allowed(env, "BALLAST_EDGE_WEBHOOK_ALLOWED"),
            queue_sample_interval=env.duration(
                "BALLAST_EDGE_QUEUE_SAMPLE_INTERVAL", cls.queue_sample_interval, minimum=0.05
            ),
            max_queued_per_tenant=env.integer(
                "BALLAST_EDGE_MAX_QUEUED_PER_TENANT", cls.max_queued_per_tenant, minimum=0
            ),
            max_queued_per_user=env.integer(
                "BALLAST_EDGE_MAX_QUEUED_PER_USER", cls.max_queued_per_user, minimum=0
            ),
            max_stored_per_tenant=env.integer(
                "BALLAST_EDGE_MAX_STORED_PER_TENANT", cls.max_stored_per_tenant, minimum=0
            ),
            max_stored_per_user=env.integer(
                "BALLAST_EDGE_MAX_STORED_PER_USER", cls.max_stored_per_user, minimum=0
            ),
            tier_max_queued=_parse_tier_caps(env, "BALLAST_EDGE_TIER_MAX_QUEUED", _TIER_MAX_QUEUED),
            tier_priorities=_parse_tier_priorities(env, "BALLAST_EDGE_TIER_PRIORITIES", _TIER_PRIORITIES),
            http_enabled=env.boolean("BALLAST_EDGE_HTTP", cls.http_enabled),
            http_port=env.integer("BALLAST_EDGE_HTTP_PORT", cls.http_port, minimum=0, maximum=65535),
            http_max_body_bytes=env.integer(
                "BALLAST_EDGE_HTTP_MAX_BODY_BYTES",
                cls.http_max_body_bytes,
                minimum=1024,
                maximum=256 * 1024 * 1024,
            ),
            http_request_timeout=env.duration(
                "BALLAST_EDGE_HTTP_REQUEST_TIMEOUT", cls.http_request_timeout, minimum=0.1
            ),
            http_keep_alive=env.duration("BALLAST_EDGE_HTTP_KEEP_ALIVE", cls.http_keep_alive, minimum=1.0),
            http_max_retry_wait=env.duration("BALLAST_EDGE_HTTP_MAX_RETRY_WAIT", cls.http_max_retry_wait),
            http_backlog=env.integer("BALLAST_EDGE_HTTP_BACKLOG", cls.http_backlog, minimum=1, maximum=65535),
        )


@dataclass(frozen=True)
class WorkerSettings:
    """The queue worker role: the edge's job settings, its own health and metrics ports.

    It runs the edge's JobRunner, so the same BALLAST_EDGE_* variables tune its jobs
    (BALLAST_EDGE_WORKERS is then the number of jobs one worker process runs at once).
    """

    edge: EdgeSettings

    @property
    def server(self) -> ServerSettings:
        return self.edge.server

    @classmethod
    def from_env(cls, env: Env) -> WorkerSettings:
        edge = EdgeSettings.from_env(env)
        # The edge's listener settings (TLS, grace, logging) with the worker's own ports.
        server = replace(
            edge.server,
            service="worker",
            port=env.integer("BALLAST_WORKER_PORT", WORKER_PORT, minimum=0, maximum=65535),
            metrics_port=env.integer(
                "BALLAST_WORKER_METRICS_PORT", WORKER_METRICS_PORT, minimum=0, maximum=65535
            ),
        )
        if not edge.store_url.startswith(("redis://", "rediss://")):
            env.problems.append(
                f"BALLAST_EDGE_STORE={edge.store_url!r} is invalid for a queue worker: expected a "
                "redis:// URL shared with the edge (a memory:// queue lives inside one edge process)"
            )
        if edge.workers < 1:
            env.problems.append(
                f"BALLAST_EDGE_WORKERS={edge.workers} is invalid for a queue worker: expected at least 1 "
                "(the jobs one worker process runs at once)"
            )
        return cls(edge=replace(edge, server=server))
