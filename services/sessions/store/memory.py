"""In-process store: the embedded default (one process, nothing survives a restart).

Every method runs without awaiting in between its reads and writes, so on one event
loop each call is atomic, which gives the same guarantees as the PostgreSQL store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from services.kit.errors import Aborted, AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from services.sessions.model import (
    KEY_REUSED,
    AppendOutcome,
    NewTurn,
    Scope,
    SessionRecord,
    StoredTurn,
    too_many_sessions,
)


def _copy(record: SessionRecord) -> SessionRecord:
    """A copy callers may change without touching the stored record: its mutable parts are new.

    Seven times cheaper than copy.deepcopy, which ran three times per chat (bench/chat_cpu.py).
    """
    return replace(record, metadata=dict(record.metadata), counters=replace(record.counters))


def _copy_outcome(outcome: AppendOutcome) -> AppendOutcome:
    # Stored turns are frozen and hold only immutable values: they are shared, not copied.
    return AppendOutcome(_copy(outcome.session), list(outcome.turns), outcome.replayed)


@dataclass
class _Entry:
    record: SessionRecord
    turns: list[StoredTurn] = field(default_factory=list)
    # idempotency key → (outcome as first returned, when it was stored, request hash)
    applied: dict[str, tuple[AppendOutcome, float, bytes]] = field(default_factory=dict)


class MemoryStore:
    def __init__(self) -> None:
        # (tenant, user) → session id → entry: a user's calls never scan other users' sessions.
        self._users: dict[tuple[str, str], dict[str, _Entry]] = {}
        self._next_id = 1

    def _entry(self, tenant: str, user: str, session_id: str) -> _Entry | None:
        return self._users.get((tenant, user), {}).get(session_id)

    async def start(self) -> None:
        return None

    async def ping(self) -> None:
        """Always answers: this process is the backend."""

    async def close(self) -> None:
        return None

    def _visible(self, scope: Scope, session_id: str, now: float) -> _Entry | None:
        entry = self._entry(scope.tenant_id, scope.user_id, session_id)
        if entry is None or entry.record.expires_at <= now:
            return None
        return entry

    async def create(self, record: SessionRecord, max_per_user: int = 0) -> SessionRecord:
        existing = self._entry(record.tenant_id, record.user_id, record.session_id)
        if existing is not None and existing.record.expires_at > record.created_at:
            raise AlreadyExists(f"session {record.session_id!r} already exists")
        if max_per_user > 0:
            mine = self._users.get((record.tenant_id, record.user_id), {}).values()
            live = sum(1 for e in mine if e.record.expires_at > record.created_at)
            if live >= max_per_user:
                raise ResourceExhausted(too_many_sessions(max_per_user), reason="SESSIONS_PER_USER")
        stored = _copy(record)
        stored.internal_id = self._next_id
        self._next_id += 1
        self._users.setdefault((record.tenant_id, record.user_id), {})[record.session_id] = _Entry(stored)
        return _copy(stored)

    async def get(self, scope: Scope, session_id: str, now: float) -> SessionRecord | None:
        entry = self._visible(scope, session_id, now)
        return None if entry is None else _copy(entry.record)

    async def list_sessions(
        self, scope: Scope, now: float, limit: int, after: tuple[float, str] | None
    ) -> list[SessionRecord]:
        entries = self._users.get((scope.tenant_id, scope.user_id), {}).values()
        mine = [e.record for e in entries if e.record.expires_at > now]
        mine.sort(key=lambda r: (r.updated_at, r.session_id), reverse=True)
        if after is not None:
            mine = [r for r in mine if (r.updated_at, r.session_id) < after]
        return [_copy(r) for r in mine[:limit]]

    async def delete(self, scope: Scope, session_id: str, now: float) -> bool:
        if self._visible(scope, session_id, now) is None:
            return False
        del self._users[(scope.tenant_id, scope.user_id)][session_id]
        return True

    async def delete_user(self, scope: Scope) -> int:
        return len(self._users.pop((scope.tenant_id, scope.user_id), {}))

    async def append(
        self,
        scope: Scope,
        session_id: str,
        expected_version: int,
        idempotency_key: str,
        turns: Sequence[NewTurn],
        now: float,
        request_hash: bytes = b"",
    ) -> AppendOutcome:
        entry = self._visible(scope, session_id, now)
        if entry is None:
            raise NotFound(f"session {session_id!r} not found")
        if idempotency_key and idempotency_key in entry.applied:
            applied, _, known_hash = entry.applied[idempotency_key]
            if known_hash and known_hash != request_hash:
                raise InvalidArgument("idempotency_key", KEY_REUSED)
            first = _copy_outcome(applied)
            first.replayed = True
            return first
        record = entry.record
        if expected_version != -1 and expected_version != record.version:
            raise Aborted(
                f"session is at version {record.version}, not {expected_version}",
                current_version=record.version,
            )
        stored: list[StoredTurn] = []
        for turn in turns:
            seq = record.counters.turns + 1
            stored.append(StoredTurn(seq, turn.role, turn.token_count, turn.tool_calls, turn.payload, now))
            record.counters.turns = seq
            record.counters.tool_calls += turn.tool_calls
            record.counters.input_tokens += turn.input_tokens
            record.counters.output_tokens += turn.output_tokens
            record.counters.cost_micros += turn.cost_micros
            record.total_tokens += turn.token_count
        entry.turns.extend(stored)
        record.version += 1
        record.updated_at = now
        record.expires_at = now + record.ttl
        outcome = AppendOutcome(_copy(record), stored)
        if idempotency_key:
            entry.applied[idempotency_key] = (_copy_outcome(outcome), now, request_hash)
        return outcome

    async def list_turns(
        self,
        scope: Scope,
        session_id: str,
        now: float,
        after_seq: int,
        limit: int,
        *,
        consistent: bool = False,
    ) -> list[StoredTurn] | None:
        entry = self._visible(scope, session_id, now)
        if entry is None:
            return None
        # seq n lives at index n-1: turns are never removed from a live session.
        return entry.turns[max(after_seq, 0) : max(after_seq, 0) + limit]

    async def context_tail(
        self, scope: Scope, session_id: str, now: float, limit: int
    ) -> tuple[SessionRecord, list[StoredTurn]] | None:
        entry = self._visible(scope, session_id, now)
        if entry is None:
            return None
        record = _copy(entry.record)
        start = max(record.summarized_seq, len(entry.turns) - limit)
        return record, entry.turns[start:][::-1]

    async def turns_before(
        self, record: SessionRecord, above_seq: int, below_seq: int, limit: int
    ) -> list[StoredTurn]:
        entry = self._entry(record.tenant_id, record.user_id, record.session_id)
        if entry is None or entry.record.internal_id != record.internal_id:
            return []
        end = below_seq - 1
        start = max(above_seq, end - limit)
        return entry.turns[start:end][::-1]

    async def save_summary(
        self,
        record: SessionRecord,
        expected_seq: int,
        new_seq: int,
        summary: str,
        summary_tokens: int,
        summarized_tokens: int,
    ) -> bool:
        entry = self._entry(record.tenant_id, record.user_id, record.session_id)
        if entry is None or entry.record.internal_id != record.internal_id:
            return False
        current = entry.record
        if current.summarized_seq != expected_seq:
            return False
        current.summary = summary
        current.summary_tokens = summary_tokens
        current.summarized_seq = new_seq
        current.summarized_tokens = summarized_tokens
        return True

    async def sweep(self, now: float, batch: int, idempotency_before: float) -> int:
        expired = [
            (owner, sid)
            for owner, sessions in self._users.items()
            for sid, e in sessions.items()
            if e.record.expires_at <= now
        ][:batch]
        for owner, sid in expired:
            del self._users[owner][sid]
            if not self._users[owner]:
                del self._users[owner]
        for entry in (e for sessions in self._users.values() for e in sessions.values()):
            stale = [k for k, (_, at, _) in entry.applied.items() if at < idempotency_before]
            for applied_key in stale:
                del entry.applied[applied_key]
        return len(expired)
