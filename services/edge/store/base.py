"""The edge store's contract: API keys made through the admin RPC, job records and the job queue.

One Protocol, two implementations chosen by BALLAST_EDGE_STORE: memory:// for one
process and redis:// (Redis Streams with a consumer group per priority) for replicas.
Both keep per-tenant and per-user job counts for the caps, and dequeue fairly across
tenants within a priority.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Protocol

from services.edge.auth import ApiKey

# Highest first: workers always drain a higher priority before a lower one.
PRIORITY_ORDER: tuple[str, ...] = ("critical", "high", "normal", "low")

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})


@dataclass
class JobRecord:
    """A queued chat: the request and caller as serialized protos, and its outcome."""

    job_id: str
    tenant_id: str
    user_id: str
    priority: str
    request: bytes  # ballast.edge.v1.SubmitChatRequest
    caller: bytes  # ballast.common.v1.Caller
    state: str = QUEUED
    created_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    attempts: int = 0
    result: bytes = b""  # ballast.edge.v1.ChatResponse
    error: bytes = b""  # google.rpc.Status
    webhook_url: str = ""
    webhook_state: str = ""
    # W3C trace context of the submitter, so the worker's span continues its trace.
    trace_context: dict[str, str] = field(default_factory=dict)
    # Not before this time (a job waiting for quota is parked, not failed).
    not_before: float = 0.0


def idempotency_scope(tenant_id: str, user_id: str, idempotency_key: str) -> str:
    """One opaque name per (tenant, user, key); JSON keeps `a:b`+`c` apart from `a`+`b:c`."""
    return hashlib.sha256(json.dumps([tenant_id, user_id, idempotency_key]).encode()).hexdigest()


@dataclass(frozen=True)
class JobCaps:
    """How many jobs one tenant and one user may hold; 0 means no cap. Queued counts jobs not
    yet ended (queued, parked or running); stored counts every record kept (BALLAST_EDGE_JOB_TTL)."""

    queued_per_tenant: int = 0
    queued_per_user: int = 0
    stored_per_tenant: int = 0
    stored_per_user: int = 0


class CapReachedError(Exception):
    """A submit would exceed `cap` (a JobCaps field name); nothing was stored."""

    def __init__(self, cap: str) -> None:
        super().__init__(cap)
        self.cap = cap


@dataclass(frozen=True)
class Claim:
    """A job handed to one worker; `token` identifies the delivery for ack and heartbeat."""

    job: JobRecord
    token: str


class EdgeStore(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None:
        """Returns when the backend answers, raises when it does not (readiness checks it)."""
        ...

    # API keys made through the admin RPC.
    async def put_key(self, key: ApiKey) -> None: ...
    async def key_by_hash(self, sha256: str) -> ApiKey | None: ...
    async def key_by_id(self, key_id: str) -> ApiKey | None: ...
    async def list_keys(self, tenant_id: str, offset: int, limit: int) -> list[ApiKey]: ...

    # Jobs.
    async def submit(self, job: JobRecord, idempotency_key: str, caps: JobCaps | None = None) -> JobRecord:
        """Enqueues `job`, or returns the job its user already submitted with this key (keys are
        per tenant and user: another user's key never finds this user's job). Raises CapReachedError
        when a new job would exceed `caps`.

        Within a priority, jobs are claimed round-robin across tenants: a tenant with a
        thousand jobs waiting delays another tenant's job by at most one of its own."""
        ...

    async def get_job(self, job_id: str) -> JobRecord | None: ...
    async def claim(self, consumer: str, block: float) -> Claim | None:
        """The next due job, highest priority first; None after `block` seconds without one."""
        ...

    async def heartbeat(self, claim: Claim, consumer: str) -> None:
        """Keeps a long-running claim from being reclaimed as abandoned."""
        ...

    async def reclaim(self, consumer: str, min_idle: float) -> int:
        """Re-queues jobs whose worker went silent for `min_idle` seconds; returns how many."""
        ...

    async def release(self, consumer: str) -> int:
        """At a clean shutdown, once `consumer` runs nothing: puts the jobs it still holds (cut by
        the drain) back in line at once, then removes the consumer from the queue's bookkeeping;
        returns how many jobs went back."""
        ...

    async def reap(self, consumer: str, idle: float) -> int:
        """Removes the other consumers idle for `idle` seconds that hold no job (workers that died
        and whose jobs were reclaimed); returns how many."""
        ...

    async def promote_due(self) -> int:
        """Puts parked jobs whose time has come back on the queue; returns how many. `claim`
        does this too: it matters where no worker claims (an edge whose workers run apart)."""
        ...

    async def park(self, claim: Claim, not_before: float) -> None:
        """Puts a claimed job back until `not_before` (waiting for quota)."""
        ...

    async def finish(self, claim: Claim, job: JobRecord) -> bool:
        """Records a terminal state once; False when the job already ended (a duplicate delivery)."""
        ...

    async def update(self, job: JobRecord) -> None:
        """Saves non-state fields (webhook state)."""
        ...

    async def cancel(self, job_id: str) -> JobRecord | None: ...
    async def depth(self) -> dict[str, int]:
        """Queued jobs per priority (what an autoscaler scales on)."""
        ...

    async def oldest_enqueued_at(self) -> float | None:
        """Unix time the oldest unfinished job was (re)queued, None when the queue is empty."""
        ...

    # --- settlements: limiter Commits after the model answered that could not be made in time ---
    async def put_settlement(self, key: str, record: bytes) -> None:
        """Records a settlement to apply later; the same key again replaces it (no duplicate)."""
        ...

    async def pending_settlements(self, limit: int) -> list[tuple[str, bytes]]:
        """Up to `limit` recorded settlements (key, record), in no particular order."""
        ...

    async def drop_settlement(self, key: str) -> None:
        """Forgets a settlement once applied (or refused for good)."""
        ...

    async def settlement_count(self) -> int:
        """How many settlements are recorded and not yet applied."""
        ...
