"""The in-memory queue's idle workers sleep until there is work: a claim on an empty queue, or on
one whose only job is parked, looks for a job when it starts and again when woken or when that job
is due, instead of every 100 ms (which kept an idle suite's 32 workers at about 1% of a core)."""

from __future__ import annotations

import asyncio
import time

from services.edge.store import JobRecord
from services.edge.store.memory import MemoryEdgeStore
from tests.contract.edge.test_edge_store import _job


async def settle() -> None:
    """Lets the event loop run what is ready (a task reaching its wait, a woken waiter finishing):
    a count of loop turns, not a length of time, so a busy machine does not change the outcome."""
    for _ in range(20):
        await asyncio.sleep(0)


def counting_looks(store: MemoryEdgeStore) -> list[int]:
    """Counts the store's looks for a due job (its _pop_due calls)."""
    looks = [0]
    pop_due = store._pop_due

    def counted() -> JobRecord | None:
        looks[0] += 1
        return pop_due()

    store._pop_due = counted  # type: ignore[method-assign]
    return looks


async def test_a_claim_on_an_empty_queue_looks_once_and_waits_out_its_block() -> None:
    store = MemoryEdgeStore()
    looks = counting_looks(store)
    assert await store.claim("w", block=0.6) is None
    assert looks[0] <= 2  # before and after its wait (polling every 100 ms looked 7 times)


async def test_a_parked_job_is_claimed_when_due_without_polling_meanwhile() -> None:
    store = MemoryEdgeStore()
    await store.submit(_job("j"), "")
    claim = await store.claim("w", block=0.5)
    assert claim is not None
    due = time.time() + 0.6
    await store.park(claim, due)
    looks = counting_looks(store)
    # A block far past the due time: the claim returns when the job is due, however busy the machine.
    later = await store.claim("w", block=60.0)
    assert later is not None and later.job.job_id == "j"
    assert time.time() >= due
    assert looks[0] <= 3  # before the wait, when due (and once more if the timer fired a hair early)


async def test_a_new_job_wakes_a_waiting_claim() -> None:
    store = MemoryEdgeStore()
    waiting = asyncio.create_task(store.claim("w", block=30.0))
    await settle()
    assert not waiting.done()
    await store.submit(_job("new"), "")
    await settle()
    assert waiting.done()  # woken within a few loop turns, not at the end of its 30 s block
    claim = waiting.result()
    assert claim is not None and claim.job.job_id == "new"


async def test_one_new_job_goes_to_one_of_several_waiting_workers() -> None:
    store = MemoryEdgeStore()
    workers = [asyncio.create_task(store.claim(f"w{i}", block=0.5)) for i in range(4)]
    await settle()
    await store.submit(_job("only"), "")
    claims = [c for c in await asyncio.gather(*workers) if c is not None]
    assert [c.job.job_id for c in claims] == ["only"]
