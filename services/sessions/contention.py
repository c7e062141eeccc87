"""Fair turns for appends that carry an expected version, one queue per session (per process).

Optimistic appends on a busy session all race for the same version: without help one
wins each round, the others retry at once and lose again, and an unlucky writer can wait
for minutes. Here the writers of one session take turns in arrival order instead. While an
append runs, other versioned appends of that session wait in a FIFO queue. When it is
done, the next writer in line is either let through (its version is current) or answered
ABORTED with the current version and a retry delay of zero, and the session is held for
that writer's retry (for `turn_timeout`) so nobody overtakes it. Writers that follow the
documented retry behaviour are served one after another with no wasted round trips.

A writer that will append again can also ask for its next turn with this append
(`wait_for_next_turn`): once applied, its answer waits in the same line, and goes out
when its turn comes, with the version to send and the session held for it. That answer
replaces the ABORTED the writer's next append would otherwise get: one call per append.

The store still decides: this only orders the attempts of one process, so several
replicas stay correct and merely fair within each replica. Appends at the head
(expected_version -1) never wait here.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from services.kit.errors import Aborted
from services.sessions.model import AppendOutcome

_Key = tuple[str, str, str]


class VersionConflict(Aborted):
    """ABORTED with the current version (ErrorInfo) and when to retry (RetryInfo)."""

    def __init__(self, expected: int, current: int | None, retry_after: float) -> None:
        at = f"at version {current}" if current is not None else "being appended to"
        super().__init__(f"session is {at}, not at version {expected}", current_version=current)
        self.retry_after = retry_after

    def details(self) -> list[Any]:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(self.retry_after * 1e9))
        return [*super().details(), error_details_pb2.RetryInfo(retry_delay=delay)]


@dataclass(frozen=True)
class ContentionPolicy:
    # Versioned appends one session may hold waiting (0: no queue, conflicts answered at once).
    max_queue: int
    # Longest a versioned append waits in the queue before it is answered ABORTED anyway.
    max_wait: float
    # How long a writer told "your turn, at version N" keeps the session for its retry.
    turn_timeout: float


# The decision of a writer whose wait in line ran out.
_TIMED_OUT = -2


def _time_out(decision: asyncio.Future[int | None]) -> None:
    if not decision.done():
        decision.set_result(_TIMED_OUT)


def _jitter(mean: float) -> float:
    """Full jitter: uniform up to twice `mean` (at least a millisecond)."""
    return max(0.001, random.uniform(0.0, 2.0 * mean))


@dataclass(eq=False)  # compared by identity: removing one waiter from a long line stays cheap
class _Waiter:
    expected: int
    writer: str
    # None: go ahead; a version: answer ABORTED at that version (the turn is held for it).
    decision: asyncio.Future[int | None]
    # An applied append waiting to be answered with its writer's next turn: never "go ahead".
    next_turn: bool = False


@dataclass
class _Lane:
    key: _Key
    # The newest version this process saw (a lower bound of the stored one); -1 unknown.
    known: int = -1
    busy: bool = False
    held_for: int | None = None
    held_writer: str = ""
    held_timer: _Timer | None = None
    queue: deque[_Waiter] = field(default_factory=deque)
    # Writers whose held turn lapsed before they came back: they rejoin at the front (for
    # max_wait, after which they count as new).
    lapsed: set[str] = field(default_factory=set)

    @property
    def free(self) -> bool:
        """Nobody appending, no turn held, nobody waiting: the next writer goes straight in."""
        return not self.busy and self.held_for is None and not self.queue


class _Timer(Protocol):
    def cancel(self) -> None: ...


Schedule = Callable[[float, Callable[[], None]], _Timer]


def _call_later(delay: float, callback: Callable[[], None]) -> _Timer:
    return asyncio.get_running_loop().call_later(delay, callback)


class ContentionQueue:
    def __init__(
        self,
        policy: ContentionPolicy,
        clock: Callable[[], float] = time.monotonic,
        schedule: Schedule = _call_later,
    ) -> None:
        self._policy = policy
        self._clock = clock
        self._schedule = schedule
        self._lanes: dict[_Key, _Lane] = {}
        # Seconds one append attempt takes (moving average): the retry hint when the queue is full.
        self._attempt_seconds = 0.002
        # Without a queue: versioned appends in flight per session (the writers racing for it).
        self._racing: dict[_Key, int] = {}

    def waiting(self, key: _Key) -> int:
        """Versioned appends of this session waiting their turn (observability and tests)."""
        lane = self._lanes.get(key)
        return 0 if lane is None else len(lane.queue)

    def saw(self, key: _Key, version: int) -> None:
        """A version observed outside the queue (a head append): keeps stale checks exact."""
        lane = self._lanes.get(key)
        if lane is not None:
            lane.known = max(lane.known, version)

    async def run(
        self,
        key: _Key,
        expected: int,
        attempt: Callable[[], Awaitable[AppendOutcome]],
        writer: str = "",
        patience: float | None = None,
        next_turn: bool = False,
    ) -> AppendOutcome:
        """Runs `attempt` (an append at `expected`) when it is this writer's turn.

        `writer` (the append's idempotency key, which a retry repeats) tells the writer whose
        turn is held apart from one that merely knows the same version, such as the writer
        that just made it; without a key, the version alone identifies the turn. `patience`
        (what is left of the caller's deadline) shortens the wait in line, so the caller gets
        ABORTED with a retry hint rather than DEADLINE_EXCEEDED. With `next_turn`, an applied
        append is answered when its writer's next turn comes (outcome.next_turn), see
        `_await_next_turn`.
        """
        if self._policy.max_queue <= 0:
            return await self._race(key, expected, attempt)
        deadline = None if patience is None else self._clock() + patience
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(key)
        if lane.held_for is not None and lane.held_for == expected and lane.held_writer in ("", writer):
            self._unhold(lane)  # the writer whose turn it is came back
        elif not lane.free:
            wait = self._policy.max_wait if patience is None else min(self._policy.max_wait, patience)
            verdict = await self._wait(lane, expected, writer, wait)
            if verdict is not None:
                raise self._your_turn(lane, expected, verdict, writer)
        lane.lapsed.discard(writer)
        lane.busy = True
        started = self._clock()
        try:
            outcome = await attempt()
        except Aborted as exc:
            current = exc.current_version if exc.current_version is not None else lane.known
            lane.known = max(lane.known, current)
            lane.busy = False
            # Overtaken by a writer outside this queue: it keeps its place at the front.
            raise self._your_turn(lane, expected, lane.known, writer) from None
        except BaseException:
            lane.busy = False
            self._next(lane)
            raise
        self._attempt_seconds += 0.2 * (self._clock() - started - self._attempt_seconds)
        lane.known = max(lane.known, outcome.session.version)
        lane.busy = False
        if next_turn and not outcome.replayed and len(lane.queue) < self._policy.max_queue:
            left = None if deadline is None else deadline - self._clock()
            wait = self._policy.max_wait if left is None else min(self._policy.max_wait, left)
            outcome.next_turn = await self._await_next_turn(lane, wait)
            return outcome
        if self._next(lane):
            # The next writer's answer goes out before this one's: the session waits on it.
            await asyncio.sleep(0)
        return outcome

    async def _await_next_turn(self, lane: _Lane, wait: float) -> int | None:
        """Queues the answer of an applied append behind the writers already waiting; when
        its turn comes, returns the version its writer's next append should carry, with the
        session held for that append (for `turn_timeout`). None when the wait ran out (the
        caller is answered without a turn and follows the ABORTED loop)."""
        loop = asyncio.get_running_loop()
        waiter = _Waiter(lane.known, "", loop.create_future(), next_turn=True)
        lane.queue.append(waiter)
        self._next(lane)  # the writer first in line goes now (perhaps this one: nobody waits)
        # A caller that goes away keeps its append (it stands); the turn it was given goes on.
        verdict = await self._decision(lane, waiter, wait)
        if verdict is None or verdict == _TIMED_OUT:
            return None
        # The session is kept for this writer's next append, as for a retry after ABORTED (any
        # key: the next append has a new one), even if nobody waits yet: writers that arrive
        # meanwhile queue behind it instead of taking the version it was told.
        self._hold(lane, verdict, "")
        return verdict

    async def _race(
        self, key: _Key, expected: int, attempt: Callable[[], Awaitable[AppendOutcome]]
    ) -> AppendOutcome:
        """No queue: the store decides at once; a loser is told to wait about as long as the
        writers racing with it take to append, with full jitter so they do not return together."""
        self._racing[key] = self._racing.get(key, 0) + 1
        started = self._clock()
        try:
            outcome = await attempt()
        except Aborted as exc:
            delay = _jitter(self._attempt_seconds * self._racing[key])
            raise VersionConflict(expected, exc.current_version, delay) from None
        finally:
            left = self._racing[key] - 1
            if left:
                self._racing[key] = left
            else:
                del self._racing[key]
        self._attempt_seconds += 0.2 * (self._clock() - started - self._attempt_seconds)
        return outcome

    def _conflict(self, lane: _Lane, expected: int) -> VersionConflict:
        """ABORTED without a turn (queue full or waited too long): retry after about the
        backlog, with full jitter so the writers turned away do not all return at once."""
        backlog = self._attempt_seconds * (len(lane.queue) + 1)
        return VersionConflict(expected, lane.known if lane.known >= 0 else None, _jitter(backlog))

    async def _wait(self, lane: _Lane, expected: int, writer: str, wait: float) -> int | None:
        if len(lane.queue) >= self._policy.max_queue:
            raise self._conflict(lane, expected)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(expected, writer, loop.create_future())
        if writer and writer in lane.lapsed:
            lane.lapsed.discard(writer)
            lane.queue.appendleft(waiter)  # it was its turn already: a slow client keeps its place
        else:
            lane.queue.append(waiter)
        verdict = await self._decision(lane, waiter, wait)
        if verdict == _TIMED_OUT:
            raise self._conflict(lane, expected)
        return verdict

    async def _decision(self, lane: _Lane, waiter: _Waiter, wait: float) -> int | None:
        """The waiter's decision (_TIMED_OUT after `wait` seconds). It is awaited directly (not
        through wait_for and shield): the writer whose turn it is wakes one loop step after the
        session is handed to it. If the caller goes away, whatever it was granted goes to the
        next writer."""
        timer = asyncio.get_running_loop().call_later(max(wait, 0.0), _time_out, waiter.decision)
        try:
            return await waiter.decision
        except asyncio.CancelledError:
            decision = waiter.decision
            if decision.done() and not decision.cancelled() and decision.result() != _TIMED_OUT:
                self._pass_on(lane, decision.result())
            raise
        finally:
            timer.cancel()
            if waiter in lane.queue:
                lane.queue.remove(waiter)
            self._forget_if_idle(lane)

    def _pass_on(self, lane: _Lane, granted: int | None) -> None:
        if granted is None:
            lane.busy = False
        else:
            self._unhold(lane)
        self._next(lane)

    def _your_turn(self, lane: _Lane, expected: int, current: int, writer: str) -> VersionConflict:
        """ABORTED at `current`, retry now: the session is held for this writer's retry."""
        self._hold(lane, current, writer)
        return VersionConflict(expected, current, 0.0)

    def _hold(self, lane: _Lane, version: int, writer: str) -> None:
        """Keeps the session for `writer`'s append at `version` (any writer's when "") until
        it comes or `turn_timeout` lapses."""
        self._unhold(lane)
        lane.held_for = version
        lane.held_writer = writer
        lane.held_timer = self._schedule(self._policy.turn_timeout, lambda: self._expire(lane, version))

    def _unhold(self, lane: _Lane) -> None:
        if lane.held_timer is not None:
            lane.held_timer.cancel()
        lane.held_for = None
        lane.held_writer = ""
        lane.held_timer = None

    def _expire(self, lane: _Lane, version: int) -> None:
        if lane.held_for == version:
            writer = lane.held_writer
            if writer and len(lane.lapsed) < self._policy.max_queue:
                lane.lapsed.add(writer)
                self._schedule(self._policy.max_wait, lambda: self._forget_lapsed(lane, writer))
            self._unhold(lane)  # the writer did not come back in time: the next one goes
            self._next(lane)

    def _next(self, lane: _Lane) -> bool:
        """Hands the session to the oldest writer still waiting; whether one was."""
        if lane.busy or lane.held_for is not None:
            return False
        while lane.queue:
            waiter = lane.queue.popleft()
            if waiter.decision.done():
                continue
            if not waiter.next_turn and (waiter.expected == lane.known or lane.known < 0):
                lane.busy = True  # its version is current (or unknown: the store decides)
                waiter.decision.set_result(None)
            else:
                lane.held_for = lane.known  # _your_turn re-arms the timer when the waiter raises
                lane.held_writer = waiter.writer
                waiter.decision.set_result(lane.known)
            return True
        self._forget_if_idle(lane)
        return False

    def _forget_lapsed(self, lane: _Lane, writer: str) -> None:
        lane.lapsed.discard(writer)
        self._forget_if_idle(lane)

    def _forget_if_idle(self, lane: _Lane) -> None:
        # A quiet session keeps no state here (it costs nothing).
        if lane.free and not lane.lapsed and self._lanes.get(lane.key) is lane:
            del self._lanes[lane.key]
