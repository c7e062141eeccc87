"""Load governing: lower-priority lanes give way, least important first, while the event loop runs
late, and come back, most important first, when it keeps time."""

from __future__ import annotations

import asyncio
import time

from services.edge.pacing import Lane, LoadGovernor
from tests.support.waiting import eventually


def governor(target_lag: float = 0.01, interval: float = 0.01) -> tuple[LoadGovernor, Lane, Lane]:
    g = LoadGovernor(target_lag=target_lag, interval=interval)
    queue = g.lane("queue", 16, 2)
    chats = g.lane("interactive", 64, 8)
    return g, queue, chats


async def test_the_queue_gives_way_first_and_comes_back_last() -> None:
    g, queue, chats = governor()
    seen = []
    for lag in (0.05,) * 6 + (0.0,) * 4:
        await g.observe(lag)
        seen.append((queue.allowed, chats.allowed))
    assert seen == [
        (8, 64), (4, 64), (2, 64),  # the queue halves down to its floor
        (2, 32), (2, 16), (2, 8),  # only then do low/normal chats
        (2, 9), (2, 10), (2, 11), (2, 12),  # chats are restored first, by an eighth (at least one)
    ]  # fmt: skip
    for _ in range(100):
        await g.observe(0.0)
    assert (queue.allowed, chats.allowed) == (16, 64)


async def test_work_past_the_allowance_waits_for_a_slot() -> None:
    lane = Lane("queue", 16, 2)
    await lane.set_allowed(2)
    entered: list[int] = []
    release = asyncio.Event()

    async def worker(i: int) -> None:
        async with lane.slot():
            entered.append(i)
            await release.wait()

    tasks = [asyncio.create_task(worker(i)) for i in range(5)]
    await eventually(lambda: lane.waiting == 3, what="three workers queued behind the allowance")
    assert len(entered) == 2 and lane.active == 2
    await lane.set_allowed(3)  # one more may start
    await eventually(lambda: len(entered) == 3, what="a third worker let in")
    assert lane.active == 3 and lane.waiting == 2
    release.set()
    await asyncio.gather(*tasks)
    assert sorted(entered) == [0, 1, 2, 3, 4] and lane.active == 0 and lane.waiting == 0


async def test_a_waiter_that_gives_up_leaves_no_slot_behind() -> None:
    lane = Lane("interactive", 4, 1)
    await lane.set_allowed(1)
    await lane.acquire()
    try:
        async with asyncio.timeout(0.05):
            await lane.acquire()
    except TimeoutError:
        pass
    assert lane.active == 1 and lane.waiting == 0
    await lane.release()
    await lane.acquire()  # the slot is free again
    assert lane.active == 1


async def test_a_busy_loop_is_measured_and_lower_priority_work_backs_off() -> None:
    g, queue, chats = governor(target_lag=0.01, interval=0.01)
    g.start()
    try:
        stop = time.monotonic() + 0.6
        while time.monotonic() < stop:  # callbacks that hog the loop, as a CPU-bound surge does
            time.sleep(0.03)  # noqa: ASYNC251 - blocking on purpose: this is the CPU hog
            await asyncio.sleep(0)
        assert queue.allowed == 2 and chats.allowed < 64 and g.lag > 0.01
        # The loop keeps time again: chats are restored first, then the queue.
        await eventually(lambda: chats.allowed == 64 and queue.allowed > 2, what="lanes restored")
    finally:
        await g.stop()


def test_governing_is_off_with_a_zero_target() -> None:
    assert not governor(target_lag=0.0)[0].enabled and governor()[0].enabled
