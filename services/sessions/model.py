"""Plain records of the sessions domain, shared by the service logic and the stores."""

from __future__ import annotations

from dataclasses import dataclass, field

# Roles as stored (the values of ballast.common.v1.Role), so stores need no protobuf.
ROLE_SYSTEM = 1
ROLE_USER = 2
ROLE_ASSISTANT = 3
ROLE_TOOL = 4

KEY_REUSED = "already used in this session for an append with different turns"


def too_many_sessions(cap: int) -> str:
    """The RESOURCE_EXHAUSTED message when a user is at the sessions cap (both stores)."""
    return (
        f"this user already has {cap} live sessions, the most allowed"
        " (BALLAST_SESSIONS_MAX_PER_USER): delete one or let one expire"
    )


@dataclass(frozen=True)
class Scope:
    """Whose sessions a call may see: every read and write is filtered by both ids."""

    tenant_id: str
    user_id: str


@dataclass
class Counters:
    turns: int = 0
    tool_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_micros: int = 0


@dataclass
class SessionRecord:
    session_id: str
    tenant_id: str
    user_id: str
    title: str
    metadata: dict[str, str]
    created_at: float
    updated_at: float
    expires_at: float
    # Idle time to live in seconds; every append moves expires_at to now + ttl.
    ttl: float
    version: int = 0
    counters: Counters = field(default_factory=Counters)
    summary: str = ""
    summary_tokens: int = 0
    # Turns 1..summarized_seq are folded into the summary.
    summarized_seq: int = 0
    # Sum of token_count over all turns, and over the summarised ones: their difference is
    # the size of the unsummarised tail, known without reading it.
    total_tokens: int = 0
    summarized_tokens: int = 0
    # The store's own key (a PostgreSQL bigint, a counter in memory); never shown to clients.
    internal_id: int = 0

    @property
    def head_seq(self) -> int:
        return self.counters.turns

    @property
    def unsummarized_tokens(self) -> int:
        return self.total_tokens - self.summarized_tokens


@dataclass(frozen=True)
class NewTurn:
    """A turn to append; `payload` is the serialized Turn (without seq and created_at)."""

    role: int
    token_count: int
    tool_calls: int
    input_tokens: int
    output_tokens: int
    cost_micros: int
    payload: bytes


@dataclass(frozen=True)
class StoredTurn:
    seq: int
    role: int
    token_count: int
    tool_calls: int
    payload: bytes
    created_at: float


@dataclass
class AppendOutcome:
    session: SessionRecord
    turns: list[StoredTurn]
    replayed: bool = False
    # With wait_for_next_turn: the version the writer's next append should carry (its turn).
    next_turn: int | None = None


def starts_group(turn: StoredTurn | NewTurn) -> bool:
    """Whether a turn may be the first of a context window (a tool result never is)."""
    return turn.role != ROLE_TOOL
