"""The sessions store's contract: one interface, a memory and a PostgreSQL implementation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from services.sessions.model import AppendOutcome, NewTurn, Scope, SessionRecord, StoredTurn


class SessionStore(Protocol):
    """Every method filters by scope and hides expired sessions (expires_at <= now).

    Methods raise services.kit.errors exceptions: AlreadyExists, NotFound, Aborted,
    ResourceExhausted (a per-user cap), Unavailable (backend down, retryable).
    """

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Returns when the backend answers, raises when it does not (readiness checks it)."""
        ...

    async def create(self, record: SessionRecord, max_per_user: int = 0) -> SessionRecord:
        """Stores a new session; ResourceExhausted when its user already has `max_per_user`
        live sessions (0: no cap). The check and the insert are atomic per user."""
        ...

    async def get(self, scope: Scope, session_id: str, now: float) -> SessionRecord | None: ...

    async def list_sessions(
        self, scope: Scope, now: float, limit: int, after: tuple[float, str] | None
    ) -> list[SessionRecord]:
        """Most recently updated first; `after` is the (updated_at, session_id) of the last one seen."""
        ...

    async def delete(self, scope: Scope, session_id: str, now: float) -> bool: ...

    async def delete_user(self, scope: Scope) -> int: ...

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
        """Appends atomically at expected_version (-1: at the head); a known key replays.

        A known key whose append had another request_hash raises InvalidArgument.
        """
        ...

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
        """Oldest first from after_seq+1; None when the session is not visible.

        consistent=False may read a replica that lags; True reads the primary.
        """
        ...

    async def context_tail(
        self, scope: Scope, session_id: str, now: float, limit: int
    ) -> tuple[SessionRecord, list[StoredTurn]] | None:
        """The session and its newest unsummarised turns, newest first, from the primary."""
        ...

    async def turns_before(
        self, record: SessionRecord, above_seq: int, below_seq: int, limit: int
    ) -> list[StoredTurn]:
        """Turns with above_seq < seq < below_seq, newest first (after context_tail checked scope)."""
        ...

    async def save_summary(
        self,
        record: SessionRecord,
        expected_seq: int,
        new_seq: int,
        summary: str,
        summary_tokens: int,
        summarized_tokens: int,
    ) -> bool:
        """Compare-and-set of the summary on summarized_seq; False when someone moved it first."""
        ...

    async def sweep(self, now: float, batch: int, idempotency_before: float) -> int:
        """Purges up to `batch` expired sessions and old idempotency keys; returns sessions purged."""
        ...
