"""Queue pacing: workers give way while the event loop runs late, and come back when it keeps time."""

from __future__ import annotations

import asyncio
import time

from services.edge.pacing import PacingSettings, QueuePacer


def pacer(target_lag: float = 0.01, interval: float = 0.01) -> QueuePacer:
    return QueuePacer(PacingSettings(max_workers=16, min_workers=2, target_lag=target_lag, interval=interval))


async def test_the_allowance_halves_under_lag_down_to_the_floor_and_grows_back_by_one() -> None:
    p = pacer()
    seen = []
    for lag in (0.05, 0.05, 0.05, 0.05, 0.0, 0.0, 0.0):
        await p.observe(lag)
        seen.append(p.allowed)
    assert seen == [8, 4, 2, 2, 3, 4, 5]
    for _ in range(50):
        await p.observe(0.0)
    assert p.allowed == 16


async def test_workers_past_the_allowance_wait_for_a_slot() -> None:
    p = pacer()
    for _ in range(3):
        await p.observe(1.0)  # allowance 2
    entered: list[int] = []
    release = asyncio.Event()

    async def worker(i: int) -> None:
        async with p.slot():
            entered.append(i)
            await release.wait()

    tasks = [asyncio.create_task(worker(i)) for i in range(5)]
    await asyncio.sleep(0.05)
    assert len(entered) == 2 and p.active == 2
    await p.observe(0.0)  # allowance 3: one more may start
    await asyncio.sleep(0.01)
    assert len(entered) == 3
    release.set()
    await asyncio.gather(*tasks)
    assert sorted(entered) == [0, 1, 2, 3, 4] and p.active == 0


async def test_a_busy_loop_is_measured_and_backs_the_queue_off() -> None:
    p = pacer(target_lag=0.01, interval=0.01)
    p.start()
    try:
        stop = time.monotonic() + 0.5
        while time.monotonic() < stop:  # callbacks that hog the loop, as a CPU-bound surge does
            time.sleep(0.03)  # noqa: ASYNC251 - blocking on purpose: this is the CPU hog
            await asyncio.sleep(0)
        assert p.allowed == 2 and p.lag > 0.01
        await asyncio.sleep(0.4)  # the loop keeps time again
        assert p.allowed > 10
    finally:
        await p.stop()


def test_pacing_is_off_with_a_zero_target() -> None:
    assert not pacer(target_lag=0.0).enabled and pacer().enabled
