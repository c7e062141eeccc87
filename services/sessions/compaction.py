"""Compaction: fold older turns into the running summary, in the background.

The summary row records the seq it covers (`summarized_seq`) and is saved with a
compare-and-set on it, so turns appended while the summariser runs are never lost (they
are after the cut) and two replicas compacting at once cannot go backwards. Appends do
not wait for compaction; ListTurns keeps returning the full history.

Each session has at most one driver task per process. It runs passes until the session is
back under its threshold (a pass re-checks when it finishes, so appends that stopped
mid-pass do not leave the session over it), serves every request that arrived meanwhile
with a pass that starts after the request (CompactSession and GetContext join rather than
return early), and after a failure pauses with exponential backoff and tries again by
itself: when the summariser comes back, sessions converge with no append needed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ballast.common.v1 import common_pb2
from ballast.sessions.v1 import sessions_pb2
from opentelemetry import metrics

from services.kit.errors import FailedPrecondition, NotFound, Unavailable
from services.sessions.model import ROLE_TOOL, Scope, SessionRecord, StoredTurn
from services.sessions.store import SessionStore
from services.sessions.tokens import MessageParts, Tokenizer

log = logging.getLogger("ballast.sessions.compaction")


class Summariser(Protocol):
    """Writes a new running summary from the previous one and the turns to fold in."""

    async def summarise(
        self, scope: Scope, previous: str, messages: Sequence[common_pb2.ChatMessage], max_tokens: int
    ) -> str: ...


@dataclass(frozen=True)
class CompactionPolicy:
    threshold_tokens: int
    keep_tokens: int
    max_turns: int
    summary_max_tokens: int
    # Pause after the first failed pass, doubled after each further failure up to retry_max.
    retry_initial: float
    retry_max: float
    # Sessions with a driver at once (running or backing off), and summaries asked of the
    # router at once: an outage over many sessions costs bounded memory and, once the router
    # is back, does not flood it.
    max_sessions: int = 10_000
    concurrency: int = 16

    def retry_delay(self, failures: int) -> float:
        return float(min(self.retry_max, self.retry_initial * 2 ** min(failures - 1, 62)))


def choose_cut(record: SessionRecord, turns: Sequence[StoredTurn], keep_tokens: int, more: bool) -> int:
    """How many of `turns` (oldest first, the unsummarised tail) to fold.

    Folds while more than keep_tokens would stay unsummarised, and only up to a point where
    the next turn is not a tool result (a call and its results stay on one side). `more`
    says whether turns exist after the last one given.
    """
    remaining = record.unsummarized_tokens
    cut = 0
    if remaining <= keep_tokens:
        return 0
    for index, turn in enumerate(turns):
        remaining -= turn.token_count
        following = turns[index + 1] if index + 1 < len(turns) else None
        boundary = (following.role != ROLE_TOOL) if following is not None else not more
        if boundary:
            cut = index + 1
            if remaining <= keep_tokens:
                break
    return cut


Sleep = Callable[[float], Awaitable[object]]
_Key = tuple[str, str, str]


class CompactionFailed(Unavailable):
    """The summariser could not be reached; the driver retries by itself after `retry_in`."""

    def __init__(self, cause: str, retry_in: float) -> None:
        super().__init__(f"compaction failed ({cause}); the service retries in {retry_in:g}s")
        self.retry_in = retry_in


@dataclass(frozen=True)
class Compacted:
    record: SessionRecord
    # Turns newly covered by the summary since the request arrived.
    folded: int


@dataclass
class _Drive:
    scope: Scope
    session_id: str
    keep: int
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    waiters: list[asyncio.Future[SessionRecord]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    failures: int = 0
    retry_at: float | None = None


class Compactor:
    def __init__(
        self,
        store: SessionStore,
        summariser: Summariser | None,
        tokenizer: Tokenizer,
        policy: CompactionPolicy,
        clock: Callable[[], float],
        meter: metrics.Meter | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._passes = (meter or metrics.NoOpMeter("ballast")).create_counter(
            "ballast.sessions.compactions",
            description="Compaction passes by outcome (folded, raced, failed, deferred)",
        )
        self._store = store
        self._summariser = summariser
        self._tokenizer = tokenizer
        self._policy = policy
        self._clock = clock
        self._sleep = sleep
        self._drives: dict[_Key, _Drive] = {}
        self._slots = asyncio.Semaphore(policy.concurrency)

    @property
    def enabled(self) -> bool:
        return self._summariser is not None

    @property
    def policy(self) -> CompactionPolicy:
        return self._policy

    def failing(self, scope: Scope, session_id: str) -> bool:
        """Whether the last pass of this session failed and the driver is backing off."""
        drive = self._drives.get((scope.tenant_id, scope.user_id, session_id))
        return drive is not None and drive.retry_at is not None

    def waiting(self, scope: Scope, session_id: str) -> int:
        """Requests waiting for the next pass of this session (observability and tests)."""
        drive = self._drives.get((scope.tenant_id, scope.user_id, session_id))
        return 0 if drive is None else len(drive.waiters)

    def after_append(self, record: SessionRecord) -> None:
        """Starts the session's driver when the unsummarised tail is past the threshold."""
        if self._summariser is None or record.unsummarized_tokens <= self._policy.threshold_tokens:
            return
        if self._drive(Scope(record.tenant_id, record.user_id), record.session_id) is None:
            # A later append tries again; meanwhile GetContext flags what it leaves out.
            self._passes.add(1, {"outcome": "deferred"})

    def _drive(self, scope: Scope, session_id: str) -> _Drive | None:
        key = (scope.tenant_id, scope.user_id, session_id)
        drive = self._drives.get(key)
        if drive is None:
            if len(self._drives) >= self._policy.max_sessions:
                return None
            drive = _Drive(scope, session_id, self._policy.keep_tokens)
            self._drives[key] = drive
            drive.task = asyncio.create_task(self._run(key, drive))
        return drive

    def request(
        self, scope: Scope, session_id: str, keep: int | None = None
    ) -> asyncio.Future[SessionRecord]:
        """A pass that starts after this call, folding down to `keep` tokens (default: the policy's).

        Cuts a failure backoff short. The future holds the session after that pass, or
        CompactionFailed / NotFound.
        """
        drive = self._drive(scope, session_id)
        if drive is None:
            raise Unavailable(
                f"{len(self._drives)} sessions are being compacted, the most at once"
                " (BALLAST_SESSIONS_COMPACT_MAX_SESSIONS): retry later"
            )
        if keep is not None:
            drive.keep = min(drive.keep, keep)
        future: asyncio.Future[SessionRecord] = asyncio.get_running_loop().create_future()
        drive.waiters.append(future)
        drive.wake.set()
        return future

    async def compact(self, scope: Scope, session_id: str) -> Compacted:
        """CompactSession: waits for a pass of its own (after any running one) and reports it."""
        record = await self._store.get(scope, session_id, self._clock())
        if record is None:
            raise NotFound(f"session {session_id!r} not found")
        if self._summariser is None:
            raise FailedPrecondition("compaction is disabled (BALLAST_SESSIONS_COMPACTION=false)")
        after = await self.request(scope, session_id)
        return Compacted(after, after.summarized_seq - record.summarized_seq)

    async def _run(self, key: _Key, drive: _Drive) -> None:
        policy = self._policy
        serving: list[asyncio.Future[SessionRecord]] = []
        try:
            while True:
                serving, drive.waiters = drive.waiters, []
                keep = drive.keep
                drive.wake.clear()
                try:
                    record, progressed = await self._pass(drive.scope, drive.session_id, keep, bool(serving))
                except NotFound as exc:
                    _settle(serving + drive.waiters, exc)
                    drive.waiters = []
                    return
                except Exception as exc:  # router or store down, or a bug: retried with backoff
                    drive.failures += 1
                    delay = policy.retry_delay(drive.failures)
                    drive.retry_at = self._clock() + delay
                    self._passes.add(1, {"outcome": "failed"})
                    cause = type(exc).__name__ + (f": {exc}"[:200] if str(exc) else "")
                    log.warning(
                        "compaction failed; retrying after a pause",
                        extra={"error": type(exc).__name__, "detail": str(exc)[:200], "retry_in": delay},
                    )
                    _settle(serving, CompactionFailed(cause, delay))
                    await self._pause(drive, delay)
                    continue
                drive.failures = 0
                drive.retry_at = None
                _settle(serving, record)
                tail = record.unsummarized_tokens
                if drive.keep == keep and (tail <= keep or not progressed):
                    drive.keep = policy.keep_tokens  # what GetContext asked for is done
                if drive.waiters:
                    continue
                asked = drive.keep < policy.keep_tokens and tail > drive.keep
                if progressed and (tail > policy.threshold_tokens or asked):
                    continue  # appends during the pass, or a pass capped at max_turns
                return
        except asyncio.CancelledError:
            _settle(serving + drive.waiters, Unavailable("the sessions service is shutting down"))
            raise
        finally:
            if self._drives.get(key) is drive:
                del self._drives[key]

    async def _pause(self, drive: _Drive, delay: float) -> None:
        """Sleeps for the backoff, or less when a request wakes the driver."""
        if drive.waiters:
            return
        sleeper = asyncio.ensure_future(self._sleep(delay))
        waker = asyncio.ensure_future(drive.wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()
            await asyncio.gather(sleeper, waker, return_exceptions=True)

    async def wait_idle(self) -> None:
        """Waits until no driver runs (tests; a driver backing off counts as running)."""
        while self._drives:
            tasks = [d.task for d in self._drives.values() if d.task is not None]
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        tasks = [d.task for d in self._drives.values() if d.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _pass(
        self, scope: Scope, session_id: str, keep: int, force: bool
    ) -> tuple[SessionRecord, bool]:
        """One pass: folds what is past `keep` (force: even below the threshold).

        Returns the session afterwards and whether the summary moved (by this pass or by
        another replica that won the compare-and-set).
        """
        record = await self._store.get(scope, session_id, self._clock())
        if record is None:
            raise NotFound(f"session {session_id!r} not found")
        assert self._summariser is not None
        tail = record.unsummarized_tokens
        wanted = force or tail > self._policy.threshold_tokens or keep < self._policy.keep_tokens
        if not wanted or tail <= keep:
            return record, False
        limit = self._policy.max_turns
        turns = await self._store.list_turns(
            scope, session_id, self._clock(), record.summarized_seq, limit + 1, consistent=True
        )
        if not turns:
            return record, False
        more = len(turns) > limit
        turns = turns[:limit]
        cut = choose_cut(record, turns, keep, more)
        if cut == 0:
            return record, False
        folded = turns[:cut]
        messages = [sessions_pb2.Turn.FromString(t.payload).message for t in folded]
        async with self._slots:
            summary = await self._summariser.summarise(
                scope, record.summary, messages, self._policy.summary_max_tokens
            )
        summary_tokens = self._tokenizer.count_message(MessageParts(summary))
        saved = await self._store.save_summary(
            record,
            record.summarized_seq,
            folded[-1].seq,
            summary,
            summary_tokens,
            record.summarized_tokens + sum(t.token_count for t in folded),
        )
        self._passes.add(1, {"outcome": "folded" if saved else "raced"})
        if not saved:
            log.info("compaction lost a race; another pass moved the summary first")
        fresh = await self._store.get(scope, session_id, self._clock())
        if fresh is None:
            raise NotFound(f"session {session_id!r} not found")
        return fresh, fresh.summarized_seq != record.summarized_seq


def _settle(futures: Sequence[asyncio.Future[SessionRecord]], outcome: SessionRecord | BaseException) -> None:
    for future in futures:
        if future.done():
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
            future.exception()  # a waiter that gave up must not make asyncio log it again
        else:
            future.set_result(outcome)
