"""In-process edge store: exact for one replica, lost on restart (the embedded default)."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace

from services.edge.auth import ApiKey
from services.edge.store.base import (
    PRIORITY_ORDER,
    QUEUED,
    RUNNING,
    TERMINAL,
    CapReachedError,
    Claim,
    JobCaps,
    JobRecord,
    idempotency_scope,
)


class MemoryEdgeStore:
    def __init__(self, clock: Callable[[], float] = time.time, *, job_ttl: float = 86400.0) -> None:
        self._clock = clock
        self._job_ttl = job_ttl
        self._keys: dict[str, ApiKey] = {}
        # In submission order, so expired records are found at the front.
        self._jobs: dict[str, JobRecord] = {}
        self._idempotency: dict[str, str] = {}
        # Per priority, per tenant (in round-robin order): heap of (not_before, sequence, job_id).
        self._queues: dict[str, OrderedDict[str, list[tuple[float, int, str]]]] = {
            p: OrderedDict() for p in PRIORITY_ORDER
        }
        # Job ids per ("tenant", t) / ("user", t, u): every record kept, and those not yet ended.
        self._stored: dict[tuple[str, ...], set[str]] = {}
        self._open: dict[tuple[str, ...], set[str]] = {}
        self._claims: dict[str, tuple[str, float]] = {}  # token -> (job_id, last heartbeat)
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        # Settlements to apply later (settlement.py): kept by this process only.
        self._settlements: dict[str, bytes] = {}

    async def start(self) -> None:
        return None

    async def ping(self) -> None:
        """Always answers: this process is the backend."""

    async def close(self) -> None:
        return None

    async def put_key(self, key: ApiKey) -> None:
        self._keys[key.key_id] = key

    async def key_by_hash(self, sha256: str) -> ApiKey | None:
        return next((k for k in self._keys.values() if k.sha256 == sha256), None)

    async def key_by_id(self, key_id: str) -> ApiKey | None:
        return self._keys.get(key_id)

    async def list_keys(self, tenant_id: str, offset: int, limit: int) -> list[ApiKey]:
        keys = sorted(
            (k for k in self._keys.values() if not tenant_id or k.tenant_id == tenant_id),
            key=lambda k: k.key_id,
        )
        return keys[offset : offset + limit]

    def _push(self, job: JobRecord) -> None:
        heap = self._queues[job.priority].setdefault(job.tenant_id, [])
        heapq.heappush(heap, (job.not_before, next(self._seq), job.job_id))
        self._wakeup.set()

    @staticmethod
    def _owners(job: JobRecord) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return ("tenant", job.tenant_id), ("user", job.tenant_id, job.user_id)

    def _ended(self, job: JobRecord) -> None:
        for owner in self._owners(job):
            self._open.get(owner, set()).discard(job.job_id)

    def _expire(self) -> None:
        """Drops ended records older than the TTL (Redis expires them; here the oldest go first)."""
        cutoff = self._clock() - self._job_ttl
        expired = []
        for job in self._jobs.values():
            if job.created_at >= cutoff:
                break
            if job.state in TERMINAL:
                expired.append(job)
        for job in expired:
            del self._jobs[job.job_id]
            for owner in self._owners(job):
                self._stored.get(owner, set()).discard(job.job_id)

    def _check_caps(self, job: JobRecord, caps: JobCaps) -> None:
        tenant, user = self._owners(job)
        for cap, limit, ids in (
            ("queued_per_tenant", caps.queued_per_tenant, self._open.get(tenant)),
            ("queued_per_user", caps.queued_per_user, self._open.get(user)),
            ("stored_per_tenant", caps.stored_per_tenant, self._stored.get(tenant)),
            ("stored_per_user", caps.stored_per_user, self._stored.get(user)),
        ):
            if limit and len(ids or ()) >= limit:
                raise CapReachedError(cap)

    async def submit(self, job: JobRecord, idempotency_key: str, caps: JobCaps | None = None) -> JobRecord:
        scope = idempotency_scope(job.tenant_id, job.user_id, idempotency_key) if idempotency_key else ""
        if scope:
            existing = self._idempotency.get(scope)
            if existing is not None and existing in self._jobs:
                return replace(self._jobs[existing])
        self._expire()
        if caps is not None:
            self._check_caps(job, caps)
        if scope:
            self._idempotency[scope] = job.job_id
        self._jobs[job.job_id] = replace(job)
        for owner in self._owners(job):
            self._stored.setdefault(owner, set()).add(job.job_id)
            self._open.setdefault(owner, set()).add(job.job_id)
        self._push(job)
        return replace(job)

    async def get_job(self, job_id: str) -> JobRecord | None:
        job = self._jobs.get(job_id)
        return None if job is None else replace(job)

    def _pop_due(self) -> JobRecord | None:
        now = self._clock()
        for priority in PRIORITY_ORDER:
            tenants = self._queues[priority]
            # Round robin: the first tenant with a due job gives one and goes to the back.
            for tenant in list(tenants):
                heap = tenants[tenant]
                while heap and heap[0][0] <= now:
                    _, _, job_id = heapq.heappop(heap)
                    job = self._jobs.get(job_id)
                    if job is not None and job.state == QUEUED:
                        tenants.move_to_end(tenant)
                        if not heap:
                            del tenants[tenant]
                        return job
                if not heap:
                    del tenants[tenant]
        return None

    async def claim(self, consumer: str, block: float) -> Claim | None:
        deadline = time.monotonic() + block
        while True:
            job = self._pop_due()
            if job is not None:
                job.state = RUNNING
                job.started_at = self._clock()
                job.attempts += 1
                token = f"{job.job_id}:{job.attempts}"
                self._claims[token] = (job.job_id, time.monotonic())
                return Claim(replace(job), token)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._wakeup.clear()
            # A new job wakes the waiting workers; a parked one becomes due without a wake-up, so
            # they wait no longer than until the earliest is due. (Polling every 100 ms instead
            # kept an idle suite's 32 workers at about 1% of a core.)
            due_in = self._next_due_in()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining if due_in is None else min(remaining, due_in)):
                    await self._wakeup.wait()

    def _next_due_in(self) -> float | None:
        """Seconds until the earliest queued job is due (0 when one is), None when none is queued.
        A job cancelled since it was queued may still count: a worker then wakes early, finds
        nothing due and waits again."""
        earliest = min(
            (heap[0][0] for tenants in self._queues.values() for heap in tenants.values() if heap),
            default=None,
        )
        return None if earliest is None else max(0.0, earliest - self._clock())

    async def heartbeat(self, claim: Claim, consumer: str) -> None:
        if claim.token in self._claims:
            self._claims[claim.token] = (claim.job.job_id, time.monotonic())

    async def reclaim(self, consumer: str, min_idle: float) -> int:
        now = time.monotonic()
        count = 0
        for token, (job_id, seen) in list(self._claims.items()):
            job = self._jobs.get(job_id)
            if job is None or job.state in TERMINAL:
                self._claims.pop(token, None)
            elif now - seen >= min_idle:
                self._claims.pop(token, None)
                job.state = QUEUED
                self._push(job)
                count += 1
        return count

    async def release(self, consumer: str) -> int:
        # One process: its queue ends with it, and claims carry no consumer to remove.
        return 0

    async def reap(self, consumer: str, idle: float) -> int:
        return 0

    async def promote_due(self) -> int:
        # Parked jobs wait in the same heaps, ordered by their time: nothing to move.
        return 0

    async def park(self, claim: Claim, not_before: float) -> None:
        self._claims.pop(claim.token, None)
        job = self._jobs.get(claim.job.job_id)
        if job is None or job.state in TERMINAL:
            return
        job.state = QUEUED
        job.not_before = not_before
        self._push(job)

    async def finish(self, claim: Claim, job: JobRecord) -> bool:
        self._claims.pop(claim.token, None)
        current = self._jobs.get(job.job_id)
        if current is None or current.state in TERMINAL:
            return False
        self._jobs[job.job_id] = replace(job)
        self._ended(job)
        return True

    async def update(self, job: JobRecord) -> None:
        current = self._jobs.get(job.job_id)
        if current is not None:
            current.webhook_state = job.webhook_state

    async def cancel(self, job_id: str) -> JobRecord | None:
        job = self._jobs.get(job_id)
        if job is None:
            return None
        if job.state == QUEUED:
            job.state = "cancelled"
            job.finished_at = self._clock()
            self._ended(job)
        return replace(job)

    async def oldest_enqueued_at(self) -> float | None:
        waiting = [job.created_at for job in self._jobs.values() if job.state in (QUEUED, RUNNING)]
        return min(waiting, default=None)

    async def depth(self) -> dict[str, int]:
        counts = dict.fromkeys(PRIORITY_ORDER, 0)
        for job in self._jobs.values():
            if job.state == QUEUED:
                counts[job.priority] += 1
        return counts

    async def put_settlement(self, key: str, record: bytes) -> None:
        self._settlements[key] = record

    async def pending_settlements(self, limit: int) -> list[tuple[str, bytes]]:
        return list(itertools.islice(self._settlements.items(), max(0, limit)))

    async def drop_settlement(self, key: str) -> None:
        self._settlements.pop(key, None)

    async def settlement_count(self) -> int:
        return len(self._settlements)
