"""Keeps decisions coming when the shared store is down: timeout, fail mode, recovery.

Every call to the shared store gets `timeout` seconds. On a failure the replica decides by
its fail mode for `retry_interval` seconds without waiting on the store, then tries the
store again with the next call (recovery needs no restart):

* local  - a per-replica MemoryStore enforcing this replica's share of each limit, and no more
           than its share of what the store last said was left (a budget already spent stays
           spent, a session at its cap stays capped); what it counts is written back to the
           store when the store is reachable again;
* open   - allow everything (nothing is counted);
* closed - deny everything (the domain answers DENY with reason store_unavailable, Envoy
           checks answer OVER_LIMIT).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from services.limiter.store.base import (
    BudgetRef,
    Charge,
    ChargeKind,
    Kind,
    LimitOp,
    OpResult,
    Outcome,
    Settlement,
    Store,
    StoreUnavailableError,
)
from services.limiter.store.memory import MemoryStore

log = logging.getLogger("ballast.limiter.store")

T = TypeVar("T")


class ResilientStore:
    def __init__(
        self,
        primary: Store,
        *,
        mode: str = "local",
        timeout: float = 0.25,
        retry_interval: float = 1.0,
        replicas: int = 1,
        share: float = 0.0,
        memory: int = 100_000,
        buckets: int = 20,
        monotonic: Callable[[], float] = time.monotonic,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.primary = primary
        self.mode = mode
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.replicas = max(1, replicas)
        # This replica's part of each limit while it decides alone (default: 1 / replicas).
        self.share = share if share > 0 else 1 / self.replicas
        self.memory = max(1, memory)
        self._buckets = buckets
        self.local = MemoryStore(clock=clock, buckets=buckets)
        self._monotonic = monotonic
        self._clock = clock
        self._down_until = 0.0
        # The last call failed and no call has succeeded since: probe one call at a time.
        self._suspect = False
        self._probing = False
        self.failures = 0
        # What the store last said was left of each limit: key -> (remaining, valid until ms).
        # Bounds the local decisions of an outage by what was really left when it began.
        self._seen: dict[str, tuple[int, int]] = {}
        # What this replica counted alone, written back in order once the store answers again.
        self._journal: deque[Charge] = deque()
        self.dropped_charges = 0
        self.replayed_charges = 0
        # A store whose calls end within the timeout by themselves needs no timer per call.
        self._self_bounded = bool(getattr(primary, "bounds_own_calls", False))

    @property
    def down(self) -> bool:
        return self._monotonic() < self._down_until

    @property
    def pending_charges(self) -> int:
        return len(self._journal)

    async def _try(self, call: Callable[[], Awaitable[T]]) -> T | None:
        """The primary's answer, or None when it is down (known or just found out).

        After an outage only one call at a time probes the store; the others keep deciding by
        the fail mode instead of all waiting out the timeout on a store that may still hang.
        The probe first writes back what was counted locally, so the store knows it before it
        decides anything again.
        """
        if self.down:
            return None
        probing = self._suspect or bool(self._journal)
        if probing:
            if self._probing:
                return None
            self._probing = True
        try:
            if self._journal:
                await self._bounded(self._write_back)
            result = await self._bounded(call)
        except (StoreUnavailableError, TimeoutError, OSError) as exc:
            self.failures += 1
            if not self._suspect:
                log.warning(
                    "limiter store unreachable, deciding by fail mode",
                    extra={"fail_mode": self.mode, "error": repr(exc)},
                )
            self._suspect = True
            self._down_until = self._monotonic() + self.retry_interval
            return None
        finally:
            if probing:
                self._probing = False
        if self._suspect:
            self._suspect = False
            log.info("limiter store reachable again")
        return result

    async def _bounded(self, call: Callable[[], Awaitable[T]]) -> T:
        if self._self_bounded:
            return await call()
        # asyncio.timeout, not wait_for: no extra task per decision on the hot path.
        async with asyncio.timeout(self.timeout):
            return await call()

    async def _write_back(self) -> None:
        """Replays the journal; what was applied leaves it, a failure leaves the rest for later."""
        now_ms = int(self._clock() * 1000)
        # A headroom report only matters for what is left of its lifetime.
        live = [c for c in self._journal if c.kind != ChargeKind.HEADROOM or c.at_ms + c.ttl_ms > now_ms]
        self._journal = deque(live)
        batch = [
            dataclasses.replace(c, ttl_ms=c.at_ms + c.ttl_ms - now_ms) if c.kind == ChargeKind.HEADROOM else c
            for c in live
        ]
        applied = await self.primary.replay(batch)
        for _ in range(applied):
            self._journal.popleft()
        self.replayed_charges += applied
        if applied < len(batch):
            raise StoreUnavailableError("the store stopped answering while local charges were written back")
        log.info("limiter store caught up with local charges", extra={"charges": applied})
        if not self._journal and not self.dropped_charges:
            # Everything counted here is in the store now: a later outage starts from what the
            # store says, not from this one's counts as well.
            self.local = MemoryStore(clock=self._clock, buckets=self._buckets)

    def _record(self, charge: Charge) -> None:
        if len(self._journal) >= self.memory:
            self.dropped_charges += 1
            if self.dropped_charges == 1:
                log.warning(
                    "limiter outage journal full, local charges are no longer written back",
                    extra={"limit": self.memory},
                )
            return
        self._journal.append(charge)

    # -- what the store said ---------------------------------------------------------------

    def _observe(self, ops: Sequence[LimitOp], results: Sequence[OpResult]) -> None:
        now_ms = int(self._clock() * 1000)
        for op, r in zip(ops, results, strict=False):
            if op.limit <= 0 or r.remaining < 0:
                continue
            # Budgets and fixed windows: until the day or window ends. Sliding windows and
            # counters: a window's length, a counter's idle TTL.
            horizon = r.reset_ms if op.kind in (Kind.BUDGET, Kind.FIXED) else op.period_ms
            self._seen.pop(op.key, None)  # re-inserted last: the oldest go first when full
            self._seen[op.key] = (r.remaining, now_ms + max(1, horizon))
        if len(self._seen) > self.memory:
            live = {k: v for k, v in self._seen.items() if v[1] > now_ms}
            while len(live) > self.memory:
                del live[next(iter(live))]
            self._seen = live

    def _allowance(self, op: LimitOp, now_ms: int) -> LimitOp:
        """The op with this replica's own limit: its share of the limit, and of what was left."""
        if op.limit <= 0:
            return op
        allowed = max(1, math.floor(op.limit * self.share))
        seen = self._seen.get(op.key)
        if seen is not None and seen[1] > now_ms:
            allowed = min(allowed, math.floor(seen[0] * self.share))
        return dataclasses.replace(op, limit=allowed)

    # -- Store -----------------------------------------------------------------------------

    async def decide(
        self,
        ops: Sequence[LimitOp],
        *,
        peek: bool = False,
        idempotency_key: str = "",
        idempotency_ttl_ms: int = 0,
        reservation_id: str = "",
        reservation_ttl_ms: int = 0,
        delay_ms: int = 0,
    ) -> Outcome:
        kwargs = {
            "peek": peek,
            "idempotency_key": idempotency_key,
            "idempotency_ttl_ms": idempotency_ttl_ms,
            "reservation_id": reservation_id,
            "reservation_ttl_ms": reservation_ttl_ms,
            "delay_ms": delay_ms,
        }
        outcome = await self._try(lambda: self.primary.decide(ops, **kwargs))  # type: ignore[arg-type]
        if outcome is not None:
            if self.mode == "local":
                self._observe(ops, outcome.results)
            return outcome
        if self.mode == "local":
            now_ms = int(self._clock() * 1000)
            local = await self.local.decide([self._allowance(op, now_ms) for op in ops], **kwargs)  # type: ignore[arg-type]
            counted = local.admitted or any(op.kind == Kind.FIXED for op in ops)
            if counted and not peek and not local.replayed:
                # FIXED ops count even when refused (as upstream): write them back either way.
                charged = tuple(ops) if local.admitted else tuple(op for op in ops if op.kind == Kind.FIXED)
                self._record(
                    Charge(
                        ChargeKind.DECIDE,
                        now_ms,
                        ops=charged,
                        idempotency_key=idempotency_key if local.admitted else "",
                        idempotency_ttl_ms=idempotency_ttl_ms if local.admitted else 0,
                        reservation_id=reservation_id if local.admitted else "",
                        reservation_ttl_ms=reservation_ttl_ms,
                        delay_ms=delay_ms,
                    )
                )
            return dataclasses.replace(local, degraded=True)
        unknown = tuple(OpResult(False, -1 if op.limit < 0 else op.limit, 0, 0) for op in ops)
        if self.mode == "open":
            rid = reservation_id if not peek else ""
            return Outcome(not peek, unknown, delay_ms=delay_ms, reservation_id=rid, degraded=True)
        return Outcome(False, unknown, degraded=True)

    async def settle(
        self,
        budgets: Sequence[BudgetRef],
        *,
        reservation_id: str,
        actual_tokens: int,
        cost_micros: int,
        done_key: str,
        done_ttl_ms: int,
    ) -> Settlement:
        kwargs = {
            "reservation_id": reservation_id,
            "actual_tokens": actual_tokens,
            "cost_micros": cost_micros,
            "done_key": done_key,
            "done_ttl_ms": done_ttl_ms,
        }
        settled = await self._try(lambda: self.primary.settle(budgets, **kwargs))  # type: ignore[arg-type]
        if settled is not None:
            return settled
        if self.mode == "closed":
            raise StoreUnavailableError("the limiter store is unreachable (fail mode: closed)")
        now_ms = int(self._clock() * 1000)
        scaled = [
            BudgetRef(b.key, self._allowance(LimitOp(Kind.BUDGET, b.key, b.limit, 0), now_ms).limit)
            for b in budgets
        ]
        local = await self.local.settle(scaled, **kwargs)  # type: ignore[arg-type]
        if self.mode == "local" and not local.already_settled:
            self._record(
                Charge(
                    ChargeKind.SETTLE,
                    now_ms,
                    budgets=tuple(budgets),
                    reservation_id=reservation_id,
                    actual_tokens=actual_tokens,
                    cost_micros=cost_micros,
                    done_key=done_key,
                    done_ttl_ms=done_ttl_ms,
                )
            )
        return dataclasses.replace(local, degraded=True)

    async def put_headroom(self, field: str, record: str, ttl_ms: int) -> None:
        await self.local.put_headroom(field, record, ttl_ms)

        async def put() -> bool:
            await self.primary.put_headroom(field, record, ttl_ms)
            return True

        if await self._try(put) is None:
            # Shared once the store is back, so the other replicas still learn of it.
            self._record(
                Charge(
                    ChargeKind.HEADROOM, int(self._clock() * 1000), field=field, record=record, ttl_ms=ttl_ms
                )
            )

    async def get_headroom(self) -> dict[str, str]:
        shared = await self._try(self.primary.get_headroom)
        return shared if shared is not None else await self.local.get_headroom()

    async def replay(self, charges: Sequence[Charge]) -> int:
        return await self.primary.replay(charges)

    async def ping(self) -> None:
        # The shared store itself, past the fail mode: readiness asks whether Redis answers.
        await self.primary.ping()

    async def close(self) -> None:
        await self.primary.close()
