"""Compaction: fold older turns into the running summary, in the background.

The summary row records the seq it covers (`summarized_seq`) and is saved with a
compare-and-set on it, so turns appended while the summariser runs are never lost (they
are after the cut) and two replicas compacting at once cannot go backwards. Appends do
not wait for compaction; ListTurns keeps returning the full history.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ballast.common.v1 import common_pb2
from ballast.sessions.v1 import sessions_pb2
from opentelemetry import metrics

from services.kit.errors import FailedPrecondition, NotFound
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
    retry_after: float


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


class Compactor:
    def __init__(
        self,
        store: SessionStore,
        summariser: Summariser | None,
        tokenizer: Tokenizer,
        policy: CompactionPolicy,
        clock: Callable[[], float],
        meter: metrics.Meter | None = None,
    ) -> None:
        self._passes = (meter or metrics.NoOpMeter("ballast")).create_counter(
            "ballast.sessions.compactions", description="Compaction passes by outcome (folded, raced, failed)"
        )
        self._store = store
        self._summariser = summariser
        self._tokenizer = tokenizer
        self._policy = policy
        self._clock = clock
        self._running: dict[tuple[str, str, str], asyncio.Task[None]] = {}
        self._not_before: dict[tuple[str, str, str], float] = {}

    @property
    def enabled(self) -> bool:
        return self._summariser is not None

    def after_append(self, record: SessionRecord) -> None:
        """Starts a background compaction when the unsummarised tail is past the threshold."""
        if self._summariser is None or record.unsummarized_tokens <= self._policy.threshold_tokens:
            return
        key = (record.tenant_id, record.user_id, record.session_id)
        now = self._clock()
        if key in self._running or self._not_before.get(key, 0.0) > now:
            return
        if len(self._not_before) > 10_000:  # forget pauses that are over
            self._not_before = {k: t for k, t in self._not_before.items() if t > now}
        task = asyncio.create_task(self._background(key))
        self._running[key] = task

    async def _background(self, key: tuple[str, str, str]) -> None:
        try:
            await self.compact(Scope(key[0], key[1]), key[2], force=False)
            self._not_before.pop(key, None)
        except Exception as exc:
            self._passes.add(1, {"outcome": "failed"})
            # Retried after a pause by a later append; the history is intact meanwhile.
            self._not_before[key] = self._clock() + self._policy.retry_after
            log.warning("compaction failed", extra={"error": type(exc).__name__, "detail": str(exc)[:200]})
        finally:
            self._running.pop(key, None)

    async def wait_idle(self) -> None:
        """Waits for background compactions (shutdown and tests)."""
        while self._running:
            await asyncio.gather(*list(self._running.values()), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._running.values()):
            task.cancel()
        await asyncio.gather(*list(self._running.values()), return_exceptions=True)

    async def compact(self, scope: Scope, session_id: str, *, force: bool) -> SessionRecord:
        """One pass: folds what is past the keep size (force: even below the threshold)."""
        record = await self._store.get(scope, session_id, self._clock())
        if record is None:
            raise NotFound(f"session {session_id!r} not found")
        if self._summariser is None:
            raise FailedPrecondition("compaction is disabled (BALLAST_SESSIONS_COMPACTION=false)")
        if not force and record.unsummarized_tokens <= self._policy.threshold_tokens:
            return record
        if record.unsummarized_tokens <= self._policy.keep_tokens:
            return record
        limit = self._policy.max_turns
        turns = await self._store.list_turns(
            scope, session_id, self._clock(), record.summarized_seq, limit + 1, consistent=True
        )
        if not turns:
            return record
        more = len(turns) > limit
        turns = turns[:limit]
        cut = choose_cut(record, turns, self._policy.keep_tokens, more)
        if cut == 0:
            return record
        folded = turns[:cut]
        messages = [sessions_pb2.Turn.FromString(t.payload).message for t in folded]
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
        return fresh
