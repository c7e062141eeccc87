"""Keeps decisions coming when the shared store is down: timeout, fail mode, recovery.

Every call to the shared store gets `timeout` seconds. On a failure the replica decides by
its fail mode for `retry_interval` seconds without waiting on the store, then tries the
store again with the next call (recovery needs no restart):

* local  - a per-replica MemoryStore enforcing limit/replicas (approximately the shared
           limit while every replica is cut off the same way);
* open   - allow everything (nothing is counted);
* closed - deny everything (the domain answers DENY with reason store_unavailable).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from services.limiter.store.base import (
    BudgetRef,
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
        buckets: int = 20,
        monotonic: Callable[[], float] = time.monotonic,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.primary = primary
        self.mode = mode
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.replicas = max(1, replicas)
        self.local = MemoryStore(clock=clock, buckets=buckets)
        self._monotonic = monotonic
        self._down_until = 0.0
        # The last call failed and no call has succeeded since: probe one call at a time.
        self._suspect = False
        self._probing = False
        self.failures = 0
        # A store whose calls end within the timeout by themselves needs no timer per call.
        self._self_bounded = bool(getattr(primary, "bounds_own_calls", False))

    @property
    def down(self) -> bool:
        return self._monotonic() < self._down_until

    async def _try(self, call: Callable[[], Awaitable[T]]) -> T | None:
        """The primary's answer, or None when it is down (known or just found out).

        After an outage only one call at a time probes the store; the others keep deciding by
        the fail mode instead of all waiting out the timeout on a store that may still hang.
        """
        if self.down:
            return None
        probing = self._suspect
        if probing:
            if self._probing:
                return None
            self._probing = True
        try:
            if self._self_bounded:
                result = await call()
            else:
                # asyncio.timeout, not wait_for: no extra task per decision on the hot path.
                async with asyncio.timeout(self.timeout):
                    result = await call()
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

    def _scaled(self, op: LimitOp) -> LimitOp:
        if op.limit <= 0 or self.replicas == 1:
            return op
        return dataclasses.replace(op, limit=max(1, op.limit // self.replicas))

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
            return outcome
        if self.mode == "local":
            local = await self.local.decide([self._scaled(op) for op in ops], **kwargs)  # type: ignore[arg-type]
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
        scaled = [
            dataclasses.replace(b, limit=max(1, b.limit // self.replicas)) if b.limit > 0 else b
            for b in budgets
        ]
        local = await self.local.settle(scaled, **kwargs)  # type: ignore[arg-type]
        return dataclasses.replace(local, degraded=True)

    async def put_headroom(self, field: str, record: str, ttl_ms: int) -> None:
        await self.local.put_headroom(field, record, ttl_ms)
        await self._try(lambda: self.primary.put_headroom(field, record, ttl_ms))

    async def get_headroom(self) -> dict[str, str]:
        shared = await self._try(self.primary.get_headroom)
        return shared if shared is not None else await self.local.get_headroom()

    async def close(self) -> None:
        await self.primary.close()
