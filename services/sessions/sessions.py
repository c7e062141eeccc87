"""The sessions domain: scoping, TTL, paging, appends and the context window.

Takes validated input from the servicer and talks to a SessionStore; no gRPC here.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from ballast.sessions.v1 import sessions_pb2
from opentelemetry import metrics

from services.kit.errors import Aborted, BallastError, InvalidArgument, NotFound
from services.sessions.compaction import Compacted, Compactor
from services.sessions.contention import ContentionPolicy, ContentionQueue
from services.sessions.context import Window
from services.sessions.model import AppendOutcome, NewTurn, Scope, SessionRecord, StoredTurn
from services.sessions.store import SessionStore
from services.sessions.tokens import MessageParts, Tokenizer, Tokenizers
from services.sessions.turns import message_parts

log = logging.getLogger("ballast.sessions")


@dataclass(frozen=True)
class Limits:
    default_ttl: float
    max_ttl: float
    default_page_size: int
    max_page_size: int
    context_batch: int
    # Live sessions one (tenant, user) may hold; 0: no cap.
    max_sessions_per_user: int = 0


@dataclass
class ContextWindow:
    record: SessionRecord
    summary: str
    summary_tokens: int
    turns: list[tuple[StoredTurn, int]]
    total_tokens: int
    # Unsummarised turns left out of the window: no summary covers them.
    omitted_turns: int
    tokenizer: str
    summary_omitted: bool = False


def request_hash(turns: Sequence[NewTurn]) -> bytes:
    """What an idempotency key is bound to: the turns as sent (not the expected version)."""
    digest = hashlib.sha256()
    for turn in turns:
        digest.update(len(turn.payload).to_bytes(8, "big"))
        digest.update(turn.payload)
    return digest.digest()[:16]


def _encode_token(payload: dict[str, object]) -> str:
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str, kind: str, field: str) -> dict[str, object]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = json.loads(raw)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(field, "not a page token returned by this service") from exc
    if not isinstance(payload, dict) or payload.get("k") != kind:
        raise InvalidArgument(field, "not a page token returned by this service")
    return payload


class Sessions:
    def __init__(
        self,
        store: SessionStore,
        tokenizers: Tokenizers,
        compactor: Compactor,
        limits: Limits,
        clock: Callable[[], float],
        meter: metrics.Meter | None = None,
        contention: ContentionQueue | None = None,
    ) -> None:
        meter = meter or metrics.NoOpMeter("ballast")
        self._appends = meter.create_counter(
            "ballast.sessions.appends",
            description="AppendTurns calls by outcome (applied, replayed, conflict)",
        )
        self._turns = meter.create_counter("ballast.sessions.turns", description="Turns appended")
        self._context_tokens = meter.create_histogram(
            "ballast.sessions.context.tokens", unit="{token}", description="Tokens returned by GetContext"
        )
        self._omitted = meter.create_counter(
            "ballast.sessions.context.omitted_unsummarized",
            description="GetContext answers that left out older turns no summary covers",
        )
        self.store = store
        self.tokenizers = tokenizers
        self.compactor = compactor
        self.limits = limits
        self.clock = clock
        # Without a policy, conflicts are answered at once (still with a retry hint).
        self.contention = contention or ContentionQueue(ContentionPolicy(0, 0.0, 0.0))
        self._sweeper: asyncio.Task[None] | None = None

    def now(self) -> float:
        """The clock at microsecond precision, as PostgreSQL keeps it (page tokens rely on it)."""
        return round(self.clock() * 1e6) / 1e6

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer of the counts stored with each turn."""
        return self.tokenizers.default

    async def create(
        self, scope: Scope, session_id: str, title: str, metadata: Mapping[str, str], ttl: float | None
    ) -> SessionRecord:
        now = self.now()
        ttl = self.limits.default_ttl if ttl is None else ttl
        record = SessionRecord(
            session_id=session_id or uuid.uuid4().hex,
            tenant_id=scope.tenant_id,
            user_id=scope.user_id,
            title=title,
            metadata=dict(metadata),
            created_at=now,
            updated_at=now,
            expires_at=now + ttl,
            ttl=ttl,
        )
        return await self.store.create(record, self.limits.max_sessions_per_user)

    async def get(self, scope: Scope, session_id: str) -> SessionRecord:
        record = await self.store.get(scope, session_id, self.now())
        if record is None:
            raise NotFound(f"session {session_id!r} not found")
        return record

    def page_size(self, requested: int) -> int:
        wanted = self.limits.default_page_size if requested <= 0 else requested
        return min(wanted, self.limits.max_page_size)

    async def list_sessions(
        self, scope: Scope, page_size: int, page_token: str
    ) -> tuple[list[SessionRecord], str]:
        after: tuple[float, str] | None = None
        if page_token:
            payload = _decode_token(page_token, "s", "page_token")
            updated, sid = payload.get("u"), payload.get("i")
            if not isinstance(updated, int) or not isinstance(sid, str):
                raise InvalidArgument("page_token", "not a page token returned by this service")
            after = (updated / 1e6, sid)
        size = self.page_size(page_size)
        records = await self.store.list_sessions(scope, self.now(), size + 1, after)
        token = ""
        if len(records) > size:
            records = records[:size]
            last = records[-1]
            token = _encode_token({"k": "s", "u": round(last.updated_at * 1e6), "i": last.session_id})
        return records, token

    async def delete(self, scope: Scope, session_id: str) -> None:
        if not await self.store.delete(scope, session_id, self.now()):
            raise NotFound(f"session {session_id!r} not found")

    async def delete_user(self, scope: Scope) -> int:
        return await self.store.delete_user(scope)

    async def append(
        self,
        scope: Scope,
        session_id: str,
        expected_version: int,
        idempotency_key: str,
        turns: Sequence[NewTurn] | Callable[[], Awaitable[Sequence[NewTurn]]],
        fingerprint: str = "",
        patience: float | None = None,
        next_turn: bool = False,
    ) -> AppendOutcome:
        """Appends; a versioned append waits its turn on a contended session (see contention.py),
        for at most `patience` seconds (what is left of the caller's deadline). With
        `next_turn`, an applied versioned append is answered when its writer's next turn comes
        (outcome.next_turn: the version to send next).

        `turns` may be given as a function that prepares them (tokenizes, serializes): it runs
        only when the append goes to the store, so a versioned append that waits in line and is
        then answered ABORTED (most of them on a contended session) never pays for it, and
        neither does the event loop every other writer shares.
        """

        async def attempt() -> AppendOutcome:
            ready = turns if isinstance(turns, Sequence) else await turns()
            bound_to = b""
            if idempotency_key:
                bound_to = (
                    hashlib.sha256(fingerprint.encode()).digest()[:16] if fingerprint else request_hash(ready)
                )
            outcome = await self.store.append(
                scope,
                session_id,
                expected_version,
                idempotency_key,
                ready,
                self.now(),
                request_hash=bound_to,
            )
            if not outcome.replayed:
                self._turns.add(len(ready))
            return outcome

        key = (scope.tenant_id, scope.user_id, session_id)
        try:
            if expected_version < 0:
                outcome = await attempt()
                self.contention.saw(key, outcome.session.version)
            else:
                outcome = await self.contention.run(
                    key, expected_version, attempt, idempotency_key, patience, next_turn
                )
        except Aborted:
            self._appends.add(1, {"outcome": "conflict"})
            raise
        self._appends.add(1, {"outcome": "replayed" if outcome.replayed else "applied"})
        if not outcome.replayed:
            self.compactor.after_append(outcome.session)
        return outcome

    async def list_turns(
        self, scope: Scope, session_id: str, page_size: int, page_token: str
    ) -> tuple[list[StoredTurn], str]:
        after = 0
        if page_token:
            payload = _decode_token(page_token, "t", "page_token")
            seq = payload.get("a")
            if payload.get("i") != session_id or not isinstance(seq, int) or seq < 0:
                raise InvalidArgument("page_token", "not a page token of this session")
            after = seq
        size = self.page_size(page_size)
        turns = await self.store.list_turns(scope, session_id, self.now(), after, size + 1)
        if turns is None:
            raise NotFound(f"session {session_id!r} not found")
        token = ""
        if len(turns) > size:
            turns = turns[:size]
            token = _encode_token({"k": "t", "i": session_id, "a": turns[-1].seq})
        return turns, token

    async def context(
        self, scope: Scope, session_id: str, budget: int, model: str, wait: float = 0.0
    ) -> ContextWindow:
        """Summary plus the newest unsummarised turns within budget, read from the primary.

        When the unsummarised tail does not fit, older turns would fall out of the context
        with nothing covering them: a pass that folds the tail down to what fits is asked
        for and awaited up to `wait` seconds (not while the summariser is failing, whose
        driver retries by itself). What is still left out is flagged, never silent.
        """
        window = await self._window(scope, session_id, budget, model)
        if window.omitted_turns == 0 or not self.compactor.enabled:
            return self._flagged(window)
        keep = min(self.compactor.policy.keep_tokens, budget - self.compactor.policy.summary_max_tokens)
        if keep <= 0:
            return self._flagged(window)  # the budget cannot hold a summary: folding cannot help
        if self.compactor.failing(scope, session_id):
            return self._flagged(window)  # its driver retries on its own schedule: do not wake it
        try:
            pending = self.compactor.request(scope, session_id, keep)
        except BallastError:
            return self._flagged(window)  # compaction is at capacity
        if wait <= 0:
            return self._flagged(window)  # the pass runs in the background for the next call
        try:
            await asyncio.wait_for(asyncio.shield(pending), wait)
        except (TimeoutError, BallastError) as exc:
            log.info("context served before compaction caught up", extra={"reason": type(exc).__name__})
            return self._flagged(window)
        return self._flagged(await self._window(scope, session_id, budget, model))

    def _flagged(self, window: ContextWindow) -> ContextWindow:
        if window.omitted_turns:
            self._omitted.add(1)
        self._context_tokens.record(window.total_tokens)
        return window

    async def _window(self, scope: Scope, session_id: str, budget: int, model: str) -> ContextWindow:
        batch = self.limits.context_batch
        found = await self.store.context_tail(scope, session_id, self.now(), batch)
        if found is None:
            raise NotFound(f"session {session_id!r} not found")
        record, newest = found
        tokenizer = self.tokenizers.for_model(model)
        recount = tokenizer.name != self.tokenizer.name

        def count(turn: StoredTurn) -> int:
            if not recount:
                return turn.token_count
            message = sessions_pb2.Turn.FromString(turn.payload).message
            return tokenizer.count_message(message_parts(message))

        summary, summary_tokens = record.summary, record.summary_tokens
        if recount and summary:
            summary_tokens = tokenizer.count_message(MessageParts(summary))
        summary_omitted = summary_tokens > budget
        if summary_omitted:
            # A summary larger than the whole budget is left out rather than truncated.
            summary, summary_tokens = "", 0
        window = Window(budget - summary_tokens, count)
        lowest = record.head_seq + 1
        turns = newest
        while True:
            for turn in turns:
                lowest = turn.seq
                if not window.offer(turn):
                    break
            if window.full or lowest <= record.summarized_seq + 1 or len(turns) < batch:
                break
            turns = await self.store.turns_before(record, record.summarized_seq, lowest, batch)
            if not turns:
                break
        chosen = window.oldest_first()
        unsummarised = record.head_seq - record.summarized_seq
        return ContextWindow(
            record=record,
            summary=summary,
            summary_tokens=summary_tokens,
            turns=chosen,
            total_tokens=summary_tokens + window.used,
            omitted_turns=unsummarised - len(chosen),
            tokenizer=tokenizer.name,
            summary_omitted=summary_omitted,
        )

    async def compact(self, scope: Scope, session_id: str) -> Compacted:
        return await self.compactor.compact(scope, session_id)

    # Background sweep of expired sessions and old idempotency keys.

    async def sweep_once(self, batch: int, idempotency_ttl: float) -> int:
        now = self.now()
        return await self.store.sweep(now, batch, now - idempotency_ttl)

    def start_sweeper(self, interval: float, batch: int, idempotency_ttl: float) -> None:
        async def loop() -> None:
            while True:
                await asyncio.sleep(interval)
                try:
                    purged = await self.sweep_once(batch, idempotency_ttl)
                    if purged:
                        log.info("expired sessions purged", extra={"count": purged})
                except Exception as exc:  # a failed sweep (database down) must not end the sweeper
                    log.warning("sweep failed", extra={"error": type(exc).__name__})

        self._sweeper = asyncio.create_task(loop())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        await self.compactor.close()
