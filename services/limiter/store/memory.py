"""In-process store: exact for one process (the embedded default and the fail-open fallback).

The same algorithms as the Redis script (store/redis.py), in Python. A call never awaits
between reading and writing, so each decision is atomic on the event loop.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from services.limiter.store.base import (
    DAY_MS,
    BudgetRef,
    Charge,
    ChargeKind,
    Kind,
    LimitOp,
    OpResult,
    Outcome,
    Settlement,
)

Clock = Callable[[], float]


def _nothing() -> None:
    return None


def _constant(result: OpResult) -> Callable[[bool], OpResult]:
    return lambda _applied: result


@dataclass
class _Window:
    buckets: dict[int, int] = field(default_factory=dict)
    expires: int = 0


@dataclass
class _Budget:
    day: int = -1
    used: int = 0
    cost: int = 0
    reserved: int = 0
    # reservation id -> (tokens, expires at ms)
    holds: dict[str, tuple[int, int]] = field(default_factory=dict)
    # (expires at ms, reservation id), a min-heap swept lazily; stale entries are skipped
    expiries: list[tuple[int, str]] = field(default_factory=list)
    expires: int = 0

    def sweep(self, now: int) -> None:
        while self.expiries and self.expiries[0][0] <= now:
            exp, rid = heapq.heappop(self.expiries)
            hold = self.holds.get(rid)
            if hold is not None and hold[1] == exp:
                del self.holds[rid]
                self.reserved = max(0, self.reserved - hold[0])

    def soonest(self) -> int | None:
        while self.expiries:
            exp, rid = self.expiries[0]
            hold = self.holds.get(rid)
            if hold is not None and hold[1] == exp:
                return exp
            heapq.heappop(self.expiries)
        return None


@dataclass
class _Counter:
    value: int = 0
    expires: int = 0


@dataclass
class _Fixed:
    start: int = -1
    value: int = 0
    expires: int = 0


class MemoryStore:
    def __init__(self, *, clock: Clock = time.time, buckets: int = 20, gc_interval_s: float = 30.0) -> None:
        self._clock = clock
        self._buckets = buckets
        self._windows: dict[str, _Window] = {}
        self._budgets: dict[str, _Budget] = {}
        self._counters: dict[str, _Counter] = {}
        self._fixed: dict[str, _Fixed] = {}
        # idempotency key -> (outcome, expires)
        self._idem: dict[str, tuple[Outcome, int]] = {}
        self._done: dict[str, int] = {}
        self._headroom: dict[str, tuple[str, int]] = {}
        self._gc_interval_ms = int(gc_interval_s * 1000)
        self._next_gc = 0

    def _now(self) -> int:
        return int(self._clock() * 1000)

    # -- algorithms ---------------------------------------------------------------------

    def _window(self, op: LimitOp, now: int) -> tuple[Callable[[bool], OpResult], Callable[[], None]]:
        b = self._buckets
        g = -(-op.period_ms // b)  # ceil: b+1 buckets always cover the whole window
        cur = now // g
        first = cur - b
        state = self._windows.get(op.key)
        if state is None or state.expires <= now:
            state = _Window()
        for idx in [i for i in state.buckets if i < first]:
            del state.buckets[idx]
        used = sum(state.buckets.values())
        over = used + op.cost > op.limit
        retry = 0
        if over:
            if op.cost > op.limit:
                retry = op.period_ms
            else:
                need, acc = used + op.cost - op.limit, 0
                for idx in sorted(state.buckets):
                    acc += state.buckets[idx]
                    if acc >= need:
                        retry = (idx + b + 1) * g - now
                        break

        def apply() -> None:
            state.buckets[cur] = state.buckets.get(cur, 0) + op.cost
            state.expires = now + (b + 2) * g
            self._windows[op.key] = state

        def result(applied: bool) -> OpResult:
            total = used + (op.cost if applied else 0)
            newest = max(state.buckets, default=None)
            reset = 0 if newest is None or total == 0 else (newest + b + 1) * g - now
            return OpResult(over, max(0, op.limit - total), reset, retry, total)

        return result, apply

    def _budget_state(self, key: str, now: int) -> _Budget:
        state = self._budgets.get(key)
        if state is None or (state.expires <= now and not state.holds):
            state = _Budget()
            self._budgets[key] = state
        day = now // DAY_MS
        if state.day != day:
            state.day, state.used, state.cost = day, 0, 0
        state.sweep(now)
        return state

    def _budget_result(self, state: _Budget, limit: int, cost: int, over: bool, now: int) -> OpResult:
        reset = (state.day + 1) * DAY_MS - now
        retry = 0
        if over:
            if state.used + cost > limit:
                retry = reset
            else:
                soonest = state.soonest()
                retry = reset if soonest is None else min(reset, max(1, soonest - now))
        remaining = -1 if limit < 0 else max(0, limit - state.used - state.reserved)
        return OpResult(over, remaining, reset, retry, state.used, state.cost)

    def _budget(
        self, op: LimitOp, now: int, rid: str, ttl_ms: int
    ) -> tuple[Callable[[bool], OpResult], Callable[[], None]]:
        state = self._budget_state(op.key, now)
        over = op.limit >= 0 and state.used + state.reserved + op.cost > op.limit

        def apply() -> None:
            if op.cost > 0 and rid:
                old = state.holds.get(rid)
                if old is not None:
                    state.reserved -= old[0]
                state.holds[rid] = (op.cost, now + ttl_ms)
                heapq.heappush(state.expiries, (now + ttl_ms, rid))
                state.reserved += op.cost
            state.expires = (state.day + 1) * DAY_MS + ttl_ms

        return (lambda _applied: self._budget_result(state, op.limit, op.cost, over, now)), apply

    def _counter(self, op: LimitOp, now: int) -> tuple[Callable[[bool], OpResult], Callable[[], None]]:
        state = self._counters.get(op.key)
        if state is None or state.expires <= now:
            state = _Counter()
        value = state.value
        over = op.limit >= 0 and value + op.cost > op.limit
        ttl = state.expires - now if state.value else 0

        def apply() -> None:
            state.value += op.cost
            state.expires = now + op.period_ms
            self._counters[op.key] = state

        def result(applied: bool) -> OpResult:
            total = value + (op.cost if applied else 0)
            reset = op.period_ms if applied and op.cost > 0 else ttl
            retry = (ttl or op.period_ms) if over else 0
            return OpResult(over, -1 if op.limit < 0 else max(0, op.limit - total), reset, retry, total)

        return result, apply

    def _fixed_window(self, op: LimitOp, now: int, peek: bool) -> OpResult:
        """Counted at once (FIXED ops always count): a second op on the same key in the same
        call sees the first, as upstream's pipelined INCRBYs do."""
        start = now - now % op.period_ms
        state = self._fixed.get(op.key)
        if state is None or state.start < start:
            state = _Fixed(start, 0, start + op.period_ms)
        if state.start > start:  # a replayed charge from a window that has already ended
            return OpResult(False, max(0, op.limit - op.cost), 0, 0, op.cost)
        after = state.value + (0 if peek else op.cost)
        if not peek:
            state.value = after
            self._fixed[op.key] = state
        reset = start + op.period_ms - now
        over = after > op.limit
        return OpResult(over, max(0, op.limit - after), reset, reset if over else 0, after)

    # -- Store ----------------------------------------------------------------------------

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
        return self._decide(
            ops,
            self._now(),
            peek=peek,
            idempotency_key=idempotency_key,
            idempotency_ttl_ms=idempotency_ttl_ms,
            reservation_id=reservation_id,
            reservation_ttl_ms=reservation_ttl_ms,
            delay_ms=delay_ms,
        )

    def _decide(
        self,
        ops: Sequence[LimitOp],
        now: int,
        *,
        peek: bool = False,
        idempotency_key: str = "",
        idempotency_ttl_ms: int = 0,
        reservation_id: str = "",
        reservation_ttl_ms: int = 0,
        delay_ms: int = 0,
        force: bool = False,
    ) -> Outcome:
        self._maybe_gc(now)
        if idempotency_key and idempotency_ttl_ms > 0:
            previous = self._idem.get(idempotency_key)
            if previous is not None and previous[1] > now:
                o = previous[0]
                return Outcome(True, o.results, True, o.delay_ms, o.reservation_id)
        pending: list[tuple[Callable[[bool], OpResult], Callable[[], None]]] = []
        overs: list[bool] = []
        for op in ops:
            if op.kind == Kind.FIXED:
                pending.append((_constant(self._fixed_window(op, now, peek)), _nothing))
                overs.append(False)
                continue
            if op.kind == Kind.WINDOW:
                res_fn, apply = self._window(op, now)
            elif op.kind == Kind.BUDGET:
                res_fn, apply = self._budget(op, now, reservation_id, reservation_ttl_ms)
            else:
                res_fn, apply = self._counter(op, now)
            pending.append((res_fn, apply))
            overs.append(res_fn(False).over and not op.shadow)
        admitted = not peek and (force or not any(overs))
        if admitted:
            for (_, apply), op in zip(pending, ops, strict=True):
                if op.cost > 0 or op.kind == Kind.BUDGET:
                    apply()
        results = tuple(res_fn(admitted) for res_fn, _ in pending)
        outcome = Outcome(admitted, results, False, delay_ms, reservation_id if admitted else "")
        if admitted and idempotency_key and idempotency_ttl_ms > 0:
            self._idem[idempotency_key] = (outcome, now + idempotency_ttl_ms)
        return outcome

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
        return self._settle(
            budgets,
            self._now(),
            reservation_id=reservation_id,
            actual_tokens=actual_tokens,
            cost_micros=cost_micros,
            done_key=done_key,
            done_ttl_ms=done_ttl_ms,
        )

    def _settle(
        self,
        budgets: Sequence[BudgetRef],
        now: int,
        *,
        reservation_id: str,
        actual_tokens: int,
        cost_micros: int,
        done_key: str,
        done_ttl_ms: int,
    ) -> Settlement:
        already = False
        if reservation_id and done_key:
            expires = self._done.get(done_key, 0)
            already = expires > now
            if not already:
                self._done[done_key] = now + done_ttl_ms
        found = False
        results = []
        for ref in budgets:
            state = self._budget_state(ref.key, now)
            if not already:
                hold = state.holds.pop(reservation_id, None) if reservation_id else None
                if hold is not None:
                    found = True
                    state.reserved = max(0, state.reserved - hold[0])
                state.used += actual_tokens
                state.cost += cost_micros
                state.expires = max(state.expires, (state.day + 1) * DAY_MS + done_ttl_ms)
            results.append(self._budget_result(state, ref.limit, 0, False, now))
        return Settlement(tuple(results), found, already)

    async def put_headroom(self, field: str, record: str, ttl_ms: int) -> None:
        self._headroom[field] = (record, self._now() + ttl_ms)

    async def replay(self, charges: Sequence[Charge]) -> int:
        for c in charges:
            if c.kind == ChargeKind.DECIDE:
                self._decide(
                    c.ops,
                    c.at_ms,
                    idempotency_key=c.idempotency_key,
                    idempotency_ttl_ms=c.idempotency_ttl_ms,
                    reservation_id=c.reservation_id,
                    reservation_ttl_ms=c.reservation_ttl_ms,
                    delay_ms=c.delay_ms,
                    force=True,
                )
            elif c.kind == ChargeKind.SETTLE:
                self._settle(
                    c.budgets,
                    c.at_ms,
                    reservation_id=c.reservation_id,
                    actual_tokens=c.actual_tokens,
                    cost_micros=c.cost_micros,
                    done_key=c.done_key,
                    done_ttl_ms=c.done_ttl_ms,
                )
            elif c.kind == ChargeKind.HEADROOM:
                left = c.at_ms + c.ttl_ms - self._now()
                if left > 0:
                    await self.put_headroom(c.field, c.record, left)
        return len(charges)

    async def get_headroom(self) -> dict[str, str]:
        now = self._now()
        return {k: rec for k, (rec, exp) in self._headroom.items() if exp > now}

    async def ping(self) -> None:
        """Always answers: this process is the backend."""

    async def close(self) -> None:
        return None

    def _maybe_gc(self, now: int) -> None:
        """Drops expired state now and then, so memory follows the active keys only."""
        if now < self._next_gc:
            return
        self._next_gc = now + self._gc_interval_ms
        self._windows = {k: v for k, v in self._windows.items() if v.expires > now}
        self._counters = {k: v for k, v in self._counters.items() if v.expires > now}
        self._fixed = {k: v for k, v in self._fixed.items() if v.expires > now}
        for budget in self._budgets.values():
            budget.sweep(now)
        self._budgets = {k: v for k, v in self._budgets.items() if v.expires > now or v.holds}
        self._idem = {k: v for k, v in self._idem.items() if v[1] > now}
        self._done = {k: v for k, v in self._done.items() if v > now}
        self._headroom = {k: v for k, v in self._headroom.items() if v[1] > now}
