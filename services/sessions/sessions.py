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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ballast.sessions.v1 import sessions_pb2
from opentelemetry import metrics

from services.kit.errors import Aborted, InvalidArgument, NotFound
from services.sessions.compaction import Compactor
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


@dataclass
class ContextWindow:
    record: SessionRecord
    summary: str
    summary_tokens: int
    turns: list[tuple[StoredTurn, int]]
    total_tokens: int
    omitted_turns: int
    tokenizer: str


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
        self.store = store
        self.tokenizers = tokenizers
        self.compactor = compactor
        self.limits = limits
        self.clock = clock
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
        return await self.store.create(record)

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
        turns: Sequence[NewTurn],
        fingerprint: str = "",
    ) -> AppendOutcome:
        bound_to = b""
        if idempotency_key:
            bound_to = (
                hashlib.sha256(fingerprint.encode()).digest()[:16] if fingerprint else request_hash(turns)
            )
        try:
            outcome = await self.store.append(
                scope,
                session_id,
                expected_version,
                idempotency_key,
                turns,
                self.now(),
                request_hash=bound_to,
            )
        except Aborted:
            self._appends.add(1, {"outcome": "conflict"})
            raise
        self._appends.add(1, {"outcome": "replayed" if outcome.replayed else "applied"})
        if not outcome.replayed:
            self._turns.add(len(turns))
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

    async def context(self, scope: Scope, session_id: str, budget: int, model: str) -> ContextWindow:
        """Summary plus the newest unsummarised turns within budget, read from the primary."""
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
        if summary_tokens > budget:
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
        self._context_tokens.record(summary_tokens + window.used)
        unsummarised = record.head_seq - record.summarized_seq
        return ContextWindow(
            record=record,
            summary=summary,
            summary_tokens=summary_tokens,
            turns=chosen,
            total_tokens=summary_tokens + window.used,
            omitted_turns=unsummarised - len(chosen),
            tokenizer=tokenizer.name,
        )

    async def compact(self, scope: Scope, session_id: str) -> SessionRecord:
        return await self.compactor.compact(scope, session_id, force=True)

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
                except Exception as exc:
                    log.warning("sweep failed", extra={"error": type(exc).__name__})

        self._sweeper = asyncio.create_task(loop())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        await self.compactor.close()
