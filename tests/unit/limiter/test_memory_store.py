"""The memory store forgets expired state, so memory follows the active keys only."""

from __future__ import annotations

from services.limiter.store.base import DAY_MS, Kind, LimitOp
from services.limiter.store.memory import MemoryStore


class Clock:
    now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_expired_windows_budgets_counters_and_replays_are_collected() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock, gc_interval_s=1)
    for user in range(50):
        await store.decide(
            [
                LimitOp(Kind.WINDOW, f"w{user}", 10, 1, 60_000),
                LimitOp(Kind.BUDGET, f"b{user}", 100, 10),
                LimitOp(Kind.COUNTER, f"c{user}", 5, 1, 60_000),
            ],
            idempotency_key=f"i{user}",
            idempotency_ttl_ms=60_000,
            reservation_id=f"r{user}",
            reservation_ttl_ms=30_000,
        )
    assert len(store._windows) == len(store._budgets) == len(store._counters) == len(store._idem) == 50
    clock.now += 2 * DAY_MS / 1000
    await store.decide([LimitOp(Kind.WINDOW, "other", 10, 1, 60_000)])
    assert set(store._windows) == {"other"}
    assert not store._budgets and not store._counters and not store._idem
