"""The same cases against the memory store and the Redis store (one Lua call per decision)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from services.kit.redisconn import split_key_prefix
from services.limiter.store.base import DAY_MS, BudgetRef, Charge, ChargeKind, Kind, LimitOp, Store
from services.limiter.store.memory import MemoryStore
from services.limiter.store.redis import RedisStore

HOUR_MS = 3_600_000
BUCKETS = 20


class FakeClock:
    def __init__(self) -> None:
        # One hour into a UTC day, so day boundaries are where the tests put them.
        self.now = (1_800_000_000_000 // DAY_MS) * DAY_MS / 1000 + 3600

    def __call__(self) -> float:
        return self.now

    def ms(self) -> float:
        return self.now * 1000

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore(clock=clock, buckets=BUCKETS)
        return
    url = request.getfixturevalue("redis_url")
    s = RedisStore(url, buckets=BUCKETS, clock_ms=clock.ms, timeout=2.0)
    yield s
    await s.close()


def window(key: str, limit: int, cost: int = 1, *, window_ms: int = HOUR_MS, shadow: bool = False) -> LimitOp:
    return LimitOp(Kind.WINDOW, "{t:a}:" + key, limit, cost, window_ms, shadow)


def budget(key: str, limit: int, cost: int, *, shadow: bool = False) -> LimitOp:
    return LimitOp(Kind.BUDGET, "{t:a}:" + key, limit, cost, 0, shadow)


def raw_redis(redis_url: str) -> tuple[aioredis.Redis, str]:
    """A plain client on the store's Redis, to look at its keys, and the store's key prefix."""
    url, prefix = split_key_prefix(redis_url)
    return aioredis.from_url(url), prefix


def counter(key: str, limit: int, cost: int = 1) -> LimitOp:
    return LimitOp(Kind.COUNTER, "{t:a}:" + key, limit, cost, HOUR_MS)


async def test_window_admits_exactly_the_limit_then_says_when_to_retry(
    store: Store, clock: FakeClock
) -> None:
    outcomes = [await store.decide([window("w", 3)]) for _ in range(4)]
    assert [o.admitted for o in outcomes] == [True, True, True, False]
    assert [o.results[0].remaining for o in outcomes] == [2, 1, 0, 0]
    denied = outcomes[3].results[0]
    assert denied.over
    # the first hit leaves the (conservative) window within one hour plus one sub-bucket
    assert HOUR_MS - 1000 <= denied.retry_ms <= HOUR_MS + HOUR_MS // BUCKETS
    assert 0 < outcomes[2].results[0].reset_ms <= HOUR_MS + HOUR_MS // BUCKETS
    clock.advance(denied.retry_ms / 1000)
    assert (await store.decide([window("w", 3)])).admitted


async def test_window_never_admits_more_than_the_limit_in_any_rolling_window(
    store: Store, clock: FakeClock
) -> None:
    # A fixed window would admit 3 just before its edge and 3 more just after: 6 in a second.
    clock.advance(HOUR_MS / 1000 - clock.now % 3600 - 1)
    assert all([(await store.decide([window("edge", 3)])).admitted for _ in range(3)])
    clock.advance(2)
    assert not (await store.decide([window("edge", 3)])).admitted
    admitted_times = []
    for _ in range(200):  # sweep 2h in 36s steps; count admissions per rolling hour
        clock.advance(36)
        if (await store.decide([window("edge", 3)])).admitted:
            admitted_times.append(clock.now)
    for t in admitted_times:
        assert sum(1 for u in admitted_times if t - 3600 < u <= t) <= 3


async def test_hits_are_weighted_and_a_cost_above_the_limit_is_denied(store: Store) -> None:
    assert (await store.decide([window("h", 10, cost=7)])).admitted
    o = await store.decide([window("h", 10, cost=4)])
    assert not o.admitted and o.results[0].remaining == 3
    assert (await store.decide([window("h", 10, cost=3)])).admitted
    big = await store.decide([window("h2", 10, cost=11)])
    assert not big.admitted and big.results[0].retry_ms == HOUR_MS


async def test_all_limits_of_one_call_are_decided_together(store: Store) -> None:
    assert (await store.decide([window("a", 5), window("b", 1)])).admitted
    refused = await store.decide([window("a", 5), window("b", 1)])
    assert not refused.admitted
    assert [r.over for r in refused.results] == [False, True]
    # "a" was not counted by the refused call: 4 left, not 3
    assert (await store.decide([window("a", 5)])).results[0].remaining == 3


async def test_shadow_limits_report_but_never_deny(store: Store) -> None:
    assert (await store.decide([window("s", 1, shadow=True)])).admitted
    o = await store.decide([window("s", 1, shadow=True), window("t", 5)])
    assert o.admitted
    assert o.results[0].over and not o.results[1].over


async def test_peek_reads_without_counting(store: Store) -> None:
    await store.decide([window("p", 2)])
    for _ in range(3):
        o = await store.decide([window("p", 2, cost=0)], peek=True)
        assert not o.admitted and o.results[0].remaining == 1 and o.results[0].used == 1


async def test_an_idempotency_key_is_counted_once(store: Store) -> None:
    first = await store.decide(
        [window("i", 5), budget("ib", 100, 10)],
        idempotency_key="{t:a}:idem:r1",
        idempotency_ttl_ms=60_000,
        reservation_id="res1",
        reservation_ttl_ms=60_000,
        delay_ms=250,
    )
    again = await store.decide(
        [window("i", 5), budget("ib", 100, 10)],
        idempotency_key="{t:a}:idem:r1",
        idempotency_ttl_ms=60_000,
        reservation_id="res2",
        reservation_ttl_ms=60_000,
    )
    assert first.admitted and again.admitted and again.replayed and not first.replayed
    assert again.reservation_id == "res1" and again.delay_ms == 250
    now = await store.decide([window("i", 5, cost=0), budget("ib", 100, 0)], peek=True)
    assert now.results[0].used == 1 and now.results[1].remaining == 90


async def test_a_denied_call_is_not_remembered_so_its_retry_can_pass(store: Store, clock: FakeClock) -> None:
    await store.decide([window("d", 1)])
    key = "{t:a}:idem:r2"
    assert not (await store.decide([window("d", 1)], idempotency_key=key, idempotency_ttl_ms=10**7)).admitted
    clock.advance(2 * 3600)
    retried = await store.decide([window("d", 1)], idempotency_key=key, idempotency_ttl_ms=10**7)
    assert retried.admitted and not retried.replayed


async def test_budget_reserve_then_settle_refunds_or_charges_the_difference(store: Store) -> None:
    a = await store.decide([budget("b", 250, 100)], reservation_id="r1", reservation_ttl_ms=60_000)
    b = await store.decide([budget("b", 250, 100)], reservation_id="r2", reservation_ttl_ms=60_000)
    c = await store.decide([budget("b", 250, 100)], reservation_id="r3", reservation_ttl_ms=60_000)
    assert (a.admitted, b.admitted, c.admitted) == (True, True, False)
    assert b.results[0].remaining == 50 and c.results[0].over and c.results[0].retry_ms > 0
    refs = [BudgetRef("{t:a}:b", 250)]
    s1 = await store.settle(
        refs,
        reservation_id="r1",
        actual_tokens=30,
        cost_micros=7,
        done_key="{t:a}:done:r1",
        done_ttl_ms=60_000,
    )
    assert s1.reservation_found and not s1.already_settled
    assert s1.results[0].remaining == 250 - 30 - 100 and s1.results[0].used == 30
    assert s1.results[0].cost_micros == 7
    again = await store.settle(
        refs,
        reservation_id="r1",
        actual_tokens=30,
        cost_micros=7,
        done_key="{t:a}:done:r1",
        done_ttl_ms=60_000,
    )
    assert again.already_settled and again.results[0].used == 30
    s2 = await store.settle(
        refs,
        reservation_id="r2",
        actual_tokens=180,
        cost_micros=0,
        done_key="{t:a}:done:r2",
        done_ttl_ms=60_000,
    )
    # charged more than reserved: the budget shows it (and is overspent by at most the in-flight estimate)
    assert s2.results[0].used == 210 and s2.results[0].remaining == 40
    assert not (
        await store.decide([budget("b", 250, 41)], reservation_id="r4", reservation_ttl_ms=1)
    ).admitted


async def test_unsettled_reservations_expire(store: Store, clock: FakeClock) -> None:
    assert (
        await store.decide([budget("e", 100, 100)], reservation_id="r1", reservation_ttl_ms=5_000)
    ).admitted
    blocked = await store.decide([budget("e", 100, 1)], reservation_id="r2", reservation_ttl_ms=5_000)
    assert not blocked.admitted and 0 < blocked.results[0].retry_ms <= 5_000
    clock.advance(6)
    assert (
        await store.decide([budget("e", 100, 100)], reservation_id="r3", reservation_ttl_ms=5_000)
    ).admitted
    late = await store.settle(
        [BudgetRef("{t:a}:e", 100)],
        reservation_id="r1",
        actual_tokens=20,
        cost_micros=0,
        done_key="{t:a}:done:r1",
        done_ttl_ms=60_000,
    )
    # the expired reservation is no longer held, but its actual spend is still charged
    assert not late.reservation_found and late.results[0].used == 20


async def test_budgets_reset_at_the_utc_day(store: Store, clock: FakeClock) -> None:
    await store.settle(
        [BudgetRef("{t:a}:day", 50)],
        reservation_id="",
        actual_tokens=50,
        cost_micros=1,
        done_key="",
        done_ttl_ms=0,
    )
    o = await store.decide([budget("day", 50, 1)], reservation_id="r", reservation_ttl_ms=1000)
    assert not o.admitted and o.results[0].retry_ms == DAY_MS - 3_600_000
    clock.advance(DAY_MS / 1000)
    fresh = await store.decide([budget("day", 50, 0)], peek=True)
    assert fresh.results[0].used == 0 and fresh.results[0].remaining == 50


async def test_unlimited_budgets_are_tracked(store: Store) -> None:
    o = await store.decide([budget("u", -1, 10**9)], reservation_id="r", reservation_ttl_ms=1000)
    assert o.admitted and o.results[0].remaining == -1


async def test_counters_cap_per_key(store: Store) -> None:
    results = [await store.decide([counter("c", 3)]) for _ in range(4)]
    assert [r.admitted for r in results] == [True, True, True, False]
    assert results[3].results[0].retry_ms > 0 and results[2].results[0].used == 3
    assert (await store.decide([counter("c2", 3, cost=3)])).admitted


async def test_headroom_reports_are_shared_until_they_expire(store: Store) -> None:
    await store.put_headroom("openai\x00gpt", '{"x": 1}', 60_000)
    assert await store.get_headroom() == {"openai\x00gpt": '{"x": 1}'}


async def test_redis_keys_carry_the_prefix_and_one_hash_tag(redis_url: str, clock: FakeClock) -> None:
    s = RedisStore(redis_url, clock_ms=clock.ms)
    await s.decide([window("k", 2), budget("kb", 10, 1)], reservation_id="r", reservation_ttl_ms=1000)
    client, prefix = raw_redis(redis_url)
    keys = [k.decode() async for k in client.scan_iter(match=f"{prefix}*")]
    await client.aclose()
    await s.close()
    assert keys and all(k.startswith(prefix + "{t:a}:") for k in keys)


async def test_redis_reloads_its_script_when_redis_forgot_it(redis_url: str, clock: FakeClock) -> None:
    s = RedisStore(redis_url, clock_ms=clock.ms)
    assert (await s.decide([window("f", 2)])).admitted
    # As after a Redis restart (SCRIPT FLUSH would disturb others sharing this Redis):
    # the known SHA is not loaded, EVALSHA answers NOSCRIPT and the store loads it again.
    s._decide.sha = "0" * 40
    assert (await s.decide([window("f", 2)])).results[0].remaining == 0
    await s.close()


async def test_redis_keys_all_expire_and_outlive_what_they_hold(redis_url: str, clock: FakeClock) -> None:
    """No key is left without an expiry (a leak per user), and none expires while it still
    counts: a window for its length, a budget for the day, reservations until their own expiry,
    including one taken just before midnight and settled just after it."""
    s = RedisStore(redis_url, buckets=BUCKETS, clock_ms=clock.ms)
    client, prefix = raw_redis(redis_url)
    ops = [window("ttl-w", 100), budget("ttl-b", 10_000, 10)]
    try:
        for i in range(3):  # the later calls land in the same sub-bucket and set no expiry
            await s.decide(ops, reservation_id=f"ttl-r{i}", reservation_ttl_ms=600_000)
            clock.advance(1)
        keys = [k.decode() async for k in client.scan_iter(match=f"{prefix}{{t:a}}:ttl-*")]
        ttls = {k.removeprefix(prefix + "{t:a}:"): await client.pttl(k) for k in keys}
        assert set(ttls) == {"ttl-w", "ttl-b", "ttl-b:x"}
        assert ttls["ttl-w"] >= HOUR_MS  # the window's length, and more
        assert ttls["ttl-b"] >= DAY_MS  # the rest of today, and all of tomorrow
        # The reservations' zset lives as long as the hash that counts them (never shorter, or an
        # unsettled reservation would stay counted after its entry expired).
        # (Both expire at the end of tomorrow; the fake clock moved 2 s that Redis did not see.)
        assert ttls["ttl-b:x"] >= ttls["ttl-b"] - 5000

        # A reservation taken just before midnight is still found when settled just after it.
        clock.now = (clock.now // 86_400 + 1) * 86_400 - 30
        for rid in ("late", "unsettled"):
            late = await s.decide(
                [budget("ttl-late", 10_000, 50)], reservation_id=rid, reservation_ttl_ms=600_000
            )
            assert late.admitted
        clock.advance(300)
        settled = await s.settle(
            [BudgetRef("{t:a}:ttl-late", 10_000)],
            reservation_id="late",
            actual_tokens=40,
            cost_micros=0,
            done_key="{t:a}:done:late",
            done_ttl_ms=1_200_000,
        )
        assert settled.reservation_found
        late_keys = [k async for k in client.scan_iter(match=f"{prefix}{{t:a}}:ttl-late*")]
        assert late_keys and all([await client.pttl(k) > 0 for k in late_keys])
        # The new day's first use moved the hash's expiry to the end of the new tomorrow; the zset
        # still holds yesterday's unsettled reservation, counted in the hash, so it moved too.
        hash_ttl = await client.pttl(prefix + "{t:a}:ttl-late")
        zset_ttl = await client.pttl(prefix + "{t:a}:ttl-late:x")
        assert hash_ttl > DAY_MS and zset_ttl >= hash_ttl - 5000
    finally:
        await client.aclose()
        await s.close()


async def test_redis_replays_answers_stored_before_the_reply_format_changed(
    redis_url: str, clock: FakeClock
) -> None:
    """Idempotency records are stored in the format earlier versions read (a JSON object), so
    replicas of either version replay each other's during a rolling upgrade; records in the
    interim flat format replay too, and new ones replay the very answer they stored."""
    s = RedisStore(redis_url, clock_ms=clock.ms)
    client, prefix = raw_redis(redis_url)
    ops = [window("fmt-w", 10), budget("fmt-b", 1000, 30)]
    kwargs = {"idempotency_ttl_ms": 60_000, "reservation_id": "fmt-r", "reservation_ttl_ms": 60_000}
    try:
        first = await s.decide(ops, idempotency_key="{t:a}:idem:new", **kwargs)  # type: ignore[arg-type]
        again = await s.decide(ops, idempotency_key="{t:a}:idem:new", **kwargs)  # type: ignore[arg-type]
        assert not first.replayed and again.replayed
        assert (again.admitted, again.results, again.reservation_id) == (True, first.results, "fmt-r")
        record = await client.get(prefix + "{t:a}:idem:new")
        assert record is not None
        stored = json.loads(record)
        assert stored == {
            "a": 1,
            "d": 0,
            "id": "fmt-r",
            "r": [
                [int(r.over), r.remaining, r.reset_ms, r.retry_ms, r.used, r.cost_micros]
                for r in first.results
            ],
        }
        interim = '[0,1,0,"flat-r",1,0,4,3600000,0,6,0]'
        await client.set(prefix + "{t:a}:idem:flat", interim)
        flat = await s.decide(ops, idempotency_key="{t:a}:idem:flat", **kwargs)  # type: ignore[arg-type]
        assert (flat.replayed, flat.admitted, flat.reservation_id) == (True, True, "flat-r")
        assert [(r.remaining, r.used) for r in flat.results] == [(4, 6)]
        old = '{"a":1,"r":[[0,9,3600000,0,1,0],[0,970,82800000,0,0,0]],"d":250,"id":"old-r"}'
        await client.set(prefix + "{t:a}:idem:old", old)
        replay = await s.decide(ops, idempotency_key="{t:a}:idem:old", **kwargs)  # type: ignore[arg-type]
        assert (
            replay.replayed
            and replay.admitted
            and replay.delay_ms == 250
            and replay.reservation_id == "old-r"
        )
        assert [(r.over, r.remaining, r.reset_ms, r.used) for r in replay.results] == [
            (False, 9, 3_600_000, 1),
            (False, 970, 82_800_000, 0),
        ]
    finally:
        await client.aclose()
        await s.close()


def fixed(key: str, limit: int, cost: int = 1, *, window_ms: int = 60_000) -> LimitOp:
    return LimitOp(Kind.FIXED, "{rls:d}:" + key, limit, cost, window_ms)


async def test_fixed_windows_are_aligned_and_count_every_hit_as_upstream(
    store: Store, clock: FakeClock
) -> None:
    clock.advance(12.5)  # 12.5 s into a minute
    first = await store.decide([fixed("f", 2, 2), fixed("g", 5)])
    assert first.admitted and [r.used for r in first.results] == [2, 1]
    assert first.results[0].reset_ms == 47_500  # to the minute's end
    # over the limit, still counted (upstream increments, then compares), never blocking the other op
    over = await store.decide([fixed("f", 2), fixed("g", 5)])
    assert over.admitted and over.results[0].over and over.results[0].used == 3
    assert over.results[0].remaining == 0 and not over.results[1].over and over.results[1].used == 2
    # the same key twice in one call: the second sees the first
    twice = await store.decide([fixed("h", 5, 2), fixed("h", 5, 2)])
    assert [r.used for r in twice.results] == [2, 4]
    clock.advance(47.5)  # the next minute: a fresh window
    fresh = await store.decide([fixed("f", 2)])
    assert not fresh.results[0].over and fresh.results[0].used == 1 and fresh.results[0].reset_ms == 60_000


async def test_replayed_charges_are_counted_at_their_time_whatever_the_limits(
    store: Store, clock: FakeClock
) -> None:
    now_ms = int(clock.ms())
    assert (await store.decide([window("r", 2, 2), counter("rc", 1)])).admitted
    charges = [
        Charge(ChargeKind.DECIDE, now_ms, ops=(window("r", 2, 3), counter("rc", 1, 2))),
        Charge(
            ChargeKind.DECIDE,
            now_ms,
            ops=(budget("rb", 100, 40),),
            reservation_id="res-1",
            reservation_ttl_ms=HOUR_MS,
        ),
        Charge(
            ChargeKind.SETTLE,
            now_ms,
            budgets=(BudgetRef("{t:a}:rb", 100),),
            reservation_id="res-1",
            actual_tokens=30,
            done_key="{t:a}:done:res-1",
            done_ttl_ms=HOUR_MS,
        ),
        Charge(ChargeKind.DECIDE, now_ms - 120_000, ops=(fixed("old", 5, 4),)),  # its window has passed
    ]
    assert await store.replay(charges) == len(charges)
    peek = await store.decide([window("r", 2, 0), counter("rc", 1, 0), budget("rb", 100, 0)], peek=True)
    assert [r.used for r in peek.results[:2]] == [5, 3]  # forced past their limits
    assert peek.results[2].used == 30 and peek.results[2].remaining == 70  # reservation released, 30 charged
