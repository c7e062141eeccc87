"""The turn-taking of versioned appends, on the real memory store, with timers the test fires."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from ballast.common.v1 import common_pb2
from ballast.sessions.v1 import sessions_pb2

from services.sessions.compaction import CompactionPolicy, Compactor
from services.sessions.contention import ContentionPolicy, ContentionQueue, VersionConflict
from services.sessions.model import AppendOutcome, NewTurn, Scope, SessionRecord
from services.sessions.sessions import Limits, Sessions
from services.sessions.store.memory import MemoryStore
from services.sessions.tokens import Tokenizers
from services.sessions.turns import new_turn

SCOPE = Scope("t1", "u1")
KEY = ("t1", "u1", "s1")


class Timers:
    """Turn timeouts that lapse when the test says so."""

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[[], None], list[bool]]] = []

    def schedule(self, delay: float, callback: Callable[[], None]) -> Timers.Handle:
        cancelled = [False]
        self.pending.append((callback, cancelled))
        return Timers.Handle(cancelled)

    def lapse_all(self) -> None:
        due, self.pending = self.pending, []
        for callback, cancelled in due:
            if not cancelled[0]:
                callback()

    class Handle:
        def __init__(self, cancelled: list[bool]) -> None:
            self._cancelled = cancelled

        def cancel(self) -> None:
            self._cancelled[0] = True


async def _until(check: Callable[[], bool]) -> None:
    for _ in range(1000):  # event-loop turns, not time
        if check():
            return
        await asyncio.sleep(0)
    raise AssertionError("the queue never reached the expected state")


@pytest.fixture
async def store() -> MemoryStore:
    store = MemoryStore()
    await store.create(SessionRecord("s1", "t1", "u1", "", {}, 1.0, 1.0, 1e12, 1e12))
    return store


def _append(
    queue: ContentionQueue,
    store: MemoryStore,
    version: int,
    writer: str,
    patience: float | None = None,
    *,
    next_turn: bool = False,
) -> asyncio.Future[AppendOutcome]:
    """A versioned append through the queue; with `next_turn`, one that asks for its writer's
    next turn (wait_for_next_turn)."""
    payload = sessions_pb2.Turn(
        message=common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=writer)
    ).SerializeToString()
    turn = NewTurn(common_pb2.ROLE_USER, 5, 0, 0, 0, 0, payload)

    def attempt() -> asyncio.Future[AppendOutcome]:
        return asyncio.ensure_future(store.append(SCOPE, "s1", version, writer, [turn], 2.0))

    return asyncio.ensure_future(queue.run(KEY, version, attempt, writer, patience, next_turn))


async def _conflict(pending: asyncio.Future[AppendOutcome]) -> tuple[int | None, float]:
    with pytest.raises(VersionConflict) as info:
        await pending
    return info.value.current_version, info.value.retry_after


async def test_a_writer_whose_turn_lapsed_rejoins_at_the_front(store: MemoryStore) -> None:
    timers = Timers()
    queue = ContentionQueue(
        ContentionPolicy(max_queue=100, max_wait=60.0, turn_timeout=1.0), schedule=timers.schedule
    )
    assert (await _append(queue, store, 0, "first")).session.version == 1
    # "slow" is told it is its turn at version 1, and takes too long to come back.
    assert await _conflict(_append(queue, store, 0, "slow")) == (1, 0.0)
    timers.lapse_all()
    # "other" gets the next turn; while it holds it, "third" and then "slow" arrive.
    assert await _conflict(_append(queue, store, 0, "other")) == (1, 0.0)
    third = _append(queue, store, 1, "third")
    await _until(lambda: queue.waiting(KEY) == 1)
    slow = _append(queue, store, 1, "slow")
    await _until(lambda: queue.waiting(KEY) == 2)
    # "other" never comes back either; "slow", whose turn had come before, goes ahead of "third".
    timers.lapse_all()
    assert (await slow).session.version == 2
    assert await _conflict(third) == (2, 0.0)


async def test_writers_are_served_in_arrival_order_with_one_conflict_each(store: MemoryStore) -> None:
    timers = Timers()
    queue = ContentionQueue(
        ContentionPolicy(max_queue=100, max_wait=60.0, turn_timeout=1.0), schedule=timers.schedule
    )
    assert (await _append(queue, store, 0, "w0")).session.version == 1
    assert await _conflict(_append(queue, store, 0, "w1")) == (1, 0.0)  # w1 holds the next turn
    later = [_append(queue, store, 0, f"w{n}") for n in range(2, 6)]
    await _until(lambda: queue.waiting(KEY) == 4)
    # w1 retries at the version it was given: through at once, then w2 is told, and so on.
    assert (await _append(queue, store, 1, "w1")).session.version == 2
    for n, pending in enumerate(later, start=2):
        assert await _conflict(pending) == (n, 0.0)
        assert (await _append(queue, store, n, f"w{n}")).session.version == n + 1
    assert queue.waiting(KEY) == 0 and all(cancelled[0] for _, cancelled in timers.pending)


async def test_a_full_queue_answers_at_once_with_a_retry_delay(store: MemoryStore) -> None:
    timers = Timers()
    queue = ContentionQueue(
        ContentionPolicy(max_queue=1, max_wait=60.0, turn_timeout=1.0), schedule=timers.schedule
    )
    await _append(queue, store, 0, "w0")
    await _conflict(_append(queue, store, 0, "w1"))  # holds the turn
    waiting = _append(queue, store, 0, "w2")
    await _until(lambda: queue.waiting(KEY) == 1)
    current, delay = await _conflict(_append(queue, store, 0, "w3"))
    assert current == 1 and delay > 0
    timers.lapse_all()
    assert await _conflict(waiting) == (1, 0.0)


async def test_the_next_writer_is_answered_before_the_last_one_returns(store: MemoryStore) -> None:
    """While the next writer's ABORTED travels, the session waits: it goes out first."""
    queue = ContentionQueue(
        ContentionPolicy(max_queue=100, max_wait=60.0, turn_timeout=60.0), schedule=Timers().schedule
    )
    gate = asyncio.Event()
    payload = sessions_pb2.Turn(
        message=common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="a")
    ).SerializeToString()

    async def slow_attempt() -> AppendOutcome:
        await gate.wait()
        return await store.append(
            SCOPE, "s1", 0, "a", [NewTurn(common_pb2.ROLE_USER, 5, 0, 0, 0, 0, payload)], 2.0
        )

    finished: list[str] = []
    first = asyncio.ensure_future(queue.run(KEY, 0, slow_attempt, "a"))
    first.add_done_callback(lambda _: finished.append("a appended"))
    await asyncio.sleep(0)  # "a" is appending
    second = _append(queue, store, 0, "b")
    second.add_done_callback(lambda _: finished.append("b told"))
    await _until(lambda: queue.waiting(KEY) == 1)
    gate.set()
    assert (await first).session.version == 1
    assert await _conflict(second) == (1, 0.0)
    assert finished == ["b told", "a appended"]


async def test_a_writer_answered_aborted_from_the_queue_never_prepares_its_turns(store: MemoryStore) -> None:
    """Tokenizing and hashing happen only for the attempt that reaches the store: on a contended
    session most versioned appends wait and are then told ABORTED, and the event loop all the
    writers share would otherwise prepare every append twice."""
    timers = Timers()
    queue = ContentionQueue(
        ContentionPolicy(max_queue=100, max_wait=60.0, turn_timeout=60.0), schedule=timers.schedule
    )
    tokenizers = Tokenizers()
    policy = CompactionPolicy(
        threshold_tokens=10**9,
        keep_tokens=0,
        max_turns=1,
        summary_max_tokens=16,
        retry_initial=1,
        retry_max=1,
    )
    limits = Limits(default_ttl=1e6, max_ttl=1e6, default_page_size=10, max_page_size=10, context_batch=10)
    sessions = Sessions(
        store,
        tokenizers,
        Compactor(store, None, tokenizers.default, policy, lambda: 2.0),
        limits,
        lambda: 2.0,
        contention=queue,
    )
    prepared: list[str] = []

    def turns_of(writer: str) -> Callable[[], Awaitable[list[NewTurn]]]:
        async def prepare() -> list[NewTurn]:
            prepared.append(writer)
            turn = sessions_pb2.Turn(
                message=common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=writer)
            )
            return [new_turn(turn, tokenizers.default)]

        return prepare

    gate = asyncio.Event()

    async def slow_turns() -> list[NewTurn]:
        await gate.wait()  # "a" is appending while "b" arrives
        return await turns_of("a")()

    first = asyncio.ensure_future(sessions.append(SCOPE, "s1", 0, "a", slow_turns))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(sessions.append(SCOPE, "s1", 0, "b", turns_of("b")))
    await _until(lambda: queue.waiting(KEY) == 1)
    gate.set()
    assert (await first).session.version == 1
    assert await _conflict(second) == (1, 0.0)
    assert prepared == ["a"], "the writer told ABORTED from the queue prepared nothing"
    retried = await sessions.append(SCOPE, "s1", 1, "b", turns_of("b"))
    assert retried.session.version == 2 and prepared == ["a", "b"]


async def test_an_append_asking_for_the_next_turn_is_answered_in_line_with_it(store: MemoryStore) -> None:
    timers = Timers()
    queue = ContentionQueue(
        ContentionPolicy(max_queue=100, max_wait=60.0, turn_timeout=60.0), schedule=timers.schedule
    )
    # Nobody waits: answered at once, and the turn is kept: a stale newcomer queues behind it.
    alone = await _append(queue, store, 0, "a0", next_turn=True)
    assert (alone.session.version, alone.next_turn) == (1, 1)
    newcomer = _append(queue, store, 0, "y0")
    await _until(lambda: queue.waiting(KEY) == 1)
    assert (await _append(queue, store, 1, "a1")).session.version == 2
    assert await _conflict(newcomer) == (2, 0.0)
    assert (await _append(queue, store, 2, "y0")).session.version == 3
    assert queue.waiting(KEY) == 0
    assert await _conflict(_append(queue, store, 0, "b0")) == (3, 0.0)  # b holds the turn at 3
    c = _append(queue, store, 0, "c0")
    await _until(lambda: queue.waiting(KEY) == 1)
    # b appends asking for its next turn: c, in line before b's answer, is told first.
    b = _append(queue, store, 3, "b0", next_turn=True)
    assert await _conflict(c) == (4, 0.0)
    assert not b.done()
    d = _append(queue, store, 0, "d0")
    await _until(lambda: queue.waiting(KEY) == 2)
    assert (await _append(queue, store, 4, "c0")).session.version == 5
    applied = await b
    assert (applied.session.version, applied.next_turn) == (4, 5)
    # The turn at 5 is kept for b's next append (a new key) while d waits: one call, no ABORTED.
    assert queue.waiting(KEY) == 1 and not d.done()
    assert (await _append(queue, store, 5, "b1")).session.version == 6
    assert await _conflict(d) == (6, 0.0)


async def test_an_answer_waiting_for_the_next_turn_goes_out_without_one_when_the_wait_runs_out(
    store: MemoryStore,
) -> None:
    timers = Timers()  # held turns never lapse here
    queue = ContentionQueue(
        ContentionPolicy(max_queue=100, max_wait=60.0, turn_timeout=60.0), schedule=timers.schedule
    )
    await _append(queue, store, 0, "w0")
    assert await _conflict(_append(queue, store, 0, "a0")) == (1, 0.0)
    c = _append(queue, store, 0, "c0")
    await _until(lambda: queue.waiting(KEY) == 1)
    # a's append goes through; its answer may wait only 10 ms of its caller's deadline, and
    # c (told its turn, which is then held) never comes back.
    late = await _append(queue, store, 1, "a0", patience=0.01, next_turn=True)
    assert late.session.version == 2 and late.next_turn is None
    assert await _conflict(c) == (2, 0.0)
    assert queue.waiting(KEY) == 0
